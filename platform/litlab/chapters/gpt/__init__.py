"""GPT (chapter 5-6) and mixture of experts (chapter 12): nets.py (the decoder-only GPT nn.Module),
sampling.py (temperature / top-k / greedy decoding with a KV cache), moe.py (noisy top-k router,
load-balancing loss, MoE FFN), module.py (`gpt`), moe_module.py (`gpt_moe`); importing registers them."""

from litlab.chapters.gpt import module, moe_module  # noqa: F401
