"""Paged KV for the NSA decode cache (NSAKVCache(page_size=..., num_pages=...)): the selection branch's raw
tokens live in a pool of fixed-size pages shared by the batch, mapped per sequence by a device page table.

Correctness is checked against the float64 whole-sequence forward of the same weights (the layer without a
cache, backend torch: the path tests/test_module_reference.py proves against tests/reference.py) and against the
contiguous cache, for the PyTorch path and the Triton decode step (in Triton's interpreter on the CPU). Pages are
deliberately handed out out of order (_scramble), so a kernel or gather that ignored the page table would read
other sequences' tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import F64, TOL64, randn
from reference import ref_num_cmp
from test_decode_triton import SIZES, _layer  # the tiny layer (l, d, l', n, w = 8, 4, 8, 4, 16) and its sizes

from nsa import NSAAttention, NSAInputError, NSAKVCache
from nsa.decode_attention import decode_attention

PAGE = 16  # two selection blocks per page: a block starts at offset 0 or 8 of its page
CAPACITY = 40  # three pages per sequence
HIDDEN = 32
# Appends of a ragged batch of three sequences: (chunk, num_valid). The prompt leaves them at 10, 30 and 22
# tokens; the decode steps cross page boundaries (16, 32) and pass n * l' = 32 tokens (a real top-n choice);
# one step pads a sequence (its write goes to the discard page).
PLAN = [(30, [10, 30, 22]), (1, [1, 1, 1]), (1, [1, 0, 1]), (1, [1, 1, 1]), (1, [1, 1, 1]), (1, [1, 1, 1])]
FLOAT32_TOL = 1e-4  # float32 layer vs float64 over three branches of O(1) values (as test_decode_triton)
# float32 runs of the same tokens in different batches: the bounds a step scans (the batch's longest sequence)
# differ, so sums round differently (seen: 2e-6); a read of another sequence's token would move outputs by O(1).
BATCHING_TOL: dict[str, Any] = {"rtol": 1e-5, "atol": 1e-5}


def _scramble(cache: NSAKVCache) -> None:
    """Hand every page out one at a time, sequences interleaved (sequence b holds pages b, b + B, ...), then
    release them all: the free list now hands pages out in strides, so a sequence's pages end up out of order."""
    for end in range(PAGE, cache.capacity + PAGE, PAGE):
        for b in range(cache.batch_size):
            cache.map_pages([min(end, cache.capacity) if s <= b else len(cache.pages[s]) * PAGE
                             for s in range(cache.batch_size)])
    assert not cache.free_pages
    cache.release(range(cache.batch_size))


def _run(layer: NSAAttention, cache: NSAKVCache, streams: torch.Tensor, plan: list,
         start: list[int] | None = None, *, block_indices: list[list[torch.Tensor]] | None = None,
         after_first: Callable[[NSAKVCache], None] | None = None) -> tuple[list, list]:
    """Feed each sequence its own token stream (streams [B, T, hidden], from token start[b] on) through the appends
    of `plan`; padding slots hold noise. Returns (each sequence's outputs [1, n_b, hidden], each append's
    last_reads). block_indices: one list per sequence, to which each append adds its rows' selected blocks
    [n, Hkv, n_sel]; after_first(cache) runs after the first append."""
    taken = list(start or [0] * cache.batch_size)
    outputs: list[list[torch.Tensor]] = [[] for _ in range(cache.batch_size)]
    reads = []
    with torch.no_grad():
        for i, (chunk, valid) in enumerate(plan):
            x = randn(cache.batch_size, chunk, HIDDEN, seed=900 + i, scale=5.0).to(streams.dtype)
            for b, n in enumerate(valid):
                x[b, :n] = streams[b, taken[b]:taken[b] + n]
            y, aux = layer(x, cache=cache, num_valid=valid, return_aux=True)
            for b, n in enumerate(valid):
                outputs[b].append(y[b:b + 1, :n])
                if block_indices is not None:
                    block_indices[b].append(aux.block_indices[b, :n])
                taken[b] += n
            reads.append(cache.last_reads)
            if i == 0 and after_first is not None:
                after_first(cache)
    return [torch.cat(o, dim=1) for o in outputs], reads


