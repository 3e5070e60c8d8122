"""Argument rules of docs/API_CONTRACT.md and NSA.md: each bad input raises the documented error
class (NSAInputError for tensors/arguments, NSAConfigError for configuration), and the message names
the offending argument (matched as a whole word)."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
import torch
from conftest import randn

from nsa import (
    CompressPool,
    NSAAttention,
    NSAConfig,
    NSAConfigError,
    NSAInputError,
    NSAKVCache,
    apply_rope,
    compress_mean_pool,
    compressed_attention,
    group_reduce,
    load_nsa_config,
    map_cmp_to_sel,
    naive_compressed_attention,
    naive_nsa_attention,
    naive_select_blocks,
    naive_selected_attention,
    naive_sliding_window_attention,
    nsa_attention,
    num_compressed_blocks,
    num_selection_blocks,
    select_blocks,
    selected_attention,
    sliding_window_attention,
    topn_blocks,
)
from nsa.validation import check_real, check_scale


def names(*args: str) -> str:
    """Regex: any of the argument names as a whole word (k does not match k_cmp)."""
    return "|".join(rf"(?<![\w]){re.escape(a)}(?![\w])" for a in args)


def test_error_classes():
    assert issubclass(NSAInputError, ValueError)
    assert issubclass(NSAConfigError, ValueError)


# Valid base inputs: B=1, T=10, HQ=4, Hkv=2, Dk=4, Dv=3, l=4, d=2 (num_cmp(10) = 4), l'=4, n=3, w=3.
B, T, HQ, HKV, DK, DV = 1, 10, 4, 2, 4, 3
L, D, LP, N, W = 4, 2, 4, 3, 3
NCMP = 4


def base() -> dict:
    return {
        "q": randn(B, T, HQ, DK, seed=1),
        "k": randn(B, T, HKV, DK, seed=2),
        "v": randn(B, T, HKV, DV, seed=3),
        "k_cmp": randn(B, NCMP, HKV, DK, seed=4),
        "v_cmp": randn(B, NCMP, HKV, DV, seed=5),
        "gates": torch.rand(B, T, HQ, 3, dtype=torch.float64),
        "idx": torch.tensor([0, -1]).expand(B, T, HKV, 2).clone(),
    }


def call_cmp(x, op=compressed_attention, **kw):
    args = {"block_size": L, "block_stride": D, **kw}
    return op(x["q"], x["k_cmp"], x["v_cmp"], args["block_size"], args["block_stride"])


def call_sel(x, op=selected_attention, block_size=LP):
    return op(x["q"], x["k"], x["v"], x["idx"], block_size)


def call_win(x, op=sliding_window_attention, window_size=W):
    return op(x["q"], x["k"], x["v"], window_size)


def call_nsa(x, op=nsa_attention, **kw):
    args = {"block_size": L, "block_stride": D, "sel_block_size": LP, "num_selected": N, "window_size": W}
    args.update(kw)
    return op(x["q"], x["k_cmp"], x["v_cmp"], x["k"], x["v"], x.get("k_win", x["k"]), x.get("v_win", x["v"]),
              x["gates"], **args)


def call_select(x, **kw):
    args = {"block_size": L, "block_stride": D, "sel_block_size": LP, "num_selected": N}
    args.update(kw)
    lse = x.get("lse", torch.zeros(B, T, HQ, dtype=torch.float64))
    return select_blocks(x["q"], x["k_cmp"], lse, **args)


def test_base_inputs_are_valid():
    """The base inputs pass, so each error below is caused by its one change."""
    x = base()
    call_cmp(x)
    call_sel(x)
    call_win(x)
    call_nsa(x)
    call_select(x)


def mod(**changes):
    x = base()
    x.update(changes)
    return x


# ---------------------------------------------------------------------------------------------
# wrong ranks

RANK_CASES = [
    ("q", lambda: call_cmp(mod(q=randn(B, T, HQ * DK, seed=1))), names("q")),
    ("k_cmp", lambda: call_cmp(mod(k_cmp=randn(B, NCMP, HKV * DK, seed=1))), names("k_cmp")),
    ("v_cmp", lambda: call_cmp(mod(v_cmp=randn(1, B, NCMP, HKV, DV, seed=1))), names("v_cmp")),
    ("k", lambda: call_sel(mod(k=randn(B, T, HKV * DK, seed=1))), names("k")),
    ("v", lambda: call_win(mod(v=randn(B, T, HKV, DV, 1, seed=1))), names("v")),
    ("gates", lambda: call_nsa(mod(gates=torch.rand(B, T, HQ * 3, dtype=torch.float64))), names("gates")),
    ("block_indices", lambda: call_sel(mod(idx=torch.zeros(B, T, HKV, dtype=torch.int64))), names("block_indices")),
    ("x_pool", lambda: compress_mean_pool(randn(T, HKV, DK, seed=1), L, D), names("x")),
    ("x_rope", lambda: apply_rope(randn(T, HKV, DK, seed=1), torch.arange(T)), names("x")),
    ("scores", lambda: topn_blocks(torch.rand(T, HKV, 3, dtype=torch.float64), LP, N), names("scores")),
    ("p", lambda: group_reduce(torch.rand(T, HQ, 3, dtype=torch.float64), HKV), names("p")),
]


@pytest.mark.parametrize(("case", "fn", "pattern"), RANK_CASES, ids=[c[0] for c in RANK_CASES])
def test_wrong_rank(case, fn, pattern):
    with pytest.raises(NSAInputError, match=pattern):
        fn()


# ---------------------------------------------------------------------------------------------
# GQA: HQ not divisible by H_kv; head dim and length mismatches

FLOAT_STRIDE: Any = 1.5  # a float where an int is required, on purpose
SHAPE_CASES = [
    ("hq_not_multiple_cmp", lambda: call_cmp(mod(q=randn(B, T, 3, DK, seed=1))), names("q", "k_cmp")),
    ("hq_not_multiple_sel", lambda: call_sel(mod(q=randn(B, T, 3, DK, seed=1))), names("q", "k")),
    ("hq_not_multiple_win", lambda: call_win(mod(q=randn(B, T, 5, DK, seed=1))), names("q", "k")),
    ("hq_not_multiple_group_reduce", lambda: group_reduce(torch.rand(1, T, 3, 4, dtype=torch.float64), 2),
     names("p", "num_kv_heads")),
    ("head_dim_q_k", lambda: call_win(mod(k=randn(B, T, HKV, DK + 2, seed=1))), names("q", "k")),
    ("head_dim_q_kcmp", lambda: call_cmp(mod(k_cmp=randn(B, NCMP, HKV, DK + 2, seed=1))), names("q", "k_cmp")),
    ("k_v_heads", lambda: call_win(mod(v=randn(B, T, HKV + 1, DV, seed=1))), names("k", "v")),
    ("k_length", lambda: call_sel(mod(k=randn(B, T + 1, HKV, DK, seed=1), v=randn(B, T + 1, HKV, DV, seed=2))),
     names("q", "k")),
    ("batch", lambda: call_win(mod(k=randn(B + 1, T, HKV, DK, seed=1), v=randn(B + 1, T, HKV, DV, seed=2))),
     names("q", "k")),
    ("nsa_k_sel_heads", lambda: call_nsa(mod(k=randn(B, T, 1, DK, seed=1), v=randn(B, T, 1, DV, seed=2))),
     names("k_sel", "k_cmp")),
    ("nsa_v_win_dim", lambda: call_nsa(mod(v_win=randn(B, T, HKV, DV + 1, seed=1))), names("v_win", "v_cmp")),
    ("gates_last_dim", lambda: call_nsa(mod(gates=torch.rand(B, T, HQ, 2, dtype=torch.float64))), names("gates")),
    ("block_indices_heads", lambda: call_sel(mod(idx=torch.zeros(B, T, HKV + 1, 2, dtype=torch.int64))),
     names("block_indices")),
    ("block_indices_float", lambda: call_sel(mod(idx=torch.zeros(B, T, HKV, 2))), names("block_indices")),
    ("lse_shape", lambda: call_select(mod(lse=torch.zeros(B, T, HKV, dtype=torch.float64))), names("lse")),
    ("lse_int", lambda: call_select(mod(lse=torch.zeros(B, T, HQ, dtype=torch.long))), names("lse")),
    ("lse_list", lambda: call_select(mod(lse=[[0.0]])), names("lse")),
    ("lse_naive", lambda: naive_select_blocks(base()["q"], base()["k_cmp"], torch.zeros(7), block_size=L,
                                              block_stride=D, sel_block_size=LP, num_selected=N), names("lse")),
    ("rope_odd_dim", lambda: apply_rope(randn(B, T, HKV, 5, seed=1), torch.arange(T)), names("x", "D", "head dim")),
    ("rope_stride_zero", lambda: apply_rope(randn(B, T, HKV, DK, seed=1), None, stride=0), names("stride")),
    ("rope_stride_float", lambda: apply_rope(randn(B, T, HKV, DK, seed=1), None, stride=FLOAT_STRIDE), names("stride")),
    ("rope_stride_bool", lambda: apply_rope(randn(B, T, HKV, DK, seed=1), None, stride=True), names("stride")),
    ("rope_offset_nan", lambda: apply_rope(randn(B, T, HKV, DK, seed=1), None, offset=float("nan")),
     names("offset")),
    ("rope_offset_inf", lambda: apply_rope(randn(B, T, HKV, DK, seed=1), None, offset=float("inf")),
     names("offset")),
    ("rope_stride_with_positions", lambda: apply_rope(randn(B, T, HKV, DK, seed=1), torch.arange(T), stride=2),
     names("stride", "positions")),
    ("rope_offset_with_positions", lambda: apply_rope(randn(B, T, HKV, DK, seed=1), torch.arange(T), offset=0.5),
     names("offset", "positions")),
]


@pytest.mark.parametrize(("case", "fn", "pattern"), SHAPE_CASES, ids=[c[0] for c in SHAPE_CASES])
def test_shape_rules(case, fn, pattern):
    with pytest.raises(NSAInputError, match=pattern):
        fn()


# ---------------------------------------------------------------------------------------------
# block sizes: d must divide l and l'; sizes must be positive

SIZE_CASES = [
    ("d_not_dividing_l_select", lambda: call_select(base(), block_size=6, block_stride=4),
     names("block_stride", "block_size")),
    ("d_not_dividing_lp_select", lambda: call_select(base(), sel_block_size=5),
     names("block_stride", "sel_block_size")),
    ("d_not_dividing_lp_nsa", lambda: call_nsa(base(), sel_block_size=3), names("block_stride", "sel_block_size")),
    ("d_not_dividing_l_map", lambda: map_cmp_to_sel(torch.rand(2, 3, dtype=torch.float64), 6, 4, 8, 2),
     names("block_stride", "block_size")),
    ("d_not_dividing_lp_map", lambda: map_cmp_to_sel(torch.rand(2, 3, dtype=torch.float64), 4, 2, 5, 2),
     names("block_stride", "sel_block_size")),
    ("block_size_zero_cmp", lambda: compressed_attention(
        randn(B, T, HQ, DK, seed=1), randn(B, 0, HKV, DK, seed=2), randn(B, 0, HKV, DV, seed=3), 0, D),
     names("block_size")),
    ("block_stride_zero_cmp", lambda: call_cmp(base(), block_stride=0), names("block_stride")),
    ("block_stride_negative_pool", lambda: compress_mean_pool(randn(B, T, HKV, DK, seed=1), L, -2),
     names("block_stride")),
    ("block_size_zero_pool", lambda: compress_mean_pool(randn(B, T, HKV, DK, seed=1), 0, D), names("block_size")),
    ("sel_block_size_zero_sel", lambda: call_sel(base(), block_size=0), names("block_size")),
    ("sel_block_size_zero_nsa", lambda: call_nsa(base(), sel_block_size=0), names("sel_block_size")),
    ("num_selected_zero_nsa", lambda: call_nsa(base(), num_selected=0), names("num_selected")),
    ("num_selected_negative_topn", lambda: topn_blocks(torch.rand(1, T, HKV, 3, dtype=torch.float64), LP, -1),
     names("num_selected")),
    ("sel_block_size_zero_topn", lambda: topn_blocks(torch.rand(1, T, HKV, 3, dtype=torch.float64), 0, N),
     names("sel_block_size")),
    ("window_size_zero", lambda: call_win(base(), window_size=0), names("window_size")),
    ("window_size_negative_nsa", lambda: call_nsa(base(), window_size=-3), names("window_size")),
    ("window_size_zero_naive", lambda: call_win(base(), op=naive_sliding_window_attention, window_size=0),
     names("window_size")),
    ("scale_negative", lambda: sliding_window_attention(base()["q"], base()["k"], base()["v"], W, scale=-1.0),
     names("scale")),
]


@pytest.mark.parametrize(("case", "fn", "pattern"), SIZE_CASES, ids=[c[0] for c in SIZE_CASES])
def test_size_rules(case, fn, pattern):
    with pytest.raises(NSAInputError, match=pattern):
        fn()


# ---------------------------------------------------------------------------------------------
# dtypes and devices

META = torch.device("meta")

DTYPE_DEVICE_CASES = [
    ("k_float32", lambda: call_win(mod(k=randn(B, T, HKV, DK, seed=1, dtype=torch.float32))), names("k", "q")),
    ("v_cmp_float32", lambda: call_cmp(mod(v_cmp=randn(B, NCMP, HKV, DV, seed=1, dtype=torch.float32))),
     names("v_cmp", "q")),
    ("gates_float32", lambda: call_nsa(mod(gates=torch.rand(B, T, HQ, 3))), names("gates", "q")),
    ("v_sel_bf16", lambda: call_sel(mod(v=randn(B, T, HKV, DV, seed=1, dtype=torch.bfloat16))), names("v", "q")),
    ("q_int", lambda: call_win(mod(q=torch.zeros(B, T, HQ, DK, dtype=torch.int64))), names("q")),
    ("k_meta", lambda: call_win(mod(k=torch.empty(B, T, HKV, DK, dtype=torch.float64, device=META))),
     names("k", "q")),
    ("k_cmp_meta", lambda: call_cmp(mod(k_cmp=torch.empty(B, NCMP, HKV, DK, dtype=torch.float64, device=META))),
     names("k_cmp", "q")),
    ("v_win_meta", lambda: call_nsa(mod(v_win=torch.empty(B, T, HKV, DV, dtype=torch.float64, device=META))),
     names("v_win", "q")),
    ("gates_meta", lambda: call_nsa(mod(gates=torch.empty(B, T, HQ, 3, dtype=torch.float64, device=META))),
     names("gates", "q")),
    ("block_indices_meta", lambda: call_sel(mod(idx=torch.empty(B, T, HKV, 2, dtype=torch.int64, device=META))),
     names("block_indices", "q")),
]


@pytest.mark.parametrize(("case", "fn", "pattern"), DTYPE_DEVICE_CASES, ids=[c[0] for c in DTYPE_DEVICE_CASES])
def test_dtype_device_rules(case, fn, pattern):
    with pytest.raises(NSAInputError, match=pattern):
        fn()


# ---------------------------------------------------------------------------------------------
# block_indices values and the compressed block count


def _idx_with(t: int, value: int) -> torch.Tensor:
    idx = torch.full((B, T, HKV, 2), -1, dtype=torch.int64)
    idx[0, t, 0, 0] = value
    return idx


def _idx_twice(t: int, value: int) -> torch.Tensor:
    idx = _idx_with(t, value)
    idx[0, t, 0, 1] = value
    return idx


INDEX_CASES = [
    ("out_of_range", _idx_with(T - 1, -(-T // LP))),  # ceil(T / l') = 3 blocks: index 3 does not exist
    ("far_out_of_range", _idx_with(T - 1, 1000)),
    ("below_minus_one", _idx_with(5, -2)),
    ("future_block", _idx_with(3, 1)),  # t=3: block 1 starts at 4 > 3
    ("future_block_last_row", _idx_with(7, 2)),  # t=7: block 2 starts at 8 > 7
    ("repeated_block", _idx_twice(6, 1)),  # a block listed twice in one row (-1 may repeat, blocks may not)
    ("repeated_block_zero", _idx_twice(2, 0)),
]


@pytest.mark.parametrize("op", [selected_attention, naive_selected_attention], ids=lambda f: f.__name__)
@pytest.mark.parametrize(("case", "idx"), INDEX_CASES, ids=[c[0] for c in INDEX_CASES])
def test_block_indices_values(op, case, idx):
    with pytest.raises(NSAInputError, match=names("block_indices")):
        call_sel(mod(idx=idx), op=op)
    with pytest.raises(NSAInputError, match=names("block_indices")):
        call_sel(mod(idx=idx.to(torch.int32)), op=op)


def test_block_indices_edge_values_are_valid():
    """The boundary cases are accepted: the last block ceil(T/l') - 1 at its own start, -1 anywhere."""
    idx = torch.full((B, T, HKV, 2), -1, dtype=torch.int64)
    idx[0, 8, 1, 1] = 2  # t=8 is the start of block 2 (the last, partial block)
    idx[0, 9, 0, 0] = 2
    idx[0, 4, 0, 1] = 1
    call_sel(mod(idx=idx))
    call_sel(mod(idx=idx), op=naive_selected_attention)


@pytest.mark.parametrize("wrong", [NCMP - 1, NCMP + 1, 0])
@pytest.mark.parametrize("which", ["compressed_attention", "naive_compressed_attention", "select_blocks",
                                   "nsa_attention", "naive_nsa_attention"])
def test_k_cmp_block_count(which, wrong):
    x = mod(k_cmp=randn(B, wrong, HKV, DK, seed=1), v_cmp=randn(B, wrong, HKV, DV, seed=2))
    fn = {
        "compressed_attention": lambda: call_cmp(x),
        "naive_compressed_attention": lambda: call_cmp(x, op=naive_compressed_attention),
        "select_blocks": lambda: call_select(x),
        "nsa_attention": lambda: call_nsa(x),
        "naive_nsa_attention": lambda: call_nsa(x, op=naive_nsa_attention),
    }[which]
    with pytest.raises(NSAInputError, match=names("k_cmp")):
        fn()


# ---------------------------------------------------------------------------------------------
# NSAConfig and the module

TINY: dict[str, Any] = {
    "hidden_size": 12, "num_heads": 4, "num_kv_heads": 2, "head_dim": 6, "head_dim_v": 4,
    "cmp_block_size": 4, "cmp_stride": 2, "sel_block_size": 4, "num_selected": 3, "window_size": 3,
}


def test_config_defaults_are_the_paper():
    c = NSAConfig()
    assert (c.cmp_block_size, c.cmp_stride, c.sel_block_size, c.num_selected, c.window_size) == (32, 16, 64, 16, 512)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.head_dim_v) == (64, 4, 192, 128)
    assert c.gate == "sigmoid"
    assert NSAConfig.from_dict(c.to_dict()) == c
    assert NSAConfig.from_dict(TINY).to_dict()["num_selected"] == 3


