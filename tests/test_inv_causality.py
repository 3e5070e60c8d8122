"""NSA.md invariant 1 (prefill): changing tokens > t never changes o_t, in every branch.

Two forms for each op: (a) perturb every input at positions > t (raw keys/values before pooling,
queries, gates) and require rows <= t to be unchanged; (b) truncate the sequence to t + 1 tokens
and require the same rows (the number of compressed and selection blocks changes with T, so this
also checks that nothing depends on T itself).
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from conftest import F64, Shape, make_raw_inputs, shapes
from hypothesis import given
from hypothesis import strategies as st

from nsa import (
    NSAAttention,
    NSAConfig,
    compress_mean_pool,
    compressed_attention,
    naive_compressed_attention,
    naive_nsa_attention,
    naive_select_blocks,
    naive_selected_attention,
    naive_sliding_window_attention,
    nsa_attention,
    select_blocks,
    selected_attention,
    sliding_window_attention,
)

# Rows <= t must match to rounding; a leak from a perturbation of size ~3 is O(1e-2) or more.
EXACT: dict[str, Any] = {"rtol": 0.0, "atol": 1e-12}


def _perturb_after(x: torch.Tensor, t: int, seed: int) -> torch.Tensor:
    """Copy of x [B, T, ...] with every position > t replaced by fresh random values (scale 3)."""
    y = x.clone()
    if t + 1 < x.shape[1]:
        gen = torch.Generator().manual_seed(seed)
        y[:, t + 1 :] = torch.randn(y[:, t + 1 :].shape, generator=gen, dtype=F64).to(x.dtype) * 3
    return y


def _perturbed(x: dict, t: int) -> dict:
    out = {name: _perturb_after(val, t, 1000 + i) for i, (name, val) in enumerate(sorted(x.items()))}
    out["gates"] = out["gates"].abs()
    return out


def _truncated(x: dict, t: int) -> dict:
    return {name: val[:, : t + 1].contiguous() for name, val in x.items()}


def _pick_t(s: Shape, r: int) -> int:
    return r % s.T


def _run_cmp(op, x: dict, s: Shape) -> torch.Tensor:
    k_cmp = compress_mean_pool(x["k_c"], s.l, s.d)
    v_cmp = compress_mean_pool(x["v_c"], s.l, s.d)
    o, lse = op(x["q"], k_cmp, v_cmp, s.l, s.d)
    # lse is -inf on rows that see no block (assert_close treats equal infinities as equal); its
    # dtype is checked in test_inv_branches, here only its values.
    return torch.cat([o.flatten(2), lse.to(o.dtype)], dim=-1)


def _run_sel(cmp_op, sel_op, pick_op, x: dict, s: Shape) -> tuple[torch.Tensor, torch.Tensor]:
    k_cmp = compress_mean_pool(x["k_c"], s.l, s.d)
    v_cmp = compress_mean_pool(x["v_c"], s.l, s.d)
    _, lse = cmp_op(x["q"], k_cmp, v_cmp, s.l, s.d)
    idx = pick_op(
        x["q"], k_cmp, lse, block_size=s.l, block_stride=s.d, sel_block_size=s.lp, num_selected=s.n
    )
    return sel_op(x["q"], x["k_sel"], x["v_sel"], idx, s.lp), idx


def _run_nsa(op, x: dict, s: Shape) -> tuple[torch.Tensor, torch.Tensor]:
    k_cmp = compress_mean_pool(x["k_c"], s.l, s.d)
    v_cmp = compress_mean_pool(x["v_c"], s.l, s.d)
    out = op(x["q"], k_cmp, v_cmp, x["k_sel"], x["v_sel"], x["k_win"], x["v_win"], x["gates"], **s.kw())
    return out.output, out.block_indices


def _assert_prefix_equal(a: torch.Tensor, b: torch.Tensor, t: int) -> None:
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], **EXACT)


@given(shapes(), st.integers(0, 10**6))
def test_compressed_attention_causal(s: Shape, r: int):
    t = _pick_t(s, r)
    x = make_raw_inputs(s)
    for op in (compressed_attention, naive_compressed_attention):
        base = _run_cmp(op, x, s)
        _assert_prefix_equal(_run_cmp(op, _perturbed(x, t), s), base, t)
        _assert_prefix_equal(_run_cmp(op, _truncated(x, t), s), base, t)


@given(shapes(), st.integers(0, 10**6))
def test_selected_attention_causal(s: Shape, r: int):
    t = _pick_t(s, r)
    x = make_raw_inputs(s)
    for ops in (
        (compressed_attention, selected_attention, select_blocks),
        (naive_compressed_attention, naive_selected_attention, naive_select_blocks),
    ):
        base, idx = _run_sel(*ops, x, s)
        for y in (_perturbed(x, t), _truncated(x, t)):
            out, idx2 = _run_sel(*ops, y, s)
            _assert_prefix_equal(out, base, t)
            assert torch.equal(idx2[:, : t + 1], idx[:, : t + 1])


@given(shapes(), st.integers(0, 10**6))
def test_sliding_window_causal(s: Shape, r: int):
    t = _pick_t(s, r)
    x = make_raw_inputs(s)
    for op in (sliding_window_attention, naive_sliding_window_attention):
        base = op(x["q"], x["k_win"], x["v_win"], s.w)
        for y in (_perturbed(x, t), _truncated(x, t)):
            _assert_prefix_equal(op(y["q"], y["k_win"], y["v_win"], s.w), base, t)


@given(shapes(), st.integers(0, 10**6))
def test_nsa_attention_causal(s: Shape, r: int):
    t = _pick_t(s, r)
    x = make_raw_inputs(s)
    for op in (nsa_attention, naive_nsa_attention):
        base, idx = _run_nsa(op, x, s)
        for y in (_perturbed(x, t), _truncated(x, t)):
            out, idx2 = _run_nsa(op, y, s)
            _assert_prefix_equal(out, base, t)
            assert torch.equal(idx2[:, : t + 1], idx[:, : t + 1])


def test_nsa_attention_causal_every_position():
    """Deterministic sweep: every t of one sequence with l=4, d=2, l'=4, n=3, w=3, G=2."""
    s = Shape(1, 17, 4, 2, 6, 4, 4, 2, 4, 3, 3, seed=5)
    x = make_raw_inputs(s)
    base, _ = _run_nsa(nsa_attention, x, s)
    for t in range(s.T):
        out, _ = _run_nsa(nsa_attention, _perturbed(x, t), s)
        _assert_prefix_equal(out, base, t)
        # and a leak check that can fail: perturbing position t itself does change row t
        y = dict(x)
        y["v_win"] = x["v_win"].clone()
        y["v_win"][:, t] += 1.0
        assert not torch.allclose(_run_nsa(nsa_attention, y, s)[0][:, t], base[:, t])


