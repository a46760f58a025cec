"""Llama 3.2 Vision (transformers' `MllamaForConditionalGeneration`) import: config and safetensors shards.

    model = from_hf_mllama(folder)             # -> Flamingo with the mllama family config (models/config.py)

Names (transformers 5 writes `model.vision_model.*`, `model.language_model.*`, `model.multi_modal_projector.*`,
`lm_head.weight`; checkpoints saved by transformers 4 have `vision_model.*`, `language_model.model.*`,
`language_model.lm_head.weight`, `multi_modal_projector.*`; both are read):
* vision_model.X -> vision.X (tiled_vision.py keeps transformers' names); multi_modal_projector -> projector.
* text decoder layer i: a cross-attention layer (i in cross_attention_layers) becomes xattn layer
  str(i - c) where c = cross-attention layers before i (the layer runs before LM block i - c); any other layer
  is LM block i - c. Cross-attention: q_proj -> attn.to_q, [k_proj; v_proj] -> attn.to_kv, o_proj ->
  attn.to_out, q_norm / k_norm -> attn.q_norm / k_norm, input_layernorm -> attn.norm, [gate_proj; up_proj] ->
  ffw.fc1, down_proj -> ffw.fc2, post_attention_layernorm -> ffw.norm, cross_attn_{attn,mlp}_gate ->
  {attn,ffw}_gate.
* embed_tokens (V + 8 rows): rows [0, V) -> lm.embed_tokens, rows V (`<|image|>`) and V + 1 -> lm.special_embed;
  the 6 other reserved rows are unused by the model and dropped. lm_head -> lm.lm_head (V rows: the image token
  is input-only, LMConfig.special_logits=False).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from flamingo_fast.convert.llama import rope_settings
from flamingo_fast.convert.loading import (CheckpointKeyError, TensorLoader, iter_safetensors, read_json,
                                           safetensors_files, safetensors_keys)
from flamingo_fast.models.config import FlamingoConfig, LMConfig, VisionConfig, mllama_xattn
from flamingo_fast.models.flamingo import Flamingo

_PREFIXES = (  # (transformers' prefix, ours), newest layout first
    ("model.vision_model.", "vision."), ("vision_model.", "vision."),
    ("model.multi_modal_projector.", "projector."), ("multi_modal_projector.", "projector."),
    ("model.language_model.", "text."), ("language_model.model.", "text."),
    ("lm_head.", "lm.lm_head."), ("language_model.lm_head.", "lm.lm_head."),
)
_CROSS = {  # cross-attention decoder layer names -> (our name under xattn_layers.<n>., part of a stack)
    "cross_attn.q_proj.weight": ("attn.to_q.weight", None),
    "cross_attn.k_proj.weight": ("attn.to_kv.weight", 0), "cross_attn.v_proj.weight": ("attn.to_kv.weight", 1),
    "cross_attn.o_proj.weight": ("attn.to_out.weight", None),
    "cross_attn.q_norm.weight": ("attn.q_norm.weight", None), "cross_attn.k_norm.weight": ("attn.k_norm.weight", None),
    "input_layernorm.weight": ("attn.norm.weight", None),
    "mlp.gate_proj.weight": ("ffw.fc1.weight", 0), "mlp.up_proj.weight": ("ffw.fc1.weight", 1),
    "mlp.down_proj.weight": ("ffw.fc2.weight", None),
    "post_attention_layernorm.weight": ("ffw.norm.weight", None),
    "cross_attn_attn_gate": ("attn_gate", None), "cross_attn_mlp_gate": ("ffw_gate", None),
}


def mllama_config(folder: str | os.PathLike) -> FlamingoConfig:
    """The FlamingoConfig of a transformers Mllama folder's config.json (missing fields: MllamaConfig's defaults)."""
    path = Path(folder) / "config.json"
    c = read_json(path)
    if c.get("model_type") != "mllama":
        raise ValueError(f"{path}: model_type {c.get('model_type')!r} is not 'mllama' (Llama 3.2 Vision)")
    t, v = c.get("text_config") or {}, c.get("vision_config") or {}
    for sub, key, want in ((t, "hidden_act", "silu"), (v, "hidden_act", "gelu")):
        if sub.get(key, want) != want:
            raise ValueError(f"{path}: {key} {sub[key]!r} is not supported ({want} only)")
    theta, llama3 = rope_settings(t, path)
    cross = sorted(int(i) for i in t.get("cross_attention_layers", [3, 8, 13, 18, 23, 28, 33, 38]))
    total = int(t.get("num_hidden_layers", 40))
    lm = LMConfig(vocab_size=int(t.get("vocab_size", 128256)), dim=int(t.get("hidden_size", 4096)),
                  layers=total - len(cross), heads=int(t.get("num_attention_heads", 32)),
                  kv_heads=int(t.get("num_key_value_heads", 8)), ffn_dim=int(t.get("intermediate_size", 14336)),
                  rope_theta=theta, rope_llama3=llama3, norm_eps=float(t.get("rms_norm_eps", 1e-5)),
                  max_seq_len=min(int(t.get("max_position_embeddings", 131072)), 8192), special_logits=False)
    if lm.n_kv_heads == lm.heads:
        lm.kv_heads = None
    image_token = int(c.get("image_token_index", 128256))
    if image_token != lm.vocab_size:
        raise ValueError(f"{path}: image_token_index {image_token} must be the first id after the text vocabulary "
                         f"({lm.vocab_size}), where this model keeps its input-only special rows")
    ratios = v.get("supported_aspect_ratios") or [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]
    image_size, patch = v.get("image_size", 448), v.get("patch_size", 14)
    if isinstance(image_size, (list, tuple)) or isinstance(patch, (list, tuple)):
        raise ValueError(f"{path}: non-square image_size / patch_size are not supported")
    vision = VisionConfig(kind="tiled", image_size=int(image_size), patch_size=int(patch),
                          channels=int(v.get("num_channels", 3)), width=int(v.get("hidden_size", 1280)),
                          layers=int(v.get("num_hidden_layers", 32)), heads=int(v.get("attention_heads", 16)),
                          mlp_dim=int(v.get("intermediate_size", 5120)), activation="gelu",
                          layer_norm_eps=float(v.get("norm_eps", 1e-5)), max_tiles=int(v.get("max_num_tiles", 4)),
                          global_layers=int(v.get("num_global_layers", 8)),
                          intermediate_layers=tuple(v.get("intermediate_layers_indices", [3, 7, 15, 23, 30])),
                          aspect_ratios=tuple(tuple(r) for r in ratios))
    output_dim = v.get("vision_output_dim")
    if output_dim is not None and int(output_dim) != vision.output_dim:
        raise ValueError(f"{path}: vision_output_dim {output_dim} != hidden_size * (1 + intermediate layers) = "
                         f"{vision.output_dim}")
    block_ids = tuple(i - n for n, i in enumerate(cross))
    return FlamingoConfig(name="mllama", vision=vision, connector="projector", lm=lm,
                          xattn=mllama_xattn(lm, block_ids), pad_token_id=t.get("pad_token_id", 128004))


def _our_name(hf_name: str, cross: list[int]) -> Optional[tuple[str, Optional[int]]]:
    """(our parameter name, stack part or None), or None for a name this model does not know."""
    for theirs, ours in _PREFIXES:
        if hf_name.startswith(theirs):
            rest = ours + hf_name[len(theirs):]
            break
    else:
        return None
    if not rest.startswith("text."):
        return rest, None
    rest = rest[len("text."):]
    if rest in ("norm.weight",):
        return "lm." + rest, None
    if not rest.startswith("layers."):
        return None
    index, _, leaf = rest[len("layers."):].partition(".")
    if not index.isdigit():
        return None
    i = int(index)
    block = i - sum(c < i for c in cross)
    if i in cross:
        target = _CROSS.get(leaf)
        return None if target is None else (f"xattn_layers.{block}.{target[0]}", target[1])
    return f"lm.layers.{block}.{leaf}", None


def from_hf_mllama(folder: str | os.PathLike, dtype: Optional[torch.dtype] = None,
                   device: Optional[torch.device | str] = None) -> Flamingo:
    """Build the model of a transformers Mllama folder on the meta device and stream its shards into it.

    dtype: of the created parameters (default: the file's); device: where they go (default cpu). Raises
    CheckpointKeyError listing missing / unexpected tensors before loading anything."""
    folder = Path(folder)
    source = str(folder)
    cfg = mllama_config(folder)
    cross = [block + n for n, block in enumerate(cfg.xattn.layer_ids)]  # back to transformers' decoder indices
    with torch.device("meta"):
        model = Flamingo(cfg)
    ours = dict(model.named_parameters())
    files = safetensors_files(folder)
    names, unexpected, embed_name = {}, [], None
    for hf_name in safetensors_keys(files):
        if hf_name.endswith("embed_tokens.weight") and "language_model" in hf_name:
            embed_name = hf_name
            continue
        target = _our_name(hf_name, cross)
        if target is None or target[0] not in ours:
            unexpected.append(hf_name)
        else:
            names[hf_name] = target
    covered = {name for name, _ in names.values()} | ({"lm.embed_tokens.weight", "lm.special_embed.weight"}
                                                       if embed_name else set())
    missing = set(ours) - covered
    if missing or unexpected:
        raise CheckpointKeyError(source, missing, unexpected, "is this a MllamaForConditionalGeneration checkpoint?")

    loader = TensorLoader(model, source, dtype, device)
    vocab = cfg.lm.vocab_size
    stacks: dict[str, dict[int, torch.Tensor]] = {}
    for hf_name, tensor in iter_safetensors(files, set(names) | {embed_name}):
        if hf_name == embed_name:
            if tensor.shape[0] < vocab + 2:
                raise ValueError(f"{source}: {hf_name} has {tensor.shape[0]} rows, expected >= {vocab + 2} "
                                 "(text vocabulary + <|image|> + reserved rows)")
            # Copies, not views: the 6 unused reserved rows must not stay alive behind them.
            loader.put("lm.embed_tokens.weight", tensor[:vocab].clone(), hf_name)
            loader.put("lm.special_embed.weight", tensor[vocab:vocab + 2].clone(), hf_name)
            continue
        name, part = names[hf_name]
        if part is None:
            loader.put(name, tensor, hf_name)
            continue
        parts = stacks.setdefault(name, {})
        parts[part] = tensor
        if len(parts) == 2:  # [k; v] or [gate; up]: both halves read
            loader.put(name, torch.cat([parts[0], parts[1]], dim=0), hf_name)
            del stacks[name]
    leftover = loader.still_meta()
    if leftover:
        raise CheckpointKeyError(source, leftover, hint="these parameters were never given values")
    return model.set_trainable("flamingo")
