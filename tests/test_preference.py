"""Preference learning (chapter 12): the property, the pairs, the masked sequence log-prob, the
Bradley-Terry and DPO losses against hand formulas, the frozen reference, and real learning checks
(SFT -> checkpoint -> DPO raises the property rate; the reward model ranks held-out pairs)."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from litlab.chapters.preference.dpo import DPOModule
from litlab.chapters.preference.losses import (
    bradley_terry_loss,
    completion_logprob,
    completion_mask_after,
    dpo_loss,
    sequence_logprob,
)
from litlab.chapters.preference.module import RewardModelModule, SFTModule
from litlab.config import OptimConfig
from litlab.data.preferences import (
    BOS,
    EOS,
    PAD,
    SEP,
    PreferenceDataModule,
    decode_completion,
    encode_sequences,
    has_property,
)
from litlab.errors import ConfigError
from torch import nn

torch.set_num_threads(1)
INFO_KEYS = ("vocab_size", "block_size", "prompt_len", "min_len", "max_len", "alphabet", "property")


def tiny_data(**kw) -> PreferenceDataModule:
    args = {"batch_size": 32, "n_train": 1000, "n_val": 100, "n_test": 250}
    args.update(kw)
    dm = PreferenceDataModule(**args)
    dm.setup("fit")
    return dm


def from_info(dm, **kw) -> dict:
    return {**{k: dm.info()[k] for k in INFO_KEYS}, **kw}


def trainer(**kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                     enable_checkpointing=False, num_sanity_val_steps=0, **kw)


# ---------------------------------------------------------------- the property and the data
def test_has_property_hand_cases():
    assert has_property("abc", "no_e") and has_property("", "no_e") and not has_property("abe", "no_e")
    assert has_property("bca", "ends_with_vowel") and has_property("ggu", "ends_with_vowel")
    assert not has_property("ace", "no_e") and not has_property("aeb", "ends_with_vowel")
    assert not has_property("", "ends_with_vowel")
    assert has_property("aab", "more_a_than_b") and has_property("cac", "more_a_than_b")
    assert not has_property("ab", "more_a_than_b") and not has_property("bba", "more_a_than_b")
    assert not has_property("", "more_a_than_b")


def test_sequences_and_masks_by_hand():
    ids, mask = encode_sequences(["ab"], ["cd"], "abcd", block_size=8)
    a, b, c, d = 4, 5, 6, 7
    assert ids[0].tolist() == [BOS, a, b, SEP, c, d, EOS, PAD]
    assert mask[0].tolist() == [False, False, False, False, True, True, True, False]
    assert decode_completion([c, d, EOS, PAD], "abcd") == ("cd", True)
    assert decode_completion([c, d, d], "abcd") == ("cdd", False)  # no EOS
    assert decode_completion([c, SEP, EOS], "abcd") == ("c", False)  # a special token inside
    sampled = torch.tensor([[BOS, a, SEP, c, EOS, d, EOS], [BOS, a, SEP, c, c, c, c]])
    assert completion_mask_after(sampled, 3, EOS).int().tolist() == [[0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 1]]


@pytest.mark.parametrize("prop", ["no_e", "ends_with_vowel", "more_a_than_b"])
def test_pairs_differ_only_by_the_property(prop):
    dm = tiny_data(property=prop, n_train=300, n_val=10, n_test=10)
    for x, y_w, y_l in dm.train_set.pairs:
        assert has_property(y_w, prop) and not has_property(y_l, prop)
        assert len(y_w) == len(y_l) and dm.min_len <= len(y_w) <= dm.max_len and len(x) == dm.prompt_len
    ds = dm.train_set
    assert torch.equal(ds.chosen[:, : dm.prompt_len + 2], ds.rejected[:, : dm.prompt_len + 2])  # same prompt
    assert torch.equal(ds.chosen_mask, ds.rejected_mask)  # same completion length
    assert tiny_data(property=prop, n_train=300, n_val=10, n_test=10).train_set.pairs == ds.pairs  # seeded
    with pytest.raises(ConfigError, match="data.property"):
        tiny_data(property="no_e", alphabet="abcd", n_train=5, n_val=1, n_test=1)  # no 'e': never rejected


# ---------------------------------------------------------------- the losses against hand formulas
class PositionLogits(nn.Module):
    """A fake causal LM: the logits at position t are table[t], whatever the tokens."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, ids):
        return self.table[: ids.shape[1]].expand(ids.shape[0], -1, -1)


