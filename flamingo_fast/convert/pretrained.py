"""This project's own exported model folder: what `flamingo-fast generate` and `flamingo-fast eval` load.

    folder/
      config.json                      FlamingoConfig.to_dict() as JSON
      model.safetensors                the Flamingo state dict (this project's parameter names), or shards
                                       listed in model.safetensors.index.json
      tokenizer.json                   + special_tokens_map.json (flamingo_fast.data.Tokenizer.save)

`save_pretrained` writes it; `load_pretrained` builds the model on the meta device and materialises it
tensor by tensor from the file (file dtype kept unless `dtype` is given), then checks that the tokenizer's
vocabulary and special ids agree with the config.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Optional

import torch

from flamingo_fast.convert.loading import (
    CheckpointKeyError,
    TensorLoader,
    iter_safetensors,
    read_json,
    safetensors_files,
    safetensors_keys,
)
from flamingo_fast.data.tokenizer import Tokenizer, load_tokenizer
from flamingo_fast.models.config import FlamingoConfig
from flamingo_fast.models.flamingo import Flamingo

CONFIG_FILE = "config.json"


def save_pretrained(model: Flamingo, tokenizer: Tokenizer, folder: str | os.PathLike,
                    state_dict: Optional[Mapping[str, torch.Tensor]] = None) -> Path:
    """Write config.json, model.safetensors and the tokenizer files into `folder` (created if needed).
    state_dict: the weights to write instead of model.state_dict(), e.g. a sharded model's gathered full
    state dict (torch.distributed.checkpoint.state_dict.get_model_state_dict)."""
    from safetensors.torch import save_file

    check_tokenizer(model.cfg, tokenizer, "save_pretrained")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(model.cfg.to_dict(), indent=2) + "\n")
    weights = model.state_dict() if state_dict is None else state_dict
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in weights.items()}
    tmp = folder / "model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt", "producer": "flamingo_fast"})
    os.replace(tmp, folder / "model.safetensors")
    tokenizer.save(folder)
    return folder


def check_tokenizer(cfg: FlamingoConfig, tokenizer: Tokenizer, source: str) -> None:
    if not isinstance(tokenizer, Tokenizer):
        raise TypeError(f"tokenizer must be a flamingo_fast.data.Tokenizer, got {type(tokenizer).__name__}")
    ours = (cfg.vocab_size, cfg.image_token_id, cfg.eoc_token_id)
    theirs = (tokenizer.vocab_size, tokenizer.image_token_id, tokenizer.eoc_token_id)
    if ours != theirs:
        raise ValueError(f"{source}: tokenizer (vocab_size, <image>, <|endofchunk|>) = {theirs} does not match the "
                         f"model config's {ours}")


def load_pretrained(folder: str | os.PathLike, device: torch.device | str = "cpu",
                    dtype: Optional[torch.dtype] = None) -> tuple[Flamingo, Tokenizer]:
    """(model in eval mode, tokenizer) from an exported folder (module docstring)."""
    folder = Path(folder)
    source = str(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    cfg = FlamingoConfig.from_dict(read_json(folder / CONFIG_FILE))
    tokenizer = load_tokenizer(folder)
    check_tokenizer(cfg, tokenizer, source)
    with torch.device("meta"):
        model = Flamingo(cfg)
    files = safetensors_files(folder)
    names = set(safetensors_keys(files))
    expected = set(model.state_dict())
    if names != expected:
        raise CheckpointKeyError(source, expected - names, names - expected,
                                 "was it written by flamingo_fast.convert.save_pretrained for this config?")
    loader = TensorLoader(model, source, dtype, device)
    for name, tensor in iter_safetensors(files):
        loader.put(name, tensor)
    return model.eval(), tokenizer
