# Two commands on a fresh machine: `make demo` and `make test`.
# constraints-tested.txt pins the stack to the versions the tests ran with; CONSTRAINTS pins torch
# to the local CPU wheel: on a GPU cluster run `make install CONSTRAINTS=` to keep a CUDA torch.
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints-cpu.txt
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint bench reproduce forgetting-study

$(STAMP): pyproject.toml constraints-tested.txt $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints-tested.txt --upgrade pip
	$(PY) -m pip install -q -c constraints-tested.txt $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e '.[test]'
	$(PY) util_scripts/check_torchvision.py
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m litgpt_ext demo

# everything (what CI runs): the slow end-to-end, multi-process and real-SLURM tests included
test: $(STAMP)
	$(PY) -m pytest -q tests

# while editing: everything but the tests marked slow (@pytest.mark.slow)
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

# ruff's rules live in pyproject.toml ([tool.ruff]); installs the pinned ruff on first use
lint: $(STAMP)
	$(PY) -m ruff --version >/dev/null 2>&1 || $(PY) -m pip install -q -c constraints-tested.txt ruff
	$(PY) -m ruff check .

# the paper's study at CPU scale (litgpt-ext reproduce): runs/reproduce/REPORT.md
reproduce: $(STAMP)
	$(PY) -m litgpt_ext reproduce --config midtrain_configs/reproduce/cpu.yaml

# the forgetting toolkit's study at CPU scale (litgpt-ext sweep): runs/sweeps/forgetting_cpu/report/REPORT.md
forgetting-study: $(STAMP)
	$(PY) -m litgpt_ext sweep --spec midtrain_configs/studies/forgetting_cpu.yaml --action local

bench: $(STAMP)
	$(PY) benchmarks/data_stream.py
