"""Unit tests of metakd_ray.training: the one training loop (``train_stage``) and its optimiser/schedule.

Everything runs on a tiny MLP (with dropout, so the global RNG matters) over fixed random data, in well under a
second per test. The loss function also draws from the loop's seeded generator, so an exact resume has to restore
the model, the optimiser, the schedule, the global RNG (dropout, shuffling) and that generator.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from metakd_ray import losses, training
from metakd_ray.training import LocalCheckpointer, StageConfig, make_optimizer, train_stage

N_BATCHES = 4
BATCH = 5
EPOCHS = 3


# ----------------------------------------------------------------------------------------------------------
# Fixtures: a tiny model, fixed data, a loss, recording checkpointers
# ----------------------------------------------------------------------------------------------------------


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Tanh(), nn.Linear(8, 2))


def fixed_batches(n_batches: int = N_BATCHES, seed: int = 123) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(BATCH, 4, generator=g), "y": torch.randint(0, 2, (BATCH,), generator=g)}
            for _ in range(n_batches)]


class Rows(Dataset):
    """The fixed batches as rows, for a shuffling DataLoader (its order comes from the global torch RNG)."""

    def __init__(self, batches: list[dict]):
        self.rows = [{"x": b["x"][i], "y": b["y"][i]} for b in batches for i in range(len(b["y"]))]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def shuffled_loader() -> DataLoader:
    return DataLoader(Rows(fixed_batches()), batch_size=BATCH, shuffle=True)


def ce_loss(model: nn.Module, calls: list | None = None):
    """Cross-entropy plus a small term drawn from the loop's generator; records each call's total."""

    def loss_fn(batch: dict, gen: torch.Generator) -> losses.LossTerms:
        ce = F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")  # (b,)
        noise = torch.rand(ce.shape, generator=gen)  # (b,) from the seeded generator
        total = (ce * (1.0 + 0.1 * noise)).mean()
        if calls is not None:
            calls.append(float(total.detach()))
        return losses.LossTerms(total=total, terms={"ce": ce.detach(), "noise": noise})

    return loss_fn


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k, value in a.items():
        assert torch.equal(value, b[k]), f"weights {k} differ"


class Recording:
    """A checkpointer that keeps a deep copy of every saved state (``state["model"]`` is the live state dict)."""

    def __init__(self):
        self.states: list[dict] = []
        self.metrics: list[dict] = []

    def load(self) -> dict | None:
        return None

    def save(self, state: dict, metrics: dict) -> None:
        self.states.append(copy.deepcopy(state))
        self.metrics.append(dict(metrics))


class Interrupted(RuntimeError):
    pass


class StopAfter(LocalCheckpointer):
    """A LocalCheckpointer that raises right after saving epoch ``epoch``: a run killed between epochs."""

    def __init__(self, directory, epoch: int):
        super().__init__(directory)
        self.epoch = epoch

    def save(self, state: dict, metrics: dict) -> None:
        super().save(state, metrics)
        if metrics["epoch"] == self.epoch:
            raise Interrupted(f"stopped after epoch {self.epoch}")


def scripted(means: list[float]):
    """An ``evaluate`` returning the given dev means in turn (and failing if called more often)."""
    it = iter(means)

    def evaluate() -> dict[str, float]:
        m = next(it)
        return {"alpha": m, "mean": m}

    return evaluate


STAGE = StageConfig("toy", epochs=EPOCHS, lr=0.05, warmup=0.25)


# ----------------------------------------------------------------------------------------------------------
# Steps and schedules
# ----------------------------------------------------------------------------------------------------------


def test_one_optimiser_step_per_batch_and_logged_steps():
    model = tiny_model()
    calls: list[float] = []
    stepped: list[int] = []
    ckpt = Recording()
    result = train_stage(model, ce_loss(model, calls), fixed_batches(), STAGE, checkpointer=ckpt,
                         set_epoch=stepped.append)
    assert len(calls) == EPOCHS * N_BATCHES
    assert [m["step"] for m in result.history] == [N_BATCHES * (e + 1) for e in range(EPOCHS)]
    assert [m["epoch"] for m in result.history] == list(range(EPOCHS))
    assert all(m["stage"] == "toy" for m in result.history)
    assert stepped == list(range(EPOCHS))
    # The scheduler stepped once per optimiser step; AdamW's step counter agrees.
    assert [s["scheduler"]["last_epoch"] for s in ckpt.states] == [N_BATCHES * (e + 1) for e in range(EPOCHS)]
    adam_steps = {float(v["step"]) for v in ckpt.states[-1]["optimizer"]["state"].values()}
    assert adam_steps == {float(EPOCHS * N_BATCHES)}
    assert not model.training  # the loop hands the model back in eval mode


@pytest.mark.parametrize("min_steps, epochs", [(0, EPOCHS), (EPOCHS * N_BATCHES, EPOCHS),
                                               (EPOCHS * N_BATCHES + 1, EPOCHS + 1), (5 * N_BATCHES, 5)])
def test_min_steps_raises_the_epochs_of_a_small_split(min_steps, epochs):
    # distill.min_steps: a split with few batches gets whole extra epochs until the stage has min_steps steps;
    # a split that already has them keeps its epochs
    model = tiny_model()
    calls: list[float] = []
    ckpt = Recording()
    stage = StageConfig("toy", epochs=EPOCHS, lr=0.05, warmup=0.25, min_steps=min_steps)
    assert stage.epochs_for(N_BATCHES) == epochs
    result = train_stage(model, ce_loss(model, calls), fixed_batches(), stage, checkpointer=ckpt)
    assert len(calls) == epochs * N_BATCHES
    assert [m["epoch"] for m in result.history] == list(range(epochs))
    # the schedule spans the raised steps: a linear schedule ends at zero on the last step
    assert ckpt.states[-1]["scheduler"]["last_epoch"] == epochs * N_BATCHES
    assert ckpt.states[-1]["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12)


class Throttled(Recording):
    every_s = 1e9  # a checkpointer that wants a state at most every every_s seconds

    def __init__(self):
        super().__init__()
        self.skips: list[dict] = []

    def skipped(self, metrics: dict) -> None:
        self.skips.append(dict(metrics))


def test_a_throttled_checkpointer_gets_the_last_epoch_with_the_best_dev_of_all():
    model = tiny_model()
    ckpt = Throttled()
    result = train_stage(model, ce_loss(model), fixed_batches(), STAGE, checkpointer=ckpt,
                         evaluate=scripted([0.5, 0.9, 0.7]))
    assert [s["epoch"] for s in ckpt.states] == [EPOCHS - 1]  # epochs 0 and 1 were within every_s
    assert [m["epoch"] for m in ckpt.skips] == list(range(EPOCHS - 1))  # ... and came as metrics only
    assert [m["dev_acc_mean"] for m in ckpt.skips + ckpt.metrics] == [0.5, 0.9, 0.7]
    assert ckpt.states[0]["best_dev"] == result.best_dev == 0.9 and ckpt.states[0]["best_epoch"] == 1
    assert [m["epoch"] for m in ckpt.states[0]["history"]] == list(range(EPOCHS))
    ckpt.every_s = 0.0
    other = tiny_model()
    train_stage(other, ce_loss(other), fixed_batches(), STAGE, checkpointer=ckpt)
    assert [s["epoch"] for s in ckpt.states[1:]] == list(range(EPOCHS))  # every_s 0: every epoch


def lr_trace(schedule: str, warmup: float, total: int = 12, lr: float = 0.1) -> list[float]:
    """The learning rate each of ``total`` optimiser steps uses, then the one after the last step."""
    model = tiny_model()
    opt, sched = make_optimizer(model, lr, 0.01, total, warmup, schedule)
    trace = []
    for _ in range(total):
        trace.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    trace.append(opt.param_groups[0]["lr"])
    assert all(g["lr"] == trace[-1] for g in opt.param_groups)  # every parameter group follows one schedule
    return trace


def test_linear_schedule_warms_up_then_decays_to_zero():
    trace = lr_trace("linear", warmup=0.25)  # 12 steps, 3 of warmup
    expected = [0.1 * s / 3 for s in range(3)] + [0.1 * (12 - s) / 9 for s in range(3, 13)]
    assert trace == pytest.approx(expected, abs=1e-12)
    assert max(trace) == pytest.approx(0.1)
    assert trace[-1] == 0.0


def test_constant_schedule_is_flat_after_warmup():
    trace = lr_trace("constant", warmup=0.25)
    assert trace == pytest.approx([0.0, 0.1 / 3, 0.2 / 3] + [0.1] * 10, abs=1e-12)
    assert lr_trace("constant", warmup=0.0) == pytest.approx([0.1] * 13, abs=1e-12)


def test_optimizer_does_not_decay_biases_or_norms():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    opt, _ = make_optimizer(model, 0.1, 0.05, 10, 0.0)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.05 for p in g["params"]}
    plain = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert decayed == {id(model[0].weight), id(model[2].weight)}
    assert plain == {id(model[0].bias), id(model[1].weight), id(model[1].bias), id(model[2].bias)}


@pytest.mark.parametrize("schedule, expected", [
    # 12 steps, warmup 3: lr after each epoch's last step (4, 8, 12).
    ("linear", [0.05 * 8 / 9, 0.05 * 4 / 9, 0.0]),
    ("constant", [0.05, 0.05, 0.05]),
])
def test_train_stage_follows_the_stage_schedule(schedule, expected):
    model = tiny_model()
    ckpt = Recording()
    stage = StageConfig("toy", epochs=EPOCHS, lr=0.05, warmup=0.25, schedule=schedule)
    train_stage(model, ce_loss(model), fixed_batches(), stage, checkpointer=ckpt)
    assert [s["scheduler"]["_last_lr"][0] for s in ckpt.states] == pytest.approx(expected, abs=1e-12)


def test_train_stage_uses_make_optimizer_schedule_per_step(monkeypatch):
    """The lr each optimiser step sees inside the loop, for a linear schedule: warmup then decay to 0."""
    made = []
    real = training.make_optimizer

    def spy(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(training, "make_optimizer", spy)
    model = tiny_model()
    seen: list[float] = []
    inner = ce_loss(model)

    def loss_fn(batch, gen):
        seen.append(made[0][0].param_groups[0]["lr"])
        return inner(batch, gen)

    train_stage(model, loss_fn, fixed_batches(), STAGE)
    assert len(made) == 1
    expected = [0.05 * s / 3 for s in range(3)] + [0.05 * (12 - s) / 9 for s in range(3, 12)]
    assert seen == pytest.approx(expected, abs=1e-12)
    assert made[0][0].param_groups[0]["lr"] == 0.0  # decayed to 0 after the last step


# ----------------------------------------------------------------------------------------------------------
# Dev selection
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("means, best", [
    ([0.5, 0.9, 0.7], 1),
    ([0.3, 0.2, 0.8], 2),
    ([0.6, 0.4, 0.6], 0),  # a tie keeps the earlier epoch
])
def test_dev_selection_keeps_the_best_epoch_weights(means, best):
    model = tiny_model()
    ckpt = Recording()
    result = train_stage(model, ce_loss(model), fixed_batches(), STAGE, evaluate=scripted(means), checkpointer=ckpt)
    assert result.best_epoch == best
    assert result.best_dev == means[best]
    saved = [s["model"] for s in ckpt.states]
    assert_same_weights(state_copy(model), saved[best])
    for other in set(range(EPOCHS)) - {best}:  # training moved the weights, so the choice is visible
        assert not torch.equal(saved[other]["0.weight"], saved[best]["0.weight"])
    assert [m["dev_acc_mean"] for m in result.history] == means
    assert [m["dev_acc_alpha"] for m in result.history] == means
    assert [s["best_epoch"] for s in ckpt.states][-1] == best


def test_without_evaluate_the_last_epoch_is_kept():
    model = tiny_model()
    ckpt = Recording()
    result = train_stage(model, ce_loss(model), fixed_batches(), STAGE, checkpointer=ckpt)
    assert math.isnan(result.best_dev)
    assert result.best_epoch == EPOCHS - 1
    assert_same_weights(state_copy(model), ckpt.states[-1]["model"])
    assert not torch.equal(ckpt.states[0]["model"]["0.weight"], ckpt.states[-1]["model"]["0.weight"])
    assert all(not any(k.startswith("dev_") for k in m) for m in result.history)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints and resume
# ----------------------------------------------------------------------------------------------------------


def run(tmp_dir, checkpointer=None, evaluate=None, calls=None, seed=7):
    model = tiny_model()
    torch.manual_seed(999)  # the loop must reseed itself: this must not matter
    result = train_stage(model, ce_loss(model, calls), shuffled_loader(), STAGE, evaluate=evaluate, seed=seed,
                         checkpointer=checkpointer or LocalCheckpointer(tmp_dir))
    return model, result


@pytest.mark.parametrize("with_dev", [False, True])
def test_resume_is_exact(tmp_path, with_dev):
    means = [0.5, 0.9, 0.7] if with_dev else None
    straight, straight_result = run(tmp_path / "straight", evaluate=scripted(means) if with_dev else None)

    with pytest.raises(Interrupted):
        run(tmp_path / "resumed", checkpointer=StopAfter(tmp_path / "resumed", epoch=1),
            evaluate=scripted(means[:2]) if with_dev else None)
    calls: list[float] = []
    resumed, resumed_result = run(tmp_path / "resumed", evaluate=scripted(means[2:]) if with_dev else None,
                                  calls=calls)

    assert len(calls) == N_BATCHES  # only epoch 2 ran again
    assert_same_weights(state_copy(resumed), state_copy(straight))
    assert resumed_result.history == straight_result.history
    assert resumed_result.best_epoch == straight_result.best_epoch == (1 if with_dev else EPOCHS - 1)
    if with_dev:
        assert resumed_result.best_dev == straight_result.best_dev == 0.9
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == EPOCHS


def test_different_seed_gives_different_weights(tmp_path):
    """The resume comparison above could not fail if the seed (dropout, shuffling, generator) did nothing."""
    a, _ = run(tmp_path / "a", seed=7)
    b, _ = run(tmp_path / "b", seed=8)
    assert not torch.equal(a.state_dict()["0.weight"], b.state_dict()["0.weight"])


def test_rerun_of_a_finished_stage_does_not_train(tmp_path):
    first, first_result = run(tmp_path / "ck", evaluate=scripted([0.5, 0.9, 0.7]))
    calls: list[float] = []
    again, again_result = run(tmp_path / "ck", evaluate=scripted([]), calls=calls)
    assert calls == []
    assert_same_weights(state_copy(again), state_copy(first))
    assert again_result.best_epoch == 1 and again_result.best_dev == 0.9
    assert again_result.history == first_result.history


@pytest.mark.parametrize("with_dev", [False, True])
def test_complete_checkpoint_returns_at_once(tmp_path, with_dev):
    ckpt = LocalCheckpointer(tmp_path / "done")
    history = [{"stage": "toy", "epoch": 0, "step": 4}, {"stage": "toy", "epoch": 1, "step": 8}]
    ckpt.save({"complete": True, "best_dev": 0.8, "best_epoch": 1, "history": history}, {"epoch": 1})
    model = tiny_model()
    before = state_copy(model)

    def never(*_):
        raise AssertionError("a completed stage must not train or evaluate")

    result = train_stage(model, never, fixed_batches(), STAGE, evaluate=never if with_dev else None,
                         checkpointer=ckpt)
    assert result.best_epoch == 1
    assert result.history == history
    if with_dev:
        assert result.best_dev == 0.8
    else:
        assert math.isnan(result.best_dev)
    assert_same_weights(state_copy(model), before)


def test_extra_state_is_saved_with_every_checkpoint():
    model = tiny_model()
    ckpt = Recording()
    train_stage(model, ce_loss(model), fixed_batches(), STAGE, checkpointer=ckpt, extra_state={"method": "meta_kd"})
    assert [s["method"] for s in ckpt.states] == ["meta_kd"] * EPOCHS
    assert [s["epoch"] for s in ckpt.states] == list(range(EPOCHS))
    assert ckpt.metrics == [{k: v for k, v in m.items()} for m in ckpt.states[-1]["history"]]


# ----------------------------------------------------------------------------------------------------------
# Logging
# ----------------------------------------------------------------------------------------------------------


def test_terms_are_logged_as_epoch_means():
    """``train_<term>`` = mean over the epoch's batches of each batch's mean term; ``train_loss`` likewise."""
    batches = fixed_batches(n_batches=3)
    a_values = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 5.0]), torch.tensor([0.0, 4.0])]  # batch means 1.5, 4, 2
    model = tiny_model()
    totals: list[float] = []
    index = {id(b): i for i, b in enumerate(batches)}

    def loss_fn(batch, gen):
        i = index[id(batch)]
        ce = F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")
        totals.append(float(ce.detach().mean()))
        return losses.LossTerms(total=ce.mean(), terms={"a": a_values[i], "b": torch.full((3,), float(i))})

    logged: list[dict] = []
    result = train_stage(model, loss_fn, batches, StageConfig("toy", epochs=2, lr=0.05), log=logged.append,
                         evaluate=scripted([0.1, 0.2]))
    assert logged == result.history
    for epoch, m in enumerate(result.history):
        assert set(m) == {"stage", "epoch", "step", "train_loss", "train_a", "train_b", "dev_acc_alpha",
                          "dev_acc_mean"}
        assert m["train_a"] == pytest.approx((1.5 + 4.0 + 2.0) / 3)
        assert m["train_b"] == pytest.approx((0.0 + 1.0 + 2.0) / 3)
        assert m["train_loss"] == pytest.approx(sum(totals[3 * epoch:3 * epoch + 3]) / 3)
    assert result.history[0]["train_loss"] != result.history[1]["train_loss"]  # the model learnt in between
