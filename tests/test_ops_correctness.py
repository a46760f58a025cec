"""The torch backend against the float64 reference oracle (forward and gradients), plus semantics checks."""

import math

import pytest
import torch

from flamingo_fast import ops
from flamingo_fast.ops import blockwise, media_torch, torch_backend

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=["cpu_flash", "blockwise"])
def dense_path(request, monkeypatch):
    """Run the torch backend's full attention through each of its two implementations, and check afterwards
    that the named one is the one that ran (on CPU float tensors; a test may also run other dtypes)."""
    from flamingo_fast.ops import blockwise, cpu_flash

    monkeypatch.setattr(torch_backend, "USE_CPU_FLASH", request.param == "cpu_flash")
    ran = []
    for name, module in (("cpu_flash", cpu_flash), ("blockwise", blockwise)):
        for fn in ("forward", "backward"):
            original = getattr(module, fn)
            monkeypatch.setattr(module, fn, lambda *a, _o=original, _n=name, **k: (ran.append(_n), _o(*a, **k))[1])
    yield request.param
    assert request.param in ran, f"the {request.param} path never ran (ran: {sorted(set(ran))})"
    if request.param == "blockwise":
        assert "cpu_flash" not in ran


def _randn(*shape, dtype, seed):
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def _run(fn, tensors, backend, **kwargs):
    """Output and gradients of (q, k, v) for a fixed random output gradient."""
    q, k, v, *rest = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]
    out = fn(q, k, v, *rest, backend=backend, **kwargs)
    dout = _randn(*out.shape, dtype=torch.float64, seed=99).to(out.device, out.dtype)
    out.backward(dout)
    return [out.detach(), q.grad, k.grad, v.grad]


def _assert_agree(fn, tensors, dtype, **kwargs):
    got = _run(fn, tensors, "torch", **kwargs)
    want = _run(fn, tensors, "reference", **kwargs)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, w, atol=TOL[dtype], rtol=TOL[dtype], msg=lambda m: f"{name}: {m}")


def _qkv(b, sq, sk, hq, hkv, d, dtype, seed=0):
    return (
        _randn(b, sq, hq, d, dtype=dtype, seed=seed),
        _randn(b, sk, hkv, d, dtype=dtype, seed=seed + 1),
        _randn(b, sk, hkv, d, dtype=dtype, seed=seed + 2),
    )


