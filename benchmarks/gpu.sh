#!/usr/bin/env bash
# Issue 10 in one script: everything a lent GPU machine has to run, results and logs under $OUT.
#
#   bash benchmarks/gpu.sh tests    # env + SDPA kernel, the gpu-marked tests, HF processor comparison
#   bash benchmarks/gpu.sh bench    # the 1,000-JPEG folder (2-12 MP): ViT-L/16 at 1024 and 512, model-only / end to
#                                   # end / naive, write GB/s
#   bash benchmarks/gpu.sh small    # the same for ViT-B/16 and ViT-S/16 at 512 (decode- or write-bound?)
#   bash benchmarks/gpu.sh compile  # --compile: gain and compile seconds (ViT-L/16 1024, ViT-S/16 512)
# Each part is one device call (under 10 minutes; the folder is made again by each, ~1 minute on 16 cores).
#   QUICK=1 DEVICE=cpu bash benchmarks/gpu.sh all   # the dry run on the CPU VM: tiny sizes, same code paths
#
# The device machine has torch (CUDA), transformers, accelerate, torchvision, pytest; it lacks zarr and its
# dependencies, which travel as cp312 wheels in the ignored folder .whl/ (see docs/benchmarks.md, "GPU run"):
# they are installed with --no-deps into /tmp/site, and torch is never installed there.
set -uo pipefail
cd "$(dirname "$0")/.."
PART=${1:-all}
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
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/gpu.log"; }
run() { log "+ $*"; "$@" 2>&1 | tee -a "$OUT/gpu.log"; }

if [ "$QUICK" = 1 ]; then
  COUNT=24; MP="0.3 0.6"; NAIVE=8; AREA_L=256; AREA_S=128; MODELS_S="vits16"; PHOTO_AREA=128
else
  COUNT=1000; MP="2 4 8 12"; NAIVE=200; AREA_L=1024; AREA_S=512; MODELS_S="vitl16 vitb16 vits16"; PHOTO_AREA=512
fi

images() {
  if [ ! -d "$IMAGES" ]; then
    # shellcheck disable=SC2086  # MP is a list
    run python3 benchmarks/make_images.py "$IMAGES" --count "$COUNT" --megapixels $MP --jobs "$(nproc)"
  fi
}

part_tests() {
  run nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv || true
  run python3 benchmarks/gpu_env.py --device "$DEVICE" --json "$OUT/env.json"
  log "+ pytest -m gpu"
  python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -rs 2>&1 | tee "$OUT/pytest-gpu.log" | tail -5
  tail -1 "$OUT/pytest-gpu.log" | tee -a "$OUT/gpu.log"
  # real photographs: scikit-image's (installed there), as the tests use them; else the repo's examples
  photos=/tmp/dinofeat-photos
  python3 -c "from pathlib import Path; from tests.helpers import real_photos; real_photos(Path('$photos'))" \
    2>>"$OUT/gpu.log" || photos=docs/examples/images
  run python3 benchmarks/hf_compare.py --images "$photos" --model random:vitl16 --area "$PHOTO_AREA" \
    --device "$DEVICE" --json "$OUT/hf-compare.json"
}

extract_one() {  # model area
  run python3 benchmarks/extract.py --images "$IMAGES" --model "random:$1" --area "$2" --device "$DEVICE" \
    --naive-count "$NAIVE" --json "$OUT/extract-$1-$2.json"
}

part_bench() {  # ViT-L/16, where the model is the bottleneck
  images
  extract_one vitl16 "$AREA_L"
  [ "$QUICK" = 1 ] || extract_one vitl16 "$AREA_S"
}

part_small() {  # smaller models at 512, where decoding (or writing) may be the bottleneck
  images
  for m in $MODELS_S; do
    [ "$m" = vitl16 ] || extract_one "$m" "$AREA_S"
  done
}

part_compile() {
  images
  specs=("vitl16 $AREA_L" "vits16 $AREA_S")
  [ "$QUICK" = 1 ] && specs=("vits16 $AREA_S")
  for spec in "${specs[@]}"; do
    set -- $spec
    run python3 benchmarks/extract.py --images "$IMAGES" --model "random:$1" --area "$2" --device "$DEVICE" \
      --naive-count 0 --compile --json "$OUT/compile-$1-$2.json"
  done
}

case "$PART" in
  tests) part_tests ;;
  bench) part_bench ;;
  small) part_small ;;
  compile) part_compile ;;
  all) part_tests; part_bench; part_small; part_compile ;;
  *) echo "usage: $0 tests|bench|small|compile|all" >&2; exit 2 ;;
esac
log "done: $PART"
