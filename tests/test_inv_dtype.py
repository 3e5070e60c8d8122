"""Low precision: bf16 / fp32 outputs stay close to the float64 reference.

Tolerance, derived rather than guessed: both sides receive the *same* low-precision inputs, and the
float64 reference ``r64`` is computed from those rounded inputs (upcast), so input rounding is not
counted as error. ``err_ref`` is the error of the same dense reference run entirely in the low
dtype (scores, softmax and P.V in bf16/fp32, then the output rounded to it): that is what a
straightforward implementation in that dtype loses. An implementation that accumulates in fp32 (as
documented for half inputs) must do no worse than that up to rounding-order effects, so we bound its
error by 2 * err_ref, plus one output rounding (eps(dtype) * max|r64|) as a floor for the cases where
err_ref happens to be tiny. Measured when written: fast/ref error ratio <= 1.15 (fp32), <= 0.5 (bf16).
"""

from __future__ import annotations

import pytest
import torch
from conftest import Shape, make_raw_inputs
from reference import (
    check_selection,
    ref_compress_mean,
    ref_compressed_attention,
    ref_nsa,
    ref_num_sel,
    ref_select,
    ref_selected_attention,
    ref_sliding_window,
)

from nsa import (
    compressed_attention,
    naive_compressed_attention,
    naive_nsa_attention,
    naive_selected_attention,
    naive_sliding_window_attention,
    nsa_attention,
    select_blocks,
    selected_attention,
    sliding_window_attention,
)

DTYPES = [torch.float32, torch.bfloat16]
SHAPES = [
    Shape(2, 37, 8, 2, 24, 16, 8, 4, 8, 4, 9, seed=3),  # d_k != d_v, G = 4
    Shape(1, 29, 4, 4, 8, 8, 4, 2, 4, 5, 6, seed=17),  # G = 1
    Shape(1, 20, 16, 1, 8, 4, 4, 4, 4, 3, 20, seed=29),  # G = 16, l = l' = d, w = T
]
IDS = ["dk24_dv16_G4", "G1", "G16"]


def _assert_within_reference_error(got, ref_low, r64, dtype, what):
    assert got.dtype == dtype, (what, got.dtype)
    err = float((got.double() - r64).abs().max())
    err_ref = float((ref_low.double() - r64).abs().max())
    floor = torch.finfo(dtype).eps * float(r64.abs().max())
    assert err <= 2 * err_ref + floor, f"{what}: error {err:.3g} vs reference-in-{dtype} error {err_ref:.3g}"


def _setup(s: Shape, dtype):
    x64 = make_raw_inputs(s)
    low = {k: v.to(dtype) for k, v in x64.items()}
    k_cmp = ref_compress_mean(low["k_c"].double(), s.l, s.d).to(dtype)
    v_cmp = ref_compress_mean(low["v_c"].double(), s.l, s.d).to(dtype)
    low["k_cmp"], low["v_cmp"] = k_cmp, v_cmp
    up = {k: v.double() for k, v in low.items()}  # the same rounded inputs, in float64
    return low, up


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("s", SHAPES, ids=IDS)
def test_compressed_low_precision(s, dtype):
    low, up = _setup(s, dtype)
    r64, lse64, _ = ref_compressed_attention(up["q"], up["k_cmp"], up["v_cmp"], s.l, s.d)
    ref_low = ref_compressed_attention(low["q"], low["k_cmp"], low["v_cmp"], s.l, s.d)[0]
    for op in (compressed_attention, naive_compressed_attention):
        o, lse = op(low["q"], low["k_cmp"], low["v_cmp"], s.l, s.d)
        _assert_within_reference_error(o, ref_low, r64, dtype, op.__name__)
        assert lse.dtype == torch.float32  # contract: lse is float32 for non-float64 inputs
        fin = torch.isfinite(lse64)
        assert torch.equal(torch.isfinite(lse), fin)
        torch.testing.assert_close(lse[fin].double(), lse64[fin], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("s", SHAPES, ids=IDS)
def test_selected_low_precision(s, dtype):
    low, up = _setup(s, dtype)
    idx, _ = ref_select(up["q"], up["k_cmp"], s.l, s.d, s.lp, s.n)
    r64 = ref_selected_attention(up["q"], up["k_sel"], up["v_sel"], idx, s.lp)
    ref_low = ref_selected_attention(low["q"], low["k_sel"], low["v_sel"], idx, s.lp)
    for op in (selected_attention, naive_selected_attention):
        o = op(low["q"], low["k_sel"], low["v_sel"], idx, s.lp)
        _assert_within_reference_error(o, ref_low, r64, dtype, op.__name__)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("s", SHAPES, ids=IDS)
def test_window_low_precision(s, dtype):
    low, up = _setup(s, dtype)
    r64 = ref_sliding_window(up["q"], up["k_win"], up["v_win"], s.w)
    ref_low = ref_sliding_window(low["q"], low["k_win"], low["v_win"], s.w)
    for op in (sliding_window_attention, naive_sliding_window_attention):
        o = op(low["q"], low["k_win"], low["v_win"], s.w)
        _assert_within_reference_error(o, ref_low, r64, dtype, op.__name__)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("s", SHAPES, ids=IDS)
def test_nsa_low_precision(s, dtype):
    """n covers every block, so the selection does not depend on rounding and the whole gated
    output can be bounded; the selection itself is checked in test_select_blocks_low_precision."""
    low, up = _setup(s, dtype)
    kw = {**s.kw(), "num_selected": max(3, ref_num_sel(s.T, s.lp))}
    names = ["q", "k_cmp", "v_cmp", "k_sel", "v_sel", "k_win", "v_win", "gates"]
    r64, idx = ref_nsa(*(up[n] for n in names), **kw)
    ref_low, _ = ref_nsa(*(low[n] for n in names), **kw, block_indices=idx)
    for op in (nsa_attention, naive_nsa_attention):
        out = op(*(low[n] for n in names), **kw)
        assert torch.equal(out.block_indices, idx)
        _assert_within_reference_error(out.output, ref_low, r64, dtype, op.__name__)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("s", SHAPES, ids=IDS)
def test_select_blocks_low_precision(s, dtype):
    """Selection from low-precision inputs is the float64 top-n of the same (rounded) inputs, up to
    near ties: the scores are accumulated in fp32, so blocks within 1e-5 may swap."""
    low, up = _setup(s, dtype)
    _, scores = ref_select(up["q"], up["k_cmp"], s.l, s.d, s.lp, s.n)
    _, lse = compressed_attention(low["q"], low["k_cmp"], low["v_cmp"], s.l, s.d)
    idx = select_blocks(
        low["q"], low["k_cmp"], lse, block_size=s.l, block_stride=s.d, sel_block_size=s.lp, num_selected=s.n
    )
    check_selection(idx, scores, s.lp, s.n, tol=1e-5)
    out = nsa_attention(*(low[n] for n in ["q", "k_cmp", "v_cmp", "k_sel", "v_sel", "k_win", "v_win", "gates"]),
                        **s.kw())
    check_selection(out.block_indices, scores, s.lp, s.n, tol=1e-5)
