"""Peak memory of a sweep, measured from outside: the sweep runs as a subprocess and a sampler reads its processes,
the machine and Ray's object store every 0.5 s.

    python benchmarks/memory.py --scenario smoke                 # sweeps/smoke.yaml as is
    python benchmarks/memory.py --scenario scarcity-wave         # the memory-relevant part of sweeps/scarcity.yaml
    python benchmarks/memory.py --scenario smoke --extra compute.precision=fp32 teacher.epochs=1
    python benchmarks/memory.py --scenario smoke --extra teacher.epochs=1 distill.stage1_epochs=0 \
        distill.stage2_epochs=1 "sweep.sample_rates=[0.02]"     # a ~3 min check of this script itself

Each scenario runs (from the repository root, with ``HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled RAY_DEDUP_LOGS=1
PYTHONUNBUFFERED=1``, ``$METAKD_DATA`` passed through, ``RAY_ADDRESS`` removed, the settings of ``_env.py``)::

    python -m metakd_ray.sweep <config> ray.address=local ray.num_cpus=2 storage.root=<fresh tmp dir> <scenario
        overrides> <--extra overrides>

into a fresh storage root (``/tmp/metakd-memory-*``, removed afterwards unless ``--keep-storage``), so every teacher
and cache is built: nothing is reused from earlier runs. The sweep's whole output goes to
``/tmp/metakd-memory-<scenario>-*.log`` (its path is in the JSON); ``[sweep]`` lines are echoed as they come.

Scenarios
---------
``smoke``: ``sweeps/smoke.yaml`` unchanged (2 teachers, 2 caches of 163 books reviews, 2 concurrent trials).

``scarcity-wave``: ``sweeps/scarcity.yaml`` with ``sweep.sample_rates=[1.0] sweep.seeds=[0]
sweep.target_domains=[books,dvd] teacher.epochs=1 distill.stage1_epochs=1 distill.stage2_epochs=1`` — 3 teachers
(single books, single dvd, the meta-teacher on all four domains), 4 caches, 4 trials. Why its peak is the peak of a
full wave of the scarcity sweep:

* same data sizes: rate 1.0 is the largest rate, so the single teachers and the meta-teacher (all 6,480 training
  reviews of the four domains) train on the most data any teacher of the sweep sees, and the caches are the largest
  of the sweep: books (1,631 training reviews, 1,022 characters on average) and dvd (1,621, 945) have the longest
  reviews, so the most real tokens per cache (electronics and kitchen: 622 and 523 characters); ~0.7 GB each;
* same models, max_length (128), batch sizes, precision and Ray layout (2-worker teacher, 2 x 0.5-CPU cache actors,
  2 x 1-CPU trials), so the same concurrency: the teachers train one at a time, a wave's caches are built by one Ray
  Data job per teacher class, and 4 cells keep 2 trials running at once, as any wave of 45-75 cells does;
* epochs and the number of cells change how long each phase lasts, not what is resident at once (model, optimiser,
  a batch's activations, the cache a trial has loaded), so 1 teacher epoch and 1+1 student epochs give the same
  peak as the sweep's 3 and 10+3; more seeds and rates add cells of the same or smaller size.

What it does not cover: (1) caches that accumulate in reused trial actors. ``run_trials`` uses ``reuse_actors=True``
and ``cache.load_cache`` keeps every cache it loaded in a module-level dict (``reader._LOADED``) that nothing in a
trial unloads, so a reused ``ray::ImplicitFunc`` actor holds every cache its trials have read: here each of the 2
actors runs ~2 of the 4 trials (so up to 2 caches, ~1.4 GB each actor); in a full wave (75 cells, ~12 GB of caches
in wave 1) an actor could hold up to half the wave's caches, far more than this run shows. Look at the
``tune trial`` role's single-process peak and the ``processes`` list of the JSON to see whether a trial actor's RSS
steps up with its second trial. (2) A cache job of a full wave (dozens of caches and teachers in one Ray Data job
instead of 2): the object store holds the rows in flight, which the actor pool bounds, and an actor holds one teacher
at a time, so it should not need more — but that is not measured here. (3) Other machines: a cluster node runs a
different mix of processes. (4) GPUs: device memory is not measured.

What is measured
----------------
Every 0.5 s (``--interval``):

* **process tree**: the sweep driver and all its descendants (children recursively: gcs_server, raylet, dashboard
  and its agents, log monitor, and the raylet's workers: ``ray::RayTrainWorker``, ``ray::TrainController``,
  ``ray::MapWorker(MapBatches(TeacherPass))`` and Ray Data tasks, ``ray::ImplicitFunc`` (Tune trials),
  ``ray::IDLE`` ...). A process seen once stays tracked while it lives, even if re-parented. Per process: RSS
  (``/proc/<pid>/statm``, cheap). Each process gets a role from its name and command line (its Ray process title)
  *at that sample* (a ``ray::IDLE`` worker that becomes a data task counts as a data actor while it is one):
  driver, raylet, gcs, dashboard/agents, train worker (``RayTrainWorker``), data actor (Ray Data's map workers and
  tasks, ``TeacherPass``, ``DatasetManager``, its stats/autoscaling actors), tune trial (``ImplicitFunc``), other ray
  worker (``ray::IDLE``, ``TrainController`` and any other ``ray::`` process), other.
  ``peak_tree_gib`` is the peak over samples of the sum of RSS over the tree — an upper bound of what the sweep's
  processes hold: RSS counts shared pages (libtorch, the Python runtime of ~20 forked Ray workers, object-store
  pages a process has touched) once in every process that maps them.
* **PSS/USS** from ``/proc/<pid>/smaps_rollup`` (cheaper than psutil's ``memory_full_info``, still ~3 ms a Ray
  worker), read when a process first appears and then every 5 s (``--pss-every``); between reads a process counts
  with its last value, so a PSS peak shorter than 5 s can be missed (RSS is read every sample).
  ``peak_tree_pss_gib`` splits shared pages between the processes that map them, so it is the better "whole sweep"
  figure; USS is the pages only that process maps.
* **machine**: ``psutil.virtual_memory()`` ``total - available`` minus its value just before the sweep started
  (``peak_machine_gib``). It counts everything on the machine: the object store's tmpfs pages, page cache that cannot
  be reclaimed — and any other work on a shared machine, which then makes this figure noisy.
* **object store**: Ray's plasma store is one file that the raylet creates in ``/dev/shm`` (``/tmp`` when
  ``/dev/shm`` is too small; fallback files, presumably named alike, when the store is full — none in these runs)
  and unlinks at once, keeping it open and mapped, so no ``plasma*`` name is visible in ``/dev/shm``. The sampler
  finds the file through the raylet's open descriptors (``/proc/<raylet>/fd/* -> .../plasmaXXXXXX (deleted)``) and
  reads its allocated size (``st_blocks * 512``): the tmpfs pages the store has ever touched. The store's allocator
  does not give freed pages back to the kernel, so this is a high-water mark of the object store's use, and it is
  memory the machine pays for (not counted in the raylet's RSS; counted in the RSS/PSS of the workers that wrote or
  read those pages). ``peak_object_store_gib``; the file's apparent size is the store's capacity
  (``object_store_capacity_gib``). Also ``shm_delta_gib``: ``/dev/shm``'s used bytes minus their value before the
  start (machine-wide).

Phases are read from the sweep's output (``[sweep] teacher``, ``[sweep] caches ...: N (``, ``... built``, ``cells
ok``): start-up, teachers, caches, trials, report; each sample is labelled with the phase it falls in and the JSON
has the peaks per phase.

Reported (``benchmarks/results/memory_<scenario>.json`` and a table): per role the peak RSS of any single process and
the peak of the role's sum (and its PSS sum); ``peak_tree_gib``, ``peak_tree_pss_gib``, ``peak_machine_gib``,
``peak_object_store_gib``; per phase the same; the largest processes; the sweep's wall time and exit code; a
timeline downsampled to ~200 points (each point the maximum of the samples it stands for, so peaks survive). For
``scarcity-wave``: ``target_gib: 6`` (the issue: the whole machine <= 6 GiB at the scarcity wave) and ``target_pass``
(``peak_machine_gib <= 6``; ``target_pass_tree``: the same test on ``peak_tree_pss_gib + peak_object_store_gib``,
which other work on the machine cannot inflate; both null when the sweep did not finish). The last line printed is
the headline. When the sweep fails, its last 40 lines are printed, the JSON is still written (with ``exit_code``)
and the script exits non-zero; a missed target does not change the exit status. ``--timeout S`` stops a sweep that
runs longer (SIGINT to the driver, then SIGKILL to each process of its tree still there 30 s later), which counts
as a failure.

Time on 2 CPUs (the sweep's own time; the sampler itself uses ~4 % of one CPU with ~30 processes in the tree, e.g.
10.0 CPU-s in the 243 s smoke run: ``sampler_cpu_s`` / ``monitor_cpu_s`` in the JSON): ``smoke`` 4.0 min measured
(243 s, 2026-12-02, 1-min load average 1.32 at the start, 0.45 GiB used on the machine;
``results/memory_smoke.json``: peak tree RSS 7.09 GiB, PSS 4.83, machine +5.06, object store 0.05, all at the two
concurrent trials); ``scarcity-wave`` ~30-45 min (an estimate, not measured: ``--dry-run`` says 0.7 CPU-hours —
teachers 0.4, caches 0.1, trials 0.2 — plus Ray start-up; mostly the meta-teacher's epoch on 6,480 reviews); the
tiny check above ~2.5-3.5 min (160-210 s on a loaded machine; ``results/memory_smoke-tiny.json``).
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _env  # noqa: F401  (environment only: offline hub, no Ray token auth, no usage stats)
from _env import REPO


def _import_psutil():
    """psutil, from the environment or else the copy Ray vendors in ``ray/thirdparty_files`` (without importing
    Ray)."""
    try:
        import psutil
    except ImportError:
        spec = importlib.util.find_spec("ray")
        if spec is None or not spec.submodule_search_locations:
            raise
        sys.path.append(os.path.join(next(iter(spec.submodule_search_locations)), "thirdparty_files"))
        import psutil
    return psutil


psutil = _import_psutil()

GIB = 1024 ** 3
SCENARIOS: dict[str, tuple[str, list[str]]] = {
    "smoke": ("sweeps/smoke.yaml", []),
    "scarcity-wave": ("sweeps/scarcity.yaml", [
        "sweep.sample_rates=[1.0]", "sweep.seeds=[0]", "sweep.target_domains=[books,dvd]", "teacher.epochs=1",
        "distill.stage1_epochs=1", "distill.stage2_epochs=1"]),
}
TARGET_GIB = {"scarcity-wave": 6.0}
ROLES = ("driver", "raylet", "gcs", "dashboard/agents", "train worker", "data actor", "tune trial",
         "other ray worker", "other")
PHASES = [  # (pattern on a line of the sweep's output, phase that starts with it)
    (re.compile(r"^\[sweep\] teacher \d+/\d+"), "teachers"),
    (re.compile(r"^\[sweep\] caches \(.*\): \d+ \("), "caches"),
    (re.compile(r"^\[sweep\] caches \(.*\): \d+ built"), "trials"),
    (re.compile(r"^\[sweep\] \d+/\d+ cells ok"), "report"),
]
# Ray process titles; prefixes short enough to match the 15-character /proc/<pid>/comm too ("ray::ImplicitFu")
DATA_MARKERS = ("MapWorker", "TeacherPass", "MapBatches", "ReadParquet", "ReadArrow", "FromArrow", "Repartition",
                "Write", "Dataset", "StatsActor", "_StatsActo", "AutoscalingCo", "_Autoscalin", "SplitCoordina",
                "_map_task")
TRIAL_MARKERS = ("ImplicitFu", "run_trial", "Trainable")
TRAIN_MARKERS = ("RayTrainWo",)


def label_of(name: str, cmdline: list[str]) -> str:
    """A short name for a process: its Ray title without the method (``ray::ImplicitFunc``), else the script or
    module it runs, else its executable's name."""
    title = cmdline[0] if cmdline else name
    if title.startswith("ray::"):
        return re.sub(r"\.[A-Za-z_]\w*$", "", title.split(" ")[0])
    if title.startswith("ray-dashboard-") or name in ("raylet", "gcs_server"):
        return title.split(" ")[0] if title.startswith("ray-dashboard-") else name
    args = " ".join(cmdline).split() if cmdline else []
    if not args or not os.path.basename(args[0]).startswith("python"):
        return name
    for i, a in enumerate(args):
        if a == "-m" and i + 1 < len(args):
            return f"-m {args[i + 1]}"
        if a.endswith(".py"):
            return os.path.basename(a)
    return name


