"""SCOPE attention as a function: the op under ScopeAttention, and its dense twin.

``scope_attention`` is the whole SCOPE attention of one prefill given projected, rotated inputs: attention
over the key blocks a pointer mask lists, with the spectral bias. The projections, RoPE, the pointer head and
the mask building stay in the layer (scope.scope_attention.ScopeAttention, which calls this op).
``naive_scope_attention`` computes the same function densely.

Layout and causal alignment (both functions). q [B, H, T, Dqk] and k [B, H_kv, T, Dqk] rotated, v
[B, H_kv, T, Dv]; query head h reads kv head h // (H / H_kv). Queries and keys share positions 0..T-1
(a prefill): query i reads key j iff j <= i, j's block j // block is listed for i's block,
mask.kv_indices[b, h, i // block, :mask.kv_num_blocks[b, h, i // block]] (lists of size 1 in B or H
broadcast), and, with doc_ids [B|1, T] or [T], j lies in i's document (a maximal run of equal ids). The logit
is scale * q_i . k_j + beta * b_i(i - j), b from ``bias`` (``BiasTerms``, SCOPE.md section 1; no bias when
None). -> out [B, H, T, Dv] in q's dtype: the softmax over the keys read, times v; rows that read nothing
are 0.

Non-finite inputs (nsa.nonfinite): the rows that read a non-finite value (their q_i, their bias
coefficients, or a k_j / v_j they read) are NaN; every other row, and every gradient that reaches it, is
bitwise what it would be without that value.

Backends (nsa.dispatch.choose_scope_attention_backend, which logs its reason once): "flex" (FlexAttention,
the bias as score_mod or as qk_aug features; outside torch.compile through a token-level mask_mod, since
eager flex ignores block lists), "triton" (scope.block_sparse_attention's kernels, qk_aug features; no
score_mod, no documents), "torch" (this module's dense math: the CPU training path, FlexAttention having no
CPU backward), "auto".
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from nsa.dispatch import BackendChoice, choose_scope_attention_backend
from nsa.nonfinite import finite_or_zero, nonfinite_rows, poison_rows
from nsa.validation import FLOAT_DTYPES, check_real, describe
from scope.block_sparse_attention import check_list_values, dense_block_sparse, finite_inputs, kernel_block_sparse
from scope.errors import ScopeConfigError, ScopeInputError
from scope.pointer_mask import PointerMask, document_starts, exact_mask_mod
from scope.spectral_bias import RAMP_KINDS, BiasTerms, Ramp, bias_score_mod, qk_augment, qk_width

BIAS_IMPLS = ("score_mod", "qk_aug")


def scope_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: PointerMask, *, block: int, bias: BiasTerms | None = None,
    bias_impl: str = "score_mod", scale: float | None = None, qk_align: int = 16, doc_ids: Tensor | None = None,
    backend: str = "auto", check_lists: bool = True,
) -> Tensor:
    """SCOPE attention over the pointer mask with the spectral bias (layout, alignment and the non-finite rule:
    the module docstring). -> out [B, H, T, Dv].

    mask: a PointerMask (build_pointer_block_mask / sliding_window_block_mask over T tokens; its BlockMask
    drives compiled FlexAttention, and must carry the q-side lists for a Flex backward). bias_impl: how the
    bias reaches the kernel, "score_mod" (FlexAttention, every term) or "qk_aug" (features appended to q and k,
    zero-padded to a multiple of ``qk_align``; no ramp: ScopeConfigError). scale defaults to Dqk ** -0.5.
    backend: "auto", "flex", "triton" or "torch" (module docstring). check_lists: check the mask lists' values
    (scope.block_sparse_attention.check_list_values; one host sync); False for a mask the builders made (the
    layer's).
    """
    _check_call(q, k, v, mask, block, bias, bias_impl, scale, qk_align, check_lists)
    choice = scope_attention_backend(q, k, v, block=block, bias=bias, bias_impl=bias_impl, qk_align=qk_align,
                                     doc_ids=doc_ids, backend=backend)
    if choice.name == "torch":
        return naive_scope_attention(q, k, v, mask, block=block, bias=bias, bias_impl=bias_impl, scale=scale,
                                     doc_ids=doc_ids, check_lists=False)  # checked above
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q, k, v, bias, poisoned = _finite_call(q, k, v, mask, block, bias, document_starts(doc_ids, q.shape[2], q.shape[0]))
    score_mod = None
    if bias is not None and bias_impl == "score_mod":
        score_mod = bias_score_mod(bias)
    elif bias is not None:
        q, k, v, scale = qk_augment(q, k, v, bias, scale, align=qk_align)
    if choice.name == "triton":
        lists = (q.shape[0], q.shape[1], q.shape[2] // block)  # lists of size 1 in B or H broadcast
        out = kernel_block_sparse(q, k, v, mask.kv_num_blocks.expand(lists), mask.kv_indices.expand(*lists, -1),
                                  block, scale)
    else:
        compiled = torch.compiler.is_compiling()
        block_mask = mask.block_mask if compiled else _eager_block_mask(mask, block, q.shape[2], doc_ids)
        out = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                             enable_gqa=q.shape[1] != k.shape[1])
        assert isinstance(out, Tensor)
    return poison_rows(out, poisoned)


def naive_scope_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: PointerMask, *, block: int, bias: BiasTerms | None = None,
    bias_impl: str = "score_mod", scale: float | None = None, qk_align: int = 16, doc_ids: Tensor | None = None,
    backend: str = "torch", check_lists: bool = True,
) -> Tensor:
    """Dense twin of scope_attention: the same arguments, checks, function and non-finite rule, as one
    [B, H, T, T] masked softmax in float32 (float64 for float64 inputs; the bias added densely whatever
    bias_impl says; qk_align and backend are accepted and unused). O(B H T^2) memory: tests, and
    scope_attention's "torch" path."""
    _check_call(q, k, v, mask, block, bias, bias_impl, scale, qk_align, check_lists)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    doc_start = document_starts(doc_ids, q.shape[2], q.shape[0])
    q, k, v, bias, poisoned = _finite_call(q, k, v, mask, block, bias, doc_start)
    score_mod = None if bias is None else bias_score_mod(bias)  # one [B, H, T, T] term at a time, never [.., K]
    out = dense_block_sparse(q, k, v, mask.kv_num_blocks, mask.kv_indices, block, scale, score_mod=score_mod,
                             doc_start=doc_start)
    return poison_rows(out, poisoned)


def scope_attention_backend(
    q: Tensor, k: Tensor, v: Tensor, *, block: int, bias: BiasTerms | None = None, bias_impl: str = "score_mod",
    qk_align: int = 16, doc_ids: Tensor | None = None, backend: str = "auto",
) -> BackendChoice:
    """The path scope_attention takes for these arguments (the mask does not enter; checked first):
    nsa.dispatch's SCOPE policy, given the q.k width the kernel would see, whether gradients are needed,
    score_mod and documents. A layer asks before building its mask (FlexAttention's backward needs the
    q-side lists)."""
    check_arguments(q, k, v, block, bias, bias_impl, None, qk_align)
    width = q.shape[-1]
    tensors = [q, k, v]
    if bias is not None:
        if bias_impl == "qk_aug":
            width = qk_width(width, len(bias.freqs), bias.slope, qk_align)
        tensors += [bias.coeffs.A, bias.coeffs.B, bias.coeffs.c, bias.coeffs.d_star_main]
        tensors += [] if bias.ramp is None else [bias.ramp.gate]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return choose_scope_attention_backend(
        backend, q, qk_width=width, block=block, score_mod=bias is not None and bias_impl == "score_mod",
        documents=doc_ids is not None, needs_grad=needs_grad, error=ScopeInputError)


def _finite_call(q: Tensor, k: Tensor, v: Tensor, mask: PointerMask, block: int, bias: BiasTerms | None,
                 doc_start: Tensor | None) -> tuple[Tensor, Tensor, Tensor, BiasTerms | None, Tensor]:
    """Inputs with every non-finite entry replaced by 0, and bool [B, H, T]: the rows that read one (their q
    row, the bias coefficients they use, or a k / v row they see)."""
    q, k, v, poisoned = finite_inputs(q, k, v, mask.kv_num_blocks, mask.kv_indices, block, doc_start)
    if bias is None:
        return q, k, v, None, poisoned
    bias, bias_rows = finite_bias(bias)
    return q, k, v, bias, poisoned | bias_rows


def finite_bias(bias: BiasTerms) -> tuple[BiasTerms, Tensor]:
    """bias with every non-finite coefficient replaced by 0, and bool [B, H, T]: the rows whose coefficients (those
    the bias uses: A and B, c with a slope, d_star_main with a ramp) held one."""
    coeffs = bias.coeffs
    rows = nonfinite_rows(coeffs.A) | nonfinite_rows(coeffs.B)
    if bias.slope:
        rows = rows | ~torch.isfinite(coeffs.c)
    if bias.ramp is not None:
        rows = rows | ~torch.isfinite(coeffs.d_star_main)
    finite = coeffs._replace(A=finite_or_zero(coeffs.A), B=finite_or_zero(coeffs.B), c=finite_or_zero(coeffs.c),
                             d_star_main=finite_or_zero(coeffs.d_star_main))
    return bias._replace(coeffs=finite), rows


def _eager_block_mask(mask: PointerMask, block: int, seq_len: int, doc_ids: Tensor | None) -> BlockMask:
    """A BlockMask whose mask_mod carries the block lists at token level (eager flex ignores the lists).
    Keeps the builder's q-side lists when it made them: the backward refuses a mask without them."""
    exact = exact_mask_mod(mask, block, doc_ids)
    built = mask.block_mask
    seq_lengths = (seq_len, seq_len)
    if built.q_indices is not None:
        return BlockMask(
            seq_lengths=seq_lengths, kv_num_blocks=built.kv_num_blocks, kv_indices=built.kv_indices,
            full_kv_num_blocks=built.full_kv_num_blocks, full_kv_indices=built.full_kv_indices,
            q_num_blocks=built.q_num_blocks, q_indices=built.q_indices, full_q_num_blocks=built.full_q_num_blocks,
            full_q_indices=built.full_q_indices, BLOCK_SIZE=(block, block), mask_mod=exact,
        )
    return BlockMask.from_kv_blocks(
        mask.kv_num_blocks, mask.kv_indices.clamp_min(0), BLOCK_SIZE=block,
        mask_mod=exact, seq_lengths=seq_lengths, compute_q_blocks=False,
    )


def _check_call(q: Tensor, k: Tensor, v: Tensor, mask: PointerMask, block: int, bias: BiasTerms | None,
                bias_impl: str, scale: float | None, qk_align: int, check_lists: bool) -> None:
    """ScopeInputError (ScopeConfigError for a ramp under qk_aug) naming the argument; no tensor data read
    unless check_lists."""
    check_arguments(q, k, v, block, bias, bias_impl, scale, qk_align)
    check_mask(mask, q.shape[0], q.shape[1], q.shape[2] // block, q.device, values=check_lists)


def check_arguments(q: Tensor, k: Tensor, v: Tensor, block: int, bias: BiasTerms | None, bias_impl: str,
                     scale: float | None, qk_align: int) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4 or t.dtype not in FLOAT_DTYPES:
            seen = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
            raise ScopeInputError(f"{name} must be a 4-d floating tensor [B, heads, T, D], got {seen}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ScopeInputError(f"{name} must match q's dtype and device ({q.dtype}, {q.device}), "
                                  f"got {t.dtype}, {t.device}")
    bsz, heads, seq_len, dqk = q.shape
    if k.shape[0] != bsz or k.shape[2] != seq_len or k.shape[3] != dqk or v.shape[:3] != k.shape[:3]:
        raise ScopeInputError(f"k must be [B={bsz}, H_kv, T={seq_len}, Dqk={dqk}] and v [B, H_kv, T, Dv] with "
                              f"k's first three sizes, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[1] == 0 or heads % k.shape[1] != 0:
        raise ScopeInputError(f"q's heads ({heads}) must be a multiple of k's heads ({k.shape[1]})")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ScopeInputError(f"block must be an int >= 1, got {block!r}")
    if seq_len == 0 or seq_len % block != 0:
        raise ScopeInputError(f"the sequence length T={seq_len} must be a positive multiple of block={block}")
    if bias_impl not in BIAS_IMPLS:
        raise ScopeInputError(f"bias_impl={bias_impl!r} must be one of {BIAS_IMPLS}")
    if bias is not None:
        _check_bias(bias, (bsz, heads, seq_len), q.device)
        if bias_impl == "qk_aug" and bias.ramp is not None:
            raise ScopeConfigError("bias_impl='qk_aug' cannot express the ramp (it is not a dot product): use "
                                   "bias_impl='score_mod', or terms without a ramp")
    if scale is not None:
        check_real("scale", scale, error=ScopeInputError, above=0.0, float32=True)
    if isinstance(qk_align, bool) or not isinstance(qk_align, int) or qk_align < 1:
        raise ScopeInputError(f"qk_align must be an int >= 1, got {qk_align!r}")


def check_mask(mask: PointerMask, bsz: int, heads: int, num_blocks: int, device: torch.device, *,
               values: bool) -> None:
    """The mask's lists: shapes (B and H may be 1: broadcast), integer dtypes, device; with ``values`` also
    their values (check_list_values: one host sync)."""
    if not isinstance(mask, PointerMask):
        raise ScopeInputError(f"mask must be a PointerMask, got {type(mask).__name__}")
    if not isinstance(values, bool):
        raise ScopeInputError(f"check_lists must be a bool, got {values!r}")
    num, idx = mask.kv_num_blocks, mask.kv_indices
    if not all(isinstance(t, Tensor) and t.dtype in (torch.int32, torch.int64) for t in (num, idx)):
        raise ScopeInputError(f"mask lists must be int32/int64 tensors, got {describe(num)} / {describe(idx)}")
    if (num.dim() != 3 or num.shape[0] not in (1, bsz) or num.shape[1] not in (1, heads) or num.shape[2] != num_blocks
            or idx.dim() != 4 or idx.shape[:3] != num.shape):
        raise ScopeInputError(f"mask lists must be kv_num_blocks [B|1, H|1, QB] and kv_indices [B|1, H|1, QB, L] "
                              f"with B={bsz}, H={heads}, QB={num_blocks}, got {tuple(num.shape)} / {tuple(idx.shape)}")
    if num.device != device or idx.device != device:
        raise ScopeInputError(f"mask lists must be on {device}, got {num.device} / {idx.device}")
    if values:
        check_list_values(num, idx)


def _check_bias(bias: BiasTerms, rows: tuple[int, int, int], device: torch.device) -> None:
    if not isinstance(bias, BiasTerms):
        raise ScopeInputError(f"bias must be BiasTerms or None, got {type(bias).__name__}")
    num_freqs = len(bias.freqs)
    coeffs = bias.coeffs
    for name, t, shape in (("A", coeffs.A, (*rows, num_freqs)), ("B", coeffs.B, (*rows, num_freqs)),
                           ("c", coeffs.c, rows), ("d_star_main", coeffs.d_star_main, rows)):
        if tuple(t.shape) != shape or not t.is_floating_point() or t.device != device:
            raise ScopeInputError(f"bias.coeffs.{name} must be a floating tensor of shape {shape} (K = len(freqs) "
                                  f"= {num_freqs}) on {device}, got {tuple(t.shape)} {t.dtype} on {t.device}")
    if num_freqs == 0:
        raise ScopeInputError("bias.freqs must hold K >= 1 frequencies, got none")
    for w in bias.freqs:  # the bias is computed in float32 (float64 for float64 q)
        check_real("bias.freqs entry", w, error=ScopeInputError, above=0.0, float32=True)
    check_real("bias.beta", bias.beta, error=ScopeInputError, float32=True)
    if not isinstance(bias.slope, bool):
        raise ScopeInputError(f"bias.slope must be a bool, got {bias.slope!r}")
    if bias.ramp is not None:
        _check_ramp(bias.ramp, rows[1], device)


def _check_ramp(ramp: Ramp, heads: int, device: torch.device) -> None:
    """The trough's settings, as ScopeConfig checks them for the layer (gate_kind, ramp_lambda, ramp_width, tau)."""
    if not isinstance(ramp, Ramp):
        raise ScopeInputError(f"bias.ramp must be a scope.spectral_bias.Ramp or None, got {type(ramp).__name__}")
    if not isinstance(ramp.gate, Tensor) or tuple(ramp.gate.shape) != (heads,) or not ramp.gate.is_floating_point() \
            or ramp.gate.device != device:
        raise ScopeInputError(f"bias.ramp.gate must be a floating tensor [H={heads}] on {device}, got "
                              f"{describe(ramp.gate)}")
    if ramp.kind not in RAMP_KINDS:
        raise ScopeInputError(f"bias.ramp.kind={ramp.kind!r} must be one of {RAMP_KINDS}")
    check_real("bias.ramp.strength", ramp.strength, error=ScopeInputError, at_least=0.0, float32=True)
    check_real("bias.ramp.width", ramp.width, error=ScopeInputError, at_least=0.0, float32=True)
    check_real("bias.ramp.tau", ramp.tau, error=ScopeInputError, above=0.0, float32=True)