def _stacked(*sequences: torch.Tensor) -> torch.Tensor:
    """Token streams [n_b, hidden] right-padded with zeros into [B, max n_b, hidden]."""
    return torch.nn.utils.rnn.pad_sequence(list(sequences), batch_first=True)


def _expected(streams: torch.Tensor, plan: list) -> list[torch.Tensor]:
    """The float64 whole-sequence forward of each sequence's tokens (same weights, no cache)."""
    reference = _layer("torch", F64)
    totals = [sum(valid[b] for _, valid in plan) for b in range(streams.shape[0])]
    with torch.no_grad():
        return [reference(streams[b:b + 1, :n]) for b, n in enumerate(totals)]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ragged_batch_on_scrambled_pages_matches_float64_and_contiguous(backend: str) -> None:
    """(a) A ragged batch decoded token by token on scrambled pages equals the float64 forward and the contiguous
    cache's outputs; (f) its read counters equal the contiguous cache's, append by append and in total."""
    layer = _layer(backend, torch.float32)
    streams = randn(3, 35, HIDDEN, seed=1)
    paged = layer.new_cache(3, CAPACITY, page_size=PAGE)
    _scramble(paged)
    outs, reads = _run(layer, paged, streams.float(), PLAN)
    assert any(pages != sorted(pages) for pages in paged.pages), paged.pages  # out of order, as intended
    contiguous = layer.new_cache(3, CAPACITY)
    outs_contiguous, reads_contiguous = _run(layer, contiguous, streams.float(), PLAN)
    for b, expected in enumerate(_expected(streams, PLAN)):
        assert (outs[b].double() - expected).abs().max().item() < FLOAT32_TOL, f"sequence {b}"
        assert torch.equal(outs[b], outs_contiguous[b]), f"sequence {b}: paged != contiguous"
    for got, want in zip(reads, reads_contiguous, strict=True):
        assert torch.equal(got, want)
    assert torch.equal(paged.total_reads, contiguous.total_reads)
    assert paged.lengths == contiguous.lengths == [15, 34, 27]


def _state(cache: NSAKVCache) -> dict:
    """Everything an append may change, copied."""
    tensors = {name: value.clone() for name, value in vars(cache).items() if isinstance(value, torch.Tensor)}
    return dict(tensors, lengths=list(cache.lengths), pages=[list(p) for p in cache.pages],
                free_pages=list(cache.free_pages))


def _assert_same_state(before: dict, cache: NSAKVCache) -> None:
    after = _state(cache)
    assert before.keys() == after.keys()
    for name, value in before.items():
        same = torch.equal(value, after[name]) if isinstance(value, torch.Tensor) else value == after[name]
        assert same, f"cache.{name} changed"


