"""The fused NSA prefill kernels (nsa.prefill, nsa/kernels/) in Triton's CPU interpreter, against the float64
dense references of tests/reference.py (written from NSA.md; they never import nsa).

Every kernel runs in each case: the compression branch (forward, dq, dk/dv with split query ranges), the
top-n selection, the selection branch (forward, dq, dk/dv over the inverted lists and their reduction) and
the window. The shapes cover what CI must: GQA groups of 1, 3 and 12 (not powers of two), d_k != d_v
(24 / 16: the q.k dot split into a power of two and a rest), T not a multiple of any block, T < l, batch > 1
and packed sequences (cu_seqlens) of lengths 1, < l and longer. Outputs start as NaN or INT_MIN
(tiles.POISON_OUTPUTS), so an element a kernel failed to write shows.

Tolerance: float32 kernels against float64 math on the same inputs: a few float32 roundings of O(1) values
per element, 1e-5 (the torch path's own float32 error here is ~1e-6). The selection is compared with the
float64 scores by check_selection: equal sets except where two boundary scores are within 1e-5 (relative).
The drawn settings of test_kernels_match_float64_reference_on_random_configs reach gradients of ~20: there the
absolute tolerance is 1e-5 of each tensor's largest value.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import pytest
import torch
from conftest import F64, PrefillConfig, randn, use_prefill_tiles
from hypothesis import example, given, settings
from hypothesis import strategies as st
from reference import (
    check_selection,
    dense_cmp_mask,
    dense_masked_attention,
    dense_nsa,
    dense_selected_mask,
    dense_selection_scores,
    dense_window_mask,
    ref_candidate_blocks,
    ref_forced_blocks,
    ref_num_cmp,
)

from nsa import NSAAttention, NSAConfig, NSAInputError, functional, naive_nsa_attention, nsa_attention, prefill
from nsa.kernels import selected as selected_module
from nsa.kernels import tiles
from nsa.kernels.launch_args import split_dims
from nsa.kernels.selected import (
    SelectedTiles,
    dq_share_ranges,
    query_launch,
    query_tile_shape,
    selected_dkdv,
    selected_dq,
    selected_forward,
    selected_row_delta,
)
from nsa.kernels.tiles import Packed, output_buffer, packed_varlen

NAMES = ("q", "k_cmp", "v_cmp", "k_sel", "v_sel", "k_win", "v_win", "gates")
TOL: dict[str, Any] = {"rtol": 1e-5, "atol": 1e-5}
SMALL: dict[str, Any] = {"block_size": 8, "block_stride": 4, "sel_block_size": 16, "num_selected": 5, "window_size": 20}
# Many small selection blocks and few picks: neighbouring queries choose different blocks (with SMALL every
# query of a short sequence selects all its blocks).
CHOOSY: dict[str, Any] = {"block_size": 8, "block_stride": 4, "sel_block_size": 4, "num_selected": 5, "window_size": 8}


@pytest.fixture(autouse=True)
def _poisoned_outputs(monkeypatch):
    monkeypatch.setattr(tiles, "POISON_OUTPUTS", True)


def make_inputs(batch: int, lengths: list[int], heads: int, kv_heads: int, dk: int, dv: int, blocks: dict,
                seed: int) -> list[torch.Tensor]:
    """nsa_attention's eight inputs (float32, requiring grad) for sequences of ``lengths`` packed in one row
    dimension (one length: a plain batch); scale 1.5 so that scores > 2 occur (their float bits must rank right)."""
    total = sum(lengths)
    n_cmp = sum(ref_num_cmp(n, blocks["block_size"], blocks["block_stride"]) for n in lengths)
    sizes = [(total, heads, dk), (n_cmp, kv_heads, dk), (n_cmp, kv_heads, dv), (total, kv_heads, dk),
             (total, kv_heads, dv), (total, kv_heads, dk), (total, kv_heads, dv)]
    tensors = [randn(batch, *size, seed=seed + i, scale=1.5) for i, size in enumerate(sizes)]
    gates = torch.rand(batch, total, heads, 3, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return [t.float().requires_grad_() for t in (*tensors, gates)]


def unpacked_run(inputs: list[torch.Tensor], blocks: dict[str, Any], scale: float) -> prefill.PrefillRun:
    """The op's run over make_inputs' eight tensors of one unpacked batch (no cu_seqlens)."""
    args: list[Any] = [*inputs, None, prefill.PrefillSizes(**blocks), scale]  # a list: mypy takes no f(*xs, y)
    return prefill.PrefillRun(*args)


def check_against_reference(inputs: list[torch.Tensor], blocks: dict, lengths: list[int] | None = None,
                            scaled_atol: bool = False) -> None:
    """Run the kernels (packed when ``lengths`` is given) and compare output, selection and the eight gradients
    with the float64 reference, sequence by sequence. ``scaled_atol``: each tensor's absolute tolerance is 1e-5 of
    its largest value (at least 1e-5), for configs whose gradients reach ~20: float32 sums of such terms round
    by more than 1e-5 (the float32 reference itself errs by ~8e-6 at G = 16, l = 2, n = 16)."""

    def tol(want: torch.Tensor) -> dict[str, Any]:
        largest = want.abs().max().item() if want.numel() else 0.0  # empty: a sequence without compressed blocks
        return {**TOL, "atol": TOL["atol"] * max(1.0, largest)} if scaled_atol else TOL

    cu = None if lengths is None else packed_lengths(lengths).cu
    out, indices = nsa_attention(*inputs, **blocks, cu_seqlens=cu, backend="triton")
    assert not out.isnan().any()
    dout = randn(*out.shape, seed=99).float()
    grads = torch.autograd.grad(out, inputs, dout)
    assert not any(g.isnan().any() for g in grads)
    token = block = 0
    for length in lengths or [inputs[0].shape[1]]:
        n_cmp = ref_num_cmp(length, blocks["block_size"], blocks["block_stride"])
        rows, cmp_rows = slice(token, token + length), slice(block, block + n_cmp)

        def part(x: torch.Tensor, i: int, rows: slice = rows, cmp_rows: slice = cmp_rows) -> torch.Tensor:
            return x[:, cmp_rows] if i in (1, 2) else x[:, rows]

        wide = [part(t, i).detach().double().requires_grad_() for i, t in enumerate(inputs)]
        scores = dense_selection_scores(wide[0].detach(), wide[1].detach(), blocks["block_size"],
                                        blocks["block_stride"], blocks["sel_block_size"])
        check_selection(indices[:, rows], scores, blocks["sel_block_size"], blocks["num_selected"],
                        tol=1e-5 * max(1.0, float(scores.max())))
        kwargs = {key: blocks[key] for key in ("block_size", "block_stride", "sel_block_size", "window_size")}
        args = [*wide, indices[:, rows]]
        expected = dense_nsa(*args, **kwargs)
        torch.testing.assert_close(out[:, rows].double(), expected, **tol(expected))
        expected_grads = torch.autograd.grad(expected, wide, dout[:, rows].double())
        for i, (name, got, want) in enumerate(zip(NAMES, grads, expected_grads, strict=True)):
            def message(m: str, name: str = name) -> str:
                return f"d{name}: {m}"

            torch.testing.assert_close(part(got, i).double(), want, **tol(want), msg=message)
        token, block = token + length, block + n_cmp


@pytest.mark.parametrize(("batch", "seq_len", "heads", "kv_heads", "dk", "dv", "blocks"), [
    (1, 45, 6, 2, 24, 16, SMALL),  # G = 3, d_k != d_v, T not a multiple of l, l' or w
    (2, 37, 2, 2, 16, 16, {**SMALL, "sel_block_size": 8, "num_selected": 4, "window_size": 16}),  # G = 1, B = 2
    (1, 33, 12, 1, 16, 16, {**SMALL, "block_size": 16, "block_stride": 8, "num_selected": 6}),  # G = 12, l = l'
    (1, 6, 4, 2, 16, 16, SMALL),  # T < l: no compressed block at all
    (1, 50, 8, 2, 16, 16, SMALL),  # G = 4: the short sequences' selection programs of 8 tokens (for_tokens)
    # l'/d = 32: top-n key tiles of 8 selection blocks (256 compressed keys, MAX_KEY_TILE), not the default 16
    (1, 200, 2, 1, 16, 16, {"block_size": 4, "block_stride": 1, "sel_block_size": 32, "num_selected": 4,
                            "window_size": 8}),
])
def test_kernels_match_float64_reference(batch, seq_len, heads, kv_heads, dk, dv, blocks):
    check_against_reference(make_inputs(batch, [seq_len], heads, kv_heads, dk, dv, blocks, seed=seq_len), blocks)


@st.composite
def prefill_configs(draw: st.DrawFn) -> PrefillConfig:
    """Valid layer settings off the paper's ratios: l from d to 6d and l' from d to 4d (so l > l' + d occurs:
    selection blocks complete before any compressed key over them is visible), n up to 8 with few blocks, windows
    of 1 token to longer than the sequence, odd groups, d_k != d_v, packed sequences of 1 token up."""
    stride = draw(st.sampled_from([1, 2, 4]))
    blocks = {"block_size": stride * draw(st.sampled_from([1, 2, 3, 6])), "block_stride": stride,
              "sel_block_size": stride * draw(st.sampled_from([1, 2, 4])), "num_selected": draw(st.integers(3, 8)),
              "window_size": draw(st.sampled_from([1, 3, 16, 64]))}
    kv_heads, group = draw(st.sampled_from([(1, 1), (2, 1), (1, 3), (2, 3), (1, 5), (2, 4), (1, 12), (1, 16)]))
    # The interpreter's time grows with tokens x heads: up to ~200 rows (16 tokens at G = 12, 64 at G = 1).
    most = max(16, min(64, 200 // (kv_heads * group)))
    packed = draw(st.booleans())
    lengths = (draw(st.lists(st.integers(1, most // 2), min_size=1, max_size=3)) if packed
               else [draw(st.integers(1, most))])
    return PrefillConfig(1 if packed else draw(st.integers(1, 2)), lengths, packed, kv_heads * group, kv_heads,
                         draw(st.sampled_from([8, 16, 24])), draw(st.sampled_from([8, 16])), blocks)


@given(prefill_configs(), st.integers(0, 2**16 - 1))
@example(PrefillConfig(1, [45], False, 4, 1, 16, 16, {"block_size": 12, "block_stride": 2, "sel_block_size": 2,
                                                      "num_selected": 8, "window_size": 3}), 0)  # l > l' + d
@settings(max_examples=6)  # each example interprets every kernel, forward and backward: ~1-20 s
def test_kernels_match_float64_reference_on_random_configs(config, seed):
    """The whole layer (every kernel, forward and backward) on drawn settings against the float64 reference.
    Random settings like these found the top-n's key tiles stopping short of some candidate blocks (fixed in
    1f377b6; test_topn_ranks_candidates_past_the_visible_compressed_keys): the explicit example fails there."""
    inputs = make_inputs(config.batch, config.lengths, config.heads, config.kv_heads, config.dk, config.dv,
                         config.blocks, seed=seed)
    check_against_reference(inputs, config.blocks, config.lengths if config.packed else None, scaled_atol=True)


@pytest.mark.parametrize("depth", [1, 2, 13])
def test_topn_column_lists_rank_exactly_at_any_depth(depth):
    """The top-n keeps, per block column of its key tiles, a list of the ``depth`` best keys seen; with depth <
    n - 3 a column can drop a block that ranks, and the kernel must then rank that program's rows again with the
    exact merge. 150 tokens of 4-token blocks (up to 36 candidates over 16 columns), n = 16: at depth 1 or 2 most
    rows' 13 best share a column, so lists alone would choose wrongly; at 13 the lists hold everything."""
    from nsa.kernels.topn import TopnTiles

    blocks = {**CHOOSY, "num_selected": 16}
    inputs = [x.detach() for x in make_inputs(1, [150], 8, 2, 16, 16, blocks, seed=5)]
    run = unpacked_run(inputs, blocks, 16**-0.5)
    run.topn_tiles = TopnTiles(16, 4, 1, column_depth=depth)
    check_topn(run, inputs, blocks)


