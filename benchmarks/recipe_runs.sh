#!/usr/bin/env bash
# Recipe selection runs (docs/studies/recipe-selection.md), on VALIDATION images only
# (eval.splits=[val]: the test split is never evaluated). Held-out splits:
#   chase: benchmarks/calibration_split_chase_s0 (seed-0 pair Image_11L/11R, 15 unlabeled, 6 val)
#   covid: benchmarks/calibration_split_covid_s0 (6 labeled, 34 unlabeled, 10 val)
#   chase_s2 / covid_s2: seed 2's Table 1 labeled sets (the easiest), validation held out of seed 2's
#   unlabeled pool by benchmarks/hold_out_split.py (6 / 10 images); their *_full twins label the rest.
# Usage: bash benchmarks/recipe_runs.sh DATASET RUN [RUN ...]   runs the named runs one after the other,
# one thread each (start two such lanes on 2 cores); a finished run is skipped, a killed one resumes.
# Runs named *_init_* start from the same split's supervised_cedice run (`train.init_from`) and train
# 1000 more iterations; the others have the protocol's full schedule (2000 CHASE / 4000 COVID).
set -uo pipefail
cd "$(dirname "$0")/.."
SEMISEG=${SEMISEG:-.venv/bin/semiseg}
DATASET=$1; shift
case $DATASET in
  chase) DS=chase_db1; SPLIT=$PWD/benchmarks/calibration_split_chase_s0 ;;
  covid) DS=covid_infnet; SPLIT=$PWD/benchmarks/calibration_split_covid_s0 ;;
  chase_s2) DS=chase_db1; SPLIT=$PWD/benchmarks/calibration_split_chase_s2 ;;
  covid_s2) DS=covid_infnet; SPLIT=$PWD/benchmarks/calibration_split_covid_s2 ;;
  *) echo "error: DATASET must be chase, covid, chase_s2 or covid_s2" >&2; exit 2 ;;
esac
OUT=runs/selection/$DATASET
LOGS=benchmarks/logs/recipe_selection_$DATASET
mkdir -p "$OUT" "$LOGS"
EVERY=$([[ "$DATASET" == covid* ]] && echo 500 || echo 250)
# The labeled loss of every run, supervised included: the official medical (CE + Dice)/2.
COMMON=(--set data.split_dir="$SPLIT" --set "eval.splits=[val]" --set train.eval_every="$EVERY"
        --set train.threads=1 --set train.progress=log --set method.dice_weight=1 --set method.dice_squared=true)
SUP=$OUT/supervised_cedice
FROM_SUP=(--set train.init_from="$SUP" --set train.iters=1000)
ADAPT=(--set method.pseudo.mask=freematch --set method.pseudo.align=labeled_prior)
WARM=(--set method.warmup_iters=500 --set method.rampup_iters=500)
# Budget probes for the seed-2 bar: the U-Net 16-...-256 at 96-pixel crops (≈ 1.6× the UniMatch step).
WIDE=(--set "model.widths=[16,32,64,128,256]" --set data.crop_size=96)
FULL=(--set data.split_dir="${SPLIT}_full")  # the split's twin with every training image labeled

args_for() {  # METHOD_CONFIG then overrides, per run name
  case $1 in
    supervised_cedice) echo supervised ;;
    supervised_full) echo supervised "${FULL[@]}" ;;
    supervised_cedice_3000) echo supervised --set train.iters=3000 ;;
    supervised_full_3000) echo supervised "${FULL[@]}" --set train.iters=3000 ;;
    supervised_cedice_w16c96) echo supervised "${WIDE[@]}" ;;
    supervised_full_w16c96) echo supervised "${FULL[@]}" "${WIDE[@]}" ;;
    supervised_init_continued) echo supervised "${FROM_SUP[@]}" ;;
    unimatch_fixed) echo unimatch ;;
    unimatch_warmup_fixed) echo unimatch "${WARM[@]}" ;;
    unimatch_warmup_freematch_da) echo unimatch "${WARM[@]}" "${ADAPT[@]}" ;;
    unimatch_warmup_freematch_da_ema) echo unimatch "${WARM[@]}" "${ADAPT[@]}" --set method.teacher=ema ;;
    # the same run as unimatch_warmup_freematch_da (teacher: self is the default), to pair with the
    # _ema run on the same code and settings
    unimatch_warmup_freematch_da_self) echo unimatch "${WARM[@]}" "${ADAPT[@]}" --set method.teacher=self ;;
    unimatch_warmup_freematch) echo unimatch "${WARM[@]}" --set method.pseudo.mask=freematch ;;
    unimatch_warmup_da) echo unimatch "${WARM[@]}" --set method.pseudo.align=labeled_prior ;;
    unimatch_warmup_flexmatch_da) echo unimatch "${WARM[@]}" --set method.pseudo.mask=flexmatch --set method.pseudo.align=labeled_prior ;;
    unimatch_init_fixed) echo unimatch "${FROM_SUP[@]}" ;;
    unimatch_init_freematch_da) echo unimatch "${FROM_SUP[@]}" "${ADAPT[@]}" ;;
    unimatch_init_dice) echo unimatch "${FROM_SUP[@]}" --set method.unlabeled_loss=dice ;;
    unimatch_init_balanced) echo unimatch "${FROM_SUP[@]}" --set method.unlabeled_loss=balanced_ce ;;
    mean_teacher_init) echo mean_teacher "${FROM_SUP[@]}" ;;
    fixmatch_warmup_freematch_da) echo fixmatch "${WARM[@]}" "${ADAPT[@]}" ;;
    ours_warmup_freematch_da) echo unimatch_supmix_sufd "${WARM[@]}" "${ADAPT[@]}" ;;
    bcp) echo bcp ;;  # BCP's own loss and stages (COMMON's labeled-loss settings are its defaults)
    bcp_all_components) echo bcp --set method.largest_cc=false ;;
    *) return 1 ;;
  esac
}

for name in "$@"; do
  if ! spec=$(args_for "$name"); then echo "error: unknown run $name" >&2; exit 2; fi
  read -r -a spec <<< "$spec"
  if [ -f "$OUT/$name/results.json" ]; then echo "done: $name"; continue; fi
  if [[ $name == *_init_* ]]; then until [ -f "$SUP/results.json" ]; do sleep 20; done; fi
  resume=(); [ -f "$OUT/$name/latest.pt" ] && resume=(--resume)
  [ -d "$OUT/$name" ] && [ ! -f "$OUT/$name/latest.pt" ] && rm -rf "$OUT/$name"
  echo "start: $name $(date -u +%H:%M:%S)"
  $SEMISEG train -c configs/protocols/cpu_small.yaml -c "configs/datasets/$DS.yaml" \
    -c "configs/methods/${spec[0]}.yaml" --run-dir "$OUT/$name" "${resume[@]}" "${COMMON[@]}" \
    "${spec[@]:1}" > "$LOGS/$name.log" 2>&1
  echo "end: $name rc=$? $(date -u +%H:%M:%S)"
done
