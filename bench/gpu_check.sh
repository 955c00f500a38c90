#!/usr/bin/env bash
# The device check, prepared to fit one `run` of the lent GPU machine (~6-8 min of its 10-minute limit):
#
#   here:    bash bench/gpu_wheels.sh          # the missing packages as wheels, into .whl/ (git-ignored)
#   device:  run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=600)
#
# 1. the machine (GPU, torch); 2. the CUDA-only tests; 3. `largo pretrain` on CUDA (bf16 autocast, compile,
# fused AdamW, pinned batches) on a generated corpus, then `largo generate` in bf16; 4. bench/lm_mfu.py on
# GPT-2-124M (compile + bf16, MFU against the measured and the datasheet peak); 5. bench/generate.py.
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

step machine 60 bash -c 'nvidia-smi -L; python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(), torch.cuda.is_bf16_supported())"'
step cuda_tests 180 python3 -m pytest -q -p no:cacheprovider -o addopts= \
  tests/train/test_loop.py tests/data/test_loader_augment.py -k "cuda or gpu or bf16"
step pretrain 180 bash -c '
  set -e
  python3 -c "from pathlib import Path; from tests.lm_corpus import write_corpus; write_corpus(Path(\"/tmp/corpus\"), lines=20000)"
  python3 -m largo.cli pretrain /tmp/corpus --name gpu --runs-dir /tmp/runs --no-progress \
    --set model.preset=gpt-5m --set train.steps=200 --set train.micro_batch=32 --set train.eval_every=100 \
    --set train.compile=true --set train.device=cuda
  python3 -m largo.cli generate /tmp/runs/gpu/v1 "the cat" -n 40 --seed 1 --precision bf16'
step lm_mfu 300 python3 bench/lm_mfu.py --rounds 3
step generate 120 python3 bench/generate.py --rounds 2
