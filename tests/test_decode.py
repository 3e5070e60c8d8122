"""Decode path of NSAAttention (NSA.md "Decode and its memory economics", invariants 1, 4 and 5).

`cache = layer.new_cache(B, capacity)`; `layer(x_chunk, cache=cache)` appends x_chunk [B, C, hidden]
to every sequence and returns the outputs at absolute positions cache.lengths[b] + c. Covered here:

- decode equals prefill, token by token, for the whole output and for each branch alone
  (gates forced one-hot), including the selected blocks;
- chunked prefill (any partition, any in-append query chunking) equals token-by-token and prefill;
- all of the above with default and static_shapes=True caches (capacity-bound scans);
- ragged batches (num_valid right padding): each sequence equals its own prefill, padding outputs
  are exactly zero and padding writes nothing;
- read counters: per step cmp = num_cmp(S), win = min(w, S), sel = tokens <= t of the selected
  blocks <= n*l', totals = sum of the steps, and the paper's 65536-token figure 4095 + 1024 + 512;
- errors: NSAInputError naming the problem, and the cache left untouched (every refused call,
  the decode backend refused by the dispatch included); an empty append changes nothing;
- causality in decode: later tokens never change earlier outputs.

Tolerance (float64, conftest.TOL64 = 1e-10): prefill and decode compute the same math on the same
inputs and differ only in reduction order / batching (BLAS blocking of other shapes, softmax rows
padded with masked columns), so their difference is O(K * eps) with K <= a few hundred terms and
eps = 1.1e-16, i.e. <= ~1e-13; 1e-10 leaves three orders of slack while a real decode bug (a wrong
key, a missing or extra block, a position off by one, a stale ring slot) moves outputs by >= 1e-3.
Selected block indices are compared exactly.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import pytest
import torch
from conftest import BLOCK_CONFIGS, F64, TOL64
from hypothesis import example, given, settings
from hypothesis import strategies as st

from nsa import NSAAttention, NSAConfig, NSAInputError

BRANCHES = ("cmp", "sel", "win")


# ----------------------------------------------------------------------------------------------
# formulas written from NSA.md (not the library's helpers)


def num_cmp(seq_len: int, l: int, d: int) -> int:
    """num_cmp(S) = 0 if S < l else floor((S - l) / d) + 1."""
    return 0 if seq_len < l else (seq_len - l) // d + 1


def sel_tokens_read(blocks: list[int], t: int, lp: int) -> int:
    """Tokens <= t inside the selected blocks (block j = [j*l', (j+1)*l'), -1 = unused slot)."""
    return sum(min(lp, t + 1 - j * lp) for j in blocks if j >= 0)


# ----------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """These tensors are tiny: one intra-op thread is faster, and on a shared 2-core box every
    multi-threaded op (conv1d of the Eq. 9 map especially) can stall ~17 ms waiting for a
    descheduled OpenMP worker, which made this file 3-4x slower. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_layer(config: NSAConfig, seed: int, dtype: torch.dtype = F64) -> NSAAttention:
    """A layer with every parameter redrawn from a seeded generator: projections ~ N(0, 1/fan_in),
    the phi MLP (whose output layer starts at zero, i.e. equal to mean pooling) fully random, and
    random gate biases so the three gates differ per head."""
    layer = NSAAttention(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if p.dim() == 2 and "position" not in name:
                std = 1.5 * p.shape[1] ** -0.5
            else:
                std = 0.5 if "position" in name else 1.0
            p.copy_(torch.randn(p.shape, generator=gen, dtype=F64) * std)
    return layer.to(dtype).eval()


def rand_x(batch: int, seq_len: int, hidden: int, seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, seq_len, hidden, generator=gen, dtype=F64).to(dtype)


def force_gates(layer: NSAAttention, branch: int) -> None:
    """Gates exactly one-hot on `branch` for every token and head: weight 0, bias +-1000 gives
    sigmoid(1000) == 1.0 and sigmoid(-1000) == 0.0 exactly in float64 (the brief's +-30 would leave
    ~1e-13 of the other branches, which is below the tolerance too, but exact is simpler)."""
    with torch.no_grad():
        layer.gate_proj.weight.zero_()
        bias = torch.full((layer.config.num_heads, 3), -1000.0, dtype=layer.gate_proj.bias.dtype)
        bias[:, branch] = 1000.0
        layer.gate_proj.bias.copy_(bias.flatten())


@torch.no_grad()
def prefill(layer: NSAAttention, x: torch.Tensor):
    return layer(x, return_aux=True)


@torch.no_grad()
def decode_token_by_token(layer: NSAAttention, x: torch.Tensor, capacity: int | None = None,
                          static_shapes: bool = False):
    """Feed x one token at a time through a fresh cache. Returns (y, block_indices, gates, cache,
    per-step last_reads [B, T, Hkv, 3])."""
    batch, seq_len, _ = x.shape
    cache = layer.new_cache(batch, capacity or seq_len, static_shapes=static_shapes)
    ys, blocks, gates, reads = [], [], [], []
    for t in range(seq_len):
        assert cache.lengths == [t] * batch
        y, aux = layer(x[:, t : t + 1], return_aux=True, cache=cache)
        ys.append(y)
        blocks.append(aux.block_indices)
        gates.append(aux.gates)
        assert cache.last_reads is not None
        reads.append(cache.last_reads.clone())
    assert cache.lengths == [seq_len] * batch
    return torch.cat(ys, 1), torch.cat(blocks, 1), torch.cat(gates, 1), cache, torch.cat(reads, 1)


def cache_state(cache) -> dict:
    """A deep copy of everything a cache holds (tensors cloned, lists copied)."""
    state: dict[str, Any] = {}
    for name, value in vars(cache).items():
        if isinstance(value, torch.Tensor):
            state[name] = value.clone()
        elif isinstance(value, list):
            state[name] = list(value)
        else:
            state[name] = value
    return state


def assert_same_state(cache, state: dict) -> None:
    now = vars(cache)
    assert set(now) == set(state)
    for name, before in state.items():
        after = now[name]
        if isinstance(before, torch.Tensor):
            assert isinstance(after, torch.Tensor) and torch.equal(after, before), f"cache.{name} changed"
        else:
            assert after == before, f"cache.{name} changed: {before!r} -> {after!r}"


# ----------------------------------------------------------------------------------------------
# strategies


@st.composite
def decode_configs(draw, max_extra: int = 2):
    """(config, T, B, seed) with d | l, d | l', n >= 3, G in {1, 2, 4}, and T crossing l, d, l',
    w and n*l' (T > (n+1)*l' so top-n must drop complete candidates; w < T)."""
    l, d, lp = draw(st.sampled_from(BLOCK_CONFIGS))
    n = draw(st.integers(3, 5))
    min_t = max(l, (n + 1) * lp) + 1
    seq_len = draw(st.integers(min_t, min_t + max_extra * lp))
    window = draw(st.one_of(st.sampled_from([1, 2, l, lp, lp + 1]), st.integers(1, seq_len - 1)))
    kv_heads = draw(st.sampled_from([1, 2]))
    config = NSAConfig(
        hidden_size=draw(st.sampled_from([8, 12])),
        num_heads=draw(st.sampled_from([1, 2, 4])) * kv_heads,
        num_kv_heads=kv_heads,
        head_dim=draw(st.sampled_from([4, 6])),
        head_dim_v=draw(st.sampled_from([3, 4])),
        cmp_block_size=l, cmp_stride=d, sel_block_size=lp, num_selected=n, window_size=window,
        compression=draw(st.sampled_from(["mean", "mlp"])),
        compression_hidden=8,
        shared_kv=draw(st.booleans()),
    )
    return config, seq_len, draw(st.sampled_from([1, 2])), draw(st.integers(0, 2**31 - 1))


def _explicit_case(l, d, lp, n, w, seq_len, compression, shared_kv, group, kv_heads, seed):
    config = NSAConfig(hidden_size=12, num_heads=group * kv_heads, num_kv_heads=kv_heads, head_dim=6, head_dim_v=4,
                       cmp_block_size=l, cmp_stride=d, sel_block_size=lp, num_selected=n, window_size=w,
                       compression=compression, compression_hidden=8, shared_kv=shared_kv)
    return config, seq_len, 2, seed


# Always run as well: the paper's 32/16/64 proportions scaled to 8/4/16 (T = 101 > 6*l'), and l > l'.
PAPER_SCALED = _explicit_case(8, 4, 16, 5, 24, 101, "mlp", False, 4, 2, 11)
L_GT_LP = _explicit_case(8, 4, 4, 3, 7, 30, "mean", True, 2, 1, 12)


# ----------------------------------------------------------------------------------------------
# 1. decode equals prefill


@settings(max_examples=20)
@given(case=decode_configs(), extra_capacity=st.sampled_from([0, 5]), static=st.booleans())
@example(case=PAPER_SCALED, extra_capacity=0, static=False)
@example(case=L_GT_LP, extra_capacity=5, static=True)
def test_decode_token_by_token_equals_prefill(case, extra_capacity, static):
    """Invariant 4: outputs, selected blocks and gates of token-by-token decode equal prefill at
    every position (capacity larger than needed must not matter, nor static_shapes caches, which
    scan capacity-bound block ranges)."""
    config, seq_len, batch, seed = case
    layer = make_layer(config, seed)
    x = rand_x(batch, seq_len, config.hidden_size, seed + 1)
    y_ref, aux_ref = prefill(layer, x)
    y, blocks, gates, _, _ = decode_token_by_token(layer, x, seq_len + extra_capacity, static)
    torch.testing.assert_close(y, y_ref, **TOL64)
    assert torch.equal(blocks, aux_ref.block_indices)
    torch.testing.assert_close(gates, aux_ref.gates, **TOL64)


@settings(max_examples=8)
@given(case=decode_configs(max_extra=1))
@example(case=PAPER_SCALED)
def test_decode_equals_prefill_per_branch(case):
    """Each branch alone (gates forced one-hot) decodes to its prefill output; the selected blocks
    agree as well (they are computed from the cmp scores whatever the gates)."""
    config, seq_len, batch, seed = case
    x = rand_x(batch, seq_len, config.hidden_size, seed + 1)
    outputs = []
    for branch in range(3):
        layer = make_layer(config, seed)
        force_gates(layer, branch)
        y_ref, aux_ref = prefill(layer, x)
        one_hot = torch.zeros(3, dtype=F64)
        one_hot[branch] = 1.0
        assert torch.equal(aux_ref.gates, one_hot.expand_as(aux_ref.gates)), "gates are not exactly one-hot"
        y, blocks, _, _, _ = decode_token_by_token(layer, x)

        def message(m: str, b: str = BRANCHES[branch]) -> str:
            return f"branch {b}: {m}"

        torch.testing.assert_close(y, y_ref, **TOL64, msg=message)
        assert torch.equal(blocks, aux_ref.block_indices), f"branch {BRANCHES[branch]}: selected blocks differ"
        outputs.append(y_ref)
    # The branches really are isolated: their outputs differ from each other.
    assert not torch.allclose(outputs[0], outputs[1]) and not torch.allclose(outputs[1], outputs[2])


# ----------------------------------------------------------------------------------------------
# 2. chunked prefill


@settings(max_examples=15)
@given(
    case=decode_configs(max_extra=1),
    cuts=st.sets(st.integers(1, 200), max_size=6),
    query_chunk=st.sampled_from([None, 1, 3]),
    static=st.booleans(),
)
@example(case=PAPER_SCALED, cuts={5, 40, 41, 90}, query_chunk=7, static=False)
def test_chunked_prefill_equals_token_by_token_and_prefill(case, cuts, query_chunk, static):
    """Any partition of the sequence into appends (chunks larger than l, l', w included; the
    layer's own query chunking inside one append too) gives the prefill outputs and blocks, the
    same cache contents and the same read totals as token-by-token decode."""
    config, seq_len, batch, seed = case
    config = NSAConfig(**{**config.to_dict(), "query_chunk_size": query_chunk})
    layer = make_layer(config, seed)
    x = rand_x(batch, seq_len, config.hidden_size, seed + 1)
    # Each drawn cut lands inside the sequence (1 .. T - 1; those already there stay where they are): cuts kept only
    # where below T left 83% of the drawn cases a single append.
    bounds = [0, *sorted({(c - 1) % (seq_len - 1) + 1 for c in cuts}), seq_len]

    y_ref, aux_ref = prefill(layer, x)
    y_tok, blocks_tok, _, cache_tok, _ = decode_token_by_token(layer, x)
    cache = layer.new_cache(batch, seq_len, static_shapes=static)
    ys, blocks = [], []
    with torch.no_grad():
        for a, b in itertools.pairwise(bounds):
            y, aux = layer(x[:, a:b], return_aux=True, cache=cache, start_positions=[a] * batch)
            ys.append(y)
            blocks.append(aux.block_indices)
            assert cache.lengths == [b] * batch
            assert cache.last_reads is not None
            assert cache.last_reads.shape == (batch, b - a, config.num_kv_heads, 3)
    y_chunk = torch.cat(ys, 1)
    torch.testing.assert_close(y_chunk, y_ref, **TOL64)
    torch.testing.assert_close(y_chunk, y_tok, **TOL64)
    assert torch.equal(torch.cat(blocks, 1), aux_ref.block_indices)
    assert torch.equal(blocks_tok, aux_ref.block_indices)
    assert torch.equal(cache.total_reads, cache_tok.total_reads)
    for name in ("k_sel", "v_sel", "k_win", "v_win", "k_cmp", "v_cmp", "k_cmp_raw", "v_cmp_raw"):
        # discard row (last) excluded: it only ever holds dropped writes
        torch.testing.assert_close(getattr(cache, name)[:, :-1], getattr(cache_tok, name)[:, :-1], **TOL64)


# ----------------------------------------------------------------------------------------------
# 3. ragged batch


@st.composite
def ragged_cases(draw):
    """A batch of 3 sequences: a padded prompt append, then decode steps (C = 1, some sequences
    idle) and a few ragged chunks."""
    l, d, lp = draw(st.sampled_from(BLOCK_CONFIGS))
    kv_heads = draw(st.sampled_from([1, 2]))
    config = NSAConfig(
        hidden_size=8, num_heads=kv_heads * draw(st.sampled_from([1, 2, 4])), num_kv_heads=kv_heads,
        head_dim=4, head_dim_v=3, cmp_block_size=l, cmp_stride=d, sel_block_size=lp,
        num_selected=draw(st.integers(3, 4)), window_size=draw(st.integers(1, 3 * lp)),
        compression=draw(st.sampled_from(["mean", "mlp"])), compression_hidden=8, shared_kv=draw(st.booleans()),
        query_chunk_size=draw(st.sampled_from([None, 2])),
    )
    prompt_c = draw(st.integers(1, 4 * lp))
    appends = [(prompt_c, [draw(st.integers(0, prompt_c)) for _ in range(3)])]
    appends[0][1][draw(st.integers(0, 2))] = prompt_c  # the longest prompt fills the chunk
    for _ in range(draw(st.integers(3, 12))):
        chunk = draw(st.one_of(st.just(1), st.just(1), st.integers(1, 2 * lp)))
        appends.append((chunk, [draw(st.one_of(st.just(chunk), st.integers(0, chunk))) for _ in range(3)]))
    return config, appends, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=15)
