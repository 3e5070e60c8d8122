"""The fused NSA prefill kernels (nsa.prefill) on the GPU at real shapes, against float64 dense references.

The references (tests/reference.py, dense masks written from NSA.md) run in float64 on the GPU on the same
bf16 inputs. Tolerance: the kernels read bf16 and accumulate in float32, then round outputs and gradients
to bf16 (2^-8 relative) and add three branches: 1e-2 on the norm of the error is a few bf16 roundings (the drawn
settings' test adds 1e-5 per element for tensors whose reference is ~0: _check_drawn_config).
The selection is compared with the float64 scores: equal sets except where the reference's scores at the
boundary are within the kernels' float32 summation error of a tie (check_selection).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from conftest import PrefillConfig, use_prefill_tiles
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from reference import check_selection, dense_nsa, dense_selection_scores, ref_num_cmp

from nsa import NSAAttention, NSAConfig, apply_rope, nsa_attention
from nsa.compress_pool import compress_mean_pool
from nsa.nonfinite import nonfinite_rows, nsa_nonfinite_rows, poison_rows

pytestmark = pytest.mark.gpu
BLOCKS: dict[str, Any] = {"block_size": 32, "block_stride": 16, "sel_block_size": 64, "num_selected": 16,
                          "window_size": 512}
BF16_RTOL = 1e-2
NAMES = ("q", "k_cmp", "v_cmp", "k_sel", "v_sel", "k_win", "v_win", "gates")


def _inputs(seq_len: int, heads: int, kv_heads: int, dk: int, dv: int, dtype=torch.bfloat16, seed: int = 0, *,
            blocks: dict = BLOCKS, batch: int = 1, lengths: Sequence[int] | None = None, device: str = "cuda"):
    """nsa_attention's eight inputs, requiring grad: ``batch`` rows of seq_len tokens, or (batch 1) the sequences of
    ``lengths`` packed in seq_len = sum(lengths) rows, with each sequence's compressed blocks under ``blocks``."""
    assert lengths is None or (batch == 1 and sum(lengths) == seq_len), (batch, seq_len, lengths)
    gen = torch.Generator(device=device).manual_seed(seed)
    n_cmp = sum(ref_num_cmp(n, blocks["block_size"], blocks["block_stride"]) for n in (lengths or [seq_len]))
    sizes = [(seq_len, heads, dk), (n_cmp, kv_heads, dk), (n_cmp, kv_heads, dv), (seq_len, kv_heads, dk),
             (seq_len, kv_heads, dv), (seq_len, kv_heads, dk), (seq_len, kv_heads, dv)]
    tensors = [torch.randn(batch, *size, device=device, generator=gen).to(dtype) for size in sizes]
    tensors.append(torch.rand(batch, seq_len, heads, 3, device=device, generator=gen).to(dtype))
    return [t.requires_grad_() for t in tensors]


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().double() - want.detach()).norm() / want.detach().norm())


@pytest.mark.parametrize(("heads", "kv_heads", "dk", "dv", "seq_len"), [
    (64, 4, 128, 128, 2048),  # the public shape
    (64, 4, 192, 128, 2048),  # the paper's d_k != d_v
    (48, 4, 128, 128, 2048),  # G = 12
    (16, 4, 64, 64, 3000),  # G = 4, T not a multiple of any block
    (4, 4, 256, 256, 1024),  # G = 1, the widest head
    (64, 1, 64, 64, 1024),  # G = 64
])
def test_prefill_matches_float64_reference(heads, kv_heads, dk, dv, seq_len):
    _check_against_reference(heads, kv_heads, dk, dv, seq_len)


@pytest.mark.parametrize(("rows", "heads", "kv_heads", "dk", "dv", "seq_len"), [
    (16, 16, 4, 64, 64, 3000),  # G = 4: 4 tokens per program
    (16, 16, 4, 128, 128, 2048),  # the forward and dq on SelectedTiles.tile_num_warps
    (16, 16, 4, 192, 128, 2048),  # the forward on tile_num_warps, the dq (past tile_dq_max_dim) on num_warps
    (64, 16, 4, 128, 128, 2048),  # 16 tokens per program
    (32, 4, 4, 256, 256, 1024),  # G = 1, the widest head: 32 tokens per program
    (0, 16, 4, 64, 64, 3000),  # one token per program
    (16, 64, 4, 128, 128, 2048),  # the public shape's long sequences: one token per program
])
def test_selection_query_tiles_match_float64_reference(monkeypatch, rows, heads, kv_heads, dk, dv, seq_len):
    """The selection forward / dq with several neighbouring tokens per program, over the union of their blocks
    (SelectedTiles.rows; tests/test_nsa_prefill.py checks it in the interpreter), with the short sequences' programs
    off so that the rows are the ones named (the other tests run them: every one up to 131072 rows x heads)."""
    use_prefill_tiles(monkeypatch, selected={"rows": rows, "short_query_rows": 0})
    _check_against_reference(heads, kv_heads, dk, dv, seq_len)


