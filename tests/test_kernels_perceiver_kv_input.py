"""flamingo_fast.ops.perceiver_kv_input: concat(LN(media + time_emb), LN(latents)) as a custom op.

CPU: the torch backend against the resampler's own formula in float64 (values and every gradient) and
torch.library.opcheck. GPU (sm_90): the fused cuda backend against the torch backend in float64.
"""

import pytest
import torch
from torch import nn

from flamingo_fast.ops.perceiver_kv_input import cuda_unsupported_reason, perceiver_kv_input


def make_inputs(device="cpu", dtype=torch.float64, n=3, frames=2, tokens=5, n_latents=4, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    media = torch.randn(n, frames * tokens, dim, generator=g, dtype=dtype).to(device).requires_grad_()
    latents_param = torch.randn(n_latents, dim, generator=g, dtype=dtype).to(device).requires_grad_()
    time_emb = torch.randn(frames, dim, generator=g, dtype=dtype).to(device).requires_grad_()
    norms = [nn.LayerNorm(dim, eps=1e-5, device=device, dtype=dtype) for _ in range(2)]
    with torch.no_grad():
        for p in (*norms[0].parameters(), *norms[1].parameters()):
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype))
    return media, latents_param, time_emb, norms


def resampler_formula(media, latents, time_emb, tokens, media_norm, latents_norm):
    """What PerceiverResampler computes: frame embedding added to each frame's tokens, then the two norms."""
    frames = torch.arange(media.shape[1], device=media.device) // tokens
    return torch.cat([media_norm(media + time_emb[frames]), latents_norm(latents)], dim=1)


def leaves(media, latents_param, time_emb, norms):
    return [media, latents_param, time_emb, *norms[0].parameters(), *norms[1].parameters()]


@pytest.mark.parametrize("with_time", [True, False])
def test_torch_backend_matches_the_resampler_formula(with_time):
    media, latents_param, time_emb, norms = make_inputs()
    latents = latents_param.expand(media.shape[0], -1, -1)
    emb = time_emb if with_time else torch.zeros_like(time_emb)
    kv = perceiver_kv_input(media, latents, *norms, time_emb=time_emb if with_time else None, tokens_per_frame=5,
                            backend="torch")
    want = resampler_formula(media, latents, emb, 5, *norms)
    torch.testing.assert_close(kv, want, rtol=1e-12, atol=1e-12)
    d_kv = torch.randn_like(kv)
    params = leaves(media, latents_param, time_emb, norms)
    if not with_time:
        params.pop(2)
    got = torch.autograd.grad(kv, params, d_kv)
    expected = torch.autograd.grad(want, params, d_kv)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_opcheck_torch_backend():
    from flamingo_fast.ops import perceiver_kv_input as module  # noqa: F401  (registers the ops)

    media, latents_param, time_emb, norms = make_inputs()
    latents = latents_param.expand(media.shape[0], -1, -1)
    args = (media, latents, time_emb, 5, *norms[0].parameters(), *norms[1].parameters(), 1e-5, "torch")
    torch.library.opcheck(torch.ops.flamingo_fast.perceiver_kv_input_fwd.default, args)


def test_bad_arguments_raise():
    media, latents_param, time_emb, norms = make_inputs()
    with pytest.raises(ValueError, match="time_emb has 2 frames"):
        perceiver_kv_input(media, latents_param.expand(3, -1, -1), *norms, time_emb=time_emb, tokens_per_frame=2)
    with pytest.raises(ValueError, match="batch, rows, dim"):
        perceiver_kv_input(media[0], latents_param, *norms)
    with pytest.raises(ValueError, match="unknown backend"):
        perceiver_kv_input(media, latents_param.expand(3, -1, -1), *norms, backend="fast")


def test_cpu_inputs_select_the_torch_backend():
    media, latents_param, time_emb, norms = make_inputs()
    reason = cuda_unsupported_reason(media, latents_param, time_emb, *norms[0].parameters())
    assert reason == "media is on cpu, not on a CUDA device"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="needs an sm_90 GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cuda_backend_matches_torch_backend(dtype):
    media, latents_param, time_emb, norms = make_inputs("cuda", torch.float64, n=8, frames=4, tokens=64,
                                                        n_latents=64, dim=1536, seed=1)
    latents = latents_param.expand(8, -1, -1)
    want = perceiver_kv_input(media, latents, *norms, time_emb=time_emb, tokens_per_frame=64, backend="torch")
    d_kv = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, leaves(media, latents_param, time_emb, norms), d_kv)

    low = [t.detach().to(dtype).requires_grad_() for t in (media, latents_param, time_emb)]
    low_norms = [nn.LayerNorm(1536, eps=1e-5, device="cuda", dtype=dtype) for _ in range(2)]
    with torch.no_grad():
        for dst, src in zip((*low_norms[0].parameters(), *low_norms[1].parameters()),
                            (*norms[0].parameters(), *norms[1].parameters())):
            dst.copy_(src)
    assert cuda_unsupported_reason(low[0], low[1], low[2], *low_norms[0].parameters()) is None
    kv = perceiver_kv_input(low[0], low[1].expand(8, -1, -1), *low_norms, time_emb=low[2], tokens_per_frame=64)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert (kv.double() - want).norm() / want.norm() <= tol
    grads = torch.autograd.grad(kv, leaves(low[0], low[1], low[2], low_norms), d_kv.to(dtype))
    for got, ref in zip(grads, want_grads):
        assert (got.double() - ref).norm() / ref.norm() <= tol
