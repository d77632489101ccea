"""Mixture of experts (chapter 12): noisy top-k router, dispatch, load-balancing loss, capacity,
and the registered `gpt_moe` (aux loss in the objective, utilisation metrics and plot)."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from litlab.chapters.gpt.moe import MoEFeedForward, NoisyTopKRouter, load_balancing_loss
from litlab.chapters.transformer.layers import FeedForward

D, E = 8, 4


def make_moe(top_k: int, noisy: bool = False, capacity_factor: float | None = None, seed: int = 0,
             dispatch: str = "auto") -> MoEFeedForward:
    torch.manual_seed(seed)
    moe = MoEFeedForward(D, E, top_k, lambda: FeedForward(D, 16), noisy=noisy, capacity_factor=capacity_factor,
                         dispatch=dispatch)
    nn.init.normal_(moe.router.w_gate.weight, std=0.5)  # a router that actually prefers some experts
    return moe


def by_hand(moe: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Token by token: y = sum over the top-k experts of softmax(top-k logits) * expert(x)."""
    out = []
    for token in x.reshape(-1, D):
        logits = token @ moe.router.w_gate.weight.T  # (E,)
        top = logits.topk(moe.top_k)
        gates = torch.exp(top.values) / torch.exp(top.values).sum()
        out.append(sum(g * moe.experts[int(i)](token) for g, i in zip(gates, top.indices)))
    return torch.stack(out).reshape(x.shape)


# ---------------------------------------------------------------- dispatch
def test_top_k_equal_n_experts_is_the_gate_weighted_sum_of_all_experts():
    moe = make_moe(top_k=E).eval()
    x = torch.randn(3, 5, D)
    gates = torch.softmax(x @ moe.router.w_gate.weight.T, dim=-1)  # (3, 5, E) dense softmax gating
    expected = sum(gates[..., i:i + 1] * moe.experts[i](x) for i in range(E))
    torch.testing.assert_close(moe(x), expected, rtol=1e-5, atol=1e-6)


def test_sparse_top2_dispatch_matches_a_token_by_token_loop():
    moe = make_moe(top_k=2).eval()
    x = torch.randn(2, 7, D)
    torch.testing.assert_close(moe(x), by_hand(moe, x), rtol=1e-5, atol=1e-6)
    assert moe.load.sum() == 2 * 14  # k slots per token


def test_gradients_reach_router_noise_and_every_expert():
    moe = make_moe(top_k=2, noisy=True).train()
    torch.manual_seed(1)
    y = moe(torch.randn(64, D))
    (y.pow(2).mean() + moe.aux_loss).backward()
    for name in ("w_gate", "w_noise"):
        g = getattr(moe.router, name).weight.grad
        assert g is not None and g.abs().sum() > 0, name
    assert moe.load.min() > 0  # 64 tokens x 2 slots reach all 4 experts
    for i, expert in enumerate(moe.experts):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in expert.parameters()), f"expert {i}"


# ---------------------------------------------------------------- noisy gating
def test_noisy_gating_noise_scale_is_softplus_and_only_at_train_time():
    router = NoisyTopKRouter(D, E, top_k=1, noisy=True)
    nn.init.zeros_(router.w_gate.weight)
    nn.init.zeros_(router.w_noise.weight)
    x = torch.ones(20_000, D)
    torch.manual_seed(0)
    r = router.train()(x)  # H = 0 + eps * softplus(0): N(0, ln(2)^2)
    assert abs(r.logits.std().item() - math.log(2)) < 0.01 and abs(r.logits.mean().item()) < 0.01
    assert torch.allclose(r.probs, torch.softmax(r.logits, -1))
    r_eval = router.eval()(x)
    assert (r_eval.logits == 0).all()  # no noise in eval
    # with W_noise = c / D * ones, softplus(x W_noise) = softplus(c) for x = 1
    nn.init.constant_(router.w_noise.weight, 2.0 / D)
    r = router.train()(x)
    assert abs(r.logits.std().item() - F.softplus(torch.tensor(2.0)).item()) < 0.03


# ---------------------------------------------------------------- load-balancing loss
def test_aux_loss_matches_the_hand_formula_on_a_constructed_routing():
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1],
                          [0.4, 0.4, 0.1, 0.1],
                          [0.1, 0.2, 0.3, 0.4]])
    index = torch.tensor([[0, 1], [0, 1], [3, 2]])  # top-2 choices of the 3 tokens
    # f = slots per expert / (N k) = [2, 2, 1, 1] / 6 ; P = column means of probs
    f = [2 / 6, 2 / 6, 1 / 6, 1 / 6]
    p = [(0.7 + 0.4 + 0.1) / 3, (0.1 + 0.4 + 0.2) / 3, (0.1 + 0.1 + 0.3) / 3, (0.1 + 0.1 + 0.4) / 3]
    expected = 4 * sum(fi * pi for fi, pi in zip(f, p))
    assert load_balancing_loss(probs, index, 4).item() == pytest.approx(expected, rel=1e-6)


