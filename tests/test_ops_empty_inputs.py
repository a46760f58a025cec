"""Empty inputs (zero queries or zero rows) give empty outputs and zero key/value gradients on every CPU backend,
never a process-killing signal (ATen's CPU flash kernel raises SIGFPE on zero queries; such inputs must not reach
it). Each case runs in this process: a crash here fails the whole test run, loudly."""

from __future__ import annotations

import pytest
import torch

from flamingo_fast import ops

BACKENDS = ["torch", "reference"]
EMPTY = [((1, 0, 2, 8), (1, 5, 2, 8)), ((0, 4, 2, 8), (0, 5, 2, 8)), ((0, 0, 2, 8), (0, 5, 2, 8))]


def _grads(fn, q_shape, kv_shape, **kwargs):
    q, k, v = (torch.randn(*s, dtype=torch.float32, requires_grad=True) for s in (q_shape, kv_shape, kv_shape))
    out = fn(q, k, v, **kwargs)
    out.sum().backward()
    return out, q, k, v


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("q_shape, kv_shape", EMPTY)
@pytest.mark.parametrize("op", ["causal", "full", "perceiver"])
def test_attention_ops_with_no_queries(backend, q_shape, kv_shape, op):
    fn = ops.perceiver_attention if op == "perceiver" else ops.attention
    kwargs = {} if op == "perceiver" else {"causal": op == "causal"}
    out, q, k, v = _grads(fn, q_shape, kv_shape, backend=backend, **kwargs)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert q.grad.shape == q.shape and not k.grad.any() and not v.grad.any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("q_shape, kv_shape", [((1, 0, 2, 8), (1, 8, 2, 8)), ((0, 3, 2, 8), (0, 8, 2, 8))])
def test_media_cross_attention_with_no_queries(backend, q_shape, kv_shape):
    index = torch.zeros(q_shape[:2], dtype=torch.long)
    out, q, k, v = _grads(lambda q, k, v, **kw: ops.media_cross_attention(q, k, v, index, latents_per_media=4, **kw),
                          q_shape, kv_shape, backend=backend)
    assert out.shape == q.shape and q.grad.shape == q.shape and not k.grad.any() and not v.grad.any()
