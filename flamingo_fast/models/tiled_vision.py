"""Llama 3.2 Vision's image encoder (VisionConfig.kind = "tiled"): a ViT over up to `max_tiles` tiles per image.

An image is resized and split into tiles of image_size px by the processor (data/tiling.py); its aspect ratio id
(1-based index into VisionConfig.aspect_ratios; 0 = a padding image) says how many tiles are real. Per image:

    patches of every tile (conv, no bias)  + tanh(g_pre) * pre-tile embedding[aspect ratio]   (per tile)
    class token per tile; + (1 - tanh(g)) * position embedding + tanh(g) * tile-position embedding[aspect ratio]
    LayerNorm; each tile's tokens zero-padded to a multiple of 8
    local encoder (`layers` pre-LN layers) over all tiles' tokens together; LayerNorm
    + tanh(g_post) * post-tile embedding; global encoder (`global_layers` layers with tanh-gated residuals)
    features = [global output, the INPUTS of local layers `intermediate_layers` interleaved] per (tile, token),
    padding tokens dropped: (max_tiles, tokens_per_tile, width * (1 + len(intermediate_layers)))

Intermediate layer i means the input of local layer i (the output of layer i - 1), as in Meta's reference
(`ImageTransformer.forward` appends x before block i) and transformers 4.x; transformers 5.24 records each layer's
output instead (the regression of its PR #39643, fixed in 4.56 by #40083, back in 5.x), which would feed the
projector features one layer later than the released weights were trained on.

Attention mask (as Meta's reference and transformers build it): a pair of tokens is masked only when BOTH are
padding (a padding tile, or a padding token of the multiple-of-8 rounding); real tokens see padding tokens.
Parameter names are transformers' `MllamaVisionModel` names, so its safetensors map one-to-one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from flamingo_fast.models.config import VisionConfig


class TiledAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.heads = cfg.heads
        self.q_proj = nn.Linear(cfg.width, cfg.width, bias=False)
        self.k_proj = nn.Linear(cfg.width, cfg.width, bias=False)
        self.v_proj = nn.Linear(cfg.width, cfg.width, bias=False)
        self.o_proj = nn.Linear(cfg.width, cfg.width, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n, s, d = x.shape
        q, k, v = (proj(x).view(n, s, self.heads, d // self.heads).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(n, s, d))


class TiledMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class TiledEncoderLayer(nn.Module):
    """Pre-LN layer; `gated` (global encoder): both residual branches scaled by tanh of a learned scalar."""

    def __init__(self, cfg: VisionConfig, gated: bool):
        super().__init__()
        self.self_attn = TiledAttention(cfg)
        self.mlp = TiledMLP(cfg)
        self.input_layernorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.gated = gated
        if gated:
            self.gate_attn = nn.Parameter(torch.full((1,), math.pi / 4))
            self.gate_ffn = nn.Parameter(torch.full((1,), math.pi / 4))

    def reset_parameters(self) -> None:
        if self.gated:
            nn.init.constant_(self.gate_attn, math.pi / 4)
            nn.init.constant_(self.gate_ffn, math.pi / 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), mask)
        x = x + (self.gate_attn.tanh() * h if self.gated else h)
        h = self.mlp(self.post_attention_layernorm(x))
        return x + (self.gate_ffn.tanh() * h if self.gated else h)


class TiledEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig, layers: int, gated: bool):
        super().__init__()
        self.layers = nn.ModuleList(TiledEncoderLayer(cfg, gated) for _ in range(layers))


class AspectRatioEmbedding(nn.Module):
    """A gated embedding per tile, chosen by the image's aspect ratio id (added to every token of the tile)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.max_tiles, self.width = cfg.max_tiles, cfg.width
        self.embedding = nn.Embedding(len(cfg.aspect_ratios) + 1, cfg.max_tiles * cfg.width)
        self.gate = nn.Parameter(torch.zeros(1))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.gate)

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        emb = self.embedding(aspect_ratio_ids).view(-1, self.max_tiles, 1, self.width)
        return x + self.gate.tanh() * emb


