#!/usr/bin/env bash
# The grid cells of Tables 1 and 2 with the recipe, MPMC and GuidedMix-Net, in priority order, the
# cheaper dataset first. All are finished and committed; kept as the record of how the lanes ran,
# and for `report`.
# Start it twice on 2 cores — two one-thread lanes:
#     nohup bash benchmarks/open_cells.sh > lane1.log 2>&1 &
#     nohup bash benchmarks/open_cells.sh > lane2.log 2>&1 &
# Lock files keep the lanes on different cells (a cell the other lane holds is skipped), finished
# cells are skipped, and an interrupted cell resumes from its checkpoint. To run a frozen copy of
# the code while editing this one, set PYTHONPATH=/path/to/copy/src (the grids are this checkout's
# benchmarks/grids/).
# Afterwards: bash benchmarks/open_cells.sh report   (tables, records and figures of every grid).
set -uo pipefail
cd "$(dirname "$0")/.."
SEMISEG=${SEMISEG:-.venv/bin/semiseg}
GRIDS=(table1_cpu_small_recipe sufd_input_scale_cpu_small table2_cpu_small_recipe mpmc_cpu_small
       mpmc_ablation_cpu_small guidedmix_cpu_small guidedmix_ablation_cpu_small)
if [ "${1:-}" = report ]; then
  for grid in "${GRIDS[@]}"; do "$SEMISEG" reproduce "benchmarks/grids/$grid.yaml" --report-only || exit 1; done
  exit 0
fi
cells() {  # GRID [--only KEY=VALUE ...]
  local grid=$1; shift
  echo "== $grid $* ($(date -u +%H:%M))"
  nice -n 5 "$SEMISEG" reproduce "benchmarks/grids/$grid.yaml" "$@" --workers 1 --set train.threads=1 --no-report
}
# Finished and committed (records.json): table1_cpu_small_recipe, sufd_input_scale_cpu_small.
cells table2_cpu_small_recipe
# Cells shared with table1_cpu_small_recipe (UniMatch, ours, supervised) count as recorded (same
# output folder). CHASE_DB1 first: its cells are about half the cost of COVID's.
cells mpmc_cpu_small --only dataset=chase_db1
cells mpmc_ablation_cpu_small
cells mpmc_cpu_small --only dataset=covid_infnet
cells guidedmix_cpu_small
cells guidedmix_ablation_cpu_small
