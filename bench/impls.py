"""The implementations compared for each op, each built for one case as `fn(q, k, v) -> out`.

All take and return BSHD tensors (q (B, Sq, Hq, d), k/v (B, Sk, Hkv, d) -> (B, Sq, Hq, d)) and are
differentiable, so the harness can time "fwd" and "fwd+bwd" the same way. The names (JSON field `impl`):

  reference           flamingo_fast.ops with backend="reference": plain eager math in float64 with an explicit
                      mask (the project's test oracle); timed only where its dense score matrix fits.
  torch               flamingo_fast.ops with backend="torch": chunked exact attention; media tokens visit
                      only their own image's keys.
  compile             torch.compile of the reference formulation (explicit boolean mask, softmax, two
                      einsums, KV heads repeated for GQA), evaluated in the input dtype instead of float64:
                      what compiling the obvious PyTorch code gives.
  sdpa_flash, sdpa_cudnn, sdpa_efficient, sdpa_math
                      torch.nn.functional.scaled_dot_product_attention restricted to one backend with
                      torch.nn.attention.sdpa_kernel; media runs as a dense boolean mask over all keys.
  flex                torch.compile(flex_attention) with a BlockMask (causal / media_index; none for the
                      perceiver), so fully masked key blocks are skipped.
  openflamingo_dense  media only: OpenFlamingo's MaskedCrossAttention: the (S, T_img * L) text-to-media mask
                      from media_index, scores and softmax over all image keys, masked rows zeroed.
  cuda                flamingo_fast.ops with backend="cuda": the fused Hopper kernels of flamingo_fast._C.

A builder raises `Unavailable` (cannot run here: no kernel, no GPU, unsupported dtype) or `Skipped`
(could run, but the harness chose not to, e.g. too slow on this device); the message is the reason.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from bench.cases import OPS, Case, Inputs
from flamingo_fast import ops

# The float64 reference materialises several (B, Hq, Sq, Sk) float64 tensors: above this many score
# elements it is not timed (and the harness's oracle switches to the torch backend in float64).
REFERENCE_SCORE_LIMIT = {"cpu": 1 << 21, "cuda": 1 << 29}
# On CPU, media cases above this many dense score elements time only one dense-mask implementation,
# openflamingo_dense (the baseline of the torch backend's targets); compile and SDPA, which score the same
# dense mask, would add minutes to the run without adding information.
CPU_DENSE_MEDIA_LIMIT = 1 << 25

Fn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Unavailable(Exception):
    """The implementation cannot run this case on this machine; the message says why."""


class Skipped(Exception):
    """The implementation could run, but the benchmark does not time it here; the message says why."""


@dataclass(frozen=True)
class Impl:
    name: str
    ops: tuple[str, ...]
    build: Callable[[Case, Inputs, torch.device], Fn]
    compiled: bool = False  # uses torch.compile (costly to build; skipped by --quick unless asked for)


def reference_score_limit(device: torch.device) -> int:
    return REFERENCE_SCORE_LIMIT["cuda" if device.type == "cuda" else "cpu"]


def _skip_dense_media_on_cpu(case: Case, device: torch.device) -> None:
    if device.type == "cpu" and case.op == "media_cross_attention" and case.score_elements > CPU_DENSE_MEDIA_LIMIT:
        raise Skipped(
            f"dense media mask of {case.score_elements / 2**20:.0f}M score elements not timed on CPU "
            f"(limit {CPU_DENSE_MEDIA_LIMIT / 2**20:.0f}M; openflamingo_dense is timed as the dense baseline)"
        )


def _group(case: Case) -> int:
    return case.heads_q // case.heads_kv


def _bhsd(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)


# -- flamingo_fast.ops backends -----------------------------------------------------------------------------------
def ops_fn(case: Case, inputs: Inputs, backend: str) -> Fn:
    if case.op == "attention":
        return lambda q, k, v: ops.attention(q, k, v, causal=case.causal, backend=backend)
    if case.op == "perceiver_attention":
        return lambda q, k, v: ops.perceiver_attention(q, k, v, backend=backend)
    index = inputs.media_index
    return lambda q, k, v: ops.media_cross_attention(
        q, k, v, index, case.latents_per_media, case.only_immediate, backend=backend
    )


def build_reference(case: Case, inputs: Inputs, device: torch.device) -> Fn:
    limit = reference_score_limit(device)
    if case.score_elements > limit:
        raise Skipped(
            f"float64 reference materialises {case.score_elements / 2**20:.1f}M score elements, "
            f"above the {limit / 2**20:.0f}M limit on {device.type}"
        )
    return ops_fn(case, inputs, "reference")


def build_torch(case: Case, inputs: Inputs, device: torch.device) -> Fn:
    return ops_fn(case, inputs, "torch")


def build_cuda(case: Case, inputs: Inputs, device: torch.device) -> Fn:
    reason = ops.cuda_unsupported_reason(case.op, inputs.q, inputs.k, inputs.v)
    if reason is not None:
        raise Unavailable(reason)
    return ops_fn(case, inputs, "cuda")


# -- masks from the case ----------------------------------------------------------------------------------------
def media_mask(media_index: torch.Tensor, seq_k: int, latents_per_media: int, only_immediate: bool) -> torch.Tensor:
    """(B, 1, S, Sk) bool: token with index m sees image m's keys (or images 0..m); -1 sees none."""
    key_image = torch.arange(seq_k, device=media_index.device) // latents_per_media
    index = media_index.long()[:, None, :, None]
    return key_image == index if only_immediate else key_image <= index


