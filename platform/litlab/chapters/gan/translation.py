"""Image-to-image GANs on generated digit tasks (litlab.data.image_pairs): `pix2pix` (paired) and
`cyclegan` (unpaired).

pix2pix (Isola et al. 2017): U-Net G(x), conditional PatchGAN D(x, y) on the channel concatenation,
    D: min BCE(D(x, y), 1) / 2 + BCE(D(x, G(x)), 0) / 2
    G: min BCE(D(x, G(x)), 1) * adv_weight + l1_weight * |G(x) - y|_1   (lambda = 100 in the paper)
  adv_weight=0 is the L1-only regression baseline (blurry where the input is ambiguous).
  Logged: train/{d_loss, g_loss, g_adv, l1}, val/l1; test/l1 (pixels in [0, 1]), test/l1_input (the
  "copy the input" baseline), test/fid (outputs vs targets) and, when the targets are digits,
  test/class_accuracy and test/confidence of the outputs (digits classifier, litlab.quality).

CycleGAN (Zhu et al. 2017): G_AB: A -> B, G_BA: B -> A, PatchGAN D_A, D_B, LSGAN objectives,
    G: L_gan(G_AB) + L_gan(G_BA) + cycle_weight * (|G_BA(G_AB(a)) - a| + |G_AB(G_BA(b)) - b|)
       + identity_weight * cycle_weight * (|G_BA(a) - a| + |G_AB(b) - b|)
  trained on unaligned (a, b) batches. The task is generated, so val/test batches are true pairs
  (x, T(x)): val/l1_ab = |G_AB(x) - T(x)|, test/{l1_ab, l1_ba, l1_identity (= |x - T(x)|, the
  do-nothing baseline), cycle_l1, fid (G_BA(T(x)) vs the real digits x)}.

Figures (plots/samples_epoch_N.png): rows input | output | target on 8 fixed validation images.
"""

from __future__ import annotations

from typing import Annotated

import torch
from torch import Tensor, nn

from litlab.chapters.gan import losses
from litlab.chapters.gan.base import AdversarialModule
from litlab.chapters.gan.losses import AdvLoss
from litlab.chapters.gan.module import CHAPTER, LR, ImageShape, PlotEvery, Width
from litlab.chapters.gan.nets import Norm, PatchDiscriminator, UNet
from litlab.errors import ConfigError
from litlab.registry import register_model
from litlab.schema import Range

Depth = Annotated[int, Range(ge=1, le=8)]
Weight = Annotated[float, Range(ge=0, le=1e6)]
StrideLayers = Annotated[int, Range(ge=0, le=6)]


class _Translation(AdversarialModule):
    def _check_shape(self, input_shape, depth: int, d_stride_layers: int) -> None:
        _, h, w = input_shape
        if h % 2**depth or w % 2**depth:
            raise ConfigError("model.depth", f"a U-Net of depth {depth} halves the image {depth} times: "
                                             f"{h}x{w} is not divisible by {2**depth}")
        if h < 2**d_stride_layers:
            raise ConfigError("model.d_stride_layers", f"{d_stride_layers} halvings of a {h}x{w} image")

    def _remember(self, *images: Tensor) -> None:
        """Keep 8 images of the first validation batch (or training batch) for the figures."""
        if getattr(self, "_fixed", None) is None or (not self.training and self._fixed_from_train):
            self._fixed = [t[:8].detach().clone() for t in images]
            self._fixed_from_train = self.training

    @staticmethod
    def _grid(rows: list[Tensor], title: str):
        from litlab.plots import image_grid

        return image_grid(torch.cat(rows), title=title, nrow=len(rows))


@register_model("pix2pix", chapter=CHAPTER,
                description="pix2pix on paired digit tasks: U-Net generator with skips, PatchGAN discriminator, "
                            "L1 + adversarial loss",
                smoke={"model": {"width": 4, "d_width": 4, "depth": 2},
                       "data": {"name": "digit_pairs", "task": "inpaint", "batch_size": 8}})
