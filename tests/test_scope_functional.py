"""scope.functional: scope_attention on every backend the CPU runs, and naive_scope_attention, against this
file's own float64 reference, written from SCOPE.md section 1 and the op's docstring (never scope's helpers):

    query i reads key j iff j <= i, j's block j // block is listed for i's block (the first kv_num_blocks
    entries of its list), and j lies in i's document (a maximal run of equal doc ids);
    logit = scale * q_i . k_j + beta * b_i(i - j) with
    b_i(D) = sum_k A_k cos(w_k D) + B_k sin(w_k D) - sum_k A_k + c D - gate_h * lambda * act((|D - D*_main| - W) / tau)
    (the slope only when on, the ramp only when given); out_i = softmax over the keys read, times v; rows that
    read nothing are 0. GQA: query head h reads kv head h // (H / H_kv).

Backends on the CPU: "flex" (eager FlexAttention, forward only: FlexAttention has no CPU backward), "torch"
(dense, forward and gradients) and "triton" (the kernels in Triton's interpreter, float32 and float16 at tiny
shapes; bf16 tl.dot is wrong in the 3.6 interpreter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from test_scope_block_sparse import ref_visibility

from scope import ScopeConfigError, ScopeInputError
from scope.functional import naive_scope_attention, scope_attention
from scope.pointer_mask import PointerMask, build_pointer_block_mask, sliding_window_block_mask
from scope.spectral_bias import BiasCoefficients, BiasTerms, Ramp

F64 = torch.float64
BATCH, HEADS, KV_HEADS, SEQ, BLOCK, DIM = 2, 4, 2, 64, 16, 16
FREQS = tuple(2 * math.pi / period for period in (500.0, 120.0, 40.0, 16.0))  # K = 4
TOL64: dict[str, Any] = {"rtol": 1e-10, "atol": 1e-10}  # float64 on both sides: short sums of O(1) terms
# float32 vs float64: every value is a short sum of O(1) terms, so relative errors stay near float32's
# epsilon (1.2e-7) times a few hundred; 2e-5 leaves margin and still catches a wrong block (O(1) per row)
REL32 = 2e-5
OWN_FACTOR, FLOOR16 = 4.0, 1e-3  # float16: allowed multiple of the same math's own error, plus a floor


# ----------------------------------------------------------------------------------------------------------
# the reference


def ref_visible(kv_num: torch.Tensor, kv_idx: torch.Tensor, seq_len: int, block: int,
                doc_ids: torch.Tensor | None) -> torch.Tensor:
    """bool [B', H', T, T] (B', H' those of the lists; doc ids [T] or [B, T] broadcast into them): the lists'
    causal token visibility (tests/test_scope_block_sparse.py's reference), cut to each query's document."""
    visible = ref_visibility(kv_num, kv_idx, seq_len, block)
    if doc_ids is None:
        return visible
    ids = doc_ids.reshape(-1, seq_len)
    segment = torch.zeros_like(ids)
    for t in range(1, seq_len):
        segment[:, t] = segment[:, t - 1] + (ids[:, t] != ids[:, t - 1]).long()
    return visible & (segment[:, None, :, None] == segment[:, None, None, :])


def ref_bias(p: Problem, b: int, h: int, dtype: torch.dtype) -> torch.Tensor:
    """beta * b_i(i - j) [T, T] for batch b, head h."""
    pos = torch.arange(SEQ, dtype=dtype)
    dist = pos[:, None] - pos[None, :]
    w = torch.tensor(FREQS, dtype=dtype)
    coef_a, coef_b = p.A[b, h].to(dtype), p.B[b, h].to(dtype)  # [T, K]
    phase = dist[..., None] * w  # [T, T, K]
    bias = (coef_a[:, None] * torch.cos(phase) + coef_b[:, None] * torch.sin(phase)).sum(-1) - coef_a.sum(-1)[:, None]
    if p.slope:
        bias = bias + p.c[b, h].to(dtype)[:, None] * dist
    if p.ramp is not None:
        act = F.softplus if p.ramp == "softplus" else F.relu
        x = ((dist - p.d_main[b, h].to(dtype)[:, None]).abs() - RAMP_WIDTH) / RAMP_TAU
        bias = bias - p.gate[h].to(dtype) * RAMP_LAMBDA * act(x)
    return p.beta * bias


def reference(p: Problem, dtype: torch.dtype = F64, prob_dtype: torch.dtype | None = None) -> torch.Tensor:
    """out [B, H, T, D] computed in ``dtype``; prob_dtype rounds the probabilities before P @ V."""
    visible = ref_visible(p.mask.kv_num_blocks, p.mask.kv_indices, SEQ, BLOCK, p.doc_ids)
    batch, heads_q = p.q.shape[:2]
    group = heads_q // p.k.shape[1]
    scale = DIM**-0.5 if p.scale is None else p.scale
    rows = []
    for b in range(batch):
        heads = []
        for h in range(heads_q):
            logits = scale * (p.q[b, h].to(dtype) @ p.k[b, h // group].to(dtype).T)
            if p.bias_impl != "none":
                logits = logits + ref_bias(p, b, h, dtype)
            seen = visible[b % visible.shape[0], h % visible.shape[1]]
            reads = seen.any(-1, keepdim=True)
            logits = torch.where(reads, logits.masked_fill(~seen, -math.inf), 0.0)
            probs = torch.softmax(logits, dim=-1) * reads
            if prob_dtype is not None:
                probs = probs.to(prob_dtype).to(dtype)
            heads.append(probs @ p.v[b, h // group].to(dtype))
        rows.append(torch.stack(heads))
    return torch.stack(rows)


# ----------------------------------------------------------------------------------------------------------
# problems

RAMP_LAMBDA, RAMP_WIDTH, RAMP_TAU = 0.5, 8.0, 2.0


@dataclass
class Problem:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    c: torch.Tensor
    d_main: torch.Tensor
    gate: torch.Tensor
    mask: PointerMask
    bias_impl: str = "score_mod"
    slope: bool = True
    ramp: str | None = None
    beta: float = 0.8
    scale: float | None = None
    doc_ids: torch.Tensor | None = None

    def terms(self) -> BiasTerms | None:
        if self.bias_impl == "none":
            return None
        coeffs = BiasCoefficients(self.A, self.B, self.c, self.d_main, None)  # type: ignore[arg-type]
        ramp = None if self.ramp is None else Ramp(self.gate, self.ramp, RAMP_LAMBDA, RAMP_WIDTH, RAMP_TAU)
        return BiasTerms(coeffs, FREQS, self.beta, self.slope, ramp)

    def bias_terms(self) -> BiasTerms:
        """terms() of a biased problem (bias_impl != "none"), which are never None."""
        terms = self.terms()
        assert terms is not None
        return terms

    def call(self, fn=scope_attention, **overrides) -> torch.Tensor:
        kwargs = dict(block=BLOCK, bias=self.terms(), bias_impl="score_mod" if self.bias_impl == "none" else
                      self.bias_impl, scale=self.scale, doc_ids=self.doc_ids)
        kwargs.update(overrides)
        return fn(self.q, self.k, self.v, self.mask, **kwargs)

    def leaves(self) -> list[torch.Tensor]:
        """The differentiable inputs the bias uses (q, k, v always)."""
        extra = [] if self.bias_impl == "none" else [self.A, self.B] + ([self.c] if self.slope else [])
        extra += [self.d_main, self.gate] if self.ramp is not None else []
        return [self.q, self.k, self.v, *extra]


def make_problem(seed: int, *, dtype: torch.dtype = F64, coeff_dtype: torch.dtype | None = None,
                 window: bool = False, docs: bool = False, batch: int = BATCH, heads: int = HEADS,
                 kv_heads: int = KV_HEADS, **options) -> Problem:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0, as_dtype: torch.dtype = dtype) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, dtype=F64) * scale).to(as_dtype)

    num_freqs, coeff_dtype = len(FREQS), coeff_dtype or dtype
    doc_ids = torch.tensor([0] * 21 + [1] * 30 + [2] * 13).repeat(batch, 1) if docs else None
    if docs:
        assert doc_ids is not None
        doc_ids[1, 40:] = 5  # the batch rows differ
    if window:
        mask = sliding_window_block_mask(SEQ, BLOCK, 2, doc_ids)
    else:
        d_star = torch.rand(batch, heads, SEQ // BLOCK, 2, generator=gen, dtype=F64) * 1.3 * SEQ
        mask = build_pointer_block_mask(d_star, randn(*d_star.shape, as_dtype=F64), SEQ, block=BLOCK, budget=1,
                                        local_blocks=1, global_blocks=1, max_radius=0, doc_ids=doc_ids,
                                        t_rep=torch.arange(SEQ // BLOCK, dtype=F64) * BLOCK - 1)
    return Problem(
        q=randn(batch, heads, SEQ, DIM), k=randn(batch, kv_heads, SEQ, DIM), v=randn(batch, kv_heads, SEQ, DIM),
        A=randn(batch, heads, SEQ, num_freqs, scale=0.4, as_dtype=coeff_dtype),
        B=randn(batch, heads, SEQ, num_freqs, scale=0.4, as_dtype=coeff_dtype),
        c=randn(batch, heads, SEQ, scale=0.03, as_dtype=coeff_dtype),
        d_main=(torch.rand(batch, heads, SEQ, generator=gen, dtype=F64) * SEQ).to(coeff_dtype),
        gate=(torch.rand(heads, generator=gen, dtype=F64) + 0.5).to(coeff_dtype),
        mask=mask, doc_ids=doc_ids, **options,
    )


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.detach().double() - ref.detach().double()).norm() / ref.detach().double().norm())


VARIANTS: dict[str, dict[str, Any]] = {  # bias settings: every term, each bias_impl, no bias
    "score_mod_all": dict(bias_impl="score_mod", slope=True, ramp="softplus"),
    "score_mod_relu_ramp": dict(bias_impl="score_mod", slope=False, ramp="relu", beta=1.3, scale=0.3),
    "qk_aug_slope": dict(bias_impl="qk_aug", slope=True),
    "qk_aug": dict(bias_impl="qk_aug", slope=False, beta=-0.6),
    "none": dict(bias_impl="none"),
}


def test_the_problems_are_sparse_and_biased() -> None:
    """The comparisons below mean something: lists skip blocks, documents cut them, the bias moves the output."""
    p = make_problem(0, docs=True, **VARIANTS["score_mod_all"])
    assert bool((p.mask.kv_num_blocks < torch.arange(1, SEQ // BLOCK + 1)).any())
    visible = ref_visible(p.mask.kv_num_blocks, p.mask.kv_indices, SEQ, BLOCK, p.doc_ids)
    assert not torch.equal(visible, ref_visible(p.mask.kv_num_blocks, p.mask.kv_indices, SEQ, BLOCK, None))
    assert rel(reference(replace(p, bias_impl="none")), reference(p)) > 0.05


# ----------------------------------------------------------------------------------------------------------
# float64: naive twin, torch path with gradients, eager flex


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("window", "docs"), [(False, False), (False, True), (True, True)])
def test_naive_matches_reference(variant: str, window: bool, docs: bool) -> None:
    p = make_problem(1, window=window, docs=docs, **VARIANTS[variant])
    torch.testing.assert_close(p.call(naive_scope_attention), reference(p), **TOL64)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("docs", [False, True])
def test_torch_backend_forward_and_gradients_match_reference(variant: str, docs: bool) -> None:
    p = make_problem(2, docs=docs, **VARIANTS[variant])
    leaves = [t.requires_grad_(True) for t in p.leaves()]
    dout = torch.randn(BATCH, HEADS, SEQ, DIM, dtype=F64, generator=torch.Generator().manual_seed(3))
    out = p.call(backend="torch")
    ref = reference(p)
    torch.testing.assert_close(out, ref, **TOL64)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_grads = torch.autograd.grad(ref, leaves, dout)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, **TOL64)


@settings(max_examples=12)
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 3), heads=st.sampled_from([(4, 2), (4, 4), (6, 2), (3, 1)]),
       variant=st.sampled_from(list(VARIANTS)), layout=st.sampled_from(["pointers", "window", "docs"]),
       fn=st.sampled_from(["torch", "naive"]))
def test_torch_and_naive_match_reference_on_drawn_problems(seed: int, batch: int, heads: tuple[int, int], variant: str,
                                                            layout: str, fn: str) -> None:
    """Drawn batches, group sizes (G = 1, 2, 3), pointer lists, windows and documents, every bias variant: the
    torch backend and the naive twin against the reference (documents need two batch rows: the second differs)."""
    docs = layout == "docs" and batch >= 2
    p = make_problem(seed, window=layout == "window", docs=docs, batch=batch, heads=heads[0], kv_heads=heads[1],
                     **VARIANTS[variant])
    out = p.call(naive_scope_attention) if fn == "naive" else p.call(backend="torch")
    torch.testing.assert_close(out, reference(p), **TOL64)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("window", "docs"), [(False, False), (False, True), (True, False)])
def test_flex_backend_matches_reference(variant: str, window: bool, docs: bool) -> None:
    p = make_problem(4, window=window, docs=docs, **VARIANTS[variant])
    with torch.no_grad():
        torch.testing.assert_close(p.call(backend="flex"), reference(p), **TOL64)


# ----------------------------------------------------------------------------------------------------------
# the Triton kernels (interpreter)


@pytest.mark.parametrize("variant", ["qk_aug_slope", "none"])
def test_triton_float32_forward_and_gradients_match_reference(variant: str) -> None:
    p32 = make_problem(5, dtype=torch.float32, **VARIANTS[variant])
    leaves = [t.requires_grad_(True) for t in p32.leaves()]
    dout = torch.randn(BATCH, HEADS, SEQ, DIM, generator=torch.Generator().manual_seed(6))
    out = p32.call(backend="triton")
    grads = torch.autograd.grad(out, leaves, dout)
    leaves64 = [t.detach().double().requires_grad_(True) for t in leaves]
    p64 = make_problem(5, dtype=torch.float32, **VARIANTS[variant])
    for name, t in zip(("q", "k", "v", "A", "B", "c"), leaves64, strict=False):
        setattr(p64, name, t)
    ref = reference(p64)
    ref_grads = torch.autograd.grad(ref, leaves64, dout.double())
    assert rel(out, ref) < REL32
    for name, g, r in zip(("q", "k", "v", "A", "B", "c"), grads, ref_grads, strict=False):
        assert rel(g, r) < REL32, name


def own_float16_qk_aug(p: Problem) -> torch.Tensor:
    """The same math at the kernel's precision (SCOPE.md's qk_aug, no slope): features appended in float32 and
    rounded to float16 like q and k (key j: [cos w j, sin w j]; query i: beta / scale * [A cos w i + B sin w i,
    A sin w i - B cos w i]), logits and softmax in float32, probabilities rounded to float16 before P @ V."""
    pos = torch.arange(SEQ, dtype=torch.float32)
    phase = pos[:, None] * torch.tensor(FREQS, dtype=torch.float32)
    cos, sin = torch.cos(phase), torch.sin(phase)
    scale = DIM**-0.5
    coef_a, coef_b = p.A.float(), p.B.float()
    q_feat = (p.beta / scale * torch.cat([coef_a * cos + coef_b * sin, coef_a * sin - coef_b * cos], -1)).half()
    k_feat = torch.cat([cos, sin], -1).half().expand(BATCH, KV_HEADS, SEQ, -1)
    augmented = replace(p, q=torch.cat([p.q, q_feat], -1), k=torch.cat([p.k, k_feat], -1), bias_impl="none",
                        scale=scale)
    return reference(augmented, torch.float32, prob_dtype=torch.float16).half()


@pytest.mark.parametrize("variant", ["qk_aug", "none"])
def test_triton_float16_forward_matches_reference(variant: str) -> None:
    """float16 inputs, float32 bias coefficients (as the layer makes them): within OWN_FACTOR x the error of
    the same math at the kernel's precision (own_float16_qk_aug) against float64, plus a floor."""
    p = make_problem(7, dtype=torch.float16, coeff_dtype=torch.float32, **VARIANTS[variant])
    out = p.call(backend="triton")
    assert out.dtype == torch.float16
    exact = reference(p)
    own = own_float16_qk_aug(p) if p.bias_impl == "qk_aug" else reference(p, torch.float32, torch.float16).half()
    own_err = float((own.double() - exact).abs().max())
    assert float((out.double() - exact).abs().max()) <= OWN_FACTOR * own_err + FLOOR16


