"""GATED XATTN-DENSE (Flamingo paper, Fig. 4), the only new layers inside the language model.

    x += tanh(attn_gate) * to_out(MediaXAttn(q = to_q(LN(x)), k/v = to_kv(latents), media_index))
    x += tanh(ffw_gate)  * FFW(x)          FFW = LN -> Linear(4 D) -> squared ReLU -> Linear(D)

Both gates are scalars (stored with shape (1,), as OpenFlamingo does and FSDP can shard) initialised to 0,
so a fresh model reproduces the frozen LM exactly. Keys/values come from all images' latents flattened to
(B, T_img * n_latents, Hkv, d); `media_cross_attention` restricts each token to its own latest image
(`only_immediate`) or to images 0..media_index, and gives tokens with media_index -1 an output of exactly 0.

The keys/values depend only on the latents, so generation computes them once per image with `media_kv`
and passes them back through `forward(..., media_kv=...)` for every new token.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from flamingo_fast.models.config import XAttnConfig
from flamingo_fast.ops import media_cross_attention


class MediaCrossAttention(nn.Module):
    def __init__(self, cfg: XAttnConfig, dim: int, media_dim: int, latents_per_media: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.n_kv_heads, cfg.head_dim
        self.only_immediate = cfg.only_immediate
        self.latents_per_media = latents_per_media
        self.norm = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.to_q = nn.Linear(dim, cfg.heads * cfg.head_dim, bias=False)
        self.to_kv = nn.Linear(media_dim, 2 * cfg.n_kv_heads * cfg.head_dim, bias=False)  # [k; v] stacked
        self.to_out = nn.Linear(cfg.heads * cfg.head_dim, dim, bias=False)

    def media_kv(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latents (B, T_img, n, Dm) -> k, v each (B, T_img * n, Hkv, d)."""
        b, t, n, dm = latents.shape
        kv = self.to_kv(latents.reshape(b, t * n, dm)).view(b, t * n, 2, self.kv_heads, self.head_dim)
        k, v = kv.unbind(2)
        return k, v

    def forward(
        self,
        x: torch.Tensor,
        media_index: torch.Tensor,
        latents: Optional[torch.Tensor] = None,
        media_kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> torch.Tensor:
        """x (B, S, D), media_index (B, S) -> (B, S, D); rows with media_index -1 are exactly 0."""
        k, v = media_kv if media_kv is not None else self.media_kv(latents)
        b, s, _ = x.shape
        q = self.to_q(self.norm(x)).view(b, s, self.heads, self.head_dim)
        out = media_cross_attention(
            q, k, v, media_index, latents_per_media=self.latents_per_media, only_immediate=self.only_immediate
        )
        return self.to_out(out.reshape(b, s, self.heads * self.head_dim))


class XAttnFFW(nn.Module):
    def __init__(self, cfg: XAttnConfig, dim: int):
        super().__init__()
        self.activation = cfg.activation
        self.norm = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(dim, cfg.ffw_mult * dim, bias=False)
        self.fc2 = nn.Linear(cfg.ffw_mult * dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(self.norm(x))
        h = F.relu(h).square() if self.activation == "sqrelu" else F.gelu(h)
        return self.fc2(h)


class GatedXAttnDense(nn.Module):
    def __init__(self, cfg: XAttnConfig, dim: int, media_dim: int, latents_per_media: int):
        super().__init__()
        self.attn = MediaCrossAttention(cfg, dim, media_dim, latents_per_media)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ffw = XAttnFFW(cfg, dim)
        self.ffw_gate = nn.Parameter(torch.zeros(1))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.attn_gate)
        nn.init.zeros_(self.ffw_gate)

    def media_kv(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.attn.media_kv(latents)

    def forward(
        self,
        x: torch.Tensor,
        media_index: torch.Tensor,
        latents: Optional[torch.Tensor] = None,
        media_kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> torch.Tensor:
        """x (B, S, D). Pass `latents` (B, T_img, n, Dm), or `media_kv` from `media_kv(latents)`, or neither
        when there are no images (then only the gated FFW acts, as for tokens before the first image)."""
        if latents is not None or media_kv is not None:
            x = x + torch.tanh(self.attn_gate).to(x.dtype) * self.attn(x, media_index, latents, media_kv)
        return x + torch.tanh(self.ffw_gate).to(x.dtype) * self.ffw(x)
