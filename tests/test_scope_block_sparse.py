"""Block-sparse attention (scope/block_sparse_attention.py, Triton kernels in scope/kernels/block_sparse.py)
against this file's own float64 dense reference, written from the op's contract only:

    query block qb attends the key blocks kv_indices[b, h, qb, :kv_num_blocks[b, h, qb]] (entries past the
    count are ignored), with a token-level causal mask inside them; GQA reads kv head h // (H // Hkv);
    out_i = sum_j softmax_j(scale * q_i . k_j) v_j over visible j, scale = Dqk ** -0.5 by default; a row
    with no visible key is exactly 0.

On this CPU machine backend="triton" runs in Triton's interpreter (conftest sets TRITON_INTERPRET=1), so
those cases are few and tiny; the torch backend is cheap and also covered by a hypothesis property test.

Tolerance rule (float32 inputs): the same reference math run in float32 on the same inputs has an error
against float64 (its "own" error); the op may be off by at most 4x that plus an absolute floor of 1e-7
(~float32 eps on O(1) values; for tensors whose own error happens to be ~0). For bfloat16 / float16 inputs
the own error is the one of a reference that computes logits and softmax in float32, rounds the
probabilities to the input dtype before the PV product (what a flash-style kernel does) and rounds the
output to it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from scope.block_sparse_attention import (
    block_sparse_attention,
    block_sparse_attention_reference,
    transpose_block_lists,
)
from scope.errors import ScopeInputError

F64 = torch.float64
OWN_FACTOR = 4.0  # allowed multiple of the reference's own low-precision error
ATOL_FLOOR = 1e-7  # absolute floor, for tensors whose own error is ~0


# ----------------------------------------------------------------------------------------------------------
# Own reference (from the contract; never the package's helpers)
# ----------------------------------------------------------------------------------------------------------


def ref_block_allowed(kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, num_kv_blocks: int) -> torch.Tensor:
    """bool [B, H, QB, KB]: key block kb is listed for query block qb (only the first kv_num_blocks entries)."""
    batch, heads, q_blocks, _ = kv_indices.shape
    allowed = torch.zeros(batch, heads, q_blocks, num_kv_blocks, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            for qb in range(q_blocks):
                for n in range(int(kv_num_blocks[b, h, qb])):
                    allowed[b, h, qb, int(kv_indices[b, h, qb, n])] = True
    return allowed


def ref_visibility(kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, seq_len: int, block: int) -> torch.Tensor:
    """bool [B, H, T, T]: query i sees key j iff block(j) is listed for block(i) and j <= i."""
    allowed = ref_block_allowed(kv_num_blocks, kv_indices, seq_len // block)
    pos = torch.arange(seq_len)
    token_allowed = allowed[:, :, pos // block][:, :, :, pos // block]
    return token_allowed & (pos[None, :] <= pos[:, None])


def ref_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor,
                  scale: float | None = None, prob_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dense masked attention in the inputs' dtype. GQA: query head h reads kv head h // (H // Hkv).
    Rows with no visible key give 0 (and zero gradients). prob_dtype rounds the probabilities before PV."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = scale * (q @ k.transpose(-1, -2))
    any_visible = visible.any(-1, keepdim=True)
    logits = torch.where(visible, logits, -math.inf)
    logits = torch.where(any_visible, logits, 0.0)  # empty rows: finite logits, zeroed below
    probs = torch.softmax(logits, dim=-1) * visible
    if prob_dtype is not None:
        probs = probs.to(prob_dtype).to(v.dtype)
    return probs @ v


# ----------------------------------------------------------------------------------------------------------
# Random problems
# ----------------------------------------------------------------------------------------------------------


def make_lists(batch: int, heads: int, q_blocks: int, width: int, seed: int, *, garbage: str = "random",
               empty: tuple[tuple[int, int, int], ...] = (), shuffle: bool = True,
               drop_diagonal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (b, h, qb): the diagonal block plus a random number of distinct past blocks, in random order
    (the contract does not require sorted lists). Entries past kv_num_blocks are -1 or random garbage that
    includes in-range, unlisted block ids (so reading them would change the output). (b, h, qb) in `empty`
    get an empty list. drop_diagonal: the diagonal is left out of about half of the lists (allowed: listed
    blocks need only be in [0, qb]; such a list may end up empty)."""
    gen = torch.Generator().manual_seed(seed)
    if garbage == "random":
        idx = torch.randint(-3, 3 * q_blocks + 3, (batch, heads, q_blocks, width), generator=gen)
    else:
        idx = torch.full((batch, heads, q_blocks, width), -1)
    num = torch.zeros(batch, heads, q_blocks, dtype=torch.int64)
    for b in range(batch):
        for h in range(heads):
            for qb in range(q_blocks):
                if (b, h, qb) in empty:
                    continue
                n_past = int(torch.randint(0, min(width - 1, qb) + 1, (), generator=gen))
                past = torch.randperm(qb, generator=gen)[:n_past]
                blocks = torch.cat((torch.tensor([qb]), past))
                if drop_diagonal and bool(torch.randint(0, 2, (), generator=gen)):
                    blocks = blocks[1:]
                if shuffle:
                    blocks = blocks[torch.randperm(len(blocks), generator=gen)]
                idx[b, h, qb, : len(blocks)] = blocks
                num[b, h, qb] = len(blocks)
    return num.to(torch.int32), idx.to(torch.int32)


