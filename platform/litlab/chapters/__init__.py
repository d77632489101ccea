"""Course chapters; importing this package registers every chapter's models."""

from litlab.chapters import cnn, detection, mlp, rnn, seq2seq  # noqa: F401
