"""Atomic, resumable checkpoints with `torch.distributed.checkpoint` (DCP).

Layout of one checkpoint, `<folder>/step_00001200/`:
    .metadata, __<rank>_0.distcp   DCP: {"model": model state, "optim": {"state": AdamW state}} - every
                                   rank writes its own shards, so a 256-rank run never gathers weights
    trainer.json                   step, schedule, counters, world size (rank 0)
    rank_<r>.json                  per-rank state: data pipeline, RNG states (Python, NumPy, torch, CUDA)
    MANIFEST.json                  size and SHA-256 of every file above (each rank hashes the files it wrote)
    COMPLETE                       written last

Atomicity: everything is written into `<folder>/.tmp-step_00001200/` and renamed to `step_00001200/` by
rank 0 only after every rank has finished (barrier). A crash leaves at most a `.tmp-*` folder, which
`latest()` never picks and the next save deletes. `keep_last` complete checkpoints are kept.

Integrity: `latest()` checks that the newest complete folder has its manifest and that every file has its
recorded size (cheap); `load()` also checks every file's SHA-256 (each rank a share, the verdict shared by all
ranks, so a bad file can't leave one rank waiting for the others). Either failure is a `CorruptCheckpointError` naming the
folder and the file; `checkpoint.fallback = true` makes the trainer resume from the newest checkpoint that
verifies instead.

Safety: nothing is unpickled beyond DCP's index. Tensors load with `torch.load(weights_only=True)` (DCP
does that); the `.metadata` index is read with an allow-list unpickler that only builds DCP's own
metadata dataclasses, `torch.Size`, dtypes and paths; the non-tensor state is JSON (tensors inside it,
such as RNG states, are stored as base64 bytes with their dtype and shape). Optimizer hyper-parameters
(param_groups) are not saved: they come from the config, and the lr from the schedule.

Fault injection: `FLAMINGO_FAST_KILL_AT=<point>:<step>` SIGKILLs the process at that named point of saving
that step (points in KILL_POINTS, in write order); tests/test_checkpoint_kill_points.py kills at each one and
proves the resume exact.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from flamingo_fast.convert.pretrained import save_pretrained
from flamingo_fast.data.tokenizer import Tokenizer

STEP_DIR = re.compile(r"^step_(\d{8})$")
COMPLETE = "COMPLETE"
TRAINER_FILE = "trainer.json"
MANIFEST = "MANIFEST.json"
SET_ASIDE_PREFIX = ".old-"  # a complete checkpoint moved aside while the same step is re-saved
# The named points of a save, in order ("set_aside" and "new_in_place" only when re-saving a step).
KILL_POINTS = ("folder_created", "weights_written", "rank_state_written", "manifest_written", "marked_complete",
               "set_aside", "new_in_place", "renamed", "pruned")
KILL_AT_ENV = "FLAMINGO_FAST_KILL_AT"


def _kill_point(point: str, step: int) -> None:
    if os.environ.get(KILL_AT_ENV) == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


# -- JSON with tensors -------------------------------------------------------------------------------------
def to_jsonable(obj: Any) -> Any:
    """Nested dicts/lists/tuples/scalars/tensors/bytes -> JSON-compatible values (tagged for round trip)."""
    if isinstance(obj, torch.Tensor):
        data = obj.detach().cpu().contiguous()
        raw = data.view(torch.uint8).numpy().tobytes() if data.numel() else b""
        return {"__tensor__": str(data.dtype).removeprefix("torch."), "shape": list(data.shape),
                "data": base64.b64encode(raw).decode("ascii")}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": str(obj.dtype), "shape": list(obj.shape),
                "data": base64.b64encode(np.ascontiguousarray(obj).tobytes()).decode("ascii")}
    if isinstance(obj, bytes):
        return {"__bytes__": base64.b64encode(obj).decode("ascii")}
    if isinstance(obj, tuple):
        return {"__tuple__": [to_jsonable(v) for v in obj]}
    if isinstance(obj, dict):
        for key in obj:
            if not isinstance(key, str):
                raise TypeError(f"state keys must be strings to be stored as JSON, got {key!r}")
        return {key: to_jsonable(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in checkpoint JSON state")


def from_jsonable(obj: Any) -> Any:
    if isinstance(obj, list):
        return [from_jsonable(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        dtype = getattr(torch, obj["__tensor__"])
        raw = bytearray(base64.b64decode(obj["data"]))
        flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        return flat.view(dtype).reshape(obj["shape"]).clone()
    if "__ndarray__" in obj:
        return np.frombuffer(base64.b64decode(obj["data"]), dtype=obj["__ndarray__"]).reshape(obj["shape"]).copy()
    if "__bytes__" in obj:
        return base64.b64decode(obj["__bytes__"])
    if "__tuple__" in obj:
        return tuple(from_jsonable(v) for v in obj["__tuple__"])
    return {key: from_jsonable(value) for key, value in obj.items()}


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        json.dump(to_jsonable(data), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    with path.open() as f:
        return from_jsonable(json.load(f))


# -- RNG ---------------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# -- safe DCP metadata ------------------------------------------------------------------------------------
_ALLOWED_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only DCP's metadata classes: an index file can't run code the way an arbitrary pickle can."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch.distributed.checkpoint.metadata" and not name.startswith("__"):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which is not allowed")


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose `.metadata` is read with the allow-list unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        rank = kwargs.get("rank")
        path = Path(self.path) / (".metadata" if rank is None else f"__{rank}.metadata")
        with path.open("rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# -- model / optimizer state -------------------------------------------------------------------------------
def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _dcp_process_group_kwargs() -> dict:
    # Without an initialised process group DCP runs in single-process mode.
    return {} if dist.is_available() and dist.is_initialized() else {"no_dist": True}


def _optimizer_template(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return get_optimizer_state_dict(model, optimizer)


def is_hf_mllama_folder(path: str | Path) -> bool:
    """A transformers Llama 3.2 Vision folder: a config.json with model_type "mllama"."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == "mllama"
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        return False


