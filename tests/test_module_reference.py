"""NSAAttention end to end against a float64 reference written from NSA.md and the layer's documented choices
(PRD.md): projections, RoPE at absolute positions on q and the selection / window keys, phi over *raw* keys (mean
pooling, or mean plus an MLP over the block's tokens with an intra-block position encoding) rotated at the block
centre i*d + (l-1)/2, gates from a linear map of x_t, the three branches by tests/reference.py's loops, o_proj.

The reference reads the layer's weights as plain tensors and nothing else of nsa: the layout it assumes for them is
the layer's contract (k_proj / v_proj rows: branch sets cmp, sel, win, each H_kv heads of D; gate_proj rows: per
query head, the branches cmp, sel, win)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import F64, TOL64, randn
from reference import ref_nsa, ref_rope
from test_decode import make_layer

from nsa import NSAAttention, NSAConfig

TINY = {
    "hidden_size": 10, "num_heads": 6, "num_kv_heads": 2, "head_dim": 6, "head_dim_v": 4,
    "cmp_block_size": 4, "cmp_stride": 2, "sel_block_size": 4, "num_selected": 3, "window_size": 5,
}


def _layer(**over) -> NSAAttention:
    """A float64 layer of TINY's settings and ``over`` whose every weight is random (test_decode.make_layer: phi's
    MLP output layer, zero at init, included, so the MLP's term shows)."""
    return make_layer(NSAConfig(**{**TINY, **over}), seed=0)


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _phi(raw: torch.Tensor, weights: dict[str, torch.Tensor], prefix: str, c: NSAConfig) -> torch.Tensor:
    """raw [T, Hkv, D] -> [num_cmp(T), Hkv, D]: block i = tokens [i*d, i*d + l); the mean, plus for "mlp"
    W2 gelu(W1 z + b1) + b2 with z the block's tokens in order, each plus its position row, concatenated."""
    l, d = c.cmp_block_size, c.cmp_stride
    num = 0 if raw.shape[0] < l else (raw.shape[0] - l) // d + 1
    out = torch.zeros(num, raw.shape[1], raw.shape[2], dtype=F64)
    for i in range(num):
        for h in range(raw.shape[1]):
            block = raw[i * d:i * d + l, h]  # [l, D]
            out[i, h] = block.sum(dim=0) / l
            if c.compression == "mlp":
                z = (block + weights[f"{prefix}.position"]).reshape(-1)
                hidden = _gelu(weights[f"{prefix}.mlp.0.weight"] @ z + weights[f"{prefix}.mlp.0.bias"])
                out[i, h] += weights[f"{prefix}.mlp.2.weight"] @ hidden + weights[f"{prefix}.mlp.2.bias"]
    return out


def _reference_sequence(layer: NSAAttention, x: torch.Tensor) -> torch.Tensor:
    """y [T, hidden] of one sequence x [T, hidden], positions 0 .. T - 1."""
    c, w = layer.config, {name: t.detach() for name, t in layer.state_dict().items()}
    seq_len, hkv, dk, dv = x.shape[0], c.num_kv_heads, c.head_dim, c.head_dim_v
    sets = 1 if c.shared_kv else 3
    positions = torch.arange(seq_len, dtype=F64)
    q = ref_rope((x @ w["q_proj.weight"].T).view(1, seq_len, c.num_heads, dk), positions, c.rope_theta)[0]
    k = (x @ w["k_proj.weight"].T).view(seq_len, sets, hkv, dk)
    v = (x @ w["v_proj.weight"].T).view(seq_len, sets, hkv, dv)
    k_cmp_raw, k_sel_raw, k_win_raw = (k[:, 0], k[:, 0], k[:, 0]) if sets == 1 else k.unbind(1)
    v_cmp, v_sel, v_win = (v[:, 0], v[:, 0], v[:, 0]) if sets == 1 else v.unbind(1)
    k_sel, k_win = (ref_rope(t[None], positions, c.rope_theta)[0] for t in (k_sel_raw, k_win_raw))
    k_cmp = _phi(k_cmp_raw, w, "compress_k", c)
    centres = torch.arange(k_cmp.shape[0], dtype=F64) * c.cmp_stride + (c.cmp_block_size - 1) / 2
    k_cmp = ref_rope(k_cmp[None], centres, c.rope_theta)[0]
    v_cmp = _phi(v_cmp, w, "compress_v", c)
    logits = (x @ w["gate_proj.weight"].T + w["gate_proj.bias"]).view(seq_len, c.num_heads, 3)
    gates = logits.sigmoid() if c.gate == "sigmoid" else logits.softmax(dim=-1)
    o, _ = ref_nsa(q[None], k_cmp[None], v_cmp[None], k_sel[None], v_sel[None], k_win[None], v_win[None], gates[None],
                   block_size=c.cmp_block_size, block_stride=c.cmp_stride, sel_block_size=c.sel_block_size,
                   num_selected=c.num_selected, window_size=c.window_size, scale=c.scale)
    return o[0].reshape(seq_len, c.num_heads * dv) @ w["o_proj.weight"].T


@pytest.mark.parametrize(("over", "seq_len"), [
    ({}, 19),                                                    # the MLP phi, sigmoid gates, three K/V sets
    ({"compression": "mean"}, 19),                               # mean pooling
    ({"gate": "softmax", "shared_kv": True}, 17),                # one K/V set for every branch
    ({"head_dim": 8, "head_dim_v": 8, "num_kv_heads": 6}, 13),   # d_k = d_v, G = 1
    ({"rope_theta": 500.0, "scale": 0.3}, 21),                   # the configured RoPE base and attention scale
    ({}, 3),                                                     # T < l: no compressed block at all
])
def test_layer_matches_the_float64_reference(over, seq_len):
    layer = _layer(**over)
    x = randn(2, seq_len, TINY["hidden_size"], seed=3)
    want = torch.stack([_reference_sequence(layer, x[b]) for b in range(2)])
    torch.testing.assert_close(layer(x), want, **TOL64)


def test_packed_sequences_match_the_float64_reference_per_sequence():
    """cu_seqlens: positions restart at 0 in each sequence and no token reads across a boundary."""
    layer = _layer()
    lengths = [9, 14, 3]
    x = randn(1, sum(lengths), TINY["hidden_size"], seed=4)
    cu = torch.tensor([0, 9, 23, 26])
    pieces = x[0].split(lengths)
    want = torch.cat([_reference_sequence(layer, piece) for piece in pieces])[None]
    torch.testing.assert_close(layer(x, cu_seqlens=cu), want, **TOL64)
