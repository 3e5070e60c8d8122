"""Block-sparse causal attention over per-(batch, head, query block) key-block lists.

SCOPE's pointer mask is a list of key blocks per query block; FlexAttention runs it, but its kernels
round the q.k head dim up to a power of two, so SCOPE's qk_aug features (head dim 128 + 2K) cost a
256-wide dot. ``block_sparse_attention`` runs the same lists with the dot split in two (see
scope.kernels.block_sparse), forward and backward, registered with torch.library so torch.compile
traces it; ``block_sparse_attention_reference`` is its dense PyTorch twin (same arguments; O(T^2)
memory, for tests and small T). The backend is chosen by nsa.dispatch (logged once per reason). Both follow
nsa.nonfinite: a non-finite input turns exactly the rows that read it NaN (``rows_that_read``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from nsa.dispatch import accumulation_dtype, choose_backend
from nsa.nonfinite import finite_or_zero_under_poison, kv_nonfinite, nonfinite_rows, poison_rows
from nsa.validation import FLOAT_DTYPES, check_real, describe
from scope.errors import ScopeInputError
from scope.pointer_mask import ScoreMod


def block_sparse_attention(
    q: Tensor, k: Tensor, v: Tensor, kv_num_blocks: Tensor, kv_indices: Tensor, *, block: int,
    scale: float | None = None, q_num_blocks: Tensor | None = None, q_indices: Tensor | None = None,
    backend: str = "auto", check_lists: bool = True,
) -> Tensor:
    """softmax(scale * q k^T) v over the listed key blocks, causal at token level.

    Layout: q [B, H, T, Dqk], k [B, H_kv, T, Dqk], v [B, H_kv, T, Dv] (query head h reads kv head
    h // (H / H_kv)); T a multiple of ``block``. kv_num_blocks int32 [B, H, QB] and kv_indices int32
    [B, H, QB, L], QB = T / block: query block qb reads key blocks kv_indices[b, h, qb, :kv_num_blocks]
    (distinct, each <= qb; entries past kv_num_blocks are ignored). Query i sees key j iff j's block is
    listed for i's block and j <= i (queries and keys share positions: prefill). A row that sees no key
    returns 0; a row that sees a non-finite q_i, k_j or v_j returns NaN, and every other row, and its
    gradients, are what they would be without it (nsa.nonfinite). scale defaults to Dqk ** -0.5.
    q_num_blocks / q_indices: the transposed lists (see ``transpose_block_lists``), read by the backward
    only; made from the kv lists when omitted, and when given they must be exactly those. backend: "auto"
    (Triton kernels on CUDA, else the torch twin), "triton" (raises when it cannot run), "torch". check_lists:
    check the lists' values (counts in [0, L], ids in [0, qb] and distinct, the q-side lists the transpose of the
    kv lists; one host sync); the kernels trust them, so pass False only for lists a builder made.
    -> out [B, H, T, Dv] in q's dtype.
    """
    scale = _check_inputs(q, k, v, kv_num_blocks, kv_indices, block, scale, q_num_blocks, q_indices, check_lists)
    choice = choose_backend("scope block_sparse_attention", backend, (q, k, v), inference_only=False,
                            error=ScopeInputError)
    q, k, v, poisoned = finite_inputs(q, k, v, kv_num_blocks, kv_indices, block)
    if choice.name == "torch":
        out = dense_block_sparse(q, k, v, kv_num_blocks, kv_indices, block, scale)
    else:
        out = kernel_block_sparse(q, k, v, kv_num_blocks, kv_indices, block, scale, q_num_blocks, q_indices)
    return poison_rows(out, poisoned)


def block_sparse_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, kv_num_blocks: Tensor, kv_indices: Tensor, *, block: int,
    scale: float | None = None, q_num_blocks: Tensor | None = None, q_indices: Tensor | None = None,
    backend: str = "torch", check_lists: bool = True,
) -> Tensor:
    """Dense PyTorch twin of block_sparse_attention (same arguments, checks and non-finite rule; the q-side lists
    and backend are checked and unused). Scores and softmax in float32 (float64 for float64 inputs)."""
    scale = _check_inputs(q, k, v, kv_num_blocks, kv_indices, block, scale, q_num_blocks, q_indices, check_lists)
    q, k, v, poisoned = finite_inputs(q, k, v, kv_num_blocks, kv_indices, block)
    return poison_rows(dense_block_sparse(q, k, v, kv_num_blocks, kv_indices, block, scale), poisoned)


def finite_inputs(q: Tensor, k: Tensor, v: Tensor, kv_num_blocks: Tensor, kv_indices: Tensor, block: int,
                  doc_start: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (q, k, v) with every non-finite entry replaced by 0, and bool [B, H, T]: the query rows that read a
    non-finite input (their own q row, or a k / v row they see; see ``rows_that_read``), to be poisoned.

    The caller must poison those rows (zero gradient there): then the gradient reaching a replaced entry is
    exactly 0 already, since only poisoned rows read it, so the replacement's backward passes gradients through
    (nsa.nonfinite.finite_or_zero_under_poison) instead of masking them (one more read of q, k and v each)."""
    reads = rows_that_read(kv_nonfinite(k, v), kv_num_blocks, kv_indices, block=block, num_heads=q.shape[1],
                           doc_start=doc_start)
    poisoned = nonfinite_rows(q) | reads
    q, k, v = finite_or_zero_under_poison(q, k, v)
    return q, k, v, poisoned


