"""The driver's interrupt handling (metakd_ray/sweep/signals.py): a signal becomes KeyboardInterrupt, and the
watchdog ends a driver whose clean-up hangs, with 128 + the signal, a short grace after the signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from metakd_ray.sweep import signals

SCRIPT = textwrap.dedent("""
    import sys, time
    from metakd_ray.sweep import signals
    with signals.interrupts(grace=float(sys.argv[1])) as got:
        try:
            print("ready", flush=True)
            time.sleep(60)
        except KeyboardInterrupt:
            print("interrupted", got["signum"], flush=True)
            if sys.argv[2] == "hang":  # a clean-up that never ends and swallows further Ctrl-C
                while True:
                    try:
                        time.sleep(60)
                    except KeyboardInterrupt:
                        pass
    sys.exit(128 + got["signum"])
""")


def start(grace: float, mode: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", SCRIPT, str(grace), mode], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_hung_cleanup_is_ended_after_the_grace(sig):
    p = start(1.0, "hang")
    t0 = time.time()
    p.send_signal(sig)
    out, err = p.communicate(timeout=30)
    took = time.time() - t0
    assert p.returncode == 128 + sig
    assert f"interrupted {int(sig)}" in out
    assert 0.9 < took < 15
    assert f"did not stop within 1 s of {sig.name}" in err and "rerun the same command to resume" in err
    assert "Traceback" not in err


@pytest.mark.timeout(60)
def test_a_prompt_stop_is_not_cut_short():
    p = start(30.0, "clean")
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=20)
    assert p.returncode == 130 and "interrupted 2" in out and err == ""


def test_leaving_without_a_signal_restores_the_handlers_and_the_wakeup_fd():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    with signals.interrupts() as got:
        assert signal.getsignal(signal.SIGINT) is not before[0]
        assert os.environ["TUNE_DISABLE_SIGINT_HANDLER"] == "1"
    assert got == {}
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert signal.set_wakeup_fd(-1) == -1  # nothing left installed
    time.sleep(0.1)
    assert not [t for t in __import__("threading").enumerate() if t.name == "sweep-stop-watchdog"]
    assert os.environ.get("TUNE_DISABLE_SIGINT_HANDLER") == env
