#!/usr/bin/env bash
# Wheels the lent GPU machine lacks (it has torch, triton, transformers, peft, pytest and
# no network): the server's stack, for Python 3.12 / x86_64, into .gpu_wheels/ (git-ignored),
# which `scripts/gpu_session.sh` installs there. Run once here before a GPU session; carry
# .gpu_wheels with the run.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --python-version 3.12 --platform manylinux2014_x86_64 \
  --only-binary=:all: --no-deps -d .gpu_wheels \
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 pydantic==2.13.4 pydantic-core==2.46.4 \
  openai==3.54.0 jiter==0.19.0 distro==1.9.0 annotated-types==0.7.0 typing-inspection==0.4.2 \
  sniffio==1.3.1 typing-extensions==4.16.0 annotated-doc==0.0.7 httpx2==2.16.2 \
  httpcore2==2.16.2 truststore==0.10.5 opentelemetry-api==1.45.2 \
  compressed-tensors==0.20.1 loguru==0.7.3 psutil==7.2.2 trustme==1.2.1 idna==3.21 \
  pycparser==3.12 cffi==2.1.1
# structured outputs (xgrammar and its FFI): manylinux_2_28 wheels
python3 -m pip download -q --python-version 3.12 --platform manylinux_2_28_x86_64 \
  --only-binary=:all: --no-deps -d .gpu_wheels xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2 \
  cryptography==51.0.1 pillow==13.0.0
ls .gpu_wheels
