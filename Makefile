# Developer entry points. `make test` is the README's (and CI's) test command; `make demo` is the main job.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
TORCH   ?= torch==2.14.1
CSRC    := $(shell find csrc -type f \( -name '*.cu' -o -name '*.cpp' -o -name '*.h' -o -name '*.cuh' -o -name '*.hpp' \))
export CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/include/cuda_runtime.h),/usr/local/cuda,)
# `make build`/`make test` compile the sm_90a kernels wherever the toolkit is (CI checks their SASS without a GPU);
# `make install`/`make demo` leave the choice to setup.py: kernels only when a GPU is visible (host-only is seconds).
KERNELS ?= $(if $(CUDA_HOME),1,0)

.PHONY: install build test test-gpu ctest demo bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Pinned torch first (the extension is built against it), then the build tools, then the project, built without
# isolation so it compiles against that torch (setup.py: host part only unless a GPU is visible). This is all that
# `make demo` needs.
$(VENV)/.runtime: $(PY) pyproject.toml
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q 'setuptools>=77' wheel pybind11 ninja nvidia-cutlass
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $@

# The test and parity extras on top (read from pyproject.toml's `dev` list, so the project is not rebuilt).
$(VENV)/.deps: $(VENV)/.runtime pyproject.toml
	$(PY) -m pip install -q $$($(PY) -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['dev']))")
	$(PY) -m pip install -q --no-deps open-flamingo==2.0.1  # parity tests only; it pins an old torch
	touch $@

# flamingo_fast._C with the CUDA kernels (KERNELS=1 where the toolkit is), rebuilt when any C++/CUDA source or
# the build script changes.
$(VENV)/.built: $(VENV)/.deps $(CSRC) setup.py
	FLAMINGO_FAST_CUDA=$(KERNELS) $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.deps
build: $(VENV)/.built

# Host-side C++ logic through CMake/CTest, also compiling the CUDA sources with ptxas reports.
ctest: build
	$(VENV)/bin/cmake -S . -B build/cmake -DPython3_EXECUTABLE=$(abspath $(PY)) -DFF_PTXAS_VERBOSE=ON >/dev/null
	$(VENV)/bin/cmake --build build/cmake -j 2 >build/cmake/build.log 2>&1 || (cat build/cmake/build.log; exit 1)
	cd build/cmake && ../../$(VENV)/bin/ctest --output-on-failure

test: ctest
	FLAMINGO_FAST_CUDA=$(KERNELS) $(PY) -m pytest tests -q

test-gpu: build
	$(PY) -m pytest tests -q -m gpu

demo: $(VENV)/.runtime
	$(VENV)/bin/flamingo-fast demo

bench: build
	$(VENV)/bin/flamingo-fast bench

clean:
	rm -rf build flamingo_fast/_C*.so *.egg-info
