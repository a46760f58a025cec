"""Maps a backend name to the module that implements the ops' forward and backward functions."""

from __future__ import annotations

from flamingo_fast.ops import cuda_backend, reference, torch_backend

_MODULES = {"cuda": cuda_backend, "torch": torch_backend, "reference": reference}


def implementation(backend: str, function: str):
    """e.g. implementation("torch", "attention_fwd") -> torch_backend.attention_fwd."""
    try:
        module = _MODULES[backend]
    except KeyError:
        raise ValueError(f"unknown attention backend {backend!r}; valid backends: {', '.join(_MODULES)}") from None
    return getattr(module, function)
