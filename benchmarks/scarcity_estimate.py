"""The plan's cost estimate of every preset before and after this project's speed work, from the calibration that
``benchmarks/precision.py`` measured (``metakd_ray/sweep/calibration.json``).

    python benchmarks/scarcity_estimate.py

"Before" is each preset with ``compute.precision=fp32 compute.group_by_length=false`` (fp32, randomly composed
batches: what the project ran before); "after" is the preset as it is (``auto``: bf16 on a CPU with native bf16;
length-grouped batches). Both come from ``python -m metakd_ray.sweep PRESET --dry-run --json`` (the plan's
``estimate``, CPU-seconds at 2-CPU speed). Keys for scarcity.yaml: ``before_cpu_h``, ``after_cpu_h`` (target: after
at most half of before). Writes benchmarks/results/scarcity_estimate.json. Seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from _env import REPO

PRESETS = ("smoke", "mnli-smoke", "scarcity", "amazon-table", "gamma2", "no-in-domain", "mnli-table")


def estimate(preset: str, *overrides: str) -> dict:
    cmd = [sys.executable, "-m", "metakd_ray.sweep", f"sweeps/{preset}.yaml", *overrides, "--dry-run", "--json"]
    out = subprocess.run(cmd, cwd=REPO, env=os.environ, capture_output=True, text=True, check=True).stdout
    plan = json.loads(out)
    return {"estimate": plan["estimate"], "compute": plan.get("compute")}


def main() -> int:
    rows = {}
    for preset in PRESETS:
        before = estimate(preset, "compute.precision=fp32", "compute.group_by_length=false")
        after = estimate(preset)
        b, a = before["estimate"]["total_cpu_s"] / 3600, after["estimate"]["total_cpu_s"] / 3600
        rows[preset] = {"before_cpu_h": round(b, 2), "after_cpu_h": round(a, 2), "ratio": round(a / b, 3),
                        "before": before, "after": after}
        print(f"{preset:<14} before {b:8.2f} CPU-h  after {a:8.2f} CPU-h  after/before {a / b:.3f}", flush=True)
    s = rows["scarcity"]
    result = {"command": "python benchmarks/scarcity_estimate.py", "before_cpu_h": s["before_cpu_h"],
              "after_cpu_h": s["after_cpu_h"], "target_ratio": 0.5, "meets_target": s["ratio"] <= 0.5,
              "presets": rows}
    out = REPO / "benchmarks" / "results" / "scarcity_estimate.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"scarcity.yaml: {s['before_cpu_h']:.1f} -> {s['after_cpu_h']:.1f} CPU-hours at 2-CPU speed "
          f"({s['ratio']:.2f} of before; target <= 0.5); wrote {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
