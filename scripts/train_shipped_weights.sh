#!/usr/bin/env bash
# Train and evaluate the shipped light weights and the memory comparison (docs/MODEL_CARD.md,
# benchmarks/results/memory_comparison/README.md has the calls that ran on the device tool).
#
#   scripts/train_shipped_weights.sh data     WORK                     # training crops from sample-data's labels
#   scripts/train_shipped_weights.sh stage1   WORK [BUDGET_S] [GPUS] [INIT]  # light encoder + whole network, memory
#                                                                      # none; batch 24 per GPU; from INIT if given
#   scripts/train_shipped_weights.sh stage2   WORK MODE N DATA [BUDGET_S] [MEMORY_LR_SCALE] [PROMPT_CLICKS]
#                                        # encoder frozen, memory MODE, size N, DATA = pairs (all) or pairs_small
#                                        # (30%); the memory attention learns at MEMORY_LR_SCALE x lr (default 1);
#                                        # PROMPT_CLICKS all (default) or latest (MaisConfig.prompt_clicks);
#                                        # SEED=N in the environment repeats a run with another seed
#   scripts/train_shipped_weights.sh evaluate WORK OUT WEIGHTS...      # held-out structures, 10 clicks, 3 rules
#   scripts/train_shipped_weights.sh export   WORK STAGE2_NAME         # -> WORK/mais_light.pt in fp16
#
# Every stage-2 run has the same budget (steps x batch; a time budget cuts it short, so give runs equal GPUs) and
# starts from the same stage-1 network with a fresh memory attention, so the modes differ only in their memory. A
# stage rerun with the same WORK resumes from its checkpoint (fit's --resume). Seeds are fixed. Held out of all
# training, for evaluation: the structures in HELD_OUT and the whole breast1 case (sample-data has no label for
# it; tests/data has its lesion), which no earlier weights saw either, so a stage 1 may continue from them (INIT).
# The shipped weights were then trained further by scripts/train_generalist.sh (docs/MODEL_CARD.md).
set -euo pipefail
stage=$1
work=$(realpath -m "$2")
shift 2
HELD_OUT=amygdala_left,amygdala_right
STAGE2_STEPS=1000
PY=${PYTHON:-python3}
caller_dir=$PWD  # paths given as arguments are relative to it
cd "$(dirname "$0")/../apps/mais"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$work"

resume_or_init() {  # continue a stage that already checkpointed, else start it with the given arguments
  if [ -f "$1.state.pt" ]; then echo --resume "$1.state.pt"; else echo "${@:2}"; fi
}

SEED=${SEED:-0}  # another seed repeats a stage-2 run to measure the spread between runs (name suffix _seed<N>)
common=(--no-deterministic --log-every 25 --checkpoint-every 100 --seed "$SEED")
case $stage in
  data)
    $PY -m lib.training.real_data --studies ../../sample-data --out "$work/pairs" --crops-per-structure 8 \
      --zoomed-crops-per-structure 12 --exclude "$HELD_OUT"
    $PY -m lib.training.real_data --studies ../../sample-data --out "$work/pairs_small" --crops-per-structure 8 \
      --zoomed-crops-per-structure 12 --exclude "$HELD_OUT" --structure-fraction 0.3
    ;;
  stage1)
    budget=${1:-540}
    gpus=${2:-1}
    init=${3:-}  # optional: continue from these weights (e.g. an earlier stage 1) instead of from scratch
    start=(--encoder light)
    [ -n "$init" ] && start=(--init "$(cd "$caller_dir" && realpath "$init")")
    # shellcheck disable=SC2046
    $PY -m lib.training.fit --out "$work/stage1.pt" --train-encoder --memory-mode none \
      --steps 3000 --batch-size 24 --gpus "$gpus" --clicks 4 --lr 3e-4 --warmup-steps 50 \
      --ce-weight 1.0 --data-dir "$work/pairs" --synthetic-fraction 0.6 --synthetic-workers 12 \
      --time-budget-s "$budget" "${common[@]}" \
      $(resume_or_init "$work/stage1.pt" "${start[@]}")
    ;;
  stage2)
    mode=$1 size=$2 data=$3 budget=${4:-540} memory_lr_scale=${5:-1} prompt_clicks=${6:-all}
    name=stage2_${mode}_n${size}_${data}
    if [ "$memory_lr_scale" != 1 ]; then name=${name}_memlr${memory_lr_scale}; fi
    if [ "$prompt_clicks" != all ]; then name=${name}_${prompt_clicks}; fi
    if [ "$SEED" != 0 ]; then name=${name}_seed${SEED}; fi
    # shellcheck disable=SC2046
    $PY -m lib.training.fit --out "$work/$name.pt" --freeze-encoder --memory-mode "$mode" --memory-size "$size" \
      --prompt-clicks "$prompt_clicks" --steps $STAGE2_STEPS --batch-size 16 --clicks 10 --lr 2e-4 \
      --memory-lr-scale "$memory_lr_scale" \
      --warmup-steps 20 --ce-weight 1.0 --data-dir "$work/$data" --synthetic-fraction 0.5 --synthetic-workers 12 \
      --time-budget-s "$budget" \
      "${common[@]}" $(resume_or_init "$work/$name.pt" --init "$work/stage1.pt" --fresh-memory)
    ;;
  evaluate)
    out=$(realpath -m "$1")
    shift
    weights=()
    for name in "$@"; do weights+=("$work/$name.pt=$name"); done
    $PY -m lib.evaluation.evaluate --studies ../../sample-data --structures "$HELD_OUT,lesion" \
      --images colin27_t1,breast1 \
      --extra ../../sample-data/breast1.nii.gz=../../tests/data/breast1_lesion_label.nii.gz \
      --weights "${weights[@]}" --rules center,random,noisy --clicks 10 --device "${DEVICE:-cuda}" --out "$out"
    ;;
  export)
    $PY -c "import sys, torch; from lib.model.weights import load_mais, save_mais
save_mais(load_mais(sys.argv[1]), sys.argv[2], storage_dtype=torch.float16,
          metadata={'trained_by': 'scripts/train_shipped_weights.sh', 'source': sys.argv[3],
                    'held_out': '$HELD_OUT,breast1'})" \
      "$work/$1.pt" "$work/mais_light.pt" "$1"
    ;;
  *) echo "unknown stage $stage (data, stage1, stage2, evaluate, export)" >&2; exit 2 ;;
esac
