"""Import a Hugging Face Llama-family causal LM (local folder) into `flamingo_fast.models.LanguageModel`.

The folder holds `config.json` and `model.safetensors` or shards listed in `model.safetensors.index.json`
(and usually `tokenizer.json`, read separately by `flamingo_fast.data.load_tokenizer`). Names map
one-to-one once the `model.` prefix is dropped (lm.py keeps HF's names):

    model.embed_tokens.weight -> embed_tokens.weight     model.layers.i.* -> layers.i.*
    model.norm.weight         -> norm.weight             lm_head.weight   -> lm_head.weight
                                                          (absent with tie_word_embeddings: copied)

The two Flamingo rows (`special_embed`, `special_head`) are not in a Llama checkpoint. When they have no
values yet (a fresh model on the meta device) they start as the mean of the loaded embedding / output
rows, so `<image>` and `<|endofchunk|>` begin as "average tokens" (what HF's resize_token_embeddings does
in spirit), and train from there; an existing model's special rows are left alone.

Supported: model_type "llama" (and "mistral" without sliding window), SiLU, no attention/MLP bias,
plain RoPE or Llama 3.1's "llama3" scaling, head_dim = hidden_size / heads. Anything else is a clear ValueError.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from flamingo_fast.convert.loading import (
    CheckpointKeyError,
    TensorLoader,
    iter_safetensors,
    read_json,
    safetensors_files,
    safetensors_keys,
)
from flamingo_fast.models.config import LMConfig
from flamingo_fast.models.lm import LanguageModel

# Buffers some old HF exports contain; they are recomputed, not loaded.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
_SPECIAL = ("special_embed.weight", "special_head.weight")


def rope_settings(config: dict, path: Path) -> tuple[float, Optional[tuple[float, float, float, int]]]:
    """(rope_theta, LMConfig.rope_llama3) of a HF text config: plain RoPE or Llama 3.1's "llama3" scaling."""
    params = config.get("rope_parameters")  # transformers >= 5
    if not isinstance(params, dict):  # transformers 4
        params = {**(config.get("rope_scaling") or {}), "rope_theta": config.get("rope_theta", 10000.0)}
    kind = params.get("rope_type", params.get("type"))
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    if kind in (None, "default"):
        return theta, None
    if kind != "llama3":
        raise ValueError(f"{path}: RoPE scaling {kind!r} is not supported (plain RoPE or 'llama3')")
    try:
        return theta, (float(params["factor"]), float(params["low_freq_factor"]), float(params["high_freq_factor"]),
                       int(params["original_max_position_embeddings"]))
    except KeyError as missing:
        raise ValueError(f"{path}: 'llama3' RoPE scaling needs {missing}") from None


def llama_config(folder: str | os.PathLike) -> LMConfig:
    """The `LMConfig` of a HF Llama folder's config.json (missing fields take LlamaConfig's defaults)."""
    path = Path(folder) / "config.json"
    c = read_json(path)
    model_type = c.get("model_type")
    if model_type not in ("llama", "mistral"):
        raise ValueError(f"{path}: model_type {model_type!r} is not a Llama-family model ('llama' or 'mistral')")
    if model_type == "mistral" and c.get("sliding_window") is not None:
        raise ValueError(f"{path}: sliding-window attention (sliding_window={c['sliding_window']}) is not supported")
    if c.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{path}: hidden_act {c['hidden_act']!r} is not supported (SwiGLU with silu only)")
    for flag in ("attention_bias", "mlp_bias"):
        if c.get(flag):
            raise ValueError(f"{path}: {flag}=true is not supported (the LM's projections have no bias)")
    theta, llama3 = rope_settings(c, path)
    dim, heads = int(c.get("hidden_size", 4096)), int(c.get("num_attention_heads", 32))
    head_dim = c.get("head_dim")
    if head_dim is not None and heads * int(head_dim) != dim:
        raise ValueError(f"{path}: head_dim {head_dim} * heads {heads} != hidden_size {dim} is not supported")
    kv_heads = c.get("num_key_value_heads")
    return LMConfig(
        vocab_size=int(c.get("vocab_size", 32000)),
        dim=dim,
        layers=int(c.get("num_hidden_layers", 32)),
        heads=heads,
        kv_heads=None if kv_heads is None or int(kv_heads) == heads else int(kv_heads),
        ffn_dim=int(c.get("intermediate_size", 11008)),
        rope_theta=theta,
        rope_llama3=llama3,
        norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        max_seq_len=int(c.get("max_position_embeddings", 2048)),
    )