@given(case=ragged_cases(), extra_capacity=st.sampled_from([0, 3]), static=st.booleans())
def test_ragged_batch(case, extra_capacity, static):
    """Sequences of different lengths share appends via num_valid (right padding): each sequence's
    outputs equal its own single-sequence prefill, padding outputs are exactly zero, lengths
    advance by num_valid, padding reads nothing and writes nothing (different padding garbage
    leaves every output and every non-discard cache row bitwise identical)."""
    config, appends, seed = case
    layer = make_layer(config, seed)
    totals = [sum(nv[b] for _, nv in appends) for b in range(3)]
    capacity = max(totals) + extra_capacity

    xs = [rand_x(3, chunk, config.hidden_size, seed + 10 + i) for i, (chunk, _) in enumerate(appends)]
    runs = []
    for garbage_seed in (1, 2):
        cache = layer.new_cache(3, capacity, static_shapes=static)
        ys = []
        with torch.no_grad():
            for i, ((chunk, valid), x) in enumerate(zip(appends, xs, strict=True)):
                x = x.clone()
                noise = rand_x(3, chunk, config.hidden_size, 1000 * garbage_seed + i) * 5
                for b in range(3):
                    x[b, valid[b] :] = noise[b, valid[b] :]
                before = list(cache.lengths)
                start = list(before) if i % 2 else None
                y = layer(x, cache=cache, num_valid=valid, start_positions=start)
                assert cache.lengths == [n0 + n for n0, n in zip(before, valid, strict=True)]
                assert cache.last_reads is not None
                for b in range(3):
                    assert torch.equal(y[b, valid[b] :], torch.zeros_like(y[b, valid[b] :])), "padding output != 0"
                    assert (cache.last_reads[b, valid[b] :] == 0).all(), "padding query counted reads"
                ys.append(y)
        assert cache.lengths == totals
        runs.append((ys, cache))

    (ys, cache), (ys2, cache2) = runs
    for y, y2 in zip(ys, ys2, strict=True):
        assert torch.equal(y, y2), "padding values changed an output"
    for name, value in vars(cache).items():
        if isinstance(value, torch.Tensor) and name.startswith(("k_", "v_")):
            assert torch.equal(value[:, :-1], getattr(cache2, name)[:, :-1]), f"padding wrote into cache.{name}"

    for b in range(3):
        if totals[b] == 0:
            assert (cache.total_reads[b] == 0).all()
            continue
        tokens = torch.cat([x[b, : nv[b]] for x, (_, nv) in zip(xs, appends, strict=True)])[None]
        outs = torch.cat([y[b, : nv[b]] for y, (_, nv) in zip(ys, appends, strict=True)])[None]
        y_ref, _ = prefill(layer, tokens)

        def message(m: str, b: int = b) -> str:
            return f"sequence {b}: {m}"

        torch.testing.assert_close(outs, y_ref, **TOL64, msg=message)
        # counters do not depend on batching: one single-sequence append reads the same in total
        single = layer.new_cache(1, totals[b])
        with torch.no_grad():
            layer(tokens, cache=single)
        assert torch.equal(cache.total_reads[b], single.total_reads[0])


