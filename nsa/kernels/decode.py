"""Fused single-token NSA decode on Triton: flash-decoding over the three branches.

One decode step of a batch reads, per (sequence, KV head), the visible compressed blocks, the n
selected blocks and the w-token window ring, once for all G query heads of the group (GQA: the G
rows form the M side of every tl.dot, so a group's keys are loaded once, not G times).

Launches (all grids from host-known bounds, so a step is CUDA-graph capturable):
1. cmp_partials: grid (B*Hkv, num_splits). Each split scans a range of compressed blocks, writes
   the raw scaled logits (selection needs the normalised probabilities, which need the global
   log-sum-exp) and a flash-decoding partial (row max m, row sum l, unnormalised acc).
2. cmp_group_probs: grid (B*Hkv, num_splits). Merges the m/l partials into each head's lse and
   writes p_grp[n] = sum_g exp(logit[g, n] - lse[g]) (Eq. 8 + Eq. 10) for every visible block.
3. select_topn: grid (B*Hkv,). Eq. 9 and top-n with the rule of nsa.selection_scorer.topn_blocks
   (forced blocks, complete candidates, ties to the lower index).
4. sel_win_partials: grid (B*Hkv, n + window tiles). One program per selected block (tokens <= t)
   and per tile of the window ring (slots holding positions t-w+1..t).
5. combine: grid (B*Hkv,). Merges the partials of each branch and applies the gates.

Layouts (strides passed; only the last dimension of each tensor must be contiguous): q [B, HQ, Dk]; gates [B, HQ, 3];
positions [B] (absolute position t of the new token, already written to the cache); k/v buffers
[B, rows, Hkv, D] as in NSAKVCache; block_indices [B, Hkv, n] int64 (-1 = unused).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nsa.functional import NSASizes

BLOCK_N_CMP = 64  # compressed blocks per tile
BLOCK_W = 64  # window ring slots per tile
PROGRAMS_PER_SM = 8  # compressed-branch splits: about this many programs per SM (several waves balance the tail)


@triton.jit
def _load_group_queries(q_ptr, stride_qb, stride_qh, b, h, G: tl.constexpr, DK: tl.constexpr,
                        BLOCK_G: tl.constexpr, BLOCK_DK: tl.constexpr):
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_DK)
    ptrs = q_ptr + b * stride_qb + (h * G + offs_g)[:, None] * stride_qh + offs_d[None, :]
    return tl.load(ptrs, mask=(offs_g < G)[:, None] & (offs_d < DK)[None, :], other=0.0)


@triton.jit
def _attend_tile(q, k_ptr, v_ptr, rows, valid, stride_kr, stride_vr, scale, m, l, acc,
                 DK: tl.constexpr, DV: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Online-softmax update of (m, l, acc) [BLOCK_G], [BLOCK_G], [BLOCK_G, BLOCK_DV] with the keys at
    `rows` (k_ptr/v_ptr already point at this sequence and head). Returns (m, l, acc, scores)."""
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = tl.load(k_ptr + rows[:, None] * stride_kr + offs_dk[None, :],
                mask=valid[:, None] & (offs_dk < DK)[None, :], other=0.0)
    scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    scores = tl.where(valid[None, :], scores, float("-inf"))
    m_new = tl.maximum(m, tl.max(scores, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # an all-masked row must not give NaN
    alpha = tl.exp(m - m_safe)
    p = tl.exp(scores - m_safe[:, None])
    v = tl.load(v_ptr + rows[:, None] * stride_vr + offs_dv[None, :],
                mask=valid[:, None] & (offs_dv < DV)[None, :], other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return m_new, l * alpha + tl.sum(p, axis=1), acc, scores


@triton.jit
def _store_partial(m_ptr, l_ptr, acc_ptr, count_ptr, bh, slot, num_slots, m, l, acc, count,
                   BLOCK_G: tl.constexpr, BLOCK_DV: tl.constexpr):
    offs_g = tl.arange(0, BLOCK_G)
    offs_dv = tl.arange(0, BLOCK_DV)
    base = bh * num_slots + slot
    tl.store(count_ptr + base, count)
    tl.store(m_ptr + base * BLOCK_G + offs_g, m)
    tl.store(l_ptr + base * BLOCK_G + offs_g, l)
    tl.store(acc_ptr + (base * BLOCK_G + offs_g)[:, None] * BLOCK_DV + offs_dv[None, :], acc)


@triton.jit
def _num_visible_cmp(t, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr):
    """Compressed blocks visible to the query at position t: i*d + l - 1 <= t."""
    return tl.where(t >= CMP_BLOCK - 1, (t - CMP_BLOCK + 1) // CMP_STRIDE + 1, 0)


@triton.jit
def _cmp_partials_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, logits_ptr, m_ptr, l_ptr, acc_ptr, count_ptr,
    stride_qb, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    scale, logits_cols, num_slots,
    HKV: tl.constexpr, G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, CMP_BLOCK: tl.constexpr,
    CMP_STRIDE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr, TILES_PER_SPLIT: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    num_visible = _num_visible_cmp(tl.load(pos_ptr + b), CMP_BLOCK, CMP_STRIDE)
    q = _load_group_queries(q_ptr, stride_qb, stride_qh, b, h, G, DK, BLOCK_G, BLOCK_DK)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
    first = split * TILES_PER_SPLIT * BLOCK_N
    offs_g = tl.arange(0, BLOCK_G)
    count = tl.zeros([], tl.int32)
    # No branch on the visible count inside the loop (a conditional body is not software-pipelined):
    # tiles past it are fully masked, which loads no memory and leaves (m, l, acc) unchanged.
    for i in range(0, TILES_PER_SPLIT):
        rows = first + i * BLOCK_N + tl.arange(0, BLOCK_N)
        valid = rows < num_visible
        count += tl.sum(valid.to(tl.int32))
        m, l, acc, scores = _attend_tile(q, k_ptr + b * stride_kb + h * stride_kh,
                                         v_ptr + b * stride_vb + h * stride_vh, rows, valid,
                                         stride_kn, stride_vn, scale, m, l, acc, DK, DV, BLOCK_DK, BLOCK_DV)
        tl.store(logits_ptr + (bh * BLOCK_G + offs_g)[:, None] * logits_cols + rows[None, :], scores,
                 mask=(offs_g < G)[:, None] & valid[None, :])
    _store_partial(m_ptr, l_ptr, acc_ptr, count_ptr, bh, split, num_slots, m, l, acc, count, BLOCK_G, BLOCK_DV)


@triton.jit
def _partials_max(m_ptr, bh, first_slot, count: tl.constexpr, num_slots, BLOCK_G: tl.constexpr):
    """Row max per head over partial slots [first_slot, first_slot + count), 0 where all are empty
    (a finite shift, so exp(m - max) of an empty slot is 0, never NaN)."""
    offs_g = tl.arange(0, BLOCK_G)
    m_all = tl.full([BLOCK_G], float("-inf"), tl.float32)
    for s in range(0, count):
        m_all = tl.maximum(m_all, tl.load(m_ptr + (bh * num_slots + first_slot + s) * BLOCK_G + offs_g))
    return tl.where(m_all == float("-inf"), 0.0, m_all)


@triton.jit
def _merged_lse(m_ptr, l_ptr, bh, first_slot, count: tl.constexpr, num_slots, BLOCK_G: tl.constexpr):
    """Log-sum-exp per head over partial slots [first_slot, first_slot + count); -inf if all empty."""
    offs_g = tl.arange(0, BLOCK_G)
    m_safe = _partials_max(m_ptr, bh, first_slot, count, num_slots, BLOCK_G)
    total = tl.zeros([BLOCK_G], tl.float32)
    for s in range(0, count):
        base = (bh * num_slots + first_slot + s) * BLOCK_G + offs_g
        total += tl.load(l_ptr + base) * tl.exp(tl.load(m_ptr + base) - m_safe)
    return tl.where(total > 0, m_safe + tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))


@triton.jit
def _cmp_group_probs_kernel(
    pos_ptr, logits_ptr, m_ptr, l_ptr, probs_ptr, logits_cols, probs_cols, num_slots,
    HKV: tl.constexpr, G: tl.constexpr, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, TILES_PER_SPLIT: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    num_visible = _num_visible_cmp(tl.load(pos_ptr + bh // HKV), CMP_BLOCK, CMP_STRIDE)
    lse = _merged_lse(m_ptr, l_ptr, bh, 0, NUM_SPLITS, num_slots, BLOCK_G)
    lse = tl.where(lse == float("-inf"), 0.0, lse)  # no visible block: every logit below is masked anyway
    offs_g = tl.arange(0, BLOCK_G)
    for i in range(0, TILES_PER_SPLIT):
        cols = (split * TILES_PER_SPLIT + i) * BLOCK_N + tl.arange(0, BLOCK_N)
        valid = cols < num_visible
        logits = tl.load(logits_ptr + (bh * BLOCK_G + offs_g)[:, None] * logits_cols + cols[None, :],
                         mask=(offs_g < G)[:, None] & valid[None, :], other=float("-inf"))
        probs = tl.sum(tl.exp(logits - lse[:, None]), axis=0)
        tl.store(probs_ptr + bh * probs_cols + cols, probs, mask=cols < probs_cols)


@triton.jit
def _select_topn_kernel(
    probs_ptr, pos_ptr, idx_ptr, probs_cols, num_sel_blocks,
    HKV: tl.constexpr, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, SEL_BLOCK: tl.constexpr,
    NUM_SELECTED: tl.constexpr, BLOCK_NSEL: tl.constexpr, BLOCK_OUT: tl.constexpr,
):
    """Eq. 9 and top-n for one (sequence, KV head), the rule of nsa.selection_scorer.topn_blocks:
    forced blocks {0, t // l', t // l' - 1} first, then the best complete blocks, ties to the lower
    index (argmax breaks ties to the left), result ascending and padded with -1."""
    bh = tl.program_id(0)
    t = tl.load(pos_ptr + bh // HKV)
    blocks = tl.arange(0, BLOCK_NSEL)
    in_range = blocks < num_sel_blocks
    # Eq. 9 as the strided correlation of nsa.block_index.overlap_kernel: compressed block
    # j * (l'/d) + u overlaps selection block j by min(u*d + l, l') - max(u*d, 0) tokens.
    score = tl.zeros([BLOCK_NSEL], tl.float32)
    for k in tl.static_range(CMP_BLOCK // CMP_STRIDE - 1 + SEL_BLOCK // CMP_STRIDE):
        start = (k - (CMP_BLOCK // CMP_STRIDE - 1)) * CMP_STRIDE
        overlap = tl.minimum(start + CMP_BLOCK, SEL_BLOCK) - tl.maximum(start, 0)
        weight = tl.maximum(overlap, 0).to(tl.float32) / CMP_BLOCK
        src = blocks * (SEL_BLOCK // CMP_STRIDE) + k - (CMP_BLOCK // CMP_STRIDE - 1)
        probs = tl.load(probs_ptr + bh * probs_cols + src, mask=in_range & (src >= 0) & (src < probs_cols), other=0.0)
        score += weight * probs
    current = t // SEL_BLOCK
    chosen = in_range & ((blocks == 0) | (blocks == current) | (blocks == current - 1))
    key = tl.where(in_range & ~chosen & ((blocks + 1) * SEL_BLOCK <= t + 1), score, float("-inf"))
    remaining = NUM_SELECTED - tl.sum(chosen.to(tl.int32))
    for i in tl.static_range(NUM_SELECTED):
        best = tl.argmax(key, axis=0, tie_break_left=True)
        take = (i < remaining) & (tl.max(key, axis=0) > float("-inf"))
        chosen = chosen | ((blocks == best) & take)
        key = tl.where(blocks == best, float("-inf"), key)
    rank = tl.cumsum(chosen.to(tl.int32), axis=0) - 1
    tl.store(idx_ptr + bh * NUM_SELECTED + rank, blocks.to(tl.int64), mask=chosen)
    slots = tl.arange(0, BLOCK_OUT)
    tl.store(idx_ptr + bh * NUM_SELECTED + slots, tl.full([BLOCK_OUT], -1, tl.int64),
             mask=(slots >= tl.sum(chosen.to(tl.int32))) & (slots < NUM_SELECTED))


@triton.jit
def _sel_win_partials_kernel(
    q_ptr, k_sel_ptr, v_sel_ptr, k_win_ptr, v_win_ptr, pos_ptr, idx_ptr, m_ptr, l_ptr, acc_ptr, count_ptr,
    stride_qb, stride_qh, stride_ksb, stride_ksn, stride_ksh, stride_vsb, stride_vsn, stride_vsh,
    stride_kwb, stride_kwn, stride_kwh, stride_vwb, stride_vwn, stride_vwh, stride_ib, stride_ih,
    scale, first_slot, num_slots,
    HKV: tl.constexpr, G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, NUM_SELECTED: tl.constexpr,
    SEL_BLOCK: tl.constexpr, WINDOW: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_SEL: tl.constexpr, BLOCK_W: tl.constexpr,
):
    bh = tl.program_id(0)
    tile = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    t = tl.load(pos_ptr + b)
    q = _load_group_queries(q_ptr, stride_qb, stride_qh, b, h, G, DK, BLOCK_G, BLOCK_DK)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
    count = tl.zeros([], tl.int32)
    if tile < NUM_SELECTED:
        block = tl.load(idx_ptr + b * stride_ib + h * stride_ih + tile)
        offs = tl.arange(0, BLOCK_SEL)
        rows = block * SEL_BLOCK + offs
        valid = (block >= 0) & (offs < SEL_BLOCK) & (rows <= t)
        count = tl.sum(valid.to(tl.int32))
        m, l, acc, _ = _attend_tile(q, k_sel_ptr + b * stride_ksb + h * stride_ksh,
                                    v_sel_ptr + b * stride_vsb + h * stride_vsh, rows, valid,
                                    stride_ksn, stride_vsn, scale, m, l, acc, DK, DV, BLOCK_DK, BLOCK_DV)
    else:
        # Ring slot s holds the latest position p <= t with p % w == s: p = t - ((t - s) mod w).
        slots = (tile - NUM_SELECTED) * BLOCK_W + tl.arange(0, BLOCK_W)
        lag = ((t - slots) % WINDOW + WINDOW) % WINDOW
        valid = (slots < WINDOW) & (t - lag >= 0)
        count = tl.sum(valid.to(tl.int32))
        m, l, acc, _ = _attend_tile(q, k_win_ptr + b * stride_kwb + h * stride_kwh,
                                    v_win_ptr + b * stride_vwb + h * stride_vwh, slots, valid,
                                    stride_kwn, stride_vwn, scale, m, l, acc, DK, DV, BLOCK_DK, BLOCK_DV)
    _store_partial(m_ptr, l_ptr, acc_ptr, count_ptr, bh, first_slot + tile, num_slots, m, l, acc, count,
                   BLOCK_G, BLOCK_DV)


@triton.jit
def _merged_output(m_ptr, l_ptr, acc_ptr, bh, first_slot, count: tl.constexpr, num_slots,
                   BLOCK_G: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Normalised attention output [BLOCK_G, BLOCK_DV] from partial slots; 0 for rows that read nothing."""
    offs_g = tl.arange(0, BLOCK_G)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_safe = _partials_max(m_ptr, bh, first_slot, count, num_slots, BLOCK_G)
    total = tl.zeros([BLOCK_G], tl.float32)
    out = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
    for s in range(0, count):
        base = (bh * num_slots + first_slot + s) * BLOCK_G + offs_g
        weight = tl.exp(tl.load(m_ptr + base) - m_safe)
        total += tl.load(l_ptr + base) * weight
        out += tl.load(acc_ptr + base[:, None] * BLOCK_DV + offs_dv[None, :]) * weight[:, None]
    return out / tl.where(total > 0, total, 1.0)[:, None]


@triton.jit
def _combine_kernel(
    gates_ptr, out_ptr, m_ptr, l_ptr, acc_ptr, count_ptr, reads_ptr, stride_gb, stride_gh, stride_ob, stride_oh,
    num_slots,
    HKV: tl.constexpr, G: tl.constexpr, DV: tl.constexpr, NUM_SPLITS: tl.constexpr, NUM_SELECTED: tl.constexpr,
    NUM_WIN_TILES: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_SLOTS: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // HKV
    h = bh % HKV
    o_cmp = _merged_output(m_ptr, l_ptr, acc_ptr, bh, 0, NUM_SPLITS, num_slots, BLOCK_G, BLOCK_DV)
    o_sel = _merged_output(m_ptr, l_ptr, acc_ptr, bh, NUM_SPLITS, NUM_SELECTED, num_slots, BLOCK_G, BLOCK_DV)
    o_win = _merged_output(m_ptr, l_ptr, acc_ptr, bh, NUM_SPLITS + NUM_SELECTED, NUM_WIN_TILES, num_slots,
                           BLOCK_G, BLOCK_DV)
    offs_g = tl.arange(0, BLOCK_G)
    offs_dv = tl.arange(0, BLOCK_DV)
    head_mask = offs_g < G
    gate_ptr = gates_ptr + b * stride_gb + (h * G + offs_g) * stride_gh
    g_cmp = tl.load(gate_ptr, mask=head_mask, other=0.0).to(tl.float32)
    g_sel = tl.load(gate_ptr + 1, mask=head_mask, other=0.0).to(tl.float32)
    g_win = tl.load(gate_ptr + 2, mask=head_mask, other=0.0).to(tl.float32)
    out = g_cmp[:, None] * o_cmp + g_sel[:, None] * o_sel + g_win[:, None] * o_win
    ptrs = out_ptr + b * stride_ob + (h * G + offs_g)[:, None] * stride_oh + offs_dv[None, :]
    tl.store(ptrs, out.to(out_ptr.dtype.element_ty), mask=head_mask[:, None] & (offs_dv < DV)[None, :])
    # Keys read per branch: the sums of what each program's masks let through.
    slots = tl.arange(0, BLOCK_SLOTS)
    counts = tl.load(count_ptr + bh * num_slots + slots, mask=slots < num_slots, other=0).to(tl.int64)
    tl.store(reads_ptr + bh * 3, tl.sum(tl.where(slots < NUM_SPLITS, counts, 0), axis=0))
    tl.store(reads_ptr + bh * 3 + 1,
             tl.sum(tl.where((slots >= NUM_SPLITS) & (slots < NUM_SPLITS + NUM_SELECTED), counts, 0), axis=0))
    tl.store(reads_ptr + bh * 3 + 2, tl.sum(tl.where(slots >= NUM_SPLITS + NUM_SELECTED, counts, 0), axis=0))


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _num_programs_target(device: torch.device) -> int:
    if device.type == "cuda":
        return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the interpreter (tests): a few splits, so the split/merge logic is exercised


def decode_attention_triton(
    q: torch.Tensor, gates: torch.Tensor, positions: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor,
    num_cmp_bound: int, k_sel: torch.Tensor, v_sel: torch.Tensor, num_sel_blocks: int, k_win: torch.Tensor,
    v_win: torch.Tensor, sizes: NSASizes, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One NSA decode step (layouts in the module docstring). Returns (o [B, HQ, Dv] in q's dtype,
    block_indices [B, Hkv, n] int64, reads [B, Hkv, 3] int64: the keys the kernels' masks let through per
    branch (cmp, sel, win), counted inside the kernels). num_cmp_bound / num_sel_blocks are host bounds (the largest
    sequence's counts, or the capacity's for a static-shape step); each sequence reads only what
    its own position makes visible."""
    batch, num_heads, dk = q.shape
    num_kv_heads, dv = k_cmp.shape[2], v_cmp.shape[-1]
    group = num_heads // num_kv_heads
    block_g, block_dk, block_dv = _block(group), _block(dk), _block(dv)
    # The split count depends on the batch only and tiles per split is a power of two: both are
    # compile-time constants (unrolled merges, pipelined loops), and a growing cache recompiles only
    # when its length doubles. Splits or tiles past a sequence's visible blocks exit at once.
    num_tiles = max(1, triton.cdiv(num_cmp_bound, BLOCK_N_CMP))
    num_splits = max(1, triton.cdiv(_num_programs_target(q.device), batch * num_kv_heads))
    tiles_per_split = triton.next_power_of_2(triton.cdiv(num_tiles, num_splits))
    logits_cols = num_splits * tiles_per_split * BLOCK_N_CMP
    num_win_tiles = triton.cdiv(sizes.window_size, BLOCK_W)
    num_slots = num_splits + sizes.num_selected + num_win_tiles
    pairs = batch * num_kv_heads
    logits = q.new_empty(pairs, block_g, logits_cols, dtype=torch.float32)
    m_part = q.new_empty(pairs, num_slots, block_g, dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    acc_part = q.new_empty(pairs, num_slots, block_g, block_dv, dtype=torch.float32)
    counts = torch.empty(pairs, num_slots, device=q.device, dtype=torch.int32)
    heads = dict(HKV=num_kv_heads, G=group)
    blocks = dict(BLOCK_G=block_g, BLOCK_DK=block_dk, BLOCK_DV=block_dv)

    _cmp_partials_kernel[(pairs, num_splits)](
        q, k_cmp, v_cmp, positions, logits, m_part, l_part, acc_part, counts,
        q.stride(0), q.stride(1), *k_cmp.stride()[:3], *v_cmp.stride()[:3],
        scale, logits_cols, num_slots,
        DK=dk, DV=dv, CMP_BLOCK=sizes.block_size, CMP_STRIDE=sizes.block_stride, BLOCK_N=BLOCK_N_CMP,
        TILES_PER_SPLIT=tiles_per_split, **heads, **blocks,
    )
    p_grp = q.new_empty(batch, num_kv_heads, num_cmp_bound, dtype=torch.float32)
    _cmp_group_probs_kernel[(pairs, num_splits)](
        positions, logits, m_part, l_part, p_grp, logits_cols, num_cmp_bound, num_slots,
        CMP_BLOCK=sizes.block_size, CMP_STRIDE=sizes.block_stride, BLOCK_G=block_g, BLOCK_N=BLOCK_N_CMP,
        NUM_SPLITS=num_splits, TILES_PER_SPLIT=tiles_per_split, **heads,
    )
    block_indices = q.new_empty(batch, num_kv_heads, sizes.num_selected, dtype=torch.long)
    _select_topn_kernel[(pairs,)](
        p_grp, positions, block_indices, num_cmp_bound, num_sel_blocks, HKV=num_kv_heads,
        CMP_BLOCK=sizes.block_size, CMP_STRIDE=sizes.block_stride, SEL_BLOCK=sizes.sel_block_size,
        NUM_SELECTED=sizes.num_selected, BLOCK_NSEL=triton.next_power_of_2(max(num_sel_blocks, 16)),
        BLOCK_OUT=triton.next_power_of_2(sizes.num_selected), num_warps=8,
    )
    _sel_win_partials_kernel[(pairs, sizes.num_selected + num_win_tiles)](
        q, k_sel, v_sel, k_win, v_win, positions, block_indices, m_part, l_part, acc_part, counts,
        q.stride(0), q.stride(1), *k_sel.stride()[:3], *v_sel.stride()[:3], *k_win.stride()[:3],
        *v_win.stride()[:3], block_indices.stride(0), block_indices.stride(1),
        scale, num_splits, num_slots,
        DK=dk, DV=dv, NUM_SELECTED=sizes.num_selected, SEL_BLOCK=sizes.sel_block_size,
        WINDOW=sizes.window_size, BLOCK_SEL=_block(sizes.sel_block_size), BLOCK_W=BLOCK_W, **heads, **blocks,
    )
    out = torch.empty(batch, num_heads, dv, device=q.device, dtype=q.dtype)
    reads = q.new_empty(batch, num_kv_heads, 3, dtype=torch.long)
    _combine_kernel[(pairs,)](
        gates, out, m_part, l_part, acc_part, counts, reads, gates.stride(0), gates.stride(1), out.stride(0),
        out.stride(1), num_slots, NUM_SPLITS=num_splits, BLOCK_SLOTS=triton.next_power_of_2(num_slots), G=group,
        HKV=num_kv_heads, DV=dv, NUM_SELECTED=sizes.num_selected,
        NUM_WIN_TILES=num_win_tiles, BLOCK_G=block_g, BLOCK_DV=block_dv,
    )
    return out, block_indices, reads
