#!/usr/bin/env bash
# Runs ON the GPU device machine (vLLM 0.26.0 CUDA image, no network). Phases, in the order given:
#   install  join the wheel slices in /tmp/w (scripts/device/receive.sh), install them to /tmp/site,
#            write the random Qwen2.5-1.5B-shaped model to /tmp/models/qwen-1.5b-random
#   app      ray start + `serve run serve_configs/gpu-device.yaml`; wait for /health; streaming chat
#            check with the openai client; vLLM's benchmark client at 64 and 1 concurrent streams; stop
#   vllm     `python -m vllm.entrypoints.openai.api_server` with the same model and engine args; same
#            benchmark; stop
#   single   (two GPUs) `app` on GPU 0 and `vllm` on GPU 1 started side by side, then benchmarked in turn;
#            greedy token ids and logprobs of both (scripts/device/greedy.py)
#   tp2vllm  (two GPUs) `vllm serve --tensor-parallel-size 2`, trying TP2_VARIANTS in turn until one starts;
#            greedy output; benchmark
#   tp2app   (two GPUs) the app with tensor_parallel_size 2 (serve_configs/gpu-device-tp2.yaml) under the
#            settings that worked for tp2vllm; greedy output compared with tp2vllm's; benchmark
# Usage: bash scripts/device/run_checks.sh [install] [app] [vllm] [single] [tp2vllm] [tp2app] (default: app vllm)
# Results and logs land in /tmp/results/<phase>/ and, packed, in $OUT (what the device tool brings back).
# Each server start takes about 3 minutes (torch.compile + CUDA graphs).
set -uo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
OUT=${OUT:-/tmp/out}
RES=/tmp/results
MODEL=/tmp/models/qwen-1.5b-random
NAME=qwen-1.5b-random
PORT=8000
MAX_MODEL_LEN=4096
BENCH_PROMPTS=${BENCH_PROMPTS:-1280}
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$repo PATH=/tmp/site/bin:$PATH
export RAY_USAGE_STATS_ENABLED=0 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# The app's request path: Ray Serve's HAProxy with direct ingress (README "How it is built").
export RAY_SERVE_ENABLE_HA_PROXY=1
# NVLink multicast stays off on these machines, in every process the app and vLLM start.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p "$OUT" "$RES"

log() { echo "[$(date +%T)] $*"; }

http_get() {  # prints the body of GET $1
  if command -v curl >/dev/null; then curl -s -m 20 "$1"; else
    python3 -c "import sys, urllib.request as u; sys.stdout.write(u.urlopen(sys.argv[1], timeout=20).read().decode())" "$1"; fi
}

http_status() {  # prints the HTTP status of GET $1 (000 if no answer)
  if command -v curl >/dev/null; then curl -s -o /dev/null -m 5 -w '%{http_code}' "$1" 2>/dev/null || echo 000; else
    python3 -c "
import sys, urllib.request as u, urllib.error as e
try: print(u.urlopen(sys.argv[1], timeout=5).status)
except e.HTTPError as x: print(x.code)
except Exception: print('000')" "$1"; fi
}

wait_healthy() {  # url timeout_s pid logfile
  local url=$1 limit=$2 pid=$3 logf=$4 t0=$SECONDS code
  while true; do
    code=$(http_status "$url")
    [ "$code" = 200 ] && { log "healthy after $((SECONDS - t0)) s ($url)"; return 0; }
    if ! kill -0 "$pid" 2>/dev/null; then log "server process $pid exited"; tail -60 "$logf"; return 1; fi
    if [ $((SECONDS - t0)) -ge "$limit" ]; then log "not healthy after $limit s (last $code)"; tail -60 "$logf"; return 1; fi
    [ $(((SECONDS - t0) % 30)) -lt 3 ] && log "waiting for $url ($((SECONDS - t0)) s, last $code)"
    sleep 3
  done
}

