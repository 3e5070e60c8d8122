"""Teacher distillation: the training signal that moves SCOPE's pointers (SCOPE.md section 3).

The pointer mask is discrete and masked keys give no gradient, so D* and the budget logits learn
from a teacher instead. On a short segment, dense causal attention gives the attention mass of each
query block over the key blocks (averaged over the block's queries, local band removed and
renormalised): that is the target. The student is a differentiable inclusion probability of each
key block given the block's pointers:

    centre_m = (t_rep - D*_m) / block          (continuous block coordinate)
    radius_m = budget * softmax(u / temp)_m / 2 (soft half-width, in blocks)
    p_m(kb)  = sigmoid((radius_m - |kb + 1/2 - centre_m|) / tau)
    p(kb)    = 1 - prod_m (1 - p_m(kb))          (noisy-OR), zero for kb > qb and in the local band

Losses: coverage = cross entropy -sum_kb target(kb) log p(kb) over rows with teacher mass outside
the band; budget = ((sum_kb p(kb) - budget) / budget)^2, the expected extra blocks against the
budget. Both reach D* (through the centres) and the budget logits (through the radii).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from scope.config import ScopeConfig
from scope.errors import ScopeInputError
from scope.scope_attention import ScopeAttention, causal_representative_positions, representative_rows


class TeacherLoss(NamedTuple):
    total: Tensor  # coverage + budget_weight * budget
    coverage: Tensor
    budget: Tensor
    target_inclusion: Tensor  # sum_kb target * p: how much teacher mass the pointers cover (logged)


def teacher_block_targets(q: Tensor, k: Tensor, *, block: int, local_blocks: int, scale: float) -> Tensor:
    """Dense-attention mass per key block, local band removed: [B, H, QB, KB], rows sum to 1 or 0.

    q [B, H, T, D], k [B, H_kv, T, D] (rotated); T a multiple of block. Computed without gradient, in float32
    (float64 inputs: float64).
    """
    heads, seq_len = q.shape[1], q.shape[2]
    if seq_len % block != 0:
        raise ScopeInputError(f"teacher segment length T={seq_len} must be a multiple of block={block}")
    num_blocks = seq_len // block
    dtype = torch.promote_types(q.dtype, torch.float32)
    with torch.no_grad():
        # A query's mass on key block kb is its attention output over values that are the one-hot indicator of
        # the key's block: a fused SDPA kernel never holds the [T, T] probabilities (at 4k tokens and 32
        # sequences those were 11 GB per layer). Indicator columns padded to a multiple of 8 for its alignment.
        width = -(-num_blocks // 8) * 8
        indicator = torch.eye(num_blocks, width, device=q.device, dtype=dtype).repeat_interleave(block, dim=0)
        values = indicator.expand(q.shape[0], heads, seq_len, width).contiguous()
        k = k.to(dtype).repeat_interleave(heads // k.shape[1], dim=1)
        per_query = F.scaled_dot_product_attention(q.to(dtype), k, values, is_causal=True, scale=scale)
        mass = per_query[..., :num_blocks].unflatten(2, (num_blocks, block)).mean(3)
        mass = mass * outside_local_band(num_blocks, local_blocks, q.device)
        total = mass.sum(-1, keepdim=True)
        return torch.where(total > 0, mass / total.clamp_min(1e-30), 0.0)


def outside_local_band(num_blocks: int, local_blocks: int, device: torch.device) -> Tensor:
    """Bool [QB, KB]: key block kb is causal for query block qb and outside its local band."""
    qb = torch.arange(num_blocks, device=device)[:, None]
    kb = torch.arange(num_blocks, device=device)[None, :]
    return kb <= qb - local_blocks


def inclusion_probability(d_star: Tensor, budget_logits: Tensor, t_rep: Tensor, *, block: int, budget: int,
                          budget_temp: float, tau: float, local_blocks: int) -> Tensor:
    """Differentiable p(kb) [B, H, QB, KB] of each key block being covered by the block's pointers.

    d_star, budget_logits [B, H, QB, M] (representative rows); t_rep [QB] representative positions.
    """
    num_blocks = d_star.shape[2]
    centre = (t_rep.to(d_star.dtype)[:, None] - d_star) / block  # [B, H, QB, M]
    radius = budget * torch.softmax(budget_logits / budget_temp, dim=-1) / 2
    kb_mid = torch.arange(num_blocks, device=d_star.device, dtype=d_star.dtype) + 0.5
    distance = (kb_mid - centre[..., None]).abs()  # [B, H, QB, M, KB]
    p_peak = torch.sigmoid((radius[..., None] - distance) / tau)
    p = 1 - torch.prod(1 - p_peak, dim=3)
    return p * outside_local_band(num_blocks, local_blocks, d_star.device)


def teacher_loss(target: Tensor, inclusion: Tensor, budget: int, budget_weight: float = 0.1) -> TeacherLoss:
    """Coverage cross entropy on rows with teacher mass, plus the expected-budget penalty."""
    has_mass = target.sum(-1) > 0
    coverage_rows = -(target * torch.log(inclusion.clamp_min(1e-6))).sum(-1)
    coverage = (coverage_rows * has_mass).sum() / has_mass.sum().clamp_min(1)
    expected = inclusion.sum(-1)
    budget_term = (((expected - budget) / max(budget, 1)) ** 2).mean()
    covered = ((target * inclusion).sum(-1) * has_mass).sum() / has_mass.sum().clamp_min(1)
    return TeacherLoss(coverage + budget_weight * budget_term, coverage, budget_term, covered.detach())


def layer_teacher_loss(layer: torch.nn.Module, x: Tensor, *, tau: float = 0.5, budget_weight: float = 0.1,
                       step: int | None = None) -> TeacherLoss:
    """The teacher loss of a ScopeAttention layer on a short segment x [B, T, hidden] (T % block == 0)."""
    if not isinstance(layer, ScopeAttention):
        raise ScopeInputError(f"layer must be a ScopeAttention, got {type(layer).__name__}")
    config: ScopeConfig = layer.config
    seq_len = x.shape[1]
    if seq_len % config.block != 0:
        raise ScopeInputError(f"teacher segment length T={seq_len} must be a multiple of block={config.block}")
    num_blocks = seq_len // config.block
    q, k, _, q_content = layer.project(x, torch.arange(seq_len, device=x.device))
    target = teacher_block_targets(q, k, block=config.block, local_blocks=config.local_blocks, scale=layer.scale)
    params = layer.spectral.pointer_head(q_content, step)
    d_blk, u_blk = (representative_rows(values, num_blocks, config.block, config.representative)
                    for values in (params.d_star, params.budget_logits))
    t_rep = causal_representative_positions(num_blocks, config.block, config.representative, x.device)
    inclusion = inclusion_probability(d_blk, u_blk, t_rep, block=config.block, budget=config.budget,
                                      budget_temp=config.budget_temp, tau=tau, local_blocks=config.local_blocks)
    return teacher_loss(target, inclusion, config.budget, budget_weight)
