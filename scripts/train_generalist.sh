#!/usr/bin/env bash
# One generalist training run on the device tool: the whole network, continued from the shipped weights, on
# samples synthesised on the GPU from the label-map cache (90%, magnified 1-4x to the voxels serving uses) and
# synthetic shapes (10%), mixed click rules. Without the full-resolution refinement head since run 7: runs 4-6
# trained one (`--refinement`), it added nothing measurable and the shipped file dropped it. Every run is a warm
# restart from the committed weights (apps/mais/model/mais_light.pt, fp16): a fresh AdamW and a learning rate
# that warms up and decays over the run's time budget, so device sessions add up.
#
#   scripts/train_generalist.sh OUT BATCH LR BUDGET_S SEED [CLICKS] [CLICK_LOSS_WEIGHT] [HIGH_RES] [HIGH_RES_LR_SCALE]
#
# CLICKS: interaction steps K per sample (default 10). CLICK_LOSS_WEIGHT: the weight of the cross-entropy at the
# clicks themselves (default 0: runs 1-15 trained without it). HIGH_RES: 1 adds the decoder's high-resolution
# image features (lib/model/high_res_features.py; they start at zero where the weights lack them), 2 adds them with
# the clicks and previous mask drawn in (--high-res-prompts), 3 with those and the residual convolution block on
# the decoder's 32^3 features (--high-res-context), 0 drops them, unset keeps the weights' own.
# HIGH_RES_LR_SCALE: their learning rate is LR x this (default 1; they start from zero, and at 1 they had barely
# moved after run 21's 21 minutes).
# OUT gets gen.pt (fp32), gen16.pt.part-* (the fp16 weights in pieces under the device's 16 MiB file limit:
# `cat gen16.pt.part-* > apps/mais/model/mais_light.pt` here), train_log.txt and gpu_util.txt (nvidia-smi's
# SM busy share every 5 s). The device call (benchmarks/results/generalist/README.md has the ones that ran):
#
#   python scripts/build_training_cache.py          # here, once: data-cache/training_cache.npz
#   # .whl/: monai, nibabel, medim, appdirs, pydantic, pydantic-core, annotated-types, typing-inspection and
#   # typing-extensions wheels for the device's Python 3.12 (the device tool's README says how to download them)
#   run(command="bash scripts/train_generalist.sh $OUT 96 3e-4 420 4", carry=[".whl", "data-cache"])
set -euo pipefail
out=$(realpath -m "$1") batch=$2 lr=$3 budget=$4 seed=$5 clicks=${6:-10} click_loss_weight=${7:-0} high_res_lr_scale=${9:-1}
case ${8:-} in
  3) high_res=(--high-res-features --high-res-prompts --high-res-context) ;;
  2) high_res=(--high-res-features --high-res-prompts) ;;
  1) high_res=(--high-res-features --no-high-res-prompts) ;;
  0) high_res=(--no-high-res-features) ;;
  *) high_res=() ;;
esac
repo=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}  # e.g. PYTHON=.venv/bin/python to try it here on the CPU
export PYTHONUNBUFFERED=1
if ! $PY -c "import monai, nibabel, medim, pydantic" 2>/dev/null; then  # the device: the carried wheels
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$repo"/.whl/*.whl
  export PYTHONPATH=/tmp/site
fi
mkdir -p "$out" /tmp/run
cd "$repo/apps/mais"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi dmon -s u -d 5 >"$out/gpu_util.txt" 2>&1 &
  trap 'kill $! 2>/dev/null' EXIT
fi
$PY -m lib.training.fit --init model/mais_light.pt --train-encoder \
  --training-cache ../../data-cache/training_cache.npz --cache-fraction 0.9 --click-mix mixed --clicks "$clicks" \
  --click-loss-weight "$click_loss_weight" "${high_res[@]}" --high-res-lr-scale "$high_res_lr_scale" \
  --batch-size "$batch" --lr "$lr" --warmup-steps 10 --ce-weight 1.0 --steps 100000 --time-budget-s "$budget" \
  --no-deterministic --log-every 10 --checkpoint-every 100000 --seed "$seed" --out /tmp/run/gen.pt 2>&1 \
  | grep --line-buffered -v nvImage | tee "$out/train_log.txt"
$PY -c "import sys, torch; from lib.model.weights import load_mais, save_mais
save_mais(load_mais(sys.argv[1]), sys.argv[2], storage_dtype=torch.float16,
          metadata={'trained_by': 'scripts/train_generalist.sh', 'seed': int(sys.argv[3])})" \
  /tmp/run/gen.pt /tmp/run/gen16.pt "$seed"
split -b 15M /tmp/run/gen16.pt "$out/gen16.pt.part-"
