"""SCOPE.md section 1 (spectral bias): the dense float64 reference below is written from SCOPE.md in
plain broadcasting (it never calls scope's helpers for the math); score_mod, qk_augment and bias must
agree with it. Also: zero bias at init, absolute D*, shift theorem, regularisers on hand-built cases,
config errors, gradcheck."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import F64, randn
from torch.autograd import gradcheck
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from scope import (
    BiasCoefficients,
    PointerParams,
    ScopeConfig,
    ScopeConfigError,
    ScopeInputError,
    SpectralBias,
    frequencies,
)

# eager FlexAttention on CPU (the math path) is what these float64 checks want
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

# float64 comparisons: every quantity is a sum of O(M K) bounded terms of O(1) magnitude (phases
# up to ~1e3 rad lose ~1e-13 in cos), so 1e-9 is orders of magnitude above rounding and far below a bug.
TOL: dict[str, Any] = {"rtol": 1e-9, "atol": 1e-9}

SMALL: dict[str, Any] = {
    "num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "num_pointers": 3, "num_freqs": 6,
    "l_max": 4096.0, "min_period": 16.0, "delta_max": 96.0, "mlp_hidden": 8, "beta": 0.7,
}
ALL_TERMS = {"c_scale": 0.05, "ramp_lambda": 0.3, "ramp_width": 16.0, "ramp_tau": 4.0}
VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "slope": {"c_scale": 0.05},
    "ramp_softplus": {**ALL_TERMS, "gate_kind": "softplus"},
    "ramp_relu": {**ALL_TERMS, "gate_kind": "relu"},
}


# ----------------------------------------------------------------------------- reference (SCOPE.md)


def ref_freqs(num_freqs: int, l_max: float, min_period: float) -> torch.Tensor:
    """w_k = 2 pi / period_k, periods geometric from l_max down to min_period."""
    if num_freqs == 1:
        return torch.tensor([2 * math.pi / l_max], dtype=F64)
    k = torch.arange(num_freqs, dtype=F64)
    periods = l_max * (min_period / l_max) ** (k / (num_freqs - 1))
    return 2 * math.pi / periods


def ref_amplitudes(mu: torch.Tensor, sigma: torch.Tensor, gain: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a_mk = gain_h * exp(-(log w_k - mu_m)^2 / (2 sigma_m^2)) normalised over k: [B, H, T, M, K]."""
    g = torch.exp(-((torch.log(w) - mu[..., None]) ** 2) / (2 * sigma[..., None] ** 2))
    return gain.view(1, -1, 1, 1, 1) * g / g.sum(-1, keepdim=True)


def ref_bias(p: PointerParams, gain: torch.Tensor, cfg: ScopeConfig, delta: torch.Tensor) -> torch.Tensor:
    """b_i(D) [B, H, T, N] straight from SCOPE.md (no shift theorem):
    sum_m pi_m sum_k a_mk cos(w_k (D - D*_m)) - (same at D = 0) + c D - lambda act((|D - D*_main| - W) / tau).
    delta: [N] or 4-d broadcastable to [B, H, T, N]."""
    d_star, mu, sigma, pi, c = (t.to(F64) for t in (p.d_star, p.mu, p.sigma, p.pi, p.slope))
    w = ref_freqs(cfg.num_freqs, cfg.l_max, cfg.min_period)
    a = ref_amplitudes(mu, sigma, gain.to(F64), w)  # [B, H, T, M, K]
    dd = delta.to(F64)
    dd = dd.view(1, 1, 1, -1) if dd.dim() == 1 else dd
    dd = dd.expand(*d_star.shape[:3], dd.shape[-1])  # [B, H, T, N]
    arg = w * (dd[..., :, None, None] - d_star[..., None, :, None])  # [B, H, T, N, M, K]
    spec = (pi[..., None, :, None] * a[..., None, :, :] * torch.cos(arg)).sum((-1, -2))
    spec0 = (pi[..., :, None] * a * torch.cos(w * (0.0 - d_star[..., :, None]))).sum((-1, -2))
    b = spec - spec0[..., None] + c[..., None] * dd
    if cfg.gate_kind != "none" and cfg.ramp_lambda > 0:
        main = torch.gather(d_star, -1, pi.argmax(-1, keepdim=True))  # [B, H, T, 1]
        x = ((dd - main).abs() - cfg.ramp_width) / cfg.ramp_tau
        act = torch.log1p(torch.exp(x)) if cfg.gate_kind == "softplus" else torch.clamp(x, min=0)
        b = b - cfg.ramp_lambda * act
    return b


def ref_attention(q, k, v, bias, scale):
    """Dense causal softmax(q k^T scale + bias) v in float64; GQA: query head h reads kv head h // G.
    bias [B, H, T, S] already includes beta. Returns (out, probs)."""
    g = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    logits = q @ kr.transpose(-1, -2) * scale + bias
    t, s = q.shape[2], k.shape[2]
    future = torch.arange(s)[None, :] > torch.arange(t)[:, None] + (s - t)
    probs = torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1)
    return probs @ vr, probs


