"""The fused Triton decode step (nsa/kernels/decode.py) against the float64 references.

On this CPU machine the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), on
tiny shapes; tests/test_gpu.py repeats the parity at the public shape on the GPU. Triton is a
pinned CPU requirement, so nothing here is skipped in CI.

Tolerance: the kernels compute in float32 from float32 inputs. The bound is a small multiple of the
float32 error of the torch reference path on the same inputs (its own low-precision error against
the float64 dense reference), plus 1e-6 for rows where that error happens to be ~0.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import pytest
import torch
from conftest import BLOCK_CONFIGS, F64, randn
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import ref_compress_mean, ref_nsa, ref_num_cmp, ref_num_sel

from nsa import NSAAttention, NSAConfig, NSAConfigError, NSAInputError, dispatch
from nsa.decode_attention import decode_attention
from nsa.functional import NSASizes
from nsa.kernels.decode import DecodeTiles, cmp_tiling, decode_attention_triton
from nsa.kernels.launch_args import cdiv

L, D, LP, N, W = 8, 4, 8, 4, 16  # l, d, l', n, w: small, with d | l and d | l'
SIZES = NSASizes(L, D, LP, N, W)
# One position per sequence of the batch, crossing l, l', w and n*l' boundaries.
POSITIONS = [0, 6, 7, 8, 15, 16, 17, 31, 32, 47, 63, 79]
GARBAGE = 50.0  # cache rows a query must not read hold large values: reading one moves the output


def _cache_like(seq_len: int, groups: int, dk: int, dv: int, seed: int, sizes: NSASizes = SIZES,
                positions: list[int] = POSITIONS, kv_heads: int = 2,
                ) -> tuple[dict[str, Any], tuple[torch.Tensor, torch.Tensor]]:
    """Full-sequence inputs, their float64 reference outputs/indices, and cache-shaped buffers for the
    query of sequence b at positions[b]: rows after it filled with garbage, the window as a ring."""
    L, D, LP, N, W = sizes
    batch, hkv = len(positions), kv_heads
    hq = groups * hkv
    q = randn(batch, seq_len, hq, dk, seed=seed)
    k_raw = randn(batch, seq_len, hkv, dk, seed=seed + 1)
    v_raw = randn(batch, seq_len, hkv, dv, seed=seed + 2)
    k_cmp, v_cmp = ref_compress_mean(k_raw, L, D), ref_compress_mean(v_raw, L, D)
    k_sel, v_sel = randn(batch, seq_len, hkv, dk, seed=seed + 3), randn(batch, seq_len, hkv, dv, seed=seed + 4)
    k_win, v_win = randn(batch, seq_len, hkv, dk, seed=seed + 5), randn(batch, seq_len, hkv, dv, seed=seed + 6)
    gates = torch.rand(batch, seq_len, hq, 3, generator=torch.Generator().manual_seed(seed), dtype=F64)
    out, indices = ref_nsa(q, k_cmp, v_cmp, k_sel, v_sel, k_win, v_win, gates, block_size=L, block_stride=D,
                           sel_block_size=LP, num_selected=N, window_size=W)
    rows = torch.arange(batch)
    t = torch.tensor(positions)

    def prefix(full: torch.Tensor, visible: list[int]) -> torch.Tensor:
        buffer = full.clone()
        for b, count in enumerate(visible):
            buffer[b, count:] = GARBAGE * randn(*buffer[b, count:].shape, seed=seed + 10 + b)
        return torch.cat((buffer, GARBAGE * torch.ones_like(buffer[:, :1])), dim=1)  # + discard row

    def ring(full: torch.Tensor) -> torch.Tensor:
        slots = torch.arange(W)
        slot_pos = t[:, None] - (t[:, None] - slots).remainder(W)
        buffer = full[rows[:, None], slot_pos.clamp_min(0)]
        return torch.where((slot_pos >= 0)[:, :, None, None], buffer, GARBAGE)

    visible_cmp = [ref_num_cmp(p + 1, L, D) for p in positions]
    tokens = [p + 1 for p in positions]
    inputs: dict[str, Any] = dict(
        q=q[rows, t], gates=gates[rows, t], positions=t,
        k_cmp=prefix(k_cmp, visible_cmp), v_cmp=prefix(v_cmp, visible_cmp),
        num_cmp_bound=ref_num_cmp(seq_len, L, D),
        k_sel=prefix(k_sel, tokens), v_sel=prefix(v_sel, tokens), num_sel_blocks=ref_num_sel(seq_len, LP),
        k_win=ring(k_win), v_win=ring(v_win),
    )
    return inputs, (out[rows, t], indices[rows, t])


def _run(inputs: dict[str, Any], dtype: torch.dtype, backend: str, sizes: NSASizes = SIZES):
    cast: dict[str, Any] = {k: v.to(dtype) if v.is_floating_point() else v
                            for k, v in inputs.items() if torch.is_tensor(v)}
    bounds = {k: v for k, v in inputs.items() if not torch.is_tensor(v)}
    return decode_attention(**cast, **bounds, sizes=sizes, scale=inputs["q"].shape[-1] ** -0.5, backend=backend)


@pytest.mark.parametrize(("groups", "dk", "dv"), [(1, 16, 16), (2, 24, 16), (4, 8, 32)])
def test_triton_decode_matches_float64_reference(groups: int, dk: int, dv: int) -> None:
    seq_len = POSITIONS[-1] + 1
    inputs, (ref_out, ref_indices) = _cache_like(seq_len, groups, dk, dv, seed=groups * 100 + dk)
    fast = _run(inputs, torch.float32, "triton")
    torch_fp32 = _run(inputs, torch.float32, "torch")
    own_error = (torch_fp32.output.double() - ref_out).abs().max().item()
    assert (fast.output.double() - ref_out).abs().max().item() <= 4 * own_error + 1e-6
    assert torch.equal(fast.block_indices, ref_indices)
    # Counters: what the kernels' masks let through, against NSA.md's counts for each position.
    t = torch.tensor(POSITIONS)[:, None]
    assert torch.equal(fast.reads[..., 0], torch.tensor([ref_num_cmp(p + 1, L, D) for p in POSITIONS])[:, None]
                       .expand(-1, 2))
    sel = torch.where(ref_indices >= 0, (t[..., None] + 1 - ref_indices * LP).clamp(0, LP), 0).sum(-1)
    assert torch.equal(fast.reads[..., 1], sel)
    assert torch.equal(fast.reads[..., 2], (t + 1).clamp(max=W).expand(-1, 2))


@pytest.mark.parametrize("sizes", [NSASizes(16, 4, 8, 4, 16), NSASizes(4, 4, 8, 4, 16), NSASizes(8, 4, 12, 4, 16)],
                         ids=["l>=l'+d", "l=d", "l'/d=3"])
def test_triton_decode_selection_matches_float64_reference_for_other_blocks(sizes: NSASizes) -> None:
    """Eq. 9 inside the compressed tiles for other block sizes: a compressed block whose weights reach two
    selection blocks ahead (l = 4d, l' = 2d), none ahead (l = d), and l'/d = 3 (lanes padded to 4 per selection
    block). With l >= l' + d a complete block's own compressed blocks may all be invisible. Tiles of 4 lanes (1-2
    selection blocks) put a tile end inside every candidate's Eq. 9 terms."""
    inputs, (ref_out, ref_indices) = _cache_like(POSITIONS[-1] + 1, 2, 16, 16, seed=23, sizes=sizes)
    f32: dict[str, Any] = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v
                           for k, v in inputs.items()}
    out, indices, _ = decode_attention_triton(**f32, sizes=sizes, scale=16 ** -0.5,
                                              tiles=DecodeTiles(cmp_block=4, single_tile_block=4, programs_per_sm=64,
                                                                merge_chunk=2))
    own_error = (_run(inputs, torch.float32, "torch", sizes).output.double() - ref_out).abs().max().item()
    assert (out.double() - ref_out).abs().max().item() <= 4 * own_error + 1e-6
    assert torch.equal(indices, ref_indices)


