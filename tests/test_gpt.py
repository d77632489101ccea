"""GPT (chapter 5-6): byte-level data, the decoder-only net against torch's own transformer layer,
causality, weight tying, GPT-2 init, parameter count of the GPT-2 small config, sampling
(temperature, top-k, greedy), KV-cache generation, and a real learning check."""

from __future__ import annotations

import math
from collections import Counter

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import REPO
from litlab import registry, runner
from litlab.chapters.gpt.nets import GPT
from litlab.chapters.gpt.sampling import next_token_logits, sample_next
from litlab.config import OptimConfig
from litlab.data.text import ByteVocab, TextCharsDataModule

EXPERIMENTS = REPO / "experiments" / "transformer"


def tiny_gpt(positional: str = "learned", block_size: int = 16, **kw) -> GPT:
    torch.manual_seed(0)
    return GPT(11, block_size, n_layer=2, n_head=2, d_model=16, positional=positional, **kw).eval()


# ---------------------------------------------------------------- data
def test_byte_level_text_data():
    v = ByteVocab()
    ids = v.encode("aé€")
    assert len(v) == 256 and ids.tolist() == [97, 0xC3, 0xA9, 0xE2, 0x82, 0xAC]
    assert v.decode(ids) == "aé€" and v.decode([0xE2, 0x82]) == "\ufffd"  # a cut character decodes as U+FFFD
    dm = TextCharsDataModule(level="byte", max_chars=5000, seq_len=32, batch_size=4)
    assert dm.info() == {"vocab_size": 256}
    dm.setup()
    x, y = dm.train_set.tensors()
    assert torch.equal(x[:, 1:], y[:, :-1]) and dm.vocab.decode(x[0]) == dm.texts["train"][:32]


# ---------------------------------------------------------------- the net
def test_gpt_matches_torch_transformer_encoder_layers_with_a_causal_mask():
    net = tiny_gpt("learned")
    layers = []
    for block in net.blocks:  # the same weights in torch's own pre-LN layer
        ref = nn.TransformerEncoderLayer(16, 2, 64, dropout=0.0, activation="gelu", batch_first=True,
                                         norm_first=True).eval()
        a = block.self_attn
        with torch.no_grad():
            ref.self_attn.in_proj_weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
            ref.self_attn.in_proj_bias.copy_(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
            ref.self_attn.out_proj.load_state_dict(a.out_proj.state_dict())
            ref.linear1.load_state_dict(block.ffn.linear1.state_dict())
            ref.linear2.load_state_dict(block.ffn.linear2.state_dict())
            ref.norm1.load_state_dict(block.norm1.state_dict())
            ref.norm2.load_state_dict(block.norm2.state_dict())
        layers.append(ref)
    idx = torch.randint(0, 11, (3, 16))
    mask = nn.Transformer.generate_square_subsequent_mask(16)
    h = net.tok_emb.weight[idx] + net.pos_emb.embedding.weight[:16]
    for ref in layers:
        h = ref(h, src_mask=mask, is_causal=True)
    expected = F.layer_norm(h, (16,), net.ln_f.weight, net.ln_f.bias) @ net.tok_emb.weight.T  # tied head
    torch.testing.assert_close(net(idx), expected, rtol=1e-4, atol=1e-5)
    nll = F.cross_entropy(expected[:, :-1].flatten(0, 1), idx[:, 1:].flatten(), reduction="none").view(3, 15)
    torch.testing.assert_close(net.token_logprobs(idx), -nll, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("positional", ["learned", "rope"])
def test_gpt_is_causal(positional):
    net = tiny_gpt(positional)
    idx = torch.randint(0, 11, (2, 12))
    changed = idx.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 11
    a, b = net(idx), net(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7])  # the future does not leak into positions < 7
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_weight_tying_and_gpt2_init():
    torch.manual_seed(0)
    net = GPT(300, 64, n_layer=8, n_head=4, d_model=256)
    assert net.lm_head.weight is net.tok_emb.weight
    assert sum(p.numel() for p in net.parameters()) == net.num_params()  # counted once
    assert net.num_params() == net.num_params(non_embedding=True) + 300 * 256 + 64 * 256
    untied = GPT(300, 64, n_layer=8, n_head=4, d_model=256, tie_weights=False)
    assert untied.lm_head.weight is not untied.tok_emb.weight
    assert untied.num_params() == net.num_params() + 300 * 256
    residual_std = 0.02 / math.sqrt(2 * 8)
    for name, p in net.named_parameters():
        if name.endswith(("out_proj.weight", "linear2.weight")):
            assert p.std().item() == pytest.approx(residual_std, rel=0.05), name
        elif name.endswith(("q_proj.weight", "linear1.weight", "tok_emb.weight")):
            assert p.std().item() == pytest.approx(0.02, rel=0.05), name
        elif name.endswith("bias"):
            assert (p == 0).all(), name


def test_gpt2_small_config_has_the_gpt2_parameter_count():
    cfg = runner.load_config(EXPERIMENTS / "gpt2_small.yaml")
    args = {k: v for k, v in cfg.model.items() if k != "name"}
    assert (args["vocab_size"], args["n_layer"], args["n_head"], args["d_model"], args["block_size"]) == \
        (256, 12, 12, 768, 1024)
    with torch.device("meta"):  # no memory, no init cost
        module = registry.get_model(cfg.model["name"]).cls(**args)
        gpt2_vocab = GPT(50257, 1024, n_layer=12, n_head=12, d_model=768)
    # per block: qkv 3 (768^2 + 768) + out 768^2 + 768 + FFN 2 * 768 * 3072 + 3072 + 768 + 2 LN 2 * 768
    per_block = 3 * (768 * 768 + 768) + 768 * 768 + 768 + 2 * 768 * 3072 + 3072 + 768 + 4 * 768
    non_embedding = 12 * per_block + 2 * 768  # + final LayerNorm
    assert non_embedding == 85_056_000 == module.net.num_params(non_embedding=True)
    assert module.net.num_params() == non_embedding + 256 * 768 + 1024 * 768 == 86_039_040
    assert gpt2_vocab.num_params() == 124_439_808  # GPT-2 small with its 50257 BPE tokens


# ---------------------------------------------------------------- sampling
def test_temperature_and_top_k_distribution_matches_the_formula():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]])
    p = next_token_logits(logits, temperature=0.5, top_k=3).softmax(-1)[0]
    z = torch.exp(torch.tensor([2.0, 1.0, 0.5]) / 0.5)
    torch.testing.assert_close(p, torch.cat([z / z.sum(), torch.zeros(2)]))
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits.expand(20_000, 5), 0.5, 3, generator=g)[:, 0]
    freq = torch.bincount(draws, minlength=5).float() / 20_000
    assert freq[3:].sum() == 0 and torch.allclose(freq, p, atol=0.015)
    assert sample_next(logits, 0.0).item() == 0  # temperature 0: greedy
    uniformish = next_token_logits(logits, temperature=100.0).softmax(-1)
    assert uniformish.max() - uniformish.min() < 0.01