def _check_same_architecture(configured, folder_cfg, folder: Path) -> None:
    """The configured model must be the folder's: its sizes, and the RoPE / norm settings no tensor shape shows.
    lm.max_seq_len (only the default KV-cache length) may differ."""
    differences = [f"connector: configured {configured.connector!r}, folder {folder_cfg.connector!r}"] \
        if configured.connector != folder_cfg.connector else []
    for part in ("vision", "xattn", "lm"):
        ours, theirs = dataclasses.asdict(getattr(configured, part)), dataclasses.asdict(getattr(folder_cfg, part))
        differences += [f"{part}.{key}: configured {ours[key]!r}, folder {theirs[key]!r}" for key in ours
                        if ours[key] != theirs[key] and key != "max_seq_len"]
    if differences:
        raise ValueError(f"model.init_from {folder} is a different model than model.preset / model.overrides "
                         f"configure: " + "; ".join(differences))


def _load_hf_mllama(model: nn.Module, folder: Path) -> list[str]:
    """Llama 3.2 Vision weights from a transformers folder, read by flamingo_fast.convert.from_hf_mllama. With a
    process group, rank 0 alone reads the whole model into host memory (bf16: 21 GB for 11B, 177 GB for 90B) and
    the state-dict loading broadcasts it tensor by tensor into every rank's shards."""
    from flamingo_fast.convert import from_hf_mllama, mllama_config

    _check_same_architecture(model.cfg, mllama_config(folder), folder)
    distributed = dist.is_available() and dist.is_initialized()
    full = from_hf_mllama(folder).state_dict() if not distributed or dist.get_rank() == 0 else {}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=distributed))
    return []


def load_model_weights(model: nn.Module, path: str | Path) -> list[str]:
    """Load weights into `model` (sharded or not) from a trainer checkpoint folder (its model part), a
    .safetensors file, or a transformers Llama 3.2 Vision folder (every weight; `is_hf_mllama_folder`). Keys
    missing from the file keep their current values; returns the missing keys. Unknown keys raise ValueError."""
    path = Path(path)
    if is_hf_mllama_folder(path):
        return _load_hf_mllama(model, path)
    if path.is_dir() and (path / ".metadata").is_file():
        state = {"model": get_model_state_dict(model)}
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        reader = SafeFileSystemReader(str(path))
        saved = {k.removeprefix("model."): v for k, v in reader.read_metadata().state_dict_metadata.items()
                 if k.startswith("model.") and isinstance(v, TensorStorageMetadata)}
        missing = sorted(set(state["model"]) - set(saved))
        for key in missing:
            del state["model"][key]
        dcp.load(state, storage_reader=SafeFileSystemReader(str(path)), **_dcp_process_group_kwargs())
        set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
        return missing
    if path.suffix == ".safetensors" and path.is_file():
        from safetensors.torch import load_file

        full = load_file(str(path))  # safetensors: plain tensors, no code
        own = get_model_state_dict(model)
        unknown = sorted(set(full) - set(own))
        if unknown:
            raise ValueError(f"{path}: {len(unknown)} keys are not parameters of this model, e.g. {unknown[:5]}")
        missing = sorted(set(own) - set(full))  # before set_model_state_dict, which may fill `full` in
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, strict=False))
        return missing
    raise ValueError(f"init weights {path} must be a trainer checkpoint folder (with .metadata), a .safetensors file "
                     "or a transformers Llama 3.2 Vision folder (config.json with model_type 'mllama')")