def main_label(labels: list[str]) -> str:
    """What a process was: its last Ray title other than ``ray::IDLE``, else its first label."""
    ray = [x for x in labels if x.startswith("ray::") and x != "ray::IDLE"]
    return ray[-1] if ray else labels[0]


def role_of(is_driver: bool, name: str, cmdline: list[str]) -> str:
    if is_driver:
        return "driver"
    title = cmdline[0] if cmdline else name
    joined = " ".join(cmdline)
    if name == "raylet" or title.endswith("/raylet"):
        return "raylet"
    if name.startswith("gcs_server") or "gcs_server" in title:
        return "gcs"
    if title.startswith("ray::"):
        t = title[5:]
        if any(m in t for m in TRAIN_MARKERS):
            return "train worker"
        if any(m in t for m in TRIAL_MARKERS):
            return "tune trial"
        if any(m in t for m in DATA_MARKERS):
            return "data actor"
        return "other ray worker"
    if "default_worker.py" in joined or "setup_worker.py" in joined:  # a worker starting, not yet titled
        return "other ray worker"
    if ("dashboard" in joined or "agent" in joined or "log_monitor" in joined or "monitor.py" in joined
            or title.startswith("ray-dashboard-")):
        return "dashboard/agents"
    return "other"


def smaps_rollup(pid: int) -> tuple[int, int] | None:
    """(PSS, USS) bytes of ``pid`` from ``/proc/<pid>/smaps_rollup``; None when unreadable."""
    pss = uss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    pss = int(line.split()[1]) * 1024
                elif line.startswith((b"Private_Clean:", b"Private_Dirty:")):
                    uss += int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return pss, uss


