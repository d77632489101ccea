"""Retrieval and RAG on the pydoc passages: recall@k against a hand-computed example, InfoNCE
against an explicit formula, the inverse-cloze and RAG data, the bi-encoder's pooling, the RAG
sequence layout and contexts, learning checks (recall@5 far above k/N; retrieved and oracle
passages beat no retrieval), and a RAG that loads a frozen retriever checkpoint."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from litlab.chapters.retrieval.module import Retriever
from litlab.chapters.retrieval.nets import BiEncoder, gold_ranks, info_nce, rag_sequence, recall_at_k, wrap_query
from litlab.chapters.retrieval.rag import RetrievalAugmentedGenerator
from litlab.config import OptimConfig
from litlab.data.corpus import CLS, IGNORE, PAD, SEP
from litlab.data.corpus_tasks import PydocRAGDataModule, PydocRetrievalDataModule
from litlab.errors import ConfigError


def _trainer(steps: int, tmp_path, **kw) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                     default_root_dir=tmp_path, **kw)


# ---------------------------------------------------------------------------- metrics and loss
def test_recall_at_k_matches_a_hand_computed_example():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3],   # gold 2: one passage above it -> rank 1
                           [0.2, 0.8, 0.1, 0.0],   # gold 1: the best -> rank 0
                           [0.4, 0.4, 0.1, 0.7],   # gold 0: 0.7 above, 0.4 ties (not above) -> rank 1
                           [0.6, 0.5, 0.4, 0.3]])  # gold 3: the worst -> rank 3
    gold = torch.tensor([2, 1, 0, 3])
    assert gold_ranks(scores, gold).tolist() == [1, 0, 1, 3]
    r = recall_at_k(scores, gold, ks=(1, 2, 3, 4))
    assert [r[k].item() for k in (1, 2, 3, 4)] == [0.25, 0.75, 0.75, 1.0]


def test_info_nce_matches_the_formula():
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(5, 8, dtype=torch.float64), dim=-1)
    p = torch.nn.functional.normalize(torch.randn(5, 8, dtype=torch.float64), dim=-1)
    tau = 0.1

    def reference(rows, columns):  # -1/B sum_i log exp(s_ii/tau) / sum_j exp(s_ij/tau), explicit sums
        total = 0.0
        for i in rows:
            s = {j: float(q[i] @ p[j]) / tau for j in columns(i)}
            total += -(s[i] - math.log(sum(math.exp(v) for v in s.values())))
        return total / len(rows)

    assert math.isclose(info_nce(q, p, tau).item(), reference(range(5), lambda i: range(5)), rel_tol=1e-9)
    sources = torch.tensor([0, 1, 0, 2, 1])  # rows 0 and 2 (and 1 and 4) share a source passage
    expected = reference(range(5), lambda i: [j for j in range(5) if j == i or sources[j] != sources[i]])
    assert math.isclose(info_nce(q, p, tau, sources).item(), expected, rel_tol=1e-9)


def test_bi_encoder_pooling_ignores_padding_and_normalises():
    torch.manual_seed(0)
    for shared, proj in ((True, None), (False, 6)):
        net = BiEncoder(40, 12, shared=shared, proj_dim=proj, d_model=8, n_heads=2, n_layers=1, dropout=0.0).eval()
        ids = torch.tensor([[CLS, 9, 10, 11, SEP]])
        padded = torch.cat((ids, torch.full((1, 4), PAD)), 1)
        for encode in (net.encode_queries, net.encode_passages):
            e = encode(ids)
            assert e.shape == (1, proj or 8) and torch.allclose(e.norm(dim=-1), torch.ones(1))
            torch.testing.assert_close(encode(padded), e, atol=1e-5, rtol=1e-5)
        assert (net.passage_encoder is None) is shared
        assert not torch.allclose(net.encode_queries(ids), net.encode_passages(ids)) or shared


# ---------------------------------------------------------------------------- data
def test_inverse_cloze_data():
    dm = PydocRetrievalDataModule(keep_query_prob=0.0)
    dm.setup()
    corpus, index = dm.corpus, dm.index()
    assert index.shape == (len(corpus.passages), dm.passage_tokens + 2)
    queries, gold = dm.val_set.tensors
    assert set(gold.tolist()) <= set(corpus.split["val"].tolist())
    for q, g in zip(queries[:30], gold[:30]):
        query = [t for t in q.tolist() if t not in (PAD, CLS, SEP)]
        sentences = corpus.ids(int(g))
        stored = [t for t in index[g].tolist() if t not in (PAD, CLS, SEP)]
        # the query is (the first query_tokens of) one sentence, and its passage is stored without it
        assert any(s[: len(query)] == query and stored == [t for k, r in enumerate(sentences) if k != j for t in r]
                   for j, s in enumerate(sentences))
    q, ctx, src = dm.train_set.tensors
    assert set(src.tolist()) <= set(corpus.split["train"].tolist())
    q_len = (q != PAD).sum(1) - 2
    lengths = (ctx != PAD).sum(1) - 2 + q_len
    full = torch.tensor([sum(map(len, corpus.ids(int(i)))) for i in src])
    whole = q_len < dm.query_tokens  # a query cut to query_tokens is shorter than its sentence
    assert whole.float().mean() > 0.5 and torch.equal(lengths[whole], full[whole]) and (lengths <= full).all()


@pytest.mark.parametrize("answer", ["start", "continuation"])
def test_rag_spans(answer):
    dm = PydocRAGDataModule(answer=answer, query_tokens=6, answer_tokens=3)
    dm.setup()
    for split in (dm.val_set, next(iter(dm.train_dataloader()))):
        query, ans, gold, passage = split.tensors if hasattr(split, "tensors") else split
        assert torch.equal(passage, dm.index()[gold])
        for q, a, p in zip(query[:40].tolist(), ans[:40].tolist(), passage[:40].tolist()):
            text = p[1: p.index(SEP)]
            if answer == "start":
                assert text[:3] == a
                assert any(text[s: s + 6] == q for s in range(3, len(text) - 5))  # never overlapping it
            else:
                assert any(text[s: s + 9] == q + a for s in range(len(text) - 8))


# ---------------------------------------------------------------------------- RAG pieces
def test_rag_sequence_layout():
    context = torch.tensor([[[CLS, 11, SEP, PAD], [CLS, 12, 13, SEP]]])  # (B=1, k=2, W=4)
    query, answer = torch.tensor([[21, 22]]), torch.tensor([[31, 32, 33]])
    ids, segments, targets = rag_sequence(context, query, answer)
    seq = [CLS, CLS, 11, SEP, PAD, CLS, 12, 13, SEP, 21, 22, SEP, 31, 32, 33]
    assert ids[0].tolist() == seq[:-1]
    assert targets[0].tolist() == [IGNORE] * 11 + [31, 32, 33]  # the positions of SEP, 31, 32 predict the answer
    assert segments[0].tolist() == [0] * 9 + [1] * 5
    assert wrap_query(query).tolist() == [[CLS, 21, 22, SEP]]


def test_rag_contexts():
    model = RetrievalAugmentedGenerator(50, 6, "sig", 2, 2, top_k=3, d_model=8, n_heads=2, n_layers=1,
                                       retriever_d_model=8, retriever_n_heads=2)
    index = torch.arange(10)[:, None].repeat(1, 5) + 10  # row i is all (10 + i)
    top = torch.tensor([[4, 7, 1], [2, 3, 5]])
    gold = torch.tensor([7, 9])
    assert (model.contexts("none", top, gold, index) == PAD).all()
    torch.testing.assert_close(model.contexts("retrieved", top, gold, index), index[top])
    oracle = model.contexts("oracle", top, gold, index)[:, :, 0] - 10
    assert oracle.tolist() == [[7, 4, 1], [9, 2, 3]]  # gold first, then the best non-gold ones


# ---------------------------------------------------------------------------- learning checks
def test_retriever_learns_recall_far_above_chance(tmp_path):
    L.seed_everything(0, verbose=False)
    dm = PydocRetrievalDataModule(batch_size=64)
    model = Retriever(**dm.info(), d_model=32, n_heads=4, n_layers=1, dropout=0.0)
    model.optim_config = OptimConfig(name="adamw", lr=2e-3)
    _trainer(80, tmp_path, limit_val_batches=0).fit(model, datamodule=dm)
    m = _trainer(1, tmp_path).test(model, datamodule=dm, verbose=False)[0]
    n = len(dm.index())
    assert m["test/recall_at_1"] <= m["test/recall_at_5"] <= m["test/recall_at_10"] <= 1.0
    assert m["test/recall_at_5"] > 10 * 5 / n and m["test/recall_at_5"] > 0.05, m
    assert m["test/mrr"] > 10 * sum(1 / r for r in range(1, n + 1)) / n


@pytest.fixture(scope="module")
def rag_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rag")
    L.seed_everything(0, verbose=False)
    dm = PydocRAGDataModule(passage_tokens=24, query_tokens=6, answer_tokens=3, batch_size=32, queries_per_passage=2)
    model = RetrievalAugmentedGenerator(**dm.info(), top_k=1, d_model=32, n_heads=4, n_layers=2,
                                        retriever_d_model=32, index_refresh_steps=25)
    model.optim_config = OptimConfig(name="adamw", lr=3e-3)
    _trainer(350, tmp, limit_val_batches=0).fit(model, datamodule=dm)
    return dm, model, _trainer(1, tmp).test(model, datamodule=dm, verbose=False)[0]


@pytest.mark.slow
def test_rag_retrieval_beats_no_retrieval(rag_run):
    _, _, m = rag_run
    assert m["test/acc_oracle"] > m["test/acc_none"] + 0.15, m
    assert m["test/acc_retrieved"] > m["test/acc_none"] + 0.04, m
    assert m["test/loss_retrieved"] < m["test/loss_none"] and m["test/exact_oracle"] >= m["test/exact_none"]
    assert m["test/recall_at_1"] > 0.1  # the jointly trained retriever (random: 1/N ~ 0.0003)


def test_rag_with_a_frozen_retriever_checkpoint(tmp_path):
    dm = PydocRAGDataModule(passage_tokens=24, query_tokens=6, answer_tokens=3, batch_size=8, n_train=20)
    info = dm.info()
    retriever = Retriever(info["vocab_size"], info["max_len"], info["vocab_signature"], d_model=16, n_heads=2,
                          n_layers=1)
    trainer = _trainer(1, tmp_path, limit_val_batches=0)
    trainer.strategy.connect(retriever)
    path = tmp_path / "mlruns" / "retriever.ckpt"  # where litlab keeps checkpoints
    trainer.save_checkpoint(path)
    rag = RetrievalAugmentedGenerator(**info, retriever=str(path), retriever_d_model=16, retriever_n_heads=2,
                                      d_model=16, n_heads=2, n_layers=1)
    rag.optim_config = OptimConfig()
    before = {k: v.clone() for k, v in rag.retriever.state_dict().items()}
    _trainer(3, tmp_path, limit_val_batches=0).fit(rag, datamodule=dm)
    for k, v in retriever.net.state_dict().items():  # loaded, then left alone by training
        torch.testing.assert_close(rag.retriever.state_dict()[k], v)
        assert not rag.retriever.state_dict()[k].requires_grad
    assert any(not torch.equal(before[k], v) for k, v in retriever.net.state_dict().items())
    wrong = RetrievalAugmentedGenerator(**info, retriever=str(path), retriever_d_model=32, retriever_n_heads=2)
    with pytest.raises(ConfigError, match="retriever_d_model"):
        wrong.load_retriever()
