"""Precision and devices: how ``compute.precision`` resolves (CPU with and without bf16, CUDA with and without, a
driver without a GPU), that it is part of the teachers' and caches' identities and of the plan, that losses stay
fp32 under autocast, that the one loop trains in bf16 and fp16 (with its scaler, checkpointed), and that GPU
reservations are planned as configured and refused up front when no node can ever hold them."""

from __future__ import annotations

import logging

import pytest
import torch
from toy import tiny_config

from metakd_ray import losses
from metakd_ray import runtime as R
from metakd_ray.raycluster import UnsatisfiableResources, check_resources, stage_requests
from metakd_ray.runtime import PrecisionUnresolved, Runtime, resolve_precision
from metakd_ray.training import LocalCheckpointer, StageConfig, train_stage


@pytest.fixture
def cpu_bf16(monkeypatch):
    def set_(has: bool) -> None:
        monkeypatch.setattr(R, "cpu_has_bf16", lambda: has)
    return set_


@pytest.fixture
def cuda(monkeypatch):
    """Pretend this process sees a GPU with (True) or without (False) bf16, or none (None)."""
    def set_(bf16: bool | None) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: bf16 is not None)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bool(bf16))
    monkeypatch.delenv(R.GPU_BF16_ENV, raising=False)
    return set_


def test_auto_on_a_cpu_with_and_without_native_bf16(cpu_bf16, caplog):
    cpu_bf16(True)
    assert resolve_precision("auto", "cpu") == "bf16"
    cpu_bf16(False)
    R._say_fallback.cache_clear()
    with caplog.at_level(logging.WARNING, logger="metakd_ray.runtime"):
        assert resolve_precision("auto", "cpu") == "fp32"
        assert resolve_precision("auto", "cpu") == "fp32"
    said = [r for r in caplog.records if "no native bf16" in r.getMessage()]
    assert len(said) == 1  # said once
    for p in ("fp32", "bf16", "fp16"):  # explicit values are kept whatever the hardware
        assert resolve_precision(p, "cpu") == p
    with pytest.raises(ValueError, match="compute.precision"):
        resolve_precision("fp8", "cpu")


def test_cpu_bf16_detection_reads_the_cpu_flags():
    flags = open("/proc/cpuinfo").read().split() if __import__("os").path.exists("/proc/cpuinfo") else []
    R.cpu_has_bf16.cache_clear()
    assert R.cpu_has_bf16() == bool({"avx512_bf16", "amx_bf16", "bf16"} & set(flags))


def test_auto_on_cuda_bf16_or_fp16_and_a_driver_without_a_gpu(cuda, monkeypatch):
    cuda(True)
    assert resolve_precision("auto", "cuda") == "bf16"
    cuda(False)
    assert resolve_precision("auto", "cuda") == "fp16"
    cuda(None)
    with pytest.raises(PrecisionUnresolved):
        resolve_precision("auto", "cuda")
    monkeypatch.setenv(R.GPU_BF16_ENV, "0")  # what the sweep driver records after asking a GPU of the cluster
    assert resolve_precision("auto", "cuda") == "fp16"
    monkeypatch.setenv(R.GPU_BF16_ENV, "1")
    assert resolve_precision("auto", "cuda") == "bf16"


def test_runtime_autocast_and_scaler():
    x, w = torch.randn(4, 8), torch.nn.Linear(8, 3)
    with Runtime(precision="bf16").autocast():
        assert w(x).dtype == torch.bfloat16
    with Runtime(precision="fp32").autocast():
        assert w(x).dtype == torch.float32
    assert Runtime(precision="fp16").scaler().is_enabled()
    assert not Runtime(precision="bf16").scaler().is_enabled()
    with pytest.raises(ValueError, match="resolve"):
        Runtime(precision="auto")


def test_losses_compute_in_fp32_under_autocast():
    torch.manual_seed(0)
    b, t, d, h, c = 3, 5, 8, 2, 2
    mask = torch.ones(b, t)
    mask[0, 3:] = 0
    hs = [torch.randn(b, t, d) for _ in range(2)]
    ths = [torch.randn(b, t, d) for _ in range(2)]
    att = [torch.randn(b, h, t, t)]
    tatt = [torch.randn(b, h, t, t)]
    logits, tlogits = torch.randn(b, c), torch.randn(b, c)
    args = dict(attention_mask=mask, weights=torch.rand(b), gamma2=0.5)
    ref1 = losses.stage1_objective(hs, ths, att, tatt, **args)
    ref2 = losses.stage2_objective(logits, tlogits)
    low = lambda xs: [x.bfloat16() for x in xs]  # noqa: E731
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got1 = losses.stage1_objective(low(hs), low(ths), low(att), low(tatt), **args)
        got2 = losses.stage2_objective(logits.bfloat16(), tlogits.bfloat16())
        ce = losses.hard_cross_entropy(logits.bfloat16(), torch.tensor([0, 1, 1]))
    assert got1.total.dtype == got2.total.dtype == ce.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in got1.terms.values())
    # the same losses of the bf16-rounded inputs, up to that rounding
    torch.testing.assert_close(got1.total, ref1.total, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got2.total, ref2.total, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_the_loop_trains_in_low_precision_with_fp32_weights(tmp_path, precision):
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    y = (x[:, 0] > 0).long()
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
    loader = [{"x": x[i:i + 16], "y": y[i:i + 16]} for i in range(0, 64, 16)]

    def loss(batch, _gen):
        out = model(batch["x"])
        assert out.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]  # autocast is on
        ce = losses.hard_cross_entropy(out, batch["y"])
        return losses.LossTerms(total=ce.mean(), terms={"ce": ce.detach()})

    ckpt = LocalCheckpointer(tmp_path)
    res = train_stage(model, loss, loader, StageConfig("s", epochs=4, lr=0.05, warmup=0.0), checkpointer=ckpt,
                      runtime=Runtime(precision=precision))
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    state = ckpt.load()
    assert state["precision"] == precision
    assert bool(state["scaler"]) == (precision == "fp16")  # the fp16 scaler's state is checkpointed


