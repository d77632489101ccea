"""The attention backends (litlab.chapters.transformer.attention/performer/sparse) against exact
softmax attention: math == torch SDPA, sparse kernels == math under their dense masks, Performer
converges to softmax attention as features grow, and no causal backend looks ahead."""

import pytest
import torch

from litlab.chapters.transformer.attention import BACKENDS, attend, causal_mask
from litlab.chapters.transformer.performer import PerformerFeatures, orthogonal_gaussian
from litlab.chapters.transformer.sparse import bigbird_mask, sliding_window_mask


def qkv(b=2, h=3, tq=13, tk=None, d=8, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    tk = tq if tk is None else tk
    return (torch.randn(b, h, tq, d, generator=g) * scale, torch.randn(b, h, tk, d, generator=g) * scale,
            torch.randn(b, h, tk, d, generator=g))


def reference(q, k, v, mask=None):
    """softmax(QK^T/sqrt(d))V written out independently, in float64; fully masked rows -> 0."""
    q, k, v = q.double(), k.double(), v.double()
    s = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    w = torch.nan_to_num(torch.softmax(s, -1), nan=0.0)
    return (w @ v).float()


# ------------------------------------------------------------------ math and sdpa
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_math_equals_sdpa_and_reference(causal, masked):
    q, k, v = qkv(tq=11)
    mask = None
    if masked:  # key padding on sample 1 plus an arbitrary per-query pattern
        mask = torch.ones(2, 1, 11, 11, dtype=torch.bool)
        mask[1, :, :, 8:] = False
        mask[0, 0, 4, 2] = False
    m = attend(q, k, v, backend="math", causal=causal, attn_mask=mask)
    s = attend(q, k, v, backend="sdpa", causal=causal, attn_mask=mask)
    torch.testing.assert_close(m, s, atol=1e-5, rtol=0)
    dense = causal_mask(11, 11) if causal else None
    full = mask if dense is None else (dense if mask is None else mask & dense)
    torch.testing.assert_close(m, reference(q, k, v, full), atol=1e-5, rtol=0)


def test_kv_cache_alignment_and_fully_masked_rows():
    q, k, v = qkv(tq=3, tk=10)  # 3 queries at absolute positions 7, 8, 9
    assert causal_mask(3, 10)[0].tolist() == [True] * 8 + [False] * 2
    for backend in ("math", "sdpa"):
        torch.testing.assert_close(attend(q, k, v, backend=backend, causal=True),
                                   reference(q, k, v, causal_mask(3, 10)), atol=1e-5, rtol=0)
    mask = torch.ones(1, 1, 3, 10, dtype=torch.bool)
    mask[..., 1, :] = False  # query 1 may attend nothing -> zeros, not nan
    for backend in ("math", "sdpa"):
        out = attend(q, k, v, backend=backend, attn_mask=mask)
        assert torch.isfinite(out).all() and out[:, :, 1].abs().max() == 0


def test_return_weights_only_math():
    q, k, v = qkv()
    out, w = attend(q, k, v, backend="math", causal=True, return_weights=True)
    assert w.shape == (2, 3, 13, 13)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 13))
    assert w.triu(1).abs().max() == 0
    torch.testing.assert_close(out, w @ v)
    with pytest.raises(ValueError):
        attend(q, k, v, backend="sdpa", return_weights=True)
    with pytest.raises(ValueError):
        attend(q, k, v, backend="nope")


# ------------------------------------------------------------------ sparse patterns
@pytest.mark.parametrize("n,window,global_tokens,causal", [
    (37, 5, 0, False), (37, 5, 3, False), (37, 4, [6, 20], True), (16, 4, 2, True), (10, 16, 1, False)])
def test_sliding_window_equals_math_under_dense_mask(n, window, global_tokens, causal):
    q, k, v = qkv(tq=n, seed=n)
    keys = torch.rand(2, 1, 1, n, generator=torch.Generator().manual_seed(1)) > 0.2
    keys[..., 0] = True
    pattern = sliding_window_mask(n, n, window, global_tokens, causal)
    assert pattern.float().mean() < 1 or n <= window  # really sparse
    for key_mask in (None, keys):
        dense = pattern if key_mask is None else pattern & key_mask
        out = attend(q, k, v, backend="sliding_window", causal=causal, attn_mask=key_mask, window=window,
                     global_tokens=global_tokens)
        torch.testing.assert_close(out, attend(q, k, v, backend="math", attn_mask=dense), atol=1e-5, rtol=0)
        torch.testing.assert_close(out, reference(q, k, v, dense), atol=1e-5, rtol=0)


