"""Worker types: what each stage asks Ray for (``ray.<stage>_resources``), and the cluster configs that offer it.

Offline and fast: no Ray cluster is started. Launcher configs go through the installed Ray's JSON schema,
``prepare_config`` and ``validate_config`` and the security-group rules Ray's AWS provider would create; the
KubeRay RayCluster (and the RayJob's embedded copy) through the in-cluster autoscaler's own translator.
"""

from __future__ import annotations

import copy
import re
import sys
import tomllib
import types
from unittest import mock

import pytest
import yaml
from test_cluster_configs import REPO, load, prepared  # tests/ is on sys.path, as for toy.py

from metakd_ray import config as C
from metakd_ray.raycluster import ANY_SHAPE, UnsatisfiableResources, check_resources, stage_requests

LAUNCHER = ["aws", "gcp"]
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
# The overrides every cluster config documents: teachers and caches on the GPU type, trials on the trial type.
ON_TYPES = ("ray.use_gpu=true", "ray.trial_gpus=0", "ray.teacher_resources.gpu_node=0.001",
            "ray.cache_resources.gpu_node=0.001", "ray.trial_resources.trial_node=0.001")


# ---------------------------------------------------------------------------------------------------- config


def test_resource_fields_default_empty_and_round_trip():
    r = C.RayConfig()
    assert (r.teacher_resources, r.cache_resources, r.trial_resources) == ({}, {}, {})
    cfg = C.from_dict({}, ["ray.trial_resources.trial_node=0.001", "ray.cache_resources={gpu_node: 1}"])
    assert cfg.ray.trial_resources == {"trial_node": 0.001} and cfg.ray.cache_resources == {"gpu_node": 1.0}
    assert isinstance(cfg.ray.cache_resources["gpu_node"], float)
    assert C.from_dict(yaml.safe_load(C.to_yaml(cfg))) == cfg  # the resolved config.yaml reads back the same


@pytest.mark.parametrize("value, message", [
    ({"GPU": 1}, r"ray.trial_resources.GPU: not allowed \(set it with ray.trial_gpus\)"),
    ({"cpu": 1}, r"ray.trial_resources.cpu: not allowed \(set it with ray.trial_cpus\)"),
    ({"memory": 1}, r"ray.trial_resources.memory: not allowed"),
    ({"trial_node": -1}, r"ray.trial_resources.trial_node: -1 is out of range; allowed 0 or \[0.0001, 1000000\]"),
    ({"trial_node": 1e-6}, r"ray.trial_resources.trial_node: 1e-06 is out of range"),
    ({"trial_node": "a"}, r"ray.trial_resources.trial_node: 'a' \(str\) is not allowed; expected a number"),
    ({"trial_node": True}, r"ray.trial_resources.trial_node: True \(bool\) is not allowed"),
    ({"bad name": 1}, r"ray.trial_resources: key 'bad name' is not allowed; expected a resource name"),
    ([1], r"ray.trial_resources: \[1\] is not allowed; expected a mapping"),
])
def test_bad_resources_are_one_line_errors(value, message):
    with pytest.raises(C.ConfigError) as e:
        C.from_dict({"ray": {"trial_resources": value}})
    assert len(e.value.errors) == 1 and "\n" not in e.value.errors[0]
    assert re.search(message, e.value.errors[0]), e.value.errors[0]
    with pytest.raises(C.ConfigError, match=message):  # constructing the section directly says the same
        C.RayConfig(trial_resources=value)


def test_resource_typos_and_other_fields_still_checked():
    with pytest.raises(C.ConfigError, match=r"ray.trial_resorces: unknown key.*did you mean 'ray.trial_resources'"):
        C.from_dict({"ray": {"trial_resorces": {"trial_node": 1}}})
    with pytest.raises(C.ConfigError) as e:  # every problem of the section at once
        C.RayConfig(cpus_per_actor=0, cache_resources={"GPU": 1})
    assert len(e.value.errors) == 2
    assert C.RayConfig(teacher_resources={"accelerator_type:A10G": 0.001, "gpu_node": 0}).teacher_resources == {
        "accelerator_type:A10G": 0.001, "gpu_node": 0.0}


# ---------------------------------------------------------------------------------------------------- requests