def test_precision_is_part_of_the_teacher_and_cache_identity_and_shown_in_the_plan(tmp_path, cpu_bf16):
    from metakd_ray.sweep.plan import format_plan, make_plan
    from metakd_ray.teacher.artefact import teacher_spec

    def spec(*o):
        return teacher_spec(tiny_config(tmp_path, *o), "meta", "beta", 1.0, 0)

    cpu_bf16(True)
    fp32, bf16, auto = spec("compute.precision=fp32"), spec("compute.precision=bf16"), spec("compute.precision=auto")
    assert fp32.key != bf16.key and auto.key == bf16.key and auto.precision == "bf16"
    cpu_bf16(False)
    assert spec("compute.precision=auto").key == fp32.key  # auto means fp32 on a CPU without bf16
    assert spec("compute.group_by_length=false").key != fp32.key
    cpu_bf16(True)
    p = make_plan(tiny_config(tmp_path, "compute.precision=auto"))
    assert p.compute == {"teacher": "bf16 on cpu", "cache": "bf16 on cpu", "trial": "bf16 on cpu"}
    assert "precision: teacher bf16 on cpu" in format_plan(p)


def test_cache_key_holds_the_pass_precision():
    from metakd_ray.cache.job import cache_key

    common = dict(teacher={"weights": "w"}, tokenizer="t", max_length=16, layer_map=(0, 2), domain="beta",
                  split="train", ids=["a"], input_hash="h", prototype_hash=None, precision="float16",
                  attention="inputs")
    assert cache_key(**common, compute="fp32")["compute"] == "fp32"
    assert cache_key(**common, compute="fp32") != cache_key(**common, compute="bf16")


def test_fractional_gpus_are_planned_as_configured(tmp_path, cuda, monkeypatch):
    from metakd_ray.sweep.run import trial_resources

    cfg = tiny_config(tmp_path, "ray.use_gpu=true", "ray.train_workers=1", "ray.trial_gpus=0.25",
                      "ray.cache_gpus=0.5", "compute.precision=auto")
    assert trial_resources(cfg) == {"cpu": 1.0, "gpu": 0.25}
    req = stage_requests(cfg)
    assert req["ray.trial_cpus / ray.trial_gpus"]["GPU"] == 0.25
    assert req["ray.cpus_per_actor / ray.cache_gpus"]["GPU"] == 0.5
    assert req["ray.cpus_per_worker / ray.use_gpu"]["GPU"] == 1.0
    assert trial_resources(tiny_config(tmp_path)) == {"cpu": 1.0}  # no use_gpu: no GPU held
    assert trial_resources(tiny_config(tmp_path, "ray.use_gpu=true", "ray.train_workers=1",
                                       "ray.trial_gpus=0")) == {"cpu": 1.0}
    cuda(None)
    monkeypatch.setattr(R, "cpu_has_bf16", lambda: True)
    assert R.stage_precisions(cfg)["trial"] == "auto on cuda"  # unknown until a GPU of the cluster is asked
    monkeypatch.setenv(R.GPU_BF16_ENV, "0")
    assert R.stage_precisions(cfg) == {"teacher": "fp16 on cuda", "cache": "fp16 on cuda", "trial": "fp16 on cuda"}


def _shapes(monkeypatch, alive, types):
    import metakd_ray.raycluster as RC

    monkeypatch.setattr(RC, "node_shapes", lambda: (alive, types))


def test_unsatisfiable_requests_fail_fast_with_the_numbers(tmp_path, monkeypatch):
    two_cpus = [{"CPU": 2.0, "memory": 1e9}]
    _shapes(monkeypatch, two_cpus, None)
    check_resources(tiny_config(tmp_path))  # fits
    with pytest.raises(UnsatisfiableResources) as e:
        check_resources(tiny_config(tmp_path, "ray.use_gpu=true", "ray.train_workers=1", "ray.trial_gpus=0.5"))
    msg = str(e.value)
    assert "\n" not in msg and "GPU" in msg and "0 GPUs" in msg and "no autoscaler" in msg
    with pytest.raises(UnsatisfiableResources, match=r"ray.trial_cpus / ray.trial_gpus: a worker needs 4 CPU.*2 CPUs"):
        check_resources(tiny_config(tmp_path, "ray.trial_cpus=4"))
    # an autoscaler that can add a GPU node makes the request satisfiable
    _shapes(monkeypatch, two_cpus, [{"CPU": 8.0, "GPU": 1.0}])
    check_resources(tiny_config(tmp_path, "ray.use_gpu=true", "ray.train_workers=1", "ray.trial_gpus=0.5"))
    _shapes(monkeypatch, two_cpus, [{"CPU": 4.0}])
    with pytest.raises(UnsatisfiableResources, match="autoscaler whose node types offer at most 4 CPUs/0 GPUs"):
        check_resources(tiny_config(tmp_path, "ray.use_gpu=true", "ray.train_workers=1"))


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_fail_fast_on_the_real_local_cluster(ray_session, tmp_path):
    with pytest.raises(UnsatisfiableResources, match="0 GPUs"):
        check_resources(tiny_config(tmp_path, "ray.use_gpu=true", "ray.train_workers=1"))
    check_resources(tiny_config(tmp_path))