def make_qkv(batch: int, heads: int, kv_heads: int, seq_len: int, dqk: int, dv: int, seed: int,
             dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seq_len, dqk, generator=gen, dtype=F64)
    k = torch.randn(batch, kv_heads, seq_len, dqk, generator=gen, dtype=F64)
    v = torch.randn(batch, kv_heads, seq_len, dv, generator=gen, dtype=F64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def max_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    return (got.double() - expected.double()).abs().max().item()


def assert_within_own_error(name: str, got: torch.Tensor, own: torch.Tensor, exact: torch.Tensor) -> None:
    """|got - exact| <= OWN_FACTOR * |own - exact| (max norms) + ATOL_FLOOR; see the module docstring."""
    assert got.shape == exact.shape, f"{name}: shape {tuple(got.shape)} != {tuple(exact.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    own_error = max_err(own, exact)
    error = max_err(got, exact)
    bound = OWN_FACTOR * own_error + ATOL_FLOOR
    assert error <= bound, f"{name}: max error {error:.3e} > {bound:.3e} (own error {own_error:.3e})"


# (B, H, Hkv, T, block, Dqk, Dv, garbage, scale, seed, drop_diagonal): GQA groups 1, 2, 4; Dqk not a power
# of two (48 = 32 + 16, 40); Dv != Dqk; default and explicit scale; lists that leave out the diagonal block;
# block 16, 32, 64 and 128 (from 64 the kernels' dq / dk-dv tiles (32) are smaller than the block, from 128
# the forward's key tile (64) too, so a block is walked in several sub-tiles, some fully masked).
FWD_CASES = [
    (1, 2, 1, 64, 16, 16, 32, "neg1", None, 1, False),
    (2, 4, 2, 96, 32, 48, 16, "random", None, 2, False),
    (1, 2, 2, 128, 16, 40, 16, "random", 0.3, 3, True),
    (1, 4, 1, 32, 16, 32, 32, "random", None, 4, False),
    (1, 2, 1, 128, 64, 48, 16, "random", None, 5, False),
    (1, 2, 1, 256, 128, 40, 16, "random", None, 6, True),
    (1, 2, 1, 64, 16, 8, 8, "random", None, 7, False),  # head dims < 16: the kernels pad their dots to 16
]


def _case_inputs(case: tuple, dtype: torch.dtype = torch.float32) -> tuple:
    batch, heads, kv_heads, seq_len, block, dqk, dv, garbage, scale, seed, drop_diagonal = case
    q, k, v = make_qkv(batch, heads, kv_heads, seq_len, dqk, dv, seed, dtype)
    num, idx = make_lists(batch, heads, seq_len // block, width=3, seed=seed + 100, garbage=garbage,
                          drop_diagonal=drop_diagonal)
    return q, k, v, num, idx, block, scale


# ----------------------------------------------------------------------------------------------------------
# Forward parity
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", FWD_CASES)
def test_forward_matches_float64_reference(case: tuple, backend: str) -> None:
    q, k, v, num, idx, block, scale = _case_inputs(case)
    visible = ref_visibility(num, idx, q.shape[2], block)
    exact = ref_attention(q.double(), k.double(), v.double(), visible, scale)
    own = ref_attention(q, k, v, visible, scale)
    out = block_sparse_attention(q, k, v, num, idx, block=block, scale=scale, backend=backend)
    assert out.dtype == torch.float32
    assert_within_own_error(f"out[{backend}]", out, own, exact)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_list_rows_are_exactly_zero(backend: str) -> None:
    """Query blocks with kv_num_blocks == 0 (garbage in their whole index row) give exact zeros, no NaN;
    the other rows still match the reference."""
    batch, heads, kv_heads, seq_len, block = 2, 2, 1, 64, 16
    q, k, v = make_qkv(batch, heads, kv_heads, seq_len, 32, 16, seed=11)
    empty = ((0, 0, 0), (0, 1, 2), (1, 0, 3), (1, 1, 1))
    num, idx = make_lists(batch, heads, seq_len // block, 3, seed=12, garbage="random", empty=empty)
    visible = ref_visibility(num, idx, seq_len, block)
    out = block_sparse_attention(q, k, v, num, idx, block=block, backend=backend)
    assert torch.isfinite(out).all()
    for b, h, qb in empty:
        rows = out[b, h, qb * block:(qb + 1) * block]
        assert torch.equal(rows, torch.zeros_like(rows)), f"rows of empty list (b={b}, h={h}, qb={qb}) not zero"
    exact = ref_attention(q.double(), k.double(), v.double(), visible)
    assert_within_own_error(f"out[{backend}]", out, ref_attention(q, k, v, visible), exact)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_half_precision_matches_float64_reference(dtype: torch.dtype, interpreter_bf16_dot: None) -> None:
    """Own error: logits and softmax in float32 from the half inputs, probabilities rounded to the input
    dtype before PV (as the kernel does), output rounded to the input dtype."""
    q, k, v, num, idx, block, scale = _case_inputs(FWD_CASES[1], dtype=dtype)
    visible = ref_visibility(num, idx, q.shape[2], block)
    exact = ref_attention(q.double(), k.double(), v.double(), visible, scale)
    own = ref_attention(q.float(), k.float(), v.float(), visible, scale, prob_dtype=dtype).to(dtype)
    out = block_sparse_attention(q, k, v, num, idx, block=block, scale=scale, backend="triton")
    assert out.dtype == dtype
    assert_within_own_error(f"out[triton, {dtype}]", out, own, exact)


def test_auto_backend_matches_float64_reference() -> None:
    q, k, v, num, idx, block, scale = _case_inputs(FWD_CASES[3])
    visible = ref_visibility(num, idx, q.shape[2], block)
    exact = ref_attention(q.double(), k.double(), v.double(), visible, scale)
    out = block_sparse_attention(q, k, v, num, idx, block=block, scale=scale)
    assert_within_own_error("out[auto]", out, ref_attention(q, k, v, visible, scale), exact)


def test_torch_backend_float64_equals_own_reference() -> None:
    """float64 is supported by the torch backend; both sides are float64, so 1e-10 (see conftest.TOL64)."""
    q, k, v, num, idx, block, scale = _case_inputs(FWD_CASES[1], dtype=F64)
    visible = ref_visibility(num, idx, q.shape[2], block)
    out = block_sparse_attention(q, k, v, num, idx, block=block, scale=scale, backend="torch")
    assert out.dtype == F64
    torch.testing.assert_close(out, ref_attention(q, k, v, visible, scale), rtol=1e-10, atol=1e-10)
    # The public reference twin is the same function as backend="torch".
    twin = block_sparse_attention_reference(q, k, v, num, idx, block=block, scale=scale)
    torch.testing.assert_close(twin, out, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------------------------
# Backward parity
# ----------------------------------------------------------------------------------------------------------


def _grads(fn: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           cotangent: torch.Tensor) -> tuple[torch.Tensor, ...]:
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), cotangent.to(out.dtype))
    return (out.detach(), *grads)


# (B, H, Hkv, T, block, Dqk, Dv, garbage, scale, seed, drop_diagonal, pass the transposed lists explicitly)
BWD_CASES = [
    (1, 4, 2, 64, 16, 48, 16, "random", None, 21, False, True),
    (2, 2, 1, 64, 32, 40, 32, "neg1", 0.2, 22, True, False),
    (1, 2, 1, 128, 64, 32, 16, "random", None, 23, False, False),
    (1, 2, 2, 256, 128, 24, 16, "neg1", None, 24, False, True),
    (1, 2, 1, 64, 16, 12, 8, "random", None, 25, False, False),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", BWD_CASES)
def test_backward_matches_float64_reference(case: tuple, backend: str) -> None:
    """Grads of q, k, v for a random cotangent, with GQA and per-head different lists; the transposed lists
    passed explicitly (from this file's own loop, narrower than QB) or left to the op. One query block has
    an empty list."""
    batch, heads, kv_heads, seq_len, block, dqk, dv, garbage, scale, seed, drop_diagonal, explicit = case
    q, k, v = make_qkv(batch, heads, kv_heads, seq_len, dqk, dv, seed)
    q_blocks = seq_len // block
    num, idx = make_lists(batch, heads, q_blocks, 3, seed=seed + 100, garbage=garbage, empty=((0, 1, 1),),
                          drop_diagonal=drop_diagonal)
    assert not torch.equal(num[:, 0], num[:, 1]) or not torch.equal(idx[:, 0], idx[:, 1])  # per-head lists
    visible = ref_visibility(num, idx, seq_len, block)
    cotangent = torch.randn(batch, heads, seq_len, dv, generator=torch.Generator().manual_seed(seed + 7),
                            dtype=F64)
    extra: dict[str, Any] = {}
    if explicit:
        extra = dict(zip(("q_num_blocks", "q_indices"), loop_transpose(num, idx, q_blocks), strict=True))

    def op(q_: torch.Tensor, k_: torch.Tensor, v_: torch.Tensor) -> torch.Tensor:
        return block_sparse_attention(q_, k_, v_, num, idx, block=block, scale=scale, backend=backend, **extra)

    def ref(q_: torch.Tensor, k_: torch.Tensor, v_: torch.Tensor) -> torch.Tensor:
        return ref_attention(q_, k_, v_, visible, scale)

    exact = _grads(ref, q.double(), k.double(), v.double(), cotangent)
    own = _grads(ref, q, k, v, cotangent)
    got = _grads(op, q, k, v, cotangent)
    for name, g, o, e in zip(("out", "dq", "dk", "dv"), got, own, exact, strict=True):
        assert g.dtype == torch.float32, f"{name}: dtype {g.dtype}"
        assert_within_own_error(f"{name}[{backend}]", g, o, e)
    # Rows of the empty list: no gradient reaches their queries.
    dq_rows = got[1][0, 1, block:2 * block]
    assert torch.equal(dq_rows, torch.zeros_like(dq_rows))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_token_major_layout_inputs(backend: str) -> None:
    """q, k, v as views of [B, T, heads, D] projections (not contiguous in [B, H, T, D]): forward and grads
    match the reference, and the grads have the inputs' shapes."""
    batch, heads, kv_heads, seq_len, block, dqk, dv = 1, 4, 2, 64, 16, 40, 16
    gen = torch.Generator().manual_seed(31)
    q = torch.randn(batch, seq_len, heads, dqk, generator=gen).transpose(1, 2)
    k = torch.randn(batch, seq_len, kv_heads, dqk, generator=gen).transpose(1, 2)
    v = torch.randn(batch, seq_len, kv_heads, dv, generator=gen).transpose(1, 2)
    assert not q.is_contiguous()
    num, idx = make_lists(batch, heads, seq_len // block, 2, seed=32)
    visible = ref_visibility(num, idx, seq_len, block)
    cotangent = torch.randn(batch, seq_len, heads, dv, generator=gen, dtype=F64).transpose(1, 2)

    def ref(q_: torch.Tensor, k_: torch.Tensor, v_: torch.Tensor) -> torch.Tensor:
        return ref_attention(q_, k_, v_, visible)

    def op(q_: torch.Tensor, k_: torch.Tensor, v_: torch.Tensor) -> torch.Tensor:
        return block_sparse_attention(q_, k_, v_, num, idx, block=block, backend=backend)

    def grads(fn: Callable[..., torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]  # .to keeps the strides
        assert not any(t.is_contiguous() for t in leaves)
        out = fn(*leaves)
        return (out.detach(), *torch.autograd.grad(out, leaves, cotangent.to(out.dtype)))

    exact, own, got = grads(ref, F64), grads(ref, torch.float32), grads(op, torch.float32)
    for name, g, o, e in zip(("out", "dq", "dk", "dv"), got, own, exact, strict=True):
        assert_within_own_error(f"{name}[{backend}]", g, o, e)


# ----------------------------------------------------------------------------------------------------------
# transpose_block_lists
# ----------------------------------------------------------------------------------------------------------


def loop_transpose(num: torch.Tensor, idx: torch.Tensor, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain loop: for each key block kb, the query blocks whose valid list names kb (ascending), padded -1."""
    batch, heads, q_blocks, _ = idx.shape
    lists = [[[[qb for qb in range(q_blocks) if kb in idx[b, h, qb, : int(num[b, h, qb])].tolist()]
               for kb in range(num_blocks)] for h in range(heads)] for b in range(batch)]
    width = max(1, max(len(x) for per_b in lists for per_h in per_b for x in per_h))
    q_num = torch.zeros(batch, heads, num_blocks, dtype=torch.int32)
    q_idx = torch.full((batch, heads, num_blocks, width), -1, dtype=torch.int32)
    for b in range(batch):
        for h in range(heads):
            for kb in range(num_blocks):
                members = lists[b][h][kb]
                q_num[b, h, kb] = len(members)
                q_idx[b, h, kb, : len(members)] = torch.tensor(members, dtype=torch.int32)
    return q_num, q_idx


@pytest.mark.parametrize(("batch", "heads", "q_blocks", "width", "garbage", "seed"),
                         [(1, 1, 1, 1, "neg1", 0), (2, 3, 6, 3, "random", 1), (1, 2, 8, 8, "random", 2)])
def test_transpose_block_lists_matches_loop(batch: int, heads: int, q_blocks: int, width: int, garbage: str,
                                            seed: int) -> None:
    empty = ((0, 0, q_blocks - 1),) if q_blocks > 1 else ()
    num, idx = make_lists(batch, heads, q_blocks, width, seed, garbage=garbage, empty=empty)
    q_num, q_idx = transpose_block_lists(num, idx, q_blocks)
    exp_num, exp_idx = loop_transpose(num, idx, q_blocks)
    assert q_num.dtype == torch.int32 and q_idx.dtype == torch.int32
    assert q_num.shape == (batch, heads, q_blocks) and q_idx.shape[:3] == (batch, heads, q_blocks)
    assert torch.equal(q_num, exp_num)
    for b in range(batch):
        for h in range(heads):
            for kb in range(q_blocks):
                n = int(exp_num[b, h, kb])
                got = sorted(q_idx[b, h, kb, :n].tolist())  # order within a list is not part of the contract
                assert got == exp_idx[b, h, kb, :n].tolist(), f"(b={b}, h={h}, kb={kb}): {got}"


# ----------------------------------------------------------------------------------------------------------
# Properties of the torch backend (float64)
# ----------------------------------------------------------------------------------------------------------


@st.composite
def problems(draw) -> dict:
    block = draw(st.sampled_from([16, 32]))
    q_blocks = draw(st.integers(1, 4))
    kv_heads = draw(st.sampled_from([1, 2]))
    return dict(
        batch=draw(st.integers(1, 2)), heads=kv_heads * draw(st.sampled_from([1, 2, 3])), kv_heads=kv_heads,
        block=block, seq_len=block * q_blocks, dqk=draw(st.sampled_from([16, 24, 40])),
        dv=draw(st.sampled_from([8, 16])), width=draw(st.integers(1, 4)),
        garbage=draw(st.sampled_from(["neg1", "random"])), drop_diagonal=draw(st.booleans()),
        seed=draw(st.integers(0, 2**20)),
        cut=draw(st.integers(0, block * q_blocks - 1)), key_block=draw(st.integers(0, q_blocks - 1)),
    )


@settings(deadline=None, max_examples=20, derandomize=True)
@given(p=problems())
def test_torch_backend_properties(p: dict) -> None:
    """Parity with the own reference, causality (k/v at positions > cut do not move out[:cut + 1]), unlisted
    key blocks do not matter, and neither do the index entries past kv_num_blocks."""
    q, k, v = make_qkv(p["batch"], p["heads"], p["kv_heads"], p["seq_len"], p["dqk"], p["dv"], p["seed"], F64)
    block, q_blocks = p["block"], p["seq_len"] // p["block"]
    num, idx = make_lists(p["batch"], p["heads"], q_blocks, p["width"], p["seed"] + 1, garbage=p["garbage"],
                          drop_diagonal=p["drop_diagonal"])

    def run(k_: torch.Tensor, v_: torch.Tensor, idx_: torch.Tensor = idx) -> torch.Tensor:
        return block_sparse_attention(q, k_, v_, num, idx_, block=block, backend="torch")

    base = run(k, v)
    visible = ref_visibility(num, idx, p["seq_len"], block)
    torch.testing.assert_close(base, ref_attention(q, k, v, visible), rtol=1e-10, atol=1e-10)

    # Causality.
    cut = p["cut"]
    k2, v2 = k.clone(), v.clone()
    k2[:, :, cut + 1:] += 5.0
    v2[:, :, cut + 1:] -= 7.0
    torch.testing.assert_close(run(k2, v2)[:, :, : cut + 1], base[:, :, : cut + 1], rtol=1e-12, atol=1e-12)

    # Unlisted key block kb: rows of (b, h, qb) that do not list kb are unchanged.
    kb = p["key_block"]
    k3, v3 = k.clone(), v.clone()
    k3[:, :, kb * block:(kb + 1) * block] *= -3.0
    v3[:, :, kb * block:(kb + 1) * block] += 11.0
    moved = run(k3, v3)
    lists_kb = ref_block_allowed(num, idx, q_blocks)[..., kb]  # [B, H, QB]
    untouched = ~lists_kb.repeat_interleave(block, dim=-1)  # [B, H, T]
    torch.testing.assert_close(moved[untouched], base[untouched], rtol=1e-12, atol=1e-12)
    # ... and the test can fail: where kb is listed (and visible), the output does move.
    touched = lists_kb.repeat_interleave(block, dim=-1) & visible[..., kb * block:(kb + 1) * block].any(-1)
    if touched.any():
        assert (moved[touched] - base[touched]).abs().amax(-1).min() > 0

    # Garbage past kv_num_blocks does not matter.
    redrawn = torch.randint(0, q_blocks, idx.shape, generator=torch.Generator().manual_seed(p["seed"] + 2))
    past = torch.arange(idx.shape[-1]) >= num[..., None]
    idx2 = torch.where(past, redrawn.to(torch.int32), idx)
    torch.testing.assert_close(run(k, v, idx2), base, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------


def _valid(**overrides) -> dict:
    q, k, v = make_qkv(1, 4, 2, 64, 16, 16, seed=5)
    num, idx = make_lists(1, 4, 4, 2, seed=6)
    kwargs = dict(q=q, k=k, v=v, kv_num_blocks=num, kv_indices=idx, block=16, backend="torch")
    kwargs.update(overrides)
    return kwargs


def _bad_lists(num: torch.Tensor, idx: torch.Tensor) -> list[tuple[str, tuple[torch.Tensor, torch.Tensor], str]]:
    """Lists whose values break the contract (the kernels would attend a repeated block twice, read a block past
    the lists or after the query block)."""
    cases = []
    for name, qb, ids, words in (("repeated", 3, [3, 3], "repeats a key block"), ("future", 1, [2], r"\[0, qb\]"),
                                 ("negative", 2, [-2], r"\[0, qb\]")):
        n, i = num.clone(), idx.clone()
        n[0, 0, qb], i[0, 0, qb, :len(ids)] = len(ids), torch.tensor(ids)
        cases.append((name, (n, i), words))
    for count in (-1, idx.shape[-1] + 1):
        n = num.clone()
        n[0, 1, 0] = count
        cases.append((f"count-{count}", (n, idx), r"kv_num_blocks must lie in \[0, L=2\]"))
    return cases


def _bad_cases() -> list:
    q, k, v = make_qkv(1, 4, 2, 64, 16, 16, seed=5)
    num, idx = make_lists(1, 4, 4, 2, seed=6)
    q3, k3, v3 = make_qkv(1, 3, 2, 64, 16, 16, seed=5)  # H = 3, Hkv = 2
    num3, idx3 = make_lists(1, 3, 4, 2, seed=6)
    q0, k0, v0 = make_qkv(1, 4, 2, 0, 16, 16, seed=5)
    num0, idx0 = make_lists(1, 4, 0, 2, seed=6)
    qodd, kodd, vodd = make_qkv(1, 4, 2, 72, 16, 16, seed=5)  # 72 % 16 != 0
    return [
        pytest.param(dict(q=q[0]), r"\bq\b", id="q-rank"),
        pytest.param(dict(k=k[0]), r"\bk\b", id="k-rank"),
        pytest.param(dict(v=v[..., 0]), r"\bv\b", id="v-rank"),
        pytest.param(dict(kv_num_blocks=num[..., 0]), "kv_num_blocks", id="num-rank"),
        pytest.param(dict(kv_indices=idx[..., 0]), "kv_indices", id="idx-rank"),
        pytest.param(dict(q=q3, k=k3, v=v3, kv_num_blocks=num3, kv_indices=idx3), r"heads", id="heads"),
        pytest.param(dict(q=qodd, k=kodd, v=vodd), r"\bT\b.*block", id="T-mod-block"),
        pytest.param(dict(q=q0, k=k0, v=v0, kv_num_blocks=num0, kv_indices=idx0), r"\bT\b", id="T-zero"),
        pytest.param(dict(k=k.double()), r"\bk\b.*dtype", id="dtype-k"),
        pytest.param(dict(v=v.half()), r"\bv\b.*dtype", id="dtype-v"),
        pytest.param(dict(k=k.to("meta"), v=v.to("meta")), r"\bk\b.*device", id="device"),
        pytest.param(dict(kv_num_blocks=num[:, :, :3]), r"kv_num_blocks|kv_indices", id="num-shape"),
        pytest.param(dict(kv_indices=idx[:, :2]), r"kv_num_blocks|kv_indices", id="idx-shape"),
        pytest.param(dict(kv_indices=idx[:, :, :3], kv_num_blocks=num[:, :, :3]), r"kv_num_blocks|kv_indices|QB",
                     id="lists-vs-T"),
        pytest.param(dict(kv_num_blocks=num.float()), "kv_num_blocks", id="num-dtype"),
        pytest.param(dict(block=24), r"block=24", id="block-not-power-of-two"),
        pytest.param(dict(block=8), r"block=8", id="block-below-16"),
        pytest.param(dict(block=16.0), r"block=16.0", id="block-float"),
        pytest.param(dict(k=k[:, :0], v=v[:, :0]), r"heads", id="no-kv-heads"),
        *[pytest.param(dict(scale=scale), r"scale", id=f"scale-{scale}")
          for scale in (math.nan, math.inf, 1e300, 1e-320, 0.0, -1.0, True)],
        *[pytest.param(dict(kv_num_blocks=lists[0], kv_indices=lists[1]), words, id=name)
          for name, lists, words in _bad_lists(num, idx)],
        pytest.param(dict(q_num_blocks=transpose_block_lists(num, idx, 4)[0]), "come together", id="q-lists-half"),
        pytest.param(dict(q_num_blocks=torch.zeros_like(transpose_block_lists(num, idx, 4)[0]),
                          q_indices=transpose_block_lists(num, idx, 4)[1]), "transpose", id="q-lists-wrong"),
        pytest.param(dict(check_lists="no"), "check_lists must be a bool", id="check-lists-flag"),
        pytest.param(dict(backend="cuda"), r"backend", id="backend-name"),
    ]


@pytest.mark.parametrize(("overrides", "match"), _bad_cases())
def test_bad_inputs_raise(overrides: dict, match: str) -> None:
    a = _valid(**overrides)
    extra = {name: a[name] for name in ("scale", "q_num_blocks", "q_indices", "check_lists") if name in a}
    with pytest.raises(ScopeInputError, match=match):
        block_sparse_attention(a["q"], a["k"], a["v"], a["kv_num_blocks"], a["kv_indices"], block=a["block"],
                               backend=a["backend"], **extra)
    if "backend" in overrides:
        return
    with pytest.raises(ScopeInputError, match=match):  # the twin validates the same way
        block_sparse_attention_reference(a["q"], a["k"], a["v"], a["kv_num_blocks"], a["kv_indices"],
                                         block=a["block"], **extra)


def test_bad_inputs_raise_on_triton_backend_too() -> None:
    """Validation happens before dispatch (no interpreter launch needed to reject)."""
    q, k, v = make_qkv(1, 3, 2, 64, 16, 16, seed=5)
    num, idx = make_lists(1, 3, 4, 2, seed=6)
    with pytest.raises(ScopeInputError, match=r"heads"):
        block_sparse_attention(q, k, v, num, idx, block=16, backend="triton")
    q, k, v = make_qkv(1, 2, 2, 64, 16, 16, seed=5, dtype=F64)
    num, idx = make_lists(1, 2, 4, 2, seed=6)
    with pytest.raises(ScopeInputError, match=r"float64"):  # the kernels take float16/bfloat16/float32 only
        block_sparse_attention(q, k, v, num, idx, block=16, backend="triton")


# ----------------------------------------------------------------------------------------------------------
# torch.library registration
# ----------------------------------------------------------------------------------------------------------


def test_custom_ops_pass_opcheck() -> None:
    """scope::block_sparse_attention (-> out, lse) and its backward op have correct schemas, fake (meta)
    implementations and autograd registration, so torch.compile can trace them (interpreter on CPU)."""
    batch, heads, kv_heads, seq_len, block = 1, 2, 1, 32, 16
    q, k, v = make_qkv(batch, heads, kv_heads, seq_len, 24, 16, seed=41)
    num, idx = make_lists(batch, heads, seq_len // block, 2, seed=42)
    q_num, q_idx = loop_transpose(num, idx, seq_len // block)
    lists = (num, idx, q_num, q_idx)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.library.opcheck(torch.ops.scope.block_sparse_attention.default, (*leaves, *lists, block, 0.25))
    out, lse = torch.ops.scope.block_sparse_attention(q, k, v, *lists, block, 0.25)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(43))
    torch.library.opcheck(torch.ops.scope.block_sparse_attention_backward.default,
                          (dout, q, k, v, out, lse, *lists, block, 0.25),
                          test_utils=("test_schema", "test_faketensor"))



def test_kernel_launchers_accept_non_contiguous_lists() -> None:
    """The launchers index the lists as dense rows: strided list tensors (here [..., :n] slices of wider
    buffers) must give exactly what their contiguous copies give (regression: a slice returned by
    transpose_block_lists was read with the wrong row stride and the dk/dv kernel walked garbage)."""
    from scope.kernels import block_sparse

    gen = torch.Generator().manual_seed(11)
    heads, seq_len, block, dim = 2, 128, 32, 16
    q, k, v, dout = (torch.randn(1, heads, seq_len, dim, generator=gen) for _ in range(4))
    num_blocks = seq_len // block
    rows = torch.arange(num_blocks)
    kv_num = (rows + 1).to(torch.int32).expand(1, heads, num_blocks).contiguous()  # every past block
    kv_idx = torch.where(rows[None, :] <= rows[:, None], rows[None, :], -1).to(torch.int32).expand(
        1, heads, num_blocks, num_blocks).contiguous()
    q_num, q_idx = transpose_block_lists(kv_num, kv_idx, num_blocks)
    tiles = block_sparse.Tiles(32, 16, 32, 16, 16, 32, 4, 2)

    def run(kv_indices: torch.Tensor, q_indices: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out, lse = block_sparse.forward(q, k, v, kv_num, kv_indices, block, dim**-0.5, tiles)
        return out, *block_sparse.backward(dout, q, k, v, out, lse, kv_num, kv_indices, q_num, q_indices, block,
                                           dim**-0.5, tiles)

    strided = [torch.cat([t, torch.full_like(t, -1)], -1)[..., :num_blocks] for t in (kv_idx, q_idx)]
    assert not any(t.is_contiguous() for t in strided)
    for a, b in zip(run(kv_idx, q_idx), run(*strided), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
