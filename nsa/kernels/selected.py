"""Triton kernels of NSA's selection branch: attention over the blocks each query group selected.

Forward and dq: one program per (tile of BQ neighbouring tokens, kv head) takes the G query heads of the group
for each of its tokens as the rows of every tl.dot (BQ x GP rows, GP = G padded to a power of two), so each
selected K/V block is loaded once for the whole group. With BQ = 1 (G > 8 at the default 16 rows) the program
walks its token's n blocks; with BQ > 1 (small groups fill the tile with neighbouring tokens instead of padding
rows) it walks the union of its tokens' blocks, ascending (``query_tiles`` builds the lists on the device), once
each, masking the rows that did not select a block: a block chosen by several neighbours is loaded once for
all of them. Every row still meets its own blocks in ascending order, so its online softmax runs as with BQ = 1.
Programs of one kv head run together (token-major grid), so the blocks they share stay in L2. The forward also
stores the un-gated branch output, from which the dq kernel takes delta = dO . o, as nsa.kernels.range_attention.

dk/dv: the selections are inverted into per-(kv head, block) lists of the tokens that selected the block
(``selection_lists``: a stable sort, so each list is in token order), cut into chunks of at most
``SelectedTiles.dkv_chunk`` tokens. One program per chunk loads its block's K/V once and gathers BQ tokens x GP
heads per step; its float32 partial is written to its own slot and a second kernel sums each block's chunks in
order: deterministic, no atomics, no G-fold copies. (A block selected by every query, such as block 0, spans many
chunks.)

Small groups (``SelectedTiles.fuses_dq``, ``forwards_by_block``: up to 4 heads by default) run the forward and
the dq over the same lists too, each block loaded once per chunk: the forward stores each gathered row's result
over one block (normalised, with its lse) and the dk/dv steps each row's dq share, at the row of its (token, kv
head, slot); one program per (token, kv head) then loads all its slots at once and combines them (by their lse)
or sums them, in a fixed order. Optionally (``SelectedTiles.ds_dq``), larger groups keep the token-centric forward
and take the dq from the dS the dk/dv steps store per (token, kv head, slot), each token's slots multiplied by their
blocks' keys in order.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from nsa.kernels.attention_steps import (
    LOG2E,
    add_store_split_at,
    dq_step,
    gathered_dkdv_step,
    load_split,
    load_split_at,
    load_split_rows,
    row_delta,
    scaled_scores,
    softmax_result,
    softmax_step,
    zeros_split,
)
from nsa.kernels.interpreter import allow_loaded_loop_bounds
from nsa.kernels.launch_args import dot_precision, next_power_of_2, split_dims
from nsa.kernels.tiles import (
    Packed,
    TileTable,
    add_store_at,
    kv_descriptors,
    load_at,
    load_tile,
    output_buffer,
    packed_sized,
    packed_tiles,
    store_at,
    store_tile,
    tile_grid,
    tile_origin,
    token_sequences,
)

allow_loaded_loop_bounds()


SHORT_MIN_GROUP = 4  # the short sequences' programs were timed at G = 4, 12 and 16; the GPT's G = 2 lost at 16k


class SelectedTiles(NamedTuple):
    """fwd/dq: launch settings, and ``rows``: query rows per program (``query_tiles``: rows // GP neighbouring
    tokens x the group's heads padded to a power of two GP, over the union of their blocks; one token per program
    where rows < 2 GP, e.g. G = 16 or rows = 0); dkv_rows: gathered rows per dk/dv step (BQ tokens x GP heads,
    GP >= 16); chunk: tokens per dk/dv program. rows = 16, from the H200 sweep at G = 4, 64k (bench/results/
    prefill_tiles_cuda.md): 4 tokens per program ran the forward / dq in 16.5 / 21.1 ms against 17.4 / 21.6 for one
    token on independent queries and in 10.5 / 13.3 ms against 17.4 / 21.6 when neighbours share their blocks.
    A dk/dv step fills its dkv_rows with list entries x the group padded only to a power of two (G = 2: 16 entries x
    2 heads); padding the group to 16 rows instead (2 entries x 16 rows, 4 of the 32 real) ran the dk/dv at G = 4,
    64k on the H200 in 13.3 ms against 5.5 (bench/results/prefill_tiles_cuda.md, 2026-12-02).
    tile_num_warps / tile_num_stages launch the programs of several tokens (BQ > 1), num_warps / num_stages those
    of one token (G >= 16, where 2 warps ran the forward in 22.5 against 17.8 ms at the public shape). H200 sweep
    at 64k, 2026-12-03 (bench/results/prefill_tiles_cuda.md), forward / dq ms on 2 warps and 2 stages against 4 and
    3: G = 4, d = 128: 14.3 / 18.3 against 15.6 / 19.1; the GPT's G = 2, d = 64: 3.8 / 4.3 against 4.2 / 4.9; G = 4
    with d_k = 192: forward 16.9 against 21.7, but the dq, which spills on 2 warps there (536 bytes of stack), 58.7
    against 24.3: so the dq takes the tile settings only up to tile_dq_max_dim (max(d_k, d_v)).
    tma: the forward and dq load each K / V block through tensor descriptors (TMA, Hopper; pointer loads where the
    device or the tensors' alignment cannot, nsa.kernels.tiles.kv_descriptors). H200, 64k, independent queries
    (2026-12-04, two runs), forward / dq ms: public 15.04-15.07 / 16.74-17.22 with TMA on 2 stages, 15.74-15.79 /
    16.51-16.58 on 3, against 17.88 / 18.73 with pointer loads on 3 (so one-token forwards take num_stages, their
    dq dq_num_stages); programs of several tokens with TMA on 3 stages / 2: G = 4 12.74 / 11.64 and 13.09 / 11.97
    against 14.31 / 13.73 with pointer loads on 2; the GPT's G = 2 3.01 / 2.72 and 3.07 / 2.82 against 3.81 /
    3.43.
    forced_apart: where one token takes a program, its n - 3 chosen blocks there and the three forced ones (block 0
    and the token's two local blocks, which neighbouring tokens share) in programs of forced_rows rows (forced_rows
    // GP tokens, at least two) on forced_num_warps / forced_num_stages, which load each forced block once for all
    their tokens (``_passes``). Off: H200, 64k, 2026-12-04, forward / dq ms with them apart on programs of 128 rows
    (8 warps) 16.08 / 16.61 and of 64 rows (4 warps) 15.22 / 16.23 against 14.99 / 16.37 in one pass (public);
    G = 12 15.96 / 16.16 and 15.33 / 15.74 against 15.03 / 16.13. The second pass reads q, dO and the partial
    output or dq again (~4 GB at 64k), about what the forced blocks' loads cost in the first.
    One-token programs (16 rows) run on 2 warps since 2026-12-05 (H200, 64k, public, one sweep): forward / dq
    14.33 / 15.07 ms against 15.08 / 17.15 on 4 warps; 1 warp ran the forward in 14.20 but the dq in 21.00. With
    TMA a program's warps wait on its descriptor loads; fewer warps per program leave the loads as deep and cut
    the 16-row dots' cross-warp work. (Before TMA, 2 warps had lost: 22.5 against 17.8.)
    short_chunk: tokens per dk/dv program where the packed rows number at most short_tokens (``dkv_chunk``). A short
    sequence's grid has few waves, and its longest lists (block 0's holds every token) leave a tail of long
    programs: H200, public, 8k (2026-12-05), the dk/dv in 2.02 ms on chunks of 256 against 2.17 on 1024.
    short_rows / short_tile_num_warps / short_tile_num_stages: the forward / dq's rows per program and their
    launch where the packed rows times the group number at most short_query_rows (0: never), for groups of at least
    SHORT_MIN_GROUP heads and head dims up to tile_dq_max_dim (``for_tokens``). Neighbouring tokens share more of
    their blocks in short sequences (``bench.model_query_unions``: programs of 4 tokens read 0.59 of the K / V
    blocks at 8k, 0.80 at 64k, for 2.35x / 3.18x the matmul rows), and the short sequences' selection is bound by
    those reads. H100, forward + dq ms against the default programs (2026-12-05, 64 rows on 4 warps and 2 stages):
    8k public 3.60 / 3.76, G = 12 3.58 / 3.74, G = 4 (16 tokens x 4 heads) 1.72 / 2.34; 16k public 8.12 / 8.03,
    G = 12 8.10 / 8.04, G = 4 4.88 / 5.64; 32k G = 4 12.68 / 12.75; 64k G = 4 31.2 / 27.9 (public and G = 12 lose
    from 16k on). The edge falls at about 131072 rows x heads at each group timed.
    fused_dq_max_group: groups of at most this many query heads per kv head (0: none, 64: every group) take the
    selection's dq from the dk/dv's steps (``fuses_dq``; FSA's loop order for the whole backward: each block's list of
    tokens, dS k one more matmul per step) instead of ``selected_dq``'s one K / V block load per (token, group). The
    shares go through a buffer in q's dtype of G x d_k per (token, kv head, slot) (1 KB per (token, group, block) at
    G = 4, d_k = 128 in bf16: 4.3 GB at 64k), summed per (token, kv head) in float32 over its slots
    (``slot_launch``), over token ranges whose shares take at most fused_dq_bytes (``dq_share_ranges``). The rows
    below, but the last, had them in float32 (2 KB per pair), one slot per step of the sum. H100, 64k (2026-12-06,
    bench/results/logs/tiles_fused_dq_h100.jsonl),
    independent queries, selection dq + dk/dv against delta + fused dk/dv in ranges of 2 GiB / 8 GiB / one range:
    G = 4 13.26 + 4.88 ms against 0.19 + 14.52 / 12.73 / 12.74; G = 4 at d_k = 192 17.44 + 5.81 against 0.19 + 21.92
    / 18.64 / 17.68; the GPT's G = 2 (d = 64) 2.88 + 1.08 against 0.04 + 2.39 in one range; G = 12 16.68 + 15.87
    against 0.54 + 54.11 / 43.30 / 40.64 (its shares, 6 KB per pair, cost more than its L2 reads). Queries that share
    90% of their variance within 64-token spans (neighbours select the same blocks, which the token-centric dq's
    programs of several tokens read once) narrow it or turn it: G = 4 7.50 + 4.86 against 0.19 + 12.70 at 64k,
    1.52 + 1.26 against 0.06 + 3.22 at 16k; G = 2 1.17 + 1.10 against 0.04 + 2.37 at 64k, 0.12 + 0.42 against
    0.01 + 0.47 at 8k. Independent queries at 16k / 8k: G = 4 2.65 + 1.26 / 1.10 + 0.78 against 0.06 + 3.28 / 0.04
    + 1.71; G = 2 0.53 + 0.43 / 0.22 + 0.42 against 0.01 + 0.68 / 0.01 + 0.47. fused_dq_bytes = 4 GiB: each range
    also reads and writes the float32 dk / dv sums of the blocks it reaches (``_sel_reduce_kernel``), ~0.6 ms per
    range past the first at G = 4, 64k; 4 GiB is 64k tokens at G = 4, H_kv = 4, d_k = 128 in bf16 (one range). The
    16k / 8k rows compare with programs of 16 rows, not the short programs ``for_tokens`` picks there. With bf16
    shares and all slots summed at once on one warp (0791d2c; bench/results/logs/slot_reduction_warps_h100.log):
    G = 4 9.69 ms against 13.40, the GPT's G = 2 1.90 against 2.39. G = 8 (H100, 2026-12-06,
    bench/results/logs/list_paths_g8_g4short_1c906e2_h100.jsonl): the layer 68.6 ms against 72.7 at 64k, 12.1 against
    13.1 at 16k, for 4 GiB / 2 GiB more peak (about twice dense SDPA's), so G = 8 keeps selected_dq.
    block_forward_max_group: groups of at most this many heads (0: none) run the selection forward over the blocks'
    token lists, as the dk/dv does (``forwards_by_block``; FSA's loop order for the forward): each chunk of a (kv
    head, block) list loads the block once and gathers its tokens' q rows; each row's result over that block alone
    (normalised, in q's dtype, with its float32 lse) goes to its (token, kv head, slot), and a second kernel
    combines each token's slots, all at once (``slot_launch``). Token ranges of at most block_forward_bytes of those
    parts: 5 GiB holds 64k tokens at G = 4, H_kv = 4, d_v = 128 (66,560 bytes per token) in one range, where 4 GiB
    left a second range of 1,009 tokens that cost ~0.5 ms. Not where the short sequences' programs apply
    (``for_tokens``). H100, 64k (2026-12-06, bench/results/logs/tiles_block_forward_h100.jsonl, its combination one
    slot per step), forward ms against the query tiles' programs (4 GiB ranges / one range):
    independent queries, G = 4 8.18 / 7.67 against 13.30, G = 4 at d_k = 192 8.89 / 8.28 against 17.23, the GPT's
    G = 2 1.85 against 2.88; queries sharing 90% of their variance within 64-token spans, which the query tiles
    read once per program, G = 4 8.22 / 7.70 against 7.56, G = 2 1.84 against 1.19. The G = 4 layer 40.9 ms against
    46.3; the GPT on real text 57.99 ms a step at 64k against 60.05, 48.89 at 16k against 48.85 (same call). With
    all slots combined at once on one warp (0791d2c): G = 4 7.74 ms, the GPT's G = 2 1.37; the G = 4 layer 36.4 ms
    (bench/results/logs/prefill_layer_0791d2c_h100.md). G = 8 at 64k: 14.37 against 14.64 for 6.4 GiB more peak
    (list_paths_g8_g4short_1c906e2_h100.jsonl). Against the short programs (G = 4, same file): 2.03 against 2.19 ms
    at 16k and 3.78 against 5.68 at 32k on independent queries, but 2.02 against 0.87 and 3.81 against 1.91 where
    queries share 90% of their variance within 64-token spans, whose unions the short programs read once.
    ds_dq: groups that do not fuse the dq take it from the dS their dk/dv's steps store (``dq_from_ds``): one
    [G, BLOCK_S] row in q's dtype per (token, kv head, slot), which ``_sel_dq_ds_kernel`` multiplies by the slot's
    keys, token by token (K and dS read per (token, group, block): 16 + 2 KB against selected_dq's 32 KB of K and
    V, one matmul instead of three). Over token ranges whose dS take at most ds_dq_bytes (2 GiB: the most that
    kept the public shape's 64k layer within 1.5x dense SDPA's peak). Off: it trades memory for time, and within
    that bound it gains little. H100, public shape (2026-12-07, bench/results/logs/ds_dq_ab_79cbe42+wip_h100.jsonl),
    the layer's forward+backward ms / peak GiB against the default: 64k 111.7 / 12.3 with 2 GiB ranges (4 ranges),
    114.6 / 11.3 with 1 GiB, 110.1-114.3 / 14.4 with 4 GiB, against 114.6 / 10.4 (dense SDPA's peak: 8.3); the
    selection's backward 29.3 ms in two ranges, 32.7 in eight, against 32.7; 32k 44.3 / 7.2 (2 GiB) against 47.6 /
    5.2; 16k 19.3 / 4.6 against 20.7 / 2.6; 8k 8.57 / 2.39 (1 GiB) against 9.10 / 1.39; G = 12 at 64k 104.2 / 10.0
    (2 GiB) against 106.3 / 8.1."""

    num_warps: int = 2
    num_stages: int = 2
    dq_num_stages: int = 3
    dkv_rows: int = 32
    chunk: int = 1024
    dkv_num_warps: int = 4
    dkv_num_stages: int = 2
    rows: int = 16
    tile_num_warps: int = 2
    tile_num_stages: int = 3
    tile_dq_max_dim: int = 128
    tma: bool = True
    forced_apart: bool = False
    forced_rows: int = 128
    forced_num_warps: int = 8
    forced_num_stages: int = 2
    short_chunk: int = 256
    short_tokens: int = 8192
    short_rows: int = 64
    short_tile_num_warps: int = 4
    short_tile_num_stages: int = 2
    short_query_rows: int = 131072
    fused_dq_max_group: int = 4
    fused_dq_bytes: int = 2**32
    block_forward_max_group: int = 4
    block_forward_bytes: int = 5 * 2**30
    ds_dq: bool = False
    ds_dq_bytes: int = 2**31

    def fuses_dq(self, group: int) -> bool:
        """Whether a group of ``group`` query heads per kv head takes the selection's dq inside its dk/dv."""
        return group <= self.fused_dq_max_group

    def dq_from_ds(self, group: int) -> bool:
        """Whether a group of ``group`` query heads per kv head takes the selection's dq from the dS its dk/dv
        stores (``ds_dq``; groups that fuse the dq do not)."""
        return self.ds_dq and not self.fuses_dq(group)

    def dq_in_dkdv(self, group: int) -> bool:
        """Whether the selection's dq comes with its dk/dv (``fuses_dq`` or ``dq_from_ds``) instead of
        ``selected_dq``, which then only stores delta (``selected_row_delta``) beforehand."""
        return self.fuses_dq(group) or self.dq_from_ds(group)

    def forwards_by_block(self, group: int) -> bool:
        """Whether a group of ``group`` query heads per kv head runs the selection forward over the blocks' token
        lists (``block_forward_max_group``)."""
        return group <= self.block_forward_max_group

    def dkv_chunk(self, num_tokens: int) -> int:
        """Tokens per dk/dv program for num_tokens packed rows."""
        return self.short_chunk if num_tokens <= self.short_tokens else self.chunk

    def for_tokens(self, num_tokens: int, group: int, head_dim: int) -> SelectedTiles:
        """These tiles for num_tokens packed rows of a group of G query heads per kv head at the widest head dim
        ``head_dim``: the forward / dq's short-sequence programs (short_rows, ...) where they apply, the forward
        then over their unions (not ``forwards_by_block``). The forward's
        union lists take their shape from the rows, so the forward, the backward and nsa::prefill's fake
        implementation all read the tiles through here."""
        if num_tokens * group > self.short_query_rows or group < SHORT_MIN_GROUP or head_dim > self.tile_dq_max_dim:
            return self
        # the short programs keep the forward where they apply: against forwards_by_block they lose up to 1.9 ms
        # at 32k on independent queries and win by 2x where neighbouring queries share their blocks (docstring)
        return self._replace(rows=self.short_rows, tile_num_warps=self.short_tile_num_warps,
                             tile_num_stages=self.short_tile_num_stages, block_forward_max_group=0)


@triton.jit
def _query_rows(q_ptr, cu_ptr, tile_seq_ptr, tile_first_ptr, num_seqs, stride_qt, stride_qh, GROUP: tl.constexpr,
                GP: tl.constexpr, BQ: tl.constexpr, DQK: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr):
    """This program's rows: BQ neighbouring tokens of one sequence x the GP (padded) query heads of kv head hk,
    token-major. -> (kv head, sequence's first row, tile's first row (int64), each row's token within the tile,
    position, validity and query head, the last position of the tile, q1, q2)."""
    hk = tl.program_id(1)
    tok0, seq_len, _, _, first = tile_origin(tile_seq_ptr, tile_first_ptr, cu_ptr, cu_ptr, num_seqs, BQ)
    r = tl.arange(0, BQ * GP)
    local = r // GP
    t = first + local
    g = r % GP
    ok = (t < seq_len) & (g < GROUP)
    heads = hk * GROUP + g
    row0 = tok0 + first
    q1, q2 = load_split_at(q_ptr + row0 * stride_qt, local * stride_qt + heads * stride_qh, ok, DQK, D1, D2)
    last = tl.minimum(first + BQ, seq_len) - 1
    return hk, tok0, row0, local, t, ok, heads, last, q1, q2


@triton.jit
def _block_tile(q1, q2, k_base, k_desc1, k_desc2, tok0, hk, block, reads, t, last, stride_kt, qk_scale,
                SEL_BLOCK: tl.constexpr, BLOCK_S: tl.constexpr, DQK: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
                PRECISION: tl.constexpr, TMA: tl.constexpr):
    """Scores of the rows against selection block ``block`` (-1: none), -inf where a row does not read a key (not
    its selection: ``reads`` False; or after its position). -> (s, the block's first row, which of its rows are
    loaded, k1, k2); with TMA every row of the tile is read and those not ``key_ok`` only score -inf."""
    offs = tl.arange(0, BLOCK_S)
    pos = block * SEL_BLOCK + offs
    key_ok = (block >= 0) & (offs < SEL_BLOCK) & (pos <= last)
    start = tl.maximum(block, 0).to(tl.int64) * SEL_BLOCK
    k1, k2 = load_split_rows(k_base + start * stride_kt, k_desc1, k_desc2, tok0 + start, hk, offs, key_ok, stride_kt,
                             BLOCK_S, TMA, DQK, D1, D2)
    s = scaled_scores(q1, q2, k1, k2, qk_scale, D2, PRECISION)
    seen = reads[:, None] & key_ok[None, :] & (pos[None, :] <= t[:, None])
    return tl.where(seen, s, float("-inf")), start, key_ok, k1, k2


@triton.jit
def _block_list(idx_ptr, union_ptr, count_ptr, row0, local, ok, hk, num_kv_heads, stride_it, stride_ih, first, last,
                NUM_SELECTED: tl.constexpr, NP: tl.constexpr, UNION: tl.constexpr, BQ: tl.constexpr,
                SEL_BLOCK: tl.constexpr, FORCED: tl.constexpr):
    """The blocks this program attends to: (where its list starts, its rows' own selections, the list's length).
    One token (BQ = 1): its own n slots (ascending, then -1), which every row reads; the length is NUM_SELECTED,
    taken as a constexpr by the caller, and the selections are unused. Several tokens: the union of their blocks
    (ascending, ``query_tiles``) and each row's selected blocks [rows, NP] (-1 unused). FORCED = 2: the union of
    the tokens' forced blocks, computed, not read: block 0, then ``blocks`` (the block before the first token's
    own, at least 1) up to the last token's own block."""
    if FORCED == 2:
        blocks = tl.maximum(first // SEL_BLOCK - 1, 1)
        chosen = ok
        count = tl.where(last >= 0, 1 + tl.maximum(last // SEL_BLOCK - blocks + 1, 0), 0)
    elif BQ == 1:
        blocks = idx_ptr + row0 * stride_it + hk * stride_ih
        chosen = ok
        count = 0
    else:
        slots = tl.arange(0, NP)
        chosen = tl.load(idx_ptr + (row0 + local)[:, None] * stride_it + hk * stride_ih + slots[None, :],
                         mask=ok[:, None] & (slots < NUM_SELECTED)[None, :], other=-1)
        list_id = tl.program_id(0).to(tl.int64) * num_kv_heads + hk
        blocks = union_ptr + list_id * UNION
        count = tl.load(count_ptr + list_id)
    return blocks, chosen, count


@triton.jit
def _listed_block(blocks, i, chosen, q1, q2, k_base, v_base, k_desc1, k_desc2, v_desc, tok0, hk, ok, t, last,
                  stride_kt, stride_vt, qk_scale, SEL_BLOCK: tl.constexpr, BLOCK_S: tl.constexpr, DQK: tl.constexpr,
                  D1: tl.constexpr, D2: tl.constexpr, DV: tl.constexpr, BLOCK_DV: tl.constexpr,
                  PRECISION: tl.constexpr, BQ: tl.constexpr, TMA: tl.constexpr, FORCED: tl.constexpr):
    """The i-th block of the program's list (``_block_list``): (masked scores s, k1, k2, v); with several tokens
    only the rows whose token selected the block read it. FORCED = 1 skips the token's two local blocks where
    they sit among slots 1 .. n - 3 (prefixes too short for n - 3 other candidates); FORCED = 2 reads each row's
    forced blocks {0, c - 1, c}, c = t // l'."""
    reads = ok
    if FORCED == 2:  # (a program past the last tile has an empty list: _block_list's count)
        block = tl.where(i == 0, 0, blocks + i - 1)
        own = t // SEL_BLOCK
        reads = ok & ((block == 0) | (block == own - 1) | (block == own))
    else:
        block = tl.load(blocks + i, mask=last >= 0, other=-1)
        if FORCED == 1:
            own = last // SEL_BLOCK
            block = tl.where((block == own - 1) | (block == own), -1, block)
        if BQ > 1:
            reads = ok & (tl.max((chosen == block).to(tl.int32), axis=1) > 0)
    s, start, key_ok, k1, k2 = _block_tile(q1, q2, k_base, k_desc1, k_desc2, tok0, hk, block, reads, t, last,
                                           stride_kt, qk_scale, SEL_BLOCK, BLOCK_S, DQK, D1, D2, PRECISION, TMA)
    v, _ = load_split_rows(v_base + start * stride_vt, v_desc, v_desc, tok0 + start, hk, tl.arange(0, BLOCK_S), key_ok,
                           stride_vt, BLOCK_S, TMA, DV, BLOCK_DV, 0)
    return s, k1, k2, v


@triton.jit
def _sel_fwd_kernel(
    q_ptr, k_ptr, v_ptr, gate_ptr, idx_ptr, union_ptr, count_ptr, out_ptr, lse_ptr, branch_ptr, cu_ptr, tile_seq_ptr,
    tile_first_ptr, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_gt, stride_gh,
    stride_it, stride_ih, stride_ot, stride_oh, stride_bt, stride_bh, num_heads, num_kv_heads, num_seqs, qk_scale,
    k_desc1, k_desc2, v_desc,
    GROUP: tl.constexpr, GP: tl.constexpr, BQ: tl.constexpr, SEL_BLOCK: tl.constexpr, BLOCK_S: tl.constexpr,
    NUM_SELECTED: tl.constexpr, NP: tl.constexpr, UNION: tl.constexpr, DQK: tl.constexpr, D1: tl.constexpr,
    D2: tl.constexpr, DV: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr, HAS_GATE: tl.constexpr,
    ACCUMULATE: tl.constexpr, TMA: tl.constexpr, FORCED: tl.constexpr,
):
    """FORCED (``selected_forward``): 0, every selected block; 1, the blocks other than the forced ones, leaving
    the partial softmax in lse and branch_out for 2, the forced blocks, which resumes from it and writes out."""
    hk, tok0, row0, local, t, ok, heads, last, q1, q2 = _query_rows(
        q_ptr, cu_ptr, tile_seq_ptr, tile_first_ptr, num_seqs, stride_qt, stride_qh, GROUP, GP, BQ, DQK, D1, D2)
    k_base = k_ptr + tok0 * stride_kt + hk * stride_kh
    v_base = v_ptr + tok0 * stride_vt + hk * stride_vh
    m_i = tl.full([BQ * GP], float("-inf"), tl.float32)
    l_i = tl.zeros([BQ * GP], tl.float32)
    acc = tl.zeros([BQ * GP, BLOCK_DV], tl.float32)
    if FORCED == 2:  # (lse, 1, o) of the other blocks is the same online-softmax state as (max, sum, acc)
        partial = tl.load(lse_ptr + (row0 + local) * num_heads + heads, mask=ok, other=float("inf"))
        seen = partial < float("inf")
        m_i = tl.where(seen, partial, float("-inf"))
        l_i = tl.where(seen, 1.0, 0.0)
        acc = load_at(branch_ptr + row0 * stride_bt, local * stride_bt + heads * stride_bh, ok & seen, 0, BLOCK_DV,
                      DV).to(tl.float32)
    blocks, chosen, count = _block_list(idx_ptr, union_ptr, count_ptr, row0, local, ok, hk, num_kv_heads, stride_it,
                                        stride_ih, row0 - tok0, last, NUM_SELECTED, NP, UNION, BQ, SEL_BLOCK, FORCED)
    # One token: a static loop over its n slots (FORCED = 1: slots 1 .. n - 3, where the forced blocks are not).
    for i in range(FORCED if BQ == 1 else 0, NUM_SELECTED - 2 * FORCED if BQ == 1 else count):
        s, _, _, v = _listed_block(blocks, i, chosen, q1, q2, k_base, v_base, k_desc1, k_desc2, v_desc, tok0, hk, ok,
                                   t, last, stride_kt, stride_vt, qk_scale, SEL_BLOCK, BLOCK_S, DQK, D1, D2, DV,
                                   BLOCK_DV, PRECISION, BQ, TMA, FORCED)
        m_i, l_i, acc = softmax_step(s, v, m_i, l_i, acc, PRECISION)
    out, lse = softmax_result(m_i, l_i, acc)
    tl.store(lse_ptr + (row0 + local) * num_heads + heads, lse, mask=ok)
    store_at(branch_ptr + row0 * stride_bt, local * stride_bt + heads * stride_bh, ok,
             out.to(branch_ptr.dtype.element_ty), 0, BLOCK_DV, DV)
    if FORCED != 1:
        if HAS_GATE:
            gate = tl.load(gate_ptr + row0 * stride_gt + local * stride_gt + heads * stride_gh, mask=ok, other=0.0)
            out = out * gate.to(tl.float32)[:, None]
        add_store_at(out_ptr + row0 * stride_ot, local * stride_ot + heads * stride_oh, ok, out, ACCUMULATE, 0,
                     BLOCK_DV, DV)


@triton.jit
def _sel_dq_kernel(
    q_ptr, k_ptr, v_ptr, gate_ptr, idx_ptr, union_ptr, count_ptr, do_ptr, branch_ptr, lse_ptr, delta_ptr, dq_ptr,
    cu_ptr, tile_seq_ptr, tile_first_ptr, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_gt, stride_gh, stride_it, stride_ih, stride_dot, stride_doh, stride_bt, stride_bh, stride_dqt, stride_dqh,
    num_heads, num_kv_heads, num_seqs, qk_scale, scale, k_desc1, k_desc2, v_desc,
    GROUP: tl.constexpr, GP: tl.constexpr, BQ: tl.constexpr, SEL_BLOCK: tl.constexpr, BLOCK_S: tl.constexpr,
    NUM_SELECTED: tl.constexpr, NP: tl.constexpr, UNION: tl.constexpr, DQK: tl.constexpr, D1: tl.constexpr,
    D2: tl.constexpr, DV: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr, HAS_GATE: tl.constexpr,
    ACCUMULATE: tl.constexpr, TMA: tl.constexpr, FORCED: tl.constexpr,
):
    """FORCED (``selected_dq``): 0, every selected block; 1, the blocks other than the forced ones; 2, the forced
    ones (the two parts of dq add; 2 reads the delta that 1 stored)."""
    hk, tok0, row0, local, t, ok, heads, last, q1, q2 = _query_rows(
        q_ptr, cu_ptr, tile_seq_ptr, tile_first_ptr, num_seqs, stride_qt, stride_qh, GROUP, GP, BQ, DQK, D1, D2)
    dq1, dq2 = zeros_split(BQ * GP, D1, D2)
    do = load_at(do_ptr + row0 * stride_dot, local * stride_dot + heads * stride_doh, ok, 0, BLOCK_DV, DV)
    stats = (row0 + local) * num_heads + heads
    lse = tl.load(lse_ptr + stats, mask=ok, other=float("inf"))
    if FORCED == 2:  # the first pass (FORCED = 1) stored delta for these rows
        delta = tl.load(delta_ptr + stats, mask=ok, other=0.0)
    else:
        delta = row_delta(do, load_at(branch_ptr + row0 * stride_bt, local * stride_bt + heads * stride_bh, ok, 0,
                                      BLOCK_DV, DV))
        tl.store(delta_ptr + stats, delta, mask=ok)
    k_base = k_ptr + tok0 * stride_kt + hk * stride_kh
    v_base = v_ptr + tok0 * stride_vt + hk * stride_vh
    blocks, chosen, count = _block_list(idx_ptr, union_ptr, count_ptr, row0, local, ok, hk, num_kv_heads, stride_it,
                                        stride_ih, row0 - tok0, last, NUM_SELECTED, NP, UNION, BQ, SEL_BLOCK, FORCED)
    for i in range(FORCED if BQ == 1 else 0, NUM_SELECTED - 2 * FORCED if BQ == 1 else count):
        s, k1, k2, v = _listed_block(blocks, i, chosen, q1, q2, k_base, v_base, k_desc1, k_desc2, v_desc, tok0, hk,
                                     ok, t, last, stride_kt, stride_vt, qk_scale, SEL_BLOCK, BLOCK_S, DQK, D1, D2, DV,
                                     BLOCK_DV, PRECISION, BQ, TMA, FORCED)
        dq1, dq2 = dq_step(tl.math.exp2(s - lse[:, None]), do, v, k1, k2, delta, dq1, dq2, D2, PRECISION)
    factor = tl.zeros([BQ * GP], tl.float32) + scale
    if HAS_GATE:
        factor *= tl.load(gate_ptr + row0 * stride_gt + local * stride_gt + heads * stride_gh, mask=ok,
                          other=0.0).to(tl.float32)
    add_store_split_at(dq_ptr + row0 * stride_dqt, local * stride_dqt + heads * stride_dqh, ok,
                       dq1 * factor[:, None], dq2 * factor[:, None], ACCUMULATE, DQK, D1, D2)


@triton.jit
def _list_chunk(chunk, k_ptr, v_ptr, chunk_list_ptr, chunk_start_ptr, list_end_ptr, block_seq_ptr, cu_ptr,
                cu_blocks_ptr, stride_kt, stride_kh, stride_vt, stride_vh, num_seqs, num_lists, blocks_per_head,
                SEL_BLOCK: tl.constexpr, BLOCK_S: tl.constexpr, CHUNK: tl.constexpr, DQK: tl.constexpr,
                D1: tl.constexpr, D2: tl.constexpr, DV: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Chunk ``chunk`` of a (kv head, block) list (``selection_lists``): (kv head, its sequence's first row, the
    block's key positions in the sequence, which of them exist, k1, k2, v of the block, the chunk's entries
    [first, end); empty past the last list)."""
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
    first = tl.load(chunk_start_ptr + chunk)
    end = tl.where(live, tl.minimum(first + CHUNK, tl.load(list_end_ptr + listed)), first)
    return hk, tok0, pos, key_ok, k1, k2, v, first, end


@triton.jit
def _gathered_rows(q_ptr, entries_ptr, e, end, hk, stride_qt, stride_qh, GROUP: tl.constexpr, GP: tl.constexpr,
                   BQ: tl.constexpr, DQK: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr):
    """One step's rows of a list chunk: BQ entries from e (those before end) x the group's GP (padded) heads,
    entry-major. -> (each row's entry, validity, token row (int64), head within the group, query head, q1, q2)."""
    r = tl.arange(0, BQ * GP)
    g = r % GP
    entry = e + r // GP
    ok = (entry < end) & (g < GROUP)
    tok = tl.load(entries_ptr + entry, mask=ok, other=0).to(tl.int64)
    head = hk * GROUP + g
    q1, q2 = load_split_at(q_ptr, tok * stride_qt + head * stride_qh, ok, DQK, D1, D2)
    return entry, ok, tok, g, head, q1, q2


@triton.jit
def _sel_fwd_part_kernel(
    q_ptr, k_ptr, v_ptr, part_o_ptr, part_lse_ptr, entries_ptr, slots_ptr, chunk_list_ptr, chunk_start_ptr,
    list_end_ptr, block_seq_ptr, cu_ptr, cu_blocks_ptr, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt,
    stride_vh, num_seqs, num_lists, blocks_per_head, qk_scale,
    GROUP: tl.constexpr, GP: tl.constexpr, BQ: tl.constexpr, SEL_BLOCK: tl.constexpr, BLOCK_S: tl.constexpr,
    CHUNK: tl.constexpr, DQK: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, DV: tl.constexpr,
    BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):
    """The selection forward of one chunk of one (kv head, block) list (``SelectedTiles.forwards_by_block``): each
    gathered (token, head) row's attention over this block alone, normalised, and its base-2 lse (+inf where it
    sees no key), stored at the row of its (token, kv head, slot) for ``_sel_fwd_combine_kernel``."""
    hk, tok0, pos, key_ok, k1, k2, v, first, end = _list_chunk(
        tl.program_id(0), k_ptr, v_ptr, chunk_list_ptr, chunk_start_ptr, list_end_ptr, block_seq_ptr, cu_ptr,
        cu_blocks_ptr, stride_kt, stride_kh, stride_vt, stride_vh, num_seqs, num_lists, blocks_per_head, SEL_BLOCK,
        BLOCK_S, CHUNK, DQK, D1, D2, DV, BLOCK_DV)
    for e in range(first, end, BQ):
        entry, ok, tok, g, _, q1, q2 = _gathered_rows(q_ptr, entries_ptr, e, end, hk, stride_qt, stride_qh, GROUP,
                                                      GP, BQ, DQK, D1, D2)
        s = scaled_scores(q1, q2, k1, k2, qk_scale, D2, PRECISION)
        seen = ok[:, None] & key_ok[None, :] & (pos[None, :] <= (tok - tok0)[:, None])
        m_i, l_i, acc = softmax_step(tl.where(seen, s, float("-inf")), v, tl.full([BQ * GP], float("-inf"),
                                     tl.float32), tl.zeros([BQ * GP], tl.float32),
                                     tl.zeros([BQ * GP, BLOCK_DV], tl.float32), PRECISION)
        out, lse = softmax_result(m_i, l_i, acc)
        part_rows = tl.load(slots_ptr + entry, mask=ok, other=0).to(tl.int64) * GROUP + g
        store_at(part_o_ptr, part_rows * DV, ok, out.to(part_o_ptr.dtype.element_ty), 0, BLOCK_DV, DV)
        tl.store(part_lse_ptr + part_rows, lse, mask=ok)


@triton.jit
def _slot_rows(idx_ptr, stride_it, stride_ih, tok, local, hk, num_kv_heads, GROUP: tl.constexpr,
               NUM_SELECTED: tl.constexpr, NSP: tl.constexpr, GP: tl.constexpr):
    """The part rows of (token row tok, kv head hk), all its slots at once: ([NSP, GP] whether the slot is used and
    the head real, [NSP, GP] each row's index), slots padded to NSP, the group's heads to GP. Parts are laid out per
    (token, kv head, slot, head of the group), counting from the range's first token (``local`` = tok - first_row):
    a ``selection_lists`` slot times GROUP, plus the head."""
    slot = tl.arange(0, NSP)[:, None]
    g = tl.arange(0, GP)[None, :]
    used = tl.load(idx_ptr + tok * stride_it + hk * stride_ih + slot, mask=slot < NUM_SELECTED, other=-1) >= 0
    return used & (g < GROUP), ((local * num_kv_heads + hk) * NUM_SELECTED + slot) * GROUP + g


@triton.jit
def _slot_tiles(ptr, rows, live, COL0: tl.constexpr, WIDTH: tl.constexpr, NCOLS: tl.constexpr):
    """[NSP, GP, WIDTH] float32: columns COL0 .. COL0 + WIDTH of the part rows ``rows`` (rows of NCOLS elements)
    where live, zeros elsewhere (nsa.kernels.tiles.load_at with one more row axis)."""
    cols = COL0 + tl.arange(0, WIDTH)[None, None, :]
    return tl.load(ptr + rows[:, :, None] * NCOLS + cols, mask=live[:, :, None] & (cols < NCOLS),
                   other=0.0).to(tl.float32)


@triton.jit
def _sel_fwd_combine_kernel(
    part_o_ptr, part_lse_ptr, idx_ptr, gate_ptr, out_ptr, lse_ptr, branch_ptr, stride_it, stride_ih, stride_gt,
    stride_gh, stride_ot, stride_oh, stride_bt, stride_bh, num_heads, num_kv_heads, first_row,
    GROUP: tl.constexpr, GP: tl.constexpr, NUM_SELECTED: tl.constexpr, NSP: tl.constexpr, DV: tl.constexpr,
    BLOCK_DV: tl.constexpr, HAS_GATE: tl.constexpr, ACCUMULATE: tl.constexpr,
):
    """The selection's output of the group's heads of one (token, kv head) from its slots' per-block results
    (``_sel_fwd_part_kernel``), all slots loaded at once and combined by their lse over the slot axis (a fixed
    reduction tree: the same bits on every run): out (+)= gate * o, lse (base 2, +inf where no slot saw a key),
    branch_out = o, as ``_sel_fwd_kernel`` writes them. Unused slots (-1) are not read. The parts count from token
    row first_row's."""
    local = tl.program_id(0).to(tl.int64)
    tok = first_row + local
    hk = tl.program_id(1)
    live, rows = _slot_rows(idx_ptr, stride_it, stride_ih, tok, local, hk, num_kv_heads, GROUP, NUM_SELECTED, NSP,
                            GP)
    part_lse = tl.load(part_lse_ptr + rows, mask=live, other=float("inf"))
    part_lse = tl.where(part_lse < float("inf"), part_lse, float("-inf"))  # no key seen: no mass
    m_i = tl.max(part_lse, 0)
    weight = tl.math.exp2(part_lse - tl.where(m_i == float("-inf"), 0.0, m_i)[None, :])
    part = _slot_tiles(part_o_ptr, rows, live & (part_lse > float("-inf")), 0, BLOCK_DV, DV)
    out, lse = softmax_result(m_i, tl.sum(weight, 0), tl.sum(part * weight[:, :, None], 0))
    g = tl.arange(0, GP)
    ok = g < GROUP
    heads = hk * GROUP + g
    tl.store(lse_ptr + tok * num_heads + heads, lse, mask=ok)
    store_at(branch_ptr + tok * stride_bt, heads * stride_bh, ok, out.to(branch_ptr.dtype.element_ty), 0, BLOCK_DV,
             DV)
    if HAS_GATE:
        out = out * tl.load(gate_ptr + tok * stride_gt + heads * stride_gh, mask=ok, other=0.0).to(tl.float32)[:, None]
    add_store_at(out_ptr, tok * stride_ot + heads * stride_oh, ok, out, ACCUMULATE, 0, BLOCK_DV, DV)


@triton.jit
def _sel_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, gate_ptr, do_ptr, lse_ptr, delta_ptr, part_k_ptr, part_v_ptr, part_q_ptr, entries_ptr,
    slots_ptr, chunk_list_ptr, chunk_start_ptr, list_end_ptr, block_seq_ptr, cu_ptr, cu_blocks_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_gt, stride_gh, stride_dot, stride_doh,
    num_heads, num_seqs, num_lists, blocks_per_head, qk_scale, scale,
    GROUP: tl.constexpr, GP: tl.constexpr, BQ: tl.constexpr, SEL_BLOCK: tl.constexpr, BLOCK_S: tl.constexpr,
    CHUNK: tl.constexpr, DQK: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, DV: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_DK: tl.constexpr, PRECISION: tl.constexpr, HAS_GATE: tl.constexpr,
    DQ: tl.constexpr,
):
    """Partial dk / dv of one chunk of one (kv head, block) list: sum over its tokens and the group's heads. DQ = 1:
    each step's rows also get their dq share from this block (dS k, one more matmul), stored at the row of their
    (token, kv head, slot) in part_q (``slots``: each entry's flat index into the selection) for
    ``_sel_dq_reduce_kernel``; DQ = 2: their dS over this block's BLOCK_S keys, stored there for
    ``_sel_dq_ds_kernel``."""
    chunk = tl.program_id(0)
    hk, tok0, pos, key_ok, k1, k2, v, first, end = _list_chunk(
        chunk, k_ptr, v_ptr, chunk_list_ptr, chunk_start_ptr, list_end_ptr, block_seq_ptr, cu_ptr, cu_blocks_ptr,
        stride_kt, stride_kh, stride_vt, stride_vh, num_seqs, num_lists, blocks_per_head, SEL_BLOCK, BLOCK_S, CHUNK,
        DQK, D1, D2, DV, BLOCK_DV)
    offs = tl.arange(0, BLOCK_S)
    dk1, dk2 = zeros_split(BLOCK_S, D1, D2)
    dv = tl.zeros([BLOCK_S, BLOCK_DV], tl.float32)
    for e in range(first, end, BQ):
        entry, ok, tok, g, head, q1, q2 = _gathered_rows(q_ptr, entries_ptr, e, end, hk, stride_qt, stride_qh, GROUP,
                                                         GP, BQ, DQK, D1, D2)
        s_t = scaled_scores(k1, k2, q1, q2, qk_scale, D2, PRECISION)
        seen = key_ok[:, None] & ok[None, :] & (pos[:, None] <= (tok - tok0)[None, :])
        dk1, dk2, dv, ds_t = gathered_dkdv_step(tl.where(seen, s_t, float("-inf")), q1, q2, v, do_ptr, lse_ptr,
                                                delta_ptr, gate_ptr, tok * stride_dot + head * stride_doh,
                                                tok * num_heads + head, tok * stride_gt + head * stride_gh, ok, dk1,
                                                dk2, dv, D2, DV, BLOCK_DV, PRECISION, HAS_GATE)
        if DQ > 0:  # ds_t carries the gate (p_t did): dq's share is scale * ds k
            part_rows = tl.load(slots_ptr + entry, mask=ok, other=0).to(tl.int64) * GROUP + g
            ds = tl.trans(ds_t)
            if DQ == 2:
                store_at(part_q_ptr, part_rows * BLOCK_S, ok, ds, 0, BLOCK_S, BLOCK_S)
            else:
                share = tl.dot(ds, k1, input_precision=PRECISION) * scale
                store_at(part_q_ptr, part_rows * DQK, ok, share.to(part_q_ptr.dtype.element_ty), 0, D1, DQK)
                if D2 > 0:
                    share = tl.dot(ds, k2, input_precision=PRECISION) * scale
                    store_at(part_q_ptr, part_rows * DQK, ok, share.to(part_q_ptr.dtype.element_ty), D1, D2, DQK)
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
    BLOCK_DV: tl.constexpr, ACCUMULATE: tl.constexpr,
):
    """dk / dv of one (kv head, block): the sum of its chunks' partials, in chunk order (ACCUMULATE: added to dk /
    dv, an earlier token range's sums: ``selected_dkdv``'s float32 buffers)."""
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
    chunk0, chunk1 = tl.load(list_chunks_ptr + listed), tl.load(list_chunks_ptr + listed + 1)
    if ACCUMULATE:  # a block no token of this range read keeps the earlier ranges' sums: not read, not written
        key_ok = key_ok & (chunk1 > chunk0)
    all_rows = offs >= 0
    dk = tl.zeros([BLOCK_S, BLOCK_DK], tl.float32)
    dv = tl.zeros([BLOCK_S, BLOCK_DV], tl.float32)
    for chunk in range(chunk0, chunk1):
        part_rows = (chunk * BLOCK_S + offs).to(tl.int64)  # the partial buffers pass 2^31 elements at 512k
        dk += load_at(part_k_ptr, part_rows * BLOCK_DK, all_rows, 0, BLOCK_DK, BLOCK_DK)
        dv += load_at(part_v_ptr, part_rows * BLOCK_DV, all_rows, 0, BLOCK_DV, BLOCK_DV)
    dk_rows = dk_ptr + (tok0 + first) * stride_dkt + hk * stride_dkh
    dv_rows = dv_ptr + (tok0 + first) * stride_dvt + hk * stride_dvh
    if ACCUMULATE:
        dk += load_tile(dk_rows, offs, key_ok, stride_dkt, 0, BLOCK_DK, DQK)
        dv += load_tile(dv_rows, offs, key_ok, stride_dvt, 0, BLOCK_DV, DV)
    store_tile(dk_rows, offs, key_ok, stride_dkt, dk.to(dk_ptr.dtype.element_ty), 0, BLOCK_DK, DQK)
    store_tile(dv_rows, offs, key_ok, stride_dvt, dv.to(dv_ptr.dtype.element_ty), 0, BLOCK_DV, DV)


@triton.jit
def _sel_dq_reduce_kernel(
    part_q_ptr, idx_ptr, dq_ptr, stride_it, stride_ih, stride_dqt, stride_dqh, num_kv_heads, first_row,
    GROUP: tl.constexpr, GP: tl.constexpr, NUM_SELECTED: tl.constexpr, NSP: tl.constexpr, DQK: tl.constexpr,
    D1: tl.constexpr, D2: tl.constexpr, ACCUMULATE: tl.constexpr,
):
    """dq of the group's heads of one (token, kv head) (+)= its selected slots' dq shares, all slots loaded at once
    and summed in float32 over the slot axis (a fixed reduction tree: the same bits on every run). Unused slots (-1)
    hold no share and are not read. The shares count from token row first_row's (``dq_share_ranges``)."""
    local = tl.program_id(0).to(tl.int64)
    tok = first_row + local
    hk = tl.program_id(1)
    live, rows = _slot_rows(idx_ptr, stride_it, stride_ih, tok, local, hk, num_kv_heads, GROUP, NUM_SELECTED, NSP,
                            GP)
    g = tl.arange(0, GP)
    ok = g < GROUP
    dq_offsets = tok * stride_dqt + (hk * GROUP + g) * stride_dqh
    add_store_at(dq_ptr, dq_offsets, ok, tl.sum(_slot_tiles(part_q_ptr, rows, live, 0, D1, DQK), 0), ACCUMULATE, 0,
                 D1, DQK)
    if D2 > 0:
        add_store_at(dq_ptr, dq_offsets, ok, tl.sum(_slot_tiles(part_q_ptr, rows, live, D1, D2, DQK), 0), ACCUMULATE,
                     D1, D2, DQK)


@triton.jit
def _sel_dq_ds_kernel(
    part_ds_ptr, k_ptr, idx_ptr, seq_ptr, cu_ptr, dq_ptr, stride_kt, stride_kh, stride_it, stride_ih, stride_dqt,
    stride_dqh, num_kv_heads, first_row, scale, k_desc1, k_desc2,
    GROUP: tl.constexpr, GP: tl.constexpr, NUM_SELECTED: tl.constexpr, SEL_BLOCK: tl.constexpr,
    BLOCK_S: tl.constexpr, DQK: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, PRECISION: tl.constexpr,
    TMA: tl.constexpr, ACCUMULATE: tl.constexpr,
):
    """dq of the group's heads of one (token, kv head) (+)= scale * sum over its slots, in slot order, of dS k: dS
    the slot's [G, BLOCK_S] rows that the dk/dv stored (DQ = 2; they carry the gate, and are zero at the keys the
    token does not see), k the slot's block. Unused slots (-1) read no dS. The dS rows count from token row
    first_row's (``dq_share_ranges``)."""
    local = tl.program_id(0).to(tl.int64)
    tok = first_row + local
    hk = tl.program_id(1)
    tok0 = tl.load(cu_ptr + tl.load(seq_ptr + tok)).to(tl.int64)
    g = tl.arange(0, GP)
    offs = tl.arange(0, BLOCK_S)
    k_base = k_ptr + tok0 * stride_kt + hk * stride_kh
    dq1, dq2 = zeros_split(GP, D1, D2)
    for i in range(NUM_SELECTED):
        block = tl.load(idx_ptr + tok * stride_it + hk * stride_ih + i)
        rows = ((local * num_kv_heads + hk) * NUM_SELECTED + i) * GROUP + g
        ds = load_at(part_ds_ptr, rows * BLOCK_S, (g < GROUP) & (block >= 0), 0, BLOCK_S, BLOCK_S)
        start = tl.maximum(block, 0).to(tl.int64) * SEL_BLOCK
        # keys past the token, or past SEL_BLOCK, have dS = 0: TMA may read them, pointer loads zero them
        key_ok = (block >= 0) & (offs < SEL_BLOCK) & (start + offs <= tok - tok0)
        k1, k2 = load_split_rows(k_base + start * stride_kt, k_desc1, k_desc2, tok0 + start, hk, offs, key_ok,
                                 stride_kt, BLOCK_S, TMA, DQK, D1, D2)
        dq1 += tl.dot(ds, k1, input_precision=PRECISION)
        if D2 > 0:
            dq2 += tl.dot(ds, k2, input_precision=PRECISION)
    add_store_split_at(dq_ptr, tok * stride_dqt + (hk * GROUP + g) * stride_dqh, g < GROUP, dq1 * scale, dq2 * scale,
                       ACCUMULATE, DQK, D1, D2)


@triton.jit
def _row_delta_kernel(do_ptr, o_ptr, delta_ptr, num_rows, num_heads, stride_dot, stride_doh, stride_ot, stride_oh,
                      DV: tl.constexpr, BLOCK_DV: tl.constexpr, ROWS: tl.constexpr):
    """delta = dO . o for ROWS (token, head) rows, token-major (the dq kernels' ``row_delta``; here for the
    selection's dq inside its dk/dv, ``SelectedTiles.fuses_dq``)."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    ok = rows < num_rows
    tok, head = rows // num_heads, rows % num_heads
    do = load_at(do_ptr, tok * stride_dot + head * stride_doh, ok, 0, BLOCK_DV, DV)
    o = load_at(o_ptr, tok * stride_ot + head * stride_oh, ok, 0, BLOCK_DV, DV)
    tl.store(delta_ptr + rows, row_delta(do, o), mask=ok)


@triton.jit
def _query_union_kernel(idx_ptr, union_ptr, count_ptr, tile_seq_ptr, tile_first_ptr, cu_ptr, num_seqs, num_kv_heads,
                        stride_it, stride_ih, NUM_SELECTED: tl.constexpr, NP: tl.constexpr, BQ: tl.constexpr,
                        UNION: tl.constexpr):
    """The union list of one (tile of BQ tokens, kv head): its distinct selected blocks, ascending, then -1, and
    their count. The BQ x NP slots are sorted once; a slot is a new block where it differs from its predecessor,
    and its rank among the new ones (a prefix count) is where it goes: ranks are distinct, so the stores never
    collide and the list comes out the same on every run."""
    hk = tl.program_id(1)
    tok0, seq_len, _, _, first = tile_origin(tile_seq_ptr, tile_first_ptr, cu_ptr, cu_ptr, num_seqs, BQ)
    slots = tl.arange(0, BQ * NP)
    t = first + slots // NP
    ok = (t < seq_len) & (slots % NP < NUM_SELECTED)
    chosen = tl.load(idx_ptr + (tok0 + t) * stride_it + hk * stride_ih + slots % NP, mask=ok, other=-1)
    never = 2147483647  # int32's largest: unused slots sort after every block
    ordered = tl.sort(tl.where(chosen >= 0, chosen, never))
    previous = tl.gather(ordered, tl.maximum(slots - 1, 0), 0)
    fresh = (ordered < never) & ((slots == 0) | (ordered != previous))
    rank = tl.cumsum(fresh.to(tl.int32), 0) - 1
    count = tl.sum(fresh.to(tl.int32), 0)
    list_id = tl.program_id(0).to(tl.int64) * num_kv_heads + hk
    tl.store(union_ptr + list_id * UNION + rank, ordered, mask=fresh)
    unused = (slots >= count) & (slots < UNION)
    tl.store(union_ptr + list_id * UNION + slots, tl.full([BQ * NP], -1, tl.int32), mask=unused)
    tl.store(count_ptr + list_id, count)


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
    slots: Tensor | None  # int32, like entries: each entry's flat index into block_indices (None unless asked for)


def selection_lists(block_indices: Tensor, packed: Packed, sel_block_size: int, chunk: int, with_slots: bool = False,
                    rows: tuple[int, int] | None = None) -> SelectionLists:
    """Invert the selection: which tokens read each (kv head, block). A stable sort keeps every list in token
    order, so the dk/dv sums run in a fixed order. No host sync (the sizes are host bounds). with_slots: also each
    entry's (token, kv head, slot) as its flat index into block_indices (the dq shares' rows,
    ``SelectedTiles.fuses_dq``). rows:
    only the selections of token rows [r0, r1): the entries stay token rows of the whole batch, the slots count
    from r0's first."""
    num_tokens, num_kv_heads, num_selected = block_indices.shape
    first_row, end_row = rows or (0, num_tokens)
    chosen = block_indices[first_row:end_row]
    # A sequence's selection blocks are its tiles of sel_block_size tokens: global block -> sequence, and a bound on
    # the global block count, as for any tiles.
    blocks = packed_tiles(packed, sel_block_size)
    cu_blocks, blocks_per_head = blocks.first, blocks.grid
    num_lists = num_kv_heads * blocks_per_head
    num_chunks = max(1, -(-chosen.numel() // chunk) + num_lists)
    bases, list_ids, chunk_ids = _list_keys(packed, blocks, num_kv_heads, num_chunks)
    keys = torch.where(chosen >= 0, bases[first_row:end_row] + chosen, num_lists).flatten()
    sorted_keys, order = torch.sort(keys, stable=True)
    entries = (order // (num_kv_heads * num_selected)).to(torch.int32)
    if first_row:
        entries += first_row
    # int32 throughout (the kernels' index type): no casts after the sort
    bounds = torch.searchsorted(sorted_keys, list_ids, out_int32=True)
    per_list = (bounds[1:] - bounds[:-1] + chunk - 1) // chunk
    list_chunks = torch.cat((per_list.new_zeros(1), per_list.cumsum(0, dtype=torch.int32)))
    chunk_list = torch.searchsorted(list_chunks[1:], chunk_ids, right=True, out_int32=True)
    owner = chunk_list.clamp_max(num_lists - 1)
    chunk_start = bounds[owner] + (chunk_ids - list_chunks[owner]) * chunk
    return SelectionLists(entries, bounds[1:], list_chunks, chunk_list, chunk_start, blocks.seq, cu_blocks,
                          blocks_per_head, order.to(torch.int32) if with_slots else None)


def _list_keys(packed: Packed, blocks: TileTable, num_kv_heads: int, num_chunks: int
               ) -> tuple[Tensor, Tensor, Tensor]:
    """``selection_lists``' index tensors: bases int32 [N, H_kv, 1] (the list of block 0 of each token's sequence
    under each kv head: lists are kv head-major over the global blocks), list ids [L + 1] and chunk ids
    [num_chunks] (aranges). Kept per size for a [B, T] batch (nsa.kernels.tiles.packed_sized)."""
    def build() -> tuple[Tensor, Tensor, Tensor]:
        device = packed.cu.device
        head = torch.arange(num_kv_heads, device=device, dtype=torch.int32)[None, :, None] * blocks.grid
        bases = blocks.first[token_sequences(packed).long()][:, None, None] + head
        num_lists = num_kv_heads * blocks.grid
        return (bases, torch.arange(num_lists + 1, device=device, dtype=torch.int32),
                torch.arange(num_chunks, device=device, dtype=torch.int32))

    return packed_sized(packed, ("list keys", blocks.grid, num_kv_heads, num_chunks), build)


def _launch_args(q: Tensor, k: Tensor, v: Tensor, sel_block_size: int) -> dict:
    group = q.shape[1] // k.shape[1]
    return {"GROUP": group, "GP": max(16, next_power_of_2(group)), "SEL_BLOCK": sel_block_size,
            "BLOCK_S": max(16, next_power_of_2(sel_block_size)), "PRECISION": dot_precision(q.dtype),
            **split_dims(q.shape[-1], v.shape[-1])}


def _gate_args(gate: Tensor | None, q: Tensor) -> tuple[Tensor, int, int]:
    return (q, 0, 0) if gate is None else (gate, gate.stride(0), gate.stride(1))


class QueryTiles(NamedTuple):
    """The forward / dq programs' tiles: BQ neighbouring tokens of one sequence per program (tile table), and for
    BQ > 1 the union of each (tile, kv head)'s selected blocks, ascending: ``blocks`` int32 [grid * H_kv, BQ * n]
    (only the first ``counts`` [grid * H_kv] entries are read)."""

    table: TileTable
    blocks: Tensor
    counts: Tensor
    constexprs: dict[str, int]


def query_tile_shape(group: int, rows: int) -> dict[str, int]:
    """BQ = rows // GP tokens per program, GP = G rounded up to a power of two, at least 16 rows (tl.dot's smallest
    M): a small group fills its tile with neighbouring tokens instead of padding rows. BQ = 1 (rows < 2 GP, e.g.
    0): one token per program, its group padded to 16 rows."""
    gp = next_power_of_2(group)
    bq = max(1, rows // gp)
    if bq == 1:
        gp = max(16, gp)
    return {"GP": gp, "BQ": max(bq, 16 // gp)}


def union_list_shape(total: int, num_seqs: int, group: int, num_kv_heads: int, num_selected: int,
                     tiles: SelectedTiles) -> tuple[int, int]:
    """Shape of ``query_tiles``' union lists for ``total`` token rows in ``num_seqs`` sequences: [grid * H_kv,
    BQ * n], or (0, 0) where BQ = 1 (each program reads its token's own indices). From sizes alone, so the
    fake implementation of nsa::prefill, which returns the lists for the backward, knows it."""
    bq = query_tile_shape(group, tiles.rows)["BQ"]
    if bq == 1:
        return 0, 0
    return tile_grid(total, num_seqs, bq) * num_kv_heads, bq * num_selected


def query_tiles(block_indices: Tensor, packed: Packed, group: int, tiles: SelectedTiles,
                unions: tuple[Tensor, Tensor] | None = None) -> QueryTiles:
    """The tiles of ``query_tile_shape`` over the packed sequences, with their union lists. No host sync.
    ``unions``: (blocks, counts) of an earlier call on the same selection (the forward's, kept for dq)."""
    shape = query_tile_shape(group, tiles.rows)
    gp, bq = shape["GP"], shape["BQ"]
    num_kv_heads, num_selected = block_indices.shape[1:]
    table = packed_tiles(packed, bq)
    constexprs = {"GP": gp, "BQ": bq, "NP": next_power_of_2(num_selected), "UNION": bq * num_selected}
    if bq == 1:  # each program reads its token's own indices
        return QueryTiles(table, block_indices, block_indices, constexprs)
    if unions is not None:
        return QueryTiles(table, *unions, constexprs)
    union = constexprs["UNION"]
    blocks = block_indices.new_empty(table.grid * num_kv_heads, union, dtype=torch.int32)
    counts = block_indices.new_empty(table.grid * num_kv_heads, dtype=torch.int32)
    # no tokens at all: every program is past the last tile and writes an empty list
    _query_union_kernel[(table.grid, num_kv_heads)](
        block_indices, blocks, counts, table.seq, table.first, packed.cu, packed.num_seqs, num_kv_heads,
        block_indices.stride(0), block_indices.stride(1), NUM_SELECTED=num_selected, NP=constexprs["NP"], BQ=bq,
        UNION=union)
    return QueryTiles(table, blocks, counts, constexprs)


def union_lists(query: QueryTiles) -> tuple[Tensor, Tensor]:
    """(blocks, counts) of ``query`` to keep for a later ``query_tiles(unions=...)``; empty where BQ = 1 (the lists
    are the block indices themselves)."""
    if query.constexprs["BQ"] == 1:
        return no_union_lists(query.blocks)
    return query.blocks, query.counts


def no_union_lists(block_indices: Tensor) -> tuple[Tensor, Tensor]:
    """Empty (blocks, counts): two tensors, since a custom op's outputs may not alias each other."""
    return block_indices.new_empty(0, 0, dtype=torch.int32), block_indices.new_empty(0, dtype=torch.int32)


def kept_union_shape(total: int, num_seqs: int, group: int, num_kv_heads: int, num_selected: int,
                     tiles: SelectedTiles) -> tuple[int, int]:
    """Shape of the union lists ``selected_forward`` returns for the backward: ``union_list_shape``'s, or (0, 0)
    where the selection's dq comes with its dk/dv (tiles.dq_in_dkdv), which reads none."""
    if tiles.dq_in_dkdv(group):
        return 0, 0
    return union_list_shape(total, num_seqs, group, num_kv_heads, num_selected, tiles)


def query_launch(tiles: SelectedTiles, constexprs: dict[str, int], dq: bool) -> dict[str, int]:
    """The fwd (dq: the dq) launch settings for programs of ``query_tile_shape``'s BQ tokens, at the head dims
    DQK / DV of ``constexprs``."""
    head_dim = max(constexprs["DQK"], constexprs["DV"])
    if constexprs["BQ"] > 1 and not (dq and head_dim > tiles.tile_dq_max_dim):
        return {"num_warps": tiles.tile_num_warps, "num_stages": tiles.tile_num_stages}
    return {"num_warps": tiles.num_warps, "num_stages": tiles.dq_num_stages if dq else tiles.num_stages}


def _tile_args(q: Tensor, k: Tensor, v: Tensor, block_indices: Tensor, packed: Packed, sel_block_size: int,
               tiles: SelectedTiles, unions: tuple[Tensor, Tensor] | None) -> tuple[QueryTiles, dict]:
    group = q.shape[1] // k.shape[1]
    query = query_tiles(block_indices, packed, group, tiles, unions)
    args = {"GROUP": group, "SEL_BLOCK": sel_block_size, "BLOCK_S": max(16, next_power_of_2(sel_block_size)),
            "PRECISION": dot_precision(q.dtype), "NUM_SELECTED": block_indices.shape[-1], **query.constexprs,
            **split_dims(q.shape[-1], v.shape[-1])}
    return query, args


def forced_tile_shape(group: int, tiles: SelectedTiles) -> dict[str, int]:
    """``query_tile_shape`` of the forced blocks' programs: forced_rows rows, at least two tokens."""
    return query_tile_shape(group, max(tiles.forced_rows, 2 * next_power_of_2(group)))


def forced_tiles(block_indices: Tensor, packed: Packed, group: int, tiles: SelectedTiles) -> QueryTiles:
    """Programs of ``forced_tile_shape`` for the forced blocks (FORCED = 2), which compute their blocks: no union
    lists (``blocks`` / ``counts`` are never read)."""
    shape = forced_tile_shape(group, tiles)
    num_selected = block_indices.shape[-1]
    table = packed_tiles(packed, shape["BQ"])
    constexprs = {**shape, "NP": next_power_of_2(num_selected), "UNION": shape["BQ"] * num_selected}
    return QueryTiles(table, block_indices, block_indices, constexprs)


def _passes(query: QueryTiles, args: dict, block_indices: Tensor, packed: Packed, tiles: SelectedTiles, dq: bool
            ) -> list[tuple[QueryTiles, dict, int, dict[str, int]]]:
    """The launches of one forward (dq) pass as (tiles, constexprs, FORCED, launch settings): one over every
    selected block, or, with tiles.forced_apart and one token per program, one over each token's chosen blocks
    (FORCED = 1) and one over the forced blocks (FORCED = 2) on ``forced_tiles``, which share them between
    neighbouring tokens. block_indices must then hold the forced blocks, as the top-n writes them."""
    if not (tiles.forced_apart and query.constexprs["BQ"] == 1 and args["NUM_SELECTED"] >= 3):
        return [(query, args, 0, query_launch(tiles, args, dq))]
    forced = forced_tiles(block_indices, packed, args["GROUP"], tiles)
    return [(query, args, 1, query_launch(tiles, args, dq)),
            (forced, {**args, **forced.constexprs}, 2, forced_launch(tiles))]


def forced_launch(tiles: SelectedTiles) -> dict[str, int]:
    """The launch settings of the forced blocks' programs (FORCED = 2)."""
    return {"num_warps": tiles.forced_num_warps, "num_stages": tiles.forced_num_stages}


def selected_forward(q: Tensor, k: Tensor, v: Tensor, gate: Tensor | None, block_indices: Tensor, out: Tensor,
                     lse: Tensor, branch_out: Tensor, packed: Packed, sel_block_size: int, scale: float,
                     accumulate: bool, tiles: SelectedTiles) -> tuple[Tensor, Tensor]:
    """out[rows] (+)= gate * attention over the selected blocks; lse[rows] base 2 (+inf: nothing selected);
    branch_out[rows] = the attention itself, un-gated (out's shape; for selected_dq). Returns the query tiles' union
    lists (``union_lists``) for ``selected_dq`` on the same selection. With tiles.forced_apart (``_passes``) the
    other blocks' normalised partial output passes through branch_out, rounded to its dtype. Where
    tiles.forwards_by_block, over the blocks' token lists instead (``_block_forward``). Where the dq comes with the
    dk/dv (tiles.dq_in_dkdv) no union lists are kept (``kept_union_shape``)."""
    group = q.shape[1] // k.shape[1]
    if tiles.forwards_by_block(group):
        _block_forward(q, k, v, gate, block_indices, out, lse, branch_out, packed, sel_block_size, scale, accumulate,
                       tiles)
        if tiles.dq_in_dkdv(group):
            return no_union_lists(block_indices)
        return union_lists(query_tiles(block_indices, packed, group, tiles))
    gate_t, stride_gt, stride_gh = _gate_args(gate, q)
    query, args = _tile_args(q, k, v, block_indices, packed, sel_block_size, tiles, None)
    descriptors = kv_descriptors(k, v, args["BLOCK_S"], args, tiles.tma)
    for part, part_args, forced, launch in _passes(query, args, block_indices, packed, tiles, dq=False):
        _sel_fwd_kernel[(part.table.grid, k.shape[1])](
            q, k, v, gate_t, block_indices, part.blocks, part.counts, out, lse, branch_out, packed.cu, part.table.seq,
            part.table.first, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            stride_gt, stride_gh, block_indices.stride(0), block_indices.stride(1), out.stride(0), out.stride(1),
            branch_out.stride(0), branch_out.stride(1), q.shape[1], k.shape[1], packed.num_seqs, scale * LOG2E,
            **descriptors, HAS_GATE=gate is not None, ACCUMULATE=accumulate, FORCED=forced, **part_args, **launch,
        )
    return no_union_lists(block_indices) if tiles.dq_in_dkdv(group) else union_lists(query)


def _block_forward(q: Tensor, k: Tensor, v: Tensor, gate: Tensor | None, block_indices: Tensor, out: Tensor,
                   lse: Tensor, branch_out: Tensor, packed: Packed, sel_block_size: int, scale: float,
                   accumulate: bool, tiles: SelectedTiles) -> None:
    """``selected_forward`` over the blocks' token lists (tiles.forwards_by_block), in token ranges whose per-block
    parts (one [G, d_v] row in q's dtype and G float32 lse per (token, kv head, slot)) take at most
    tiles.block_forward_bytes."""
    num_kv_heads, num_selected = block_indices.shape[1:]
    args = _launch_args(q, k, v, sel_block_size)
    group, dims = args["GROUP"], {name: args[name] for name in ("DQK", "D1", "D2", "DV", "BLOCK_DV")}
    gate_t, stride_gt, stride_gh = _gate_args(gate, q)
    chunk = tiles.dkv_chunk(packed.total)
    slot_bytes = num_kv_heads * num_selected * group * (v.shape[-1] * q.element_size() + 4)
    for r0, r1 in token_ranges(q.shape[0], slot_bytes, tiles.block_forward_bytes):
        lists = selection_lists(block_indices, packed, sel_block_size, chunk, with_slots=True, rows=(r0, r1))
        num_parts = (r1 - r0) * num_kv_heads * num_selected * group
        part_o = output_buffer(num_parts, v.shape[-1], like=q)
        part_lse = output_buffer(num_parts, like=q, dtype=torch.float32)
        assert lists.slots is not None
        _sel_fwd_part_kernel[(lists.chunk_list.numel(),)](
            q, k, v, part_o, part_lse, lists.entries, lists.slots, lists.chunk_list, lists.chunk_start,
            lists.list_end, lists.block_seq, packed.cu, lists.cu_blocks, q.stride(0), q.stride(1), k.stride(0),
            k.stride(1), v.stride(0), v.stride(1), packed.num_seqs, num_kv_heads * lists.blocks_per_head,
            lists.blocks_per_head, scale * LOG2E, SEL_BLOCK=sel_block_size, BLOCK_S=args["BLOCK_S"], CHUNK=chunk,
            PRECISION=args["PRECISION"], GROUP=group, **dims, **dkv_rows(group, tiles),
            num_warps=tiles.dkv_num_warps, num_stages=tiles.dkv_num_stages,
        )
        _sel_fwd_combine_kernel[(r1 - r0, num_kv_heads)](
            part_o, part_lse, block_indices, gate_t, out, lse, branch_out, block_indices.stride(0),
            block_indices.stride(1), stride_gt, stride_gh, out.stride(0), out.stride(1), branch_out.stride(0),
            branch_out.stride(1), q.shape[1], num_kv_heads, r0, GROUP=group, NUM_SELECTED=num_selected,
            DV=v.shape[-1], BLOCK_DV=args["BLOCK_DV"], HAS_GATE=gate is not None, ACCUMULATE=accumulate,
            **slot_launch(group, num_selected),
        )


def slot_launch(group: int, num_selected: int) -> dict[str, int]:
    """The slot reductions' padded group and slot counts (GP, NSP), on one warp per (token, kv head). H100, 64k
    (2026-12-06), the forward / the dk/dv with its dq on 1, 2, 4, 8 warps: G = 4 7.74 / 9.69, 8.00 / 9.73,
    11.21 / 12.85, 16.39 / 17.49 ms; the GPT's G = 2 (d = 64) 1.37 / 1.90, 1.45 / 1.93, 1.95 / 2.34, 2.07 / 2.35.
    More warps split the slot axis, whose sum then crosses warps through shared memory."""
    return {"GP": next_power_of_2(group), "NSP": next_power_of_2(num_selected), "num_warps": 1}


def selected_dq(q: Tensor, k: Tensor, v: Tensor, gate: Tensor | None, block_indices: Tensor, dout: Tensor,
                branch_out: Tensor, lse: Tensor, delta: Tensor, dq: Tensor, packed: Packed, sel_block_size: int,
                scale: float, accumulate: bool, tiles: SelectedTiles, unions: tuple[Tensor, Tensor] | None = None
                ) -> None:
    """dq[rows] (+)= the selection branch's query gradient; delta[rows] = dO . o_sel, o_sel = selected_forward's
    branch_out. ``unions``: what ``selected_forward`` returned for this selection and these tiles (else the lists
    are built again). With tiles.forced_apart (``_passes``) the forced blocks' part adds into dq after the rest."""
    gate_t, stride_gt, stride_gh = _gate_args(gate, q)
    query, args = _tile_args(q, k, v, block_indices, packed, sel_block_size, tiles, unions)
    descriptors = kv_descriptors(k, v, args["BLOCK_S"], args, tiles.tma)
    for part, part_args, forced, launch in _passes(query, args, block_indices, packed, tiles, dq=True):
        _sel_dq_kernel[(part.table.grid, k.shape[1])](
            q, k, v, gate_t, block_indices, part.blocks, part.counts, dout, branch_out, lse, delta, dq, packed.cu,
            part.table.seq, part.table.first, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
            v.stride(1), stride_gt, stride_gh, block_indices.stride(0), block_indices.stride(1), dout.stride(0),
            dout.stride(1), branch_out.stride(0), branch_out.stride(1), dq.stride(0), dq.stride(1), q.shape[1],
            k.shape[1], packed.num_seqs, scale * LOG2E, scale,
            **descriptors, HAS_GATE=gate is not None, ACCUMULATE=accumulate or forced == 2, FORCED=forced,
            **part_args, **launch,
        )


def dkv_rows(group: int, tiles: SelectedTiles) -> dict[str, int]:
    """The dk/dv kernel's rows per step: BQ entries x GP heads, GP the group padded to a power of two, BQ filling
    tiles.dkv_rows and at least tl.dot's 16 rows."""
    gp = next_power_of_2(group)
    return {"GP": gp, "BQ": max(1, tiles.dkv_rows // gp, 16 // gp)}


def selected_dkdv(q: Tensor, k: Tensor, v: Tensor, gate: Tensor | None, block_indices: Tensor, dout: Tensor,
                  lse: Tensor, delta: Tensor, packed: Packed, sel_block_size: int, scale: float,
                  tiles: SelectedTiles, dq: Tensor | None = None, accumulate: bool = False) -> tuple[Tensor, Tensor]:
    """-> dk, dv (k's and v's shapes and dtypes), through the inverted selection lists. With dq (q's shape; for
    tiles.dq_in_dkdv, in place of ``selected_dq``, delta from ``selected_row_delta``): dq[rows] (+)= the branch's
    query gradient too, from the same steps (tiles.fuses_dq: their dq shares; else their dS, tiles.dq_from_ds),
    over token ranges whose shares or dS fit the budget (``dq_share_ranges``); dk and dv then add up across the
    ranges in float32, in range order."""
    group = q.shape[1] // k.shape[1]
    ranges = [(0, q.shape[0])] if dq is None else dq_share_ranges(block_indices, q, group, sel_block_size, tiles)
    if len(ranges) == 1:
        dk, dv = output_buffer(*k.shape, like=k), output_buffer(*v.shape, like=v)  # each token row: one block
    else:
        dk, dv = (output_buffer(*x.shape, like=x, dtype=torch.float32) for x in (k, v))
    for i, rows in enumerate(ranges):
        _dkdv_range(q, k, v, gate, block_indices, dout, lse, delta, packed, sel_block_size, scale, tiles, dq,
                    accumulate, rows, dk, dv, i > 0)
    return (dk, dv) if len(ranges) == 1 else (dk.to(k.dtype), dv.to(v.dtype))


def dq_share_ranges(block_indices: Tensor, q: Tensor, group: int, sel_block_size: int, tiles: SelectedTiles
                    ) -> list[tuple[int, int]]:
    """The token ranges [r0, r1) of ``selected_dkdv(dq=...)``: consecutive, covering every row, each holding at
    most tiles.fused_dq_bytes of dq shares (tiles.fuses_dq), else tiles.ds_dq_bytes of dS (``dq_part_width``),
    at least one token."""
    num_tokens, _, num_selected = block_indices.shape
    budget = tiles.fused_dq_bytes if tiles.fuses_dq(group) else tiles.ds_dq_bytes
    part_bytes = dq_part_width(group, q.shape[-1], sel_block_size, tiles) * q.element_size()
    return token_ranges(num_tokens, num_selected * q.shape[1] * part_bytes, budget)  # H_kv x G = HQ rows per slot


def dq_part_width(group: int, head_dim: int, sel_block_size: int, tiles: SelectedTiles) -> int:
    """Elements per row of ``selected_dkdv``'s dq parts, one row per (token, kv head, slot, head of the group) in
    q's dtype: a dq share of d_k = head_dim (tiles.fuses_dq), else dS over the block's keys padded to BLOCK_S."""
    return head_dim if tiles.fuses_dq(group) else max(16, next_power_of_2(sel_block_size))


def token_ranges(num_tokens: int, bytes_per_token: int, budget: int) -> list[tuple[int, int]]:
    """Consecutive token ranges [r0, r1) covering num_tokens rows, each of at most budget // bytes_per_token
    tokens, at least one."""
    step = max(1, budget // bytes_per_token)
    return [(r0, min(r0 + step, num_tokens)) for r0 in range(0, max(num_tokens, 1), step)]


def _dkdv_range(q: Tensor, k: Tensor, v: Tensor, gate: Tensor | None, block_indices: Tensor, dout: Tensor,
                lse: Tensor, delta: Tensor, packed: Packed, sel_block_size: int, scale: float, tiles: SelectedTiles,
                dq: Tensor | None, accumulate: bool, rows: tuple[int, int], dk: Tensor, dv: Tensor,
                add: bool) -> None:
    """``selected_dkdv`` over the selections of token rows ``rows`` = [r0, r1): dk / dv written, or added (add)."""
    chunk = tiles.dkv_chunk(packed.total)
    lists = selection_lists(block_indices, packed, sel_block_size, chunk, with_slots=dq is not None, rows=rows)
    first_row, end_row = rows
    args = _launch_args(q, k, v, sel_block_size)
    block_s, block_dv = args["BLOCK_S"], args["BLOCK_DV"]
    block_dk = max(16, next_power_of_2(q.shape[-1]))
    num_chunks = lists.chunk_list.numel()
    part_k = output_buffer(num_chunks * block_s, block_dk, like=q, dtype=torch.float32)
    part_v = output_buffer(num_chunks * block_s, block_dv, like=q, dtype=torch.float32)
    gate_t, stride_gt, stride_gh = _gate_args(gate, q)
    num_lists = k.shape[1] * lists.blocks_per_head
    # dq shares or dS: one row per (token, kv head, slot, head of the group); unused slots stay unwritten and unread
    group = args["GROUP"]
    dq_mode = 0 if dq is None else 1 if tiles.fuses_dq(group) else 2
    num_slots = (end_row - first_row) * block_indices.shape[1] * block_indices.shape[2]
    part_q = part_k if dq is None else output_buffer(
        num_slots * group, dq_part_width(group, q.shape[-1], sel_block_size, tiles), like=q)
    _sel_dkdv_kernel[(num_chunks,)](
        q, k, v, gate_t, dout, lse, delta, part_k, part_v, part_q, lists.entries,
        lists.entries if lists.slots is None else lists.slots, lists.chunk_list, lists.chunk_start,
        lists.list_end, lists.block_seq, packed.cu, lists.cu_blocks,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), stride_gt, stride_gh,
        dout.stride(0), dout.stride(1), q.shape[1], packed.num_seqs, num_lists, lists.blocks_per_head,
        scale * LOG2E, scale,
        CHUNK=chunk, BLOCK_DK=block_dk, HAS_GATE=gate is not None, DQ=dq_mode,
        **{**args, **dkv_rows(group, tiles)}, num_warps=tiles.dkv_num_warps, num_stages=tiles.dkv_num_stages,
    )
    if dq is not None and dq_mode == 1:
        _sel_dq_reduce_kernel[(end_row - first_row, k.shape[1])](
            part_q, block_indices, dq, block_indices.stride(0), block_indices.stride(1), dq.stride(0), dq.stride(1),
            k.shape[1], first_row, GROUP=group, NUM_SELECTED=block_indices.shape[-1], DQK=args["DQK"],
            D1=args["D1"], D2=args["D2"], ACCUMULATE=accumulate, **slot_launch(group, block_indices.shape[-1]),
        )
    elif dq is not None:
        _dq_from_ds(part_q, k, block_indices, dq, packed, sel_block_size, scale, accumulate, tiles, first_row,
                    end_row, args)
    _sel_reduce_kernel[(num_lists,)](
        part_k, part_v, dk, dv, lists.list_chunks, lists.block_seq, packed.cu, lists.cu_blocks,
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), packed.num_seqs, lists.blocks_per_head,
        SEL_BLOCK=sel_block_size, BLOCK_S=block_s, DQK=q.shape[-1], BLOCK_DK=block_dk, DV=v.shape[-1],
        BLOCK_DV=block_dv, ACCUMULATE=add, num_warps=8,
    )


def _dq_from_ds(part_ds: Tensor, k: Tensor, block_indices: Tensor, dq: Tensor, packed: Packed, sel_block_size: int,
                scale: float, accumulate: bool, tiles: SelectedTiles, first_row: int, end_row: int, args: dict
                ) -> None:
    """dq[first_row:end_row] (+)= the selection's query gradient from the dS its dk/dv stored (tiles.dq_from_ds):
    one program per (token, kv head), its slots in order."""
    consts = {name: args[name] for name in ("GROUP", "GP", "SEL_BLOCK", "BLOCK_S", "PRECISION", "DQK", "D1", "D2")}
    _sel_dq_ds_kernel[(end_row - first_row, k.shape[1])](
        part_ds, k, block_indices, token_sequences(packed), packed.cu, dq, k.stride(0), k.stride(1),
        block_indices.stride(0), block_indices.stride(1), dq.stride(0), dq.stride(1), k.shape[1], first_row, scale,
        **kv_descriptors(k, None, args["BLOCK_S"], args, tiles.tma), NUM_SELECTED=block_indices.shape[-1],
        ACCUMULATE=accumulate, **consts,
        num_warps=tiles.num_warps, num_stages=tiles.dq_num_stages,
    )


def selected_row_delta(dout: Tensor, branch_out: Tensor, delta: Tensor) -> None:
    """delta[rows] = dO . o_sel (float32 [N, HQ]; dout and branch_out [N, HQ, Dv]): what ``selected_dq`` stores
    beside dq, for ``selected_dkdv(dq=...)`` (tiles.dq_in_dkdv)."""
    num_rows, rows = dout.shape[0] * dout.shape[1], 128
    _row_delta_kernel[(triton.cdiv(num_rows, rows),)](
        dout, branch_out, delta, num_rows, dout.shape[1], dout.stride(0), dout.stride(1), branch_out.stride(0),
        branch_out.stride(1), DV=dout.shape[-1], BLOCK_DV=max(16, next_power_of_2(dout.shape[-1])), ROWS=rows,
    )
