"""MediaSpans (image ranges per token, ragged keys per image) and media_span_attention: the descriptor against
transformers' Mllama mask, the torch backend against the float64 reference, Flamingo's media_index as a special
case, registration (opcheck, torch.compile) and bad inputs."""

import random
import re

import pytest
import torch

from flamingo_fast import ops
from flamingo_fast.ops import ImageGroupState, MediaSpans, continue_image_groups, media_span_torch, torch_backend
from flamingo_fast.ops.media_spans import dense_mask

OPS = torch.ops.flamingo_fast
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2}
TOKENS_PER_TILE, MAX_TILES = 3, 4
KEYS_PER_MEDIA = TOKENS_PER_TILE * MAX_TILES


pytestmark = pytest.mark.usefixtures("one_thread")


def _randn(*shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _mllama_inputs(seq: int, images: list[list[int]], tiles: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(image_token_mask, key_count) of rows with `<|image|>` tokens at `images[b]` whose images have
    `tiles[b]` valid tiles (of MAX_TILES)."""
    num_media = max(1, max(len(row) for row in images))
    mask = torch.zeros(len(images), seq, dtype=torch.bool)
    count = torch.zeros(len(images), num_media, dtype=torch.long)
    for b, (places, row_tiles) in enumerate(zip(images, tiles)):
        mask[b, places] = True
        count[b, : len(row_tiles)] = torch.tensor(row_tiles, dtype=torch.long) * TOKENS_PER_TILE
    return mask, count


def _mllama_spans(seq: int, images: list[list[int]], tiles: list[list[int]]) -> MediaSpans:
    return MediaSpans.from_image_groups(*_mllama_inputs(seq, images, tiles), KEYS_PER_MEDIA)


# Text before the first image, a group of two images then a later one (ragged tiles); a row without images; a
# group whose first image has no keys; an image without keys (its tokens see nothing); a lone image at the end.
ROWS = ([3, 4, 20], [], [0, 1], [10], [39])
TILES = ([4, 1, 2], [], [0, 3], [0], [2])


@pytest.fixture
def batch():
    """The ROWS batch (B=5, S=40, Hq=4, Hkv=2, d=16, three images of 4 x 3 keys per row) in float64."""
    spans = _mllama_spans(40, list(ROWS), list(TILES))
    q = _randn(5, 40, 4, 16, seed=1)
    k, v = _randn(5, 3 * KEYS_PER_MEDIA, 2, 16, seed=2), _randn(5, 3 * KEYS_PER_MEDIA, 2, 16, seed=3)
    return q, k, v, spans


def _run(q, k, v, spans, backend, dtype, fn=ops.media_span_attention):
    """out, dq, dk, dv in `dtype`; the float64 reference gets the inputs rounded to `dtype` first."""
    run_dtype = torch.float64 if backend == "reference" else dtype
    q, k, v = (x.detach().to(dtype).to(run_dtype).requires_grad_() for x in (q, k, v))
    out = fn(q, k, v, spans, backend=backend)
    out.backward(_randn(*out.shape, dtype=dtype, seed=9).to(run_dtype))
    return [out.detach(), q.grad, k.grad, v.grad]


@pytest.fixture(params=["cpu_flash", "blockwise"])
def dense_path(request, monkeypatch):
    monkeypatch.setattr(torch_backend, "USE_CPU_FLASH", request.param == "cpu_flash")
    return request.param


# -- the descriptor -------------------------------------------------------------------------------------------------
def test_image_groups_by_hand():
    spans = _mllama_spans(8, [[1, 2, 5]], [[1, 1, 1]])
    #                                     text img img text text img text text
    assert spans.start.tolist() == [[0, 0, 0, 0, 0, 2, 2, 2]]
    assert spans.end.tolist() == [[0, 1, 2, 2, 2, 3, 3, 3]]
    assert spans.key_offset.tolist() == [[0, 12, 24]] and spans.key_count.tolist() == [[3, 3, 3]]
    mask = dense_mask(spans, 36)[0]
    assert mask[5].nonzero().squeeze(1).tolist() == [24, 25, 26]  # image 2's 3 valid keys, not its padding tiles
    assert mask[3].nonzero().squeeze(1).tolist() == [0, 1, 2, 12, 13, 14]
    assert not mask[0].any()


def _transformers_mask(rows: list[list[int]], tiles: list[list[int]], seq: int) -> torch.Tensor:
    """transformers' Mllama processor mask, expanded to keys as `_prepare_cross_attention_mask` does."""
    processing = pytest.importorskip("transformers.models.mllama.processing_mllama")
    sparse = [processing.get_cross_attention_token_mask([int(t) for t in row], 1) for row in rows]
    dense = processing.convert_sparse_cross_attention_mask_to_dense(sparse, tiles, MAX_TILES, seq)
    dense = torch.from_numpy(dense).bool().repeat_interleave(TOKENS_PER_TILE, dim=3)
    return dense.flatten(2)  # (B, S, T * KEYS_PER_MEDIA)


def test_from_image_groups_equals_transformers_mask():
    rng = random.Random(0)
    examples = [([[0] * 5 + [1] + [0] * 4], None), ([[1, 1, 0, 0, 1, 0, 1, 1]], None), ([[0, 0, 0]], None),
                ([[1, 0, 0], [0, 0, 0], [0, 1, 1]], None), ([[0, 0, 1, 1]], None)]
    for _ in range(200):
        seq, batch = rng.randint(1, 24), rng.randint(1, 4)
        p = rng.choice([0.1, 0.3, 0.6])
        examples.append(([[int(rng.random() < p) for _ in range(seq)] for _ in range(batch)], None))
    for tokens, _ in examples:
        seq = len(tokens[0])
        places = [[i for i, t in enumerate(row) if t] for row in tokens]
        tiles = [[rng.randint(0, MAX_TILES) for _ in row] for row in places]
        want = _transformers_mask(tokens, tiles, seq)
        spans = _mllama_spans(seq, places, tiles)
        got = dense_mask(spans, spans.num_media * KEYS_PER_MEDIA)[:, :, : want.shape[2]]
        assert torch.equal(got, want), (tokens, tiles)


def test_continuing_groups_token_by_token_matches_the_whole_sequence():
    rng = random.Random(1)
    mask = torch.tensor([[rng.random() < 0.35 for _ in range(30)] for _ in range(6)])
    mask[0, :3] = True  # a group right at the start
    start, end, _ = continue_image_groups(mask, ImageGroupState.initial(mask))
    for cuts in ([10, 11, 25], list(range(1, 30)), [0, 0, 15]):
        state, pieces = ImageGroupState.initial(mask), []
        for lo, hi in zip([0] + cuts, cuts + [30]):
            s, e, state = continue_image_groups(mask[:, lo:hi], state)
            pieces.append((s, e))
        assert torch.equal(torch.cat([s for s, _ in pieces], 1), start)
        assert torch.equal(torch.cat([e for _, e in pieces], 1), end)
    assert state.seen.tolist() == mask.sum(1).tolist()


def test_from_media_index_is_flamingos_rule():
    media_index = torch.tensor([[-1, -1, 0, 0, 1, 2, 2]])
    immediate = MediaSpans.from_media_index(media_index, 3, 4)
    assert immediate.start.tolist() == [[0, 0, 0, 0, 1, 2, 2]] and immediate.end.tolist() == [[0, 0, 1, 1, 2, 3, 3]]
    previous = MediaSpans.from_media_index(media_index, 3, 4, only_immediate=False)
    assert previous.start.tolist() == [[0] * 7] and previous.end.tolist() == immediate.end.tolist()
    assert immediate.key_offset.tolist() == [[0, 4, 8]] and immediate.key_count.tolist() == [[4, 4, 4]]


def test_spans_are_a_pytree():
    spans = _mllama_spans(8, [[1, 2, 5]], [[1, 1, 1]])
    leaves, spec = torch.utils._pytree.tree_flatten(spans)
    assert len(leaves) == 4 and all(isinstance(t, torch.Tensor) for t in leaves)
    assert torch.utils._pytree.tree_unflatten(leaves, spec) == spans


# -- the torch backend against the reference --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_torch_backend_matches_reference(batch, dtype, dense_path):
    q, k, v, spans = batch
    got = _run(q, k, v, spans, "torch", dtype)
    want = _run(q, k, v, spans, "reference", dtype)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.dtype == dtype and torch.isfinite(g).all(), name
        err = (g.double() - w).abs().max() / w.abs().max()
        assert err <= TOL[dtype], f"{name}: relative error {err:.3g} > {TOL[dtype]}"
    out, dq, dk, dv = got
    mask = dense_mask(spans, k.shape[1])
    sees_nothing, unused_key = ~mask.any(2), ~mask.any(1)  # (B, S), (B, Sk)
    assert sees_nothing[1].all() and sees_nothing[3].all() and sees_nothing[0, :3].all() and unused_key.any()
    assert (out[sees_nothing] == 0).all() and (dq[sees_nothing] == 0).all()
    assert (dk[unused_key] == 0).all() and (dv[unused_key] == 0).all()
    assert (out[~sees_nothing].abs().amax(-1) > 0).all()


@pytest.mark.parametrize("budget", [1, media_span_torch.GATHER_BUDGET])
def test_unsorted_spans_in_padded_batches_or_one_run_each(monkeypatch, dense_path, budget):
    """Spans that are neither monotone nor Mllama-shaped: runs of one key count and length class padded into
    one batch (default budget), or one run per batch (budget 1)."""
    monkeypatch.setattr(media_span_torch, "GATHER_BUDGET", budget)
    g = torch.Generator().manual_seed(5)
    lengths = torch.tensor([3, 4, 2, 5, 3, 4, 4, 3, 1, 4])  # runs of 33 tokens
    start = torch.randint(0, 4, (2, 10), generator=g)
    end = torch.clamp(start + torch.randint(0, 3, (2, 10), generator=g), max=4)
    start, end = start.repeat_interleave(lengths, dim=1), end.repeat_interleave(lengths, dim=1)
    offset = torch.tensor([[30, 0, 9, 20], [0, 5, 10, 15]])  # row 0's images stored out of order, with gaps
    spans = MediaSpans(start, end, offset, torch.tensor([[5, 9, 0, 7], [5, 5, 5, 1]]))
    q, k, v = _randn(2, 33, 6, 8, seed=6), _randn(2, 36, 3, 8, seed=7), _randn(2, 36, 3, 8, seed=8)
    plan = media_span_torch.plan_spans(*spans.tensors(), 36, budget)
    assert any((~part.valid).any() for part in plan) == (budget > 1)  # padding slots, exercised or not
    want = _run(q, k, v, spans, "reference", torch.float64)
    for got, want in zip(_run(q, k, v, spans, "torch", torch.float64), want):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("only_immediate", [True, False])
def test_media_index_as_spans_gives_media_cross_attention(only_immediate):
    media_index = torch.tensor([[-1, 0, 0, 0, 1, 1, 2, 2, 2], [0, 0, 1, 1, 1, 1, 1, 2, 2], [-1] * 9])
    q, k, v = _randn(3, 9, 4, 16, seed=1), _randn(3, 15, 2, 16, seed=2), _randn(3, 15, 2, 16, seed=3)
    spans = MediaSpans.from_media_index(media_index, 3, 5, only_immediate)
    index_call = lambda q, k, v, spans, backend: ops.media_cross_attention(  # noqa: E731
        q, k, v, media_index, 5, only_immediate, backend=backend)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        for backend in ("torch", "reference"):
            want = _run(q, k, v, media_index, backend, dtype, fn=index_call)
            got = _run(q, k, v, spans, backend, dtype, fn=ops.media_cross_attention)  # spans in media_index's place
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, atol=tol, rtol=tol)


def test_no_image_anywhere_and_empty_sequence():
    spans = _mllama_spans(6, [[], []], [[], []])
    q, k, v = _randn(2, 6, 2, 8, seed=1), _randn(2, 12, 1, 8, seed=2), _randn(2, 12, 1, 8, seed=3)
    out, dq, dk, dv = _run(q, k, v, spans, "torch", torch.float32)
    assert not out.any() and not dq.any() and not dk.any() and not dv.any()
    empty = _mllama_spans(0, [[]], [[]])
    assert ops.media_span_attention(q[:1, :0], k[:1], v[:1], empty).shape == (1, 0, 2, 8)


# -- registration and backend choice -----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_opcheck(batch, backend):
    q, k, v, spans = batch
    args = (*spans.tensors(), 0.25, backend)
    torch.library.opcheck(OPS.media_span_attention_fwd.default, (q.requires_grad_(), k.requires_grad_(),
                                                                 v.requires_grad_(), *args))
    out, lse = OPS.media_span_attention_fwd(q, k, v, *args)
    dout = _randn(*out.shape, seed=4)
    detached = [t.detach() for t in (q, k, v, out, lse)]
    torch.library.opcheck(OPS.media_span_attention_bwd.default, (dout, *detached, *args))


def test_compile_fullgraph_forward_and_backward():
    def step(q, k, v, image_token_mask, key_count):
        spans = MediaSpans.from_image_groups(image_token_mask, key_count, KEYS_PER_MEDIA)
        return ops.media_span_attention(q, k, v, spans).square().sum()

    torch._dynamo.reset()
    mask, count = _mllama_inputs(40, list(ROWS), list(TILES))
    q, k, v = _randn(5, 40, 4, 16, seed=1), _randn(5, 36, 2, 16, seed=2), _randn(5, 36, 2, 16, seed=3)
    results = []
    for fn in (torch.compile(step, fullgraph=True, backend="aot_eager"), step):  # fullgraph raises on a break
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        loss = fn(*leaves, mask, count)
        results.append([loss.detach(), *torch.autograd.grad(loss, leaves)])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


def test_backend_choice_is_torch_and_cuda_says_why(batch, monkeypatch):
    q, k, v, spans = batch
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    assert ops.resolve_backend("media_span_attention", q, k, v) == "torch"
    assert "image ranges and ragged key counts" in ops.cuda_unsupported_reason("media_span_attention", q, k, v)
    with pytest.raises(RuntimeError, match="'cuda' backend is unavailable: the Hopper media kernel takes one image"):
        ops.media_span_attention(q, k, v, spans, backend="cuda")


# -- bad inputs --------------------------------------------------------------------------------------------------------
def _edited(spans: MediaSpans, **fields) -> MediaSpans:
    return MediaSpans(**{**spans.__dict__, **fields})


def _overlapping(s: MediaSpans) -> MediaSpans:  # row 0: image 0's last key is image 1's first
    return _edited(s, key_offset=s.key_offset - (s.key_offset > 0).long())


# name -> (edit of the valid ROWS spans, error, words of the message)
BAD_SPANS = {
    "not spans": (lambda s: s.tensors(), TypeError, "spans must be a flamingo_fast.ops.MediaSpans"),
    "start shape": (lambda s: _edited(s, start=s.start[:, :-1]), ValueError, "spans.start must have shape (5, 40)"),
    "end dtype": (lambda s: _edited(s, end=s.end.float()), TypeError, "spans.end has dtype torch.float32"),
    "end device": (lambda s: _edited(s, end=s.end.to("meta")), ValueError, "spans.end is on meta"),
    "count rank": (lambda s: _edited(s, key_count=s.key_count[0]), ValueError, "spans.key_count must be a (batch, "),
    "count list": (lambda s: _edited(s, key_count=[1]), TypeError, "spans.key_count must be a torch.Tensor, got list"),
    "offset shape": (lambda s: _edited(s, key_offset=s.key_offset[:, :2]), ValueError,
                     "spans.key_offset must have shape (5, 3)"),
    "negative start": (lambda s: _edited(s, start=s.start - 1), ValueError, "spans.start must be >= 0"),
    "end before start": (lambda s: _edited(s, end=s.start - 1), ValueError, "spans.end must be >= spans.start"),
    "end past the images": (lambda s: _edited(s, end=s.end + 1), ValueError, "spans.end reaches image 4"),
    "negative count": (lambda s: _edited(s, key_count=s.key_count - 20), ValueError,
                       "spans.key_count and spans.key_offset must be >= 0"),
    "keys past k": (lambda s: _edited(s, key_offset=s.key_offset + 30), ValueError,
                    "spans.key_offset + spans.key_count reaches key 60 but k/v hold 36 keys"),
    "overlap": (_overlapping, ValueError, "the key ranges of two images of one row overlap"),
}


@pytest.mark.parametrize("name", list(BAD_SPANS))
def test_bad_spans_name_the_argument(batch, name):
    q, k, v, spans = batch
    edit, error, words = BAD_SPANS[name]
    with pytest.raises(error, match=re.escape(f"media_span_attention: {words}")):
        ops.media_span_attention(q, k, v, edit(spans))


def test_bad_scale_and_heads(batch):
    q, k, v, spans = batch
    with pytest.raises(TypeError, match="media_span_attention: scale must be a float"):
        ops.media_span_attention(q, k, v, spans, scale="1")
    with pytest.raises(ValueError, match="media_span_attention: q heads"):
        ops.media_span_attention(q[:, :, :3], k, v, spans)
