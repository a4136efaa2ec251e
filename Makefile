# Two commands for a fresh machine:
#   make demo   install everything and render the embedded demo to demo/demo.mp4
#   make test   install everything and run the tests
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH_VERSION ?= 2.13.0
DEMO_OUT ?= demo/demo.mp4
PYTEST_ARGS ?=

.PHONY: install demo test clean

install:
	# torch first, pinned, so that nothing below can swap it for a CUDA build (and never torchvision).
	$(PIP) install "torch==$(TORCH_VERSION)"
	$(PIP) install "setuptools>=68" wheel "pybind11>=2.12"
	$(PIP) install --no-build-isolation -e ".[dev]"

demo: install
	$(PYTHON) -m dreampose_rt.cli animate --out $(DEMO_OUT)

test: install
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf build dist *.egg-info dreampose_rt/_C*.so .pytest_cache demo