ATTENTION_CASES = [
    # (B, Sq, Sk, Hq, Hkv, d, causal)
    (1, 17, 17, 2, 2, 64, True),  # ragged length, MHA
    (3, 9, 23, 4, 2, 96, True),  # causal with Sq < Sk (KV cache), GQA 2
    (3, 23, 23, 8, 2, 128, False),  # non-causal, GQA 4
    (1, 1, 31, 4, 1, 64, True),  # one-token decode step
    (2, 13, 5, 4, 4, 64, True),  # Sq > Sk: the first 8 rows see no key -> 0
    (1, 40, 40, 4, 1, 64, True),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_attention_torch_matches_reference(case, dtype, dense_path):
    b, sq, sk, hq, hkv, d, causal = case
    _assert_agree(ops.attention, _qkv(b, sq, sk, hq, hkv, d, dtype), dtype, causal=causal)


@pytest.mark.parametrize("causal", [True, False])
def test_attention_query_chunks_match_reference(monkeypatch, causal):
    # A tiny budget forces many query chunks, including chunks that straddle the causal diagonal.
    monkeypatch.setattr(torch_backend, "USE_CPU_FLASH", False)
    monkeypatch.setattr(blockwise, "SCORE_BUDGET", 64)
    _assert_agree(ops.attention, _qkv(2, 50, 61, 4, 2, 64, torch.float64), torch.float64, causal=causal)


def test_attention_explicit_scale():
    tensors = _qkv(2, 7, 9, 4, 2, 64, torch.float64)
    _assert_agree(ops.attention, tensors, torch.float64, causal=False, scale=0.3)
    default = ops.attention(*tensors, causal=False, backend="reference")
    explicit = ops.attention(*tensors, causal=False, scale=64**-0.5, backend="reference")
    torch.testing.assert_close(default, explicit, atol=0, rtol=0)


def test_attention_bottom_right_causal_by_hand(dense_path):
    q, k, v = _qkv(1, 3, 5, 1, 1, 64, torch.float64)
    out = ops.attention(q, k, v, causal=True, backend="torch")
    for i in range(3):
        visible = i + 5 - 3  # query i sees keys 0..i+2
        scores = (q[0, i, 0] @ k[0, : visible + 1, 0].T) / 8.0
        want = torch.softmax(scores, 0) @ v[0, : visible + 1, 0]
        torch.testing.assert_close(out[0, i, 0], want, atol=1e-12, rtol=1e-12)


# ---------------------------------------------------------------- media_cross_attention


def _runs(*pieces):
    """media_index row from (value, count) pieces."""
    return [value for value, count in pieces for _ in range(count)]


MEDIA_PATTERNS = {
    # name: (rows of media_index, number of images)
    "no_image_at_all": ([_runs((-1, 12))], 1),
    "leading_text": ([_runs((-1, 5), (0, 7), (1, 6))], 2),
    "consecutive_images": ([_runs((-1, 1), (0, 1), (1, 1), (2, 1), (3, 9))], 4),
    "one_image_per_block": ([_runs((0, 260), (1, 300))], 2),  # runs longer than one 256-row block
    "image_at_last_position": ([_runs((-1, 10), (0, 1))], 1),
    "batch_rows_differ": ([_runs((0, 9), (2, 4)), _runs((-1, 13)), _runs((-1, 2), (1, 11))], 3),
}


def _media_inputs(rows, num_images, hq, hkv, d, dtype, latents=8, index_dtype=torch.int64):
    media_index = torch.tensor(rows, dtype=index_dtype)
    b, s = media_index.shape
    return (*_qkv(b, s, num_images * latents, hq, hkv, d, dtype), media_index)


@pytest.mark.parametrize("only_immediate", [True, False])
@pytest.mark.parametrize("pattern", sorted(MEDIA_PATTERNS))
def test_media_torch_matches_reference_float64(pattern, only_immediate):
    rows, num_images = MEDIA_PATTERNS[pattern]
    tensors = _media_inputs(rows, num_images, 4, 2, 64, torch.float64)
    _assert_agree(ops.media_cross_attention, tensors, torch.float64, latents_per_media=8, only_immediate=only_immediate)


@pytest.mark.parametrize(
    "hq,hkv,d,index_dtype",
    [(2, 2, 64, torch.int64), (4, 2, 96, torch.int32), (8, 2, 128, torch.int64), (4, 1, 64, torch.int32)],
)
@pytest.mark.parametrize("only_immediate", [True, False])
def test_media_torch_matches_reference_float32(hq, hkv, d, index_dtype, only_immediate):
    rows = [_runs((-1, 3), (0, 20), (1, 1), (2, 16)), _runs((0, 25), (2, 15))]
    tensors = _media_inputs(rows, 3, hq, hkv, d, torch.float32, index_dtype=index_dtype)
    _assert_agree(ops.media_cross_attention, tensors, torch.float32, latents_per_media=8, only_immediate=only_immediate)


def test_media_default_64_latents_and_block_chunks(monkeypatch):
    monkeypatch.setattr(media_torch, "CPU_SCORE_BUDGET", 4096)  # several chunks of blocks
    rows = [_runs((-1, 4), (0, 40), (1, 30), (2, 6)), _runs((0, 50), (1, 30))]
    for only_immediate in (True, False):
        _assert_agree(
            ops.media_cross_attention, _media_inputs(rows, 3, 4, 2, 64, torch.float64, latents=64),
            torch.float64, only_immediate=only_immediate,
        )


def _media_by_hand(q, k, v, media_index, latents, only_immediate):
    b, s, hq, d = q.shape
    group = hq // k.shape[2]
    out = torch.zeros_like(q)
    for bi in range(b):
        for t in range(s):
            m = int(media_index[bi, t])
            if m < 0:
                continue
            first = m * latents if only_immediate else 0
            keys = range(first, (m + 1) * latents)
            for h in range(hq):
                scores = [float(q[bi, t, h] @ k[bi, j, h // group]) / math.sqrt(d) for j in keys]
                top = max(scores)
                weights = [math.exp(x - top) for x in scores]
                total = sum(weights)
                out[bi, t, h] = sum(w / total * v[bi, j, h // group] for w, j in zip(weights, keys))
    return out


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("only_immediate", [True, False])
def test_media_semantics_by_hand(backend, only_immediate):
    rows = [[-1, -1, 0, 0, 1, 2, 2], [0, 1, 1, 1, 1, 1, 2]]
    q, k, v, media_index = _media_inputs(rows, 3, 4, 2, 16, torch.float64, latents=3)
    got = ops.media_cross_attention(q, k, v, media_index, latents_per_media=3, only_immediate=only_immediate,
                                    backend=backend)
    want = _media_by_hand(q, k, v, media_index, 3, only_immediate)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("only_immediate", [True, False])
def test_media_rows_without_image_are_exactly_zero(backend, only_immediate):
    rows = [_runs((-1, 6), (0, 5), (1, 3)), _runs((-1, 14))]
    q, k, v, media_index = _media_inputs(rows, 2, 4, 2, 64, torch.float32)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    out = ops.media_cross_attention(q, k, v, media_index, latents_per_media=8, only_immediate=only_immediate,
                                    backend=backend)
    out.backward(_randn(*out.shape, dtype=out.dtype, seed=5))
    no_image = media_index < 0
    assert (out[no_image] == 0).all()
    assert (q.grad[no_image] == 0).all()
    assert (out[~no_image] != 0).any()
    for t in (out, q.grad, k.grad, v.grad):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_media_without_any_image_keys(backend):
    # A text-only batch: T_img = 0 images, so k/v have no keys and every row is -1.
    q, k, v, media_index = _media_inputs([[-1] * 5], 0, 2, 2, 64, torch.float64)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    out = ops.media_cross_attention(q, k, v, media_index, latents_per_media=8, backend=backend)
    out.sum().backward()
    assert (out == 0).all() and (q.grad == 0).all() and k.grad.shape == k.shape


def test_media_lse_is_minus_inf_without_image():
    q, k, v, media_index = _media_inputs([[-1, -1, 0, 0]], 1, 2, 2, 64, torch.float32)
    for backend in ("torch", "reference"):
        out, lse = torch.ops.flamingo_fast.media_cross_attention_fwd(q, k, v, media_index, 8, True, 0.125, backend)
        assert lse.shape == (1, 2, 4) and lse.dtype == torch.float32
        assert torch.isneginf(lse[..., :2]).all() and torch.isfinite(lse[..., 2:]).all()


# ---------------------------------------------------------------- perceiver_attention


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("b,n_latents,sk,h,d", [(1, 8, 21, 2, 64), (3, 16, 40, 4, 96), (2, 5, 13, 2, 128)])
def test_perceiver_torch_matches_reference(b, n_latents, sk, h, d, dtype, dense_path):
    _assert_agree(ops.perceiver_attention, _qkv(b, n_latents, sk, h, h, d, dtype), dtype)


# ---------------------------------------------------------------- gradcheck, half precision, layouts


def _gradcheck(fn, tensors, **kwargs):
    q, k, v, *rest = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]
    assert torch.autograd.gradcheck(
        lambda a, b, c: fn(a, b, c, *rest, **kwargs), (q, k, v), atol=1e-6, rtol=1e-5, fast_mode=True
    )


def test_gradcheck_attention_torch(dense_path):
    _gradcheck(ops.attention, _qkv(2, 5, 7, 4, 2, 8, torch.float64), causal=True, backend="torch")


def test_gradcheck_attention_reference():
    _gradcheck(ops.attention, _qkv(2, 5, 7, 4, 2, 8, torch.float64), causal=True, backend="reference")


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("only_immediate", [True, False])
def test_gradcheck_media_cross_attention(backend, only_immediate):
    tensors = _media_inputs([[-1, 0, 0, 1, 1, 2], [0, 0, 2, 2, 2, 2]], 3, 4, 2, 8, torch.float64, latents=3)
    _gradcheck(ops.media_cross_attention, tensors, latents_per_media=3, only_immediate=only_immediate,
               backend=backend)


def test_gradcheck_perceiver_attention_torch(dense_path):
    _gradcheck(ops.perceiver_attention, _qkv(2, 4, 9, 2, 2, 8, torch.float64), backend="torch")


def test_gradcheck_perceiver_attention_reference():
    _gradcheck(ops.perceiver_attention, _qkv(2, 4, 9, 2, 2, 8, torch.float64), backend="reference")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_torch_backend(dtype, dense_path):
    q, k, v = _qkv(2, 12, 16, 4, 2, 64, torch.float32)
    media_index = torch.tensor([_runs((-1, 2), (0, 10)), _runs((0, 5), (1, 7))])
    calls = {
        "attention": lambda q, k, v, be: ops.attention(q, k, v, backend=be),
        "media": lambda q, k, v, be: ops.media_cross_attention(q, k, v, media_index, 8, backend=be),
        "perceiver": lambda q, k, v, be: ops.perceiver_attention(q, k.repeat(1, 1, 2, 1), v.repeat(1, 1, 2, 1),
                                                                 backend=be),
    }
    for name, call in calls.items():
        got = call(q.to(dtype), k.to(dtype), v.to(dtype), "torch")
        want = call(q, k, v, "reference")
        assert got.dtype == dtype, name
        torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2, msg=lambda m: f"{name}: {m}")


def test_non_contiguous_inputs(dense_path):
    # q/k/v as strided views of one fused projection, as a model would produce them.
    fused = _randn(2, 11, 3, 4, 64, dtype=torch.float64, seed=3)
    q, k, v = fused.unbind(2)
    assert not q.is_contiguous()
    media_index = torch.tensor([_runs((-1, 3), (0, 8)), _runs((0, 11))])
    for backend in ("torch", "reference"):
        out = ops.attention(q, k, v, backend=backend)
        torch.testing.assert_close(out, ops.attention(q.contiguous(), k.contiguous(), v.contiguous(), backend=backend))
    _assert_agree(ops.perceiver_attention, (q, k, v), torch.float64)
    k8, v8 = k[:, :8], v[:, :8]
    _assert_agree(ops.media_cross_attention, (q, k8, v8, media_index), torch.float64, latents_per_media=8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_backend_on_cuda_matches_reference(dtype):
    # On CUDA the torch backend runs blockwise attention and the media blocks on the GPU.
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    q, k, v = (t.cuda() for t in _qkv(2, 40, 48, 8, 2, 64, torch.float32))
    media_index = torch.tensor([_runs((-1, 5), (0, 20), (2, 15)), _runs((0, 30), (5, 10))]).cuda()
    calls = [
        lambda be, *t: ops.attention(*t, backend=be),
        lambda be, *t: ops.media_cross_attention(*t, media_index, latents_per_media=8, backend=be),
        lambda be, *t: ops.media_cross_attention(*t, media_index, 8, only_immediate=False, backend=be),
        lambda be, q, k, v: ops.perceiver_attention(q[:, :, :2], k, v, backend=be),
    ]
    for call in calls:
        got = _run(lambda *t, backend: call(backend, *t), [t.to(dtype) for t in (q, k, v)], "torch")
        want = _run(lambda *t, backend: call(backend, *t), (q.double(), k.double(), v.double()), "reference")
        for g, w in zip(got, want):
            torch.testing.assert_close(g.double(), w, atol=tol, rtol=tol)