@pytest.mark.parametrize(("group", "rows"), [(2, 16), (4, 64)])  # the GPT's 8 tokens; G = 4's short programs: 16
def test_query_tile_unions_at_real_sizes_are_each_tiles_distinct_blocks(group, rows):
    """query_tiles' union lists (a Triton kernel) over 2 x 16k tokens of random selections with repeats and unused
    slots, against each (tile, kv head)'s distinct blocks taken through a membership table: ascending, then -1."""
    from nsa.kernels.selected import SelectedTiles, query_tiles
    from nsa.kernels.tiles import packed_batch

    batch, seq_len, kv_heads, num_selected, num_blocks = 2, 16384, 2, 16, 256
    gen = torch.Generator(device="cuda").manual_seed(0)
    indices = torch.randint(-1, num_blocks, (batch * seq_len, kv_heads, num_selected), device="cuda", generator=gen,
                            dtype=torch.int32)
    query = query_tiles(indices, packed_batch(batch, seq_len, indices.device), group, SelectedTiles(rows=rows))
    bq = query.constexprs["BQ"]
    slots = indices.view(-1, bq, kv_heads, num_selected).transpose(1, 2).reshape(-1, bq * num_selected)
    member = torch.zeros(slots.shape[0], num_blocks + 1, dtype=torch.bool, device="cuda")
    member.scatter_(1, slots.long() + 1, True)
    member = member[:, 1:]
    columns = torch.arange(num_blocks, device="cuda").expand_as(member)
    listed = torch.where(member, columns, num_blocks + columns).sort(-1).values
    expected = torch.where(listed < num_blocks, listed, -1)[:, :bq * num_selected].int()
    real = slots.shape[0]  # the table may hold spare programs past the last tile: empty lists
    assert torch.equal(query.counts[:real], member.sum(-1, dtype=torch.int32)) and not query.counts[real:].any()
    assert torch.equal(query.blocks[:real], expected) and bool((query.blocks[real:] == -1).all())


@pytest.mark.parametrize(("heads", "kv_heads", "dk", "dv", "seq_len"), [
    (64, 4, 128, 128, 2048),  # the public shape: 8 tokens x 16 heads per forced program
    (48, 4, 192, 128, 3000),  # G = 12, the paper's d_k, T not a multiple of any block
    (64, 1, 64, 64, 1024),  # G = 64: 2 tokens x 64 heads
])
def test_selection_with_the_forced_blocks_apart_matches_float64_reference(monkeypatch, heads, kv_heads, dk, dv,
                                                                           seq_len):
    """The selection forward / dq with the three forced blocks in programs of several tokens apart from the other
    blocks (SelectedTiles.forced_apart, off by default: the one-pass default runs in every other test; the forward
    resumes from the partial softmax; tests/test_nsa_prefill.py checks it in the interpreter). One token per program
    where the forced blocks go apart: the short sequences' programs off."""
    use_prefill_tiles(monkeypatch, selected={"forced_apart": True, "short_query_rows": 0})
    _check_against_reference(heads, kv_heads, dk, dv, seq_len)


@pytest.mark.parametrize(("heads", "kv_heads", "dk", "dv", "seq_len", "max_group", "share_bytes"), [
    (16, 4, 128, 128, 2048, 4, 2**31),  # G = 4 (the default there): the dq inside the dk/dv, in one token range
    (16, 4, 128, 128, 2048, 4, 2**25),  # the same in four ranges of 512 tokens (dk / dv added up in float32)
    (12, 4, 192, 128, 3000, 4, 2**31),  # G = 3, the paper's d_k (q.k split 128 + 64), T not a multiple of any block
    (48, 4, 128, 128, 2048, 64, 2**31),  # G = 12, whose default is the dq's own kernel
    (16, 4, 128, 128, 2048, 0, 2**31),  # G = 4 with the dq's own kernel
])
def test_selection_dq_inside_the_dkdv_or_apart_matches_float64_reference(monkeypatch, heads, kv_heads, dk, dv,
                                                                         seq_len, max_group, share_bytes):
    """The selection's dq from its dk/dv steps' shares, summed per token over its slots, or from its own kernel
    (SelectedTiles.fused_dq_max_group: the dq inside up to G = 4 by default; tests/test_nsa_prefill.py checks both
    in the interpreter)."""
    use_prefill_tiles(monkeypatch, selected={"fused_dq_max_group": max_group, "fused_dq_bytes": share_bytes})
    _check_against_reference(heads, kv_heads, dk, dv, seq_len)