def test_pool_exhaustion_is_refused_before_any_change() -> None:
    """(b) An append the free pages cannot serve raises NSAInputError naming num_pages and changes no state
    (lengths, pages, free list, page table, buffers, counters); after a release the same append fits."""
    layer = _layer("torch", torch.float32)
    cache = layer.new_cache(2, CAPACITY, page_size=PAGE, num_pages=3)
    x = randn(2, PAGE, HIDDEN, seed=2, dtype=torch.float32)
    with torch.no_grad():
        layer(x, cache=cache)  # two sequences of 16 tokens: one page each
        layer(x[:, :1], cache=cache, num_valid=[1, 0])  # the last free page
        before = _state(cache)
        with pytest.raises(NSAInputError, match=r"need 1 more page\(s\) .*only 0 of num_pages=3 are free"):
            layer(x[:, :1], cache=cache)  # sequence 1 reaches its second page
        _assert_same_state(before, cache)
        with pytest.raises(NSAInputError, match="num_pages=3"):
            cache.map_pages([16, 17])
        _assert_same_state(before, cache)
        cache.release([0])
        layer(x[:, :1], cache=cache, num_valid=[0, 1])
    assert cache.lengths == [0, 17] and len(cache.pages[1]) == 2 and len(cache.free_pages) == 1


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_release_starts_a_fresh_sequence_and_leaves_the_others(backend: str) -> None:
    """(c) After release, a new sequence in the slot reads none of the old one's tokens (its stale pages, rings
    and compressed rows): its outputs equal a fresh cache's for the same tokens; the other sequence's outputs
    equal those of the same run without the release."""
    layer = _layer(backend, torch.float32)
    old = randn(2, 24, HIDDEN, seed=3, dtype=torch.float32)
    new = randn(22, HIDDEN, seed=4, dtype=torch.float32) * 3.0
    after_plan = [(20, [20, 9]), (1, [1, 1]), (1, [1, 1])]
    cache = layer.new_cache(2, CAPACITY, page_size=PAGE)
    _run(layer, cache, old, [(20, [20, 12])])
    cache.release([0])
    assert cache.lengths == [0, 12] and cache.pages[0] == [] and not cache.total_reads[0].any()
    outs, _ = _run(layer, cache, _stacked(new, old[1]), after_plan, start=[0, 12])

    fresh = layer.new_cache(1, CAPACITY, page_size=PAGE)
    fresh_outs, _ = _run(layer, fresh, new[None], [(chunk, valid[:1]) for chunk, valid in after_plan])
    torch.testing.assert_close(outs[0], fresh_outs[0], **BATCHING_TOL)
    assert torch.equal(cache.total_reads[0], fresh.total_reads[0])

    unreleased = layer.new_cache(2, CAPACITY, page_size=PAGE)
    _run(layer, unreleased, old, [(20, [20, 12])])
    other_outs, _ = _run(layer, unreleased, old, [(20, [0, 9]), *after_plan[1:]], start=[20, 12])
    torch.testing.assert_close(outs[1], other_outs[1], **BATCHING_TOL)


def test_release_in_float64_equals_the_float64_forward() -> None:
    """(c) In float64 (torch path) the released slot's new sequence equals the whole-sequence forward of its
    tokens to rounding error: nothing of the old sequence reaches it, not even a stale NaN."""
    layer = _layer("torch", F64)
    cache = layer.new_cache(2, CAPACITY, page_size=PAGE)
    poisoned = randn(2, 30, HIDDEN, seed=5)
    poisoned[0, 3] = float("nan")  # the old sequence leaves NaN in its pages, rings and compressed rows
    _run(layer, cache, poisoned, [(30, [30, 30])])
    cache.release([0])
    streams = torch.cat((randn(1, 30, HIDDEN, seed=6), randn(1, 30, HIDDEN, seed=7)), dim=0)
    outs, _ = _run(layer, cache, streams, [(9, [9, 0])] + [(1, [1, 0])] * 3)
    with torch.no_grad():
        expected = layer(streams[:1, :12])
    torch.testing.assert_close(outs[0], expected, **TOL64)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(page_size=0), "page_size must be a positive int multiple of sel_block_size=8"),
    (dict(page_size=-8), "page_size must be a positive int multiple"),
    (dict(page_size=12), "page_size must be a positive int multiple of sel_block_size=8 .*got 12"),
    (dict(page_size=16.0), "page_size must be a positive int"),
    (dict(page_size=True), "page_size must be a positive int"),
    (dict(page_size=16, num_pages=0), "num_pages must be a positive int"),
    (dict(page_size=16, num_pages=2.0), "num_pages must be a positive int"),
    (dict(page_size=16, num_pages=False), "num_pages must be a positive int"),
    (dict(num_pages=4), "num_pages=4 needs page_size"),
    (dict(static_shapes="no"), "static_shapes must be a bool"),
])
def test_bad_page_settings_are_rejected(kwargs: dict, message: str) -> None:
    """(d) page_size / num_pages out of their rules: NSAInputError naming the argument and the rule."""
    layer = _layer("torch", torch.float32)
    with pytest.raises(NSAInputError, match=message):
        layer.new_cache(2, CAPACITY, **kwargs)
    with pytest.raises(NSAInputError, match=message):
        NSAKVCache(layer.config, 2, CAPACITY, **kwargs)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(dtype=torch.int64), "dtype must be one of"),
    (dict(dtype=torch.bool), "dtype must be one of"),
])
def test_bad_cache_settings_are_rejected(kwargs: dict, message: str) -> None:
    layer = _layer("torch", torch.float32)
    with pytest.raises(NSAInputError, match=message):
        NSAKVCache(layer.config, 2, CAPACITY, **kwargs)
    with pytest.raises(NSAInputError, match="config must be an NSAConfig"):
        NSAKVCache(layer.config.to_dict(), 2, CAPACITY)  # type: ignore[arg-type]