def export_pretrained(model: nn.Module, tokenizer: Tokenizer, folder: str | Path) -> None:
    """Write the full (unsharded) weights, config and tokenizer with `flamingo_fast.convert.save_pretrained`
    from rank 0, so that `flamingo-fast eval/generate --checkpoint folder` load them; all ranks must call it
    (gathering the weights is a collective)."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not dist.is_initialized() or dist.get_rank() == 0:
        save_pretrained(model, tokenizer, folder, state_dict=full)
    _barrier()


class CorruptCheckpointError(RuntimeError):
    """A checkpoint folder whose manifest is missing or unreadable, or a file that is missing or differs from it."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_records(folder: Path, names: list[str]) -> dict[str, dict]:
    return {name: {"bytes": (folder / name).stat().st_size, "sha256": _sha256(folder / name)} for name in names}


def read_manifest(folder: Path) -> dict[str, dict]:
    """{file name: {"bytes", "sha256"}} of a checkpoint folder; CorruptCheckpointError if missing or unreadable."""
    path = folder / MANIFEST
    try:
        files = json.loads(path.read_text())["files"]
        if not isinstance(files, dict) or not all(isinstance(v, dict) and {"bytes", "sha256"} <= set(v)
                                                  for v in files.values()):
            raise ValueError("no {file: {bytes, sha256}} table")
        if any(Path(name).name != name or name in (".", "..") for name in files):
            raise ValueError("a file name points outside the folder")
        return files
    except FileNotFoundError:
        raise CorruptCheckpointError(f"checkpoint {folder}: {MANIFEST} is missing") from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:  # JSONDecodeError is a ValueError
        raise CorruptCheckpointError(f"checkpoint {folder}: {MANIFEST} is unreadable ({error})") from None


def check_sizes(folder: Path) -> dict[str, dict]:
    """Every file the manifest lists exists with its recorded size (no hashing); returns the manifest's file
    table, CorruptCheckpointError if not."""
    files = read_manifest(folder)
    for name, record in files.items():
        path = folder / name
        if not path.is_file():
            raise CorruptCheckpointError(f"checkpoint {folder}: {name} is missing")
        if path.stat().st_size != record["bytes"]:
            raise CorruptCheckpointError(f"checkpoint {folder}: {name} has {path.stat().st_size} bytes, "
                                         f"the manifest says {record['bytes']} (truncated or overwritten)")
    return files


def verify_checkpoint(folder: Path, rank: int = 0, world_size: int = 1) -> None:
    """Sizes of every file, and the SHA-256 of this rank's share of them; every rank must call this and all
    get the same verdict (CorruptCheckpointError naming the folder and the first bad file)."""
    problem = None
    try:
        files = sorted(check_sizes(folder).items())
        for name, record in files[rank::world_size]:
            if _sha256(folder / name) != record["sha256"]:
                problem = f"checkpoint {folder}: {name} does not match its SHA-256 in {MANIFEST} (corrupted)"
                break
    except CorruptCheckpointError as error:
        problem = str(error)
    if dist.is_available() and dist.is_initialized():
        problems: list = [None] * dist.get_world_size()
        dist.all_gather_object(problems, problem)
        problem = next((p for p in problems if p), None)
    if problem:
        raise CorruptCheckpointError(problem)


