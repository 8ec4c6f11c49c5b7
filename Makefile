# Two commands a user needs: `make demo` and `make test`.  Everything else is
# here so the README and CI never type a flag by hand.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install demo test lint proto bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/psctl run --config configs/demo.toml --workers 2

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

proto: install
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=src --grpc_python_out=src --pyi_out=src proto/dbnps/v1/control.proto

# The benchmarks behind docs/benchmarks.md (about an hour on 2 cores; results in bench/results/).
bench: install
	$(BIN)/python bench/bench_numerics.py --threads 1
	$(BIN)/python bench/bench_numerics.py --threads 2
	$(BIN)/python bench/bench_ps.py all
	$(BIN)/python bench/bench_time_to_acc.py
	$(BIN)/python bench/bench_speed.py
	$(BIN)/python bench/bench_scaling.py --config configs/mnist-dbn.toml --workers 1,2 --target-accuracy 0.985

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
