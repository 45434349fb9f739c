# make demo / make test set up .venv on first use (pip install -e ".[$(EXTRAS)]").
# On a CUDA 13 machine: make demo EXTRAS=test,flax,cuda13 (interop: torch's CPU build and
# transformers, for the tests that compare with transformers' modules)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
EXTRAS ?= test,flax,interop
comma := ,
SETUP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: demo test bench clean

$(SETUP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

demo: $(SETUP)
	$(PY) -m bjax.demo

test: $(SETUP)
	BJAX_TEST_FAST_COMPILE=1 $(PY) -m pytest tests -q -n auto --durations=15

bench: $(SETUP)
	for b in gated write_slice cascade ssd hyper_connection conv; do $(PY) -m benchmarks.$$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache
