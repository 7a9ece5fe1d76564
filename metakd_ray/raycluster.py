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
FORWARDED = ("METAKD_DATA", "HF_HUB_OFFLINE", "HF_HOME", "TRANSFORMERS_VERBOSITY", "TOKENIZERS_PARALLELISM",
             "METAKD_VERBOSE", "HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS",
             "RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL", "RAY_AIR_NEW_OUTPUT")


def connect_ray(cfg: C.Config) -> str:
    """Initialise Ray for this driver and say how: ``"existing"`` (already initialised), ``"cluster"`` or ``"local"``.

    ``ray.address`` (else ``$RAY_ADDRESS``): ``local`` starts a private instance; any other value connects to that
    cluster; empty connects to a cluster started with ``ray start`` on this machine if there is one, else starts a
    private instance with ``ray.num_cpus`` CPUs (0 = all). Clusters with token authentication (Ray's default) need
    ``RAY_AUTH_MODE=token`` in the environment before the first ``import ray`` (ray guide §5.2).
    """
    how = _connect(cfg)
    import ray.data  # noqa: F401  (configures its loggers: quiet them now)

    from metakd_ray import logs

    logs.quiet_driver()
    return how


def _connect(cfg: C.Config) -> str:
    from metakd_ray import logs

    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)
    import ray

    if ray.is_initialized():
        return "existing"
    level = "INFO" if logs.verbose() else "WARNING"
    # an embedded Ray's dashboard (and job server) answers on this machine only
    local = {"address": "local", "num_cpus": cfg.ray.num_cpus or None, "dashboard_host": "127.0.0.1",
             "logging_level": level}
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS", "")
    if address == "local":
        start_local(**local)
        return "local"
    if not address and running_cluster() is None:  # nothing to join: no hanging on a stale address file
        start_local(**local)
        return "local"
    env = {k: os.environ[k] for k in (*RAY_ENV, *FORWARDED) if k in os.environ}
    try:
        ray.init(address=address or "auto", runtime_env={"env_vars": env}, logging_level=level)
        return "cluster"
    except ConnectionError:
        if address:
            raise
    start_local(**local)
    return "local"


def start_local(**init_kwargs) -> None:
    """``ray.init(address="local", ...)`` whose processes all know its address.

    Ray processes that look a cluster up without an address (Ray Train's ``PlacementGroupCleaner`` queries the state
    API with ``address=None``) take ``$RAY_ADDRESS``, else the *latest* ``ray start`` cluster recorded in
    ``/tmp/ray/ray_current_cluster``: with a second Ray on the machine or a file left by an earlier ``ray start``
    they reach another cluster or a dead address, time out and print a traceback. So the instance is started on a
    free GCS port chosen here (``RAY_GCS_SERVER_PORT``) with ``RAY_ADDRESS`` naming it in the environment its
    processes inherit; the driver's own environment is restored afterwards. Values the user set win.
    """
    import socket

    import ray

    init_kwargs.setdefault("address", "local")
    if os.environ.get("RAY_GCS_SERVER_PORT") or os.environ.get("RAY_ADDRESS"):
        ray.init(**init_kwargs)
        return
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    saved = {k: os.environ.get(k) for k in ("RAY_GCS_SERVER_PORT", "RAY_ADDRESS")}
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    os.environ["RAY_ADDRESS"] = f"{ray.util.get_node_ip_address()}:{port}"
    try:
        ray.init(**init_kwargs)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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


class UnsatisfiableResources(ValueError):
    """A stage asks for more than any node of the cluster has, and no autoscaler could add such a node."""


def stage_requests(cfg: C.Config) -> dict[str, dict[str, float]]:
    """What one worker of each stage asks Ray for (``RayConfig.requests``: ``{"CPU": n, "GPU": g, **custom}``),
    keyed by the config settings that size it."""
    r = cfg.ray
    keys = {"trial": "ray.trial_cpus / ray.trial_gpus", "cache": "ray.cpus_per_actor / ray.cache_gpus",
            "teacher": "ray.cpus_per_worker / ray.use_gpu"}
    return {keys[stage] + (f" / ray.{stage}_resources" if getattr(r, f"{stage}_resources") else ""):
            r.requests(stage) for stage in ("trial", "cache", "teacher") if stage != "teacher" or r.train_workers > 0}


# A node type whose shape is unknown (a Ray without the cluster-config call): it may hold any request.
ANY_SHAPE = {"*": float("inf")}


def node_shapes() -> tuple[list[dict[str, float]], list[dict[str, float]] | None]:
    """(the resources of each alive node, those of each node type an autoscaler may add — None when the cluster has
    no autoscaler). The node types come from the cluster config the autoscaler publishes in the GCS (what Ray Train
    reads to decide whether a worker group can ever be placed); a cluster launcher's (v1) autoscaler publishes none,
    so its node types count as :data:`ANY_SHAPE`."""
    alive, types = _shapes()
    return alive, None if types is None else [shape for shape, _ in types]


def _shapes() -> tuple[list[dict[str, float]], list[tuple[dict[str, float], float]] | None]:
    """(alive nodes, (shape, most nodes of it) per autoscaler node type, or None without an autoscaler)."""
    import ray

    alive = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # an older or newer Ray without this call: assume an autoscaler may help
        return alive, [(ANY_SHAPE, float("inf"))]
    if config is None:
        return alive, [(ANY_SHAPE, float("inf"))] if _launcher_autoscaler() else None
    return alive, [(dict(g.resources), float("inf") if g.max_count < 0 else float(g.max_count))
                   for g in config.node_group_configs if g.max_count != 0]


