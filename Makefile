# Two entry points for a fresh machine (no GPU needed):
#   make demo   install, generate the synthetic dataset, train the toy RetinaNet and evaluate it
#   make test   install (and the mmpretrain tests' own environment), run the test suite
# Both create or reuse .venv; a second run reuses everything already installed.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch first (TORCH_SPEC: from PyPI the CUDA build on Linux x86_64; a torch 2.13.0 already
# in the venv, e.g. the CPU build, is kept), then mmcv 2.1.0 built from source with its CPU
# ops against it, then this package with the compiled CPU kernels of MABN and PortableSyncBN
# (setup.py; torch needed at build time).
TORCH_SPEC ?= torch==2.13.0
SETUPTOOLS_SPEC := setuptools>=77,<81
MMCV_SPEC := mmcv==2.1.0
STAMP := $(VENV)/.bnplug-installed

# the mmpretrain tests' own environment: mmpretrain imports torchvision, whose PyPI build
# does not load beside the CPU build of torch 2.13; torch 2.14.1 + torchvision 0.29.1 (a CUDA
# build, run on the CPU), mmcv without ops, and a copy of this package installed from the
# working tree
PRETRAIN_VENV ?= .venv-mmpretrain
PRETRAIN_PY := $(PRETRAIN_VENV)/bin/python
PRETRAIN_SPECS := 'torch==2.14.1' 'torchvision==0.29.1' 'mmcv-lite==2.1.0' 'mmengine==0.10.7' \
	'mmpretrain==1.2.0'
PRETRAIN_SRC := $(PRETRAIN_VENV)/src/mmdet-bnplug
PRETRAIN_STAMP := $(PRETRAIN_VENV)/.bnplug-installed
PACKAGE_FILES := $(shell find mmdet_bnplug -name '*.py' -o -name '*.cpp' -o -name '*.h')

DEMO_CONFIG ?= configs/toy/retinanet_r18_fpn_bn_toy.py
# the config's default work dir, where the EvalBN fine-tune's load_from looks
DEMO_WORK_DIR ?= work_dirs/retinanet_r18_fpn_bn_toy
SYNTHETIC_DIR := data/synthetic

.PHONY: install demo test lint data clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard mmdet_bnplug/ops/csrc/*) Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install '$(TORCH_SPEC)' '$(SETUPTOOLS_SPEC)' wheel ninja numpy
	$(PY) -c "import mmcv.ops" 2>/dev/null || \
		MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS=$$(nproc) \
		$(PIP) install --no-build-isolation '$(MMCV_SPEC)'
	$(PIP) install --no-build-isolation -e '.[dev,mmseg,deploy]'
	$(PY) -c "import mmcv.ops, mmdet, mmdet_bnplug.ops.mabn as m, mmdet_bnplug.layers.portable_sync_bn as s; print('installed: mmcv', mmcv.__version__, '(with ops), mmdet', mmdet.__version__, '; compiled CPU kernels of MABN and PortableSyncBN:', m.cpu_kernels is not None, s.cpu_kernels is not None); assert m.cpu_kernels is not None and s.cpu_kernels is not None, 'CPU kernels not built'"
	touch $(STAMP)

$(PRETRAIN_STAMP): pyproject.toml setup.py README.md $(PACKAGE_FILES) Makefile
	test -x $(PRETRAIN_PY) || $(PYTHON) -m venv $(PRETRAIN_VENV)
	$(PRETRAIN_PY) -m pip install '$(SETUPTOOLS_SPEC)' wheel ninja numpy $(PRETRAIN_SPECS)
	rm -rf $(PRETRAIN_SRC) && mkdir -p $(PRETRAIN_SRC)
	cp -r pyproject.toml setup.py README.md mmdet_bnplug $(PRETRAIN_SRC)/
	find $(PRETRAIN_SRC) \( -name '*.so' -o -name __pycache__ \) -prune -exec rm -rf {} +
	$(PRETRAIN_PY) -m pip install --force-reinstall --no-cache-dir --no-build-isolation --no-deps \
		$(PRETRAIN_SRC)
	cd $(PRETRAIN_VENV) && bin/python -c "import mmpretrain, torchvision, mmdet_bnplug.ops.mabn as m; print('mmpretrain environment: mmpretrain', mmpretrain.__version__, 'torchvision', torchvision.__version__); assert m.cpu_kernels is not None"
	touch $(PRETRAIN_STAMP)

# regenerated when the generator changes
$(SYNTHETIC_DIR)/annotations/val.json: mmdet_bnplug/testing/synthetic.py tools/make_synthetic.py | $(STAMP)
	$(PY) tools/make_synthetic.py $(SYNTHETIC_DIR)

data: $(SYNTHETIC_DIR)/annotations/val.json

# train, then evaluate once on the validation split (the run's last step); the last
# line printed is the summary: bbox mAP, mAP@0.5, iterations, wall time
demo: data
	$(PY) tools/train.py $(DEMO_CONFIG) --work-dir $(DEMO_WORK_DIR)

test: $(STAMP) $(PRETRAIN_STAMP)
	BNPLUG_MMPRETRAIN_PYTHON=$(abspath $(PRETRAIN_PY)) $(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check .

# every build output: the environment, the compiled kernel, build/ and egg-info, caches, runs
clean:
	rm -rf $(VENV) $(PRETRAIN_VENV) work_dirs build *.egg-info .pytest_cache .ruff_cache
	find . -path ./.git -prune -o \( -name '__pycache__' -o -name '*.so' \) -prune \
		-exec rm -rf {} +
