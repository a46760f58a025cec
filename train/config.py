"""Trainer configuration: dataclass sections filled from a TOML file plus `--section.key=value` overrides.

    [model]       preset, model-config overrides, which parameters train, weights to start from
    [data]        sources (flamingo_fast.data spec dicts), tokenizer, sequence length, micro-batch, eval split
    [optim]       AdamW hyper-parameters and the warm-up + cosine schedule
    [train]       steps or epochs, global batch in tokens, seed, logging, non-finite tolerance, run folder
    [parallel]    FSDP2 mixed precision, activation checkpointing, torch.compile, ops backend
    [checkpoint]  interval, keep-last-k, resume
    [eval]        held-out evaluation (per epoch in fine-tuning, and at the end)

Override values are parsed as TOML literals when they parse (`--optim.lr=3e-4`, `--train.steps=10`,
`--parallel.compile=true`, `--data.sources=[{kind="shapes"}]`), else taken as a bare string
(`--train.out_dir=runs/x`). Unknown sections/keys and wrongly typed values raise ValueError naming them.
"""

from __future__ import annotations

import copy
import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flamingo_fast.models.compile import COMPILE_MODES
from flamingo_fast.models.config import TRAINABLE_MODES, FlamingoConfig

DTYPES = ("float32", "bfloat16", "float16")
AC_MODES = ("none", "selective", "full")


@dataclass
class ModelSection:
    preset: str = "demo"
    # Passed to FlamingoConfig.from_preset(preset, **overrides), e.g. {vision = {image_size = 32}}.
    overrides: dict = field(default_factory=dict)
    trainable: str = "flamingo"  # Flamingo.set_trainable mode
    # Weights to start from: a trainer checkpoint folder (DCP, model part only), a .safetensors file, or a
    # transformers Llama 3.2 Vision folder (config.json with model_type "mllama"; its architecture must be the
    # configured model's: train/checkpoint.py).
    init_from: str = ""
    # "cpu"/"cuda": build with real weights then shard; "meta": build on meta, shard, then materialise
    # shard by shard (large presets). Default: "meta" for presets other than demo.
    init_device: str = ""


@dataclass
class DataSection:
    # flamingo_fast.data.pipeline source specs (dicts with "kind", "weight", ...).
    sources: list = field(default_factory=lambda: [{"kind": "shapes", "split": "train", "n": 100000}])
    tokenizer: str = "shapes"  # "shapes" (embedded word tokenizer) or a path to a tokenizer.json / folder
    image_size: int = 0  # 0: the model's vision.image_size
    max_length: int = 64  # tokens per row (truncation); also the nominal row length of the token budget
    micro_batch_size: int = 16  # rows per rank per forward/backward
    num_workers: int = 0  # decode workers (threads) of the pipeline
    prefetch: int = 2  # batches prepared ahead in a background thread (0: none)
    max_consecutive_skips: int = 1000  # broken records in a row that stop the run (unreadable data, not noise)
    # Pack whole samples into rows of exactly max_length tokens, one source per row (flamingo_fast/data/packing.py);
    # false: one sample per row, padded. Evaluation is never packed. Llama 3.2 Vision (the mllama presets) needs
    # false: its image groups are not defined across packed documents.
    packing: bool = True
    packing_buffer: int = 32  # samples buffered per source for packing (fuller rows vs. longer replay on resume)


@dataclass
class OptimSection:
    lr: float = 1e-4
    min_lr: float = 1e-6  # cosine floor
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    resampler_weight_decay: float = 0.0  # the paper uses none on the Perceiver Resampler
    gate_lr_multiplier: float = 1.0  # lr factor of the xattn tanh gates (train/optim.py; 1 = the paper)
    warmup_steps: int = 10000
    # Cosine decay length in optimizer steps after warm-up ends; 0: until the last step of the run.
    decay_steps: int = 0
    clip_grad_norm: float = 1.0  # global-norm clipping; 0 disables