bench() {  # label concurrency prompts warmups dir [port]
  local label=$1 conc=$2 n=$3 warm=$4 dir=$5 port=${6:-$PORT}
  log "bench $label: $n prompts, 128 in / 128 out, max concurrency $conc"
  timeout 300 python3 -m vllm.entrypoints.cli.main bench serve \
    --backend openai --base-url "http://127.0.0.1:$port" --endpoint /v1/completions \
    --model "$NAME" --tokenizer "$MODEL" \
    --dataset-name random --random-input-len 128 --random-output-len 128 --ignore-eos \
    --max-concurrency "$conc" --num-prompts "$n" --num-warmups "$warm" --seed 0 \
    --percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 50,90,99 \
    --save-result --result-dir "$dir" --result-filename "${label}_c${conc}.json" --disable-tqdm \
    > "$dir/bench_${label}_c${conc}.log" 2>&1
  local rc=$?
  sed -n '/Serving Benchmark Result/,$p' "$dir/bench_${label}_c${conc}.log"
  [ $rc = 0 ] || { log "bench $label c$conc failed (rc $rc)"; tail -40 "$dir/bench_${label}_c${conc}.log"; }
  return $rc
}

gpu_pids() { nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null | tr -d ' '; }

stop_gpu_leftovers() {  # processes still holding the GPU after a server stopped (ours: nothing else runs)
  local pid
  for pid in $(gpu_pids); do log "killing leftover GPU process $pid"; kill -9 "$pid" 2>/dev/null; done
  sleep 2
}

pack() {  # phase dir: bring back the bench JSONs (and chat check), plus everything else in one tarball
  local phase=$1 dir=$2
  cp "$dir/${phase}"_c*.json "$OUT"/ 2>/dev/null
  [ -f "$dir/chat_check.json" ] && cp "$dir/chat_check.json" "$OUT/${phase}_chat_check.json"
  tar czf "$OUT/${phase}_logs.tgz" -C "$RES" "$phase" 2>/dev/null
  ls -la "$OUT"
}

