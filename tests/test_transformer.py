"""Transformer layers against torch's own modules and closed forms, and the registered
`transformer_seq2seq` translation model (KV-cache decoding, learning check)."""

import math

import pytest
import torch
from torch import nn

from litlab.chapters.transformer.layers import KVCache, MultiHeadAttention, TransformerBlock
from litlab.chapters.transformer.positional import (LearnedPositionalEmbedding, RotaryEmbedding,
                                                    SinusoidalPositionalEncoding)

D, H = 16, 4


def copy_mha(ours: MultiHeadAttention, theirs: nn.MultiheadAttention) -> None:
    with torch.no_grad():
        theirs.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight]))
        theirs.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
        theirs.out_proj.weight.copy_(ours.out_proj.weight)
        theirs.out_proj.bias.copy_(ours.out_proj.bias)


def copy_ffn_norms(block: TransformerBlock, layer: nn.Module, norms: dict) -> None:
    with torch.no_grad():
        for name in ("linear1", "linear2"):
            getattr(layer, name).load_state_dict(getattr(block.ffn, name).state_dict())
        for theirs, ours in norms.items():
            getattr(layer, theirs).load_state_dict(getattr(block, ours).state_dict())


def randomise(module: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():  # LayerNorm gains around 1, everything else around 0
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if "norm" in name and "weight" in name else 0.0))


# ------------------------------------------------------------------ multi-head attention
@pytest.mark.parametrize("cross", [False, True])
def test_mha_math_equals_torch_multihead_attention(cross):
    torch.manual_seed(0)
    ours = MultiHeadAttention(D, H, backend="math")
    theirs = nn.MultiheadAttention(D, H, batch_first=True)
    copy_mha(ours, theirs)
    x = torch.randn(3, 5, D)
    ctx = torch.randn(3, 7, D) if cross else x
    pad = torch.zeros(3, ctx.shape[1], dtype=torch.bool)
    pad[1, -2:] = True
    out, w = ours(x, ctx if cross else None, key_padding_mask=pad, return_weights=True)
    ref, ref_w = theirs(x, ctx, ctx, key_padding_mask=pad, average_attn_weights=False)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(w, ref_w, atol=1e-6, rtol=0)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    if not cross:
        torch.testing.assert_close(ours(x, causal=True), theirs(x, x, x, attn_mask=causal)[0], atol=1e-5, rtol=0)
    sdpa = MultiHeadAttention(D, H, backend="sdpa")
    sdpa.load_state_dict(ours.state_dict())
    torch.testing.assert_close(sdpa(x, ctx if cross else None, key_padding_mask=pad), ref, atol=1e-5, rtol=0)