def delta_matrix(t: int, s: int, q_start: int = 0, kv_start: int = 0) -> torch.Tensor:
    """[1, 1, T, S] distances i - j at absolute positions."""
    i = torch.arange(q_start, q_start + t, dtype=F64)[:, None]
    j = torch.arange(kv_start, kv_start + s, dtype=F64)[None, :]
    return (i - j)[None, None]


# ----------------------------------------------------------------------------- helpers


def make_model(dtype=F64, seed=0, **overrides) -> SpectralBias:
    """A SpectralBias with non-trivial weights (gain != 0, spread outputs) for the given config."""
    cfg = ScopeConfig(**{**SMALL, **overrides})
    torch.manual_seed(seed)
    model = SpectralBias(cfg).to(dtype)
    head = model.pointer_head
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        head.gain.copy_(torch.randn(cfg.num_heads, generator=gen, dtype=F64).to(dtype))
        head.w2.add_(torch.randn(head.w2.shape, generator=gen, dtype=F64).to(dtype) * 0.7)
        if model.ramp_gate is not None:
            model.ramp_gate.fill_(1.0)  # the references apply the full ramp
    return model


def qkv(cfg: ScopeConfig, t: int, seed: int, dtype=F64, s: int | None = None):
    s = t if s is None else s
    q = randn(1, cfg.num_heads, t, cfg.head_dim, seed=seed, dtype=dtype)
    k = randn(1, cfg.num_kv_heads, s, cfg.head_dim, seed=seed + 1, dtype=dtype)
    v = randn(1, cfg.num_kv_heads, s, cfg.head_dim, seed=seed + 2, dtype=dtype)
    return q, k, v


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


# ----------------------------------------------------------------------------- (1) bias vs reference


def test_frequencies_are_log_spaced_between_the_periods():
    w = frequencies(6, 4096.0, 16.0)
    assert w.dtype == F64
    torch.testing.assert_close(w, ref_freqs(6, 4096.0, 16.0), rtol=1e-13, atol=0)
    assert frequencies(1, 100.0, 10.0).tolist() == pytest.approx([2 * math.pi / 100.0])
    with pytest.raises(ScopeInputError, match="l_max"):
        frequencies(4, 10.0, 10.0)
    for args, kwargs, words in (((3, 64.0, 1e-310), {}, "2 pi / min_period overflows"),
                                ((3, 64.0, True), {}, "min_period"),
                                ((3, 64.0, 4.0), {"dtype": torch.int64}, "dtype"),
                                ((3, 64.0, 4.0), {"device": "bogus"}, "device")):
        with pytest.raises(ScopeInputError, match=words):
            frequencies(*args, **kwargs)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bias_equals_reference(variant):
    model = make_model(**VARIANTS[variant])
    cfg = model.config
    q = randn(2, cfg.num_heads, 40, cfg.head_dim, seed=3)
    coeffs = model.coefficients(q)
    gain = model.pointer_head.gain.detach()
    delta = torch.arange(0, 300, dtype=F64)  # beyond delta_max and D* + W: every ramp regime
    torch.testing.assert_close(model.bias(coeffs, delta), ref_bias(coeffs.params, gain, cfg, delta), **TOL)
    d4 = delta_matrix(40, 40)  # 4-d delta (negative distances too: the formula holds for any D)
    torch.testing.assert_close(model.bias(coeffs, d4), ref_bias(coeffs.params, gain, cfg, d4), **TOL)
    assert model.bias(coeffs, delta).abs().amax() > 1e-2  # the comparison is not between zeros


# ----------------------------------------------------------------------------- (2) score_mod on FlexAttention