@pytest.mark.parametrize("position", [7, 15])
def test_triton_decode_with_fewer_split_candidates_than_the_top_n_width(position: int) -> None:
    """One split of 2-block tiles over a cache of one or two selection blocks: each split offers fewer candidate
    keys than the top-n's width (n = 4), so the select pads with non-candidates; the blocks and output still
    equal the float64 reference's (forced blocks, -1 for the rest)."""
    inputs, (ref_out, ref_indices) = _cache_like(POSITIONS[-1] + 1, 2, 16, 16, seed=31)
    b = POSITIONS.index(position)
    one: dict[str, Any] = {k: v[b:b + 1] if torch.is_tensor(v) else v for k, v in inputs.items()}
    one.update(num_cmp_bound=ref_num_cmp(position + 1, L, D), num_sel_blocks=ref_num_sel(position + 1, LP))
    tiles = DecodeTiles(cmp_block=4, single_tile_block=4, programs_per_sm=1, merge_chunk=2)
    shape, splits, tiles_per_split = cmp_tiling(SIZES, one["num_cmp_bound"], one["num_sel_blocks"], 2, tiles,
                                                torch.device("cpu"))
    assert splits == 1 and shape.block_q * tiles_per_split < N
    f32: dict[str, Any] = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in one.items()}
    out, indices, _ = decode_attention_triton(**f32, sizes=SIZES, scale=16 ** -0.5, tiles=tiles)
    own_error = (_run(one, torch.float32, "torch").output.double() - ref_out[b:b + 1]).abs().max().item()
    assert (out.double() - ref_out[b:b + 1]).abs().max().item() <= 4 * own_error + 1e-6
    assert torch.equal(indices, ref_indices[b:b + 1])


