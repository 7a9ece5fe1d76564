"""Ctrl-C and SIGTERM in the sweep driver: they raise ``KeyboardInterrupt`` in the main thread, the driver stops its
Ray work and exits 128 + the signal. A watchdog makes "within seconds" hold even when Ray does not stop: it hears the
signal through Python's wakeup fd (written by the C-level handler at once, whatever the main thread is blocked in)
and ends the process :data:`STOP_GRACE_S` after it. Everything the sweep writes is atomic, and an embedded Ray's
processes die with their driver (Ray starts them with PR_SET_PDEATHSIG), so ending it then loses nothing."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Iterator

STOP_GRACE_S = 20.0  # after a SIGINT/SIGTERM, the driver is gone by then
_HANDLER = None  # the driver's signal handler while ``interrupts()`` is active


def rearm_sigterm() -> None:
    """Put the driver's SIGTERM handler back: ``ray.init`` replaces it with one that calls ``sys.exit``."""
    if _HANDLER is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _HANDLER)


def _watchdog(fd: int, grace: float) -> None:
    """Wait for SIGINT or SIGTERM on the wakeup pipe ``fd``; then give the driver ``grace`` seconds to stop on its
    own and end the process if it has not. Returns when the pipe is closed before any such signal."""
    wanted = {int(signal.SIGINT), int(signal.SIGTERM)}
    hit: list[int] = []
    with contextlib.suppress(OSError):
        while not hit:
            data = os.read(fd, 64)
            if not data:
                break
            hit = [b for b in data if b in wanted]
    os.close(fd)
    if not hit:
        return
    threading.Event().wait(grace)
    print(f"[sweep] Ray did not stop within {grace:.0f} s of {signal.Signals(hit[0]).name}; ending the driver now "
          "(its Ray processes end with it); rerun the same command to resume", file=sys.stderr, flush=True)
    os._exit(128 + hit[0])


@contextlib.contextmanager
def interrupts(grace: float = STOP_GRACE_S) -> Iterator[dict]:
    """SIGINT and SIGTERM raise ``KeyboardInterrupt`` in the driver's main thread (the dict yielded records which
    signal came first), and arm the watchdog (:func:`_watchdog`), which stays armed until the process ends. Ray
    Tune's own SIGINT handler, which ends ``fit()`` quietly as if the trials were done, is switched off
    (``TUNE_DISABLE_SIGINT_HANDLER``); Ray Train installs none (``teacher.job.fit_off_main_thread``). Outside the main
    thread (a test calling ``run`` from a thread) nothing is installed."""
    got: dict = {}
    if threading.current_thread() is not threading.main_thread():
        yield got
        return

    def handler(signum, frame):
        got.setdefault("signum", signum)
        raise KeyboardInterrupt

    global _HANDLER
    old = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    _HANDLER = handler
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    r, w = os.pipe()
    os.set_blocking(w, False)
    old_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    threading.Thread(target=_watchdog, args=(r, grace), name="sweep-stop-watchdog", daemon=True).start()
    for sig in old:
        signal.signal(sig, handler)
    try:
        yield got
    finally:
        _HANDLER = None
        for sig, h in old.items():
            signal.signal(sig, h)
        signal.set_wakeup_fd(old_fd)
        if "signum" not in got:  # no signal: the watchdog ends with its pipe (after one, it stays armed)
            os.close(w)
        if env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = env


def stop_ray() -> None:
    """End this driver's Ray work now (its trials and workers stop with it), ignoring a second Ctrl-C."""
    import ray

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if threading.current_thread() is \
        threading.main_thread() else None
    try:
        if ray.is_initialized():
            ray.shutdown()
    except Exception:  # noqa: BLE001  (best effort on the way out)
        pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