@pytest.mark.parametrize(
    ("variant", "h_kv"), [("ramp_softplus", 2), ("ramp_relu", 2), ("plain", 4), ("slope", 1)]
)
def test_flex_score_mod_equals_dense_reference(variant, h_kv):
    model = make_model(num_kv_heads=h_kv, **VARIANTS[variant])
    cfg = model.config
    t = 128
    q, k, v = qkv(cfg, t, seed=10)
    q.requires_grad_(True)
    scale = cfg.head_dim**-0.5
    coeffs = model.coefficients(q)
    q_att = q.detach()  # CPU flex has no backward for q/k/v; gradients flow through the captured coefficients
    mask = create_block_mask(causal, None, None, t, t, device="cpu")
    mod = model.score_mod(coeffs)
    out = flex_attention(q_att, k, v, score_mod=mod, block_mask=mask, scale=scale, enable_gqa=True)
    bias = cfg.beta * ref_bias(coeffs.params, model.pointer_head.gain, cfg, delta_matrix(t, t))
    ref, _ = ref_attention(q_att, k, v, bias, scale)
    torch.testing.assert_close(out, ref, **TOL)
    plain = flex_attention(q_att, k, v, block_mask=mask, scale=scale, enable_gqa=True)
    assert (out - plain).abs().amax() > 1e-3  # the bias changes the output
    # gradients through score_mod (coefficients captured by the closure) equal the dense ones
    g_flex = torch.autograd.grad(out.square().sum(), (q, model.pointer_head.gain), retain_graph=True)
    g_ref = torch.autograd.grad(ref.square().sum(), (q, model.pointer_head.gain))
    for a, b in zip(g_flex, g_ref, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_flex_score_mod_q_offset_for_a_block_of_late_queries():
    """Queries t0..T-1 only (decode / chunked prefill): q_offset shifts the distances."""
    model = make_model(**VARIANTS["ramp_softplus"])
    cfg = model.config
    t, t0 = 96, 64
    q, k, v = qkv(cfg, t, seed=20)
    scale = 0.3
    coeffs_all = model.coefficients(q)
    coeffs = model.coefficients(q[:, :, t0:])

    def late_causal(b, h, q_idx, kv_idx):
        return q_idx + t0 >= kv_idx

    mask = create_block_mask(late_causal, None, None, t - t0, t, device="cpu")
    out = flex_attention(q[:, :, t0:], k, v, score_mod=model.score_mod(coeffs, q_offset=t0), block_mask=mask,
                         scale=scale, enable_gqa=True)
    bias = cfg.beta * ref_bias(coeffs_all.params, model.pointer_head.gain, cfg, delta_matrix(t, t))
    ref, _ = ref_attention(q, k, v, bias, scale)
    torch.testing.assert_close(out, ref[:, :, t0:], **TOL)


# ----------------------------------------------------------------------------- (3) qk_augment


@pytest.mark.parametrize(("variant", "align"), [("plain", 16), ("slope", 16), ("slope", 32)])
def test_qk_augment_matches_reference_probabilities(variant, align):
    model = make_model(bias_impl="qk_aug", qk_align=align, **VARIANTS[variant])
    cfg = model.config
    t = 80
    q, k, v = qkv(cfg, t, seed=30)
    scale = cfg.head_dim**-0.5
    coeffs = model.coefficients(q)
    q_aug, k_aug, v_aug, scale_aug = model.qk_augment(q, k, v, coeffs, scale)
    n_feat = 2 * cfg.num_freqs + (3 if cfg.c_scale > 0 else 0)
    assert q_aug.shape[-1] % align == 0 and k_aug.shape[-1] == q_aug.shape[-1]
    assert q_aug.shape[-1] == -(-(cfg.head_dim + n_feat) // align) * align
    assert v_aug is v and scale_aug == scale
    assert (q_aug[..., cfg.head_dim + n_feat :] == 0).all() and (k_aug[..., cfg.head_dim + n_feat :] == 0).all()
    torch.testing.assert_close(q_aug[..., : cfg.head_dim], q, rtol=0, atol=0)

    bias = cfg.beta * ref_bias(coeffs.params, model.pointer_head.gain, cfg, delta_matrix(t, t))
    ref_out, ref_probs = ref_attention(q, k, v, bias, scale)
    # dense attention on the augmented q, k (no bias) gives the same probabilities
    _, probs = ref_attention(q_aug, k_aug, v, torch.zeros(()), scale_aug)
    torch.testing.assert_close(probs, ref_probs, **TOL)
    # logits differ from the reference by a per-row constant: beta * (sum_k A_k - c i)
    g = cfg.num_heads // cfg.num_kv_heads
    diff = (q_aug @ k_aug.repeat_interleave(g, 1).transpose(-1, -2) - q @ k.repeat_interleave(g, 1).transpose(-1, -2))
    diff = diff * scale - bias
    i = torch.arange(t, dtype=F64)
    row_const = cfg.beta * (coeffs.A.sum(-1) - coeffs.c * i)
    torch.testing.assert_close(diff, row_const[..., None].expand_as(diff), **TOL)
    # plain SDPA (GQA, causal) on the augmented tensors; pad_v for kernels that need Dv == D
    sdpa = F.scaled_dot_product_attention(q_aug, k_aug, v, is_causal=True, scale=scale_aug, enable_gqa=True)
    torch.testing.assert_close(sdpa, ref_out, **TOL)
    q2, k2, v2, _ = model.qk_augment(q, k, v, coeffs, scale, pad_v=True)
    assert v2.shape[-1] == q2.shape[-1] and (v2[..., cfg.head_dim :] == 0).all()
    sdpa2 = F.scaled_dot_product_attention(q2, k2, v2, is_causal=True, scale=scale_aug, enable_gqa=True)
    torch.testing.assert_close(sdpa2[..., : cfg.head_dim], ref_out, **TOL)
    assert (sdpa2[..., cfg.head_dim :] == 0).all()


def test_qk_augment_rejects_a_ramp():
    model = make_model(**VARIANTS["ramp_softplus"])  # score_mod config with a ramp
    q, k, v = qkv(model.config, 8, seed=40)
    with pytest.raises(ScopeConfigError, match="ramp"):
        model.qk_augment(q, k, v, model.coefficients(q), 0.25)


def test_qk_augment_fp32_and_bf16_features_at_positions_near_128k():
    """Queries at absolute positions 131000..131063, keys at 0..63 and 130936..130999.

    Tolerance (first-order rounding analysis, u = 2^-24): the phase w_k p is rounded twice (w_k to
    fp32, the product), |err| <= 2u w_k p; cos/sin add <= 2u; the products and sums in the query
    feature A cos + B sin add <= 3u (|A| + |B|). Each k contributes two feature pairs, so the logit error
    of pair (i, j) is <= beta sum_k (|A_k| + |B_k|) (w_k (i + j) + 4) 2^-22. bf16 output rounds every
    feature by <= 2^-8 relative (unit roundoff of an 8-bit significand), on both sides of two pairs:
    + beta sum_k (|A_k| + |B_k|) 2^-6. The slope's query features are -c times powers of 2 (one rounding
    of c, relative u_c = 2^-23, or 2^-8 + 2^-23 in bf16) and the key digits d_p 16^p are exact (d_p < 256),
    so the slope error is (c' - c)(i - j): a per-row constant plus |c| u_c Delta.
    We compare logits up to a per-row constant: the spread over j of (logit - beta b) must stay within
    2 max_j(trig bound) + beta |c| u_c (Delta_max - Delta_min), with a factor 2 for second-order terms.
    Computing the phases from positions held in bf16 (what a naive cast would do) fails this bound.
    """
    model = make_model(dtype=torch.float32, num_heads=2, num_kv_heads=1, num_freqs=16, l_max=1e6,
                       min_period=256.0, delta_max=65536.0, c_scale=1e-3, bias_impl="qk_aug", beta=1.0)
    cfg = model.config
    d, q_start, t = cfg.head_dim, 131000, 64
    blocks = [(0, 64), (130936, 64)]
    q = randn(1, cfg.num_heads, t, d, seed=50, dtype=torch.float32)
    ks = [randn(1, 1, s, d, seed=51 + n, dtype=torch.float32) for n, (_, s) in enumerate(blocks)]
    scale = d**-0.5
    with torch.no_grad():
        coeffs = model.coefficients(q)
    a64, b64, c64 = coeffs.A.to(F64), coeffs.B.to(F64), coeffs.c.to(F64)
    w = ref_freqs(cfg.num_freqs, cfg.l_max, cfg.min_period)
    i = torch.arange(q_start, q_start + t, dtype=F64)
    j = torch.cat([torch.arange(s0, s0 + s, dtype=F64) for s0, s in blocks])
    delta = i[:, None] - j[None, :]  # [T, S], all > 0
    phase = delta[..., None] * w  # [T, S, K]
    b_ref = (a64[..., None, :] * torch.cos(phase) + b64[..., None, :] * torch.sin(phase)).sum(-1)
    b_ref = b_ref - a64.sum(-1)[..., None] + c64[..., None] * delta  # [1, H, T, S]
    amp = a64.abs() + b64.abs()  # [1, H, T, K]
    trig = (amp[..., None, :] * (w * (i[:, None, None] + j[None, :, None]) + 4)).sum(-1) * 2.0**-22
    spread_delta = delta.amax(-1) - delta.amin(-1)

    def spread(logits: torch.Tensor) -> torch.Tensor:
        r = logits - cfg.beta * b_ref
        return r.amax(-1) - r.amin(-1)

    for dtype, u_feat, u_c in ((torch.float32, 0.0, 2.0**-23), (torch.bfloat16, 2.0**-6, 2.0**-8 + 2.0**-23)):
        logits = []
        for (s0, _), k in zip(blocks, ks, strict=True):
            v = torch.zeros_like(k)
            q_aug, k_aug, _, sc = model.qk_augment(q.to(dtype), k.to(dtype), v.to(dtype), coeffs, scale,
                                                   q_start=q_start, kv_start=s0)
            qf, kf = q_aug[..., d:].to(F64), k_aug[..., d:].to(F64)  # features only, product in fp64
            logits.append(qf @ kf.transpose(-1, -2) * sc)
        trig_row = (trig + cfg.beta * amp.sum(-1)[..., None] * u_feat).amax(-1)
        bound = 2 * trig_row + cfg.beta * c64.abs() * u_c * spread_delta
        got = spread(torch.cat(logits, dim=-1))
        assert (got <= 2 * bound).all(), (dtype, (got / bound).max())
        if dtype == torch.float32:  # the tolerance is small against the spectral part of the bias itself
            assert bound.max() < 0.02 * (b_ref - c64[..., None] * delta).std()

    # naive: positions held in bf16 before the phase (rounded to multiples of 512 near 131k)
    i_b, j_b = i.to(torch.bfloat16).to(F64), j.to(torch.bfloat16).to(F64)
    ph_q, ph_k = i_b[:, None] * w, j_b[:, None] * w
    f1 = a64 * torch.cos(ph_q) + b64 * torch.sin(ph_q)
    f2 = a64 * torch.sin(ph_q) - b64 * torch.cos(ph_q)
    naive = f1 @ torch.cos(ph_k).T + f2 @ torch.sin(ph_k).T - c64[..., None] * j
    assert (spread(cfg.beta * naive) > 2 * bound).any()


# ----------------------------------------------------------------------------- (4) zero bias at init


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_zero_bias_at_init_and_attention_equals_base(dtype):
    cfg = ScopeConfig(**{**SMALL, "c_scale": 0.1})  # slope on: its output row must start at 0 too
    torch.manual_seed(0)
    model = SpectralBias(cfg).to(dtype)
    t = 64
    q, k, v = qkv(cfg, t, seed=60, dtype=dtype)
    q = q * 5
    coeffs = model.coefficients(q)
    assert coeffs.A.dtype == dtype
    for name in ("A", "B", "c"):
        assert torch.equal(getattr(coeffs, name), torch.zeros_like(getattr(coeffs, name))), name
    assert coeffs.params.d_star.std() > 0  # pointers themselves are not degenerate at init
    b = model.bias(coeffs, torch.arange(0, 200))
    assert torch.equal(b, torch.zeros_like(b))
    scale = cfg.head_dim**-0.5
    mask = create_block_mask(causal, None, None, t, t, device="cpu")
    base = flex_attention(q, k, v, block_mask=mask, scale=scale, enable_gqa=True)
    biased = flex_attention(q, k, v, score_mod=model.score_mod(coeffs), block_mask=mask, scale=scale, enable_gqa=True)
    assert torch.equal(biased, base)
    q_aug, k_aug, v_aug, sc = model.qk_augment(q, k, v, coeffs, scale)
    base_sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    aug_sdpa = F.scaled_dot_product_attention(q_aug, k_aug, v_aug, is_causal=True, scale=sc, enable_gqa=True)
    # matmul order only
    tol: dict[str, Any] = {"rtol": 1e-12, "atol": 1e-12} if dtype == F64 else {"rtol": 1e-6, "atol": 1e-6}
    torch.testing.assert_close(aug_sdpa, base_sdpa, **tol)
    # ... and the bias can learn: the gain gets a gradient at init
    biased.square().sum().backward()
    assert model.pointer_head.gain.grad is not None and model.pointer_head.gain.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- (4b) the pointer head


def ref_pointer_params(q: torch.Tensor, head, cfg: ScopeConfig, step: int | None) -> dict[str, torch.Tensor]:
    """SCOPE.md's pointer MLP on q [B, H, T, D] in float64, from the head's weights w1 [n, D, hidden], b1, w2
    [n, hidden, 5M + 1], b2 (n = H per head, 1 shared): x = q / rms(q) (no affine), h = silu(x w1 + b1),
    out = h w2 + b2 = [D* logit | mu | sigma | pi logits | budget logits] x M, slope. D* = delta_max(step) *
    sigmoid, mu = log(2 pi / l_max) + log(l_max / min_period) * sigmoid (between the extreme frequencies' logs),
    sigma = sigma_min + log(1 + e^raw), pi = softmax over the M pointers, slope = c_scale * tanh."""
    w1, b1, w2, b2 = (t.detach().to(F64) for t in (head.w1, head.b1, head.w2, head.b2))
    x = q / torch.sqrt((q * q).mean(-1, keepdim=True))
    pre = torch.einsum("bhtd,hde->bhte", x, w1.expand(q.shape[1], -1, -1)) + b1.expand(q.shape[1], -1)[:, None]
    hidden = pre / (1 + torch.exp(-pre))
    out = torch.einsum("bhte,heo->bhto", hidden, w2.expand(q.shape[1], -1, -1)) + b2.expand(q.shape[1], -1)[:, None]
    m = cfg.num_pointers
    raw = [out[..., i * m:(i + 1) * m] for i in range(5)]
    delta_max = cfg.delta_max if cfg.delta_max_schedule is None else (
        cfg.delta_max_schedule[1] if step is None else
        cfg.delta_max_schedule[0] + (cfg.delta_max_schedule[1] - cfg.delta_max_schedule[0])
        * min(step, cfg.delta_max_schedule[2]) / cfg.delta_max_schedule[2])
    log_lo, log_hi = math.log(2 * math.pi / cfg.l_max), math.log(2 * math.pi / cfg.min_period)
    return {"d_star": delta_max / (1 + torch.exp(-raw[0])), "mu": log_lo + (log_hi - log_lo) / (1 + torch.exp(-raw[1])),
            "sigma": cfg.sigma_min + torch.log1p(torch.exp(raw[2])), "pi": torch.softmax(raw[3], dim=-1),
            "budget_logits": raw[4], "slope": cfg.c_scale * torch.tanh(out[..., 5 * m]), "d_star_logit": raw[0]}


@pytest.mark.parametrize(("overrides", "step"), [
    ({"per_head_mlp": True, "c_scale": 0.05}, None),
    ({"per_head_mlp": False, "c_scale": 0.05}, None),
    ({"per_head_mlp": True, "delta_max_schedule": (100.0, 500.0, 40)}, 10),
])
def test_pointer_head_matches_its_formula(overrides, step):
    model = make_model(**overrides)
    head, cfg = model.pointer_head, model.config
    with torch.no_grad():
        head.b1.add_(randn(*head.b1.shape, seed=81) * 0.5)
        head.b2.add_(randn(*head.b2.shape, seed=82) * 0.5)
    q = randn(2, cfg.num_heads, 9, cfg.head_dim, seed=80, scale=3.0)
    with torch.no_grad():
        got = head(q, step)
    for name, want in ref_pointer_params(q, head, cfg, step).items():
        def message(text: str, name: str = name) -> str:
            return f"{name}: {text}"

        torch.testing.assert_close(getattr(got, name), want, **TOL, msg=message)


# ----------------------------------------------------------------------------- (5) D* is absolute


def test_d_star_is_an_absolute_offset_in_tokens():
    model = make_model(num_heads=2, num_kv_heads=2, delta_max=3000.0)
    q8 = randn(1, 2, 8192, model.config.head_dim, seed=70)
    with torch.no_grad():
        p4 = model.coefficients(q8[:, :, :4096]).params
        p8 = model.coefficients(q8).params
    torch.testing.assert_close(p4.d_star, p8.d_star[:, :, :4096], **TOL)  # same q, 4k vs 8k: same tokens
    torch.testing.assert_close(p8.d_star, 3000.0 * torch.sigmoid(p8.d_star_logit), **TOL)
    assert p8.d_star.max() < 3000.0 and p8.d_star.max() > 1500.0  # tokens, not a fraction of T


def test_delta_max_schedule():
    cfg = ScopeConfig(**{**SMALL, "delta_max_schedule": [1000, 3000, 100]})
    assert cfg.delta_max_schedule == (1000.0, 3000.0, 100)
    assert [cfg.delta_max_at(s) for s in (0, 50, 100, 500, None)] == [1000.0, 2000.0, 3000.0, 3000.0, 3000.0]
    assert ScopeConfig().delta_max_at(7) == 65536.0
    with pytest.raises(ScopeInputError, match="step"):
        cfg.delta_max_at(-1)
    model = make_model(delta_max_schedule=(1000.0, 3000.0, 100))
    q = randn(1, 4, 8, 16, seed=71)
    with torch.no_grad():
        d0, d50 = model.coefficients(q, step=0).params.d_star, model.coefficients(q, step=50).params.d_star
    torch.testing.assert_close(d50, 2 * d0, **TOL)


# ----------------------------------------------------------------------------- (6) shift theorem


def test_shift_theorem():
    model = make_model(**VARIANTS["slope"])
    cfg = model.config
    q = randn(1, cfg.num_heads, 12, cfg.head_dim, seed=80)
    coeffs = model.coefficients(q)
    p = coeffs.params
    w = ref_freqs(cfg.num_freqs, cfg.l_max, cfg.min_period)
    a = ref_amplitudes(p.mu, p.sigma, model.pointer_head.gain, w)  # [B, H, T, M, K]
    pa = p.pi[..., None] * a
    torch.testing.assert_close(coeffs.A, (pa * torch.cos(w * p.d_star[..., None])).sum(-2), **TOL)
    torch.testing.assert_close(coeffs.B, (pa * torch.sin(w * p.d_star[..., None])).sum(-2), **TOL)
    dd = torch.rand(50, dtype=F64, generator=torch.Generator().manual_seed(81)) * 500 - 100  # real D, any sign
    for n in range(0, 50, 7):
        direct = (pa * torch.cos(w * (dd[n] - p.d_star[..., None]))).sum(-2)  # per k
        shifted = coeffs.A * torch.cos(w * dd[n]) + coeffs.B * torch.sin(w * dd[n])
        torch.testing.assert_close(shifted, direct, **TOL)


# ----------------------------------------------------------------------------- (7) regularisers


def test_regularisers_on_a_hand_built_case():
    """K = 2, w = (pi/4, pi/2) (periods 8 and 4), M = 2, one head, two rows = the last two queries
    (positions 2 and 3) of a 4-token sequence."""
    lambdas: dict[str, Any] = {"lambda_hf": 0.1, "lambda_zero_mean": 0.2, "lambda_entropy": 0.3, "lambda_edge": 0.4}
    cfg = ScopeConfig(num_heads=1, num_kv_heads=1, head_dim=4, num_pointers=2, num_freqs=2, l_max=8.0,
                      min_period=4.0, entropy_floor_frac=0.5, **lambdas)
    model = SpectralBias(cfg).double()
    with torch.no_grad():
        model.pointer_head.gain.fill_(2.0)
    lw1, lw2 = math.log(math.pi / 4), math.log(math.pi / 2)
    one = torch.ones(1, 1, 2, 2, dtype=F64)
    # pointer 0: mu midway, equal weights (1/2, 1/2) -> a = (1, 1); pointer 1: narrow at w_2 -> a = (0, 2)
    mu = one * torch.tensor([(lw1 + lw2) / 2, lw2], dtype=F64)
    sigma = one * torch.tensor([1.0, 0.05], dtype=F64)
    pi = torch.tensor([[[[0.9, 0.1], [0.5, 0.5]]]], dtype=F64)
    logit = torch.tensor([[[[0.0, 4.0], [-10.0, 2.0]]]], dtype=F64)
    params = PointerParams(d_star=one, mu=mu, sigma=sigma, pi=pi, budget_logits=one, slope=one[..., 0],
                           d_star_logit=logit)
    # row 0 (i = 2): A = B = 0, c = 2 -> b(D) = 2D, mean over D = 0..2 is 2, squared 4.
    # row 1 (i = 3): A = (1, 0), B = (0, 1), c = 1 -> b(D) = cos(pi D/4) + sin(pi D/2) - 1 + D
    #   = 0, 1.70711, 1, 0.29289 for D = 0..3: mean 0.75, squared 0.5625.
    coef_a = torch.tensor([[[[0.0, 0.0], [1.0, 0.0]]]], dtype=F64)
    coef_b = torch.tensor([[[[0.0, 0.0], [0.0, 1.0]]]], dtype=F64)
    c = torch.tensor([[[2.0, 1.0]]], dtype=F64)
    coeffs = BiasCoefficients(coef_a, coef_b, c, one[..., 0], params)
    reg = model.regularisers(coeffs, seq_len=4)
    expected = {
        # (w/w_max)^2 = (1/4, 1): pointer 0: 1/4 * 1 + 1 * 1 = 1.25; pointer 1: 1 * 4 = 4; mean 2.625
        "hf": 2.625,
        "zero_mean": (4 + 0.5625) / 2,  # 2.28125
        # row 0: 0.5 ln 2 - H(0.9, 0.1) = 0.346574 - 0.325083 = 0.0214906; row 1: H = ln 2 > floor -> 0
        "entropy": 0.02149061688852444 / 2,
        # softplus(r - 4) + softplus(-r - 4) for r = 0, 4, -10, 2: 0.0362999, 0.6934826, 6.0024765, 0.1294037
        "edge": 1.7154156639038167,
    }
    for name, value in expected.items():
        assert reg[f"{name}_raw"].item() == pytest.approx(value, rel=1e-9, abs=1e-12), name
        assert reg[name].item() == pytest.approx(lambdas[f"lambda_{name}"] * value, rel=1e-9), name
    assert reg["total"].item() == pytest.approx(sum(lambdas[f"lambda_{n}"] * v for n, v in expected.items()))
    # the zero-mean closed form equals the explicit mean over each causal row for a random model
    model2 = make_model(**VARIANTS["slope"])
    coeffs2 = model2.coefficients(randn(1, 4, 10, 16, seed=90))
    rows = ref_bias(coeffs2.params, model2.pointer_head.gain, model2.config, delta_matrix(10, 300, 290, 0))
    keep = delta_matrix(10, 300, 290, 0) >= 0
    explicit = ((rows * keep).sum(-1) / keep.sum(-1)).square().mean()
    torch.testing.assert_close(model2.regularisers(coeffs2, seq_len=300)["zero_mean_raw"], explicit, **TOL)
    with pytest.raises(ScopeInputError, match="seq_len"):
        model2.regularisers(coeffs2, seq_len=5)


@pytest.mark.parametrize("gate_kind", ["softplus", "relu"])
def test_bias_is_zero_at_init_with_a_ramp_and_the_ramp_can_grow(gate_kind):
    """SCOPE.md: a fresh model equals its base model; a configured ramp starts gated off (ramp_gate = 0)
    and its gate receives gradient."""
    cfg = ScopeConfig(**{**SMALL, "gate_kind": gate_kind, "ramp_lambda": 0.5, "ramp_width": 4.0, "ramp_tau": 2.0})
    torch.manual_seed(0)
    model = SpectralBias(cfg).double()
    q = torch.randn(1, cfg.num_heads, 32, cfg.head_dim, dtype=F64)
    coeffs = model.coefficients(q)
    delta = torch.arange(0, 64, dtype=F64)
    bias = model.bias(coeffs, delta)
    assert torch.equal(bias, torch.zeros_like(bias))
    # the gate learns: push the logits at distance 0 up against the far ones
    (bias[..., 0].sum() - bias[..., -1].sum()).backward()
    assert model.ramp_gate is not None and model.ramp_gate.grad is not None
    assert model.ramp_gate.grad.abs().sum() > 0


def test_regularisers_are_zero_at_init_except_edge_and_entropy_floor():
    model = SpectralBias(ScopeConfig(**SMALL)).double()
    reg = model.regularisers(model.coefficients(randn(1, 4, 16, 16, seed=91)), seq_len=16)
    assert reg["hf_raw"].item() == 0 and reg["zero_mean_raw"].item() == 0


# ----------------------------------------------------------------------------- gradcheck


def test_gradcheck_coefficients_to_bias():
    model = make_model(num_heads=2, num_kv_heads=1, num_pointers=2, num_freqs=3, head_dim=4,
                       **VARIANTS["ramp_softplus"])
    q = randn(1, 2, 3, 4, seed=100)
    base = model.coefficients(q)
    delta = torch.tensor([0.0, 1.0, 5.0, 17.0, 40.0, 90.0], dtype=F64)

    def from_coeffs(a, b, c, d_main):
        return model.bias(BiasCoefficients(a, b, c, d_main, base.params), delta)

    inputs = tuple(x.detach().clone().requires_grad_(True) for x in (base.A, base.B, base.c, base.d_star_main))
    assert gradcheck(from_coeffs, inputs)

    def from_q(q_in):
        return model.bias(model.coefficients(q_in), delta)

    assert gradcheck(from_q, (q.clone().requires_grad_(True),))


# ----------------------------------------------------------------------------- (8) config errors


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"num_pointers": 0}, "num_pointers"),
        ({"num_freqs": 0}, "num_freqs"),
        ({"budget": -1}, "budget"),
        ({"delta_max": 0.0}, "delta_max"),
        ({"delta_max": -5.0}, "delta_max"),
        ({"gate_kind": "sigmoid"}, "gate_kind"),
        ({"bias_impl": "qk_aug", "gate_kind": "softplus", "ramp_lambda": 0.5}, "qk_aug"),
        ({"num_heads": 6, "num_kv_heads": 4}, "num_kv_heads"),
        ({"min_period": 0.0}, "min_period"),
        ({"l_max": 100.0, "min_period": 100.0}, "l_max"),
        ({"local_blocks": 0}, "local_blocks"),
        ({"global_blocks": -1}, "global_blocks"),
        ({"max_radius": -1}, "max_radius"),
        ({"qk_align": 8}, "qk_align"),
        ({"bias_impl": "dense"}, "bias_impl"),
        ({"representative": "first"}, "representative"),
        ({"gumbel_topk": 5}, "gumbel_topk"),
        ({"delta_max_schedule": (100.0, 0.0, 10)}, "delta_max_schedule"),
        ({"entropy_floor_frac": 1.5}, "entropy_floor_frac"),
        ({"num_pointers": 2.0}, "num_pointers"),
        ({"pointer_mask": 1}, "pointer_mask"),
    ],
)
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ScopeConfigError, match=field):
        ScopeConfig(**overrides)