def test_triton_decode_bounds_past_the_batch_read_nothing_more() -> None:
    """Host bounds larger than any sequence needs (a static-shape cache scans to capacity) change nothing."""
    inputs, _ = _cache_like(POSITIONS[-1] + 1, 2, 16, 16, seed=7)
    tight = _run(inputs, torch.float32, "triton")
    padded = dict(inputs)
    for name in ("k_cmp", "v_cmp", "k_sel", "v_sel"):
        padded[name] = torch.cat((inputs[name], GARBAGE * torch.ones_like(inputs[name][:, :40])), dim=1)
    padded["num_cmp_bound"] += 40
    padded["num_sel_blocks"] += 5
    loose = _run(padded, torch.float32, "triton")
    torch.testing.assert_close(loose.output, tight.output, rtol=0, atol=1e-6)
    assert torch.equal(loose.block_indices, tight.block_indices) and torch.equal(loose.reads, tight.reads)


# Where each planted +-inf sits: an entry of KV head 0 (or query head 0) that the rows of that group read in every
# sequence whose position reaches it (compressed block 0 from t = l - 1 on; token 0 in block 0, a forced selection;
# ring slot 0, which holds a position <= t at every t), so some rows read it and the other group's rows do not.
INF_PLANTS: dict[str, tuple[Any, ...]] = {
    "q": (slice(None, None, 3), 0, 1), "k_cmp": (slice(None), 0, 0, 2), "v_cmp": (slice(None), 0, 0, 3),
    "k_sel": (slice(None), 0, 0, 4), "v_sel": (slice(None), 0, 0, 5), "k_win": (slice(None), 0, 0, 6),
    "v_win": (slice(None), 0, 0, 7),
}


