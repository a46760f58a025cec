"""Import Hugging Face CLIP vision weights (local folder) into `flamingo_fast.models.VisionTransformer`.

Accepts a `CLIPVisionModel` folder (config.json with model_type "clip_vision_model") or a full `CLIPModel`
folder (model_type "clip"; its `vision_config` is used and the text tower, projections and logit scale
are skipped). Names map one-to-one after dropping an optional `vision_model.` prefix (vision.py keeps
CLIP's names, including its `pre_layrnorm` spelling).

What the encoder hands to the resampler is a usage choice, not part of the weights: pass
`output_class_token` / `output_norm` (VisionConfig fields) to choose; HF's `last_hidden_state` equals
output_class_token=True, output_norm=False.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch

from flamingo_fast.convert.loading import (
    CheckpointKeyError,
    TensorLoader,
    iter_safetensors,
    read_json,
    safetensors_files,
    safetensors_keys,
)
from flamingo_fast.models.config import VisionConfig
from flamingo_fast.models.vision import VisionTransformer

# Parts of a full CLIPModel (or old exports) that the vision encoder does not use.
_SKIPPED_PREFIXES = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")
_IGNORED_SUFFIXES = ("embeddings.position_ids",)  # a buffer in old exports: positions are implicit here


def clip_vision_config(folder: str | os.PathLike, **options: Any) -> VisionConfig:
    """The `VisionConfig` of a HF CLIP(Vision)Model folder's config.json (missing fields take
    CLIPVisionConfig's defaults); `options` set the non-weight fields (output_class_token, output_norm)."""
    path = Path(folder) / "config.json"
    c = read_json(path)
    model_type = c.get("model_type")
    if model_type == "clip":
        c = c.get("vision_config") or {}
    elif model_type != "clip_vision_model":
        raise ValueError(f"{path}: model_type {model_type!r} is not CLIP ('clip' or 'clip_vision_model')")
    activation = c.get("hidden_act", "quick_gelu")
    if activation not in ("quick_gelu", "gelu"):
        raise ValueError(f"{path}: hidden_act {activation!r} is not supported ('quick_gelu' or 'gelu')")
    cfg = VisionConfig(
        image_size=int(c.get("image_size", 224)),
        patch_size=int(c.get("patch_size", 32)),
        channels=int(c.get("num_channels", 3)),
        width=int(c.get("hidden_size", 768)),
        layers=int(c.get("num_hidden_layers", 12)),
        heads=int(c.get("num_attention_heads", 12)),
        mlp_dim=int(c.get("intermediate_size", 3072)),
        activation=activation,
        layer_norm_eps=float(c.get("layer_norm_eps", 1e-5)),
        class_token=True,
    )
    for key, value in options.items():
        if not hasattr(cfg, key):
            raise ValueError(f"unknown VisionConfig option {key!r}")
        setattr(cfg, key, value)
    cfg.validate()
    return cfg


def clip_param_name(hf_name: str) -> Optional[str]:
    """Our VisionTransformer name for a HF CLIP tensor name (None: not part of the vision encoder)."""
    if hf_name.startswith(_SKIPPED_PREFIXES) or hf_name.endswith(_IGNORED_SUFFIXES):
        return None
    return hf_name[len("vision_model."):] if hf_name.startswith("vision_model.") else hf_name


def _check_same_shape(vision: VisionTransformer, cfg: VisionConfig, source: str) -> None:
    fields = ("image_size", "patch_size", "channels", "width", "layers", "heads", "mlp_dim", "activation", "stem")
    differ = [f"{f}: model {getattr(vision.cfg, f)!r} vs checkpoint {getattr(cfg, f)!r}" for f in fields
              if getattr(vision.cfg, f) != getattr(cfg, f)]
    if differ:
        raise ValueError(f"{source}: the target encoder's config does not match config.json ({'; '.join(differ)})")


def from_hf_clip_vision(
    folder: str | os.PathLike,
    into: Optional[VisionTransformer] = None,
    dtype: Optional[torch.dtype] = None,
    device: Optional[torch.device | str] = None,
    **options: Any,
) -> VisionTransformer:
    """Load a HF CLIP folder's vision tower; returns the `VisionTransformer` (config: `.cfg`).

    into: an existing VisionTransformer to fill, e.g. `flamingo.vision` (weights' shapes must match);
    None builds one from config.json (+ `options`) on the meta device and materialises it from the file.
    dtype/device as in `from_hf_llama`. Raises CheckpointKeyError listing missing/unexpected tensors.
    """
    folder = Path(folder)
    source = str(folder)
    if into is None:
        with torch.device("meta"):
            vision = VisionTransformer(clip_vision_config(folder, **options))
    else:
        if not isinstance(into, VisionTransformer):
            raise TypeError(f"into must be a flamingo_fast VisionTransformer, got {type(into).__name__}")
        if options:
            raise ValueError("options configure a new encoder; with `into`, set them on its config instead")
        _check_same_shape(into, clip_vision_config(folder), source)
        vision = into

    files = safetensors_files(folder)
    ours = dict(vision.named_parameters())
    names, unexpected = {}, []
    for hf_name in safetensors_keys(files):
        name = clip_param_name(hf_name)
        if name is None:
            continue
        if name in ours:
            names[hf_name] = name
        else:
            unexpected.append(hf_name)
    missing = set(ours) - set(names.values())
    if missing or unexpected:
        raise CheckpointKeyError(source, missing, unexpected, "is this a CLIP(Vision)Model checkpoint?")

    loader = TensorLoader(vision, source, dtype, device)
    for hf_name, tensor in iter_safetensors(files, set(names)):
        loader.put(names[hf_name], tensor, hf_name)
    return vision
