"""Course chapters; importing this package registers every chapter's models."""

from litlab.chapters import cnn, mlp  # noqa: F401