class GatedPositionEmbedding(nn.Module):
    """(1 - tanh(g)) * a shared position embedding + tanh(g) * a per-(aspect ratio, tile) position embedding."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.max_tiles, self.tokens, self.width = cfg.max_tiles, cfg.tokens_per_tile, cfg.width
        self.embedding = nn.Parameter(torch.empty(self.tokens, cfg.width))
        self.tile_embedding = nn.Embedding(len(cfg.aspect_ratios) + 1, cfg.max_tiles * self.tokens * cfg.width)
        self.gate = nn.Parameter(torch.zeros(1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.embedding, std=self.width**-0.5)
        nn.init.zeros_(self.gate)

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        gate = self.gate.tanh()
        tiles = self.tile_embedding(aspect_ratio_ids).view(-1, self.max_tiles, self.tokens, self.width)
        return x + (1 - gate) * self.embedding + gate * tiles


class TiledVisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = nn.Conv2d(cfg.channels, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(cfg.width))
        self.gated_positional_embedding = GatedPositionEmbedding(cfg)
        self.pre_tile_positional_embedding = AspectRatioEmbedding(cfg)
        self.post_tile_positional_embedding = AspectRatioEmbedding(cfg)
        self.layernorm_pre = nn.LayerNorm(cfg.width)
        self.layernorm_post = nn.LayerNorm(cfg.width)
        self.transformer = TiledEncoder(cfg, cfg.layers, gated=False)
        self.global_transformer = TiledEncoder(cfg, cfg.global_layers, gated=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.class_embedding, std=self.cfg.width**-0.5)

    def tile_counts(self, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        """Real tiles of each image: rows * cols of its aspect ratio; 0 for id 0 (a padding image)."""
        per_id = torch.tensor(self.cfg.tiles_per_aspect_ratio, device=aspect_ratio_ids.device)
        return per_id[aspect_ratio_ids.long()]

    def check_images(self, images: torch.Tensor, name: str = "images") -> None:
        """Shape/dtype checks of (..., tiles, C, H, W) tiles, shared with Flamingo.forward."""
        cfg = self.cfg
        if not torch.is_tensor(images) or not images.is_floating_point():
            got = images.dtype if torch.is_tensor(images) else type(images).__name__
            raise TypeError(f"{name} must be a floating-point tensor, got {got}")
        expected = (cfg.max_tiles, cfg.channels, cfg.image_size, cfg.image_size)
        if images.dim() < 4 or tuple(images.shape[-4:]) != expected:
            raise ValueError(f"{name} must end in (max_tiles, C, H, W) = {expected}, got shape {tuple(images.shape)}")

    def _mask(self, tiles: torch.Tensor, padded_tokens: int) -> torch.Tensor:
        """(N, 1, L, L) bool, True = may attend: every pair except padding-with-padding."""
        cfg = self.cfg
        token = torch.arange(padded_tokens, device=tiles.device)
        tile = torch.arange(cfg.max_tiles, device=tiles.device)
        padding = (tile[None, :, None] >= tiles[:, None, None]) | (token >= cfg.tokens_per_tile)  # (N, tiles, P')
        padding = padding.reshape(tiles.shape[0], -1)
        return ~(padding[:, :, None] & padding[:, None, :])[:, None]

    def forward(self, images: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        """images (N, max_tiles, C, H, W), aspect_ratio_ids (N,) in [1, len(aspect_ratios)] ->
        features (N, max_tiles, tokens_per_tile, output_dim)."""
        self.check_images(images)
        cfg = self.cfg
        n, t = images.shape[:2]
        x = self.patch_embedding(images.flatten(0, 1).to(self.patch_embedding.weight.dtype))
        x = x.flatten(2).transpose(1, 2).reshape(n, t, -1, cfg.width)
        x = self.pre_tile_positional_embedding(x, aspect_ratio_ids)
        cls = self.class_embedding.to(x.dtype).expand(n, t, 1, cfg.width)
        x = self.gated_positional_embedding(torch.cat([cls, x], dim=2), aspect_ratio_ids)
        x = self.layernorm_pre(x)
        p = cfg.tokens_per_tile
        padded = p + (-p) % 8  # transformers / Meta pad every tile's tokens to a multiple of 8
        x = F.pad(x, (0, 0, 0, padded - p)).reshape(n, t * padded, cfg.width)
        mask = self._mask(self.tile_counts(aspect_ratio_ids), padded)
        intermediate = {}
        for i, layer in enumerate(self.transformer.layers):
            if i in cfg.intermediate_layers:
                intermediate[i] = x  # the input of layer i (module docstring)
            x = layer(x, mask)
        x = self.layernorm_post(x)
        x = self.post_tile_positional_embedding(x.view(n, t, padded, cfg.width), aspect_ratio_ids)
        x = x.view(n, t * padded, cfg.width)
        for layer in self.global_transformer.layers:
            x = layer(x, mask)
        # Intermediate features interleaved per channel (stacked on a last dim, then flattened), as transformers.
        layers = [intermediate[i] for i in cfg.intermediate_layers]
        features = torch.cat([x, torch.stack(layers, dim=-1).flatten(-2)], dim=-1) if layers else x
        return features.view(n, t, padded, -1)[:, :, :p]
