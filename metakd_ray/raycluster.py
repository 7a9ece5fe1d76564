"""Connecting a driver to Ray: a running cluster when one is named or running, else an embedded local instance.

Environment settings that matter on small machines (ray guide §2.5, §3.3, §7) are set before ``import ray`` and
passed to the workers of an existing cluster through the job's ``runtime_env``.
"""

from __future__ import annotations

import os

from metakd_ray import config as C

# Defaults only: a value already in the environment wins.
RAY_ENV = {
    "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1",  # 32 footer-reader actors per read_parquet otherwise (10 s on 2 cores)
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",  # one actor fewer per fit
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",  # the controller polls workers (and reports) every 2 s by default
    "RAY_USAGE_STATS_ENABLED": "0",
}
# Passed on to the workers of an existing cluster when set here (an embedded Ray inherits the driver's environment).
FORWARDED = ("METAKD_DATA", "HF_HUB_OFFLINE", "HF_HOME", "TRANSFORMERS_VERBOSITY", "TOKENIZERS_PARALLELISM")


def connect_ray(cfg: C.Config) -> str:
    """Initialise Ray for this driver and say how: ``"existing"`` (already initialised), ``"cluster"`` or ``"local"``.

    ``ray.address`` (else ``$RAY_ADDRESS``): ``local`` starts a private instance; any other value connects to that
    cluster; empty connects to a cluster started with ``ray start`` on this machine if there is one, else starts a
    private instance with ``ray.num_cpus`` CPUs (0 = all). Clusters with token authentication (Ray's default) need
    ``RAY_AUTH_MODE=token`` in the environment before the first ``import ray`` (ray guide §5.2).
    """
    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)
    import ray

    if ray.is_initialized():
        return "existing"
    local = {"address": "local", "num_cpus": cfg.ray.num_cpus or None}
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS", "")
    if address == "local":
        ray.init(**local)
        return "local"
    if not address and running_cluster() is None:  # nothing to join: no hanging on a stale address file
        ray.init(**local)
        return "local"
    env = {k: os.environ[k] for k in (*RAY_ENV, *FORWARDED) if k in os.environ}
    try:
        ray.init(address=address or "auto", runtime_env={"env_vars": env})
        return "cluster"
    except ConnectionError:
        if address:
            raise
    ray.init(**local)
    return "local"


def running_cluster(temp_dir: str = "/tmp/ray") -> str | None:
    """The address of a cluster started with ``ray start`` on this machine that answers, else None.

    ``ray start`` records its address in ``<temp dir>/ray_current_cluster``; a cluster that crashed or was killed
    can leave the file behind, and ``ray.init(address="auto")`` then waits on a dead address. So the address is
    used only if its GCS port accepts a connection.
    """
    import socket

    try:
        host, port = open(os.path.join(temp_dir, "ray_current_cluster")).read().strip().rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=1.0):
            return f"{host}:{port}"
    except (OSError, ValueError):
        return None