def test_sliding_window_pattern_by_hand():
    m = sliding_window_mask(6, 6, window=1, global_tokens=[0])
    expected = torch.tensor([[1, 1, 1, 1, 1, 1],
                             [1, 1, 1, 0, 0, 0],
                             [1, 1, 1, 1, 0, 0],
                             [1, 0, 1, 1, 1, 0],
                             [1, 0, 0, 1, 1, 1],
                             [1, 0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(m, expected)


@pytest.mark.parametrize("n,block,n_global,n_random,causal", [
    (37, 4, 1, 2, False), (37, 4, 1, 2, True), (40, 4, 0, 3, False), (64, 8, 2, 1, True), (7, 16, 1, 3, False)])
def test_bigbird_equals_math_under_dense_mask(n, block, n_global, n_random, causal):
    q, k, v = qkv(tq=n, seed=n + 1)
    keys = torch.rand(2, 1, 1, n, generator=torch.Generator().manual_seed(2)) > 0.2
    opts = dict(block_size=block, num_global_blocks=n_global, num_random_blocks=n_random, seed=3)
    pattern = bigbird_mask(n, n, causal=causal, **opts)
    for key_mask in (None, keys):
        dense = pattern if key_mask is None else pattern & key_mask
        out = attend(q, k, v, backend="bigbird", causal=causal, attn_mask=key_mask, **opts)
        torch.testing.assert_close(out, reference(q, k, v, dense), atol=1e-5, rtol=0)


def test_bigbird_pattern_structure():
    opts = dict(block_size=4, num_global_blocks=1, num_random_blocks=2)
    m = bigbird_mask(64, 64, seed=0, **opts)
    blocks = m[::4, ::4]  # (16, 16) block pattern
    assert blocks[0].all() and blocks[:, 0].all()  # global block row and column
    for c in range(1, 16):  # local band + exactly 2 random blocks outside it and the global block
        band = {j for j in (c - 1, c, c + 1) if 0 <= j < 16} | {0}
        others = set(blocks[c].nonzero().flatten().tolist()) - band
        assert band <= set(blocks[c].nonzero().flatten().tolist()) and len(others) == 2
    assert not torch.equal(m, bigbird_mask(64, 64, seed=1, **opts))  # random blocks depend on the seed
    assert m.float().mean() < 0.5


# ------------------------------------------------------------------ performer
def test_orthogonal_features():
    w = orthogonal_gaussian(20, 8, torch.Generator().manual_seed(0))
    unit = w / w.norm(dim=1, keepdim=True)
    gram = unit[:8] @ unit[:8].T  # one block of d rows: orthonormal directions
    torch.testing.assert_close(gram, torch.eye(8), atol=1e-5, rtol=0)
    assert w.shape == (20, 8) and not torch.allclose(w.norm(dim=1), w.norm(dim=1)[0].expand(20))


@pytest.mark.parametrize("causal", [False, True])
def test_performer_error_shrinks_with_features(causal):
    q, k, v = qkv(b=1, h=2, tq=48, d=16, seed=5, scale=0.5)
    exact = reference(q, k, v, causal_mask(48, 48) if causal else None)
    errors = []
    for m in (16, 64, 256, 1024):
        e = [(attend(q, k, v, backend="performer", causal=causal, num_features=m, seed=s) - exact).pow(2).mean()
             for s in range(6)]
        errors.append(torch.stack(e).mean().sqrt().item())
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.4 * errors[0], errors


def test_performer_chunking_and_key_mask():
    q, k, v = qkv(tq=30, d=8, seed=2, scale=0.5)
    proj = orthogonal_gaussian(32, 8, torch.Generator().manual_seed(0))
    whole = attend(q, k, v, backend="performer", causal=True, projection=proj, chunk_size=64)
    for chunk in (1, 7, 16):
        torch.testing.assert_close(attend(q, k, v, backend="performer", causal=True, projection=proj,
                                          chunk_size=chunk), whole, atol=1e-5, rtol=1e-5)
    keep = torch.ones(1, 1, 1, 30, dtype=torch.bool)
    keep[..., 20:] = False  # masking keys == removing them
    masked = attend(q, k, v, backend="performer", projection=proj, attn_mask=keep)
    dropped = attend(q, k[..., :20, :], v[..., :20, :], backend="performer", projection=proj)
    torch.testing.assert_close(masked, dropped, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):  # a per-query mask would need the n x n matrix
        attend(q, k, v, backend="performer", attn_mask=torch.ones(1, 1, 30, 30, dtype=torch.bool))


def test_performer_features_redraw():
    f = PerformerFeatures(8, num_features=16, redraw_interval=2, seed=0)
    p0 = f.projection.clone()
    f.attend_options(), f.attend_options()
    assert torch.equal(f.projection, p0)
    f.attend_options()  # third training call: redrawn
    assert not torch.equal(f.projection, p0)
    f.eval()
    p1 = f.projection.clone()
    for _ in range(5):
        f.attend_options()
    assert torch.equal(f.projection, p1)
    fixed = PerformerFeatures(8, num_features=16, redraw_interval=0, seed=0)
    for _ in range(5):
        fixed.attend_options()
    assert torch.equal(fixed.projection, p0)


# ------------------------------------------------------------------ causality of every backend
OPTIONS = {"performer": {"num_features": 32, "chunk_size": 5}, "sliding_window": {"window": 3, "global_tokens": 2},
           "bigbird": {"block_size": 3, "num_global_blocks": 1, "num_random_blocks": 1}}


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_backends_never_look_ahead(backend):
    q, k, v = qkv(tq=20, d=8, seed=7)
    out = attend(q, k, v, backend=backend, causal=True, **OPTIONS.get(backend, {}))
    for t in (4, 13, 19):  # change token t's query/key/value: outputs before t unchanged, exactly
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        q2[..., t, :] += 3.0
        k2[..., t, :] -= 2.0
        v2[..., t, :] *= 5.0
        out2 = attend(q2, k2, v2, backend=backend, causal=True, **OPTIONS.get(backend, {}))
        assert torch.equal(out[..., :t, :], out2[..., :t, :]), backend
        assert not torch.equal(out[..., t:, :], out2[..., t:, :])


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_matches_exact_attention_shape_and_decoding(backend):
    """Decoding with a KV cache (Tq < Tk) equals the last rows of full causal attention."""
    q, k, v = qkv(tq=16, d=8, seed=8, scale=0.5)
    opts = OPTIONS.get(backend, {})
    full = attend(q, k, v, backend=backend, causal=True, **opts)
    last = attend(q[..., 12:, :], k, v, backend=backend, causal=True, **opts)
    torch.testing.assert_close(last, full[..., 12:, :], atol=1e-5, rtol=1e-5)
