"""Streaming weight loading shared by the converters.

Checkpoints are read one tensor at a time (safetensors `safe_open`, shard by shard; torch files through
`torch.load(mmap=True, weights_only=True)`), renamed to this project's parameter names, and either
*assigned* (a parameter on the meta device takes the file's tensor as it is: no copy, the file's dtype
kept unless `dtype` is given) or *copied* into an existing parameter (cast to that parameter's dtype).
So a model built on the meta device is materialised straight from the file, never holding a second full
copy of the weights.

Key problems are collected before anything is loaded and reported together in a `CheckpointKeyError`
(a ValueError) that lists the missing and the unexpected names.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import torch
from torch import nn

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
_LIST_LIMIT = 20


class CheckpointKeyError(ValueError):
    """The checkpoint's tensor names do not match the model: `missing` / `unexpected` list them."""

    def __init__(self, source: str, missing: Iterable[str] = (), unexpected: Iterable[str] = (), hint: str = ""):
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        parts = [f"{source}: checkpoint does not match the model"]
        for label, names in (("missing", self.missing), ("unexpected", self.unexpected)):
            if names:
                shown = ", ".join(names[:_LIST_LIMIT]) + (f", ... ({len(names)} in all)" if len(names) > _LIST_LIMIT else "")
                parts.append(f"{label} keys ({len(names)}): {shown}")
        if hint:
            parts.append(hint)
        super().__init__("; ".join(parts))


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def safetensors_files(folder: str | os.PathLike) -> list[Path]:
    """The shard files of a HF folder: from `model.safetensors.index.json`, else `model.safetensors`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: no 'weight_map'")
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"{index} names shards that are not there: {absent}")
        return files
    single = folder / SAFETENSORS_SINGLE
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"{folder} has neither {SAFETENSORS_INDEX} nor {SAFETENSORS_SINGLE}")


def safetensors_keys(files: list[Path]) -> list[str]:
    from safetensors import safe_open

    keys = []
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            keys.extend(f.keys())
    return keys


def iter_safetensors(files: list[Path], wanted: Optional[set[str]] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) one at a time, shard by shard; only names in `wanted` when given."""
    from safetensors import safe_open

    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if wanted is None or name in wanted:
                    yield name, f.get_tensor(name)


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A torch.save'd state dict, loaded with weights_only=True (no code runs) and memory-mapped when the
    file is in the zip format, so tensors are paged in as they are used."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:
        if "mmap" not in str(error):
            raise
        state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    if isinstance(state, dict) and "model_state_dict" in state and isinstance(state["model_state_dict"], dict):
        state = state["model_state_dict"]  # OpenFlamingo training checkpoints wrap the weights
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict (name -> tensor)")
    return state


def _set_parameter(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    old = getattr(owner, leaf)
    if isinstance(old, nn.Parameter):
        setattr(owner, leaf, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        owner.register_buffer(leaf, value, persistent=leaf not in owner._non_persistent_buffers_set)


class TensorLoader:
    """Puts tensors into `module`'s parameters by name (assign if meta, else copy; module docstring)."""

    def __init__(self, module: nn.Module, source: str, dtype: Optional[torch.dtype] = None,
                 device: Optional[torch.device | str] = None):
        self.module, self.source, self.dtype = module, source, dtype
        self.device = torch.device(device) if device is not None else None
        self.targets = dict(module.named_parameters())
        self.targets.update(dict(module.named_buffers()))
        self.loaded: set[str] = set()

    def put(self, name: str, tensor: torch.Tensor, source_name: Optional[str] = None) -> None:
        target = self.targets[name]
        if tuple(target.shape) != tuple(tensor.shape):
            raise ValueError(
                f"{self.source}: tensor {source_name or name!r} has shape {tuple(tensor.shape)} but the model's "
                f"{name!r} expects {tuple(target.shape)} (does the config match the checkpoint?)"
            )
        with torch.no_grad():
            if target.is_meta:
                value = tensor.to(dtype=self.dtype or tensor.dtype, device=self.device or torch.device("cpu"))
                _set_parameter(self.module, name, value)
                self.targets[name] = self._lookup(name)
            else:
                target.copy_(tensor)
        self.loaded.add(name)

    def _lookup(self, name: str) -> torch.Tensor:
        owner_name, _, leaf = name.rpartition(".")
        owner = self.module.get_submodule(owner_name) if owner_name else self.module
        return getattr(owner, leaf)

    def get(self, name: str) -> torch.Tensor:
        return self.targets[name]

    def fill(self, name: str, make: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Set `name` to make(current) (e.g. rows derived from other loaded weights), assign or copy."""
        target = self.targets[name]
        value = make(target)
        if target.is_meta:
            _set_parameter(self.module, name, value.to(device=self.device or torch.device("cpu")))
            self.targets[name] = self._lookup(name)
        else:
            with torch.no_grad():
                target.copy_(value)

    def still_meta(self) -> list[str]:
        return sorted(name for name, t in self.targets.items() if t.is_meta)