def test_device_zero_means_cuda_zero() -> None:
    """torch.device(0) is cuda:0: the cache lives there, or names the device where there is none (it used to
    land on the CPU)."""
    config = _layer("torch", torch.float32).config
    if torch.cuda.is_available():
        assert NSAKVCache(config, 1, CAPACITY, device=0).device == torch.device("cuda", 0)
    else:
        with pytest.raises(NSAInputError, match="device"):
            NSAKVCache(config, 1, CAPACITY, device=0)


def test_bad_page_calls_are_rejected_without_change() -> None:
    """(d) release and map_pages name their argument and rule, and change nothing when they refuse."""
    cache = _layer("torch", torch.float32).new_cache(2, CAPACITY, page_size=PAGE)
    cache.map_pages([20, 3])
    before = _state(cache)
    bad: Any  # wrong values and types, on purpose
    ends: Any
    for bad in ([2], [-1], [0, 0], [True], [0.0]):
        with pytest.raises(NSAInputError, match=r"sequences must be distinct ints in \[0, batch_size=2\)"):
            cache.release(bad)
    for not_a_list in (0, torch.tensor([0])):
        with pytest.raises(NSAInputError, match="sequences must be a list"):
            cache.release(not_a_list)  # type: ignore[arg-type]
    for ends in ([41, 0], [1], [1, -1], [1.0, 2]):
        with pytest.raises(NSAInputError, match=r"ends must give 2 ints in \[0, capacity=40\]"):
            cache.map_pages(ends)
    _assert_same_state(before, cache)


def test_static_paged_steps_have_the_same_kernel_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    """(e) Static shapes + pages: two decode steps whose page tables differ (the second maps a new page) call
    the Triton step with the same arguments (shapes, strides, dtypes, host ints; the cache's tensors, page table
    and pools included, at the same addresses), so one captured CUDA graph serves both; and both are right
    (float64 forward)."""
    import nsa.kernels.decode as kernels

    calls: list[tuple] = []
    addresses: list[list[int]] = []
    triton_step = kernels.decode_attention_triton

    def recording(*args: Any, **kwargs: Any) -> Any:
        values = (*args, *kwargs.values())
        calls.append(tuple((tuple(a.shape), a.stride(), a.dtype) if isinstance(a, torch.Tensor) else a
                           for a in values))
        addresses.append([a.data_ptr() for a in values if isinstance(a, torch.Tensor)])
        return triton_step(*args, **kwargs)

    monkeypatch.setattr(kernels, "decode_attention_triton", recording)
    layer = _layer("triton", torch.float32)
    cache = layer.new_cache(2, CAPACITY, static_shapes=True, page_size=PAGE)
    _scramble(cache)
    streams = randn(2, 17, HIDDEN, seed=8)
    first, _ = _run(layer, cache, streams.float(), [(15, [15, 14]), (1, [1, 1])])
    assert cache.page_table is not None  # a paged cache
    table = cache.page_table.clone()
    second, _ = _run(layer, cache, streams.float(), [(1, [1, 1])], start=[16, 15])  # sequence 0 reaches page 2
    assert len(calls) == 2 and calls[0] == calls[1]
    cache_tensors = {t.data_ptr() for t in (cache.page_table, cache.k_sel, cache.v_sel, cache.k_cmp, cache.v_cmp,
                                            cache.k_win, cache.v_win)}
    assert [a for a in addresses[0] if a in cache_tensors] == [a for a in addresses[1] if a in cache_tensors]
    assert cache_tensors <= set(addresses[0])  # the step reads them in place (no copy of the page table or pools)
    assert not torch.equal(table, cache.page_table)
    expected = _expected(streams, [(15, [15, 14]), (1, [1, 1]), (1, [1, 1])])
    for b in range(2):
        got = torch.cat((first[b], second[b]), dim=1).double()
        assert (got - expected[b]).abs().max().item() < FLOAT32_TOL, f"sequence {b}"


