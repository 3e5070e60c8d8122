"""Non-finite inputs: a masked position never contributes, whatever it holds.

Attention multiplies masked probabilities (exactly 0) with the values they mask, and 0 * NaN = NaN:
one NaN or inf in a later token (garbage in right padding is the everyday case) would turn every
earlier output row NaN, and in the backward every gradient. Every op of the library therefore

1. replaces non-finite entries of its inputs by zero (``finite_or_zero``) before any arithmetic, so
   nothing non-finite enters a softmax, a matmul or a gradient, and
2. returns NaN in exactly the output rows that can see a non-finite input under the op's own
   visibility rule (``poison_rows``): garbage is never silently turned into a finite output.

Rows that cannot see a non-finite input are bitwise equal to the rows computed without it (the
replaced entries only ever meet probabilities that are exactly 0). ``torch.where`` passes zero
gradient to the replaced entries and to the poisoned rows, so gradients stay finite as well.

Where the rows are flagged:
- the torch paths flag inside ``nsa.attention_core`` from the very mask each chunk attends with
  (prefill, chunked prefill through the cache and the decode reference alike);
- the whole-sequence flags below (``compressed_nonfinite_rows``, ``selected_nonfinite_rows``,
  ``window_nonfinite_rows``, ``nsa_nonfinite_rows``) serve paths that do not expose their masks
  (fused kernels, the dense naive twins). They take O(T * (n + H * D)) memory and time and
  no host sync: running minima / maxima of the non-finite positions (the first non-finite block
  or token at or after each index, the last non-finite key at or before each query), gathered at
  each query's compressed prefix, window start and n selected blocks. All four take cu_seqlens
  (packed sequences, as nsa_attention does); ``nsa_nonfinite_guard`` wraps a fused path with the rule.

Rows are (batch, query position, query head): a key or value vector of KV head h reaches the G
query heads of its group; a query vector only its own head.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


def finite_or_zero(x: Tensor) -> Tensor:
    """x with every NaN / +-inf entry replaced by 0 (differentiable; zero gradient at those entries)."""
    return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)  # one pass (where(isfinite) takes three)


def finite_or_zero_under_poison(*xs: Tensor) -> tuple[Tensor, ...]:
    """finite_or_zero of each input of a computation that poisons every output row reading a replaced entry
    (``nsa_nonfinite_guard``, ``guarded_apply``, NSAAttention's projections: the layer's output rows that read a
    non-finite token are NaN; scope's ops, scope.block_sparse_attention.finite_inputs); its backward passes the
    gradients through unchanged. A poisoned row receives exactly zero gradient and no other row reads the entry (its
    probability or weight is exactly 0), so the gradient reaching a replaced entry is exactly 0 already:
    finite_or_zero's backward mask (isfinite and a product, four passes over q: 4.5 ms of a 151 ms layer at 64k
    on the H200) would change nothing. All inputs in one autograd node (the guard sanitises eight tensors per
    layer: eight Python nodes each way were host time in an eager step)."""
    return _FiniteOrZeroUnderPoison.apply(*xs)


class _FiniteOrZeroUnderPoison(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, *xs: Tensor) -> tuple[Tensor, ...]:
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None (no zeros are made for it)
        outs = tuple(finite_or_zero(x) for x in xs)
        # as if each input had its own node: an output requires grad only where its input does
        ctx.mark_non_differentiable(*(out for x, out in zip(xs, outs, strict=True) if not x.requires_grad))
        return outs

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        return grads


def nonfinite_rows(x: Tensor) -> Tensor:
    """bool x.shape[:-1]: the vectors (last dim) holding any NaN or +-inf."""
    x = x.detach()
    if _row_kernels_apply(x):
        from nsa.kernels.rows import nonfinite_rows_triton

        return nonfinite_rows_triton(x)
    # x * 0 is exactly 0 at finite entries and NaN at NaN / inf ones, so the row sum is NaN iff one is non-finite
    # (no overflow can occur); torch.compile fuses it into one read (isfinite(x).all() takes five passes).
    return (x * 0).sum(dim=-1).isnan()


# The smallest output poison_rows fills with nsa.kernels.rows' pass. That pass exists for GPU time: PyTorch's
# elementwise ops broadcast the flags along the last dim off their vectorised path (torch.where: ~1.5 ms per GiB
# each way on the H200 against ~0.5 for one read and write), which at 64 MiB (2^25 bf16 elements) costs ~0.13 ms
# forward + backward. Below it an eager step is host-bound (the 4-layer GPT at 16k: ~70 ms of host time per step against
# ~50 ms of GPU time on the H100), and masked_fill's one ATen op each way, with its backward in C++, costs less
# host time than a Triton launch plus a Python autograd Function each way (~0.25 ms per poisoned output there,
# torch profiler, thirty-fifth session). The values are the same either way.
POISON_KERNEL_MIN_ELEMENTS = 1 << 25


def poison_rows(out: Tensor, rows: Tensor) -> Tensor:
    """out [..., D] with NaN in the rows where ``rows`` (bool, out.shape[:-1] or broadcastable) is True; the
    gradient of those rows is zero."""
    if out.numel() >= POISON_KERNEL_MIN_ELEMENTS and _row_kernels_apply(out):
        return _PoisonRows.apply(out, torch.broadcast_to(rows, out.shape[:-1]).contiguous())
    return out.masked_fill(rows[..., None], float("nan"))


def _row_kernels_apply(x: Tensor, contiguous: bool = True) -> bool:
    """Whether the row passes take nsa.kernels.rows' single Triton pass (nsa.dispatch.elementwise_kernel_applies;
    ``contiguous=False``: for a pass that reads x's vectors at any strides)."""
    from nsa.dispatch import elementwise_kernel_applies  # nsa.dispatch imports this module's importers

    return elementwise_kernel_applies(x, contiguous=contiguous)


