# One-command entry points. `make run` and `make test` work on a fresh machine: they create .venv.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: run test check lint format bench clean

$(STAMP): pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	# torch first: DeepSpeed's setup imports it, so it is built without isolation against this torch
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	# [gpu]: DALI and DeepSpeed, extras for `pip install .` users; the tests run both on the CPU
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation -e '.[dev,gpu]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m pipeline.quickstart

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -n 2 --dist loadfile

check: test

lint: $(STAMP)
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff format . && $(PY) -m ruff check --fix .

bench: $(STAMP)
	$(PY) -m bench prep && $(PY) -m bench loss && $(PY) -m bench loader

clean:
	rm -rf .venv runs .pytest_cache