def test_config_unknown_key():
    with pytest.raises(NSAConfigError, match=names("bogus_key")):
        NSAConfig.from_dict({**TINY, "bogus_key": 1})
    with pytest.raises(NSAConfigError, match=names("window")):
        NSAConfig.from_dict({"window": 512})  # a near-miss of window_size is still unknown


CONFIG_CASES = [
    ({"num_heads": 6, "num_kv_heads": 4}, names("num_heads", "num_kv_heads")),
    ({"cmp_block_size": 6, "cmp_stride": 4}, names("cmp_stride", "cmp_block_size")),
    ({"sel_block_size": 6, "cmp_stride": 4, "cmp_block_size": 8}, names("cmp_stride", "sel_block_size")),
    ({"hidden_size": 0}, names("hidden_size")),
    ({"num_heads": -4}, names("num_heads")),
    ({"num_kv_heads": 0}, names("num_kv_heads")),
    ({"head_dim": 0}, names("head_dim")),
    ({"head_dim": 5}, names("head_dim")),  # RoPE rotates pairs per head: d_k must be even
    ({"head_dim_v": 0}, names("head_dim_v")),
    ({"cmp_block_size": 0}, names("cmp_block_size")),
    ({"cmp_stride": -2}, names("cmp_stride")),
    ({"sel_block_size": 0}, names("sel_block_size")),
    ({"num_selected": 0}, names("num_selected")),
    ({"window_size": 0}, names("window_size")),
    ({"window_size": 2.5}, names("window_size")),
    ({"num_heads": "4"}, names("num_heads")),
    ({"compression": "max"}, names("compression")),
    ({"gate": "relu"}, names("gate")),
    ({"rope_theta": 0.0}, names("rope_theta")),
    ({"rope_theta": math.inf}, names("rope_theta")),
    ({"rope_theta": math.nan}, names("rope_theta")),
    ({"rope_theta": "10000"}, names("rope_theta")),
    ({"scale": -1.0}, names("scale")),
    ({"scale": math.inf}, names("scale")),
    ({"scale": -math.inf}, names("scale")),
    ({"scale": math.nan}, names("scale")),
    ({"scale": True}, names("scale")),
    ({"query_chunk_size": 0}, names("query_chunk_size")),
    ({"query_chunk_size": -8}, names("query_chunk_size")),
    ({"compression_hidden": 0}, names("compression_hidden")),
]