class _PoisonRows(torch.autograd.Function):
    """poison_rows on nsa.kernels.rows: NaN rows forward, zero rows backward (torch.where's gradient)."""

    @staticmethod
    def forward(ctx: Any, out: Tensor, rows: Tensor) -> Tensor:
        from nsa.kernels.rows import fill_rows_triton

        ctx.save_for_backward(rows)
        return fill_rows_triton(out, rows, fill_nan=True)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (rows,) = ctx.saved_tensors
        if not _row_kernels_apply(grad):
            return grad.masked_fill(rows[..., None], 0.0), None
        from nsa.kernels.rows import fill_rows_triton

        return fill_rows_triton(grad, rows, fill_nan=False), None


def poison_values(x: Tensor, rows: Tensor) -> Tensor:
    """x with NaN where ``rows`` is True, elementwise (per-row scalars such as lse [B, T, HQ])."""
    return poison_rows(x[..., None], rows)[..., 0]


def guarded_apply(fn: Callable[[Tensor], Tensor], x: Tensor, item_dims: int = 1) -> Tensor:
    """fn(finite_or_zero(x)) with NaN in each output row whose input item held a NaN or inf.

    fn maps x [..., *item] item by item to [..., D'], the item being the last item_dims dims of x
    (a linear layer: item_dims=1; phi over blocks [..., l, D]: item_dims=2). fn never sees a
    non-finite value, so its parameter gradients never form 0 * NaN.
    """
    (finite,) = finite_or_zero_under_poison(x)
    return poison_rows(fn(finite), nonfinite_rows(x.flatten(-item_dims)))


def gated_sum(gates: Tensor, branches: Sequence[Tensor]) -> Tensor:
    """sum_i gates[..., i] * branches[i]; gates [B, T, HQ, nb], branches nb x [B, T, HQ, Dv].

    NaN in every row where the gates or any branch output is non-finite (the branches arrive
    poisoned). The sum is taken over sanitized operands: poisoning the sum rather than each term
    keeps the backward from forming 0 * NaN in the gate gradient of a poisoned row.
    """
    rows = functools.reduce(operator.or_, [nonfinite_rows(b) for b in branches], nonfinite_rows(gates))
    g = finite_or_zero(gates).unsqueeze(-1)
    terms = [g[..., i, :] * finite_or_zero(branch) for i, branch in enumerate(branches)]
    return poison_rows(functools.reduce(operator.add, terms), rows)


