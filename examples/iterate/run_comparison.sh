#!/usr/bin/env bash
# Expert iteration vs plain SFT on gold answers (same prompts, warm start and trained tokens per round), for the
# bundled list task and two-step arithmetic, from clean runs: bash examples/iterate/run_comparison.sh [list|json_list|arithmetic|small_arithmetic]
set -euo pipefail
PY=${PYTHON:-python}
MODEL=$($PY -c 'from sftune.models import smollm2_path; print(smollm2_path())')
run_task() {  # $1: list | arithmetic, $2: recipe stem, $3: data dir, $4: run prefix
  rm -rf "runs/iterate/$4-ei" "runs/iterate/$4-sft"
  $PY -m sftune.iterate.data "$1" "runs/iterate/$3"
  $PY -m sftune.cli iterate --config "examples/iterate/$2.yaml" --model "$MODEL" --progress false
  $PY -m sftune.cli iterate --config "examples/iterate/$2_sft.yaml" --model "$MODEL" --progress false
}
case "${1:-list}" in
  list) run_task list list_task list-data list ;;
  json_list) run_task json_list json_list json-list-data json-list ;;
  arithmetic) run_task arithmetic arithmetic arith-data arith ;;
  small_arithmetic) run_task small_arithmetic small_arithmetic small-arith-data small-arith ;;
esac
