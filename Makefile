# Two commands for a fresh machine: `make demo` and `make test` (both install what is missing).
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.fftrainer-installed
NATIVE  := $(wildcard csrc/*.cpp csrc/*.h csrc/*.cu) setup.py Makefile
# torch first (the CPU wheel on local disk), then DeepSpeed and the rest, then our package built
# against that torch without build isolation (isolation would fetch another torch).
DEPS    := deepspeed==0.19.8 "pydantic>=2" ninja pybind11 numpy psutil tqdm matplotlib \
           pytest pytest-timeout hypothesis triton==3.9.0

.PHONY: install demo test bench clean

$(PY):
	python3 -m venv $(VENV)

$(STAMP): $(PY) $(NATIVE)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q $(DEPS)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) examples/demo.py

test: install
	$(PY) -m pytest -q -ra

bench: install
	$(PY) benchmarks/snapshot_overhead.py

clean:
	rm -rf build *.egg-info fftrainer_ds/_C*.so
