"""CUDA checks at realistic shapes (marker `gpu`; run on the device with `pytest -m gpu`)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from reference import check_selection, dense_nsa, dense_selection_scores, ref_topn

from nsa import (
    NSAAttention,
    NSAConfig,
    NSAInputError,
    NSAKVCache,
    nsa_attention,
    num_compressed_blocks,
)
from nsa.decode_attention import DecodeResult, decode_attention

pytestmark = pytest.mark.gpu

SIZES: dict[str, Any] = dict(block_size=32, block_stride=16, sel_block_size=64, num_selected=16, window_size=512)
PAPER: dict[str, Any] = dict(cmp_block_size=32, cmp_stride=16, sel_block_size=64, num_selected=16, window_size=512)


def _inputs(seq_len: int, heads: int, kv_heads: int, dim: int, device: str, dtype: torch.dtype) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    num_cmp = num_compressed_blocks(seq_len, 32, 16)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)

    q = rand(1, seq_len, heads, dim)
    kv = [rand(1, n, kv_heads, dim) for n in (num_cmp, num_cmp, seq_len, seq_len, seq_len, seq_len)]
    gates = torch.rand(1, seq_len, heads, 3, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    return [q, *kv, gates]


def _dense_reference(args: list[torch.Tensor]) -> torch.Tensor:
    """tests/reference.py's dense NSA at SIZES on the CPU, in the inputs' dtype: Eq. 8-10 scores, the top-n rule,
    the three masked branches and the gates."""
    q, k_cmp, v_cmp, k_sel, v_sel, k_win, v_win, gates = (a.cpu() for a in args)
    scores = dense_selection_scores(q, k_cmp, SIZES["block_size"], SIZES["block_stride"], SIZES["sel_block_size"])
    indices = ref_topn(scores, SIZES["sel_block_size"], SIZES["num_selected"])
    return dense_nsa(q, k_cmp, v_cmp, k_sel, v_sel, k_win, v_win, gates, indices,
                     **{name: SIZES[name] for name in ("block_size", "block_stride", "sel_block_size", "window_size")})


def test_cuda_bf16_matches_float64_within_bf16_error() -> None:
    """bf16 on the GPU vs the float64 dense reference, bounded by the dense reference's own error in bf16 (the same
    math on the same bf16 inputs, selection flips at bf16 near-ties included) times a small factor. The floor
    (1e-3, a tenth of bf16's rounding of these O(1) outputs) only matters if that own error came out near zero."""
    args64 = _inputs(2048, 16, 2, 64, "cpu", torch.float64)
    ref = _dense_reference(args64)
    args_bf16 = [a.to("cuda", torch.bfloat16) for a in args64]
    fast = nsa_attention(*args_bf16, **SIZES).output.double().cpu()
    own_error = (_dense_reference(args_bf16).double() - ref).abs().max().item()
    assert (fast - ref).abs().max().item() <= 4 * own_error + 1e-3


def test_cuda_decode_matches_prefill() -> None:
    torch.manual_seed(0)
    config = NSAConfig(hidden_size=256, num_heads=8, num_kv_heads=2, head_dim=32, head_dim_v=32)
    layer = NSAAttention(config).cuda()
    x = torch.randn(2, 1500, config.hidden_size, device="cuda")
    with torch.no_grad():
        full = layer(x)
        cache = layer.new_cache(2, 1600)
        prefix = layer(x[:, :1200], cache=cache)
        steps = torch.cat([layer(x[:, t:t + 1], cache=cache) for t in range(1200, 1500)], dim=1)
    # float32 on both sides through different kernels (the prefill's tiles, the decode step's splits), whose sums
    # over up to 1500 keys run in other orders; a wrong block, position or cache row moves outputs by O(1e-2)
    torch.testing.assert_close(torch.cat((prefix, steps), dim=1), full, rtol=2e-4, atol=2e-4)


def test_cache_from_a_device_string_takes_cuda_tensors() -> None:
    """NSAKVCache(device="cuda") stores the current device's index (cuda:0), the device tensors created
    with "cuda" report, so appends of such tensors pass its device check; a missing index is refused."""
    config = NSAConfig(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, head_dim_v=16)
    layer = NSAAttention(config).cuda()
    cache = NSAKVCache(config, 1, 64, device="cuda")
    assert cache.device == torch.empty(0, device="cuda").device
    with torch.no_grad():
        assert layer(torch.randn(1, 3, 64, device="cuda"), cache=cache).shape == (1, 3, 64)
    with pytest.raises(NSAInputError, match=r"device='cuda:\d+'"):
        NSAKVCache(config, 1, 64, device=f"cuda:{torch.cuda.device_count()}")


def _decode_case(batch: int, seq_lens: list[int], dtype: torch.dtype, static: bool = False,
                 page_size: int | None = None):
    """A public-shape layer (HQ=64, H_kv=4, D=128) and a cache (paged with page_size) whose sequences hold
    seq_lens tokens of random content."""
    config = NSAConfig(hidden_size=1024, num_heads=64, num_kv_heads=4, head_dim=128, head_dim_v=128, **PAPER)
    layer = NSAAttention(config).to("cuda", dtype)
    cache = layer.new_cache(batch, max(seq_lens) + 64, static_shapes=static, page_size=page_size)
    cache.fill_random_(seq_lens)  # ragged: each sequence sees only its own prefix
    return layer, cache


def _decode(layer: NSAAttention, cache, q: torch.Tensor, gates: torch.Tensor, backend: str):
    c = layer.config
    end = cache.capacity if cache.static_shapes else max(cache.lengths)
    return decode_attention(
        q, gates, cache.device_lengths - 1, k_cmp=cache.k_cmp, v_cmp=cache.v_cmp,
        num_cmp_bound=num_compressed_blocks(end, c.cmp_block_size, c.cmp_stride), k_sel=cache.k_sel,
        v_sel=cache.v_sel, num_sel_blocks=-(-end // c.sel_block_size), k_win=cache.k_win, v_win=cache.v_win,
        sizes=layer.sizes, scale=c.attention_scale, backend=backend, page_table=cache.page_table,
    )


def _decode_three_ways(layer: NSAAttention, cache: NSAKVCache, q: torch.Tensor,
                       gates: torch.Tensor) -> tuple[DecodeResult, DecodeResult, DecodeResult]:
    """The decode step on the cache: Triton, torch in the cache's dtype, and torch in float64 on a float64 copy of
    the cache (the reference; the torch path is proven against the dense float64 references on the CPU)."""
    with torch.no_grad():
        fast = _decode(layer, cache, q, gates, "triton")
        torch_low = _decode(layer, cache, q, gates, "torch")
        f64 = {name: getattr(cache, name).double() for name in ("k_cmp", "v_cmp", "k_sel", "v_sel", "k_win", "v_win")}
        ref = _decode(layer, SimpleNamespace(**{**vars(cache), **f64}), q.double(), gates.double(), "torch")
    return fast, torch_low, ref


def _decode_selection_scores(cache: NSAKVCache, q: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
    """NSA.md's Eq. 8-10 for one decode query per sequence (at t = seq_lens[b] - 1) over the cache's compressed keys,
    in float64 on the CPU: [B, 1, H_kv, num_sel] (check_selection's layout). Eq. 9's overlap |[i d, i d + l)
    intersect [j l', (j + 1) l')| / l is written out densely."""
    c = cache.config
    l, d, lp = c.cmp_block_size, c.cmp_stride, c.sel_block_size
    num_sel = -(-max(seq_lens) // lp)
    k_cmp, q64 = cache.k_cmp.double().cpu(), q.double().cpu()
    group = c.num_heads // c.num_kv_heads
    scores = torch.zeros(len(seq_lens), 1, c.num_kv_heads, num_sel, dtype=torch.float64)
    for b, n in enumerate(seq_lens):
        visible = 0 if n < l else (n - l) // d + 1
        if visible == 0:
            continue
        keys = k_cmp[b, :visible].repeat_interleave(group, dim=1)  # [visible, HQ, D]
        probs = torch.softmax(torch.einsum("hd,ihd->hi", q64[b], keys) * c.attention_scale, dim=-1)
        start = torch.arange(visible, dtype=torch.float64)[:, None] * d
        first = torch.arange(num_sel, dtype=torch.float64)[None, :] * lp
        overlap = ((torch.minimum(start + l, first + lp) - torch.maximum(start, first)).clamp_min(0) / l)
        scores[b, 0] = (probs @ overlap).view(c.num_kv_heads, group, num_sel).sum(dim=1)
    return scores


def _check_decode_selections(fast: torch.Tensor, ref: torch.Tensor, cache: NSAKVCache, q: torch.Tensor,
                             seq_lens: list[int]) -> None:
    """The Triton step's (fast) and the float64 torch step's (ref) block indices [B, H_kv, n] against the top-n of
    ``_decode_selection_scores``, exchanges allowed only between blocks whose scores (sums of probabilities, at
    most G) lie within rounding of each other: the float64 path's, and the kernel's float32 sums of the same bf16
    values (~1e-8 here)."""
    c = cache.config
    scores = _decode_selection_scores(cache, q, seq_lens)
    positions = torch.tensor(seq_lens)[:, None] - 1
    check_selection(ref.cpu()[:, None], scores, c.sel_block_size, c.num_selected, positions, tol=1e-12)
    check_selection(fast.cpu()[:, None], scores, c.sel_block_size, c.num_selected, positions, tol=1e-6)


@pytest.mark.parametrize("static", [False, True])
def test_triton_decode_matches_float64_within_bf16_error(static: bool) -> None:
    """The Triton decode step (bf16) vs the torch path in float64 on the same cache (the torch path is
    proven against the dense float64 references on CPU), bounded by the torch path's own bf16 error.
    Ragged lengths cross l, l', w and n*l' boundaries; selection must agree except at bf16 near-ties."""
    torch.manual_seed(0)
    seq_lens = [1, 31, 32, 100, 511, 513, 1024, 1025, 3000, 20000, 65536, 70001]
    layer, cache = _decode_case(len(seq_lens), seq_lens, torch.bfloat16, static)
    q = torch.randn(len(seq_lens), 64, 128, device="cuda", dtype=torch.bfloat16)
    gates = torch.rand(len(seq_lens), 64, 3, device="cuda", dtype=torch.bfloat16)
    fast, torch_bf16, ref = _decode_three_ways(layer, cache, q, gates)
    own_error = (torch_bf16.output.double() - ref.output).abs().max().item()
    assert (fast.output.double() - ref.output).abs().max().item() <= 2 * own_error + 1e-3
    _check_decode_selections(fast.block_indices, ref.block_indices, cache, q, seq_lens)
    # Counters: cmp and window reads depend on t only; selection reads are the tokens <= t of the
    # blocks the kernel chose (NSA.md), counted here from its indices.
    assert torch.equal(fast.reads[..., 0], ref.reads[..., 0]) and torch.equal(fast.reads[..., 2], ref.reads[..., 2])
    t = torch.tensor(seq_lens, device="cuda")[:, None, None] - 1
    blocks = fast.block_indices
    sel_tokens = torch.where(blocks >= 0, (t + 1 - blocks * 64).clamp(0, 64), 0).sum(dim=-1)
    assert torch.equal(fast.reads[..., 1], sel_tokens)


def test_triton_decode_poisons_exactly_the_rows_reading_a_nonfinite_entry() -> None:
    """nsa.nonfinite at the public shape (bf16, ragged lengths up to 70,001 tokens), on the Triton step and the torch
    step: NaN / +-inf planted in one query head, a visible compressed key and value, keys and values of the forced
    first selection block, and a window slot, each in one sequence and one KV head. Each poisons, in every column,
    exactly the heads that read it, and no other row; elsewhere the Triton step matches the float64 torch step on
    the same cache within the torch step's own bf16 error (as above)."""
    torch.manual_seed(0)
    seq_lens = [1, 40, 600, 3000, 65536, 70001]
    layer, cache = _decode_case(len(seq_lens), seq_lens, torch.bfloat16)
    q = torch.randn(len(seq_lens), 64, 128, device="cuda", dtype=torch.bfloat16)
    gates = torch.rand(len(seq_lens), 64, 3, device="cuda", dtype=torch.bfloat16)
    inf, nan = float("inf"), float("nan")
    # (buffer, index, value, the query heads reading it): compressed block 0 is visible from t = 31 on, token 5 lies
    # in block 0 (forced), ring slot 0 holds position 0 at t = 0; a KV head's group is its 16 query heads.
    plants = [(q, (1, 5, 7), inf, slice(5, 6)), (cache.k_cmp, (2, 0, 1, 3), -inf, slice(16, 32)),
              (cache.v_cmp, (4, 10, 2, 0), nan, slice(32, 48)), (cache.k_sel, (3, 5, 0, 9), inf, slice(0, 16)),
              (cache.v_sel, (5, 7, 3, 1), -inf, slice(48, 64)), (cache.k_win, (0, 0, 2, 5), -inf, slice(32, 48))]
    expected = torch.zeros(len(seq_lens), 64, dtype=torch.bool, device="cuda")
    for buffer, index, value, heads in plants:
        buffer[index] = value
        expected[index[0], heads] = True
    fast, torch_bf16, ref = _decode_three_ways(layer, cache, q, gates)
    for name, result in (("triton", fast), ("torch bf16", torch_bf16), ("torch float64", ref)):
        poisoned = result.output.isnan().all(-1)
        assert torch.equal(poisoned, expected), f"{name}: poisoned rows differ from the rows reading a plant"
        assert torch.isfinite(result.output[~expected]).all(), f"{name}: a row reading no plant is not finite"
    own_error = (torch_bf16.output.double() - ref.output)[~expected].abs().max().item()
    assert (fast.output.double() - ref.output)[~expected].abs().max().item() <= 2 * own_error + 1e-3


def test_triton_layer_step_in_cuda_graph_matches_eager() -> None:
    """A static-shape layer step with the Triton backend captures in a CUDA graph and replays exactly
    what eager computes (same kernels, same inputs)."""
    torch.manual_seed(0)
    layer, cache = _decode_case(4, [5000] * 4, torch.bfloat16, static=True)
    graph_cache = layer.new_cache(4, cache.capacity, static_shapes=True)
    graph_cache.fill_random_(5000)
    x = torch.randn(4, 1, layer.config.hidden_size, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        eager = [layer(x, cache=cache) for _ in range(3)]
    for a, b in zip(eager, _graph_replays(layer, graph_cache, x, 3), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@torch.no_grad()
def _graph_replays(layer: NSAAttention, cache: NSAKVCache, x: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """The layer's step on x captured in a CUDA graph (after a warm-up step that compiles the kernels outside the
    capture and whose token the replays overwrite), replayed `steps` times: each replay's output."""
    lengths = list(cache.lengths)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        layer(x, cache=cache)
    torch.cuda.current_stream().wait_stream(side)
    cache.lengths = lengths
    cache.device_lengths.copy_(torch.tensor(lengths))
    cache.map_pages([n + steps for n in lengths])  # a replay runs no host code: map the pages the replays reach
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer(x, cache=cache)
    replays = []
    for _ in range(steps):
        graph.replay()
        replays.append(out.clone())
    return replays


def test_paged_triton_step_in_cuda_graph_matches_eager_and_float64() -> None:
    """Paged KV at the public shape (bf16): 4 sequences of different lengths in a pool of 256-token pages.
    The Triton step on the paged cache matches the torch path in float64 on the same cache within the torch
    path's own bf16 error (selection equal but for bf16 near-ties, as above); the static-shape layer step
    captured in a CUDA graph replays exactly what eager computes, across a step that reaches a new page
    (sequence 1 at 5120 = 20 pages: mapped before the capture, since a replay runs no host code)."""
    torch.manual_seed(0)
    seq_lens = [1000, 5119, 9000, 17000]
    layer, cache = _decode_case(4, seq_lens, torch.bfloat16, static=True, page_size=256)
    assert cache.page_table is not None and cache.k_sel.shape[1:3] == (256, 4)
    q = torch.randn(4, 64, 128, device="cuda", dtype=torch.bfloat16)
    gates = torch.rand(4, 64, 3, device="cuda", dtype=torch.bfloat16)
    fast, torch_bf16, ref = _decode_three_ways(layer, cache, q, gates)
    own_error = (torch_bf16.output.double() - ref.output).abs().max().item()
    assert (fast.output.double() - ref.output).abs().max().item() <= 2 * own_error + 1e-3
    _check_decode_selections(fast.block_indices, ref.block_indices, cache, q, seq_lens)
    assert torch.equal(fast.reads[..., 0], ref.reads[..., 0]) and torch.equal(fast.reads[..., 2], ref.reads[..., 2])

    graph_cache = layer.new_cache(4, cache.capacity, static_shapes=True, page_size=256)
    graph_cache.fill_random_(seq_lens)  # the same seed: the same content and pages as cache
    x = torch.randn(4, 1, layer.config.hidden_size, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        eager = [layer(x, cache=cache) for _ in range(3)]
    replays = _graph_replays(layer, graph_cache, x, 3)
    assert len(cache.pages[1]) == len(graph_cache.pages[1]) == 21  # the eager steps mapped the new page too
    for a, b in zip(eager, replays, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
