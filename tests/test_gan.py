"""Chapter 8 (GANs): the objectives against closed forms and torch's own losses, the Lipschitz
devices (gradient penalty, weight clipping, spectral norm), the U-Net's skips, the PatchGAN's
receptive field, the generated image tasks, and seeded learning checks for every registered model."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from litlab import plots, quality, registry
from litlab.chapters.gan import losses
from litlab.chapters.gan.nets import DCDiscriminator, DCGenerator, PatchDiscriminator, UNet
from litlab.config import OptimConfig
from litlab.data.digits import DigitsDataModule
from litlab.data.image_pairs import DigitDomainsDataModule, DigitPairsDataModule, dilate, erode
from litlab.errors import ConfigError

registry.load_all()


# ---------------------------------------------------------------- objectives
def test_nonsaturating_and_minimax_losses_match_their_formulas():
    logits = torch.linspace(-6, 6, 25)
    d = torch.sigmoid(logits)
    assert torch.allclose(losses.g_loss_nonsaturating(logits), -torch.log(d).mean(), atol=1e-6)
    assert torch.allclose(losses.g_loss_nonsaturating(logits),
                          F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits)), atol=1e-6)
    assert torch.allclose(losses.g_loss_minimax(logits), torch.log(1 - d).mean(), atol=1e-5)
    real, fake = torch.randn(7), torch.randn(7)
    expected = -torch.log(torch.sigmoid(real)).mean() - torch.log(1 - torch.sigmoid(fake)).mean()
    assert torch.allclose(losses.d_loss_bce(real, fake), expected, atol=1e-5)
    # Where D confidently rejects the fakes (l = -6), minimax's gradient vanishes, the other's does not.
    l = torch.tensor([-6.0], requires_grad=True)
    (g_mm,) = torch.autograd.grad(losses.g_loss_minimax(l), l)
    (g_ns,) = torch.autograd.grad(losses.g_loss_nonsaturating(l), l)
    assert abs(g_mm.item()) == pytest.approx(torch.sigmoid(torch.tensor(-6.0)).item(), rel=1e-4)  # sigma(l)
    assert abs(g_ns.item()) == pytest.approx(1 - torch.sigmoid(torch.tensor(-6.0)).item(), rel=1e-4)  # 1 - sigma(l)


def test_lsgan_and_accuracy():
    real, fake = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    assert losses.d_loss_lsgan(real, fake).item() == pytest.approx(0.5 * 0.5 + 0.5 * 2.0)
    assert losses.g_loss_lsgan(fake).item() == pytest.approx((1 + 1) / 2)
    assert losses.d_accuracy(torch.tensor([1.0, -1.0]), torch.tensor([-1.0, -1.0])).item() == 0.75


# ---------------------------------------------------------------- Lipschitz devices
@pytest.mark.parametrize("scale", [1.0, 0.5, 3.0])
def test_gradient_penalty_of_a_linear_critic(scale):
    torch.manual_seed(0)
    w = torch.randn(1, 2, 3, 3)
    w = scale * w / w.norm()  # ||w|| = scale: the critic is exactly `scale`-Lipschitz along every line
    def critic(x):
        return (x * w).flatten(1).sum(1) + 0.7

    real, fake = torch.randn(5, 2, 3, 3), torch.randn(5, 2, 3, 3)
    gp = losses.gradient_penalty(critic, real, fake, weight=10.0)
    assert gp.item() == pytest.approx(10.0 * (scale - 1) ** 2, abs=1e-5)  # grad f = w everywhere


def test_gradient_penalty_is_evaluated_at_the_interpolates_and_reaches_the_critic():
    # f(x) = a * sum(x^2): grad = 2 a x^, so the penalty depends on where x^ = e x + (1 - e) x~ lies.
    a = torch.tensor(0.3, requires_grad=True)
    real, fake = torch.randn(4, 6), torch.randn(4, 6)
    eps = torch.tensor([0.0, 0.25, 0.5, 1.0])
    gp = losses.gradient_penalty(lambda x: a * (x**2).sum(1), real, fake, weight=10.0, eps=eps)
    x_hat = eps[:, None] * real + (1 - eps[:, None]) * fake
    expected = 10.0 * ((2 * 0.3 * x_hat.norm(dim=1) - 1) ** 2).mean()
    assert gp.item() == pytest.approx(expected.item(), rel=1e-5)
    (grad_a,) = torch.autograd.grad(gp, a)  # create_graph=True: the penalty trains the critic
    expected_grad = 10.0 * (2 * (2 * 0.3 * x_hat.norm(dim=1) - 1) * 2 * x_hat.norm(dim=1)).mean()
    assert grad_a.item() == pytest.approx(expected_grad.item(), rel=1e-4)


def _digits(batch_size=32):
    return DigitsDataModule(normalize=False, batch_size=batch_size)


def _fit(model, dm, epochs=1, batches=None, optim=None, val=False):
    model.optim_config = optim or OptimConfig()
    trainer = L.Trainer(max_epochs=epochs, limit_train_batches=batches, limit_val_batches=None if val else 0,
                        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    return trainer


def test_weight_clipping_keeps_every_critic_weight_in_range():
    L.seed_everything(0, verbose=False)
    c = 0.01
    model = registry.MODELS["wgan"].cls(input_shape=(1, 8, 8), penalty="clip", clip_value=c, n_critic=1,
                                        g_width=8, d_width=8, d_norm="batch")
    losses.clip_weights(model.discriminator, c)
    _fit(model, _digits(), batches=3, optim=OptimConfig(name="rmsprop", lr=0.05))  # big steps overshoot c
    params = torch.cat([p.detach().flatten() for p in model.discriminator.parameters()])
    assert params.abs().max().item() <= c + 1e-7
    assert (params.abs() > c - 1e-7).float().mean() > 0.5  # most weights were pushed onto the bounds
    gen = torch.cat([p.detach().flatten() for p in model.generator.parameters()])
    assert gen.abs().max() > c  # only the critic is clipped


def test_gradient_penalty_refuses_batch_norm():
    with pytest.raises(ConfigError, match="d_norm"):
        registry.MODELS["wgan"].cls(input_shape=(1, 8, 8), penalty="gp", d_norm="batch")


def _power_iteration(w: torch.Tensor, steps: int = 200) -> float:
    v = torch.randn(w.shape[1], generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        u = F.normalize(w @ v, dim=0)
        v = F.normalize(w.T @ u, dim=0)
    return (u @ w @ v).item()


def test_spectral_norm_bounds_the_largest_singular_value():
    torch.manual_seed(0)
    plain = DCDiscriminator(1, 8, width=16, spectral=False)
    sn = DCDiscriminator(1, 8, width=16, spectral=True)
    sn.train()
    for _ in range(30):  # each training forward runs one power iteration on every weight
        sn(torch.randn(4, 1, 8, 8))
    layers = [m for m in sn.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) == 3  # conv 3x3, one stride-2 conv (8 -> 4), linear
    for m in layers:
        w = m.weight.detach().flatten(1)  # (out, in * k * k): the matrix spectral_norm normalises
        assert torch.linalg.svdvals(w)[0].item() == pytest.approx(1.0, abs=0.02)
        assert _power_iteration(w) == pytest.approx(1.0, abs=0.02)
    sigmas = [torch.linalg.svdvals(m.weight.detach().flatten(1))[0].item()
              for m in plain.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert max(abs(s - 1) for s in sigmas) > 0.1  # without it the weights are not normalised


# ---------------------------------------------------------------- networks
def test_generator_and_discriminator_shapes():
    g = DCGenerator(8, 1, 16, width=4, num_classes=10)
    d = DCDiscriminator(1, 16, width=4, num_classes=10)
    y = torch.arange(3)
    x = g(torch.randn(3, 8), y)
    assert x.shape == (3, 1, 16, 16) and x.abs().max() <= 1
    assert d(x, y).shape == (3,)
    with pytest.raises(ValueError):
        DCGenerator(8, 1, 12)


def test_projection_discriminator_uses_the_label():
    torch.manual_seed(0)
    d = DCDiscriminator(1, 8, width=4, num_classes=10).eval()
    x = torch.rand(1, 1, 8, 8)
    scores = d(x.repeat(10, 1, 1, 1), torch.arange(10))  # one image, every class
    assert scores.std() > 1e-4
    phi = d.features(x)  # score = w^T phi(x) + b + <e_y, phi(x)>
    assert torch.allclose(scores[3], d.head(phi)[0, 0] + d.embed.weight[3] @ phi[0], atol=1e-6)


def test_unet_shape_and_skip_connections():
    torch.manual_seed(0)
    for depth in (1, 2, 3, 4):
        net = UNet(2, 3, width=4, depth=depth)
        assert net(torch.randn(2, 2, 16, 16)).shape == (2, 3, 16, 16)
    # Cut the bottleneck (zero the deepest encoder map): with skips the output still follows the
    # input through the concatenated encoder maps; without them nothing reaches the output.
    for skips in (True, False):
        net = UNet(1, 1, width=4, depth=3, skips=skips, norm="none").eval()
        net.down[-1].register_forward_hook(lambda mod, inp, out: torch.zeros_like(out))
        x1, x2 = torch.randn(1, 1, 16, 16), torch.randn(1, 1, 16, 16)
        differs = (net(x1) - net(x2)).abs().max().item() > 1e-6
        assert differs == skips
    with pytest.raises(ValueError):
        UNet(1, 1, depth=3)(torch.randn(1, 1, 12, 12))


@pytest.mark.parametrize("stride_layers", [0, 1, 2])
def test_patch_discriminator_receptive_field(stride_layers):
    torch.manual_seed(0)
    d = PatchDiscriminator(2, width=4, stride_layers=stride_layers, norm="none")
    x = torch.randn(1, 2, 64, 64, requires_grad=True)
    out = d(x)
    assert out.shape == (1, 1, 64 // 2**stride_layers, 64 // 2**stride_layers)
    out[0, 0, out.shape[2] // 2, out.shape[3] // 2].backward()
    rows = x.grad.abs().sum((0, 1, 3)).nonzero().flatten()
    assert rows.max() - rows.min() + 1 == d.receptive_field()


def test_cycle_loss_is_zero_for_inverse_mappings():
    model = registry.MODELS["cyclegan"].cls(input_shape=(1, 8, 8), width=4, d_width=4, depth=2, identity_weight=0.5)

    class Affine(nn.Module):
        def __init__(self, scale, shift):
            super().__init__()
            self.scale, self.shift = scale, shift

        def forward(self, x):
            return self.scale * x + self.shift

    a, b = torch.rand(4, 1, 8, 8) * 2 - 1, torch.rand(4, 1, 8, 8) * 2 - 1
    model.generators["ab"], model.generators["ba"] = Affine(-1.0, 0.0), Affine(-1.0, 0.0)  # invert twice = id
    terms = model.generator_losses(a, b)
    assert terms["cycle"].item() == pytest.approx(0.0, abs=1e-7)
    assert terms["identity"].item() == pytest.approx(((a - -a).abs().mean() + (b - -b).abs().mean()).item(), rel=1e-6)
    model.generators["ba"] = Affine(0.5, 0.1)  # not the inverse
    assert model.generator_losses(a, b)["cycle"].item() > 0.1
    assert losses.cycle_loss(a, a).item() == 0.0


# ---------------------------------------------------------------- generated image tasks
def test_paired_tasks():
    for task in ("outline", "superres", "inpaint"):
        dm = DigitPairsDataModule(task=task, image_size=16, batch_size=8)
        dm.setup()
        x, t, y = next(iter(dm.train_dataloader()))
        assert x.shape == t.shape == (8, 1, 16, 16) and y.shape == (8,)
        assert 0 <= x.min() and x.max() <= 1 and 0 <= t.min() and t.max() <= 1
        if task == "outline":
            assert torch.allclose(t, (dilate(x) - erode(x)).clamp(0, 1))
        elif task == "superres":
            assert torch.allclose(x, x[..., ::4, ::4].repeat_interleave(4, -2).repeat_interleave(4, -1))  # 4x4 blocks
            assert torch.allclose(F.avg_pool2d(x, 4), F.avg_pool2d(t, 4), atol=1e-6)
        else:
            assert (x[..., 8:, :] == 0.5).all() and torch.equal(x[..., :8, :], t[..., :8, :])
    assert DigitPairsDataModule(task="outline").info()["targets_are_digits"] is False


def test_unpaired_domains_come_from_disjoint_digits():
    dm = DigitDomainsDataModule(task="invert", image_size=8, batch_size=16)
    dm.setup()
    a_all, b_all = dm.train_set.a, dm.train_set.b
    originals_of_b = 1 - b_all
    same = (a_all.flatten(1)[:, None] - originals_of_b.flatten(1)[None]).abs().amax(-1) < 1e-6  # (N_A, N_B)
    assert same.float().mean() < 0.01  # scikit-learn's digits have a few exact duplicates, no more
    a, b = next(iter(dm.train_dataloader()))
    assert a.shape == b.shape == (16, 1, 8, 8)
    va, vb = next(iter(dm.val_dataloader()))
    assert torch.allclose(vb, 1 - va)  # evaluation items are true pairs (x, T(x))
    thick = DigitDomainsDataModule(task="thicken")
    thick.setup()
    va, vb = next(iter(thick.val_dataloader()))
    assert torch.equal(vb, dilate(va)) and (vb >= va).all()


def test_gan_modules_refuse_standardised_pixels():
    model = registry.MODELS["gan"].cls(input_shape=(1, 8, 8), g_width=4, d_width=4)
    with pytest.raises(ConfigError, match="normalize"):
        _fit(model, DigitsDataModule(normalize=True, batch_size=16), batches=1)


# ---------------------------------------------------------------- learning checks (seeded, seconds)
@pytest.fixture(scope="module")
def digits32():
    dm = _digits(batch_size=32)
    dm.setup()
    return dm


def _quality(model, n=270):
    real, labels = quality.real_digits("val", n)
    fake = model.sample(n, labels if model.num_classes else None, seed=1)
    return quality.frechet_distance(fake, real), (quality.class_accuracy(fake, labels) if model.num_classes else None)


@pytest.mark.parametrize("name, args, optim", [
    ("gan", {}, OptimConfig(lr=2e-3, betas=(0.5, 0.999))),
    ("wgan", {"penalty": "gp", "n_critic": 2}, OptimConfig(lr=1e-3, betas=(0.0, 0.9))),
    ("wgan", {"penalty": "clip", "n_critic": 2, "d_norm": "batch"}, OptimConfig(name="rmsprop", lr=5e-4)),
], ids=["gan", "wgan-gp", "wgan-clip"])
def test_unconditional_gans_learn_digits(name, args, optim, digits32):
    L.seed_everything(0, verbose=False)
    model = registry.MODELS[name].cls(input_shape=(1, 8, 8), z_dim=16, g_width=16, d_width=16, **args)
    fd_before, _ = _quality(model)
    _fit(model, digits32, epochs=3, optim=optim)
    fd_after, _ = _quality(model)
    # Real val vs real test digits: ~2; random init: ~400; uniform noise: ~370.
    assert fd_before > 200 and fd_after < 100, (fd_before, fd_after)


def test_conditional_gan_draws_the_asked_class(digits32):
    L.seed_everything(0, verbose=False)
    model = registry.MODELS["cgan"].cls(input_shape=(1, 8, 8), num_classes=10, z_dim=16, g_width=16, d_width=16)
    _, acc_before = _quality(model)
    _fit(model, digits32, epochs=3, optim=OptimConfig(lr=2e-3, betas=(0.5, 0.999)))
    fd_after, acc_after = _quality(model)
    assert acc_before < 0.3 and acc_after > 0.7, (acc_before, acc_after)  # chance: 0.1
    assert fd_after < 100


def test_pix2pix_learns_to_inpaint():
    L.seed_everything(0, verbose=False)
    dm = DigitPairsDataModule(task="inpaint", image_size=16, batch_size=32)
    dm.setup()
    model = registry.MODELS["pix2pix"].cls(input_shape=(1, 16, 16), targets_are_digits=True, width=8, d_width=8,
                                           depth=2)
    x, t, y = dm.val_set.tensors()
    _fit(model, dm, epochs=2, optim=OptimConfig(lr=2e-3, betas=(0.5, 0.999)))
    model.eval()
    with torch.no_grad():
        out = model(x)
    copy_l1 = (x - t).abs().mean().item()  # the "copy the input" baseline: ~0.17
    assert (out - t).abs().mean().item() < 0.7 * copy_l1
    assert (out - t)[..., :8, :].abs().mean() < 0.06  # the visible half is kept
    assert (out - t)[..., 8:, :].abs().mean() < 0.7 * (x - t)[..., 8:, :].abs().mean()  # the hidden half is drawn
    assert quality.class_accuracy(out, y) > quality.class_accuracy(x, y) + 0.1  # completions read as digits


def test_cyclegan_learns_the_unpaired_inversion():
    L.seed_everything(0, verbose=False)
    dm = DigitDomainsDataModule(task="invert", image_size=8, batch_size=32)
    dm.setup()
    # identity_weight=0: the identity term asks G_AB(b) = b, which inversion contradicts.
    model = registry.MODELS["cyclegan"].cls(input_shape=(1, 8, 8), width=8, d_width=8, depth=2, identity_weight=0.0,
                                            g_norm="instance", d_norm="instance")  # the paper's norms
    a, b = dm.val_set.a, dm.val_set.b  # true pairs b = 1 - a, never seen together in training
    with torch.no_grad():
        before = (model.eval()(a) - b).abs().mean().item()
    _fit(model, dm, epochs=2, optim=OptimConfig(lr=2e-3, betas=(0.5, 0.999)))
    model.eval()
    with torch.no_grad():
        after_ab = (model(a) - b).abs().mean().item()
        after_ba = (model.backward_map(b) - a).abs().mean().item()
    identity = (a - b).abs().mean().item()  # ~0.79
    assert after_ab < 0.6 * before and after_ab < 0.4 * identity, (before, after_ab)
    assert after_ba < 0.4 * identity


def test_optimisers_follow_the_config_per_network(digits32):
    from litlab.config import SchedulerConfig

    L.seed_everything(0, verbose=False)
    model = registry.MODELS["gan"].cls(input_shape=(1, 8, 8), g_width=4, d_width=4, lr_d=4e-4)
    optim = OptimConfig(name="rmsprop", lr=1e-3, alpha=0.9, scheduler=SchedulerConfig(name="cosine"))
    trainer = _fit(model, digits32, epochs=2, batches=2, optim=optim)
    opt_g, opt_d = model.optimizers()
    assert isinstance(opt_g.optimizer, torch.optim.RMSprop) and opt_g.param_groups[0]["alpha"] == 0.9
    assert {id(p) for g in opt_g.param_groups for p in g["params"]} == {id(p) for p in model.generator.parameters()}
    assert {id(p) for g in opt_d.param_groups for p in g["params"]} == {id(p) for p in model.discriminator.parameters()}
    # cosine over 4 batches, stepped once per batch: lr(4) = 0 of each network's own base lr
    assert [g["initial_lr"] for g in opt_g.param_groups] == [1e-3] * len(opt_g.param_groups)
    assert [g["initial_lr"] for g in opt_d.param_groups] == [4e-4] * len(opt_d.param_groups)
    assert all(g["lr"] < 1e-9 for g in opt_g.param_groups + opt_d.param_groups)
    assert trainer.global_step == 8  # manual optimisation: every optimizer.step() counts (D and G, 4 batches)


class _FigureLogger(L.pytorch.loggers.Logger):
    """Records the artifact names of log_figure (what the MLflow tracker would store)."""

    def __init__(self):
        super().__init__()
        self.figures: list[tuple[str, int]] = []

    name, version = "figures", 0

    @property
    def experiment(self):
        return None

    def log_metrics(self, metrics, step=None):
        pass

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_figure(self, figure, artifact_file):
        (ax,) = figure.axes  # the grid is one image on one axes
        self.figures.append((artifact_file, ax.images[0].get_array().shape))


@pytest.mark.parametrize("name", ["gan", "cyclegan"])
def test_sample_grids_every_few_epochs_and_at_the_end(name):
    L.seed_everything(0, verbose=False)
    if name == "gan":
        model = registry.MODELS["gan"].cls(input_shape=(1, 8, 8), g_width=4, d_width=4, plot_every_n_epochs=2)
        model.fixed_z = model.fixed_z[:16]  # 8 rows (nrow=8) x 2 columns
        dm, grid = _digits(batch_size=16), (8, 2)
    else:
        model = registry.MODELS["cyclegan"].cls(input_shape=(1, 8, 8), width=4, d_width=4, depth=2,
                                                plot_every_n_epochs=2)
        dm, grid = DigitDomainsDataModule(task="invert", image_size=8, batch_size=16), (5, 8)
    model.optim_config = OptimConfig()
    logger = _FigureLogger()
    L.Trainer(max_epochs=3, limit_train_batches=2, limit_val_batches=1, accelerator="cpu", logger=logger,
              enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
              num_sanity_val_steps=0).fit(model, datamodule=dm)
    assert [f for f, _ in logger.figures] == ["plots/samples_epoch_2.png", "plots/samples_epoch_3.png"]
    mosaic = plots.tile_images(np.zeros((grid[0] * grid[1], 8, 8)), *grid).shape  # 8x8 images, rows x columns
    assert all(shape == mosaic for _, shape in logger.figures), (logger.figures, mosaic)  # cyclegan: 5 rows x 8


def test_tile_images_puts_image_i_at_row_i_div_cols_and_leaves_white_gaps():
    images = np.arange(5 * 3 * 2, dtype=np.float32).reshape(5, 3, 2) / 30  # 5 images of 3 x 2
    out = plots.tile_images(images, rows=2, cols=3, band=2)  # gap: 1 pixel
    assert out.shape == (2 * (3 + 2 + 1) - 1, 3 * (2 + 1) - 1)
    for i in range(5):
        top, left = (i // 3) * 6 + 2, (i % 3) * 3
        assert np.array_equal(out[top:top + 3, left:left + 2], images[i])
    covered = np.zeros(out.shape, bool)
    for i in range(5):
        covered[(i // 3) * 6 + 2:(i // 3) * 6 + 5, (i % 3) * 3:(i % 3) * 3 + 2] = True
    assert np.all(out[~covered] == 1.0)  # the label bands, the gaps and the sixth, empty cell
    rgb = plots.tile_images(np.zeros((4, 8, 8, 3)), rows=2, cols=2)
    assert rgb.shape == (17, 17, 3) and rgb[8, 0].tolist() == [1.0, 1.0, 1.0]
