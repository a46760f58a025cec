"""Document-masked causal attention (`attention(..., document_ids=...)`, packed rows): the torch backend
against the float64 reference, the per-document equivalence with unpacked calls, isolation between
documents, the skipped cross-document work, torch.compile, and bad inputs."""

import pytest
import torch

from flamingo_fast import ops
from flamingo_fast.ops import blockwise, cpu_flash, document_torch, torch_backend
from kernel_tolerance import assert_close

# Rows of a packed batch: documents of lengths 1 (a lone token), several mid-sized ones, one filling the row,
# and a row ending in a padding "document".
LENGTHS = [[1, 9, 20, 10], [40], [13, 13, 13, 1]]
S = 40


def _ids(lengths=LENGTHS, dtype=torch.long):
    return torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(row)]) for row in lengths]).to(dtype)


def _qkv(dtype, heads=4, kv_heads=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((len(LENGTHS), S, heads, d), (len(LENGTHS), S, kv_heads, d), (len(LENGTHS), S, kv_heads, d))
    return [torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype) for shape in shapes]


def _run(tensors, document_ids, backend, dout_seed=99):
    q, k, v = [t.detach().clone().requires_grad_() for t in tensors]
    out = ops.attention(q, k, v, document_ids=document_ids, backend=backend)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(dout_seed), dtype=torch.float64)
    out.backward(dout.to(out.dtype))
    return [out.detach(), q.grad, k.grad, v.grad]


@pytest.fixture(params=["cpu_flash", "blockwise"])
def dense_path(request, monkeypatch):
    """Each of the torch backend's two dense implementations under the document gather; checks it ran."""
    monkeypatch.setattr(torch_backend, "USE_CPU_FLASH", request.param == "cpu_flash")
    module = cpu_flash if request.param == "cpu_flash" else blockwise
    ran = []
    for fn in ("forward", "backward"):
        original = getattr(module, fn)
        monkeypatch.setattr(module, fn, lambda *a, _o=original, _f=fn, **k: (ran.append((_f, a[0].shape)), _o(*a, **k))[1])
    yield ran
    assert {f for f, _ in ran} == {"forward", "backward"}


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_torch_backend_matches_the_float64_reference(dense_path, dtype, tol, id_dtype):
    tensors = _qkv(dtype)
    ids = _ids(dtype=id_dtype)
    got = _run(tensors, ids, "torch")
    want = _run([t.double() for t in tensors], ids, "reference")
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.dtype == dtype
        assert_close(name, g, w, tol)


def test_each_document_equals_its_own_unpacked_attention():
    tensors = _qkv(torch.float64, heads=6, kv_heads=2)  # GQA, 3 query heads per KV head
    packed = _run(tensors, _ids(), "torch")
    for row, lengths in enumerate(LENGTHS):
        start = 0
        for n in lengths:
            piece = [t[row:row + 1, start:start + n] for t in tensors]
            q, k, v = [t.detach().clone().requires_grad_() for t in piece]
            out = ops.attention(q, k, v, causal=True, backend="reference")
            dout = torch.randn(packed[0].shape, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
            out.backward(dout[row:row + 1, start:start + n])
            for name, p, u in zip(("out", "dq", "dk", "dv"), packed, [out.detach(), q.grad, k.grad, v.grad]):
                torch.testing.assert_close(p[row:row + 1, start:start + n], u, atol=1e-12, rtol=1e-12,
                                           msg=lambda m: f"row {row} document at {start}: {name}: {m}")
            start += n


def test_a_document_never_sees_another():
    q, k, v = _qkv(torch.float64)
    ids = _ids()
    base = ops.attention(q, k, v, document_ids=ids, backend="torch")
    k2, v2 = k.clone(), v.clone()
    k2[0, 10:30] += 5.0  # row 0's third document (tokens 10..29)
    v2[0, 10:30] -= 3.0
    moved = ops.attention(q, k2, v2, document_ids=ids, backend="torch")
    assert torch.equal(moved[0, :10], base[0, :10]) and torch.equal(moved[0, 30:], base[0, 30:])
    assert not torch.allclose(moved[0, 10:30], base[0, 10:30])
    assert torch.equal(moved[1:], base[1:])


def test_the_dense_calls_hold_no_cross_document_pair(dense_path):
    """The work is one causal call per length class (half octave) over (documents, longest of the class):
    documents of lengths 1, 9, 20, 10 | 40 | 13, 13, 13, 1 become classes {1, 1}, {9, 10}, {13, 13, 13}, {20},
    {40}; a document never shares a row of a call with another, and a long one does not pad the short ones."""
    _run(_qkv(torch.float32), _ids(), "torch")
    forward = sorted(tuple(shape[:2]) for fn, shape in dense_path if fn == "forward")
    assert forward == [(1, 20), (1, 40), (2, 1), (2, 10), (3, 13)]


def test_plan_of_documents():
    plan = document_torch.document_plan(torch.tensor([[0, 0, 1], [5, 5, 5]]))
    assert plan.classes == [(0, 1, 1), (1, 1, 2), (3, 1, 3)]  # lengths 1, 2, 3: one class each
    assert plan.destination.tolist() == [1, 2, 0, 3, 4, 5] and plan.slots == 6
    x = torch.arange(6.0).view(2, 3)
    parts = plan.gather(x, fill=-1.0)
    assert [p.tolist() for p in parts] == [[[2.0]], [[0.0, 1.0]], [[3.0, 4.0, 5.0]]]
    assert torch.equal(plan.scatter(parts, x), x)


def test_compiles_without_graph_breaks():
    q, k, v = _qkv(torch.float32)
    ids = _ids()

    def fn(q, k, v, ids):
        return ops.attention(q, k, v, document_ids=ids).sum()

    explanation = torch._dynamo.explain(fn)(q, k, v, ids)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v, ids), fn(q, k, v, ids))


def test_automatic_backend_is_torch_and_cuda_says_why_not():
    q, k, v = _qkv(torch.bfloat16)
    assert ops.resolve_backend("document_attention", q, k, v) == "torch"
    assert "document mask" in ops.cuda_unsupported_reason("document_attention", q, k, v)
    with pytest.raises(RuntimeError, match="document mask"):
        ops.attention(q, k, v, document_ids=_ids(), backend="cuda")


@pytest.mark.parametrize("document_ids, causal, error, match", [
    (_ids().float(), True, TypeError, "document_ids must be int32 or int64"),
    (_ids()[:, :30], True, ValueError, r"document_ids must be \(B, S\)"),
    (_ids()[:2], True, ValueError, r"document_ids must be \(B, S\)"),
    (_ids(), False, ValueError, "causal=True only"),
    (_ids().flip(1), True, ValueError, "non-decreasing"),
    ([[0, 1]], True, TypeError, "must be a torch.Tensor"),
])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_bad_document_ids_are_named(document_ids, causal, error, match, backend):
    q, k, v = _qkv(torch.float32)
    with pytest.raises(error, match=match):
        ops.attention(q, k, v, causal=causal, document_ids=document_ids, backend=backend)


def test_document_ids_need_as_many_keys_as_queries():
    q, k, v = _qkv(torch.float32)
    with pytest.raises(ValueError, match="as many keys as queries"):
        ops.attention(q[:, :20], k, v, document_ids=_ids()[:, :20])
