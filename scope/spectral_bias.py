"""SCOPE spectral attention bias (SCOPE.md section 1): pointer head, coefficients, two implementations.

Layouts (FlexAttention's): q [B, H, T, D], k / v [B, H_kv, S, D]; per-row tensors are [B, H, T, ...]
over the *query* heads (GQA: query head h reads kv head h // (H / H_kv)). Distances are
Delta = i - j >= 0 for query i and key j (absolute token positions).

For query i the logit of key j gains beta * b_i(Delta) with

    b_i(D) = sum_m pi_m sum_k a_mk cos(w_k (D - D*_m)) - b_i^spec(0) + c D - ramp(D)
           = sum_k A_k cos(w_k D) + B_k sin(w_k D) - sum_k A_k + c D - ramp(D)        (shift theorem)

    A_k = sum_m pi_m a_mk cos(w_k D*_m),  B_k = sum_m pi_m a_mk sin(w_k D*_m)
    a_mk = gain_h * softmax_k(-(log w_k - mu_m)^2 / (2 sigma_m^2))
    ramp(D) = ramp_gate_h * ramp_lambda * act((|D - D*_main| - W) / tau),  act in {softplus, relu},
              D*_main = D* of argmax pi, ramp_gate_h a per-head scalar that starts at 0

D* = delta_max * sigmoid(raw) is an absolute offset in tokens (delta_max from the config, optionally
scheduled by training step), never a fraction of the sequence length. ``gain`` (one scalar per head)
starts at 0 and the slope's output weights start at 0, so the bias is exactly zero at init and a
fresh SCOPE model equals its base model. A configured ramp is scaled by ``ramp_gate`` (one scalar
per head, starting at 0, learnt like ``gain``), so it is zero at init too and the model grows it.

Two implementations of the same logits: ``score_mod`` (FlexAttention, every term) and
``qk_augment`` (features appended to q and k so that any dot-product kernel adds beta * b up to a
per-row constant; no ramp). ``bias`` is the dense helper for tests and telemetry. The three are functions
of ``BiasTerms`` (coefficients plus settings), so scope.functional uses them without a layer.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nsa.dispatch import accumulation_dtype
from nsa.validation import FLOAT_DTYPES, check_nonnegative_int, check_real, parse_device
from scope.config import ScopeConfig
from scope.errors import ScopeConfigError, ScopeInputError
from scope.pointer_mask import ScoreMod

# qk_aug slope features: key position j split into base-256 digits d_p (exact in bf16 and fp16);
# key feature d_p * 16^p, query feature -c * 16^p, so the product is -c * d_p * 256^p. Three digits
# cover positions < 2^24 (also the range where fp32 holds integers exactly).
_SLOPE_DIGITS = 3
_MAX_POSITION = 256**_SLOPE_DIGITS
# Edge barrier: softplus(r - r0) + softplus(-r - r0) on the D* logit r; it grows once sigmoid(r) is
# within sigmoid(-r0) ~ 1.8% of 0 or 1 (D* within 1.8% of delta_max from either edge).
EDGE_LOGIT = 4.0


def frequencies(
    num_freqs: int,
    l_max: float,
    min_period: float,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    """K log-spaced angular frequencies w [K] (float64 by default), ascending from 2 pi / l_max
    (longest period, l_max tokens) to 2 pi / min_period (shortest period). K = 1 gives [2 pi / l_max]."""
    if isinstance(num_freqs, bool) or not isinstance(num_freqs, int) or num_freqs < 1:
        raise ScopeInputError(f"num_freqs (K) must be an int >= 1, got {num_freqs!r}")
    min_period = check_real("min_period", min_period, error=ScopeInputError, above=0.0)
    l_max = check_real("l_max", l_max, error=ScopeInputError, above=min_period)
    if not math.isfinite(2 * math.pi / min_period):
        raise ScopeInputError(f"min_period={min_period!r} is too small: 2 pi / min_period overflows")
    if dtype not in FLOAT_DTYPES:
        raise ScopeInputError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype!r}")
    place = None if device is None else parse_device("device", device, error=ScopeInputError)
    lo, hi = math.log(2 * math.pi / l_max), math.log(2 * math.pi / min_period)
    logw = torch.linspace(lo, hi, num_freqs, dtype=torch.float64)
    return logw.exp().to(dtype=dtype, device=place)


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


class PointerParams(NamedTuple):
    """Per-query pointer parameters, all [B, H, T, M] except ``slope`` [B, H, T].

    d_star: offset in tokens, delta_max * sigmoid(d_star_logit); mu, sigma: centre and width (in log w)
    of each pointer's log-normal spectrum; pi: softmax over M; budget_logits: u_m for the pointer mask;
    slope: c = c_scale * tanh(.); d_star_logit: the raw logit of D* (kept for the edge regulariser,
    whose gradient must not vanish where the sigmoid saturates).
    """

    d_star: Tensor
    mu: Tensor
    sigma: Tensor
    pi: Tensor
    budget_logits: Tensor
    slope: Tensor
    d_star_logit: Tensor


class BiasCoefficients(NamedTuple):
    """Per-row coefficients of b_i: A, B [B, H, T, K]; c [B, H, T]; d_star_main [B, H, T] (tokens).

    float32 (float64 for float64 q). ``params`` are the pointer parameters they came from.
    """

    A: Tensor
    B: Tensor
    c: Tensor
    d_star_main: Tensor
    params: PointerParams


class PointerHead(nn.Module):
    """Small MLP on q predicting M pointers per query (per head, or shared across heads).

    forward(q [B, H, T, D], step=None) -> PointerParams (float32, float64 for float64 q).
    The input is RMS-normalised (no affine), then Linear(D, mlp_hidden) -> SiLU -> Linear(mlp_hidden,
    5M + 1). The two matmuls run in q's dtype when it is 16-bit (tensor cores, float32 accumulation;
    in float32 their weight gradients, reductions over all B*T rows, took 9 of a 68 ms SCOPE step at
    128k on an H100); everything else in float32.
    Output channels: [D* logit | mu | sigma | pi logits | budget logits] x M, then the slope.
    Init: the pointer outputs start spread out (D* at (m + 1/2) / M of delta_max, mu across the
    log-frequency range) with small random weights so the pointers are not symmetric; the slope's
    output row and ``gain`` (the per-head amplitude scale, a = gain * lognormal weights) start at 0.
    """

    def __init__(self, config: ScopeConfig) -> None:
        super().__init__()
        self.config = config
        heads, dim, hidden, m = config.num_heads, config.head_dim, config.mlp_hidden, config.num_pointers
        n_mlp = heads if config.per_head_mlp else 1
        out = 5 * m + 1
        self.log_w_lo = math.log(2 * math.pi / config.l_max)
        self.log_w_hi = math.log(2 * math.pi / config.min_period)
        self.w1 = nn.Parameter(torch.randn(n_mlp, dim, hidden) / math.sqrt(dim))
        self.b1 = nn.Parameter(torch.zeros(n_mlp, hidden))
        w2 = torch.randn(n_mlp, hidden, out) * (0.1 / math.sqrt(hidden))
        w2[..., 5 * m] = 0.0  # slope row: c = c_scale * tanh(0) = 0 at init
        self.w2 = nn.Parameter(w2)
        b2 = torch.zeros(n_mlp, out)
        spread = torch.tensor([_logit((i + 0.5) / m) for i in range(m)])
        b2[:, 0:m] = spread  # D* at (m + 1/2) / M of delta_max
        b2[:, m : 2 * m] = spread  # mu across [log w_min, log w_max]
        width = max((self.log_w_hi - self.log_w_lo) / (2 * m), 2 * config.sigma_min)
        b2[:, 2 * m : 3 * m] = _inverse_softplus(width - config.sigma_min)
        self.b2 = nn.Parameter(b2)
        self.gain = nn.Parameter(torch.zeros(heads))

    def forward(self, q: Tensor, step: int | None = None) -> PointerParams:
        cfg = self.config
        if q.dim() != 4 or q.shape[1] != cfg.num_heads or q.shape[-1] != cfg.head_dim:
            raise ScopeInputError(
                f"q must be [B, H={cfg.num_heads}, T, D={cfg.head_dim}], got shape {tuple(q.shape)}"
            )
        if not q.is_floating_point():
            raise ScopeInputError(f"q must be a floating tensor, got dtype {q.dtype}")
        cdt = accumulation_dtype(q.dtype)
        mm_dtype = q.dtype if q.element_size() == 2 else cdt
        m = cfg.num_pointers
        x = F.rms_norm(q.to(cdt), (q.shape[-1],))
        h = F.silu((x.to(mm_dtype) @ self.w1.to(mm_dtype)).to(cdt) + self.b1.to(cdt)[:, None, :])  # [B, H, T, hidden]
        out = (h.to(mm_dtype) @ self.w2.to(mm_dtype)).to(cdt) + self.b2.to(cdt)[:, None, :]  # [B, H, T, 5M + 1]
        d_logit = out[..., 0:m]
        d_star = cfg.delta_max_at(step) * torch.sigmoid(d_logit)
        mu = self.log_w_lo + (self.log_w_hi - self.log_w_lo) * torch.sigmoid(out[..., m : 2 * m])
        sigma = cfg.sigma_min + F.softplus(out[..., 2 * m : 3 * m])
        pi = torch.softmax(out[..., 3 * m : 4 * m], dim=-1)
        budget_logits = out[..., 4 * m : 5 * m]
        slope = cfg.c_scale * torch.tanh(out[..., 5 * m])
        return PointerParams(d_star, mu, sigma, pi, budget_logits, slope, d_logit)


RAMP_KINDS = ("softplus", "relu")  # the ramp's activations (ScopeConfig.gate_kind without "none")


class Ramp(NamedTuple):
    """The optional trough of b_i: - gate_h * strength * act((|D - D*_main| - width) / tau)."""

    gate: Tensor  # [H] per-head scale (learnt; 0 at init)
    kind: str  # act: "softplus" or "relu"
    strength: float  # ramp_lambda
    width: float  # W, tokens
    tau: float

    def __call__(self, x: Tensor) -> Tensor:
        """strength * act(x) (without the gate)."""
        return self.strength * (F.softplus(x) if self.kind == "softplus" else F.relu(x))


class BiasTerms(NamedTuple):
    """The spectral bias of one attention call as data (scope.functional.scope_attention's ``bias``): the
    logit of query i and key j gains beta * b_i(i - j) with, per row (see the module docstring),

        b_i(D) = sum_k A_k cos(w_k D) + B_k sin(w_k D) - sum_k A_k + c D - ramp(D)

    coeffs: A, B [B, H, T, K], c [B, H, T], d_star_main [B, H, T] (rows are the queries); freqs: w_k (K
    floats); slope: whether c enters (False: c is ignored, and qk_aug adds no slope features); ramp: None, or
    the trough (score_mod only). ``SpectralBias.terms`` makes them from a layer's coefficients.
    """

    coeffs: BiasCoefficients
    freqs: tuple[float, ...]
    beta: float
    slope: bool
    ramp: Ramp | None


def _freqs(freqs: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.tensor(freqs, dtype=torch.float64, device=device).to(dtype)


def dense_bias(terms: BiasTerms, delta: Tensor) -> Tensor:
    """Dense b_i(delta) [B, H, T, N] (without beta), in the coefficients' dtype.

    delta: distances i - j, either [N] (the same for every row) or a 4-d tensor broadcastable to [B, H, T, N].
    Every term of ``terms`` is included. O(B H T N K) memory: a helper for tests, telemetry and decode.
    """
    coeffs = terms.coeffs
    coef_a, coef_b, c = coeffs.A, coeffs.B, coeffs.c
    if delta.dim() == 1:
        delta = delta.view(1, 1, 1, -1)
    elif delta.dim() != 4:
        raise ScopeInputError(f"delta must be [N] or 4-d broadcastable to [B, H, T, N], got {tuple(delta.shape)}")
    d = delta.to(coef_a.dtype)
    phase = d[..., None] * _freqs(terms.freqs, coef_a.dtype, coef_a.device)  # [.., N, K]
    spec = (coef_a[..., None, :] * torch.cos(phase) + coef_b[..., None, :] * torch.sin(phase)).sum(-1)
    b = spec - coef_a.sum(-1)[..., None]
    if terms.slope:
        b = b + c[..., None] * d
    ramp = terms.ramp
    if ramp is not None:
        gate = ramp.gate.to(d.dtype).view(1, -1, 1, 1)
        b = b - gate * ramp(((d - coeffs.d_star_main[..., None]).abs() - ramp.width) / ramp.tau)
    return b


def bias_score_mod(terms: BiasTerms, *, q_offset: int = 0) -> ScoreMod:
    """FlexAttention score_mod: score + beta * b_{q_idx}(q_offset + q_idx - kv_idx).

    q_idx indexes the rows of ``terms.coeffs`` (the query tensor); ``q_offset`` is the absolute position of
    the first query minus that of the first key (0 for prefill over the whole sequence; the cache length for
    decode / chunked prefill). The K terms are unrolled (pointwise, compile-friendly). Supports every term
    (spectral, slope, ramp). The bias is computed in the coefficients' dtype (float32, float64 for float64)
    and added in the score's dtype. Pointwise, so it also evaluates densely on broadcast index tensors
    (b [B, 1, 1, 1], h [1, H, 1, 1], q_idx [1, 1, T, 1], kv_idx [1, 1, 1, S]), as naive_scope_attention does.
    """
    coeffs, ramp, beta = terms.coeffs, terms.ramp, terms.beta
    coef_a, c, d_main = coeffs.A, coeffs.c, coeffs.d_star_main
    a_sum = coef_a.sum(-1)
    ramp_gate = ramp.gate.to(coef_a.dtype) if ramp is not None else None

    # One captured tensor per term, each indexed once: FlexAttention's GPU backward lowering (torch
    # 2.11) rejects a grad-requiring tensor indexed several times in one score_mod.
    a_cols = [col.clone() for col in coef_a.unbind(-1)]
    b_cols = [col.clone() for col in coeffs.B.unbind(-1)]

    def mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        d = (q_idx + q_offset - kv_idx).to(coef_a.dtype)
        acc = -a_sum[b, h, q_idx]
        for w, a_k, b_k in zip(terms.freqs, a_cols, b_cols, strict=True):
            phase = d * w
            acc = acc + a_k[b, h, q_idx] * torch.cos(phase) + b_k[b, h, q_idx] * torch.sin(phase)
        if terms.slope:
            acc = acc + c[b, h, q_idx] * d
        if ramp is not None and ramp_gate is not None:
            acc = acc - ramp_gate[h] * ramp(((d - d_main[b, h, q_idx]).abs() - ramp.width) / ramp.tau)
        return score + (beta * acc).to(score.dtype)

    return mod


def qk_width(dim: int, num_freqs: int, slope: bool, align: int) -> int:
    """Width of qk_augment's q / k for head dim ``dim``: dim + 2K features (+ 3 slope digits), aligned."""
    return _round_up(dim + 2 * num_freqs + (_SLOPE_DIGITS if slope else 0), align)


def qk_augment(
    q: Tensor, k: Tensor, v: Tensor, terms: BiasTerms, scale: float, *, align: int, q_start: int = 0,
    kv_start: int = 0, pad_v: bool = False,
) -> tuple[Tensor, Tensor, Tensor, float]:
    """Append bias features so that q_aug . k_aug * scale = q . k * scale + beta * b + (per-row const).

    q [B, H, T, D], k [B, H_kv, S, D], v [B, H_kv, S, Dv]; query t sits at absolute position
    i = q_start + t, key s at j = kv_start + s. Features (F = 2K, plus 3 with a slope):
      key   j: [cos(w_k j), sin(w_k j)]                    (and d_p(j) * 16^p, p = 0..2)
      query i: beta/scale * [A_k cos(w_k i) + B_k sin(w_k i), A_k sin(w_k i) - B_k cos(w_k i)]
                                                          (and -beta/scale * c * 16^p)
    where j = sum_p d_p 256^p (base-256 digits, exact in bf16/fp16), so the slope term is
    -c j = c (i - j) - c i. The logits differ from beta * b by the per-row constant
    beta * (sum_k A_k - c i), which softmax ignores. The feature math runs in float32 (float64 for float64
    q) at absolute positions and is cast to q's dtype at the end, so positions up to 2^24 keep
    their phase precision. q_aug / k_aug are zero-padded to a multiple of ``align``; v is
    returned unchanged unless ``pad_v`` (kernels that need Dv == D), then q, k and v are all
    zero-padded to the same aligned width. Returns (q_aug, k_aug, v_aug, scale) with the scale
    the kernel must use. A ramp raises ScopeConfigError (it is not a dot product).
    """
    ramp, coeffs = terms.ramp, terms.coeffs
    if ramp is not None:
        raise ScopeConfigError(
            f"qk_augment cannot express the ramp (gate_kind={ramp.kind!r}, ramp_lambda={ramp.strength}); "
            "use score_mod, or set gate_kind='none' / ramp_lambda=0"
        )
    _check_qkv(q, k, v)
    bsz, heads, t_q, dim = q.shape
    h_kv, s_k = k.shape[1], k.shape[2]
    num_freqs = len(terms.freqs)
    if coeffs.A.shape != (bsz, heads, t_q, num_freqs) or coeffs.B.shape != coeffs.A.shape:
        raise ScopeInputError(
            f"coeffs.A / coeffs.B must be [B, H, T, K]={(bsz, heads, t_q, num_freqs)}, "
            f"got {tuple(coeffs.A.shape)} / {tuple(coeffs.B.shape)}"
        )
    check_real("scale", scale, error=ScopeInputError, above=0.0, float32=True)
    for name, start, length in (("q_start", q_start, t_q), ("kv_start", kv_start, s_k)):
        check_nonnegative_int(name, start, error=ScopeInputError)
        if start + length > _MAX_POSITION:
            raise ScopeInputError(
                f"{name} + length = {start + length} must be <= 2^24 (qk_aug position range)"
            )
    cdt = accumulation_dtype(q.dtype)
    device = q.device
    w = _freqs(terms.freqs, cdt, device)
    mult = terms.beta / scale
    pos_q = torch.arange(q_start, q_start + t_q, device=device)
    pos_k = torch.arange(kv_start, kv_start + s_k, device=device)
    phase_q = pos_q.to(cdt)[:, None] * w  # [T, K], exact positions (< 2^24) in fp32
    phase_k = pos_k.to(cdt)[:, None] * w  # [S, K]
    cos_q, sin_q = torch.cos(phase_q), torch.sin(phase_q)
    coef_a, coef_b = coeffs.A.to(cdt), coeffs.B.to(cdt)
    q_feats = [coef_a * cos_q + coef_b * sin_q, coef_a * sin_q - coef_b * cos_q]
    k_feats = [torch.cos(phase_k), torch.sin(phase_k)]
    if terms.slope:
        scales = torch.tensor([16.0**p for p in range(_SLOPE_DIGITS)], dtype=cdt, device=device)
        digits = torch.stack([(pos_k // 256**p) % 256 for p in range(_SLOPE_DIGITS)], dim=-1)
        k_feats.append(digits.to(cdt) * scales)
        q_feats.append(-coeffs.c.to(cdt)[..., None] * scales)
    qf = (torch.cat(q_feats, dim=-1) * mult).to(q.dtype)  # [B, H, T, F]
    kf = torch.cat(k_feats, dim=-1).to(k.dtype).expand(bsz, h_kv, s_k, -1)  # [B, H_kv, S, F]
    width = qk_width(dim, num_freqs, terms.slope, align)
    if pad_v:
        width = max(width, _round_up(v.shape[-1], align))
    pad = width - dim - qf.shape[-1]
    q_aug = torch.cat([q, qf, q.new_zeros(bsz, heads, t_q, pad)], dim=-1)
    k_aug = torch.cat([k, kf, k.new_zeros(bsz, h_kv, s_k, pad)], dim=-1)
    v_aug = F.pad(v, (0, width - v.shape[-1])) if pad_v else v
    return q_aug, k_aug, v_aug, float(scale)


class SpectralBias(nn.Module):
    """The SCOPE spectral bias of one attention layer (see the module docstring for the math).

    ``coefficients`` runs the pointer head; ``terms`` packs coefficients with the layer's frequencies, beta,
    slope switch and ramp for the functions above (``bias``, ``score_mod``, ``qk_augment`` and ``qk_width``
    are those functions with this layer's settings).
    """

    def __init__(self, config: ScopeConfig) -> None:
        super().__init__()
        self.config = config
        self.pointer_head = PointerHead(config)
        # python floats (float64), turned into tensors on use: a buffer would follow module.to(bf16)
        # Scales the ramp per head; 0 at init so a fresh model's bias is exactly zero with a ramp too.
        self.ramp_gate = nn.Parameter(torch.zeros(config.num_heads)) if config.has_ramp else None
        self.freqs: tuple[float, ...] = tuple(
            frequencies(config.num_freqs, config.l_max, config.min_period).tolist()
        )

    def _w(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        return _freqs(self.freqs, dtype, device)

    def amplitudes(self, params: PointerParams) -> Tensor:
        """a_mk [B, H, T, M, K] = gain_h * normalised_k exp(-(log w_k - mu_m)^2 / (2 sigma_m^2))."""
        dtype = params.mu.dtype
        logw = self._w(torch.float64, params.mu.device).log().to(dtype)
        z = -((logw - params.mu[..., None]) ** 2) / (2 * params.sigma[..., None] ** 2)
        gain = self.pointer_head.gain.to(dtype)[:, None, None, None]  # [H, 1, 1, 1]
        return gain * torch.softmax(z, dim=-1)

    def coefficients(self, q: Tensor, step: int | None = None) -> BiasCoefficients:
        """Per-row coefficients from q [B, H, T, D] (float32; float64 for float64 q).

        A_k = sum_m pi_m a_mk cos(w_k D*_m), B_k = sum_m pi_m a_mk sin(w_k D*_m); c the slope;
        d_star_main = D* of argmax_m pi_m (ties to the lower m). ``step`` selects delta_max from the
        config's schedule (None: the final value).
        """
        params = self.pointer_head(q, step)
        a = self.amplitudes(params)  # [B, H, T, M, K]
        w = self._w(a.dtype, a.device)
        phase = params.d_star[..., None] * w  # [B, H, T, M, K]
        weighted = params.pi[..., None] * a
        coef_a = (weighted * torch.cos(phase)).sum(dim=-2)
        coef_b = (weighted * torch.sin(phase)).sum(dim=-2)
        main = params.pi.argmax(dim=-1, keepdim=True)
        d_star_main = params.d_star.gather(-1, main).squeeze(-1)
        return BiasCoefficients(coef_a, coef_b, params.slope, d_star_main, params)

    def terms(self, coeffs: BiasCoefficients) -> BiasTerms:
        """``coeffs`` with this layer's frequencies, beta, slope switch (c_scale > 0) and ramp (when configured)."""
        cfg = self.config
        ramp = None if self.ramp_gate is None else Ramp(self.ramp_gate, cfg.gate_kind, cfg.ramp_lambda,
                                                         cfg.ramp_width, cfg.ramp_tau)
        return BiasTerms(coeffs, self.freqs, cfg.beta, cfg.c_scale > 0, ramp)

    def bias(self, coeffs: BiasCoefficients, delta: Tensor) -> Tensor:
        """``dense_bias`` of this layer's terms: b_i(delta) [B, H, T, N] without beta."""
        return dense_bias(self.terms(coeffs), delta)

    def score_mod(self, coeffs: BiasCoefficients, *, q_offset: int = 0) -> ScoreMod:
        """``bias_score_mod`` of this layer's terms."""
        return bias_score_mod(self.terms(coeffs), q_offset=q_offset)

    def qk_augment(
        self, q: Tensor, k: Tensor, v: Tensor, coeffs: BiasCoefficients, scale: float, *, q_start: int = 0,
        kv_start: int = 0, pad_v: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor, float]:
        """``qk_augment`` of this layer's terms, aligned to config.qk_align."""
        return qk_augment(q, k, v, self.terms(coeffs), scale, align=self.config.qk_align, q_start=q_start,
                          kv_start=kv_start, pad_v=pad_v)

    def qk_width(self, dim: int) -> int:
        """``qk_width`` with this layer's K, slope switch and alignment."""
        cfg = self.config
        return qk_width(dim, cfg.num_freqs, cfg.c_scale > 0, cfg.qk_align)

    def regularisers(self, coeffs: BiasCoefficients, seq_len: int) -> dict[str, Tensor]:
        """Regularisers, each raw (``<name>_raw``, for logging) and times its lambda (``<name>``); ``total``
        is the sum of the weighted ones. Scalars in the coefficients' dtype.

        Rows of ``coeffs`` are the last T queries of a sequence of ``seq_len`` tokens (row t at absolute
        position i = seq_len - T + t; seq_len = T for a full prefill); row i's causal keys are Delta = 0..i.

        - hf: mean over (B, H, T, M) of sum_k (w_k / w_K)^2 a_mk^2. Frequencies are divided by the
          largest, w_K = 2 pi / min_period, so the value is in the scale of a^2 whatever min_period is.
        - zero_mean: mean over (B, H, T) of (mean_{Delta=0..i} b_i(Delta))^2, in closed form (geometric
          sums of cos / sin), O(B H T K). The ramp is left out: it is a non-negative penalty by
          construction, so its row mean is never 0 and including it would only pull D*_main.
        - entropy: mean over (B, H, T) of relu(entropy_floor_frac * log M - H(pi)), H in nats.
        - edge: mean over (B, H, T, M) of softplus(r - r0) + softplus(-r - r0), r the D* logit and
          r0 = EDGE_LOGIT = 4: a smooth barrier that grows linearly in r once D* is within ~1.8% of 0
          or of delta_max (its gradient does not vanish where sigmoid(r) saturates).
        """
        cfg = self.config
        params = coeffs.params
        coef_a, coef_b, c = coeffs.A, coeffs.B, coeffs.c
        dtype, device = coef_a.dtype, coef_a.device
        t_q = coef_a.shape[-2]
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < t_q:
            raise ScopeInputError(f"seq_len must be an int >= T={t_q} (rows are the last T queries), got {seq_len!r}")
        w = self._w(dtype, device)
        a = self.amplitudes(params)
        hf = ((w / w[-1]) ** 2 * a**2).sum(-1).mean()

        n = torch.arange(seq_len - t_q + 1, seq_len + 1, device=device).to(dtype)[:, None]  # keys per row [T, 1]
        half = w / 2
        denom = torch.sin(half)
        safe = denom.abs() > 1e-6
        ratio = torch.where(safe, torch.sin(n * half) / torch.where(safe, denom, 1.0), n)  # [T, K]
        sum_cos = ratio * torch.cos((n - 1) * half)
        sum_sin = torch.where(safe, ratio * torch.sin((n - 1) * half), 0.0)
        row_mean = (coef_a * sum_cos + coef_b * sum_sin).sum(-1) / n[:, 0] - coef_a.sum(-1) + c * (n[:, 0] - 1) / 2
        zero_mean = (row_mean**2).mean()

        m = params.pi.shape[-1]
        ent = -torch.special.xlogy(params.pi, params.pi).sum(-1)
        entropy = F.relu(cfg.entropy_floor_frac * math.log(m) - ent).mean()

        r = params.d_star_logit
        edge = (F.softplus(r - EDGE_LOGIT) + F.softplus(-r - EDGE_LOGIT)).mean()

        raw = {"hf": hf, "zero_mean": zero_mean, "entropy": entropy, "edge": edge}
        lambdas = {"hf": cfg.lambda_hf, "zero_mean": cfg.lambda_zero_mean, "entropy": cfg.lambda_entropy,
                   "edge": cfg.lambda_edge}
        out: dict[str, Tensor] = {}
        for name, value in raw.items():
            out[f"{name}_raw"] = value
            out[name] = lambdas[name] * value
        out["total"] = out["hf"] + out["zero_mean"] + out["entropy"] + out["edge"]
        return out


def _round_up(x: int, align: int) -> int:
    return -(-x // align) * align


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ScopeInputError(
            "q, k, v must be 4-d [B, H, T, D] / [B, H_kv, S, D]; "
            f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape[0] != q.shape[0] or k.shape[-1] != q.shape[-1]:
        raise ScopeInputError(f"k must be [B, H_kv, S, D] matching q {tuple(q.shape)} in B and D, got {tuple(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ScopeInputError(f"v must be [B, H_kv, S, Dv] matching k {tuple(k.shape)}, got {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ScopeInputError(f"query heads H={q.shape[1]} must be a multiple of kv heads H_kv={k.shape[1]}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ScopeInputError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
