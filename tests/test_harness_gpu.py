"""CUDA checks of the harness's own attention paths at the 16k comparison's shapes (marker `gpu`): the banded
sliding window and SCOPE's teacher targets, each against a dense computation of its definition."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sal_harness.model import banded_window_attention
from scope.teacher import teacher_block_targets

pytestmark = pytest.mark.gpu


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).cuda()


def test_banded_window_matches_the_dense_band_within_bf16_error() -> None:
    """16k tokens, 6 query heads on 2 kv heads of 64, w = 512 (window_16k): bf16 outputs and gradients no further
    from a float32 dense-mask computation than that computation's own bf16 run is."""
    seq_len, window = 16384, 512
    q, k, v = _randn(1, 6, seq_len, 64, seed=0), _randn(1, 2, seq_len, 64, seed=1), _randn(1, 2, seq_len, 64, seed=2)
    weights = _randn(1, 6, seq_len, 64, seed=3)
    i = torch.arange(seq_len, device="cuda")
    band = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)

    def run(fn, dtype: torch.dtype) -> list[torch.Tensor]:
        inputs = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*inputs)
        grads = torch.autograd.grad((out.float() * weights).sum(), inputs)
        return [out.float(), *(g.float() for g in grads)]

    def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=band, enable_gqa=True)

    reference = run(dense, torch.float32)
    dense_bf16 = run(dense, torch.bfloat16)
    banded = run(lambda q, k, v: banded_window_attention(q, k, v, window), torch.bfloat16)
    for name, want, got, ref_bf16 in zip(("o", "dq", "dk", "dv"), reference, banded, dense_bf16, strict=True):
        assert torch.isfinite(got).all(), name
        bound = 2 * (ref_bf16 - want).abs().max() + 1e-3 * want.abs().max()
        assert (got - want).abs().max() <= bound, name
    banded32 = run(lambda q, k, v: banded_window_attention(q, k, v, window), torch.float32)
    for name, want, got in zip(("o", "dq", "dk", "dv"), reference, banded32, strict=True):
        torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-4, msg=name)


@pytest.mark.parametrize("first", [0, 1024])
def test_teacher_targets_match_dense_float64_probabilities(first: int) -> None:
    """32 sequences of 2k tokens (the curriculum's batch at that length), 6 heads on 2 kv heads of 96 (SCOPE's
    q.k width with the spectral columns), blocks of 128, 4 local, the query rows from ``first`` on against the
    whole prefix: the fused target against the [T, T] float64 softmax summed per key block."""
    batch, heads, kv_heads, seq_len, block, local = 32, 6, 2, 2048, 128, 4
    q, k = _randn(batch, heads, seq_len, 96, seed=4), _randn(batch, kv_heads, seq_len, 96, seed=5)
    got = teacher_block_targets(q[:, :, first:], k, block=block, local_blocks=local, scale=96**-0.5)
    blocks = seq_len // block
    expected = torch.empty(batch, heads, blocks, blocks, dtype=torch.float64, device="cuda")
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device="cuda").tril()
    kb, qb = torch.arange(blocks, device="cuda")[None, :], torch.arange(blocks, device="cuda")[:, None]
    for b in range(batch):  # one sequence at a time: [H, T, T] float64 is 200 MB
        keys = k[b].double().repeat_interleave(heads // kv_heads, dim=0)
        probs = ((q[b].double() @ keys.transpose(-1, -2)) * 96**-0.5).masked_fill(~causal, float("-inf")).softmax(-1)
        mass = probs.unflatten(2, (blocks, block)).sum(-1).unflatten(1, (blocks, block)).mean(2) * (kb <= qb - local)
        total = mass.sum(-1, keepdim=True)
        expected[b] = torch.where(total > 0, mass / total.clamp_min(1e-300), 0.0)
    torch.testing.assert_close(got.double(), expected[:, :, first // block:], rtol=1e-4, atol=1e-5)
