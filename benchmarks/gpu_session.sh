#!/usr/bin/env bash
# The device check for a session that is lent a GPU machine (H100 / H200): one prepared command that
# fits the device time, most important first, each step bounded so that the whole ends by its deadline.
# Nothing here runs in CI.
#
#   bash benchmarks/gpu_session.sh [SECONDS [STEP ...]]
#
# SECONDS: the script's own deadline (default 500); STEPs: which of tests, presets, lora_memory, bench_unet,
# fused_step, compile, suite, suite_cl to run, in that order (default: all but suite_cl). The order puts first what is
# most needed: the CUDA tests, then the quality presets at SD 1.5 size (balanced and fast: one frame and
# batched, issue 16), the LoRA finetune's peak memory at SD 1.5 size (issue 17: does it fit 12 GB?), then
# what the last device runs (2026-11-26) left unmeasured; the suite's exact
# numbers from then are in benchmarks/results/.
#
# The GPU image has torch, triton, onnx, onnxruntime (CPU), transformers, accelerate, safetensors and
# pybind11, but no diffusers, onnx-graphsurgeon or peft. Prepare them as wheels first (here):
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       --platform any -d .whl diffusers==0.42.1 importlib_metadata onnx-graphsurgeon peft==0.21.2
#
# and call it with `.whl` carried. Everything it writes lands in $OUT/r (or benchmarks/results/gpu_session
# without $OUT) and is packed into $OUT/gpu_session.tar.gz at the end (the device tool brings back at most
# 8 files); unpack it into benchmarks/results/ and commit what it measured, with the device's name.
#
# Steps, in order: the package (the C++ extension builds in the background during the tests, and is
# waited for before anything is timed); the device's facts; the CUDA tests (pytest -m gpu); the balanced
# and fast presets on the SD 1.5-size model (the torch backend, graphs per kind of step); one UNet
# call per precision / layout / attention kernel (bench_unet); the fused step (Triton); torch.compile
# of the UNet (about a minute per shape); the suite at the paper's settings on the SD 1.5-size model
# (baseline vs the torch backend; suite_cl: the torch backend with channels_last).
# Exit status: 0 when every step that ran passed, else 1 (2 for bad arguments).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
DEADLINE=${1:-500}
shift || true
STEPS="tests presets lora_memory bench_unet fused_step compile suite suite_cl"
WANT=" ${*:-tests presets lora_memory bench_unet fused_step compile suite} "
[[ $DEADLINE =~ ^[0-9]+$ ]] || { echo "gpu_session.sh: the deadline must be a number of seconds, got '$DEADLINE'" >&2; exit 2; }
for s in $WANT; do
  [[ " $STEPS " == *" $s "* ]] || { echo "gpu_session.sh: unknown step '$s' (steps: $STEPS)" >&2; exit 2; }
done
FAILED=0
R=${OUT:+$OUT/r}
R=${R:-benchmarks/results/gpu_session}
mkdir -p "$R"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET

left() { echo $((DEADLINE - (SECONDS - START))); }
step() {  # step NAME MAX_SECONDS CMD...: run CMD with a timeout of min(MAX, time left), log to $R/NAME.log
  local name=$1 max=$2; shift 2
  case "$WANT" in *" $name "*) ;; *) return ;; esac
  local t; t=$(left); [ "$t" -gt "$max" ] && t=$max
  if [ "$(left)" -lt 10 ]; then echo "== $name: skipped, $(left) s left" | tee -a "$R/steps.txt"; return; fi
  echo "== $name (up to $t s, $(left) s left)"
  local t0=$SECONDS
  timeout --kill-after=5 "$t" "$@" > "$R/$name.log" 2>&1
  local rc=$?
  [ "$rc" -eq 0 ] || FAILED=$((FAILED + 1))
  echo "== $name: rc $rc in $((SECONDS - t0)) s" | tee -a "$R/steps.txt"
  tail -n 25 "$R/$name.log"
}

if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
# the package without its extension first (seconds), then the extension in the background (a minute):
# the CUDA paths do not use it; the suite's CPU scheduler microbenchmark and `info` do
DREAMPOSE_RT_SKIP_EXT=1 python3 -m pip install -q --no-deps --no-build-isolation -e . > "$R/install.log" 2>&1 \
  || { cat "$R/install.log"; exit 1; }
(MAX_JOBS=16 python3 setup.py build_ext --inplace > "$R/build_ext.log" 2>&1; echo "rc $?" >> "$R/build_ext.log") &
BUILD=$!

{ nvidia-smi; nvidia-smi -q -d CLOCK,POWER,PERFORMANCE; python3 -m pip list 2>/dev/null | grep -iE "^(torch|triton|diffusers|transformers|numpy|onnx|onnxruntime) "; nproc; } > "$R/device.txt" 2>&1

step tests 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/ -o addopts="-ra"
# the build must not share the CPU with anything timed: wait for it (as long as the deadline allows)
while kill -0 $BUILD 2>/dev/null && [ "$(left)" -gt 30 ]; do sleep 1; done
kill -0 $BUILD 2>/dev/null && { pkill -P $BUILD; kill $BUILD; echo "== build_ext: stopped at the deadline" | tee -a "$R/steps.txt"; }
timeout 60 python3 -m dreampose_rt.info > "$R/info.txt" 2>&1
step presets 150 bash -c "python3 -m benchmarks --device cuda --model sd15 --frames 8 --quality balanced \
  --backends torch --repeats 2 --warmup 1 --no-micro --out-dir '$R' && python3 -m benchmarks --device cuda \
  --model sd15 --frames 8 --quality fast --backends torch --repeats 3 --warmup 1 --no-micro --out-dir '$R'"
step lora_memory 120 python3 -m benchmarks.bench_lora_memory --model sd15 --device cuda --modes lora full \
  --rank 4 --steps 3 --results "$R"
step bench_unet 130 python3 -m benchmarks.bench_unet --model sd15 --batches 3 24 \
  --variants fp16,fp16-cl,bf16-cl,fp16-flash,fp16-efficient,fp16-cudnnattn --rounds 5 --results "$R"
step fused_step 40 python3 -m benchmarks.bench_fused_step --frames 1 4 16 --dtype fp16 --rounds 20 \
  --results "$R"
step compile 180 python3 -m benchmarks.bench_unet --model sd15 --batches 3 24 --variants fp16 \
  --rounds 4 --compile default --results "$R"
step suite 170 python3 -m benchmarks --device cuda --model sd15 --frames 8 --baseline-frames 1 \
  --steps 100 --backends baseline,torch --repeats 2 --warmup 1 --micro-rounds 3 --out-dir "$R"
step suite_cl 150 python3 -m benchmarks --device cuda --model sd15 --frames 8 --steps 100 \
  --backends torch --channels-last --repeats 2 --warmup 1 --micro-rounds 2 --out-dir "$R"

timeout 30 tar -czf "${OUT:-benchmarks/results}/gpu_session.tar.gz" -C "$R" . && echo "packed $(ls "$R" | wc -l) files"
echo "== summary ($((SECONDS - START)) s)"
cat "$R/steps.txt"
grep -hE "passed|failed|error" "$R/tests.log" 2>/dev/null | tail -3
grep -h "^fp\|^bf\|^compiled\|^variant" "$R"/bench_unet.log "$R"/compile.log 2>/dev/null
grep -h "^|" "$R"/suite*.log 2>/dev/null | head -24 || true
echo "== $FAILED step(s) failed"
exit $((FAILED > 0))