# ------------------------------------------------------------------ blocks
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_encoder_block_equals_torch_encoder_layer(norm_first, activation):
    torch.manual_seed(1)
    block = TransformerBlock(D, H, 32, norm_first=norm_first, backend="math", activation=activation).eval()
    randomise(block, 3)
    layer = nn.TransformerEncoderLayer(D, H, 32, dropout=0.0, activation=activation, batch_first=True,
                                       norm_first=norm_first).eval()
    copy_mha(block.self_attn, layer.self_attn)
    copy_ffn_norms(block, layer, {"norm1": "norm1", "norm2": "norm2"})
    x = torch.randn(2, 6, D)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[0, 4:] = True
    ours = block(x, key_padding_mask=pad)
    ref = layer(x, src_key_padding_mask=pad)
    keep = ~pad  # torch's fast path may zero padded rows; compare real positions
    torch.testing.assert_close(ours[keep], ref[keep], atol=1e-5, rtol=0)
    torch.testing.assert_close(block(x), layer(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_block_equals_torch_decoder_layer(norm_first):
    torch.manual_seed(2)
    block = TransformerBlock(D, H, 32, norm_first=norm_first, causal=True, cross_attention=True, backend="sdpa",
                             activation="relu").eval()
    randomise(block, 4)
    layer = nn.TransformerDecoderLayer(D, H, 32, dropout=0.0, batch_first=True, norm_first=norm_first).eval()
    copy_mha(block.self_attn, layer.self_attn)
    copy_mha(block.cross_attn, layer.multihead_attn)
    copy_ffn_norms(block, layer, {"norm1": "norm1", "norm2": "norm_cross", "norm3": "norm2"})
    x, memory = torch.randn(2, 6, D), torch.randn(2, 9, D)
    mem_pad = torch.zeros(2, 9, dtype=torch.bool)
    mem_pad[1, 5:] = True
    ref = layer(x, memory, tgt_mask=nn.Transformer.generate_square_subsequent_mask(6), tgt_is_causal=True,
                memory_key_padding_mask=mem_pad)
    torch.testing.assert_close(block(x, memory, context_padding_mask=mem_pad), ref, atol=1e-5, rtol=0)


def test_post_ln_is_layernorm_of_residual():
    """The course's post-LN block: x = LN(x + Sublayer(x)) -- outputs are normalised per position."""
    block = TransformerBlock(D, H, 32, norm_first=False).eval()
    out = block(torch.randn(2, 5, D) * 10)
    torch.testing.assert_close(out.mean(-1), torch.zeros(2, 5), atol=1e-5, rtol=0)
    pre = TransformerBlock(D, H, 32, norm_first=True).eval()
    assert pre(torch.randn(2, 5, D) * 10).std() > 3  # pre-LN keeps the residual stream's scale


def test_keep_weights_and_ffn_hook():
    class Doubler(nn.Module):
        def forward(self, x):
            self.aux_loss = x.pow(2).mean()
            return 2 * x

    ffn = Doubler()
    block = TransformerBlock(D, H, 32, cross_attention=True, causal=True, ffn=ffn).eval()
    block.keep_weights = True
    block(torch.randn(2, 5, D), torch.randn(2, 3, D))
    assert block.attn_weights.shape == (2, H, 5, 5) and block.cross_attn_weights.shape == (2, H, 5, 3)
    assert block.attn_weights.triu(1).abs().max() == 0
    assert block.ffn is ffn and ffn.aux_loss.ndim == 0


# ------------------------------------------------------------------ positional encodings
def test_sinusoidal_matches_course_formula_by_hand():
    pe = SinusoidalPositionalEncoding(4, max_len=8)
    table = pe(torch.zeros(1, 8, 4))[0]
    # PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)), d = 4
    torch.testing.assert_close(table[0], torch.tensor([0.0, 1.0, 0.0, 1.0]))
    torch.testing.assert_close(table[1], torch.tensor([0.8414710, 0.5403023, 0.0099998, 0.9999500]))
    torch.testing.assert_close(table[2], torch.tensor([0.9092974, -0.4161468, 0.0199987, 0.9998000]))
    torch.testing.assert_close(table[5, 2], torch.tensor(math.sin(5 / 100)))
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(pe(x, offset=4), x + table[4:7])  # offset continues the positions
    with pytest.raises(ValueError):
        pe(torch.zeros(1, 3, 4), offset=6)


def test_learned_positional_embedding():
    pe = LearnedPositionalEmbedding(10, 4)
    x = torch.zeros(2, 3, 4)
    torch.testing.assert_close(pe(x, offset=2)[0], pe.embedding.weight[2:5])
    assert sum(p.numel() for p in pe.parameters()) == 40


def test_rope_depends_only_on_relative_offset():
    rope = RotaryEmbedding(8, max_len=64)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8, generator=g), torch.randn(1, 1, 1, 8, generator=g)

    def score(m, n):
        return (rope.rotate(q, m) * rope.rotate(k, n)).sum().item()

    for m, n in [(3, 1), (10, 4), (0, 7)]:
        for shift in (1, 5, 20):
            assert score(m + shift, n + shift) == pytest.approx(score(m, n), abs=1e-5)
    assert score(5, 0) != pytest.approx(score(6, 0), abs=1e-3)
    torch.testing.assert_close(rope.rotate(q, 9).norm(), q.norm())  # a rotation
    # head_dim 2: feature pair rotated by angle pos * 1
    r2 = RotaryEmbedding(2, max_len=8)
    got = r2.rotate(torch.tensor([1.0, 0.0]).view(1, 1, 1, 2), offset=3).flatten()
    torch.testing.assert_close(got, torch.tensor([math.cos(3.0), math.sin(3.0)]))


# ------------------------------------------------------------------ KV cache
@pytest.mark.parametrize("backend,options", [
    ("math", None), ("sdpa", None), ("performer", {"num_features": 32, "chunk_size": 4, "seed": 0}),
    ("sliding_window", {"window": 3, "global_tokens": 1}),
    ("bigbird", {"block_size": 2, "num_global_blocks": 1, "num_random_blocks": 1})])
def test_kv_cache_attention_equals_full_causal(backend, options):
    torch.manual_seed(3)
    mha = MultiHeadAttention(D, H, backend=backend, backend_options=options, rope=RotaryEmbedding(D // H, 64)).eval()
    x = torch.randn(2, 9, D)
    full = mha(x, causal=True)
    cache = KVCache()
    steps = [mha(x[:, :4], causal=True, cache=cache)]  # a prompt, then one token at a time
    steps += [mha(x[:, t : t + 1], causal=True, cache=cache) for t in range(4, 9)]
    assert cache.length == 9
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_stack_with_cache_equals_full(norm_first):
    torch.manual_seed(4)
    blocks = nn.ModuleList(TransformerBlock(D, H, 32, norm_first=norm_first, causal=True, cross_attention=True)
                           for _ in range(2)).eval()
    x, memory = torch.randn(2, 6, D), torch.randn(2, 5, D)
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])

    def run(h, caches=None):
        for i, blk in enumerate(blocks):
            h = blk(h, memory, context_padding_mask=pad, cache=None if caches is None else caches[i])
        return h

    caches = [KVCache() for _ in blocks]
    incremental = torch.cat([run(x[:, t : t + 1], caches) for t in range(6)], 1)
    torch.testing.assert_close(incremental, run(x), atol=1e-5, rtol=0)
    assert caches[0].cross.length == 5  # the memory was projected once


# ------------------------------------------------------------------ translation model
def _data(**kw):
    from litlab.data.seq2seq_tasks import Seq2SeqTaskDataModule

    dm = Seq2SeqTaskDataModule(**{"task": "reverse", "min_len": 3, "max_len": 6, "n_train": 1000, "n_val": 100,
                                  "n_test": 10, "batch_size": 32, **kw})
    dm.setup()
    return dm


def _model(dm, **kw):
    from litlab.chapters.transformer.translation import TransformerSeq2SeqModule

    args = {"d_model": 32, "n_heads": 2, "n_layers": 1, "d_ff": 64, "dropout": 0.0, **kw}
    return TransformerSeq2SeqModule(**dm.info(), **args)


@pytest.mark.parametrize("positional,backend,options,norm_first", [
    ("sinusoidal", "sdpa", None, False), ("learned", "math", None, True), ("rope", "performer", {"num_features": 16},
                                                                         True),
    ("rope", "sliding_window", {"window": 2, "global_tokens": 1}, False),
    ("sinusoidal", "bigbird", {"block_size": 2, "num_global_blocks": 1, "num_random_blocks": 1}, True)])
def test_greedy_with_kv_cache_equals_without(positional, backend, options, norm_first):
    dm = _data()
    torch.manual_seed(0)
    model = _model(dm, positional=positional, backend=backend, backend_options=options, norm_first=norm_first,
                   n_layers=2).eval()
    src, src_len, tgt_in, _ = dm.val_set.__getitems__(list(range(16)))
    cached, cross = model.greedy(src, src_len, keep_weights=True)
    uncached, _ = model.greedy(src, src_len, use_cache=False)
    assert torch.equal(cached, uncached)
    assert len(cross) == 2 and cross[0].shape == (16, 2, cached.shape[1], src.shape[1])
    torch.testing.assert_close(cross[0].sum(-1), torch.ones(16, 2, cached.shape[1]))
    short = int(src_len.argmin())
    assert src_len[short] < src.shape[1] and cross[0][short, ..., src_len[short]:].abs().max() == 0  # no padding
    # teacher forcing sees the same positions as decoding: logits of the greedy prefix agree
    prefix = torch.cat((tgt_in[:, :1], cached[:, :-1]), 1)
    assert torch.equal(model(src, src_len, prefix).argmax(-1)[:, :3], cached[:, :3])


def test_backend_options_are_checked():
    from litlab.errors import ConfigError

    dm = _data(n_train=20, n_val=5)
    with pytest.raises(ConfigError, match="backend_options"):
        _model(dm, backend="sliding_window", backend_options={"block_size": 4})
    with pytest.raises(ConfigError, match="backend_options"):
        _model(dm, backend="sdpa", backend_options={"window": 4})
    with pytest.raises(ConfigError, match="n_heads"):
        _model(dm, n_heads=3)


def test_transformer_seq2seq_learns_to_reverse():
    """Seeded, tiny, a few seconds: greedy decoding far above chance (a token: 1/10)."""
    from litlab.chapters.seq2seq.module import exact_and_token_hits

    dm = _data()
    torch.manual_seed(0)
    model = _model(dm)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    src, src_len, _, tgt_out = dm.val_set.__getitems__(list(range(100)))
    model.eval()
    _, before = exact_and_token_hits(model.greedy(src, src_len)[0], tgt_out)
    model.train()
    for _ in range(200):
        loss = model._loss(dm.train_set.__getitems__(torch.randint(0, 1000, (32,), generator=g).tolist()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    exact, tokens = exact_and_token_hits(model.greedy(src, src_len)[0], tgt_out)
    assert before.float().mean() < 0.25
    assert tokens.float().mean() > 0.6 and exact.float().mean() > 0.25, (tokens.float().mean(), exact.float().mean())


def test_cross_attention_plot():
    dm = _data(n_train=20, n_val=5)
    model = _model(dm, n_layers=2)
    src, src_len, _, _ = dm.val_set.__getitems__([0, 1])
    fig = model.plot_cross_attention(src, src_len, dm.vocab)
    assert len(fig.axes) == 2 * 2 + 1  # layers x heads + colour bar
    assert model.training  # restored
