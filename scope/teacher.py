"""Teacher distillation: the training signal that moves SCOPE's pointers (SCOPE.md section 3).

The pointer mask is discrete and masked keys give no gradient, so D* and the budget logits learn
from a teacher instead. For a short segment of queries (a sequence's last rows, each against its
whole prefix, so the targets reach as far back as the sequence does), dense causal attention gives
the attention mass of each query block over the key blocks (averaged over the block's queries, local
band removed and renormalised): that is the target. The student is a differentiable inclusion
probability of each key block given the block's pointers:

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

from nsa.validation import check_real
from scope.config import ScopeConfig, check_step
from scope.errors import ScopeInputError
from scope.scope_attention import ScopeAttention, causal_representative_positions, representative_rows


class TeacherLoss(NamedTuple):
    total: Tensor  # coverage + budget_weight * budget
    coverage: Tensor
    budget: Tensor
    target_inclusion: Tensor  # sum_kb target * p: how much teacher mass the pointers cover (logged)


def teacher_block_targets(q: Tensor, k: Tensor, *, block: int, local_blocks: int, scale: float) -> Tensor:
    """Dense-attention mass per key block, local band removed: [B, H, QB, KB], rows sum to 1 or 0.

    q [B, H, Tq, D]: the last Tq query rows of a sequence whose keys are k [B, H_kv, T, D] (rotated; Tq <= T,
    both multiples of block): query block i is the sequence's block KB - QB + i, and each row sees the keys at
    or before its own position. Computed without gradient, in float32 (float64 inputs: float64).
    """
    heads, queries, seq_len = q.shape[1], q.shape[2], k.shape[2]
    for name, length in (("query rows Tq", queries), ("sequence length T", seq_len)):
        if length % block != 0:
            raise ScopeInputError(f"teacher {name}={length} must be a multiple of block={block}")
    if queries > seq_len:
        raise ScopeInputError(f"teacher query rows Tq={queries} must be <= the sequence length T={seq_len}")
    num_blocks = seq_len // block
    dtype = torch.promote_types(q.dtype, torch.float32)
    with torch.no_grad():
        # A query's mass on key block kb is its attention output over values that are the one-hot indicator of
        # the key's block: a fused SDPA kernel never holds the [Tq, T] probabilities (at 4k tokens and 32
        # sequences those were 11 GB per layer). Indicator columns padded to a multiple of 8 for its alignment.
        width = -(-num_blocks // 8) * 8
        indicator = torch.eye(num_blocks, width, device=q.device, dtype=dtype).repeat_interleave(block, dim=0)
        values = indicator.expand(q.shape[0], heads, seq_len, width).contiguous()
        k = k.to(dtype).repeat_interleave(heads // k.shape[1], dim=1)
        if queries == seq_len:
            causal: dict = {"is_causal": True}
        else:  # imported here: torch.nn.attention.bias imports torch._dynamo, too heavy for `import scope`
            from torch.nn.attention.bias import causal_lower_right

            causal = {"attn_mask": causal_lower_right(queries, seq_len)}
        per_query = F.scaled_dot_product_attention(q.to(dtype), k, values, scale=scale, **causal)
        mass = per_query[..., :num_blocks].unflatten(2, (queries // block, block)).mean(3)
        mass = mass * outside_local_band(last_query_blocks(queries // block, num_blocks, q.device), num_blocks,
                                         local_blocks)
        total = mass.sum(-1, keepdim=True)
        return torch.where(total > 0, mass / total.clamp_min(1e-30), 0.0)


def last_query_blocks(count: int, num_blocks: int, device: torch.device) -> Tensor:
    """int64 [count]: the indices of a sequence's last ``count`` of ``num_blocks`` blocks."""
    return torch.arange(num_blocks - count, num_blocks, device=device)


def outside_local_band(query_blocks: Tensor, num_blocks: int, local_blocks: int) -> Tensor:
    """Bool [QB, KB]: key block kb (of num_blocks) is causal for query block query_blocks[i] and outside its local
    band."""
    kb = torch.arange(num_blocks, device=query_blocks.device)[None, :]
    return kb <= query_blocks[:, None] - local_blocks


