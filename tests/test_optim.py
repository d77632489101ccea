"""litlab.optim: optimisers, parameter groups, schedules against their closed forms, config errors."""

import math

import pytest
import torch
from torch import nn

from litlab.config import OptimConfig, SchedulerConfig
from litlab.errors import ConfigError
from litlab.optim import StepDecay, WarmupCosine, build_optimizer, build_scheduler, fused_devices


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.BatchNorm1d(8), nn.Linear(8, 3, bias=False),
                         nn.LayerNorm(3))


def one_step(net: nn.Module, opt: torch.optim.Optimizer) -> None:
    net.train()
    loss = net(torch.randn(16, 4)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


@pytest.mark.parametrize("name", ["sgd", "rmsprop", "adam", "adamw"])
def test_each_optimizer_builds_and_steps(name):
    net = small_net()
    opt = build_optimizer(net, OptimConfig(name=name, lr=0.1, weight_decay=0.01, momentum=0.5 if name != "adam" else 0))
    expected = {"sgd": torch.optim.SGD, "rmsprop": torch.optim.RMSprop, "adam": torch.optim.Adam,
                "adamw": torch.optim.AdamW}[name]
    assert type(opt) is expected
    before = [p.detach().clone() for p in net.parameters()]
    one_step(net, opt)
    assert all(not torch.equal(b, p) for b, p in zip(before, net.parameters()))
    assert all(g["lr"] == 0.1 for g in opt.param_groups)
    # one fused kernel where torch has one for this device (the CPU since torch 2.4; never RMSprop)
    assert bool(opt.defaults.get("fused")) == (name != "rmsprop" and "cpu" in fused_devices())
    assert opt.defaults.get("foreach") or opt.defaults.get("fused")


def test_weight_decay_only_on_weight_matrices():
    net = small_net()
    opt = build_optimizer(net, OptimConfig(name="adamw", weight_decay=0.05))
    decay, no_decay = opt.param_groups
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert ids(decay["params"]) == {id(net[0].weight), id(net[3].weight)}
    assert ids(no_decay["params"]) == {id(net[0].bias), id(net[2].weight), id(net[2].bias),
                                       id(net[4].weight), id(net[4].bias)}


def test_frozen_parameters_are_left_out_and_no_parameters_is_an_error():
    net = small_net()
    net[0].requires_grad_(False)
    opt = build_optimizer(net, OptimConfig(name="sgd", lr=0.1))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(net[0].weight) not in in_opt and id(net[0].bias) not in in_opt
    assert len(in_opt) == sum(1 for p in net.parameters() if p.requires_grad)
    net.requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        build_optimizer(net, OptimConfig())


def test_hyperparameters_reach_the_torch_optimizer():
    sgd = build_optimizer(small_net(), OptimConfig(name="sgd", lr=0.05, momentum=0.9, nesterov=True))
    assert sgd.defaults["momentum"] == 0.9 and sgd.defaults["nesterov"] is True and sgd.defaults["lr"] == 0.05
    rms = build_optimizer(small_net(), OptimConfig(name="rmsprop", alpha=0.9, momentum=0.3, eps=1e-6))
    assert (rms.defaults["alpha"], rms.defaults["momentum"], rms.defaults["eps"]) == (0.9, 0.3, 1e-6)
    adam = build_optimizer(small_net(), OptimConfig(name="adam", betas=(0.8, 0.99), eps=1e-7, weight_decay=0.1))
    assert adam.defaults["betas"] == (0.8, 0.99) and adam.defaults["eps"] == 1e-7
    assert [g["weight_decay"] for g in adam.param_groups] == [0.1, 0.0]


def test_nesterov_without_momentum_is_a_config_error():
    with pytest.raises(ConfigError, match="optim.nesterov"):
        build_optimizer(small_net(), OptimConfig(name="sgd", nesterov=True, momentum=0.0))
    with pytest.raises(ConfigError, match="optim.nesterov"):
        build_optimizer(small_net(), OptimConfig(name="adam", nesterov=True, momentum=0.9))


# ---------------------------------------------------------------- schedules
def sched(name, total=100, epochs=10, lr=1.0, **kw):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=lr)
    return opt, build_scheduler(opt, SchedulerConfig(name=name, **kw), total_steps=total, max_epochs=epochs)


def lrs(opt, s, n):
    """lr used by optimiser steps 0..n-1 (Lightning steps the scheduler after every optimiser step)."""
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    return out


def test_none_gives_no_scheduler():
    assert sched("none")[1] is None


def test_cosine_closed_form():
    f = WarmupCosine(total_steps=100, min_ratio=0.1)
    assert f(0) == pytest.approx(1.0)
    assert f(50) == pytest.approx(0.1 + 0.9 * 0.5)  # cos(pi/2) = 0: halfway between 1 and r
    assert f(25) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert f(100) == pytest.approx(0.1) and f(150) == pytest.approx(0.1)  # clipped after the end
    opt, s = sched("cosine", total=100, lr=0.2, min_lr=0.02)
    seen = lrs(opt, s, 101)
    assert seen[0] == pytest.approx(0.2) and seen[50] == pytest.approx(0.11) and seen[100] == pytest.approx(0.02)
    assert all(a >= b for a, b in zip(seen, seen[1:]))


