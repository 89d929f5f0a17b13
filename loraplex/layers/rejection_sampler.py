"""Verification of draft tokens that keeps the target's distribution exact.

The ngram proposer's draft is deterministic (its q is one-hot on the draft token d), so
speculative sampling's rule min(1, p(d) / q(d)) becomes: accept d with probability p(d);
on rejection sample from p with d removed, renormalized ((p - q)+ / sum). The emitted
token then has P(d) = p(d) and P(x) = (1 - p(d)) p(x) / (1 - p(d)) = p(x) for x != d:
exactly p, whatever the draft. Greedy rows need no rule: the draft is accepted when it
is the argmax, and the argmax is emitted either way.
"""

from __future__ import annotations

import torch


def accept_or_resample(probs: torch.Tensor, drafts: torch.Tensor, uniform: torch.Tensor,
                       q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: (emitted token, whether it is the accepted draft).

    probs: [B, V] the distribution to sample from (>= 0, need not sum to 1: top-k/top-p/
    min-p zero entries without renormalizing); drafts: [B] long, -1 = no draft (the row
    samples from probs); uniform: [B] in [0, 1), the acceptance draw; q: [B, V] ~ Exp(1),
    the exponential race's draws (argmax(p / q) samples from p)."""
    has_draft = drafts >= 0
    draft = drafts.clamp_min(0)[:, None]
    p_draft = probs.gather(1, draft).squeeze(1) / probs.sum(dim=1)
    accepted = has_draft & (uniform < p_draft)
    residual = torch.where(has_draft[:, None], probs.scatter(1, draft, 0.0), probs)
    resampled = (residual / q).argmax(dim=1)
    return torch.where(accepted, draft.squeeze(1), resampled), accepted
