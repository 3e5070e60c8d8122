"""Independent references for NSA, written from shared/spec/NSA.md and docs/API_CONTRACT.md only.

Nothing here imports ``nsa``: the references are plain, dense, loop-based PyTorch so that a bug in
the library's conventions cannot hide in a shared helper. Clarity over speed: every attention row is
computed on its own, with the set of keys it may see listed explicitly.

Layout everywhere: [B, T, H, D]. GQA: query head h reads key/value head h // G, G = HQ / H_kv.
All functions compute in the dtype of their inputs (float64 in the correctness tests; the dtype
tests also run them in bf16/fp32 to measure a naive low-precision error).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# ----------------------------------------------------------------------------------------------
# sizes


def ref_num_cmp(seq_len: int, block_size: int, block_stride: int) -> int:
    """num_cmp(S) = 0 if S < l else floor((S - l) / d) + 1 (NSA.md, compression branch)."""
    if seq_len < block_size:
        return 0
    return (seq_len - block_size) // block_stride + 1


def ref_num_sel(seq_len: int, sel_block_size: int) -> int:
    """Number of selection blocks of size l' covering T tokens: ceil(T / l')."""
    return -(-seq_len // sel_block_size)


def _scale(scale: float | None, dk: int) -> float:
    return 1.0 / math.sqrt(dk) if scale is None else scale


def _group_size(num_q_heads: int, num_kv_heads: int) -> int:
    assert num_q_heads % num_kv_heads == 0
    return num_q_heads // num_kv_heads


def _attend_row(qrow: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, scale: float):
    """One query row against an explicit list of keys: (output, probabilities, logsumexp)."""
    s = (keys @ qrow) * scale  # [n]
    p = torch.softmax(s, dim=0)
    return p @ vals, p, torch.logsumexp(s, dim=0)


# ----------------------------------------------------------------------------------------------
# compression


def ref_compress_mean(x: torch.Tensor, block_size: int, block_stride: int) -> torch.Tensor:
    """Compressed block i = mean of raw tokens [i*d, i*d + l)."""
    b, t, h, d = x.shape
    n = ref_num_cmp(t, block_size, block_stride)
    out = x.new_zeros(b, n, h, d)
    for i in range(n):
        start = i * block_stride
        out[:, i] = x[:, start : start + block_size].mean(dim=1)
    return out


def ref_visible_cmp_blocks(t: int, n_cmp: int, block_size: int, block_stride: int) -> list[int]:
    """Compressed blocks visible to query t: those whose last token i*d + l - 1 <= t."""
    return [i for i in range(n_cmp) if i * block_stride + block_size - 1 <= t]


def ref_compressed_attention(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    block_size: int,
    block_stride: int,
    scale: float | None = None,
):
    """Compressed-branch attention.

    Returns (o [B,T,HQ,Dv], lse [B,T,HQ], p_cmp [B,T,HQ,Ncmp]). A row that sees no compressed block
    gets o = 0, lse = -inf and an all-zero p_cmp row. p_cmp is Eq. 8 (softmax over visible blocks),
    zero on invisible blocks.
    """
    b_sz, t_len, hq, dk = q.shape
    n_cmp, hkv = k_cmp.shape[1], k_cmp.shape[2]
    assert n_cmp == ref_num_cmp(t_len, block_size, block_stride)
    g = _group_size(hq, hkv)
    sc = _scale(scale, dk)
    o = q.new_zeros(b_sz, t_len, hq, v_cmp.shape[-1])
    lse = torch.full((b_sz, t_len, hq), -math.inf, dtype=q.dtype)
    p_cmp = q.new_zeros(b_sz, t_len, hq, n_cmp)
    for b in range(b_sz):
        for t in range(t_len):
            vis = ref_visible_cmp_blocks(t, n_cmp, block_size, block_stride)
            if not vis:
                continue
            for h in range(hq):
                kv = h // g
                out, p, m = _attend_row(q[b, t, h], k_cmp[b, vis, kv], v_cmp[b, vis, kv], sc)
                o[b, t, h] = out
                lse[b, t, h] = m
                p_cmp[b, t, h, vis] = p
    return o, lse, p_cmp


# ----------------------------------------------------------------------------------------------
# selection scoring (Eq. 8-12)


def ref_sel_overlap_map(
    n_cmp: int, n_sel: int, block_size: int, block_stride: int, sel_block_size: int
) -> torch.Tensor:
    """Eq. 9 as a dense [Ncmp, Nsel] float64 matrix, by counting shared tokens one by one.

    M[i, j] = |[i*d, i*d + l) ∩ [j*l', (j+1)*l')| / l.
    """
    m = torch.zeros(n_cmp, n_sel, dtype=torch.float64)
    for i in range(n_cmp):
        cmp_tokens = range(i * block_stride, i * block_stride + block_size)
        for j in range(n_sel):
            count = sum(1 for tok in cmp_tokens if j * sel_block_size <= tok < (j + 1) * sel_block_size)
            m[i, j] = count / block_size
    return m


def ref_map_cmp_to_sel(
    p_cmp: torch.Tensor, block_size: int, block_stride: int, sel_block_size: int, num_sel_blocks: int
) -> torch.Tensor:
    """Eq. 9: p_sel[..., j] = sum_i p_cmp[..., i] * M[i, j]."""
    m = ref_sel_overlap_map(p_cmp.shape[-1], num_sel_blocks, block_size, block_stride, sel_block_size)
    return p_cmp @ m.to(p_cmp.dtype)


def ref_group_reduce(p: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Eq. 10: p_grp[:, :, g] = sum of p[:, :, h] over the heads h with h // G == g."""
    hq = p.shape[2]
    g_sz = _group_size(hq, num_kv_heads)
    out = p.new_zeros(p.shape[0], p.shape[1], num_kv_heads, p.shape[3])
    for h in range(hq):
        out[:, :, h // g_sz] += p[:, :, h]
    return out


def ref_forced_blocks(t: int, sel_block_size: int) -> list[int]:
    """Forced blocks for a query at position t: block 0, the block holding t, the block before it."""
    cur = t // sel_block_size
    return sorted({0, cur} | ({cur - 1} if cur - 1 >= 0 else set()))


def ref_candidate_blocks(t: int, n_sel: int, sel_block_size: int) -> list[int]:
    """Non-forced blocks that are complete for query t (end (j+1)*l' <= t + 1)."""
    forced = set(ref_forced_blocks(t, sel_block_size))
    return [j for j in range(n_sel) if j not in forced and (j + 1) * sel_block_size <= t + 1]


def ref_topn_row(scores_row: Sequence[float], t: int, sel_block_size: int, num_selected: int) -> list[int]:
    """Eq. 11-12 for one (position, group) row. Returns exactly num_selected entries.

    Forced blocks first, then the best complete non-forced blocks ordered by (score desc, index asc):
    the tie break compares exact Python floats, no epsilon. Output ascending, then -1 padding.
    """
    forced = ref_forced_blocks(t, sel_block_size)
    cands = ref_candidate_blocks(t, len(scores_row), sel_block_size)
    ranked = sorted(cands, key=lambda j: (-float(scores_row[j]), j))
    room = max(num_selected - len(forced), 0)
    chosen = sorted(forced + ranked[:room])
    assert len(chosen) <= num_selected
    return chosen + [-1] * (num_selected - len(chosen))


def ref_topn(
    scores: torch.Tensor, sel_block_size: int, num_selected: int, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """top-n over [B, T, Hkv, Nsel] scores; positions broadcastable to [B, T] (default arange(T))."""
    b_sz, t_len, hkv, _ = scores.shape
    if positions is None:
        pos = torch.arange(t_len).expand(b_sz, t_len)
    else:
        pos = torch.as_tensor(positions).expand(b_sz, t_len)
    out = torch.full((b_sz, t_len, hkv, num_selected), -1, dtype=torch.int64)
    s = scores.double()
    for b in range(b_sz):
        for t in range(t_len):
            for g in range(hkv):
                row = s[b, t, g].tolist()
                out[b, t, g] = torch.tensor(
                    ref_topn_row(row, int(pos[b, t]), sel_block_size, num_selected)
                )
    return out


def ref_select(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    block_size: int,
    block_stride: int,
    sel_block_size: int,
    num_selected: int,
    scale: float | None = None,
):
    """Full selection pipeline: Eq. 8 (p_cmp) -> Eq. 9 -> Eq. 10 -> top-n.

    Returns (block_indices [B,T,Hkv,n] int64, p_grp scores [B,T,Hkv,Nsel]).
    """
    t_len = q.shape[1]
    hkv = k_cmp.shape[2]
    dummy_v = k_cmp.new_zeros(*k_cmp.shape[:3], 1)
    _, _, p_cmp = ref_compressed_attention(q, k_cmp, dummy_v, block_size, block_stride, scale)
    n_sel = ref_num_sel(t_len, sel_block_size)
    p_sel = ref_map_cmp_to_sel(p_cmp, block_size, block_stride, sel_block_size, n_sel)
    p_grp = ref_group_reduce(p_sel, hkv)
    return ref_topn(p_grp, sel_block_size, num_selected), p_grp


# ----------------------------------------------------------------------------------------------
# token-level branches


def _attend_token_sets(q, k, v, keys_for, scale):
    """Generic dense reference: keys_for(b, t, kv_head) -> list of key positions query t may see."""
    b_sz, t_len, hq, dk = q.shape
    hkv = k.shape[2]
    g = _group_size(hq, hkv)
    sc = _scale(scale, dk)
    o = q.new_zeros(b_sz, t_len, hq, v.shape[-1])
    for b in range(b_sz):
        for t in range(t_len):
            for h in range(hq):
                kv = h // g
                toks = keys_for(b, t, kv)
                if not toks:
                    continue
                o[b, t, h] = _attend_row(q[b, t, h], k[b, toks, kv], v[b, toks, kv], sc)[0]
    return o


def ref_selected_blocks_tokens(indices: Sequence[int], t: int, sel_block_size: int) -> list[int]:
    """Tokens of the listed blocks (-1 ignored) with position <= t, ascending, no duplicates."""
    blocks = {int(j) for j in indices if int(j) >= 0}
    return sorted(
        tok for j in blocks for tok in range(j * sel_block_size, (j + 1) * sel_block_size) if tok <= t
    )


def ref_selected_attention(q, k, v, block_indices, sel_block_size: int, scale: float | None = None):
    """Selection branch: query t (head h) attends the tokens <= t of the blocks of group h // G."""

    def keys_for(b, t, kv):
        return ref_selected_blocks_tokens(block_indices[b, t, kv].tolist(), t, sel_block_size)

    return _attend_token_sets(q, k, v, keys_for, scale)


def ref_sliding_window(q, k, v, window_size: int, scale: float | None = None):
    """Window branch: query t attends keys max(0, t - w + 1) .. t."""
    return _attend_token_sets(
        q, k, v, lambda b, t, kv: list(range(max(0, t - window_size + 1), t + 1)), scale
    )


def ref_full_causal(q, k, v, scale: float | None = None):
    """Dense causal attention: query t attends keys 0 .. t."""
    return _attend_token_sets(q, k, v, lambda b, t, kv: list(range(t + 1)), scale)


def ref_nsa(
    q,
    k_cmp,
    v_cmp,
    k_sel,
    v_sel,
    k_win,
    v_win,
    gates,
    *,
    block_size: int,
    block_stride: int,
    sel_block_size: int,
    num_selected: int,
    window_size: int,
    scale: float | None = None,
    block_indices: torch.Tensor | None = None,
):
    """o = g_cmp * cmp + g_sel * sel + g_win * win (gates order cmp, sel, win).

    block_indices None -> computed by ref_select. Returns (o, block_indices).
    """
    if block_indices is None:
        block_indices, _ = ref_select(
            q, k_cmp, block_size, block_stride, sel_block_size, num_selected, scale
        )
    o_cmp = ref_compressed_attention(q, k_cmp, v_cmp, block_size, block_stride, scale)[0]
    o_sel = ref_selected_attention(q, k_sel, v_sel, block_indices, sel_block_size, scale)
    o_win = ref_sliding_window(q, k_win, v_win, window_size, scale)
    o = gates[..., 0:1] * o_cmp + gates[..., 1:2] * o_sel + gates[..., 2:3] * o_win
    return o, block_indices


# ----------------------------------------------------------------------------------------------
# RoPE


def ref_rope(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotate-half RoPE per head over D: pairs (i, i + D/2) rotated by pos * theta^(-2i/D)."""
    b_sz, t_len, h_n, d = x.shape
    half = d // 2
    pos = torch.as_tensor(positions).to(torch.float64).expand(b_sz, t_len)
    out = torch.empty_like(x)
    for b in range(b_sz):
        for t in range(t_len):
            for h in range(h_n):
                for i in range(half):
                    ang = float(pos[b, t]) * theta ** (-2.0 * i / d)
                    c, s = math.cos(ang), math.sin(ang)
                    x1, x2 = x[b, t, h, i], x[b, t, h, i + half]
                    out[b, t, h, i] = x1 * c - x2 * s
                    out[b, t, h, i + half] = x2 * c + x1 * s
    return out


# ----------------------------------------------------------------------------------------------
# checker for selections computed from floating-point scores


def check_selection(
    got: torch.Tensor,
    scores: torch.Tensor,
    sel_block_size: int,
    num_selected: int,
    positions: torch.Tensor | None = None,
    tol: float = 1e-9,
) -> int:
    """Assert that ``got`` [B,T,Hkv,n] is the top-n of float64 reference ``scores``.

    Format (ascending valid indices, then -1), forced blocks, no future/incomplete block, no
    duplicate and the count are exact. The chosen set must equal the reference's exactly, except
    that a block may be exchanged for another whose reference score is within ``tol`` of it (the
    implementation computes the scores in another order; a 1-ulp difference may flip a near tie).
    Exact ties at score 0 (blocks no visible compressed block overlaps) must go to the lower index.
    Returns the number of rows where a near tie was accepted (for diagnostics).
    """
    expect = ref_topn(scores, sel_block_size, num_selected, positions)
    assert got.shape == expect.shape, (got.shape, expect.shape)
    b_sz, t_len, hkv, _ = got.shape
    pos = torch.arange(t_len).expand(b_sz, t_len) if positions is None else positions.expand(b_sz, t_len)
    near_ties = 0
    for b in range(b_sz):
        for t in range(t_len):
            tt = int(pos[b, t])
            for g in range(hkv):
                row = [int(x) for x in got[b, t, g].tolist()]
                exp = [int(x) for x in expect[b, t, g].tolist()]
                where = f"(b={b}, t={tt}, g={g}): got {row}, expected {exp}"
                valid = [x for x in row if x != -1]
                assert row == valid + [-1] * (len(row) - len(valid)), f"padding not at the end {where}"
                assert valid == sorted(set(valid)), f"not ascending / duplicated {where}"
                assert len(valid) == len([x for x in exp if x != -1]), f"wrong count {where}"
                forced = set(ref_forced_blocks(tt, sel_block_size))
                cands = set(ref_candidate_blocks(tt, scores.shape[-1], sel_block_size))
                assert forced <= set(valid), f"forced block missing {where}"
                assert set(valid) <= forced | cands, f"future/incomplete block {where}"
                expected_set = {x for x in exp if x != -1}
                if set(valid) == expected_set:
                    continue
                s = scores[b, t, g].double()
                extra = set(valid) - expected_set
                missing = expected_set - set(valid)
                for a in extra:
                    for m in missing:
                        sa, sm = float(s[a]), float(s[m])
                        assert abs(sa - sm) <= tol and not (sa == 0.0 and sm == 0.0), (
                            f"selection differs beyond a near tie {where}: score[{a}]={sa!r}, "
                            f"score[{m}]={sm!r}"
                        )
                near_ties += 1
    return near_ties


# ----------------------------------------------------------------------------------------------
# vectorised dense references (explicit [T, N] masks from the rules above): the same math as the loop
# references, fast enough for the kernels' parity tests at real shapes on the GPU


def dense_masked_attention(q, k, v, mask, scale: float | None = None):
    """q [B,T,HQ,Dk], k/v [B,N,Hkv,D], mask bool [B|1,T,Hkv|1,N] (True = attend) -> o [B,T,HQ,Dv].
    Each query head reads its group's kv head; a row with no visible key gives o = 0."""
    b_sz, t_len, hq, dk = q.shape
    g = _group_size(hq, k.shape[2])
    sc = _scale(scale, dk)
    qg = q.reshape(b_sz, t_len, k.shape[2], g, dk)
    s = torch.einsum("bthgd,bnhd->bthgn", qg, k) * sc
    s = s.masked_fill(~mask[:, :, :, None, :], -math.inf)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return torch.einsum("bthgn,bnhd->bthgd", p, v).reshape(b_sz, t_len, hq, v.shape[-1])


def dense_cmp_mask(t_len: int, n_cmp: int, block_size: int, block_stride: int, device=None):
    """[1, T, 1, Ncmp]: query t sees compressed block i iff i*d + l - 1 <= t."""
    t = torch.arange(t_len, device=device)[:, None]
    last = torch.arange(n_cmp, device=device)[None, :] * block_stride + block_size - 1
    return (last <= t)[None, :, None, :]


def dense_window_mask(t_len: int, window_size: int, device=None):
    """[1, T, 1, T]: query t sees keys max(0, t - w + 1) .. t."""
    t = torch.arange(t_len, device=device)
    dist = t[:, None] - t[None, :]
    return ((dist >= 0) & (dist < window_size))[None, :, None, :]


def dense_selected_mask(block_indices, t_len: int, sel_block_size: int):
    """[B, T, Hkv, T]: query t of group g sees token s iff s's block is listed in block_indices[b, t, g] and s <= t."""
    b_sz, _, hkv, _ = block_indices.shape
    n_sel = ref_num_sel(t_len, sel_block_size)
    listed = torch.zeros(b_sz, t_len, hkv, n_sel + 1, dtype=torch.bool, device=block_indices.device)
    listed.scatter_(-1, torch.where(block_indices >= 0, block_indices, n_sel).long(), True)
    token_block = torch.arange(t_len, device=block_indices.device) // sel_block_size
    causal = torch.ones(t_len, t_len, dtype=torch.bool, device=block_indices.device).tril()
    return listed[..., token_block] & causal[None, :, None, :]


def dense_selection_scores(q, k_cmp, block_size: int, block_stride: int, sel_block_size: int,
                           scale: float | None = None):
    """Eq. 8-10 densely: p_grp [B, T, Hkv, Nsel] from softmax over the visible compressed blocks, the
    overlap matrix (ref_sel_overlap_map) and the sum over each group's heads."""
    b_sz, t_len, hq, dk = q.shape
    n_cmp, hkv = k_cmp.shape[1], k_cmp.shape[2]
    g = _group_size(hq, hkv)
    s = torch.einsum("bthgd,bnhd->bthgn", q.reshape(b_sz, t_len, hkv, g, dk), k_cmp) * _scale(scale, dk)
    mask = dense_cmp_mask(t_len, n_cmp, block_size, block_stride, q.device)[:, :, :, None, :]
    p = torch.softmax(s.masked_fill(~mask, -math.inf), dim=-1).nan_to_num(0.0).sum(dim=3)
    overlap = ref_sel_overlap_map(n_cmp, ref_num_sel(t_len, sel_block_size), block_size, block_stride,
                                  sel_block_size).to(p)
    return p @ overlap


def dense_nsa(q, k_cmp, v_cmp, k_sel, v_sel, k_win, v_win, gates, block_indices, *, block_size: int,
              block_stride: int, sel_block_size: int, window_size: int, scale: float | None = None):
    """o = g_cmp * cmp + g_sel * sel + g_win * win with the given selection (dense masks)."""
    t_len = q.shape[1]
    o_cmp = dense_masked_attention(q, k_cmp, v_cmp, dense_cmp_mask(t_len, k_cmp.shape[1], block_size, block_stride,
                                                                   q.device), scale)
    o_sel = dense_masked_attention(q, k_sel, v_sel, dense_selected_mask(block_indices, t_len, sel_block_size), scale)
    o_win = dense_masked_attention(q, k_win, v_win, dense_window_mask(t_len, window_size, q.device), scale)
    return gates[..., 0:1] * o_cmp + gates[..., 1:2] * o_sel + gates[..., 2:3] * o_win
