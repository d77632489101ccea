"""Chapter 7, autoencoders: the VAE's equations against independent references (torch.distributions,
Monte Carlo), gradients through the reparameterised z, and real learning checks."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from litlab.chapters.autoencoder import nets
from litlab.chapters.autoencoder.module import VAE, Autoencoder
from litlab.config import OptimConfig
from litlab.data.digits import DigitsDataModule
from litlab.errors import ConfigError
from torch.distributions import Bernoulli, Normal, kl_divergence


def test_closed_form_kl_matches_torch_and_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(4, 3, generator=g)
    logvar = torch.randn(4, 3, generator=g).clamp(-2, 1.5)
    kl = nets.gaussian_kl(mu, logvar)  # (4,)
    q, p = Normal(mu, (0.5 * logvar).exp()), Normal(torch.zeros_like(mu), torch.ones_like(mu))
    assert torch.allclose(kl, kl_divergence(q, p).sum(-1), atol=1e-5)
    # Monte Carlo: KL = E_q[log q(z) - log p(z)], 200k samples per row.
    z = q.sample((200_000,))  # (S, 4, 3)
    mc = (q.log_prob(z) - p.log_prob(z)).sum(-1).mean(0)  # (4,)
    assert torch.allclose(kl, mc, rtol=0.02, atol=0.02), (kl, mc)
    assert torch.all(kl > 0) and nets.gaussian_kl(torch.zeros(1, 3), torch.zeros(1, 3)).item() == 0


def test_likelihoods_match_torch_distributions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 1, 8, 8, generator=g)
    binary = (torch.rand(5, 1, 8, 8, generator=g) > 0.5).float()
    ref = -Bernoulli(logits=logits).log_prob(binary).flatten(1).sum(-1)
    assert torch.allclose(nets.neg_log_likelihood(logits, binary, "bernoulli"), ref, atol=1e-4)
    x = torch.rand(5, 1, 8, 8, generator=g)
    ref = -Normal(torch.sigmoid(logits), 0.2).log_prob(x).flatten(1).sum(-1)
    assert torch.allclose(nets.neg_log_likelihood(logits, x, "gaussian", sigma=0.2), ref, atol=1e-3)
    z, m, lv = torch.randn(3, 2, 4, generator=g).unbind(0)
    assert torch.allclose(nets.log_normal(z, m, lv), Normal(m, (0.5 * lv).exp()).log_prob(z).sum(-1), atol=1e-5)


def test_reparameterisation_derivatives():
    mu = torch.tensor([0.5, -1.0], requires_grad=True)
    logvar = torch.tensor([0.2, -0.4], requires_grad=True)
    torch.manual_seed(0)
    z = nets.reparameterize(mu, logvar)
    torch.manual_seed(0)
    eps = torch.randn(2)
    assert torch.allclose(z, mu + (0.5 * logvar).exp() * eps)
    z.sum().backward()  # dz/dmu = 1, dz/dlogvar = 1/2 sigma eps
    assert torch.allclose(mu.grad, torch.ones(2))
    assert torch.allclose(logvar.grad, 0.5 * (0.5 * logvar.detach()).exp() * eps)


def _encoder_grad_after_recon_only_step(monkeypatch, detach_z: bool) -> float:
    """beta = 0: the loss is the reconstruction term only, whose only path to the encoder is z."""
    if detach_z:
        real = nets.reparameterize
        monkeypatch.setattr(nets, "reparameterize", lambda mu, logvar: real(mu, logvar).detach())
    torch.manual_seed(0)
    model = VAE(input_shape=(1, 8, 8), latent_dim=4, hidden=[32], beta=0.0)
    x = torch.rand(16, 1, 8, 8)
    model.training_step((x, torch.zeros(16, dtype=torch.long)), 0).backward()
    grads = [p.grad for p in model.vae.encoder.parameters()]
    assert all(p.grad is not None for p in model.vae.decoder.parameters())
    return sum(float(gr.abs().sum()) for gr in grads if gr is not None)


def test_gradient_reaches_the_encoder_only_through_z(monkeypatch):
    assert _encoder_grad_after_recon_only_step(monkeypatch, detach_z=False) > 0
    assert _encoder_grad_after_recon_only_step(monkeypatch, detach_z=True) == 0


@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 16, 12)])
def test_network_shapes(arch, shape):
    enc = nets.build_encoder(arch, shape, [32, 16], [8, 16], out_dim=10)
    dec = nets.build_decoder(arch, shape, [32, 16], [8, 16], latent_dim=5)
    assert enc(torch.rand(3, *shape)).shape == (3, 10)
    assert dec(torch.randn(3, 5)).shape == (3, *shape)


def test_bad_settings_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="model.channels"):
        VAE(input_shape=(1, 8, 8), arch="conv", channels=[4, 4, 4, 4])  # 8 is not divisible by 16
    model = VAE(input_shape=(1, 8, 8), hidden=[8])
    trainer = L.Trainer(fast_dev_run=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(ConfigError, match="data.normalize"):
        trainer.fit(model, datamodule=DigitsDataModule(normalize=True))


def test_autoencoder_samples_from_the_gaussian_fitted_to_its_codes():
    model = Autoencoder(input_shape=(1, 8, 8), latent_dim=3, hidden=[8])
    g = torch.Generator().manual_seed(0)
    true_mean = torch.tensor([1.0, -2.0, 0.5])
    true_cov = torch.tensor([[2.0, 0.6, 0.0], [0.6, 1.0, -0.3], [0.0, -0.3, 0.5]])
    codes = true_mean + torch.randn(20_000, 3, generator=g) @ torch.linalg.cholesky(true_cov).T
    model.on_val_codes(codes)
    z = model.sample_latent(20_000, torch.Generator().manual_seed(1))
    assert torch.allclose(z.mean(0), true_mean, atol=0.05)
    assert torch.allclose(torch.cov(z.T), true_cov, atol=0.08)


class FigureRecorder(CSVLogger):
    """A logger that also takes figures, like MLflow's: records their artifact names."""

    def __init__(self, save_dir):
        super().__init__(save_dir)
        self.figures: list[str] = []

    def log_figure(self, figure, artifact_file: str) -> None:
        assert figure.axes
        self.figures.append(artifact_file)


