"""Triton kernels of NSA's selection branch: attention over the blocks each query group selected.

Forward and dq: one program per (token, kv head) takes the G query heads of the group as the rows of every
tl.dot (padded to GP >= 16), so each selected K/V block is loaded once for the whole group; programs of one
kv head run together (token-major grid), so the blocks they share stay in L2. The dq kernel uses the same
one-pass A / B / delta form as nsa.kernels.range_attention (no branch output is kept for the backward).

dk/dv: the selections are inverted into per-(kv head, block) lists of the tokens that selected the block
(``selection_lists``: a stable sort, so each list is in token order), cut into chunks of at most CHUNK tokens.
One program per chunk loads its block's K/V once and gathers BQ tokens x GP heads per step; its float32
partial is written to its own slot and a second kernel sums each block's chunks in order: deterministic, no
atomics, no G-fold copies. (A block selected by every query, such as block 0, spans many chunks.)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from nsa.kernels.attention_steps import (
    dkdv_step,
    dq_step,
    load_split,
    load_split_at,
    scaled_scores,
    softmax_result,
    softmax_step,
    zeros_split,
)
from nsa.kernels.interpreter import allow_loaded_loop_bounds
from nsa.kernels.tiles import (
    LOG2E,
    Packed,
    dot_precision,
    load_at,
    load_tile,
    output_buffer,
    split_dims,
    store_at,
    store_tile,
    token_sequences,
)

allow_loaded_loop_bounds()


class SelectedTiles(NamedTuple):
    """fwd/dq: launch settings of the per-(token, kv head) programs; dkv_rows: gathered rows per dk/dv step
    (BQ tokens x GP heads); chunk: tokens per dk/dv program."""

    num_warps: int = 4
    num_stages: int = 3
    dkv_rows: int = 32
    chunk: int = 1024
    dkv_num_warps: int = 4
    dkv_num_stages: int = 2


@triton.jit
def _group_rows(ptr, tok, hk, stride_t, stride_h, GROUP: tl.constexpr, GP: tl.constexpr):
    """(pointer to token row tok, offsets and validity of its GP (padded) query-head rows of kv head hk)."""
    g = tl.arange(0, GP)
    return ptr + tok * stride_t, (hk * GROUP + g) * stride_h, g < GROUP


@triton.jit
def _block_keys(idx_ptr, slot, t, SEL_BLOCK: tl.constexpr, BLOCK_S: tl.constexpr):
    """(first position of the block in ``slot`` as int64, which of its BLOCK_S rows the query at t reads; an
    unused slot reads none)."""
    j = tl.load(idx_ptr + slot)
    offs = tl.arange(0, BLOCK_S)
    return j.to(tl.int64) * SEL_BLOCK, (j >= 0) & (offs < SEL_BLOCK) & (j * SEL_BLOCK + offs <= t)


@triton.jit
def _token_group(q_ptr, idx_ptr, cu_ptr, token_seq_ptr, stride_qt, stride_qh, stride_it, stride_ih,
                 GROUP: tl.constexpr, GP: tl.constexpr, DQK: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr):
    """This program's (token, kv head): (token row, kv head, its sequence's first row, its position t, the G
    query rows (q1, q2) and their validity, the query heads, the pointer to its selected block indices)."""
    tok = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1)
    tok0 = tl.load(cu_ptr + tl.load(token_seq_ptr + tok)).to(tl.int64)
    q_row, q_heads, head_ok = _group_rows(q_ptr, tok, hk, stride_qt, stride_qh, GROUP, GP)
    q1, q2 = load_split_at(q_row, q_heads, head_ok, DQK, D1, D2)
    heads = hk * GROUP + tl.arange(0, GP)
    return tok, hk, tok0, tok - tok0, q1, q2, head_ok, heads, idx_ptr + tok * stride_it + hk * stride_ih


@triton.jit
def _block_scores(q1, q2, k_base, slots, slot, t, stride_kt, qk_scale, SEL_BLOCK: tl.constexpr,
                  BLOCK_S: tl.constexpr, DQK: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
                  PRECISION: tl.constexpr):
    """Scores of the group's queries against the selected block in ``slot``: (s, -inf where not read; the block's
    first row; which of its rows are read; k1; k2)."""
    start, key_ok = _block_keys(slots, slot, t, SEL_BLOCK, BLOCK_S)
    k1, k2 = load_split(k_base + start * stride_kt, tl.arange(0, BLOCK_S), key_ok, stride_kt, DQK, D1, D2)
    s = scaled_scores(q1, q2, k1, k2, qk_scale, D2, PRECISION)
    return tl.where(key_ok[None, :], s, float("-inf")), start, key_ok, k1, k2


@triton.jit
def _sel_fwd_kernel(
    q_ptr, k_ptr, v_ptr, gate_ptr, idx_ptr, out_ptr, lse_ptr, cu_ptr, token_seq_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_gt, stride_gh, stride_it, stride_ih,
    stride_ot, stride_oh, num_heads, qk_scale,
    GROUP: tl.constexpr, GP: tl.constexpr, SEL_BLOCK: tl.constexpr, BLOCK_S: tl.constexpr,
    NUM_SELECTED: tl.constexpr, DQK: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, DV: tl.constexpr,
    BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr, HAS_GATE: tl.constexpr, ACCUMULATE: tl.constexpr,
):
    tok, hk, tok0, t, q1, q2, head_ok, heads, slots = _token_group(
        q_ptr, idx_ptr, cu_ptr, token_seq_ptr, stride_qt, stride_qh, stride_it, stride_ih, GROUP, GP, DQK, D1, D2)
    k_base = k_ptr + tok0 * stride_kt + hk * stride_kh
    v_base = v_ptr + tok0 * stride_vt + hk * stride_vh
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, BLOCK_DV], tl.float32)
    for slot in range(0, NUM_SELECTED):
        s, start, key_ok, _, _ = _block_scores(q1, q2, k_base, slots, slot, t, stride_kt, qk_scale, SEL_BLOCK,
                                               BLOCK_S, DQK, D1, D2, PRECISION)
        v = load_tile(v_base + start * stride_vt, tl.arange(0, BLOCK_S), key_ok, stride_vt, 0, BLOCK_DV, DV)
        m_i, l_i, acc = softmax_step(s, v, m_i, l_i, acc, PRECISION)
    out, lse = softmax_result(m_i, l_i, acc)
    tl.store(lse_ptr + tok * num_heads + heads, lse, mask=head_ok)
    if HAS_GATE:
        gate = tl.load(gate_ptr + tok * stride_gt + heads * stride_gh, mask=head_ok, other=0.0)
        out = out * gate.to(tl.float32)[:, None]
    out_row, out_heads, _ = _group_rows(out_ptr, tok, hk, stride_ot, stride_oh, GROUP, GP)
    if ACCUMULATE:
        out += load_at(out_row, out_heads, head_ok, 0, BLOCK_DV, DV).to(tl.float32)
    store_at(out_row, out_heads, head_ok, out.to(out_ptr.dtype.element_ty), 0, BLOCK_DV, DV)


@triton.jit
def _sel_dq_kernel(
    q_ptr, k_ptr, v_ptr, gate_ptr, idx_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, cu_ptr, token_seq_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_gt, stride_gh, stride_it, stride_ih,
    stride_dot, stride_doh, stride_dqt, stride_dqh, num_heads, qk_scale, scale,
    GROUP: tl.constexpr, GP: tl.constexpr, SEL_BLOCK: tl.constexpr, BLOCK_S: tl.constexpr,
    NUM_SELECTED: tl.constexpr, DQK: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, DV: tl.constexpr,
    BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr, HAS_GATE: tl.constexpr, ACCUMULATE: tl.constexpr,
):
    tok, hk, tok0, t, q1, q2, head_ok, heads, slots = _token_group(
        q_ptr, idx_ptr, cu_ptr, token_seq_ptr, stride_qt, stride_qh, stride_it, stride_ih, GROUP, GP, DQK, D1, D2)
    a1, a2 = zeros_split(GP, D1, D2)
    b1, b2 = zeros_split(GP, D1, D2)
    do_row, do_heads, _ = _group_rows(do_ptr, tok, hk, stride_dot, stride_doh, GROUP, GP)
    do = load_at(do_row, do_heads, head_ok, 0, BLOCK_DV, DV)
    lse = tl.load(lse_ptr + tok * num_heads + heads, mask=head_ok, other=float("inf"))
    k_base = k_ptr + tok0 * stride_kt + hk * stride_kh
    v_base = v_ptr + tok0 * stride_vt + hk * stride_vh
    delta = tl.zeros([GP], tl.float32)
    for slot in range(0, NUM_SELECTED):
        s, start, key_ok, k1, k2 = _block_scores(q1, q2, k_base, slots, slot, t, stride_kt, qk_scale, SEL_BLOCK,
                                                 BLOCK_S, DQK, D1, D2, PRECISION)
        v = load_tile(v_base + start * stride_vt, tl.arange(0, BLOCK_S), key_ok, stride_vt, 0, BLOCK_DV, DV)
        delta, a1, b1, a2, b2 = dq_step(tl.math.exp2(s - lse[:, None]), do, v, k1, k2, delta, a1, b1, a2, b2, D2,
                                        PRECISION)
    tl.store(delta_ptr + tok * num_heads + heads, delta, mask=head_ok)
    factor = tl.zeros([GP], tl.float32) + scale
    if HAS_GATE:
        factor *= tl.load(gate_ptr + tok * stride_gt + heads * stride_gh, mask=head_ok, other=0.0).to(tl.float32)
    dq_row, dq_heads, _ = _group_rows(dq_ptr, tok, hk, stride_dqt, stride_dqh, GROUP, GP)
    dq1 = (a1 - delta[:, None] * b1) * factor[:, None]
    if ACCUMULATE:
        dq1 += load_at(dq_row, dq_heads, head_ok, 0, D1, DQK).to(tl.float32)
    store_at(dq_row, dq_heads, head_ok, dq1.to(dq_ptr.dtype.element_ty), 0, D1, DQK)
    if D2 > 0:
        dq2 = (a2 - delta[:, None] * b2) * factor[:, None]
        if ACCUMULATE:
            dq2 += load_at(dq_row, dq_heads, head_ok, D1, D2, DQK).to(tl.float32)
        store_at(dq_row, dq_heads, head_ok, dq2.to(dq_ptr.dtype.element_ty), D1, D2, DQK)


@triton.jit
def _sel_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, gate_ptr, do_ptr, lse_ptr, delta_ptr, part_k_ptr, part_v_ptr, entries_ptr,
    chunk_list_ptr, chunk_start_ptr, list_end_ptr, block_seq_ptr, cu_ptr, cu_blocks_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_gt, stride_gh, stride_dot, stride_doh,
    num_heads, num_seqs, num_lists, blocks_per_head, qk_scale, scale,
    GROUP: tl.constexpr, GP: tl.constexpr, BQ: tl.constexpr, SEL_BLOCK: tl.constexpr, BLOCK_S: tl.constexpr,
    CHUNK: tl.constexpr, DQK: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, DV: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_DK: tl.constexpr, PRECISION: tl.constexpr, HAS_GATE: tl.constexpr,
):
    """Partial dk / dv of one chunk of one (kv head, block) list: sum over its tokens and the group's heads."""
    chunk = tl.program_id(0)
    listed = tl.load(chunk_list_ptr + chunk)
    live = listed < num_lists
    listed = tl.minimum(listed, num_lists - 1)
    hk = listed // blocks_per_head
    block = listed % blocks_per_head
    seq = tl.minimum(tl.load(block_seq_ptr + block), num_seqs - 1)  # past the last block: an empty list
    tok0 = tl.load(cu_ptr + seq).to(tl.int64)
    seq_len = tl.load(cu_ptr + seq + 1) - tok0
    j = block - tl.load(cu_blocks_ptr + seq)
    offs = tl.arange(0, BLOCK_S)
    pos = j * SEL_BLOCK + offs
    key_ok = (offs < SEL_BLOCK) & (pos < seq_len)
    block_row = tok0 + j * SEL_BLOCK
    k1, k2 = load_split(k_ptr + block_row * stride_kt + hk * stride_kh, offs, key_ok, stride_kt, DQK, D1, D2)
    v = load_tile(v_ptr + block_row * stride_vt + hk * stride_vh, offs, key_ok, stride_vt, 0, BLOCK_DV, DV)
    dk1, dk2 = zeros_split(BLOCK_S, D1, D2)
    dv = tl.zeros([BLOCK_S, BLOCK_DV], tl.float32)
    first = tl.load(chunk_start_ptr + chunk)
    end = tl.where(live, tl.minimum(first + CHUNK, tl.load(list_end_ptr + listed)), first)
    r = tl.arange(0, BQ * GP)
    g = r % GP
    for e in range(first, end, BQ):
        entry = e + r // GP
        ok = (entry < end) & (g < GROUP)
        tok = tl.load(entries_ptr + entry, mask=ok, other=0).to(tl.int64)
        head = hk * GROUP + g
        q1, q2 = load_split_at(q_ptr, tok * stride_qt + head * stride_qh, ok, DQK, D1, D2)
        s_t = scaled_scores(k1, k2, q1, q2, qk_scale, D2, PRECISION)
        seen = key_ok[:, None] & ok[None, :] & (pos[:, None] <= (tok - tok0)[None, :])
        lse = tl.load(lse_ptr + tok * num_heads + head, mask=ok, other=float("inf"))
        delta = tl.load(delta_ptr + tok * num_heads + head, mask=ok, other=0.0)
        p_t = tl.where(seen, tl.math.exp2(s_t - lse[None, :]), 0.0)
        if HAS_GATE:
            gate = tl.load(gate_ptr + tok * stride_gt + head * stride_gh, mask=ok, other=0.0)
            p_t = p_t * gate.to(tl.float32)[None, :]
        do = load_at(do_ptr, tok * stride_dot + head * stride_doh, ok, 0, BLOCK_DV, DV)
        dk1, dk2, dv = dkdv_step(v, q1, q2, do, p_t, delta, dk1, dk2, dv, D2, PRECISION)
    part = chunk.to(tl.int64) * BLOCK_S
    all_rows = offs >= 0
    store_tile(part_k_ptr + part * BLOCK_DK, offs, all_rows, BLOCK_DK, dk1 * scale, 0, D1, BLOCK_DK)
    if D2 > 0:
        store_tile(part_k_ptr + part * BLOCK_DK, offs, all_rows, BLOCK_DK, dk2 * scale, D1, D2, BLOCK_DK)
    store_tile(part_v_ptr + part * BLOCK_DV, offs, all_rows, BLOCK_DV, dv, 0, BLOCK_DV, BLOCK_DV)


