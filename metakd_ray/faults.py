"""Fault injection for the reliability tests (``docs/reliability.md``): ``METAKD_FAULTS="rule=value;..."``. Unset in
normal use; every rule is read where its fault happens:

* ``once=<s>`` / ``always=<s>``: a trial whose cell id contains ``<s>`` raises at its start, on its first attempt /
  on every attempt (``sweep.trial.inject_fault``);
* ``kill=<s>``: such a trial SIGKILLs its own process after saving its first epoch, on its first attempt
  (``sweep.trial.kill_fault``);
* ``cache_write=enospc``: publishing a built cache fails with ``OSError(ENOSPC)`` — a full disk while the cache is
  written (``cache.store.publish``).
"""

from __future__ import annotations

import os

FAULTS_ENV = "METAKD_FAULTS"


def rules() -> dict[str, str]:
    spec = os.environ.get(FAULTS_ENV, "")
    return dict(part.split("=", 1) for part in spec.split(";") if "=" in part)
