#!/usr/bin/env bash
# The Python packages largo needs that the lent GPU machine (Python 3.12, its own CUDA torch) lacks,
# downloaded here as wheels into .whl/ (git-ignored through .git/info/exclude), for bench/gpu_check.sh.
# Run it here, in the repo root, before the device call; the call then names .whl in `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)
args=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl)
for p in "${PLATFORMS[@]}"; do args+=(--platform "$p"); done
# pydantic and its parts, the store, the server; jieba is pure Python (any platform)
python3 -m pip download -q "${args[@]}" pydantic==2.14.4 pydantic-core==2.50.5 annotated-types \
  typing-inspection sqlalchemy fastapi starlette uvicorn python-multipart httptools annotated-doc
python3 -m pip wheel -q --no-deps -w .whl jieba==0.42.1  # only an sdist on PyPI: a py3-none-any wheel
ls -1 .whl
du -sh .whl