phase_install() {
  log "install: $(ls /tmp/w | wc -l) files in /tmp/w"
  local first whl
  for first in /tmp/w/*.slice00; do
    [ -e "$first" ] || continue
    whl=${first%.slice00}
    cat "$whl".slice?? > "$whl" && rm -f "$whl".slice??
    log "joined $(basename "$whl") ($(du -h "$whl" | cut -f1))"
  done
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /tmp/w/*.whl || return 1
  python3 - <<'PY' || return 1
import importlib.metadata as m, torch
print({d: m.version(d) for d in ("vllm", "ray", "torch", "transformers", "fastapi", "pydantic", "openai", "uvicorn")},
      torch.cuda.get_device_name(0), flush=True)
import vllm.entrypoints.openai.api_server, ray.serve, app.builder, app.vllm_api as v  # noqa: E401
print("app.vllm_api on vLLM", m.version("vllm"), "->", v.server_args("x", "y", {"max_model_len": 4096}).max_model_len)
PY
  python3 scripts/device/make_random_model.py --tokenizer /tmp/w/tokenizer --out "$MODEL" || return 1
  ls -la "$MODEL"
}

start_app() {  # dir config [gpus]: ray start + serve run in the background (sets APP_PID); waits for /health
  local d=$1 config=$2 gpus=${3:-1}
  nvidia-smi > "$d/nvidia-smi.txt" 2>&1
  log "ray start ($gpus GPU(s), CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-all})"
  python3 -m ray.scripts.scripts start --head --node-ip-address=127.0.0.1 --port=6379 --num-cpus=16 \
    --num-gpus="$gpus" --include-dashboard=false --disable-usage-stats > "$d/ray_start.log" 2>&1 \
    || { log "ray start failed"; tail -40 "$d/ray_start.log"; return 1; }
  log "serve run $config"
  python3 -m ray.serve.scripts run --address=auto "$config" > "$d/serve_run.log" 2>&1 &
  APP_PID=$!
  wait_healthy "http://127.0.0.1:$PORT/health" 420 "$APP_PID" "$d/serve_run.log"
}

stop_app() {  # dir
  local d=$1
  log "stopping the app"
  http_get "http://127.0.0.1:$PORT/metrics" > "$d/metrics.txt" 2>/dev/null
  kill -INT "$APP_PID" 2>/dev/null; for _ in $(seq 20); do kill -0 "$APP_PID" 2>/dev/null || break; sleep 1; done
  kill -9 "$APP_PID" 2>/dev/null
  cp -r /tmp/ray/session_latest/logs "$d/ray_logs" 2>/dev/null
  find "$d/ray_logs" -type f -size +20M -delete 2>/dev/null
  python3 -m ray.scripts.scripts stop --force > "$d/ray_stop.log" 2>&1
  stop_gpu_leftovers
}

phase_app() {
  local d=$RES/app rc=0; mkdir -p "$d"
  if start_app "$d" serve_configs/gpu-device.yaml; then
    python3 scripts/device/chat_check.py --base-url "http://127.0.0.1:$PORT/v1" --model "$NAME" \
      > "$d/chat_check.json" 2>&1 || { rc=1; log "chat check failed"; }
    cat "$d/chat_check.json"
    bench app 64 "$BENCH_PROMPTS" 64 "$d" || rc=1
    bench app 1 32 2 "$d" || rc=1
  else
    rc=1
  fi
  stop_app "$d"
  pack app "$d"
  return $rc
}

start_vllm() {  # dir port logname extra-args...: vllm serve in the background (sets VLLM_PID); waits for /health
  local d=$1 port=$2 name=$3; shift 3
  log "vllm api_server $*"
  python3 -m vllm.entrypoints.openai.api_server --model "$MODEL" --served-model-name "$NAME" \
    --max-model-len "$MAX_MODEL_LEN" --host 127.0.0.1 --port "$port" "$@" > "$d/$name.log" 2>&1 &
  VLLM_PID=$!
  wait_healthy "http://127.0.0.1:$port/health" "${VLLM_START_LIMIT_S:-420}" "$VLLM_PID" "$d/$name.log"
}

stop_vllm() {
  kill -INT "$VLLM_PID" 2>/dev/null; for _ in $(seq 20); do kill -0 "$VLLM_PID" 2>/dev/null || break; sleep 1; done
  kill -9 "$VLLM_PID" 2>/dev/null
}

phase_single() {  # the app on GPU 0 and vllm serve on GPU 1, started together, benchmarked in turn
  local d=$RES/single rc=0; mkdir -p "$d"
  CUDA_VISIBLE_DEVICES=1 start_vllm "$d" 8001 vllm_serve &
  local vllm_waiter=$!
  CUDA_VISIBLE_DEVICES=0 start_app "$d" serve_configs/gpu-device.yaml || rc=1
  wait "$vllm_waiter" || rc=1
  VLLM_PID=$(pgrep -f "api_server --model $MODEL" | head -1)
  if [ $rc = 0 ]; then
    python3 scripts/device/chat_check.py --base-url "http://127.0.0.1:$PORT/v1" --model "$NAME" > "$d/chat_check.json" 2>&1 || rc=1
    python3 scripts/device/greedy.py --base-url "http://127.0.0.1:$PORT/v1" --model "$NAME" > "$d/greedy_app.json"
    python3 scripts/device/greedy.py --base-url "http://127.0.0.1:8001/v1" --model "$NAME" > "$d/greedy_vllm.json"
    python3 scripts/device/greedy.py --compare "$d/greedy_app.json" "$d/greedy_vllm.json" > "$d/greedy_compare.json"
    cat "$d/chat_check.json" "$d/greedy_compare.json"
    bench single_app 64 "$BENCH_PROMPTS" 64 "$d" || rc=1
    bench single_vllm 64 "$BENCH_PROMPTS" 64 "$d" 8001 || rc=1
    bench single_app 1 32 2 "$d" || rc=1
    bench single_vllm 1 32 2 "$d" 8001 || rc=1
  fi
  stop_vllm
  stop_app "$d"
  cp "$d"/greedy_*.json "$d"/chat_check.json "$OUT"/ 2>/dev/null
  pack single "$d"
  return $rc
}

# vllm serve --tensor-parallel-size 2 variants, tried in turn until one starts (issue 15: the plain one failed
# here with CUBLAS_STATUS_INTERNAL_ERROR after a shared-memory broadcast wait).
TP2_VARIANTS=${TP2_VARIANTS:-"plain|--disable-custom-all-reduce|--disable-custom-all-reduce --enforce-eager"}

phase_tp2vllm() {
  local d=$RES/tp2vllm rc=1 variant; mkdir -p "$d"
  IFS='|' read -ra variants <<< "$TP2_VARIANTS"
  for variant in "${variants[@]}"; do
    local extra=(); [ "$variant" = plain ] || read -ra extra <<< "$variant"
    if VLLM_START_LIMIT_S=${TP2_START_LIMIT_S:-240} start_vllm "$d" "$PORT" "vllm_tp2_${#extra[@]}" \
        --tensor-parallel-size 2 "${extra[@]}"; then
      echo "$variant" > "$d/working_variant.txt"; log "tp2 works with: $variant"; rc=0
      python3 scripts/device/greedy.py --base-url "http://127.0.0.1:$PORT/v1" --model "$NAME" > "$d/greedy_tp2vllm.json"
      cp "$d/greedy_tp2vllm.json" /tmp/greedy_tp2vllm.json
      bench tp2_vllm 64 "$BENCH_PROMPTS" 64 "$d" || rc=1
      bench tp2_vllm 1 32 2 "$d" || rc=1
      stop_vllm; stop_gpu_leftovers
      break
    fi
    log "tp2 failed with: $variant"; grep -m5 -E "Error|error" "$d/vllm_tp2_${#extra[@]}.log"
    stop_vllm; stop_gpu_leftovers
  done
  cp "$d"/greedy_*.json "$d"/working_variant.txt "$OUT"/ 2>/dev/null
  pack tp2vllm "$d"
  return $rc
}

phase_tp2app() {
  local d=$RES/tp2app rc=0; mkdir -p "$d"
  if start_app "$d" serve_configs/gpu-device-tp2.yaml 2; then
    python3 scripts/device/greedy.py --base-url "http://127.0.0.1:$PORT/v1" --model "$NAME" > "$d/greedy_tp2app.json"
    [ -f /tmp/greedy_tp2vllm.json ] && python3 scripts/device/greedy.py --compare "$d/greedy_tp2app.json" \
      /tmp/greedy_tp2vllm.json > "$d/greedy_compare.json"; cat "$d/greedy_compare.json"
    bench tp2_app 64 "$BENCH_PROMPTS" 64 "$d" || rc=1
    bench tp2_app 1 32 2 "$d" || rc=1
  else
    rc=1
  fi
  stop_app "$d"
  cp "$d"/greedy_*.json "$OUT"/ 2>/dev/null
  pack tp2app "$d"
  return $rc
}

phase_vllm() {
  local d=$RES/vllm rc=0; mkdir -p "$d"
  stop_gpu_leftovers
  if start_vllm "$d" "$PORT" vllm_serve; then
    python3 scripts/device/chat_check.py --base-url "http://127.0.0.1:$PORT/v1" --model "$NAME" \
      > "$d/chat_check.json" 2>&1 || { rc=1; log "chat check failed"; }
    bench vllm 64 "$BENCH_PROMPTS" 64 "$d" || rc=1
    bench vllm 1 32 2 "$d" || rc=1
  else
    rc=1
  fi
  log "stopping vllm"
  stop_vllm
  stop_gpu_leftovers
  pack vllm "$d"
  return $rc
}

phases=("$@"); [ ${#phases[@]} -gt 0 ] || phases=(app vllm)
status=0
for p in "${phases[@]}"; do
  log "=== phase $p"
  case $p in
    install) phase_install ;;
    app) phase_app ;;
    vllm) phase_vllm ;;
    single) phase_single ;;
    tp2vllm) phase_tp2vllm ;;
    tp2app) phase_tp2app ;;
    *) echo "unknown phase $p"; false ;;
  esac || { status=1; log "phase $p failed"; }
done
log "done (status $status)"
exit $status