@pytest.mark.parametrize(("heads", "rows"), [(16, 128), (12, 128), (4, 64)])
def test_topn_on_the_gpu_tiles_ranks_exactly(monkeypatch, heads, rows):
    """The top-n under the GPU's tile choice (prefill._tiles off the interpreter branch: programs of 128 rows from
    16 padded heads up, 8 tokens at G = 16 and 12, 64 rows below, 16 tokens at G = 4), interpreted, against the
    float64 rule: 150 tokens, so a program's tokens straddle selection blocks and the sequence's end."""
    blocks = {**CHOOSY, "num_selected": 16}
    inputs = [x.detach() for x in make_inputs(1, [150], heads, 1, 16, 16, blocks, seed=heads)]
    run = unpacked_run(inputs, blocks, 16**-0.5)
    monkeypatch.setattr(prefill, "interpreter_enabled", lambda: False)
    run.topn_tiles = prefill._tiles(torch.device("cpu"), 16, heads).topn
    assert run.topn_tiles.rows == rows
    check_topn(run, inputs, blocks)


@pytest.mark.parametrize(("head_dim", "gpu_tiles"), [(16, False), (16, True), (128, True)])
@pytest.mark.parametrize("heads", [16, 4])
def test_topn_ranks_candidates_past_the_visible_compressed_keys(monkeypatch, heads, head_dim, gpu_tiles):
    """Where l > l' + d a selection block is complete before the compressed blocks over its end are visible
    (l = 24, l' = 4: block 1 is a candidate from t = 12, the first compressed block is seen from t = 23). Such a
    candidate scores 0, or only what Eq. 9 carries into it, and must still rank; n - 3 = 21 selects every candidate
    of these 150 tokens up to t = 95 (NSA.md: with fewer candidates all are selected). The kernel's key tiles once
    stopped at the program's visible keys and dropped such blocks: in programs that saw no compressed key at all
    (t = 12 ..), and where the visible keys ended a key tile before the last candidate (t = 72 ..), on the
    interpreter's tiles and on the GPU's, whose key tiles go through TMA at head dim 128 (loads past the visible
    keys, which only the causal mask voids)."""
    blocks = {"block_size": 24, "block_stride": 4, "sel_block_size": 4, "num_selected": 24, "window_size": 8}
    inputs = [x.detach() for x in make_inputs(1, [150], heads, 1, head_dim, 16, blocks, seed=heads)]
    run = unpacked_run(inputs, blocks, head_dim**-0.5)
    if gpu_tiles:
        monkeypatch.setattr(prefill, "interpreter_enabled", lambda: False)
        run.topn_tiles = prefill._tiles(torch.device("cpu"), head_dim, heads).topn
    assert run.topn_tiles.tma or head_dim == 16  # the interpreter's tiles and the GPU's at 128 load through TMA
    check_topn(run, inputs, blocks)


def check_topn(run: prefill.PrefillRun, inputs: list[torch.Tensor], blocks: dict) -> None:
    """The run's compression and top-n on one sequence of ``inputs`` against the float64 selection rule."""
    run.compressed()
    run.select()
    scores = dense_selection_scores(inputs[0].double(), inputs[1].double(), blocks["block_size"],
                                    blocks["block_stride"], blocks["sel_block_size"])
    seq_len, kv_heads = inputs[0].shape[1], inputs[1].shape[2]
    check_selection(run.indices.view(1, seq_len, kv_heads, -1).long(), scores, blocks["sel_block_size"],
                    blocks["num_selected"], tol=1e-5 * max(1.0, float(scores.max())))


@pytest.mark.parametrize(("ratio", "num_selected", "refused"), [(32, 4, False), (32, 16, True), (16, 16, False)])
def test_prefill_refuses_only_key_tiles_wider_than_the_kernel_holds(ratio, num_selected, refused):
    """The top-n key tile narrows to fit MAX_KEY_TILE compressed keys; only a top list of more than
    MAX_KEY_TILE / ratio blocks (n - 3 rounded up to a power of two) cannot fit."""
    reasons = prefill.prefill_obstacles(1, 32, 2, 2 * ratio, num_selected, 64)
    assert bool(reasons) == refused
    assert not reasons or "wider than 256" in reasons[0]


@pytest.mark.parametrize(("lengths", "heads", "kv_heads"), [([45], 6, 2), ([5, 35, 1, 29], 12, 1)])
def test_kernels_with_pointer_loads_only_match_float64_reference(monkeypatch, lengths, heads, kv_heads):
    """The defaults load every branch's K / V and the top-n's compressed keys through tensor descriptors (TMA; the
    window's and the top-n's up to head dim 128); here every kernel takes pointer loads (the path of devices without
    TMA, of misaligned tensors and of the wider and narrower heads), for a group of 3 (several tokens per selection
    program) and of 12 (one token)."""
    use_prefill_tiles(monkeypatch, ranges={"tma": False}, selected={"tma": False}, topn={"tma": False})
    inputs = make_inputs(1, lengths, heads, kv_heads, 24, 16, SMALL, seed=11)
    check_against_reference(inputs, SMALL, lengths if len(lengths) > 1 else None)


def test_descriptors_only_for_16_byte_aligned_rows():
    """TMA needs a 16-byte aligned base and row strides; anything else keeps pointer loads."""
    dims = split_dims(24, 16)
    k, v = torch.randn(40, 2, 24), torch.randn(40, 2, 16)
    assert tiles.kv_descriptors(k, v, 16, dims, True)["TMA"]
    assert not tiles.kv_descriptors(k, v, 16, dims, False)["TMA"]
    odd = torch.randn(40, 2, 18)[..., :16]  # rows 72 bytes apart
    assert not tiles.kv_descriptors(odd, v, 16, split_dims(16, 16), True)["TMA"]
    offset = torch.randn(40 * 2 * 16 + 1)[1:].view(40, 2, 16)  # base 4 bytes past an aligned address
    assert not tiles.kv_descriptors(offset, v, 16, split_dims(16, 16), True)["TMA"]


