"""Backend selection for the attention ops.

Order of precedence: explicit ``backend=`` argument > environment variable ``FLAMINGO_FAST_BACKEND`` >
automatic ("cuda" when the fused kernels support these tensors, else "torch").
The chosen name travels into the custom op as a plain ``str`` argument, so under ``torch.compile`` the
choice is a constant of the graph: the environment variable is read when a graph is traced, and
changing it later needs ``torch._dynamo.reset()`` (or a fresh process) to affect compiled code.
"""

from __future__ import annotations

import os

import torch

from flamingo_fast.ops import cuda_backend

BACKENDS = ("cuda", "torch", "reference")
ENV_VAR = "FLAMINGO_FAST_BACKEND"
# document_attention, media_span_attention: the cuda backend declines them (no Hopper document mask, no image
# ranges yet), so they resolve to torch.
OP_NAMES = cuda_backend.OP_NAMES + ("document_attention", "media_span_attention")


def available_backends() -> tuple[str, ...]:
    """Backends usable on this machine for at least some inputs ("cuda" only with built kernels + a GPU)."""
    names = ("torch", "reference")
    if cuda_backend.build_problem() is None and torch.cuda.is_available():
        names = ("cuda",) + names
    return names


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r} (from {source}); valid backends: {', '.join(BACKENDS)}")
    return name


def resolve_backend(op_name: str, *tensors: torch.Tensor, backend: str | None = None) -> str:
    """Name of the backend that `op_name` would run on for these tensors (q, k, v[, media_index]).

    Raises ValueError for unknown names and RuntimeError (with the reason) when "cuda" is requested
    but cannot run these tensors.
    """
    if op_name not in OP_NAMES:
        raise ValueError(f"unknown op {op_name!r}; valid ops: {', '.join(OP_NAMES)}")
    if backend is not None:
        name = _check_name(backend, "the backend argument")
    else:
        env = os.environ.get(ENV_VAR)
        name = _check_name(env, f"${ENV_VAR}") if env else None
    if name is None:
        return "cuda" if cuda_backend.unsupported_reason(op_name, *tensors) is None else "torch"
    if name == "cuda":
        reason = cuda_backend.unsupported_reason(op_name, *tensors)
        if reason is not None:
            raise RuntimeError(f"flamingo_fast.ops.{op_name}: the 'cuda' backend is unavailable: {reason}")
    return name
