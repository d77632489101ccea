"""BERT on the pydoc corpus: tokenizer, passages and split, the 80/10/10 masking (statistically),
the MLM loss (only selected positions count), sentence pairs, the encoder's embeddings and padding,
a real learning check (masked-token accuracy beats the majority baseline), and fine-tuning from a
pretrained checkpoint (file and MLflow run id). Nothing downloads."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from litlab.chapters.bert.module import BertMLM, BertSequenceClassifier
from litlab.chapters.bert.nets import BertEncoder, BertForPretraining, mlm_loss, prediction_slots
from litlab.config import OptimConfig
from litlab.data.corpus import (CLS, DOC_SECTIONS, IGNORE, MASK, NUM_SPECIAL, PAD, SEP, SPECIALS, UNK, Vocab,
                                load_corpus, mask_tokens, mlm_predictions, paragraphs, pydoc_topics, sentence_pairs,
                                tokenize)
from litlab.data.corpus_tasks import PydocMLMDataModule, PydocSectionsDataModule
from litlab.errors import ConfigError

TINY_DATA = {"passage_tokens": 32, "vocab_size": 300, "batch_size": 32}


def _trainer(steps: int, tmp_path, **kw) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                     default_root_dir=tmp_path, **kw)


# ---------------------------------------------------------------------------- corpus and tokenizer
def test_tokenizer_and_vocabulary():
    assert tokenize('The "assert_stmt" x1 ::= 42\n*****') == ["the", '"', "assert_stmt", '"', "x1", "::", "=", "42",
                                                             "*****"]
    v = Vocab.build([["b", "a", "b", "c", "b", "a"]])
    assert v.itos[:NUM_SPECIAL] == list(SPECIALS) and (PAD, UNK, CLS, SEP, MASK) == (0, 1, 2, 3, 4)
    assert v.itos[NUM_SPECIAL:] == ["b", "a", "c"]  # by frequency
    assert v.encode(["a", "zzz"]) == [v.stoi["a"], UNK] and v.decode([v.stoi["c"], PAD]) == "c"
    assert Vocab.build([["b", "a", "b", "c", "b", "a"]], max_size=NUM_SPECIAL + 1).itos[-1] == "b"


def test_passages_split_and_sections():
    corpus = load_corpus(64)
    topics = pydoc_topics()
    assert {p.topic for p in corpus.passages} <= set(topics)
    assert sorted(t for names in DOC_SECTIONS.values() for t in names.split()) == sorted(topics)  # each once
    assert all(0 < len(p.tokens) <= 64 for p in corpus.passages)
    paras = [" ".join(p.split()) for _, p in paragraphs(topics)]
    assert len(paras) == len(set(paras))  # "compound" repeats "if", "while", ...: kept once
    assert not any(p.topic == "if" for p in corpus.passages)  # "else" (same text) came first
    parts = [set(corpus.split[s].tolist()) for s in ("train", "val", "test")]
    assert set().union(*parts) == set(range(len(corpus.passages))) and sum(map(len, parts)) == len(corpus.passages)
    assert len(parts[1]) == round(0.1 * len(corpus.passages))
    # the vocabulary is the TRAIN passages' tokens, most frequent first
    counts = {}
    for i in corpus.split["train"]:
        for t in corpus.passages[i].tokens:
            counts[t] = counts.get(t, 0) + 1
    assert len(corpus.vocab) == NUM_SPECIAL + len(counts)
    assert corpus.vocab.itos[NUM_SPECIAL] == max(counts, key=counts.get)


# ---------------------------------------------------------------------------- masking and loss
def test_masking_selects_15_percent_then_80_10_10():
    vocab_size, n = 1000, 400_000
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(NUM_SPECIAL, vocab_size, (n // 100, 100), generator=g)
    ids[:, 0], ids[:, -1], ids[:, 50:60] = CLS, SEP, PAD  # specials are never selected
    ids[::2, 70:] = PAD  # rows of 59 and of 88 candidates
    inputs, labels = mask_tokens(ids, vocab_size, generator=g)
    special = ids < NUM_SPECIAL
    selected = labels != IGNORE
    assert not selected[special].any() and torch.equal(inputs[special], ids[special])
    assert torch.equal(labels[selected], ids[selected]) and torch.equal(inputs[~selected], ids[~selected])
    # each row selects exactly round(0.15 m) of its m candidates (BERT's create_pretraining_data)
    m = (~special).sum(1)
    assert set(m.tolist()) == {59, 88}
    assert torch.equal(selected.sum(1), torch.where(m == 59, 9, 13))

    def within(count, total, p, sd=5):  # binomial count within 5 standard deviations of total * p
        return abs(count - total * p) < sd * math.sqrt(total * p * (1 - p))

    # uniformly: every candidate position of the 88-candidate rows is chosen with p 13/88
    per_position = selected[1::2][:, ~special[1]].sum(0)
    rows = len(ids) // 2
    assert all(within(int(c), rows, 13 / 88) for c in per_position)
    n_sel = int(selected.sum())
    masked = int((inputs[selected] == MASK).sum())
    changed = inputs[selected] != ids[selected]
    randomised = int((changed & (inputs[selected] != MASK)).sum())
    # a random replacement equals the original with p 1/(V - 5): "unchanged" = 0.1 + 0.1/(V - 5)
    p_same = 1 / (vocab_size - NUM_SPECIAL)
    assert within(masked, n_sel, 0.8)
    assert within(randomised, n_sel, 0.1 * (1 - p_same))
    assert within(n_sel - masked - randomised, n_sel, 0.1 + 0.1 * p_same)
    replaced = inputs[selected & (inputs != MASK) & (inputs != ids)]
    assert replaced.min() >= NUM_SPECIAL and replaced.max() < vocab_size
    hist = torch.bincount(replaced - NUM_SPECIAL, minlength=vocab_size - NUM_SPECIAL).float()  # uniform
    expected = len(replaced) / (vocab_size - NUM_SPECIAL)
    chi2 = ((hist - expected) ** 2 / expected).sum().item()
    dof = vocab_size - NUM_SPECIAL - 1
    assert abs(chi2 - dof) < 6 * math.sqrt(2 * dof)


def test_masking_counts_round_half_to_even_at_least_one_and_at_most_the_cap():
    ids = torch.full((6, 40), PAD)
    for row, m in enumerate((0, 1, 3, 10, 30, 36)):  # 0.15 m = 0, 0.15, 0.45, 1.5, 4.5, 5.4
        ids[row, :m] = torch.arange(m) + NUM_SPECIAL
    counts = [mlm_predictions(m, 0.15) for m in (1, 3, 10, 30, 36)]
    assert counts == [1, 1, 2, 4, 5]  # Python's round: 1.5 -> 2, 4.5 -> 4
    g = torch.Generator().manual_seed(0)
    _, labels = mask_tokens(ids, 100, generator=g)
    assert (labels != IGNORE).sum(1).tolist() == [0, *counts]
    _, capped = mask_tokens(ids, 100, generator=g, max_predictions=3)
    assert (capped != IGNORE).sum(1).tolist() == [0, 1, 1, 2, 3, 3]
    dm = PydocMLMDataModule(**TINY_DATA)
    assert dm.info()["max_predictions"] == mlm_predictions(32, 0.15) == 5
    dm.setup()
    for split in (dm.train_set, dm.val_set):
        batch = split.__getitems__(list(range(len(split))))
        assert (batch[2] != IGNORE).sum(1).max() <= 5


def test_mlm_loss_is_the_mean_over_selected_positions_only():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11, requires_grad=True)
    labels = torch.full((3, 7), IGNORE)
    labels[0, 2], labels[1, 5], labels[2, 0], labels[2, 6] = 4, 9, 0, 10
    loss = mlm_loss(logits, labels)
    sel = [(0, 2), (1, 5), (2, 0), (2, 6)]
    manual = -sum(torch.log_softmax(logits[b, t].double(), -1)[labels[b, t]] for b, t in sel) / len(sel)
    torch.testing.assert_close(loss.double(), manual)
    loss.backward()
    grad = logits.grad.abs().sum(-1)  # (B, T)
    mask = labels != IGNORE
    assert (grad[~mask] == 0).all() and (grad[mask] > 0).all()
    changed = logits.detach().clone()
    changed[~mask] = torch.randn_like(changed[~mask]) * 100  # anything at unselected positions
    torch.testing.assert_close(mlm_loss(changed, labels), loss.detach())
    nothing = mlm_loss(logits, torch.full((3, 7), IGNORE))
    assert nothing.item() == 0.0 and nothing.requires_grad


def test_pretraining_model_scores_exactly_the_selected_positions():
    torch.manual_seed(0)
    net = BertForPretraining(50, 12, nsp=True, d_model=16, n_heads=2, n_layers=1, dropout=0.0).eval()
    ids = torch.randint(NUM_SPECIAL, 50, (2, 12))
    labels = torch.full_like(ids, IGNORE)
    labels[0, 3], labels[1, 1], labels[1, 7] = 8, 9, 10
    mlm_logits, targets, nsp_logits = net(ids, torch.zeros_like(ids), labels)
    assert mlm_logits.shape == (3, 50) and nsp_logits.shape == (2, 2)
    full = net.mlm(net.encoder(ids))  # the head at every position, then the selected rows
    torch.testing.assert_close(mlm_logits, full[labels != IGNORE])
    assert targets.tolist() == [8, 9, 10]
    assert net.mlm.embedding.weight is net.encoder.token.weight  # tied output matrix


def test_fixed_prediction_slots_give_the_same_loss_accuracy_and_gradients():
    """B x P slots per batch (static shapes) score what the selected positions alone score."""
    torch.manual_seed(0)
    kw = dict(d_model=16, n_heads=2, n_layers=1, dropout=0.0)
    masked = BertForPretraining(50, 12, nsp=False, **kw)
    slots = BertForPretraining(50, 12, nsp=False, max_predictions=3, **kw)
    slots.load_state_dict(masked.state_dict())
    ids = torch.randint(NUM_SPECIAL, 50, (3, 12))
    labels = torch.full_like(ids, IGNORE)
    labels[0, 3], labels[0, 11], labels[1, 1], labels[1, 7], labels[1, 2] = 8, 9, 10, 11, 12  # rows: 2, 3, 0
    assert prediction_slots(labels, 3).tolist() == [[3, 11, 0], [1, 2, 7], [0, 1, 2]]
    results = []
    for net in (masked, slots):
        logits, targets, _ = net(ids, torch.zeros_like(ids), labels)
        loss = mlm_loss(logits, targets)
        net.zero_grad()
        loss.backward()
        scored = targets != IGNORE
        acc = ((logits.argmax(-1) == targets).float() * scored).sum() / scored.sum()
        results.append((logits.shape[0], loss, acc, {k: p.grad.clone() for k, p in net.named_parameters()}))
    (n0, loss0, acc0, grads0), (n1, loss1, acc1, grads1) = results
    assert (n0, n1) == (5, 9)  # 5 selected; 3 rows x 3 slots
    torch.testing.assert_close(loss1, loss0)
    torch.testing.assert_close(acc1, acc0)
    for k in grads0:
        torch.testing.assert_close(grads1[k], grads0[k])


# ---------------------------------------------------------------------------- pairs and encoder
def test_sentence_pairs_layout_and_nsp_balance():
    corpus = load_corpus(64)
    idx = corpus.split["train"]
    ids, segments, is_next = sentence_pairs(corpus, idx, np.random.default_rng(0), nsp=True, max_tokens=64)
    assert ids.shape == segments.shape == (len(is_next), 67)
    assert abs(is_next.float().mean().item() - 0.5) < 0.06
    by_text = {tuple(corpus.vocab.encode(corpus.passages[i].tokens)): corpus.passages[i].topic for i in idx}
    for row, seg, nxt in zip(ids[:200], segments[:200], is_next[:200]):
        n = int((row != PAD).sum())
        assert row[0] == CLS and row[n - 1] == SEP and (row[n:] == PAD).all() and (row[:n] != PAD).all()
        sep = int((row == SEP).nonzero()[0])
        assert (seg[: sep + 1] == 0).all() and (seg[sep + 1: n] == 1).all() and (seg[n:] == 0).all()
        a, b = row[1:sep].tolist(), row[sep + 1: n - 1].tolist()
        assert a and b
        if nxt:  # A + B is exactly one passage
            assert tuple(a + b) in by_text
    _, _, no_nsp = sentence_pairs(corpus, idx, np.random.default_rng(0), nsp=False, max_tokens=64)
    assert no_nsp.all()


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_embeddings_and_padding(norm_first):
    torch.manual_seed(0)
    enc = BertEncoder(30, 16, d_model=8, n_heads=2, n_layers=2, dropout=0.0, norm_first=norm_first).eval()
    ids = torch.tensor([[CLS, 7, 8, 9, SEP]])
    seg = torch.tensor([[0, 0, 1, 1, 1]])
    h = enc(ids, seg)
    # appending padding changes nothing at the real positions (padding is masked out of attention)
    padded = enc(torch.cat((ids, torch.zeros(1, 3, dtype=torch.long)), 1), torch.cat((seg, torch.zeros(1, 3, dtype=torch.long)), 1))
    torch.testing.assert_close(padded[:, :5], h, atol=1e-5, rtol=1e-5)
    # E = LN(token + position + segment): recompute the first block's input by hand
    e = enc.token.weight[ids] + enc.position.embedding.weight[:5] + enc.segment.weight[seg]
    torch.testing.assert_close(enc.embed_norm(e), F.layer_norm(e, (8,), enc.embed_norm.weight, enc.embed_norm.bias))
    seen = {}
    enc.blocks[0].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    enc(ids, seg)
    torch.testing.assert_close(seen["x"], enc.embed_norm(e))
    assert enc.blocks[0].norm_first is norm_first and isinstance(enc.final_norm, torch.nn.LayerNorm) is norm_first


# ---------------------------------------------------------------------------- learning and fine-tuning
@pytest.fixture(scope="module")
def pretrained_mlm(tmp_path_factory):
    """A tiny post-LN BERT pretrained for 300 steps (MLM + NSP); (module, trainer, checkpoint path)."""
    tmp = tmp_path_factory.mktemp("mlm")
    L.seed_everything(0, verbose=False)
    dm = PydocMLMDataModule(**TINY_DATA, nsp=True)
    model = BertMLM(**dm.info(), d_model=48, n_heads=4, n_layers=1, dropout=0.0)
    model.optim_config = OptimConfig(name="adamw", lr=3e-3)
    trainer = _trainer(300, tmp, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    path = tmp / "mlruns" / "mlm.ckpt"  # where litlab keeps checkpoints (elsewhere: --allow-external-checkpoints)
    trainer.save_checkpoint(path)
    metrics = _trainer(1, tmp).validate(model, datamodule=dm, verbose=False)[0]
    return model, metrics, path


def test_mlm_beats_the_majority_baseline(pretrained_mlm):
    _, m, _ = pretrained_mlm
    majority = m["val/mlm_majority_acc"]
    assert 0.03 < majority < 0.2
    assert m["val/mlm_acc"] > majority + 0.03 and m["val/mlm_acc"] > 1.3 * majority, m
    assert 0.0 <= m["val/nsp_acc"] <= 1.0 and m["val/mlm_loss"] < math.log(300)  # below a uniform guess
    assert math.isclose(m["val/loss"], m["val/mlm_loss"] + m["val/nsp_loss"], rel_tol=1e-4)


def test_classifier_loads_the_pretrained_encoder(pretrained_mlm, tmp_path):
    mlm, _, path = pretrained_mlm
    dm = PydocSectionsDataModule(**TINY_DATA, n_train=64)
    info = dm.info()
    assert info["vocab_signature"] == mlm.hparams.vocab_signature and info["num_classes"] == 7
    clf = BertSequenceClassifier(**info, pretrained=str(path), d_model=48, n_heads=4, n_layers=1)
    assert not torch.equal(clf.net.encoder.token.weight, mlm.net.encoder.token.weight)
    clf.optim_config = OptimConfig(name="adamw", lr=1e-3)
    trainer = _trainer(1, tmp_path, limit_val_batches=0)
    before = {k: v.clone() for k, v in clf.net.head.state_dict().items()}
    clf.setup("fit")  # what the Trainer calls: loads encoder + pooler, once
    for name, p in mlm.net.encoder.state_dict().items():
        torch.testing.assert_close(clf.net.encoder.state_dict()[name], p)
    torch.testing.assert_close(clf.net.pooler.dense.weight, mlm.net.pooler.dense.weight)
    assert all(torch.equal(before[k], v) for k, v in clf.net.head.state_dict().items())  # head: fresh
    trainer.fit(clf, datamodule=dm)  # a second setup() must not reload over trained weights
    assert clf._pretrained_done
    with pytest.raises(ConfigError, match="d_model"):
        BertSequenceClassifier(**info, pretrained=str(path), d_model=32, n_heads=4, n_layers=1).load_pretrained()
    other = {**info, "vocab_signature": "0" * 12}
    with pytest.raises(ConfigError, match="vocab_signature"):
        BertSequenceClassifier(**other, pretrained=str(path), d_model=48, n_heads=4, n_layers=1).load_pretrained()


def test_classifier_pretrained_from_an_mlflow_run_id(tracking_uri):
    from litlab import runner

    data = {"name": "pydoc_mlm", **TINY_DATA, "n_train": 64}
    arch = {"d_model": 16, "n_heads": 2, "n_layers": 1}
    pre = runner.run({"name": "mlm", "model": {"name": "bert_mlm", **arch}, "data": data,
                      "trainer": {"max_epochs": 1, "enable_progress_bar": False},
                      "tracking": {"system_metrics": False}}, tracking_uri=tracking_uri)
    assert pre.status == "FINISHED" and "test/mlm_acc" in pre.metrics and "test/nsp_acc" in pre.metrics
    fine = runner.run({"name": "clf", "model": {"name": "bert_classifier", "pretrained": pre.run_id, **arch},
                       "data": {**data, "name": "pydoc_sections"},
                       "trainer": {"max_epochs": 1, "enable_progress_bar": False},
                       "tracking": {"system_metrics": False}}, tracking_uri=tracking_uri)
    assert fine.status == "FINISHED" and {"test/acc", "test/majority_acc"} <= set(fine.metrics)
    info = PydocSectionsDataModule(**TINY_DATA).info()
    clf = BertSequenceClassifier(**info, pretrained=pre.run_id, **arch)
    assert clf.load_pretrained(tracking_uri) == ["encoder", "pooler"]
    ckpt = torch.load(pre.best_checkpoint, map_location="cpu", weights_only=False)
    torch.testing.assert_close(clf.net.encoder.token.weight, ckpt["state_dict"]["net.encoder.token.weight"])


def test_frozen_encoder_with_mean_pooling_trains_only_the_head(tmp_path):
    dm = PydocSectionsDataModule(**TINY_DATA, n_train=64)
    clf = BertSequenceClassifier(**dm.info(), pooling="mean", freeze_encoder=True, d_model=16, n_heads=2, n_layers=1)
    assert clf.net.pooler is None
    clf.optim_config = OptimConfig(name="adamw", lr=1e-2)
    before = {k: v.clone() for k, v in clf.net.state_dict().items()}
    _trainer(2, tmp_path, limit_val_batches=0).fit(clf, datamodule=dm)
    after = clf.net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("encoder."))
    assert not torch.equal(before["head.1.weight"], after["head.1.weight"])