@triton.jit
def _sel_reduce_kernel(
    part_k_ptr, part_v_ptr, dk_ptr, dv_ptr, list_chunks_ptr, block_seq_ptr, cu_ptr, cu_blocks_ptr,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh, num_seqs, blocks_per_head,
    SEL_BLOCK: tl.constexpr, BLOCK_S: tl.constexpr, DQK: tl.constexpr, BLOCK_DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """dk / dv of one (kv head, block): the sum of its chunks' partials, in chunk order."""
    listed = tl.program_id(0)
    hk = listed // blocks_per_head
    block = listed % blocks_per_head
    seq = tl.load(block_seq_ptr + block)
    live = seq < num_seqs
    seq = tl.minimum(seq, num_seqs - 1)
    tok0 = tl.load(cu_ptr + seq).to(tl.int64)
    seq_len = tl.load(cu_ptr + seq + 1) - tok0
    offs = tl.arange(0, BLOCK_S)
    first = (block - tl.load(cu_blocks_ptr + seq)) * SEL_BLOCK
    key_ok = live & (offs < SEL_BLOCK) & (first + offs < seq_len)
    all_rows = offs >= 0
    dk = tl.zeros([BLOCK_S, BLOCK_DK], tl.float32)
    dv = tl.zeros([BLOCK_S, BLOCK_DV], tl.float32)
    for chunk in range(tl.load(list_chunks_ptr + listed), tl.load(list_chunks_ptr + listed + 1)):
        part_rows = (chunk * BLOCK_S + offs).to(tl.int64)  # the partial buffers pass 2^31 elements at 512k
        dk += load_at(part_k_ptr, part_rows * BLOCK_DK, all_rows, 0, BLOCK_DK, BLOCK_DK)
        dv += load_at(part_v_ptr, part_rows * BLOCK_DV, all_rows, 0, BLOCK_DV, BLOCK_DV)
    row = tok0 + first
    store_tile(dk_ptr + row * stride_dkt + hk * stride_dkh, offs, key_ok, stride_dkt, dk.to(dk_ptr.dtype.element_ty),
               0, BLOCK_DK, DQK)
    store_tile(dv_ptr + row * stride_dvt + hk * stride_dvh, offs, key_ok, stride_dvt, dv.to(dv_ptr.dtype.element_ty),
               0, BLOCK_DV, DV)


# ----------------------------------------------------------------------------------------------
# launchers: token rows [N, H, D] (last dim contiguous), block_indices int32 [N, H_kv, n] (local block ids,
# -1 = unused), gate None or [N, HQ], lse / delta float32 [N, HQ] (base 2).


class SelectionLists(NamedTuple):
    """Per-(kv head, global block) lists of the tokens that selected the block, cut into chunks."""

    entries: Tensor  # int32 [N * H_kv * n]: token rows, list after list, ascending within a list
    list_end: Tensor  # int32 [L]: one past each list's last entry (L = H_kv * blocks_per_head)
    list_chunks: Tensor  # int32 [L + 1]: cumulative chunk counts
    chunk_list: Tensor  # int32 [C]: the list of each chunk (L past the last chunk)
    chunk_start: Tensor  # int32 [C]: the first entry of each chunk
    block_seq: Tensor  # int32 [blocks_per_head]: the sequence of each global block (num_seqs past the last)
    cu_blocks: Tensor  # int32 [S + 1]: cumulative selection blocks per sequence
    blocks_per_head: int


def selection_lists(block_indices: Tensor, packed: Packed, sel_block_size: int, chunk: int) -> SelectionLists:
    """Invert the selection: which tokens read each (kv head, block). A stable sort keeps every list in token
    order, so the dk/dv sums run in a fixed order. No host sync (the sizes are host bounds)."""
    _, num_kv_heads, num_selected = block_indices.shape
    device = block_indices.device
    lengths = (packed.cu[1:] - packed.cu[:-1]).long()
    per_seq = (lengths + sel_block_size - 1) // sel_block_size
    cu_blocks = torch.cat((per_seq.new_zeros(1), per_seq.cumsum(0)))
    blocks_per_head = -(-packed.total // sel_block_size) + packed.num_seqs  # bound on the global block count
    num_lists = num_kv_heads * blocks_per_head
    seq_of_token = token_sequences(packed).long()
    global_block = cu_blocks[seq_of_token][:, None, None] + block_indices.long()
    head = torch.arange(num_kv_heads, device=device)[None, :, None]
    keys = torch.where(block_indices >= 0, head * blocks_per_head + global_block, num_lists).flatten()
    sorted_keys, order = torch.sort(keys, stable=True)
    entries = (order // (num_kv_heads * num_selected)).to(torch.int32)
    bounds = torch.searchsorted(sorted_keys, torch.arange(num_lists + 1, device=device))
    counts = bounds[1:] - bounds[:-1]
    per_list = (counts + chunk - 1) // chunk
    list_chunks = torch.cat((per_list.new_zeros(1), per_list.cumsum(0)))
    num_chunks = max(1, -(-keys.numel() // chunk) + num_lists)
    chunk_ids = torch.arange(num_chunks, device=device)
    chunk_list = torch.searchsorted(list_chunks[1:], chunk_ids, right=True)
    owner = chunk_list.clamp_max(num_lists - 1)
    chunk_start = bounds[owner] + (chunk_ids - list_chunks[owner]) * chunk
    block_seq = torch.searchsorted(cu_blocks[1:], torch.arange(blocks_per_head, device=device), right=True)
    return SelectionLists(entries, bounds[1:].to(torch.int32), list_chunks.to(torch.int32),
                          chunk_list.to(torch.int32), chunk_start.to(torch.int32), block_seq.to(torch.int32),
                          cu_blocks.to(torch.int32), blocks_per_head)


def _launch_args(q: Tensor, k: Tensor, v: Tensor, sel_block_size: int) -> dict:
    group = q.shape[1] // k.shape[1]
    return {"GROUP": group, "GP": max(16, triton.next_power_of_2(group)), "SEL_BLOCK": sel_block_size,
            "BLOCK_S": max(16, triton.next_power_of_2(sel_block_size)), "PRECISION": dot_precision(q.dtype),
            **split_dims(q.shape[-1], v.shape[-1])}


def _gate_args(gate: Tensor | None, q: Tensor) -> tuple[Tensor, int, int]:
    return (q, 0, 0) if gate is None else (gate, gate.stride(0), gate.stride(1))


def selected_forward(q: Tensor, k: Tensor, v: Tensor, gate: Tensor | None, block_indices: Tensor, out: Tensor,
                     lse: Tensor, packed: Packed, sel_block_size: int, scale: float, accumulate: bool,
                     tiles: SelectedTiles) -> None:
    """out[rows] (+)= gate * attention over the selected blocks; lse[rows] base 2 (+inf: nothing selected)."""
    gate_t, stride_gt, stride_gh = _gate_args(gate, q)
    _sel_fwd_kernel[(q.shape[0], k.shape[1])](
        q, k, v, gate_t, block_indices, out, lse, packed.cu, token_sequences(packed),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), stride_gt, stride_gh,
        block_indices.stride(0), block_indices.stride(1), out.stride(0), out.stride(1), q.shape[1], scale * LOG2E,
        NUM_SELECTED=block_indices.shape[-1], HAS_GATE=gate is not None, ACCUMULATE=accumulate,
        **_launch_args(q, k, v, sel_block_size), num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )


def selected_dq(q: Tensor, k: Tensor, v: Tensor, gate: Tensor | None, block_indices: Tensor, dout: Tensor,
                lse: Tensor, delta: Tensor, dq: Tensor, packed: Packed, sel_block_size: int, scale: float,
                accumulate: bool, tiles: SelectedTiles) -> None:
    """dq[rows] (+)= the selection branch's query gradient; delta[rows] = dO . o_sel."""
    gate_t, stride_gt, stride_gh = _gate_args(gate, q)
    _sel_dq_kernel[(q.shape[0], k.shape[1])](
        q, k, v, gate_t, block_indices, dout, lse, delta, dq, packed.cu, token_sequences(packed),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), stride_gt, stride_gh,
        block_indices.stride(0), block_indices.stride(1), dout.stride(0), dout.stride(1), dq.stride(0),
        dq.stride(1), q.shape[1], scale * LOG2E, scale,
        NUM_SELECTED=block_indices.shape[-1], HAS_GATE=gate is not None, ACCUMULATE=accumulate,
        **_launch_args(q, k, v, sel_block_size), num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )


def selected_dkdv(q: Tensor, k: Tensor, v: Tensor, gate: Tensor | None, block_indices: Tensor, dout: Tensor,
                  lse: Tensor, delta: Tensor, packed: Packed, sel_block_size: int, scale: float,
                  tiles: SelectedTiles) -> tuple[Tensor, Tensor]:
    """-> dk, dv (k's and v's shapes and dtypes), through the inverted selection lists."""
    lists = selection_lists(block_indices, packed, sel_block_size, tiles.chunk)
    args = _launch_args(q, k, v, sel_block_size)
    block_s, block_dv = args["BLOCK_S"], args["BLOCK_DV"]
    block_dk = max(16, triton.next_power_of_2(q.shape[-1]))
    num_chunks = lists.chunk_list.numel()
    part_k = output_buffer(num_chunks * block_s, block_dk, like=q, dtype=torch.float32)
    part_v = output_buffer(num_chunks * block_s, block_dv, like=q, dtype=torch.float32)
    gate_t, stride_gt, stride_gh = _gate_args(gate, q)
    num_lists = k.shape[1] * lists.blocks_per_head
    _sel_dkdv_kernel[(num_chunks,)](
        q, k, v, gate_t, dout, lse, delta, part_k, part_v, lists.entries, lists.chunk_list, lists.chunk_start,
        lists.list_end, lists.block_seq, packed.cu, lists.cu_blocks,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), stride_gt, stride_gh,
        dout.stride(0), dout.stride(1), q.shape[1], packed.num_seqs, num_lists, lists.blocks_per_head,
        scale * LOG2E, scale,
        BQ=max(1, tiles.dkv_rows // args["GP"]), CHUNK=tiles.chunk, BLOCK_DK=block_dk, HAS_GATE=gate is not None,
        **args, num_warps=tiles.dkv_num_warps, num_stages=tiles.dkv_num_stages,
    )
    dk, dv = output_buffer(*k.shape, like=k), output_buffer(*v.shape, like=v)  # each token row: one block
    _sel_reduce_kernel[(num_lists,)](
        part_k, part_v, dk, dv, lists.list_chunks, lists.block_seq, packed.cu, lists.cu_blocks,
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), packed.num_seqs, lists.blocks_per_head,
        SEL_BLOCK=sel_block_size, BLOCK_S=block_s, DQK=q.shape[-1], BLOCK_DK=block_dk, DV=v.shape[-1],
        BLOCK_DV=block_dv, num_warps=8,
    )
    return dk, dv