@dataclass
class TrainSection:
    steps: int = 1000  # optimizer steps (ignored when epochs > 0)
    epochs: int = 0  # > 0: fine-tuning mode, train.epochs passes over the training split
    steps_per_epoch: int = 0  # 0: derived from the sources' sizes (needed for sources of unknown size)
    global_batch_tokens: int = 65536  # tokens per optimizer step across all ranks and micro-batches
    seed: int = 0
    log_every: int = 10
    max_consecutive_nonfinite: int = 5  # skipped (non-finite) steps in a row before the run stops
    out_dir: str = "runs/demo"
    progress: bool = True  # rich progress bar (log lines are printed either way)
    threads: int = 0  # torch intra-op threads on CPU (0: leave torch's default)


@dataclass
class ParallelSection:
    # FSDP2 fully_shard (also at world size 1: the same code path everywhere). false: one plain process in
    # float32 (e.g. the CPU demo, where sharding one rank only adds copies).
    fsdp: bool = True
    param_dtype: str = "bfloat16"
    reduce_dtype: str = "float32"
    activation_checkpoint: str = "none"  # "none" | "selective" (save matmul/attention outputs) | "full"
    compile: bool = False  # torch.compile the model
    compile_mode: str = "regional"  # "regional": each repeated block once (identical blocks share it) | "whole"
    # torchao float8 training for the frozen LM blocks' Linear layers (forward and input-gradient matmuls);
    # needs a GPU with float8 matmuls (Hopper) and torchao, and fails rather than fall back to bf16.
    float8: bool = False
    # Force an ops backend for every op ("cuda" | "torch" | "reference"): sets FLAMINGO_FAST_BACKEND.
    # Empty: automatic (the fused kernels where supported, e.g. bf16 on Hopper).
    ops_backend: str = ""
    dist_backend: str = "auto"  # "auto" (nccl with CUDA, else gloo) | "nccl" | "gloo"


@dataclass
class CheckpointSection:
    every: int = 0  # save every N optimizer steps (0: only at the end of the run)
    keep_last: int = 3  # complete checkpoints kept; older ones are deleted
    resume: bool = False  # start from the latest complete checkpoint in the run folder, if any
    fallback: bool = False  # on resume, skip checkpoints that fail verification (else: stop with the error)
    folder: str = "checkpoints"  # relative to train.out_dir
    save_final: bool = True
    export_safetensors: bool = False  # also write out_dir/model.safetensors (full weights) at the end