# ----------------------------------------------------------------------------------------------------------
# errors


def _bad_ramps(p: Problem) -> list[tuple[Ramp, str]]:
    gate = p.gate
    return [(Ramp(gate, "bogus", RAMP_LAMBDA, RAMP_WIDTH, RAMP_TAU), "bias.ramp.kind"),
            (Ramp(gate, "relu", RAMP_LAMBDA, RAMP_WIDTH, 0.0), "bias.ramp.tau"),
            (Ramp(gate, "relu", RAMP_LAMBDA, math.nan, RAMP_TAU), "bias.ramp.width"),
            (Ramp(gate, "relu", 1e300, RAMP_WIDTH, RAMP_TAU), "bias.ramp.strength"),
            (Ramp(gate[:1], "relu", RAMP_LAMBDA, RAMP_WIDTH, RAMP_TAU), "bias.ramp.gate")]


def _edited(mask: PointerMask, edit) -> PointerMask:
    """mask with its lists replaced by edit(kv_indices, kv_num_blocks) (-> kv_indices, or both)."""
    edited = edit(mask.kv_indices.clone(), mask.kv_num_blocks.clone())
    indices, counts = edited if isinstance(edited, tuple) else (edited, mask.kv_num_blocks)
    return replace(mask, kv_indices=indices, kv_num_blocks=counts)