@pytest.mark.parametrize(("change", "pattern"), CONFIG_CASES, ids=[str(c[0]) for c in CONFIG_CASES])
def test_config_invalid_values(change, pattern):
    with pytest.raises(NSAConfigError, match=pattern):
        NSAConfig(**{**TINY, **change})
    with pytest.raises(NSAConfigError, match=pattern):
        NSAConfig.from_dict({**TINY, **change})


def test_module_input_rank_and_width():
    m = NSAAttention(NSAConfig(**TINY))
    with pytest.raises(NSAInputError, match=names("x")):
        m(torch.randn(5, 12))
    with pytest.raises(NSAInputError, match=names("x", "hidden_size")):
        m(torch.randn(1, 5, 13))


def test_compress_pool_kind():
    with pytest.raises((NSAInputError, NSAConfigError), match=names("kind")):
        CompressPool(4, 4, 2, kind="max")


# ---------------------------------------------------------------------------------------------
# Non-finite settings: every float setting is finite and in range (an inf scale used to pass and
# give NaN outputs).

NON_FINITE = [math.inf, -math.inf, math.nan]


@pytest.mark.parametrize("value", NON_FINITE, ids=str)
def test_check_scale_rejects_non_finite(value):
    with pytest.raises(NSAInputError, match=names("scale") + ".*finite"):
        check_scale(value)


