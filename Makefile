# make test     create .venv if needed, install the project into it, run the tests
# make install  only the install part
#
# The install runs once and again only when setup.cfg or pyproject.toml change (stamp file).
# torch is installed first, pinned, when the venv cannot import it: the pinned CPU build
# lies on local disk here, while an unpinned `torch` would pull a CUDA build of several GB.

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=

PY := $(VENV)/bin/python
STAMP := $(VENV)/.gap-vl-installed

.PHONY: install test

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -x -q $(PYTEST_ARGS)

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
