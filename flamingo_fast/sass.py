"""Inspection of the compiled CUDA code inside flamingo_fast._C (no GPU needed).

Uses the `cuobjdump` that ships inside the `triton` package, so the checks work wherever torch does.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass

from flamingo_fast import native


@dataclass(frozen=True)
class KernelResources:
    name: str
    registers: int
    stack_bytes: int
    local_bytes: int
    shared_bytes: int


def cuobjdump_path() -> str | None:
    try:
        import triton
    except ImportError:
        triton = None
    if triton is not None:
        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.isfile(path):
            return path
    return shutil.which("cuobjdump")


def extension_path() -> str:
    module = native.load()
    if module is None:
        raise RuntimeError(f"flamingo_fast._C is not built: {native.import_error()}")
    return module.__file__


def _cuobjdump(*args: str) -> str:
    tool = cuobjdump_path()
    if tool is None:
        raise RuntimeError("cuobjdump not found (install triton, or put the CUDA toolkit's bin on PATH)")
    return subprocess.run([tool, *args, extension_path()], check=True, capture_output=True, text=True).stdout


def cubin_archs() -> list[str]:
    """Target architectures of the embedded cubins, e.g. ['sm_90a']."""
    return sorted(set(re.findall(r"\.(sm_\d+a?)\.cubin", _cuobjdump("-lelf"))))


def kernel_resources() -> list[KernelResources]:
    """Per-kernel registers, stack, local and shared memory from `cuobjdump -res-usage`."""
    kernels = []
    pattern = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
    for name, reg, stack, shared, local in pattern.findall(_cuobjdump("-res-usage")):
        kernels.append(KernelResources(name, int(reg), int(stack), int(local), int(shared)))
    return kernels


def kernel_sass() -> dict[str, str]:
    """SASS text of every kernel, keyed by mangled name."""
    sass: dict[str, list[str]] = {}
    current = None
    for line in _cuobjdump("-sass").splitlines():
        match = re.match(r"\s*Function : (\S+)", line)
        if match:
            current = match.group(1)
            sass[current] = []
        elif current is not None:
            sass[current].append(line)
    return {name: "\n".join(lines) for name, lines in sass.items()}