def llama_param_name(hf_name: str) -> Optional[str]:
    """Our LanguageModel name for a HF LlamaForCausalLM tensor name (None: ignored buffer)."""
    if hf_name.endswith(_IGNORED_SUFFIXES):
        return None
    if hf_name.startswith("model."):
        return hf_name[len("model."):]
    return hf_name  # lm_head.weight, or an unexpected name the caller reports


def _check_same_shape(lm: LanguageModel, cfg: LMConfig, source: str) -> None:
    ours = lm.cfg
    fields = ("vocab_size", "dim", "layers", "heads", "n_kv_heads", "ffn_dim")
    differ = [f"{f}: model {getattr(ours, f)} vs checkpoint {getattr(cfg, f)}" for f in fields
              if getattr(ours, f) != getattr(cfg, f)]
    if differ:
        raise ValueError(f"{source}: the target LM's config does not match config.json ({'; '.join(differ)})")


def from_hf_llama(
    folder: str | os.PathLike,
    into: Optional[LanguageModel] = None,
    dtype: Optional[torch.dtype] = None,
    device: Optional[torch.device | str] = None,
) -> LanguageModel:
    """Load a HF Llama folder; returns the `LanguageModel` (its config is `.cfg`, an `LMConfig`).

    into:   an existing LanguageModel to fill, e.g. `flamingo.lm` (its config must match config.json);
            None builds a new one on the meta device and materialises it from the file.
    dtype:  for parameters created from the file (default: the file's dtype); copies into existing
            parameters take that parameter's dtype.
    device: where created parameters go (default cpu).
    Raises CheckpointKeyError listing missing/unexpected tensors before loading anything.
    """
    folder = Path(folder)
    source = str(folder)
    cfg = llama_config(folder)
    tied = bool(read_json(folder / "config.json").get("tie_word_embeddings", False))
    if into is None:
        with torch.device("meta"):
            lm = LanguageModel(cfg)
    else:
        if not isinstance(into, LanguageModel):
            raise TypeError(f"into must be a flamingo_fast LanguageModel, got {type(into).__name__}")
        _check_same_shape(into, cfg, source)
        lm = into

    files = safetensors_files(folder)
    names = {}
    unexpected = []
    ours = dict(lm.named_parameters())
    for hf_name in safetensors_keys(files):
        name = llama_param_name(hf_name)
        if name is None:
            continue
        if name in ours and name not in _SPECIAL:
            names[hf_name] = name
        else:
            unexpected.append(hf_name)
    expected = set(ours) - set(_SPECIAL) - ({"lm_head.weight"} if tied else set())
    missing = expected - set(names.values())
    if missing or unexpected:
        hint = "is this a LlamaForCausalLM checkpoint?"
        raise CheckpointKeyError(source, (f"model.{m}" if m != "lm_head.weight" else m for m in missing), unexpected, hint)

    loader = TensorLoader(lm, source, dtype, device)
    special_were_meta = [loader.get(name).is_meta for name in _SPECIAL]
    for hf_name, tensor in iter_safetensors(files, set(names)):
        loader.put(names[hf_name], tensor, hf_name)
    if tied and "lm_head.weight" not in names.values():
        embed = loader.get("embed_tokens.weight")
        loader.fill("lm_head.weight", lambda _: embed.detach().clone())
    # Fresh special rows start at the mean of the base rows (module docstring).
    for (name, source_name), was_meta in zip((("special_embed.weight", "embed_tokens.weight"),
                                               ("special_head.weight", "lm_head.weight")), special_were_meta):
        if was_meta:
            base = loader.get(source_name)
            loader.fill(name, lambda target, base=base: base.detach().float().mean(0, keepdim=True)
                        .expand(target.shape[0], -1).to(base.dtype).clone())
    leftover = loader.still_meta()
    if leftover:
        raise CheckpointKeyError(source, leftover, hint="these parameters were never given values")
    return lm