def _python_tile_table(lengths: list[int], tile: int, grid: int) -> tuple[list[int], list[int]]:
    """Program -> sequence by counting, from the sizes alone: sequence s holds ceil(len_s / tile) consecutive
    programs; programs past the last real tile map to S."""
    first = [0]
    for length in lengths:
        first.append(first[-1] + -(-length // tile))
    seq = [next((s for s in range(len(lengths)) if first[s] <= p < first[s + 1]), len(lengths)) for p in range(grid)]
    return seq, first


@given(st.lists(st.integers(0, 70), min_size=1, max_size=5), st.sampled_from([1, 4, 16, 64]), st.booleans())
def test_tile_tables_of_equal_and_packed_sequences_count_tiles(lengths, tile, equal):
    """tile_table (prefix sums and a search over cu) and its arithmetic form for batches of equal lengths (the
    host's sizes alone: what an unpacked [B, T] batch takes) against counting in Python; token_sequences
    likewise, sequences of length 0 included."""
    if equal:
        lengths = [lengths[0]] * len(lengths)
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    total = int(cu[-1])
    packed = (tiles.packed_batch(len(lengths), lengths[0], torch.device("cpu")) if equal
              else packed_varlen(cu, total))
    grid = tiles.tile_grid(total, len(lengths), tile)
    want_seq, want_first = _python_tile_table(lengths, tile, grid)
    tables = [tiles.tile_table(cu, len(lengths), total, tile), tiles.packed_tiles(packed, tile)]
    for table in tables:
        assert table.grid == grid and table.seq.dtype == table.first.dtype == torch.int32
        assert table.seq.tolist() == want_seq and table.first.tolist() == want_first
    assert tiles.token_sequences(packed).tolist() == [s for s, n in enumerate(lengths) for _ in range(n)]
    assert packed.equal == equal


def test_sized_tensors_are_built_once_per_size_outside_inference_mode(monkeypatch):
    """An unpacked batch's tables are built once per (sizes, device) and handed out again (the eager layer is
    host-bound at small widths); one first built under torch.inference_mode() is a normal tensor, so a training
    step may index with it later; past SIZED_ENTRIES entries or SIZED_BYTES bytes the oldest entries go and are
    built again when asked for, and a table larger than SIZED_BYTES is not kept at all."""
    from collections import OrderedDict

    from nsa import sized_tensors as sized

    monkeypatch.setattr(sized, "_SIZED", OrderedDict())
    cpu = torch.device("cpu")
    with torch.inference_mode():
        first = tiles.packed_tiles(tiles.packed_batch(3, 40, cpu), 16)
    packed = tiles.packed_batch(3, 40, cpu)
    again = tiles.packed_tiles(packed, 16)
    assert again.seq is first.seq and again.first is first.first and not first.seq.is_inference()
    assert packed.cu is tiles.packed_batch(3, 40, cpu).cu and packed.cu.tolist() == [0, 40, 80, 120]
    assert tiles.packed_tiles(packed, 8).seq is not first.seq  # another tile: another table
    sequences = tiles.token_sequences(packed)
    assert sequences is tiles.token_sequences(packed) and sequences.tolist() == [s for s in range(3) for _ in range(40)]
    monkeypatch.setattr(sized, "SIZED_ENTRIES", 2)
    for length in (41, 42):
        tiles.packed_tiles(tiles.packed_batch(3, length, cpu), 16)
    rebuilt = tiles.packed_tiles(tiles.packed_batch(3, 40, cpu), 16)
    assert rebuilt.seq is not first.seq and torch.equal(rebuilt.seq, first.seq)
    monkeypatch.setattr(sized, "SIZED_ENTRIES", 256)
    monkeypatch.setattr(sized, "_SIZED", OrderedDict())
    monkeypatch.setattr(sized, "SIZED_BYTES", 100)  # an [S + 1] int32 offsets table of S = 3: 16 bytes
    offsets = tiles.batch_offsets(3, 7, cpu)
    assert tiles.batch_offsets(3, 7, cpu) is offsets
    assert len(sized._SIZED) == 1 and sum(size for _, size in sized._SIZED.values()) == 16
    packed = tiles.packed_batch(2, 30, cpu)  # its offsets: 12 bytes more
    big = tiles.token_sequences(packed)  # 240 bytes: past the bound on its own, not kept, nothing else evicted
    assert tiles.token_sequences(packed) is not big and tiles.batch_offsets(3, 7, cpu) is offsets
    assert [size for _, size in sized._SIZED.values()] == [16, 12]
    tiles.batch_offsets(9, 9, cpu)  # 40 bytes: 68 in all
    assert [size for _, size in sized._SIZED.values()] == [16, 12, 40]
    tiles.batch_offsets(17, 9, cpu)  # 72 bytes: the oldest go until the rest fits
    assert [size for _, size in sized._SIZED.values()] == [72]


def test_sized_tensors_are_neither_kept_nor_read_under_fake_tensors_or_make_fx(monkeypatch):
    """Under FakeTensorMode (a memory estimate runs the model's Python on fake tensors) and make_fx, the RoPE
    frequencies are built as that mode's tensors and not kept: a kept fake tensor would reach later real steps, and
    a kept real one fails inside a fake step."""
    from collections import OrderedDict

    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    from nsa import apply_rope
    from nsa import sized_tensors as sized

    monkeypatch.setattr(sized, "_SIZED", OrderedDict())
    x, positions = torch.randn(1, 8, 2, 16), torch.arange(8)
    want = apply_rope(x, positions)  # keeps the real frequencies
    kept = dict(sized._SIZED)
    with FakeTensorMode() as fake:
        rotated = apply_rope(fake.from_tensor(x), fake.from_tensor(positions))
    assert rotated.shape == x.shape and dict(sized._SIZED) == kept
    graph = make_fx(lambda x, positions: apply_rope(x, positions))(x, positions)
    assert dict(sized._SIZED) == kept and torch.equal(graph(x, positions), want)
    monkeypatch.setattr(sized, "_SIZED", OrderedDict())
    with FakeTensorMode() as fake:
        apply_rope(fake.from_tensor(x), fake.from_tensor(positions))
    assert not sized._SIZED and torch.equal(apply_rope(x, positions), want)


def test_token_rows_keep_head_offsets_within_int32():
    """rows_view keeps a heads-major layout as a view while its last head starts within 2^31 elements, and copies
    it to token-major past that (the kernels' head offsets are int32); shapes on the meta device, nothing
    allocated."""
    def heads_major(seq_len: int) -> torch.Tensor:
        return torch.empty(1, 64, seq_len, 128, device="meta").transpose(1, 2)

    short = tiles.rows_view(heads_major(1024))
    assert short.shape == (1024, 64, 128) and short.stride() == (128, 1024 * 128, 1)
    long = tiles.rows_view(heads_major(2**19))
    assert long.shape == (2**19, 64, 128) and long.stride() == (64 * 128, 128, 1)


def test_packed_sequences_match_float64_reference():
    lengths = [5, 35, 1, 29]  # shorter than l, longer than w, a single token
    inputs = make_inputs(1, lengths, 8, 2, 16, 16, SMALL, seed=7)
    check_against_reference(inputs, SMALL, lengths)


def test_backward_is_deterministic():
    inputs = make_inputs(1, [40], 4, 2, 16, 16, SMALL, seed=3)
    runs = []
    for _ in range(2):
        out = nsa_attention(*inputs, **SMALL, backend="triton").output
        runs.append(torch.autograd.grad(out, inputs, torch.ones_like(out)))
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_dkdv_kernels_reading_float32_gates_change_no_bit(monkeypatch, interpreter_bf16_dot):
    """The dk / dv kernels take the gates in float32 (prefill.dkdv_gates, so that Triton pipelines their loads):
    in bf16 the gradients are bitwise those computed from the bf16 gates themselves (the kernels widen a gate to
    float32 either way)."""
    inputs = [x.detach().bfloat16().requires_grad_() for x in make_inputs(2, [40], 8, 2, 16, 16, SMALL, seed=4)]
    dout = torch.randn(2, 40, 8, 16, generator=torch.Generator().manual_seed(4)).bfloat16()

    def grads() -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(nsa_attention(*inputs, **SMALL, backend="triton").output, inputs, dout)

    widened = grads()
    monkeypatch.setattr(prefill, "dkdv_gates", lambda gates: gates)
    assert all(torch.equal(a, b) for a, b in zip(widened, grads(), strict=True))


@pytest.mark.parametrize("backend", ["torch", "naive"])
def test_packed_sequences_on_the_pytorch_paths_equal_separate_runs(backend):
    """cu_seqlens on the torch path and on the dense twin: each packed sequence equals its own run (float64)."""
    lengths = [9, 1, 30, 0, 17]
    inputs = [t.detach().double() for t in make_inputs(1, lengths, 4, 2, 8, 8, SMALL, seed=11)]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    fn = naive_nsa_attention if backend == "naive" else functools.partial(nsa_attention, backend="torch")
    packed = fn(*inputs, **SMALL, cu_seqlens=cu)
    token = block = 0
    for length in lengths:
        n_cmp = ref_num_cmp(length, SMALL["block_size"], SMALL["block_stride"])
        if length:
            rows, cmp_rows = slice(token, token + length), slice(block, block + n_cmp)
            alone = fn(*[t[:, cmp_rows] if i in (1, 2) else t[:, rows] for i, t in enumerate(inputs)], **SMALL)
            torch.testing.assert_close(packed.output[:, rows], alone.output, rtol=0, atol=1e-12)
            assert torch.equal(packed.block_indices[:, rows], alone.block_indices)
        token, block = token + length, block + n_cmp


@pytest.mark.parametrize(("cu", "rule"), [
    ([0, 10, 20], "end at T"), ([1, 50], "start at 0"), ([0, 30, 20, 50], "non-decreasing"),
])
def test_packed_sequences_bad_boundaries_raise(cu, rule):
    inputs = [t.detach() for t in make_inputs(1, [50], 4, 2, 8, 8, SMALL, seed=1)]
    with pytest.raises(NSAInputError, match=rule):
        nsa_attention(*inputs, **SMALL, cu_seqlens=torch.tensor(cu), backend="torch")


def test_packed_sequences_need_batch_one_and_matching_compressed_blocks():
    inputs = [t.detach() for t in make_inputs(2, [40], 4, 2, 8, 8, SMALL, seed=1)]
    with pytest.raises(NSAInputError, match="batch size 1"):
        nsa_attention(*inputs, **SMALL, cu_seqlens=torch.tensor([0, 40]), backend="torch")
    inputs = [t[:1] for t in inputs]
    with pytest.raises(NSAInputError, match="num_cmp"):  # 40 tokens in two sequences have fewer blocks than one
        nsa_attention(*inputs, **SMALL, cu_seqlens=torch.tensor([0, 20, 40]), backend="torch")


@pytest.mark.parametrize(("heads", "dq_max_group"), [(4, 4), (8, 4), (8, 0)])
def test_op_registration_passes_opcheck(monkeypatch, heads, dq_max_group):
    """nsa::prefill's schema, fake implementation and autograd registration (torch.library.opcheck); at G = 4 the
    selection runs the short sequences' programs of several tokens (SelectedTiles.for_tokens). Their union lists go
    to the backward, which the fake implementation must size alike, only where the dq has its own kernel
    (fused_dq_max_group = 0; by default G <= 4 takes it inside the dk/dv and keeps none)."""
    use_prefill_tiles(monkeypatch, selected={"fused_dq_max_group": dq_max_group})
    inputs = make_inputs(1, [24], heads, 2, 16, 16, SMALL, seed=5)
    args = (*inputs, None, *SMALL.values(), 0.25)
    torch.library.opcheck(prefill._prefill, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_layer_traces_as_one_graph_with_the_fused_op():
    """torch.compile(fullgraph=True) of NSAAttention with the kernels: one graph holding the nsa::prefill op (the
    interpreter runs it here; tests/test_nsa_prefill_gpu.py repeats this on the GPU), same output as eager."""
    config = NSAConfig(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, head_dim_v=8, cmp_block_size=8,
                       cmp_stride=4, sel_block_size=16, num_selected=4, window_size=16, backend="triton")
    torch.manual_seed(0)
    layer = NSAAttention(config)
    x = torch.randn(1, 40, 32, requires_grad=True)
    graphs = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    y = torch.compile(layer, fullgraph=True, backend=backend)(x)
    assert len(graphs) == 1
    assert sum("nsa.prefill" in str(node.target) for node in graphs[0].graph.nodes) == 1
    torch.testing.assert_close(y, layer(x), rtol=0, atol=0)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_layer_with_packed_sequences_equals_each_sequence_alone(backend):
    """NSAAttention(x, cu_seqlens=...) = the layer on each sequence alone: positions restart, compressed blocks,
    selections and windows never cross a boundary (torch path in float64; the kernels in float32)."""
    config = NSAConfig(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, head_dim_v=8, cmp_block_size=8,
                       cmp_stride=4, sel_block_size=16, num_selected=4, window_size=16, backend=backend)
    dtype = torch.float64 if backend == "torch" else torch.float32
    torch.manual_seed(0)
    layer = NSAAttention(config).to(dtype)
    lengths = [21, 3, 40]
    x = randn(1, sum(lengths), 32, seed=4).to(dtype)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    packed = layer(x, cu_seqlens=cu)
    start = 0
    for n in lengths:
        alone = layer(x[:, start:start + n])
        torch.testing.assert_close(packed[:, start:start + n], alone, rtol=1e-6, atol=1e-6)
        start += n


def test_pytorch_path_recomputed_chunks_give_the_same_gradients(monkeypatch):
    """Past CHECKPOINT_ELEMENTS the PyTorch path recomputes each chunk in the backward: same output and gradients
    (bitwise: the recomputation repeats the same operations and the same selection)."""
    inputs = [t.detach().double().requires_grad_() for t in make_inputs(1, [70], 4, 2, 8, 8, SMALL, seed=21)]

    def run() -> tuple[torch.Tensor, ...]:
        out = nsa_attention(*inputs, **SMALL, backend="torch", query_chunk_size=16).output
        return (out, *torch.autograd.grad(out, inputs, torch.ones_like(out)))

    kept = run()
    monkeypatch.setattr(functional, "CHECKPOINT_ELEMENTS", 0)
    recomputed = run()
    assert all(torch.equal(a, b) for a, b in zip(kept, recomputed, strict=True))


def test_gpt_traces_as_one_graph_with_one_fused_op_per_layer():
    """The harness GPT with NSA attention on the kernels: torch.compile(fullgraph=True) gives one graph holding one
    nsa::prefill per layer (the interpreter runs them here)."""
    from sal_harness.model import GPT, GPTConfig, ModelConfig, NSAAttentionConfig

    config = GPTConfig(model=ModelConfig(vocab_size=32, n_layer=2, hidden_size=32, num_heads=4, num_kv_heads=2,
                                         head_dim=8, max_seq_len=64),
                       attention=NSAAttentionConfig(cmp_block_size=8, cmp_stride=4, sel_block_size=16, num_selected=4,
                                                    window_size=16, backend="triton"))
    torch.manual_seed(0)
    model = GPT(config)
    tokens = torch.randint(0, 32, (1, 40))
    graphs = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    logits = torch.compile(model, fullgraph=True, backend=backend)(tokens).logits
    assert len(graphs) == 1
    assert sum("nsa.prefill" in str(node.target) for node in graphs[0].graph.nodes) == 2
    torch.testing.assert_close(logits, model(tokens).logits, rtol=0, atol=0)


def random_selections(lengths: list[int], kv_heads: int, num_selected: int, sel_block_size: int, seed: int
                      ) -> torch.Tensor:
    """int32 [sum(lengths), Hkv, n]: for each token and kv head 1..n distinct blocks among those it can see,
    ascending, padded with -1 (as the top-n writes them); neighbours mostly choose differently."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for length in lengths:
        for t in range(length):
            visible = t // sel_block_size + 1
            for _ in range(kv_heads):
                count = int(torch.randint(1, min(num_selected, visible) + 1, (), generator=generator))
                chosen = torch.randperm(visible, generator=generator)[:count].sort().values.tolist()
                rows.append(chosen + [-1] * (num_selected - count))
    return torch.tensor(rows, dtype=torch.int32).view(sum(lengths), kv_heads, num_selected)


def rule_selections(lengths: list[int], kv_heads: int, num_selected: int, sel_block_size: int, seed: int
                    ) -> torch.Tensor:
    """int32 [sum(lengths), Hkv, n] that keep the top-n's rule (tests/reference.py): each token's forced blocks
    and a random number of its complete candidates, at random, ascending, padded with -1, so that short lists put
    a token's local blocks among slots 1 .. n - 3."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for length in lengths:
        for t in range(length):
            forced = ref_forced_blocks(t, sel_block_size)
            candidates = torch.tensor(ref_candidate_blocks(t, t // sel_block_size + 1, sel_block_size))
            for _ in range(kv_heads):
                room = min(num_selected - len(forced), candidates.numel())
                count = int(torch.randint(0, room + 1, (), generator=generator))
                chosen = candidates[torch.randperm(candidates.numel(), generator=generator)[:count]].tolist()
                rows.append(sorted(forced + chosen) + [-1] * (num_selected - len(forced) - count))
    return torch.tensor(rows, dtype=torch.int32).view(sum(lengths), kv_heads, num_selected)


def packed_lengths(lengths: Sequence[int]) -> Packed:
    """Sequences of ``lengths`` tokens packed in one row dimension."""
    return packed_varlen(torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()]), sum(lengths))


def dense_branch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One branch in float64: (o [1, T, HQ, Dv], base-2 log-sum-exp [T, HQ], +inf where nothing is visible)."""
    heads, kv_heads = q.shape[2], k.shape[2]
    logits = torch.einsum("bthd,bnhd->bthn", q, k.repeat_interleave(heads // kv_heads, dim=2)) * scale
    visible = mask.repeat_interleave(heads // kv_heads, dim=2) if mask.shape[2] > 1 else mask
    lse = torch.logsumexp(logits.masked_fill(~visible, -torch.inf), dim=-1)[0] / math.log(2)
    return dense_masked_attention(q, k, v, mask, scale), torch.where(lse == -torch.inf, torch.inf, lse)


def branch_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor, dout: torch.Tensor,
                     cu: torch.Tensor, cu_keys: torch.Tensor, scale: float,
                     mask_of: Callable[[slice, int, int], torch.Tensor]) -> dict[str, torch.Tensor]:
    """One branch over packed sequences in float64, sequence by sequence: out (gated), o (un-gated), lse (base 2),
    delta = dO . o, and dq, dk, dv, the gradients of sum(dO * g * o). q, gate, dout: token rows [rows, HQ, ...]; k, v:
    the sequences' keys one after the other (cu_keys); mask_of(rows, length, num_keys): a sequence's mask."""
    wide = [t.detach().double().requires_grad_() for t in (q, k, v)]
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in ("out", "o", "lse", "delta")}
    grads = [torch.zeros_like(w) for w in wide]
    for i in range(cu.numel() - 1):
        rows, keys = slice(*cu[i:i + 2].tolist()), slice(*cu_keys[i:i + 2].tolist())
        mask = mask_of(rows, rows.stop - rows.start, keys.stop - keys.start)
        o, lse = dense_branch(wide[0][None, rows], wide[1][None, keys], wide[2][None, keys], mask, scale)
        do = dout[None, rows].double()
        gated = gate[None, rows, :, None].detach().double() * o
        for total, grad in zip(grads, torch.autograd.grad((do * gated).sum(), wide), strict=True):
            total += grad
        parts["out"].append(gated[0].detach())
        parts["o"].append(o[0].detach())
        parts["lse"].append(lse)
        parts["delta"].append((do * o.detach()).sum(-1)[0])
    return {name: torch.cat(rows) for name, rows in parts.items()} | dict(zip(("dq", "dk", "dv"), grads,
                                                                              strict=True))


class SelectionCase(NamedTuple):
    """The selection branch's kernel inputs on packed sequences (token rows) and its float64 results."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    gate: torch.Tensor
    indices: torch.Tensor
    dout: torch.Tensor
    packed: Packed
    expected: dict[str, torch.Tensor]  # out (gated), lse (base 2), delta = dO . o, dq, dk, dv


def selection_case(heads: int, kv_heads: int, seed: int, lengths: tuple[int, ...] = (21, 3, 40),
                   choose: Callable[..., torch.Tensor] = random_selections, dims: tuple[int, int] = (16, 16),
                   dtype: torch.dtype = torch.float32) -> SelectionCase:
    """Random selections (``random_selections``, or ``choose``) of blocks of 4 tokens, n = 5, on packed sequences
    of ``lengths`` tokens, head dims ``dims`` (d_k, d_v), inputs in ``dtype``; the expected values from the dense
    masked attention of each sequence in float64 (on the inputs as rounded to dtype)."""
    dk, dv = dims
    q, _, _, k, v, _, _, gates = make_inputs(1, list(lengths), heads, kv_heads, dk, dv, CHOOSY, seed=seed)
    q, k, v, gate = (x.detach().to(dtype) for x in (q[0], k[0], v[0], gates[0, ..., 1]))
    indices = choose(list(lengths), kv_heads, 5, 4, seed=seed)
    dout = randn(sum(lengths), heads, dv, seed=99).to(dtype)
    packed = packed_lengths(lengths)
    expected = branch_reference(q, k, v, gate, dout, packed.cu, packed.cu, dk**-0.5,
                                lambda rows, length, _: dense_selected_mask(indices[None, rows], length, 4))
    return SelectionCase(q, k, v, gate, indices, dout, packed, expected)


def check_selection_forward(case: SelectionCase, tiles: SelectedTiles) -> tuple[torch.Tensor, torch.Tensor]:
    """selected_forward on ``case`` into NaN-poisoned buffers, its out, o and lse against float64 -> (lse, o)."""
    q, want = case.q, case.expected
    out, lse, branch_out = output_buffer(*q.shape, like=q), output_buffer(*q.shape[:2], like=q), output_buffer(
        *q.shape, like=q)
    selected_forward(q, case.k, case.v, case.gate, case.indices, out, lse, branch_out, case.packed, 4,
                     q.shape[-1] ** -0.5, False, tiles)
    torch.testing.assert_close(out.double(), want["out"], **TOL)
    torch.testing.assert_close(branch_out.double(), want["o"], **TOL)
    torch.testing.assert_close(lse.double(), want["lse"], **TOL)
    return lse, branch_out


def check_selection_dq(case: SelectionCase, tiles: SelectedTiles, lse: torch.Tensor, branch_out: torch.Tensor,
                       earlier: torch.Tensor | None = None) -> None:
    """selected_dq on ``case`` into a NaN-poisoned buffer, or adding into ``earlier``; dq and delta against
    float64."""
    q, want = case.q, case.expected
    dq = output_buffer(*q.shape, like=q) if earlier is None else earlier.clone()
    delta = output_buffer(*q.shape[:2], like=q)
    selected_dq(q, case.k, case.v, case.gate, case.indices, case.dout, branch_out, lse, delta, dq, case.packed, 4,
                q.shape[-1] ** -0.5, earlier is not None, tiles)
    torch.testing.assert_close(dq.double(), want["dq"] + (0 if earlier is None else earlier.double()), **TOL)
    torch.testing.assert_close(delta.double(), want["delta"], **TOL)


@pytest.mark.parametrize(("rows", "heads", "kv_heads"), [(64, 6, 2), (32, 2, 2), (16, 8, 1), (0, 6, 2), (64, 16, 1)])
def test_selection_query_tiles_match_float64_reference(rows, heads, kv_heads):
    """The selection forward / dq with several neighbouring tokens per program (SelectedTiles.rows = BQ tokens x
    the group: BQ = 16 for G = 3, 32 for G = 1, 2 for G = 8, 4 for G = 16; rows = 0: one token per program) walk
    the union of their tokens' blocks, the kernels alone on random selections: a packed batch puts tile edges
    inside sequences and sequence ends inside tiles, and neighbours choose different blocks (a row that read a block
    it did not select fails). Output, lse, dq and delta = dO . o against float64 given the same blocks. One token
    per program has no tile edges to place: shorter sequences."""
    case = selection_case(heads, kv_heads, seed=rows, lengths=(21, 3, 40) if rows else (13, 3, 20))
    tiles = prefill._tiles(case.q.device, case.q.shape[-1], heads // kv_heads).sel._replace(
        rows=rows, block_forward_max_group=0)
    check_selection_dq(case, tiles, *check_selection_forward(case, tiles))


@pytest.mark.parametrize(("heads", "kv_heads", "forced_rows"), [(12, 1, 128), (16, 2, 32), (20, 1, 64)])
def test_selection_with_the_forced_blocks_apart_matches_float64_reference(heads, kv_heads, forced_rows):
    """SelectedTiles.forced_apart: one-token programs over each token's chosen blocks, then programs of several
    tokens over their forced blocks (8 tokens x 16 rows at G = 12, 2 x 16 at G = 16, 2 x 32 at G = 20), the forward
    resuming from the first pass's partial softmax and the dq adding the two parts. Selections that keep the rule
    (``rule_selections``), some too short to hold n - 3 candidates, so that a local block sits among the chosen
    slots; tiles of 8 tokens span two blocks of 4. Output, lse, dq and delta against float64; outputs start NaN,
    and the dq also adds into an existing gradient."""
    case = selection_case(heads, kv_heads, seed=forced_rows, lengths=(13, 3, 30), choose=rule_selections)
    tiles = prefill._tiles(case.q.device, case.q.shape[-1], heads // kv_heads).sel._replace(
        forced_apart=True, forced_rows=forced_rows)
    lse, branch_out = check_selection_forward(case, tiles)
    check_selection_dq(case, tiles, lse, branch_out)
    check_selection_dq(case, tiles, lse, branch_out, earlier=randn(*case.q.shape, seed=5).float())


@pytest.mark.parametrize(("heads", "kv_heads"), [(6, 2), (2, 2), (4, 2)])
def test_selection_dkdv_of_small_groups_matches_float64_reference(heads, kv_heads):
    """The selection dk/dv of groups narrower than a 16-row step, filled with list entries (G = 3: 4 entries x 4
    heads, G = 1: 16 entries, G = 2: 8 x 2), the kernel alone given the float64 lse and delta: random selections
    spread each block's list over many tokens and chunks."""
    case = selection_case(heads, kv_heads, seed=heads + 7)
    q, want = case.q, case.expected
    tiles = prefill._tiles(q.device, q.shape[-1], heads // kv_heads).sel
    dk, dv = selected_dkdv(q, case.k, case.v, case.gate, case.indices, case.dout, want["lse"].float(),
                           want["delta"].float(), case.packed, 4, q.shape[-1] ** -0.5, tiles)
    torch.testing.assert_close(dk.double(), want["dk"], **TOL)
    torch.testing.assert_close(dv.double(), want["dv"], **TOL)


def dq_in_dkdv_tiles(tiles: SelectedTiles, parts: str, budget: int) -> SelectedTiles:
    """``tiles`` with the selection's dq from its dk/dv at every group, through dq shares (parts "shares":
    fuses_dq) or stored dS (parts "ds": dq_from_ds), whose buffer takes at most ``budget`` bytes per
    token range."""
    if parts == "shares":
        return tiles._replace(fused_dq_max_group=64, fused_dq_bytes=budget)
    return tiles._replace(fused_dq_max_group=0, ds_dq=True, ds_dq_bytes=budget)


@pytest.mark.parametrize(("heads", "kv_heads", "dims", "accumulate", "range_tokens", "parts"), [
    (8, 2, (16, 16), False, None, "shares"),  # G = 4: 4 entries x 4 heads per step
    (8, 2, (16, 16), True, 7, "shares"),  # the same in ranges of 7 tokens, across the sequences' ends
    (6, 2, (24, 16), True, None, "shares"),  # G = 3 (rows padded to 4 per entry), d_k != d_v, q.k split 16 + 16
    (2, 2, (16, 32), False, 5, "shares"),  # G = 1: 16 entries per step; ranges of 5 tokens
    (16, 1, (16, 16), True, None, "shares"),  # G = 16: one entry per step
    (8, 2, (16, 16), True, 7, "ds"),  # dS: G = 4 (rows padded to 16 in the dq's dots), ranges of 7 tokens
    (6, 2, (24, 16), False, None, "ds"),  # G = 3, d_k != d_v, q.k split 16 + 16 (D2 > 0)
    (16, 1, (16, 16), True, None, "ds"),  # G = 16
])
def test_selection_dq_inside_the_dkdv_matches_float64_reference(heads, kv_heads, dims, accumulate, range_tokens,
                                                               parts):
    """The selection's dq from its dk/dv, forced at every group here: the dk/dv's steps also store, per (token, kv
    head, slot), each gathered row's dq share (dS k; SelectedTiles.fuses_dq), which a second kernel sums over each
    token's slots, or its dS over the block's keys (padded from l' = 4 to 16 columns; dq_from_ds), which a second
    kernel multiplies by each slot's keys, in slot order. dq written into a NaN-poisoned buffer, or added to an
    existing gradient; in one token range, or in ranges of range_tokens (that many tokens' shares or dS), whose
    dk / dv add up. delta = dO . o from its own kernel. dq, dk, dv and delta against float64, on random
    selections that leave early tokens with unused slots (-1: never written, never read)."""
    case = selection_case(heads, kv_heads, seed=heads + dims[0], dims=dims)
    q, want = case.q, case.expected
    width = dims[0] if parts == "shares" else 16
    budget = 2**31 if range_tokens is None else range_tokens * q.shape[1] * 5 * width * 4  # n = 5 slots
    tiles = dq_in_dkdv_tiles(prefill._tiles(q.device, q.shape[-1], heads // kv_heads).sel, parts, budget)
    assert len(dq_share_ranges(case.indices, q, heads // kv_heads, 4, tiles)) == (
        1 if range_tokens is None else -(-q.shape[0] // range_tokens))
    delta = output_buffer(*q.shape[:2], like=q)
    selected_row_delta(case.dout, want["o"].float(), delta)
    torch.testing.assert_close(delta.double(), want["delta"], **TOL)
    earlier = randn(*q.shape, seed=5).float()
    dq = earlier.clone() if accumulate else output_buffer(*q.shape, like=q)
    dk, dv = selected_dkdv(q, case.k, case.v, case.gate, case.indices, case.dout, want["lse"].float(), delta,
                           case.packed, 4, q.shape[-1] ** -0.5, tiles, dq, accumulate=accumulate)
    torch.testing.assert_close(dq.double(), want["dq"] + (earlier.double() if accumulate else 0), **TOL)
    torch.testing.assert_close(dk.double(), want["dk"], **TOL)
    torch.testing.assert_close(dv.double(), want["dv"], **TOL)


@pytest.mark.parametrize(("heads", "kv_heads", "dims", "accumulate", "range_tokens"), [
    (8, 2, (16, 16), False, None),  # G = 4 (8 entries x 4 heads per step) in one token range
    (8, 2, (16, 16), True, 7),  # the same in ranges of 7 tokens, across the sequences' ends, adding into out
    (6, 2, (24, 16), False, None),  # G = 3 (rows padded to 4 per entry), d_k != d_v, q.k split 16 + 8
    (2, 2, (16, 32), True, 5),  # G = 1: 16 entries per step; ranges of 5 tokens
    (16, 1, (16, 16), False, 11),  # G = 16: one entry per step
])
def test_selection_forward_over_the_blocks_lists_matches_float64_reference(monkeypatch, heads, kv_heads, dims,
                                                                           accumulate, range_tokens):
    """The selection forward over the (kv head, block) token lists (SelectedTiles.forwards_by_block, forced at every
    group here): each gathered row's result over one block, combined per token over its slots by their lse; in one
    token range or in ranges of range_tokens (block_forward_bytes: that many tokens' parts); out written into a
    NaN-poisoned buffer or added to an earlier branch's; out, o and lse against float64, on random selections
    that leave early tokens with unused slots (-1: never written, never read)."""
    case = selection_case(heads, kv_heads, seed=heads + dims[0] + 1, dims=dims)
    q, want = case.q, case.expected
    part_bytes = kv_heads * 5 * (heads // kv_heads) * (dims[1] * q.element_size() + 4)  # n = 5 slots
    budget = 2**32 if range_tokens is None else range_tokens * part_bytes
    tiles = prefill._tiles(q.device, q.shape[-1], heads // kv_heads).sel._replace(block_forward_max_group=64,
                                                                                   block_forward_bytes=budget)
    ranges: list[tuple[int, int] | None] = []
    lists = selected_module.selection_lists

    def recorded_lists(*args: Any, **kwargs: Any) -> Any:
        ranges.append(kwargs["rows"])
        return lists(*args, **kwargs)

    monkeypatch.setattr(selected_module, "selection_lists", recorded_lists)
    out_shape = (*q.shape[:2], dims[1])
    earlier = randn(*out_shape, seed=6).float()
    out = earlier.clone() if accumulate else output_buffer(*out_shape, like=q)
    lse, branch_out = output_buffer(*q.shape[:2], like=q), output_buffer(*out_shape, like=q)
    selected_forward(q, case.k, case.v, case.gate, case.indices, out, lse, branch_out, case.packed, 4,
                     q.shape[-1] ** -0.5, accumulate, tiles)
    step = q.shape[0] if range_tokens is None else range_tokens
    assert ranges == [(r0, min(r0 + step, q.shape[0])) for r0 in range(0, q.shape[0], step)]
    torch.testing.assert_close(out.double(), want["out"] + (earlier.double() if accumulate else 0), **TOL)
    torch.testing.assert_close(branch_out.double(), want["o"], **TOL)
    torch.testing.assert_close(lse.double(), want["lse"], **TOL)


def assert_close_in_half_precision(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """got (computed in ``dtype``) against want (float64) within four roundings to dtype, relative to want's largest
    magnitude: the list paths round the probabilities, each block's part or dq share, and the stored result once
    each, and a sum's rounding error scales with its terms, not with its (possibly cancelling) value. A rounding:
    float16's unit roundoff 2^-11; bfloat16's whole ulp 2^-7, as the interpreter truncates to it
    (``interpreter_bf16_dot``)."""
    roundoffs = 4 * (2.0**-11 if dtype == torch.float16 else 2.0**-7)
    torch.testing.assert_close(got.double(), want, rtol=roundoffs, atol=roundoffs * want.abs().max().item())


@pytest.mark.parametrize(("heads", "kv_heads", "dims", "range_tokens", "dtype", "parts"), [
    (8, 2, (16, 16), None, torch.bfloat16, "shares"),  # G = 4 in one token range, the GPU's dtype
    (6, 2, (24, 16), 7, torch.float16, "shares"),  # G = 3, d_k != d_v (q.k split 16 + 8), ranges of 7 tokens
    # across the sequences' ends
    (16, 2, (24, 16), 7, torch.bfloat16, "ds"),  # G = 8, the dq from stored dS, the same ranges
])
def test_selection_list_paths_in_half_precision_match_float64_reference(heads, kv_heads, dims, range_tokens, dtype,
                                                                        parts, interpreter_bf16_dot):
    """The forward over the blocks' lists, then the dq from the dk/dv (``dq_in_dkdv_tiles``), on half-precision
    inputs: they store their per-block parts and dq shares or dS in q's dtype, as on the GPU (bf16 there), where
    the other interpreter tests' float32 inputs keep them in float32. out, o, lse, delta, dq, dk and dv against
    float64 on the same rounded inputs; the backward reads the forward's own lse and o."""
    case = selection_case(heads, kv_heads, seed=heads + dims[0] + 2, dims=dims, dtype=dtype)
    q, want, group = case.q, case.expected, heads // kv_heads
    width = dims[0] if parts == "shares" else 16
    part_bytes, share_bytes = kv_heads * 5 * group * (dims[1] * 2 + 4), 5 * heads * width * 2  # n = 5, 2 B
    tiles = dq_in_dkdv_tiles(prefill._tiles(q.device, q.shape[-1], group).sel, parts,
                             2**32 if range_tokens is None else range_tokens * share_bytes)._replace(
        block_forward_max_group=64, block_forward_bytes=2**32 if range_tokens is None else range_tokens * part_bytes)
    assert len(dq_share_ranges(case.indices, q, group, 4, tiles)) == (
        1 if range_tokens is None else -(-q.shape[0] // range_tokens))
    out_shape, scale = (*q.shape[:2], dims[1]), q.shape[-1] ** -0.5
    out, branch_out = output_buffer(*out_shape, like=q), output_buffer(*out_shape, like=q)
    lse = output_buffer(*q.shape[:2], like=q, dtype=torch.float32)
    selected_forward(q, case.k, case.v, case.gate, case.indices, out, lse, branch_out, case.packed, 4, scale, False,
                     tiles)
    for name, got in (("out", out), ("o", branch_out), ("lse", lse)):
        assert_close_in_half_precision(got, want[name], dtype)
    delta = output_buffer(*q.shape[:2], like=lse)
    selected_row_delta(case.dout, branch_out, delta)
    dq = output_buffer(*q.shape, like=q)
    dk, dv = selected_dkdv(q, case.k, case.v, case.gate, case.indices, case.dout, lse, delta, case.packed, 4, scale,
                           tiles, dq)
    assert dq.dtype == dk.dtype == dv.dtype == dtype
    for name, got in (("delta", delta), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert_close_in_half_precision(got, want[name], dtype)


@pytest.mark.parametrize(("lengths", "heads", "kv_heads", "max_group", "ds_dq"), [
    ([45], 8, 2, 0, False),  # G = 4: the selection's forward over query tiles, its dq from its own kernel
    ([5, 35, 1, 29], 6, 2, 0, False),  # G = 3, packed sequences, the same
    ([5, 35, 1, 29], 16, 2, 64, False),  # G = 8: the forward over the blocks' lists, the dq inside the dk/dv
    ([5, 35, 1, 29], 16, 2, 0, True),  # G = 8: the forward over query tiles, the dq from the dk/dv's stored dS
])
def test_kernels_with_the_other_selection_forward_and_dq_match_float64_reference(monkeypatch, lengths, heads,
                                                                                 kv_heads, max_group, ds_dq):
    """The whole layer with the selection's forward and dq computed the way their group's defaults do not
    (SelectedTiles.block_forward_max_group, fused_dq_max_group, ds_dq; the short sequences'
    programs off, which would keep the query tiles' forward): output, selection and the eight gradients against
    float64."""
    use_prefill_tiles(monkeypatch, selected={"fused_dq_max_group": max_group, "block_forward_max_group": max_group,
                                             "short_query_rows": 0, "ds_dq": ds_dq})
    inputs = make_inputs(1, lengths, heads, kv_heads, 24, 16, SMALL, seed=13)
    check_against_reference(inputs, SMALL, lengths if len(lengths) > 1 else None)


class RangeCase(NamedTuple):
    """One range branch's kernel inputs on packed sequences (token rows) and its float64 results."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    gate: torch.Tensor
    dout: torch.Tensor
    packed: Packed
    cu_keys: torch.Tensor
    rule: Any
    scale: float
    expected: dict[str, torch.Tensor]  # branch_reference's


def range_case(heads: int, kv_heads: int, dk: int, dv: int, branch: str) -> RangeCase:
    """The compression ("cmp") or window ("win") branch on packed sequences of 21, 3 and 40 tokens (ends inside
    programs and steps, a sequence shorter than a compressed block)."""
    from nsa.kernels.range_attention import RangeRule
    from nsa.kernels.tiles import derived_counts, num_compressed

    lengths, blocks, scale = [21, 3, 40], CHOOSY, dk**-0.5
    q, k_cmp, v_cmp, _, _, k_win, v_win, gates = make_inputs(1, lengths, heads, kv_heads, dk, dv, blocks, seed=heads)
    cmp = branch == "cmp"
    k, v, gate = (k_cmp, v_cmp, gates[..., 0]) if cmp else (k_win, v_win, gates[..., 2])
    q, k, v, gate = q.detach()[0], k.detach()[0], v.detach()[0], gate.detach()[0]
    dout = randn(sum(lengths), heads, dv, seed=99).float()
    packed = packed_lengths(lengths)
    if cmp:
        cu_keys = derived_counts(packed, lambda n: num_compressed(n, blocks["block_size"], blocks["block_stride"]))
        rule = RangeRule(blocks["block_stride"], blocks["block_size"], 0)
    else:
        cu_keys, rule = packed.cu, RangeRule(1, 1, blocks["window_size"])

    def mask_of(_rows: slice, length: int, num_keys: int) -> torch.Tensor:
        if cmp:
            return dense_cmp_mask(length, num_keys, blocks["block_size"], blocks["block_stride"])
        return dense_window_mask(length, blocks["window_size"])

    want = branch_reference(q, k, v, gate, dout, packed.cu, cu_keys, scale, mask_of)
    return RangeCase(q, k, v, gate, dout, packed, cu_keys, rule, scale, want)


@pytest.mark.parametrize(("heads", "kv_heads", "dk", "dv"), [(6, 2, 16, 16), (12, 1, 24, 16), (4, 4, 16, 32)])
@pytest.mark.parametrize("branch", ["cmp", "win"])
def test_range_dkdv_one_head_per_step_matches_float64_reference(heads, kv_heads, dk, dv, branch):
    """The range dk/dv taking dkv_m tokens of one head per step (RangeTiles(dkv_head_rows=False): wide heads, and
    groups wider than dkv_m; the default steps over tokens x the group's heads run in every other test), the
    kernel alone: given the float64 lse and delta = dO . o of its branch, dk and dv of the compression and window
    branches equal the float64 gradients of sum(dO * g * o), on packed sequences whose ends fall inside steps."""
    from nsa.kernels.range_attention import range_dkdv

    case = range_case(heads, kv_heads, dk, dv, branch)
    want = case.expected
    tiles = prefill._tiles(case.q.device, max(dk, dv), heads // kv_heads).cmp._replace(dkv_head_rows=False)
    dk_got, dv_got = range_dkdv(case.q, case.k, case.v, case.gate, case.dout, want["lse"].float(),
                                want["delta"].float(), case.packed, case.cu_keys, case.rule, case.scale, tiles)
    torch.testing.assert_close(dk_got.double(), want["dk"], **TOL)
    torch.testing.assert_close(dv_got.double(), want["dv"], **TOL)


@pytest.mark.parametrize(("heads", "kv_heads", "dk", "dv"), [(6, 2, 16, 16), (12, 1, 24, 16), (4, 4, 16, 32),
                                                             (40, 2, 16, 16)])
@pytest.mark.parametrize("branch", ["cmp", "win"])
@pytest.mark.parametrize("head_rows", [False, True])
def test_range_forward_and_dq_in_either_row_layout_match_float64_reference(heads, kv_heads, dk, dv, branch,
                                                                            head_rows):
    """The range forward and dq, the kernels alone, with programs of tokens x the group's heads (RangeTiles(
    head_rows=True); G = 3 and 12 leave rows of a 16-row program unused, G = 20 is wider than it and falls back
    to one head) and of tokens of one head: out (gated and added to what out held), lse, the un-gated branch
    output, delta and dq (added to what dq held) equal the float64 values on packed sequences. Outputs start as
    NaN where the kernel must write them."""
    from nsa.kernels.range_attention import range_dq, range_forward

    case = range_case(heads, kv_heads, dk, dv, branch)
    want, q = case.expected, case.q
    tiles = prefill._tiles(q.device, max(dk, dv), heads // kv_heads).win._replace(head_rows=head_rows)
    rows, dv_shape = q.shape[0], (q.shape[0], heads, dv)
    before = randn(*dv_shape, seed=5).float()
    out, branch_out = before.clone(), torch.full(dv_shape, float("nan"))
    lse, delta = torch.full((rows, heads), float("nan")), torch.full((rows, heads), float("nan"))
    range_forward(q, case.k, case.v, case.gate, out, lse, branch_out, case.packed, case.cu_keys, case.rule,
                  case.scale, True, tiles)
    torch.testing.assert_close(out.double(), before.double() + want["out"], **TOL)
    torch.testing.assert_close(branch_out.double(), want["o"], **TOL)
    seen = torch.isfinite(want["lse"])
    torch.testing.assert_close(lse.double()[seen], want["lse"][seen], **TOL)
    assert torch.equal(torch.isinf(lse), ~seen)
    dq_before = randn(*q.shape, seed=6).float()
    dq = dq_before.clone()
    range_dq(q, case.k, case.v, case.gate, case.dout, branch_out, lse, delta, dq, case.packed, case.cu_keys,
             case.rule, case.scale, True, tiles)
    torch.testing.assert_close(delta.double(), want["delta"], **TOL)
    torch.testing.assert_close(dq.double(), dq_before.double() + want["dq"], **TOL)


@given(st.lists(st.integers(0, 13), min_size=1, max_size=4), st.sampled_from([(4, 16), (2, 16), (1, 8), (4, 64)]),
       st.integers(1, 5), st.integers(0, 2**16 - 1))
@example([0, 0], (4, 16), 3, 0)  # no token at all: every program is past the last tile
@settings(max_examples=12)  # each example runs ~10 interpreted programs
def test_query_tile_unions_are_the_distinct_blocks_of_each_tile(lengths, group_rows, num_selected, seed):
    """query_tiles' lists (a Triton kernel) against a plain Python union per (tile, kv head): every distinct block
    a tile's tokens selected, ascending, then -1 to the list's end, and their count; tiles restart at each
    sequence (empty ones included); programs past the last tile get empty lists. The slots repeat blocks and hold
    -1 (unused), and n need not be a power of two."""
    from nsa.kernels.selected import SelectedTiles, query_tiles

    group, rows = group_rows
    num_kv_heads, total = 2, sum(lengths)
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randint(-1, 6, (total, num_kv_heads, num_selected), generator=generator, dtype=torch.int32)
    query = query_tiles(indices, packed_varlen(cu, total), group, SelectedTiles(rows=rows))
    bq, width = query.constexprs["BQ"], query.constexprs["BQ"] * num_selected
    expected = []
    for start, length in zip(cu[:-1].tolist(), lengths, strict=True):
        for first in range(0, length, bq):
            tokens = range(start + first, start + min(first + bq, length))
            expected.append([sorted({j for t in tokens for j in indices[t, h].tolist() if j >= 0})
                             for h in range(num_kv_heads)])
    blocks = query.blocks.view(query.table.grid, num_kv_heads, width)
    counts = query.counts.view(query.table.grid, num_kv_heads)
    for program in range(query.table.grid):
        for h in range(num_kv_heads):
            want = expected[program][h] if program < len(expected) else []
            assert blocks[program, h].tolist() == want + [-1] * (width - len(want)), (program, h)
            assert counts[program, h] == len(want), (program, h)


@pytest.mark.parametrize(("lengths", "group", "rows"), [([5, 1, 11], 4, 16), ([24], 2, 16), ([3, 9], 1, 32),
                                                         ([7, 7], 12, 16), ([6], 4, 0)])
def test_union_list_shape_is_what_query_tiles_builds(lengths, group, rows):
    """nsa::prefill's fake implementation sizes the union lists it returns for dq from sizes alone
    (union_list_shape): the same shape as the lists query_tiles builds, and as union_lists hands on ((0, 0) where
    each program reads its token's own indices)."""
    from nsa.kernels.selected import SelectedTiles, query_tiles, union_list_shape, union_lists

    total, num_kv_heads, num_selected = sum(lengths), 2, 3
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    indices = torch.zeros(total, num_kv_heads, num_selected, dtype=torch.int32)
    tiles = SelectedTiles(rows=rows)
    blocks, counts = union_lists(query_tiles(indices, packed_varlen(cu, total), group, tiles))
    expected = union_list_shape(total, len(lengths), group, num_kv_heads, num_selected, tiles)
    assert tuple(blocks.shape) == expected and tuple(counts.shape) == (expected[0] if expected[1] else 0,)


@pytest.mark.parametrize(("tokens", "group", "head_dim", "short"), [
    (64, 4, 128, True), (16, 16, 64, True),  # up to short_query_rows packed rows x heads, G >= 4
    (65, 4, 128, False), (17, 16, 64, False),  # a longer sequence
    (64, 2, 128, False),  # the GPT's G = 2 kept its own programs
    (16, 16, 192, False),  # heads wider than tile_dq_max_dim: the dq's several-token programs would spill
])
def test_short_sequences_take_the_short_selection_programs(tokens, group, head_dim, short):
    """SelectedTiles.for_tokens, and through it what PrefillRun launches and nsa::prefill's fake implementation
    sizes: the short sequences' rows and launch settings exactly where the rule says, the tiles unchanged
    elsewhere; there the forward walks their unions, not the blocks' lists (forwards_by_block)."""
    tiles = SelectedTiles(short_rows=32, short_tile_num_warps=8, short_tile_num_stages=1, short_query_rows=256)
    chosen = tiles.for_tokens(tokens, group, head_dim)
    assert chosen == (tiles._replace(rows=32, tile_num_warps=8, tile_num_stages=1, block_forward_max_group=0)
                      if short else tiles)
    assert SelectedTiles(short_query_rows=0).for_tokens(1, 16, 128) == SelectedTiles(short_query_rows=0)


@pytest.mark.parametrize(("seq_len", "heads", "rows"), [(64, 8, 32), (65, 8, 16), (40, 4, 16)])
def test_prefill_run_reads_the_selection_tiles_for_its_length(seq_len, heads, rows):
    """The interpreter's tiles (nsa.prefill._tiles): programs of 32 rows up to 256 packed rows x heads at G >= 4,
    of 16 otherwise; PrefillRun launches what for_tokens gives."""
    inputs = [t.detach() for t in make_inputs(1, [seq_len], heads, 2, 16, 16, SMALL, seed=1)]
    run = unpacked_run(inputs, SMALL, 0.25)
    assert run.sel_tiles.rows == rows


@pytest.mark.parametrize(("group", "dk", "dv", "fwd", "dq"), [
    (4, 128, 128, "tile", "tile"), (2, 64, 64, "tile", "tile"),  # several tokens per program
    (4, 192, 128, "tile", "one"),  # the dq of wide heads spills on the tiles' 2 warps: it keeps the 4 of one token
    (16, 128, 128, "one", "one"), (12, 128, 128, "one", "one"),  # one token per program
])
def test_selection_launch_settings_follow_the_programs_tokens_and_head_dims(group, dk, dv, fwd, dq):
    tiles = SelectedTiles(num_warps=4, num_stages=3, dq_num_stages=5, tile_num_warps=2, tile_num_stages=1,
                          tile_dq_max_dim=128)
    settings = {"tile": {"num_warps": 2, "num_stages": 1}, "one": {"num_warps": 4, "num_stages": 3}}
    constexprs = {**query_tile_shape(group, tiles.rows), **split_dims(dk, dv)}
    assert query_launch(tiles, constexprs, dq=False) == settings[fwd]
    one_dq = {"num_warps": 4, "num_stages": 5}  # one token's dq: its own pipeline depth
    assert query_launch(tiles, constexprs, dq=True) == (settings["tile"] if dq == "tile" else one_dq)


def test_nsa_backend_environment_variable_overrides_the_call(monkeypatch):
    """NSA_BACKEND (the design card's switch) wins over the call's backend: torch runs a float64 call that asked for
    triton (the kernels refuse float64), triton refuses a call that asked for torch, and any other value is an
    error naming the variable."""
    inputs = [t.detach().double() for t in make_inputs(1, [24], 4, 2, 8, 8, SMALL, seed=5)]
    want = nsa_attention(*inputs, **SMALL, backend="torch").output
    monkeypatch.setenv("NSA_BACKEND", "torch")
    assert torch.equal(nsa_attention(*inputs, **SMALL, backend="triton").output, want)
    monkeypatch.setenv("NSA_BACKEND", "triton")
    with pytest.raises(NSAInputError, match="float64"):
        nsa_attention(*inputs, **SMALL, backend="torch")
    monkeypatch.setenv("NSA_BACKEND", "fast")
    with pytest.raises(NSAInputError, match=r"NSA_BACKEND='fast' must be one of"):
        nsa_attention(*inputs, **SMALL)