def test_config_from_dict_and_qk_aug_rules():
    with pytest.raises(ScopeConfigError, match="nope"):
        ScopeConfig.from_dict({"num_pointers": 2, "nope": 1})
    with pytest.raises(ScopeConfigError, match="ramp"):
        ScopeConfig.from_dict({"bias_impl": "qk_aug", "gate_kind": "relu", "ramp_lambda": 1.0})
    assert issubclass(ScopeConfigError, ValueError)
    # a gate kind without a ramp weight (or a weight with gate "none") is no ramp: qk_aug is fine
    assert not ScopeConfig(bias_impl="qk_aug", gate_kind="softplus", ramp_lambda=0.0).has_ramp
    assert not ScopeConfig(bias_impl="qk_aug", gate_kind="none", ramp_lambda=1.0).has_ramp
    cfg = ScopeConfig.from_dict({"num_pointers": 2, "delta_max": 4096})
    assert cfg.delta_max == 4096.0 and ScopeConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(("field", "value"), [("rope_theta", 1e-300), ("beta", 1e300), ("beta", -1e300),
                                              ("delta_max", 1e300), ("l_max", 1e300), ("min_period", 1e-300)])
def test_config_rejects_values_float32_cannot_hold(field, value):
    """Finite in float64 but infinite (or 0 where 0 is invalid) in float32: every output would be NaN."""
    with pytest.raises(ScopeConfigError, match=f"{field}=.* (overflows to inf|underflows to 0) in float32"):
        ScopeConfig(**{field: value})
    assert ScopeConfig(beta=1e-300).beta == 1e-300  # beta may be 0: underflowing to it is no error