def inclusion_probability(d_star: Tensor, budget_logits: Tensor, t_rep: Tensor, *, block: int, budget: int,
                          budget_temp: float, tau: float, local_blocks: int, num_blocks: int | None = None
                          ) -> Tensor:
    """Differentiable p(kb) [B, H, QB, KB] of each key block being covered by the block's pointers.

    d_star, budget_logits [B, H, QB, M] (representative rows) of a sequence's last QB query blocks (all of them
    when num_blocks, the sequence's KB, is None); t_rep [QB] their representative positions. tau: the sigmoid's
    temperature, a finite number > 0 (ScopeInputError naming it otherwise: 0 or NaN makes p NaN).
    """
    check_real("tau", tau, error=ScopeInputError, above=0.0)
    num_blocks = d_star.shape[2] if num_blocks is None else num_blocks
    centre = (t_rep.to(d_star.dtype)[:, None] - d_star) / block  # [B, H, QB, M]
    radius = budget * torch.softmax(budget_logits / budget_temp, dim=-1) / 2
    kb_mid = torch.arange(num_blocks, device=d_star.device, dtype=d_star.dtype) + 0.5
    distance = (kb_mid - centre[..., None]).abs()  # [B, H, QB, M, KB]
    p_peak = torch.sigmoid((radius[..., None] - distance) / tau)
    p = 1 - torch.prod(1 - p_peak, dim=3)
    query_blocks = last_query_blocks(d_star.shape[2], num_blocks, d_star.device)
    return p * outside_local_band(query_blocks, num_blocks, local_blocks)


def teacher_loss(target: Tensor, inclusion: Tensor, budget: int, budget_weight: float = 0.1) -> TeacherLoss:
    """Coverage cross entropy on rows with teacher mass, plus the expected-budget penalty weighted by budget_weight,
    a finite number >= 0 (ScopeInputError naming it otherwise)."""
    check_real("budget_weight", budget_weight, error=ScopeInputError, at_least=0.0)
    has_mass = target.sum(-1) > 0
    coverage_rows = -(target * torch.log(inclusion.clamp_min(1e-6))).sum(-1)
    coverage = (coverage_rows * has_mass).sum() / has_mass.sum().clamp_min(1)
    expected = inclusion.sum(-1)
    budget_term = (((expected - budget) / max(budget, 1)) ** 2).mean()
    covered = ((target * inclusion).sum(-1) * has_mass).sum() / has_mass.sum().clamp_min(1)
    return TeacherLoss(coverage + budget_weight * budget_term, coverage, budget_term, covered.detach())


def layer_teacher_loss(layer: torch.nn.Module, x: Tensor, *, queries: int | None = None, tau: float = 0.5,
                       budget_weight: float = 0.1, step: int | None = None) -> TeacherLoss:
    """The teacher loss of a ScopeAttention layer on x [B, T, hidden] (T % block == 0): the last ``queries`` rows
    (an int, not a bool, in 1..T and a multiple of block; None: all T) against their whole causal prefix, so a
    short segment of queries still teaches pointers as far back as the sequence reaches. tau: a finite number
    > 0; budget_weight: a finite number >= 0; step: None or an int >= 0. ScopeInputError naming the argument
    otherwise, raised before anything is computed."""
    if not isinstance(layer, ScopeAttention):
        raise ScopeInputError(f"layer must be a ScopeAttention, got {type(layer).__name__}")
    layer.check_input(x)
    check_real("tau", tau, error=ScopeInputError, above=0.0)
    check_real("budget_weight", budget_weight, error=ScopeInputError, at_least=0.0)
    check_step(step)
    config: ScopeConfig = layer.config
    seq_len = x.shape[1]
    queries = seq_len if queries is None else queries
    if seq_len % config.block != 0:
        raise ScopeInputError(f"teacher segment length T={seq_len} must be a multiple of block={config.block}")
    if isinstance(queries, bool) or not isinstance(queries, int) or not 0 < queries <= seq_len:
        raise ScopeInputError(f"teacher queries={queries!r} must be None or an int in 1..T={seq_len}")
    num_blocks, query_blocks = seq_len // config.block, queries // config.block
    q, k, _, q_content = layer.project(x, None)
    target = teacher_block_targets(q[:, :, seq_len - queries:], k, block=config.block,
                                   local_blocks=config.local_blocks, scale=layer.scale)
    params = layer.spectral.pointer_head(q_content, step)
    d_blk, u_blk = (representative_rows(values, num_blocks, config.block, config.representative)[:, :, -query_blocks:]
                    for values in (params.d_star, params.budget_logits))
    t_rep = causal_representative_positions(num_blocks, config.block, config.representative, x.device)
    inclusion = inclusion_probability(d_blk, u_blk, t_rep[-query_blocks:], block=config.block, budget=config.budget,
                                      budget_temp=config.budget_temp, tau=tau, local_blocks=config.local_blocks,
                                      num_blocks=num_blocks)
    return teacher_loss(target, inclusion, config.budget, budget_weight)
