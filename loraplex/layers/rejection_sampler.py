"""Verification of draft tokens that keeps the target's distribution exact.

The ngram proposer's draft is deterministic (its q is one-hot on the draft token d), so
speculative sampling's rule min(1, p(d) / q(d)) becomes: accept d with probability p(d);
on rejection sample from p with d removed, renormalized ((p - q)+ / sum). The emitted
token then has P(d) = p(d) and P(x) = (1 - p(d)) p(x) / (1 - p(d)) = p(x) for x != d:
exactly p, whatever the draft. Greedy rows need no rule: the draft is accepted when it
is the argmax, and the argmax is emitted either way.

A draft model's sampled draft comes with the distribution q it was drawn from: the
general rule then, accept d with probability min(1, p(d) / q(d)), on rejection sample
from (p - q)+ normalized. P(emit x) = q(x) min(1, p(x)/q(x)) + P(reject) (p(x) -
q(x))+ / sum (p - q)+ = min(q(x), p(x)) + (p(x) - q(x))+ = p(x), since P(reject) =
1 - sum min(p, q) = sum (p - q)+.
"""

from __future__ import annotations

import torch


def accept_or_resample(probs: torch.Tensor, drafts: torch.Tensor, uniform: torch.Tensor,
                       q: torch.Tensor, draft_probs: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: (emitted token, whether it is the accepted draft).

    probs: [B, V] the distribution to sample from (>= 0, need not sum to 1: top-k/top-p/
    min-p zero entries without renormalizing); drafts: [B] long, -1 = no draft (the row
    samples from probs); uniform: [B] in [0, 1), the acceptance draw; q: [B, V] ~ Exp(1),
    the exponential race's draws (argmax(p / q) samples from p); draft_probs: [B, V] the
    distribution each row's draft was drawn from (None: every draft deterministic)."""
    has_draft = drafts >= 0
    draft = drafts.clamp_min(0)[:, None]
    total = probs.sum(dim=1)
    p_draft = probs.gather(1, draft).squeeze(1) / total
    if draft_probs is None:
        accepted = has_draft & (uniform < p_draft)
        residual = torch.where(has_draft[:, None], probs.scatter(1, draft, 0.0), probs)
    else:  # u < p / q, as u q < p (q(d) > 0: d was drawn from q)
        accepted = has_draft & (uniform * draft_probs.gather(1, draft).squeeze(1) < p_draft)
        residual = (probs / total[:, None] - draft_probs).clamp_min(0.0)
        # p = q up to rounding leaves no residual mass: p itself (rejection then only
        # happens by rounding, and p is what the row would sample anyway)
        usable = has_draft[:, None] & (residual.sum(dim=1, keepdim=True) > 0)
        residual = torch.where(usable, residual, probs)
    resampled = (residual / q).argmax(dim=1)
    return torch.where(accepted, draft.squeeze(1), resampled), accepted
