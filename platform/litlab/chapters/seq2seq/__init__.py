"""Chapter 4, recurrent networks: the seq2seq encoder-decoder, with the fixed-size bottleneck or
Bahdanau / Luong attention (importing registers `seq2seq`)."""

from litlab.chapters.seq2seq import module  # noqa: F401
