"""GATED XATTN-DENSE (Flamingo paper, Fig. 4), the only new layers inside the language model.

    x += tanh(attn_gate) * to_out(MediaXAttn(q = to_q(LN(x)), k/v = to_kv(latents), media_index))
    x += tanh(ffw_gate)  * FFW(x)          FFW = LN -> Linear(4 D) -> squared ReLU -> Linear(D)

Both gates are scalars (stored with shape (1,), as OpenFlamingo does and FSDP can shard) initialised to 0,
so a fresh model reproduces the frozen LM exactly. Keys/values come from all images' latents flattened to
(B, T_img * n_latents, Hkv, d); `media_cross_attention` restricts each token to its own latest image
(`only_immediate`) or to images 0..media_index, and gives tokens with media_index -1 an output of exactly 0.

The keys/values depend only on the latents, so generation computes them once per image with `media_kv`
and passes them back through `forward(..., media_kv=...)` for every new token.

Llama 3.2 Vision's cross-attention decoder layer is the same layer configured (XAttnConfig): RMSNorms instead of
LayerNorms (`norm`), RMSNorm over each head's q and k (`qk_norm`), GQA (`kv_heads`), a SwiGLU FFW whose fc1
holds [gate; up] stacked (`activation="swiglu"`, `ffw_dim`), keys from every projected tile token instead of
latents, Mllama's image groups as the media spans (`media_span="groups"`: `media` is then an ops.MediaSpans), and
the FFW's output zeroed on tokens that see no image (`zero_ffw_without_media`); the attention output of such
tokens is 0 already (the op's rule, as in Meta's reference; transformers 5.24 lets those rows attend to every
key, its issue #39379).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from flamingo_fast.models.config import XAttnConfig
from flamingo_fast.models.lm import RMSNorm
from flamingo_fast.ops import media_cross_attention
from flamingo_fast.ops.media_spans import MediaSpans

Media = torch.Tensor | MediaSpans  # media_index (B, S) or the spans of Mllama's image groups


def _norm(cfg: XAttnConfig, dim: int) -> nn.Module:
    return RMSNorm(dim, cfg.layer_norm_eps) if cfg.norm == "rmsnorm" else nn.LayerNorm(dim, eps=cfg.layer_norm_eps)


class MediaCrossAttention(nn.Module):
    def __init__(self, cfg: XAttnConfig, dim: int, media_dim: int, latents_per_media: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.n_kv_heads, cfg.head_dim
        self.only_immediate = cfg.only_immediate
        self.latents_per_media = latents_per_media
        self.norm = _norm(cfg, dim)
        self.to_q = nn.Linear(dim, cfg.heads * cfg.head_dim, bias=False)
        self.to_kv = nn.Linear(media_dim, 2 * cfg.n_kv_heads * cfg.head_dim, bias=False)  # [k; v] stacked
        self.to_out = nn.Linear(cfg.heads * cfg.head_dim, dim, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.layer_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.layer_norm_eps) if cfg.qk_norm else None

    def media_kv(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latents (B, T_img, n, Dm) -> k, v each (B, T_img * n, Hkv, d)."""
        b, t, n, dm = latents.shape
        kv = self.to_kv(latents.reshape(b, t * n, dm)).view(b, t * n, 2, self.kv_heads, self.head_dim)
        k, v = kv.unbind(2)
        return (k if self.k_norm is None else self.k_norm(k)), v

    def forward(
        self,
        x: torch.Tensor,
        media: Media,
        latents: Optional[torch.Tensor] = None,
        media_kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> torch.Tensor:
        """x (B, S, D), media_index (B, S) or MediaSpans -> (B, S, D); tokens that see no image are exactly 0."""
        k, v = media_kv if media_kv is not None else self.media_kv(latents)
        b, s, _ = x.shape
        q = self.to_q(self.norm(x)).view(b, s, self.heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
        out = media_cross_attention(
            q, k, v, media, latents_per_media=self.latents_per_media, only_immediate=self.only_immediate
        )
        return self.to_out(out.reshape(b, s, self.heads * self.head_dim))


class XAttnFFW(nn.Module):
    def __init__(self, cfg: XAttnConfig, dim: int):
        super().__init__()
        self.activation = cfg.activation
        hidden = cfg.ffw_dim or cfg.ffw_mult * dim
        self.norm = _norm(cfg, dim)
        # SwiGLU: fc1 is [gate; up] stacked, one matmul for both.
        self.fc1 = nn.Linear(dim, hidden * (2 if cfg.activation == "swiglu" else 1), bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(self.norm(x))
        if self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.relu(h).square() if self.activation == "sqrelu" else F.gelu(h)
        return self.fc2(h)


class GatedXAttnDense(nn.Module):
    def __init__(self, cfg: XAttnConfig, dim: int, media_dim: int, latents_per_media: int):
        super().__init__()
        self.attn = MediaCrossAttention(cfg, dim, media_dim, latents_per_media)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ffw = XAttnFFW(cfg, dim)
        self.ffw_gate = nn.Parameter(torch.zeros(1))
        self.zero_ffw_without_media = cfg.zero_ffw_without_media

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.attn_gate)
        nn.init.zeros_(self.ffw_gate)

    def media_kv(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.attn.media_kv(latents)

    def forward(
        self,
        x: torch.Tensor,
        media: Media,
        latents: Optional[torch.Tensor] = None,
        media_kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> torch.Tensor:
        """x (B, S, D); media: media_index (B, S) or MediaSpans. Pass `latents` (B, T_img, n, Dm), or `media_kv`
        from `media_kv(latents)`, or neither when there are no images (then only the gated FFW acts, as for
        tokens before the first image, unless zero_ffw_without_media)."""
        has_media = latents is not None or media_kv is not None
        if has_media:
            x = x + torch.tanh(self.attn_gate).to(x.dtype) * self.attn(x, media, latents, media_kv)
        h = self.ffw(x)
        if self.zero_ffw_without_media:
            if not has_media:
                return x
            sees = media.end > media.start if isinstance(media, MediaSpans) else media >= 0
            h = h * sees[..., None].to(h.dtype)
        return x + torch.tanh(self.ffw_gate).to(x.dtype) * h