def kv_nonfinite(k: Tensor, v: Tensor) -> Tensor:
    """bool k.shape[:-1]: the key or the value vector (last dim) is non-finite; k and v share every dim but the
    last (NSA's [..., N, Hkv, Dk | Dv], scope's [B, H_kv, T, D])."""
    return nonfinite_rows(k) | nonfinite_rows(v)


def per_query_head(kv_rows: Tensor, num_heads: int) -> Tensor:
    """[..., Hkv] -> [..., HQ]: query head h reads KV head h // G (G = HQ / Hkv)."""
    return kv_rows.repeat_interleave(num_heads // kv_rows.shape[-1], dim=-1)


class _Packing(NamedTuple):
    """Where each query row's sequence starts: token start [T] and first compressed block [T] (zeros
    without packing), and each row's position inside its sequence [T]."""

    token_start: Tensor
    block_start: Tensor
    position: Tensor


def _num_cmp(seq_len: Tensor, block_size: int, block_stride: int) -> Tensor:
    """num_cmp(S) elementwise: 0 if S < l else (S - l) // d + 1."""
    return torch.where(seq_len >= block_size, (seq_len - block_size) // block_stride + 1, 0)


def sequence_packing(seq_len: int, cu_seqlens: Tensor | None, device: torch.device, block_size: int = 1,
                     block_stride: int = 1) -> _Packing:
    """_Packing of seq_len query rows: one sequence without cu_seqlens, else the sequences cu_seqlens packs
    (block_start counts compressed blocks of (block_size, block_stride) in the sequences before a row's)."""
    t = torch.arange(seq_len, device=device)
    if cu_seqlens is None:
        zeros = torch.zeros_like(t)
        return _Packing(zeros, zeros, t)
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    sequence = torch.searchsorted(cu[1:], t, right=True)  # the sequence holding row t
    blocks_before = F.pad(_num_cmp(cu[1:] - cu[:-1], block_size, block_stride).cumsum(0), (1, 0))
    return _Packing(cu[sequence], blocks_before[sequence], t - cu[sequence])


def _next_true(flags: Tensor) -> Tensor:
    """flags [B, N, H] -> int [B, N + 1, H]: the first index >= i holding True (N where none; row N is
    a sentinel, so index N is safe to gather). The scan runs along the last, contiguous dim: a scan along
    a middle dim of H = 4 columns is sequential per column on the GPU."""
    size = flags.shape[1]
    index = torch.arange(size, device=flags.device)[None, None, :]
    ahead = F.pad(torch.where(flags.transpose(1, 2), index, size), (0, 1), value=size).flip(-1).contiguous()
    return ahead.cummin(dim=-1).values.flip(-1).transpose(1, 2)


def _gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """x [B, N, H], index [B|1, T, H, ...] (rows of x) -> x[b, index[b, t, h, ...], h]."""
    batch, heads = x.shape[0], x.shape[2]
    b = torch.arange(batch, device=x.device).view(batch, *([1] * (index.dim() - 1)))
    h = torch.arange(heads, device=x.device).view(1, 1, heads, *([1] * (index.dim() - 3)))
    return x[b, index, h]


def compressed_nonfinite_rows(q: Tensor, k_cmp: Tensor, v_cmp: Tensor, block_size: int, block_stride: int,
                              cu_seqlens: Tensor | None = None) -> Tensor:
    """bool [B, T, HQ]: rows of compressed_attention that see a non-finite input.

    q [B, T, HQ, Dk], k_cmp [B, N, Hkv, Dk], v_cmp [B, N, Hkv, Dv]. Query t sees block i iff
    i*d + l - 1 <= t, the first num_cmp(t + 1) blocks: it is poisoned iff its group's first
    non-finite block comes before that count. Packed (cu_seqlens [S + 1], B = 1): positions restart
    in each sequence and k_cmp holds each sequence's blocks one after the other.
    """
    sees = _compressed_group_rows(q.shape[1], k_cmp, v_cmp, block_size, block_stride, cu_seqlens)
    return nonfinite_rows(q) | per_query_head(sees, q.shape[2])


def _compressed_group_rows(seq_len: int, k_cmp: Tensor, v_cmp: Tensor, block_size: int, block_stride: int,
                           cu_seqlens: Tensor | None) -> Tensor:
    """bool [B, T, Hkv]: the (query, group) pairs whose visible compressed blocks hold a non-finite k / v."""
    pack = sequence_packing(seq_len, cu_seqlens, k_cmp.device, block_size, block_stride)
    next_bad = _next_true(kv_nonfinite(k_cmp, v_cmp))  # [B, N + 1, Hkv]
    first = pack.block_start[None, :, None].expand(-1, -1, next_bad.shape[2])  # the row's sequence's block 0
    num_visible = _num_cmp(pack.position + 1, block_size, block_stride)[None, :, None]
    return _gather_rows(next_bad, first) < first + num_visible


def window_nonfinite_rows(q: Tensor, k: Tensor, v: Tensor, window_size: int, cu_seqlens: Tensor | None = None
                          ) -> Tensor:
    """bool [B, T, HQ]: rows of sliding_window_attention that see a non-finite input.

    q [B, T, HQ, Dk], k/v [B, T, Hkv, D]. Query t reads keys max(start, t - w + 1) .. t (start = 0, or
    its sequence's first row when packed by cu_seqlens): it is poisoned iff the last non-finite key at
    or before t (a running maximum) lies inside that range.
    """
    return nonfinite_rows(q) | per_query_head(_window_group_rows(k, v, window_size, cu_seqlens), q.shape[2])


def _window_group_rows(k: Tensor, v: Tensor, window_size: int, cu_seqlens: Tensor | None) -> Tensor:
    """bool [B, T, Hkv]: the (query, group) pairs whose window holds a non-finite k / v."""
    bad = kv_nonfinite(k, v)  # [B, T, Hkv]
    pack = sequence_packing(bad.shape[1], cu_seqlens, bad.device)
    t = torch.arange(bad.shape[1], device=bad.device)
    # the scan along the last, contiguous dim (see _next_true)
    last_bad = torch.where(bad.transpose(1, 2), t, -1).contiguous().cummax(dim=-1).values.transpose(1, 2)
    t = t[None, :, None]
    return (last_bad >= pack.token_start[None, :, None]) & (last_bad > t - window_size)


def selected_nonfinite_rows(q: Tensor, k: Tensor, v: Tensor, block_indices: Tensor, sel_block_size: int,
                            cu_seqlens: Tensor | None = None) -> Tensor:
    """bool [B, T, HQ]: rows of selected_attention that see a non-finite input.

    q [B, T, HQ, Dk], k/v [B, T, Hkv, D], block_indices [B, T, Hkv, n] (-1 = unused; per sequence
    when packed by cu_seqlens). Query t of group g reads the tokens of its selected block j from
    start + j*l' to min(start + (j+1)*l', t + 1) (exclusive): it is poisoned iff the first non-finite
    token at or after the block's start lies before that end. Memory O(T * n) (no per-token gather).
    """
    sees = _selected_group_rows(k, v, block_indices, sel_block_size, cu_seqlens)
    return nonfinite_rows(q) | per_query_head(sees, q.shape[2])


def _selected_group_rows(k: Tensor, v: Tensor, block_indices: Tensor, sel_block_size: int,
                         cu_seqlens: Tensor | None) -> Tensor:
    """bool [B, T, Hkv]: the (query, group) pairs whose selected blocks hold a non-finite k / v they read."""
    bad = kv_nonfinite(k, v)  # [B, T, Hkv]
    pack = sequence_packing(bad.shape[1], cu_seqlens, bad.device)
    used = block_indices >= 0
    block_start = pack.token_start[None, :, None, None] + block_indices.long().clamp_min(0) * sel_block_size
    t = pack.token_start + pack.position
    end = torch.minimum(block_start + sel_block_size, t[None, :, None, None] + 1)
    next_bad = _gather_rows(_next_true(bad), block_start.clamp_max(bad.shape[1]))  # [B, T, Hkv, n]
    return (used & (next_bad < end)).any(dim=-1)


def nsa_nonfinite_rows(
    q: Tensor, k_cmp: Tensor, v_cmp: Tensor, k_sel: Tensor, v_sel: Tensor, k_win: Tensor, v_win: Tensor,
    gates: Tensor, block_indices: Tensor, *, block_size: int, block_stride: int, sel_block_size: int,
    window_size: int, cu_seqlens: Tensor | None = None,
) -> Tensor:
    """bool [B, T, HQ]: rows of nsa_attention that see a non-finite input (its arguments, in its layout,
    cu_seqlens included, plus the block_indices it selected): the union of the three branches' rows and
    of the rows whose gates [B, T, HQ, 3] are non-finite (a gate reaches its own row only). q is scanned
    once (it is the largest input: one pass over it is most of this function's time). Eager on CUDA: three launches
    of nsa.kernels.rows (the ~120 small PyTorch ops below took a fixed 1.4-1.7 ms on the H200, host-bound), which
    take the keys and values as strided views (NSAAttention's selection and window sets are slices of one
    projection's output)."""
    raw = (q, k_cmp, v_cmp, k_sel, v_sel, k_win, v_win, gates)
    if (_row_kernels_apply(q) and _row_kernels_apply(gates) and all(_row_kernels_apply(x, contiguous=False)
                                                                     for x in raw[1:-1])
            and block_indices.device == q.device and block_indices.is_contiguous()):
        from nsa.kernels.rows import nsa_nonfinite_rows_triton

        return nsa_nonfinite_rows_triton(*raw, block_indices, block_size=block_size, block_stride=block_stride,
                                         sel_block_size=sel_block_size, window_size=window_size, cu_seqlens=cu_seqlens)
    groups = (_compressed_group_rows(q.shape[1], k_cmp, v_cmp, block_size, block_stride, cu_seqlens)
              | _selected_group_rows(k_sel, v_sel, block_indices, sel_block_size, cu_seqlens)
              | _window_group_rows(k_win, v_win, window_size, cu_seqlens))
    return nonfinite_rows(q) | per_query_head(groups, q.shape[2]) | nonfinite_rows(gates)


def nsa_nonfinite_guard(
    attend: Callable[..., tuple[Tensor, Tensor]], q: Tensor, k_cmp: Tensor, v_cmp: Tensor, k_sel: Tensor,
    v_sel: Tensor, k_win: Tensor, v_win: Tensor, gates: Tensor, *, block_size: int, block_stride: int,
    sel_block_size: int, window_size: int, cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The rule around a fused nsa_attention path that exposes neither its masks nor its branch outputs.

    attend(q, k_cmp, v_cmp, k_sel, v_sel, k_win, v_win, gates) -> (output [B, T, HQ, Dv], block_indices
    [B, T, Hkv, n]) runs on the inputs with NaN / inf replaced by 0; the output comes back with NaN in the
    rows nsa_nonfinite_rows names for the original inputs (layouts and cu_seqlens as in nsa_attention).
    """
    raw = (q, k_cmp, v_cmp, k_sel, v_sel, k_win, v_win, gates)
    output, block_indices = attend(*finite_or_zero_under_poison(*raw))
    rows = nsa_nonfinite_rows(*raw, block_indices, block_size=block_size, block_stride=block_stride,
                              sel_block_size=sel_block_size, window_size=window_size, cu_seqlens=cu_seqlens)
    return poison_rows(output, rows), block_indices
