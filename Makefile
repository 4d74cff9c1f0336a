# The two entry points of the README. Each sets up .venv (with Python >= 3.12) when missing.
# Tests run on 3 worker processes (pytest-xdist) on 2 cores: most of a test is single-threaded XLA compilation,
# and a third worker fills the gaps (981 tests on a 2-core AMD EPYC, Zen 4: -n 2 was no faster, 15:14 vs 15:07;
# the session-wide compilation cache of tests/conftest.py and fewer eager compilations then took the suite from
# 16:56 to 12:04 on one day). Each test file runs on one worker (--dist loadfile): its tests share the programs that
# worker compiled (module-level jits, eager ops of the same shapes), where worksteal spread a file over the three;
# on another, slower day the same suite took 15:45 with worksteal and 13:14-14:03 with loadfile (24.6-26.6
# CPU-minutes, not 29.9). On a 2-core AMD EPYC Zen 3 (AVX2) it takes 17-20 minutes (995 tests: pytest 19:54, 36:45
# CPU-minutes, both cores busy). Where that time goes, from py-spy's samples of one such run: XLA backend compilation
# 38%, tracing 14%, lowering to HLO 12.5%, matplotlib 6%, the compilation cache's reads and writes 5%, imports 4%,
# running the compiled programs about 3%.
VENV := .venv
PY := $(VENV)/bin/python
# First interpreter that really is Python >= 3.12 (a pyenv shim for a missing version fails the check).
PYTHON312 := $(shell for p in python3.12 python3.13 $$HOME/.pyenv/versions/3.12*/bin/python3.12 $$HOME/.pyenv/versions/3.13*/bin/python3.13; do \
	$$p -c 'import sys; assert sys.version_info >= (3, 12)' >/dev/null 2>&1 && { echo $$p; break; }; done)
OUT ?= results
# make reproduce runs two experiments at a time (python -m experiments all --jobs): one alone kept a 2-core AMD EPYC
# (Zen 3) busy 1.56 cores on average (23:21 for the quick reproduction, 36:28 CPU-minutes), two at a time 20:15
JOBS ?= 2

.PHONY: reproduce test setup clean benchmark benchmark-patching

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	@test -n "$(PYTHON312)" || { echo "error: jaxicl needs python3.12 or newer on PATH (jax 0.12 requires it)"; exit 1; }
	$(PYTHON312) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

reproduce: $(VENV)/.installed
	$(PY) -m experiments all --preset quick --out $(OUT) --jobs $(JOBS)

test: $(VENV)/.installed
	$(PY) -m pytest -q -ra -n 3 --dist loadfile

clean:
	rm -rf $(VENV) $(OUT)

# The PyTorch / TransformerLens environment of the comparison benchmarks (Python 3.11, like the PyTorch reference).
PYTHON311 := $(shell for p in python3.11 $$HOME/.pyenv/versions/3.11*/bin/python3.11; do \
	$$p -c 'import sys; assert sys.version_info[:2] == (3, 11)' >/dev/null 2>&1 && { echo $$p; break; }; done)

benchmarks/.venv-torch:
	@test -n "$(PYTHON311)" || { echo "error: the PyTorch benchmarks need python3.11 on PATH"; exit 1; }
	$(PYTHON311) -m venv $@
	$@/bin/pip install -q torch==2.13.0 transformer_lens==3.9.0

# Every benchmark at its full size (python -m benchmarks all: results under benchmarks/results), PyTorch's side
# included.
benchmark: $(VENV)/.installed benchmarks/.venv-torch
	$(PY) -m benchmarks all

benchmark-patching: $(VENV)/.installed benchmarks/.venv-torch
	$(PY) -m benchmarks.patching

# The suite on the JAX of the GPU machine the GPU check is for (jax 0.11.2; its flax and optax), jaxicl from the
# source tree: the CPU install's pins are unchanged, this only checks that jaxicl also runs there.
JAX011 := .venv-jax011
.PHONY: test-jax011
$(JAX011)/.installed: constraints.txt
	@test -n "$(PYTHON312)" || { echo "error: needs python3.12 or newer on PATH"; exit 1; }
	$(PYTHON312) -m venv $(JAX011)
	$(JAX011)/bin/pip install -q jax==0.11.2 jaxlib==0.11.2 flax==0.12.12 optax==0.2.8 orbax-checkpoint==0.12.8 \
		chex==0.1.92 "numpy>=2.2,<3" matplotlib tqdm scipy pytest pytest-xdist scikit-learn
	touch $@

test-jax011: $(JAX011)/.installed
	PYTHONPATH=. $(JAX011)/bin/python -m pytest -q -ra -n 3 --dist loadfile -p no:cacheprovider $(TESTS)
