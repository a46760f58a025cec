"""Builds flamingo_fast._C (pybind11, via torch.utils.cpp_extension + ninja).

Which parts are compiled (FLAMINGO_FAST_CUDA):
  1      the CUDA kernels too, for sm_90a (Hopper: wgmma, TMA, setmaxnreg), also on a machine without a GPU
         (what `make test`, CI and bench/device_check.sh ask for: the kernels compile and their SASS is checked);
         an error if torch has no CUDA or nvcc is missing
  0      the host part only (seconds); every op then runs on the `torch` backend
  unset  the kernels when a CUDA GPU is visible or TORCH_CUDA_ARCH_LIST is set, else the host part only: the
         ~20 minutes of sm_90a kernels on 2 cores buy nothing on a machine that cannot run them
TORCH_CUDA_ARCH_LIST overrides the target architecture. FLAMINGO_FAST_NO_CUDA=1 is the old spelling of
FLAMINGO_FAST_CUDA=0.
FLAMINGO_FAST_ATTENTION_FP16=1 also builds the fp16 attention kernels (bf16 only by default).
The source list is a glob shared in spirit with CMakeLists.txt: both compile every file under csrc/ except
csrc/tests/, so no list is written twice.
"""

import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
HOPPER_GENCODE = "-gencode=arch=compute_90a,code=sm_90a"


def _sources(pattern: str) -> list[str]:
    paths = glob.glob(os.path.join("csrc", "**", pattern), recursive=True)
    return sorted(p for p in paths if not p.startswith(os.path.join("csrc", "tests")))


def _cutlass_include() -> str:
    """CUTLASS/CuTe headers ship inside the nvidia-cutlass wheel (package cutlass_library)."""
    import cutlass_library

    path = os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")
    if not os.path.isfile(os.path.join(path, "cute", "tensor.hpp")):
        raise RuntimeError(f"nvidia-cutlass is installed but its headers are missing under {path}")
    return path


def _locate_cuda_home() -> None:
    """Point torch at a toolkit that has headers: `nvcc` on PATH may be a wrapper outside the toolkit."""
    import shutil

    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = home
            return


def _want_cuda() -> bool:
    """Whether to compile the CUDA kernels (module docstring); prints a note when it skips them unasked."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    choice = os.environ.get("FLAMINGO_FAST_CUDA", "").strip()
    if os.environ.get("FLAMINGO_FAST_NO_CUDA", "0") == "1":
        choice = "0"
    if choice not in ("", "0", "1"):
        raise RuntimeError(f"FLAMINGO_FAST_CUDA must be 1 (build the CUDA kernels), 0 (host only) or unset, got {choice!r}")
    toolchain = torch.version.cuda is not None and CUDA_HOME is not None
    if choice == "1":
        if not toolchain:
            raise RuntimeError("FLAMINGO_FAST_CUDA=1 needs a CUDA build of torch and the CUDA toolkit (nvcc, headers); "
                               f"found torch CUDA {torch.version.cuda}, CUDA_HOME {CUDA_HOME}")
        return True
    if choice == "0" or not toolchain:
        return False
    if os.environ.get("TORCH_CUDA_ARCH_LIST") or torch.cuda.is_available():
        return True
    print("flamingo-fast: no CUDA GPU visible, building the host part only (set FLAMINGO_FAST_CUDA=1 to compile the "
          "sm_90a kernels anyway)")
    return False


def _ext_modules():
    _locate_cuda_home()  # before torch.utils.cpp_extension reads CUDA_HOME at import
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    cxx_flags = ["-O3", "-std=c++20", "-DNDEBUG"]
    if not _want_cuda():
        return [CppExtension("flamingo_fast._C", _sources("*.cpp"), include_dirs=include_dirs,
                             extra_compile_args={"cxx": cxx_flags})]

    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
    # An explicit -gencode stops torch from adding its own arch list (see _get_cuda_arch_flags).
    arch_flags = [] if arch_list else [HOPPER_GENCODE]
    archs = arch_list or "9.0a"
    nvcc_flags = [
        "-O3", "-std=c++20", "-DNDEBUG", "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math",
        "-lineinfo",
        # Spills or local-memory use are build errors, not silent slowdowns.
        "-Xptxas=-warn-spills,-warn-lmem-usage,-Werror",
        *arch_flags,
    ]
    defines = ["-DFLAMINGO_FAST_WITH_CUDA", f'-DFLAMINGO_FAST_CUDA_ARCHS="{archs}"']
    if os.environ.get("FLAMINGO_FAST_ATTENTION_FP16", "0") == "1":
        # fp16 attention kernels double the build time, so they are opt-in (bf16 is always built).
        defines.append("-DFLAMINGO_FAST_ATTENTION_FP16")
    return [CUDAExtension(
        "flamingo_fast._C",
        _sources("*.cpp") + _sources("*.cu"),
        include_dirs=include_dirs + [_cutlass_include()],
        extra_compile_args={"cxx": cxx_flags + defines, "nvcc": nvcc_flags + defines},
    )]


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


setup(ext_modules=_ext_modules(), cmdclass={"build_ext": _build_ext()})
