"""Chapter 11, diffusion: schedules against their formulas, the forward process's moments, the
posterior against Bayes' rule, DDPM/DDIM with an exact noise oracle, DDIM determinism, classifier-free
guidance's formula, EMA (formula and checkpoint), annealed Langevin with an exact Gaussian score, and
real learning checks (2-D mixtures: DDPM, DDIM, guidance, NCSN; digits: the loss falls)."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from litlab.chapters.diffusion.ema import EMA
from litlab.chapters.diffusion.module import DDPM
from litlab.chapters.diffusion.samplers import AnnealedLangevin, ClassifierFreeGuidance, DDIMSampler, DDPMSampler
from litlab.chapters.diffusion.schedules import GeometricSigmas, NoiseSchedule, cosine_betas, spaced_timesteps
from litlab.chapters.diffusion.score import NCSN
from litlab.chapters.diffusion.unet import UNet, sinusoidal_embedding


# ---------------------------------------------------------------- schedules
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_alpha_bar_is_the_product_of_one_minus_beta(kind):
    s = NoiseSchedule.make(kind, 50)
    prod, expected = 1.0, []
    for b in s.betas.tolist():  # a plain Python loop: abar_t = prod_{s<=t} (1 - beta_s)
        prod *= 1 - b
        expected.append(prod)
    assert torch.allclose(s.alpha_bars, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    assert (s.betas > 0).all() and (s.betas < 1).all() and (s.alpha_bars.diff() < 0).all()


def test_linear_schedule_end_points():
    b = NoiseSchedule.make("linear", 1000).betas
    assert b[0].item() == pytest.approx(1e-4) and b[-1].item() == pytest.approx(0.02)
    assert torch.allclose(b.diff(), b.diff()[:1].expand(999))  # evenly spaced


def test_cosine_schedule_matches_its_closed_form():
    T, s = 100, 0.008
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    sched = NoiseSchedule.make("cosine", T)
    closed = torch.tensor([f((t + 1) / T) / f(0) for t in range(T)], dtype=torch.float64)
    clipped = cosine_betas(T) >= 0.999
    assert clipped.sum() <= 1 and not clipped[:-1].any()  # only the singular last step is clipped
    assert torch.allclose(sched.alpha_bars[:-1], closed[:-1], rtol=1e-10, atol=1e-14)
    assert sched.alpha_bars[-1] < 1e-3


def test_respaced_schedule_keeps_alpha_bar_at_the_kept_steps():
    s = NoiseSchedule.make("linear", 100)
    r = s.respace(10)
    assert r.timesteps.tolist() == spaced_timesteps(100, 10).tolist() and r.timesteps[-1] == 99 and r.timesteps[0] == 0
    assert torch.allclose(r.alpha_bars, s.alpha_bars[r.timesteps], rtol=1e-12)


def test_q_sample_has_the_stated_mean_and_variance():
    s = NoiseSchedule.make("linear", 1000)
    g = torch.Generator().manual_seed(0)
    n, t = 200_000, 300
    x0 = torch.tensor([0.7, -0.3]).expand(n, 2)
    xt = s.q_sample(x0, torch.full((n,), t), torch.randn(n, 2, generator=g))
    abar = s.alpha_bars[t].item()
    assert torch.allclose(xt.mean(0), math.sqrt(abar) * torch.tensor([0.7, -0.3]), atol=0.01)
    assert torch.allclose(xt.var(0), torch.full((2,), 1 - abar), rtol=0.02)


def test_posterior_against_bayes_rule_by_hand():
    betas = torch.tensor([0.05, 0.1, 0.2, 0.3, 0.4])
    s = NoiseSchedule(betas)
    t, x0, xt = 3, 0.5, -0.2
    abar = [0.95, 0.95 * 0.9, 0.95 * 0.9 * 0.8, 0.95 * 0.9 * 0.8 * 0.7]  # by hand
    alpha, beta, ab_prev = 0.7, 0.3, abar[2]
    # q(x_{t-1} | x_0) = N(sqrt(ab_prev) x0, 1 - ab_prev), q(x_t | x_{t-1}) = N(sqrt(alpha) x_{t-1}, beta):
    # the product of the two Gaussians in x_{t-1}.
    precision = 1 / (1 - ab_prev) + alpha / beta
    var = 1 / precision
    mean = var * (math.sqrt(ab_prev) * x0 / (1 - ab_prev) + math.sqrt(alpha) * xt / beta)
    m, v = s.posterior(torch.tensor([[x0]]), torch.tensor([[xt]]), torch.tensor([t]))
    assert s.alpha_bars[t].item() == pytest.approx(abar[3], rel=1e-6)
    assert m.item() == pytest.approx(mean, rel=1e-6) and v.item() == pytest.approx(var, rel=1e-6)
    _, v0 = s.posterior(torch.zeros(1, 1), torch.zeros(1, 1), torch.tensor([0]))
    assert v0.item() == 0  # the last step x_0 -> data adds no noise


# ---------------------------------------------------------------- samplers
def _oracle(schedule: NoiseSchedule, point: torch.Tensor):
    """The exact eps of a data set of one point: eps = (x_t - sqrt(abar_t) x*) / sqrt(1 - abar_t)."""
    return lambda x, t: schedule.eps_from_x0(x, t, point.expand_as(x))


@pytest.mark.parametrize("make", [
    lambda s: DDPMSampler(s), lambda s: DDPMSampler(s, num_steps=20), lambda s: DDPMSampler(s, variance="beta"),
    lambda s: DDIMSampler(s, 10), lambda s: DDIMSampler(s, 200), lambda s: DDIMSampler(s, 10, eta=1.0)],
    ids=["ddpm_full", "ddpm_20", "ddpm_beta", "ddim_10", "ddim_all", "ddim_eta1"])
def test_an_exact_eps_oracle_recovers_the_single_data_point(make):
    s = NoiseSchedule.make("cosine", 200)
    point = torch.tensor([[[0.3, -0.8], [0.9, 0.0]]])  # (1, 2, 2)
    g = torch.Generator().manual_seed(1)
    out = make(s).sample(_oracle(s, point), torch.randn(16, 1, 2, 2, generator=g), generator=g)
    assert torch.allclose(out, point.expand_as(out), atol=1e-4)


def test_ddim_eta0_is_deterministic_and_eta1_is_not():
    torch.manual_seed(0)
    net = UNet(1, 8, (1,), 1)
    for p in net.parameters():  # a random (untrained) eps network, non-zero output
        torch.nn.init.normal_(p, std=0.1)
    s = NoiseSchedule.make("linear", 100)
    eps_fn = lambda x, t: net(x, t)  # noqa: E731
    noise = torch.randn(4, 1, 8, 8)
    run = lambda eta, seed: DDIMSampler(s, 10, eta).sample(eps_fn, noise, torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(run(0.0, 0), run(0.0, 1))  # bitwise, whatever the generator
    assert torch.equal(run(1.0, 0), run(1.0, 0))
    assert not torch.allclose(run(1.0, 0), run(1.0, 1))
    assert not torch.allclose(run(1.0, 0), run(0.0, 0))


def test_ddim_eta1_step_is_the_ddpm_posterior():
    """sigma_t(eta=1)^2 = beta_tilde_t on the respaced schedule (Song et al., eq. 16)."""
    s = NoiseSchedule.make("linear", 100).respace(10)
    ab, ab_prev = s.alpha_bars, s.alpha_bars_prev
    sigma2 = (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
    assert torch.allclose(sigma2, s.posterior_variance, rtol=1e-10)


def test_classifier_free_guidance_formula():
    net = lambda x, t, y: x * (y.float()[:, None] + 1)  # noqa: E731  eps(x, c) = (c + 1) x; null class 10
    x, t, y = torch.ones(3, 2), torch.zeros(3, dtype=torch.long), torch.tensor([0, 2, 5])
    w = 1.5
    expected = (1 + w) * (y.float()[:, None] + 1) - w * 11.0
    assert torch.allclose(ClassifierFreeGuidance(net, y, 10, w)(x, t), expected)
    assert torch.allclose(ClassifierFreeGuidance(net, y, 10, 0.0)(x, t), y.float()[:, None] + 1)


def test_annealed_langevin_with_the_exact_score_samples_the_gaussian():
    mu, std = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 1.5])
    sigmas = GeometricSigmas(5.0, 0.01, 10)
    score = lambda x, i: -(x - mu) / (std ** 2 + sigmas.sigmas.float()[i][:, None] ** 2)  # noqa: E731  p_sigma = N(mu, s^2 + sigma^2)
    g = torch.Generator().manual_seed(0)
    init = 5.0 * torch.randn(20_000, 2, generator=g)
    x = AnnealedLangevin(sigmas, steps_per_level=100, step_lr=2e-5, denoise_final=False).sample(score, init, g)
    assert torch.allclose(x.mean(0), mu, atol=0.03)
    assert torch.allclose(x.std(0), std, rtol=0.05)


def test_sinusoidal_embedding_by_hand():
    emb = sinusoidal_embedding(torch.tensor([0.0, 3.0]), 8)
    freqs = [10_000 ** (-k / 4) for k in range(4)]
    assert torch.allclose(emb[1], torch.tensor([math.sin(3 * f) for f in freqs] + [math.cos(3 * f) for f in freqs]))
    assert torch.allclose(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))


# ---------------------------------------------------------------- EMA
def test_ema_update_is_the_formula():
    net = torch.nn.Linear(3, 2)
    ema = EMA(net, decay=0.9, warmup=False)
    p0 = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)
    assert torch.allclose(ema.shadow["weight"], 0.9 * p0 + 0.1 * (p0 + 1))
    warm = EMA(net, decay=0.999)
    assert [round(warm.current_decay(), 6) for _ in range(1)] == [round(1 / 10, 6)]  # (1 + 0) / (10 + 0)
    warm.update(net)
    assert warm.current_decay() == pytest.approx(2 / 11)
    with warm.applied_to(net) as n:
        assert torch.equal(n.weight, warm.shadow["weight"])
    assert torch.equal(net.weight, p0 + 1)  # restored


def test_ema_state_is_in_the_checkpoint_and_restored(tmp_path):
    from litlab.data.digits import DigitsDataModule

    L.seed_everything(0, verbose=False)
    model = DDPM((1, 8, 8), 10, timesteps=20, base_channels=8, ema_decay=0.5)
    dm = DigitsDataModule(batch_size=32, normalize=False)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=1)
    trainer.fit(model, datamodule=dm)
    assert model.ema.num_updates == 3
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    assert ckpt["ema"]["num_updates"] == 3
    fresh = DDPM.load_from_checkpoint(path)
    assert fresh.ema.num_updates == 3
    for k, v in model.ema.shadow.items():
        assert torch.equal(fresh.ema.shadow[k], v)
    assert not torch.equal(fresh.ema.shadow["out.2.weight"], fresh.net.state_dict()["out.2.weight"])  # averaged, not raw
    resumed = DDPM((1, 8, 8), 10, timesteps=20, base_channels=8, ema_decay=0.5)
    L.Trainer(max_steps=5, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              default_root_dir=tmp_path, limit_val_batches=1).fit(resumed, datamodule=dm, ckpt_path=path)
    assert resumed.ema.num_updates == 5  # 3 before the checkpoint + 2 after: the average went on


# ---------------------------------------------------------------- learning checks
MODES = torch.tensor([[-0.6, -0.6], [0.6, 0.6]])


def _mixture(n: int, g: torch.Generator):
    """Two Gaussians (std 0.1) at MODES, as (n, 2, 1, 1) "images" of 2 channels, labels = mode."""
    y = torch.randint(0, 2, (n,), generator=g)
    x = MODES[y] + 0.1 * torch.randn(n, 2, generator=g)
    return x[:, :, None, None], y


def _fit_toy(model, steps: int, lr: float = 3e-3):
    """Minimise model.loss on fresh mixture batches (no Trainer: a few hundred tiny steps), EMA on."""
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.net.parameters(), lr=lr)
    for _ in range(steps):
        x, y = _mixture(128, g)
        loss = model.loss(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.ema.update(model.net)
    return model


def _near_mode(x01: torch.Tensor) -> torch.Tensor:
    """Index of the mode each sample (pixels in [0, 1]) is within 0.3 (3 std) of, else -1."""
    x = (x01 * 2 - 1).flatten(1)  # back to [-1, 1], (N, 2)
    d = torch.cdist(x, MODES)
    return torch.where(d.min(1).values < 0.3, d.argmin(1), torch.full((len(x),), -1))


@pytest.mark.slow
def test_ddpm_learns_a_2d_mixture_and_guidance_picks_the_class():
    """The registered module's own loss and samplers on 2-channel 1x1 "images" (the U-Net's 3x3 convs
    then act per pixel): untrained samples are nowhere near the modes; trained ones are, both modes
    appear, and conditional samples land on the asked mode."""
    torch.manual_seed(0)
    model = DDPM((2, 1, 1), 2, timesteps=100, base_channels=32, channel_mults=[1], conditional=True,
                 p_uncond=0.2, ema_decay=0.99, sample_seed=3)
    before = _near_mode(model.generate(400, None, sampler="ddim", steps=20))
    assert (before >= 0).float().mean() < 0.3
    _fit_toy(model, 300)
    for opts in ({"sampler": "ddim", "steps": 20}, {"sampler": "ddpm"}):
        modes = _near_mode(model.generate(400, None, **opts))  # null class: unconditional
        assert (modes >= 0).float().mean() > 0.85, opts
        assert 0.25 < (modes == 1).float().sum() / (modes >= 0).float().sum() < 0.75, opts
    asked = torch.arange(400) % 2
    guided = _near_mode(model.generate(400, asked, sampler="ddim", steps=20, guidance=2.0))
    assert (guided == asked).float().mean() > 0.9


@pytest.mark.slow
def test_ncsn_learns_a_2d_mixture_with_annealed_langevin():
    torch.manual_seed(0)
    model = NCSN((2, 1, 1), sigma_max=2.0, sigma_min=0.02, num_levels=8, steps_per_level=20, step_lr=2e-3,
                 base_channels=32, channel_mults=[1], ema_decay=0.99)
    _fit_toy(model, 300)
    modes = _near_mode(model.generate(400))
    assert (modes >= 0).float().mean() > 0.8
    assert 0.25 < (modes == 1).float().sum() / (modes >= 0).float().sum() < 0.75


@pytest.mark.parametrize("cls,args", [(DDPM, {"timesteps": 100}), (NCSN, {"num_levels": 8})], ids=["ddpm", "ncsn"])
def test_digits_loss_falls(cls, args, tmp_path):
    from litlab.data.digits import DigitsDataModule

    L.seed_everything(0, verbose=False)
    model = cls((1, 8, 8), base_channels=8, ema_decay=0.9, **args) if cls is NCSN else \
        cls((1, 8, 8), 10, base_channels=8, ema_decay=0.9, **args)
    dm = DigitsDataModule(batch_size=64, normalize=False)
    dm.setup()
    x, y = dm.val_set.tensors()
    start = model.loss(x * 2 - 1, y, torch.Generator().manual_seed(0)).item()
    trainer = L.Trainer(max_steps=120, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        limit_val_batches=0)
    model.optim_config = None
    trainer.fit(model, datamodule=dm)
    end = model.loss(x * 2 - 1, y, torch.Generator().manual_seed(0)).item()
    assert end < 0.6 * start, (start, end)


def test_normalized_data_is_refused():
    from litlab.errors import ConfigError

    model = DDPM((1, 8, 8), 10, timesteps=10, base_channels=8)
    with pytest.raises(ConfigError, match="data.normalize"):
        model._prepare((torch.full((2, 1, 8, 8), -1.5), torch.zeros(2, dtype=torch.long)))
