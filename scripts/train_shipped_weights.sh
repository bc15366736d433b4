#!/usr/bin/env bash
# Train the shipped light weights (apps/mais/model/mais_light.pt) on one GPU, one stage per call.
#
#   scripts/train_shipped_weights.sh data   WORK              # training crops from sample-data's final labels
#   scripts/train_shipped_weights.sh stage1 WORK [BUDGET_S]   # light encoder + whole network, memory none
#   scripts/train_shipped_weights.sh stage2 WORK [BUDGET_S]   # encoder frozen, MAIS memory (both) fine-tuning
#   scripts/train_shipped_weights.sh export WORK [STAGE]      # STAGE (stage2) -> WORK/mais_light.pt in fp16
#
# A stage rerun with the same WORK resumes from its checkpoint (fit's --resume), so a stage longer than one
# device call (10 minutes) is several calls. Seeds are fixed. Held out of training, for evaluation: the
# structures in HELD_OUT and the whole breast1 case (unlabelled in sample-data). Extra arguments after the
# budget go to lib.training.fit (e.g. --lr 1e-3).
set -euo pipefail
stage=$1
work=$(realpath -m "$2")
budget=${3:-540}
source_stage=${3:-stage2}  # export only
shift $(($# < 3 ? $# : 3))
HELD_OUT=amygdala_left,amygdala_right
PY=${PYTHON:-python3}
cd "$(dirname "$0")/../apps/mais"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$work"

resume_or_init() {  # continue a stage that already checkpointed, else start it with the given arguments
  if [ -f "$1.state.pt" ]; then echo --resume "$1.state.pt"; else echo "${@:2}"; fi
}

common=(--no-deterministic --time-budget-s "$budget" --log-every 25 --checkpoint-every 100 --seed 0)
case $stage in
  data)
    $PY -m lib.training.real_data --studies ../../sample-data --out "$work/pairs" --crops-per-structure 8 \
      --exclude "$HELD_OUT"
    ;;
  stage1)
    # shellcheck disable=SC2046
    $PY -m lib.training.fit --out "$work/stage1.pt" --encoder light --train-encoder --memory-mode none \
      --steps 3000 --batch-size 32 --clicks 5 --lr 3e-4 --warmup-steps 50 --ce-weight 1.0 \
      --data-dir "$work/pairs" --synthetic-fraction 0.6 "${common[@]}" \
      $(resume_or_init "$work/stage1.pt") "$@"
    ;;
  stage2)
    # shellcheck disable=SC2046
    $PY -m lib.training.fit --out "$work/stage2.pt" --freeze-encoder --memory-mode both --memory-size 60 \
      --steps 3000 --batch-size 32 --clicks 10 --lr 1e-4 --warmup-steps 20 --ce-weight 1.0 \
      --data-dir "$work/pairs" --synthetic-fraction 0.5 --synthetic-pool 1000 "${common[@]}" \
      $(resume_or_init "$work/stage2.pt" --init "$work/stage1.pt") "$@"
    ;;
  export)
    $PY -c "import sys, torch; from lib.model.build import load_mais, save_mais
save_mais(load_mais(sys.argv[1]), sys.argv[2], storage_dtype=torch.float16,
          metadata={'trained_by': 'scripts/train_shipped_weights.sh', 'held_out': '$HELD_OUT,breast1'})" \
      "$work/$source_stage.pt" "$work/mais_light.pt"
    ;;
  *) echo "unknown stage $stage (data, stage1, stage2, export)" >&2; exit 2 ;;
esac
