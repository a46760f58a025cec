"""What users run today, as a training-step baseline: OpenFlamingo 2.0.1's own `Flamingo` (its
PerceiverResampler and GatedCrossAttentionBlock with the dense text-to-media mask) around a transformers
LlamaForCausalLM (SDPA attention), sized like one of our configs, with our ViT as the frozen encoder.

Sizes follow our config so that the two models do comparable work: the LM's widths, heads, layers; the
resampler's depth, heads x head dim and latents; the cross-attention blocks' heads x head dim and their
placement (OpenFlamingo puts a block before layer i when (i + 1) % every == 0). What stays OpenFlamingo's:
the resampler runs at the vision width (it has no projection), the FFWs use GELU, the masks are dense.
Trainable, as OpenFlamingo's factory leaves them with frozen LM embeddings: resampler and xattn blocks.

open_flamingo's package __init__ imports open_clip (not a dependency); `open_flamingo_src()` loads
open_flamingo/src on its own, so only open-flamingo (installed --no-deps), einops, einops-exts and
transformers are needed.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import torch
from torch import nn


def open_flamingo_src():
    """open_flamingo/src as the package `of_src`, without open_flamingo/__init__.py (which imports open_clip)."""
    if "of_src" in sys.modules:
        return sys.modules["of_src"]
    spec = importlib.util.find_spec("open_flamingo")
    if spec is None:
        raise ImportError("open-flamingo is a dev dependency: pip install --no-deps open-flamingo einops einops-exts")
    src = Path(spec.submodule_search_locations[0]) / "src"
    package_spec = importlib.util.spec_from_file_location("of_src", src / "__init__.py",
                                                          submodule_search_locations=[str(src)])
    package = importlib.util.module_from_spec(package_spec)
    sys.modules["of_src"] = package
    package_spec.loader.exec_module(package)
    return package


class VisualTower(nn.Module):
    """Stands in for open_clip's visual tower: OpenFlamingo calls `vision_encoder.visual(x)[1]`."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit

    def forward(self, x: torch.Tensor):
        return None, self.vit(x)


class OpenFlamingoStep(nn.Module):
    """OpenFlamingo's model with our training-step call signature: (input_ids, images, labels) -> .loss."""

    def __init__(self, model: nn.Module, image_token_id: int):
        super().__init__()
        self.model = model
        self.image_token_id = image_token_id

    def forward(self, input_ids: torch.Tensor, images: torch.Tensor, labels: torch.Tensor):
        # As ours: no loss on <image> positions (transformers shifts the labels itself).
        labels = labels.masked_fill(labels == self.image_token_id, -100)
        return self.model(vision_x=images, lang_x=input_ids, attention_mask=torch.ones_like(input_ids),
                          labels=labels)


def build_open_flamingo(cfg, vision: nn.Module) -> OpenFlamingoStep:
    """OpenFlamingo sized like `cfg` (a FlamingoConfig), around `vision` (our ViT, frozen). Random weights
    (Llama's N(0, 0.02) init for the LM), gates at 0.5 as in the bench's own model."""
    import transformers

    open_flamingo_src()  # registers of_src for the imports below
    flamingo_lm = importlib.import_module("of_src.flamingo_lm")
    of_flamingo = importlib.import_module("of_src.flamingo")
    helpers = importlib.import_module("of_src.helpers")
    utils = importlib.import_module("of_src.utils")

    lm_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.lm.dim, intermediate_size=cfg.lm.ffn_dim,
        num_hidden_layers=cfg.lm.layers, num_attention_heads=cfg.lm.heads, num_key_value_heads=cfg.lm.n_kv_heads,
        head_dim=cfg.lm.head_dim, rms_norm_eps=cfg.lm.norm_eps, max_position_embeddings=cfg.lm.max_seq_len,
        rope_theta=cfg.lm.rope_theta, tie_word_embeddings=False, attn_implementation="sdpa")
    lang = transformers.LlamaForCausalLM(lm_cfg)
    utils.extend_instance(lang, flamingo_lm.FlamingoLMMixin)
    lang.set_decoder_layers_attr_name("model.layers")
    holder = nn.Module()
    holder.visual = VisualTower(vision)
    width = cfg.vision.width
    model = of_flamingo.Flamingo(holder, lang, eoc_token_id=cfg.image_token_id + 1, media_token_id=cfg.image_token_id,
                                 vis_dim=width, cross_attn_every_n_layers=1)
    rc, xc = cfg.resampler, cfg.xattn
    model.perceiver = helpers.PerceiverResampler(dim=width, depth=rc.depth, dim_head=rc.head_dim, heads=rc.heads,
                                                 num_latents=rc.n_latents, max_num_frames=rc.max_frames)
    placed = set(cfg.xattn_layer_ids)
    lang.gated_cross_attn_layers = nn.ModuleList(
        helpers.GatedCrossAttentionBlock(dim=cfg.lm.dim, dim_visual=width, dim_head=xc.head_dim, heads=xc.heads,
                                         only_attend_immediate_media=xc.only_immediate) if i in placed else None
        for i in range(cfg.lm.layers))
    lang.init_flamingo_layers(False)
    with torch.no_grad():
        for block in lang.gated_cross_attn_layers:
            if block is not None:
                block.attn_gate.fill_(0.5)
                block.ff_gate.fill_(0.5)
    model.requires_grad_(False)
    model.perceiver.requires_grad_(True)
    lang.gated_cross_attn_layers.requires_grad_(True)
    return OpenFlamingoStep(model, cfg.image_token_id)
