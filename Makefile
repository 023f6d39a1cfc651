# make demo     the whole GAP pipeline on CPU on the demo task (under 10 minutes after the install)
# make demo-full  3 seeds plus the LH+PCA+DA and full-head ablations, mean +- std
# make test     create .venv if needed, install the project into it, run the core tests
# make test-harness  install the lmms-eval plugin's packages (install-harness), run the harness tests
# make test-install-routes  resolve each extra beside torch (pip --dry-run, needs the package index): none replaces it
# make test-remote-code-range  the Hub user's tests in plain environments at both ends of the remote code's range
# make test-contracts  transformers' own model tests (its sdist, fetched once) on stock Qwen2.5-VL and on GAP, compared
# make bench    the benchmarks (ratios measured side by side), results under bench/results
# make install  only the install part
# make wheels   fetch the wheels a GPU machine without network needs (into wheels/; see bench/wheels.py)
# make gpu-check  on a CUDA GPU: install from wheels/ what differs there, then bench/gpu_check.py (~3 min estimated, not yet timed)
#
# The install runs once and again only when setup.cfg or pyproject.toml change (stamp file).
# torch is installed first, pinned, when the venv cannot import it: the pinned CPU build
# lies on local disk here, while an unpinned `torch` would pull a CUDA build of several GB.

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=
CONTRACTS_ARGS ?=

# The GPU machine's Python (the one with its CUDA torch), the wheels folder, the Python it runs and the compiled
# wheels it may lack (small ones; numpy, pyarrow, pandas, ... must be there already)
GPU_PYTHON ?= python3
GPU_CHECK_ARGS ?=
WHEELS ?= wheels
WHEELS_PYTHON ?= 3.12
WHEELS_BINARY ?= pydantic-core hf-xet regex

PY := $(VENV)/bin/python
STAMP := $(VENV)/.gap-vl-installed

HARNESS_STAMP := $(VENV)/.gap-vl-harness-installed
# The extra `lmms-eval` holds what lmms-eval imports to run a generate_until task; lmms-eval itself goes in with
# --no-deps: its dependency list (torchvision, timm) would replace the installed torch (a torchvision wheel pins one
# torch release), and lmms-eval runs without torchvision.
LMMS_EVAL_VERSION ?= 0.7.3

# The remote code's transformers range (configuration_gap.TRANSFORMERS_REQUIREMENT): its oldest and newest releases,
# each in a plain environment as a Hub user has it (torch, transformers, accelerate, pillow; nothing else)
# The oldest end (5.24) is the installed training pin: tests/test_hub_user.py runs there in `make test`, in a plain
# closure of torch, transformers, accelerate and pillow; CI builds the newest end only.
REMOTE_CODE_TRANSFORMERS ?= 5.25.0
REMOTE_CODE_ENVS := $(REMOTE_CODE_TRANSFORMERS:%=.venvs/tf-%/.installed)

.PHONY: install install-harness test test-harness test-install-routes test-remote-code-range test-contracts demo demo-full bench wheels gpu-check

install: $(STAMP)

install-harness: $(HARNESS_STAMP)

test: $(STAMP)
	$(PY) -m pytest -x -q --ignore=tests/harness -m "not package_index" $(PYTEST_ARGS)

test-harness: $(HARNESS_STAMP)
	$(PY) -m pytest -x -q tests/harness $(PYTEST_ARGS)

# 2 minutes with pip's cache warm, 6 cold: one resolve per extra, most of it fetching metadata from the index
test-install-routes: $(STAMP)
	$(PY) -m pytest -x -q tests/test_install_routes.py $(PYTEST_ARGS)

test-remote-code-range: $(STAMP) $(REMOTE_CODE_ENVS)
	$(PY) -m pytest -x -q tests/test_hub_user.py -k "tf-" $(REMOTE_CODE_TRANSFORMERS:%=--hub-user-python .venvs/tf-%/bin/python) $(PYTEST_ARGS)

# Fetches the installed transformers' sdist once (pip download, into .contracts-cache/); report in runs/contracts/
test-contracts: $(STAMP)
	$(PY) tests/contracts/run_transformers_suite.py $(CONTRACTS_ARGS)

demo: $(STAMP)
	$(PY) -m gap_pipeline demo --output-dir runs/demo

demo-full: $(STAMP)
	$(PY) -m gap_pipeline demo --full --output-dir runs/demo-full

bench: $(STAMP)
	cd bench && ../$(PY) decode.py && ../$(PY) train_step.py && ../$(PY) trainer_throughput.py && ../$(PY) pca_fit.py && ../$(PY) audit.py && ../$(PY) compile_graphs.py

wheels: $(STAMP)
	$(PY) bench/wheels.py download --dest $(WHEELS) --python-version $(WHEELS_PYTHON) --binary $(WHEELS_BINARY)

# No network needed: installs only from $(WHEELS) (when the folder is there), and only what differs.
gpu-check:
	@if [ -d $(WHEELS) ]; then $(GPU_PYTHON) bench/wheels.py install --wheels $(WHEELS); fi
	$(GPU_PYTHON) bench/gpu_check.py $(GPU_CHECK_ARGS)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): setup.cfg pyproject.toml | $(PY)
	@if $(PY) -c "import torch" >/dev/null 2>&1; then \
		echo "torch $$($(PY) -c "import torch; print(torch.__version__)") already in $(VENV)"; \
	else \
		echo "installing torch==$(TORCH_VERSION) into $(VENV)"; \
		$(PY) -m pip install "torch==$(TORCH_VERSION)"; \
	fi
	$(PY) -m pip install -e ".[train,test]"
	touch $@

# "torch==$(TORCH_VERSION)" is already satisfied: naming it keeps pip from replacing the CPU build.
$(HARNESS_STAMP): $(STAMP)
	$(PY) -m pip install "torch==$(TORCH_VERSION)" -e ".[lmms-eval]"
	$(PY) -m pip install --no-deps "lmms-eval==$(LMMS_EVAL_VERSION)"
	touch $@

# torch==$(TORCH_VERSION) first and pinned: here its CPU build lies on local disk (see above)
.venvs/tf-%/.installed:
	rm -rf .venvs/tf-$*
	$(PYTHON) -m venv .venvs/tf-$*
	.venvs/tf-$*/bin/python -m pip install "torch==$(TORCH_VERSION)"
	.venvs/tf-$*/bin/python -m pip install "torch==$(TORCH_VERSION)" "transformers==$*" accelerate pillow
	touch $@
