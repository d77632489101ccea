"""The losses of preference learning, as plain functions of tensors (tested against hand formulas).

Sequence log-likelihood of a completion y = y_1..y_L given its prompt x, from a causal LM over the
whole sequence s = (x, y) (teacher forcing, one forward pass):
    log pi(y | x) = sum_{t in completion} log pi(s_t | s_<t)          prompt and padding masked out

SFT (supervised fine-tuning) minimises the mean NLL of the completion tokens only.

Bradley-Terry reward model (Ouyang et al. 2022, RLHF step 2): P(y_w > y_l | x) = sigmoid(r(x, y_w) - r(x, y_l)),
    L_BT = -log sigmoid(r(x, y_w) - r(x, y_l))

DPO (Rafailov et al. 2023): the KL-regularised RL objective max E[r] - beta KL(pi || pi_ref) has the
optimum pi*(y|x) = pi_ref(y|x) exp(r(x,y) / beta) / Z(x), i.e. r(x,y) = beta log pi*(y|x)/pi_ref(y|x)
+ beta log Z(x). Put into Bradley-Terry, Z(x) cancels:
    L_DPO = -log sigmoid( beta [ (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)) ] )
with implicit rewards r_hat(x, y) = beta (log pi(y|x) - log pi_ref(y|x)). At pi = pi_ref: L = log 2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def token_logprobs(net, ids: Tensor) -> Tensor:
    """A causal LM `net` (ids (B, T) -> logits (B, T, V)) -> (B, T-1): log p(s_t | s_<t) for
    t = 1..T-1 (one forward pass over s_0..s_{T-2}, teacher forcing)."""
    logp = net(ids[:, :-1]).float().log_softmax(dim=-1)  # (B, T-1, V)
    return logp.gather(-1, ids[:, 1:, None]).squeeze(-1)


def sequence_logprob(token_lp: Tensor, mask: Tensor) -> Tensor:
    """token_lp (B, T-1) = log p(s_t | s_<t) for t = 1..T-1; mask (B, T) True on the completion
    tokens of s -> (B,) log pi(y | x) = sum over completion tokens (token 0 is BOS, never scored)."""
    return torch.where(mask[:, 1:], token_lp, 0.0).sum(dim=-1)  # where, not *: a masked -inf stays out


def completion_logprob(net, ids: Tensor, mask: Tensor) -> Tensor:
    """A causal LM `net` (ids (B, T) -> logits (B, T, V)) -> (B,) log pi(y | x) of each sequence."""
    return sequence_logprob(token_logprobs(net, ids), mask)


def sft_loss(net, ids: Tensor, mask: Tensor) -> Tensor:
    """Mean NLL (nats per token) of the completion tokens only; the prompt is context, not target."""
    lp = token_logprobs(net, ids)  # (B, T-1)
    m = mask[:, 1:]
    return -torch.where(m, lp, 0.0).sum() / m.sum().clamp_min(1)


def bradley_terry_loss(r_chosen: Tensor, r_rejected: Tensor) -> Tensor:
    """mean over pairs of -log sigmoid(r_w - r_l) (logsigmoid: stable for large margins)."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """Sequence log-probs (B,) each -> (mean DPO loss, implicit rewards of y_w (B,), of y_l (B,))."""
    reward_chosen = beta * (policy_chosen - ref_chosen)  # r_hat(x, y_w)
    reward_rejected = beta * (policy_rejected - ref_rejected)  # r_hat(x, y_l)
    loss = -F.logsigmoid(reward_chosen - reward_rejected).mean()
    return loss, reward_chosen.detach(), reward_rejected.detach()


@torch.no_grad()
def completion_mask_after(ids: Tensor, start: int, eos: int) -> Tensor:
    """Sampled ids (B, T) whose completion begins at position `start` -> (B, T) bool mask of the
    completion tokens up to and including the first EOS (everything if there is none)."""
    mask = torch.zeros_like(ids, dtype=torch.bool)
    tail = ids[:, start:]
    is_eos = (tail == eos).int()
    before_eos = (is_eos.cumsum(dim=1) - is_eos) == 0  # no EOS strictly before this position
    mask[:, start:] = before_eos
    return mask
