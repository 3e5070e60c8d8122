"""Causality under non-finite inputs (issue 10, item 2; the rule of nsa/nonfinite.py).

A NaN, +inf or -inf planted at later positions (a random t0, random entries of a random subset of
the positions >= t0) of any input of any op, or of x for NSAAttention, must

- leave every output row < t0 bitwise equal (torch.equal) to the run where those entries hold their
  finite values, and the gradients of a weighted sum of those rows bitwise equal too;
- turn NaN exactly the rows that can see it under the op's own visibility rule, every other row
  finite (garbage is never silently made finite). The expected rows are built here from NSA.md with
  dense masks (nothing from nsa): compressed block i is seen by query t iff i*d + l - 1 <= t, the
  window of t is max(0, t-w+1)..t, the selection reads the tokens <= t of the group's blocks; a key
  or value vector reaches the G query heads of its group, a query or gate vector only its own row.

Decode: through the cache (any chunking, token by token), with the torch step and the Triton kernel
(Triton's interpreter on the CPU), a non-finite token leaves earlier outputs and other sequences
bitwise unchanged and poisons the rows prefill poisons; ragged padding and stale cache rows beyond a
sequence's length holding NaN / inf change nothing at all.

"Bitwise" is the right bar: the library replaces non-finite entries by zero before any arithmetic,
and every replaced entry only meets probabilities that are exactly 0 (or upstream gradients that
are exactly 0), so no rounding can differ between the two runs.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import pytest
import torch
from conftest import BLOCK_CONFIGS, F64, TOL64, Shape, make_raw_inputs, shapes
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import ref_candidate_blocks, ref_compress_mean, ref_forced_blocks, ref_num_cmp, ref_num_sel

from nsa import (
    NSAAttention,
    NSAConfig,
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
from nsa.dispatch import elementwise_kernel_fits
from nsa.kernels import rows as row_passes
from nsa.kernels.rows import nsa_nonfinite_rows_triton
from nsa.nonfinite import (
    compressed_nonfinite_rows,
    nsa_nonfinite_rows,
    selected_nonfinite_rows,
    window_nonfinite_rows,
)

F32 = torch.float32
BAD_VALUES = (float("nan"), float("inf"), float("-inf"))
NSA_INPUTS = ["q", "k_cmp", "v_cmp", "k_sel", "v_sel", "k_win", "v_win", "gates"]


# ----------------------------------------------------------------------------------------------
# planting


@st.composite
def plants(draw) -> dict:
    """Where to plant: t0 as a fraction of T, the share of entries planted at positions >= t0, a seed."""
    return {"frac": draw(st.floats(0.0, 0.99)), "density": draw(st.sampled_from([0.02, 0.3])),
            "seed": draw(st.integers(0, 2**31 - 1))}


def plant(x: torch.Tensor, first: int, seed: int, density: float) -> torch.Tensor:
    """Copy of x [B, N, ...] with NaN / +inf / -inf in random entries at positions >= first (at least
    one entry when first < N)."""
    y = x.detach().clone()
    if first >= x.shape[1]:
        return y
    gen = torch.Generator().manual_seed(seed)
    where = torch.rand(x.shape, generator=gen, dtype=F64) < density
    where[:, :first] = False
    one = [int(torch.randint(size, (1,), generator=gen)) for size in x.shape]
    one[1] = first + int(torch.randint(x.shape[1] - first, (1,), generator=gen))
    where[tuple(one)] = True
    values = torch.tensor(BAD_VALUES, dtype=x.dtype)[torch.randint(3, x.shape, generator=gen)]
    y[where] = values[where]
    return y


# ----------------------------------------------------------------------------------------------
# expected rows, from NSA.md (dense masks)


def bad_vectors(*xs: torch.Tensor) -> torch.Tensor:
    """bool [B, N, H]: the vectors (last dim) of any of xs [B, N, H, D] holding a NaN or inf."""
    out = torch.zeros(xs[0].shape[:3], dtype=torch.bool)
    for x in xs:
        out |= ~torch.isfinite(x).all(-1)
    return out


def reaches_heads(sees_kv: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """[B, T, Hkv] -> [B, T, HQ] (query head h reads KV head h // G), or-ed with q's own bad rows."""
    group = q.shape[2] // sees_kv.shape[2]
    return sees_kv.repeat_interleave(group, dim=2) | bad_vectors(q)


def sees_through(mask: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """mask [B|1, T, N] (query t reads key n), bad [B, N, Hkv] -> [B, T, Hkv]: reads a bad vector."""
    return (mask[..., None] & bad[:, None]).any(dim=2)


def expected_cmp(q, k_cmp, v_cmp, l: int, d: int) -> torch.Tensor:
    t = torch.arange(q.shape[1])[:, None]
    visible = torch.arange(k_cmp.shape[1])[None, :] * d + l - 1 <= t
    return reaches_heads(sees_through(visible[None], bad_vectors(k_cmp, v_cmp)), q)


def expected_win(q, k, v, w: int) -> torch.Tensor:
    t = torch.arange(q.shape[1])
    distance = t[:, None] - t[None, :]
    return reaches_heads(sees_through(((distance >= 0) & (distance < w))[None], bad_vectors(k, v)), q)


def expected_sel(q, k, v, block_indices: torch.Tensor, lp: int) -> torch.Tensor:
    seq_len = q.shape[1]
    token_block = torch.arange(seq_len) // lp
    # [B, T, Hkv, T]: token s is read by (t, g) iff its block is one of the group's and s <= t
    chosen = (block_indices[..., None, :] == token_block[:, None]).any(-1)
    chosen &= torch.ones(seq_len, seq_len, dtype=torch.bool).tril()[None, :, None]
    bad = bad_vectors(k, v).transpose(1, 2)[:, None]  # [B, 1, Hkv, T]
    return reaches_heads((chosen & bad).any(-1), q)


def expected_nsa(x: dict, block_indices: torch.Tensor, s: Shape) -> torch.Tensor:
    return (expected_cmp(x["q"], x["k_cmp"], x["v_cmp"], s.l, s.d)
            | expected_sel(x["q"], x["k_sel"], x["v_sel"], block_indices, s.lp)
            | expected_win(x["q"], x["k_win"], x["v_win"], s.w)
            | bad_vectors(x["gates"]))


# ----------------------------------------------------------------------------------------------
# assertions


def assert_rows(bad_out: torch.Tensor, clean_out: torch.Tensor, expected: torch.Tensor, t0: int, *,
                unseen_equal: bool) -> None:
    """bad_out [B, T, ..., D]: NaN exactly in the expected rows, finite elsewhere; rows < t0 (and, when
    unseen_equal, every row that sees nothing non-finite) bitwise equal to the clean run's."""
    assert not expected[:, :t0].any(), "a row before t0 cannot see a planted entry"
    assert torch.equal(bad_out.isnan().all(-1), expected), "poisoned rows differ from the visibility rule"
    assert torch.isfinite(bad_out[~expected]).all(), "a row that sees no non-finite input is not finite"
    assert torch.equal(bad_out[:, :t0], clean_out[:, :t0]), "a row before t0 changed"
    if unseen_equal:
        assert torch.equal(bad_out[~expected], clean_out[~expected]), "a row that sees nothing changed"


def assert_valid_selection(block_indices: torch.Tensor, lp: int, num_blocks: int) -> None:
    """Every row (poisoned ones included): ascending unique blocks then -1, the forced blocks, no
    future or incomplete block, and as many blocks as the rule allows."""
    n = block_indices.shape[-1]
    rows = itertools.product(*(range(size) for size in block_indices.shape[:3]))
    for (b, t, g), row in zip(rows, block_indices.flatten(0, 2).tolist(), strict=True):
        valid = [j for j in row if j != -1]
        forced = set(ref_forced_blocks(t, lp))
        allowed = forced | set(ref_candidate_blocks(t, num_blocks, lp))
        where = f"(b={b}, t={t}, g={g}): {row}"
        assert row == valid + [-1] * (n - len(valid)) and valid == sorted(set(valid)), where
        assert forced <= set(valid) <= allowed and len(valid) == min(n, len(allowed)), where


def run_with_grads(fn, inputs: dict, t0: int, seed: int) -> tuple[list[torch.Tensor], dict]:
    """fn(**inputs) -> list of outputs [B, T, ...]; returns them (detached) and the gradients of a
    random weighted sum of their rows < t0 (non-finite entries, such as lse = -inf on rows that see
    nothing, left out) with respect to every floating input."""
    leaves = {n: x.detach().clone().requires_grad_(x.is_floating_point()) for n, x in inputs.items()}
    outs = fn(**leaves)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((torch.where(torch.isfinite(o[:, :t0]), o[:, :t0], 0)
                * torch.randn(o[:, :t0].shape, generator=gen, dtype=F64).to(o.dtype)).sum() for o in outs)
    assert isinstance(loss, torch.Tensor)  # fn returns at least one output
    floats = [n for n, x in leaves.items() if x.requires_grad]
    grads = (torch.autograd.grad(loss, [leaves[n] for n in floats], allow_unused=True) if loss.requires_grad
             else [None] * len(floats))  # e.g. no query sees a compressed block: o = 0 for every row
    return [o.detach() for o in outs], {
        n: torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(floats, grads, strict=True)
    }


def assert_same_finite_grads(bad: dict, clean: dict) -> None:
    """Gradients are finite everywhere and bitwise equal to the clean run's: rows < t0 cannot see a
    later position, so both runs give it exactly zero gradient and everything else is unchanged."""
    for name, grad in bad.items():
        assert torch.isfinite(grad).all(), f"non-finite gradient for {name}"
        assert torch.equal(grad, clean[name]), f"gradient for {name} changed"


def case_inputs(s: Shape, dtype: torch.dtype) -> dict:
    raw = make_raw_inputs(s)
    x = {name: raw[name] for name in ("q", "k_sel", "v_sel", "k_win", "v_win", "gates")}
    x["k_cmp"] = ref_compress_mean(raw["k_c"], s.l, s.d)
    x["v_cmp"] = ref_compress_mean(raw["v_c"], s.l, s.d)
    return {name: val.to(dtype) for name, val in x.items()}


def first_later_position(name: str, t0: int, s: Shape) -> int:
    """The first position of input `name` that rows < t0 cannot see: t0, or the first compressed
    block that query t0 - 1 does not see."""
    return ref_num_cmp(t0, s.l, s.d) if name in ("k_cmp", "v_cmp") else t0


def planted(x: dict, names, t0: int, s: Shape, p: dict) -> dict:
    return {name: plant(val, first_later_position(name, t0, s), p["seed"] + i, p["density"])
            if name in names else val for i, (name, val) in enumerate(x.items())}


def draw_t0(s: Shape, p: dict) -> int:
    return int(p["frac"] * s.T)


DTYPES = st.sampled_from([F64, F32])


# ----------------------------------------------------------------------------------------------
# the whole-sequence row flags of nsa.nonfinite (used by the naive twins and by fused kernels)


NSA_ROWS = {"torch": nsa_nonfinite_rows, "kernels": nsa_nonfinite_rows_triton}  # kernels: interpreted


@settings(max_examples=80)  # cheap (no attention): explore sparse and dense plantings widely
@given(shapes(), plants())
def test_whole_sequence_row_flags(s: Shape, p: dict):
    t0, x = draw_t0(s, p), case_inputs(s, F64)
    bad = planted(x, NSA_INPUTS, t0, s, p)
    indices = random_block_indices(s, p["seed"])
    assert torch.equal(compressed_nonfinite_rows(bad["q"], bad["k_cmp"], bad["v_cmp"], s.l, s.d),
                       expected_cmp(bad["q"], bad["k_cmp"], bad["v_cmp"], s.l, s.d))
    assert torch.equal(window_nonfinite_rows(bad["q"], bad["k_win"], bad["v_win"], s.w),
                       expected_win(bad["q"], bad["k_win"], bad["v_win"], s.w))
    assert torch.equal(selected_nonfinite_rows(bad["q"], bad["k_sel"], bad["v_sel"], indices, s.lp),
                       expected_sel(bad["q"], bad["k_sel"], bad["v_sel"], indices, s.lp))
    args: tuple[Any, ...] = (*(bad[n] for n in NSA_INPUTS), indices)
    flags = nsa_nonfinite_rows(*args, block_size=s.l, block_stride=s.d, sel_block_size=s.lp, window_size=s.w)
    assert torch.equal(flags, expected_nsa(bad, indices, s))


def _in_nan_buffer(x: torch.Tensor, sets: int = 3) -> torch.Tensor:
    """x [B, N, H, D] as the middle set of a [B, N, sets, H, D] buffer whose other sets are NaN, as NSAAttention's
    projections hand out their selection and window keys and values: a pass that reads anything but x's own
    vectors flags rows that the rule does not."""
    buffer = torch.full((*x.shape[:2], sets, *x.shape[2:]), float("nan"), dtype=x.dtype)
    buffer[:, :, sets // 2] = x
    return buffer[:, :, sets // 2]


@settings(max_examples=40)
@given(shapes(groups=(1, 3, 4)), plants(), st.sets(st.sampled_from(NSA_INPUTS), min_size=1), st.booleans(),
       st.sampled_from([torch.int32, torch.long]),
       st.sampled_from([(row_passes.GUARD_TOKENS, row_passes.GUARD_HEADS), (16, 2)]), st.booleans())
def test_whole_sequence_row_flags_on_the_kernels(s: Shape, p: dict, names: set, shared_window: bool, index_dtype,
                                                 program: tuple[int, int], strided: bool):
    """The layer's flags on nsa.kernels.rows (prefix sums of the non-finite (key, value) pairs, counted over each
    row's compressed prefix, window and selected blocks) against the dense-mask rule, in bf16 and float32, with
    garbage in some of the inputs (one branch's edges decide), the window reading the selection's tensors (one set
    of flags for both) or its own; the row pass's programs at the default size and at 16 tokens x 2 query heads
    (several programs per group, the last one partial at G = 3); keys and values contiguous or strided views
    into buffers of NaN (``_in_nan_buffer``)."""
    defaults = row_passes.GUARD_TOKENS, row_passes.GUARD_HEADS
    t0, x = draw_t0(s, p), case_inputs(s, torch.bfloat16 if p["seed"] % 2 else F32)
    if shared_window:
        x["k_win"], x["v_win"] = x["k_sel"], x["v_sel"]
    bad = planted(x, names, t0, s, p)
    if strided:
        bad.update({name: _in_nan_buffer(bad[name]) for name in NSA_INPUTS[1:-1]})
    if shared_window:
        bad["k_win"], bad["v_win"] = bad["k_sel"], bad["v_sel"]
    indices = random_block_indices(s, p["seed"])
    row_passes.GUARD_TOKENS, row_passes.GUARD_HEADS = program
    try:
        args: tuple[Any, ...] = (*(bad[n] for n in NSA_INPUTS), indices.to(index_dtype))
        flags = nsa_nonfinite_rows_triton(*args, block_size=s.l, block_stride=s.d, sel_block_size=s.lp,
                                          window_size=s.w)
    finally:
        row_passes.GUARD_TOKENS, row_passes.GUARD_HEADS = defaults
    assert flags.dtype == torch.bool and torch.equal(flags, expected_nsa(bad, indices, s))


@st.composite
def packed_lengths(draw) -> list[int]:
    """Lengths of 1-4 packed sequences (empty ones included), at least one token in all."""
    lengths = draw(st.lists(st.integers(0, 12), min_size=1, max_size=4))
    return lengths if sum(lengths) else [*lengths, 1]


@settings(max_examples=40)
@given(shapes(batch=(1,)), plants(), packed_lengths(), st.sampled_from(sorted(NSA_ROWS)))
def test_whole_sequence_row_flags_of_packed_sequences(s: Shape, p: dict, lengths: list[int], impl: str):
    """With cu_seqlens (B = 1 rows holding sequences one after the other, positions restarting at 0,
    k_cmp holding each sequence's compressed blocks in turn, block indices per sequence), the flags
    equal each sequence's own flags: nothing crosses a sequence boundary."""
    pieces = []
    for i, length in enumerate(lengths):
        if length:
            piece = dataclasses.replace(s, T=length, seed=s.seed + i)
            bad = planted(case_inputs(piece, F64), NSA_INPUTS, draw_t0(piece, p), piece, {**p, "seed": p["seed"] + i})
            indices = random_block_indices(piece, p["seed"] + i)
            pieces.append((bad, indices, expected_nsa(bad, indices, piece)))
    packed = {n: torch.cat([bad[n] for bad, _, _ in pieces], dim=1) for n in NSA_INPUTS}
    indices = torch.cat([idx for _, idx, _ in pieces], dim=1)
    cu_seqlens = torch.tensor([0, *itertools.accumulate(lengths)])
    args: tuple[Any, ...] = (*(packed[n] for n in NSA_INPUTS), indices)
    flags = NSA_ROWS[impl](*args, block_size=s.l, block_stride=s.d, sel_block_size=s.lp, window_size=s.w,
                           cu_seqlens=cu_seqlens)
    assert torch.equal(flags, torch.cat([expected for _, _, expected in pieces], dim=1))


# ----------------------------------------------------------------------------------------------
# functional ops and their naive twins


@given(shapes(), plants(), DTYPES, st.sets(st.sampled_from(["q", "k_cmp", "v_cmp"]), min_size=1))
def test_compressed_attention(s: Shape, p: dict, dtype: torch.dtype, names: set):
    t0, x = draw_t0(s, p), case_inputs(s, dtype)
    x = {n: x[n] for n in ("q", "k_cmp", "v_cmp")}
    bad = planted(x, names, t0, s, p)
    expected = expected_cmp(bad["q"], bad["k_cmp"], bad["v_cmp"], s.l, s.d)
    for op in (compressed_attention, naive_compressed_attention):
        def fn(q, k_cmp, v_cmp, op=op):
            return list(op(q, k_cmp, v_cmp, s.l, s.d))
        (o_bad, lse_bad), g_bad = run_with_grads(fn, bad, t0, p["seed"])
        (o_clean, lse_clean), g_clean = run_with_grads(fn, x, t0, p["seed"])
        assert_rows(o_bad, o_clean, expected, t0, unseen_equal=True)
        # lse: NaN in the same rows, otherwise bitwise unchanged (-inf where a row sees no block)
        assert torch.equal(lse_bad.isnan(), expected)
        assert torch.equal(lse_bad[~expected], lse_clean[~expected])
        assert_same_finite_grads(g_bad, g_clean)


@given(shapes(), plants(), DTYPES, st.sets(st.sampled_from(["q", "k_win", "v_win"]), min_size=1))
def test_sliding_window_attention(s: Shape, p: dict, dtype: torch.dtype, names: set):
    t0, x = draw_t0(s, p), case_inputs(s, dtype)
    x = {n: x[n] for n in ("q", "k_win", "v_win")}
    bad = planted(x, names, t0, s, p)
    expected = expected_win(bad["q"], bad["k_win"], bad["v_win"], s.w)
    for op in (sliding_window_attention, naive_sliding_window_attention):
        def fn(q, k_win, v_win, op=op):
            return [op(q, k_win, v_win, s.w)]
        (o_bad,), g_bad = run_with_grads(fn, bad, t0, p["seed"])
        (o_clean,), g_clean = run_with_grads(fn, x, t0, p["seed"])
        assert_rows(o_bad, o_clean, expected, t0, unseen_equal=True)
        assert_same_finite_grads(g_bad, g_clean)


def random_block_indices(s: Shape, seed: int) -> torch.Tensor:
    """Valid indices [B, T, Hkv, n]: per row a random set of blocks that start at or before t (ascending,
    unique), -1 padded; sometimes fewer than n."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.full((s.B, s.T, s.Hkv, s.n), -1, dtype=torch.long)
    for b in range(s.B):
        for t in range(s.T):
            for g in range(s.Hkv):
                count = int(torch.randint(1, s.n + 1, (1,), generator=gen))
                blocks = torch.randperm(t // s.lp + 1, generator=gen)[:count]
                out[b, t, g, : len(blocks)] = blocks.sort().values
    return out


@given(shapes(), plants(), DTYPES, st.sets(st.sampled_from(["q", "k_sel", "v_sel"]), min_size=1))
def test_selected_attention(s: Shape, p: dict, dtype: torch.dtype, names: set):
    t0, x = draw_t0(s, p), case_inputs(s, dtype)
    x = {n: x[n] for n in ("q", "k_sel", "v_sel")}
    bad = planted(x, names, t0, s, p)
    indices = random_block_indices(s, p["seed"])
    expected = expected_sel(bad["q"], bad["k_sel"], bad["v_sel"], indices, s.lp)
    for op in (selected_attention, naive_selected_attention):
        def fn(q, k_sel, v_sel, op=op):
            return [op(q, k_sel, v_sel, indices, s.lp)]
        (o_bad,), g_bad = run_with_grads(fn, bad, t0, p["seed"])
        (o_clean,), g_clean = run_with_grads(fn, x, t0, p["seed"])
        assert_rows(o_bad, o_clean, expected, t0, unseen_equal=True)
        assert_same_finite_grads(g_bad, g_clean)


@given(shapes(), plants(), DTYPES, st.sets(st.sampled_from(["q", "k_cmp", "lse"]), min_size=1))
def test_select_blocks(s: Shape, p: dict, dtype: torch.dtype, names: set):
    """Selection carries no output to poison: rows < t0 select the same blocks, and every row, poisoned
    or not, still selects a valid set (never a future block, never a duplicate)."""
    t0, x = draw_t0(s, p), case_inputs(s, dtype)
    _, lse = compressed_attention(x["q"], x["k_cmp"], x["v_cmp"], s.l, s.d)
    x = {"q": x["q"], "k_cmp": x["k_cmp"], "lse": lse}
    bad = planted(x, names, t0, s, p)
    kw: dict[str, Any] = {"block_size": s.l, "block_stride": s.d, "sel_block_size": s.lp, "num_selected": s.n}
    for op in (select_blocks, naive_select_blocks):
        got, clean = op(*bad.values(), **kw), op(*x.values(), **kw)
        assert torch.equal(got[:, :t0], clean[:, :t0])
        assert_valid_selection(got, s.lp, ref_num_sel(s.T, s.lp))


@given(shapes(), plants(), DTYPES, st.sets(st.sampled_from(NSA_INPUTS), min_size=1))
def test_nsa_attention(s: Shape, p: dict, dtype: torch.dtype, names: set):
    """Rows < t0 and their selections unchanged; NaN exactly where a branch or the gates see a planted
    entry (with the blocks each row selected); selections valid; gradients unchanged and finite.
    A row that sees nothing may still differ from the clean run here: another head of its group
    with a non-finite q changes the group's selection scores."""
    t0, x = draw_t0(s, p), case_inputs(s, dtype)
    bad = planted(x, names, t0, s, p)
    for op in (nsa_attention, naive_nsa_attention):
        selections: list[torch.Tensor] = []

        def fn(op=op, selections=selections, **inputs):
            result = op(*(inputs[n] for n in NSA_INPUTS), **s.kw())
            selections.append(result.block_indices)
            return [result.output]
        (o_bad,), g_bad = run_with_grads(fn, bad, t0, p["seed"])
        (o_clean,), g_clean = run_with_grads(fn, x, t0, p["seed"])
        idx_bad, idx_clean = selections
        assert_rows(o_bad, o_clean, expected_nsa(bad, idx_bad, s), t0, unseen_equal=False)
        assert torch.equal(idx_bad[:, :t0], idx_clean[:, :t0])
        assert_valid_selection(idx_bad, s.lp, ref_num_sel(s.T, s.lp))
        assert_same_finite_grads(g_bad, g_clean)


def test_triton_prefill():
    """nsa_attention(backend="triton"), the fused prefill kernels (in Triton's interpreter here), which read
    masked tiles of keys: rows < t0, their selections and every gradient bitwise as in the clean run, NaN in
    exactly the rows the rule names (the torch path's rows)."""
    s = Shape(B=1, T=24, HQ=4, Hkv=2, Dk=16, Dv=16, l=8, d=4, lp=8, n=3, w=8, seed=11)
    t0, x = 13, case_inputs(s, F32)
    bad = planted(x, NSA_INPUTS, t0, s, {"seed": 5, "density": 0.05})
    selections: list[torch.Tensor] = []

    def fn(**inputs):
        result = nsa_attention(*(inputs[n] for n in NSA_INPUTS), **s.kw(), backend="triton")
        selections.append(result.block_indices)
        return [result.output]
    (o_bad,), g_bad = run_with_grads(fn, bad, t0, 3)
    (o_clean,), g_clean = run_with_grads(fn, x, t0, 3)
    expected = expected_nsa(bad, selections[0], s)
    assert_rows(o_bad, o_clean, expected, t0, unseen_equal=False)
    assert torch.equal(selections[0][:, :t0], selections[1][:, :t0])
    assert_same_finite_grads(g_bad, g_clean)
    torch_rows = nsa_attention(*(bad[n] for n in NSA_INPUTS), **s.kw(), backend="torch").output.isnan().all(-1)
    assert torch.equal(torch_rows, expected)


# ----------------------------------------------------------------------------------------------
# NSAAttention


@st.composite
def layer_cases(draw, max_t: int = 24) -> tuple[NSAConfig, int, int]:
    l, d, lp = draw(st.sampled_from(BLOCK_CONFIGS))
    kv_heads = draw(st.sampled_from([1, 2]))
    config = NSAConfig(
        hidden_size=8, num_heads=kv_heads * draw(st.sampled_from([1, 2])), num_kv_heads=kv_heads, head_dim=4,
        head_dim_v=3, cmp_block_size=l, cmp_stride=d, sel_block_size=lp, num_selected=draw(st.integers(3, 4)),
        window_size=draw(st.integers(1, 2 * lp)), compression=draw(st.sampled_from(["mean", "mlp"])),
        compression_hidden=8, shared_kv=draw(st.booleans()), gate=draw(st.sampled_from(["sigmoid", "softmax"])),
        query_chunk_size=draw(st.sampled_from([None, 3])),
    )
    return config, draw(st.integers(1, max_t)), draw(st.integers(0, 2**31 - 1))


def make_layer(config: NSAConfig, seed: int, dtype: torch.dtype) -> NSAAttention:
    """Every parameter redrawn (~N(0, 1/fan_in); the phi MLP's zero-initialised output layer too)."""
    layer = NSAAttention(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in layer.parameters():
            param.copy_(torch.randn(param.shape, generator=gen, dtype=F64) * param.shape[-1] ** -0.5)
    return layer.to(dtype)


def rand_x(batch: int, seq_len: int, hidden: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(batch, seq_len, hidden, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


def expected_layer_rows(x: torch.Tensor, block_indices: torch.Tensor, c: NSAConfig) -> torch.Tensor:
    """bool [B, T]: output rows that see a non-finite token s <= t of x: in the window (t - s < w), in a
    selected block of any group (all heads meet in o_proj), or in a visible compressed block."""
    bad = ~torch.isfinite(x).all(-1)
    batch, seq_len = bad.shape
    l, d, lp, w = c.cmp_block_size, c.cmp_stride, c.sel_block_size, c.window_size
    out = torch.zeros(batch, seq_len, dtype=torch.bool)
    for b, s in bad.nonzero().tolist():
        for t in range(s, seq_len):
            in_window = t - s < w
            selected = bool((block_indices[b, t] == s // lp).any())
            visible_blocks = range(ref_num_cmp(t + 1, l, d))
            in_visible_block = any(i * d <= s < i * d + l for i in visible_blocks)
            out[b, t] |= in_window or selected or in_visible_block
    return out


@settings(max_examples=12)
@given(layer_cases(), plants(), DTYPES)
def test_layer_prefill_and_training(case, p: dict, dtype: torch.dtype):
    """x planted at positions >= t0: y rows < t0 bitwise unchanged, NaN exactly in the rows that see a
    planted token, the gradient w.r.t. x and every parameter gradient finite and bitwise unchanged."""
    config, seq_len, seed = case
    layer = make_layer(config, seed, dtype)
    t0 = int(p["frac"] * seq_len)
    x = rand_x(2, seq_len, config.hidden_size, seed + 1, dtype)
    bad = plant(x, t0, p["seed"], p["density"])
    runs = []
    for inputs in (bad, x):
        leaf = inputs.clone().requires_grad_(True)
        y, aux = layer(leaf, return_aux=True)
        weights = torch.randn(y[:, :t0].shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)
        layer.zero_grad()
        (y[:, :t0] * weights).sum().backward()
        param_grads = {n: torch.zeros_like(w) if w.grad is None else w.grad.clone()
                       for n, w in layer.named_parameters()}
        runs.append((y.detach(), aux.block_indices, aux.gates.detach(), leaf.grad, param_grads))
    (y_bad, idx_bad, gates_bad, gx_bad, gp_bad), (y_clean, _, gates_clean, gx_clean, gp_clean) = runs
    assert_rows(y_bad, y_clean, expected_layer_rows(bad, idx_bad, config), t0, unseen_equal=False)
    bad_tokens = ~torch.isfinite(bad).all(-1)
    assert torch.equal(gates_bad.isnan().any(-1).any(-1), bad_tokens), "aux gates: NaN exactly at non-finite tokens"
    assert gates_bad[bad_tokens].isnan().all(), "aux gates: every gate of a non-finite token is NaN"
    assert torch.equal(gates_bad[~bad_tokens], gates_clean[~bad_tokens])
    assert_same_finite_grads({"x": gx_bad, **gp_bad}, {"x": gx_clean, **gp_clean})


@settings(max_examples=10)
@given(layer_cases(max_t=1), packed_lengths(), plants(), DTYPES)
def test_layer_packed_sequences(case, lengths: list[int], p: dict, dtype: torch.dtype):
    """layer(x, cu_seqlens=cu): x of one sequence A planted at its positions >= t0 (A's own positions): NaN exactly
    in A's rows that see a planted token (the rule of test_layer_prefill_and_training, inside A alone, with A's own
    selections); A's rows < t0 and every row of every other sequence bitwise unchanged, and so are their selections
    and the gradients (w.r.t. x and every parameter, finite) of a weighted sum of all those rows. A row of A >= t0
    that sees nothing may still differ (unseen_equal=False, as in the unpacked test)."""
    config, _, seed = case
    layer = make_layer(config, seed, dtype)
    bounds = [0, *itertools.accumulate(lengths)]
    filled = [i for i, n in enumerate(lengths) if n]
    a, b = bounds[filled[p["seed"] % len(filled)]], bounds[filled[p["seed"] % len(filled)] + 1]
    t0 = int(p["frac"] * (b - a))
    x = rand_x(1, bounds[-1], config.hidden_size, seed + 1, dtype)
    bad = x.clone()
    bad[:, a:b] = plant(x[:, a:b], t0, p["seed"], p["density"])
    assert not torch.isfinite(bad[:, a + t0:b]).all() and torch.isfinite(bad[:, :a + t0]).all()
    unaffected = torch.ones(1, bounds[-1], dtype=torch.bool)
    unaffected[:, a + t0:b] = False  # A's rows >= t0: the rows the loss leaves out
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32 if p["seed"] % 2 else torch.int64)
    runs = []
    for inputs in (bad, x):
        leaf = inputs.clone().requires_grad_(True)
        y, aux = layer(leaf, return_aux=True, cu_seqlens=cu_seqlens)
        weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)
        layer.zero_grad()
        (y[unaffected] * weights[unaffected]).sum().backward()
        param_grads = {n: torch.zeros_like(w) if w.grad is None else w.grad.clone()
                       for n, w in layer.named_parameters()}
        runs.append((y.detach(), aux.block_indices, aux.gates.detach(), leaf.grad, param_grads))
    (y_bad, idx_bad, gates_bad, gx_bad, gp_bad), (y_clean, idx_clean, gates_clean, gx_clean, gp_clean) = runs
    expected = torch.zeros(1, bounds[-1], dtype=torch.bool)
    expected[:, a:b] = expected_layer_rows(bad[:, a:b], idx_bad[:, a:b], config)
    assert_rows(y_bad, y_clean, expected, a + t0, unseen_equal=False)
    assert torch.equal(y_bad[unaffected], y_clean[unaffected]), "a planted token reached another sequence"
    assert torch.equal(idx_bad[unaffected], idx_clean[unaffected]), "a planted token changed another selection"
    bad_tokens = ~torch.isfinite(bad).all(-1)
    assert torch.equal(gates_bad.isnan().any(-1).any(-1), bad_tokens), "aux gates: NaN exactly at non-finite tokens"
    assert torch.equal(gates_bad[~bad_tokens], gates_clean[~bad_tokens])
    assert_same_finite_grads({"x": gx_bad, **gp_bad}, {"x": gx_clean, **gp_clean})


# ----------------------------------------------------------------------------------------------
# decode


def append_in_cuts(layer: NSAAttention, x: torch.Tensor, cuts: list[int], static: bool) -> torch.Tensor:
    """Feed x [B, T, hidden] through a fresh cache in appends of the given sizes (summing to T)."""
    cache = layer.new_cache(x.shape[0], x.shape[1], static_shapes=static)
    outs, start = [], 0
    with torch.no_grad():
        for size in cuts:
            outs.append(layer(x[:, start:start + size], cache=cache))
            start += size
    return torch.cat(outs, dim=1)


@st.composite
def cut_lists(draw, seq_len: int) -> list[int]:
    """A partition of seq_len into appends: token by token, or random chunks."""
    if draw(st.booleans()):
        return [1] * seq_len
    cuts, left = [], seq_len
    while left:
        cuts.append(draw(st.integers(1, left)))
        left -= cuts[-1]
    return cuts


@settings(max_examples=12)
@given(layer_cases(), plants(), st.booleans(), st.data())
def test_cache_appends(case, p: dict, static: bool, data):
    """Through the cache (torch step): rows < t0 and every sequence without a planted token bitwise
    unchanged; NaN in exactly the rows prefill poisons; the finite rows equal prefill's."""
    config, seq_len, seed = case
    layer = make_layer(config, seed, F64).eval()
    t0 = int(p["frac"] * seq_len)
    x = rand_x(2, seq_len, config.hidden_size, seed + 1, F64)
    bad = plant(x, t0, p["seed"], p["density"])
    cuts = data.draw(cut_lists(seq_len))
    y_bad, y_clean = append_in_cuts(layer, bad, cuts, static), append_in_cuts(layer, x, cuts, static)
    with torch.no_grad():
        y_prefill = layer(bad)
    poisoned = y_prefill.isnan().all(-1)
    assert_rows(y_bad, y_clean, poisoned, t0, unseen_equal=False)
    for b in range(2):
        if torch.isfinite(bad[b]).all():
            assert torch.equal(y_bad[b], y_clean[b]), "a non-finite token reached another sequence"
    torch.testing.assert_close(y_bad[~poisoned], y_prefill[~poisoned], **TOL64)


@settings(max_examples=8)
@given(layer_cases(max_t=12), st.integers(0, 2**31 - 1), st.booleans())
def test_ragged_padding_holding_nonfinite_values(case, seed: int, static: bool):
    """Right padding of ragged appends full of NaN / +-inf gives bitwise the outputs and cache rows of
    padding full of zeros (a valid token may be non-finite too: it poisons its own sequence only)."""
    config, chunk, layer_seed = case
    layer = make_layer(config, layer_seed, F64).eval()
    gen = torch.Generator().manual_seed(seed)
    appends = [(chunk, torch.randint(0, chunk + 1, (3,), generator=gen).tolist()) for _ in range(3)]
    xs = [rand_x(3, size, config.hidden_size, seed + i, F64) for i, (size, _) in enumerate(appends)]
    xs[0][0, 0, 0] = float("nan")  # sequence 0's first token (if valid) poisons sequence 0
    runs = []
    for filler in ("zeros", "garbage"):
        cache = layer.new_cache(3, 3 * chunk, static_shapes=static)
        ys = []
        with torch.no_grad():
            for i, ((_, valid), x) in enumerate(zip(appends, xs, strict=True)):
                x = x.clone()
                for b in range(3):
                    padding = x[b:b + 1, valid[b]:]
                    x[b:b + 1, valid[b]:] = (torch.zeros_like(padding) if filler == "zeros"
                                             else plant(torch.zeros_like(padding), 0, seed + 7 * i + b, 0.5))
                ys.append(layer(x, cache=cache, num_valid=valid))
        runs.append((ys, cache))
    (ys, cache), (ys2, cache2) = runs
    for y, y2 in zip(ys, ys2, strict=True):
        assert torch.equal(y.isnan(), y2.isnan()) and torch.equal(y.nan_to_num(), y2.nan_to_num())
    for name in ("k_sel", "v_sel", "k_win", "v_win", "k_cmp", "v_cmp", "k_cmp_raw", "v_cmp_raw"):
        a, b = getattr(cache, name)[:, :-1], getattr(cache2, name)[:, :-1]  # the discard row may differ
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()), name
    for b in (1, 2):
        assert all(torch.isfinite(y[b]).all() for y in ys), "sequence 0's NaN reached another sequence"


def poison_stale_rows(cache, value: float) -> None:
    """Write `value` into every cache row no query of the next append may read: raw rows at positions >=
    length, compressed blocks not emitted yet, ring slots of negative positions, the discard rows."""
    c = cache.config
    with torch.no_grad():
        for b, length in enumerate(cache.lengths):
            num_cmp = ref_num_cmp(length, c.cmp_block_size, c.cmp_stride)
            for k, v, first in ((cache.k_sel, cache.v_sel, length), (cache.k_cmp, cache.v_cmp, num_cmp),
                                (cache.k_win, cache.v_win, min(length, c.window_size)),
                                (cache.k_cmp_raw, cache.v_cmp_raw, min(length, c.cmp_block_size))):
                k[b, first:] = value
                v[b, first:] = value
                k[b, -1] = value  # discard rows
                v[b, -1] = value


STALE_CONFIG: dict[str, Any] = dict(hidden_size=16, num_heads=4, num_kv_heads=2, head_dim=8, head_dim_v=8,
                                    cmp_block_size=4, cmp_stride=2, sel_block_size=4, num_selected=3, window_size=6,
                                    compression="mlp", compression_hidden=8)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_stale_cache_rows_change_nothing(backend: str, static: bool):
    """NaN / +inf in every cache row beyond a sequence's length (and in the discard rows) leaves the
    next decode steps bitwise unchanged, on the torch step and on the Triton kernel (which must not
    load a masked slot); the two sequences have different lengths (a ragged prompt)."""
    layer = make_layer(NSAConfig(**STALE_CONFIG, backend=backend), 5, F32).eval()
    prompt = rand_x(2, 5, 16, 6, F32)
    steps = rand_x(2, 2, 16, 7, F32)
    outs = []
    for value in (None, float("nan"), float("inf")):
        cache = layer.new_cache(2, 16, static_shapes=static)
        with torch.no_grad():
            layer(prompt, cache=cache, num_valid=[5, 3])
            if value is not None:
                poison_stale_rows(cache, value)
            outs.append(torch.cat([layer(steps[:, i:i + 1], cache=cache) for i in range(2)], dim=1))
    assert torch.isfinite(outs[0]).all()
    assert torch.equal(outs[1], outs[0]) and torch.equal(outs[2], outs[0])


def test_triton_decode_poisons_the_rows_the_torch_step_poisons():
    """A non-finite token (in the prompt of sequence 0, then in a decode step of sequence 1) reaches, through
    the Triton kernel, exactly the rows it reaches through the torch step; sequence 1 before its bad token
    and every finite row agree with the torch step (float32 rounding)."""
    torch_layer = make_layer(NSAConfig(**STALE_CONFIG, backend="torch"), 3, F32).eval()
    triton_layer = make_layer(NSAConfig(**STALE_CONFIG, backend="triton"), 3, F32).eval()
    x = rand_x(2, 10, 16, 4, F32)
    x[0, 3, 5] = float("nan")
    x[1, 8, 0] = float("-inf")
    ys = []
    for layer in (torch_layer, triton_layer):
        cache = layer.new_cache(2, 10)
        with torch.no_grad():
            outs = [layer(x[:, :6], cache=cache)] + [layer(x[:, t:t + 1], cache=cache) for t in range(6, 10)]
        ys.append(torch.cat(outs, dim=1))
    y_torch, y_triton = ys
    poisoned = y_torch.isnan().all(-1)
    assert poisoned[0, 3:].all() and not poisoned[0, :3].any()
    assert poisoned[1, 8:].all() and not poisoned[1, :8].any()
    assert torch.equal(y_triton.isnan().all(-1), poisoned) and torch.isfinite(y_triton[~poisoned]).all()
    torch.testing.assert_close(y_triton[~poisoned], y_torch[~poisoned], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# the row passes on the GPU (nsa.kernels.rows, in Triton's interpreter here) and the guard's gradient


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, F32])
@pytest.mark.parametrize("row_len", [1, 20, 130, 4100])  # 4100: two column steps of 4096
def test_row_kernels_match_an_elementwise_reference(dtype, row_len):
    """nonfinite_rows_triton flags exactly the vectors holding a NaN or +-inf (an elementwise check in float64):
    planted alone and together, beside rows of the dtype's largest finite values, -0 and the smallest subnormal
    (not flagged); fill_rows_triton replaces exactly those vectors by NaN or zeros and copies every other one."""
    from nsa.kernels.rows import fill_rows_triton, nonfinite_rows_triton

    gen = torch.Generator().manual_seed(row_len)
    x = plant(torch.randn(2, 9, 3, row_len, generator=gen, dtype=F64), 0, seed=row_len, density=0.01).to(dtype)
    info = torch.finfo(dtype)
    x[0, 0], x[0, 1], x[1, 0] = info.max, -info.max, -0.0
    x[1, 1, :, -1] = info.smallest_normal / 2
    want = (~torch.isfinite(x.double())).any(-1)
    got = nonfinite_rows_triton(x)
    assert got.dtype == torch.bool and torch.equal(got, want) and want.any() and not want.all()
    for fill_nan, value in ((True, float("nan")), (False, 0.0)):
        filled = fill_rows_triton(x, want, fill_nan)
        expected = x.double().masked_fill(want[..., None], value)
        torch.testing.assert_close(filled.double(), expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("kernel_from", [0, 210, 211], ids=["kernel", "at_threshold", "below_threshold"])
def test_poison_rows_on_the_row_kernels_is_torch_where(monkeypatch, kernel_from):
    """poison_rows on the eager GPU path (forced onto the interpreter here), whether the output is large enough for
    nsa.kernels.rows' pass (POISON_KERNEL_MIN_ELEMENTS; 210 elements here) or takes masked_fill, against
    torch.where: NaN rows forward, flags broadcast from [B, T, 1], and zero gradient in exactly those rows."""
    import nsa.nonfinite as nonfinite

    launches = []
    monkeypatch.setattr(nonfinite, "_row_kernels_apply", elementwise_kernel_fits)
    monkeypatch.setattr(nonfinite, "POISON_KERNEL_MIN_ELEMENTS", kernel_from)
    fill = row_passes.fill_rows_triton

    def spy(*args, **kw):
        launches.append(1)
        return fill(*args, **kw)

    monkeypatch.setattr(row_passes, "fill_rows_triton", spy)
    gen = torch.Generator().manual_seed(0)
    out = torch.randn(2, 7, 3, 5, generator=gen, requires_grad=True)
    rows = torch.rand(2, 7, 1, generator=gen) < 0.3
    got = nonfinite.poison_rows(out, rows)
    want = torch.where(rows[..., None], torch.tensor(float("nan")), out)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    weights = torch.randn(out.shape, generator=gen)
    (grad,) = torch.autograd.grad(torch.where(got.isnan(), 0, got * weights).sum(), out)
    assert torch.equal(grad, torch.where(rows[..., None], 0.0, weights)) and rows.any()
    assert len(launches) == (2 if out.numel() >= kernel_from else 0)  # forward and backward, or neither


def test_nsa_rows_take_the_row_kernels_where_they_apply(monkeypatch):
    """nsa_nonfinite_rows goes to nsa.kernels.rows when every input qualifies (eager CUDA; forced onto the interpreter
    here), packed sequences and keys / values as strided views (NSAAttention's) included, and keeps the PyTorch
    form where one does not (an empty k_cmp: T < l; a strided q, whose rows the kernel indexes as contiguous)."""
    import nsa.nonfinite as nonfinite

    cases = []
    for seq_len, lengths, strided in ((30, None, "kv"), (30, (11, 19), ""), (5, None, ""), (30, None, "q")):
        s = Shape(B=1, T=seq_len, HQ=4, Hkv=2, Dk=8, Dv=4, l=8, d=4, lp=8, n=3, w=6, seed=seq_len)
        p = {"frac": 0.4, "density": 0.3, "seed": 7}
        bad = planted(case_inputs(s, F32), NSA_INPUTS, draw_t0(s, p), s, p)
        views = NSA_INPUTS[1:-1] if strided == "kv" else ("q",) if strided else ()
        bad.update({name: _in_nan_buffer(bad[name]) for name in views})
        indices = random_block_indices(s, 7) if lengths is None else torch.cat(
            [random_block_indices(dataclasses.replace(s, T=n), 7) for n in lengths], dim=1)
        kwargs: dict[str, Any] = {
            "block_size": s.l, "block_stride": s.d, "sel_block_size": s.lp, "window_size": s.w,
            "cu_seqlens": None if lengths is None else torch.tensor([0, *itertools.accumulate(lengths)])}
        args = (*(bad[n] for n in NSA_INPUTS), indices)
        cases.append((args, kwargs, nsa_nonfinite_rows(*args, **kwargs)))
    calls, kernels = [], row_passes.nsa_nonfinite_rows_triton
    monkeypatch.setattr(nonfinite, "_row_kernels_apply", elementwise_kernel_fits)

    def spy(*a, **kw):
        calls.append(kw["cu_seqlens"])
        return kernels(*a, **kw)

    monkeypatch.setattr(row_passes, "nsa_nonfinite_rows_triton", spy)
    for args, kwargs, want in cases:
        assert torch.equal(nonfinite.nsa_nonfinite_rows(*args, **kwargs), want) and want.any()
    assert len(calls) == 2 and calls[0] is None and calls[1] is not None


def test_guard_gradient_at_replaced_entries_is_exactly_zero(monkeypatch):
    """The fused path (backend="triton", the interpreter) with NaN / inf anywhere, early positions included, and
    a loss over every finite output row: the gradients are finite, exactly zero at every replaced entry, and
    bitwise those of the guard whose sanitising masks the gradient (finite_or_zero's own backward), so passing
    the gradient through (finite_or_zero_under_poison) changes nothing."""
    import nsa.nonfinite as nonfinite

    s = Shape(B=1, T=24, HQ=4, Hkv=2, Dk=16, Dv=16, l=8, d=4, lp=8, n=3, w=8, seed=12)
    first = {"k_cmp": 3, "v_cmp": 3}  # of 5 blocks: an early bad compressed block poisons every later row
    bad = {name: plant(value, first.get(name, 0), seed=i, density=0.002)
           for i, (name, value) in enumerate(case_inputs(s, F32).items())}
    weights = torch.randn(1, 24, 4, 16, generator=torch.Generator().manual_seed(1))

    def grads() -> dict:
        leaves = {name: value.clone().requires_grad_() for name, value in bad.items()}
        out = nsa_attention(*(leaves[n] for n in NSA_INPUTS), **s.kw(), backend="triton").output
        assert out.isnan().any() and not out.isnan().all()
        loss = torch.where(out.isnan(), 0, out * weights).sum()
        return dict(zip(NSA_INPUTS, torch.autograd.grad(loss, [leaves[n] for n in NSA_INPUTS]), strict=True))

    passed = grads()
    monkeypatch.setattr(nonfinite, "finite_or_zero_under_poison",
                        lambda *xs: tuple(nonfinite.finite_or_zero(x) for x in xs))
    masked = grads()
    for name in NSA_INPUTS:
        assert torch.isfinite(passed[name]).all(), name
        assert not passed[name][~torch.isfinite(bad[name])].any(), name
        assert torch.equal(passed[name], masked[name]), name
