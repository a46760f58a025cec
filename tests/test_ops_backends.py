"""Backend selection: explicit argument > FLAMINGO_FAST_BACKEND > automatic; clear errors otherwise."""

import types

import pytest
import torch

from flamingo_fast import ops
from flamingo_fast.ops import cuda_backend, reference, torch_backend


@pytest.fixture
def qkv():
    return torch.randn(1, 4, 2, 64), torch.randn(1, 6, 2, 64), torch.randn(1, 6, 2, 64)


@pytest.fixture
def spy(monkeypatch):
    """Records which backend module served each attention_fwd call."""
    calls = []
    for name, module in (("torch", torch_backend), ("reference", reference)):
        original = module.attention_fwd

        def wrapped(*args, _name=name, _original=original):
            calls.append(_name)
            return _original(*args)

        monkeypatch.setattr(module, "attention_fwd", wrapped)
    return calls


def test_constants_and_available_backends():
    assert ops.BACKENDS == ("cuda", "torch", "reference")
    available = ops.available_backends()
    assert {"torch", "reference"} <= set(available) <= set(ops.BACKENDS)
    if not torch.cuda.is_available():
        assert "cuda" not in available


def test_automatic_is_torch_without_cuda_kernels(monkeypatch, qkv, spy):
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    # CPU tensors are never the fused kernels' to serve, whatever was built: a None here is the bug itself.
    assert "not on a CUDA device" in ops.cuda_unsupported_reason("attention", *qkv)
    assert ops.resolve_backend("attention", *qkv) == "torch"
    ops.attention(*qkv)
    assert spy == ["torch"]


def test_env_var_selects_backend(monkeypatch, qkv, spy):
    monkeypatch.setenv(ops.ENV_VAR, "reference")
    assert ops.resolve_backend("attention", *qkv) == "reference"
    ops.attention(*qkv)
    assert spy == ["reference"]


def test_explicit_argument_beats_env_var(monkeypatch, qkv, spy):
    monkeypatch.setenv(ops.ENV_VAR, "reference")
    assert ops.resolve_backend("attention", *qkv, backend="torch") == "torch"
    ops.attention(*qkv, backend="torch")
    assert spy == ["torch"]


def test_unknown_backend_argument(qkv):
    with pytest.raises(ValueError, match=r"unknown attention backend 'triton'.*cuda, torch, reference"):
        ops.attention(*qkv, backend="triton")


def test_unknown_backend_in_env_var(monkeypatch, qkv):
    monkeypatch.setenv(ops.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=r"'fast'.*FLAMINGO_FAST_BACKEND.*cuda, torch, reference"):
        ops.perceiver_attention(*qkv[:2], qkv[1])


def test_unknown_op_name(qkv):
    with pytest.raises(ValueError, match="unknown op 'matmul'"):
        ops.resolve_backend("matmul", *qkv)


def test_cuda_requested_on_cpu_is_a_clear_error(qkv):
    media_index = torch.zeros(1, 4, dtype=torch.long)
    calls = [
        lambda: ops.attention(*qkv, backend="cuda"),
        lambda: ops.media_cross_attention(*qkv, media_index, latents_per_media=6, backend="cuda"),
        lambda: ops.perceiver_attention(*qkv[:2], qkv[1], backend="cuda"),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match="'cuda' backend is unavailable: .*(_C|CUDA device)"):
            call()


def test_cuda_requested_by_env_var_on_cpu(monkeypatch, qkv):
    monkeypatch.setenv(ops.ENV_VAR, "cuda")
    with pytest.raises(RuntimeError, match="'cuda' backend is unavailable"):
        ops.attention(*qkv)


def _fake_extension(*missing):
    """Stand-in for a built `_C` that has every entry point except `missing` (never called here)."""
    names = [f"{op}_{d}" for op in cuda_backend.OP_NAMES for d in ("fwd", "bwd")]
    return types.SimpleNamespace(**{n: object() for n in names if n not in missing})


def test_cuda_reason_when_extension_missing(monkeypatch, qkv):
    monkeypatch.setattr(cuda_backend, "_C", None)
    assert "flamingo_fast._C is not built" in cuda_backend.unsupported_reason("attention", *qkv)


def test_cuda_reason_when_kernels_missing(monkeypatch, qkv):
    monkeypatch.setattr(cuda_backend, "_C", _fake_extension("media_cross_attention_bwd"))
    assert cuda_backend.unsupported_reason("attention", *qkv) == "the inputs are on cpu, not on a CUDA device"
    reason = cuda_backend.unsupported_reason("media_cross_attention", *qkv)
    assert "built without CUDA kernels for media_cross_attention_bwd" in reason


def test_cuda_reason_for_dtype_head_dim_and_arch(monkeypatch):
    # Pretend the tensors sit on an sm_90 GPU to reach the dtype / head-dim checks.
    monkeypatch.setattr(cuda_backend, "_C", _fake_extension())
    monkeypatch.setattr(cuda_backend, "_device_capability", lambda index: (9, 0))
    monkeypatch.setattr(cuda_backend, "SUPPORTED_DTYPES", (torch.bfloat16,))  # e.g. built without fp16
    on_gpu = lambda shape, dtype: types.SimpleNamespace(  # noqa: E731
        device=torch.device("cuda", 0), dtype=dtype, shape=shape
    )
    assert cuda_backend.unsupported_reason("attention", on_gpu((1, 4, 2, 64), torch.bfloat16)) is None
    assert "not torch.float32" in cuda_backend.unsupported_reason("attention", on_gpu((1, 4, 2, 64), torch.float32))
    assert "not torch.float16" in cuda_backend.unsupported_reason("attention", on_gpu((1, 4, 2, 64), torch.float16))
    assert "head dims" in cuda_backend.unsupported_reason("attention", on_gpu((1, 4, 2, 80), torch.bfloat16))
    monkeypatch.setattr(cuda_backend, "_device_capability", lambda index: (8, 0))
    assert "sm_90" in cuda_backend.unsupported_reason("attention", on_gpu((1, 4, 2, 64), torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_automatic_choice_on_gpu():
    from flamingo_fast import native

    q = torch.randn(1, 8, 2, 64, device="cuda", dtype=torch.bfloat16)
    # Independent of the chooser: bf16, head dim 64 on Hopper with the kernels built is the fused kernels' case.
    built = native.load() is not None and hasattr(native.load(), "attention_fwd")
    expected = "cuda" if built and torch.cuda.get_device_capability() == (9, 0) else "torch"
    assert ops.resolve_backend("attention", q, q, q) == expected
    out = ops.attention(q, q, q)
    want = ops.attention(q, q, q, backend="reference")
    torch.testing.assert_close(out.float(), want.float(), atol=2e-2, rtol=2e-2)
