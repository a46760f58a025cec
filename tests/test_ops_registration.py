"""torch.library registration of the custom ops: opcheck and torch.compile(fullgraph=True) tracing."""

import pytest
import torch

from flamingo_fast import ops

OPS = torch.ops.flamingo_fast


pytestmark = pytest.mark.usefixtures("one_thread")


def _randn(*shape, seed, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=torch.float64, generator=g).requires_grad_(requires_grad)


def _detached(*tensors):
    return [t.detach() for t in tensors]


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_opcheck_attention(backend):
    q, k, v = _randn(2, 6, 4, 16, seed=0), _randn(2, 9, 2, 16, seed=1), _randn(2, 9, 2, 16, seed=2)
    torch.library.opcheck(OPS.attention_fwd.default, (q, k, v, True, 0.25, backend))
    out, lse = OPS.attention_fwd(q, k, v, True, 0.25, backend)
    dout = _randn(*out.shape, seed=3, requires_grad=False)
    torch.library.opcheck(OPS.attention_bwd.default, (dout, *_detached(q, k, v, out, lse), True, 0.25, backend))


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_opcheck_media_cross_attention(backend):
    q, k, v = _randn(2, 6, 4, 16, seed=0), _randn(2, 12, 2, 16, seed=1), _randn(2, 12, 2, 16, seed=2)
    media_index = torch.tensor([[-1, 0, 0, 1, 1, 2], [0, 0, 0, 0, 2, 2]])
    args = (media_index, 4, True, 0.25, backend)
    torch.library.opcheck(OPS.media_cross_attention_fwd.default, (q, k, v, *args))
    out, lse = OPS.media_cross_attention_fwd(q, k, v, *args)
    dout = _randn(*out.shape, seed=3, requires_grad=False)
    torch.library.opcheck(
        OPS.media_cross_attention_bwd.default,
        (dout, *_detached(q, k, v, out, lse), *args),
    )


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_opcheck_document_attention(backend):
    q, k, v = _randn(2, 7, 4, 16, seed=0), _randn(2, 7, 2, 16, seed=1), _randn(2, 7, 2, 16, seed=2)
    document_ids = torch.tensor([[0, 0, 1, 1, 1, 2, 3], [0, 0, 0, 0, 0, 0, 0]])
    torch.library.opcheck(OPS.document_attention_fwd.default, (q, k, v, document_ids, 0.25, backend))
    out, lse = OPS.document_attention_fwd(q, k, v, document_ids, 0.25, backend)
    dout = _randn(*out.shape, seed=3, requires_grad=False)
    torch.library.opcheck(OPS.document_attention_bwd.default,
                          (dout, *_detached(q, k, v, out, lse), document_ids, 0.25, backend))


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_opcheck_perceiver_attention(backend):
    q, k, v = _randn(2, 4, 2, 16, seed=0), _randn(2, 9, 2, 16, seed=1), _randn(2, 9, 2, 16, seed=2)
    torch.library.opcheck(OPS.perceiver_attention_fwd.default, (q, k, v, 0.25, backend))
    out, lse = OPS.perceiver_attention_fwd(q, k, v, 0.25, backend)
    dout = _randn(*out.shape, seed=3, requires_grad=False)
    torch.library.opcheck(OPS.perceiver_attention_bwd.default, (dout, *_detached(q, k, v, out, lse), 0.25, backend))


def _block(x, latents, media_index):
    """A model-like function calling all three ops (BSHD, 4 heads of 16)."""
    h = ops.attention(x, x[:, :, :2], x[:, :, 2:])
    kv_in = torch.cat([latents, latents.flip(1)], dim=1)
    r = ops.perceiver_attention(latents, kv_in, kv_in.tanh())
    kv = r.reshape(1, 2 * 3, 4, 16)[:, :, :2]
    return ops.media_cross_attention(h, kv, kv.flip(1), media_index, latents_per_media=3)


def test_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    x, latents = _randn(1, 10, 4, 16, seed=0), _randn(2, 3, 4, 16, seed=1)
    media_index = torch.tensor([[-1, -1, 0, 0, 0, 1, 1, 1, 1, 1]])
    compiled = torch.compile(_block, fullgraph=True, backend="aot_eager")  # raises on any graph break
    got = compiled(x, latents, media_index)
    got.square().sum().backward()
    grads = (x.grad.clone(), latents.grad.clone())
    x.grad = latents.grad = None
    want = _block(x, latents, media_index)
    want.square().sum().backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grads, (x.grad, latents.grad))
    assert (got[0, :2] == 0).all()
