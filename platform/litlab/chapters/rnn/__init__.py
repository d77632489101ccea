"""Chapter 4, recurrent networks: RNN/LSTM/GRU cells from the equations (cells.py), the recall task
and vanishing gradients (`rnn_recall`), a character language model (`char_lm`); importing registers them."""

from litlab.chapters.rnn import lm, module  # noqa: F401