def plasma_files(raylet_pid: int) -> dict[tuple[int, int], tuple[int, int, str]]:
    """The object store's files the raylet holds open: {(dev, inode): (allocated bytes, apparent size, path)}."""
    out = {}
    fd_dir = f"/proc/{raylet_pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return out
    for fd in fds:
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
            if "plasma" not in os.path.basename(target):
                continue
            st = os.stat(f"{fd_dir}/{fd}")
        except OSError:
            continue
        out[(st.st_dev, st.st_ino)] = (st.st_blocks * 512, st.st_size, target)
    return out


class Sampler:
    """Samples the tree under ``root_pid``, the machine and the object store; keeps running peaks and a timeline."""

    def __init__(self, root_pid: int, pss_every: float, shm_dir: str = "/dev/shm"):
        self.root_pid = root_pid
        self.procs: dict[int, psutil.Process] = {}
        self.cmdlines: dict[tuple[int, float, str], list[str]] = {}  # re-read when the name (comm) changes
        self.pss_every, self.next_pss = pss_every, 0.0
        self.pss: dict[int, tuple[int, int]] = {}  # last PSS/USS per pid
        self.shm_dir = shm_dir if os.path.isdir(shm_dir) else None
        vm = psutil.virtual_memory()
        self.machine_total = vm.total
        self.machine_base = vm.total - vm.available
        self.shm_base = shutil.disk_usage(self.shm_dir).used if self.shm_dir else 0
        self.samples: list[dict] = []
        self.role_peak_proc = collections.defaultdict(int)
        self.role_peak_sum = collections.defaultdict(int)
        self.role_peak_pss = collections.defaultdict(int)
        self.role_max_procs = collections.defaultdict(int)
        self.proc_info: dict[tuple[int, float], dict] = {}
        self.store_capacity = 0
        self.store_paths: set[str] = set()

    def _tree(self) -> dict[int, psutil.Process]:
        found: dict[int, psutil.Process] = {}

        def add(p: psutil.Process) -> None:
            old = self.procs.get(p.pid)
            found[p.pid] = old if old is not None and old == p else p

        try:
            root = self.procs.get(self.root_pid) or psutil.Process(self.root_pid)
            add(root)
            for p in root.children(recursive=True):
                add(p)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            pass
        for pid, p in list(self.procs.items()):  # seen before, since re-parented (e.g. to init): still ours
            if pid in found:
                continue
            try:
                if p.is_running():
                    add(p)
                    for c in p.children(recursive=True):
                        add(c)
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                pass
        self.procs = found
        return found

    def sample(self, t: float, phase: str) -> dict:
        procs = self._tree()
        do_pss = t >= self.next_pss
        if do_pss:
            self.next_pss = t + self.pss_every
        role_sum = collections.defaultdict(int)
        role_n = collections.defaultdict(int)
        role_pss = collections.defaultdict(int)
        tree = tree_pss = tree_uss = 0
        raylets = []
        for pid, p in procs.items():
            try:
                with p.oneshot():
                    rss = p.memory_info().rss
                    name = p.name()
                    ctime = p.create_time()
                    cmd = self.cmdlines.get((pid, ctime, name))
                    if cmd is None:
                        try:
                            cmd = p.cmdline()
                        except psutil.AccessDenied:
                            cmd = []
                        if cmd:
                            self.cmdlines[(pid, ctime, name)] = cmd
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                continue
            role = role_of(pid == self.root_pid, name, cmd)
            if role == "raylet":
                raylets.append(pid)
            if do_pss or pid not in self.pss:  # a new process is read at once, then every pss_every seconds
                r = smaps_rollup(pid)
                if r is not None:
                    self.pss[pid] = r
            pss, uss = self.pss.get(pid, (0, 0))
            tree += rss
            tree_pss += pss
            tree_uss += uss
            role_sum[role] += rss
            role_pss[role] += pss
            role_n[role] += 1
            self.role_peak_proc[role] = max(self.role_peak_proc[role], rss)
            info = self.proc_info.get((pid, ctime))
            if info is None:
                info = self.proc_info[(pid, ctime)] = {"pid": pid, "labels": [], "roles": [], "first_s": round(t, 1),
                                                       "peak_rss": 0, "peak_pss": 0, "peak_uss": 0}
            lab = label_of(name, cmd)
            if lab not in info["labels"]:
                info["labels"].append(lab)
            if role not in info["roles"]:
                info["roles"].append(role)
            info["last_s"] = round(t, 1)
            info["peak_rss"] = max(info["peak_rss"], rss)
            info["peak_pss"] = max(info["peak_pss"], pss)
            info["peak_uss"] = max(info["peak_uss"], uss)
        self.pss = {pid: v for pid, v in self.pss.items() if pid in procs}
        self.cmdlines = {k: v for k, v in self.cmdlines.items() if k[0] in procs}
        for role, v in role_sum.items():
            self.role_peak_sum[role] = max(self.role_peak_sum[role], v)
            self.role_max_procs[role] = max(self.role_max_procs[role], role_n[role])
        for role, v in role_pss.items():
            self.role_peak_pss[role] = max(self.role_peak_pss[role], v)
        store = 0
        files: dict = {}
        for pid in raylets:
            files.update(plasma_files(pid))
        for used, size, path in files.values():
            store += used
            self.store_capacity = max(self.store_capacity, size if path.startswith(("/dev/shm", "/tmp")) else 0)
            self.store_paths.add(path)
        vm = psutil.virtual_memory()
        s = {"t": t, "phase": phase, "n": len(procs), "tree": tree, "tree_pss": tree_pss, "tree_uss": tree_uss,
             "machine": (vm.total - vm.available) - self.machine_base,
             "store": store, "shm": (shutil.disk_usage(self.shm_dir).used - self.shm_base) if self.shm_dir else 0,
             "roles": dict(role_sum)}
        self.samples.append(s)
        return s