def test_ragged_padding_values_never_matter_even_nan():
    """Padding 'reads and writes nothing': its content (even NaN) must not reach any valid output,
    and padding outputs are zero."""
    config = NSAConfig(hidden_size=8, num_heads=2, num_kv_heads=1, head_dim=4, head_dim_v=4, cmp_block_size=4,
                       cmp_stride=2, sel_block_size=4, num_selected=3, window_size=5)
    layer = make_layer(config, 0)
    x = rand_x(2, 10, 8, 1)
    y_ref, _ = prefill(layer, x[1:, :6])
    x[1, 6:] = float("nan")
    with torch.no_grad():
        y = layer(x, cache=layer.new_cache(2, 10), num_valid=[10, 6])
    torch.testing.assert_close(y[1:, :6], y_ref, **TOL64)
    assert torch.equal(y[1, 6:], torch.zeros_like(y[1, 6:]))


# ----------------------------------------------------------------------------------------------
# 4. read counters


@settings(max_examples=12)
@given(case=decode_configs(), prompt_frac=st.sampled_from([0.0, 0.3, 0.6]), static=st.booleans())
@example(case=PAPER_SCALED, prompt_frac=0.3, static=False)
@example(case=L_GT_LP, prompt_frac=0.0, static=True)
def test_read_counters_per_step(case, prompt_frac, static):
    """Invariant 5: for every query of every append (a prompt through the cache, then one token per
    step), with S = t + 1 tokens in context: cmp reads = num_cmp(S), win = min(w, S), sel = the
    tokens <= t of the blocks in aux.block_indices (<= n*l'); total_reads = the sum of the steps."""
    config, seq_len, batch, seed = case
    l, d, lp, n, w = (config.cmp_block_size, config.cmp_stride, config.sel_block_size, config.num_selected,
                      config.window_size)
    layer = make_layer(config, seed)
    x = rand_x(batch, seq_len, config.hidden_size, seed + 1)
    prompt = int(prompt_frac * seq_len)
    cache = layer.new_cache(batch, seq_len + 3, static_shapes=static)
    appends = ([(0, prompt)] if prompt else []) + [(t, t + 1) for t in range(prompt, seq_len)]
    summed = torch.zeros(batch, config.num_kv_heads, 3, dtype=torch.long)
    saw_full_selection = False
    with torch.no_grad():
        for a, b in appends:
            _, aux = layer(x[:, a:b], return_aux=True, cache=cache)
            reads = cache.last_reads
            assert reads is not None
            assert reads.shape == (batch, b - a, config.num_kv_heads, 3) and reads.dtype == torch.long
            summed += reads.sum(dim=1)
            all_blocks, all_reads = aux.block_indices.tolist(), reads.tolist()
            for bb, c, h in itertools.product(range(batch), range(b - a), range(config.num_kv_heads)):
                t = a + c
                s = t + 1
                blocks = all_blocks[bb][c][h]
                chosen = [j for j in blocks if j >= 0]
                assert all(j * lp <= t for j in chosen), f"future block selected at t={t}: {blocks}"
                assert len(set(chosen)) == len(chosen) <= n
                expected = [num_cmp(s, l, d), sel_tokens_read(blocks, t, lp), min(w, s)]
                assert all_reads[bb][c][h] == expected, (t, blocks)
                assert expected[1] <= n * lp
                saw_full_selection |= expected[1] == n * lp
    assert torch.equal(cache.total_reads, summed)
    assert saw_full_selection  # T > (n+1)*l': some step read n full blocks


