# rethink-tl: `make demo` runs the main job on embedded data; `make test` runs the tests.
# Both create .venv from nothing on first use.
PY       ?= python3
VENV     ?= .venv
BIN      := $(VENV)/bin
RTL      := $(BIN)/rtl
STAMP    := $(VENV)/.installed

# The demo: real ImageNet weights (EfficientNet-Lite0 from the pip package), TL vs RI, the full
# network and two truncations, 10% of the synthetic training split, 64 px, 20 epochs.
DEMO_DIR  ?= demo_runs
DEMO_ARGS ?= data=synthetic data.image_size=64 data.num_samples=6000 data.fraction=0.1 \
             train.epochs=20 train.lr=3e-4 train.batch_size=32 train.progress=false \
             hydra.sweep.dir=$(DEMO_DIR)

.PHONY: help install demo test clean

help:
	@echo "make demo    TL vs RI on the embedded synthetic data with real EfficientNet-Lite0 weights (CPU, < 10 min)"
	@echo "make test    install into $(VENV) and run the test suite"
	@echo "make clean   remove run outputs (keeps $(VENV))"

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test,weights]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(RTL) train -m model=timm init=random,pretrained $(DEMO_ARGS)
	$(RTL) train -m model=trunc model.cut=2,3 init=random,pretrained $(DEMO_ARGS)
	$(RTL) report $(DEMO_DIR)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf runs multirun outputs demo_runs
