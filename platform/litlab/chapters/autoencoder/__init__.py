"""Chapter 7, autoencoders: deterministic autoencoder, VAE and beta-VAE on images in [0, 1] (importing registers them)."""

from litlab.chapters.autoencoder import module  # noqa: F401