def _fit(model, tmp_path, epochs: int):
    L.seed_everything(0, verbose=False)
    dm = DigitsDataModule(normalize=False, batch_size=64)
    model.optim_config = OptimConfig(lr=3e-3)
    logger = FigureRecorder(tmp_path)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=logger, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    dm.setup()
    x_val = dm.val_set.tensors()[0]
    with torch.no_grad():
        before = float(model.terms(x_val)["recon"].mean())
    trainer.fit(model, datamodule=dm)
    result = trainer.test(model, datamodule=dm, verbose=False)[0]
    return before, result, logger, x_val


@pytest.fixture(scope="module")
def trained_vae(tmp_path_factory):
    torch.manual_seed(0)
    model = VAE(input_shape=(1, 8, 8), latent_dim=8, hidden=[256, 128], likelihood="gaussian", gaussian_sigma=0.1,
                plot_every_n_epochs=10, num_quality_samples=500)
    before, result, logger, x_val = _fit(model, tmp_path_factory.mktemp("vae"), epochs=25)
    return model, before, result, logger, x_val


@pytest.mark.slow
def test_vae_learns_to_reconstruct_and_sample(trained_vae):
    from litlab import quality

    _, before, result, logger, _ = trained_vae
    assert result["test/recon"] < before - 100, (before, result)  # nats per image
    assert result["test/elbo"] == pytest.approx(-(result["test/recon"] + result["test/kl"]), rel=1e-4)
    assert result["test/kl"] > 3  # the code is used: no posterior collapse
    assert result["test/sample_confidence"] > 0.5, result  # chance 0.1; uniform noise ~0.12
    noise_fd = quality.frechet_distance(torch.rand(500, 1, 8, 8))
    assert result["test/fid"] < 0.2 * noise_fd, (result, noise_fd)
    assert {"plots/samples_epoch_10.png", "plots/traversal_epoch_20.png", "plots/latent_epoch_25.png",
            "plots/reconstructions_epoch_25.png"} <= set(logger.figures)
    assert len(logger.figures) == 4 * 3  # epochs 10, 20 and the end (25), four figures each


def test_elbo_is_a_lower_bound_of_the_importance_sampled_log_likelihood(trained_vae):
    model, _, _, _, x_val = trained_vae
    x = x_val[:64]
    torch.manual_seed(0)
    with torch.no_grad():
        # The ELBO with the closed-form KL, averaged over 200 z samples per image ...
        elbo = torch.stack([-(t["recon"] + t["kl"]) for t in (model.terms(x) for _ in range(200))]).mean(0)
        # ... equals the same expectation written with densities: E_q[log p(x|z) + log p(z) - log q(z|x)].
        mc = torch.stack([model.importance_log_likelihood(x, k=1) for _ in range(200)]).mean(0)
        iwae = model.importance_log_likelihood(x, k=500)  # tends to log p(x) as k grows
    assert abs(float(elbo.mean() - mc.mean())) < 0.5, (elbo.mean(), mc.mean())
    gap = iwae - elbo
    assert gap.mean() > 0.1 and (gap > -2).all(), gap  # ELBO <= log p(x), strictly here


def test_autoencoder_learns(tmp_path):
    torch.manual_seed(0)
    model = Autoencoder(input_shape=(1, 8, 8), latent_dim=8, hidden=[128], plot_every_n_epochs=100,
                        num_quality_samples=500)
    before, result, logger, _ = _fit(model, tmp_path, epochs=15)
    assert result["test/recon"] < 0.8 * before and result["test/mse"] < 0.04, (before, result)
    assert result["test/sample_confidence"] > 0.4, result
    assert set(logger.figures) == {f"plots/{n}_epoch_15.png" for n in ("reconstructions", "samples", "traversal",
                                                                       "latent")}  # only at the end
