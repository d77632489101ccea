"""Chapter 5-6: attention and transformers.

attention.py (the attention function with its five backends), positional.py (sinusoidal, learned,
rotary), layers.py (multi-head attention, KV cache, feed-forward, post-/pre-LN blocks),
performer.py (FAVOR+), sparse.py (sliding window, BigBird), translation.py (the registered
encoder-decoder `transformer_seq2seq`).
"""

from litlab.chapters.transformer import translation  # noqa: F401  (registers transformer_seq2seq)
