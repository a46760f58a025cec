"""The Hopper kernels of flamingo_fast._C against the float64 `reference` backend (needs an sm_90 GPU).

Every check draws fresh random inputs, poisons the CUDA caching allocator with NaN blocks shaped like the
outputs to come (so an output element the kernel never writes shows up as NaN), and compares forward
outputs, LSE and every gradient by relative Frobenius error: bf16 <= 1e-2, fp16 <= 5e-3.
"""

from __future__ import annotations


import pytest
import torch

from flamingo_fast import native
from flamingo_fast.ops import reference
from kernel_tolerance import assert_close

_C = native.load()


def _skip_reason() -> str | None:
    if _C is None:
        return f"flamingo_fast._C is not built: {native.import_error()}"
    if not hasattr(_C, "attention_fwd"):
        return "flamingo_fast._C was built without the CUDA kernels"
    if not torch.cuda.is_available():
        return "no CUDA device"
    if torch.cuda.get_device_capability() != (9, 0):
        return "the kernels need an sm_90 (Hopper) GPU"
    return None


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))]

DEVICE = "cuda"
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 5e-3}
BUILT_DTYPES = [
    getattr(torch, name) for name in (native.build_info().get("attention_dtypes") or ["bfloat16"])
]


# ------------------------------------------------------------------------------------------------- helpers


def poison(*specs: tuple[tuple[int, ...], torch.dtype]) -> None:
    """Leave NaN-filled blocks of these shapes in the caching allocator for the next allocations to reuse."""
    blocks = [torch.full(shape, float("nan"), dtype=dtype, device=DEVICE) for shape, dtype in specs]
    del blocks


def rand(*shape: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=generator, device=DEVICE, dtype=torch.float32).to(dtype)


