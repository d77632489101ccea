"""Chapter 3, convolutional networks: a YOLO-style single-shot detector (importing registers it)."""

from litlab.chapters.detection import module  # noqa: F401