def test_check_real_ranges_and_error_class():
    assert check_real("x", 3) == 3.0 and isinstance(check_real("x", 3), float)
    assert check_real("x", 0.0, at_least=0.0, below=1.0) == 0.0
    value: object
    rules: tuple[tuple[float, dict[str, Any]], ...] = (
        (0.0, {"above": 0.0}), (1.0, {"below": 1.0}), (-1e-300, {"at_least": 0.0}))
    for value, rule in rules:
        with pytest.raises(NSAConfigError, match=names("x")):
            check_real("x", value, error=NSAConfigError, **rule)
    for value in (*NON_FINITE, None, "1.0", False, torch.tensor(1.0)):
        with pytest.raises(NSAInputError, match=names("x") + ".*finite"):
            check_real("x", value)


FUNCTIONAL_OPS = {
    "compressed_attention": lambda x, **kw: compressed_attention(x["q"], x["k_cmp"], x["v_cmp"], L, D, **kw),
    "naive_compressed_attention": lambda x, **kw: naive_compressed_attention(x["q"], x["k_cmp"], x["v_cmp"], L, D,
                                                                             **kw),
    "selected_attention": lambda x, **kw: selected_attention(x["q"], x["k"], x["v"], x["idx"], LP, **kw),
    "naive_selected_attention": lambda x, **kw: naive_selected_attention(x["q"], x["k"], x["v"], x["idx"], LP, **kw),
    "sliding_window_attention": lambda x, **kw: sliding_window_attention(x["q"], x["k"], x["v"], W, **kw),
    "naive_sliding_window_attention": lambda x, **kw: naive_sliding_window_attention(x["q"], x["k"], x["v"], W,
                                                                                     **kw),
    "nsa_attention": lambda x, **kw: call_nsa(x, **kw),
    "naive_nsa_attention": lambda x, **kw: call_nsa(x, op=naive_nsa_attention, **kw),
    "select_blocks": lambda x, **kw: call_select(x, **kw),
}


