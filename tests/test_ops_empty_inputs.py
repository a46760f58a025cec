"""Empty inputs (zero queries or zero rows) give empty outputs and zero key/value gradients on every CPU backend,
never a process-killing signal (ATen's CPU flash kernel raises SIGFPE on zero queries; such inputs must not reach
it). Each case runs in this process: a crash here fails the whole test run, loudly."""

from __future__ import annotations

import pytest
import torch

from flamingo_fast import ops

def _hopper() -> bool:
    return "cuda" in ops.available_backends() and torch.cuda.get_device_capability() == (9, 0)


# The fused kernels on a Hopper GPU too (bf16, head dim 64): their bindings return before planning or launching.
CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not _hopper(), reason="needs an sm_90 GPU")])
BACKENDS = ["torch", "reference", CUDA]
EMPTY = [((1, 0, 2, 64), (1, 5, 2, 64)), ((0, 4, 2, 64), (0, 5, 2, 64)), ((0, 0, 2, 64), (0, 5, 2, 64))]


def _grads(fn, q_shape, kv_shape, backend, **kwargs):
    device, dtype = ("cuda", torch.bfloat16) if backend == "cuda" else ("cpu", torch.float32)
    q, k, v = (torch.randn(*s, device=device, dtype=dtype, requires_grad=True) for s in (q_shape, kv_shape, kv_shape))
    out = fn(q, k, v, backend=backend, **kwargs)
    out.sum().backward()
    return out, q, k, v


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("q_shape, kv_shape", EMPTY)
@pytest.mark.parametrize("op", ["causal", "full", "perceiver"])
def test_attention_ops_with_no_queries(backend, q_shape, kv_shape, op):
    fn = ops.perceiver_attention if op == "perceiver" else ops.attention
    kwargs = {} if op == "perceiver" else {"causal": op == "causal"}
    out, q, k, v = _grads(fn, q_shape, kv_shape, backend, **kwargs)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert q.grad.shape == q.shape and not k.grad.any() and not v.grad.any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("q_shape, kv_shape", [((1, 0, 2, 64), (1, 8, 2, 64)), ((0, 3, 2, 64), (0, 8, 2, 64))])
def test_media_cross_attention_with_no_queries(backend, q_shape, kv_shape):
    def media(q, k, v, **kwargs):
        index = torch.zeros(q_shape[:2], dtype=torch.long, device=q.device)
        return ops.media_cross_attention(q, k, v, index, latents_per_media=4, **kwargs)

    out, q, k, v = _grads(media, q_shape, kv_shape, backend)
    assert out.shape == q.shape and q.grad.shape == q.shape and not k.grad.any() and not v.grad.any()