@pytest.mark.parametrize("positional,backend", [("learned", "sdpa"), ("rope", "sdpa"), ("rope", "math")])
def test_kv_cache_decoding_equals_the_full_forward(positional, backend):
    net = tiny_gpt(positional, backend=backend)
    idx = torch.randint(0, 11, (2, 10))
    caches = net.new_caches()
    steps = [net(idx[:, :4], caches=caches)] + [net(idx[:, t:t + 1], caches=caches) for t in range(4, 10)]
    assert caches[0].length == 10
    torch.testing.assert_close(torch.cat(steps, dim=1), net(idx), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("positional,temperature,top_k", [("learned", 1.0, None), ("rope", 0.8, 5),
                                                          ("learned", 0.0, None)])
def test_generation_is_identical_with_and_without_the_cache(positional, temperature, top_k):
    net = tiny_gpt(positional, block_size=16)
    prompt = torch.randint(0, 11, (3, 5))
    outs = [net.generate(prompt, 30, temperature, top_k, generator=torch.Generator().manual_seed(1),
                         use_cache=use_cache) for use_cache in (True, False)]
    assert outs[0].shape == (3, 35)  # past block_size 16: the context is cropped, the cache rebuilt
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0][:, :5], prompt)
    if temperature == 0:  # greedy = argmax of the full forward over the cropped context
        seq = prompt
        for _ in range(30):
            seq = torch.cat([seq, net(seq[:, -16:])[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert torch.equal(seq, outs[0])
    with pytest.raises(ValueError, match="block_size"):
        net(torch.zeros(1, 17, dtype=torch.long))


# ---------------------------------------------------------------- learning and logging
class ValBpc(L.Callback):
    def __init__(self):
        self.values = []

    def on_validation_epoch_end(self, trainer, pl_module):
        self.values.append(float(trainer.callback_metrics["val/bpc"]))


def test_char_gpt_beats_the_unigram_baseline_and_val_loss_falls():
    dm = TextCharsDataModule(max_chars=60_000, seq_len=32, batch_size=32)
    vocab_size = dm.info()["vocab_size"]
    dm.setup()
    counts = Counter(dm.texts["train"])
    n = sum(counts.values())
    unigram_bits = -sum(c / n * math.log2(c / n) for c in counts.values())  # H(train characters)
    L.seed_everything(0, verbose=False)
    model = registry.get_model("gpt").cls(vocab_size=vocab_size, block_size=32, n_layer=2, n_head=4, d_model=64,
                                          positional="rope", sample_length=0)
    model.optim_config = OptimConfig(name="adamw", lr=3e-3, betas=(0.9, 0.95))
    bpc = ValBpc()
    trainer = L.Trainer(max_epochs=5, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=[bpc],
                        num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    assert 4.3 < unigram_bits < 5.0
    assert all(b < a for a, b in zip(bpc.values, bpc.values[1:])), bpc.values  # falls every epoch
    assert bpc.values[-1] < unigram_bits - 1.0, (bpc.values, unigram_bits)
    perplexity = float(trainer.callback_metrics["val/perplexity"])
    assert perplexity == pytest.approx(2 ** bpc.values[-1], rel=1e-3)  # equal batches: exp(mean) = 2^bpc


def test_gpt_experiment_logs_bpc_perplexity_and_a_sample_that_reloads(tracking_uri):
    from mlflow import MlflowClient

    from litlab.api import load

    result = runner.run(EXPERIMENTS / "gpt_char_pydoc.yaml",
                        ["data.max_chars=20000", "data.seq_len=16", "model.block_size=16", "model.n_layer=1",
                         "model.d_model=16", "model.n_head=2", "model.sample_length=30", "trainer.max_epochs=1",
                         "trainer.limit_train_batches=5", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2",
                         "tracking.system_metrics=false"], tracking_uri=tracking_uri)
    assert result.status == "FINISHED"
    assert {"test/loss", "test/bpc", "test/perplexity"} <= set(result.metrics)
    assert result.metrics["test/bpc"] == pytest.approx(result.metrics["test/loss"] / math.log(2), rel=1e-5)
    c = MlflowClient(tracking_uri)
    text = c.download_artifacts(result.run_id, "samples/generated.txt")
    with open(text, encoding="utf-8") as f:
        body = f.read().split("\n\n", 1)[1]
    assert body.startswith("The ") and len(body.rstrip("\n")) == 4 + 30
    assert "plots/attention.png" in [a.path for a in c.list_artifacts(result.run_id, "plots")]
    module = load(result.run_id, tracking_uri=tracking_uri)  # the vocabulary travels in the checkpoint
    a = module.generate_text("The ", length=20, seed=3)
    assert a == module.generate_text("The ", length=20, seed=3, use_cache=False) and len(a) == 24


def test_attention_figure_weights_are_causal_rows_of_the_softmax():
    """The weights plotted are each query's softmax over the keys up to it, from the same model."""
    from litlab.chapters.gpt.figures import attention_weights, self_attention_figure, shown_layers
    from litlab.chapters.gpt.nets import GPT

    torch.manual_seed(0)
    net = GPT(11, 16, 5, 2, 16, 32, 0.1, "learned", "sdpa", None, True).train()
    ids = torch.randint(0, 11, (1, 9))
    layers = shown_layers(5)
    assert layers == [0, 2, 4] and shown_layers(1) == [0]
    w = attention_weights(net, ids, layers)
    assert net.training and all(b.attn_weights is None and not b.keep_weights for b in net.blocks)  # restored
    for layer in layers:
        assert w[layer].shape == (2, 9, 9)
        assert torch.allclose(w[layer].sum(-1), torch.ones(2, 9), atol=1e-5)
        assert torch.all(w[layer].triu(1) == 0)  # no query looks ahead
    fig = self_attention_figure(w, list("abcdefghi"), "t")
    assert len(fig.axes) == 3 * 2 + 1  # 3 layers x 2 heads + the colour bar
    panels = fig.axes[:6]  # row-major: (layer, head); the tokens label only the outer panels
    tokens = list("abcdefghi")
    for i, ax in enumerate(panels):
        assert [t.get_text() for t in ax.get_yticklabels()] == (tokens if i % 2 == 0 else [])
        assert [t.get_text() for t in ax.get_xticklabels()] == (tokens if i >= 4 else [])
        assert ax.get_xlim() == (-0.5, 8.5) and ax.get_ylim() == (8.5, -0.5)  # the whole 9 x 9 image
