#!/usr/bin/env bash
# Issues 25 and 31: everything a lent GPU machine has to run, in two device calls that fit a 15-minute lease.
#
#   bash benchmarks/gpu.sh main    # ONE call, about 7 minutes: env (device, peak, SDPA kernel); ViT-L/16 at 1024 on
#                                  # 300 JPEGs of 2-12 MP: model-only, end to end with the new writer, the pipeline's
#                                  # ceiling (stub encoder, writes and dropped); ViT-S/16 and ViT-B/16 at 512 with CPU
#                                  # and with GPU decode; a profile of the eager ViT-L forward (matmul/attention/other)
#   bash benchmarks/gpu.sh extra   # the optional second call, at most 5 minutes: the gpu-marked tests (all but
#                                  # --compile; --decode gpu's pixel and cosine bounds among them), --compile (its
#                                  # gpu test, and gain and compile seconds on one bucket shape), HF's processor vs ours
#   QUICK=1 DEVICE=cpu bash benchmarks/gpu.sh main   # the dry run on the CPU VM: tiny sizes, the same code paths
#                                                    # (GPU decode is skipped there: it needs CUDA)
#
# Every step has its own time box (`timeout`) and writes its own file under $OUT as soon as it ends, so a call that
# runs out of time still brings back what finished. At most 8 files come back from a call: main writes gpu.log,
# results-gpu-env.json, results-gpu-vitl16-1024.json, results-gpu-small.json, results-gpu-profile.json; extra writes gpu-extra.log, pytest-gpu.log, results-gpu-compile.json,
# results-gpu-hf-compare.json.
#
# The device machine has torch (CUDA), transformers, accelerate, torchvision, pytest; it lacks zarr and its
# dependencies, which travel as cp312 wheels in the ignored folder .whl/ (benchmarks/gpu_wheels.sh; docs/benchmarks.md,
# "GPU run"): they are installed with --no-deps into /tmp/site, and torch is never installed there.
set -uo pipefail
cd "$(dirname "$0")/.."
PART=${1:-main}
OUT=${OUT:-/tmp/dinofeat-gpu-out}
QUICK=${QUICK:-0}
DEVICE=${DEVICE:-cuda}
IMAGES=${IMAGES:-/tmp/dinofeat-gpu-images}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ! python3 -c "import zarr" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}
LOG="$OUT/gpu.log"
[ "$PART" = extra ] && LOG="$OUT/gpu-extra.log"
START=$(date +%s)
log() { echo "[$(date +%T) +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
step() {  # seconds, command...: one time-boxed step; its failure or timeout is logged, the call goes on
  local limit=$1; shift
  log "+ (<= ${limit}s) $*"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || log "step ended with $rc$([ "$rc" = 124 ] && echo ' (timed out)')"
}

if [ "$QUICK" = 1 ]; then
  COUNT=24; MP="0.3 0.6"; NAIVE=8; AREA_L=256; AREA_S=128; PHOTO_AREA=128; COMPILED=vits16; MAIN=vits16
else
  COUNT=300; MP="2 4 8 12"; NAIVE=60; AREA_L=1024; AREA_S=512; PHOTO_AREA=512; COMPILED=vitl16; MAIN=vitl16
fi

images() {  # the folder of both calls (made again by each: a machine starts bare), ~20 s on 16 cores
  [ -d "$IMAGES" ] && return
  # shellcheck disable=SC2086  # MP is a list
  step 60 python3 benchmarks/make_images.py "$IMAGES" --count "$COUNT" --megapixels $MP --jobs "$(nproc)"
}

extract_one() {  # limit model area out [more extract.py options]
  local limit=$1 model=$2 area=$3 out=$4; shift 4
  step "$limit" python3 benchmarks/extract.py --images "$IMAGES" --model "random:$model" --area "$area" \
    --device "$DEVICE" --json "$OUT/$out" "$@"
}

part_main() {  # time boxes: 15 + 30 + 45 + 150 + 4 x 40 + 25 s = 7.1 minutes at most
  step 15 nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv
  step 30 python3 benchmarks/gpu_env.py --device "$DEVICE" --json "$OUT/results-gpu-env.json"
  images
  # bench: model-only, end to end, and the pipeline's ceiling (a stub encoder, with and without writes) in one file
  extract_one 150 "$MAIN" "$AREA_L" results-gpu-vitl16-1024.json --naive-count 0
  local small="$OUT/results-gpu-small" decodes="cpu"
  [ "$DEVICE" = cuda ] && decodes="cpu gpu"
  for m in vits16 vitb16; do
    for d in $decodes; do
      extract_one 40 "$m" "$AREA_S" "results-gpu-small-$m-$d.json" --naive-count 0 --decode "$d"
    done
  done
  python3 - "$small" <<'PY' 2>&1 | tee -a "$LOG"   # one file for the four (at most 8 files come back)
import json, pathlib, sys
base = pathlib.Path(sys.argv[1])
found = sorted(base.parent.glob(f"{base.name}-*.json"))
parts = {f.stem[len(base.name) + 1:]: json.loads(f.read_text()) for f in found}
(base.parent / f"{base.name}.json").write_text(json.dumps(parts, indent=2))
for f in found:
    f.unlink()
print(f"results-gpu-small.json: {sorted(parts)}")
PY
  step 25 python3 benchmarks/profile_model.py --model "random:$MAIN" --area "$AREA_L" --batch 15 --device "$DEVICE" \
    --dtype "$([ "$DEVICE" = cuda ] && echo fp16 || echo fp32)" --steps "$([ "$QUICK" = 1 ] && echo 1 || echo 3)" \
    --json "$OUT/results-gpu-profile.json"
}

part_extra() {  # time boxes: 140 + 60 + 20 + 60 + 30 s = 5.2 minutes at most
  log "+ (<= 140s) pytest -m gpu -k 'not compile'"
  timeout --kill-after=10 140 python3 -m pytest -q -p no:cacheprovider -m gpu -k "not compile" tests/test_gpu.py -rs \
    -s > "$OUT/pytest-gpu.log" 2>&1
  log "pytest: $(tail -1 "$OUT/pytest-gpu.log")"
  log "+ (<= 60s) pytest -m gpu -k compile"
  timeout --kill-after=10 60 python3 -m pytest -q -p no:cacheprovider -m gpu -k compile tests/test_gpu.py -rs 2>&1 \
    | tail -3 | tee -a "$LOG"
  local one=/tmp/dinofeat-gpu-one-shape
  [ -d "$one" ] || step 20 python3 benchmarks/make_images.py "$one" --count 64 --megapixels 2 --aspect 4:3 \
    --jobs "$(nproc)"
  IMAGES=$one extract_one 60 "$COMPILED" "$AREA_L" results-gpu-compile.json --naive-count 0 --compile
  # real photographs: scikit-image's (installed there), as the tests use them; else the repo's examples
  local photos=/tmp/dinofeat-photos
  python3 -c "from pathlib import Path; from tests.helpers import real_photos; real_photos(Path('$photos'))" \
    2>>"$LOG" || photos=docs/examples/images
  step 30 python3 benchmarks/hf_compare.py --images "$photos" --model random:vitl16 --area "$PHOTO_AREA" \
    --device "$DEVICE" --json "$OUT/results-gpu-hf-compare.json"
}

case "$PART" in
  main) part_main ;;
  extra) part_extra ;;
  *) echo "usage: $0 main|extra" >&2; exit 2 ;;
esac
log "done: $PART in $(( $(date +%s) - START ))s"
