"""The `cuda` backend: thin calls into the fused Hopper kernels of the pybind11 module `flamingo_fast._C`.

The kernels live in csrc/ and are optional at import time; when `_C` (or one of its entry points) is
missing this backend is simply unavailable, and `unsupported_reason` says why.

Expected `_C` entry points (all tensors BSHD, contiguous, on one sm_90 device; q/k/v/out/dout share one
dtype, bf16 or fp16, and head dim 64, 96 or 128, as far as `_C.build_info()` lists them under
"attention_dtypes" / "attention_head_dims"; lse is float32 (B, Hq, Sq), -inf for fully masked rows).
They must return new contiguous tensors (never views of their inputs), as the ops' fake kernels assume:

    attention_fwd(q, k, v, causal: bool, scale: float) -> (out, lse)
    attention_bwd(dout, q, k, v, out, lse, causal: bool, scale: float) -> (dq, dk, dv)
        q (B, Sq, Hq, d), k/v (B, Sk, Hkv, d), Hq % Hkv == 0, causal bottom-right aligned
        (query i sees keys j <= i + Sk - Sq); dk/dv are summed over the query heads of a KV head.
    media_cross_attention_fwd(q, k, v, media_index, latents_per_media: int, only_immediate: bool,
                              scale: float) -> (out, lse)
    media_cross_attention_bwd(dout, q, k, v, out, lse, media_index, latents_per_media: int,
                              only_immediate: bool, scale: float) -> (dq, dk, dv)
        k/v (B, T_img * latents_per_media, Hkv, d); media_index (B, Sq) int32 or int64, non-decreasing
        per row, in [-1, T_img); rows with -1 give out 0, lse -inf, dq 0.
    perceiver_attention_fwd(q, k, v, scale: float) -> (out, lse)
    perceiver_attention_bwd(dout, q, k, v, out, lse, scale: float) -> (dq, dk, dv)
        q (B, n_latents, H, d), k/v (B, Sk, H, d), no mask.
"""

from __future__ import annotations

import torch

try:
    from flamingo_fast import _C
except ImportError as exc:  # the extension is optional: without it this backend is unavailable
    _C = None
    _IMPORT_ERROR = str(exc)
else:
    _IMPORT_ERROR = ""

OP_NAMES = ("attention", "media_cross_attention", "perceiver_attention")
REQUIRED_CAPABILITY = (9, 0)


def _kernel_coverage() -> tuple[tuple[torch.dtype, ...], tuple[int, ...]]:
    """(dtypes, head dims) the built kernels cover, as `_C.build_info()` reports them (fp16 is optional)."""
    info = _C.build_info() if _C is not None and hasattr(_C, "build_info") else {}
    dtypes = tuple(getattr(torch, name) for name in info.get("attention_dtypes", ("bfloat16", "float16")))
    return dtypes, tuple(info.get("attention_head_dims", (64, 96, 128)))


SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS = _kernel_coverage()


def build_problem(op_name: str | None = None) -> str | None:
    """Why `_C` cannot serve `op_name` (any op when None), or None when its entry points exist."""
    if _C is None:
        return f"the extension flamingo_fast._C is not built or failed to import ({_IMPORT_ERROR})"
    names = OP_NAMES if op_name is None else (op_name,)
    missing = [f"{n}_{d}" for n in names for d in ("fwd", "bwd") if not hasattr(_C, f"{n}_{d}")]
    if missing:
        return f"flamingo_fast._C was built without CUDA kernels for {', '.join(missing)}"
    return None


@torch.compiler.assume_constant_result
def _device_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def unsupported_reason(op_name: str, *tensors: torch.Tensor) -> str | None:
    """None when the fused kernels can run `op_name` on these tensors (q, k, v[, ...]); else why not."""
    if op_name == "document_attention":
        return "the Hopper attention engine has no document mask yet (issue 15); the torch backend runs it"
    if op_name == "media_span_attention":
        return ("the Hopper media kernel takes one image index per token; image ranges and ragged key counts "
                "are not in the kernel yet")
    problem = build_problem(op_name)
    if problem is not None:
        return problem
    q = tensors[0]
    if q.device.type != "cuda":
        return f"the inputs are on {q.device}, not on a CUDA device"
    capability = _device_capability(q.device.index if q.device.index is not None else torch.cuda.current_device())
    if tuple(capability) != REQUIRED_CAPABILITY:
        return f"the kernels need an sm_90 (Hopper) GPU, this one is sm_{capability[0]}{capability[1]}"
    if q.dtype not in SUPPORTED_DTYPES:
        built = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
        return f"the kernels are built for {built} only, not {q.dtype}"
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return f"the kernels are built for head dims {SUPPORTED_HEAD_DIMS}, not {q.shape[-1]}"
    return None


def _require(op_name: str, *tensors: torch.Tensor) -> None:
    # Reached when a custom op is called directly with backend="cuda"; the public wrappers check earlier.
    reason = unsupported_reason(op_name, *tensors)
    if reason is not None:
        raise RuntimeError(f"flamingo_fast.ops.{op_name}: the 'cuda' backend is unavailable: {reason}")


def _c(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.contiguous() for t in tensors]


def attention_fwd(q, k, v, causal: bool, scale: float):
    _require("attention", q, k, v)
    return tuple(_C.attention_fwd(*_c(q, k, v), causal, scale))


def attention_bwd(dout, q, k, v, out, lse, causal: bool, scale: float):
    _require("attention", q, k, v)
    return tuple(_C.attention_bwd(*_c(dout, q, k, v, out, lse), causal, scale))


def media_cross_attention_fwd(q, k, v, media_index, latents_per_media: int, only_immediate: bool, scale: float):
    _require("media_cross_attention", q, k, v)
    return tuple(
        _C.media_cross_attention_fwd(*_c(q, k, v, media_index), latents_per_media, only_immediate, scale)
    )


def media_cross_attention_bwd(
    dout, q, k, v, out, lse, media_index, latents_per_media: int, only_immediate: bool, scale: float
):
    _require("media_cross_attention", q, k, v)
    return tuple(
        _C.media_cross_attention_bwd(
            *_c(dout, q, k, v, out, lse, media_index), latents_per_media, only_immediate, scale
        )
    )


def media_span_attention_fwd(q, k, v, start, end, key_offset, key_count, scale: float):
    _require("media_span_attention", q, k, v)  # always raises: no kernel yet


def media_span_attention_bwd(dout, q, k, v, out, lse, start, end, key_offset, key_count, scale: float):
    _require("media_span_attention", q, k, v)


def perceiver_attention_fwd(q, k, v, scale: float):
    _require("perceiver_attention", q, k, v)
    return tuple(_C.perceiver_attention_fwd(*_c(q, k, v), scale))


def perceiver_attention_bwd(dout, q, k, v, out, lse, scale: float):
    _require("perceiver_attention", q, k, v)
    return tuple(_C.perceiver_attention_bwd(*_c(dout, q, k, v, out, lse), scale))