@pytest.mark.parametrize(("heads", "kv_heads", "dk", "dv", "seq_len", "ds_bytes"), [
    (64, 4, 128, 128, 2048, 2**31),  # G = 16 (public) in one token range
    (64, 4, 128, 128, 2048, 2**26),  # the same in four ranges of 512 tokens (131,072 bytes of dS per token)
    (48, 4, 192, 128, 3000, 2**31),  # G = 12, the paper's d_k (q.k split 128 + 64), T not a multiple of any block
    (32, 4, 128, 128, 2048, 2**31),  # G = 8 (dS rows of 8 heads, padded to 16 in the dq's dots)
])
def test_selection_dq_from_stored_ds_matches_float64_reference(monkeypatch, heads, kv_heads, dk, dv, seq_len,
                                                               ds_bytes):
    """The selection's dq from the dS its dk/dv stores per (token, kv head, slot), one program per (token, kv head)
    multiplying each slot's dS by its block's keys (SelectedTiles.ds_dq;
    tests/test_nsa_prefill.py checks it in the interpreter)."""
    use_prefill_tiles(monkeypatch, selected={"ds_dq": True, "ds_dq_bytes": ds_bytes})
    _check_against_reference(heads, kv_heads, dk, dv, seq_len)


@pytest.mark.parametrize(("heads", "kv_heads", "dk", "dv", "seq_len", "part_bytes"), [
    (16, 4, 128, 128, 2048, 2**32),  # G = 4 in one token range
    (16, 4, 128, 128, 2048, 2**25),  # the same in ranges of 504 tokens (66,560 bytes of parts per token)
    (12, 4, 192, 128, 3000, 2**32),  # G = 3, the paper's d_k (q.k split 128 + 64), T not a multiple of any block
])
def test_selection_forward_over_block_lists_matches_float64_reference(monkeypatch, heads, kv_heads, dk, dv, seq_len,
                                                                       part_bytes):
    """The selection forward over the blocks' token lists, each token's per-block results combined over its slots
    (SelectedTiles.forwards_by_block, the default up to G = 4 past the short sequences; tests/test_nsa_prefill.py
    checks it in the interpreter)."""
    use_prefill_tiles(monkeypatch, selected={"block_forward_max_group": 64, "block_forward_bytes": part_bytes,
                                             "short_query_rows": 0})  # the short programs would keep their forward
    _check_against_reference(heads, kv_heads, dk, dv, seq_len)


@pytest.mark.parametrize(("heads", "kv_heads", "dk", "dv", "seq_len", "dkv_m"),
                         [(64, 4, 128, 128, 2048, 32), (48, 4, 192, 128, 3000, 16)])
def test_range_dkdv_one_head_per_step_matches_float64_reference(monkeypatch, heads, kv_heads, dk, dv, seq_len,
                                                                 dkv_m):
    """The range dk/dv over one head's tokens per step (RangeTiles(dkv_head_rows=False), as 256-wide heads run it;
    the former defaults at 128 and 192; tests/test_nsa_prefill.py checks it in the interpreter)."""
    use_prefill_tiles(monkeypatch, ranges={"dkv_head_rows": False, "dkv_m": dkv_m})
    _check_against_reference(heads, kv_heads, dk, dv, seq_len)


@pytest.mark.parametrize(("heads", "kv_heads", "dk", "dv", "seq_len", "tma"),
                         [(64, 4, 128, 128, 2048, False), (48, 4, 192, 128, 3000, True)])
def test_loads_through_pointers_or_descriptors_match_float64_reference(monkeypatch, heads, kv_heads, dk, dv, seq_len,
                                                                       tma):
    """Every range, selection and top-n kernel loading K / V the other way than the defaults pick (all by pointers,
    the path without TMA; or all through tensor descriptors, the window and the top-n at d_k = 192 included;
    tests/test_nsa_prefill.py checks both in the interpreter)."""
    use_prefill_tiles(monkeypatch, ranges={"tma": tma}, selected={"tma": tma}, topn={"tma": tma})
    _check_against_reference(heads, kv_heads, dk, dv, seq_len)


@pytest.mark.parametrize(("heads", "kv_heads", "dk", "dv", "seq_len"), [(16, 4, 128, 128, 2048), (4, 4, 64, 64, 3000)])
def test_selection_dkdv_of_small_groups_matches_float64_reference(heads, kv_heads, dk, dv, seq_len):
    """The selection dk/dv of groups narrower than a 16-row step, filled with list entries (tests/test_nsa_prefill.py
    checks it in the interpreter); at head dim 128 the window's K / V through TMA (the default up to G = 4)."""
    _check_against_reference(heads, kv_heads, dk, dv, seq_len)