class CheckpointManager:
    """Save/find/load checkpoints in `folder` (see the module docstring)."""

    def __init__(self, folder: str | Path, keep_last: int = 3, rank: int = 0, world_size: int = 1):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.folder = Path(folder)
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size

    # -- discovery ------------------------------------------------------------------------------------------
    def complete_checkpoints(self) -> list[tuple[int, Path]]:
        """(step, path) of every complete checkpoint, oldest first; `.tmp-*` folders are never listed."""
        if not self.folder.is_dir():
            return []
        found = []
        for child in self.folder.iterdir():
            match = STEP_DIR.match(child.name)
            if match and child.is_dir() and (child / COMPLETE).is_file():
                found.append((int(match.group(1)), child))
        return sorted(found)

    def newest_first(self) -> list[Path]:
        """Complete checkpoints, newest first; every rank must call this (rank 0 first repairs an interrupted
        re-save)."""
        if self.folder.is_dir():
            self._recover_set_aside()
        _barrier()
        return [path for _, path in reversed(self.complete_checkpoints())]

    def _recover_set_aside(self) -> None:
        """A `.old-step_N` folder is a complete checkpoint set aside by an interrupted re-save of step N: put it
        back if step_N did not make it in, else it is garbage."""
        if self.rank != 0:
            return
        for aside in self.folder.glob(f"{SET_ASIDE_PREFIX}step_*"):
            final = self.folder / aside.name.removeprefix(SET_ASIDE_PREFIX)
            if (final / COMPLETE).is_file():
                shutil.rmtree(aside, ignore_errors=True)
            elif (aside / COMPLETE).is_file():
                shutil.rmtree(final, ignore_errors=True)
                os.rename(aside, final)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None; every rank must call this. Raises CorruptCheckpointError if
        its manifest is missing or a file is missing or has the wrong size (not hashed: `load` does that)."""
        found = self.newest_first()
        if found:
            check_sizes(found[0])
        return found[0] if found else None

    # -- save -----------------------------------------------------------------------------------------------
    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict,
             rank_state: dict) -> Path:
        """Write checkpoint `step` atomically; every rank must call this."""
        final = self.folder / step_dir_name(step)
        tmp = self.folder / f".tmp-{step_dir_name(step)}"
        if self.rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            for stale in self.folder.glob(".tmp-step_*"):  # leftovers of a crash
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        _kill_point("folder_created", step)
        _barrier()
        optim_state = _optimizer_template(model, optimizer)
        state = {"model": get_model_state_dict(model), "optim": {"state": optim_state["state"]}}
        dcp.save(state, storage_writer=FileSystemWriter(str(tmp), sync_files=True), **_dcp_process_group_kwargs())
        _kill_point("weights_written", step)
        rank_file = f"rank_{self.rank}.json"
        _write_json(tmp / rank_file, rank_state)
        _kill_point("rank_state_written", step)
        # Each rank hashes what it wrote (its DCP shards and state file), so no rank reads the whole checkpoint.
        mine = sorted(p.name for p in tmp.glob(f"__{self.rank}_*.distcp")) + [rank_file]
        _write_json(tmp / f".manifest_rank_{self.rank}.json", _file_records(tmp, mine))
        _barrier()
        if self.rank == 0:
            _write_json(tmp / TRAINER_FILE, {**trainer_state, "step": step, "world_size": self.world_size})
            files = _file_records(tmp, [n for n in (".metadata", TRAINER_FILE) if (tmp / n).is_file()])
            for part in sorted(tmp.glob(".manifest_rank_*.json")):
                files.update(_read_json(part))
                part.unlink()
            _write_json(tmp / MANIFEST, {"files": dict(sorted(files.items()))})
            _kill_point("manifest_written", step)
            (tmp / COMPLETE).write_text(f"{step}\n")
            _kill_point("marked_complete", step)
            if final.exists():  # re-saving the same step (e.g. the final save of a resumed, finished run)
                # Renames only until the new folder is in place: a kill at any point leaves either the old or
                # the new complete checkpoint under step_N (a set-aside old one is put back by the next listing).
                aside = self.folder / f"{SET_ASIDE_PREFIX}{final.name}"
                shutil.rmtree(aside, ignore_errors=True)
                os.rename(final, aside)
                _kill_point("set_aside", step)
                os.rename(tmp, final)
                _kill_point("new_in_place", step)
                shutil.rmtree(aside, ignore_errors=True)
            else:
                os.rename(tmp, final)
            _kill_point("renamed", step)
            self._prune()
            _kill_point("pruned", step)
        _barrier()
        return final

    def _prune(self) -> None:
        complete = self.complete_checkpoints()
        for _, path in complete[: max(len(complete) - self.keep_last, 0)]:
            shutil.rmtree(path, ignore_errors=True)

    # -- load -----------------------------------------------------------------------------------------------
    def load(self, path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict | None]:
        """Restore model + optimizer from `path`; returns (trainer_state, this rank's state or None when the
        checkpoint was written with a different world size)."""
        path = Path(path)
        if not (path / COMPLETE).is_file():
            raise ValueError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
        verify_checkpoint(path, self.rank, self.world_size)
        optim_state = _optimizer_template(model, optimizer)
        state = {"model": get_model_state_dict(model), "optim": {"state": optim_state["state"]}}
        dcp.load(state, storage_reader=SafeFileSystemReader(str(path)), **_dcp_process_group_kwargs())
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer,
                                 {"state": state["optim"]["state"], "param_groups": optim_state["param_groups"]})
        trainer_state = _read_json(path / TRAINER_FILE)
        if trainer_state.get("world_size") != self.world_size:
            return trainer_state, None  # the data pipeline restarts: its per-rank state does not fit
        rank_file = path / f"rank_{self.rank}.json"
        if not rank_file.is_file():
            raise ValueError(
                f"{path}: {rank_file.name} is missing although the checkpoint was written by "
                f"{self.world_size} rank(s), as now: rank {self.rank}'s data position and RNG state are lost, so the "
                "resume would not be exact. Delete this folder to resume from the previous checkpoint.")
        return trainer_state, _read_json(rank_file)