@pytest.mark.parametrize(("buffer", "value"), [
    ("q", math.inf), ("k_cmp", math.inf), ("k_cmp", -math.inf), ("v_cmp", -math.inf), ("k_sel", -math.inf),
    ("v_sel", math.inf), ("k_win", -math.inf), ("v_win", math.inf),
])
def test_triton_decode_poisons_infinite_entries_like_the_torch_step(buffer: str, value: float) -> None:
    """One entry of a hand-built cache (or of q) holding +-inf where some rows read it (nsa.nonfinite): the Triton
    step gives bit for bit what it gives with NaN there (an inf key gives +inf scores or -inf ones, which would drop
    the key), NaN in every column of exactly the rows the torch step poisons (a value's NaN reaches only its own
    column of p @ v), the torch step's other rows, and, in groups none of whose rows read it, the same selected
    blocks (a NaN query attends as zeros: the group's other heads select as in the torch step)."""
    inputs, _ = _cache_like(POSITIONS[-1] + 1, 2, 16, 16, seed=31)

    def planted(fill: float) -> dict[str, Any]:
        tensor = inputs[buffer].clone()
        tensor[INF_PLANTS[buffer]] = fill
        return {**inputs, buffer: tensor}

    fast = _run(planted(value), torch.float32, "triton")
    fast_nan = _run(planted(float("nan")), torch.float32, "triton")
    reference = _run(planted(value), torch.float32, "torch")
    poisoned = reference.output.isnan().all(-1)
    assert poisoned.any() and not poisoned.all(), "the plant must reach some rows and not others"
    for got, want in zip(fast, fast_nan, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(fast.output.isnan().all(-1), poisoned) and torch.isfinite(fast.output[~poisoned]).all()
    torch.testing.assert_close(fast.output[~poisoned], reference.output[~poisoned], rtol=0, atol=1e-5)
    clean_groups = ~poisoned.view(len(POSITIONS), 2, -1).any(-1)
    assert torch.equal(fast.block_indices[clean_groups], reference.block_indices[clean_groups])


@pytest.mark.parametrize(("tiles", "lanes"), [
    (DecodeTiles(cmp_block=16, single_tile_block=16, programs_per_sm=1), 16),
    (DecodeTiles(cmp_block=16, single_tile_block=16, programs_per_sm=64, merge_chunk=1), 16),
    (DecodeTiles(cmp_block=32, single_tile_block=32, programs_per_sm=64, merge_chunk=4), 32),
    (DecodeTiles(cmp_block=4, single_tile_block=4, programs_per_sm=64, merge_chunk=2, sel_blocks=1), 4),
    (DecodeTiles(cmp_block=16, single_tile_block=16, programs_per_sm=64, merge_chunk=2, sel_blocks=8), 16),
    (DecodeTiles(cmp_block=4, single_tile_block=16, programs_per_sm=64, merge_chunk=2), 4),  # 3 splits of 16: 4s
    (DecodeTiles(cmp_block=4, single_tile_block=16, programs_per_sm=256, merge_chunk=2), 16),  # one 16 per split
])
def test_triton_decode_splits_and_merges_match_float64_reference(tiles: DecodeTiles, lanes: int) -> None:
    """Any split of the compressed branch over programs (the merges load merge_chunk partial slots at a
    time, the last chunk partly past the slots), any tile width (single_tile_block where every split then holds
    one tile, else cmp_block) and selected blocks per program give the float64 reference's output and blocks."""
    inputs, (ref_out, ref_indices) = _cache_like(POSITIONS[-1] + 1, 2, 16, 16, seed=11)
    padded = dict(inputs, num_cmp_bound=inputs["num_cmp_bound"] + 40)  # more tiles: up to 4 splits
    for name in ("k_cmp", "v_cmp"):
        padded[name] = torch.cat((inputs[name], GARBAGE * torch.ones_like(inputs[name][:, :40])), dim=1)
    pairs = len(POSITIONS) * 2
    shape, splits, _ = cmp_tiling(SIZES, padded["num_cmp_bound"], padded["num_sel_blocks"], pairs, tiles,
                                  torch.device("cpu"))
    assert shape.block_q * shape.block_r == lanes
    assert (splits == 1) if tiles.programs_per_sm == 1 else (splits >= 2)
    f32: dict[str, Any] = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v
                           for k, v in padded.items()}
    out, indices, _ = decode_attention_triton(**f32, sizes=SIZES, scale=16 ** -0.5, tiles=tiles)
    own_error = (_run(inputs, torch.float32, "torch").output.double() - ref_out).abs().max().item()
    assert (out.double() - ref_out).abs().max().item() <= 4 * own_error + 1e-6
    assert torch.equal(indices, ref_indices)


# Tile settings the hypothesis test draws from: the interpreter's defaults (None); 4-lane tiles, one selected block
# per program, two-slot merges; one split of single 16-lane tiles, 4 selected blocks per program, one-slot merges.
DRAWN_TILES = [None, DecodeTiles(cmp_block=4, single_tile_block=4, programs_per_sm=64, merge_chunk=2, sel_blocks=1),
               DecodeTiles(cmp_block=8, single_tile_block=16, programs_per_sm=1, merge_chunk=1, sel_blocks=4)]