def test_load_scope_config_rejects_stray_top_level_keys_and_a_non_table(tmp_path):
    from scope import load_scope_config

    path = tmp_path / "scope.toml"
    path.write_text("window = 3\nbudget = 5\n[scope]\nnum_pointers = 2\n")
    with pytest.raises(ScopeConfigError, match=r"\['budget', 'window'\]"):
        load_scope_config(path)
    path.write_text("scope = 3\n")
    with pytest.raises(ScopeConfigError, match=r"scope must be a table \(\[scope\]\)"):
        load_scope_config(path)
    path.write_text("[scope]\nnum_pointers = 2\n")
    assert load_scope_config(path).num_pointers == 2
    path.write_text("num_pointers = 3\n")
    assert load_scope_config(path).num_pointers == 3


def test_input_errors():
    model = make_model()
    q, k, v = qkv(model.config, 8, seed=110)
    coeffs = model.coefficients(q)
    with pytest.raises(ScopeInputError, match="q must be"):
        model.coefficients(q[:, :2])
    with pytest.raises(ScopeInputError, match="delta"):
        model.bias(coeffs, torch.zeros(2, 3))
    with pytest.raises(ScopeInputError, match="q_start"):
        model.qk_augment(q, k, v, coeffs, 0.25, q_start=2**24)
    with pytest.raises(ScopeInputError, match="coeffs"):
        model.qk_augment(q[:, :, :4], k, v, coeffs, 0.25)
    with pytest.raises(ScopeInputError, match="scale"):
        model.qk_augment(q, k, v, coeffs, 0.0)