def test_aux_loss_is_one_for_uniform_routing_and_larger_otherwise():
    n = 8 * E
    uniform = torch.full((n, E), 1 / E)
    balanced_index = torch.arange(n)[:, None] % E  # every expert gets n / E tokens
    assert load_balancing_loss(uniform, balanced_index, E).item() == pytest.approx(1.0)
    # routing that follows its probabilities (f = P): L = E ||P||^2 >= 1, equality only if uniform
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        counts = torch.randint(0, 10, (E,), generator=g) + 1
        index = torch.repeat_interleave(torch.arange(E), counts)[:, None]
        p = counts.float() / counts.sum()
        probs = p.expand(len(index), E)
        loss = load_balancing_loss(probs, index, E).item()
        assert loss == pytest.approx(E * (p ** 2).sum().item(), rel=1e-6)
        assert loss >= 1.0 - 1e-6
    collapsed = load_balancing_loss(torch.eye(E)[[0] * n], torch.zeros(n, 1, dtype=torch.long), E)
    assert collapsed.item() == pytest.approx(E)  # everything on one expert: the maximum


def test_aux_loss_alone_rebalances_a_collapsed_router():
    moe = make_moe(top_k=1)
    torch.manual_seed(0)
    x = torch.cat([torch.randn(256, D - 1), torch.ones(256, 1)], dim=1)  # last feature = 1 acts as a bias
    with torch.no_grad():
        moe.router.w_gate.weight[:, -1] = 0.0
        moe.router.w_gate.weight[0, -1] = 5.0  # a strong bias to expert 0: (almost) all tokens go there
    opt = torch.optim.Adam(moe.router.parameters(), lr=0.05)
    imbalance = []  # E * max_i f_i: 1 balanced, E collapsed
    for _ in range(100):
        moe(x)
        imbalance.append(E * (moe.load / moe.load.sum()).max().item())
        opt.zero_grad()
        moe.aux_loss.backward()  # the gradient flows through P only (f is a count)
        opt.step()
    assert imbalance[0] > 3.5
    assert max(imbalance[-10:]) < 1.3


# ---------------------------------------------------------------- capacity
@pytest.mark.parametrize("dispatch", ["grouped", "buffers"])
def test_capacity_drops_over_capacity_assignments_second_choices_first(dispatch):
    moe = make_moe(top_k=2, capacity_factor=0.5, dispatch=dispatch).train()  # noisy=False: deterministic routing
    x = torch.randn(40, D)
    capacity = math.ceil(0.5 * 40 * 2 / E)  # 10 slots per expert
    assert moe.capacity(40) == capacity
    y = moe(x)
    r = moe.router(x)
    # reference: serve first choices (in token order), then second choices, until an expert is full
    used = [0] * E
    expected = torch.zeros_like(x)
    dropped = 0
    for slot in range(2):
        for t in range(40):
            e = int(r.expert_index[t, slot])
            if used[e] < capacity:
                used[e] += 1
                expected[t] += r.gates[t, slot] * moe.experts[e](x[t])
            else:
                dropped += 1
    assert dropped > 0 and moe.dropped.item() == dropped
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    moe.eval()  # no capacity limit at evaluation / generation: every token reaches its experts
    assert moe.capacity(40) is None
    torch.testing.assert_close(moe(x), by_hand(moe, x), rtol=1e-5, atol=1e-6)
    assert moe.dropped.item() == 0


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 2.0])
def test_expert_buffers_give_the_grouped_outputs_and_gradients(capacity_factor):
    """GShard's fixed-size buffers (static shapes, nothing read from the device) against groups
    sized on the host: the same kept assignments, the same output, the same gradients."""
    x = torch.randn(2, 30, D)
    results = []
    for dispatch in ("grouped", "buffers"):
        moe = make_moe(top_k=2, noisy=True, capacity_factor=capacity_factor, dispatch=dispatch).train()
        x_ = x.clone().requires_grad_()
        torch.manual_seed(1)  # the same router noise
        y = moe(x_)
        (y.pow(2).sum() + moe.aux_loss).backward()
        grads = [x_.grad] + [q.grad for q in moe.parameters()]
        results.append((y, moe.dropped, moe.load, grads))
    (y0, dropped0, load0, grads0), (y1, dropped1, load1, grads1) = results
    torch.testing.assert_close(y1, y0)
    assert dropped1 == dropped0 and torch.equal(load1, load0)
    if capacity_factor < 1:
        assert dropped0 > 0
    for g0, g1 in zip(grads0, grads1):
        torch.testing.assert_close(g1, g0)


