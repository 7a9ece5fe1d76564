"""What a trial's state writes cost under ``distill.min_steps``, every epoch against at most every 30 s.

    python benchmarks/trial_checkpoints.py

One student of ``sweeps/scarcity.yaml`` at its smallest rate (books, r = 0.01: 16 training reviews, one batch per
epoch) fine-tuned with ``distill.min_steps=50`` (50 epochs of one step, each scored on the 200 dev reviews), the
real MiniLM student (3 layers, 17.2M parameters) in the resolved precision, twice in this process: through the
sweep's own ``TrialCheckpointer`` with ``every_s = 0`` (a state after every epoch, as before the throttle) and with
its default ``every_s = 30``. The states go to a ``TrialStore`` on local disk, as a trial's do (``tune.report`` is
replaced by a recorder: no Ray here). Prints wall time, states written and bytes written for each, their ratios,
and checks that both runs report every epoch and end with the same student (same dev and test accuracy, same
weights): the throttle changes what is written, never what is trained. Writes
benchmarks/results/trial_checkpoints.json. About 5 minutes on 2 CPUs.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from _env import REPO

import torch  # noqa: E402
from ray import tune  # noqa: E402

from metakd_ray import cell as CELL  # noqa: E402
from metakd_ray import config as C  # noqa: E402
from metakd_ray import data as D  # noqa: E402
from metakd_ray import models as M  # noqa: E402
from metakd_ray.runtime import runtime_for  # noqa: E402
from metakd_ray.storage import Storage  # noqa: E402
from metakd_ray.sweep.records import TrialRecord, TrialStore  # noqa: E402
from metakd_ray.sweep.trial import TrialCheckpointer  # noqa: E402

OVERRIDES = ["distill.min_steps=50"]
TARGET, RATE, SEED, METHOD = "books", 0.01, 0, "finetune"


class CountingStore(TrialStore):
    """A trial store that counts the states written and their bytes."""

    def __init__(self, storage: Storage):
        super().__init__(storage)
        self.states, self.bytes = 0, 0

    def write_state(self, key: str, data: bytes) -> None:
        self.states, self.bytes = self.states + 1, self.bytes + len(data)
        super().write_state(key, data)


def run(every_s: float, cfg: C.Config, splits: D.Splits, encoder, tokenizer, root: Path) -> dict:
    reports: list[dict] = []
    tune.report = lambda metrics, **_: reports.append(dict(metrics))  # what the trial would send to Tune
    store = CountingStore(Storage(str(root / f"every-{every_s:g}")))
    record = [TrialRecord("bench", f"{TARGET}|{RATE}|none/{METHOD}|{SEED}|-", 0, {})]
    progress = {"states": {}, "best_dev": float("-inf")}

    def checkpointer(stage):
        ck = TrialCheckpointer(progress, stage, store, record)
        ck.every_s = every_s
        return ck

    runtime = runtime_for(cfg.compute.precision)
    data = CELL.student_data(cfg, splits, tokenizer, TARGET, RATE, SEED, None)
    student = CELL.build_student(cfg, encoder, tokenizer, METHOD, splits.num_labels, len(splits.domains), None,
                                 seed=SEED)
    t0 = time.perf_counter()
    out = CELL.train_student(cfg, data, student, METHOD, None, tokenizer=tokenizer, domains=splits.domains,
                             seed=SEED, runtime=runtime, checkpointer=checkpointer)
    wall = time.perf_counter() - t0
    weights = {k: v.detach().float().cpu().clone() for k, v in out.student.state_dict().items()}
    return {"every_s": every_s, "wall_s": wall, "epochs": len(reports), "states_written": store.states,
            "bytes_written": store.bytes, "state_mb": store.bytes / max(store.states, 1) / 1e6,
            "n_train": len(data.train), "best_dev": progress["best_dev"], "test_acc": out.test_accuracy[TARGET],
            "dev_reported": [r["dev_acc"] for r in reports], "precision": runtime.precision, "_weights": weights}


def main() -> int:
    torch.set_num_threads(2)
    cfg = C.load(REPO / "sweeps/scarcity.yaml", OVERRIDES)
    splits = D.load_splits(cfg.data)
    encoder, tokenizer = M.load_encoder(cfg.model.teacher, dropout=cfg.model.dropout)
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="trial-checkpoints-") as tmp:
        runs = [run(every, cfg, splits, encoder, tokenizer, Path(tmp)) for every in (0.0, 30.0)]
    every_epoch, throttled = runs
    same_weights = all(torch.equal(every_epoch["_weights"][k], throttled["_weights"][k])
                       for k in every_epoch["_weights"])
    for r in runs:
        del r["_weights"]
        print(f"every_s={r['every_s']:>4g}: {r['epochs']} epochs reported, {r['states_written']} states written "
              f"({r['bytes_written'] / 1e9:.2f} GB, {r['state_mb']:.0f} MB each), {r['wall_s']:.1f} s; "
              f"best dev {r['best_dev']:.3f}, test {r['test_acc']:.3f}", flush=True)
    same = (same_weights and every_epoch["dev_reported"] == throttled["dev_reported"]
            and every_epoch["test_acc"] == throttled["test_acc"])
    result = {"command": "python benchmarks/trial_checkpoints.py", "sweep": "sweeps/scarcity.yaml",
              "overrides": OVERRIDES, "cell": {"target": TARGET, "rate": RATE, "seed": SEED, "method": METHOD},
              "runs": runs, "wall_ratio": every_epoch["wall_s"] / throttled["wall_s"],
              "bytes_ratio": every_epoch["bytes_written"] / max(throttled["bytes_written"], 1),
              "same_student": same, "load_avg_start": load_start, "load_avg_end": os.getloadavg()[0]}
    out = REPO / "benchmarks" / "results" / "trial_checkpoints.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"every epoch / every 30 s: wall {result['wall_ratio']:.2f}x, bytes written {result['bytes_ratio']:.1f}x; "
          f"same student and the same {every_epoch['epochs']} reports: {same}; wrote {out.relative_to(REPO)}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
