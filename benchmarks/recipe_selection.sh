#!/usr/bin/env bash
# Recipe selection for issue "make unlabeled data pay", on VALIDATION images only:
# CHASE_DB1 1/8 seed-0 pair (Image_11L/11R), 15 unlabeled, 6 held-out validation images
# (benchmarks/calibration_split_chase_s0; the test split is never evaluated: eval.splits=[val]).
# Two one-thread lanes; every run validates every 250 iterations; a killed script resumes its runs. Usage:
#   bash benchmarks/recipe_selection.sh chase      (then: python benchmarks/collect_runs.py ...)
set -uo pipefail
cd "$(dirname "$0")/.."
SEMISEG=${SEMISEG:-.venv/bin/semiseg}
DATASET=${1:-chase}
if [ "$DATASET" = chase ]; then
  CFG=configs/cpu_small/chase_db1; SPLIT=$PWD/benchmarks/calibration_split_chase_s0
else
  CFG=configs/cpu_small/covid_infnet; SPLIT=$PWD/benchmarks/calibration_split_covid_s0
fi
OUT=runs/selection/$DATASET
LOGS=benchmarks/logs/recipe_selection_$DATASET
mkdir -p "$OUT" "$LOGS"
COMMON=(--set data.split_dir="$SPLIT" --set "eval.splits=[val]" --set train.eval_every=250
        --set train.threads=1 --set train.progress=log
        --set method.dice_weight=1 --set method.dice_squared=true)
SUP=$OUT/supervised_cedice

run() {  # run NAME METHOD_CONFIG [--set ...]: skipped when finished
  local name=$1 method=$2; shift 2
  if [ -f "$OUT/$name/results.json" ]; then echo "done: $name"; return; fi
  local resume=(); [ -f "$OUT/$name/latest.pt" ] && resume=(--resume)
  rm -rf "$OUT/$name.tmp"
  [ -d "$OUT/$name" ] && [ ! -f "$OUT/$name/latest.pt" ] && rm -rf "$OUT/$name"
  echo "start: $name $(date -u +%H:%M:%S)"
  $SEMISEG train --config "$CFG/$method.yaml" --run-dir "$OUT/$name" "${resume[@]}" "${COMMON[@]}" "$@" \
    > "$LOGS/$name.log" 2>&1
  echo "end: $name rc=$? $(date -u +%H:%M:%S)"
}
wait_for() { until [ -f "$1/results.json" ]; do sleep 20; done; }

# Fine-tuning stage: start from the supervised run, 1000 more iterations (half its schedule).
FROM_SUP=(--set train.init_from="$SUP" --set train.iters=1000)
lane_a() {
  run supervised_cedice supervised
  run unimatch_init_freematch_da unimatch "${FROM_SUP[@]}" \
    --set method.pseudo.mask=freematch --set method.pseudo.align=labeled_prior
  run unimatch_init_dice unimatch "${FROM_SUP[@]}" --set method.unlabeled_loss=dice
  run supervised_init_continued supervised "${FROM_SUP[@]}"
}
lane_b() {
  run unimatch_warmup_freematch_da unimatch --set method.warmup_iters=500 --set method.rampup_iters=500 \
    --set method.pseudo.mask=freematch --set method.pseudo.align=labeled_prior
  wait_for "$SUP"
  run unimatch_init_balanced unimatch "${FROM_SUP[@]}" --set method.unlabeled_loss=balanced_ce
  run mean_teacher_init mean_teacher "${FROM_SUP[@]}"
}
lane_a > "$LOGS/lane_a.txt" 2>&1 &
lane_b > "$LOGS/lane_b.txt" 2>&1 &
wait