def gib(x: float) -> float:
    return round(x / GIB, 3)


def downsample(samples: list[dict], points: int = 200) -> dict:
    """~``points`` points; each the max of every series over the samples it stands for (its time: the first)."""
    if not samples:
        return {}
    k = max(1, math.ceil(len(samples) / points))
    out: dict = {"t_s": [], "phase": [], "tree_gib": [], "tree_pss_gib": [], "machine_gib": [],
                 "object_store_gib": [], "shm_delta_gib": [], "roles_gib": {r: [] for r in ROLES}}
    for i in range(0, len(samples), k):
        b = samples[i:i + k]
        out["t_s"].append(round(b[0]["t"], 1))
        out["phase"].append(b[-1]["phase"])
        for key, name in (("tree", "tree_gib"), ("tree_pss", "tree_pss_gib"), ("machine", "machine_gib"),
                          ("store", "object_store_gib"), ("shm", "shm_delta_gib")):
            out[name].append(gib(max(s[key] for s in b)))
        for r in ROLES:
            out["roles_gib"][r].append(gib(max(s["roles"].get(r, 0) for s in b)))
    out["roles_gib"] = {r: v for r, v in out["roles_gib"].items() if any(v)}
    return out


def run_env() -> dict:
    e = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled", "RAY_DEDUP_LOGS": "1",
         "PYTHONUNBUFFERED": "1"}
    e["PATH"] = f"{Path(sys.executable).parent}:{e.get('PATH', '')}"
    e.pop("RAY_ADDRESS", None)
    return e


