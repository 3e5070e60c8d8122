"""The attention arithmetic every NSA prefill kernel repeats, as Triton jit helpers (base-2 online softmax).

A q.k dot is split into two power-of-two parts (D1 columns, then D2; D2 = 0: one part) so that d_k = 192 costs
128 + 64 columns (nsa.kernels.launch_args.split_dims); helpers that take (x1, x2) pairs pass the first part again
as the unused second one when D2 == 0. Scores are in base 2: s * qk_scale with qk_scale = scale * log2(e).
"""

from __future__ import annotations

import triton
import triton.language as tl

from nsa.kernels.tiles import add_store_at, desc_rows, load_at, load_tile

# Launchers pass qk_scale = scale * LOG2E: the helpers' softmax runs on exp2.
LOG2E = 1.4426950408889634


@triton.jit
def load_split(ptr, rows, ok, stride, DQK: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr):
    """The two column parts of rows ``stride`` apart from ptr (nsa.kernels.tiles.load_tile)."""
    x1 = load_tile(ptr, rows, ok, stride, 0, D1, DQK)
    x2 = x1
    if D2 > 0:
        x2 = load_tile(ptr, rows, ok, stride, D1, D2, DQK)
    return x1, x2


@triton.jit
def load_split_rows(ptr, desc1, desc2, row, head, rows, ok, stride, ROWS: tl.constexpr, TMA: tl.constexpr,
                    DQK: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr):
    """load_split of ROWS consecutive rows: through the descriptors (nsa.kernels.tiles.row_descriptors) at token row
    ``row`` of head ``head`` where TMA, which reads rows past ``ok`` too (the caller masks what they score);
    else from ptr (the first row of the tile, ``rows`` = 0 .. ROWS - 1), zeros where not ok."""
    if TMA:
        x1 = desc_rows(desc1, row, head, 0, ROWS, D1)
        x2 = x1
        if D2 > 0:
            x2 = desc_rows(desc2, row, head, D1, ROWS, D2)
    else:
        x1, x2 = load_split(ptr, rows, ok, stride, DQK, D1, D2)
    return x1, x2


@triton.jit
def load_split_at(ptr, offsets, ok, DQK: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr):
    """The two column parts of the rows at element offsets (gathered rows; nsa.kernels.tiles.load_at)."""
    x1 = load_at(ptr, offsets, ok, 0, D1, DQK)
    x2 = x1
    if D2 > 0:
        x2 = load_at(ptr, offsets, ok, D1, D2, DQK)
    return x1, x2


@triton.jit
def add_store_split_at(ptr, offsets, ok, x1, x2, ACCUMULATE: tl.constexpr, DQK: tl.constexpr, D1: tl.constexpr,
                       D2: tl.constexpr):
    """The two float32 column parts of the rows at element offsets, stored (ACCUMULATE: added) in ptr's dtype
    (nsa.kernels.tiles.add_store_at): the dq kernels' result."""
    add_store_at(ptr, offsets, ok, x1, ACCUMULATE, 0, D1, DQK)
    if D2 > 0:
        add_store_at(ptr, offsets, ok, x2, ACCUMULATE, D1, D2, DQK)


@triton.jit
def zeros_split(ROWS: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr):
    """float32 accumulators for the two column parts."""
    x1 = tl.zeros([ROWS, D1], tl.float32)
    x2 = x1
    if D2 > 0:
        x2 = tl.zeros([ROWS, D2], tl.float32)
    return x1, x2


@triton.jit
def scaled_scores(q1, q2, k1, k2, qk_scale, D2: tl.constexpr, PRECISION: tl.constexpr):
    """[M, N] base-2 scores (q . k) * scale * log2(e) of the q tiles against the k tiles."""
    s = tl.dot(q1, tl.trans(k1), input_precision=PRECISION)
    if D2 > 0:
        s += tl.dot(q2, tl.trans(k2), input_precision=PRECISION)
    return s * qk_scale


@triton.jit
def softmax_step(s, v, m_i, l_i, acc, PRECISION: tl.constexpr):
    """One online-softmax update of (row max m_i, row sum l_i, acc) with masked scores s [M, N] (-inf = masked)
    and values v [N, DV]. A row that has seen nothing yet keeps m_i = -inf and adds nothing (never NaN)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i * alpha + tl.sum(p, 1), acc


@triton.jit
def softmax_result(m_i, l_i, acc):
    """(normalised output, base-2 log-sum-exp); a row that saw nothing gets 0 and lse = +inf, so the backward's
    exp2(s - lse) is 0 there, never NaN."""
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    return out, tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("inf"))


@triton.jit
def row_delta(do, o):
    """delta [M] = dO . o per row: the softmax backward's row term and the gate's gradient (o: the branch's own,
    un-gated output, as the forward stored it)."""
    return tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)


@triton.jit
def dq_step(p, do, v, k1, k2, delta, dq1, dq2, D2: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate dq += (p (dp - delta)) k for one key tile (dp = dO . v, dO un-gated, delta from ``row_delta``);
    the caller scales the sum by g * scale."""
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = (p * (dp - delta[:, None])).to(k1.dtype)
    dq1 += tl.dot(ds, k1, input_precision=PRECISION)
    if D2 > 0:
        dq2 += tl.dot(ds, k2, input_precision=PRECISION)
    return dq1, dq2


@triton.jit
def dkdv_step(v, q1, q2, do, p_t, delta, dk1, dk2, dv, D2: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate dv += p^T dO and dk += (p (dp - delta))^T q for one tile of queries; p_t [N, M] is the transposed
    probability tile with the gate already applied, delta [M] the rows' dO . o. Also returns that tile's dS^T
    (p (dp - delta), [N, M], in q's dtype), from which dS k gives the rows' dq share (scaled by the caller)."""
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    ds_t = (p_t * (dp_t - delta[None, :])).to(q1.dtype)
    dk1 += tl.dot(ds_t, q1, input_precision=PRECISION)
    if D2 > 0:
        dk2 += tl.dot(ds_t, q2, input_precision=PRECISION)
    return dk1, dk2, dv, ds_t


@triton.jit
def gathered_dkdv_step(s_t, q1, q2, v, do_ptr, lse_ptr, delta_ptr, gate_ptr, do_rows, stats, gate_rows, row_ok, dk1,
                       dk2, dv, D2: tl.constexpr, DV: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
                       HAS_GATE: tl.constexpr):
    """dkdv_step for query rows gathered anywhere: s_t [N, M] their base-2 scores against the keys, -inf where a
    key is not seen; stats / gate_rows / do_rows each row's element offset into lse and delta ([tokens, HQ]
    float32), the gates and dO (row_ok False: a padding row, which adds nothing)."""
    lse = tl.load(lse_ptr + stats, mask=row_ok, other=float("inf"))
    delta = tl.load(delta_ptr + stats, mask=row_ok, other=0.0)
    p_t = tl.math.exp2(s_t - lse[None, :])
    if HAS_GATE:
        p_t = p_t * tl.load(gate_ptr + gate_rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
    do = load_at(do_ptr, do_rows, row_ok, 0, BLOCK_DV, DV)
    return dkdv_step(v, q1, q2, do, p_t, delta, dk1, dk2, dv, D2, PRECISION)
