"""Perceiver Resampler (Flamingo paper, Fig. 4; module layout follows OpenFlamingo's `PerceiverResampler`).

    features (B, T_img, F, v, Dv) --+ frame_embs[f]--> flatten frames (B*T_img, F*v, Dv) --media_proj--> Dm
    latents (n_latents, Dm), for each layer:
        latents += to_out(Attn(q = to_q(LN(latents)), k/v = to_kv(concat(LN(media), LN(latents)))))
        latents += FFW(latents)            FFW = LN -> Linear(4 Dm) -> GELU -> Linear(Dm)
    -> norm -> (B, T_img, n_latents, Dm)

Temporal embeddings (`frame_embs`, one per frame index up to `max_frames`) are added to every frame's
features, so a still image (F = 1) gets frame 0's embedding and a video's frames are told apart. There is
no spatial embedding by default (the ViT features already carry position); `spatial_embedding="sincos2d"`
adds fixed 2-D sine-cosine features of each patch's (row, column) on a square grid, which small encoders
trained briefly need (measured in train/configs/demo.toml). `media_proj` maps the vision width to the
resampler width when they differ (Identity otherwise, e.g. for OpenFlamingo checkpoints).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flamingo_fast.models.config import PerceiverConfig
from flamingo_fast.ops import perceiver_attention


class PerceiverAttention(nn.Module):
    def __init__(self, cfg: PerceiverConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        inner = cfg.heads * cfg.head_dim
        self.norm_media = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.norm_latents = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.to_q = nn.Linear(cfg.dim, inner, bias=False)
        self.to_kv = nn.Linear(cfg.dim, 2 * inner, bias=False)  # [k; v] stacked, as in OpenFlamingo
        self.to_out = nn.Linear(inner, cfg.dim, bias=False)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """media (N, m, Dm), latents (N, n, Dm) -> update for latents (N, n, Dm)."""
        n_batch, n_lat, _ = latents.shape
        latents_n = self.norm_latents(latents)
        kv_in = torch.cat([self.norm_media(media), latents_n], dim=1)
        q = self.to_q(latents_n).view(n_batch, n_lat, self.heads, self.head_dim)
        k, v = self.to_kv(kv_in).view(n_batch, kv_in.shape[1], 2, self.heads, self.head_dim).unbind(2)
        out = perceiver_attention(q, k, v)
        return self.to_out(out.reshape(n_batch, n_lat, self.heads * self.head_dim))


class PerceiverFFW(nn.Module):
    def __init__(self, cfg: PerceiverConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(cfg.dim, cfg.ffw_mult * cfg.dim, bias=False)
        self.fc2 = nn.Linear(cfg.ffw_mult * cfg.dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class PerceiverLayer(nn.Module):
    def __init__(self, cfg: PerceiverConfig):
        super().__init__()
        self.attn = PerceiverAttention(cfg)
        self.ffw = PerceiverFFW(cfg)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        latents = latents + self.attn(media, latents)
        return latents + self.ffw(latents)


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(grid * grid, dim) fixed position features, row-major like the ViT's patches: dim/4 frequencies each of
    sin/cos of the column, then of the row (MAE's 2-D layout, but base `grid` instead of 10000, so that the
    wavelengths, 2*pi .. ~2*pi*grid, suit a grid of any size)."""
    if dim % 4:
        raise ValueError(f"sincos_2d needs a feature dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = grid ** -(torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")
    cols, rows = cols.flatten()[:, None] * omega, rows.flatten()[:, None] * omega
    return torch.cat([cols.sin(), cols.cos(), rows.sin(), rows.cos()], dim=1).float()


class PerceiverResampler(nn.Module):
    def __init__(self, cfg: PerceiverConfig, media_dim: int):
        super().__init__()
        self.cfg = cfg
        self.media_dim = media_dim
        self.latents = nn.Parameter(torch.empty(cfg.n_latents, cfg.dim))
        self.frame_embs = nn.Parameter(torch.empty(cfg.max_frames, media_dim))
        self.media_proj = nn.Linear(media_dim, cfg.dim, bias=False) if media_dim != cfg.dim else nn.Identity()
        self.layers = nn.ModuleList(PerceiverLayer(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self._spatial_tables: dict[tuple, torch.Tensor] = {}  # fixed, so not in the state dict
        self.reset_parameters()

    def _spatial(self, v: int, features: torch.Tensor) -> torch.Tensor:
        """The sincos_2d table for v patches, made once per (v, device, dtype): no host copy per step."""
        grid = round(v ** 0.5)
        if grid * grid != v:
            raise ValueError(f"resampler.spatial_embedding='sincos2d' needs a square patch grid, got v={v} features "
                             "per frame")
        key = (v, features.device, features.dtype)
        if key not in self._spatial_tables:
            self._spatial_tables[key] = sincos_2d(grid, self.media_dim).to(device=features.device, dtype=features.dtype)
        return self._spatial_tables[key]

    def reset_parameters(self) -> None:
        nn.init.normal_(self.latents, std=0.02)
        nn.init.normal_(self.frame_embs, std=0.02)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features (B, T_img, F, v, Dv) -> latents (B, T_img, n_latents, Dm)."""
        if features.dim() != 5 or features.shape[-1] != self.media_dim:
            raise ValueError(
                f"features must be (B, T_img, F, v, {self.media_dim}), got shape {tuple(features.shape)}"
            )
        b, t, f, v, _ = features.shape
        if f > self.cfg.max_frames:
            raise ValueError(f"features has {f} frames per media item; resampler.max_frames is {self.cfg.max_frames}")
        x = features + self.frame_embs[:f, None, :].to(features.dtype)  # (F, 1, Dv) broadcasts over v
        if self.cfg.spatial_embedding == "sincos2d":
            x = x + self._spatial(v, features)
        media = self.media_proj(x.reshape(b * t, f * v, self.media_dim))
        latents = self.latents.to(media.dtype).expand(b * t, -1, -1)
        for layer in self.layers:
            latents = layer(media, latents)
        return self.norm(latents).view(b, t, self.cfg.n_latents, self.cfg.dim)
