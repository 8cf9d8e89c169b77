# The README's commands. `make quickstart` runs the main job on the embedded synthetic dataset; `make test` runs the
# linter and the whole test suite, `make test-fast` the unit tests only. All create .venv and install
# requirements.txt first (skipped when unchanged).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
REQ_HASH := $(shell sha256sum requirements.txt | cut -c1-16)
STAMP := $(VENV)/.installed-$(REQ_HASH)

.PHONY: setup browser quickstart test test-quickstart test-fast test-kernels lint bench clean

setup: $(STAMP)

$(STAMP): requirements.txt
	@echo "== setup: creating $(VENV) (if needed) and installing requirements.txt"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	@rm -f $(VENV)/.installed-*
	@touch $@
	@echo "== setup: done"

# Debian's chromium and chromium-driver, for the browser test of the web page
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then \
		echo "== browser: chromium and chromedriver present"; \
	else \
		echo "== browser: installing Debian packages chromium and chromium-driver"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
			--no-install-recommends chromium chromium-driver >/dev/null && echo "== browser: installed"; \
	fi

quickstart: setup
	@echo "== quickstart: the six phases on the synthetic shapes dataset (CPU), then the test-split report"
	$(BIN)/python pipeline.py --preset quickstart

lint: setup
	$(BIN)/ruff check .

test: setup browser
	@echo "== test: ruff"
	$(BIN)/ruff check .
	@echo "== test: pytest on two workers of one thread each (the whole suite, slow tests included; the full quickstart run is make test-quickstart)"
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist worksteal -m "not quickstart" --durations=25

# the quickstart as it ships (6-9 minutes on 2 cores), checked against the README's floors
test-quickstart: setup
	@echo "== test-quickstart: make quickstart's run in a temporary folder, its results against the README's floors"
	$(BIN)/python -m pytest -q -m quickstart

# the unit tests: everything not marked slow (no training runs, servers, browser or quickstart); the loop while working
test-fast: setup
	@echo "== test-fast: ruff, then the tests not marked slow"
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not slow"

# The numerical tests under other CPU kernels than this machine's own: MKL's AVX2 path (what it runs on many AMD
# CPUs), ATen's AVX2 and portable kernels, MKL's reproducible mode, one thread. CI runs on Intel or AMD machines,
# and every tolerance must hold on both (tests/numerics.py says how they are set).
NUMERICAL_TESTS := tests/test_decoding.py tests/test_models.py tests/test_training.py tests/test_ensemble.py \
	tests/test_onnx.py tests/test_captioner.py tests/test_blip_api.py
KERNEL_VARIANTS := MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 ATEN_CPU_CAPABILITY=default \
	MKL_CBWR=COMPATIBLE OMP_NUM_THREADS=1

test-kernels: setup
	@for variant in $(KERNEL_VARIANTS); do \
		echo "== test-kernels: the numerical tests with $$variant"; \
		env $$variant $(BIN)/python -m pytest -q -m "not slow" $(NUMERICAL_TESTS) || exit 1; \
	done

bench: setup
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf runs test-artifacts .pytest_cache
