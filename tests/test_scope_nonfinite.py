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

from scope.block_sparse_attention import block_sparse_attention, block_sparse_attention_reference, rows_that_read
from scope.functional import naive_scope_attention
from scope.pointer_mask import document_starts

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
                dim: int, value: float, grad: bool, project_rule: bool = False) -> None:
    """Plant ``value`` in input ``name`` (one the problem uses: otherwise the next one that it does) at batch b,
    head, position pos, channel dim; compare with the clean run. ``project_rule``: also check that the
    reference's rows are the project's rule for a planted k / v (scope.block_sparse_attention.rows_that_read
    of the planted token, under the mask's lists and documents)."""
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
    if project_rule and name in ("k", "v"):
        flagged = torch.zeros(target.shape[:3], dtype=torch.bool)
        flagged[b, head, pos] = True
        rule = rows_that_read(flagged, p.mask.kv_num_blocks, p.mask.kv_indices, block=BLOCK,
                              num_heads=p.q.shape[1], doc_start=document_starts(p.doc_ids, SEQ, p.q.shape[0]))
        assert torch.equal(rule, nan_rows)
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


QKV_PLANTS = {**PLANTS, "name": st.sampled_from(["q", "k", "v"])}


@pytest.mark.parametrize(("variant", "docs"), [("score_mod_all", True), ("none", False)])
@settings(max_examples=8, derandomize=True, deadline=None)
@given(**QKV_PLANTS)
def test_naive_scope_attention(variant: str, docs: bool, name: str, b: int, head: int, pos: int, dim: int,
                               value: float) -> None:
    """The dense twin (scope_attention's torch path, called directly) with a NaN / +-inf in q, k or v: NaN in
    exactly the rows that read it (the reference's visibility, which is rows_that_read's rule), every other row
    and the gradients before it bitwise equal to the clean run."""
    p = make_problem(25, docs=docs, **VARIANTS[variant])
    check_plant(p, lambda problem: problem.call(naive_scope_attention), name, b, head, pos, dim, value, grad=True,
                project_rule=True)


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


DECODE_LEN, DECODE_BLOCK = 48, 8  # small_config's block


@st.composite
def decode_plants(draw: st.DrawFn) -> tuple[int, int]:
    """(prompt, pos): a prompt of 13, 16 or 21 tokens, then token-by-token decode of the rest; the planted token
    inside the prompt (1 <= pos < prompt) or in the decoded part (prompt <= pos < DECODE_LEN). A prompt of 13 or
    21 tokens (not a block multiple) is itself decoded token by token from the empty cache; one of 16 is
    prefilled, so a planted token in it reaches the cache through the prefill's write (_prefill_into). Every
    prompt here ends before block 3, so the first decoded token (its local band: its block and the one before,
    and the global block 0) reads every prompt token: a NaN in the prompt always reaches a decoded row."""
    prompt = draw(st.sampled_from([13, 16, 21]))
    if draw(st.booleans()):
        return prompt, draw(st.integers(1, prompt - 1))
    return prompt, draw(st.integers(prompt, DECODE_LEN - 1))


@settings(max_examples=8, derandomize=True, deadline=None)
@given(plant_at=decode_plants(), dim=st.integers(0, 31), value=VALUES)
def test_layer_decode(plant_at: tuple[int, int], dim: int, value: float) -> None:
    """Token-by-token decode (after a prompt, prefilled or decoded itself) of an input with a non-finite token,
    in the prompt or after it: NaN in exactly the rows the prefill of the same input makes NaN, the other rows
    equal to it, and the steps before the token bitwise equal to the decode without it."""
    prompt, pos = plant_at
    config = small_config(c_scale=0.1)
    assert config.block == DECODE_BLOCK and config.local_blocks == 2 and config.global_blocks == 1
    layer = make_layer(config)
    x = torch.randn(1, DECODE_LEN, 32, dtype=F64, generator=torch.Generator().manual_seed(pos))
    dirty_x = plant(x, (0, pos, dim), value)
    decoded = []
    with torch.no_grad():
        full = layer(dirty_x)
        # the clean run only up to the planted token (or the prompt's end): its rows before pos are compared
        for inputs, stop in ((x, max(pos, prompt)), (dirty_x, DECODE_LEN)):
            cache = layer.new_cache(1, DECODE_LEN)
            head = layer(inputs[:, :prompt], cache=cache)
            assert cache.length == prompt
            decoded.append(torch.cat([head, layer(inputs[:, prompt:stop], cache=cache)], dim=1))
    clean, dirty = decoded
    assert torch.equal(dirty.isnan(), full.isnan()) and bool(full[0, pos].isnan().all())
    assert bool(dirty[0, max(pos, prompt):].isnan().any())  # a decode step reads it (docstring of decode_plants)
    # float64 on both paths, the same math in other summation orders (block-sparse prefill vs a gathered
    # decode row): O(1) values agree to ~1e-15, far inside these bounds
    torch.testing.assert_close(dirty, full, rtol=1e-9, atol=1e-10, equal_nan=True)
    assert torch.equal(dirty[:, :pos], clean[:, :pos])
