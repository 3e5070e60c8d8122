"""NSAAttention module: aux outputs obey the selection rules and gate definitions, query chunking
does not change results, and float64 / float32 agree. (Causality and gradcheck of the module are in
test_inv_causality.py and test_inv_gradcheck.py.)"""

from __future__ import annotations

import pytest
import torch
from conftest import F64, randn
from reference import ref_candidate_blocks, ref_forced_blocks

from nsa import NSAAttention, NSAAux, NSAConfig

TINY = {
    "hidden_size": 12, "num_heads": 4, "num_kv_heads": 2, "head_dim": 6, "head_dim_v": 4,
    "cmp_block_size": 4, "cmp_stride": 2, "sel_block_size": 4, "num_selected": 4, "window_size": 5,
}


def _module(**over) -> NSAAttention:
    torch.manual_seed(0)
    m = NSAAttention(NSAConfig(**{**TINY, **over})).double()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=F64) * 0.2)
    return m


@pytest.mark.parametrize("gate", ["sigmoid", "softmax"])
@pytest.mark.parametrize("compression", ["mean", "mlp"])
def test_module_aux(gate, compression):
    m = _module(gate=gate, compression=compression)
    x = randn(2, 23, 12, seed=3)
    y, aux = m(x, return_aux=True)
    assert isinstance(aux, NSAAux)
    assert y.shape == (2, 23, 12) and y.dtype == F64
    assert torch.equal(m(x), y)
    assert aux.gates.shape == (2, 23, 4, 3)
    assert bool(((aux.gates > 0) & (aux.gates < 1)).all())
    # NSA.md: g = sigmoid(W x_t + b) per query head and branch (softmax over the three branches as the option);
    # gate_proj's output is [HQ, 3] per token, head-major
    logits = (x @ m.gate_proj.weight.T + m.gate_proj.bias).view(2, 23, 4, 3)
    want = torch.sigmoid(logits) if gate == "sigmoid" else torch.softmax(logits, dim=-1)
    torch.testing.assert_close(aux.gates, want, rtol=1e-12, atol=1e-12)
    idx = aux.block_indices
    assert idx.shape == (2, 23, 2, 4) and idx.dtype == torch.int64
    lp, n = TINY["sel_block_size"], TINY["num_selected"]
    for b in range(2):
        for t in range(23):
            forced = set(ref_forced_blocks(t, lp))
            cands = set(ref_candidate_blocks(t, -(-23 // lp), lp))
            for g in range(2):
                row = idx[b, t, g].tolist()
                valid = [j for j in row if j >= 0]
                assert row == valid + [-1] * (n - len(valid)), (b, t, g, row)
                assert valid == sorted(set(valid))
                assert forced <= set(valid) <= forced | cands, (t, row)
                assert len(valid) == min(n, len(forced) + len(cands))


@pytest.mark.parametrize("chunk", [1, 3, 4, 7])
def test_module_query_chunking_is_invisible(chunk):
    x = randn(1, 19, 12, seed=5)
    base, aux = _module()(x, return_aux=True)
    out, aux2 = _module(query_chunk_size=chunk)(x, return_aux=True)
    torch.testing.assert_close(out, base, rtol=1e-10, atol=1e-10)
    assert torch.equal(aux2.block_indices, aux.block_indices)


def test_module_float32_close_to_float64():
    """Parameters and input rounded to fp32; all three branches read every block (n large, w >= T),
    so the selection cannot flip and the outputs must agree to fp32 accuracy."""
    m64 = _module(num_selected=8, window_size=32)
    m32 = _module(num_selected=8, window_size=32).float()
    with torch.no_grad():
        for p64, p32 in zip(m64.parameters(), m32.parameters(), strict=True):
            p64.copy_(p32.double())
    x = randn(2, 21, 12, seed=9).float()
    y64 = m64(x.double())
    y32 = m32(x)
    assert y32.dtype == torch.float32
    # ~60 fp32 roundings along the deepest path on O(1) values: 1e-5 is ~100 eps32 of headroom.
    torch.testing.assert_close(y32.double(), y64, rtol=1e-5, atol=1e-5)
