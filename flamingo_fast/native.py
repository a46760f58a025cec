"""Access to the compiled extension flamingo_fast._C, which may be absent (e.g. a source checkout not yet built)."""

from __future__ import annotations

import importlib
from types import ModuleType

import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)

_module: ModuleType | None = None
_import_error: str | None = None
_loaded = False


def load() -> ModuleType | None:
    """The `_C` module, or None when it cannot be imported (see `import_error()`)."""
    global _module, _import_error, _loaded
    if not _loaded:
        try:
            _module = importlib.import_module("flamingo_fast._C")
        except ImportError as error:  # not built, or built against another torch
            _import_error = str(error)
        _loaded = True
    return _module


def import_error() -> str | None:
    load()
    return _import_error


def build_info() -> dict:
    """How `_C` was built: {'available', 'cuda', 'cuda_version', 'cuda_archs', 'functions'}."""
    module = load()
    if module is None:
        return {"available": False, "cuda": False, "cuda_version": None, "cuda_archs": "", "functions": [],
                "error": _import_error}
    info = dict(module.build_info())
    info["available"] = True
    info["functions"] = sorted(name for name in dir(module) if not name.startswith("_") and name != "build_info")
    return info
