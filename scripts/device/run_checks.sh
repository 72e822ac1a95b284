#!/usr/bin/env bash
# Runs ON the GPU device machine (vLLM 0.26.0 CUDA image, no network). Phases, in the order given:
#   install  join the wheel slices in /tmp/w (scripts/device/receive.sh), install them to /tmp/site,
#            write the random Qwen2.5-1.5B-shaped model to /tmp/models/qwen-1.5b-random
#   app      ray start + `serve run serve_configs/gpu-device.yaml`; wait for /health; streaming chat
#            check with the openai client; vLLM's benchmark client at 64 and 1 concurrent streams; stop
#   vllm     `python -m vllm.entrypoints.openai.api_server` with the same model and engine args; same
#            benchmark; stop
#   window   experiment: the app with stream chunks coalesced over 10/25/50 ms windows in the engine
#            replica (scripts/device/stream_window.py, WINDOWS_MS to change), benchmark at each
# Usage: bash scripts/device/run_checks.sh [install] [app] [vllm]      (default: app vllm)
# Results and logs land in /tmp/results/<phase>/ and, packed, in $OUT (what the device tool brings back).
# Each server start takes about 3 minutes (torch.compile + CUDA graphs): one phase per device call.
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

bench() {  # label concurrency prompts warmups dir
  local label=$1 conc=$2 n=$3 warm=$4 dir=$5
  log "bench $label: $n prompts, 128 in / 128 out, max concurrency $conc"
  timeout 300 python3 -m vllm.entrypoints.cli.main bench serve \
    --backend openai --base-url "http://127.0.0.1:$PORT" --endpoint /v1/completions \
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

start_app() {  # dir config: ray start + serve run in the background (sets APP_PID); waits for /health
  local d=$1 config=$2
  nvidia-smi > "$d/nvidia-smi.txt" 2>&1
  log "ray start"
  python3 -m ray.scripts.scripts start --head --node-ip-address=127.0.0.1 --port=6379 --num-cpus=16 \
    --num-gpus=1 --include-dashboard=false --disable-usage-stats > "$d/ray_start.log" 2>&1 \
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

phase_window() {  # the app with stream chunks coalesced over a window (scripts/device/stream_window.py)
  local d=$RES/window rc=0 w; mkdir -p "$d"
  if start_app "$d" scripts/device/exp-stream-window.yaml; then
    python3 scripts/device/chat_check.py --base-url "http://127.0.0.1:$PORT/v1" --model "$NAME" \
      > "$d/chat_check.json" 2>&1 || { rc=1; log "chat check failed"; }
    cat "$d/chat_check.json"
    for w in ${WINDOWS_MS:-10 25 50}; do
      echo "$w" > /tmp/stream_window_ms
      bench "window_w$w" 64 "${WINDOW_PROMPTS:-640}" 64 "$d" || rc=1
    done
    bench "window_w${w}" 1 32 2 "$d" || rc=1
    rm -f /tmp/stream_window_ms
  else
    rc=1
  fi
  stop_app "$d"
  cp "$d"/window_w*_c*.json "$OUT"/ 2>/dev/null
  [ -f "$d/chat_check.json" ] && cp "$d/chat_check.json" "$OUT/window_chat_check.json"
  tar czf "$OUT/window_logs.tgz" -C "$RES" window 2>/dev/null
  ls -la "$OUT"
  return $rc
}

phase_vllm() {
  local d=$RES/vllm rc=0; mkdir -p "$d"
  stop_gpu_leftovers
  log "vllm api_server"
  python3 -m vllm.entrypoints.openai.api_server --model "$MODEL" --served-model-name "$NAME" \
    --max-model-len "$MAX_MODEL_LEN" --host 127.0.0.1 --port "$PORT" > "$d/vllm_serve.log" 2>&1 &
  local spid=$!
  if wait_healthy "http://127.0.0.1:$PORT/health" 420 "$spid" "$d/vllm_serve.log"; then
    python3 scripts/device/chat_check.py --base-url "http://127.0.0.1:$PORT/v1" --model "$NAME" \
      > "$d/chat_check.json" 2>&1 || { rc=1; log "chat check failed"; }
    bench vllm 64 "$BENCH_PROMPTS" 64 "$d" || rc=1
    bench vllm 1 32 2 "$d" || rc=1
  else
    rc=1
  fi
  log "stopping vllm"
  kill -INT "$spid" 2>/dev/null; for _ in $(seq 20); do kill -0 "$spid" 2>/dev/null || break; sleep 1; done
  kill -9 "$spid" 2>/dev/null
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
    window) phase_window ;;
    *) echo "unknown phase $p"; false ;;
  esac || { status=1; log "phase $p failed"; }
done
log "done (status $status)"
exit $status
