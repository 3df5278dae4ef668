#!/usr/bin/env bash
# The chapter's comparison on one GPU in one bounded run (issue 13): ours vs PyTorch, MFU, where the step's time
# goes, end-to-end vs synthetic, and the accuracy runs, in at most TOTAL_S seconds (default 540 = 9 minutes).
#
#   bash benchmarks/gpu_carry.sh                       # here, once: the wheels (.whl/) and the array cache (.arrays/)
#   bash benchmarks/gpu_campaign.sh OUT_DIR            # there, on the GPU (python3 = the image's, with torch + jax)
#   bash benchmarks/gpu_campaign.sh OUT_DIR --tiny     # anywhere, in minutes: the same script on tiny nets (CPU)
#
# Parts, in order, each under its own time limit and never past the overall deadline (a part that does not fit in
# what is left is skipped and says so; a part that fails or runs out of time does not stop the others):
#   env         install the carried wheels (.whl/*.whl -> a --target dir on PYTHONPATH), print versions/devices
#   throughput  benchmarks/train_step.py: our bf16 step vs PyTorch's best configuration (bf16 autocast,
#               channels_last, cudnn.benchmark, torch.compile within a budget), same batch, interleaved, MFU,
#               plus a profile of our benchmarked step
#   profile     benchmarks/profile_step.py: where the loop's real step (device input) spends its time
#   end_to_end  benchmarks/end_to_end.py --modes=device: train.py's loop img/s vs the bare step, per model
#   accuracy    benchmarks/accuracy_run.py: train.py per model under the shared recipe (configs/), device input,
#               bf16, stopped at top-1 0.93 or when its share of the time is up; epochs/seconds to 0.90 and 0.93
# Written to OUT_DIR: campaign.log (everything printed), results.json (benchmarks/campaign_results.py: the numbers
# and the goals' verdicts; rewritten after every part), details.tar.gz (each part's JSON, the accuracy runs'
# metrics and logs) and traces.tar.gz (the profiler traces, when under 15 MiB).
# TensorFlow is blocked in every part (as on the GPU image, which has none): nothing here may need it.
#
# Environment knobs: PYTHON (default python3), TOTAL_S, PARTS (comma list of the parts above), MODELS
# (throughput/profile/end_to_end), ACC_MODELS (accuracy; the last gets whatever time the others leave), ARRAYS
# (the array cache, default .arrays), BATCH, DTYPE, B_<PART> (a part's budget in seconds, e.g. B_THROUGHPUT=200),
# TORCH_COMPILE_BUDGET_S, ACC_OVERRIDES (extra train.py flags for the accuracy runs, space-separated).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