def _causal_mask(seq_q: int, seq_k: int, device) -> torch.Tensor:
    rows = torch.arange(seq_q, device=device)[:, None]
    return torch.arange(seq_k, device=device)[None, :] <= rows + (seq_k - seq_q)


# -- compile: torch.compile of the reference formulation ------------------------------------------------------
def masked_attention_math(q, k, v, mask, scale: float):
    """The reference's math in the input dtype: explicit mask, softmax (rows without keys -> 0), two einsums."""
    group = q.shape[2] // k.shape[2]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if mask is None:
        probs = torch.softmax(scores, dim=-1)
    else:
        mask = mask.expand(scores.shape)
        scores = scores.masked_fill(~mask, float("-inf"))
        has_key = mask.any(dim=-1, keepdim=True)
        probs = torch.where(mask, torch.softmax(torch.where(has_key, scores, 0.0), dim=-1), 0.0)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


def _attention_math(q, k, v, causal: bool):
    mask = _causal_mask(q.shape[1], k.shape[1], q.device) if causal else None
    return masked_attention_math(q, k, v, mask, q.shape[-1] ** -0.5)


def _media_math(q, k, v, media_index, latents_per_media: int, only_immediate: bool):
    mask = media_mask(media_index, k.shape[1], latents_per_media, only_immediate)
    return masked_attention_math(q, k, v, mask, q.shape[-1] ** -0.5)


def build_compile(case: Case, inputs: Inputs, device: torch.device) -> Fn:
    _skip_dense_media_on_cpu(case, device)
    if case.op == "attention":
        compiled = torch.compile(_attention_math, dynamic=False)
        return lambda q, k, v: compiled(q, k, v, case.causal)
    if case.op == "perceiver_attention":
        compiled = torch.compile(_attention_math, dynamic=False)
        return lambda q, k, v: compiled(q, k, v, False)
    compiled = torch.compile(_media_math, dynamic=False)
    index = inputs.media_index
    return lambda q, k, v: compiled(q, k, v, index, case.latents_per_media, case.only_immediate)


# -- SDPA, one backend at a time -----------------------------------------------------------------------------------
_SDPA_CUDA_ONLY = ("EFFICIENT_ATTENTION", "CUDNN_ATTENTION")