def _paper_blocks_single_step(seq_len: int):
    """Prefill seq_len - 1 tokens of a tiny-width layer with the paper's block sizes through the
    cache (float32, mean phi) in one append, decode one token (timings printed; run with -s);
    return (cache, aux of the decode step)."""
    config = NSAConfig(hidden_size=16, num_heads=1, num_kv_heads=1, head_dim=8, head_dim_v=8, compression="mean")
    assert (config.cmp_block_size, config.cmp_stride, config.sel_block_size, config.num_selected,
            config.window_size) == (32, 16, 64, 16, 512)
    layer = make_layer(config, 0, dtype=torch.float32)
    x = rand_x(1, seq_len, 16, 1, dtype=torch.float32)
    cache = layer.new_cache(1, seq_len)
    with torch.inference_mode():
        start = time.perf_counter()
        layer(x[:, :-1], cache=cache)
        middle = time.perf_counter()
        y, aux = layer(x[:, -1:], return_aux=True, cache=cache)
        end = time.perf_counter()
    print(f"S={seq_len}: cached prefill {middle - start:.1f} s, decode step {end - middle:.4f} s")
    assert torch.isfinite(y).all() and cache.lengths == [seq_len]
    return cache, aux


def _check_paper_step(cache, aux, seq_len: int, expected_cmp: int) -> None:
    l, d, lp, n, w = 32, 16, 64, 16, 512
    assert num_cmp(seq_len, l, d) == expected_cmp
    step = cache.last_reads[0, 0, 0].tolist()
    assert step == [expected_cmp, n * lp, w]
    blocks = aux.block_indices[0, 0, 0].tolist()
    last = (seq_len - 1) // lp
    assert len(set(blocks)) == n and min(blocks) >= 0 and {0, last - 1, last} <= set(blocks)
    # Totals over all seq_len queries: cmp and win follow the formula exactly, sel is bounded.
    total = cache.total_reads[0, 0].tolist()
    assert total[0] == sum(num_cmp(s, l, d) for s in range(1, seq_len + 1))
    assert total[2] == sum(min(w, s) for s in range(1, seq_len + 1))
    assert total[1] <= sum(min(n * lp, s) for s in range(1, seq_len + 1))


