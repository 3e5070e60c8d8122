"""Causality under non-finite inputs (nsa.nonfinite's rule) for SCOPE: scope_attention (flex, torch, Triton
interpreter), block_sparse_attention (torch twin, Triton interpreter) and ScopeAttention (prefill with
gradients, forward, decode).

A NaN / +inf / -inf planted at a random position p of one input must turn NaN exactly the output rows that
read it (the reference visibility of tests/test_scope_functional.py says which); every other row is bitwise
equal (torch.equal) to the run without it, and so are the gradients of a loss over the rows before p with
respect to the inputs at positions before p; no gradient is non-finite. A loss over every row (the NaN rows
included, which pass back zero gradient) passes exactly zero gradient to the planted entry: the ops' sanitising
passes gradients through unmasked (nsa.nonfinite.finite_or_zero_under_poison), which is right only so.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_scope_attention import allowed_from_lists, make_layer, small_config
from test_scope_functional import BATCH, BLOCK, HEADS, SEQ, VARIANTS, Problem, make_problem, ref_visible

from scope.block_sparse_attention import block_sparse_attention, block_sparse_attention_reference

F64 = torch.float64
VALUES = st.sampled_from([math.nan, math.inf, -math.inf])


def plant(t: torch.Tensor, index: tuple[int, ...], value: float) -> torch.Tensor:
    dirty = t.detach().clone()
    dirty[index] = value
    return dirty


def expected_nan_rows(p: Problem, name: str, b: int, head: int, pos: int, visible: torch.Tensor) -> torch.Tensor:
    """bool [B, H, T]: the rows that read the planted value. q and the bias coefficients are per query row;
    k and v rows are read by the query heads of their group wherever the reference visibility allows."""
    batch, heads = p.q.shape[:2]
    rows = torch.zeros(batch, heads, SEQ, dtype=torch.bool)
    if name in ("q", "A", "B", "c"):
        rows[b, head, pos] = True
        return rows
    group = heads // p.k.shape[1]
    for h in range(head * group, (head + 1) * group):
        rows[b, h] = visible[b % visible.shape[0], h % visible.shape[1], :, pos]
    return rows


def check_rows(dirty: torch.Tensor, clean: torch.Tensor, nan_rows: torch.Tensor) -> None:
    assert bool(dirty[nan_rows].isnan().all())
    assert torch.equal(dirty[~nan_rows], clean[~nan_rows])  # before p and every row that cannot read it


def run(p: Problem, forward: Callable[[Problem], torch.Tensor], inputs: dict[str, torch.Tensor], first_bad: int,
        grad: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """forward(p) with p's tensors replaced by ``inputs``, and the gradients of sum(out[:, :, :first_bad] *
    weights) w.r.t. those inputs (none without grad)."""
    leaves = {name: t.detach().clone().requires_grad_(grad) for name, t in inputs.items()}
    for name, t in leaves.items():
        setattr(p, name, t)
    with torch.set_grad_enabled(grad):
        out = forward(p)
    if not grad:
        return out, []
    weights = torch.randn(out[:, :, :first_bad].shape, generator=torch.Generator().manual_seed(0), dtype=out.dtype)
    return out, list(torch.autograd.grad((out[:, :, :first_bad] * weights).sum(), list(leaves.values())))


def check_plant(p: Problem, forward: Callable[[Problem], torch.Tensor], name: str, b: int, head: int, pos: int,
                dim: int, value: float, grad: bool) -> None:
    """Plant ``value`` in input ``name`` (one the problem uses: otherwise the next one that it does) at batch b,
    head, position pos, channel dim; compare with the clean run."""
    names = ["q", "k", "v"] + ([] if p.bias_impl == "none" else ["A", "B"] + (["c"] if p.slope else []))
    name = names[ALL_INPUTS.index(name) % len(names)]
    clean_inputs = {n: getattr(p, n) for n in names}
    target = clean_inputs[name]
    b, head = b % target.shape[0], head % target.shape[1]
    index = (b, head, pos) if name == "c" else (b, head, pos, dim % target.shape[-1])
    clean, clean_grads = run(p, forward, clean_inputs, pos, grad)
    dirty_inputs = {**clean_inputs, name: plant(target, index, value)}
    dirty, dirty_grads = run(p, forward, dirty_inputs, pos, grad)
    visible = ref_visible(p.mask.kv_num_blocks, p.mask.kv_indices, SEQ, BLOCK, p.doc_ids)
    nan_rows = expected_nan_rows(p, name, b, head, pos, visible)
    assert bool(nan_rows.any())
    check_rows(dirty, clean, nan_rows)
    for g_dirty, g_clean in zip(dirty_grads, clean_grads, strict=True):
        assert bool(g_dirty.isfinite().all())
        assert torch.equal(g_dirty[:, :, :pos], g_clean[:, :, :pos])
    if grad:  # a loss over every row, the poisoned ones too (poison_rows passes them zero gradient)
        _, all_rows_grads = run(p, forward, dirty_inputs, SEQ, grad)
        assert all(bool(g.isfinite().all()) for g in all_rows_grads)
        assert float(all_rows_grads[names.index(name)][index]) == 0.0  # only poisoned rows read the planted entry


def on(backend: str) -> Callable[[Problem], torch.Tensor]:
    return lambda p: p.call(backend=backend)


ALL_INPUTS = ["q", "k", "v", "A", "B", "c"]
PLANTS = dict(name=st.sampled_from(ALL_INPUTS), b=st.integers(0, BATCH - 1),
              head=st.integers(0, HEADS - 1), pos=st.integers(1, SEQ - 1), dim=st.integers(0, 15), value=VALUES)


@pytest.mark.parametrize(("variant", "docs"), [("score_mod_all", True), ("qk_aug_slope", False), ("none", False)])
@settings(max_examples=8, derandomize=True, deadline=None)
@given(**PLANTS)
def test_scope_attention_torch_backend(variant: str, docs: bool, name: str, b: int, head: int, pos: int, dim: int,
                                       value: float) -> None:
    p = make_problem(20, docs=docs, **VARIANTS[variant])
    check_plant(p, on("torch"), name, b, head, pos, dim, value, grad=True)


@pytest.mark.parametrize(("variant", "docs"), [("score_mod_all", True), ("qk_aug", False)])
@settings(max_examples=6, derandomize=True, deadline=None)
@given(**PLANTS)
def test_scope_attention_flex_backend(variant: str, docs: bool, name: str, b: int, head: int, pos: int, dim: int,
                                      value: float) -> None:
    """Forward only: FlexAttention has no CPU backward."""
    p = make_problem(21, docs=docs, **VARIANTS[variant])
    check_plant(p, on("flex"), name, b, head, pos, dim, value, grad=False)


@settings(max_examples=3, derandomize=True, deadline=None)
@given(**PLANTS)
def test_scope_attention_triton_backend(name: str, b: int, head: int, pos: int, dim: int, value: float) -> None:
    """The interpreter is slow: one sequence, two query heads over one kv head, few examples."""
    p = make_problem(22, dtype=torch.float32, batch=1, heads=2, kv_heads=1, **VARIANTS["qk_aug_slope"])
    check_plant(p, on("triton"), name, b, head, pos, dim, value, grad=True)


# ----------------------------------------------------------------------------------------------------------
# block_sparse_attention


def check_block_sparse(fn: Callable[..., torch.Tensor], backend: str, p: Problem, name: str, b: int, head: int,
                       pos: int, dim: int, value: float) -> None:
    lists = (p.q.shape[0], p.q.shape[1], SEQ // BLOCK)
    num, idx = p.mask.kv_num_blocks.expand(lists), p.mask.kv_indices.expand(*lists, -1)

    def forward(problem: Problem) -> torch.Tensor:
        return fn(problem.q, problem.k, problem.v, num, idx, block=BLOCK, backend=backend)

    check_plant(p, forward, name, b, head, pos, dim, value, grad=True)


QKV_PLANTS = {**PLANTS, "name": st.sampled_from(["q", "k", "v"])}


@pytest.mark.parametrize("fn", [block_sparse_attention, block_sparse_attention_reference])
@settings(max_examples=6, derandomize=True, deadline=None)
@given(**QKV_PLANTS)
def test_block_sparse_attention_torch(fn, name: str, b: int, head: int, pos: int, dim: int, value: float) -> None:
    check_block_sparse(fn, "torch", make_problem(23, **VARIANTS["none"]), name, b, head, pos, dim, value)


@settings(max_examples=3, derandomize=True, deadline=None)
@given(**QKV_PLANTS)
def test_block_sparse_attention_triton(name: str, b: int, head: int, pos: int, dim: int, value: float) -> None:
    """The interpreter is slow: one sequence, two query heads over one kv head, few examples."""
    p = make_problem(24, dtype=torch.float32, batch=1, heads=2, kv_heads=1, **VARIANTS["none"])
    check_block_sparse(block_sparse_attention, "triton", p, name, b, head, pos, dim, value)


# ----------------------------------------------------------------------------------------------------------
# ScopeAttention


def layer_rows_reading(aux_lists: torch.Tensor, pos: int, block: int, seq_len: int) -> torch.Tensor:
    """bool [T]: the rows of batch 0 that read token pos: its own, and those whose lists (any head) hold its
    block, at positions >= pos."""
    allowed = allowed_from_lists(aux_lists, seq_len // block)[0]  # [H, QB, KB]
    rows = allowed[:, torch.arange(seq_len) // block, pos // block].any(0) & (torch.arange(seq_len) >= pos)
    rows[pos] = True
    return rows


@pytest.mark.parametrize("grad", [True, False])
@settings(max_examples=6, derandomize=True, deadline=None)
@given(pos=st.integers(1, 63), dim=st.integers(0, 31), value=VALUES,
       representative=st.sampled_from(["last", "mean"]), bias_impl=st.sampled_from(["score_mod", "qk_aug"]))
def test_layer_prefill(grad: bool, pos: int, dim: int, value: float, representative: str, bias_impl: str) -> None:
    """With gradients (CPU: the dense path) and without (eager Flex). Parameter gradients stay finite."""
    layer = make_layer(small_config(representative=representative, bias_impl=bias_impl, c_scale=0.1)).train(grad)
    x = torch.randn(1, 64, 32, dtype=F64, generator=torch.Generator().manual_seed(pos))
    weights = torch.randn(1, pos, 32, dtype=F64, generator=torch.Generator().manual_seed(1))
    results = []
    for inputs in (x, plant(x, (0, pos, dim), value)):
        leaf = inputs.clone().requires_grad_(grad)
        layer.zero_grad()
        with torch.set_grad_enabled(grad):
            y, aux = layer(leaf, return_aux=True)
        if grad:
            (y[:, :pos] * weights).sum().backward()
            assert all(bool(param.grad.isfinite().all()) for param in layer.parameters() if param.grad is not None)
        results.append((y.detach(), leaf.grad, aux.pointer_mask.kv_indices))
    (clean, clean_grad, _), (dirty, dirty_grad, lists) = results
    nan_rows = layer_rows_reading(lists, pos, layer.config.block, 64)
    assert bool(dirty[0, nan_rows].isnan().all()) and bool(dirty[0, ~nan_rows].isfinite().all())
    assert torch.equal(dirty[:, :pos], clean[:, :pos])
    if grad:
        assert dirty_grad is not None and clean_grad is not None
        assert bool(dirty_grad.isfinite().all())
        assert torch.equal(dirty_grad[:, :pos], clean_grad[:, :pos])


@settings(max_examples=5, derandomize=True, deadline=None)
@given(pos=st.integers(1, 71), dim=st.integers(0, 31), value=VALUES, prompt=st.sampled_from([0, 16]))
def test_layer_decode(pos: int, dim: int, value: float, prompt: int) -> None:
    """Token-by-token decode (after a prefilled prompt of 0 or 16 tokens) of an input with a non-finite token:
    NaN in exactly the rows the prefill of the same input makes NaN, the other rows equal to it, and the
    steps before the token bitwise equal to the decode without it."""
    layer = make_layer(small_config(c_scale=0.1))
    x = torch.randn(1, 72, 32, dtype=F64, generator=torch.Generator().manual_seed(pos))
    dirty_x = plant(x, (0, pos, dim), value)
    decoded = []
    with torch.no_grad():
        full = layer(dirty_x)
        for inputs in (x, dirty_x):
            cache = layer.new_cache(1, 72)
            head = [layer(inputs[:, :prompt], cache=cache)] if prompt else []
            decoded.append(torch.cat([*head, layer(inputs[:, prompt:], cache=cache)], dim=1))
    clean, dirty = decoded
    assert torch.equal(dirty.isnan(), full.isnan()) and bool(full[0, pos].isnan().all())
    torch.testing.assert_close(dirty, full, rtol=1e-9, atol=1e-10, equal_nan=True)
    assert torch.equal(dirty[:, :pos], clean[:, :pos])