def _repeat_a_block(indices: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    indices[0, 0, 2, :2] = 2  # query block 2 lists block 2 twice
    counts[0, 0, 2] = 2
    return indices, counts


def _list_the_future(indices: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    indices[0, 0, 1, 0] = 3  # query block 1 lists block 3
    counts[0, 0, 1] = max(1, int(counts[0, 0, 1]))
    return indices, counts


def _count_past_the_width(indices: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    counts[0, 0, 0] = indices.shape[-1] + 1
    return indices, counts


def _bad_calls() -> tuple[list, list]:
    """(call(fn), error, match): argument rules (both functions), and backend rules (scope_attention's)."""
    p = make_problem(8, **VARIANTS["score_mod_all"])
    other = make_problem(8, **VARIANTS["qk_aug"])
    window = make_problem(8, window=True).mask
    no_docs = torch.zeros(SEQ, dtype=torch.long)
    not_a_bool: Any = "no"  # the wrong type on purpose: the check under test
    arguments = [
        (lambda fn: p.call(fn, bias_impl="qk_aug"), ScopeConfigError, "cannot express the ramp"),
        (lambda fn: p.call(fn, bias_impl="dense"), ScopeInputError, "bias_impl"),
        (lambda fn: p.call(fn, scale=math.inf), ScopeInputError, "scale"),
        (lambda fn: p.call(fn, block=12), ScopeInputError, "multiple of block"),
        (lambda fn: p.call(fn, qk_align=0), ScopeInputError, "qk_align"),
        (lambda fn: fn(p.q, p.k[:, :, :32], p.v, p.mask, block=BLOCK), ScopeInputError, "k must be"),
        (lambda fn: fn(p.q, p.k.float(), p.v, p.mask, block=BLOCK), ScopeInputError, "dtype"),
        (lambda fn: fn(p.q[:, :3], p.k, p.v, window, block=BLOCK), ScopeInputError, "multiple of k's"),
        (lambda fn: fn(p.q, p.k, p.v, p.mask.kv_indices, block=BLOCK), ScopeInputError, "PointerMask"),
        (lambda fn: fn(p.q[:, :, :32], p.k[:, :, :32], p.v[:, :, :32], p.mask, block=BLOCK), ScopeInputError,
         "mask lists"),
        (lambda fn: p.call(fn, bias=other.bias_terms()._replace(freqs=FREQS[:3])), ScopeInputError, "bias.coeffs.A"),
        (lambda fn: p.call(fn, doc_ids=torch.zeros(SEQ + 1, dtype=torch.long)), ScopeInputError, "doc_ids"),
        # finite in float64, not in float32 (where the scores and the bias are computed)
        (lambda fn: p.call(fn, scale=1e300), ScopeInputError, "scale=1e.300 overflows to inf in float32"),
        (lambda fn: p.call(fn, scale=1e-320), ScopeInputError, "scale=.* underflows to 0 in float32"),
        (lambda fn: p.call(fn, bias=p.bias_terms()._replace(beta=1e300)), ScopeInputError, "bias.beta"),
        (lambda fn: p.call(fn, bias=p.bias_terms()._replace(freqs=(1e300, *FREQS[1:]))), ScopeInputError, "bias.freqs"),
        (lambda fn: p.call(fn, bias=p.bias_terms()._replace(slope=not_a_bool)), ScopeInputError,
         "bias.slope must be a bool"),
        *[(lambda fn, ramp=ramp: p.call(fn, bias=p.bias_terms()._replace(ramp=ramp)), ScopeInputError, words)
          for ramp, words in _bad_ramps(p)],
        *[(lambda fn, edit=edit: replace(p, mask=_edited(p.mask, edit)).call(fn), ScopeInputError, words)
          for edit, words in ((lambda i, n: i.float(), "int32/int64"), (_repeat_a_block, "repeats a key block"),
                              (_list_the_future, r"\[0, qb\]"), (_count_past_the_width, "kv_num_blocks"))],
    ]
    backends = [
        (lambda fn: p.call(fn, backend="cuda"), ScopeInputError, "backend='cuda' must be one of"),
        (lambda fn: p.call(fn, backend="triton"), ScopeInputError, "score_mod' runs in FlexAttention"),
        (lambda fn: other.call(fn, backend="triton", doc_ids=no_docs), ScopeInputError, "document masks"),
    ]
    return arguments, backends


ARGUMENT_ERRORS, BACKEND_ERRORS = _bad_calls()


@pytest.mark.parametrize(("call", "error", "match"), ARGUMENT_ERRORS)
@pytest.mark.parametrize("fn", [scope_attention, naive_scope_attention])
def test_bad_arguments_raise_typed_errors(fn, call, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        call(fn)


def test_the_lists_check_can_be_left_to_the_builder() -> None:
    """check_lists=False skips the value check (the layer's own masks): a repeated block then counts once on
    the torch path, as the twin's visibility has it."""
    p = make_problem(8, **VARIANTS["score_mod_all"])
    repeated = _edited(p.mask, _repeat_a_block)
    with pytest.raises(ScopeInputError, match="repeats"):
        replace(p, mask=repeated).call(naive_scope_attention)
    with pytest.raises(ScopeInputError, match="check_lists must be a bool"):
        p.call(scope_attention, check_lists="no")
    out = replace(p, mask=repeated).call(naive_scope_attention, check_lists=False)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(("call", "error", "match"), BACKEND_ERRORS)
def test_backends_refuse_what_they_cannot_run(call, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        call(scope_attention)
