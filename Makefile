# Two commands a user needs: `make demo` and `make test`.  Everything else is
# here so the README and CI never type a flag by hand.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install test-tools demo test lint proto bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@# Editable, for development; setuptools prints a note ("Editable installation ...
	@# be careful with folders named like your package") as a UserWarning: silenced.
	PYTHONWARNINGS=ignore::UserWarning $(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Programs the tests run that PyPI does not ship, from Debian when missing:
# promtool and the Prometheus server (package prometheus), `ip` for the
# network-namespace hosts of the multi-host tests (iproute2).  Root, or sudo.
TEST_TOOLS := promtool:prometheus ip:iproute2
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
test-tools:
	@missing=""; for t in $(TEST_TOOLS); do command -v $${t%%:*} >/dev/null 2>&1 || missing="$$missing $${t##*:}"; done; \
	if [ -n "$$missing" ]; then \
	  echo "make: installing Debian packages the tests need:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing >/dev/null \
	  || { echo "make: could not install$$missing (apt-get as root); see README, Development"; exit 1; }; \
	fi

demo: install
	$(BIN)/psctl run --config configs/demo.toml --workers 2

# Two test processes: the suite spends most of its time waiting (MPI start-up,
# heartbeats, timeouts; ~36% of 2 cores busy when serial), and one file stays on one
# process (its module-scoped job fixtures and netns hosts are built once).
test: install test-tools
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

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
	$(BIN)/python bench/bench_handle.py --rounds 4 --out bench/results/handle
	$(BIN)/python bench/bench_time_to_acc.py
	$(BIN)/python bench/bench_speed.py
	$(BIN)/python bench/bench_scaling.py --config configs/mnist-dbn.toml --workers 1,2 --target-accuracy 0.985

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