def test_each_stage_request_carries_its_resources(tmp_path):
    from metakd_ray.sweep.run import trial_resources

    cfg = C.from_dict({"storage": {"root": str(tmp_path)}}, ON_TYPES)
    assert cfg.ray.requests("teacher") == {"CPU": 1.0, "GPU": 1.0, "gpu_node": 0.001}
    assert cfg.ray.requests("cache") == {"CPU": 1.0, "GPU": 1.0, "gpu_node": 0.001}
    assert cfg.ray.requests("trial") == {"CPU": 1.0, "trial_node": 0.001}  # trial_gpus=0: no GPU held
    assert trial_resources(cfg) == {"cpu": 1.0, "trial_node": 0.001}  # tune.with_resources spells cpu/gpu in lower case
    req = stage_requests(cfg)
    assert req["ray.cpus_per_worker / ray.use_gpu / ray.teacher_resources"] == cfg.ray.requests("teacher")
    assert req["ray.cpus_per_actor / ray.cache_gpus / ray.cache_resources"] == cfg.ray.requests("cache")
    assert req["ray.trial_cpus / ray.trial_gpus / ray.trial_resources"] == cfg.ray.requests("trial")
    plain = C.from_dict({})  # the defaults: CPUs only, any node
    assert trial_resources(plain) == {"cpu": 1.0}
    assert set(stage_requests(plain)) == {"ray.trial_cpus / ray.trial_gpus", "ray.cpus_per_actor / ray.cache_gpus",
                                          "ray.cpus_per_worker / ray.use_gpu"}


def test_teacher_scaling_config_carries_teacher_resources(tmp_path, monkeypatch):
    """``teacher.job.fit`` builds the TorchTrainer: its ScalingConfig asks for ``RayConfig.requests("teacher")``."""
    import metakd_ray.teacher.job as TJ

    built = {}

    class Stop(Exception):
        pass

    def trainer(*args, **kwargs):
        built.update(kwargs)
        raise Stop

    monkeypatch.setattr(TJ, "TorchTrainer", trainer)
    monkeypatch.setattr(TJ, "teacher_tracking", lambda *a, **k: None)
    cfg = C.from_dict({"storage": {"root": str(tmp_path)}}, ["ray.teacher_resources.gpu_node=0.001",
                                                              "ray.train_workers=2"])
    storage = mock.MagicMock()
    with pytest.raises(Stop):
        TJ.fit(cfg, types.SimpleNamespace(key="t"), storage, inputs=lambda c: None)
    scaling = built["scaling_config"]
    assert scaling.num_workers == 2 and scaling.resources_per_worker == {"CPU": 1.0, "gpu_node": 0.001}


def test_cache_actor_pool_carries_cache_resources(tmp_path, monkeypatch):
    """``cache.build.run_teacher_job`` passes the custom resources to the actor pool's ``map_batches``."""
    import pyarrow as pa
    import ray
    import ray.data

    from metakd_ray.cache import build as KB

    calls = {}

    class FakeDataset:
        def repartition(self, **kw):
            return self

        def map_batches(self, fn, **kw):
            calls.update(kw)
            return self

        def write_parquet(self, *a, **kw):
            return None

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 4.0}}])
    monkeypatch.setattr(ray.data, "from_arrow", lambda table: FakeDataset())
    storage = mock.MagicMock()
    KB.run_teacher_job(pa.table({"x": [1, 2]}), mock.MagicMock(root="r", parts=("p",)), storage, ("out",),
                       layers=(1,), qk_layers=(1,), precision="float16", actors=1, cpus_per_actor=1.0,
                       gpus_per_actor=0.5, resources_per_actor={"gpu_node": 0.001})
    assert (calls["num_cpus"], calls["num_gpus"], calls["resources"]) == (1.0, 0.5, {"gpu_node": 0.001})
    KB.run_teacher_job(pa.table({"x": [1, 2]}), mock.MagicMock(root="r", parts=("p",)), storage, ("out",),
                       layers=(1,), qk_layers=(1,), precision="float16", actors=1, cpus_per_actor=1.0)
    assert (calls["num_gpus"], calls["resources"]) == (None, None)  # the defaults: CPUs only


