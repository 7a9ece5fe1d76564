"""What a sweep prints: its own lines by default, Ray's and the libraries' chatter only with ``--verbose``.

Without ``--verbose`` (``$METAKD_VERBOSE`` unset), a sweep's log holds the ``[sweep]``, ``[teacher]`` and ``[cache]``
lines of this project, warnings and errors, and progress: the teacher's steps (:class:`StepProgress`: a tqdm bar
in a terminal, else one line per ``PROGRESS_EVERY_S``) and Ray Data's own progress for the cache pass (bars in a
terminal, a block per ``PROGRESS_EVERY_S`` otherwise). Hidden by default — all still in Ray's session logs
(``/tmp/ray/session_latest/logs``): Ray's INFO lines (Tune's trial tables, Train's "Reported metrics" and
checkpoint lines, Data's execution plans), transformers' and the Hub's progress bars and advisories, Optuna's
"study created" lines. :func:`quiet_environment` sets defaults before Ray starts (an embedded Ray's workers inherit
them; a cluster's get them through the job's ``runtime_env``, see ``raycluster.FORWARDED``); :func:`quiet_driver`
lowers the driver's loggers once Ray is imported.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")

VERBOSE_ENV = "METAKD_VERBOSE"
PROGRESS_EVERY_S = 30.0
# Defaults only (a value already in the environment wins), set when not verbose.
QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",  # no advisories from transformers
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # no "Loading weights" / "Writing model shards" bars per model load
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",  # no "tokenize" / "Filter" bars per split in the workers
    "RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL": str(int(PROGRESS_EVERY_S)),  # Ray Data's progress in a file log
    "RAY_DEDUP_LOGS": "1",
    "RAY_AIR_NEW_OUTPUT": "0",  # Tune's older output engine, silent at verbose=0 (the new one prints a header)
}
QUIET_LOGGERS = ("ray", "ray.tune", "ray.train", "ray.air", "ray.data", "ray.util")


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def quiet_environment(is_verbose: bool) -> None:
    """Record the choice in ``$METAKD_VERBOSE`` (workers read it) and, when quiet, set :data:`QUIET_ENV`."""
    os.environ[VERBOSE_ENV] = "1" if is_verbose else "0"
    if not is_verbose:
        for k, v in QUIET_ENV.items():
            os.environ.setdefault(k, v)


class _Quiet(logging.Filter):
    """Drops records below WARNING, except Ray Data's progress (``ray.data._internal.progress``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name.startswith("ray.data._internal.progress")


def quiet_driver() -> None:
    """Filter the console handlers of Ray's loggers down to warnings (and Ray Data's progress) and Optuna's to
    WARNING in this process, unless verbose. File handlers (``ray-data.log``) keep everything."""
    if verbose():
        return
    for name in QUIET_LOGGERS:
        for h in logging.getLogger(name).handlers:
            if "File" not in type(h).__name__ and not any(isinstance(f, _Quiet) for f in h.filters):
                h.addFilter(_Quiet())
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    except ImportError:
        pass


def ray_log_level() -> str:
    """For ``ray.train.LoggingConfig`` and the like: ``INFO`` when verbose, else ``WARNING``."""
    return "INFO" if verbose() else "WARNING"


def epoch_line(name: str, metrics: dict, epochs: int) -> str:
    """``<name> epoch 2/3: loss 0.4123, dev 0.8125 (books 0.80, dvd 0.83)`` from a stage's metrics."""
    dev = {k[len("dev_acc_"):]: v for k, v in metrics.items() if k.startswith("dev_acc_") and k != "dev_acc_mean"}
    per = f" ({', '.join(f'{d} {v:.3f}' for d, v in dev.items())})" if len(dev) > 1 else ""
    return (f"{name} epoch {int(metrics['epoch']) + 1}/{epochs}: loss {metrics.get('train_loss', 0.0):.4f}, "
            f"dev {metrics.get('dev_acc_mean', float('nan')):.4f}{per}")


class StepProgress:
    """Progress of one stage's optimisation steps with rate and ETA: a tqdm bar when ``stream`` is a terminal,
    else one line at most every ``every_s`` seconds (and none for a stage shorter than that).

    ``update(epoch, step_in_epoch)`` after each step; ``close()`` at the end."""

    def __init__(self, name: str, epochs: int, steps_per_epoch: int, *, every_s: float = PROGRESS_EVERY_S,
                 stream=None, clock: Callable[[], float] = time.monotonic, start_step: int = 0):
        self.name, self.epochs, self.per_epoch = name, epochs, max(int(steps_per_epoch), 1)
        self.total = self.epochs * self.per_epoch
        self.every_s, self.clock = every_s, clock
        self.stream = stream if stream is not None else sys.stderr
        self.start = self.done = start_step
        self.t0 = self.last = clock()
        self.bar = None
        if getattr(self.stream, "isatty", lambda: False)():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=start_step, desc=name, unit="step", file=self.stream,
                            dynamic_ncols=True, leave=False)

    def update(self, epoch: int, step_in_epoch: int, steps_per_epoch: int | None = None) -> None:
        """After a step (``train_stage``'s ``on_step`` passes the epoch's length as ``steps_per_epoch``)."""
        if steps_per_epoch and steps_per_epoch != self.per_epoch:
            self.per_epoch, self.total = steps_per_epoch, self.epochs * steps_per_epoch
            if self.bar is not None:
                self.bar.total = self.total
        done = epoch * self.per_epoch + step_in_epoch
        if self.bar is not None:
            self.bar.update(done - self.done)
            self.done = done
            return
        self.done = done
        now = self.clock()
        if now - self.last < self.every_s:
            return
        self.last = now
        rate = (done - self.start) / max(now - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        print(f"{self.name}: epoch {epoch + 1}/{self.epochs}, step {done}/{self.total} "
              f"({100 * done / self.total:.0f}%), {rate:.2f} steps/s, ETA {_minutes(eta)}",
              file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _minutes(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def data_progress_bars() -> bool:
    """Ray Data's progress bars for a pass run from this process: on in a terminal (or when verbose), else off —
    and then without Ray Data's warning that they are off."""
    if verbose() or sys.stdout.isatty():
        return True
    from ray.util.debug import log_once

    log_once("ray_data_progress_manager_disabled")  # marks Ray Data's one-time warning as already given
    return False


def progress_iter(items: Iterable[T], name: str, total: int | None = None, **kwargs) -> Iterator[T]:
    """``items`` with a :class:`StepProgress` over them (one epoch of ``total`` = ``len(items)`` steps)."""
    total = total if total is not None else len(items)  # type: ignore[arg-type]
    progress = StepProgress(name, 1, total, **kwargs)
    try:
        for n, item in enumerate(items, 1):
            yield item
            progress.update(0, n)
    finally:
        progress.close()
