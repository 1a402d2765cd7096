# `make bench` runs the benchmark suite, `make test` the whole test suite. Both create .venv on
# first use and install the project into it (torch pins first, then the project with its C++
# extension, built against that torch).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
EXTENSION_SOURCES := $(wildcard csrc/*.cpp csrc/*.h)

.PHONY: install extension test test-cpu test-triton bench gpu-check clean

$(INSTALLED): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel ninja
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test,bench,train,fewshot]"
	touch $@

install: $(INSTALLED)

# Rebuild the extension in place when its sources change (ninja makes this incremental).
extension: $(INSTALLED) $(EXTENSION_SOURCES)
	@if [ "$$STADAPTER_SKIP_CPP_BUILD" != "1" ]; then $(PY) setup.py --quiet build_ext --inplace; fi

test: test-cpu test-triton

test-cpu: extension
	$(PY) -m pytest tests --ignore=tests/triton -q

# The Triton kernels run on CPU tensors in the interpreter, which must be enabled before
# triton is imported: hence a process of their own.
test-triton: extension
	TRITON_INTERPRET=1 $(PY) -m pytest tests/triton -q

bench: extension
	$(PY) -m benchmarks --quick

# The prepared GPU check (tools/gpu_check), for a lent GPU machine as it is: its own python3,
# nothing built (no venv, no C++ extension). Results go to $$OUT, else bench-results/gpu-check.
gpu-check:
	STADAPTER_SKIP_CPP_BUILD=1 PYTHONPATH=. python3 -m tools.gpu_check

clean:
	rm -rf build *.egg-info stadapter_kernels/*.so

# The offline demo (a few minutes on a 2-core CPU): moving-digits mp4 videos, then a linear probe
# and ST-Adapters on the same frozen tiny ViT; prints both accuracies, writes JSON and a plot.
.PHONY: demo
demo: extension
	$(PY) -m stadapter.cli demo --output runs/demo --json runs/demo/results.json

# The few-shot demo (MA-CLIP on moving digits, offline, minutes on a CPU): table on stdout,
# fewshot-demo.json and fewshot-demo.png here.
.PHONY: fewshot-demo
fewshot-demo: extension
	$(PY) -m stadapter.fewshot.cli demo --json fewshot-demo.json --plot fewshot-demo.png
