#!/usr/bin/env bash
# The GPU figures RESULTS.md's ImageNet projection rests on (images/s per GPU for extraction
# and CAMs, the scale run with real GPUs), for a machine with a CUDA GPU: the device tool's
# machine or your own. From the repository root:   bash benchmarks/gpu.sh
# Everything it prints also goes to benchmarks/gpu-results.txt ($OUT/gpu-results.txt when
# $OUT is set, as on the device machine); copy the TARGET lines into RESULTS.md.
set -uo pipefail
PY=${PY:-.venv/bin/python}
if [ ! -x "$PY" ]; then make install >/dev/null || exit 1; PY=.venv/bin/python; fi
DATA=${DATA:-../shared/data/imagenet-sample}
LOG=${OUT:-benchmarks}/gpu-results.txt
export PYTHONPATH=.
{
  date -u; uptime
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi: not a GPU machine"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
  # extraction: EfficientNet-Lite0 (real weights) and ResNet-50 (random weights: same cost)
  "$PY" benchmarks/extract.py --data "$DATA" --limit 800 --batch-size 128
  "$PY" benchmarks/extract.py --data "$DATA" --limit 800 --batch-size 128 --backbone resnet50 --weights random
  # the decoders: per-image cost (nvJPEG beside PIL's), then extraction decoding in the GPU actor
  "$PY" benchmarks/decode.py --data "$DATA" --limit 800
  "$PY" benchmarks/extract.py --data "$DATA" --limit 800 --batch-size 128 --decoder auto
  # CAMs from images and from the cache
  "$PY" benchmarks/cams.py --data "$DATA" --images 800 --batch-size 128
  # the simulated cluster with the GPU visible to the model actors
  "$PY" benchmarks/scale.py --images 20000 --compare 5000
} 2>&1 | tee "$LOG"
