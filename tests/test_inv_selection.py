"""NSA.md invariant 3 and Eq. 11-12: Eq. 9 (map_cmp_to_sel), Eq. 10 (group_reduce) on hand-computed
cases, the top-n selection rules on hand-built score tensors, and group consistency."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from conftest import F64, TOL64, Shape, make_raw_inputs, randn, shapes
from hypothesis import given
from reference import (
    check_selection,
    ref_candidate_blocks,
    ref_compress_mean,
    ref_forced_blocks,
    ref_group_reduce,
    ref_map_cmp_to_sel,
    ref_sel_overlap_map,
    ref_select,
    ref_selected_attention,
    ref_topn,
)

from nsa import (
    compress_mean_pool,
    compressed_attention,
    group_reduce,
    map_cmp_to_sel,
    naive_select_blocks,
    nsa_attention,
    select_blocks,
    selected_attention,
    topn_blocks,
)

# ---------------------------------------------------------------------------------------------
# Eq. 9: p_sel[j] = sum_i p_cmp[i] * |[i*d, i*d+l) ∩ [j*l', (j+1)*l')| / l, numbers written out.

EQ9_CASES = [
    pytest.param(
        # l=4, d=2, l'=4, T=8: cmp blocks [0,4) [2,6) [4,8); sel blocks [0,4) [4,8).
        # M = [[1, 0], [1/2, 1/2], [0, 1]]
        (4, 2, 4, 2),
        [0.5, 0.3, 0.2],
        [0.5 + 0.3 / 2, 0.3 / 2 + 0.2],  # [0.65, 0.35]
        id="l4_d2_lp4",
    ),
    pytest.param(
        # The paper's l=32, d=16, l'=64 scaled by 1/4: l=8, d=4, l'=16, T=32.
        # cmp i covers [4i, 4i+8), i = 0..6; sel blocks [0,16) [16,32).
        # i=0,1,2 lie in sel 0; i=3 = [12,20) splits 4/4 -> 1/2, 1/2; i=4,5,6 lie in sel 1.
        (8, 4, 16, 2),
        [0.05, 0.10, 0.15, 0.20, 0.25, 0.15, 0.10],
        [0.05 + 0.10 + 0.15 + 0.20 / 2, 0.20 / 2 + 0.25 + 0.15 + 0.10],  # [0.40, 0.60]
        id="l8_d4_lp16",
    ),
    pytest.param(
        # l=8, d=4, l'=4 (compressed blocks wider than selection blocks), T=16:
        # cmp [0,8) -> sel 0,1 half each; [4,12) -> sel 1,2; [8,16) -> sel 2,3.
        (8, 4, 4, 4),
        [0.2, 0.3, 0.5],
        [0.2 / 2, 0.2 / 2 + 0.3 / 2, 0.3 / 2 + 0.5 / 2, 0.5 / 2],  # [0.1, 0.25, 0.4, 0.25]
        id="l8_d4_lp4",
    ),
    pytest.param(
        # l = l' = d = 4: Eq. 9 is the identity, p_sel = p_cmp.
        (4, 4, 4, 3),
        [0.6, 0.1, 0.3],
        [0.6, 0.1, 0.3],
        id="l_eq_lp_eq_d",
    ),
    pytest.param(
        # l=4, d=2, l'=8, T=14 (T not a multiple of l'): cmp i = [2i, 2i+4), i=0..5; sel [0,8) [8,16).
        # i=0,1,2 in sel 0; i=3 = [6,10) splits 2/2; i=4,5 in sel 1. Nsel = ceil(14/8) = 2.
        (4, 2, 8, 2),
        [0.1, 0.2, 0.3, 0.2, 0.15, 0.05],
        [0.1 + 0.2 + 0.3 + 0.1, 0.1 + 0.15 + 0.05],  # [0.7, 0.3]
        id="l4_d2_lp8_partial",
    ),
    pytest.param(
        # l=6, d=2, l'=4: cmp [0,6) -> 4/6 in sel 0, 2/6 in sel 1; [2,8) -> 2/6, 4/6.
        (6, 2, 4, 2),
        [0.75, 0.25],
        [0.75 * 4 / 6 + 0.25 * 2 / 6, 0.75 * 2 / 6 + 0.25 * 4 / 6],
        id="l6_d2_lp4",
    ),
]


@pytest.mark.parametrize(("sizes", "p_cmp", "expected"), EQ9_CASES)
def test_eq9_hand_cases(sizes, p_cmp, expected):
    l, d, lp, n_sel = sizes
    p = torch.tensor(p_cmp, dtype=F64)
    exp = torch.tensor(expected, dtype=F64)
    # The reference reproduces the hand numbers (checks the reference itself).
    torch.testing.assert_close(ref_map_cmp_to_sel(p, l, d, lp, n_sel), exp, **TOL64)
    got = map_cmp_to_sel(p, l, d, lp, n_sel)
    torch.testing.assert_close(got, exp, **TOL64)
    # Leading dims are carried through ([..., Ncmp] -> [..., Nsel]).
    batched = torch.stack([p, 2 * p, torch.zeros_like(p)]).view(1, 3, 1, -1)
    got_b = map_cmp_to_sel(batched, l, d, lp, n_sel)
    torch.testing.assert_close(got_b, torch.stack([exp, 2 * exp, torch.zeros_like(exp)]).view(1, 3, 1, -1))


def test_eq9_overlap_matrix_counts():
    """The counting reference for l=4, d=2, l'=4 and l=6, d=2, l'=4 (entries written out)."""
    m = ref_sel_overlap_map(3, 2, 4, 2, 4)
    torch.testing.assert_close(m, torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]], dtype=F64))
    m = ref_sel_overlap_map(2, 2, 6, 2, 4)
    torch.testing.assert_close(m, torch.tensor([[4 / 6, 2 / 6], [2 / 6, 4 / 6]], dtype=F64))


@pytest.mark.parametrize(("l", "d", "lp"), [(4, 2, 4), (8, 4, 16), (8, 4, 4), (6, 2, 4), (6, 3, 3), (2, 1, 2)])
@pytest.mark.parametrize("t_len", [1, 5, 13, 24])
def test_eq9_random_against_counting_reference(l, d, lp, t_len):
    from reference import ref_num_cmp, ref_num_sel

    n_cmp, n_sel = ref_num_cmp(t_len, l, d), ref_num_sel(t_len, lp)
    p = torch.softmax(randn(2, t_len, 3, max(n_cmp, 1), seed=t_len + l), dim=-1)[..., :n_cmp]
    got = map_cmp_to_sel(p, l, d, lp, n_sel)
    assert got.shape == (2, t_len, 3, n_sel)
    torch.testing.assert_close(got, ref_map_cmp_to_sel(p, l, d, lp, n_sel), **TOL64)
    # Every token of a compressed block lies in exactly one selection block: mass is conserved.
    torch.testing.assert_close(got.sum(-1), p.sum(-1), **TOL64)


# ---------------------------------------------------------------------------------------------
# Eq. 10: p_grp(t, g) = sum of p_sel over the G heads of group g (heads h with h // G == g).


def test_eq10_hand_case():
    # B=1, T=1, HQ=4, Hkv=2 (G=2): heads 0,1 -> group 0; heads 2,3 -> group 1.
    p = torch.tensor(
        [[[[0.1, 0.2, 0.7], [0.3, 0.3, 0.4], [0.5, 0.0, 0.5], [0.25, 0.25, 0.5]]]], dtype=F64
    )
    expected = torch.tensor([[[[0.4, 0.5, 1.1], [0.75, 0.25, 1.0]]]], dtype=F64)
    torch.testing.assert_close(group_reduce(p, 2), expected, **TOL64)
    # Hkv = 1: everything sums; Hkv = HQ: identity. (Contiguous grouping, not h % Hkv.)
    torch.testing.assert_close(group_reduce(p, 1), p.sum(2, keepdim=True), **TOL64)
    torch.testing.assert_close(group_reduce(p, 4), p, **TOL64)
    torch.testing.assert_close(ref_group_reduce(p, 2), expected, **TOL64)


@pytest.mark.parametrize(("hq", "hkv"), [(2, 1), (4, 2), (8, 2), (16, 1), (6, 3), (12, 4)])
def test_eq10_random(hq, hkv):
    p = torch.rand(2, 5, hq, 7, dtype=F64, generator=torch.Generator().manual_seed(hq * 31 + hkv))
    got = group_reduce(p, hkv)
    assert got.shape == (2, 5, hkv, 7)
    torch.testing.assert_close(got, ref_group_reduce(p, hkv), **TOL64)


# ---------------------------------------------------------------------------------------------
# top-n (Eq. 11-12) on hand-built scores. l' = 4, Nsel = 6, T = 24 unless said otherwise.

LP = 4


def _scores_row(t_len: int, values: dict[int, float], n_sel: int = 6, dtype=F64) -> torch.Tensor:
    """[1, T, 1, Nsel] scores, identical for every query row, with the given block scores."""
    row = torch.zeros(n_sel, dtype=dtype)
    for j, val in values.items():
        row[j] = val
    return row.expand(1, t_len, 1, n_sel).clone()


def _row(out: torch.Tensor, t: int) -> list[int]:
    return [int(x) for x in out[0, t, 0].tolist()]


def test_topn_forced_and_ranked():
    # Future block 5 has a huge score and must never be chosen before it is the current block.
    scores = _scores_row(24, {1: 0.2, 2: 0.3, 3: 0.1, 4: 0.05, 5: 100.0})
    out = topn_blocks(scores, LP, 5)
    assert out.dtype == torch.int64
    assert out.shape == (1, 24, 1, 5)
    assert _row(out, 0) == [0, -1, -1, -1, -1]  # t=0: only block 0 (t//l' = 0, no block before)
    assert _row(out, 3) == [0, -1, -1, -1, -1]  # t=3: block 0 complete but forced; nothing else
    assert _row(out, 4) == [0, 1, -1, -1, -1]  # t=4: forced {0, 1}; t//l'-1 = 0 is not duplicated
    assert _row(out, 9) == [0, 1, 2, -1, -1]  # t=9: forced {0, 2, 1}; no other complete block
    assert _row(out, 12) == [0, 1, 2, 3, -1]  # t=12: forced {0,3,2}; candidates {1}: fewer -> all
    assert _row(out, 15) == [0, 1, 2, 3, -1]  # t=15: block 3 complete but forced
    # t=16: forced {0, 4, 3}; candidates {1, 2} (both fit in n-3 = 2)
    assert _row(out, 16) == [0, 1, 2, 3, 4]
    # t=20: forced {0, 5, 4}; candidates {1: .2, 2: .3, 3: .1} -> best two {1, 2}; 5 forced now.
    assert _row(out, 20) == [0, 1, 2, 4, 5]
    assert _row(out, 23) == [0, 1, 2, 4, 5]


def test_topn_never_future_even_with_top_scores():
    # All future blocks score far above every past block.
    scores = torch.arange(6, dtype=F64).mul(10).expand(1, 24, 1, 6).clone()
    out = topn_blocks(scores, LP, 6)
    for t in range(24):
        row = [j for j in _row(out, t) if j >= 0]
        assert all(j <= t // LP for j in row), (t, row)
        # Non-forced members must be complete blocks (end <= t + 1).
        forced = {0, t // LP, t // LP - 1}
        assert all((j + 1) * LP <= t + 1 for j in row if j not in forced), (t, row)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({1: 0.2, 2: 0.3, 3: 0.3}, [0, 2, 3, 4, 5]),  # 2 and 3 beat 1
        ({1: 0.3, 2: 0.1, 3: 0.3}, [0, 1, 3, 4, 5]),
        ({1: 0.25, 2: 0.25, 3: 0.25}, [0, 1, 2, 4, 5]),  # three-way tie -> the two lowest
        ({1: 0.1, 2: 0.25, 3: 0.25}, [0, 2, 3, 4, 5]),  # tie for first place, both taken
        ({1: 0.0, 2: 0.0, 3: 0.0}, [0, 1, 2, 4, 5]),  # all-zero scores -> lowest indices
        ({1: 0.1, 2: 0.3, 3: 0.1}, [0, 1, 2, 4, 5]),  # tie for the last slot -> lower index (1)
    ],
)
def test_topn_ties_to_lower_index(values, expected):
    out = topn_blocks(_scores_row(24, values), LP, 5)
    assert _row(out, 23) == expected


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_topn_tie_break_is_exact_not_epsilon(dtype):
    """Scores one ulp apart are not a tie: the larger wins even at the higher index. An implementation
    that breaks ties by subtracting index * eps from the scores reorders these."""
    one = torch.tensor(1.0, dtype=dtype)
    up = torch.nextafter(one, torch.tensor(2.0, dtype=dtype)).item()
    # n - 3 = 1 free slot among candidates {1, 2, 3} at t = 23.
    out = topn_blocks(_scores_row(24, {1: 1.0, 2: 1.0, 3: up}, dtype=dtype), LP, 4)
    assert _row(out, 23) == [0, 3, 4, 5]
    out = topn_blocks(_scores_row(24, {1: 1.0, 2: up, 3: 1.0}, dtype=dtype), LP, 4)
    assert _row(out, 23) == [0, 2, 4, 5]
    # Tiny absolute differences near zero.
    tiny = torch.finfo(dtype).tiny
    out = topn_blocks(_scores_row(24, {1: 0.0, 2: 0.0, 3: tiny}, dtype=dtype), LP, 4)
    assert _row(out, 23) == [0, 3, 4, 5]
    out = topn_blocks(_scores_row(24, {1: 0.0, 2: tiny, 3: tiny}, dtype=dtype), LP, 4)
    assert _row(out, 23) == [0, 2, 4, 5]


def test_topn_output_format_random():
    """Ascending valid indices then -1, no duplicates, equal to the reference, on random scores
    (continuous random scores have no ties), several groups and batches."""
    scores = torch.rand(2, 37, 3, 10, dtype=F64, generator=torch.Generator().manual_seed(5))
    for n in (3, 4, 6, 12):
        out = topn_blocks(scores, LP, n)
        assert torch.equal(out, ref_topn(scores, LP, n)), n
        check_selection(out, scores, LP, n, tol=0.0)


def test_topn_planted_ties_random_rows():
    """Many exact ties (scores from a 3-value set) must all resolve to the lower index."""
    gen = torch.Generator().manual_seed(11)
    scores = torch.randint(0, 3, (2, 40, 2, 10), generator=gen).to(F64) / 4
    for n in (4, 5, 7):
        assert torch.equal(topn_blocks(scores, LP, n), ref_topn(scores, LP, n)), n


def test_topn_positions_argument():
    """positions (decode): a single row at position t applies the same rule as row t of prefill."""
    scores = torch.rand(2, 30, 2, 8, dtype=F64, generator=torch.Generator().manual_seed(3))
    full = topn_blocks(scores, LP, 5)
    for t in (0, 3, 4, 7, 8, 17, 29):
        one = topn_blocks(scores[:, t : t + 1], LP, 5, positions=torch.tensor([t]))
        assert torch.equal(one, full[:, t : t + 1]), t
        # [B, T] positions; batch rows at different positions.
        pos = torch.tensor([[t], [min(t + 5, 29)]])
        two = topn_blocks(scores[:, t : t + 1], LP, 5, positions=pos)
        assert torch.equal(two, ref_topn(scores[:, t : t + 1], LP, 5, positions=pos)), t


def test_topn_int_stable_under_scaling():
    """Ranking uses only the order of scores: scaling by a positive power of two changes nothing."""
    scores = torch.randint(0, 4, (1, 33, 2, 9), generator=torch.Generator().manual_seed(2)).to(F64)
    base = topn_blocks(scores, LP, 6)
    assert torch.equal(topn_blocks(scores * 2.0**-40, LP, 6), base)
    assert torch.equal(base, ref_topn(scores, LP, 6))


# ---------------------------------------------------------------------------------------------
# select_blocks / naive_select_blocks / nsa_attention indices == reference selection


@given(shapes())
def test_select_blocks_matches_reference(s: Shape):
    x = make_raw_inputs(s)
    k_cmp = ref_compress_mean(x["k_c"], s.l, s.d)
    v_cmp = ref_compress_mean(x["v_c"], s.l, s.d)
    expected, scores = ref_select(x["q"], k_cmp, s.l, s.d, s.lp, s.n)
    _, lse = compressed_attention(x["q"], k_cmp, v_cmp, s.l, s.d)
    kw = {"block_size": s.l, "block_stride": s.d, "sel_block_size": s.lp, "num_selected": s.n}
    for fn in (select_blocks, naive_select_blocks):
        got = fn(x["q"], k_cmp, lse, **kw)
        assert got.shape == (s.B, s.T, s.Hkv, s.n)
        check_selection(got, scores, s.lp, s.n)
    out = nsa_attention(
        x["q"], k_cmp, v_cmp, x["k_sel"], x["v_sel"], x["k_win"], x["v_win"], x["gates"], **s.kw()
    )
    # check_selection compares each row as a set with the reference's (exchanges allowed only
    # between blocks whose float64 reference scores are within 1e-9: a 1-ulp near tie).
    check_selection(out.block_indices, scores, s.lp, s.n)
    assert expected.shape == out.block_indices.shape


def boundary_gaps(scores: torch.Tensor, sel_block_size: int, num_selected: int) -> list[float]:
    """Per (b, t, g) row that has more complete candidates than free slots: the reference score of the
    last candidate taken minus that of the first one left out (0.0 = an exact tie at the boundary)."""
    gaps = []
    b_sz, t_len, hkv, n_sel = scores.shape
    for b, t, g in itertools.product(range(b_sz), range(t_len), range(hkv)):
        row = scores[b, t, g].tolist()
        ranked = sorted(ref_candidate_blocks(t, n_sel, sel_block_size), key=lambda j: (-row[j], j))
        room = num_selected - len(ref_forced_blocks(t, sel_block_size))
        if 0 < room < len(ranked):
            gaps.append(row[ranked[room - 1]] - row[ranked[room]])
    return gaps


def test_planted_exact_ties_through_eq9_eq10_topn():
    """Exact ties where the arithmetic is exact: p_cmp holds multiples of 1/8 and the Eq. 9 weights for
    l=4, d=2, l'=4 are 1/2, 1, 1/2, so every sum of Eq. 9 and Eq. 10 is exact in any order and on any
    CPU. Equal importance values must then go to the lower index, exactly as the reference ranks them."""
    l, d, lp, n = 4, 2, 4, 5
    t_len, hq, hkv = 40, 4, 2
    gen = torch.Generator().manual_seed(7)
    p_cmp = torch.randint(0, 3, (2, t_len, hq, (t_len - l) // d + 1), generator=gen).to(F64) / 8
    n_sel = -(-t_len // lp)
    scores = ref_group_reduce(ref_map_cmp_to_sel(p_cmp, l, d, lp, n_sel), hkv)
    got = topn_blocks(group_reduce(map_cmp_to_sel(p_cmp, l, d, lp, n_sel), hkv), lp, n)
    assert torch.equal(got, ref_topn(scores, lp, n))
    gaps = boundary_gaps(scores, lp, n)
    assert sum(gap == 0.0 for gap in gaps) >= 20, "the planted values must tie at many selection boundaries"


def test_select_blocks_planted_equal_keys():
    """Equal keys give equal importance in exact arithmetic, but p_cmp = exp(q . k * scale - lse) is
    computed in floating point, and vectorised exp / dot-product lanes may round equal inputs
    differently (AVX-512 vs AVX2 vs the scalar tail): the computed values are near ties, not ties, and
    either block may win. What is promised on every CPU: the format, the forced blocks, complete
    candidates only, no duplicates, the count, and the reference's choice wherever its scores at the
    selection boundary are not within rounding (1e-9) of each other (check_selection). Compressed keys
    are k0 times a few planted factors: blocks with equal factors near-tie, different factors do not."""
    l = d = lp = 4
    t_len, n = 33, 5
    q = randn(1, t_len, 4, 8, seed=1)
    factors = torch.tensor([1.0, 1.0, 2.0, 1.0, 2.0, -1.0, 1.0, 2.0], dtype=F64)
    k_cmp = randn(1, 1, 2, 8, seed=2) * factors.view(1, -1, 1, 1)
    v_cmp = randn(1, k_cmp.shape[1], 2, 4, seed=3)
    _, scores = ref_select(q, k_cmp, l, d, lp, n)
    gaps = boundary_gaps(scores, lp, n)
    assert any(abs(gap) <= 1e-9 for gap in gaps), "the planted keys must give near ties at a boundary"
    assert any(abs(gap) > 1e-3 for gap in gaps), "and clear boundaries elsewhere"
    _, lse = compressed_attention(q, k_cmp, v_cmp, l, d)
    kw: dict[str, Any] = {"block_size": l, "block_stride": d, "sel_block_size": lp, "num_selected": n}
    for fn in (select_blocks, naive_select_blocks):
        check_selection(fn(q, k_cmp, lse, **kw), scores, lp, n)
    gates = torch.rand(1, t_len, 4, 3, dtype=F64, generator=torch.Generator().manual_seed(4))
    k_sel, v_sel, k_win, v_win = [randn(1, t_len, 2, dim, seed=5 + i) for i, dim in enumerate((8, 4, 8, 4))]
    out = nsa_attention(q, k_cmp, v_cmp, k_sel, v_sel, k_win, v_win, gates, **kw, window_size=3)
    check_selection(out.block_indices, scores, lp, n)


# ---------------------------------------------------------------------------------------------
# Group consistency: every head of a group reads exactly the group's blocks.


@pytest.mark.parametrize(("hq", "hkv"), [(4, 1), (4, 2), (8, 2), (6, 3)])
def test_group_consistency_by_perturbation(hq, hkv):
    b_sz, t_len, dk, dv, l, d, lp, n = 1, 26, 6, 4, 4, 2, 4, 4
    s = Shape(b_sz, t_len, hq, hkv, dk, dv, l, d, lp, n, 3, seed=100 + hq + hkv)
    x = make_raw_inputs(s)
    k_cmp = compress_mean_pool(x["k_c"], l, d)
    v_cmp = compress_mean_pool(x["v_c"], l, d)
    kw = s.kw()
    base = nsa_attention(x["q"], k_cmp, v_cmp, x["k_sel"], x["v_sel"], x["k_win"], x["v_win"], x["gates"], **kw)
    idx = base.block_indices
    g_sz = hq // hkv
    for t in (t_len - 1, 17, 9):
        for g in range(hkv):
            blocks = {j for j in idx[0, t, g].tolist() if j >= 0}
            inside = [tok for tok in range(t + 1) if tok // lp in blocks]
            outside = [tok for tok in range(t_len) if tok // lp not in blocks]
            # 1) perturbing the group's k/v outside its selected blocks changes no head of the group at t
            k2, v2 = x["k_sel"].clone(), x["v_sel"].clone()
            k2[0, outside, g] += 3.0
            v2[0, outside, g] -= 5.0
            out = selected_attention(x["q"], k2, v2, idx, lp)
            ref0 = selected_attention(x["q"], x["k_sel"], x["v_sel"], idx, lp)
            heads = list(range(g * g_sz, (g + 1) * g_sz))
            torch.testing.assert_close(out[0, t, heads], ref0[0, t, heads], rtol=0, atol=1e-12)
            # the same through nsa_attention (selection comes from k_cmp, which is unchanged)
            full = nsa_attention(x["q"], k_cmp, v_cmp, k2, v2, x["k_win"], x["v_win"], x["gates"], **kw)
            assert torch.equal(full.block_indices, idx)
            torch.testing.assert_close(full.output[0, t, heads], base.output[0, t, heads], rtol=0, atol=1e-12)
            # 2) perturbing one selected value token changes every head of the group at t
            v3 = x["v_sel"].clone()
            v3[0, inside[0], g] += 1.0
            out3 = selected_attention(x["q"], x["k_sel"], v3, idx, lp)
            diff = (out3[0, t] - ref0[0, t]).abs().amax(-1)
            assert bool((diff[heads] > 1e-6).all()), (t, g, diff)
            # ... and no head of another group.
            other = [h for h in range(hq) if h // g_sz != g]
            if other:
                assert float(diff[other].max()) == 0.0
    # And the outputs follow the reference with the same indices.
    torch.testing.assert_close(
        selected_attention(x["q"], x["k_sel"], x["v_sel"], idx, lp),
        ref_selected_attention(x["q"], x["k_sel"], x["v_sel"], idx, lp),
        **TOL64,
    )


def test_topn_counts_a_complete_block_with_minus_inf_score_as_a_candidate():
    """A -inf score is still a score: with fewer candidates than n every complete block is taken."""
    scores = torch.zeros(1, 16, 1, 4, dtype=torch.float64)
    scores[..., 1] = float("-inf")
    assert topn_blocks(scores, 4, 6)[0, 15, 0].tolist() == [0, 1, 2, 3, -1, -1]
