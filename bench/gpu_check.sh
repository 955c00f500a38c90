#!/usr/bin/env bash
# The device check, prepared to fit one `run` of the lent GPU machine (its steps' timeouts add up to 550 s
# of the 600 a run may take; not yet run on a GPU, so expect to trim it there):
#
#   here:    bash bench/gpu_wheels.sh          # the missing packages as wheels, into .whl/ (git-ignored)
#   device:  run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=600)
#
# the machine; bench/lm_mfu.py on GPT-2-124M (compile + bf16, MFU against the measured and the datasheet
# peak); bench/serve_load.py with the model on the GPU (dynamic batching vs max_batch=1); the CUDA-only
# tests; `largo pretrain` on CUDA (bf16 autocast, compile, fused AdamW, pinned batches) on a generated
# corpus, then `largo generate` in bf16; bench/generate.py.
# Each step has its own timeout and writes its log under $OUT, so one failing step does not hide the others.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheels did not install: run bench/gpu_wheels.sh here first and carry .whl"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
step() {  # step NAME SECONDS COMMAND...: run, keep the log, report the exit status
  local name=$1 seconds=$2
  shift 2
  echo "== $name"
  timeout "$seconds" "$@" > "$OUT/$name.txt" 2>&1
  echo "   exit $? ($name)"; tail -n 25 "$OUT/$name.txt"
}

# in order of what the open issues need: issue 6's GPU MFU, issue 4's batching on a GPU, then the CUDA paths
step machine 30 bash -c 'nvidia-smi -L; python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(), torch.cuda.is_bf16_supported())"'
step lm_mfu 170 python3 bench/lm_mfu.py --rounds 2 --steps 20
step serve_load 100 python3 bench/serve_load.py --device cuda --rounds 1 --threads 4
step cuda_tests 100 python3 -m pytest -q -p no:cacheprovider -o addopts= \
  tests/train/test_loop.py tests/data/test_loader_augment.py tests/deploy/test_export.py -k "cuda or bf16 or device"
step pretrain 100 bash -c '
  set -e
  python3 -c "from pathlib import Path; from tests.lm_corpus import write_corpus; write_corpus(Path(\"/tmp/corpus\"), lines=20000)"
  python3 -m largo.cli pretrain /tmp/corpus --name gpu --runs-dir /tmp/runs --no-progress \
    --set model.preset=gpt-5m --set train.steps=200 --set train.micro_batch=32 --set train.eval_every=100 \
    --set train.compile=true --set train.device=cuda
  python3 -m largo.cli generate /tmp/runs/gpu/v1 "the cat" -n 40 --seed 1 --precision bf16'
step generate 50 python3 bench/generate.py --rounds 2