def _sdpa_builder(backend_name: str):
    def build(case: Case, inputs: Inputs, device: torch.device) -> Fn:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, backend_name)
        if device.type != "cuda" and backend_name in _SDPA_CUDA_ONLY:
            raise Unavailable(f"SDPBackend.{backend_name} has CUDA kernels only (this run is on {device.type})")
        _skip_dense_media_on_cpu(case, device)
        kwargs = {"enable_gqa": _group(case) > 1}
        has_image = None
        if case.op == "attention" and case.causal:
            if case.seq_q == case.seq_k:
                kwargs["is_causal"] = True
            else:  # SDPA's is_causal is top-left aligned; the op's causal mask is bottom-right aligned
                from torch.nn.attention.bias import causal_lower_right

                kwargs["attn_mask"] = causal_lower_right(case.seq_q, case.seq_k)
        elif case.op == "media_cross_attention":
            index = inputs.media_index
            has_image = (index >= 0)[:, :, None, None]
            # Rows without an image may see every key: a fully masked row would give NaN (and NaN gradients);
            # their output is replaced by 0 below, so what they see does not matter.
            kwargs["attn_mask"] = media_mask(index, case.seq_k, case.latents_per_media, case.only_immediate) | ~(
                has_image.transpose(1, 2)
            )

        def attend(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(_bhsd(q), _bhsd(k), _bhsd(v), **kwargs).transpose(1, 2)

        def fn(q, k, v):
            try:
                out = attend(q, k, v)
            except RuntimeError as exc:
                raise Unavailable(_sdpa_failure_reason(backend_name, attend, q, k, v, exc)) from exc
            return out if has_image is None else torch.where(has_image, out, 0.0)

        return fn

    return build


def _sdpa_failure_reason(backend_name: str, attend, q, k, v, exc: Exception) -> str:
    # PyTorch explains why a backend refused as UserWarnings; run the (failing, fast) call again to collect them.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            attend(q, k, v)
        except RuntimeError:
            pass
    reasons = [str(w.message).split("\n")[0] for w in caught]
    detail = "; ".join(dict.fromkeys(reasons)) or str(exc).split("\n")[0]
    return f"SDPBackend.{backend_name} refused these inputs: {detail}"


# -- FlexAttention with a block mask ---------------------------------------------------------------------------------
def build_flex(case: Case, inputs: Inputs, device: torch.device) -> Fn:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    block_mask = None
    if case.op == "attention" and case.causal:
        offset = case.seq_k - case.seq_q

        def causal(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx + offset

        block_mask = create_block_mask(causal, None, None, case.seq_q, case.seq_k, device=device)
    elif case.op == "media_cross_attention":
        index = inputs.media_index.long()
        key_image = torch.arange(case.seq_k, device=device) // case.latents_per_media
        only_immediate = case.only_immediate

        def media(b, h, q_idx, kv_idx):
            if only_immediate:
                return key_image[kv_idx] == index[b, q_idx]
            return key_image[kv_idx] <= index[b, q_idx]

        block_mask = create_block_mask(media, case.batch, None, case.seq_q, case.seq_k, device=device)
    compiled = torch.compile(flex_attention, dynamic=False)
    gqa = _group(case) > 1

    def fn(q, k, v):
        return compiled(_bhsd(q), _bhsd(k), _bhsd(v), block_mask=block_mask, enable_gqa=gqa).transpose(1, 2)

    return fn


# -- OpenFlamingo's dense masked cross-attention ---------------------------------------------------------------------
def openflamingo_dense(q, k, v, media_index, latents_per_media: int, only_immediate: bool = True):
    """OpenFlamingo `MaskedCrossAttention.forward` (open_flamingo/src/helpers.py) from q, k, v on.

    Its `text_time = media_locations.cumsum(-1)` equals media_index + 1. OpenFlamingo zeroes the rows
    before the first image only with only_attend_immediate_media; here that is done in both modes, which is
    the op's definition (without it such rows average all images in the all-previous mode).
    """
    group = q.shape[2] // k.shape[2]
    if group > 1:  # OpenFlamingo has no GQA: every query head has its own key/value head
        k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    q, k, v = _bhsd(q), _bhsd(k), _bhsd(v)  # rearrange "b n (h d) -> b h n d"
    q = q * q.shape[-1] ** -0.5
    sim = torch.einsum("... i d, ... j d -> ... i j", q, k)
    num_images = k.shape[2] // latents_per_media
    text_time = media_index + 1
    media_time = torch.arange(num_images, device=q.device) + 1
    mask_op = torch.eq if only_immediate else torch.ge
    text_to_media_mask = mask_op(
        text_time[:, None, :, None], media_time.repeat_interleave(latents_per_media)[None, None, None, :]
    )
    sim = sim.masked_fill(~text_to_media_mask, -torch.finfo(sim.dtype).max)
    sim = sim - sim.amax(dim=-1, keepdim=True).detach()
    attn = sim.softmax(dim=-1)
    attn = attn.masked_fill((text_time == 0)[:, None, :, None], 0.0)
    out = torch.einsum("... i j, ... j d -> ... i d", attn, v)
    return out.transpose(1, 2)  # "b h n d -> b n (h d)" before to_out


def build_openflamingo_dense(case: Case, inputs: Inputs, device: torch.device) -> Fn:
    index = inputs.media_index
    return lambda q, k, v: openflamingo_dense(q, k, v, index, case.latents_per_media, case.only_immediate)


IMPLS: dict[str, Impl] = {
    impl.name: impl
    for impl in (
        Impl("reference", OPS, build_reference),
        Impl("torch", OPS, build_torch),
        Impl("compile", OPS, build_compile, compiled=True),
        Impl("sdpa_flash", OPS, _sdpa_builder("FLASH_ATTENTION")),
        Impl("sdpa_cudnn", OPS, _sdpa_builder("CUDNN_ATTENTION")),
        Impl("sdpa_efficient", OPS, _sdpa_builder("EFFICIENT_ATTENTION")),
        Impl("sdpa_math", OPS, _sdpa_builder("MATH")),
        Impl("flex", OPS, build_flex, compiled=True),
        Impl("openflamingo_dense", ("media_cross_attention",), build_openflamingo_dense),
        Impl("cuda", OPS, build_cuda),
    )
}
IMPL_NAMES = tuple(IMPLS)