def test_unsatisfiable_custom_resources_fail_in_one_line(tmp_path):
    cfg = C.from_dict({"storage": {"root": str(tmp_path)}}, ON_TYPES)
    laptop = ([{"CPU": 8.0, "GPU": 1.0}], None)
    with pytest.raises(UnsatisfiableResources) as e:
        check_resources(cfg, laptop)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("ray.trial_cpus / ray.trial_gpus / ray.trial_resources: a worker "
                                              "needs 1 CPU and 0.001 trial_node on one node")
    assert "0 node(s) with trial_node; no autoscaler" in msg and "clear that *_resources setting" in msg
    check_resources(C.from_dict({"storage": {"root": str(tmp_path)}}), laptop)  # the defaults run anywhere
    # an autoscaler whose worker types advertise the resources makes them satisfiable while no such node runs
    head_only = [{"CPU": 0.0}]
    offered = [{"CPU": 4.0, "GPU": 1.0, "gpu_node": 1.0}, {"CPU": 8.0, "trial_node": 1.0}]
    check_resources(cfg, (head_only, offered))
    with pytest.raises(UnsatisfiableResources, match=r"at most 4 CPUs/1 GPUs/0 trial_node, 8 CPUs/0 GPUs/0 "
                                                     r"trial_node\)"):
        check_resources(cfg, (head_only, [offered[0], {"CPU": 8.0}]))
    check_resources(cfg, (head_only, [ANY_SHAPE]))  # node types of unknown shape: assume they may help


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_worker_types_satisfy_the_documented_overrides(name, tmp_path):
    raw, text = load(name)
    cfg = prepared(raw)
    nodes = cfg["available_node_types"]
    workers = {k: v["resources"] for k, v in nodes.items() if k != cfg["head_node_type"]}
    sweep = C.from_dict({"storage": {"root": str(tmp_path)}}, ON_TYPES)
    check_resources(sweep, ([nodes[cfg["head_node_type"]]["resources"]], list(workers.values())))
    for stage, resource in (("teacher", "gpu_node"), ("cache", "gpu_node"), ("trial", "trial_node")):
        fit = [k for k, shape in workers.items()
               if all(shape.get(r, 0) >= v for r, v in sweep.ray.requests(stage).items())]
        assert len(fit) == 1 and workers[fit[0]].get(resource), (stage, fit)
    assert "GPU" in workers[next(k for k in workers if "gpu" in k)]
    assert not any("GPU" in shape for k, shape in workers.items() if "trial" in k)
    for override in ON_TYPES:
        assert override in " ".join(text.split()), override  # the header documents every override
    for needle in ("ray get-auth-token --generate", "pip wheel --no-deps -w dist .", f"ray up cluster/{name}.yaml",
                   f"ray dashboard cluster/{name}.yaml", "export RAY_AUTH_MODE=token", "ray job submit",
                   "ray job logs", "python -m metakd_ray.results", f"ray down cluster/{name}.yaml"):
        assert needle in text, needle


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_installs_a_pinned_project_and_shares_the_token(name):
    cfg = prepared(load(name)[0])
    setup = " && ".join(cfg["worker_setup_commands"])
    assert f"metakd_ray-{VERSION}-py3-none-any.whl" in setup  # the wheel of pyproject.toml's version
    assert "pip install -e" not in setup and "ray[default,train,tune,data]==2.60.0" in setup
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert cfg["idle_timeout_minutes"] > 0


def _aws_ingress_rules(cfg: dict) -> list[dict]:
    """The inbound rules Ray's AWS provider authorises on the cluster's security group (its own function)."""
    # The module imports boto3 (not installed here) at the top; the rule functions themselves make no AWS call.
    stubs = {m: mock.MagicMock() for m in ("boto3", "boto3.exceptions", "boto3.resources", "boto3.resources.base",
                                            "botocore", "botocore.client", "botocore.config", "botocore.exceptions")}
    stubs["boto3"].__version__ = stubs["botocore"].__version__ = "1.40.0"
    with mock.patch.dict(sys.modules, {**stubs, **{m: sys.modules[m] for m in stubs if m in sys.modules}}):
        from ray.autoscaler._private.aws.config import _create_default_inbound_rules

    return _create_default_inbound_rules({"sg-self"}, cfg["provider"].get("security_group", {}).get("IpPermissions"))