def test_sequence_logprob_masks_the_prompt():
    table = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 0.0], [0.5, 0.5, -1.0]])  # logits at positions 0, 1, 2
    net = PositionLogits(table)
    ids = torch.tensor([[0, 1, 2, 1]])  # prompt: tokens 0, 1; completion: tokens 2, 1
    mask = torch.tensor([[False, False, True, True]])
    # log p(s_2 = 2 | logits at 1) + log p(s_3 = 1 | logits at 2); the prompt token s_1 is not scored
    expected = math.log(math.exp(0) / (math.exp(1) + 2)) + math.log(math.exp(0.5) / (2 * math.exp(0.5) + math.exp(-1)))
    assert completion_logprob(net, ids, mask).item() == pytest.approx(expected, abs=1e-6)
    other_prompt = torch.tensor([[0, 2, 2, 1]])  # a different prompt token: the same completion score
    assert completion_logprob(net, other_prompt, mask).item() == pytest.approx(expected, abs=1e-6)
    # independent reference: the GPT's own token_logprobs, masked and summed by hand
    dm = tiny_data(n_train=8, n_val=1, n_test=1)
    gpt = SFTModule(**from_info(dm), n_layer=1, d_model=16).net
    x, m = dm.train_set.chosen[:4], dm.train_set.chosen_mask[:4]
    by_hand = torch.stack([gpt.token_logprobs(x)[i][m[i, 1:]].sum() for i in range(4)])
    torch.testing.assert_close(sequence_logprob(gpt.token_logprobs(x), m), by_hand)
    torch.testing.assert_close(completion_logprob(gpt, x, m), by_hand)


def test_dpo_loss_hand_formula_and_log2_at_the_reference():
    pc, pr = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.5])  # log pi(y_w|x), log pi(y_l|x)
    rc, rr = torch.tensor([-1.5, -2.5]), torch.tensor([-2.0, -1.0])  # the same under pi_ref
    loss, r_w, r_l = dpo_loss(pc, pr, rc, rr, beta=0.5)
    z = [0.5 * ((-1 + 1.5) - (-3 + 2)), 0.5 * ((-2 + 2.5) - (-1.5 + 1))]  # beta * log-ratio margins: 0.75, 0.5
    assert loss.item() == pytest.approx(sum(math.log(1 + math.exp(-v)) for v in z) / 2, abs=1e-6)
    torch.testing.assert_close(r_w, torch.tensor([0.25, 0.25]))
    torch.testing.assert_close(r_l, torch.tensor([-0.5, -0.25]))
    g = torch.Generator().manual_seed(0)
    lp_w, lp_l = -10 * torch.rand(16, generator=g), -10 * torch.rand(16, generator=g)
    at_ref, _, _ = dpo_loss(lp_w, lp_l, lp_w.clone(), lp_l.clone(), beta=0.1)
    assert at_ref.item() == pytest.approx(math.log(2), abs=1e-6)
    far, _, _ = dpo_loss(torch.tensor([0.0]), torch.tensor([-1e4]), torch.tensor([0.0]), torch.tensor([0.0]), 1.0)
    assert torch.isfinite(far) and far.item() == pytest.approx(0.0, abs=1e-6)


def test_bradley_terry_loss_formula_and_gradient_sign():
    r_w = torch.tensor([0.3, -1.0, 2.0], requires_grad=True)
    r_l = torch.tensor([0.1, 0.5, -2.0], requires_grad=True)
    loss = bradley_terry_loss(r_w, r_l)
    d = (r_w - r_l).tolist()
    assert loss.item() == pytest.approx(sum(-math.log(1 / (1 + math.exp(-v))) for v in d) / 3, abs=1e-6)
    loss.backward()
    assert (r_w.grad < 0).all() and (r_l.grad > 0).all()  # descent raises r(y_w) and lowers r(y_l)
    expected = torch.tensor([1 / (1 + math.exp(v)) for v in d]) / 3  # sigmoid(-(r_w - r_l)) / N
    torch.testing.assert_close(-r_w.grad, expected)
    torch.testing.assert_close(r_l.grad, expected)


# ---------------------------------------------------------------- the frozen reference
def test_dpo_starts_at_log2_and_the_reference_stays_frozen():
    dm = tiny_data(n_train=200, n_val=32, n_test=32)
    L.seed_everything(0, verbose=False)
    model = DPOModule(**from_info(dm), n_layer=1, d_model=16, ref_steps=20, samples_per_prompt=1)
    model.optim_config = OptimConfig(name="adam", lr=1e-2)
    model.prepare_reference(dm.train_set)  # fits pi_ref in-run (20 steps), then pi_theta <- pi_ref
    batch = dm.train_set.__getitems__(range(16))
    assert model.training_step(batch, 0).item() == pytest.approx(math.log(2), abs=1e-5)
    ref_before = {k: v.clone() for k, v in model.reference.state_dict().items()}
    policy_before = {k: v.clone() for k, v in model.net.state_dict().items()}
    t = trainer(max_steps=5, limit_val_batches=1, limit_test_batches=1)
    t.fit(model, datamodule=dm)
    in_optimiser = {id(p) for group in t.optimizers[0].param_groups for p in group["params"]}
    assert all(id(p) not in in_optimiser and not p.requires_grad and p.grad is None
               for p in model.reference.parameters())
    assert all(torch.equal(v, ref_before[k]) for k, v in model.reference.state_dict().items())
    assert any(not torch.equal(v, policy_before[k]) for k, v in model.net.state_dict().items())
    model.train()
    assert not model.reference.training and model.net.training
    assert any(k.startswith("reference.") for k in model.state_dict())  # in-run: the checkpoint is its only copy