if [ $# -lt 1 ] || [ "${1:0:1}" = "-" ]; then
  echo "usage: bash benchmarks/gpu_campaign.sh OUT_DIR [--tiny]" >&2
  exit 2
fi
OUT=$1
TINY=0
if [ "${2:-}" = "--tiny" ]; then
  TINY=1
elif [ -n "${2:-}" ]; then
  echo "error: unknown argument '$2'; the only option is --tiny" >&2
  exit 2
fi
mkdir -p "$OUT" || { echo "error: cannot create OUT_DIR '$OUT'" >&2; exit 2; }
OUT=$(cd "$OUT" && pwd)
rm -f "$OUT/campaign.log" "$OUT/results.json" "$OUT/details.tar.gz" "$OUT/traces.tar.gz"
# Scratch space outside OUT_DIR (a device run brings back at most 8 files from it); removed at the end unless
# KEEP_WORK=1.
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_campaign.XXXXXX")
LOG="$OUT/campaign.log"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!

PY=${PYTHON:-python3}
ARRAYS=${ARRAYS:-$REPO/.arrays}
DTYPE=${DTYPE:-bfloat16}
if [ "$TINY" = 1 ]; then
  TOTAL_S=${TOTAL_S:-600}
  export CNN_JAX_CONV_IMPL=${CNN_JAX_CONV_IMPL:-xla}   # plain XLA convs: the CPU-tuned kernels compile slower
  IMPLS=xla
  # Cheaper XLA:CPU compilation (the tiny run is mostly compilation): fewer LLVM passes, same results.
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
  MODELS=${MODELS:-nin}
  ACC_MODELS=${ACC_MODELS:-nin}
  BATCH=${BATCH:-16}
  NET=(--geometry=small --width=0.125)
  TP_ARGS=(--res=32 --num_classes=10 --steps=2 --warmup=1 --block=2 --profile_steps=1)
  PROF_ARGS=(--steps=2 --warmup=1)
  E2E_ARGS=(--steps=4 --log_every=2 --eval_examples=64)
  ACC_ARGS=(--config_args=smoke --stop_grace_s=20 "--override=--config.num_train_steps=4"
            "--override=--config.log_every_steps=2" "--override=--config.eval_split=test[:128]")
else
  TOTAL_S=${TOTAL_S:-540}
  MODELS=${MODELS:-alexnet,vgg11,nin}
  ACC_MODELS=${ACC_MODELS:-alexnet,nin,vgg11}
  BATCH=${BATCH:-256}
  NET=(--geometry=native --width=1)
  IMPLS=auto   # cnn_jax.ops: plain XLA off the CPU
  TP_ARGS=(--steps=6 --warmup=1 --block=5 --profile_steps=3
           "--torch_compile_budget_s=${TORCH_COMPILE_BUDGET_S:-45}")
  PROF_ARGS=(--steps=5 --warmup=3)
  E2E_ARGS=(--steps=200 --log_every=20 --eval_examples=512)
  ACC_ARGS=(--stop_grace_s=30)
fi
PARTS=${PARTS:-env,throughput,profile,end_to_end,accuracy}
# Budgets (seconds), sized for an H200 (--tiny: for a slow shared CPU); each is also capped by what is left of
# TOTAL_S. accuracy gets the rest.
B_ENV=${B_ENV:-60}
B_THROUGHPUT=${B_THROUGHPUT:-$( [ "$TINY" = 1 ] && echo 180 || echo 150 )}
B_PROFILE=${B_PROFILE:-$( [ "$TINY" = 1 ] && echo 150 || echo 70 )}
B_END_TO_END=${B_END_TO_END:-$( [ "$TINY" = 1 ] && echo 180 || echo 120 )}
B_ACCURACY=${B_ACCURACY:-$TOTAL_S}
RESERVE_S=15   # kept for the last results.json and the tarballs
START=$(date +%s)
DEADLINE=$((START + TOTAL_S))

# Every Python of the campaign runs as on the GPU image: TensorFlow cannot be imported.
mkdir -p "$WORK/notf"
cat > "$WORK/notf/sitecustomize.py" <<'PYEOF'
import sys
sys.modules["tensorflow"] = None          # `import tensorflow` raises ImportError, as where it is not installed
sys.modules["tensorflow_datasets"] = None
PYEOF
export PYTHONPATH="$WORK/notf${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3

echo "== gpu_campaign $( [ "$TINY" = 1 ] && echo '(tiny dry run) ')started $(date -u +%FT%TZ) in $REPO"
echo "   out $OUT, python $PY, total budget ${TOTAL_S}s, parts $PARTS, models $MODELS, accuracy $ACC_MODELS"
echo "   batch $BATCH, $DTYPE, array cache $ARRAYS; TensorFlow blocked"

results() {  # rewrites results.json from what the parts left so far
  local tiny=()
  if [ "$TINY" = 1 ]; then tiny=(--tiny); fi
  "$PY" "$REPO/benchmarks/campaign_results.py" --work="$WORK" --out="$OUT/results.json" "${tiny[@]}" "$@"
}

want() { [[ ",$PARTS," == *",$1,"* ]]; }

# run_part NAME BUDGET CMD...: runs CMD (a command or a function of this script) in its own process group for at
# most min(BUDGET, time left) seconds: then SIGTERM to the whole group, SIGKILL 20 s later. Records status.tsv
# and rewrites results.json; never fails.
run_part() {
  local name=$1 budget=$2
  shift 2
  if ! want "$name"; then
    return 0
  fi
  local now left limit
  now=$(date +%s)
  left=$((DEADLINE - now - RESERVE_S))
  limit=$(( budget < left ? budget : left ))
  if [ "$limit" -lt 20 ]; then
    echo "== $name: skipped, ${left}s left of the ${TOTAL_S}s budget"
    printf '%s\tskipped\t-\t0\t%s\n' "$name" "$budget" >> "$WORK/status.tsv"
    results
    return 0
  fi
  echo "== $name ($(date -u +%T), at most ${limit}s)"
  local t0 rc status pid watchdog marker="$WORK/.timeout_$name"
  t0=$(date +%s)
  set -m   # background jobs get their own process groups, so a part is stopped with all its children
  ( PART_LIMIT=$limit; "$@" ) &
  pid=$!
  ( sleep "$limit"; touch "$marker"; kill -TERM -- "-$pid" ) > /dev/null 2>&1 &
  watchdog=$!
  wait "$pid"
  rc=$?
  kill -- "-$watchdog" 2>/dev/null
  wait "$watchdog" 2>/dev/null
  set +m
  if [ -f "$marker" ]; then
    # The part's shell is gone; its processes (train.py saves on SIGTERM) get 20 s more, then SIGKILL.
    local i
    for i in $(seq 20); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$pid" 2>/dev/null
  fi
  if [ -f "$marker" ]; then
    status=timeout
  elif [ "$rc" = 0 ]; then
    status=ok
  else
    status=failed
  fi
  local took=$(( $(date +%s) - t0 ))
  echo "== $name: $status (exit status $rc) after ${took}s"
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$took" "$limit" >> "$WORK/status.tsv"
  results
  return 0
}

finish() {
  trap - EXIT
  echo "== results ($(date -u +%T), $(( $(date +%s) - START ))s since the start)"
  results --print
  # What comes back from a device run is at most 8 files: the log, results.json and two tarballs.
  (cd "$WORK" && tar -czf "$OUT/details.tar.gz" --exclude='./acc/*/checkpoints' --exclude='./acc/*/tb' \
      --exclude='./notf' --exclude='./site' --exclude='./traces' . 2>/dev/null) || true
  if [ -d "$WORK/traces" ]; then
    (cd "$WORK" && find traces -name perfetto_trace.json.gz -print0 \
        | tar -czf "$OUT/traces.tar.gz" --null -T - 2>/dev/null) || true
    if [ -f "$OUT/traces.tar.gz" ] && [ "$(stat -c %s "$OUT/traces.tar.gz")" -gt $((15 * 1024 * 1024)) ]; then
      echo "   traces.tar.gz is over 15 MiB: dropped (the breakdowns are in results.json)"
      rm -f "$OUT/traces.tar.gz"
    fi
  fi
  if [ "${KEEP_WORK:-0}" = 1 ]; then echo "   scratch kept in $WORK"; else rm -rf "$WORK"; fi
  echo "== done $(date -u +%FT%TZ) after $(( $(date +%s) - START ))s: $(cd "$OUT" && ls -d -- * | tr '\n' ' ')"
  exec >&- 2>&-
  wait "$TEE_PID" 2>/dev/null || true   # the log is complete when the script returns
}
trap finish EXIT
trap 'echo "== campaign interrupted"; exit 143' TERM INT

# --- env: the carried wheels, versions, devices ------------------------------------------------------------
env_part() {
  if compgen -G "$REPO/.whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
        "$REPO"/.whl/*.whl || return 1
    echo "   installed $(cd "$REPO/.whl" && ls -- *.whl | tr '\n' ' ')into $WORK/site"
    export PYTHONPATH="$WORK/site:$PYTHONPATH"
  else
    echo "   no .whl/ wheels to install (benchmarks/gpu_carry.sh downloads them where pip works)"
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
  "$PY" - "$WORK/env.json" <<'PYEOF'
import importlib, json, os, sys
versions = {}
for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "chex", "ml_collections", "dm_pix", "numpy",
             "tensorboard", "torch", "torchvision"):
  try:
    versions[name] = getattr(importlib.import_module(name), "__version__", "?")
  except Exception as e:  # pylint: disable=broad-except
    versions[name] = f"missing ({type(e).__name__})"
import jax
devices = [f"{d.device_kind} ({d.platform})" for d in jax.devices()]
info = {"versions": versions, "backend": jax.default_backend(), "devices": devices, "cpu_count": os.cpu_count()}
print("   " + ", ".join(f"{k} {v}" for k, v in versions.items()))
print(f"   jax backend {info['backend']}: {', '.join(devices)}; {os.cpu_count()} CPU cores")
json.dump(info, open(sys.argv[1], "w"), indent=1)
missing = [k for k in ("ml_collections", "dm_pix", "flax", "optax") if versions[k].startswith("missing")]
if missing:
  sys.exit(f"   error: {', '.join(missing)} missing: carry their wheels in .whl/ (benchmarks/gpu_carry.sh)")
PYEOF
}
run_part env "$B_ENV" env_part
# The wheels stay on the path of every later part.
if [ -d "$WORK/site" ]; then export PYTHONPATH="$WORK/site:$PYTHONPATH"; fi

if [ ! -d "$ARRAYS" ]; then
  echo "   WARNING: no array cache at $ARRAYS: the profile, end_to_end and accuracy parts will fail (make it with"
  echo "   benchmarks/gpu_carry.sh where TensorFlow and the dataset are)"
fi

# --- throughput: ours vs PyTorch, MFU, our step's profile ---------------------------------------------------
run_part throughput "$B_THROUGHPUT" "$PY" benchmarks/train_step.py --models="$MODELS" --batch="$BATCH" \
    --dtype="$DTYPE" --impls="$IMPLS" "${NET[@]}" "${TP_ARGS[@]}" --trace_dir="$WORK/traces" \
    --json_out="$WORK/throughput.json"

# --- profile: the loop's real step with the device input ----------------------------------------------------
run_part profile "$B_PROFILE" "$PY" benchmarks/profile_step.py --models="$MODELS" --batch="$BATCH" \
    --dtype="$DTYPE" --input=device --array_cache_dir="$ARRAYS" "${NET[@]}" "${PROF_ARGS[@]}" \
    --trace_dir="$WORK/traces" --json_out="$WORK/profile.json"

# --- end_to_end: one process per model, so a time limit keeps the models already measured ------------------
e2e_part() {
  local model rc=0
  for model in ${MODELS//,/ }; do
    "$PY" benchmarks/end_to_end.py --models="$model" --modes=device --batch="$BATCH" --dtype="$DTYPE" \
        --array_cache_dir="$ARRAYS" "${NET[@]}" "${E2E_ARGS[@]}" --json_out="$WORK/e2e_$model.json" || rc=1
  done
  return $rc
}
run_part end_to_end "$B_END_TO_END" e2e_part

# --- accuracy: the shared recipe as configs/ set it; device input, bf16 -------------------------------------
# The driver gets the part's time less a margin, so it stops its runs itself and writes its JSON.
acc_part() {
  local extra=() o
  for o in ${ACC_OVERRIDES:-}; do extra+=("--override=$o"); done
  "$PY" benchmarks/accuracy_run.py --models="$ACC_MODELS" --root="$WORK/acc" --budget_s=$((PART_LIMIT - 25)) \
      "${ACC_ARGS[@]}" --override=--config.input=device --override=--config.array_cache_dir="$ARRAYS" \
      --override=--config.dtype="$DTYPE" --override=--config.keep_checkpoints=1 "${extra[@]}" \
      --json_out="$WORK/accuracy.json"
}
run_part accuracy "$B_ACCURACY" acc_part
exit 0
