# Two commands for a fresh machine:
#   make studio - the browser studio on the bundled demo (http://127.0.0.1:7860; STUDIO_ARGS="--port 8000 ...")
#   make test   - the test suite
# make demo runs the same demo from the command line only.
# Both create .venv and install what they need. CONSTRAINTS pins torch to the
# CPU build for tests; GPU users: make demo CONSTRAINTS= keeps your CUDA torch.

PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= ci/constraints.txt
PIP = $(VENV)/bin/python -m pip
STAMP = $(VENV)/.installed

STUDIO_ARGS ?=

.PHONY: studio demo test bench clean

$(STAMP): pyproject.toml ci/constraints.txt ci/test-requirements.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e '.[test]'
	$(PIP) install -q --no-deps -r ci/test-requirements.txt
	touch $(STAMP)

studio: $(STAMP)
	$(VENV)/bin/python app.py $(STUDIO_ARGS)

demo: $(STAMP)
	$(VENV)/bin/ftstudio check-dataset assets/demo/studio_qa.jsonl --tokenizer demo --template qwen_chat --max-length 256
	$(VENV)/bin/ftstudio train tiny_demo

test: $(STAMP)
	bash ci/system-deps.sh
	$(VENV)/bin/python -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/python bench/bench_data.py
	$(VENV)/bin/python bench/bench_train.py
	$(VENV)/bin/python bench/bench_chat.py
	$(VENV)/bin/python bench/bench_merge.py
	$(VENV)/bin/python bench/bench_serve.py
	$(VENV)/bin/python bench/bench_studio.py

clean:
	rm -rf $(VENV) work_dirs .pytest_cache