def _launcher_autoscaler() -> bool:
    """Whether a cluster launcher's (v1) autoscaler with node types of its own runs (``ray up``, or ``ray start
    --autoscaling-config``, e.g. cluster/local-fake.yaml). Its status in the GCS maps each node to a node type of its
    config, where the read-only monitor of a plain ``ray start`` names each node's type ``node_<id>``."""
    import json

    try:
        from ray._private import ray_constants
        from ray.autoscaler._private.util import format_readonly_node_type
        from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

        raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS) if _internal_kv_initialized() else None
        mapping = (json.loads(raw or "{}").get("autoscaler_report") or {}).get("node_type_mapping") or {}
        return any(t != format_readonly_node_type(n) for n, t in mapping.items())
    except Exception:  # a Ray without these internals: no sign of an autoscaler
        return False


def max_cpus() -> float:
    """The CPUs this cluster has (no autoscaler) or can have: the alive nodes' and, with an autoscaler, each node
    type's times its most nodes (``inf`` when a type's shape or count is unknown)."""
    alive, types = _shapes()
    total = sum(s.get("CPU", 0.0) for s in alive)
    for shape, count in types or []:
        cpus = shape.get("CPU", shape.get("*", 0.0))
        total += cpus * count if cpus > 0 and count > 0 else 0.0
    return total


def actor_threads(request: dict[str, float], actors: int) -> int:
    """Torch threads for each of ``actors`` actors asking ``request`` (``{"CPU": c, **custom}``): the CPUs of the
    largest node (alive, or of a known autoscaler node type) that can hold one, shared by the pool — e.g. 1 actor x
    2 threads or 2 actors x 1 thread on 2 CPUs; at least the actor's own CPUs when no such node is known yet."""
    alive, types = node_shapes()
    fits = [s.get("CPU", 0.0) for s in alive + [t for t in types or [] if "*" not in t]
            if all(s.get(k, 0.0) >= v - 1e-9 for k, v in request.items() if v > 0)]
    own = int(request.get("CPU", 1.0))
    return max(1, own, int(max(fits) // max(actors, 1)) if fits else 0)


def starts_local(cfg: C.Config) -> bool:
    """Whether :func:`connect_ray` will start an embedded Ray on this machine (not join a cluster)."""
    import ray

    if ray.is_initialized():
        return False
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS", "")
    return address == "local" or (not address and running_cluster() is None)


def local_shape(cfg: C.Config) -> dict[str, float]:
    """The one node an embedded Ray will have: ``ray.num_cpus`` (0 = this machine's) CPUs and this machine's
    GPUs (what Ray would detect)."""
    gpus = 0
    try:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        pass
    return {"CPU": float(cfg.ray.num_cpus or os.cpu_count() or 1), "GPU": float(gpus)}


def check_resources(cfg: C.Config, shapes: tuple[list[dict[str, float]], list[dict[str, float]] | None] | None = None
                    ) -> None:
    """Fail before any work when a stage's worker cannot be placed on any node this cluster has or (with an
    autoscaler) could add: one line with the numbers. ``shapes``: (alive nodes, autoscaler node types or None);
    default: asked of the connected Ray (:func:`node_shapes`); before an embedded Ray starts,
    ``([local_shape(cfg)], None)`` answers in milliseconds instead of after Ray's start-up."""
    alive, types = shapes if shapes is not None else node_shapes()
    shapes = alive + (types or [])

    def fits(req: dict[str, float], shape: dict[str, float]) -> bool:
        return all(shape.get(k, shape.get("*", 0.0)) >= v - 1e-9 for k, v in req.items() if v > 0)

    def offer(shape: dict[str, float], custom: list[str]) -> str:  # "8 CPUs/0 GPUs/1 gpu_node"
        return "/".join([f"{shape.get('CPU', 0):g} CPUs", f"{shape.get('GPU', 0):g} GPUs",
                         *(f"{shape.get(k, 0):g} {k}" for k in custom)])

    for setting, req in stage_requests(cfg).items():
        if any(fits(req, s) for s in shapes):
            continue
        want = " and ".join(f"{v:g} {k}" for k, v in req.items() if v > 0)
        custom = [k for k, v in req.items() if k not in ("CPU", "GPU") and v > 0]
        biggest = max(alive, key=lambda s: (s.get("GPU", 0.0), s.get("CPU", 0.0)), default={})
        cluster = (f"{len(alive)} node{'s' if len(alive) != 1 else ''}, "
                   f"{sum(s.get('CPU', 0.0) for s in alive):g} CPUs and {sum(s.get('GPU', 0.0) for s in alive):g} "
                   f"GPUs in all; the largest node has {biggest.get('CPU', 0.0):g} CPUs and "
                   f"{biggest.get('GPU', 0.0):g} GPUs")
        cluster += "".join(f"; {sum(s.get(k, 0.0) > 0 for s in alive)} node(s) with {k}" for k in custom)
        scaler = ("no autoscaler" if types is None else
                  "an autoscaler whose node types offer at most " + ", ".join(offer(t, custom) for t in types))
        fix = (f" (the worker types of cluster/*.yaml advertise {', '.join(custom)}), or clear that *_resources "
               "setting" if custom else "")
        raise UnsatisfiableResources(f"{setting}: a worker needs {want} on one node, which this cluster can never "
                                     f"give ({cluster}; {scaler}); lower the setting or add such nodes{fix}")


def probe_gpu_bf16(gpus: float) -> bool:
    """Whether the cluster's GPUs support bf16, asked of one (a Ray task holding ``gpus`` of a GPU)."""
    import ray

    @ray.remote(num_gpus=gpus, num_cpus=0)
    def bf16() -> bool:
        import torch

        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False))

    return bool(ray.get(bf16.remote()))
