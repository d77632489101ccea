"""Preference learning (chapter 12): data in litlab/data/preferences.py (pairs whose chosen completion
has a checkable property); losses.py (SFT, Bradley-Terry, DPO, masked sequence log-probs), nets.py
(reward model, sampling + property check), reference.py (load or fit the DPO reference),
module.py (`sft`, `reward_model`), dpo.py (`dpo`); importing registers them."""

from litlab.chapters.preference import dpo, module  # noqa: F401