def test_auto_dispatch_groups_on_a_cpu_and_fills_buffers_elsewhere(monkeypatch):
    calls = []
    moe = make_moe(top_k=2, capacity_factor=1.0).train()
    for name in ("_grouped", "_in_buffers"):
        method = getattr(moe, name)
        monkeypatch.setattr(moe, name, lambda *a, _m=method, _n=name: calls.append(_n) or _m(*a))
    moe(torch.randn(10, D))
    moe.dispatch = "buffers"
    moe(torch.randn(10, D))
    moe.eval()  # no capacity: every assignment is served, in groups
    moe(torch.randn(10, D))
    assert calls == ["_grouped", "_in_buffers", "_grouped"]
    with pytest.raises(ValueError, match="dispatch"):
        make_moe(top_k=2, dispatch="dense")


def test_moe_gpt_under_bf16_autocast_and_cached_generation():
    from litlab.chapters.gpt.nets import GPT

    torch.manual_seed(0)
    net = GPT(11, 16, n_layer=2, n_head=2, d_model=16, positional="rope", n_experts=4, moe_top_k=2,
              capacity_factor=1.0)
    idx = torch.randint(0, 11, (4, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what trainer.precision=bf16-mixed does
        logits = net(idx)
        loss = F.cross_entropy(logits.float().flatten(0, 1), idx.flatten()) + net.aux_loss()
    loss.backward()
    assert torch.isfinite(loss) and net.moe_layers[0].router.w_gate.weight.grad.abs().sum() > 0
    prompt = idx[:2, :3]
    outs = [net.generate(prompt, 20, 1.0, generator=torch.Generator().manual_seed(0), use_cache=c)
            for c in (True, False)]
    assert torch.equal(outs[0], outs[1]) and net.training  # generate restores train mode


# ---------------------------------------------------------------- registered gpt_moe
def _tiny_gpt_moe(**model):
    from litlab import registry
    from litlab.config import OptimConfig
    from litlab.data.text import TextCharsDataModule

    dm = TextCharsDataModule(max_chars=20_000, seq_len=16, batch_size=16)
    args = {"n_layer": 2, "n_head": 2, "d_model": 16, "block_size": 16, "n_experts": 4, "sample_length": 10,
            **model}
    L.seed_everything(0, verbose=False)
    module = registry.get_model("gpt_moe").cls(vocab_size=dm.info()["vocab_size"], **args)
    module.optim_config = OptimConfig(lr=3e-3)
    return module, dm


def test_gpt_moe_training_loss_is_lm_loss_plus_coef_times_aux():
    module, dm = _tiny_gpt_moe(aux_loss_coef=0.5, moe_every=2, noisy_gating=False)
    assert len(module.net.moe_layers) == 1 and module.net.blocks[1].ffn is module.net.moe_layers[0]
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    module.train()
    total = module.training_step((x, y), 0)
    lm = F.cross_entropy(module(x).flatten(0, 1), y.flatten())
    aux = module.net.moe_layers[0].aux_loss
    torch.testing.assert_close(total, lm + 0.5 * aux)


def test_gpt_moe_logs_utilisation_aux_loss_and_plot(tracking_uri):
    from mlflow import MlflowClient

    from helpers import REPO
    from litlab import runner

    result = runner.run(REPO / "experiments" / "transformer" / "gpt_moe_pydoc.yaml",
                        ["data.max_chars=20000", "data.seq_len=16", "data.batch_size=16", "model.block_size=16",
                         "model.n_layer=2", "model.d_model=16", "model.n_head=2", "model.d_ff=16",
                         "model.sample_length=20", "trainer.max_epochs=2", "trainer.limit_train_batches=10",
                         "trainer.limit_val_batches=2", "trainer.limit_test_batches=2", "tracking.system_metrics=false"],
                        tracking_uri=tracking_uri)
    assert result.status == "FINISHED" and "test/bpc" in result.metrics
    c = MlflowClient(tracking_uri)
    metrics = c.get_run(result.run_id).data.metrics
    n_experts = runner.load_config(REPO / "experiments" / "transformer" / "gpt_moe_pydoc.yaml").model["n_experts"]
    fracs = [metrics[f"train/expert_frac_e{i}"] for i in range(n_experts)]
    assert sum(fracs) == pytest.approx(1.0, abs=1e-4)
    assert len(c.get_metric_history(result.run_id, "train/expert_frac_e0")) == 2  # once per epoch
    assert metrics["train/expert_imbalance"] >= 1.0 - 1e-6 and metrics["train/aux_loss_epoch"] > 0
    assert "plots/expert_utilisation.png" in [a.path for a in c.list_artifacts(result.run_id, "plots")]
    assert "samples/generated.txt" in [a.path for a in c.list_artifacts(result.run_id, "samples")]
