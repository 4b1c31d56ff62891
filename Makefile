# `make test`: the whole test suite, as CI runs it (.ci/run) and the README documents it --
#   1. the native build: CMake configure + build (the Triton kernels compiled ahead of time into
#      dreamfuse_kernels, the TensorRT plugins where TensorRT's headers are found, the AOTInductor runner),
#   2. ctest (host-side checks everywhere; GPU checks skip without CUDA),
#   3. the Python suite (python -m pytest -q).
# Run it in the environment that has dreamfuse installed (pip install -e ".[dev]"): the kernel library is required
# here (a configure that cannot build it fails instead of skipping it). Variables:
#   PYTHON (python), BUILD (build), JOBS (2), CMAKE_ARGS (e.g. -DTensorRT_ROOT=/opt/TensorRT), PYTEST_ARGS.
PYTHON ?= python
BUILD ?= build
JOBS ?= 2
CMAKE_ARGS ?=
PYTEST_ARGS ?=

.PHONY: test native native-test pytest

test: native-test pytest

native:
	cmake -S . -B $(BUILD) -DDREAMFUSE_PYTHON="$$(command -v $(PYTHON))" -DDREAMFUSE_REQUIRE_KERNELS=ON $(CMAKE_ARGS)
	cmake --build $(BUILD) -j$(JOBS)

native-test: native
	ctest --test-dir $(BUILD) --output-on-failure

pytest:
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)