def test_warmup_is_a_linear_ramp_then_cosine():
    # 10 epochs of 10 steps; warmup 2 epochs = W = 20 steps; cosine over the remaining 80 down to 0
    opt, s = sched("warmup_cosine", total=100, epochs=10, lr=0.5, warmup_epochs=2)
    seen = lrs(opt, s, 101)
    for t in (0, 4, 9, 19):
        assert seen[t] == pytest.approx(0.5 * (t + 1) / 20)
    assert seen[20] == pytest.approx(0.5)
    assert seen[60] == pytest.approx(0.25)  # halfway through the cosine part
    assert seen[100] == pytest.approx(0.0, abs=1e-12)
    assert WarmupCosine(100, 20, 0.0)(19) == 1.0  # the ramp ends at the base rate


def test_fractional_warmup_epochs_round_to_steps():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    cfg = SchedulerConfig(name="warmup_cosine", warmup_epochs=0.5)
    f = build_scheduler(opt, cfg, total_steps=50, max_epochs=5).lr_lambdas[0]
    assert f.warmup_steps == 5 and f.total_steps == 50


def test_step_decay_every_step_size_epochs():
    # 6 epochs of 7 steps, x0.5 every 2 epochs: drops at steps 14 and 28
    opt, s = sched("step", total=42, epochs=6, lr=1.0, step_size=2, gamma=0.5)
    seen = lrs(opt, s, 42)
    assert seen[:14] == [1.0] * 14 and seen[14:28] == [0.5] * 14 and seen[28:] == [0.25] * 14
    assert StepDecay(3, 0.1, total_steps=100, max_epochs=10)(29) == 1.0
    assert StepDecay(3, 0.1, total_steps=100, max_epochs=10)(30) == pytest.approx(0.1)


def test_scheduler_applies_to_every_param_group_with_its_own_floor():
    net = small_net()
    opt = build_optimizer(net, OptimConfig(name="adamw", lr=0.01, weight_decay=0.1))
    s = build_scheduler(opt, SchedulerConfig(name="cosine", min_lr=0.001), total_steps=10, max_epochs=1)
    for _ in range(10):
        opt.step()
        s.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.001, 0.001])
    assert [m.min_ratio for m in s.lr_lambdas] == pytest.approx([0.1, 0.1])  # min_lr / each group's lr


@pytest.mark.parametrize(
    "kw, total, epochs, match",
    [
        (dict(name="warmup_cosine", warmup_epochs=50), 200, 20,
         r"optim.scheduler.warmup_epochs: 50 >= trainer.max_epochs 20"),
        (dict(name="warmup_cosine", warmup_epochs=20), 200, 20, "warmup_epochs"),
        (dict(name="warmup_cosine", warmup_epochs=0.99), 1, 1, "warmup_epochs"),  # rounds to every step
        (dict(name="cosine", warmup_epochs=2), 100, 10, "only used by optim.scheduler.name=warmup_cosine"),
        (dict(name="step", step_size=10), 100, 10, "optim.scheduler.step_size: 10 >= trainer.max_epochs 10"),
        (dict(name="step", min_lr=0.01), 100, 10, "optim.scheduler.min_lr"),
        (dict(name="none", min_lr=0.01), 100, 10, "optim.scheduler.min_lr"),
        (dict(name="cosine", min_lr=2.0), 100, 10, r"optim.scheduler.min_lr: 2 > optim.lr 1"),
    ],
)
def test_nonsense_schedules_are_config_errors(kw, total, epochs, match):
    with pytest.raises(ConfigError, match=match):
        sched(total=total, epochs=epochs, **kw)


def test_a_checkpoint_restores_the_step_reached_and_the_config_gives_the_schedule():
    """Resuming with the same length continues the same rates exactly; with more epochs the
    schedule is the longer run's (torch's LambdaLR restored the old horizon: a 3-epoch cosine
    resumed to 6 epochs trained its last 3 at lr 0)."""
    opt, s = sched("cosine", total=10, lr=0.1)
    lrs(opt, s, 6)  # 6 optimiser steps taken
    saved_opt, saved = opt.state_dict(), s.state_dict()
    assert "lr_lambdas" not in saved
    straight_on = lrs(opt, s, 5)

    same_opt, same = sched("cosine", total=10, lr=0.1)
    same_opt.load_state_dict(saved_opt)
    same.load_state_dict(saved)
    assert lrs(same_opt, same, 5) == straight_on  # bit for bit

    longer_opt, longer = sched("cosine", total=20, epochs=2, lr=0.1)
    longer_opt.load_state_dict(saved_opt)
    longer.load_state_dict({**saved, "lr_lambdas": [{"total_steps": 10, "warmup_steps": 0, "min_ratio": 0.0}]})
    seen = lrs(longer_opt, longer, 15)  # steps 6..20; an old checkpoint's multipliers are ignored
    assert seen[0] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 6 / 20)))
    assert seen[14] == pytest.approx(0.0, abs=1e-12) and all(lr > 0 for lr in seen[:14])
