"""The whole gated NSA layer on Triton, forward and backward, as torch.library ops.

``nsa_attention_triton`` computes exactly what nsa.functional.nsa_attention computes (same arguments, same
layouts) with the kernels of nsa/kernels/: the compression branch (range attention, l / d), the block
selection from its scores (top-n, no [T, T/d] matrix), the selection branch and the sliding window, each
adding its gated output into one output buffer and storing its un-gated output for the backward (the dq kernels
take delta = dO . o from it: one matmul per key tile fewer than without it). It is registered as
``nsa::prefill`` with ``nsa::prefill_backward`` and fake implementations, so torch.compile traces a layer
as one graph. The backward is deterministic: no atomics, fixed-order sums of fixed partials.

Sequences are packed (nsa.kernels.tiles): a batch [B, T, ...] is B sequences of T tokens, and with
``cu_seqlens`` the B = 1 rows hold sequences of any lengths (k_cmp / v_cmp then hold each sequence's
compressed blocks one after the other).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from nsa.dispatch import interpreter_enabled

if TYPE_CHECKING:  # the kernel modules import triton: only the launchers load them
    from nsa.kernels.range_attention import RangeTiles
    from nsa.kernels.selected import SelectedTiles
    from nsa.kernels.topn import TopnTiles


class PrefillSizes(NamedTuple):
    block_size: int  # l
    block_stride: int  # d
    sel_block_size: int  # l'
    num_selected: int  # n
    window_size: int  # w


MAX_GROUP = 64  # the selection kernels hold a group's G query heads (padded) as the rows of one tile
MAX_KEY_TILE = 256  # the top-n kernel's compressed-key tile: NS selection blocks x l'/d
TOPN_KEY_BLOCKS = 16  # TopnTiles.key_blocks' default: selection blocks per top-n key tile


def _power_of_two_at_least(value: int) -> int:
    return 1 << max(0, value - 1).bit_length()


def topn_tile_shape(num_selected: int, group: int, sel_block_size: int, block_stride: int, rows: int,
                    key_blocks: int) -> dict[str, int]:
    """The top-n kernel's constexprs: KP (running top list width, >= 4 for the three forced blocks), NS
    selection blocks per tile (key_blocks, lowered to fit MAX_KEY_TILE compressed keys, raised to KP; NS * r
    compressed keys per tile, at least 16 for tl.dot; r = l'/d), GP (the group padded to a power of two) and BQ
    (queries per program, BQ * GP = rows)."""
    ratio = sel_block_size // block_stride
    kp = max(4, _power_of_two_at_least(num_selected - 3))
    fitting = max(1, MAX_KEY_TILE // ratio)
    ns = max(kp, min(_power_of_two_at_least(key_blocks), fitting), _power_of_two_at_least(-(-16 // ratio)))
    gp = _power_of_two_at_least(group)
    return {"KP": kp, "NS": ns, "GP": gp, "BQ": max(1, rows // gp), "RATIO": ratio}


def prefill_obstacles(group: int, block_size: int, block_stride: int, sel_block_size: int, num_selected: int,
                      window_size: int) -> list[str]:
    """Why the kernels cannot take these sizes (empty when they can); nsa.dispatch logs the reasons."""
    reasons = []
    if group > MAX_GROUP:
        reasons.append(f"GQA groups of G={group} > {MAX_GROUP} query heads")
    ratio = sel_block_size // block_stride
    if ratio & (ratio - 1):
        reasons.append(f"sel_block_size / block_stride = {ratio} is not a power of two")
    elif topn_tile_shape(num_selected, 1, sel_block_size, block_stride, 128, TOPN_KEY_BLOCKS)["NS"] * ratio \
            > MAX_KEY_TILE:
        reasons.append(f"num_selected={num_selected} with l'/d={ratio} needs top-n key tiles wider than {MAX_KEY_TILE}")
    return reasons


def nsa_attention_triton(q: Tensor, k_cmp: Tensor, v_cmp: Tensor, k_sel: Tensor, v_sel: Tensor, k_win: Tensor,
                         v_win: Tensor, gates: Tensor, cu_seqlens: Tensor | None, sizes: PrefillSizes,
                         scale: float) -> tuple[Tensor, Tensor]:
    """-> (output [B, T, HQ, Dv] in q's dtype, block_indices int64 [B, T, H_kv, n]); differentiable in every
    tensor but cu_seqlens (the selection carries no gradient). Inputs as nsa.functional.nsa_attention's."""
    out, indices, *_ = torch.ops.nsa.prefill(q, k_cmp, v_cmp, k_sel, v_sel, k_win, v_win, gates, cu_seqlens,
                                             *sizes, scale)
    return out, indices.long()


class PrefillTiles(NamedTuple):
    """The kernels' tile settings: the compression's and the window's RangeTiles, TopnTiles, SelectedTiles."""

    cmp: RangeTiles
    win: RangeTiles
    topn: TopnTiles
    sel: SelectedTiles


def _tiles(device: torch.device, head_dim: int, group: int) -> PrefillTiles:
    """Tile settings: the GPU defaults (tuned on the H200), or 16-wide tiles for the CPU interpreter's tiny tests
    (the compression's and the window's K / V and the top-n's compressed keys through TMA, the window over tokens x
    heads, as on the GPU; top-n programs of 32 rows, so that a top-n setting read where the selection's belongs
    changes shapes in the tests too; the selection's short-sequence programs, 32 rows each, up to 256 packed rows
    x heads)."""
    from nsa.kernels.range_attention import RangeTiles, tiles_for
    from nsa.kernels.selected import SelectedTiles
    from nsa.kernels.topn import TopnTiles, topn_tiles_for

    if device.type != "cuda" and interpreter_enabled():
        ranges = RangeTiles(16, 16, 16, 16, 16, 16, 4, 1, 1, 2, dkv_num_stages=1, dq_num_warps=4, tma=True)
        selected = SelectedTiles(num_warps=4, num_stages=1, dq_num_stages=1, dkv_rows=16, chunk=8, dkv_num_warps=4,
                                 dkv_num_stages=1, short_chunk=4, short_tokens=64, short_rows=32,
                                 short_tile_num_stages=1, short_query_rows=256)
        return PrefillTiles(ranges, ranges._replace(head_rows=True), TopnTiles(32, 4, 1, tma=True), selected)
    return PrefillTiles(tiles_for(head_dim, "cmp", group), tiles_for(head_dim, "win", group),
                        topn_tiles_for(group, head_dim), SelectedTiles())


def _layer_tiles(q: Tensor, k_sel: Tensor, v_sel: Tensor, num_tokens: int) -> PrefillTiles:
    """The tiles one layer's kernels run (q [B, T, HQ, Dk], k_sel / v_sel [B, T, H_kv, D]): ``_tiles`` for its
    widest head dim and its group, the selection's resolved for its num_tokens packed rows
    (``SelectedTiles.for_tokens``). The op and its fake implementation both read them here: the forward's union
    lists take their shape from the selection's rows."""
    head_dim, group = max(q.shape[-1], v_sel.shape[-1]), q.shape[2] // k_sel.shape[2]
    tiles = _tiles(q.device, head_dim, group)
    return tiles._replace(sel=tiles.sel.for_tokens(num_tokens, group, head_dim))


class PrefillRun:
    """The kernels of one fused NSA prefill over packed token rows, one method per step. nsa::prefill runs
    forward(); nsa::prefill_backward runs backward(); bench/bench_prefill.py times the steps one by one.

    Forward: compressed() writes out = g_cmp * o_cmp and the compression branch's base-2 lse; select() the
    block indices; selected() and window() add g_sel * o_sel and g_win * o_win into out; each branch also stores
    its o in branch_outs [3, rows, HQ, Dv] (cmp, sel, win). Backward: the three dq kernels add into one dq buffer
    (each writes its branch's delta = dO . o, the gate's gradient), then each branch's dk / dv.
    """

    def __init__(self, q: Tensor, k_cmp: Tensor, v_cmp: Tensor, k_sel: Tensor, v_sel: Tensor, k_win: Tensor,
                 v_win: Tensor, gates: Tensor, cu_seqlens: Tensor | None, sizes: PrefillSizes, scale: float, *,
                 forward_outputs: bool = True) -> None:
        """forward_outputs False: a run for backward() only, which takes the forward's outputs as arguments (no
        buffers of its own: they would add to the backward's peak memory)."""
        from nsa.kernels.range_attention import RangeRule
        from nsa.kernels.tiles import (
            batch_offsets,
            derived_counts,
            num_compressed,
            output_buffer,
            packed_batch,
            packed_varlen,
            rows_view,
        )

        batch, seq_len = q.shape[:2]
        if cu_seqlens is None:
            self.packed = packed_batch(batch, seq_len, q.device)
            self.cu_cmp = batch_offsets(batch, k_cmp.shape[1], q.device)
        else:
            self.packed = packed_varlen(cu_seqlens, seq_len)
            self.cu_cmp = derived_counts(self.packed,
                                         lambda n: num_compressed(n, sizes.block_size, sizes.block_stride))
        self.shapes = (q.shape, k_cmp.shape, v_cmp.shape, k_sel.shape, v_sel.shape, k_win.shape, v_win.shape)
        self.q, self.k_cmp, self.v_cmp, self.k_sel, self.v_sel, self.k_win, self.v_win = (
            rows_view(t) for t in (q, k_cmp, v_cmp, k_sel, v_sel, k_win, v_win))
        self.gates = gates.reshape(self.q.shape[0], self.q.shape[1], 3)
        self.sizes, self.scale = sizes, scale
        tiles = _layer_tiles(q, k_sel, v_sel, self.packed.total)
        self.cmp_tiles, self.win_tiles, self.topn_tiles, self.sel_tiles = tiles.cmp, tiles.win, tiles.topn, tiles.sel
        self.cmp_rule = RangeRule(sizes.block_stride, sizes.block_size, 0)
        self.win_rule = RangeRule(1, 1, sizes.window_size)
        if forward_outputs:
            rows, heads = self.q.shape[:2]
            self.out = output_buffer(rows, heads, v_sel.shape[-1], like=q)
            self.lse = [output_buffer(rows, heads, like=q, dtype=torch.float32) for _ in range(3)]
            self.branch_outs = output_buffer(3, rows, heads, v_sel.shape[-1], like=q)
            self.indices = output_buffer(rows, k_sel.shape[2], sizes.num_selected, like=q, dtype=torch.int32)
        self.unions: tuple[Tensor, Tensor] | None = None  # the selection's query-tile lists, from selected()

    def compressed(self) -> None:
        from nsa.kernels.range_attention import range_forward

        range_forward(self.q, self.k_cmp, self.v_cmp, self.gates[..., 0], self.out, self.lse[0], self.branch_outs[0],
                      self.packed, self.cu_cmp, self.cmp_rule, self.scale, False, self.cmp_tiles)

    def select(self) -> None:
        from nsa.kernels.topn import select_topn

        self.indices = select_topn(
            self.q, self.k_cmp, self.lse[0], self.packed, self.cu_cmp, block_size=self.sizes.block_size,
            block_stride=self.sizes.block_stride, sel_block_size=self.sizes.sel_block_size,
            num_selected=self.sizes.num_selected, scale=self.scale, tiles=self.topn_tiles)

    def selected(self) -> None:
        from nsa.kernels.selected import selected_forward

        self.unions = selected_forward(self.q, self.k_sel, self.v_sel, self.gates[..., 1], self.indices, self.out,
                                       self.lse[1], self.branch_outs[1], self.packed, self.sizes.sel_block_size,
                                       self.scale, True, self.sel_tiles)

    def window(self) -> None:
        from nsa.kernels.range_attention import range_forward

        range_forward(self.q, self.k_win, self.v_win, self.gates[..., 2], self.out, self.lse[2], self.branch_outs[2],
                      self.packed, self.packed.cu, self.win_rule, self.scale, True, self.win_tiles)

    def forward(self) -> tuple[Tensor, ...]:
        """-> (out [B, T, HQ, Dv], block indices int32 [B, T, H_kv, n], lse_cmp, lse_sel, lse_win [rows, HQ],
        branch_outs [3, rows, HQ, Dv], the selection's query-tile union lists: blocks, counts
        (nsa.kernels.selected.union_lists), for dq)."""
        self.compressed()
        self.select()
        self.selected()
        self.window()
        assert self.unions is not None
        q_shape, k_sel_shape = self.shapes[0], self.shapes[3]
        lse_cmp, lse_sel, lse_win = self.lse
        return (self.out.view(*q_shape[:3], self.out.shape[-1]),
                self.indices.view(*k_sel_shape[:3], self.sizes.num_selected), lse_cmp, lse_sel, lse_win,
                self.branch_outs, *self.unions)

    @property
    def fuses_sel_dq(self) -> bool:
        """Whether the selection's dq comes from its dk/dv's steps (``SelectedTiles.dq_in_dkdv`` at this group)."""
        return self.sel_tiles.dq_in_dkdv(self.q.shape[1] // self.k_sel.shape[1])

    def dq_steps(self, dout: Tensor, dq: Tensor, delta: list[Tensor]) -> list[tuple[str, Callable[[], None]]]:
        """The three dq kernels, in this order (they add into dq); dout and dq are token rows [rows, HQ, D]. With
        the selection's dq inside its dk/dv (``fuses_sel_dq``) the selection's step only computes its delta
        (``delta_sel``)."""
        from nsa.kernels.range_attention import range_dq
        from nsa.kernels.selected import selected_dq, selected_row_delta

        g, o, packed, scale = self.gates, self.branch_outs, self.packed, self.scale
        if self.fuses_sel_dq:  # the selection's dq comes with its dk/dv (dkdv_steps): only its delta here
            sel: tuple[str, Callable[[], None]] = ("delta_sel", lambda: selected_row_delta(dout, o[1], delta[1]))
        else:
            sel = ("dq_sel", lambda: selected_dq(self.q, self.k_sel, self.v_sel, g[..., 1], self.indices, dout, o[1],
                                                 self.lse[1], delta[1], dq, packed, self.sizes.sel_block_size, scale,
                                                 True, self.sel_tiles, self.unions))
        return [
            ("dq_cmp", lambda: range_dq(self.q, self.k_cmp, self.v_cmp, g[..., 0], dout, o[0], self.lse[0], delta[0],
                                        dq, packed, self.cu_cmp, self.cmp_rule, scale, False, self.cmp_tiles)),
            sel,
            ("dq_win", lambda: range_dq(self.q, self.k_win, self.v_win, g[..., 2], dout, o[2], self.lse[2], delta[2],
                                        dq, packed, packed.cu, self.win_rule, scale, True, self.win_tiles)),
        ]

    def dkdv_steps(self, dout: Tensor, delta: list[Tensor], grads: dict[str, tuple[Tensor, Tensor]], dq: Tensor
                   ) -> list[tuple[str, Callable[[], None]]]:
        """The three dk / dv computations; each stores its (dk, dv) in ``grads`` under its branch name. They read the
        gates in float32 (``dkdv_gates``). Where ``fuses_sel_dq`` the selection's also adds its dq into dq (after
        ``dq_steps``)."""
        from nsa.kernels.range_attention import range_dkdv
        from nsa.kernels.selected import selected_dkdv

        g, packed, scale = dkdv_gates(self.gates), self.packed, self.scale

        def cmp() -> None:
            grads["cmp"] = range_dkdv(self.q, self.k_cmp, self.v_cmp, g[..., 0], dout, self.lse[0], delta[0],
                                      packed, self.cu_cmp, self.cmp_rule, scale, self.cmp_tiles)

        def sel() -> None:
            grads["sel"] = selected_dkdv(self.q, self.k_sel, self.v_sel, g[..., 1], self.indices, dout, self.lse[1],
                                         delta[1], packed, self.sizes.sel_block_size, scale, self.sel_tiles,
                                         dq if self.fuses_sel_dq else None, accumulate=True)

        def win() -> None:
            grads["win"] = range_dkdv(self.q, self.k_win, self.v_win, g[..., 2], dout, self.lse[2], delta[2],
                                      packed, packed.cu, self.win_rule, scale, self.win_tiles)

        return [("dkdv_cmp", cmp), ("dkdv_sel", sel), ("dkdv_win", win)]

    def backward(self, dout: Tensor, indices: Tensor, lse: tuple[Tensor, Tensor, Tensor], branch_outs: Tensor,
                 unions: tuple[Tensor, Tensor] | None) -> tuple[Tensor, ...]:
        """-> (dq, dk_cmp, dv_cmp, dk_sel, dv_sel, dk_win, dv_win, dgates) in the inputs' shapes; the other
        arguments as forward() returned them. ``unions``: the forward's query-tile lists of this selection (None:
        built again)."""
        from nsa.kernels.tiles import output_buffer, rows_view

        self.indices = indices.reshape(self.q.shape[0], self.shapes[3][2], self.sizes.num_selected)
        self.lse = list(lse)
        self.branch_outs = branch_outs
        self.unions = unions
        do = rows_view(dout)
        dq = output_buffer(*self.q.shape, like=self.q)
        delta = [output_buffer(*self.lse[0].shape, like=self.lse[0]) for _ in range(3)]
        grads: dict[str, tuple[Tensor, Tensor]] = {}
        for _, step in (*self.dq_steps(do, dq, delta), *self.dkdv_steps(do, delta, grads, dq)):
            step()
        dgates = torch.stack(delta, dim=-1).to(self.gates.dtype)
        flat = (dq, *grads["cmp"], *grads["sel"], *grads["win"])
        return (*(grad.view(shape) for grad, shape in zip(flat, self.shapes, strict=True)),
                dgates.view(*self.shapes[0][:3], 3))


def dkdv_gates(gates: Tensor) -> Tensor:
    """The gates [rows, HQ, 3] as the dk / dv kernels read them: float32 (the same values). Each step of their loops
    reads one gate per query row, and Triton pipelines a load (copies it asynchronously, a step ahead) only when
    each thread copies at least 4 bytes: from bf16 gates the read was a synchronous gather between two matmuls of
    every step (the compiled kernels' TTGIR, ``bench.compile_kernels --loop-loads``), like no other operand. Each
    branch's [rows, HQ] is contiguous (strides (HQ, 1)): a step's rows are tokens x heads, whose gates then sit next
    to each other instead of 12 bytes apart."""
    return gates.permute(2, 0, 1).to(torch.float32, memory_format=torch.contiguous_format).permute(1, 2, 0)


@torch.library.custom_op("nsa::prefill", mutates_args=())
def _prefill(q: Tensor, k_cmp: Tensor, v_cmp: Tensor, k_sel: Tensor, v_sel: Tensor, k_win: Tensor, v_win: Tensor,
             gates: Tensor, cu_seqlens: Tensor | None, block_size: int, block_stride: int, sel_block_size: int,
             num_selected: int, window_size: int, scale: float
             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    sizes = PrefillSizes(block_size, block_stride, sel_block_size, num_selected, window_size)
    run = PrefillRun(q, k_cmp, v_cmp, k_sel, v_sel, k_win, v_win, gates, cu_seqlens, sizes, scale)
    return run.forward()  # type: ignore[return-value]


@_prefill.register_fake
def _(q: Tensor, k_cmp: Tensor, v_cmp: Tensor, k_sel: Tensor, v_sel: Tensor, k_win: Tensor, v_win: Tensor,
      gates: Tensor, cu_seqlens: Tensor | None, block_size: int, block_stride: int, sel_block_size: int,
      num_selected: int, window_size: int, scale: float
      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    from nsa.kernels.selected import kept_union_shape

    rows = q.shape[0] * q.shape[1]
    out = q.new_empty(*q.shape[:3], v_sel.shape[-1])
    indices = q.new_empty(*k_sel.shape[:3], num_selected, dtype=torch.int32)
    lse_cmp, lse_sel, lse_win = (q.new_empty(rows, q.shape[2], dtype=torch.float32) for _ in range(3))
    branch_outs = q.new_empty(3, rows, q.shape[2], v_sel.shape[-1])
    num_seqs = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    group = q.shape[2] // k_sel.shape[2]
    sel_tiles = _layer_tiles(q, k_sel, v_sel, rows).sel
    lists, width = kept_union_shape(rows, num_seqs, group, k_sel.shape[2], num_selected, sel_tiles)
    blocks = q.new_empty(lists, width, dtype=torch.int32)
    counts = q.new_empty(lists if width else 0, dtype=torch.int32)
    return out, indices, lse_cmp, lse_sel, lse_win, branch_outs, blocks, counts


@torch.library.custom_op("nsa::prefill_backward", mutates_args=())
def _prefill_backward(
    dout: Tensor, q: Tensor, k_cmp: Tensor, v_cmp: Tensor, k_sel: Tensor, v_sel: Tensor, k_win: Tensor,
    v_win: Tensor, gates: Tensor, indices: Tensor, lse_cmp: Tensor, lse_sel: Tensor, lse_win: Tensor,
    branch_outs: Tensor, union_blocks: Tensor, union_counts: Tensor, cu_seqlens: Tensor | None, block_size: int,
    block_stride: int, sel_block_size: int, num_selected: int, window_size: int, scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    sizes = PrefillSizes(block_size, block_stride, sel_block_size, num_selected, window_size)
    run = PrefillRun(q, k_cmp, v_cmp, k_sel, v_sel, k_win, v_win, gates, cu_seqlens, sizes, scale,
                     forward_outputs=False)
    grads = run.backward(dout, indices, (lse_cmp, lse_sel, lse_win), branch_outs, (union_blocks, union_counts))
    return grads  # type: ignore[return-value]


@_prefill_backward.register_fake
def _(dout: Tensor, q: Tensor, k_cmp: Tensor, v_cmp: Tensor, k_sel: Tensor, v_sel: Tensor, k_win: Tensor,
      v_win: Tensor, gates: Tensor, indices: Tensor, lse_cmp: Tensor, lse_sel: Tensor, lse_win: Tensor,
      branch_outs: Tensor, union_blocks: Tensor, union_counts: Tensor, cu_seqlens: Tensor | None, block_size: int,
      block_stride: int, sel_block_size: int, num_selected: int, window_size: int, scale: float
      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format)
                 for t in (q, k_cmp, v_cmp, k_sel, v_sel, k_win, v_win, gates))  # type: ignore[return-value]


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
    q, k_cmp, v_cmp, k_sel, v_sel, k_win, v_win, gates, cu_seqlens, *sizes_and_scale = inputs
    _, indices, lse_cmp, lse_sel, lse_win, branch_outs, union_blocks, union_counts = output
    ctx.save_for_backward(q, k_cmp, v_cmp, k_sel, v_sel, k_win, v_win, gates, indices, lse_cmp, lse_sel, lse_win,
                          branch_outs, union_blocks, union_counts, cu_seqlens)
    ctx.sizes_and_scale = sizes_and_scale  # type: ignore[attr-defined]
    ctx.mark_non_differentiable(indices, lse_cmp, lse_sel, lse_win, branch_outs, union_blocks, union_counts)
    # Autograd would otherwise hand the backward a zero gradient for each of those outputs, three output-sized
    # buffers for branch_outs alone (H200, 64k, public shape: the layer's peak was 13.4 GiB with them).
    ctx.set_materialize_grads(False)


def _backward(ctx: torch.autograd.function.FunctionCtx, dout: Tensor, *_unused: Tensor) -> tuple:
    saved = ctx.saved_tensors  # type: ignore[attr-defined]
    grads = torch.ops.nsa.prefill_backward(dout, *saved, *ctx.sizes_and_scale)  # type: ignore[attr-defined]
    return (*grads, None, None, None, None, None, None, None)


torch.library.register_autograd("nsa::prefill", _backward, setup_context=_setup_context)