def _ports(rule: dict) -> range:
    lo, hi = rule.get("FromPort", -1), rule.get("ToPort", -1)
    return range(65536) if lo == -1 else range(lo, hi + 1)


def check_network(cfg: dict) -> None:
    """Only SSH (22) is open to the world; every other inbound rule is between the cluster's own nodes; the
    config adds no firewall rule or published port, so the dashboard/job server is reached through an SSH tunnel."""
    if cfg["provider"]["type"] == "aws":
        rules = _aws_ingress_rules(cfg)
        world = [r for r in rules if any(ip.get("CidrIp") == "0.0.0.0/0" for ip in r.get("IpRanges", []))
                 or any(ip.get("CidrIpv6") == "::/0" for ip in r.get("Ipv6Ranges", []))]
        assert world and all(_ports(r) == range(22, 23) for r in world), world  # SSH only
        for r in rules:
            if r not in world:
                assert r.get("UserIdGroupPairs") and not r.get("IpRanges") and not r.get("Ipv6Ranges"), r
    else:  # GCP: the launcher creates no firewall rule; the VPC's own rules apply (default: SSH from outside)
        assert not re.search(r"\b(firewall|sourceRanges|IpPermissions)\b", yaml.safe_dump(cfg))
    dumped = yaml.safe_dump({k: v for k, v in cfg.items() if k != "provider"})
    assert "0.0.0.0/0" not in dumped and "::/0" not in dumped
    assert not re.search(r"-p\s*(8265|10001|6379)\b", dumped)  # no container port published (docker run -p)


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_opens_only_ssh_to_the_world(name):
    check_network(prepared(load(name)[0]))