def test_reference_from_a_checkpoint_is_not_saved_twice(tmp_path):
    dm = tiny_data(n_train=50, n_val=8, n_test=8)
    sft = SFTModule(**from_info(dm), n_layer=1, d_model=16)
    path = tmp_path / "mlruns" / "sft.ckpt"  # outside mlruns/ it would need --allow-external-checkpoints
    path.parent.mkdir()
    torch.save({"state_dict": sft.state_dict(), "hyper_parameters": dict(sft.hparams)}, path)
    dpo = DPOModule(**from_info(dm), n_layer=1, d_model=16, reference=str(path))
    dpo.prepare_reference()
    for k, v in sft.net.state_dict().items():
        assert torch.equal(dpo.reference.state_dict()[k], v) and torch.equal(dpo.net.state_dict()[k], v)
    ckpt = {"state_dict": dpo.state_dict()}
    dpo.on_save_checkpoint(ckpt)
    assert ckpt["state_dict"] and not any(k.startswith("reference.") for k in ckpt["state_dict"])
    fresh = DPOModule(**from_info(dm), n_layer=1, d_model=16, reference=str(path))
    fresh.load_state_dict(ckpt["state_dict"])  # the policy from the checkpoint, pi_ref from its file
    assert all(torch.equal(fresh.reference.state_dict()[k], v) for k, v in sft.net.state_dict().items())
    with pytest.raises(ConfigError, match="d_model"):
        DPOModule(**from_info(dm), n_layer=1, d_model=32, reference=str(path)).prepare_reference()


# ---------------------------------------------------------------- learning checks
@pytest.mark.slow
def test_sft_then_dpo_raises_the_property_rate(tmp_path):
    """SFT on both completions (property ~50%) -> its Lightning checkpoint is DPO's reference ->
    DPO: the policy's samples (temperature 1, fixed seed, 1000 of them) have the property clearly
    more often than the reference's. Plain DPO gains ~+0.2-0.3 here (seeds 0-2) before it starts
    to exploit malformed (e.g. empty, hence 'e'-free) completions; with the NLL anchor on y_w
    (nll_weight=1) it gains ~+0.35-0.45 and keeps its completions well-formed."""
    dm = tiny_data()
    arch = {"n_layer": 1, "n_head": 2, "d_model": 32, "samples_per_prompt": 4}
    L.seed_everything(0, verbose=False)
    sft = SFTModule(**from_info(dm), **arch)
    sft.optim_config = OptimConfig(name="adamw", lr=3e-3, weight_decay=0.0)
    t = trainer(max_steps=300, limit_val_batches=0, gradient_clip_val=1.0)
    t.fit(sft, datamodule=dm)
    sft_out = t.test(sft, datamodule=dm, verbose=False)[0]
    assert sft_out["test/loss"] < 0.85 * math.log(dm.info()["vocab_size"])  # beats a uniform guess
    assert 0.3 < sft_out["test/property_rate"] < 0.7  # the SFT mixture: half of its completions have it
    ckpt = tmp_path / "mlruns" / "sft.ckpt"
    t.save_checkpoint(ckpt)

    results = {}
    for nll_weight, lr, steps in ((0.0, 1e-4, 80), (1.0, 3e-4, 100)):
        dpo = DPOModule(**from_info(dm), **arch, reference=str(ckpt), beta=0.1, nll_weight=nll_weight)
        dpo.optim_config = OptimConfig(name="adam", lr=lr)
        t = trainer(max_steps=steps, limit_val_batches=0)
        t.fit(dpo, datamodule=dm)
        out = results[nll_weight] = t.test(dpo, datamodule=dm, verbose=False)[0]
        assert out["test/ref_property_rate"] == pytest.approx(sft_out["test/property_rate"])  # same model, seeds
        assert out["test/rewards/accuracy"] > 0.9 and out["test/rewards/margin"] > 0 and out["test/kl"] > 0
    plain, anchored = results[0.0], results[1.0]
    assert plain["test/property_rate"] > plain["test/ref_property_rate"] + 0.15
    assert anchored["test/property_rate"] > anchored["test/ref_property_rate"] + 0.25
    assert anchored["test/valid_rate"] > 0.85


def test_reward_model_ranks_held_out_pairs():
    dm = tiny_data(n_train=1000, n_val=50, n_test=250, batch_size=32)
    L.seed_everything(0, verbose=False)
    model = RewardModelModule(**{k: dm.info()[k] for k in ("vocab_size", "block_size")}, n_layer=1, d_model=32)
    model.optim_config = OptimConfig(name="adamw", lr=2e-3, weight_decay=0.0)
    t = trainer(max_steps=150, limit_val_batches=0, gradient_clip_val=1.0)
    t.fit(model, datamodule=dm)
    out = t.test(model, datamodule=dm, verbose=False)[0]
    assert out["test/acc"] > 0.85 and out["test/loss"] < 0.5 * math.log(2)  # chance: 0.5 and log 2