def test_reads_at_65536_match_paper():
    """NSA.md: one decode step at S = 65536 with l=32, d=16, l'=64, n=16, w=512 reads
    4095 + 1024 + 512 = 5631 tokens, 11.6x fewer than dense. The 65535-token prompt goes through
    the cache in one append: ~8-15 s on the 2-core CPU box (single thread, shared box), so it
    stays in the default run (the brief's threshold for `long` was ~30 s)."""
    seq_len = 65536
    cache, aux = _paper_blocks_single_step(seq_len)
    _check_paper_step(cache, aux, seq_len, 4095)
    reads = sum(cache.last_reads[0, 0, 0].tolist())
    assert reads == 5631
    assert round(seq_len / reads, 1) == 11.6


def test_reads_at_8192_paper_blocks():
    """The same at S = 8192 (511 + 1024 + 512 = 2047; ~1 s): a second point of the formula, and the
    fallback if the 65536 test is ever moved to `long`."""
    cache, aux = _paper_blocks_single_step(8192)
    _check_paper_step(cache, aux, 8192, 511)
    assert sum(cache.last_reads[0, 0, 0].tolist()) == 2047


# ----------------------------------------------------------------------------------------------
# 5. errors

ERR_CONFIG = NSAConfig(hidden_size=8, num_heads=2, num_kv_heads=1, head_dim=4, head_dim_v=4, cmp_block_size=4,
                       cmp_stride=2, sel_block_size=4, num_selected=3, window_size=3)