@pytest.mark.parametrize("port, cidr", [(8265, "0.0.0.0/0"), (22, "0.0.0.0/0")])
def test_network_check_catches_an_open_port(port, cidr):
    raw, _ = load("aws")
    bad = copy.deepcopy(raw)
    bad["provider"]["security_group"]["IpPermissions"] = [
        {"FromPort": port, "ToPort": port + 1, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": cidr}]}]
    with pytest.raises(AssertionError):
        check_network(prepared(bad))


# ---------------------------------------------------------------------------------------------------- KubeRay


def _derived(spec: dict) -> dict:
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
    from ray.autoscaler._private.util import validate_config

    cfg = _derive_autoscaling_config_from_ray_cr({"metadata": {"name": "metakd", "namespace": "default"},
                                                   "spec": spec})
    validate_config(cfg)
    return cfg


def test_kuberay_cluster_types_and_network():
    cr, text = load("kuberay/raycluster")
    spec = cr["spec"]
    assert spec["enableInTreeAutoscaling"] is True and spec["authOptions"]["mode"] == "token"
    nodes = _derived(spec)["available_node_types"]
    assert nodes["headgroup"]["resources"]["CPU"] == 0
    assert nodes["gpu"]["min_workers"] == 0 and nodes["gpu"]["resources"]["GPU"] == 1
    assert nodes["gpu"]["resources"]["gpu_node"] == 1 and "trial_node" not in nodes["gpu"]["resources"]
    assert nodes["trial"]["min_workers"] == 0 and nodes["trial"]["resources"]["trial_node"] == 1
    assert "GPU" not in nodes["trial"]["resources"]
    sweep = C.from_dict({"storage": {"root": "gs://b/metakd"}}, ON_TYPES)
    check_resources(sweep, ([nodes["headgroup"]["resources"]], [nodes["gpu"]["resources"],
                                                                nodes["trial"]["resources"]]))
    # the dashboard stays inside the cluster: a ClusterIP head service, no ingress (kubectl port-forward only)
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress", False)
    assert "kubectl port-forward" in text and "export RAY_AUTH_MODE=token" in text
    for group in spec["workerGroupSpecs"]:
        for container in group["template"]["spec"]["containers"]:
            assert container["image"].endswith(f":{VERSION}")  # the project at a pinned version


# The fields the RayJob must carry, with where each requirement comes from (KubeRay v1.7.0,
# ray-project/kuberay ray-operator/config/crd/bases/ray.io_rayjobs.yaml (openAPIV3Schema "required" lists) and
# ray-operator/controllers/ray/utils/validation.go ValidateRayJobSpec / ValidateRayClusterSpec):
RAYJOB_REQUIRED = {
    ("apiVersion",): "ray.io/v1 (the served, stored version of the CRD)",
    ("kind",): "RayJob",
    ("metadata", "name"): "a DNS-1035 label (ValidateRayJobMetadata)",
    ("spec", "entrypoint"): "the command the submitter runs (K8sJobMode submits `ray job submit -- <entrypoint>`)",
    ("spec", "rayClusterSpec"): "ValidateRayJobSpec: one of RayClusterSpec or ClusterSelector must be set",
    ("spec", "rayClusterSpec", "headGroupSpec"): "CRD: rayClusterSpec.required = [headGroupSpec]",
    ("spec", "rayClusterSpec", "headGroupSpec", "template"): "CRD: headGroupSpec.required = [template]",
}
RAYJOB_WORKER_GROUP_REQUIRED = ("groupName", "maxReplicas", "minReplicas", "template")  # CRD: workerGroupSpecs[]


def test_kuberay_rayjob_runs_the_sweep_on_the_same_cluster():
    job, text = load("kuberay/rayjob")
    cr, _ = load("kuberay/raycluster")
    for path, why in RAYJOB_REQUIRED.items():
        node = job
        for key in path:
            assert isinstance(node, dict) and key in node, f"RayJob lacks {'.'.join(path)}: {why}"
            node = node[key]
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", job["metadata"]["name"])
    spec = job["spec"]
    for group in spec["rayClusterSpec"]["workerGroupSpecs"]:
        assert all(k in group for k in RAYJOB_WORKER_GROUP_REQUIRED), group.get("groupName")
        assert 0 <= group["minReplicas"] <= group["maxReplicas"]  # ValidateRayClusterSpec
        assert group["minReplicas"] == 0
    # one sweep: the preset, the worker-type overrides, shared storage; the cluster goes away after the job
    entry = spec["entrypoint"].split()
    assert entry[:4] == ["python", "-m", "metakd_ray.sweep", "sweeps/scarcity.yaml"]
    assert all(o in entry for o in ON_TYPES) and any(o.startswith("storage.root=gs://") for o in entry)
    C.from_dict(yaml.safe_load((REPO / "sweeps" / "scarcity.yaml").read_text()), entry[4:])  # overrides are valid
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode" and "clusterSelector" not in spec
    # the same cluster as raycluster.yaml (one place to read, no drift), and a valid autoscaling config
    assert spec["rayClusterSpec"] == cr["spec"]
    _derived(spec["rayClusterSpec"])
    assert "kubectl apply -f cluster/kuberay/rayjob.yaml" in text


def test_kuberay_typo_is_rejected_by_the_translator():
    cr, _ = load("kuberay/raycluster")
    bad = copy.deepcopy(cr["spec"])
    bad["workerGroupSpecs"][0]["maxReplica"] = bad["workerGroupSpecs"][0].pop("maxReplicas")
    with pytest.raises(KeyError, match="maxReplicas"):
        _derived(bad)


def test_no_stale_references_to_the_old_kuberay_path():
    old = "cluster/" + "kuberay.yaml"  # moved to cluster/kuberay/raycluster.yaml
    for path in [REPO / "README.md", *(REPO / "cluster").rglob("*.yaml"), *(REPO / "tests").glob("*.py"),
                 *(REPO / "docs").rglob("*.md"), *(REPO / "sweeps").glob("*.yaml")]:
        assert old not in path.read_text(), path


# ---------------------------------------------------------------------------------------------------- autoscalers


def test_cluster_launcher_autoscaler_counts_as_one(monkeypatch):
    """A cluster launcher's (v1) autoscaler (``ray up``, ``ray start --autoscaling-config``, cluster/local-fake.yaml)
    publishes no cluster config, only its status, which maps the nodes to its node types: node types of unknown
    shape, so a stage asking for a custom resource no node has yet is not refused, and neither is the cache job's
    actor pool on a head with few CPUs. The read-only monitor of a plain ``ray start`` names each node's type
    ``node_<id>``: no autoscaler, the old checks hold."""
    import json

    import ray
    from ray._private.state import state
    from ray.experimental import internal_kv

    from metakd_ray import raycluster as RC
    from metakd_ray.cache import build as KB

    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 1.0}},
                                               {"Alive": False, "Resources": {"CPU": 8.0, "trial_node": 1.0}}])
    monkeypatch.setattr(state, "get_cluster_config", lambda: None)
    status = {}
    monkeypatch.setattr(internal_kv, "_internal_kv_initialized", lambda: True)
    monkeypatch.setattr(internal_kv, "_internal_kv_get", lambda key: json.dumps(status).encode())
    head = "f" * 51 + "00000"
    on_types = C.from_dict({}, ["ray.trial_cpus=2", "ray.trial_resources.trial_node=1"])
    status["autoscaler_report"] = {"node_type_mapping": {head: f"node_{head}"}}  # plain `ray start`
    assert RC.node_shapes() == ([{"CPU": 1.0}], None) and RC.max_cpus() == 1.0
    with pytest.raises(UnsatisfiableResources, match="no autoscaler"):
        check_resources(on_types)
    with pytest.raises(ValueError, match="deadlock"):
        KB.check_actor_pool(1, 1.0, RC.max_cpus())
    status["autoscaler_report"] = {"node_type_mapping": {head: "ray.head.default"}}  # an autoscaler's own types
    assert RC.node_shapes() == ([{"CPU": 1.0}], [ANY_SHAPE]) and RC.max_cpus() == float("inf")
    check_resources(on_types)
    KB.check_actor_pool(1, 1.0, RC.max_cpus())
    assert RC.actor_threads({"CPU": 1.0, "gpu_node": 1.0}, 1) == 1  # no node known to hold it: its own CPUs
    assert RC.actor_threads({"CPU": 0.5}, 1) == 1
    # an autoscaler that publishes its node types (KubeRay's v2): their shapes and most nodes count
    group = types.SimpleNamespace
    config = types.SimpleNamespace(node_group_configs=[group(resources={"CPU": 4.0, "gpu_node": 1.0}, max_count=2),
                                                       group(resources={"CPU": 8.0, "trial_node": 1.0}, max_count=3),
                                                       group(resources={"CPU": 16.0}, max_count=0)])
    monkeypatch.setattr(state, "get_cluster_config", lambda: config)
    assert RC.node_shapes()[1] == [{"CPU": 4.0, "gpu_node": 1.0}, {"CPU": 8.0, "trial_node": 1.0}]
    assert RC.max_cpus() == 1.0 + 2 * 4.0 + 3 * 8.0
    assert RC.actor_threads({"CPU": 1.0, "gpu_node": 1.0}, 2) == 2  # a 4-CPU gpu_node node shared by 2 actors
    config.node_group_configs[1].max_count = -1  # no limit
    assert RC.max_cpus() == float("inf")


def test_local_fake_worker_types_satisfy_its_documented_overrides(tmp_path):
    raw, text = load("local-fake")
    overrides = ("ray.train_workers=1", "ray.teacher_resources.gpu_node=1", "ray.cache_resources.gpu_node=1",
                 "ray.trial_cpus=2", "ray.trial_resources.trial_node=1")
    for override in overrides:
        assert override in " ".join(text.split()), override  # the header documents every override
    nodes = raw["available_node_types"]
    head = nodes[raw["head_node_type"]]["resources"]
    workers = {k: v["resources"] for k, v in nodes.items() if k != raw["head_node_type"]}
    sweep = C.from_dict({"storage": {"root": str(tmp_path)}}, overrides)
    check_resources(sweep, ([head], list(workers.values())))
    with pytest.raises(UnsatisfiableResources):  # the head alone holds no stage: each needs a worker
        check_resources(sweep, ([head], None))
    for stage, name in (("teacher", "ray.worker.gpu"), ("cache", "ray.worker.gpu"), ("trial", "ray.worker.trial")):
        fit = [k for k, shape in workers.items()
               if all(shape.get(r, 0) >= v for r, v in sweep.ray.requests(stage).items())]
        assert fit == [name], (stage, fit)