class Pix2Pix(_Translation):
    def __init__(
        self,
        input_shape: ImageShape,
        targets_are_digits: bool,  # from the data: score outputs with the digits classifier
        width: Width = 32,
        depth: Depth = 3,  # U-Net halvings
        g_norm: Norm = "batch",
        skips: bool = True,  # False: a plain encoder-decoder (ablation)
        dropout: Annotated[float, Range(ge=0, lt=1)] = 0.0,
        d_width: Width = 32,
        d_stride_layers: StrideLayers = 1,  # PatchGAN halvings: patch side 12 with 1, 26 with 2
        d_norm: Norm = "batch",
        spectral_norm: bool = False,
        gan_loss: AdvLoss = "bce",
        l1_weight: Weight = 100.0,
        adv_weight: Weight = 1.0,  # 0: L1 regression only
        lr_g: LR = None,
        lr_d: LR = None,
        plot_every_n_epochs: PlotEvery = 5,
    ):
        super().__init__()
        self._check_shape(input_shape, depth, d_stride_layers)
        self.save_hyperparameters()
        c = input_shape[0]
        self.generator = UNet(c, c, width, depth, g_norm, skips, dropout)
        self.discriminator = PatchDiscriminator(2 * c, d_width, d_stride_layers, d_norm, spectral_norm)
        self.targets_are_digits, self.gan_loss = targets_are_digits, gan_loss
        self.l1_weight, self.adv_weight, self.lr_g, self.lr_d = l1_weight, adv_weight, lr_g, lr_d
        self.plot_every_n_epochs = plot_every_n_epochs
        self._test: list[tuple[Tensor, ...]] = []

    def optimised_networks(self):
        return [("generator", self.generator, self.lr_g), ("discriminator", self.discriminator, self.lr_d)]

    def forward(self, x: Tensor) -> Tensor:
        return self.to_pixels(self.generator(self.to_model(x)))  # [0, 1] -> [0, 1]

    def smoke_forward(self, batch) -> Tensor:
        inp = self.to_model(batch[0])
        return self.discriminator(torch.cat([inp, self.generator(inp)], 1))

    def training_step(self, batch, batch_idx):
        opt_g, opt_d = self.optimizers()
        x, t = batch[0], batch[1]
        self._remember(x, t)
        inp, tgt = self.to_model(x), self.to_model(t)  # (B, C, S, S) in [-1, 1]
        fake = self.generator(inp)

        d_real = self.discriminator(torch.cat([inp, tgt], 1))  # (B, 1, h, w) patch logits
        d_fake = self.discriminator(torch.cat([inp, fake.detach()], 1))
        d_loss = losses.adversarial_d_loss(self.gan_loss, d_real, d_fake)
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(d_loss)
        opt_d.step()

        self.toggle_optimizer(opt_g)
        g_adv = losses.adversarial_g_loss(self.gan_loss, self.discriminator(torch.cat([inp, fake], 1)))
        l1 = (fake - tgt).abs().mean()  # in [-1, 1] units: twice the pixel L1
        g_loss = self.adv_weight * g_adv + self.l1_weight * l1
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(g_loss)
        opt_g.step()
        self.untoggle_optimizer(opt_g)
        self.log_train(d_loss=d_loss, g_loss=g_loss, g_adv=g_adv, l1=l1 / 2)

    def validation_step(self, batch, batch_idx):
        x, t = batch[0], batch[1]
        self._remember(x, t)
        self.log("val/l1", (self(x) - t).abs().mean(), on_epoch=True, prog_bar=True, batch_size=len(x),
                 sync_dist=True)

    def test_step(self, batch, batch_idx):
        x, t, y = batch
        self._test.append((x, self(x), t, y))

    def on_test_epoch_end(self):
        from litlab import quality

        if not self._test:
            return
        x, out, t, y = (torch.cat(parts) for parts in zip(*self._test))
        self._test = []
        values = {"l1": (out - t).abs().mean().item(), "l1_input": (x - t).abs().mean().item(),
                  "fid": quality.frechet_distance(out, t)}
        if self.targets_are_digits:
            values["class_accuracy"] = quality.class_accuracy(out, y)
            values["confidence"] = quality.confidence(out)
        for k, v in values.items():
            self.log(f"test/{k}", v, on_epoch=True, sync_dist=True)

    def sample_figure(self, epoch: int):
        if getattr(self, "_fixed", None) is None:
            return None
        x, t = (v.to(self.device) for v in self._fixed)
        return self._grid([x, self(x), t], f"pix2pix, epoch {epoch}: input / output / target")


@register_model("cyclegan", chapter=CHAPTER,
                description="CycleGAN on unpaired digit domains: two U-Net generators, two PatchGANs, LSGAN, cycle "
                            "+ identity losses",
                smoke={"model": {"width": 4, "d_width": 4, "depth": 2},
                       "data": {"name": "digit_domains", "task": "invert", "batch_size": 8}})