# ---------------------------------------------------------------------------------------------
# NSAAttention module (tiny config)

TINY = {
    "hidden_size": 12,
    "num_heads": 4,
    "num_kv_heads": 2,
    "head_dim": 6,
    "head_dim_v": 4,
    "cmp_block_size": 4,
    "cmp_stride": 2,
    "sel_block_size": 4,
    "num_selected": 3,
    "window_size": 3,
}


def _tiny_module(seed: int, **over) -> NSAAttention:
    torch.manual_seed(seed)
    mod = NSAAttention(NSAConfig(**{**TINY, **over})).double()
    with torch.no_grad():  # no zero-initialised layer: every parameter must influence the output
        for p in mod.parameters():
            p.add_(torch.randn(p.shape, dtype=F64) * 0.2)
    return mod.eval()


@given(
    st.integers(1, 21),
    st.integers(0, 10**6),
    st.sampled_from(["mean", "mlp"]),
    st.booleans(),
    st.sampled_from(["sigmoid", "softmax"]),
)
def test_module_causal(t_len: int, r: int, compression: str, shared_kv: bool, gate: str):
    mod = _tiny_module(3, compression=compression, shared_kv=shared_kv, gate=gate)
    gen = torch.Generator().manual_seed(r)
    x = torch.randn(2, t_len, TINY["hidden_size"], generator=gen, dtype=F64)
    t = r % t_len
    with torch.no_grad():
        base, aux = mod(x, return_aux=True)
        y = _perturb_after(x, t, r + 1)
        out, aux2 = mod(y, return_aux=True)
        _assert_prefix_equal(out, base, t)
        assert torch.equal(aux2.block_indices[:, : t + 1], aux.block_indices[:, : t + 1])
        _assert_prefix_equal(mod(x[:, : t + 1]), base, t)


@given(
    st.lists(st.integers(0, 9), min_size=1, max_size=4).filter(any),
    st.integers(0, 10**6),
    st.sampled_from(["mean", "mlp"]),
    st.booleans(),
    st.sampled_from(["sigmoid", "softmax"]),
)
def test_module_causal_packed(lengths: list[int], r: int, compression: str, shared_kv: bool, gate: str):
    """layer(x, cu_seqlens=cu) with the tokens after position t of one sequence A replaced by garbage (random
    values, then NaN), or cut off (the bounds moved with them): A's rows <= t and every row of every other
    sequence unchanged, and so are their selections (bitwise; the selection's group scores come from those rows
    alone). The NaN's rows (A's rows > t) are all NaN: each row reads its own token."""
    mod = _tiny_module(3, compression=compression, shared_kv=shared_kv, gate=gate)
    bounds = [0, *itertools.accumulate(lengths)]
    filled = [i for i, n in enumerate(lengths) if n]
    a, b = bounds[filled[r % len(filled)]], bounds[filled[r % len(filled)] + 1]
    t = r % (b - a)
    gen = torch.Generator().manual_seed(r)
    x = torch.randn(1, bounds[-1], TINY["hidden_size"], generator=gen, dtype=F64)
    cu = torch.tensor(bounds)
    kept = torch.ones(bounds[-1], dtype=torch.bool)
    kept[a + t + 1 : b] = False
    nan = x.clone()
    nan[:, a + t + 1 : b] = float("nan")
    with torch.no_grad():
        base, aux = mod(x, return_aux=True, cu_seqlens=cu)
        for y in (_perturb_after(x[:, a:b], t, r + 1), nan[:, a:b]):
            out, aux2 = mod(torch.cat([x[:, :a], y, x[:, b:]], dim=1), return_aux=True, cu_seqlens=cu)
            torch.testing.assert_close(out[:, kept], base[:, kept], **EXACT)
            assert torch.equal(aux2.block_indices[:, kept], aux.block_indices[:, kept])
        assert out[:, ~kept].isnan().all() and torch.isfinite(out[:, kept]).all()
        cut = torch.tensor([n if n <= a else n - (b - a - t - 1) for n in bounds])
        out, aux2 = mod(x[:, kept], return_aux=True, cu_seqlens=cut)
        torch.testing.assert_close(out, base[:, kept], **EXACT)
        assert torch.equal(aux2.block_indices, aux.block_indices[:, kept])
