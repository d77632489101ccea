"""Chapter 8, generative adversarial networks: DCGAN (`gan`), Wasserstein GAN with weight clipping or
gradient penalty (`wgan`), class-conditional GAN (`cgan`), pix2pix (`pix2pix`) and CycleGAN
(`cyclegan`) (importing registers them)."""

from litlab.chapters.gan import module, translation  # noqa: F401