def _reference_by_kv_head(inputs: list[torch.Tensor], indices: torch.Tensor, dout: torch.Tensor, blocks: dict = BLOCKS
                          ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """dense_nsa in float64 and its gradients, one kv head and its G query heads at a time (they share nothing
    with the other heads): the whole 48-head reference at 3000 tokens holds ~34 GB, and eight xdist workers
    share the GPU."""
    kv_heads = inputs[1].shape[2]
    group = inputs[0].shape[2] // kv_heads
    sizes = {k: v for k, v in blocks.items() if k != "num_selected"}
    outs, grads = [], []
    for h in range(kv_heads):
        heads = slice(h * group, (h + 1) * group)
        # inputs 0 and 7 (q, gates) have one entry per query head, the six K/V tensors one per kv head
        wide = [x.detach()[:, :, heads if i in (0, 7) else slice(h, h + 1)].double().requires_grad_()
                for i, x in enumerate(inputs)]
        args = [*wide, indices[:, :, h:h + 1]]
        reference = dense_nsa(*args, **sizes)
        grads.append(torch.autograd.grad(reference, wide, dout[:, :, heads].double()))
        outs.append(reference.detach())
    return torch.cat(outs, dim=2), [torch.cat(parts, dim=2) for parts in zip(*grads, strict=True)]


def _check_against_reference(heads: int, kv_heads: int, dk: int, dv: int, seq_len: int) -> None:
    inputs = _inputs(seq_len, heads, kv_heads, dk, dv)
    out, indices = nsa_attention(*inputs, **BLOCKS, backend="triton")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, dout)
    scores = dense_selection_scores(inputs[0].detach().double(), inputs[1].detach().double(), BLOCKS["block_size"],
                                    BLOCKS["block_stride"], BLOCKS["sel_block_size"])
    check_selection(indices.cpu(), scores.cpu(), BLOCKS["sel_block_size"], BLOCKS["num_selected"],
                    tol=1e-5 * float(scores.max()))
    reference, reference_grads = _reference_by_kv_head(inputs, indices, dout)
    assert _rel(out, reference) < BF16_RTOL
    errors = {name: _rel(got, want) for name, got, want in zip(NAMES, grads, reference_grads, strict=True)}
    assert max(errors.values()) < BF16_RTOL, errors