@st.composite
def decode_cases(draw) -> dict[str, Any]:
    """A decode step's setting: block sizes (l, d, l') of conftest.BLOCK_CONFIGS, n, w; a ragged batch of 1-3
    positions (edge values around l, l', w and n*l' first); G (3: padded head rows), H_kv, head dims (12: padded);
    host bounds past the longest sequence (a static-shape cache's); tiles; pages of 1-3 selection blocks."""
    l, d, lp = draw(st.sampled_from(BLOCK_CONFIGS))
    n, w = draw(st.integers(3, 5)), draw(st.integers(1, 20))
    edges = sorted({0, l - 1, l, lp - 1, lp, w - 1, w, n * lp - 1, n * lp} - {-1})
    position = st.one_of(st.sampled_from(edges), st.integers(0, 40))
    return dict(sizes=NSASizes(l, d, lp, n, w), positions=draw(st.lists(position, min_size=1, max_size=3)),
                groups=draw(st.sampled_from([1, 2, 3, 4])), kv_heads=draw(st.sampled_from([1, 2])),
                dk=draw(st.sampled_from([8, 12, 16])), dv=draw(st.sampled_from([8, 12, 16])),
                extra=draw(st.sampled_from([0, 0, 5, 17])), tiles=draw(st.sampled_from(DRAWN_TILES)),
                page_blocks=draw(st.sampled_from([1, 2, 3])), seed=draw(st.integers(0, 2**20)))


