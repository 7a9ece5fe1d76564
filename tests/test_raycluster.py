"""An embedded Ray's own processes find it, whatever else runs on the machine (``raycluster.start_local``)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest

SCRIPT = r"""
import json, os, sys
import ray
from metakd_ray.raycluster import start_local

start_local(num_cpus=1, include_dashboard=False, logging_level="ERROR")

@ray.remote
def lookup():  # what Ray Train's PlacementGroupCleaner does: the state API without an address
    from ray._private.services import canonicalize_bootstrap_address_or_die
    return canonicalize_bootstrap_address_or_die(None)

print(json.dumps({"gcs": ray.get_runtime_context().gcs_address, "worker": ray.get(lookup.remote()),
                  "driver_env": os.environ.get("RAY_ADDRESS")}))
ray.shutdown()
"""


@pytest.mark.timeout(120)
def test_workers_of_an_embedded_ray_find_it_despite_a_stale_address_file():
    tmp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths live under it
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dead = s.getsockname()[1]  # nothing listens there once closed
        os.makedirs(f"{tmp}/ray")
        with open(f"{tmp}/ray/ray_current_cluster", "w") as f:  # left behind by an earlier `ray start`
            f.write(f"127.0.0.1:{dead}")
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
        env["RAY_TMPDIR"] = tmp
        out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=110)
        assert out.returncode == 0, out.stderr[-2000:]
        got = json.loads(out.stdout.strip().splitlines()[-1])
        assert got["worker"] == got["gcs"] != f"127.0.0.1:{dead}"
        assert got["driver_env"] is None  # the driver's own environment is as it was
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