@st.composite
def drawn_configs(draw: st.DrawFn) -> PrefillConfig:
    """Valid layer settings around the paper's 32 / 16 / 64: d in {8, 16}, l from d to 3d and l' from d to 8d (NSA.md
    asks d | l and d | l'; the kernels also l'/d a power of two, nsa.prefill.prefill_obstacles), so l > l' + d
    occurs; n = 3 (the forced blocks alone), 7 or 16; windows of 1 token to past the sequence; groups of 1 to 64
    (the kernels' largest), 5 and 12 not powers of two; d_k != d_v; batch 1-2 or up to three packed sequences. T up
    to min(4096, 32768 // G) a sequence: the float64 reference holds T x G x T scores a branch per kv head and
    sequence, at most 0.72 GB (G = 12 at 2730 tokens; the fixed cases' G = 12 at 3000 tokens: 0.86 GB). Each list
    starts with the choice hypothesis' first example (every draw its simplest) takes: l > l' + d at d = 16, n = 16,
    G = 12, d_k = 192 != d_v, three packed sequences; lengths from edge values (1, l - 1, l, l' + 1, 2l' + 1, the
    longest) or any."""
    stride = draw(st.sampled_from([16, 8]))
    blocks = {"block_size": stride * draw(st.sampled_from([3, 1, 2])), "block_stride": stride,
              "sel_block_size": stride * draw(st.sampled_from([1, 2, 4, 8])),
              "num_selected": draw(st.sampled_from([16, 3, 7])), "window_size": draw(st.sampled_from([100, 1, 512]))}
    kv_heads, group = draw(st.sampled_from([(1, 12), (1, 1), (2, 1), (1, 4), (2, 5), (1, 16), (1, 64), (2, 2)]))
    dk, dv = draw(st.sampled_from([(192, 128), (128, 128), (64, 64), (256, 256), (128, 64)]))
    packed = draw(st.sampled_from([True, False]))
    most = min(4096, 32768 // group) // (2 if packed else 1)
    edges = [most, 1, blocks["block_size"] - 1, blocks["block_size"], blocks["sel_block_size"] + 1,
             2 * blocks["sel_block_size"] + 1]
    length = st.one_of(st.sampled_from([n for n in edges if 1 <= n <= most]), st.integers(1, most))
    lengths = [draw(length) for _ in range(draw(st.sampled_from([3, 1, 2])) if packed else 1)]
    return PrefillConfig(1 if packed else draw(st.integers(1, 2)), lengths, packed, kv_heads * group, kv_heads, dk, dv,
                       blocks)


# No shrinking: on the GPU each shrink step compiles kernels for new sizes, and a failure would spend minutes of the
# suite's time cap there; the derandomized failing example is reported as drawn (print_blob in tests/conftest.py).
@given(drawn_configs(), st.integers(0, 2**16 - 1))
@settings(max_examples=5, deadline=None, derandomize=True, phases=(Phase.explicit, Phase.generate))
def test_prefill_matches_float64_reference_on_random_configs(config, seed):
    """The whole layer (every kernel, forward and backward, bf16) on drawn settings against the float64 reference,
    sequence by sequence: the selection by check_selection, the output and each gradient within the file's bound
    (module docstring) plus a floor for tensors whose reference is ~0 (_check_drawn_config). The CPU twin,
    tests/test_nsa_prefill.py::test_kernels_match_float64_reference_on_random_configs, runs the interpreter's tiles."""
    _check_drawn_config(config, seed)


def _check_drawn_config(config: PrefillConfig, seed: int, dtype: torch.dtype = torch.bfloat16, device: str = "cuda"
                        ) -> None:
    """nsa_attention (Triton) forward + backward on ``config``'s inputs; per batch row and sequence the selection
    (check_selection) and the float64 reference's output and gradients (_reference_by_kv_head), put together into
    whole tensors; then for the output and each gradient ||got - want|| <= 1e-2 ||want|| + 1e-5 sqrt(numel) (Frobenius
    norms). 1e-2: the fixed cases' bound (a few bf16 roundings, module docstring). 1e-5 per element (RMS): for
    tensors whose reference is zero or nearly, where the kernels' float32 sums leave ~1e-6 (at w = 1 the window's
    dk is exactly 0 in the reference: its one key's softmax is 1), and for empty ones (no sequence reaches l)."""
    blocks, lengths = config.blocks, config.lengths
    inputs = _inputs(sum(lengths), config.heads, config.kv_heads, config.dk, config.dv, dtype, seed, blocks=blocks,
                     batch=config.batch, lengths=lengths if config.packed else None, device=device)
    cu = (torch.tensor([0, *itertools.accumulate(lengths)], device=device, dtype=torch.int32) if config.packed
          else None)
    out, indices = nsa_attention(*inputs, **blocks, cu_seqlens=cu, backend="triton")
    dout = torch.randn(out.shape, device=device, generator=torch.Generator(device=device).manual_seed(seed + 1))
    dout = dout.to(dtype)
    got = [out.detach(), *torch.autograd.grad(out, inputs, dout)]
    want = [torch.zeros(x.shape, dtype=torch.float64, device=device) for x in got]
    for b in range(config.batch):
        token = block = 0
        for length in lengths:
            n_cmp = ref_num_cmp(length, blocks["block_size"], blocks["block_stride"])
            rows, cmp_rows = slice(token, token + length), slice(block, block + n_cmp)
            spans = [rows, *(cmp_rows if i in (1, 2) else rows for i in range(len(inputs)))]  # of out, then each grad
            piece = [x.detach()[b:b + 1, spans[i + 1]] for i, x in enumerate(inputs)]
            chosen = indices[b:b + 1, rows]
            scores = dense_selection_scores(piece[0].double(), piece[1].double(), blocks["block_size"],
                                            blocks["block_stride"], blocks["sel_block_size"])
            check_selection(chosen.cpu(), scores.cpu(), blocks["sel_block_size"], blocks["num_selected"],
                            tol=1e-5 * max(1.0, float(scores.max())))
            expected, expected_grads = _reference_by_kv_head(piece, chosen, dout[b:b + 1, rows], blocks)
            for x, span, value in zip(want, spans, (expected, *expected_grads), strict=True):
                x[b:b + 1, span] = value
            token, block = token + length, block + n_cmp
    errors = {}
    for name, g, w in zip(("out", *NAMES), got, want, strict=True):
        error, bound = float((g.double() - w).norm()), BF16_RTOL * float(w.norm()) + 1e-5 * w.numel() ** 0.5
        if not error <= bound:  # NaN fails too
            errors[name] = f"{error:.3g} > {bound:.3g}"
    assert not errors, f"{config}, seed {seed}: {errors}"


@pytest.mark.parametrize(("max_group", "ds_dq"), [(4, False), (64, False), (4, True)])
def test_prefill_backward_is_deterministic(monkeypatch, max_group, ds_dq):
    """Gradients bitwise equal on two runs (public shape, G = 16), also with the selection's forward combined from
    the blocks' token lists and its dq summed from its dk/dv's shares (SelectedTiles.block_forward_max_group and
    fused_dq_max_group = 64; the defaults up to G = 4), and with its dq from the dS its dk/dv stores, in two token
    ranges (ds_dq)."""
    ds = {"ds_dq": True, "ds_dq_bytes": 2**29} if ds_dq else {}
    use_prefill_tiles(monkeypatch, selected={"fused_dq_max_group": max_group, "block_forward_max_group": max_group,
                                             **ds})
    inputs = _inputs(8192, 64, 4, 128, 128, seed=1)
    out = nsa_attention(*inputs, **BLOCKS, backend="triton").output
    dout = torch.randn_like(out)
    first = torch.autograd.grad(out, inputs, dout)
    second = torch.autograd.grad(nsa_attention(*inputs, **BLOCKS, backend="triton").output, inputs, dout)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_prefill_in_a_cuda_graph_reads_no_kept_table(monkeypatch):
    """Forward + backward captured in a CUDA graph replay bitwise as run eagerly, also once every table kept
    for unpacked batches (nsa.sized_tensors) is dropped and its memory taken by other tensors: a
    capture builds tables of its own, which the graph holds, instead of reading kept ones. Each step returns its
    output detached: an eager step whose autograd graph lived on would leave the leaves' AccumulateGrad nodes bound
    to the stream they ran on, and the captured backward would then make that stream wait on the capture (the H200
    raised "operation would make the legacy stream depend on a capturing blocking stream" on 2026-12-05;
    PyTorch #180090)."""
    from collections import OrderedDict

    from nsa import sized_tensors as sized

    monkeypatch.setattr(sized, "_SIZED", OrderedDict())
    inputs = _inputs(4096, 16, 4, 64, 64, seed=3)
    dout = torch.randn(1, 4096, 16, 64, device="cuda", dtype=torch.bfloat16)

    def step() -> tuple[torch.Tensor, ...]:
        out = nsa_attention(*inputs, **BLOCKS, backend="triton").output
        return (out.detach(), *torch.autograd.grad(out, inputs, dout))

    want = step()
    kept = [t for built, _ in sized._SIZED.values() for t in (built if isinstance(built, tuple) else (built,))
            if isinstance(t, torch.Tensor)]
    assert kept, "the eager step kept no table"
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up off the default stream, as torch.cuda.graph asks
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    shapes = [(t.shape, t.dtype) for t in kept]
    del kept
    sized._SIZED.clear()
    junk = [torch.full(shape, -7, dtype=dtype, device="cuda") for shape, dtype in shapes for _ in range(4)]
    graph.replay()
    torch.cuda.synchronize()
    assert junk and all(torch.equal(got, ref) for got, ref in zip(captured, want, strict=True))


@pytest.mark.long_compile  # 83 s in the H200 suite at ec05d2c (bench/results/logs/gpu_tests_h200.log)
def test_prefill_packed_sequences_equal_separate_runs():
    lengths = [1000, 77, 2500, 31]
    pieces = [_inputs(n, 16, 4, 64, 64, dtype=torch.float32, seed=10 + i) for i, n in enumerate(lengths)]
    packed = [torch.cat([p[i].detach() for p in pieces], dim=1).requires_grad_() for i in range(8)]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    out, indices = nsa_attention(*packed, **BLOCKS, cu_seqlens=cu, backend="triton")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, packed, dout)
    token, block = 0, 0
    for piece, n in zip(pieces, lengths, strict=True):
        alone, alone_idx = nsa_attention(*piece, **BLOCKS, backend="triton")
        rows = slice(token, token + n)
        assert torch.equal(indices[:, rows], alone_idx)
        torch.testing.assert_close(out[:, rows], alone, rtol=1e-5, atol=1e-6)
        alone_grads = torch.autograd.grad(alone, piece, dout[:, rows])
        blocks = piece[1].shape[1]
        for i, (got, want) in enumerate(zip(grads, alone_grads, strict=True)):
            part = got[:, block:block + blocks] if i in (1, 2) else got[:, rows]
            torch.testing.assert_close(part, want, rtol=1e-4, atol=1e-5)
        token, block = token + n, block + blocks


