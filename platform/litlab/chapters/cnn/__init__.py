"""Chapter 3, convolutional networks: LeNet-5, AlexNet, VGG, ResNet-18/34/50, MobileNet (importing registers them)."""

from litlab.chapters.cnn import module  # noqa: F401