def rows_that_read(flagged: Tensor, kv_num_blocks: Tensor, kv_indices: Tensor, *, block: int, num_heads: int,
                   doc_start: Tensor | None = None) -> Tensor:
    """bool [B, H, T]: the query rows that read a flagged key token.

    flagged bool [B, H_kv, T] (query head h reads kv head h // (H / H_kv); H_kv = 1 stands for every head);
    lists as block_sparse_attention's, [B|1, H|1, QB(, L)]. Query i reads key j iff j <= i, j's block is
    listed for i's block and, with doc_start [B|1, T] (scope.pointer_mask.document_starts), j >= doc_start[i]
    (j is in i's document). Per query block: the last flagged key of its listed earlier blocks, and on the
    diagonal block the last flagged key so far; no [T, T] tensor (memory O(B H (T + QB L))), no host sync.
    """
    bsz, kv_heads, seq_len = flagged.shape
    num_blocks, device = seq_len // block, flagged.device
    pos = torch.arange(seq_len, device=device)
    marked = torch.where(flagged, pos, -1)  # each flagged key's position, -1 elsewhere
    kv_head = torch.arange(num_heads, device=device) // (num_heads // kv_heads)
    last_in_block = marked.unflatten(-1, (num_blocks, block)).amax(-1)[:, kv_head]  # [B, H, KB]
    last_so_far = marked.cummax(-1).values[:, kv_head]  # [B, H, T]
    shape = (bsz, num_heads, num_blocks)
    slots = kv_indices.long().expand(*shape, kv_indices.shape[-1])
    listed = torch.arange(slots.shape[-1], device=device) < kv_num_blocks.expand(shape)[..., None]
    query_block = torch.arange(num_blocks, device=device)[:, None]
    earlier = listed & (slots >= 0) & (slots < query_block)
    last_flagged = last_in_block.gather(-1, slots.clamp(0, num_blocks - 1).flatten(-2)).view_as(slots)  # unlisted: any
    last_earlier = torch.where(earlier, last_flagged, -1).amax(-1).repeat_interleave(block, -1)  # [B, H, T]
    diagonal = (listed & (slots == query_block)).any(-1).repeat_interleave(block, -1)  # [B, H, T]
    diagonal_start = pos - pos % block
    if doc_start is None:
        return (last_earlier >= 0) | (diagonal & (last_so_far >= diagonal_start))
    start = doc_start[:, None, :]
    return (last_earlier >= start) | (diagonal & (last_so_far >= torch.maximum(diagonal_start, start)))