CAPACITY = 12
PRIMED = 7  # tokens already in each sequence before the bad call (buffers hold data, ring wrapped)


def _bad_calls():
    other = NSAConfig(**{**ERR_CONFIG.to_dict(), "window_size": 4})

    def x1(layer, dtype=F64):
        return rand_x(2, 1, 8, 99, dtype)

    return {
        "past capacity": (lambda layer, cache: layer(rand_x(2, 6, 8, 5), cache=cache), r"past the cache capacity"),
        "past capacity, one sequence": (
            lambda layer, cache: layer(rand_x(2, 6, 8, 5), cache=cache, num_valid=[5, 6]), r"sequence 1 .*capacity"),
        "batch mismatch": (lambda layer, cache: layer(rand_x(3, 1, 8, 5), cache=cache), r"batch 3 .*2 sequences"),
        "batch 0": (lambda layer, cache: layer(rand_x(0, 1, 8, 5), cache=cache), r"batch 0 .*2 sequences"),
        "x dtype != layer dtype": (lambda layer, cache: layer(x1(layer, torch.float32), cache=cache),
                                   r"x has dtype torch.float32 .*parameters have dtype torch.float64"),
        "x dtype != cache dtype": (
            lambda layer, cache: make_layer(ERR_CONFIG, 0, torch.float32)(x1(layer, torch.float32), cache=cache),
            r"dtype torch.float32 but the cache stores torch.float64"),
        "device mismatch": (lambda layer, cache: layer(torch.empty(2, 1, 8, dtype=F64, device="meta"), cache=cache),
                            r"x is on meta but the layer's parameters are on cpu"),
        "start_positions backwards": (lambda layer, cache: layer(x1(layer), cache=cache,
                                                                 start_positions=[PRIMED, PRIMED - 1]),
                                      r"start_positions\[1\].*backwards"),
        "start_positions skips ahead": (lambda layer, cache: layer(x1(layer), cache=cache,
                                                                   start_positions=[PRIMED + 1, PRIMED]),
                                        r"start_positions\[0\].*skips"),
        "start_positions wrong length": (lambda layer, cache: layer(x1(layer), cache=cache, start_positions=[PRIMED]),
                                         r"start_positions must give 2"),
        "start_positions not ints": (lambda layer, cache: layer(x1(layer), cache=cache,
                                                                start_positions=[float(PRIMED), PRIMED]),
                                     r"start_positions must give 2 ints"),
        "num_valid negative": (lambda layer, cache: layer(x1(layer), cache=cache, num_valid=[-1, 1]), r"num_valid"),
        "num_valid > C": (lambda layer, cache: layer(x1(layer), cache=cache, num_valid=[1, 2]), r"num_valid.*C=1"),
        "num_valid wrong length": (lambda layer, cache: layer(x1(layer), cache=cache, num_valid=[1]),
                                   r"num_valid must give 2"),
        "num_valid not ints": (lambda layer, cache: layer(rand_x(2, 2, 8, 5), cache=cache, num_valid=[1.5, 1]),
                               r"num_valid must give 2 ints"),
        "wrong hidden size": (lambda layer, cache: layer(rand_x(2, 1, 6, 5), cache=cache), r"hidden_size=8"),
        "x not 3-D": (lambda layer, cache: layer(rand_x(2, 1, 8, 5)[:, 0], cache=cache), r"x must be \[B, T"),
        "cache of another config": (lambda layer, cache: make_layer(other, 0)(x1(layer), cache=cache),
                                    r"different NSAConfig"),
        "fill_random_ on a primed cache": (lambda layer, cache: cache.fill_random_(3), r"needs an empty cache"),
    }


