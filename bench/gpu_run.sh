#!/usr/bin/env bash
# How bench/results/<gpu>.json and the GPU architectures table were made: one call on a lent GPU machine that has
# torch with CUDA but none of monai / pydicom / lime / qrcode / pyzbar and no internet. Everything else travels in
# .gpu/ (git-ignored), prepared on a machine with pip:
#   .gpu/whl/    wheels: monai, pydicom, nibabel, pytorch-ignite, qrcode, pyzbar, reedsolo (pip download --python-version 3.12)
#                and lime (pip wheel --no-deps lime==0.2.0.1: lime ships an sdist only)
#   .gpu/zbar/   libzbar.so.0 and the libraries it links (ldd); only those the GPU machine lacks are installed
#   .gpu/wm_unet_seed0.pt   a watermarked demo UNet (enables the bench's LIME sample sweep)
# Usage there: OUT=<folder> bash bench/gpu_run.sh   (writes bench JSON, one results JSON per network, log.txt)
# A dry run anywhere: BENCH_ARGS=--smoke ARCH_ARGS='--steps 4 --lime-samples 20' DEADLINE=300 OUT=/tmp/g bash bench/gpu_run.sh
set -u
OUT=${OUT:-/tmp/stealthmark_gpu}
G=.gpu
mkdir -p "$OUT"
LOG=$OUT/log.txt
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $G/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
# libzbar for pyzbar: add only the libraries the machine lacks (never shadow its own)
mkdir -p /opt/zbar && cp $G/zbar/libzbar.so.0 /opt/zbar/
echo /opt/zbar >/etc/ld.so.conf.d/zz-zbar.conf
for _ in 1 2 3; do
  ldconfig
  for l in $(ldd /opt/zbar/libzbar.so.0 | awk '/not found/{print $1}'); do cp $G/zbar/"$l" /opt/zbar/ && echo "zbar: added $l"; done
done
ldconfig
# the Sunnybrook slices travel with the working tree (data/sunnybrook, the commands' default --data)
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, monai, numpy; print('torch', torch.__version__, 'monai', monai.__version__, 'numpy', numpy.__version__)"
  python3 -c "
from monai_stealthmark.key import WatermarkKey
from monai_stealthmark.key.qr import decode_qr
k = WatermarkKey.generate('zbar check', seed=1)
print('pyzbar decodes the key QR:', decode_qr(k.qr_matrix))"
} 2>&1 | tee "$LOG"

# 1. benchmarks (alone on the machine: timings)
python3 -m bench.benchmarks --out "$OUT" --model $G/wm_unet_seed0.pt ${BENCH_ARGS:-} 2>&1 | grep -v -i "warn\|nvimagecodec" | tee -a "$LOG"
echo "bench done at ${SECONDS}s" | tee -a "$LOG"

# 2. the architectures table: every network in its own process, side by side on the one GPU (each is small and
#    launch-bound); each copies its results.json to $OUT when it finishes
LEFT=$((${DEADLINE:-560} - SECONDS))
arch() {
  local name=$1; shift
  OMP_NUM_THREADS=2 timeout "$LEFT" python3 -m experiments.architectures --out /tmp/arch_"$name" "$@" ${ARCH_ARGS:-} >/tmp/arch_"$name".log 2>&1
  local rc=$?
  for f in /tmp/arch_"$name"/*/results.json; do [ -f "$f" ] && cp "$f" "$OUT/arch_$name.json"; done
  echo "== $name (exit $rc, ${SECONDS}s)"; grep -v -i "warn\|nvimagecodec" /tmp/arch_"$name".log | tail -4
}
A="--fast --lime-samples 1000"
arch unet $A --archs unet >>"$LOG" 2>&1 &
arch basicunet $A --archs basicunet >>"$LOG" 2>&1 &
arch attentionunet $A --archs attentionunet >>"$LOG" 2>&1 &
arch swinunetr $A --archs swinunetr >>"$LOG" 2>&1 &
arch segresnet $A --archs segresnet >>"$LOG" 2>&1 &
arch segresnet3000 $A --archs segresnet --steps 3000 >>"$LOG" 2>&1 &
wait
echo "all done at ${SECONDS}s" | tee -a "$LOG"
