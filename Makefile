# Two commands for a fresh machine:
#   make demo   install everything and render the embedded demo to demo/demo.mp4
#   make test   install everything and run the tests
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH_VERSION ?= 2.13.0
# Where torch comes from. Empty: pip's configured sources (here a local CPU wheel). Elsewhere, for the
# CPU build rather than PyPI's CUDA one: make test TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
TORCH_INDEX_URL ?=
DEMO_OUT ?= demo/demo.mp4
PYTEST_ARGS ?=

.PHONY: install demo test clean

install:
	# torch first, pinned, so that nothing below can swap it for a CUDA build (and never torchvision).
	$(PIP) install "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(PIP) install "setuptools>=68" wheel "pybind11>=2.12"
	$(PIP) install --no-build-isolation -e ".[dev]"

demo: install
	$(PYTHON) -m dreampose_rt.cli animate --out $(DEMO_OUT)

test: install
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf build dist *.egg-info dreampose_rt/_C*.so .pytest_cache demo
