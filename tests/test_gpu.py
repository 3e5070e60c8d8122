"""CUDA checks at realistic shapes (marker `gpu`; run on the device with `pytest -m gpu`)."""

from __future__ import annotations

import pytest
import torch

from nsa import NSAAttention, NSAConfig, naive_nsa_attention, nsa_attention, num_compressed_blocks

pytestmark = pytest.mark.gpu

SIZES = dict(block_size=32, block_stride=16, sel_block_size=64, num_selected=16, window_size=512)


def _inputs(seq_len: int, heads: int, kv_heads: int, dim: int, device: str, dtype: torch.dtype) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    num_cmp = num_compressed_blocks(seq_len, 32, 16)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)

    q = rand(1, seq_len, heads, dim)
    kv = [rand(1, n, kv_heads, dim) for n in (num_cmp, num_cmp, seq_len, seq_len, seq_len, seq_len)]
    gates = torch.rand(1, seq_len, heads, 3, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    return [q, *kv, gates]


def test_cuda_bf16_matches_float64_within_bf16_error() -> None:
    """bf16 on the GPU vs the float64 dense reference, bounded by the dense bf16 reference's own error
    (the same math rounded to bf16 inputs) times a small factor: both round q, k, v identically."""
    args64 = _inputs(2048, 16, 2, 64, "cpu", torch.float64)
    ref = naive_nsa_attention(*args64, **SIZES).output
    args_bf16 = [a.to("cuda", torch.bfloat16) for a in args64]
    fast = nsa_attention(*args_bf16, **SIZES).output.double().cpu()
    naive_bf16 = naive_nsa_attention(*[a.cpu() for a in args_bf16], **SIZES).output.double()
    own_error = (naive_bf16 - ref).abs().max().item()
    assert (fast - ref).abs().max().item() <= 4 * own_error + 1e-3


def test_cuda_decode_matches_prefill() -> None:
    torch.manual_seed(0)
    config = NSAConfig(hidden_size=256, num_heads=8, num_kv_heads=2, head_dim=32, head_dim_v=32)
    layer = NSAAttention(config).cuda()
    x = torch.randn(2, 1500, config.hidden_size, device="cuda")
    with torch.no_grad():
        full = layer(x)
        cache = layer.new_cache(2, 1600)
        prefix = layer(x[:, :1200], cache=cache)
        steps = torch.cat([layer(x[:, t:t + 1], cache=cache) for t in range(1200, 1500)], dim=1)
    torch.testing.assert_close(torch.cat((prefix, steps), dim=1), full, rtol=2e-4, atol=2e-4)
