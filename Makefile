# Every target sets up .venv first, so each works on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SCARLET := $(BIN)/scarlet
STAMP  := $(VENV)/.installed
BUILD  ?= build
REPORTS ?= reports

MODELS ?= scarlet_a scarlet_b scarlet_c
MODEL  ?= efficientnet_lite0
CKPT   ?=
VAL_DIR ?=
LIMIT  ?=
BATCH  ?=

ckpt_arg  = $(if $(CKPT),--checkpoint $(CKPT))
val_arg   = $(if $(VAL_DIR),--val-dir $(VAL_DIR))
limit_arg = $(if $(LIMIT),--limit $(LIMIT))

.PHONY: setup deploy check export verify calib engine bench gpu-check doctor serve serve-load test test-fast clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,serve,openvino]'
# Triton's server binary; --no-deps because the package caps numpy below 2 for an API we do not use.
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt nvidia-pytriton
	touch $(STAMP)

## make deploy [MODEL=...] [CKPT=...] [LET=1] [DEPLOY_ARGS="--objective latency --backends ort,ort-int8 ..."]:
## the fastest artifact that passes its gates against PyTorch on this machine, as a self-checking package in deploy/<model>
DEPLOY_ARGS ?=
deploy: setup
	$(SCARLET) deploy --model $(MODEL) $(if $(LET),--let) $(ckpt_arg) $(if $(VAL_DIR),--images $(VAL_DIR)) \
	  --work-dir $(BUILD)/deploy --report $(REPORTS)/deploy-$(MODEL)$(if $(LET),-let) $(DEPLOY_ARGS)

## make check [MODEL=...] [SERVER=http://127.0.0.1:8000]: re-check deploy/<model> (files, golden images, drift)
SERVER ?=
check: setup
	$(SCARLET) check deploy/$(MODEL)$(if $(LET),-let) $(if $(SERVER),--server $(SERVER))

## make export [MODELS="scarlet_a ..."] [CKPT=path] [EXPORTER=dynamo|torchscript]: ONNX + manifest per model into build/
EXPORTER ?=
export: setup
	$(SCARLET) export-all --models $(MODELS) $(ckpt_arg) $(if $(EXPORTER),--exporter $(EXPORTER)) --out-dir $(BUILD)

## make verify [MODEL=...] [LET=1] [CKPT=...] [VAL_DIR=...] [LIMIT=N] [BACKENDS=ort,ov,ov-bf16] [DEVICE=cuda] [RESUME=1]: PyTorch vs every build/<model>*.onnx; exit 1 on failure
BACKENDS ?=
verify: setup
	$(SCARLET) verify --model $(MODEL) $(if $(LET),--let) $(ckpt_arg) --auto-onnx $(BUILD) $(val_arg) $(limit_arg) $(if $(BACKENDS),--backends $(BACKENDS)) \
	  $(if $(DEVICE),--device $(DEVICE)) $(if $(RESUME),--resume) --cache-dir $(BUILD) \
	  --json $(REPORTS)/verify-$(MODEL)$(if $(LET),-let).json --markdown $(REPORTS)/verify-$(MODEL)$(if $(LET),-let).md

## make calib [MODEL=...] [CALIB_ARGS="--targets ov --method entropy ..."]: INT8 Q/DQ ONNX for onnxruntime, TensorRT and OpenVINO
CALIB_ARGS ?=
calib: setup
	$(SCARLET) calibrate-model --model $(MODEL) $(ckpt_arg) --out-dir $(BUILD) $(val_arg) \
	  --report $(REPORTS)/calib-$(MODEL) $(CALIB_ARGS)

## make engine [MODEL=...] [PRECISION=fp32|fp16|int8] [BATCH=MIN,OPT,MAX]: TensorRT plan (needs GPU + TensorRT 11)
PRECISION ?= fp16
engine: setup
	$(SCARLET) engine --onnx $(BUILD)/$(MODEL).onnx --precision $(PRECISION) \
	  $(if $(filter int8,$(PRECISION)),--int8-onnx $(BUILD)/$(MODEL).int8-trt.onnx) \
	  $(if $(BATCH),--batch $(BATCH)) --timing-cache $(BUILD)/timing.cache -o $(BUILD)/$(MODEL).$(PRECISION).plan

## make bench [BENCH_ARGS="--readme docs/performance.md"]: every backend side by side; writes reports/bench.{json,md,png}
BENCH_ARGS ?=
bench: setup
	$(SCARLET) bench --tune --build-dir $(BUILD) --reports-dir $(REPORTS) --json $(REPORTS)/bench.json \
	  --markdown $(REPORTS)/bench.md --plot $(REPORTS)/bench.png $(BENCH_ARGS)

## make gpu-check [MODELS="scarlet_a ..."] [PRECISIONS="fp16 int8"] [BUDGET=540]: TensorRT plans per model
## (default: every model and precision), verified and benchmarked; the report is written row by row
gpu-check: setup
	$(SCARLET) gpu-check --build-dir $(BUILD) $(val_arg) --report $(REPORTS)/gpu-check \
	  $(if $(filter command line environment,$(origin MODELS)),--models $(MODELS)) \
	  $(if $(PRECISIONS),--precisions $(PRECISIONS)) $(if $(BUDGET),--budget $(BUDGET))

## make doctor: what this machine can run (packages, CPU ISA, torch CUDA, TensorRT, GPUs, memory, disk)
doctor: setup
	$(SCARLET) doctor --build-dir $(BUILD)

## make serve [MODEL=...] [SERVE_ARGS="--engine build/M.fp16.plan --http-port 8000 ..."]: Triton on 127.0.0.1 until Ctrl-C
SERVE_ARGS ?=
serve: setup
	$(SCARLET) serve --onnx $(BUILD)/$(MODEL).onnx $(SERVE_ARGS)

## make serve-load [MODEL=...] [LOAD_ARGS="--clients 16 --seconds 10 --endpoint image"]: served vs in-process throughput
LOAD_ARGS ?=
serve-load: setup
	$(SCARLET) serve-load --onnx $(BUILD)/$(MODEL).onnx $(LOAD_ARGS) \
	  --json $(REPORTS)/serve-load-$(MODEL).json --markdown $(REPORTS)/serve-load-$(MODEL).md

## make test: the suite CI runs (slow checks included, GPU checks skip on CPU)
test: setup
	$(BIN)/python -m pytest -q -rs

## make test-fast: skip the checks marked slow
test-fast: setup
	$(BIN)/python -m pytest -q -rs -m "not slow"

clean:
	rm -rf $(BUILD) $(REPORTS) deploy