def test_layer_compiles_to_one_graph_with_the_kernels():
    config = NSAConfig(hidden_size=512, num_heads=16, num_kv_heads=4, head_dim=64, head_dim_v=64)
    layer = NSAAttention(config).cuda().to(torch.bfloat16)
    x = torch.randn(2, 4096, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    y = compiled(x)
    assert len(graphs) == 1
    assert any("nsa.prefill" in str(node.target) for node in graphs[0].graph.nodes)
    torch.testing.assert_close(y, layer(x), rtol=0, atol=0)
    y.float().square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def _plant(x: torch.Tensor, first: int, seed: int) -> torch.Tensor:
    """x with NaN / +inf / -inf at 1% of the entries of positions >= first (dim 1)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    where = torch.rand(x.shape, device="cuda", generator=gen) < 0.01
    where[:, :first] = False
    values = torch.tensor([float("nan"), float("inf"), float("-inf")], device="cuda", dtype=x.dtype)
    return torch.where(where, values[torch.randint(3, x.shape, device="cuda", generator=gen)], x.detach())


@pytest.mark.parametrize(("batch", "lengths", "shared_window"), [(2, None, False), (1, (3000, 0, 5192), True)])
def test_layer_rows_on_the_kernels_equal_the_torch_rule(batch, lengths, shared_window):
    """nsa_nonfinite_rows on the GPU (nsa.kernels.rows, three launches) against its PyTorch form on the CPU (itself
    checked against the dense-mask rule in tests/test_inv_nonfinite.py): the public shape at 8k, real block sizes,
    a few non-finite vectors planted in one input at a time so each branch's edges decide, batched or packed."""
    gen = torch.Generator(device="cuda").manual_seed(9)
    seq_len, heads, kv_heads, dim = 8192, 64, 4, 128
    seqs = lengths or (seq_len,)
    n_cmp = [ref_num_cmp(n, BLOCKS["block_size"], BLOCKS["block_stride"]) for n in seqs]
    sizes = {"q": (seq_len, heads, dim), "k_cmp": (sum(n_cmp), kv_heads, dim), "v_cmp": (sum(n_cmp), kv_heads, dim),
             "k_sel": (seq_len, kv_heads, dim), "v_sel": (seq_len, kv_heads, dim), "k_win": (seq_len, kv_heads, dim),
             "v_win": (seq_len, kv_heads, dim), "gates": (seq_len, heads, 3)}
    clean = {name: torch.randn(batch, *size, device="cuda", generator=gen).bfloat16() for name, size in sizes.items()}
    position = torch.cat([torch.arange(n, device="cuda") for n in seqs])
    choice = torch.rand(batch, seq_len, kv_heads, BLOCKS["num_selected"], device="cuda", generator=gen)
    indices = (choice * (position // BLOCKS["sel_block_size"] + 1)[None, :, None, None]).int()
    indices[choice < 0.1] = -1
    cu_seqlens = None if lengths is None else torch.tensor([0, *lengths], device="cuda").cumsum(0)
    rule = {key: BLOCKS[key] for key in ("block_size", "block_stride", "sel_block_size", "window_size")}
    garbage = torch.tensor([float("nan"), float("inf"), float("-inf")], device="cuda").repeat(4).bfloat16()
    for name in sizes:
        if shared_window and name in ("k_win", "v_win"):
            continue
        x = dict(clean)
        vectors = x[name].view(-1, x[name].shape[-1]).clone()
        vectors[torch.randint(vectors.shape[0], (12,), device="cuda", generator=gen), 0] = garbage
        x[name] = vectors.view(x[name].shape)
        if shared_window:
            x["k_win"], x["v_win"] = x["k_sel"], x["v_sel"]
        args = [*(x[n] for n in sizes), indices]
        got = nsa_nonfinite_rows(*args, **rule, cu_seqlens=cu_seqlens)
        want = nsa_nonfinite_rows(*(a.cpu() for a in args), **rule,
                                  cu_seqlens=None if cu_seqlens is None else cu_seqlens.cpu())
        assert got.is_cuda and torch.equal(got.cpu(), want), name
        assert want.any(), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_nonfinite_rows_flag_exactly_the_vectors_holding_nan_or_inf(dtype):
    """The GPU's one-pass rule (nsa.kernels.rows) against an elementwise check in float64 on the CPU, with NaN, +inf
    and -inf planted alone and together, and rows of the dtype's largest finite values (not flagged)."""
    gen = torch.Generator(device="cuda").manual_seed(4)
    x = _plant(torch.randn(2, 3000, 4, 96, device="cuda", generator=gen).to(dtype), 0, seed=5)
    largest = torch.finfo(dtype).max
    x[0, :8] = largest
    x[1, :8] = -largest
    want = (~torch.isfinite(x.cpu().double())).any(-1)
    assert torch.equal(nonfinite_rows(x).cpu(), want) and want.any() and not want.all()
    assert not nonfinite_rows(torch.empty(3, 0, device="cuda", dtype=dtype)).any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_poison_rows_fill_nan_forward_and_zero_gradient(monkeypatch, dtype):
    """poison_rows on the GPU's row kernel (nsa.kernels.rows; outputs of any size take it here) against torch.where
    on the CPU: NaN in the flagged rows (flags broadcast over the heads), every other element copied, zero gradient
    in exactly those rows."""
    import nsa.nonfinite

    monkeypatch.setattr(nsa.nonfinite, "POISON_KERNEL_MIN_ELEMENTS", 0)
    gen = torch.Generator(device="cuda").manual_seed(6)
    out = torch.randn(2, 3000, 8, 96, device="cuda", generator=gen).to(dtype).requires_grad_()
    rows = torch.rand(2, 3000, 1, device="cuda", generator=gen) < 0.1
    weights = torch.randn(out.shape, device="cuda", generator=gen).to(dtype)
    got = poison_rows(out, rows)
    (grad,) = torch.autograd.grad(got, out, weights)
    flags = rows.cpu()[..., None]
    want = torch.where(flags, float("nan"), out.detach().cpu().double())
    torch.testing.assert_close(got.detach().cpu().double(), want, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(grad.cpu(), torch.where(flags, 0, weights.cpu()))


@pytest.mark.parametrize(("dtype", "shape", "per_sequence"), [
    (torch.bfloat16, (1, 8192, 64, 128), False),  # the public shape's queries
    (torch.float32, (2, 3000, 8, 96), True),  # D/2 not a power of two, one table per sequence
])
def test_rope_kernel_matches_float64_rotation_and_the_torch_form(monkeypatch, dtype, shape, per_sequence):
    """apply_rope on the GPU (nsa.kernels.rope, one pass each way) against the rotation in float64 on the CPU (to
    the float32 angles' error, ~2^-23 * position, plus the dtype's rounding) and bitwise against the PyTorch form
    on the same tensors (NSA_BACKEND=torch; the same float32 roundings, no fused multiply-add); gradients likewise."""
    gen = torch.Generator(device="cuda").manual_seed(9)
    wide = torch.randn(shape[0], shape[1], 2 * shape[2], shape[3], device="cuda", generator=gen).to(dtype)
    x = wide[:, :, : shape[2]].requires_grad_()  # rows 2 * H * D apart, as the module's key sets
    positions = torch.arange(shape[1], device="cuda") + (torch.tensor([[0], [5000]], device="cuda")
                                                         if per_sequence else 0)
    dy = torch.randn(shape, device="cuda", generator=gen).to(dtype)
    y = apply_rope(x, positions)
    (dx,) = torch.autograd.grad(y, x, dy)
    half = shape[3] // 2
    angles = positions.cpu().double()[..., None] * 10000.0 ** (-torch.arange(half).double() * 2 / shape[3])
    angles = angles.expand(shape[0], shape[1], half)[:, :, None]
    cos, sin = angles.cos(), angles.sin()

    def rotate(v: torch.Tensor, sign: float) -> torch.Tensor:
        v1, v2 = v[..., :half], v[..., half:]
        return torch.cat((v1 * cos - sign * v2 * sin, v2 * cos + sign * v1 * sin), dim=-1)

    scale = float(wide.abs().max())
    tol = 2.0**-21 * float(positions.max()) * scale + 2 * torch.finfo(dtype).eps * scale
    torch.testing.assert_close(y.double().cpu(), rotate(x.detach().double().cpu(), 1.0), rtol=0, atol=tol)
    torch.testing.assert_close(dx.double().cpu(), rotate(dy.double().cpu(), -1.0), rtol=0, atol=tol)
    monkeypatch.setenv("NSA_BACKEND", "torch")
    y_torch = apply_rope(x, positions)
    (dx_torch,) = torch.autograd.grad(y_torch, x, dy)
    assert torch.equal(y, y_torch) and torch.equal(dx, dx_torch)


@pytest.mark.parametrize(("batch", "seq_len", "first_bad", "lengths"), [
    (2, 2048, 1000, None),
    (1, 2048, 1800, (700, 0, 1348)),  # packed, an empty sequence, the garbage in the last one
])
def test_nonfinite_later_positions_change_nothing(batch, seq_len, first_bad, lengths):
    """NaN / inf planted in every input at positions >= first_bad (the Triton kernels, bf16, real block
    sizes): the output rows before it, their selections and every gradient of a loss over those rows are
    bitwise those of the clean run, and the kernels poison exactly the rows the torch path poisons."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    q, k_sel, v_sel, k_win, v_win = (torch.randn(batch, seq_len, h, 64, device="cuda", generator=gen).bfloat16()
                                     for h in (16, 2, 2, 2, 2))
    gates = torch.rand(batch, seq_len, 16, 3, device="cuda", generator=gen).bfloat16()
    cu = None if lengths is None else torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda")
    bounds = [(0, seq_len)] if cu is None else list(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True))
    k_cmp, v_cmp = (torch.cat([compress_mean_pool(x[:, a:b], BLOCKS["block_size"], BLOCKS["block_stride"])
                               for a, b in bounds], dim=1) for x in (k_win, v_win))
    clean = [q, k_cmp, v_cmp, k_sel, v_sel, k_win, v_win, gates]
    first_cmp = ref_num_cmp(first_bad, BLOCKS["block_size"], BLOCKS["block_stride"]) if cu is None else k_cmp.shape[1]
    bad = [_plant(x, first_cmp if i in (1, 2) else first_bad, seed=i) for i, x in enumerate(clean)]
    dout = torch.randn(batch, first_bad, 16, 64, device="cuda", generator=gen).bfloat16()
    runs = []
    for inputs in (bad, clean):
        leaves = [x.detach().clone().requires_grad_() for x in inputs]
        out, indices = nsa_attention(*leaves, **BLOCKS, cu_seqlens=cu, backend="triton")
        grads = torch.autograd.grad(out[:, :first_bad], leaves, dout)
        runs.append((out.detach(), indices, grads))
    (out_bad, idx_bad, grads_bad), (out_clean, idx_clean, grads_clean) = runs
    assert torch.equal(out_bad[:, :first_bad], out_clean[:, :first_bad])
    assert torch.equal(idx_bad[:, :first_bad], idx_clean[:, :first_bad])
    differ = {name: int((a != b).sum()) for name, a, b in zip(NAMES, grads_bad, grads_clean, strict=True)
              if not torch.equal(a, b)}
    assert not differ, f"gradients not bitwise equal (elements that differ): {differ}"
    with torch.no_grad():
        torch_out = nsa_attention(*(x.float() for x in bad), **BLOCKS, cu_seqlens=cu, backend="torch").output
    poisoned = out_bad.isnan().all(-1)
    assert torch.equal(poisoned, torch_out.isnan().all(-1)) and poisoned.any()
    assert torch.isfinite(out_bad[~poisoned]).all()