BAD_CALLS = _bad_calls()


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_append_errors_leave_cache_untouched(case):
    """Each bad append raises NSAInputError naming the problem, and nothing in the cache (buffers,
    lengths, counters) changes; the cache then still decodes exactly like prefill."""
    call, message = BAD_CALLS[case]
    layer = make_layer(ERR_CONFIG, 0)
    x = rand_x(2, PRIMED + 2, 8, 1)
    cache = layer.new_cache(2, CAPACITY)
    with torch.no_grad():
        y_head = layer(x[:, :PRIMED], cache=cache)
        state = cache_state(cache)
        with pytest.raises(NSAInputError, match=message):
            call(layer, cache)
        assert_same_state(cache, state)
        y_tail = torch.cat([layer(x[:, t : t + 1], cache=cache) for t in range(PRIMED, PRIMED + 2)], 1)
    y_ref, _ = prefill(layer, x)
    torch.testing.assert_close(torch.cat((y_head, y_tail), 1), y_ref, **TOL64)


def test_capacity_is_counted_in_valid_tokens():
    """Filling the cache exactly is fine, padding beyond capacity is fine (it writes nothing), and
    the first token past capacity is refused."""
    layer = make_layer(ERR_CONFIG, 0)
    cache = layer.new_cache(2, 4)
    with torch.no_grad():
        layer(rand_x(2, 3, 8, 1), cache=cache)
        layer(rand_x(2, 3, 8, 2), cache=cache, num_valid=[1, 0])  # C past capacity, valid tokens not
        layer(rand_x(2, 1, 8, 3), cache=cache, num_valid=[0, 1])
        assert cache.lengths == [4, 4]
        state = cache_state(cache)
        with pytest.raises(NSAInputError, match=r"sequence 0 would reach 5 tokens, past the cache capacity 4"):
            layer(rand_x(2, 1, 8, 4), cache=cache, num_valid=[1, 0])
    assert_same_state(cache, state)


