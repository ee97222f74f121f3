# Two commands on a fresh machine: `make demo` and `make test`.
# CONSTRAINTS pins torch to the local CPU wheel; on a GPU cluster run `make install CONSTRAINTS=`
# to keep the CUDA torch already installed (or let pip pick one).
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints-cpu.txt
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean-demo

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e '.[test]'
	$(PY) util_scripts/check_torchvision.py
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m litgpt_ext demo

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) benchmarks/data_stream.py