class CycleGAN(_Translation):
    def __init__(
        self,
        input_shape: ImageShape,
        width: Width = 32,
        depth: Depth = 3,
        g_norm: Norm = "instance",  # the paper's
        d_width: Width = 32,
        d_stride_layers: StrideLayers = 1,
        d_norm: Norm = "instance",
        spectral_norm: bool = False,
        gan_loss: AdvLoss = "lsgan",
        cycle_weight: Weight = 10.0,  # lambda_cyc
        identity_weight: Weight = 0.5,  # x lambda_cyc (the paper's 0.5); 0 switches it off
        lr_g: LR = None,
        lr_d: LR = None,
        plot_every_n_epochs: PlotEvery = 5,
    ):
        super().__init__()
        self._check_shape(input_shape, depth, d_stride_layers)
        self.save_hyperparameters()
        c = input_shape[0]
        self.generators = nn.ModuleDict({"ab": UNet(c, c, width, depth, g_norm), "ba": UNet(c, c, width, depth, g_norm)})
        self.discriminators = nn.ModuleDict({
            "a": PatchDiscriminator(c, d_width, d_stride_layers, d_norm, spectral_norm),
            "b": PatchDiscriminator(c, d_width, d_stride_layers, d_norm, spectral_norm)})
        self.gan_loss, self.cycle_weight, self.identity_weight = gan_loss, cycle_weight, identity_weight
        self.lr_g, self.lr_d, self.plot_every_n_epochs = lr_g, lr_d, plot_every_n_epochs
        self._test: list[tuple[Tensor, ...]] = []

    def optimised_networks(self):
        return [("generators", self.generators, self.lr_g), ("discriminators", self.discriminators, self.lr_d)]

    def forward(self, a: Tensor) -> Tensor:
        """G_AB in pixel units: (B, C, S, S) in [0, 1] -> the same in domain B."""
        return self.to_pixels(self.generators["ab"](self.to_model(a)))

    def backward_map(self, b: Tensor) -> Tensor:
        return self.to_pixels(self.generators["ba"](self.to_model(b)))

    def smoke_forward(self, batch) -> Tensor:
        return self.discriminators["b"](self.generators["ab"](self.to_model(batch[0])))

    def generator_losses(self, a: Tensor, b: Tensor) -> dict[str, Tensor]:
        """The generators' terms on model-range batches a, b: {adv, cycle[, identity], fake_a, fake_b}."""
        g_ab, g_ba = self.generators["ab"], self.generators["ba"]
        fake_b, fake_a = g_ab(a), g_ba(b)
        out = {"fake_a": fake_a, "fake_b": fake_b,
               "adv": (losses.adversarial_g_loss(self.gan_loss, self.discriminators["b"](fake_b))
                       + losses.adversarial_g_loss(self.gan_loss, self.discriminators["a"](fake_a))),
               "cycle": losses.cycle_loss(a, g_ba(fake_b)) + losses.cycle_loss(b, g_ab(fake_a))}
        if self.identity_weight > 0:  # a B image fed to G_AB should come out unchanged, and vice versa
            out["identity"] = losses.cycle_loss(a, g_ba(a)) + losses.cycle_loss(b, g_ab(b))
        return out

    def training_step(self, batch, batch_idx):
        opt_g, opt_d = self.optimizers()
        a, b = self.to_model(batch[0]), self.to_model(batch[1])  # unaligned (B, C, S, S) in [-1, 1]
        d_a, d_b = self.discriminators["a"], self.discriminators["b"]

        self.toggle_optimizer(opt_g)  # both generators; D_A, D_B frozen
        terms = self.generator_losses(a, b)
        fake_a, fake_b = terms.pop("fake_a"), terms.pop("fake_b")
        g_loss = terms["adv"] + self.cycle_weight * terms["cycle"]
        if "identity" in terms:
            g_loss = g_loss + self.identity_weight * self.cycle_weight * terms["identity"]
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(g_loss)
        opt_g.step()
        self.untoggle_optimizer(opt_g)

        d_loss = (losses.adversarial_d_loss(self.gan_loss, d_a(a), d_a(fake_a.detach()))
                  + losses.adversarial_d_loss(self.gan_loss, d_b(b), d_b(fake_b.detach())))
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(d_loss)
        opt_d.step()
        self.log_train(d_loss=d_loss, g_loss=g_loss, g_adv=terms.pop("adv"), **terms)

    def validation_step(self, batch, batch_idx):
        a, b = batch  # true pairs (x, T(x))
        self._remember(a, b)
        self.log("val/l1_ab", (self(a) - b).abs().mean(), on_epoch=True, prog_bar=True, batch_size=len(a),
                 sync_dist=True)
        self.log("val/l1_ba", (self.backward_map(b) - a).abs().mean(), on_epoch=True, batch_size=len(a),
                 sync_dist=True)

    def test_step(self, batch, batch_idx):
        a, b = batch
        fake_b = self(a)
        self._test.append((a, b, fake_b, self.backward_map(b), self.backward_map(fake_b)))

    def on_test_epoch_end(self):
        from litlab import quality

        if not self._test:
            return
        a, b, fake_b, fake_a, cycled = (torch.cat(parts) for parts in zip(*self._test))
        self._test = []
        values = {"l1_ab": (fake_b - b).abs().mean().item(), "l1_ba": (fake_a - a).abs().mean().item(),
                  "l1_identity": (a - b).abs().mean().item(), "cycle_l1": (cycled - a).abs().mean().item(),
                  "fid": quality.frechet_distance(fake_a, a)}
        for k, v in values.items():
            self.log(f"test/{k}", v, on_epoch=True, sync_dist=True)

    def sample_figure(self, epoch: int):
        if getattr(self, "_fixed", None) is None:
            return None
        a, b = (v.to(self.device) for v in self._fixed)
        fake_b = self(a)
        return self._grid([a, fake_b, b, self.backward_map(b), self.backward_map(fake_b)],
                          f"CycleGAN, epoch {epoch}: x / G_AB(x) / T(x) / G_BA(T(x)) / G_BA(G_AB(x))")
