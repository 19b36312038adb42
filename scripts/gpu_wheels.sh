#!/usr/bin/env bash
# Download into .whl/ the wheels an offline GPU node needs to run bench/bench_gpu.py and the GPU tests, for
# Python 3.12 on x86_64 Linux. The node is assumed to have torch, transformers, accelerate, peft and what
# they pull in (numpy, pandas, pyarrow, requests with certifi and idna, tqdm, xxhash, fsspec, huggingface-hub,
# pyyaml, packaging, filelock, aiohttp, psutil, jinja2, typing-extensions, tokenizers, safetensors,
# matplotlib). What it lacks:
#   trl 1.16.0; datasets 4.8.4 (TRL 1.16 needs >= 4.7; 5.x would need pyarrow >= 24 and huggingface-hub
#   >= 1.31) and what datasets needs beyond that list: dill, multiprocess, and httpx (imported by datasets;
#   huggingface-hub 2 no longer brings it) with httpcore, h11 and anyio; pytest with pluggy, iniconfig and
#   pygments for `pytest -m gpu`. Each was checked with: unzip -p .whl/NAME-*.whl '*/METADATA' | grep ^Requires-Dist
# alignflow itself needs nothing more there (it runs from the checkout with PYTHONPATH=$PWD).
# Run from the repository root on a machine with internet:  bash scripts/gpu_wheels.sh   (~4 MB)
# Then carry .whl/ to the node and install it there (see README.md, "Benchmarks on a GPU"):
#   python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(trl==1.16.0 datasets==4.8.4 dill==0.4.1 multiprocess==0.70.19
        httpx==0.28.1 httpcore==1.0.9 h11==0.16.0 anyio==4.12.1
        pytest==9.0.3 pluggy==1.6.0 iniconfig==2.3.0 pygments==2.20.0)
mkdir -p .whl
grep -qsx '/.whl/' .git/info/exclude || { mkdir -p .git/info && echo /.whl/ >> .git/info/exclude; }
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}"
ls -l .whl
du -sh .whl
