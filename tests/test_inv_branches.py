"""NSA.md invariant 2: every branch (fast op and naive_* op) equals the dense float64 reference over
random shapes; sel and win equal full causal attention when n covers every block and w >= T; GQA
ratios G in {1, 2, 4, 8, 16}; d_k != d_v; compression pooling; RoPE."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import F64, TOL64, Shape, make_raw_inputs, randn, shapes
from hypothesis import given
from hypothesis import strategies as st
from reference import (
    check_selection,
    ref_compress_mean,
    ref_compressed_attention,
    ref_full_causal,
    ref_nsa,
    ref_num_cmp,
    ref_num_sel,
    ref_rope,
    ref_select,
    ref_selected_attention,
    ref_sliding_window,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from nsa import (
    CompressPool,
    apply_rope,
    compress_mean_pool,
    compressed_attention,
    naive_compressed_attention,
    naive_nsa_attention,
    naive_selected_attention,
    naive_sliding_window_attention,
    nsa_attention,
    num_compressed_blocks,
    select_blocks,
    selected_attention,
    sliding_window_attention,
)
from nsa.attention_core import attend_gathered_keys, attend_shared_keys, masked_sdpa
from nsa.block_index import selection_token_index
from nsa.selected_attention import gather_tokens, masks_whole_prefix, selected_token_mask

CMP_OPS = [compressed_attention, naive_compressed_attention]
SEL_OPS = [selected_attention, naive_selected_attention]
WIN_OPS = [sliding_window_attention, naive_sliding_window_attention]
NSA_OPS = [nsa_attention, naive_nsa_attention]


def _ids(ops):
    return [op.__name__ for op in ops]


def test_num_compressed_blocks_exhaustive():
    for l in range(1, 9):
        for d in range(1, l + 1):
            if l % d:
                continue
            for s in range(0, 50):
                assert num_compressed_blocks(s, l, d) == ref_num_cmp(s, l, d), (s, l, d)
    # NSA.md figure: S = 65536 with l=32, d=16 gives 4095 compressed blocks.
    assert num_compressed_blocks(65536, 32, 16) == 4095


@given(shapes())
def test_compress_mean_pool_matches_reference(s: Shape):
    x = randn(s.B, s.T, s.Hkv, s.Dk, seed=s.seed)
    got = compress_mean_pool(x, s.l, s.d)
    assert got.shape == (s.B, ref_num_cmp(s.T, s.l, s.d), s.Hkv, s.Dk)
    torch.testing.assert_close(got, ref_compress_mean(x, s.l, s.d), **TOL64)
    # CompressPool in mean mode, and a freshly built mlp mode (documented to start as mean pooling)
    torch.testing.assert_close(CompressPool(s.Dk, s.l, s.d, kind="mean")(x), ref_compress_mean(x, s.l, s.d), **TOL64)
    fresh_mlp = CompressPool(s.Dk, s.l, s.d, kind="mlp").double()
    torch.testing.assert_close(fresh_mlp(x), ref_compress_mean(x, s.l, s.d), **TOL64)



def assert_nsa_output_matches_reference(out, x, k_cmp, v_cmp, scores, s: Shape) -> None:
    """The selection is valid against the reference scores (ties within tolerance may swap), and the
    gated output equals the reference run on that selection."""
    check_selection(out.block_indices, scores, s.lp, s.n)
    o_ref, _ = ref_nsa(
        x["q"], k_cmp, v_cmp, x["k_sel"], x["v_sel"], x["k_win"], x["v_win"], x["gates"], **s.kw(),
        block_indices=out.block_indices,
    )
    torch.testing.assert_close(out.output, o_ref, **TOL64)

@pytest.mark.parametrize("op", CMP_OPS, ids=_ids(CMP_OPS))
@given(s=shapes())
def test_compressed_attention_matches_reference(op, s: Shape):
    x = make_raw_inputs(s)
    k_cmp = ref_compress_mean(x["k_c"], s.l, s.d)
    v_cmp = ref_compress_mean(x["v_c"], s.l, s.d)
    o, lse = op(x["q"], k_cmp, v_cmp, s.l, s.d)
    o_ref, lse_ref, _ = ref_compressed_attention(x["q"], k_cmp, v_cmp, s.l, s.d)
    assert o.shape == (s.B, s.T, s.HQ, s.Dv) and o.dtype == F64
    assert lse.shape == (s.B, s.T, s.HQ) and lse.dtype == F64
    torch.testing.assert_close(o, o_ref, **TOL64)
    # lse equal where finite, -inf exactly where the row sees no block (never NaN).
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_ref))
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()
    fin = torch.isfinite(lse_ref)
    torch.testing.assert_close(lse[fin], lse_ref[fin], **TOL64)
    # Rows t < l - 1 see nothing: exactly zero output.
    blind = min(s.T, s.l - 1)
    assert torch.equal(o[:, :blind], torch.zeros_like(o[:, :blind]))


@pytest.mark.parametrize("op", CMP_OPS, ids=_ids(CMP_OPS))
def test_compressed_attention_scale_argument(op):
    s = Shape(1, 13, 4, 2, 6, 4, 4, 2, 4, 3, 5, seed=9)
    x = make_raw_inputs(s)
    k_cmp, v_cmp = ref_compress_mean(x["k_c"], 4, 2), ref_compress_mean(x["v_c"], 4, 2)
    o, _ = op(x["q"], k_cmp, v_cmp, 4, 2, scale=0.37)
    torch.testing.assert_close(o, ref_compressed_attention(x["q"], k_cmp, v_cmp, 4, 2, scale=0.37)[0], **TOL64)
    o_default, _ = op(x["q"], k_cmp, v_cmp, 4, 2)
    assert not torch.allclose(o, o_default)


def _random_valid_indices(s: Shape, slots: int, seed: int) -> torch.Tensor:
    """Random causal block lists (unique, any slot order, -1 holes anywhere) of width `slots`."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.full((s.B, s.T, s.Hkv, slots), -1, dtype=torch.int64)
    for b in range(s.B):
        for t in range(s.T):
            for g in range(s.Hkv):
                count = int(torch.randint(0, slots + 1, (1,), generator=gen))
                allowed = torch.randperm(t // s.lp + 1, generator=gen)[:count]
                where = torch.randperm(slots, generator=gen)[: len(allowed)]
                out[b, t, g, where] = allowed
    return out


@pytest.mark.parametrize("op", SEL_OPS, ids=_ids(SEL_OPS))
@given(s=shapes())
def test_selected_attention_matches_reference(op, s: Shape):
    x = make_raw_inputs(s)
    k_cmp = ref_compress_mean(x["k_c"], s.l, s.d)
    # 1) indices from the reference selection
    idx, _ = ref_select(x["q"], k_cmp, s.l, s.d, s.lp, s.n)
    o = op(x["q"], x["k_sel"], x["v_sel"], idx, s.lp)
    assert o.shape == (s.B, s.T, s.HQ, s.Dv)
    torch.testing.assert_close(o, ref_selected_attention(x["q"], x["k_sel"], x["v_sel"], idx, s.lp), **TOL64)
    # 2) arbitrary valid indices, int32, with -1 holes in any slot and empty rows (-> zero output)
    idx2 = _random_valid_indices(s, 3, s.seed)
    o2 = op(x["q"], x["k_sel"], x["v_sel"], idx2.to(torch.int32), s.lp)
    ref2 = ref_selected_attention(x["q"], x["k_sel"], x["v_sel"], idx2, s.lp)
    torch.testing.assert_close(o2, ref2, **TOL64)
    empty = (idx2 < 0).all(-1)  # [B, T, Hkv]
    for b, t, g in empty.nonzero().tolist():
        assert torch.equal(o2[b, t, g * s.G : (g + 1) * s.G], torch.zeros(s.G, s.Dv, dtype=F64))


@pytest.mark.parametrize(("seq_len", "over_prefix"), [(12, True), (64, False)])
def test_selection_over_the_prefix_equals_the_gathered_keys(seq_len: int, over_prefix: bool):
    """selected_attention attends every key under the selection's mask where that is cheaper
    (masks_whole_prefix: short sequences), else gathered copies of the selected keys. Both forms give the
    float64 reference's output, the same NaN rows for a planted NaN key and NaN query, and the same gradients."""
    s = Shape(B=2, T=seq_len, HQ=4, Hkv=2, Dk=6, Dv=4, l=4, d=2, lp=4, n=3, w=5, seed=31)
    assert masks_whole_prefix(s.T, s.n * s.lp, s.HQ // s.Hkv, s.Dk + s.Dv) is over_prefix
    x = make_raw_inputs(s)
    idx = _random_valid_indices(s, s.n, s.seed)
    out = selected_attention(x["q"], x["k_sel"], x["v_sel"], idx, s.lp)
    torch.testing.assert_close(out, ref_selected_attention(x["q"], x["k_sel"], x["v_sel"], idx, s.lp), **TOL64)

    q, k, v = (x[name].clone().requires_grad_() for name in ("q", "k_sel", "v_sel"))
    with torch.no_grad():
        k[1, 5, 0, 2] = float("nan")  # read by the rows of kv head 0 whose selection holds token 5
        q[0, 7, 3, 1] = float("nan")
    positions = torch.arange(s.T)[None]
    tokens, valid = selection_token_index(idx, positions, s.lp)
    gathered = attend_gathered_keys(q, gather_tokens(k, tokens), gather_tokens(v, tokens), valid, 0.5)
    prefix = attend_shared_keys(q, k, v, selected_token_mask(idx, positions, s.lp, s.T), 0.5)[0]
    assert torch.equal(gathered.isnan(), prefix.isnan())
    reads_nan = valid & (tokens == 5)
    assert reads_nan[1, :, 0].any() and not reads_nan[1, :, 0].any(-1).all()  # some rows read it, some do not
    assert bool(prefix[1, :, : s.G].isnan().any(-1).eq(reads_nan[1, :, 0].any(-1)[:, None]).all())
    torch.testing.assert_close(gathered, prefix, equal_nan=True, **TOL64)
    weight = randn(*prefix.shape, seed=5, dtype=F64)
    grads = [torch.autograd.grad(torch.nan_to_num(o * weight).sum(), (q, k, v)) for o in (gathered, prefix)]
    for a, b in zip(*grads, strict=True):
        assert a.isfinite().all()
        torch.testing.assert_close(a, b, **TOL64)


@pytest.mark.parametrize("op", WIN_OPS, ids=_ids(WIN_OPS))
@given(s=shapes())
def test_sliding_window_matches_reference(op, s: Shape):
    x = make_raw_inputs(s)
    o = op(x["q"], x["k_win"], x["v_win"], s.w)
    assert o.shape == (s.B, s.T, s.HQ, s.Dv)
    torch.testing.assert_close(o, ref_sliding_window(x["q"], x["k_win"], x["v_win"], s.w), **TOL64)


@pytest.mark.parametrize("op", NSA_OPS, ids=_ids(NSA_OPS))
@given(s=shapes())
def test_nsa_attention_matches_reference(op, s: Shape):
    x = make_raw_inputs(s)
    k_cmp = ref_compress_mean(x["k_c"], s.l, s.d)
    v_cmp = ref_compress_mean(x["v_c"], s.l, s.d)
    out = op(x["q"], k_cmp, v_cmp, x["k_sel"], x["v_sel"], x["k_win"], x["v_win"], x["gates"], **s.kw())
    assert out.output.shape == (s.B, s.T, s.HQ, s.Dv)
    assert out.block_indices.shape == (s.B, s.T, s.Hkv, s.n) and out.block_indices.dtype == torch.int64
    _, scores = ref_select(x["q"], k_cmp, s.l, s.d, s.lp, s.n)
    check_selection(out.block_indices, scores, s.lp, s.n)
    # Given a valid selection (checked just above), the output is the reference's with it.
    o_ref, _ = ref_nsa(
        x["q"], k_cmp, v_cmp, x["k_sel"], x["v_sel"], x["k_win"], x["v_win"], x["gates"],
        **s.kw(), block_indices=out.block_indices,
    )
    torch.testing.assert_close(out.output, o_ref, **TOL64)


@pytest.mark.parametrize("op", NSA_OPS, ids=_ids(NSA_OPS))
def test_nsa_attention_gates_select_branches(op):
    """One-hot gates return exactly one branch (gate order cmp, sel, win)."""
    s = Shape(2, 19, 4, 2, 6, 4, 4, 2, 4, 4, 5, seed=21)
    x = make_raw_inputs(s)
    k_cmp, v_cmp = ref_compress_mean(x["k_c"], s.l, s.d), ref_compress_mean(x["v_c"], s.l, s.d)
    idx, _ = ref_select(x["q"], k_cmp, s.l, s.d, s.lp, s.n)
    refs = [
        ref_compressed_attention(x["q"], k_cmp, v_cmp, s.l, s.d)[0],
        ref_selected_attention(x["q"], x["k_sel"], x["v_sel"], idx, s.lp),
        ref_sliding_window(x["q"], x["k_win"], x["v_win"], s.w),
    ]
    for branch in range(3):
        gates = torch.zeros(s.B, s.T, s.HQ, 3, dtype=F64)
        gates[..., branch] = 1.0
        out = op(x["q"], k_cmp, v_cmp, x["k_sel"], x["v_sel"], x["k_win"], x["v_win"], gates, **s.kw())
        torch.testing.assert_close(out.output, refs[branch], **TOL64)


# ---------------------------------------------------------------------------------------------
# Equivalence with full causal attention


@given(shapes(), st.integers(0, 3))
def test_selection_with_all_blocks_equals_full_causal(s: Shape, extra: int):
    x = make_raw_inputs(s)
    n_all = max(3, ref_num_sel(s.T, s.lp)) + extra
    k_cmp = ref_compress_mean(x["k_c"], s.l, s.d)
    v_cmp = ref_compress_mean(x["v_c"], s.l, s.d)
    full = ref_full_causal(x["q"], x["k_sel"], x["v_sel"])
    kw = {**s.kw(), "num_selected": n_all, "window_size": s.T + extra}
    op: Callable[..., Any]  # the loops below bind it to ops of different signatures
    for op in NSA_OPS:
        gates = torch.zeros(s.B, s.T, s.HQ, 3, dtype=F64)
        gates[..., 1] = 1.0
        out = op(x["q"], k_cmp, v_cmp, x["k_sel"], x["v_sel"], x["k_win"], x["v_win"], gates, **kw)
        torch.testing.assert_close(out.output, full, **TOL64)
        # every block 0 .. t // l' is selected
        for t in range(s.T):
            want = set(range(t // s.lp + 1))
            for b in range(s.B):
                for g in range(s.Hkv):
                    assert {j for j in out.block_indices[b, t, g].tolist() if j >= 0} == want
    idx = torch.arange(n_all).expand(s.B, s.T, s.Hkv, n_all).clone()
    idx[idx * s.lp > torch.arange(s.T).view(1, -1, 1, 1)] = -1  # causal: drop future blocks
    idx[idx >= ref_num_sel(s.T, s.lp)] = -1
    for op in SEL_OPS:
        torch.testing.assert_close(op(x["q"], x["k_sel"], x["v_sel"], idx, s.lp), full, **TOL64)


@given(shapes(), st.integers(0, 5))
def test_window_at_least_t_equals_full_causal(s: Shape, extra: int):
    x = make_raw_inputs(s)
    full = ref_full_causal(x["q"], x["k_win"], x["v_win"])
    for op in WIN_OPS:
        torch.testing.assert_close(op(x["q"], x["k_win"], x["v_win"], s.T + extra), full, **TOL64)


def test_window_one_is_value_copy():
    """w = 1: query t attends only key t, so the output is v_t (per group)."""
    q, k, v = randn(2, 9, 4, 6, seed=1), randn(2, 9, 2, 6, seed=2), randn(2, 9, 2, 3, seed=3)
    for op in WIN_OPS:
        torch.testing.assert_close(op(q, k, v, 1), v.repeat_interleave(2, dim=2), **TOL64)


# ---------------------------------------------------------------------------------------------
# GQA ratios and d_k != d_v


@pytest.mark.parametrize("g", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("op", NSA_OPS, ids=_ids(NSA_OPS))
def test_gqa_ratios(op, g):
    hkv = 2 if g <= 4 else 1
    s = Shape(1, 21, g * hkv, hkv, 8, 4, 4, 2, 4, 4, 6, seed=40 + g)
    x = make_raw_inputs(s)
    k_cmp, v_cmp = ref_compress_mean(x["k_c"], s.l, s.d), ref_compress_mean(x["v_c"], s.l, s.d)
    out = op(x["q"], k_cmp, v_cmp, x["k_sel"], x["v_sel"], x["k_win"], x["v_win"], x["gates"], **s.kw())
    _, scores = ref_select(x["q"], k_cmp, s.l, s.d, s.lp, s.n)
    assert_nsa_output_matches_reference(out, x, k_cmp, v_cmp, scores, s)


def test_gqa_head_to_group_mapping_is_contiguous():
    """Query head h reads kv head h // G (contiguous groups), not h % H_kv: give each kv head a
    constant value vector equal to its index and read it back through every branch."""
    b_sz, t_len, hkv, g = 1, 12, 3, 2
    q = randn(b_sz, t_len, hkv * g, 4, seed=1)
    k = randn(b_sz, t_len, hkv, 4, seed=2)
    v = torch.arange(hkv, dtype=F64).view(1, 1, hkv, 1).expand(b_sz, t_len, hkv, 2).contiguous()
    expect = (torch.arange(hkv * g) // g).to(F64).view(1, 1, -1, 1).expand(b_sz, t_len, hkv * g, 2)
    op: Callable[..., Any]  # the loops below bind it to ops of different signatures
    for op in WIN_OPS:
        torch.testing.assert_close(op(q, k, v, 3), expect)
    idx = torch.zeros(b_sz, t_len, hkv, 1, dtype=torch.int64)
    for op in SEL_OPS:
        torch.testing.assert_close(op(q, k, v, idx, 4), expect)
    k_cmp, v_cmp = compress_mean_pool(k, 4, 2), compress_mean_pool(v, 4, 2)
    for op in CMP_OPS:
        o, _ = op(q, k_cmp, v_cmp, 4, 2)
        torch.testing.assert_close(o[:, 3:], expect[:, 3:])


@pytest.mark.parametrize("op", NSA_OPS, ids=_ids(NSA_OPS))
def test_dk_differs_from_dv(op):
    """The paper's d_k=192, d_v=128 scaled down to 24/16, G=4."""
    s = Shape(2, 23, 8, 2, 24, 16, 8, 4, 8, 4, 7, seed=77)
    x = make_raw_inputs(s)
    k_cmp, v_cmp = ref_compress_mean(x["k_c"], s.l, s.d), ref_compress_mean(x["v_c"], s.l, s.d)
    out = op(x["q"], k_cmp, v_cmp, x["k_sel"], x["v_sel"], x["k_win"], x["v_win"], x["gates"], **s.kw())
    assert out.output.shape == (2, 23, 8, 16)
    _, scores = ref_select(x["q"], k_cmp, s.l, s.d, s.lp, s.n)
    assert_nsa_output_matches_reference(out, x, k_cmp, v_cmp, scores, s)


# ---------------------------------------------------------------------------------------------
# RoPE


@pytest.mark.parametrize("d", [2, 4, 8])
def test_apply_rope_matches_reference(d):
    x = randn(2, 7, 3, d, seed=d)
    pos = torch.tensor([0, 1, 2, 5, 9, 100, 4096])
    torch.testing.assert_close(apply_rope(x, pos), ref_rope(x, pos), **TOL64)
    pos2 = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [10, 11, 12, 13, 14, 15, 16]])
    torch.testing.assert_close(apply_rope(x, pos2, theta=500.0), ref_rope(x, pos2, theta=500.0), **TOL64)
    posf = torch.tensor([0.0, 0.5, 1.5, 2.25, 7.0, 33.5, 1e4 + 0.5], dtype=F64)  # float positions
    torch.testing.assert_close(apply_rope(x, posf), ref_rope(x, posf), **TOL64)
    # Per head: rotating one head at a time gives the same result (never over the flattened H*D).
    per_head = torch.cat([apply_rope(x[:, :, h : h + 1], pos) for h in range(3)], dim=2)
    torch.testing.assert_close(apply_rope(x, pos), per_head, **TOL64)


@pytest.mark.parametrize(("dtype", "head_dim"), [(torch.float32, 6), (torch.float16, 128), (torch.bfloat16, 128)])
def test_rope_kernel_matches_reference_forward_and_backward(monkeypatch, dtype, head_dim):
    """apply_rope on nsa.kernels.rope (the eager GPU path, in Triton's interpreter here) against the float64
    loop reference: one table for every sequence and one per sequence, float positions, a head slice whose
    rows are not contiguous (the module's key sets), D/2 not a power of two; its gradient against the
    reference's (float64 autograd through the rotation); and bitwise against the PyTorch form, whose float32
    roundings it repeats (torch.compile traces that form). The kernel really ran both ways."""
    import nsa.kernels.rope as rope_kernels
    import nsa.rope

    calls: list[bool] = []
    kernel = rope_kernels.rope_triton

    def spy(*a, **kw):
        calls.append(kw.get("inverse", False))
        return kernel(*a, **kw)

    monkeypatch.setattr(rope_kernels, "rope_triton", spy)
    eps = torch.finfo(dtype).eps
    wide = randn(2, 5, 4, head_dim, seed=head_dim)
    for positions in (torch.tensor([0, 3, 7, 100, 65535]), torch.tensor([[0, 1, 2, 3, 4], [9, 10, 11, 12, 13]]),
                      torch.tensor([0.5, 8.5, 24.5, 1e4 + 0.5, 7.5e5 + 0.5], dtype=F64)):
        # float32 angles pos * theta^(-2i/D) carry ~2^-23 * pos of absolute error (both forms compute them so)
        angle_tol = 2.0**-21 * float(positions.abs().max()) * float(wide.abs().max())
        tol = angle_tol + 2 * eps * float(wide.abs().max())
        x = wide[:, :, 1:3].to(dtype).requires_grad_()  # strides of the 4-head tensor
        dy = randn(2, 5, 2, head_dim, seed=7).to(dtype)
        with monkeypatch.context() as on_kernel:
            on_kernel.setattr(nsa.rope, "elementwise_kernel_applies", lambda x, contiguous: x.stride(-1) == 1)
            y = apply_rope(x, positions)
            (dx,) = torch.autograd.grad(y, x, dy)
        assert y.dtype == dtype and y.is_contiguous()
        x64 = x.detach().double().requires_grad_()
        want = ref_rope(x64, positions)
        (dx_want,) = torch.autograd.grad(want, x64, dy.double())
        torch.testing.assert_close(y.double(), want, rtol=0, atol=tol)
        torch.testing.assert_close(dx.double(), dx_want, rtol=0, atol=tol)
        y_torch = apply_rope(x, positions)  # the PyTorch form (a CPU tensor)
        (dx_torch,) = torch.autograd.grad(y_torch, x, dy)
        if dtype == torch.bfloat16:  # Triton 3.6's interpreter rounds float32 -> bfloat16 toward zero (the GPU and
            # PyTorch: to nearest even, tests/test_nsa_prefill_gpu.py checks it bitwise there): one ulp apart at most
            torch.testing.assert_close(y, y_torch, rtol=2 * eps, atol=0)
            torch.testing.assert_close(dx, dx_torch, rtol=2 * eps, atol=0)
        else:
            assert torch.equal(y, y_torch) and torch.equal(dx, dx_torch)
    assert calls == [False, True] * 3


def test_elementwise_kernels_stay_off_the_cpu_and_under_the_torch_switch(monkeypatch):
    """The memory-bound passes (nonfinite rows, RoPE) take their Triton kernels only on CUDA tensors, and
    NSA_BACKEND=torch keeps them on PyTorch (checked through the rule's other conditions on a CPU tensor)."""
    from nsa import dispatch

    x = torch.ones(2, 3)
    assert not dispatch.elementwise_kernel_applies(x)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert dispatch.elementwise_kernel_applies(x) == dispatch.TRITON_AVAILABLE
    columns = torch.ones(3, 4)[:, :2]  # rows 4 apart, each contiguous
    assert not dispatch.elementwise_kernel_applies(columns) and not dispatch.elementwise_kernel_applies(
        x.t(), contiguous=False)
    assert dispatch.elementwise_kernel_applies(columns, contiguous=False) == dispatch.TRITON_AVAILABLE
    assert not dispatch.elementwise_kernel_applies(x.double()) and not dispatch.elementwise_kernel_applies(x[:0])
    monkeypatch.setenv("NSA_BACKEND", "torch")
    assert not dispatch.elementwise_kernel_applies(x)


def test_kept_rope_tables_are_per_dtype():
    """The frequency tables apply_rope keeps per size are also per dtype: a float32 call first (its table rounded
    to float32) leaves a later float64 call of the same head dim and theta at float64 accuracy."""
    x = randn(1, 40, 2, 6, seed=21)
    apply_rope(x.float(), None, 12345.0)
    torch.testing.assert_close(apply_rope(x, None, 12345.0), ref_rope(x, torch.arange(40), 12345.0), **TOL64)


@pytest.mark.parametrize(("stride", "offset"), [(1, 0.0), (16, 15.5), (4, 1.5)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_apply_rope_of_sequence_positions_equals_them_as_a_tensor(monkeypatch, stride, offset, dtype):
    """positions None (token t at t * stride + offset, the module's unpacked queries and keys, and its compressed
    keys at block centres): bitwise what the same positions give as a tensor, on the PyTorch form and on the
    kernel (interpreter), forward and backward; the tables are built once per size and kept."""
    from collections import OrderedDict

    import nsa.rope
    from nsa import sized_tensors as sized

    monkeypatch.setattr(sized, "_SIZED", OrderedDict())
    positions = torch.arange(9) * stride + offset if offset else torch.arange(9) * stride
    x = randn(2, 9, 3, 8, seed=stride).to(dtype).requires_grad_()
    dy = randn(2, 9, 3, 8, seed=5).to(dtype)
    for on_kernel in (False, True):
        with monkeypatch.context() as patch:
            if on_kernel:
                patch.setattr(nsa.rope, "elementwise_kernel_applies", lambda x, contiguous: dtype != torch.float64)
            got = apply_rope(x, None, 500.0, stride=stride, offset=offset)
            want = apply_rope(x, positions, 500.0)
            grads = [torch.autograd.grad(y, x, dy)[0] for y in (got, want)]
        assert torch.equal(got, want) and torch.equal(*grads)
    kept = [key for key in sized._SIZED if key[0] == "rope tables"]
    assert len(kept) == 1  # one entry for this size, read by the second call


def test_apply_rope_relative_position_property():
    """<rope(q, m), rope(k, n)> depends only on m - n."""
    q, k = randn(1, 1, 1, 8, seed=1), randn(1, 1, 1, 8, seed=2)

    def dot(m, n):
        return float((apply_rope(q, torch.tensor([m])) * apply_rope(k, torch.tensor([n]))).sum())

    assert dot(5, 2) == pytest.approx(dot(105, 102), rel=1e-10, abs=1e-12)
    assert dot(0, 0) == pytest.approx(float((q * k).sum()), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# Query chunking inside the fast ops (only kicks in at long T): force tiny chunks through the
# library's memory budget so chunk boundaries fall inside blocks and windows at small T.


@pytest.mark.parametrize("budget", [1, 40, 150])
def test_fast_ops_with_tiny_query_chunks(monkeypatch, budget):
    import nsa.attention_core as core

    monkeypatch.setattr(core, "CHUNK_ELEMENT_BUDGET", budget)
    s = Shape(2, 27, 4, 2, 6, 4, 4, 2, 8, 4, 5, seed=61)
    x = make_raw_inputs(s)
    k_cmp, v_cmp = ref_compress_mean(x["k_c"], s.l, s.d), ref_compress_mean(x["v_c"], s.l, s.d)
    o, lse = compressed_attention(x["q"], k_cmp, v_cmp, s.l, s.d)
    o_ref, lse_ref, _ = ref_compressed_attention(x["q"], k_cmp, v_cmp, s.l, s.d)
    torch.testing.assert_close(o, o_ref, **TOL64)
    torch.testing.assert_close(lse, lse_ref, **TOL64)
    idx, scores = ref_select(x["q"], k_cmp, s.l, s.d, s.lp, s.n)
    torch.testing.assert_close(
        selected_attention(x["q"], x["k_sel"], x["v_sel"], idx, s.lp),
        ref_selected_attention(x["q"], x["k_sel"], x["v_sel"], idx, s.lp),
        **TOL64,
    )
    torch.testing.assert_close(
        sliding_window_attention(x["q"], x["k_win"], x["v_win"], s.w),
        ref_sliding_window(x["q"], x["k_win"], x["v_win"], s.w),
        **TOL64,
    )
    got = select_blocks(x["q"], k_cmp, lse, block_size=s.l, block_stride=s.d, sel_block_size=s.lp, num_selected=s.n)
    check_selection(got, scores, s.lp, s.n)
    out = nsa_attention(x["q"], k_cmp, v_cmp, x["k_sel"], x["v_sel"], x["k_win"], x["v_win"], x["gates"], **s.kw())
    assert_nsa_output_matches_reference(out, x, k_cmp, v_cmp, scores, s)


class _LargestTensor(TorchDispatchMode):
    """Records the largest storage (in elements) any op output lives in: a chunk's score / gather tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.elements = max(self.elements, t.untyped_storage().nbytes() // t.element_size())
        return out


def _largest_tensor_of(op: str, batch: int) -> tuple[int, int]:
    """(largest storage an op output lives in, q's elements) for one fast op at a small shape of this batch."""
    s = Shape(batch, 512, 4, 1, 4, 4, 8, 4, 8, 4, 16, seed=3)
    x = make_raw_inputs(s)
    k_cmp, v_cmp = compress_mean_pool(x["k_c"], s.l, s.d), compress_mean_pool(x["v_c"], s.l, s.d)
    _, lse = compressed_attention(x["q"], k_cmp, v_cmp, s.l, s.d)
    idx = select_blocks(x["q"], k_cmp, lse, block_size=s.l, block_stride=s.d, sel_block_size=s.lp, num_selected=s.n)
    with _LargestTensor() as probe:
        if op == "compressed":
            compressed_attention(x["q"], k_cmp, v_cmp, s.l, s.d)
        elif op == "scorer":
            select_blocks(x["q"], k_cmp, lse, block_size=s.l, block_stride=s.d, sel_block_size=s.lp,
                          num_selected=s.n)
        elif op == "selected":
            selected_attention(x["q"], x["k_sel"], x["v_sel"], idx, s.lp)
        else:
            nsa_attention(x["q"], k_cmp, v_cmp, x["k_sel"], x["v_sel"], x["k_win"], x["v_win"], x["gates"],
                          backend="torch", **s.kw())
    return probe.elements, x["q"].numel()


@pytest.mark.parametrize("op", ["compressed", "scorer", "selected", "nsa"])
def test_query_chunks_share_the_memory_budget_across_the_batch(monkeypatch, op):
    """One chunk holds its queries for every sequence of the batch, so at batch 4 a chunk takes a quarter of the
    queries it takes at batch 1: the largest tensor stays that of batch 1 (or the inputs themselves) instead of
    growing 4x with the batch. (The window's scores live inside SDPA's fused CPU kernel, where no op shows them.)"""
    import nsa.attention_core as core

    monkeypatch.setattr(core, "CHUNK_ELEMENT_BUDGET", 1 << 16)
    largest_1, q_1 = _largest_tensor_of(op, 1)
    largest_4, q_4 = _largest_tensor_of(op, 4)
    # At batch 1 the chunks' tensors outgrow q, so 1.25x tells a shared budget from a per-sequence one (4x).
    assert largest_1 > q_1
    assert largest_4 <= 1.25 * max(largest_1, q_4), (largest_1, largest_4, q_4)


def test_paper_block_sizes_moderate_t():
    """The paper's l=32, d=16, l'=64 (n=5, w=48) at T=300 (not a multiple of 16, 32 or 64), G=4."""
    s = Shape(1, 300, 4, 1, 8, 4, 32, 16, 64, 5, 48, seed=2025)
    x = make_raw_inputs(s)
    k_cmp = compress_mean_pool(x["k_c"], s.l, s.d)
    v_cmp = compress_mean_pool(x["v_c"], s.l, s.d)
    assert k_cmp.shape[1] == ref_num_cmp(300, 32, 16) == 17
    torch.testing.assert_close(k_cmp, ref_compress_mean(x["k_c"], s.l, s.d), **TOL64)
    out = nsa_attention(x["q"], k_cmp, v_cmp, x["k_sel"], x["v_sel"], x["k_win"], x["v_win"], x["gates"], **s.kw())
    _, scores = ref_select(x["q"], k_cmp, s.l, s.d, s.lp, s.n)
    assert_nsa_output_matches_reference(out, x, k_cmp, v_cmp, scores, s)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_masked_sdpa_is_the_masked_softmax_and_zero_on_empty_rows(dtype):
    """masked_sdpa (the window and selection branches' attention, on scaled_dot_product_attention) against a
    float64 masked softmax written here, GQA included: rows with no key read give o = 0 (SDPA alone returns NaN)
    and pass no gradient to q, k or v; every gradient is finite and matches the reference's."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, h, n, 8, generator=gen, dtype=F64) for h, n in ((4, 6), (2, 9), (2, 9)))
    mask = torch.rand(2, 1, 6, 9, generator=gen) < 0.4
    mask[:, :, 2] = False  # an empty row in every head
    mask[:, :, 0, 0] = True
    leaves = [x.to(dtype).requires_grad_() for x in (q, k, v)]
    q_leaf, k_leaf, v_leaf = leaves
    out = masked_sdpa(q_leaf, k_leaf, v_leaf, mask, 0.7, enable_gqa=True)
    k_rep, v_rep = (x.repeat_interleave(2, dim=1) for x in (k, v))
    probs = torch.where(mask, (q @ k_rep.transpose(-1, -2)) * 0.7, float("-inf")).softmax(-1).nan_to_num()
    want = probs @ v_rep
    tol = TOL64 if dtype == F64 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(out.double(), want, **tol)
    assert not out[:, :, 2].any()
    weight = torch.randn(out.shape, generator=gen, dtype=F64)
    grads = torch.autograd.grad((out * weight.to(dtype)).sum(), leaves)
    refs = [x.clone().requires_grad_() for x in (q, k, v)]
    k_rep, v_rep = (x.repeat_interleave(2, dim=1) for x in refs[1:])
    scores = torch.where(mask, (refs[0] @ k_rep.transpose(-1, -2)) * 0.7, float("-inf"))
    ref_out = torch.where(mask.any(-1, keepdim=True), scores.softmax(-1), 0.0) @ v_rep
    want_grads = torch.autograd.grad((ref_out * weight).sum(), refs)
    for got, expected in zip(grads, want_grads, strict=True):
        assert got.isfinite().all()
        torch.testing.assert_close(got.double(), expected, **tol)
    assert not grads[0][:, :, 2].any()


@given(s=shapes())
def test_compressed_chunk_for_the_layer_matches_the_reference(s: Shape):
    """compressed_attention_chunk(differentiable_lse=False), the layer's form (the output from
    scaled_dot_product_attention, lse and probabilities without autograd): the float64 reference's output, lse
    and Eq. 8 probabilities, zero rows where nothing is visible, and the output's gradients."""
    from nsa.compressed_attention import compressed_attention_chunk

    x = make_raw_inputs(s)
    k_cmp = ref_compress_mean(x["k_c"], s.l, s.d).requires_grad_()
    v_cmp = ref_compress_mean(x["v_c"], s.l, s.d).requires_grad_()
    q = x["q"].clone().requires_grad_()
    o_ref, lse_ref, p_ref = ref_compressed_attention(q, k_cmp, v_cmp, s.l, s.d)
    chunk = compressed_attention_chunk(q, k_cmp, v_cmp, torch.arange(s.T)[None], k_cmp.shape[1], s.l, s.d,
                                       s.Dk**-0.5, differentiable_lse=False)
    torch.testing.assert_close(chunk.output, o_ref, **TOL64)
    assert torch.equal(torch.isneginf(chunk.lse), torch.isneginf(lse_ref)) and not chunk.lse.requires_grad
    fin = torch.isfinite(lse_ref)
    torch.testing.assert_close(chunk.lse[fin], lse_ref[fin], **TOL64)
    if k_cmp.shape[1] == 0:  # T < l: no block at all, a constant zero output and no probabilities
        assert not chunk.output.any() and chunk.probs is None
        return
    assert chunk.probs is not None  # [B, Hkv, G, T, N] against the reference's [B, T, HQ, N]
    torch.testing.assert_close(chunk.probs.flatten(1, 2).permute(0, 2, 1, 3), p_ref.detach(), **TOL64)
    weight = randn(*o_ref.shape, seed=s.seed, dtype=F64)
    got = torch.autograd.grad((chunk.output * weight).sum(), (q, k_cmp, v_cmp), allow_unused=True)
    want = torch.autograd.grad((o_ref * weight).sum(), (q, k_cmp, v_cmp), allow_unused=True)
    for a, b in zip(got, want, strict=True):
        if a is None or b is None:
            assert (a is None or not a.any()) and (b is None or not b.any())
        else:
            torch.testing.assert_close(a, b, **TOL64)
