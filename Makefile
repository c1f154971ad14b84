# Two entry points for a fresh machine (no GPU needed):
#   make demo   install, generate the synthetic dataset, train the toy RetinaNet, evaluate it
#   make test   install, run the test suite
# Both create or reuse .venv; a second run reuses everything already installed.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch first (the CPU wheel), then mmcv 2.1.0 built from source with its CPU ops against it,
# then this package with MABN's compiled CPU step (setup.py; torch needed at build time).
TORCH_SPEC ?= torch==2.13.0
SETUPTOOLS_SPEC := setuptools>=77,<81
MMCV_SPEC := mmcv==2.1.0
STAMP := $(VENV)/.bnplug-installed

DEMO_CONFIG ?= configs/toy/retinanet_r18_fpn_bn_toy.py
DEMO_WORK_DIR ?= work_dirs/demo
SYNTHETIC_DIR := data/synthetic

.PHONY: install demo test data clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py mmdet_bnplug/ops/csrc/mabn_cpu.cpp Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install '$(TORCH_SPEC)' '$(SETUPTOOLS_SPEC)' wheel ninja numpy
	$(PY) -c "import mmcv.ops" 2>/dev/null || \
		MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS=$$(nproc) \
		$(PIP) install --no-build-isolation '$(MMCV_SPEC)'
	$(PIP) install --no-build-isolation -e '.[dev]'
	$(PY) -c "import mmcv.ops, mmdet, mmdet_bnplug.ops.mabn as m; print('installed: mmcv', mmcv.__version__, '(with ops), mmdet', mmdet.__version__, '; MABN compiled CPU kernels (mmdet_bnplug.ops._mabn_cpu):', m.cpu_kernels is not None); assert m.cpu_kernels is not None, 'MABN CPU kernels not built'"
	touch $(STAMP)

# regenerated when the generator changes
$(SYNTHETIC_DIR)/annotations/val.json: mmdet_bnplug/testing/synthetic.py tools/make_synthetic.py | $(STAMP)
	$(PY) tools/make_synthetic.py $(SYNTHETIC_DIR)

data: $(SYNTHETIC_DIR)/annotations/val.json

demo: data
	$(PY) tools/train.py $(DEMO_CONFIG) --work-dir $(DEMO_WORK_DIR)
	$(PY) tools/test.py $(DEMO_CONFIG) $$(cat $(DEMO_WORK_DIR)/last_checkpoint) --work-dir $(DEMO_WORK_DIR)

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV) work_dirs
