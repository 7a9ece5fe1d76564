"""Shared test set-up.

Environment variables are set here, before anything imports ray (RAY_AUTH_MODE is read at import time, and
the raylet's workers inherit the rest). One local Ray instance serves the whole session (``ray_session``).
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# Tests read the real corpora from ../shared/data (never copied into the repo), or from $METAKD_DATA.
SHARED_DATA = Path(os.environ.get("METAKD_DATA") or REPO.parent / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "amazon-multi-domain-sentiment").is_dir():
        pytest.fail(f"real data not found at {SHARED_DATA}; set METAKD_DATA to the folder holding "
                    "amazon-multi-domain-sentiment/ and mnli-genre-sample/")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray (2 CPUs) for the whole test session; shut down at the end."""
    import ray
    import ray.data

    from metakd_ray.raycluster import start_local

    start_local(num_cpus=2, include_dashboard=True, object_store_memory=512 * 2**20, logging_level="WARNING")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_no_progress_timeout_s = 120
    yield ray
    ray.shutdown()
