"""What a sweep prints (``metakd_ray.logs``): throttled step progress, quiet defaults, and Ray's loggers filtered."""

from __future__ import annotations

import io
import logging

import pytest

from metakd_ray import logs


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_step_progress_in_a_log_prints_at_most_one_line_per_interval():
    out, clock = io.StringIO(), Clock()
    p = logs.StepProgress("[teacher] k", epochs=2, steps_per_epoch=100, every_s=30, stream=out, clock=clock)
    for epoch in range(2):
        for step in range(1, 101):
            clock.t += 0.5  # 2 steps/s: 100 s in all
            p.update(epoch, step)
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3  # at 30, 60 and 90 s
    assert lines[0] == "[teacher] k: epoch 1/2, step 60/200 (30%), 2.00 steps/s, ETA 1.2 min"
    assert lines[2].startswith("[teacher] k: epoch 2/2, step 180/200 (90%)")


def test_step_progress_of_a_short_stage_prints_nothing():
    out, clock = io.StringIO(), Clock()
    p = logs.StepProgress("x", epochs=1, steps_per_epoch=10, stream=out, clock=clock)
    for step in range(1, 11):
        clock.t += 1.0
        p.update(0, step)
    p.close()
    assert out.getvalue() == ""


def test_step_progress_in_a_terminal_is_a_tqdm_bar():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    p = logs.StepProgress("bar", epochs=1, steps_per_epoch=4, stream=out)
    for step in range(1, 5):
        p.update(0, step)
    assert p.bar is not None and p.bar.n == 4
    p.close()
    assert "bar" in out.getvalue() and "step" in out.getvalue()


def test_quiet_environment_sets_defaults_and_keeps_the_users(monkeypatch):
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "info")
    for k in logs.QUIET_ENV:
        if k != "TRANSFORMERS_VERBOSITY":
            monkeypatch.delenv(k, raising=False)
    monkeypatch.delenv(logs.VERBOSE_ENV, raising=False)
    logs.quiet_environment(False)
    import os

    assert os.environ["TRANSFORMERS_VERBOSITY"] == "info"  # the user's choice wins
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1" and not logs.verbose()
    monkeypatch.setenv(logs.VERBOSE_ENV, "1")
    assert logs.verbose() and logs.ray_log_level() == "INFO"


@pytest.mark.parametrize("is_verbose", [False, True])
def test_quiet_driver_filters_ray_console_handlers(monkeypatch, is_verbose):
    monkeypatch.setenv(logs.VERBOSE_ENV, "1" if is_verbose else "0")
    log = logging.getLogger("ray.tune")
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    log.addHandler(handler)
    old = log.level
    log.setLevel(logging.INFO)
    try:
        logs.quiet_driver()
        log.info("chatter")
        log.warning("a warning")
        logging.getLogger("ray.data._internal.progress.logging_progress").info("progress")
    finally:
        log.removeHandler(handler)
        log.setLevel(old)
    text = out.getvalue()
    assert "a warning" in text
    assert ("chatter" in text) == is_verbose


def test_step_progress_takes_the_epoch_length_from_the_loop():
    out, clock = io.StringIO(), Clock()
    p = logs.StepProgress("x", epochs=2, steps_per_epoch=1, every_s=1, stream=out, clock=clock)
    clock.t += 2
    p.update(0, 5, 10)  # train_stage's on_step(epoch, step_in_epoch, steps_per_epoch)
    assert p.total == 20 and "step 5/20 (25%)" in out.getvalue()
