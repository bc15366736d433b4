#!/usr/bin/env bash
# Draws round 5's plots and prints their tables from the evaluations in device/ and shipped_cpu/ (README.md).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/../../../../apps/mais"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
D=$here/device
held=colin27_t1:amygdala_left,colin27_t1:amygdala_right,breast1:lesion
trained=brain1:lesion,lung1:lesion,icbm2009a_t1:grey_matter,icbm2009a_t1:white_matter,icbm2009a_t1:other_brain
for side in left right; do
  for s in caudate hippocampus pallidum precentral putamen thalamus; do trained+=,colin27_t1:${s}_$side; done
done
# the 15 structures outside pairs_small's 30% (caudate right, hippocampus left, pallidum left, precentral right,
# putamen left: lib.training.real_data --structure-fraction 0.3 prints them)
small_held=brain1:lesion,lung1:lesion,breast1:lesion,icbm2009a_t1:grey_matter,icbm2009a_t1:white_matter
small_held+=,icbm2009a_t1:other_brain,colin27_t1:amygdala_left,colin27_t1:amygdala_right,colin27_t1:caudate_left
small_held+=,colin27_t1:hippocampus_right,colin27_t1:pallidum_right,colin27_t1:precentral_left
small_held+=,colin27_t1:putamen_right,colin27_t1:thalamus_left,colin27_t1:thalamus_right
modes=(both_latest none_latest sparse_latest dense_latest both_n10_latest both_all none_all)
seeds=(both_latest both_latest_seed1 both_latest_seed2 none_latest none_latest_seed1 none_latest_seed2)
files() { local prefix=$1; shift; for name in "$@"; do echo "$D/${prefix}_$name/summary.json"; done; }
plot() {  # PNG TITLE STRUCTURES (empty: all) SUMMARY...
  local out=$1 title=$2 structures=$3
  shift 3
  echo "## $title"
  python -m lib.evaluation.plot "$@" "$here/$out" --title "$title" ${structures:+--structures "$structures"}
}

# shellcheck disable=SC2046
{
  plot heldout_real.png "3 held-out structures (amygdalae, breast1 lesion), center rule" "$held" \
    $(files sample "${modes[@]}")
  plot trained_real.png "17 trained structures, center rule" "$trained" $(files sample "${modes[@]}")
  plot heldout_synthetic.png "20 held-out synthetic volumes, center rule" "" $(files synth "${modes[@]}")
  plot small_data.png "small data (5 structures trained): the 15 others, center rule" "$small_held" \
    $(files sample both_small_latest none_small_latest)
  plot seeds_heldout_synthetic.png "20 held-out synthetic volumes, prompt latest, three seeds, center rule" "" \
    $(files synth "${seeds[@]}")
  plot seeds_heldout_real.png "3 held-out structures, prompt latest, three seeds, center rule" "$held" \
    $(files sample "${seeds[@]}")
  plot seeds_trained_real.png "17 trained structures, prompt latest, three seeds, center rule" "$trained" \
    $(files sample "${seeds[@]}")
}
for set in sample_data heldout_synthetic; do
  plot shipped_cpu/$set/dice_vs_clicks.png "shipped round 5 against round 4, $set, center rule, CPU" "" \
    "$here/shipped_cpu/$set/summary.json"
done
