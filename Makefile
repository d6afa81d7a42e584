# The two commands of a fresh machine: `make demo` and `make test`. Each creates .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.einrewrite-installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[ort,test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

# one pytest worker per core, at most 4 (pytest-xdist): the suite took 10.9 min serially on a 2-core AMD EPYC, 6.7 min so
test: $(STAMP)
	$(PY) -m pytest -q -n auto --maxprocesses 4

bench: $(STAMP)
	$(PY) benchmarks/layers.py

clean:
	rm -rf $(VENV) build *.egg-info