def kill_tree(proc: subprocess.Popen, sampler: Sampler | None) -> None:
    """SIGINT the driver (Ray shuts its processes down), then SIGKILL whatever of its tree (as last sampled, plus its
    current children) still runs after 30 s — each process by its pid, only processes this script started."""
    pids = dict(sampler.procs) if sampler else {}
    try:
        for c in psutil.Process(proc.pid).children(recursive=True):
            pids.setdefault(c.pid, c)
    except psutil.Error:
        pass
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
    left = []
    for p in pids.values():
        try:
            if p.is_running():
                p.kill()
                left.append(p)
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=10)
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Peak memory of a sweep, measured from outside (see the module doc).")
    ap.add_argument("--scenario", choices=sorted(SCENARIOS), default="smoke")
    ap.add_argument("--extra", nargs="+", action="extend", default=[], metavar="key=value",
                    help="overrides passed on to the sweep after the scenario's own")
    ap.add_argument("--interval", type=float, default=0.5, help="seconds between samples")
    ap.add_argument("--pss-every", type=float, default=5.0, help="seconds between PSS/USS reads")
    ap.add_argument("--timeout", type=float, default=0, help="kill the sweep after this many seconds (0: never)")
    ap.add_argument("--keep-storage", action="store_true", help="keep the sweep's tmp storage root")
    ap.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/memory_<scenario>.json")
    args = ap.parse_args(argv)

    config, overrides = SCENARIOS[args.scenario]
    storage = tempfile.mkdtemp(prefix=f"metakd-memory-{args.scenario}-")
    log_fd, log_path = tempfile.mkstemp(prefix=f"metakd-memory-{args.scenario}-", suffix=".log")
    cmd = [sys.executable, "-m", "metakd_ray.sweep", config, "ray.address=local", "ray.num_cpus=2",
           f"storage.root={storage}", *overrides, *args.extra]
    shown = ["python", "-m", "metakd_ray.sweep", config, "ray.address=local", "ray.num_cpus=2",
             "storage.root=<tmp>", *overrides, *args.extra]
    print("[memory] " + " ".join(shown), flush=True)
    load_before = os.getloadavg()

    tail: collections.deque[str] = collections.deque(maxlen=40)
    events: list[dict] = []
    state = {"phase": "start-up"}
    sampler = None
    t0 = time.monotonic()
    me0 = psutil.Process().cpu_times()
    log = os.fdopen(log_fd, "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", bufsize=1, start_new_session=False)

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            tail.append(line.rstrip("\n"))
            s = line.strip()
            for pat, phase in PHASES:
                if pat.search(s):
                    state["phase"] = phase
                    events.append({"t_s": round(time.monotonic() - t0, 1), "phase": phase, "line": s[:200]})
                    break
            if s.startswith("[sweep]"):
                print(f"  {time.monotonic() - t0:7.1f}s {s}", flush=True)

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    interrupted = None
    sample_cpu = 0.0
    try:
        sampler = Sampler(proc.pid, args.pss_every)
        nxt = time.monotonic()
        while proc.poll() is None:
            t = time.monotonic() - t0
            if args.timeout and t > args.timeout:
                interrupted = f"timeout after {args.timeout:g} s"
                break
            c = time.thread_time()
            sampler.sample(t, state["phase"])
            sample_cpu += time.thread_time() - c
            nxt += args.interval
            time.sleep(max(0.0, nxt - time.monotonic()))
    except KeyboardInterrupt:
        interrupted = "interrupted"
    finally:
        if proc.poll() is None:
            print(f"[memory] {interrupted or 'stopping'}: stopping the sweep", flush=True)
            kill_tree(proc, sampler)
        wall = time.monotonic() - t0
        th.join(10)
        log.close()
    rc = proc.returncode
    me1 = psutil.Process().cpu_times()
    if not args.keep_storage:
        shutil.rmtree(storage, ignore_errors=True)

    S = sampler.samples

    def peak(key: str, ss: list[dict] = S) -> int:
        return max((s[key] for s in ss), default=0)

    phases = {}
    for ph in dict.fromkeys(s["phase"] for s in S):
        ss = [s for s in S if s["phase"] == ph]
        phases[ph] = {"from_s": round(ss[0]["t"], 1), "to_s": round(ss[-1]["t"], 1),
                      "peak_tree_gib": gib(peak("tree", ss)), "peak_tree_pss_gib": gib(peak("tree_pss", ss)),
                      "peak_machine_gib": gib(peak("machine", ss)), "peak_object_store_gib": gib(peak("store", ss)),
                      "peak_roles_gib": {r: gib(max(s["roles"].get(r, 0) for s in ss)) for r in ROLES
                                         if any(s["roles"].get(r) for s in ss)}}
    roles = {r: {"max_processes": sampler.role_max_procs[r], "peak_process_gib": gib(sampler.role_peak_proc[r]),
                 "peak_sum_gib": gib(sampler.role_peak_sum[r]), "peak_pss_sum_gib": gib(sampler.role_peak_pss[r])}
             for r in ROLES if sampler.role_max_procs.get(r)}
    procs = sorted(sampler.proc_info.values(), key=lambda i: -i["peak_rss"])
    for i in procs:
        for k in ("peak_rss", "peak_pss", "peak_uss"):
            i[k + "_gib"] = gib(i.pop(k))
    result = {
        "scenario": args.scenario, "config": config, "overrides": [*overrides, *args.extra],
        "command": " ".join(shown), "exit_code": rc, "interrupted": interrupted, "wall_s": round(wall, 1),
        "peak_tree_gib": gib(peak("tree")), "peak_tree_pss_gib": gib(peak("tree_pss")),
        "peak_tree_uss_gib": gib(peak("tree_uss")), "peak_machine_gib": gib(peak("machine")),
        "peak_object_store_gib": gib(peak("store")), "object_store_capacity_gib": gib(sampler.store_capacity),
        "object_store_files": sorted(sampler.store_paths), "peak_shm_delta_gib": gib(peak("shm")),
        "max_processes": max((s["n"] for s in S), default=0),
        "roles": roles, "phases": phases, "events": events,
        "processes": procs[:40], "processes_seen": len(procs),
        "samples": len(S), "interval_s": args.interval, "pss_every_s": args.pss_every,
        "monitor_cpu_s": round((me1.user + me1.system) - (me0.user + me0.system), 1),
        "sampler_cpu_s": round(sample_cpu, 1),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "total_gib": gib(sampler.machine_total), "used_before_gib": gib(sampler.machine_base),
                    "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
        "log": log_path,
        "timeline": downsample(S),
    }
    target = TARGET_GIB.get(args.scenario)
    if target is not None:
        result["target_gib"] = target
        ok = rc == 0 and not interrupted  # a sweep that failed or was stopped may not have reached its peak
        result["target_pass"] = result["peak_machine_gib"] <= target if ok else None
        result["target_pass_tree"] = (result["peak_tree_pss_gib"] + result["peak_object_store_gib"] <= target
                                      if ok else None)
    out = args.out or HERE / "results" / f"memory_{args.scenario}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print()
    print(f"{'role':18s} {'procs':>5s} {'peak 1 proc':>12s} {'peak sum':>9s} {'peak PSS sum':>13s}   (GiB, RSS)")
    for r, v in roles.items():
        print(f"{r:18s} {v['max_processes']:5d} {v['peak_process_gib']:12.2f} {v['peak_sum_gib']:9.2f} "
              f"{v['peak_pss_sum_gib']:13.2f}")
    print(f"{'phase':12s} {'from s':>7s} {'to s':>7s} {'tree':>6s} {'PSS':>6s} {'machine':>8s} {'store':>6s}  (GiB)")
    for ph, v in phases.items():
        print(f"{ph:12s} {v['from_s']:7.1f} {v['to_s']:7.1f} {v['peak_tree_gib']:6.2f} {v['peak_tree_pss_gib']:6.2f} "
              f"{v['peak_machine_gib']:8.2f} {v['peak_object_store_gib']:6.2f}")
    print("largest processes (peak RSS GiB): " + ", ".join(
        f"{main_label(i['labels'])} {i['peak_rss_gib']:.2f}" for i in procs[:6]))
    print(f"tree RSS {result['peak_tree_gib']:.2f}, PSS {result['peak_tree_pss_gib']:.2f}, USS "
          f"{result['peak_tree_uss_gib']:.2f}; machine +{result['peak_machine_gib']:.2f} "
          f"(of {gib(sampler.machine_total):.1f}, {gib(sampler.machine_base):.2f} used before); object store "
          f"{result['peak_object_store_gib']:.2f} of {result['object_store_capacity_gib']:.2f}; /dev/shm "
          f"+{result['peak_shm_delta_gib']:.2f}; {len(S)} samples, monitor {result['monitor_cpu_s']} CPU-s (sampler "
          f"{result['sampler_cpu_s']}); "
          f"log {log_path}; -> {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    failed = rc != 0 or interrupted is not None
    if failed:
        print(f"[memory] the sweep exited with {rc}{f' ({interrupted})' if interrupted else ''}; its last lines:")
        for line in tail:
            print("  | " + line)
    verdict = ""
    if target is not None:
        v = {True: "PASS", False: "FAIL", None: "n/a"}[result["target_pass"]]
        verdict = f" target<={target:g}GiB:{v}"
    print(f"memory {args.scenario}: peak_tree_gib={result['peak_tree_gib']:.2f} "
          f"peak_machine_gib={result['peak_machine_gib']:.2f} peak_object_store_gib="
          f"{result['peak_object_store_gib']:.2f} wall_s={result['wall_s']:.0f} exit={rc}"
          f"{f' ({interrupted})' if interrupted else ''}{verdict}", flush=True)
    return 0 if not failed else (rc if isinstance(rc, int) and 0 < rc < 256 else 1)


if __name__ == "__main__":
    sys.exit(main())