@pytest.mark.parametrize("value", NON_FINITE, ids=str)
@pytest.mark.parametrize("op", list(FUNCTIONAL_OPS))
def test_functional_scale_must_be_finite(op, value):
    with pytest.raises(NSAInputError, match=names("scale")):
        FUNCTIONAL_OPS[op](base(), scale=value)


# ---------------------------------------------------------------------------------------------
# Degenerate sizes: head dim 0, zero index slots, query_chunk_size <= 0


def _zero_dim(which: str) -> dict:
    """base() with the key head dim (q, k, k_cmp) or the value head dim (v, v_cmp) set to 0."""
    x = base()
    keys = ("q", "k", "k_cmp") if which == "Dk" else ("v", "v_cmp")
    return {**x, **{key: x[key][..., :0] for key in keys}}


@pytest.mark.parametrize(("op", "which"), [(op, which) for op in FUNCTIONAL_OPS for which in ("Dk", "Dv")
                                           if (op, which) != ("select_blocks", "Dv")])  # it reads no values
def test_head_dim_zero(op, which):
    with pytest.raises(NSAInputError, match=r"head dims must be >= 1"):
        FUNCTIONAL_OPS[op](_zero_dim(which))


@pytest.mark.parametrize("op", [selected_attention, naive_selected_attention], ids=lambda f: f.__name__)
def test_zero_index_slots(op):
    with pytest.raises(NSAInputError, match=names("block_indices") + r".*S=0"):
        call_sel(mod(idx=torch.zeros(B, T, HKV, 0, dtype=torch.int64)), op=op)


@pytest.mark.parametrize("chunk", [0, -1, 2.0])
@pytest.mark.parametrize("op", [nsa_attention, naive_nsa_attention], ids=lambda f: f.__name__)
def test_query_chunk_size_must_be_positive(op, chunk):
    with pytest.raises(NSAInputError, match=names("query_chunk_size")):
        call_nsa(base(), op=op, query_chunk_size=chunk)


# ---------------------------------------------------------------------------------------------
# The module: empty inputs, dtype / device of x, append-only arguments, device strings


@pytest.mark.parametrize("shape", [(2, 0), (0, 5), (0, 0)], ids=["T=0", "B=0", "both"])
def test_module_empty_input_returns_empty_output(shape):
    """Documented rule: an empty input gives an empty output of shape [B, T, hidden] (and aux of the
    documented shapes), in the layer's dtype, with gradients reaching the parameters."""
    c = NSAConfig(**TINY)
    m = NSAAttention(c)
    y, aux = m(torch.randn(*shape, c.hidden_size), return_aux=True)
    assert y.shape == (*shape, c.hidden_size) and y.dtype == torch.float32
    assert aux.block_indices.shape == (*shape, c.num_kv_heads, c.num_selected)
    assert aux.block_indices.dtype == torch.int64
    assert aux.gates.shape == (*shape, c.num_heads, 3)
    y.sum().backward()
    assert m.o_proj.weight.grad is not None and not m.o_proj.weight.grad.any()


def test_module_dtype_must_match_parameters():
    m = NSAAttention(NSAConfig(**TINY))
    with pytest.raises(NSAInputError, match=r"x has dtype torch.float64 .*parameters have dtype torch.float32"):
        m(torch.randn(1, 5, 12, dtype=torch.float64))
    with pytest.raises(NSAInputError, match=r"x must be a floating tensor .*got torch.int64"):
        m(torch.zeros(1, 5, 12, dtype=torch.int64))


def test_module_dtype_rule_leaves_autocast_alone():
    """Under torch.autocast the projections cast x: a bfloat16 x reaches a float32 layer as before."""
    m = NSAAttention(NSAConfig(**TINY))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(torch.randn(1, 9, 12, dtype=torch.bfloat16))
    assert y.shape == (1, 9, 12) and y.dtype == torch.bfloat16


def test_module_device_must_match_parameters():
    m = NSAAttention(NSAConfig(**TINY))
    with pytest.raises(NSAInputError, match=r"x is on meta but the layer's parameters are on cpu"):
        m(torch.empty(1, 5, 12, device="meta"))


def test_module_append_arguments_need_a_cache():
    m = NSAAttention(NSAConfig(**TINY))
    with pytest.raises(NSAInputError, match=names("num_valid", "start_positions") + ".*cache"):
        m(torch.randn(1, 5, 12), num_valid=[3])
    with pytest.raises(NSAInputError, match=names("start_positions") + ".*cache"):
        m(torch.randn(1, 5, 12), start_positions=[0])


# The layer's packed sequences (forward(x, cu_seqlens=...)): NSAAttention reads the bounds on the host itself
# (positions restarting per sequence, phi's blocks per sequence) before nsa_attention sees them, so it checks them
# itself (_packed_lengths).

PACKED_T = 10
CU_LIST: Any = [0, 4, PACKED_T]  # a list where a tensor is required, on purpose


def _packed_call(cu_seqlens: Any, batch: int = 1) -> None:
    m = NSAAttention(NSAConfig(**TINY))
    m(torch.randn(batch, PACKED_T, TINY["hidden_size"]), cu_seqlens=cu_seqlens)


