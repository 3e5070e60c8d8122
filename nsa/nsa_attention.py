"""NSAAttention: the drop-in nn.Module (projections, RoPE, phi, gates, three branches, output)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from nsa.attention_core import query_chunks
from nsa.block_index import num_compressed_blocks, num_selection_blocks
from nsa.compress_pool import CompressPool, block_windows
from nsa.config import NSAConfig
from nsa.decode_attention import decode_attention
from nsa.dispatch import choose_decode_backend
from nsa.errors import NSAInputError
from nsa.functional import NSASizes, nsa_attention, nsa_attention_chunk, packed_lengths, prefill_chunk_size
from nsa.kv_cache import NSAKVCache
from nsa.nonfinite import finite_or_zero_under_poison, guarded_apply, nonfinite_rows, poison_rows
from nsa.rope import apply_rope
from nsa.validation import check_layer_input


class NSAAux(NamedTuple):
    block_indices: torch.Tensor  # [B, T, Hkv, n] selected blocks, -1 = unused
    gates: torch.Tensor  # [B, T, HQ, 3] activated gates (cmp, sel, win)


class Projected(NamedTuple):
    q: torch.Tensor  # [B, T, HQ, Dk], rotated
    k_cmp_raw: torch.Tensor  # [B, T, Hkv, Dk], not rotated (phi pools raw keys)
    v_cmp_raw: torch.Tensor
    k_sel: torch.Tensor  # rotated
    v_sel: torch.Tensor
    k_win: torch.Tensor  # rotated
    v_win: torch.Tensor
    gates: torch.Tensor  # [B, T, HQ, 3], finite for a non-finite token (NSAAux's are NaN there)
    nonfinite_tokens: torch.Tensor  # bool [B, T, 1]: x_t holds a NaN or inf


class NSAAttention(nn.Module):
    """Native Sparse Attention layer: x [B, T, hidden] -> y [B, T, hidden], causal.

    Per query head: o_t = g_cmp * Attn(q_t, K_cmp, V_cmp) + g_sel * Attn(q_t, K_sel, V_sel)
    + g_win * Attn(q_t, K_win, V_win), with gates from a linear map of x_t (sigmoid by default).
    Each branch has its own K/V projection unless config.shared_kv. RoPE is applied per head to q
    and to the selection/window keys at absolute positions. The compression branch pools
    *un-rotated* keys (phi sees raw content plus its own intra-block position encoding) and then
    rotates each compressed key at its block's centre position i*d + (l-1)/2, so q . k_cmp depends
    on the query-to-block distance like every other branch.

    forward(x) runs a whole sequence (prefill or training). forward(x, cache=...) appends x's
    tokens to each sequence in the cache (a prompt, a chunk, or one decode token) and attends with
    exactly the same rule, at the absolute positions the cache tracks.

    Non-finite tokens (a NaN or inf anywhere in x_t; nsa.nonfinite): the layer computes on x with
    them replaced by zero and sets every key and value of such a token and every compressed block
    holding one to NaN, so the ops return NaN in exactly the output rows that see one (its own row
    always does) and leave every other row bitwise as it would be without it, in prefill, training
    and decode; NSAAux's gates are NaN at such a token. Parameter gradients stay finite (no layer
    ever multiplies by a NaN).
    """

    def __init__(self, config: NSAConfig) -> None:
        super().__init__()
        self.config = c = config
        self.sizes = NSASizes(c.cmp_block_size, c.cmp_stride, c.sel_block_size, c.num_selected, c.window_size)
        kv_sets = 1 if c.shared_kv else 3
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, kv_sets * c.num_kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, kv_sets * c.num_kv_heads * c.head_dim_v, bias=False)
        self.gate_proj = nn.Linear(c.hidden_size, c.num_heads * 3)
        nn.init.zeros_(self.gate_proj.bias)
        self.compress_k = CompressPool(c.head_dim, c.cmp_block_size, c.cmp_stride, c.compression,
                                       c.compression_hidden)
        self.compress_v = CompressPool(c.head_dim_v, c.cmp_block_size, c.cmp_stride, c.compression,
                                       c.compression_hidden)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim_v, c.hidden_size, bias=False)

    def new_cache(self, batch_size: int, capacity: int, static_shapes: bool = False, *, page_size: int | None = None,
                  num_pages: int | None = None) -> NSAKVCache:
        """An empty decode cache for this layer, on its device and in its dtype (see NSAKVCache for
        static_shapes, which makes decode steps capturable in a CUDA graph, and for page_size / num_pages,
        the paged layout of the selection branch)."""
        weight = self.q_proj.weight
        return NSAKVCache(self.config, batch_size, capacity, device=weight.device, dtype=weight.dtype,
                          static_shapes=static_shapes, page_size=page_size, num_pages=num_pages)

    def forward(
        self, x: torch.Tensor, return_aux: bool = False, *, cache: NSAKVCache | None = None,
        num_valid: Sequence[int] | None = None, start_positions: Sequence[int] | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, NSAAux]:
        """x [B, T, hidden] -> y [B, T, hidden] (and NSAAux when return_aux).

        x must have the dtype and device of the layer's parameters (any dtype under torch.autocast).
        An empty input (B = 0 or T = 0) returns an empty y [B, T, hidden] (aux: block_indices
        [B, T, Hkv, n], gates [B, T, HQ, 3]) and leaves the cache unchanged.
        With a cache: x holds the next T tokens of every sequence; num_valid[b] <= T of them are real
        (the rest is right padding, which reads and writes nothing and whose outputs are zero);
        start_positions, when given, must equal the cache's current lengths. Every check runs before
        anything is written: a call that raises leaves the cache as it was.
        cu_seqlens (int [S + 1], B = 1, no cache): x holds S packed sequences (positions restart at 0 in each,
        and no token attends across a boundary), as nsa.nsa_attention; read on the host once.
        """
        self.check_input(x)
        if cache is not None:
            counts = self._check_append(x, cache, num_valid, start_positions)
        elif num_valid is not None or start_positions is not None:
            raise NSAInputError("num_valid and start_positions describe an append: they need cache=...")
        if cache is not None and cu_seqlens is not None:
            raise NSAInputError("cu_seqlens packs whole sequences for prefill or training; a cache appends to "
                                "its own sequences (use num_valid for ragged batches)")
        lengths = None if cu_seqlens is None else packed_lengths(cu_seqlens, x, "x")
        if x.numel() == 0:
            return self._empty_result(x, return_aux)
        c = self.config
        if cache is not None:
            out, block_indices, p = self._append(x, cache, counts)
        else:
            p = self.project(x, None if lengths is None else packed_positions(lengths, x.device))
            k_cmp, v_cmp = self._compress(p.k_cmp_raw, p.v_cmp_raw, lengths)
            out, block_indices = nsa_attention(
                p.q, k_cmp, v_cmp, p.k_sel, p.v_sel, p.k_win, p.v_win, p.gates,
                block_size=c.cmp_block_size, block_stride=c.cmp_stride, sel_block_size=c.sel_block_size,
                num_selected=c.num_selected, window_size=c.window_size, scale=c.attention_scale,
                query_chunk_size=c.query_chunk_size, cu_seqlens=cu_seqlens, backend=c.backend,
            )
        y = guarded_apply(self.o_proj, out.flatten(2))  # poisoned rows stay NaN; W's gradient stays finite
        if not return_aux:
            return y
        return y, NSAAux(block_indices, poison_rows(p.gates, p.nonfinite_tokens))

    def check_input(self, x: torch.Tensor) -> None:
        """NSAInputError unless x is a floating [B, T, hidden_size] tensor with the parameters' device and dtype
        (autocast: any floating dtype; nsa.validation.check_layer_input)."""
        check_layer_input(x, self.config.hidden_size, self.q_proj.weight)

    def _check_append(self, x: torch.Tensor, cache: NSAKVCache, num_valid: Sequence[int] | None,
                      start_positions: Sequence[int] | None) -> list[int]:
        if cache.config != self.config:
            raise NSAInputError("cache was built for a different NSAConfig than this layer's")
        return cache.check_append(x, num_valid, start_positions)

    def _empty_result(self, x: torch.Tensor, return_aux: bool) -> torch.Tensor | tuple[torch.Tensor, NSAAux]:
        """Result of an empty input (B = 0 or T = 0): empty tensors of the documented shapes. y comes from
        o_proj like any output, so it reaches the parameters' autograd graph (with zero gradient)."""
        c = self.config
        batch, seq_len, _ = x.shape
        y = self.o_proj(x.new_zeros(batch, seq_len, c.num_heads * c.head_dim_v))
        if not return_aux:
            return y
        block_indices = torch.full((batch, seq_len, c.num_kv_heads, c.num_selected), -1, dtype=torch.long,
                                   device=x.device)
        return y, NSAAux(block_indices, x.new_zeros(batch, seq_len, c.num_heads, 3))

    def project(self, x: torch.Tensor, positions: torch.Tensor | None) -> Projected:
        """Projections at absolute positions ([T] or [B, T]; None: 0 .. T - 1, whose RoPE tables are kept per
        size, nsa.rope.apply_rope), computed from x with non-finite tokens replaced by
        zeros (parameter gradients never meet a NaN). Every key and value of a non-finite token is NaN; its query and
        gates are not: its own output row reads its own window key (w >= 1) and its own block (always selected), so
        the ops poison that row anyway, and only it reads them (its gradient there is exactly 0)."""
        c = self.config
        batch, seq_len, _ = x.shape
        bad_tokens = nonfinite_rows(x)[:, :, None]  # [B, T, 1]: broadcasts over the heads of each projection
        (x,) = finite_or_zero_under_poison(x)  # every key and value of a non-finite token is poisoned below
        q = apply_rope(self.q_proj(x).view(batch, seq_len, c.num_heads, c.head_dim), positions, c.rope_theta)
        # One pass per projection over its sets x heads (slices of it would each take a pass of their own).
        k = poison_rows(self.k_proj(x).view(batch, seq_len, -1, c.head_dim), bad_tokens)
        v = poison_rows(self.v_proj(x).view(batch, seq_len, -1, c.head_dim_v), bad_tokens)
        gate_logits = self.gate_proj(x).view(batch, seq_len, c.num_heads, 3)
        gates = gate_logits.sigmoid() if c.gate == "sigmoid" else gate_logits.softmax(dim=-1)
        if c.shared_kv:
            k_rotated = apply_rope(k, positions, c.rope_theta)
            return Projected(q, k, v, k_rotated, v, k_rotated, v, gates, bad_tokens)
        # The sets as views of one tensor, taken apart by split / unbind: their gradients come back as one cat /
        # stack, where indexing would build a zero-filled [B, T, 3, Hkv, D] per index and add them up.
        k_cmp, sets = k.view(batch, seq_len, 3, c.num_kv_heads, c.head_dim).split([1, 2], dim=2)
        # The selection and window keys rotate in one call (RoPE acts per head: the same values as two calls).
        k_sel, k_win = apply_rope(sets.flatten(2, 3), positions, c.rope_theta).view_as(sets).unbind(2)
        v_cmp, v_sel, v_win = v.view(batch, seq_len, 3, c.num_kv_heads, c.head_dim_v).unbind(2)
        return Projected(q, k_cmp.squeeze(2), v_cmp, k_sel, v_sel, k_win, v_win, gates, bad_tokens)

    def _compress(self, k_raw: torch.Tensor, v_raw: torch.Tensor, lengths: list[int] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole-sequence phi: raw [B, T, Hkv, D] -> compressed keys (rotated at block centres), values. With the
        lengths of packed sequences, each sequence's blocks in turn (no block crosses a boundary)."""
        c = self.config
        if lengths is None:
            k_blocks = block_windows(k_raw, c.cmp_block_size, c.cmp_stride)
            return self.compress_blocks(k_blocks, block_windows(v_raw, c.cmp_block_size, c.cmp_stride), None)
        rows, block_ids = packed_block_rows(lengths, c.cmp_block_size, c.cmp_stride, k_raw.device)
        return self.compress_blocks(k_raw[:, rows].transpose(2, 3), v_raw[:, rows].transpose(2, 3), block_ids)

    def compress_blocks(self, k_blocks: torch.Tensor, v_blocks: torch.Tensor, block_ids: torch.Tensor | None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """phi over blocks of raw keys and values [B, N, Hkv, l, D] (tokens in order) whose indices inside their
        sequence are block_ids ([N] or [B, N]; None: 0 .. N - 1): (compressed keys rotated at the block centres
        i*d + (l-1)/2, compressed values), each [B, N, Hkv, D]; NaN for a block holding a non-finite token."""
        k_cmp = self._rotate_compressed(self._pool(self.compress_k, k_blocks), block_ids)
        return k_cmp, self._pool(self.compress_v, v_blocks)

    def _pool(self, phi: CompressPool, blocks: torch.Tensor) -> torch.Tensor:
        """phi over blocks [B, N, Hkv, l, D] -> [B, N, Hkv, D], NaN for a block holding a non-finite token (phi
        itself runs on zeros there, so its backward stays finite)."""
        return guarded_apply(phi.pool, blocks, item_dims=2)

    def _rotate_compressed(self, k_cmp: torch.Tensor, block_ids: torch.Tensor | None) -> torch.Tensor:
        c = self.config
        centre = (c.cmp_block_size - 1) / 2
        if block_ids is None:
            return apply_rope(k_cmp, None, c.rope_theta, stride=c.cmp_stride, offset=centre)
        return apply_rope(k_cmp, block_ids * c.cmp_stride + centre, c.rope_theta)

    def _append(
        self, x: torch.Tensor, cache: NSAKVCache, counts: list[int],
    ) -> tuple[torch.Tensor, torch.Tensor, Projected]:
        """Write x's tokens (counts[b] valid ones, from _check_append) into the cache (raw, ring and newly
        complete compressed blocks), then attend: a single token per sequence with decode_attention (the
        backend dispatch point), anything else chunk by chunk with the chunk step shared with prefill.
        The backend is chosen before the first write, so a refused backend leaves the cache unchanged.
        Returns (out, block_indices, the projections)."""
        c = self.config
        all_valid = all(n == x.shape[1] for n in counts)
        positions = cache.query_positions(x.shape[1], None if all_valid else counts)
        if not all_valid:  # padding may hold anything (NaN included); masked keys must stay finite
            x = x.masked_fill((positions < 0)[:, :, None], 0.0)
        p = self.project(x, positions.clamp_min(0))
        if p.q.dtype != cache.dtype:  # autocast's projections: the cache keeps its own dtype, and so does the step
            p = Projected(*(t.to(cache.dtype) if t.is_floating_point() else t for t in p))
        emitted = self._compressed_emissions(cache, p, positions, counts)
        decode_step = x.shape[1] == 1 and all_valid  # one new token per sequence: reads the ring after the write
        if decode_step:
            # The step reads the buffers after the writes: the new values stand in for what they add
            # (their dtype, device and whether they need gradients).
            new_values = (p.k_sel, p.v_sel, p.k_win, p.v_win, *(emitted[:2] if emitted else ()))
            backend = choose_decode_backend(c.backend, p.q[:, 0], cache.k_cmp, cache.v_cmp, cache.k_sel,
                                            cache.v_sel, cache.k_win, cache.v_win, *new_values)
        else:
            win_k, win_v, win_positions = cache.ring_stream(cache.k_win, cache.v_win, p.k_win, p.v_win, positions)
        cache.write_selection(p.k_sel, p.v_sel, positions, counts)
        self._write_compressed(cache, p, positions, counts, all_valid, emitted)
        win_rows = cache.ring_rows(positions, None if all_valid else counts, c.window_size)
        cache.write_tokens(cache.k_win, p.k_win, win_rows)
        cache.write_tokens(cache.v_win, p.v_win, win_rows)

        end = (cache.capacity if cache.static_shapes
               else max(n0 + n for n0, n in zip(cache.lengths, counts, strict=True)))
        num_cmp_visible = num_compressed_blocks(end, c.cmp_block_size, c.cmp_stride)
        num_sel_blocks = num_selection_blocks(end, c.sel_block_size)
        if decode_step:
            step = decode_attention(
                p.q[:, 0], p.gates[:, 0], positions[:, 0], k_cmp=cache.k_cmp, v_cmp=cache.v_cmp,
                num_cmp_bound=num_cmp_visible, k_sel=cache.k_sel, v_sel=cache.v_sel, num_sel_blocks=num_sel_blocks,
                k_win=cache.k_win, v_win=cache.v_win, sizes=self.sizes, scale=c.attention_scale, backend=backend,
                page_table=cache.page_table,
            )
            cache.commit(counts, all_valid, step.reads[:, None], positions)
            return step.output[:, None], step.block_indices[:, None], p
        chunk = c.query_chunk_size or prefill_chunk_size(p.q, cache.k_cmp[:, :num_cmp_visible], p.v_sel, self.sizes)
        k_sel, v_sel = cache.selection_view(num_sel_blocks * c.sel_block_size)
        outputs, indices, reads = [], [], []
        for a, b in query_chunks(x.shape[1], chunk):
            result = nsa_attention_chunk(
                p.q[:, a:b], p.gates[:, a:b], positions[:, a:b],
                k_cmp=cache.k_cmp, v_cmp=cache.v_cmp, num_cmp_visible=num_cmp_visible,
                k_sel=k_sel, v_sel=v_sel, num_sel_blocks=num_sel_blocks,
                k_win=win_k[:, a:c.window_size + b], v_win=win_v[:, a:c.window_size + b],
                win_positions=win_positions[:, a:c.window_size + b], sizes=self.sizes, scale=c.attention_scale,
            )
            outputs.append(result.output)
            indices.append(result.block_indices)
            reads.append(result.reads)
        cache.commit(counts, all_valid, torch.cat(reads, dim=1), positions)
        return torch.cat(outputs, dim=1), torch.cat(indices, dim=1), p

    def _compressed_emissions(self, cache: NSAKVCache, p: Projected, positions: torch.Tensor,
                              counts: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Pool every compressed block whose last token arrives in this append (writes nothing).

        Block i completes at position i*d + l - 1; an append of C tokens completes at most ceil(C/d)
        blocks per sequence. Returns (k_new [B, E, Hkv, Dk] rotated, v_new [B, E, Hkv, Dv], rows [B, E])
        with rows = the discard row for slots whose block does not complete; None when no block can.
        """
        c = self.config
        l, d = c.cmp_block_size, c.cmp_stride
        raw_k, raw_v, _ = cache.ring_stream(cache.k_cmp_raw, cache.v_cmp_raw, p.k_cmp_raw, p.v_cmp_raw, positions)
        if cache.static_shapes:
            num_emit = -(-positions.shape[1] // d)
        else:
            num_emit = max(num_compressed_blocks(n0 + n, l, d) - num_compressed_blocks(n0, l, d)
                           for n0, n in zip(cache.lengths, counts, strict=True))
        if num_emit == 0:
            return None
        device = positions.device
        lengths = cache.device_lengths[:, None]
        end = lengths + (positions >= 0).sum(dim=1, keepdim=True)
        first = torch.where(lengths >= l, (lengths - l) // d + 1, 0)
        last = torch.where(end >= l, (end - l) // d + 1, 0)
        block_ids = first + torch.arange(num_emit, device=device)  # [B, E]
        emit = block_ids < last
        # Stream index j holds position length - l + j, so token i*d + u sits at i*d + u - length + l.
        stream_index = block_ids[:, :, None] * d + torch.arange(l, device=device) - lengths[:, :, None] + l
        stream_index = torch.where(emit[:, :, None], stream_index, 0).flatten(1)  # [B, E*l]
        batch_index = torch.arange(positions.shape[0], device=device)[:, None]
        k_blocks = raw_k[batch_index, stream_index].unflatten(1, (num_emit, l)).transpose(2, 3)
        v_blocks = raw_v[batch_index, stream_index].unflatten(1, (num_emit, l)).transpose(2, 3)
        k_new, v_new = self.compress_blocks(k_blocks, v_blocks, block_ids)
        return k_new, v_new, torch.where(emit, block_ids, cache.num_cmp_capacity)

    def _write_compressed(self, cache: NSAKVCache, p: Projected, positions: torch.Tensor, counts: Sequence[int],
                          all_valid: bool, emitted: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None) -> None:
        """Store the appended raw tokens in the compression ring and the emitted blocks (if any)."""
        ring_rows = cache.ring_rows(positions, None if all_valid else counts, self.config.cmp_block_size)
        cache.write_tokens(cache.k_cmp_raw, p.k_cmp_raw, ring_rows)
        cache.write_tokens(cache.v_cmp_raw, p.v_cmp_raw, ring_rows)
        if emitted is not None:
            k_new, v_new, rows = emitted
            cache.write_tokens(cache.k_cmp, k_new, rows)
            cache.write_tokens(cache.v_cmp, v_new, rows)


def packed_positions(lengths: list[int], device: torch.device) -> torch.Tensor:
    """Positions of packed sequences' tokens, restarting at 0 in each: [sum(lengths)]."""
    return torch.cat([torch.arange(n, device=device) for n in lengths]) if lengths else torch.zeros(0, device=device)


def packed_block_rows(lengths: list[int], block_size: int, block_stride: int, device: torch.device
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows of every compressed block of packed sequences, each sequence's blocks in turn: (rows [N, l],
    block ids inside their sequence [N]); block i of a sequence covers its tokens [i*d, i*d + l)."""
    starts, ids, offset = [], [], 0
    for n in lengths:
        count = num_compressed_blocks(n, block_size, block_stride)
        ids.append(torch.arange(count, device=device))
        starts.append(offset + ids[-1] * block_stride)
        offset += n
    first = torch.cat(starts) if starts else torch.zeros(0, dtype=torch.long, device=device)
    return first[:, None] + torch.arange(block_size, device=device), torch.cat(ids) if ids else first
