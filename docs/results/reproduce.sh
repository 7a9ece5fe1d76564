#!/usr/bin/env bash
# Every run behind docs/results.md, one after another, each logged to runs/logs/<name>.log; rerun the same command
# after any interruption and each sweep resumes where it stopped (finished ones return at once). After each run its
# CSVs and figures are exported to docs/results/ and the summary is rewritten: commit them as they come.
#
#   nohup setsid bash docs/results/reproduce.sh > /dev/null 2>&1 &      # in the background, from the repo root
#   tail -f runs/logs/scarcity.log
#
# On a shared machine, give the runs the lowest priority (Linux with autogroup, where nice alone does not):
#   echo 19 > /proc/<pid of this script>/autogroup
set -uo pipefail
cd "$(dirname "$0")/../.."
mkdir -p runs/logs
run() {  # run NAME PRESET RUN_DIR [overrides...]
  local name=$1 preset=$2 dir=$3
  shift 3
  echo "=== $name $(date -u +%FT%TZ)" >> "runs/logs/$name.log"
  nice -n 19 python -m metakd_ray.sweep "sweeps/$preset.yaml" name="$name" "$@" >> "runs/logs/$name.log" 2>&1
  local rc=$?
  echo "=== $name exit $rc $(date -u +%FT%TZ)" >> "runs/logs/$name.log"
  if [ "$rc" -eq 0 ]; then
    python -m metakd_ray.results.publish export "$dir/sweeps/$name" docs/results >> "runs/logs/$name.log" 2>&1
    python -m metakd_ray.results.publish summarize docs/results --write docs/results/summary.md > /dev/null
  fi
}
run amazon-table amazon-table runs/amazon
run scarcity scarcity runs/amazon
run gamma2 gamma2 runs/amazon
run mnli-table mnli-table runs/mnli-table
# Ablations at full data: amazon-table under another name, reusing its meta-teacher and caches (students only)
run abl-depth amazon-table runs/amazon "sweep.methods=[meta/meta_kd]" model.student.num_layers=6
run abl-no-lambda amazon-table runs/amazon "sweep.methods=[meta/meta_kd]" distill.expertise_weights=false
run abl-epochs amazon-table runs/amazon "sweep.methods=[meta/meta_kd]" distill.stage1_epochs=6 distill.stage2_epochs=4
# The scarce rates with every teacher and student trained for at least 50 steps, one run per rate (each ~2 h here)
for r in 0.1 0.05 0.01; do
  run "scarcity-steps-r$r" scarcity runs/amazon "sweep.sample_rates=[$r]" "sweep.seeds_per_rate=[3]" \
      teacher.min_steps=50 distill.min_steps=50
done
python -m metakd_ray.results.students runs/amazon/sweeps/amazon-table runs/students > /dev/null \
    && cp runs/students/students.csv docs/results/amazon-table-students.csv