def test_decode_attention_refuses_pages_that_split_a_selection_block() -> None:
    """decode_attention with a page table checks the pool's page size against l' (one lookup per block)."""
    q = torch.zeros(1, 4, 8)
    kv = torch.zeros(3, 12, 2, 8)
    with pytest.raises(NSAInputError, match="multiple of sel_block_size=8, got pages of 12 tokens"):
        decode_attention(q, torch.zeros(1, 4, 3), torch.zeros(1, dtype=torch.long), k_cmp=kv, v_cmp=kv,
                         num_cmp_bound=1, k_sel=kv, v_sel=kv, num_sel_blocks=1, k_win=kv, v_win=kv,
                         sizes=SIZES, scale=1.0, backend="torch",
                         page_table=torch.zeros(1, 1, dtype=torch.int32))


def test_paged_custom_op_passes_opcheck() -> None:
    """nsa::decode_attention_triton's schema and fake implementation with a page table."""
    layer = _layer("triton", torch.float32)
    cache = layer.new_cache(2, CAPACITY, page_size=PAGE)
    cache.fill_random_([20, 9])
    q, gates = randn(2, 4, 8, seed=9, dtype=torch.float32), torch.rand(2, 4, 3)
    args = (q, gates, cache.device_lengths - 1, cache.k_cmp, cache.v_cmp, 4, cache.k_sel, cache.v_sel, 3,
            cache.k_win, cache.v_win, *layer.sizes, 0.25, cache.page_table)
    torch.library.opcheck(torch.ops.nsa.decode_attention_triton.default, args,
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("page_size", [None, PAGE])
def test_appends_under_autocast_store_in_the_cache_dtype(page_size: int | None) -> None:
    """Under torch.autocast the projections come out in bfloat16 while the cache keeps the layer's float32: the
    append stores them in the cache's dtype (a bf16 write into it used to fail after a page was already mapped).
    A prompt, a decode step and a chunk, contiguous and paged, against the float32 forward of the same tokens
    without autocast: within 1e-2 of its largest value, a few bf16 roundings (2^-8 relative each) of the
    projections and the autocast matmuls."""
    layer = _layer("torch", torch.float32)
    streams = randn(2, 22, HIDDEN, seed=3).float()
    cache = layer.new_cache(2, CAPACITY, page_size=page_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = torch.cat([layer(streams[:, a:b], cache=cache) for a, b in ((0, 16), (16, 17), (17, 22))], dim=1)
    want = layer(streams)
    assert got.dtype == torch.bfloat16 and cache.k_sel.dtype == torch.float32
    assert cache.lengths == [22, 22]
    assert (got.float() - want).abs().max().item() <= 1e-2 * want.abs().max().item()


# ----------------------------------------------------------------------------------------------
# non-finite values on scrambled pages (the rule of nsa/nonfinite.py; tests/test_inv_nonfinite.py's decode tests
# on contiguous buffers)


def _poison_stale(cache: NSAKVCache, value: float) -> None:
    """Write `value` into every row no query of the next append may read: each sequence's page rows at and past
    its length, every page no sequence holds (released or never mapped; the discard page included), compressed
    blocks not emitted yet, ring slots of negative positions, the discard rows."""
    c, page = cache.config, cache.page_size
    assert page is not None  # a paged cache
    mapped = {p for pages in cache.pages for p in pages}
    with torch.no_grad():
        for pool in (cache.k_sel, cache.v_sel):
            for b, length in enumerate(cache.lengths):
                for i, p in enumerate(cache.pages[b]):
                    pool[p, max(0, min(page, length - i * page)):] = value
            pool[[p for p in range(pool.shape[0]) if p not in mapped]] = value
        for b, length in enumerate(cache.lengths):
            num_cmp = ref_num_cmp(length, c.cmp_block_size, c.cmp_stride)
            for k, v, first in ((cache.k_cmp, cache.v_cmp, num_cmp),
                                (cache.k_win, cache.v_win, min(length, c.window_size)),
                                (cache.k_cmp_raw, cache.v_cmp_raw, min(length, c.cmp_block_size))):
                for buffer in (k, v):
                    buffer[b, first:] = value
                    buffer[b, -1] = value  # the discard row


@pytest.mark.parametrize("static_shapes", [False, True])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nonfinite_stale_rows_and_released_pages_change_nothing(backend: str, static_shapes: bool) -> None:
    """NaN / +inf in every row no query may read, written before each append after a release (rows past each
    sequence's length on its scrambled pages, the released sequence's and every other free page, the discard
    page, unemitted compressed rows, unwritten ring slots): outputs and read counters bitwise equal to the run
    on a clean pool. The appends after the release: a ragged chunk restarting the released slot (its new page
    comes off the poisoned free list), then decode steps (the Triton step on backend triton) in which sequence 1
    maps the released page 4 after its pages 5 and 8 (out of order) and the restarted sequence opens its second
    selection block."""
    layer = _layer(backend, torch.float32)
    streams = randn(3, 40, HIDDEN, seed=11).float()
    after = [(6, [1, 1, 6]), (1, [1, 1, 1]), (1, [1, 1, 1]), (1, [1, 1, 1])]
    runs = []
    for value in (None, float("nan"), float("inf")):
        cache = layer.new_cache(3, CAPACITY, page_size=PAGE, static_shapes=static_shapes)
        _scramble(cache)
        _run(layer, cache, streams, [(30, [10, 30, 22]), (1, [1, 1, 1])])
        cache.release([2])
        start, outs, reads = [11, 31, 23], [], []  # the restarted sequence 2 reads new tokens (23 on)
        for chunk, valid in after:
            if value is not None:
                _poison_stale(cache, value)
            got, got_reads = _run(layer, cache, streams, [(chunk, valid)], start)
            outs.append(got)
            reads += got_reads
            start = [s + n for s, n in zip(start, valid, strict=True)]
        assert cache.lengths == [15, 35, 9] and cache.pages == [[2], [5, 8, 4], [1]], cache.pages
        if value is not None:  # the poison is still there, in rows of mapped pages too (past the lengths)
            assert not torch.isfinite(cache.k_sel[[p for pages in cache.pages for p in pages]]).all()
        runs.append((outs, reads))
    (clean, clean_reads), *poisoned = runs
    assert all(torch.isfinite(y).all() for ys in clean for y in ys)
    for outs, reads in poisoned:
        for ys, clean_ys in zip(outs, clean, strict=True):
            for y, clean_y in zip(ys, clean_ys, strict=True):
                assert torch.equal(y, clean_y)
        for got, want in zip(reads, clean_reads, strict=True):
            assert torch.equal(got, want)


def _rows_reading(s: int, block_indices: torch.Tensor, heads: Any = slice(None),
                  selection_only: bool = False) -> torch.Tensor:
    """bool [n_b]: the rows t of a sequence (its block indices [n_b, Hkv, n]) that read token s under NSA.md's
    masks: in a block selected by one of `heads` (s <= t), or (unless selection_only) in the window
    (0 <= t - s < w) or a visible compressed block (i*d <= s < i*d + l, i*d + l - 1 <= t)."""
    l, d, lp, _, w = SIZES
    rows = []
    for t, selected in enumerate(block_indices[:, heads].tolist()):
        cmp = any(i * d <= s < i * d + l for i in range(ref_num_cmp(t + 1, l, d)))
        others = not selection_only and (t - s < w or cmp)
        rows.append(t >= s and (others or s // lp in torch.tensor(selected)))
    return torch.tensor(rows)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nonfinite_token_on_scrambled_pages_poisons_exactly_the_rows_that_read_it(backend: str) -> None:
    """A ragged batch on scrambled pages (sequence 1's third page is page 0, after pages 8 and 1), decoded token by
    token after a prompt: a NaN token in sequence 0's prompt, a -inf token in a decode step of sequence 2, and a
    NaN selection key and value of KV head 0 of one token of sequence 1 on its page (what a NaN token leaves in the
    selection branch, and only there: the compressed and window branches never read it). Each poisons exactly the
    rows that read it (the selection's rows found from the block indices: the planted block is one of the two
    candidates the top-n chooses between from position 32 on); every other row is finite and bitwise equal to the
    clean run's, and the selection unchanged. The Triton step poisons the same rows as the torch step, and its
    finite rows agree with it (float32 rounding: 1e-5; a wrong row read moves them by O(1))."""
    plan = [(30, [20, 30, 17])] + [(1, [1, 1, 1])] * 5  # lengths 25, 35, 22
    streams = randn(3, 35, HIDDEN, seed=12).float()
    bad = streams.clone()
    bad[0, 3, 5] = float("nan")  # a prompt token
    bad[2, 19, 0] = float("-inf")  # a decode step's token (positions 17..21)

    def run(layer: NSAAttention, x: torch.Tensor, plant: Any = None) -> tuple[list, list]:
        """Each sequence's outputs [n_b, hidden] and block indices [n_b, Hkv, n], plant(cache) after the prompt."""
        cache = layer.new_cache(3, CAPACITY, page_size=PAGE)
        _scramble(cache)
        indices: list[list[torch.Tensor]] = [[] for _ in range(3)]
        outs, _ = _run(layer, cache, x, plan, block_indices=indices, after_first=plant)
        assert cache.pages == [[2, 5], [8, 1, 0], [4, 7]]
        return [y[0] for y in outs], [torch.cat(rows) for rows in indices]

    layer = _layer(backend, torch.float32)
    clean, clean_indices = run(layer, streams)
    step_32 = clean_indices[1][32, 0].tolist()  # sequence 1's row 32, KV head 0: blocks 0, 3, 4 and 1 or 2
    block = ({1, 2} - set(step_32)).pop()
    token = block * 8 + 5

    def plant(cache: NSAKVCache) -> None:
        page, row = cache.pages[1][token // PAGE], token % PAGE
        cache.k_sel[page, row, 0] = float("nan")
        cache.v_sel[page, row, 0] = float("nan")

    results = {backend: run(layer, bad, plant)}
    if backend == "triton":
        results["torch"] = run(_layer("torch", torch.float32), bad, plant)
    outs, indices = results[backend]
    expected = [_rows_reading(3, indices[0]), torch.zeros(30, dtype=torch.bool), _rows_reading(19, indices[2])]
    expected[1] = torch.cat((expected[1], _rows_reading(token, indices[1], 0, selection_only=True)[30:]))
    assert expected[1][30:].any() and not expected[1][32:].all(), "the planted block: read by some steps, not all"
    assert torch.equal(indices[1], clean_indices[1]), "the planted selection key moved a selection"
    for b, (y, poisoned) in enumerate(zip(outs, expected, strict=True)):
        assert torch.equal(y.isnan().all(-1), poisoned), f"sequence {b}: poisoned rows differ from the rows reading"
        assert torch.equal(y[~poisoned], clean[b][~poisoned]), f"sequence {b}: a row that reads nothing changed"
    if backend == "triton":
        for b, (y, y_torch) in enumerate(zip(outs, results["torch"][0], strict=True)):
            poisoned = y_torch.isnan().all(-1)
            assert torch.equal(y.isnan().all(-1), poisoned), f"sequence {b}: Triton and torch poison other rows"
            torch.testing.assert_close(y[~poisoned], y_torch[~poisoned], rtol=0, atol=1e-5)
