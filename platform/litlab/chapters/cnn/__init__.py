"""Chapter 3, convolutional networks: LeNet-5 and residual networks (importing registers them)."""

from litlab.chapters.cnn import module  # noqa: F401
