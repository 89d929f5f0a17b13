"""Sparse mixture of experts (Mixtral's block_sparse_moe, Qwen2-MoE's and Qwen3-MoE's mlp).

    p = softmax(W_g x)                      router over E experts
    top-k experts e of p, weights w_e = p_e / sum of the top-k p
                                            (Qwen3-MoE without norm_topk_prob: w_e = p_e)
    y = sum_e w_e * W2_e (silu(W1_e x) * W3_e x)

Each expert is a SwiGLU MLP; its gate and up projections are stacked as w13 [E, 2I, H]
(W1 then W3; Qwen's gate_proj and up_proj) and its down projection as w2 [E, H, I].
Qwen2-MoE adds a shared expert every token goes through, weighted by a sigmoid gate:
y += sigmoid(w_s . x) * shared_expert(x). Tokens are grouped by expert on
the host (one matmul pair per expert that has tokens), so the decode step of a MoE model
runs without CUDA graphs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.layers.linear import make_linear


class SparseMoE(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int,
                 top_k: int, normalize: bool = True, shared_expert: nn.Module | None = None
                 ) -> None:
        super().__init__()
        self.shared_expert = shared_expert
        self.shared_expert_gate = make_linear(hidden_size, [1]) if shared_expert else None
        self.intermediate_size, self.top_k, self.normalize = intermediate_size, top_k, normalize
        self.gate = make_linear(hidden_size, [num_experts])  # the router
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        weights, experts = probs.topk(self.top_k, dim=-1)  # [T, k]
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        for e in experts.unique().tolist():
            rows, k = (experts == e).nonzero(as_tuple=True)
            gate, up = (x[rows] @ self.w13[e].T).chunk(2, dim=-1)
            y = (F.silu(gate) * up) @ self.w2[e].T
            out.index_add_(0, rows, y * weights[rows, k, None])
        if self.shared_expert is not None:
            out += torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out

    def load_expert(self, expert: int, name: str, tensor: torch.Tensor) -> str:
        """An HF checkpoint's experts.{expert}.{name}.weight (Mixtral's w1 / w3 / w2, Qwen's
        gate_proj / up_proj / down_proj) into the stacks; returns the parameter it went
        into."""
        i = self.intermediate_size
        gate, up, down = (self.w13, slice(0, i)), (self.w13, slice(i, 2 * i)), (self.w2, slice(None))
        target = {"w1": gate, "gate_proj": gate, "w3": up, "up_proj": up, "w2": down,
                  "down_proj": down}.get(name)
        if target is None:
            raise ValueError(f"unexpected expert weight {name!r} (expected w1, w2, w3 or "
                             "gate_proj, up_proj, down_proj)")
        param, rows = target
        dst = param.data[expert, rows]
        if dst.shape != tensor.shape:
            raise ValueError(f"expert {expert} {name} has shape {tuple(tensor.shape)}, the "
                             f"model expects {tuple(dst.shape)}")
        dst.copy_(tensor)
        return "w13" if target[0] is self.w13 else "w2"
