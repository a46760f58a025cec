"""What the build produced: `_C` imports, has CUDA code for sm_90a when the kernels were asked for
(FLAMINGO_FAST_CUDA=1, as `make test` and CI set it), and no kernel spills registers or uses local memory
(checked from the compiled binary, no GPU needed)."""

import os
import shutil

import pytest
import torch

from flamingo_fast import native, sass

built = native.load() is not None
pytestmark = pytest.mark.skipif(not built, reason=f"flamingo_fast._C is not built: {native.import_error()}")
# A host-only build is the default without a GPU (setup.py); the kernel checks run on a kernel build, and a run
# that asked for the kernels fails if they are missing instead of skipping.
kernels_asked = os.environ.get("FLAMINGO_FAST_CUDA") == "1"
kernel_build = torch.version.cuda is not None and shutil.which("nvcc") is not None and (
    kernels_asked or native.build_info()["cuda"])


def test_extension_reports_its_build():
    info = native.build_info()
    assert info["available"]
    assert "plan_media_tiles" in info["functions"]


@pytest.mark.skipif(not kernel_build, reason="host-only build (CPU-only torch, no nvcc, or FLAMINGO_FAST_CUDA unset "
                    "without a GPU)")
def test_cuda_part_is_compiled_for_hopper():
    info = native.build_info()
    assert info["cuda"], "FLAMINGO_FAST_CUDA=1 with a CUDA torch and nvcc, so _C must include the CUDA sources"
    assert "sm_90a" in sass.cubin_archs()


@pytest.mark.skipif(not kernel_build, reason="no CUDA code in a host-only build")
def test_no_kernel_spills_or_uses_local_memory():
    kernels = sass.kernel_resources()
    assert any("plan_media_tiles_kernel" in k.name for k in kernels)
    offenders = [k for k in kernels if k.stack_bytes or k.local_bytes]
    assert not offenders, f"kernels with stack/local memory (register spills): {offenders}"


@pytest.mark.skipif(not kernel_build, reason="no CUDA code in a host-only build")
def test_sass_is_readable_for_every_kernel():
    code = sass.kernel_sass()
    assert code and all(text.strip() for text in code.values())
    assert set(code) == {k.name for k in sass.kernel_resources()}


# The Hopper attention engine: one kernel per (dtype, head_dim, mask) for each of these roles.
ATTENTION_KERNELS = ("attention_fwd_kernel", "attention_bwd_dq_kernel", "attention_bwd_dkdv_kernel")
KERNEL_ENTRY_POINTS = (
    "attention_fwd", "attention_bwd", "media_cross_attention_fwd", "media_cross_attention_bwd",
    "perceiver_attention_fwd", "perceiver_attention_bwd", "perceiver_kv_input_fwd", "perceiver_kv_input_bwd",
)


@pytest.fixture(scope="module")
def all_sass() -> dict[str, str]:
    return sass.kernel_sass()


@pytest.mark.skipif(not kernel_build, reason="no CUDA code in a host-only build")
def test_extension_exposes_the_kernel_entry_points():
    info = native.build_info()
    missing = [name for name in KERNEL_ENTRY_POINTS if name not in info["functions"]]
    assert not missing, f"_C lacks {missing}"
    assert "bfloat16" in info["attention_dtypes"]
    assert info["attention_head_dims"] == [64, 96, 128]


@pytest.mark.slow  # disassembling every kernel of _C takes ~45 s on the 2-core machine
@pytest.mark.skipif(not kernel_build, reason="no CUDA code in a host-only build")
def test_every_attention_kernel_uses_wgmma_tma_and_setmaxnreg(all_sass):
    dtypes = native.build_info()["attention_dtypes"]
    for role in ATTENTION_KERNELS:
        names = [name for name in all_sass if role in name]
        # 3 head dims x 3 mask policies per compiled dtype.
        assert len(names) == 9 * len(dtypes), f"{role}: {len(names)} instantiations, expected {9 * len(dtypes)}"
        for name in names:
            code = all_sass[name]
            assert "HGMMA" in code, f"{name}: no wgmma (HGMMA) in its SASS"
            assert "UTMALDG" in code, f"{name}: no TMA load (UTMALDG) in its SASS"
            assert "USETMAXREG" in code, f"{name}: no setmaxnreg (warp-specialised register split) in its SASS"
            assert "LDL" not in code and "STL" not in code, f"{name}: local-memory traffic in its SASS"