def _paged(k: torch.Tensor, v: torch.Tensor, page: int, seed: int
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sequence selection buffers k, v [B, rows, Hkv, D] as NSAKVCache's paged layout: pools [B * pages + 1,
    page, Hkv, D] whose pages are handed out in a random order (the last one the discard page, all garbage, as is
    every row past a buffer's), and the page table [B, pages + 1] int32 (its last column unmapped: the discard
    page)."""
    batch, rows = k.shape[:2]
    pages = cdiv(rows, page)
    order = torch.randperm(batch * pages, generator=torch.Generator().manual_seed(seed))
    table = torch.cat((order.view(batch, pages), torch.full((batch, 1), batch * pages)), dim=1).to(torch.int32)
    pools = []
    for x in (k, v):
        padded = torch.cat((x, x.new_full((batch, pages * page - rows, *x.shape[2:]), GARBAGE)), dim=1)
        pool = GARBAGE * torch.ones(batch * pages + 1, page, *x.shape[2:], dtype=x.dtype)
        pool[order] = padded.unflatten(1, (pages, page)).flatten(0, 1)
        pools.append(pool)
    return pools[0], pools[1], table


@settings(max_examples=10)
@given(decode_cases())
def test_triton_decode_matches_float64_reference_on_drawn_settings(case: dict[str, Any]) -> None:
    """Random settings (decode_cases) of one decode step: the Triton step's output is within the float64
    reference's bound (4x the float32 torch step's own error), its blocks are the reference's, and its read
    counters are NSA.md's counts for each position; on the selection rows as pages handed out in a random order it
    returns bitwise the same. Few examples: the interpreter takes ~0.3-1 s per step."""
    sizes, positions = case["sizes"], case["positions"]
    lp, w = sizes.sel_block_size, sizes.window_size
    seq_len = max(positions) + 1 + case["extra"]
    inputs, (ref_out, ref_indices) = _cache_like(seq_len, case["groups"], case["dk"], case["dv"], case["seed"],
                                                 sizes=sizes, positions=positions, kv_heads=case["kv_heads"])
    f32: dict[str, Any] = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v
                           for k, v in inputs.items()}
    scale, tiles = case["dk"] ** -0.5, case["tiles"]
    out, indices, reads = decode_attention_triton(**f32, sizes=sizes, scale=scale, tiles=tiles)
    k_pool, v_pool, page_table = _paged(f32["k_sel"], f32["v_sel"], case["page_blocks"] * lp, case["seed"])
    paged = decode_attention_triton(**dict(f32, k_sel=k_pool, v_sel=v_pool), sizes=sizes, scale=scale,
                                    page_table=page_table, tiles=tiles)
    for got, want in zip(paged, (out, indices, reads), strict=True):
        assert torch.equal(got, want)
    own_error = (_run(inputs, torch.float32, "torch", sizes).output.double() - ref_out).abs().max().item()
    assert (out.double() - ref_out).abs().max().item() <= 4 * own_error + 1e-6
    assert torch.equal(indices, ref_indices)
    t = torch.tensor(positions)[:, None]
    heads = (-1, case["kv_heads"])
    cmp_reads = torch.tensor([ref_num_cmp(p + 1, sizes.block_size, sizes.block_stride) for p in positions])
    assert torch.equal(reads[..., 0], cmp_reads[:, None].expand(heads))
    sel = torch.where(ref_indices >= 0, (t[..., None] + 1 - ref_indices * lp).clamp(0, lp), 0).sum(-1)
    assert torch.equal(reads[..., 1], sel)
    assert torch.equal(reads[..., 2], (t + 1).clamp(max=w).expand(heads))


def _layer(backend: str, dtype: torch.dtype) -> NSAAttention:
    config = NSAConfig(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, head_dim_v=8, cmp_block_size=L,
                       cmp_stride=D, sel_block_size=LP, num_selected=N, window_size=W, compression="mlp",
                       backend=backend)
    torch.manual_seed(0)
    layer = NSAAttention(config)
    with torch.no_grad():
        for param in layer.parameters():
            # ~N(0, 1/fan_in), the MLP phi's zero-initialised output layer included: O(1) activations.
            param.normal_(0.0, param.shape[-1] ** -0.5)
    return layer.to(dtype)


@pytest.mark.parametrize("static_shapes", [False, True])
def test_layer_decode_with_triton_matches_float64_prefill(static_shapes: bool) -> None:
    """NSAAttention(backend="triton") decoding token by token after a chunked prompt equals the
    float64 whole-sequence forward of the same weights (cache, ring, emission and kernels together). The prompt
    (24 tokens) overfills the 16-slot window ring; the 20 decoded tokens wrap it again, emit 5 compressed blocks
    and open 2 selection blocks."""
    reference = _layer("torch", F64)
    fast = _layer("triton", torch.float32)
    x = randn(2, 44, 32, seed=3)
    with torch.no_grad():
        expected = reference(x)
        cache = fast.new_cache(2, 48, static_shapes=static_shapes)
        outs = [fast(x[:, :24].float(), cache=cache)]
        outs += [fast(x[:, t:t + 1].float(), cache=cache) for t in range(24, 44)]
    got = torch.cat(outs, dim=1).double()
    assert (got - expected).abs().max().item() < 1e-4  # float32 vs float64 over 3 branches of O(1) values


def test_auto_backend_uses_torch_on_cpu_and_says_why(caplog: pytest.LogCaptureFixture,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "_logged", set())  # each reason is logged once per process
    inputs, _ = _cache_like(POSITIONS[-1] + 1, 1, 16, 16, seed=1)
    with caplog.at_level(logging.INFO, logger="nsa.dispatch"):
        auto = _run(inputs, torch.float32, "auto")
    reference = _run(inputs, torch.float32, "torch")
    assert torch.equal(auto.output, reference.output)
    assert any("torch" in r.getMessage() and "not CUDA" in r.getMessage() for r in caplog.records)


def test_triton_backend_refuses_what_it_cannot_run() -> None:
    inputs, _ = _cache_like(POSITIONS[-1] + 1, 1, 16, 16, seed=2)
    with pytest.raises(NSAInputError, match=r"dtype torch\.float64"):
        _run(inputs, F64, "triton")
    grad_inputs = dict(inputs, q=inputs["q"].float().requires_grad_())
    with pytest.raises(NSAInputError, match="gradients are required"):
        _run(grad_inputs, torch.float32, "triton")
    with pytest.raises(NSAInputError, match="backend='cuda' must be one of"):
        _run(inputs, torch.float32, "cuda")
    with pytest.raises(NSAConfigError, match="backend='fast' must be one of"):
        dataclasses.replace(NSAConfig(), backend="fast")


def test_custom_op_registration_passes_opcheck() -> None:
    """nsa::decode_attention_triton has a correct schema and fake (meta) implementation, so
    torch.compile can trace it."""
    inputs, _ = _cache_like(POSITIONS[-1] + 1, 2, 16, 16, seed=4)
    f32 = {k: v.float() if v.is_floating_point() else v for k, v in inputs.items() if torch.is_tensor(v)}
    args = (f32["q"], f32["gates"], f32["positions"], f32["k_cmp"], f32["v_cmp"], inputs["num_cmp_bound"],
            f32["k_sel"], f32["v_sel"], inputs["num_sel_blocks"], f32["k_win"], f32["v_win"], *SIZES, 0.25, None)
    torch.library.opcheck(torch.ops.nsa.decode_attention_triton.default, args,
                          test_utils=("test_schema", "test_faketensor"))