def cancellation_floor(scale: float, dout: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """1e-4 of a bound on |dq| (a=k) or |dk| (a=q): |scale| * |dout| * max row norm of a * max row norm of v (b).
    dS = P * (dP - D) cancels exactly when a query sees one key, so the float64 dq/dk are ~0 while the
    kernel's fp32 dP - D leaves rounding noise of ~1e-7 of this bound; real gradients are far above it."""
    return 1e-4 * abs(scale) * dout.double().norm().item() * a.double().norm(dim=-1).max().item() * \
        b.double().norm(dim=-1).max().item()


def assert_lse_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == torch.float32 and got.shape == want.shape
    want_empty = torch.isneginf(want)
    assert torch.equal(torch.isneginf(got), want_empty), "lse: rows without keys must be exactly -inf"
    assert not torch.isnan(got).any(), "lse: NaN (unwritten element?)"
    finite = ~want_empty
    if finite.any():
        err = (got.double()[finite] - want[finite]).abs().max().item()
        assert err <= 2e-3 * (1 + want[finite].abs().max().item()), f"lse: max abs error {err:.3e}"


def bshd(b: int, s: int, h: int, d: int) -> tuple[int, ...]:
    return (b, s, h, d)


class Case:
    """One attention problem: runs the CUDA kernels and the float64 reference, compares everything."""

    def __init__(self, fwd, bwd, ref_fwd, ref_bwd, q, k, v, extra=(), ref_extra=None):
        self.fwd, self.bwd, self.ref_fwd, self.ref_bwd = fwd, bwd, ref_fwd, ref_bwd
        self.q, self.k, self.v = q, k, v
        self.extra = tuple(extra)
        self.ref_extra = tuple(extra if ref_extra is None else ref_extra)

    def run(self, generator: torch.Generator, check_backward: bool = True) -> None:
        q, k, v = self.q, self.k, self.v
        tol = TOLERANCE[q.dtype]
        b, sq, hq, _ = q.shape
        q64, k64, v64 = q.double(), k.double(), v.double()
        want_out, want_lse = self.ref_fwd(q64, k64, v64, *self.ref_extra)

        poison((q.shape, q.dtype), ((b, hq, sq), torch.float32))
        out, lse = self.fwd(q, k, v, *self.extra)
        torch.cuda.synchronize()
        assert out.dtype == q.dtype and out.shape == q.shape
        assert_close("out", out, want_out, tol)
        assert_lse_close(lse, want_lse)
        if not check_backward:
            return

        dout = rand(*q.shape, dtype=q.dtype, generator=generator)
        want_dq, want_dk, want_dv = self.ref_bwd(dout.double(), q64, k64, v64, want_out, want_lse, *self.ref_extra)
        poison((q.shape, q.dtype), (k.shape, k.dtype), (v.shape, v.dtype))
        dq, dk, dv = self.bwd(dout, q, k, v, out, lse, *self.extra)
        torch.cuda.synchronize()
        scale = self.extra[-1]
        assert_close("dq", dq, want_dq, tol, cancellation_floor(scale, dout, k, v))
        assert_close("dk", dk, want_dk, tol, cancellation_floor(scale, dout, q, v))
        assert_close("dv", dv, want_dv, tol)


def attention_case(b, sq, sk, hq, hkv, d, causal, dtype, generator, scale=None):
    scale = d**-0.5 if scale is None else scale
    q = rand(b, sq, hq, d, dtype=dtype, generator=generator)
    k = rand(b, sk, hkv, d, dtype=dtype, generator=generator)
    v = rand(b, sk, hkv, d, dtype=dtype, generator=generator)
    return Case(_C.attention_fwd, _C.attention_bwd, reference.attention_fwd, reference.attention_bwd, q, k, v,
                extra=(causal, scale))


def media_case(media_index, images, hq, hkv, d, dtype, generator, latents=64, only_immediate=True):
    b, s = media_index.shape
    q = rand(b, s, hq, d, dtype=dtype, generator=generator)
    k = rand(b, images * latents, hkv, d, dtype=dtype, generator=generator)
    v = rand(b, images * latents, hkv, d, dtype=dtype, generator=generator)
    index = media_index.to(DEVICE)
    return Case(_C.media_cross_attention_fwd, _C.media_cross_attention_bwd, reference.media_cross_attention_fwd,
                reference.media_cross_attention_bwd, q, k, v, extra=(index, latents, only_immediate, d**-0.5))


def perceiver_case(b, n_latents, sk, h, d, dtype, generator):
    q = rand(b, n_latents, h, d, dtype=dtype, generator=generator)
    k = rand(b, sk, h, d, dtype=dtype, generator=generator)
    v = rand(b, sk, h, d, dtype=dtype, generator=generator)
    return Case(_C.perceiver_attention_fwd, _C.perceiver_attention_bwd, reference.perceiver_attention_fwd,
                reference.perceiver_attention_bwd, q, k, v, extra=(d**-0.5,))


@pytest.fixture
def generator(request) -> torch.Generator:
    # A different seed per test (fresh inputs), reproducible from the test id.
    seed = sum(ord(c) * (i + 1) for i, c in enumerate(request.node.nodeid)) % (2**31)
    return torch.Generator(device=DEVICE).manual_seed(seed)


# ------------------------------------------------------------------------------------------------- attention

HEAD_DIMS = (64, 96, 128)

# (batch, seqlen_q, seqlen_k, heads_q, heads_kv): ragged lengths, batch 1 and large, GQA ratios 1/2/4/8,
# seqlen_q < seqlen_k (KV cache, bottom-right causal) and seqlen_q > seqlen_k (early rows see no key).
ATTENTION_SHAPES = [
    (1, 1, 1, 1, 1),
    (1, 1, 77, 4, 4),
    (2, 100, 100, 4, 2),
    (1, 257, 257, 8, 1),
    (3, 130, 300, 6, 3),
    (2, 300, 130, 4, 4),
    (1, 1000, 1000, 8, 2),
    (16, 128, 128, 8, 8),
    (48, 65, 65, 2, 1),
]


@pytest.mark.parametrize("dtype", BUILT_DTYPES, ids=str)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_attention_matches_reference(shape, d, causal, dtype, generator):
    attention_case(*shape, d, causal, dtype, generator).run(generator)


@pytest.mark.parametrize("scale", [0.05, -0.125, 3.0])
def test_attention_scales(scale, generator):
    attention_case(2, 200, 200, 4, 2, 64, True, torch.bfloat16, generator, scale=scale).run(generator)


@pytest.mark.slow
@pytest.mark.parametrize("d", [64, 128])
def test_attention_long_sequence(d, generator):
    attention_case(1, 16384, 16384, 2, 1, d, True, torch.bfloat16, generator).run(generator)


def test_attention_non_contiguous_inputs(generator):
    """Strided q/k/v (a slice of a packed qkv projection) with a contiguous last dimension."""
    b, s, h, d = 2, 150, 4, 64
    qkv = rand(b, s, 3, h, d, dtype=torch.bfloat16, generator=generator)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    Case(_C.attention_fwd, _C.attention_bwd, reference.attention_fwd, reference.attention_bwd, q, k, v,
         extra=(True, d**-0.5)).run(generator)


# ------------------------------------------------------------------------------------------------- media


def _index_rows(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64)


def media_pattern(name: str, batch: int, seq: int, images: int, rng: torch.Generator) -> torch.Tensor:
    """media_index (batch, seq) for the named pattern (non-decreasing rows in [-1, images))."""
    rows = []
    for row in range(batch):
        if name == "no_image":
            values = [-1] * seq
        elif name == "leading_text":
            start = min(seq - 1, 37 + 11 * row)
            values = [-1] * start + [0] * (seq - start)
        elif name == "consecutive_images":  # images on adjacent tokens
            values = [-1] * 5 + [min(i, images - 1) for i in range(seq - 5)]
        elif name == "image_per_block":  # one image starting each 128-token block
            values = [min(i // 128, images - 1) for i in range(seq)]
        elif name == "image_at_last":
            values = [-1] * (seq - 1) + [images - 1]
        elif name == "random":
            starts = sorted(torch.randint(0, seq, (images,), generator=rng).tolist())
            values = [sum(1 for p in starts if p <= i) - 1 for i in range(seq)]
        else:
            raise ValueError(name)
        rows.append(values)
    return _index_rows(rows)


MEDIA_PATTERNS = ["no_image", "leading_text", "consecutive_images", "image_per_block", "image_at_last", "random"]


@pytest.mark.parametrize("dtype", BUILT_DTYPES, ids=str)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("pattern", MEDIA_PATTERNS)
@pytest.mark.parametrize("only_immediate", [True, False], ids=["immediate", "all_previous"])
def test_media_cross_attention_matches_reference(pattern, d, only_immediate, dtype, generator):
    cpu_rng = torch.Generator().manual_seed(int(generator.initial_seed()) % (2**31))
    images, seq = 5, 700
    index = media_pattern(pattern, 3, seq, images, cpu_rng)
    media_case(index, images, 8, 2, d, dtype, generator, only_immediate=only_immediate).run(generator)


@pytest.mark.parametrize(
    "batch,seq,images,latents,hq,hkv",
    [(1, 1, 1, 64, 1, 1), (2, 129, 3, 17, 4, 4), (8, 256, 8, 64, 16, 4), (1, 2048, 30, 64, 8, 8)],
)
def test_media_cross_attention_shapes(batch, seq, images, latents, hq, hkv, generator):
    cpu_rng = torch.Generator().manual_seed(int(generator.initial_seed()) % (2**31))
    index = media_pattern("random", batch, seq, images, cpu_rng).to(torch.int32)
    media_case(index, images, hq, hkv, 128, torch.bfloat16, generator, latents=latents).run(generator)


def test_media_without_images_gives_zeros(generator):
    """T_img = 0: no keys at all; every row is exactly 0 with lse -inf."""
    index = torch.full((2, 50), -1, dtype=torch.int64)
    q = rand(2, 50, 4, 64, dtype=torch.bfloat16, generator=generator)
    kv = torch.empty(2, 0, 4, 64, dtype=torch.bfloat16, device=DEVICE)
    out, lse = _C.media_cross_attention_fwd(q, kv, kv, index.to(DEVICE), 64, True, 0.125)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


# ------------------------------------------------------------------------------------------------- perceiver


@pytest.mark.parametrize("dtype", BUILT_DTYPES, ids=str)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("batch,n_latents,sk,heads", [(1, 64, 320, 1), (64, 64, 321, 8), (6, 64, 64 + 1024, 16),
                                                      (2, 100, 37, 2)])
def test_perceiver_attention_matches_reference(batch, n_latents, sk, heads, d, dtype, generator):
    perceiver_case(batch, n_latents, sk, heads, d, dtype, generator).run(generator)


# ------------------------------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("kind", ["causal", "media", "perceiver"])
def test_backward_is_bitwise_deterministic(kind, generator, monkeypatch):
    monkeypatch.setenv("FLAMINGO_FAST_DETERMINISTIC", "1")
    if kind == "causal":
        case = attention_case(2, 600, 600, 8, 2, 128, True, torch.bfloat16, generator)
    elif kind == "media":
        cpu_rng = torch.Generator().manual_seed(7)
        case = media_case(media_pattern("random", 2, 600, 6, cpu_rng), 6, 8, 2, 96, torch.bfloat16, generator)
    else:
        case = perceiver_case(16, 64, 320, 8, 64, torch.bfloat16, generator)
    out, lse = case.fwd(case.q, case.k, case.v, *case.extra)
    dout = rand(*case.q.shape, dtype=case.q.dtype, generator=generator)
    first = case.bwd(dout, case.q, case.k, case.v, out, lse, *case.extra)
    second = case.bwd(dout, case.q, case.k, case.v, out, lse, *case.extra)
    for name, a, b in zip(("dq", "dk", "dv"), first, second):
        assert torch.equal(a, b), f"{name} differs between two identical backward runs"
    again, _ = case.fwd(case.q, case.k, case.v, *case.extra)
    assert torch.equal(out, again), "forward differs between two identical runs"


# ------------------------------------------------------------------------------------------------- ops layer


def test_opcheck_cuda_backend(generator):
    from flamingo_fast import ops  # noqa: F401  (registers the custom ops)

    q = rand(2, 130, 4, 64, dtype=torch.bfloat16, generator=generator).requires_grad_()
    k = rand(2, 130, 2, 64, dtype=torch.bfloat16, generator=generator).requires_grad_()
    v = rand(2, 130, 2, 64, dtype=torch.bfloat16, generator=generator).requires_grad_()
    torch.library.opcheck(torch.ops.flamingo_fast.attention_fwd.default, (q, k, v, True, 0.125, "cuda"))

    index = media_pattern("random", 2, 130, 3, torch.Generator().manual_seed(3)).to(DEVICE)
    km = rand(2, 3 * 64, 2, 64, dtype=torch.bfloat16, generator=generator).requires_grad_()
    vm = rand(2, 3 * 64, 2, 64, dtype=torch.bfloat16, generator=generator).requires_grad_()
    torch.library.opcheck(torch.ops.flamingo_fast.media_cross_attention_fwd.default,
                          (q, km, vm, index, 64, True, 0.125, "cuda"))

    qp = rand(4, 64, 4, 64, dtype=torch.bfloat16, generator=generator).requires_grad_()
    kp = rand(4, 320, 4, 64, dtype=torch.bfloat16, generator=generator).requires_grad_()
    vp = rand(4, 320, 4, 64, dtype=torch.bfloat16, generator=generator).requires_grad_()
    torch.library.opcheck(torch.ops.flamingo_fast.perceiver_attention_fwd.default, (qp, kp, vp, 0.125, "cuda"))


def test_public_ops_pick_cuda_and_match_reference(generator):
    from flamingo_fast import ops

    q = rand(2, 200, 4, 128, dtype=torch.bfloat16, generator=generator).requires_grad_()
    k = rand(2, 200, 2, 128, dtype=torch.bfloat16, generator=generator).requires_grad_()
    v = rand(2, 200, 2, 128, dtype=torch.bfloat16, generator=generator).requires_grad_()
    assert ops.resolve_backend("attention", q, k, v) == "cuda"
    out = ops.attention(q, k, v)
    out_ref = ops.attention(q.double(), k.double(), v.double(), backend="reference")
    assert_close("ops.attention", out, out_ref.detach(), 1e-2)
    dout = rand(*q.shape, dtype=torch.bfloat16, generator=generator)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    grads_ref = torch.autograd.grad(out_ref, (q, k, v), dout.double())
    for name, g, r in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert_close(name, g, r.detach(), 1e-2)


# ------------------------------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors(generator):
    q = rand(1, 64, 2, 64, dtype=torch.bfloat16, generator=generator)
    with pytest.raises(ValueError, match="head_dim"):
        _C.attention_fwd(q[..., :32], q[..., :32], q[..., :32], True, 0.1)
    with pytest.raises(TypeError, match="bfloat16"):
        _C.attention_fwd(q.float(), q.float(), q.float(), True, 0.1)
    with pytest.raises(ValueError, match="contiguous last"):
        t = rand(1, 64, 64, 2, dtype=torch.bfloat16, generator=generator).transpose(2, 3)
        _C.attention_fwd(t, t, t, True, 0.1)
    with pytest.raises(ValueError, match="aligned"):
        flat = rand(1 * 64 * 2 * 64 + 1, dtype=torch.bfloat16, generator=generator)
        shifted = flat[1:].view(1, 64, 2, 64)
        _C.attention_fwd(shifted, shifted, shifted, True, 0.1)
    with pytest.raises(ValueError, match="multiple of k/v heads"):
        _C.attention_fwd(q, q[:, :, :1].expand(1, 64, 3, 64).contiguous(), q[:, :, :1].expand(1, 64, 3, 64).contiguous(),
                         True, 0.1)
    with pytest.raises(ValueError, match="scale"):
        _C.attention_fwd(q, q, q, True, 0.0)
    with pytest.raises(ValueError, match="media_index"):
        _C.media_cross_attention_fwd(q, q, q, torch.zeros(1, 63, dtype=torch.int32, device=DEVICE), 64, True, 0.1)


# ------------------------------------------------------------------------------------------------- perceiver KV input


def kv_input_reference(media, latents, time_emb, tokens_per_frame, mw, mb, lw, lb, eps):
    """float64: concat(LN(media + time_emb[row // tokens_per_frame]), LN(latents))."""
    x = media.double()
    if time_emb is not None:
        frames = torch.arange(media.shape[1], device=media.device) // tokens_per_frame
        x = x + time_emb.double()[frames]
    ln_media = torch.nn.functional.layer_norm(x, (x.shape[-1],), mw.double(), mb.double(), eps)
    ln_latents = torch.nn.functional.layer_norm(latents.double(), (x.shape[-1],), lw.double(), lb.double(), eps)
    return torch.cat([ln_media, ln_latents], dim=1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("dim", [64, 1536, 2048, 200])
@pytest.mark.parametrize("frames", [0, 1, 4])
@pytest.mark.parametrize("shared_latents", [False, True], ids=["own_latents", "expanded_latents"])
def test_perceiver_kv_input_matches_reference(dtype, dim, frames, shared_latents, generator):
    n, tokens, n_latents, eps = 6, 37, 64, 1e-5
    media_rows = tokens * max(frames, 1)
    media = rand(n, media_rows, dim, dtype=dtype, generator=generator)
    if shared_latents:
        latents = rand(1, n_latents, dim, dtype=dtype, generator=generator).expand(n, -1, -1)
    else:
        latents = rand(n, n_latents, dim, dtype=dtype, generator=generator)
    time_emb = rand(frames, dim, dtype=dtype, generator=generator) if frames else None
    params = [rand(dim, dtype=dtype, generator=generator) for _ in range(4)]
    args = (time_emb, tokens, *params, eps)

    inputs = [media, latents] + ([time_emb] if frames else []) + params
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    ref_args = (leaves[0], leaves[1], leaves[2] if frames else None, tokens, *leaves[-4:], eps)
    want = kv_input_reference(*ref_args)

    poison(((n, media_rows + n_latents, dim), dtype))
    kv = _C.perceiver_kv_input_fwd(media, latents, *args)
    tol = 1e-2 if dtype == torch.bfloat16 else 5e-3 if dtype == torch.float16 else 1e-5
    assert_close("kv", kv, want.detach(), tol)

    d_kv = rand(*kv.shape, dtype=dtype, generator=generator)
    want_grads = torch.autograd.grad(want, leaves, d_kv.double())
    grads = _C.perceiver_kv_input_bwd(d_kv, media, latents, *args)
    d_media, d_latents, d_mw, d_mb, d_lw, d_lb = grads
    want_media = want_grads[0]
    want_latents = want_grads[1]
    assert_close("d_media", d_media, want_media, tol)
    assert_close("d_latents", d_latents, want_latents, tol)  # per batch element, also for expanded latents
    if frames:
        d_time = d_media.double().view(n, frames, tokens, dim).sum((0, 2))
        assert_close("d_time_emb", d_time, want_grads[2], tol)
    for name, got, ref in zip(("d_media_weight", "d_media_bias", "d_latents_weight", "d_latents_bias"),
                              (d_mw, d_mb, d_lw, d_lb), want_grads[-4:]):
        assert_close(name, got, ref, tol)


def test_perceiver_kv_input_is_deterministic(generator):
    media = rand(32, 257, 1536, dtype=torch.bfloat16, generator=generator)
    latents = rand(32, 64, 1536, dtype=torch.bfloat16, generator=generator)
    params = [rand(1536, dtype=torch.bfloat16, generator=generator) for _ in range(4)]
    d_kv = rand(32, 257 + 64, 1536, dtype=torch.bfloat16, generator=generator)
    first = _C.perceiver_kv_input_bwd(d_kv, media, latents, None, 1, *params, 1e-5)
    second = _C.perceiver_kv_input_bwd(d_kv, media, latents, None, 1, *params, 1e-5)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
