"""What the build produced: `_C` imports, has CUDA code for sm_90a where the toolchain allows it, and no kernel
spills registers or uses local memory (checked from the compiled binary, no GPU needed)."""

import shutil

import pytest
import torch

from flamingo_fast import native, sass

built = native.load() is not None
pytestmark = pytest.mark.skipif(not built, reason=f"flamingo_fast._C is not built: {native.import_error()}")
cuda_toolchain = torch.version.cuda is not None and shutil.which("nvcc") is not None


def test_extension_reports_its_build():
    info = native.build_info()
    assert info["available"]
    assert "plan_media_tiles" in info["functions"]


@pytest.mark.skipif(not cuda_toolchain, reason="CPU-only torch or no nvcc: host-only build")
def test_cuda_part_is_compiled_for_hopper():
    info = native.build_info()
    assert info["cuda"], "torch has CUDA and nvcc exists, so _C must include the CUDA sources"
    assert "sm_90a" in sass.cubin_archs()


@pytest.mark.skipif(not cuda_toolchain, reason="no CUDA code in a host-only build")
def test_no_kernel_spills_or_uses_local_memory():
    kernels = sass.kernel_resources()
    assert any("plan_media_tiles_kernel" in k.name for k in kernels)
    offenders = [k for k in kernels if k.stack_bytes or k.local_bytes]
    assert not offenders, f"kernels with stack/local memory (register spills): {offenders}"


@pytest.mark.skipif(not cuda_toolchain, reason="no CUDA code in a host-only build")
def test_sass_is_readable_for_every_kernel():
    code = sass.kernel_sass()
    assert code and all(text.strip() for text in code.values())
    assert set(code) == {k.name for k in sass.kernel_resources()}
