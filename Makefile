# `make test`: the whole test suite, as CI runs it (.ci/run) and the README documents it --
#   1. the native build: CMake configure + build (the Triton kernels compiled ahead of time into
#      dreamfuse_kernels, the TensorRT plugins where TensorRT's headers are found, the AOTInductor runner),
#   2. ctest (host-side checks everywhere; GPU checks skip without CUDA),
#   3. the Python suite (python -m pytest -q).
# Run it in the environment that has dreamfuse installed (pip install -c constraints.txt -e ".[dev]"): the kernel
# library is required here (a configure that cannot build it fails instead of skipping it).
#
# `make test-latest`: the same suite in a fresh venv ($(LATEST_VENV)) holding the newest releases of every
# dependency (no constraints; torch stays $(TORCH), the build the README installs): how drift is found before a
# user finds it. `make lock`: test-latest, then constraints.txt rewritten from that venv (python -m tools.lock;
# review the diff and commit it).
#
# Variables: PYTHON (python), BUILD (build), JOBS (2), CMAKE_ARGS (e.g. -DTensorRT_ROOT=/opt/TensorRT),
# PYTEST_ARGS, and for test-latest/lock: LATEST_VENV (.venv-latest), TORCH (torch==2.13.0), EXTRAS (dev,serve,ray).
PYTHON ?= python
BUILD ?= build
JOBS ?= 2
CMAKE_ARGS ?=
PYTEST_ARGS ?=
LATEST_VENV ?= .venv-latest
TORCH ?= torch==2.13.0
EXTRAS ?= dev,serve,ray
LATEST_PY = $(abspath $(LATEST_VENV))/bin/python

.PHONY: test native native-test pytest test-latest lock

test: native-test pytest

native:
	cmake -S . -B $(BUILD) -DDREAMFUSE_PYTHON="$$(command -v $(PYTHON))" -DDREAMFUSE_REQUIRE_KERNELS=ON $(CMAKE_ARGS)
	cmake --build $(BUILD) -j$(JOBS)

native-test: native
	ctest --test-dir $(BUILD) --output-on-failure

pytest:
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

test-latest:
	rm -rf $(LATEST_VENV)
	python3 -m venv $(LATEST_VENV)
	$(LATEST_PY) -m pip install -q --upgrade pip
	$(LATEST_PY) -m pip install -q "$(TORCH)"
	$(LATEST_PY) -m pip install -q -e ".[$(EXTRAS)]" tensorrt-rtx-cu13
	$(LATEST_PY) -c "from importlib.metadata import version as v; print('newest:', ', '.join(f'{p} {v(p)}' for p in ('torch', 'triton', 'diffusers', 'transformers', 'kernels', 'huggingface-hub', 'peft', 'numpy', 'onnx', 'onnxruntime', 'fastapi', 'ray', 'tensorrt-rtx-cu13')))"
	$(MAKE) test PYTHON=$(LATEST_PY) BUILD=$(BUILD)-latest PYTEST_ARGS="$(PYTEST_ARGS) --junitxml=$(abspath $(LATEST_VENV))/junit.xml"

lock: test-latest
	$(LATEST_PY) -m tools.lock --python $(LATEST_PY) --junit $(LATEST_VENV)/junit.xml --out constraints.txt
