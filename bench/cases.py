"""Benchmark shapes: one `Case` per (op, shape), and the case sets for GPU, CPU and --quick.

Shapes that matter for Flamingo (DESIGN.md sections 1 and 4):
- attention: LM self-attention, head dim 128, 1k-16k tokens, GQA (32 query heads on 8 KV heads), causal;
  the batch keeps B * S = 16k tokens, as in the FlashAttention benchmarks.
- media_cross_attention: text 512-8k tokens, 1-32 images of 64 latents, 16 heads of 128 (the 3b xattn).
  media_index: `MEDIA_LEAD` tokens of text before the first image (index -1), then the images' `<image>`
  tokens evenly spaced, as in an interleaved document.
- perceiver_attention: 64 latent queries over (media tokens + 64 latents) keys, 256-1024 media tokens,
  many images in the batch, head dims 64 / 96 / 128 at the resampler's width 1536.

On CPU the default set is scaled down (sequence lengths capped at 2k, one batch row) so that all
implementations, including the dense ones, finish in a few minutes on two cores; --quick is smaller still.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch

from bench import flops

OPS = ("attention", "media_cross_attention", "perceiver_attention")
MEDIA_LEAD = 32  # text tokens before the first image in the media cases
CPU_CAP_NOTE = ("CPU set: sequence lengths capped at 2k, one batch row, fewer heads and images "
                "(GPU set: 1k-16k tokens, 8k text, 256 images)")


@dataclass(frozen=True)
class Inputs:
    q: torch.Tensor  # (B, Sq, Hq, d)
    k: torch.Tensor  # (B, Sk, Hkv, d)
    v: torch.Tensor  # (B, Sk, Hkv, d)
    media_index: Optional[torch.Tensor] = None  # (B, Sq) int64, media_cross_attention only


@dataclass(frozen=True)
class Case:
    op: str
    batch: int
    seq_q: int
    seq_k: int
    heads_q: int
    heads_kv: int
    head_dim: int
    causal: bool = False  # attention only
    num_images: int = 0  # media_cross_attention only
    latents_per_media: int = 64  # media_cross_attention only
    only_immediate: bool = True  # media_cross_attention only

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {self.op!r}")
        if min(self.batch, self.seq_q, self.seq_k, self.heads_q, self.heads_kv, self.head_dim) < 1:
            raise ValueError(f"case dimensions must be >= 1, got {self}")
        if self.heads_q % self.heads_kv:
            raise ValueError(f"heads_q {self.heads_q} must be a multiple of heads_kv {self.heads_kv}")
        if self.op == "media_cross_attention" and self.seq_k != self.num_images * self.latents_per_media:
            raise ValueError(
                f"media case: seq_k must be num_images * latents_per_media = "
                f"{self.num_images * self.latents_per_media}, got {self.seq_k}"
            )

    # -- naming ---------------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        heads = f"h{self.heads_q}" if self.heads_q == self.heads_kv else f"h{self.heads_q}/{self.heads_kv}"
        if self.op == "attention":
            return f"b{self.batch} s{self.seq_q} {heads} d{self.head_dim}" + (" causal" if self.causal else "")
        if self.op == "media_cross_attention":
            return f"b{self.batch} s{self.seq_q} img{self.num_images}x{self.latents_per_media} {heads} d{self.head_dim}"
        return f"n{self.batch} m{self.media_tokens} lat{self.seq_q} {heads} d{self.head_dim}"

    @property
    def media_tokens(self) -> int:
        """perceiver: media tokens per image (the keys are media tokens + the latents themselves)."""
        return self.seq_k - self.seq_q

    @property
    def seq_len(self) -> int:
        """The x axis of the plot: tokens (attention), text tokens (media), media tokens (perceiver)."""
        return self.media_tokens if self.op == "perceiver_attention" else self.seq_q

    @property
    def series(self) -> str:
        """Plot lines of one implementation are split by this (images for media, head dim for perceiver)."""
        if self.op == "media_cross_attention":
            return f"{self.num_images} img"
        if self.op == "perceiver_attention":
            return f"d{self.head_dim}"
        return ""

    def to_dict(self) -> dict:
        return asdict(self)

    # -- inputs ---------------------------------------------------------------------------------------------
    def media_index(self, device="cpu") -> torch.Tensor:
        """(B, Sq) int64: -1 for MEDIA_LEAD tokens, then image i from position lead + i * (S - lead) // T."""
        if self.op != "media_cross_attention":
            raise ValueError(f"media_index exists for media_cross_attention cases only, not {self.op}")
        lead = min(MEDIA_LEAD, self.seq_q // 2)
        starts = lead + torch.arange(self.num_images) * (self.seq_q - lead) // self.num_images
        index = torch.searchsorted(starts, torch.arange(self.seq_q), right=True) - 1
        return index.expand(self.batch, -1).contiguous().to(device)

    def make_inputs(self, device, dtype: torch.dtype, seed: int = 0) -> Inputs:
        generator = torch.Generator().manual_seed(seed)

        def randn(*shape):  # generated on the CPU so every device sees the same numbers
            return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

        q = randn(self.batch, self.seq_q, self.heads_q, self.head_dim)
        k = randn(self.batch, self.seq_k, self.heads_kv, self.head_dim)
        v = randn(self.batch, self.seq_k, self.heads_kv, self.head_dim)
        index = self.media_index(device) if self.op == "media_cross_attention" else None
        return Inputs(q, k, v, index)

    # -- work -----------------------------------------------------------------------------------------------
    def pairs(self) -> int:
        """Visible (query, key) pairs per query head, summed over the batch (see bench.flops)."""
        if self.op == "media_cross_attention":
            return flops.media_pairs(self.media_index(), self.latents_per_media, self.only_immediate)
        return self.batch * flops.attention_pairs(self.seq_q, self.seq_k, self.causal and self.op == "attention")

    def flops(self, direction: str) -> float:
        return flops.attention_flops(self.pairs(), self.heads_q, self.head_dim, direction)

    def bytes(self, direction: str, elem_size: int) -> float:
        q_elems = self.batch * self.seq_q * self.heads_q * self.head_dim
        kv_elems = self.batch * self.seq_k * self.heads_kv * self.head_dim
        lse_rows = self.batch * self.heads_q * self.seq_q
        extra = self.batch * self.seq_q * 8 if self.op == "media_cross_attention" else 0  # int64 media_index
        return flops.attention_bytes(q_elems, kv_elems, lse_rows, elem_size, direction, extra)

    @property
    def score_elements(self) -> int:
        """Elements of the dense (B, Hq, Sq, Sk) score matrix that dense implementations materialise."""
        return self.batch * self.heads_q * self.seq_q * self.seq_k


# -- case builders ----------------------------------------------------------------------------------------------
def attention_case(seq: int, batch: int, heads_q: int = 32, heads_kv: int = 8, head_dim: int = 128) -> Case:
    return Case("attention", batch, seq, seq, heads_q, heads_kv, head_dim, causal=True)


def media_case(seq: int, images: int, batch: int = 1, heads: int = 16, head_dim: int = 128,
               latents: int = 64) -> Case:
    return Case("media_cross_attention", batch, seq, images * latents, heads, heads, head_dim,
                num_images=images, latents_per_media=latents)


def perceiver_case(media_tokens: int, images: int, head_dim: int, width: int = 1536, latents: int = 64) -> Case:
    heads = width // head_dim
    return Case("perceiver_attention", images, latents, media_tokens + latents, heads, heads, head_dim)


def gpu_cases() -> list[Case]:
    cases = [attention_case(seq, batch=max(1, 16384 // seq)) for seq in (1024, 2048, 4096, 8192, 16384)]
    cases += [media_case(seq, images, batch=max(1, 8192 // seq)) for seq in (512, 2048, 8192) for images in (1, 8, 32)]
    cases += [perceiver_case(m, images=256, head_dim=d) for m in (256, 1024) for d in (64, 96, 128)]
    return cases


def cpu_cases() -> list[Case]:
    cases = [attention_case(seq, batch=1, heads_q=4, heads_kv=1) for seq in (1024, 2048)]
    # 2k text with 8 and 32 images: the CPU targets of the torch backend against OpenFlamingo's dense mask.
    cases += [media_case(512, 1), media_case(2048, 32), media_case(2048, 8)]
    cases += [perceiver_case(256, images=8, head_dim=d) for d in (64, 96, 128)]
    cases += [perceiver_case(1024, images=4, head_dim=96)]
    return cases


def quick_cases() -> list[Case]:
    return [
        attention_case(512, batch=1, heads_q=4, heads_kv=2),
        media_case(512, 4, heads=8),
        perceiver_case(256, images=4, head_dim=96, width=768),
    ]


def last_case_per_op(cases: list[Case]) -> frozenset[str]:
    """Names of the last case of each op: where the CPU run times its torch.compile-based implementations."""
    return frozenset({case.op: case.name for case in cases}.values())


def select_cases(device_type: str, quick: bool, ops: tuple[str, ...] = OPS) -> tuple[list[Case], str]:
    """(cases for this device and mode, restricted to `ops`; a note on how the set was scaled, or "")."""
    if quick:
        cases, note = quick_cases(), "--quick: one small case per op"
    elif device_type == "cuda":
        cases, note = gpu_cases(), ""
    else:
        cases, note = cpu_cases(), CPU_CAP_NOTE
    return [c for c in cases if c.op in ops], note
