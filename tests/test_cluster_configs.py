"""Cluster configs, validated offline the way Ray itself reads them (no cloud calls, no credentials).

Launcher YAMLs: Ray's JSON schema on the raw file (catches typos), then ``validate_config(prepare_config(raw))``
(merges the provider defaults, as ``ray up`` does). KubeRay: the in-cluster autoscaler's own
``_derive_autoscaling_config_from_ray_cr`` on the RayCluster CR, then ``validate_config``.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = ["aws", "gcp"]


def schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(os.path.dirname(ray.autoscaler.__file__)) / "ray-schema.json").read_text())


def prepared(raw: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    jsonschema.validate(raw, schema())
    cfg = prepare_config(copy.deepcopy(raw))
    validate_config(cfg)
    return cfg


def load(name: str) -> tuple[dict, str]:
    """``cluster/<name>.yaml`` (``kuberay/raycluster`` for KubeRay): (the parsed file, its text)."""
    text = (REPO / "cluster" / f"{name}.yaml").read_text()
    return yaml.safe_load(text), text


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_config_validates_and_follows_the_sweep_layout(name):
    raw, text = load(name)
    cfg = prepared(raw)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    assert workers and all(v["min_workers"] == 0 and 0 < v["max_workers"] <= cfg["max_workers"]
                           for v in workers.values())
    assert any(v["resources"].get("GPU") for v in workers.values())  # the GPU type
    cheap = [v for v in workers.values() if "MarketType" in json.dumps(v["node_config"])
             or "preemptible" in json.dumps(v["node_config"])]
    assert len(cheap) == len(workers)  # every worker type is spot / preemptible
    assert cfg["idle_timeout_minutes"] == 5
    if name == "aws":
        assert cfg["provider"]["cache_stopped_nodes"] is False
    setup = " && ".join(cfg["worker_setup_commands"])
    assert setup.index("torch==2.13.0") < setup.index("metakd_ray")  # torch first, then the project
    for needle in (f"ray up cluster/{name}.yaml", "ray job submit", f"ray down cluster/{name}.yaml", "s3://"
                   if name == "aws" else "gs://"):
        assert needle in text


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_typos_are_rejected(name):
    raw, _ = load(name)
    bad = {**raw, "max_wokers": 3}
    with pytest.raises(jsonschema.ValidationError, match="max_wokers"):
        prepared(bad)
    bad = copy.deepcopy(raw)
    head = bad["head_node_type"]
    bad["available_node_types"][head]["resorces"] = bad["available_node_types"][head].pop("resources")
    with pytest.raises(jsonschema.ValidationError, match="resorces"):
        prepared(bad)


def test_kuberay_cluster_derives_a_valid_autoscaling_config():
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
    from ray.autoscaler._private.util import validate_config

    cr, text = load("kuberay/raycluster")
    assert cr["kind"] == "RayCluster" and cr["spec"]["enableInTreeAutoscaling"] is True
    cfg = _derive_autoscaling_config_from_ray_cr(cr)
    validate_config(cfg)
    types = cfg["available_node_types"]
    assert types["headgroup"]["resources"]["CPU"] == 0
    assert (types["trial"]["min_workers"], types["trial"]["max_workers"]) == (0, 8)
    assert (types["gpu"]["min_workers"], types["gpu"]["resources"]["GPU"]) == (0, 1)
    assert cfg["idle_timeout_minutes"] == 5
    assert "kubectl apply -f cluster/kuberay/raycluster.yaml" in text and "ray job submit" in text

    bad = copy.deepcopy(cr)
    bad["spec"]["workerGroupSpecs"][0]["maxReplica"] = bad["spec"]["workerGroupSpecs"][0].pop("maxReplicas")
    with pytest.raises(KeyError, match="maxReplicas"):
        _derive_autoscaling_config_from_ray_cr(bad)


def test_local_fake_config_validates_and_uses_the_cloud_worker_types():
    """cluster/local-fake.yaml (Ray's fake multi-node provider, tests/test_autoscaling.py runs it): the schema and
    ``validate_config`` on the full file (``prepare_config`` needs ``fake_multi_node/example.yaml``, missing from the
    wheel: ray guide §6.3), the worker-type names and custom resources of cluster/aws.yaml, all min 0."""
    from ray.autoscaler._private.util import validate_config

    raw, text = load("local-fake")
    jsonschema.validate(raw, schema())
    validate_config(copy.deepcopy(raw))
    provider = raw["provider"]
    assert provider["type"] == "fake_multinode" and provider["use_node_id_as_ip"] is True
    assert provider["disable_node_updaters"] is True and "gcs_address" not in provider  # `ray start`'s port 6379
    assert raw["head_node_type"] == "ray.head.default"  # the only head type name the fake provider knows
    types = raw["available_node_types"]
    aws = prepared(load("aws")[0])["available_node_types"]
    assert set(types) == set(aws)
    for name, node in types.items():  # the same custom resources per type; no GPU on this machine
        assert {k for k in node["resources"] if k not in ("CPU", "GPU")} == \
            {k for k in aws[name]["resources"] if k not in ("CPU", "GPU")}, name
        assert "GPU" not in node["resources"]
    workers = {k: v for k, v in types.items() if k != raw["head_node_type"]}
    assert all(v["min_workers"] == 0 and 0 < v["max_workers"] <= 2 for v in workers.values())
    assert sum(v["max_workers"] for v in workers.values()) <= raw["max_workers"] <= 4  # small: every node is a raylet
    assert 0 < raw["idle_timeout_minutes"] <= 0.5
    assert 0 < types["ray.head.default"]["resources"]["CPU"] < types["ray.worker.trial"]["resources"]["CPU"]
    assert "RAY_FAKE_CLUSTER=1" in text and "--autoscaling-config=cluster/local-fake.yaml" in text
    readme = (REPO / "README.md").read_text()
    assert "--autoscaling-config=cluster/local-fake.yaml" in readme and "RAY_FAKE_CLUSTER=1" in readme