@dataclass
class EvalSection:
    # Held-out samples (source specs like data.sources, read once in order). Caption samples are scored
    # by exact match against their references, samples with answers by VQA accuracy.
    sources: list = field(default_factory=lambda: [
        {"kind": "shapes", "split": "val", "n": 100, "task": "caption", "name": "val_caption"},
        {"kind": "shapes", "split": "val", "n": 100, "task": "vqa", "name": "val_vqa"},
    ])
    at_end: bool = True  # evaluate on the held-out split after the last step
    every_epoch: bool = True  # fine-tuning mode: evaluate after every epoch
    max_new_tokens: int = 24
    batch_size: int = 64
    show_samples: int = 4  # generated examples printed per task


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def validate(self) -> None:
        try:  # the model config checks its own fields: a bad preset or size fails here, not after minutes of setup
            model_cfg = FlamingoConfig.from_preset(self.model.preset, **self.model.overrides)
        except (ValueError, TypeError) as error:
            raise ValueError(f"model.preset / model.overrides: {error}") from None
        if self.model.trainable not in TRAINABLE_MODES:
            raise ValueError(f"model.trainable must be one of {TRAINABLE_MODES}, got {self.model.trainable!r}")
        if self.model.init_device not in ("", "cpu", "cuda", "meta"):
            raise ValueError(f"model.init_device must be '', 'cpu', 'cuda' or 'meta', got {self.model.init_device!r}")
        for name in ("param_dtype", "reduce_dtype"):
            if getattr(self.parallel, name) not in DTYPES:
                raise ValueError(f"parallel.{name} must be one of {DTYPES}, got {getattr(self.parallel, name)!r}")
        if self.parallel.activation_checkpoint not in AC_MODES:
            raise ValueError(
                f"parallel.activation_checkpoint must be one of {AC_MODES}, got {self.parallel.activation_checkpoint!r}"
            )
        if not self.parallel.fsdp and (self.parallel.param_dtype, self.parallel.reduce_dtype) != ("float32", "float32"):
            raise ValueError("parallel.param_dtype/reduce_dtype take effect through FSDP's mixed precision; with "
                             "parallel.fsdp=false set both to 'float32'")
        if self.parallel.ops_backend not in ("", "cuda", "torch", "reference"):
            raise ValueError(f"parallel.ops_backend must be '', 'cuda', 'torch' or 'reference', got {self.parallel.ops_backend!r}")
        if self.parallel.compile_mode not in COMPILE_MODES:
            raise ValueError(f"parallel.compile_mode must be one of {COMPILE_MODES}, got {self.parallel.compile_mode!r}")
        if self.parallel.dist_backend not in ("auto", "nccl", "gloo"):
            raise ValueError(f"parallel.dist_backend must be 'auto', 'nccl' or 'gloo', got {self.parallel.dist_backend!r}")
        positive = {
            "data.max_length": self.data.max_length,
            "data.micro_batch_size": self.data.micro_batch_size,
            "data.max_consecutive_skips": self.data.max_consecutive_skips,
            "data.packing_buffer": self.data.packing_buffer,
            "train.global_batch_tokens": self.train.global_batch_tokens,
            "train.log_every": self.train.log_every,
            "train.max_consecutive_nonfinite": self.train.max_consecutive_nonfinite,
            "checkpoint.keep_last": self.checkpoint.keep_last,
            "eval.batch_size": self.eval.batch_size,
            "eval.max_new_tokens": self.eval.max_new_tokens,
        }
        if not isinstance(self.data.packing, bool):
            raise ValueError(f"data.packing must be true or false, got {self.data.packing!r}")
        if self.data.packing and model_cfg.xattn.media_span != "index":
            raise ValueError(f"data.packing = true puts several documents in a row, which model.preset "
                             f"{self.model.preset!r} cannot train on (xattn.media_span = "
                             f"{model_cfg.xattn.media_span!r}: Llama 3.2 Vision's image groups); "
                             "set data.packing = false")
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.train.epochs < 0 or (self.train.epochs == 0 and self.train.steps < 1):
            raise ValueError(f"train.steps must be >= 1 (or train.epochs > 0), got steps={self.train.steps}, "
                             f"epochs={self.train.epochs}")
        if self.train.epochs > 0 and self.data.packing and self.train.steps_per_epoch == 0:
            raise ValueError("train.epochs with data.packing = true: how many packed rows an epoch makes depends on "
                             "the samples' lengths, so set train.steps_per_epoch, or data.packing = false (one "
                             "sample per row, an epoch is the sources' size / rows per step)")
        if self.optim.lr <= 0 or self.optim.min_lr < 0 or self.optim.min_lr > self.optim.lr:
            raise ValueError(f"need 0 <= optim.min_lr <= optim.lr and lr > 0, got lr={self.optim.lr}, "
                             f"min_lr={self.optim.min_lr}")
        if self.optim.gate_lr_multiplier <= 0:
            raise ValueError(f"optim.gate_lr_multiplier must be > 0, got {self.optim.gate_lr_multiplier}")
        if self.optim.warmup_steps < 0 or self.optim.decay_steps < 0 or self.checkpoint.every < 0:
            raise ValueError("optim.warmup_steps, optim.decay_steps and checkpoint.every must be >= 0")
        for name, sources in (("data.sources", self.data.sources), ("eval.sources", self.eval.sources)):
            _check_source_specs(name, sources)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = tuple(f.name for f in dataclasses.fields(TrainConfig))