def dense_block_sparse(q: Tensor, k: Tensor, v: Tensor, kv_num_blocks: Tensor, kv_indices: Tensor, block: int,
                       scale: float, *, score_mod: ScoreMod | None = None, doc_start: Tensor | None = None) -> Tensor:
    """The torch path on checked, finite inputs: one dense [B, H, T, T] masked softmax (O(T^2) memory) in float32
    (float64 for float64 inputs); lists broadcast over B or H of size 1. score_mod: FlexAttention's signature,
    evaluated once on broadcast indices (b [B,1,1,1], h [1,H,1,1], q_idx [1,1,T,1], kv_idx [1,1,1,T]);
    doc_start [B|1, T]: query i reads no key before doc_start[i]. Rows that read nothing are 0."""
    bsz, heads, seq_len = q.shape[:3]
    work = accumulation_dtype(q.dtype)
    pos = torch.arange(seq_len, device=q.device)
    token_block = pos // block
    listed = block_visibility(kv_num_blocks, kv_indices, seq_len // block)  # [B|1, H|1, QB, KB]
    visible = listed[:, :, token_block][:, :, :, token_block] & (pos[:, None] >= pos[None, :])
    if doc_start is not None:
        visible = visible & (pos >= doc_start[:, None, :, None])
    group = heads // k.shape[1]
    k_heads, v_heads = (t.repeat_interleave(group, dim=1).to(work) for t in (k, v))
    scores = q.to(work) @ k_heads.transpose(-1, -2) * scale
    if score_mod is not None:
        batch_idx = torch.arange(bsz, device=q.device).view(-1, 1, 1, 1)
        head_idx = torch.arange(heads, device=q.device).view(1, -1, 1, 1)
        scores = score_mod(scores, batch_idx, head_idx, pos.view(1, 1, -1, 1), pos.view(1, 1, 1, -1))
    reads = visible.any(-1, keepdim=True)
    # rows that read nothing softmax a finite dummy row and are weighted 0 (no -inf-only row: no NaN anywhere)
    scores = torch.where(reads, scores.masked_fill(~visible, float("-inf")), 0.0)
    probs = torch.softmax(scores, dim=-1) * reads
    return (probs @ v_heads).to(q.dtype)


def kernel_block_sparse(q: Tensor, k: Tensor, v: Tensor, kv_num_blocks: Tensor, kv_indices: Tensor, block: int,
                        scale: float, q_num_blocks: Tensor | None = None, q_indices: Tensor | None = None) -> Tensor:
    """The Triton path on checked, finite inputs (the torch.library op: forward and backward kernels)."""
    if q_num_blocks is None or q_indices is None:
        q_num_blocks, q_indices = transpose_block_lists(kv_num_blocks, kv_indices, q.shape[2] // block)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    lists = (t.int() for t in (kv_num_blocks, kv_indices, q_num_blocks, q_indices))  # the launchers make them dense
    return torch.ops.scope.block_sparse_attention(q, k, v, *lists, block, scale)[0]


def block_visibility(kv_num_blocks: Tensor, kv_indices: Tensor, num_blocks: int) -> Tensor:
    """bool [B, H, QB, KB]: key block kb is listed for query block qb (entries past kv_num_blocks ignored)."""
    slots = torch.arange(kv_indices.shape[-1], device=kv_indices.device)
    listed = slots < kv_num_blocks[..., None]
    target = torch.where(listed, kv_indices.long(), num_blocks)  # the unlisted go to a spare column
    dense = torch.zeros(*kv_indices.shape[:-1], num_blocks + 1, dtype=torch.bool, device=kv_indices.device)
    return dense.scatter_(-1, target, True)[..., :num_blocks]


def transpose_block_lists(kv_num_blocks: Tensor, kv_indices: Tensor, num_blocks: int) -> tuple[Tensor, Tensor]:
    """The query blocks that list each key block -> q_num_blocks int32 [B, H, KB], q_indices int32
    [B, H, KB, QB] (ascending, -1 after q_num_blocks). O(B H QB KB) memory, no sort, no host sync."""
    listed_by = block_visibility(kv_num_blocks, kv_indices, num_blocks).transpose(-1, -2)  # [B, H, KB, QB]
    slot = listed_by.long().cumsum(-1) - 1
    q_indices = torch.full((*listed_by.shape[:-1], num_blocks + 1), -1, dtype=torch.int32, device=listed_by.device)
    query_blocks = torch.arange(num_blocks, dtype=torch.int32, device=listed_by.device).expand_as(listed_by)
    q_indices.scatter_(-1, torch.where(listed_by, slot, num_blocks), query_blocks)
    return listed_by.sum(-1, dtype=torch.int32), q_indices[..., :num_blocks].contiguous()


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, kv_num_blocks: Tensor, kv_indices: Tensor, block: int,
                  scale: float | None, q_num_blocks: Tensor | None, q_indices: Tensor | None,
                  check_lists: bool) -> float:
    """-> the scale to use; ScopeInputError naming the argument on a broken rule."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ScopeInputError(f"{name} must be a tensor [B, heads, T, D], got {describe(t)}")
        if t.dtype not in FLOAT_DTYPES:
            raise ScopeInputError(f"{name} must be a floating tensor, got {t.dtype}")
        if t.device != q.device or t.dtype != q.dtype:
            raise ScopeInputError(f"{name} must match q's device and dtype ({q.device}, {q.dtype}), "
                                  f"got {t.device}, {t.dtype}")
    bsz, heads, seq_len, dqk = q.shape
    if k.shape[:3] != (bsz, k.shape[1], seq_len) or k.shape[-1] != dqk or v.shape[:3] != k.shape[:3]:
        raise ScopeInputError(f"k must be [B={bsz}, H_kv, T={seq_len}, Dqk={dqk}] and v [B, H_kv, T, Dv] with "
                              f"k's first three sizes, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[1] == 0 or heads % k.shape[1] != 0:
        raise ScopeInputError(f"q's heads ({heads}) must be a multiple of k's heads ({k.shape[1]})")
    if seq_len == 0:
        raise ScopeInputError("the sequence length T must be >= 1, got 0")
    if isinstance(block, bool) or not isinstance(block, int) or block < 16 or block & (block - 1):
        raise ScopeInputError(f"block={block!r} must be a power of two >= 16")
    if seq_len % block != 0:
        raise ScopeInputError(f"the sequence length T={seq_len} must be a multiple of block={block}")
    if not isinstance(check_lists, bool):
        raise ScopeInputError(f"check_lists must be a bool, got {check_lists!r}")
    num_blocks = seq_len // block
    check_list_layout("kv_num_blocks", kv_num_blocks, "kv_indices", kv_indices, (bsz, heads, num_blocks), q.device)
    if (q_num_blocks is None) != (q_indices is None):
        raise ScopeInputError("q_num_blocks and q_indices come together (both, or neither)")
    if q_num_blocks is not None and q_indices is not None:
        check_list_layout("q_num_blocks", q_num_blocks, "q_indices", q_indices, (bsz, heads, num_blocks), q.device)
    if check_lists:
        check_list_values(kv_num_blocks, kv_indices)
        if q_num_blocks is not None and q_indices is not None:
            check_transposed(kv_num_blocks, kv_indices, q_num_blocks, q_indices)
    if scale is None:
        return dqk ** -0.5
    return check_real("scale", scale, error=ScopeInputError, above=0.0, float32=True)


def check_transposed(kv_num_blocks: Tensor, kv_indices: Tensor, q_num_blocks: Tensor, q_indices: Tensor) -> None:
    """ScopeInputError unless the q-side lists are those of transpose_block_lists (their first q_num_blocks
    entries; q_indices may be narrower than QB where no key block is listed that often). One host sync."""
    want_num, want_idx = transpose_block_lists(kv_num_blocks, kv_indices, kv_num_blocks.shape[-1])
    width = q_indices.shape[-1]
    want_idx = F.pad(want_idx, (0, max(0, width - want_idx.shape[-1])), value=-1)[..., :width]
    listed = torch.arange(width, device=q_indices.device) < want_num[..., None]
    wrong = ((q_num_blocks.long() != want_num.long()).any() | (want_num > width).any()
             | (listed & (q_indices.long() != want_idx.long())).any())
    if bool(wrong):
        raise ScopeInputError("q_num_blocks / q_indices must be the transpose of the kv lists (transpose_block_lists)")


def check_list_layout(num_name: str, num: Tensor, idx_name: str, idx: Tensor, shape: tuple[int, int, int],
                      device: torch.device) -> None:
    """A count tensor [B, H, N] (``shape``) beside its lists [B, H, N, L], both int32 / int64 on ``device``."""
    for name, t in ((num_name, num), (idx_name, idx)):
        if not isinstance(t, Tensor) or t.dtype not in (torch.int32, torch.int64) or t.device != device:
            where = f" on {t.device}" if isinstance(t, Tensor) else ""
            raise ScopeInputError(f"{name} must be an int32/int64 tensor on {device}, got {describe(t)}{where}")
    if num.shape != shape or idx.dim() != 4 or idx.shape[:3] != num.shape:
        raise ScopeInputError(f"{num_name} must be [B, H, N]={shape} and {idx_name} [B, H, N, L], got "
                              f"{tuple(num.shape)} / {tuple(idx.shape)}")


def check_list_values(kv_num_blocks: Tensor, kv_indices: Tensor) -> None:
    """ScopeInputError unless every count lies in [0, L] and query block qb lists distinct ids in [0, qb] (what
    the kernels assume: a repeated block would be attended twice). Broadcast lists ([1|B, 1|H, QB]) are fine.
    One host sync."""
    slots = torch.arange(kv_indices.shape[-1], device=kv_indices.device)
    listed = slots < kv_num_blocks[..., None]
    own = torch.arange(kv_indices.shape[-2], device=kv_indices.device)[:, None]  # each row's query block qb
    ids = kv_indices.long()
    ordered = torch.where(listed, ids, -1 - slots).sort(dim=-1).values  # the unlisted as distinct negatives
    flags = torch.stack(((kv_num_blocks < 0).any() | (kv_num_blocks > kv_indices.shape[-1]).any(),
                         (listed & ((ids < 0) | (ids > own))).any(),
                         ((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)).any())).tolist()
    if flags[0]:
        raise ScopeInputError(f"kv_num_blocks must lie in [0, L={kv_indices.shape[-1]}] (the lists' width)")
    if flags[1]:
        raise ScopeInputError("kv_indices must list key blocks in [0, qb] for query block qb (causal; entries past "
                              "kv_num_blocks are ignored)")
    if flags[2]:
        raise ScopeInputError("kv_indices repeats a key block within one query block's list: ids must be distinct")


# ----------------------------------------------------------------------------------------------
# torch.library registration: forward and backward ops, autograd, fake (meta) implementations


@torch.library.custom_op("scope::block_sparse_attention", mutates_args=())
def _block_sparse_attention_op(
    q: Tensor, k: Tensor, v: Tensor, kv_num_blocks: Tensor, kv_indices: Tensor, q_num_blocks: Tensor,
    q_indices: Tensor, block: int, scale: float,
) -> tuple[Tensor, Tensor]:
    from scope.kernels import block_sparse  # triton is imported only when used

    return block_sparse.forward(q, k, v, kv_num_blocks, kv_indices, block, scale, block_sparse.Tiles())


@_block_sparse_attention_op.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, kv_num_blocks: Tensor, kv_indices: Tensor, q_num_blocks: Tensor,
      q_indices: Tensor, block: int, scale: float) -> tuple[Tensor, Tensor]:
    return q.new_empty(*q.shape[:3], v.shape[-1]), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("scope::block_sparse_attention_backward", mutates_args=())
def _block_sparse_attention_backward_op(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, kv_num_blocks: Tensor,
    kv_indices: Tensor, q_num_blocks: Tensor, q_indices: Tensor, block: int, scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    from scope.kernels import block_sparse

    return block_sparse.backward(dout.contiguous(), q, k, v, out, lse, kv_num_blocks, kv_indices, q_num_blocks,
                                 q_indices, block, scale, block_sparse.Tiles())


@_block_sparse_attention_backward_op.register_fake
def _(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, kv_num_blocks: Tensor,
      kv_indices: Tensor, q_num_blocks: Tensor, q_indices: Tensor, block: int, scale: float
      ) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
    q, k, v, kv_num_blocks, kv_indices, q_num_blocks, q_indices, block, scale = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], kv_num_blocks, kv_indices, q_num_blocks, q_indices)
    ctx.block, ctx.scale = block, scale  # type: ignore[attr-defined]


def _backward(ctx: torch.autograd.function.FunctionCtx, dout: Tensor, _dlse: Tensor) -> tuple:
    q, k, v, out, lse, kv_num_blocks, kv_indices, q_num_blocks, q_indices = ctx.saved_tensors  # type: ignore[attr-defined]
    dq, dk, dv = torch.ops.scope.block_sparse_attention_backward(
        dout, q, k, v, out, lse, kv_num_blocks, kv_indices, q_num_blocks, q_indices,
        ctx.block, ctx.scale)  # type: ignore[attr-defined]
    return dq, dk, dv, None, None, None, None, None, None


torch.library.register_autograd("scope::block_sparse_attention", _backward, setup_context=_setup_context)
