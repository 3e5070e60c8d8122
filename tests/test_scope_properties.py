"""Property tests of ScopeAttention over drawn valid configurations (hypothesis, the conftest's "nsa" profile).

The other SCOPE tests run a handful of fixed configs; here every example draws a whole ScopeConfig: group sizes
1-4 (3 is not a power of two), even head dims 4-16, blocks 2-8, budget / local / global blocks / max_radius
(0 included), every bias_impl, gate_kind and representative ScopeConfig accepts, the slope, the ramp, a delta_max
schedule, pointer_mask on and off, gumbel_topk (inert in eval), qk_align and the CPU backends; batch 1-2 and up
to 40 tokens, in float64 on the CPU, with a pointer head redrawn at random so that pointers, budget logits and
the slope differ per query. For every draw:

1. a prefill equals a dense float64 softmax over the layer's weights (tests/test_scope_attention.py's
   dense_reference) restricted to the mask's key blocks, and that mask is SCOPE.md 2's rule recomputed here from
   the layer's D* and allocation: the local band, the global blocks, the window of each peak around
   clamp(floor((t_rep - D*) / block), 0, qb), nothing after the query block; the representative D* is the causal
   one (the previous block's last row or mean); the allocation uses min(budget, M (2 max_radius + 1)) blocks,
   at most 2 max_radius + 1 per peak;
2. causality: the output rows before p are bitwise equal when every token from p on is NaN, +-inf or huge finite
   garbage;
3. decoding through the layer's cache (a prefill of whole blocks, then token by token) equals a prefill, for any
   length (T < block and T not a multiple of block too: the prefill runs on T rounded up to whole blocks, which
   property 2 allows), with a drawn training step;
4. a configuration one value away from a drawn valid one that breaks a rule of ScopeConfig raises
   ScopeConfigError whose message names the argument(s).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
import torch
from conftest import TOL64, randn
from hypothesis import given
from hypothesis import strategies as st
from test_scope_attention import allowed_from_lists, dense_reference, make_layer

from nsa.dispatch import SCOPE_ATTENTION_BACKENDS
from scope import ScopeAttention, ScopeAux, ScopeConfig, ScopeConfigError
from scope.config import BIAS_IMPLS, GATE_KINDS, QK_ALIGNS, REPRESENTATIVES

MAX_T = 40
# "triton" needs CUDA (or the interpreter when asked), float16/32 and blocks that are powers of two >= 16: none
# of that exists here, and the backend does not change the function, only the kernel computing it.
CPU_BACKENDS = tuple(b for b in SCOPE_ATTENTION_BACKENDS if b != "triton")
POSITIVE_FLOATS = ("rope_theta", "min_period", "delta_max", "ramp_tau", "sigma_min", "budget_temp")
NONNEGATIVE_FLOATS = ("c_scale", "ramp_lambda", "ramp_width", "lambda_hf", "lambda_zero_mean", "lambda_entropy",
                      "lambda_edge")
POSITIVE_INTS = ("hidden_size", "num_heads", "num_kv_heads", "head_dim", "mlp_hidden", "block", "num_pointers",
                 "num_freqs", "local_blocks")
NONNEGATIVE_INTS = ("budget", "global_blocks", "max_radius")


# The pointer mask three times in four: the sliding-window fallback is a band, the mask rule has much more to get
# wrong (and hypothesis shrinks toward the first choice, the mask on).
POINTER_MASK = st.sampled_from([True, True, True, False])
# Windows of 3+ blocks first (their placement around the centre shows), the degenerate 0 and 1 last.
BUDGETS = st.sampled_from([6, 8, 4, 3, 2, 1, 0])
MAX_RADII = st.sampled_from([2, 3, 1, 0])


def floats(lo: float, hi: float) -> st.SearchStrategy[float]:
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False)


@st.composite
def ramp_values(draw: st.DrawFn, bias_impl: str) -> dict[str, Any]:
    """gate_kind and ramp_lambda: under qk_aug only combinations without a ramp (a gate without a weight, or a
    weight without a gate, are valid there and must change nothing)."""
    gate_kind = draw(st.sampled_from(GATE_KINDS))
    ramp_lambda = draw(st.one_of(st.just(0.0), floats(0.05, 2.0)))
    if bias_impl == "qk_aug" and gate_kind != "none":
        ramp_lambda = 0.0
    return {"gate_kind": gate_kind, "ramp_lambda": ramp_lambda, "ramp_width": draw(floats(0.0, 32.0)),
            "ramp_tau": draw(floats(0.25, 16.0))}


@st.composite
def valid_configs(draw: st.DrawFn) -> dict[str, Any]:
    """ScopeConfig keyword arguments of a tiny layer. D* stays within ~1.5 T tokens (delta_max <= 64) so pointers
    land inside the sequence as often as they clamp; the periods are short for the same reason."""
    kv_heads, group, num_pointers = draw(st.sampled_from([1, 2])), draw(st.integers(1, 4)), draw(st.integers(1, 4))
    bias_impl, min_period = draw(st.sampled_from(BIAS_IMPLS)), draw(floats(2.0, 64.0))
    schedule = st.tuples(floats(0.5, 64.0), floats(0.5, 64.0), st.integers(1, 20))
    return {
        "hidden_size": draw(st.integers(2, 16)), "num_heads": kv_heads * group, "num_kv_heads": kv_heads,
        "head_dim": 2 * draw(st.integers(2, 8)), "rope_theta": draw(floats(2.0, 1e4)),
        "num_pointers": num_pointers, "num_freqs": draw(st.integers(1, 6)), "min_period": min_period,
        "l_max": min_period * draw(floats(1.01, 1e4)), "delta_max": draw(floats(0.5, 64.0)),
        "delta_max_schedule": draw(st.one_of(st.none(), schedule)), "per_head_mlp": draw(st.booleans()),
        "mlp_hidden": draw(st.integers(1, 8)), "beta": draw(floats(-2.0, 2.0)),
        "c_scale": draw(st.one_of(st.just(0.0), floats(0.01, 1.0))), "sigma_min": draw(floats(0.01, 1.0)),
        **draw(ramp_values(bias_impl)),
        "block": draw(st.integers(2, 8)), "budget": draw(BUDGETS), "local_blocks": draw(st.integers(1, 3)),
        "global_blocks": draw(st.integers(0, 2)), "max_radius": draw(MAX_RADII),
        "budget_temp": draw(floats(0.1, 4.0)), "gumbel_topk": draw(st.none() | st.integers(1, num_pointers)),
        "representative": draw(st.sampled_from(REPRESENTATIVES)), "pointer_mask": draw(POINTER_MASK),
        "bias_impl": bias_impl, "qk_align": draw(st.sampled_from(QK_ALIGNS)),
        "backend": draw(st.sampled_from(CPU_BACKENDS)),
    }


class Case(NamedTuple):
    config: ScopeConfig
    batch: int
    seq_len: int  # a multiple of config.block for the prefill properties; any length >= 1 for decode
    seed: int


@st.composite
def cases(draw: st.DrawFn, whole_blocks: bool) -> Case:
    config = ScopeConfig(**draw(valid_configs()))
    if whole_blocks:  # a prefill takes whole blocks only (ScopeInputError otherwise: test_scope_attention)
        seq_len = config.block * draw(st.integers(1, MAX_T // config.block))
    else:  # edges first: one token, one short of a block, one past it
        edges = [1, config.block - 1, config.block + 1, MAX_T]
        seq_len = draw(st.one_of(st.sampled_from(edges), st.integers(1, MAX_T)))
    return Case(config, draw(st.integers(1, 2)), seq_len, draw(st.integers(0, 2**20)))


def drawn_layer(case: Case) -> ScopeAttention:
    """make_layer (gain and ramp gate on), then the pointer head redrawn: its init keeps D* near fixed spreads and
    pi near uniform, which would leave most of the mask rule untested."""
    layer = make_layer(case.config, seed=case.seed)
    head, c = layer.spectral.pointer_head, case.config
    scales = ((head.w1, 1 / math.sqrt(c.head_dim)), (head.b1, 0.5), (head.w2, 1.5 / math.sqrt(c.mlp_hidden)),
              (head.b2, 1.0), (head.gain, 1.0))
    with torch.no_grad():
        for i, (param, scale) in enumerate(scales):
            param.copy_(randn(*param.shape, seed=case.seed + i, scale=scale))
        if layer.spectral.ramp_gate is not None:
            layer.spectral.ramp_gate.copy_(randn(*layer.spectral.ramp_gate.shape, seed=case.seed + 5).abs())
    return layer


def inputs(case: Case, seq_len: int) -> torch.Tensor:
    return randn(case.batch, seq_len, case.config.hidden_size, seed=case.seed + 10)


# ---- 1. prefill = dense reference; the mask = SCOPE.md 2's rule -------------------------------------------


def causal_rep_rows(values: torch.Tensor, c: ScopeConfig) -> torch.Tensor:
    """[B, H, T, M] -> [B, H, QB, M]: query block qb's pointers are those of the previous block's last row (or its
    mean), row 0 for block 0 (scope/scope_attention.py's docstring: a representative every query of qb has seen)."""
    rows = [values[:, :, 0]]
    for qb in range(1, values.shape[2] // c.block):
        previous = values[:, :, (qb - 1) * c.block: qb * c.block]
        rows.append(previous[:, :, -1] if c.representative == "last" else previous.mean(2))
    return torch.stack(rows, dim=2)


def expected_blocks(c: ScopeConfig, qb: int, d_star: list[float], alloc: list[int]) -> set[int]:
    """Key blocks of query block qb (SCOPE.md 2, steps 2 and 5): local band, globals, each peak's window of
    alloc[m] blocks [centre - floor((n - 1) / 2), + n - 1] around the clamped centre, all clipped to [0, qb]."""
    kept = set(range(max(0, qb - c.local_blocks + 1), qb + 1))
    if not c.pointer_mask:  # the sliding-window fallback: the band alone
        return kept
    kept |= set(range(min(c.global_blocks, qb + 1)))
    t_rep = qb * c.block - 1 if c.representative == "last" else qb * c.block - (c.block + 1) / 2
    for d, n in zip(d_star, alloc, strict=True):
        centre = min(max(math.floor((t_rep - d) / c.block), 0), qb)
        first = centre - (n - 1) // 2
        kept |= {kb for kb in range(first, first + n) if 0 <= kb <= qb}
    return kept


def check_allocation(c: ScopeConfig, aux: ScopeAux, alloc: torch.Tensor) -> None:
    """SCOPE.md 2, steps 3-4 in eval: every peak is kept (Gumbel top-k is for training), the budget is used up to
    what the capped peaks can take, none past its cap 2 max_radius + 1, and a larger budget logit never gets fewer
    blocks (largest-remainder rounding of softmax shares, redistributed by the same shares)."""
    assert bool((aux.pointer_mask.centres >= 0).all())
    cap = 2 * c.max_radius + 1
    assert bool(((alloc >= 0) & (alloc <= cap)).all())
    assert bool((alloc.sum(-1) == min(c.budget, c.num_pointers * cap)).all())
    logits = aux.block_budget_logits
    larger = logits[..., :, None] > logits[..., None, :]  # [.., a, b]: u_a > u_b
    assert bool((alloc[..., :, None] >= alloc[..., None, :])[larger].all())


def check_mask_rule(c: ScopeConfig, aux: ScopeAux, batch: int, num_blocks: int) -> torch.Tensor:
    """The layer's mask against the rule recomputed from its representative D* and allocation; -> the mask as a
    bool [B, H, QB, QB]."""
    for block_rows, rows in ((aux.block_d_star, aux.coeffs.params.d_star),
                             (aux.block_budget_logits, aux.coeffs.params.budget_logits)):
        torch.testing.assert_close(block_rows, causal_rep_rows(rows, c), **TOL64)
    alloc = aux.pointer_mask.alloc.expand(batch, c.num_heads, num_blocks, -1)
    if c.pointer_mask:
        check_allocation(c, aux, alloc)
    got = allowed_from_lists(aux.pointer_mask.kv_indices, num_blocks).expand(batch, c.num_heads, -1, -1)
    d_star, allocs = aux.block_d_star.tolist(), alloc.tolist()
    for b in range(batch):
        for h in range(c.num_heads):
            for qb in range(num_blocks):
                want = expected_blocks(c, qb, d_star[b][h][qb] if c.pointer_mask else [],
                                       allocs[b][h][qb] if c.pointer_mask else [])
                assert set(torch.nonzero(got[b, h, qb]).flatten().tolist()) == want, (b, h, qb)
    return got


@given(cases(whole_blocks=True))
def test_prefill_equals_the_dense_reference_over_the_rule_s_mask(case: Case) -> None:
    c, layer = case.config, drawn_layer(case)
    x = inputs(case, case.seq_len)
    with torch.no_grad():
        y, aux = layer(x, return_aux=True)
        allowed = check_mask_rule(c, aux, case.batch, case.seq_len // c.block)
        reference = dense_reference(layer, x, allowed)
    torch.testing.assert_close(y, reference, **TOL64)


# ---- 2. causality under garbage ---------------------------------------------------------------------------

GARBAGE = ("nan", "inf", "-inf", "huge", "mixed")


def garbage(kind: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """NaN / +-inf everywhere, finite values whose q.k products overflow float64 (1e200), or a seeded mix."""
    huge = randn(*shape, seed=seed, scale=1e200)
    if kind == "huge":
        return huge
    if kind != "mixed":
        return torch.full(shape, float(kind), dtype=torch.float64)
    pick = torch.randint(0, 4, shape, generator=torch.Generator().manual_seed(seed + 1))
    choices = torch.tensor([math.nan, math.inf, -math.inf, 0.0], dtype=torch.float64)
    return torch.where(pick < 3, choices[pick], huge)


@given(cases(whole_blocks=True), st.data())
def test_rows_before_p_ignore_any_garbage_from_p_on(case: Case, data: st.DataObject) -> None:
    first_bad = data.draw(st.integers(1, case.seq_len - 1), label="p")
    kind = data.draw(st.sampled_from(GARBAGE), label="garbage")
    layer, x = drawn_layer(case), inputs(case, case.seq_len)
    dirty = x.clone()
    dirty[:, first_bad:] = garbage(kind, tuple(dirty[:, first_bad:].shape), case.seed + 20)
    with torch.no_grad():
        clean_y, dirty_y = layer(x), layer(dirty)
    assert bool(torch.isfinite(clean_y).all())
    assert torch.equal(dirty_y[:, :first_bad], clean_y[:, :first_bad])


# ---- 3. decode = prefill ----------------------------------------------------------------------------------


@given(cases(whole_blocks=False), st.data())
def test_decode_through_the_cache_equals_prefill(case: Case, data: st.DataObject) -> None:
    c, seq_len = case.config, case.seq_len
    prompt = c.block * data.draw(st.integers(0, seq_len // c.block), label="prompt blocks")
    chunk = data.draw(st.integers(1, 4), label="tokens per decode call")
    step = data.draw(st.none() | st.integers(0, 30), label="step")  # moves delta_max along a schedule
    capacity = seq_len + data.draw(st.integers(0, 5), label="spare capacity")
    padded = -(-seq_len // c.block) * c.block
    layer, x = drawn_layer(case), inputs(case, padded)
    with torch.no_grad():
        full = layer(x, step=step)[:, :seq_len]  # the tokens after seq_len cannot reach it (property 2)
        cache = layer.new_cache(case.batch, capacity)
        parts = [layer(x[:, :prompt], cache=cache, step=step)] if prompt else []
        parts += [layer(x[:, t: min(t + chunk, seq_len)], cache=cache, step=step)
                  for t in range(prompt, seq_len, chunk)]
    assert cache.length == seq_len
    assert bool(torch.isfinite(full).all())
    torch.testing.assert_close(torch.cat(parts, dim=1), full, **TOL64)


# ---- 4. invalid configurations ----------------------------------------------------------------------------

Broken = tuple[dict[str, Any], tuple[str, ...]]  # (overrides of a valid config, names the message must hold)
Rule = Callable[[st.DataObject, dict[str, Any]], Broken]
NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])
NOT_A_NUMBER = st.sampled_from(["1.0", None, True, [1.0]])


def bad_int(data: st.DataObject, valid: dict[str, Any]) -> Broken:
    name = data.draw(st.sampled_from(POSITIVE_INTS + NONNEGATIVE_INTS))
    minimum = 1 if name in POSITIVE_INTS else 0
    value = data.draw(st.one_of(st.integers(-3, minimum - 1), st.just(float(max(valid[name], 1))), NOT_A_NUMBER))
    return {name: value}, (name,)


def bad_float(data: st.DataObject, valid: dict[str, Any]) -> Broken:
    """Non-finite, not a number, out of sign, or finite in float64 but inf (or 0) in float32 (check_real)."""
    name = data.draw(st.sampled_from((*POSITIVE_FLOATS, *NONNEGATIVE_FLOATS, "beta", "l_max")))
    out_of_float32 = st.sampled_from([3.5e38, -1e39, 1e300])
    if name == "beta":  # any sign, 0 included, and underflowing to 0 is no error
        value = data.draw(st.one_of(NON_FINITE, NOT_A_NUMBER, out_of_float32))
    elif name in NONNEGATIVE_FLOATS:
        value = data.draw(st.one_of(NON_FINITE, NOT_A_NUMBER, out_of_float32, floats(-1e6, -5e-324)))
    else:  # 0 and what float32 rounds to 0 too
        value = data.draw(st.one_of(NON_FINITE, NOT_A_NUMBER, out_of_float32, floats(-1e6, 0.0),
                               st.sampled_from([1e-300, 1e-46])))
    return {name: value}, (name,)


def odd_head_dim(data: st.DataObject, valid: dict[str, Any]) -> Broken:
    """RoPE rotates pairs: an odd head dim could never run the layer."""
    return {"head_dim": 2 * data.draw(st.integers(0, 8)) + 1}, ("head_dim",)


def heads_not_a_multiple(data: st.DataObject, valid: dict[str, Any]) -> Broken:
    kv_heads = data.draw(st.integers(2, 4))
    heads = kv_heads * data.draw(st.integers(0, 3)) + data.draw(st.integers(1, kv_heads - 1))
    return {"num_heads": heads, "num_kv_heads": kv_heads}, ("num_heads", "num_kv_heads")


def periods_out_of_order(data: st.DataObject, valid: dict[str, Any]) -> Broken:
    return {"l_max": valid["min_period"] * data.draw(floats(0.01, 1.0))}, ("l_max", "min_period")


def bad_choice(data: st.DataObject, valid: dict[str, Any]) -> Broken:
    """A near miss of a string from a closed set (case, spelling, a neighbour, empty, None)."""
    near: dict[str, list[Any]] = {
        "gate_kind": ["None", "Softplus", "gelu", ""], "representative": ["first", "LAST", "max", None],
        "bias_impl": ["qk-aug", "scoremod", "dense", None], "backend": ["cuda", "Flex", "triton ", ""],
    }
    name = data.draw(st.sampled_from(sorted(near)))
    return {name: data.draw(st.sampled_from(near[name]))}, (name,)


def bad_qk_align(data: st.DataObject, valid: dict[str, Any]) -> Broken:
    """16 or 32, as an int: 16.0 equals 16 but the layer's attention call refuses a float alignment."""
    return {"qk_align": data.draw(st.sampled_from([16.0, 32.0, 8, 64, 0, True, "16"]))}, ("qk_align",)


def bad_flag(data: st.DataObject, valid: dict[str, Any]) -> Broken:
    name = data.draw(st.sampled_from(["per_head_mlp", "pointer_mask"]))
    return {name: data.draw(st.sampled_from([1, 0, "yes", None]))}, (name,)


def bad_gumbel(data: st.DataObject, valid: dict[str, Any]) -> Broken:
    m = valid["num_pointers"]
    return {"gumbel_topk": data.draw(st.sampled_from([0, -1, m + 1, m + 5, 1.0, True]))}, ("gumbel_topk",)


def bad_schedule(data: st.DataObject, valid: dict[str, Any]) -> Broken:
    good = (8.0, 16.0, 10)
    spot = data.draw(st.integers(0, 2))
    value = data.draw(st.one_of(NON_FINITE, st.sampled_from([0.0, -2.0, "8"])) if spot < 2
                 else st.sampled_from([0, -1, 2.5, True]))
    broken: Any = (*good[:spot], value, *good[spot + 1:])
    broken = data.draw(st.sampled_from([broken, good[:2], (*good, 1), 8.0, "8,16,10"]))
    return {"delta_max_schedule": broken}, ("delta_max_schedule",)


def bad_entropy_floor(data: st.DataObject, valid: dict[str, Any]) -> Broken:
    value = data.draw(st.one_of(floats(1.0, 10.0).filter(lambda v: v > 1.0), floats(-10.0, -1e-9), NON_FINITE))
    return {"entropy_floor_frac": value}, ("entropy_floor_frac",)


def ramp_under_qk_aug(data: st.DataObject, valid: dict[str, Any]) -> Broken:
    overrides = {"bias_impl": "qk_aug", "gate_kind": data.draw(st.sampled_from([g for g in GATE_KINDS if g != "none"])),
                 "ramp_lambda": data.draw(floats(0.01, 2.0))}
    return overrides, ("bias_impl", "gate_kind", "ramp_lambda")


def triton_with_score_mod(data: st.DataObject, valid: dict[str, Any]) -> Broken:
    return {"backend": "triton", "bias_impl": "score_mod"}, ("backend", "bias_impl")


RULES: tuple[Rule, ...] = (
    bad_int, bad_float, odd_head_dim, heads_not_a_multiple, periods_out_of_order, bad_choice, bad_qk_align, bad_flag,
    bad_gumbel, bad_schedule, bad_entropy_floor, ramp_under_qk_aug, triton_with_score_mod,
)


@pytest.mark.parametrize("rule", RULES, ids=lambda rule: rule.__name__)
@given(st.data())
def test_a_config_that_breaks_one_rule_is_refused_by_name(rule: Rule, data: st.DataObject) -> None:
    valid = data.draw(valid_configs(), label="valid")
    overrides, names = rule(data, valid)
    ScopeConfig(**valid)  # the neighbour is valid: the error below is the broken value's
    with pytest.raises(ScopeConfigError) as refused:
        ScopeConfig(**{**valid, **overrides})
    assert all(name in str(refused.value) for name in names), (overrides, str(refused.value))


@given(valid_configs(), st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12))
def test_from_dict_refuses_an_unknown_key_by_name(valid: dict[str, Any], key: str) -> None:
    fields = ScopeConfig.__dataclass_fields__
    name = key if key not in fields else key + "_"
    assert ScopeConfig.from_dict(valid) == ScopeConfig(**valid)
    # the message lists the valid keys too: match the list of unknown ones, not a substring of a valid key
    with pytest.raises(ScopeConfigError, match=re.escape(f"key(s) ['{name}']")):
        ScopeConfig.from_dict({**valid, name: 1})