def _check_source_specs(name: str, sources: Any) -> None:
    """The shape of each spec (its files are read when the sources are built)."""
    from flamingo_fast.data.pipeline import check_source_spec

    if not isinstance(sources, list) or not sources:
        raise ValueError(f"{name} must be a non-empty list of source specs, got {sources!r}")
    for i, spec in enumerate(sources):
        check_source_spec(spec, f"{name}[{i}]")


def _coerce(where: str, value: Any, expected: Any) -> Any:
    """Check `value` against the dataclass field type (ints are accepted for floats)."""
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    origin = typing.get_origin(expected) or expected
    if origin is bool and not isinstance(value, bool):
        raise ValueError(f"{where} must be true or false, got {value!r}")
    if origin is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{where} must be an integer, got {value!r}")
    if origin in (float, str, list, dict) and not isinstance(value, origin):
        raise ValueError(f"{where} must be a {origin.__name__}, got {type(value).__name__} {value!r}")
    return copy.deepcopy(value)


def _field_types(section_cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def apply_dict(cfg: TrainConfig, data: dict[str, Any], origin: str = "config") -> TrainConfig:
    """Set every `section.key` present in `data` (a parsed TOML document) on `cfg`."""
    for section, values in data.items():
        if section not in SECTIONS:
            raise ValueError(f"{origin}: unknown section [{section}]; expected one of {sorted(SECTIONS)}")
        if not isinstance(values, dict):
            raise ValueError(f"{origin}: [{section}] must be a table, got {type(values).__name__}")
        target = getattr(cfg, section)
        types = _field_types(type(target))
        for key, value in values.items():
            if key not in types:
                raise ValueError(f"{origin}: unknown key {section}.{key}; expected one of {sorted(types)}")
            setattr(target, key, _coerce(f"{origin}: {section}.{key}", value, types[key]))
    return cfg


def parse_value(text: str) -> Any:
    """A TOML literal if `text` is one (number, bool, string in quotes, array, inline table), else `text`."""
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(args: list[str]) -> dict[str, dict[str, Any]]:
    """["--optim.lr=1e-3", "--train.steps", "5"] -> {"optim": {"lr": 0.001}, "train": {"steps": 5}}."""
    result: dict[str, dict[str, Any]] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ValueError(f"expected an override --section.key=value, got {arg!r}")
        if "=" in arg:
            name, text = arg[2:].split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ValueError(f"override {arg!r} has no value")
            name, text = arg[2:], args[i + 1]
            i += 1
        section, _, key = name.partition(".")
        if not section or not key or "." in key:
            raise ValueError(f"override {arg!r} must name one section and one key (--section.key=value)")
        result.setdefault(section, {})[key] = parse_value(text)
        i += 1
    return result


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults <- TOML file <- command-line overrides; then validated."""
    cfg = TrainConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        with path.open("rb") as f:
            try:
                data = tomllib.load(f)
            except tomllib.TOMLDecodeError as error:
                raise ValueError(f"{path} is not valid TOML: {error}") from None
        apply_dict(cfg, data, origin=str(path))
    if overrides:
        apply_dict(cfg, parse_overrides(overrides), origin="command line")
    cfg.validate()
    return cfg


def config_path(name: str) -> Path:
    """Path of a config shipped in train/configs ("demo" -> train/configs/demo.toml)."""
    path = Path(__file__).parent / "configs" / (name if name.endswith(".toml") else f"{name}.toml")
    if not path.is_file():
        raise FileNotFoundError(f"no shipped config {name!r} at {path}")
    return path


def to_toml(data: dict[str, Any]) -> str:
    """A TOML rendering of `TrainConfig.to_dict()` (saved as config.toml in the run folder)."""

    def literal(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (int, float)):
            return repr(value)
        if isinstance(value, str):
            return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(value, list):
            return "[" + ", ".join(literal(v) for v in value) + "]"
        if isinstance(value, dict):
            return "{" + ", ".join(f"{k} = {literal(v)}" for k, v in value.items()) + "}"
        raise TypeError(f"cannot write {type(value).__name__} to TOML")

    lines = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {literal(value)}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)
