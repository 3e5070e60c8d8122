"""ScopeAttention end to end: wiring against a dense float64 reference, causality, decode = prefill,
score_mod = qk_aug, the teacher signal moving pointers, telemetry, errors."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from reference import ref_rope

from bench.scope_pointer_toy import PERIOD, periodic_retrieval_layer_and_input, train_pointers
from scope import ScopeConfig, ScopeInputError
from scope.scope_attention import ScopeAttention, ScopeAux, ScopeKVCache
from scope.teacher import inclusion_probability, layer_teacher_loss, teacher_block_targets, teacher_loss
from scope.telemetry import ScopeTelemetry, scope_stats

F64 = torch.float64


def small_config(**overrides) -> ScopeConfig:
    values: dict[str, Any] = dict(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, num_pointers=2,
                                  num_freqs=6, l_max=4096.0, min_period=16.0, delta_max=96.0, mlp_hidden=16,
                                  block=8, budget=3, local_blocks=2, global_blocks=1, max_radius=1)
    values.update(overrides)
    return ScopeConfig(**values)


def make_layer(config: ScopeConfig, seed: int = 0, gain: float = 0.7) -> ScopeAttention:
    """A float64 layer whose bias is switched on (gain, the slope's output row and the ramp gate start at 0, which
    make it vanish): with gain != 0 the slope row is random too, so a c_scale reaches the logits."""
    torch.manual_seed(seed)
    layer = ScopeAttention(config).double().eval()
    with torch.no_grad():
        layer.spectral.pointer_head.gain.fill_(gain)
        if gain:
            slope_row = layer.spectral.pointer_head.w2[..., 5 * config.num_pointers]
            slope_row.copy_(torch.randn(slope_row.shape, dtype=slope_row.dtype) / math.sqrt(config.mlp_hidden))
        if layer.spectral.ramp_gate is not None:
            layer.spectral.ramp_gate.fill_(1.0 if gain else 0.0)
    return layer


def dense_reference(layer: ScopeAttention, x: torch.Tensor, allowed_blocks: torch.Tensor) -> torch.Tensor:
    """Plain float64 attention from the layer's weights: RoPE (the test suite's own), GQA by h // G,
    logits q.k/sqrt(D) + beta * b_i(i - j) (no bias for bias_impl none), keys restricted to causal tokens
    of the allowed key blocks (allowed_blocks bool [B, H, QB, QB], taken from the mask under test)."""
    c = layer.config
    batch, seq_len, _ = x.shape
    positions = torch.arange(seq_len)
    q = ref_rope(layer.q_proj(x).view(batch, seq_len, c.num_heads, c.head_dim), positions, c.rope_theta)
    k = ref_rope(layer.k_proj(x).view(batch, seq_len, c.num_kv_heads, c.head_dim), positions, c.rope_theta)
    v = layer.v_proj(x).view(batch, seq_len, c.num_kv_heads, c.head_dim)
    group = c.num_heads // c.num_kv_heads
    out = torch.zeros(batch, seq_len, c.num_heads, c.head_dim, dtype=F64)
    coeffs = layer.spectral.coefficients(layer.q_proj(x).view(batch, seq_len, c.num_heads, c.head_dim)
                                         .transpose(1, 2))
    delta = (positions[:, None] - positions[None, :]).to(F64)  # [T, T]
    bias = layer.spectral.bias(coeffs, delta[None, None].expand(batch, c.num_heads, -1, -1))
    token_block = positions // c.block
    for h in range(c.num_heads):
        scores = torch.einsum("btd,bsd->bts", q[:, :, h], k[:, :, h // group]) / math.sqrt(c.head_dim)
        if c.bias_impl != "none":  # bias_impl none: the pointer mask without the bias
            scores = scores + c.beta * bias[:, h]
        allowed = allowed_blocks[:, h][:, token_block][:, :, token_block] & (delta >= 0)
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[:, :, h] = torch.softmax(scores, dim=-1) @ v[:, :, h // group]
    return layer.o_proj(out.flatten(2))


def allowed_from_lists(kv_indices: torch.Tensor, num_blocks: int) -> torch.Tensor:
    lists = kv_indices.long()
    allowed = torch.zeros(*lists.shape[:3], num_blocks + 1, dtype=torch.bool)
    allowed.scatter_(-1, torch.where(lists >= 0, lists, num_blocks), True)
    return allowed[..., :num_blocks]


@pytest.mark.parametrize("bias_impl", ["score_mod", "qk_aug"])
@pytest.mark.parametrize("representative", ["last", "mean"])
def test_prefill_matches_dense_reference(bias_impl: str, representative: str) -> None:
    layer = make_layer(small_config(bias_impl=bias_impl, representative=representative, c_scale=0.2))
    x = torch.randn(2, 64, 32, dtype=F64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y, aux = layer(x, return_aux=True)
        reference = dense_reference(layer, x, allowed_from_lists(aux.pointer_mask.kv_indices, 8))
    torch.testing.assert_close(y, reference, rtol=1e-9, atol=1e-10)
    assert aux.coeffs.A.abs().max() > 1e-3  # the bias really is on


def test_ramp_and_sliding_fallback_match_dense_reference() -> None:
    config = small_config(gate_kind="softplus", ramp_lambda=0.5, ramp_width=16.0, ramp_tau=4.0, pointer_mask=False)
    layer = make_layer(config)
    x = torch.randn(1, 48, 32, dtype=F64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y, aux = layer(x, return_aux=True)
    qb = torch.arange(6)
    band = (qb[None, :] <= qb[:, None]) & (qb[None, :] > qb[:, None] - config.local_blocks)
    assert torch.equal(allowed_from_lists(aux.pointer_mask.kv_indices, 6)[0, 0], band)
    torch.testing.assert_close(y, dense_reference(layer, x, band.expand(1, 4, 6, 6)), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("representative", ["last", "mean"])
def test_causal_future_tokens_never_change_earlier_outputs(representative: str) -> None:
    """Includes the pointer choice: the representative of a block is the previous block, so changing
    tokens t' > t (even inside t's own block) changes neither t's keys nor its mask."""
    layer = make_layer(small_config(representative=representative))
    x = torch.randn(1, 64, 32, dtype=F64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base = layer(x)
        for t in (0, 5, 7, 8, 30, 45):
            changed = x.clone()
            changed[:, t + 1:] = torch.randn_like(changed[:, t + 1:]) * 3
            torch.testing.assert_close(layer(changed)[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("pointer_mask", [True, False])
def test_decode_token_by_token_equals_prefill(pointer_mask: bool) -> None:
    layer = make_layer(small_config(pointer_mask=pointer_mask, c_scale=0.1))
    x = torch.randn(2, 72, 32, dtype=F64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = layer(x)
        cache = layer.new_cache(2, 80)
        prompt = layer(x[:, :16], cache=cache)  # prefill two blocks
        steps = layer(x[:, 16:], cache=cache)  # then one token at a time
    torch.testing.assert_close(torch.cat((prompt, steps), dim=1), full, rtol=1e-9, atol=1e-10)
    assert cache.length == 72


def test_decode_from_empty_cache_and_capacity_error() -> None:
    layer = make_layer(small_config())
    x = torch.randn(1, 20, 32, dtype=F64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        cache = layer.new_cache(1, 20)
        steps = layer(x[:, :13], cache=cache)  # not a block multiple: decoded token by token
        torch.testing.assert_close(steps[:, :8], layer(x[:, :8]), rtol=1e-9, atol=1e-10)
        layer(x[:, 13:], cache=cache)
        with pytest.raises(ScopeInputError, match="capacity"):
            layer(x[:, :1], cache=cache)


def test_score_mod_and_qk_aug_give_the_same_outputs() -> None:
    x = torch.randn(1, 64, 32, dtype=F64, generator=torch.Generator().manual_seed(6))
    outs = []
    for bias_impl in ("score_mod", "qk_aug"):
        layer = make_layer(small_config(bias_impl=bias_impl, c_scale=0.3), seed=7)
        with torch.no_grad():
            outs.append(layer(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-9, atol=1e-10)


def test_fresh_layer_has_zero_bias() -> None:
    layer = make_layer(small_config(), gain=0.0)
    x = torch.randn(1, 32, 32, dtype=F64, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        _, aux = layer(x, return_aux=True)
    assert aux.coeffs.A.abs().max() == 0 and aux.coeffs.B.abs().max() == 0


def test_teacher_steps_move_pointers_to_a_planted_far_block() -> None:
    """A few teacher-distillation steps on the pointer head alone move D* toward a planted far block
    (160 tokens back for every query, bench/scope_pointer_toy.py) and raise that block's inclusion
    probability; the budget logits get gradient (the research code's never did)."""
    layer, x = periodic_retrieval_layer_and_input(256)
    q, k, _, _ = layer.project(x, torch.arange(256))
    target = teacher_block_targets(q, k, block=8, local_blocks=1, scale=layer.scale)
    rows = torch.arange(PERIOD // 8 + 1, 32)
    assert (target[0, 0, rows, rows - PERIOD // 8] > 0.25).all()  # the toy really plants the mass there

    history = train_pointers(steps=40)
    before, after = history[0], history[-1]
    assert after["dstar_distance_tokens"] < 0.5 * before["dstar_distance_tokens"]
    assert after["planted_inclusion"] > before["planted_inclusion"] + 0.3
    assert after["covered_teacher_mass"] > before["covered_teacher_mass"]


def test_teacher_loss_reaches_budget_logits() -> None:
    layer, x = periodic_retrieval_layer_and_input(256)
    layer_teacher_loss(layer, x).total.backward()
    budget_channels = slice(4 * 2, 5 * 2)  # output channels of the budget logits (M = 2)
    grad = layer.spectral.pointer_head.b2.grad
    assert grad is not None and grad[:, budget_channels].abs().sum() > 0


def test_telemetry_writes_run_cfg_and_truthful_stats(tmp_path: Path) -> None:
    config = small_config(budget=3, max_radius=1)
    layer = make_layer(config)
    x = torch.randn(1, 64, 32, dtype=F64, generator=torch.Generator().manual_seed(10))
    telemetry = ScopeTelemetry(tmp_path / "scope.jsonl", config, every=2)
    with torch.no_grad():
        _, aux = layer(x, return_aux=True)
    regs = layer.spectral.regularisers(aux.coeffs, 64)
    assert telemetry.log(1, aux, regs) is None
    record = telemetry.log(2, aux, regs, layer_teacher_loss(layer, x))
    assert record is not None
    lines = [json.loads(line) for line in (tmp_path / "scope.jsonl").read_text().splitlines()]
    assert [line["event"] for line in lines] == ["RUN_CFG", "SCOPE_STATS"]
    assert lines[0]["config"]["budget"] == 3
    stats = lines[1]
    # M = 2 peaks of at most 3 blocks each can take the whole budget of 3: nothing is lost.
    assert stats["budget_configured"] == 3 and stats["budget_used"]["alloc"] == 3
    assert {"kv_unique_blocks", "ptr_outside_local_frac", "ptr_radius_hist", "teacher_coverage"} <= set(stats)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda layer: layer(torch.randn(1, 12, 32, dtype=F64)), "multiple of block"),
        (lambda layer: layer(torch.randn(1, 16, 31, dtype=F64)), "hidden_size"),
        (lambda layer: layer(torch.randn(1, 8, 32, dtype=F64), cache=layer.new_cache(2, 16)), "batch"),
        (lambda layer: layer(torch.randn(1, 8, 32), cache=layer.new_cache(1, 16)), "float64"),
        (lambda layer: layer(torch.randn(1, 8, 32, dtype=F64), cache=layer.new_cache(1, 16),
                             doc_ids=torch.zeros(8, dtype=torch.long)), "doc_ids"),
    ],
)
def test_bad_inputs_raise(call, match) -> None:
    with pytest.raises(ScopeInputError, match=match):
        call(make_layer(small_config()))


@pytest.mark.parametrize(("seq_len", "queries", "block", "local_blocks", "heads", "kv_heads"),
                         [(40, 40, 8, 1, 4, 2), (24, 24, 4, 2, 3, 3), (16, 16, 16, 1, 2, 1), (72, 72, 8, 0, 2, 2),
                          (40, 16, 8, 1, 4, 2), (48, 4, 4, 2, 3, 1)])
def test_teacher_targets_equal_a_row_by_row_float64_reference(seq_len: int, queries: int, block: int,
                                                               local_blocks: int, heads: int, kv_heads: int) -> None:
    """SCOPE.md 3: each query row's causal softmax mass summed per key block, averaged over the query block's rows,
    the local band (and the causal future) zeroed, rows renormalised (0 where nothing is left); for the last
    ``queries`` rows of the sequence, each against its whole prefix. Written as loops over rows here; the op
    computes it through one SDPA call over block-indicator values."""
    gen = torch.Generator().manual_seed(seq_len + block + queries)
    q = torch.randn(2, heads, seq_len, 6, generator=gen, dtype=F64) * 2
    k = torch.randn(2, kv_heads, seq_len, 6, generator=gen, dtype=F64) * 2
    scale, blocks, first = 0.7, seq_len // block, seq_len - queries
    expected = torch.zeros(2, heads, queries // block, blocks, dtype=F64)
    for b in range(2):
        for h in range(heads):
            keys = k[b, h // (heads // kv_heads)]
            for t in range(first, seq_len):
                probs = torch.softmax(keys[: t + 1] @ q[b, h, t] * scale, dim=0)
                for j in range(t + 1):
                    expected[b, h, (t - first) // block, j // block] += probs[j] / block
            for row in range(queries // block):
                query_block = first // block + row
                expected[b, h, row, max(0, query_block - local_blocks + 1):] = 0
                total = expected[b, h, row].sum()
                expected[b, h, row] = expected[b, h, row] / total if total > 0 else 0
    got = teacher_block_targets(q[:, :, first:], k, block=block, local_blocks=local_blocks, scale=scale)
    assert got.dtype == F64
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    single = teacher_block_targets(q[:, :, first:].float(), k.float(), block=block, local_blocks=local_blocks,
                                   scale=scale)
    torch.testing.assert_close(single.double(), expected, rtol=1e-5, atol=1e-6)


def test_teacher_loss_of_the_last_rows_reaches_blocks_beyond_them() -> None:
    """The loss of the last query block against the whole prefix has a target on key blocks further back than the
    supervised rows span, and equals the loss computed on the whole sequence restricted to that block's row."""
    layer, x = periodic_retrieval_layer_and_input(256)
    tail = layer_teacher_loss(layer, x, queries=8)
    whole = layer_teacher_loss(layer, x)
    assert torch.isfinite(tail.total) and tail.total.requires_grad
    q, k, _, _ = layer.project(x, torch.arange(256))
    last_row = teacher_block_targets(q[:, :, -8:], k, block=8, local_blocks=1, scale=layer.scale)
    all_rows = teacher_block_targets(q, k, block=8, local_blocks=1, scale=layer.scale)
    torch.testing.assert_close(last_row, all_rows[:, :, -1:], rtol=1e-12, atol=1e-12)
    assert (last_row[0, 0, 0, : 256 // 8 - 2] > 0).any()  # mass before the row's own 8 tokens and local band
    assert not torch.equal(tail.total, whole.total)
    for bad in (12, 0, 264):  # not a block multiple, none, more than T
        with pytest.raises(ScopeInputError, match="teacher"):
            layer_teacher_loss(layer, x, queries=bad)


def test_inclusion_and_teacher_loss_equal_a_float64_loop_over_blocks() -> None:
    """scope.teacher's student and losses against a loop written from SCOPE.md section 3 and the module docstring:
    key block kb's interval [kb, kb + 1) has its middle at kb + 1/2; peak m covers it with sigmoid((radius_m -
    |kb + 1/2 - centre_m|) / tau), centre_m = (t_rep - D*_m) / block, radius_m = budget softmax(u / temp)_m / 2;
    the peaks combine by noisy-OR; causal blocks outside the local band only. Coverage: the mean over rows with
    teacher mass of -sum target log p; budget: the mean over rows of ((sum p - budget) / budget)^2."""
    gen = torch.Generator().manual_seed(7)
    batch, heads, query_blocks, peaks, num_blocks, block, budget, local, tau, temp = 2, 2, 3, 2, 6, 4, 3, 1, 0.5, 1.5
    d_star = torch.rand(batch, heads, query_blocks, peaks, generator=gen, dtype=F64) * 20
    logits = torch.randn(batch, heads, query_blocks, peaks, generator=gen, dtype=F64)
    t_rep = torch.tensor([15.0, 19.0, 23.0], dtype=F64)  # the last three of six blocks of 4 (their last tokens)
    got = inclusion_probability(d_star, logits, t_rep, block=block, budget=budget, budget_temp=temp, tau=tau,
                                local_blocks=local, num_blocks=num_blocks)
    want = torch.zeros(batch, heads, query_blocks, num_blocks, dtype=F64)
    for b, h, i, kb in itertools.product(range(batch), range(heads), range(query_blocks), range(num_blocks)):
        qb = num_blocks - query_blocks + i
        if kb > qb - local:
            continue
        share = [math.exp(float(u) / temp) for u in logits[b, h, i]]
        miss = 1.0
        for m in range(peaks):
            centre = (float(t_rep[i]) - float(d_star[b, h, i, m])) / block
            radius = budget * share[m] / sum(share) / 2
            miss *= 1 - 1 / (1 + math.exp(-(radius - abs(kb + 0.5 - centre)) / tau))
        want[b, h, i, kb] = 1 - miss
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)

    target = torch.rand(batch, heads, query_blocks, num_blocks, generator=gen, dtype=F64) * (want > 0)
    target[0, 0, 0] = 0.0  # a row without teacher mass: left out of the coverage mean
    target = target / target.sum(-1, keepdim=True).clamp_min(1e-30)
    loss = teacher_loss(target, got, budget, budget_weight=0.25)
    rows = [(b, h, i) for b, h, i in itertools.product(range(batch), range(heads), range(query_blocks))]
    with_mass = [r for r in rows if float(target[r].sum()) > 0]
    coverage = sum(-sum(float(target[r][kb]) * math.log(max(float(got[r][kb]), 1e-6)) for kb in range(num_blocks))
                   for r in with_mass) / len(with_mass)
    budget_term = sum(((float(got[r].sum()) - budget) / budget) ** 2 for r in rows) / len(rows)
    assert len(with_mass) == len(rows) - 1
    assert float(loss.coverage) == pytest.approx(coverage, rel=1e-12)
    assert float(loss.budget) == pytest.approx(budget_term, rel=1e-12)
    assert float(loss.total) == pytest.approx(coverage + 0.25 * budget_term, rel=1e-12)


# ---- rejected calls: typed errors naming the argument, and no state changed -----------------------------


def filled_cache(config: ScopeConfig, capacity: int = 40) -> ScopeKVCache:
    """A cache of config's layer holding 17 tokens (a prefill of 16, then one decode step: block lists kept)."""
    layer = make_layer(config, seed=3)
    cache = layer.new_cache(2, capacity)
    with torch.no_grad():
        layer(torch.randn(2, 16, 32, dtype=F64, generator=torch.Generator().manual_seed(11)), cache=cache)
        layer(torch.randn(2, 1, 32, dtype=F64, generator=torch.Generator().manual_seed(12)), cache=cache)
    return cache


def cache_state(cache: ScopeKVCache) -> tuple:
    lists = None if cache._block_lists is None else (cache._block_lists[0], cache._block_lists[1].clone())
    return (cache.k.clone(), cache.v.clone(), cache.d_star.clone(), cache.budget_logits.clone(), cache.length, lists)


def assert_same_state(before: tuple, after: tuple) -> None:
    *tensors, length, lists = before
    *now, now_length, now_lists = after
    assert all(torch.equal(a, b) for a, b in zip(tensors, now, strict=True)) and length == now_length
    assert (lists is None) == (now_lists is None)
    if lists is not None:
        assert lists[0] == now_lists[0] and torch.equal(lists[1], now_lists[1])


@pytest.mark.parametrize(
    ("cache_overrides", "tokens", "kwargs", "match"),
    [
        ({}, 1, {"step": -1}, "step must be"),
        ({}, 1, {"step": 1.5}, "step must be"),
        ({}, 3, {"step": True}, "step must be"),
        ({"block": 16}, 1, {}, r"block=16 \(layer: 8\)"),  # the cache's layout is another layer's
        ({"num_heads": 2, "num_kv_heads": 1}, 1, {}, r"num_kv_heads=1 \(layer: 2\)"),
        ({}, 30, {}, "capacity"),
    ],
)
def test_a_rejected_decode_changes_no_state(cache_overrides: dict, tokens: int, kwargs: dict, match: str) -> None:
    layer = make_layer(small_config())
    cache = filled_cache(small_config(**cache_overrides))
    before = cache_state(cache)
    with pytest.raises(ScopeInputError, match=match), torch.no_grad():
        layer(torch.randn(2, tokens, 32, dtype=F64), cache=cache, **kwargs)
    assert_same_state(before, cache_state(cache))


@pytest.mark.parametrize("filled", [True, False])
def test_an_empty_append_returns_nothing_and_changes_no_state(filled: bool) -> None:
    """As NSAAttention: T = 0 is a valid append (y [B, 0, hidden]), checked like any other."""
    layer = make_layer(small_config())
    cache = filled_cache(layer.config) if filled else layer.new_cache(2, 40)
    before = cache_state(cache)
    with torch.no_grad():
        y = layer(torch.randn(2, 0, 32, dtype=F64), cache=cache)
        with pytest.raises(ScopeInputError, match="step"):
            layer(torch.randn(2, 0, 32, dtype=F64), cache=cache, step=-1)
    assert y.shape == (2, 0, 32) and y.dtype == F64
    assert_same_state(before, cache_state(cache))


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (torch.randn(1, 16, 32), "x has dtype torch.float32 but the layer's parameters have dtype torch.float64"),
        (torch.ones(1, 16, 32, dtype=torch.long), "x must be a floating tensor"),
        ([[0.0] * 32] * 16, r"x must be \[B, T, hidden_size=32\], got list"),
        (torch.randn(1, 16, 32, dtype=F64, device="meta"), "x is on meta"),
    ],
)
def test_forward_checks_x_type_dtype_and_device(x, match: str) -> None:
    layer = make_layer(small_config())
    with pytest.raises(ScopeInputError, match=match):
        layer(x)
    cache = filled_cache(layer.config)
    before = cache_state(cache)
    with pytest.raises(ScopeInputError, match=match):
        layer(x, cache=cache)
    assert_same_state(before, cache_state(cache))


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((math.nan, 8), {}, "batch_size must be a positive int"),
        ((1.5, 8), {}, "batch_size must be a positive int"),
        ((True, 8), {}, "batch_size must be a positive int"),
        ((1, True), {}, "capacity must be a positive int"),
        ((1, 0), {}, "capacity must be a positive int"),
        ((1, 8), {"device": "gpu"}, "device='gpu' is not a torch device"),
        ((1, 8), {"dtype": torch.int64}, "dtype must be one of"),
        ((1, 8), {"dtype": "float32"}, "dtype must be one of"),
    ],
)
def test_cache_constructor_names_the_argument(args: tuple, kwargs: dict, match: str) -> None:
    with pytest.raises(ScopeInputError, match=match):
        ScopeKVCache(small_config(), *args, **kwargs)


def test_cache_constructor_rejects_a_missing_device_and_a_dict_config() -> None:
    if not torch.cuda.is_available():
        with pytest.raises(ScopeInputError, match="device='cuda': this torch build or machine has no cuda"):
            ScopeKVCache(small_config(), 1, 8, device="cuda")
    with pytest.raises(ScopeInputError, match="config must be a ScopeConfig, got dict"):
        ScopeKVCache(small_config().to_dict(), 1, 8)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tau": math.nan}, "tau must be a finite number"),
        ({"tau": 0.0}, "tau must be > 0"),
        ({"tau": -1.0}, "tau must be > 0"),
        ({"budget_weight": math.nan}, "budget_weight must be a finite number"),
        ({"budget_weight": math.inf}, "budget_weight must be a finite number"),
        ({"budget_weight": -1.0}, "budget_weight must be >= 0"),
        ({"queries": True}, "queries=True must be None or an int"),
        ({"queries": 16.0}, "queries=16.0 must be None or an int"),
        ({"step": -1}, "step must be"),
    ],
)
def test_layer_teacher_loss_names_the_argument(kwargs: dict, match: str) -> None:
    layer = make_layer(small_config())
    with pytest.raises(ScopeInputError, match=match):
        layer_teacher_loss(layer, torch.randn(1, 16, 32, dtype=F64), **kwargs)


def small_aux() -> tuple[ScopeAttention, ScopeAux]:
    layer = make_layer(small_config())
    with torch.no_grad():
        _, aux = layer(torch.randn(1, 32, 32, dtype=F64, generator=torch.Generator().manual_seed(13)),
                       return_aux=True)
    return layer, aux


@pytest.mark.parametrize("every", [1.5, math.nan, True, 0, "5", None])
def test_telemetry_every_must_be_a_positive_int(tmp_path: Path, every) -> None:
    with pytest.raises(ScopeInputError, match="every must be a positive int"):
        ScopeTelemetry(tmp_path / "scope.jsonl", small_config(), every=every)


def test_telemetry_steps_json_and_config_are_checked(tmp_path: Path) -> None:
    layer, aux = small_aux()
    telemetry = ScopeTelemetry(tmp_path / "scope.jsonl", layer.config, every=1)
    for step in (-1, 1.5, None):
        with pytest.raises(ScopeInputError, match=r"step must be an int >= 0"):
            telemetry.log(step, aux)  # type: ignore[arg-type]
    record = telemetry.log(3, aux, {"hf": torch.tensor(math.nan)})
    assert record is not None and math.isnan(record["reg_hf"])

    def no_constants(name: str) -> None:
        raise AssertionError(f"invalid JSON constant {name}")

    lines = [json.loads(line, parse_constant=no_constants)
             for line in (tmp_path / "scope.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and lines[1]["reg_hf"] is None and lines[1]["step"] == 3
    for overrides, field in (({"block": 4}, "block"), ({"num_heads": 2, "num_kv_heads": 1}, "num_heads"),
                             ({"num_pointers": 3}, "num_pointers")):
        with pytest.raises(ScopeInputError, match=f"config.{field}="):
            scope_stats(aux, small_config(**overrides))
    for field in ("budget", "local_blocks", "global_blocks"):
        with pytest.raises(ScopeInputError, match="does not match aux's mask lists"):
            scope_stats(aux, dataclasses.replace(layer.config, **{field: getattr(layer.config, field) + 1}))
    for args, words in (((None, layer.config), "aux must be a ScopeAux"), ((aux, {}), "config a ScopeConfig"),
                        ((aux, layer.config, {"hf": 1.0}), "regularisers must map"),
                        ((aux, layer.config, None, "teacher"), "teacher must be a TeacherLoss")):
        with pytest.raises(ScopeInputError, match=words):
            scope_stats(*args)