@pytest.mark.parametrize(
    ("dtype", "grad", "reason"),
    [(torch.float32, False, r"tensors are on cpu, not CUDA"),
     (F64, False, r"dtype torch.float64 is not one of"),
     (torch.float32, True, r"gradients are required")],
    ids=["cpu without interpreter", "float64", "gradients"],
)
def test_refused_triton_decode_step_leaves_cache_untouched(monkeypatch, dtype, grad, reason):
    """backend="triton" that cannot run a decode step raises NSAInputError with the reason before
    anything is written (it used to write six buffers first). TRITON_INTERPRET is switched off so that
    CPU tensors are refused as they are for a user without a GPU; a multi-token append takes the
    chunk path (no backend choice), so the cache can be primed with the same layer."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    layer = make_layer(NSAConfig(**{**ERR_CONFIG.to_dict(), "backend": "triton"}), 0, dtype)
    x = rand_x(2, PRIMED + 1, 8, 1, dtype)
    cache = layer.new_cache(2, CAPACITY)
    with torch.no_grad():
        layer(x[:, :PRIMED], cache=cache)
    state = cache_state(cache)
    with torch.set_grad_enabled(grad), pytest.raises(NSAInputError, match=r"backend='triton' cannot run .*" + reason):
        layer(x[:, PRIMED:], cache=cache)
    assert_same_state(cache, state)


@pytest.mark.parametrize("num_valid", [None, [0, 0]])
def test_empty_append_returns_empty_and_changes_nothing(num_valid):
    """An append of C = 0 tokens (documented: empty in, empty out) returns y [B, 0, hidden] and aux of
    the documented shapes, and leaves the cache exactly as it was; decoding then matches prefill."""
    layer = make_layer(ERR_CONFIG, 0)
    x = rand_x(2, PRIMED + 2, 8, 1)
    cache = layer.new_cache(2, CAPACITY)
    with torch.no_grad():
        y_head = layer(x[:, :PRIMED], cache=cache)
        state = cache_state(cache)
        y, aux = layer(x[:, :0], return_aux=True, cache=cache, num_valid=num_valid, start_positions=[PRIMED] * 2)
        assert y.shape == (2, 0, 8) and aux.block_indices.shape == (2, 0, 1, 3) and aux.gates.shape == (2, 0, 2, 3)
        assert_same_state(cache, state)
        y_tail = layer(x[:, PRIMED:], cache=cache)
    torch.testing.assert_close(torch.cat((y_head, y_tail), 1), prefill(layer, x)[0], **TOL64)


# ----------------------------------------------------------------------------------------------
# 6. causality in decode


@settings(max_examples=12)
@given(case=decode_configs(max_extra=1), data=st.data())
def test_decode_causality(case, data):
    """Invariant 1 in decode: replacing every token after t changes no output at positions <= t,
    whether t's token arrives alone or inside a chunk with later tokens (the perturbed tokens are
    then in the same append), and outputs already returned never change as decoding continues."""
    config, seq_len, batch, seed = case
    layer = make_layer(config, seed)
    x = rand_x(batch, seq_len, config.hidden_size, seed + 1)
    t = data.draw(st.integers(0, seq_len - 2), label="t")
    cuts = data.draw(st.sets(st.integers(1, seq_len - 1), max_size=4), label="cuts")
    bounds = [0, *sorted(cuts), seq_len]
    x2 = x.clone()
    x2[:, t + 1 :] = rand_x(batch, seq_len - t - 1, config.hidden_size, seed + 2) * 3

    def run(inp):
        cache = layer.new_cache(batch, seq_len)
        ys, snapshots = [], []
        with torch.no_grad():
            for a, b in itertools.pairwise(bounds):
                y = layer(inp[:, a:b], cache=cache)
                ys.append(y)
                snapshots.append(y.clone())
        for y, snap in zip(ys, snapshots, strict=True):
            assert torch.equal(y, snap), "a returned output changed while decoding continued"
        return torch.cat(ys, 1)

    y1, y2 = run(x), run(x2)
    torch.testing.assert_close(y2[:, : t + 1], y1[:, : t + 1], rtol=0, atol=1e-12)
    assert not torch.allclose(y2[:, t + 1 :], y1[:, t + 1 :])  # the perturbation is visible later