def _cu(*bounds: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    return torch.tensor(bounds, dtype=dtype)


PACKED_TENSOR = names("cu_seqlens") + r" must be a 1-D int32/int64 tensor"
PACKED_BOUNDS = names("cu_seqlens") + rf" must start at 0 and end at T={PACKED_T}"
PACKED_ORDER = names("cu_seqlens") + r" must be non-decreasing"
PACKED_CASES = [
    ("batch_2", lambda: _packed_call(_cu(0, 4, PACKED_T), batch=2), names("cu_seqlens") + r".*batch size 1.*B=2"),
    ("batch_3_int32", lambda: _packed_call(_cu(0, PACKED_T, dtype=torch.int32), batch=3),
     names("cu_seqlens") + r".*batch size 1.*B=3"),
    ("float", lambda: _packed_call(_cu(0, 4, PACKED_T, dtype=torch.float32)), PACKED_TENSOR),
    ("float64", lambda: _packed_call(_cu(0, 4, PACKED_T, dtype=torch.float64)), PACKED_TENSOR),
    ("bool", lambda: _packed_call(torch.tensor([False, True])), PACKED_TENSOR),
    ("int16", lambda: _packed_call(_cu(0, 4, PACKED_T, dtype=torch.int16)), PACKED_TENSOR),
    ("rank_2", lambda: _packed_call(_cu(0, 4, PACKED_T)[None]), PACKED_TENSOR),
    ("rank_0", lambda: _packed_call(torch.tensor(PACKED_T)), PACKED_TENSOR),
    ("list", lambda: _packed_call(CU_LIST), PACKED_TENSOR),
    ("empty", lambda: _packed_call(_cu()), PACKED_BOUNDS),
    ("one_bound", lambda: _packed_call(_cu(PACKED_T)), PACKED_BOUNDS),
    ("start_1", lambda: _packed_call(_cu(1, 4, PACKED_T)), PACKED_BOUNDS),
    ("start_negative", lambda: _packed_call(_cu(-1, 4, PACKED_T)), PACKED_BOUNDS),
    ("end_short", lambda: _packed_call(_cu(0, 4, PACKED_T - 1)), PACKED_BOUNDS),
    ("end_long", lambda: _packed_call(_cu(0, 4, PACKED_T + 1)), PACKED_BOUNDS),
    ("end_long_int32", lambda: _packed_call(_cu(0, PACKED_T + 4, dtype=torch.int32)), PACKED_BOUNDS),
    ("decreasing", lambda: _packed_call(_cu(0, 6, 4, PACKED_T)), PACKED_ORDER),
    ("past_t_then_back", lambda: _packed_call(_cu(0, PACKED_T + 2, PACKED_T)), PACKED_ORDER),
    ("meta", lambda: _packed_call(_cu(0, 4, PACKED_T).to(META)), names("cu_seqlens") + r".*meta"),
]


@pytest.mark.parametrize(("case", "fn", "pattern"), PACKED_CASES, ids=[c[0] for c in PACKED_CASES])
def test_module_packed_sequence_bounds(case, fn, pattern):
    with pytest.raises(NSAInputError, match=pattern):
        fn()


EMPTY_BOUNDS = names("cu_seqlens") + r" must start at 0 and end at T=0"


@pytest.mark.parametrize(("cu_seqlens", "pattern"), [(_cu(0, 0, dtype=torch.int32), None), (_cu(0, 0, 0), None),
                                                     (torch.tensor([0.0, 0.0]), PACKED_TENSOR),
                                                     (_cu(0), EMPTY_BOUNDS), (_cu(0, 1), EMPTY_BOUNDS)])
def test_module_packed_sequences_of_an_empty_input(cu_seqlens: torch.Tensor, pattern: str | None) -> None:
    """An empty x [1, 0, hidden] still has its cu_seqlens checked (the empty result returns after the checks):
    empty sequences are accepted, bounds that do not end at T = 0 or a float tensor are not."""
    m = NSAAttention(NSAConfig(**TINY))
    x = torch.randn(1, 0, TINY["hidden_size"])
    if pattern is None:
        assert m(x, cu_seqlens=cu_seqlens).shape == (1, 0, TINY["hidden_size"])
        return
    with pytest.raises(NSAInputError, match=pattern):
        m(x, cu_seqlens=cu_seqlens)


def test_module_packed_sequence_edges_pass():
    """The accepted edges: int32 and int64 bounds, empty sequences (repeated bounds, at either end), one sequence
    (the unpacked layer's output) and T one-token sequences."""
    m = NSAAttention(NSAConfig(**TINY)).double()
    x = randn(1, PACKED_T, TINY["hidden_size"], seed=6)
    whole = m(x)
    assert torch.equal(m(x, cu_seqlens=_cu(0, PACKED_T, dtype=torch.int32)), whole)
    assert torch.equal(m(x, cu_seqlens=_cu(0, 0, PACKED_T, PACKED_T)), whole)
    y = m(x, cu_seqlens=_cu(0, 4, 4, PACKED_T, dtype=torch.int32))
    assert torch.equal(y, m(x, cu_seqlens=_cu(0, 4, PACKED_T)))
    torch.testing.assert_close(y[:, :4], m(x[:, :4]), rtol=0, atol=1e-12)
    torch.testing.assert_close(y[:, 4:], m(x[:, 4:]), rtol=0, atol=1e-12)
    ones = m(x, cu_seqlens=torch.arange(PACKED_T + 1))
    torch.testing.assert_close(ones, torch.cat([m(x[:, t:t + 1]) for t in range(PACKED_T)], dim=1), rtol=0, atol=1e-12)


def test_module_packed_sequences_refuse_a_cache_and_change_nothing():
    """cu_seqlens packs whole sequences; a cache appends to its own: the call raises before any write (the cache's
    tensors and lengths as they were, and the next append gives what it gives on a cache that never saw the call)."""
    m = NSAAttention(NSAConfig(**TINY)).double()
    prompt, step = randn(1, 5, TINY["hidden_size"], seed=7), randn(1, 4, TINY["hidden_size"], seed=8)
    caches = [m.new_cache(1, 16), m.new_cache(1, 16)]
    with torch.no_grad():
        for cache in caches:
            m(prompt, cache=cache)
        before = {name: value.clone() for name, value in vars(caches[0]).items() if isinstance(value, torch.Tensor)}
        lengths = list(caches[0].lengths)
        for cu in (_cu(0, 2, 4), _cu(0, 4), CU_LIST):
            with pytest.raises(NSAInputError, match=names("cu_seqlens") + r".*cache"):
                m(step, cache=caches[0], cu_seqlens=cu)
        assert caches[0].lengths == lengths
        for name, value in before.items():
            assert torch.equal(getattr(caches[0], name), value), name
        assert torch.equal(m(step, cache=caches[0]), m(step, cache=caches[1]))


def _missing_device() -> str:
    """A device this build or machine lacks: CUDA without CUDA, else one index past the last GPU."""
    return f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"


@pytest.mark.parametrize("device", [_missing_device(), "xpu", "gpu0"])
def test_cache_device_string_must_exist(device):
    if device == "xpu" and torch.xpu.is_available():
        pytest.skip("this machine has an XPU")
    with pytest.raises(NSAInputError, match=names("device") + f".*{re.escape(device)}"):
        NSAKVCache(NSAConfig(**TINY), 1, 8, device=device)


def test_cache_sizes_are_positive_ints():
    for kw in ({"batch_size": 0, "capacity": 8}, {"batch_size": 1, "capacity": -1}, {"batch_size": 1, "capacity": 2.0}):
        with pytest.raises(NSAInputError, match=names(*kw)):
            NSAKVCache(NSAConfig(**TINY), **kw)


# ---------------------------------------------------------------------------------------------
# apply_rope's arguments: theta, positions (dtype, shape, batch, device, finite) and x's dtype

ROPE_X = randn(B, T, HKV, DK, seed=1)
ROPE_CASES = [
    *((f"theta={v}", {"theta": v}, names("theta")) for v in (math.nan, 0.0, -1.0, math.inf, 1e39, 1e-300)),
    ("theta_with_positions", {"theta": 0.0, "positions": torch.arange(T)}, names("theta")),
    ("positions_batch_3_of_1", {"positions": torch.arange(T)[None].expand(3, -1)}, names("positions")),
    ("positions_length", {"positions": torch.arange(T + 1)}, names("positions")),
    ("positions_nan", {"positions": torch.full((T,), math.nan)}, names("positions")),
    ("positions_inf", {"positions": torch.arange(T, dtype=torch.float64).index_fill(0, torch.tensor([4]), math.inf)},
     names("positions")),
    ("positions_bool", {"positions": torch.ones(T, dtype=torch.bool)}, names("positions")),
    ("positions_meta", {"positions": torch.arange(T, device=META)}, names("positions", "x")),
    ("positions_list", {"positions": list(range(T))}, names("positions")),
    ("offset_overflows_float32", {"offset": 1e300}, names("offset")),
    ("x_int64", {"x": torch.arange(B * T * HKV * DK).view(B, T, HKV, DK)}, names("x")),
]


@pytest.mark.parametrize(("case", "change", "pattern"), ROPE_CASES, ids=[c[0] for c in ROPE_CASES])
def test_rope_argument_rules(case, change, pattern):
    """Each used to return NaN, a wrong batch or a truncated int tensor without an error."""
    args = {"x": ROPE_X, "positions": None, **change}
    with pytest.raises(NSAInputError, match=pattern):
        apply_rope(args.pop("x"), args.pop("positions"), **args)


def test_rope_valid_edges_pass():
    """Positions of batch 1 broadcast over B; finite float and int32 positions are valid; theta tiny but
    nonzero in float32 is valid."""
    x = randn(2, T, HKV, DK, seed=2)
    positions = torch.arange(T)
    assert torch.equal(apply_rope(x, positions[None]), apply_rope(x, positions))
    assert torch.equal(apply_rope(x, positions.to(torch.int32)), apply_rope(x, positions))
    assert apply_rope(x, positions.to(torch.float64) + 0.5).isfinite().all()
    assert apply_rope(x, None, 1e-3).isfinite().all()


# ---------------------------------------------------------------------------------------------
# Finite settings that overflow (or underflow to 0) in float32 made every output NaN


def test_check_real_float32_bounds():
    f32_max, f32_tiny = torch.finfo(torch.float32).max, 2.0**-149  # the largest float32, the smallest subnormal
    assert check_real("x", f32_max, float32=True) == f32_max
    assert check_real("x", -f32_tiny, float32=True) == -f32_tiny  # no lower bound: a 0 would be allowed anyway
    assert check_real("x", f32_tiny, above=0.0, float32=True) == f32_tiny
    assert check_real("x", 1e39) == 1e39  # float32 is opt-in
    for value in (float.fromhex("0x1.ffffffp+127"), -1e39, 1e300):  # the first rounds to inf in float32
        with pytest.raises(NSAConfigError, match=names("x") + ".*float32"):
            check_real("x", value, error=NSAConfigError, float32=True)
    for value in (2.0**-150, 1e-300):  # both round to 0 in float32
        with pytest.raises(NSAInputError, match=names("x") + ".*float32"):
            check_real("x", value, above=0.0, float32=True)


@pytest.mark.parametrize(("field", "value"), [("scale", 1e39), ("scale", 1e300), ("scale", 1e-300),
                                              ("rope_theta", 1e-300), ("rope_theta", 1e39)])
def test_config_float_settings_fit_float32(field, value):
    with pytest.raises(NSAConfigError, match=names(field) + ".*float32"):
        NSAConfig(**{**TINY, field: value})


@pytest.mark.parametrize("value", [1e300, 1e-300], ids=str)
@pytest.mark.parametrize("op", [*FUNCTIONAL_OPS, "nsa_attention_triton"])
def test_functional_scale_fits_float32(op, value):
    """Checked before the backend is chosen, so the Triton path refuses it too."""
    call = FUNCTIONAL_OPS.get(op, lambda x, **kw: call_nsa(x, backend="triton", **kw))
    with pytest.raises(NSAInputError, match=names("scale") + ".*float32"):
        call(base(), scale=value)


# ---------------------------------------------------------------------------------------------
# load_nsa_config: keys beside [nsa] were ignored; nsa = 3 raised a plain TypeError


@pytest.mark.parametrize(("text", "pattern"), [
    ("window_size = 3\n[nsa]\nhidden_size = 32\n", names("window_size") + ".*nsa"),
    ("nsa = 3\n", names("nsa") + ".*table"),
], ids=["stray_top_level_key", "nsa_not_a_table"])
def test_load_nsa_config_file_layout(tmp_path, text, pattern):
    path = tmp_path / "nsa.toml"
    path.write_text(text)
    with pytest.raises(NSAConfigError, match=pattern):
        load_nsa_config(path)


def test_load_nsa_config_either_layout_loads(tmp_path):
    for text in ("window_size = 3\n", "[nsa]\nwindow_size = 3\n"):
        (tmp_path / "nsa.toml").write_text(text)
        assert load_nsa_config(tmp_path / "nsa.toml") == NSAConfig(window_size=3)


# ---------------------------------------------------------------------------------------------
# The public selection functions and block counts: sizes, counts and positions


SCORES = torch.rand(B, 2 * LP, HKV, 2, dtype=torch.float64)  # T = 8 tokens in N = 2 blocks of l' = 4
FLOAT_NUM_SEL: Any = 2.0  # a float where an int is required, on purpose
SELECTION_CASES = [
    ("map_num_sel_blocks_negative", lambda: map_cmp_to_sel(torch.rand(2, 3, dtype=torch.float64), 16, 8, 16, -1),
     names("num_sel_blocks")),
    ("map_num_sel_blocks_float", lambda: map_cmp_to_sel(torch.rand(2, 3, dtype=torch.float64), 4, 2, 4, FLOAT_NUM_SEL),
     names("num_sel_blocks")),
    ("map_p_cmp_int", lambda: map_cmp_to_sel(torch.ones(2, 3, dtype=torch.int64), 4, 2, 4, 2), names("p_cmp")),
    ("topn_positions_past_blocks", lambda: topn_blocks(SCORES, LP, N, positions=torch.arange(2 * LP) + 200),
     names("positions")),
    ("topn_positions_one_past", lambda: topn_blocks(SCORES, LP, N, positions=torch.arange(2 * LP) + 1),
     names("positions")),
    ("topn_positions_negative", lambda: topn_blocks(SCORES, LP, N, positions=torch.arange(2 * LP) - 1),
     names("positions")),
    ("topn_positions_float", lambda: topn_blocks(SCORES, LP, N, positions=torch.arange(2 * LP, dtype=torch.float64)),
     names("positions")),
    ("topn_positions_bool", lambda: topn_blocks(SCORES, LP, N, positions=torch.ones(2 * LP, dtype=torch.bool)),
     names("positions")),
    ("topn_positions_length", lambda: topn_blocks(SCORES, LP, N, positions=torch.arange(2 * LP - 1)),
     names("positions")),
    ("topn_positions_batch", lambda: topn_blocks(SCORES, LP, N, positions=torch.arange(2 * LP).expand(2, -1)),
     names("positions")),
    ("topn_positions_meta", lambda: topn_blocks(SCORES, LP, N, positions=torch.arange(2 * LP, device=META)),
     names("positions")),
    *((f"group_reduce_num_kv_heads={v}", lambda v=v: group_reduce(torch.rand(1, T, HQ, 3, dtype=torch.float64), v),
       names("num_kv_heads")) for v in (0, -2, 2.0)),
    *((f"num_compressed_blocks{args}", lambda args=args: num_compressed_blocks(*args), names(name))
      for args, name in (((10, 4, 0), "block_stride"), ((10, 0, 2), "block_size"), ((10, -4, 2), "block_size"),
                         ((-1, 4, 2), "seq_len"), ((10.0, 4, 2), "seq_len"), ((math.nan, 4, 2), "seq_len"),
                         ((True, 4, 2), "seq_len"), ((10, 4, 2.0), "block_stride"), ((10, 4, True), "block_stride"))),
    *((f"num_selection_blocks{args}", lambda args=args: num_selection_blocks(*args), names(name))
      for args, name in (((10, 0), "sel_block_size"), ((10, -4), "sel_block_size"), ((-1, 4), "seq_len"),
                         ((10.5, 4), "seq_len"), ((math.nan, 4), "seq_len"), ((10, True), "sel_block_size"))),
]


@pytest.mark.parametrize(("case", "fn", "pattern"), SELECTION_CASES, ids=[c[0] for c in SELECTION_CASES])
def test_selection_and_count_arguments(case, fn, pattern):
    with pytest.raises(NSAInputError, match=pattern):
        fn()


def test_selection_and_count_edges_pass():
    """The last position of the last block, batch-1 and int32 positions, zero counts."""
    last = torch.arange(2 * LP)
    assert torch.equal(topn_blocks(SCORES, LP, N, positions=last[None].to(torch.int32)), topn_blocks(SCORES, LP, N))
    assert map_cmp_to_sel(torch.rand(2, 3, dtype=torch.float64), 4, 2, 4, 0).shape == (2, 0)
    assert (num_compressed_blocks(0, 4, 2), num_selection_blocks(0, 4), num_selection_blocks(9, 4)) == (0, 0, 3)


# ---------------------------------------------------------------------------------------------
# CompressPool's sizes: hidden=0 fell back to 2 * head_dim, zero / non-dividing sizes were accepted

POOL_CASES = [
    ({"hidden": 0}, "hidden"), ({"hidden": -3}, "hidden"), ({"hidden": 4.0}, "hidden"),
    ({"head_dim": 0}, "head_dim"), ({"head_dim": -4}, "head_dim"),
    ({"block_size": 0}, "block_size"), ({"block_size": -16}, "block_size"),
    ({"block_stride": 0}, "block_stride"), ({"block_stride": -8}, "block_stride"),
    ({"block_stride": 5}, "block_stride"),  # does not divide block_size 16
]


@pytest.mark.parametrize("kind", ["mlp", "mean"])
@pytest.mark.parametrize(("change", "name"), POOL_CASES, ids=[str(c[0]) for c in POOL_CASES])
def test_compress_pool_sizes(change, name, kind):
    with pytest.raises(NSAInputError, match=names(name)):
        CompressPool(**{"head_dim": 4, "block_size": 16, "block_stride": 8, "kind": kind, **change})


def test_compress_pool_hidden_none_is_twice_head_dim():
    assert CompressPool(4, 16, 8).mlp[0].out_features == 8
    assert CompressPool(4, 16, 8, hidden=3).mlp[0].out_features == 3
