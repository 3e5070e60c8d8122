"""Host-side values of the Triton launchers' arguments, in plain Python: grid and tile sizes, the q.k dot's split,
the dot precision. Shared by nsa's and scope's launchers.

``triton.cdiv`` and ``triton.next_power_of_2`` are ``constexpr_function`` objects: a host call goes through
Triton's wrapper (argument unwrapping, a list and a dict per call). The launchers make ~80 such calls per NSA
layer's forward + backward, ~3 ms of an eager GPT step's host time on the H100's host (cProfile of
``bench_prefill --gpt-profile``, thirty-fifth session); ``cdiv`` and ``next_power_of_2`` here give the same values
for any int.
"""

from __future__ import annotations

import torch


def cdiv(numerator: int, denominator: int) -> int:
    """ceil(numerator / denominator) for a positive denominator."""
    return -(-numerator // denominator)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (0 for n <= 0, as triton.next_power_of_2)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def split_dims(dqk: int, dv: int) -> dict[str, int]:
    """The q.k dot as two power-of-two dots: D1 = the largest power of two <= dqk (at least 16, tl.dot's
    smallest K; loads zero the columns past dqk), D2 = the rest rounded up to a power of two >= 16, or 0.
    So d_k = 192 costs 128 + 64 columns, not 256. BLOCK_DV: d_v rounded up to a power of two >= 16."""
    d1 = max(16, 1 << (dqk.bit_length() - 1))
    rest = max(0, dqk - d1)
    d2 = 0 if rest == 0 else max(16, next_power_of_2(rest))
    return {"DQK": dqk, "D1": d1, "D2": d2, "DV": dv, "BLOCK_DV": max(16, next_power_of_2(dv))}


def dot_precision(dtype: torch.dtype) -> str:
    """float32 dots follow torch.get_float32_matmul_precision() as cuBLAS and FlexAttention do: "highest" (torch's
    default) is full precision, "high" / "medium" allow TF32. 16-bit inputs ignore it."""
    return "ieee" if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest" else "tf32"
