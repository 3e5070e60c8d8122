"""Integer arithmetic of the launchers' grids and tile sizes, in plain Python.

``triton.cdiv`` and ``triton.next_power_of_2`` are ``constexpr_function`` objects: a host call goes through
Triton's wrapper (argument unwrapping, a list and a dict per call). The launchers make ~80 such calls per NSA
layer's forward + backward, ~3 ms of an eager GPT step's host time on the H100's host (cProfile of
``bench_prefill --gpt-profile``, thirty-fifth session); these give the same values for any int.
"""

from __future__ import annotations


def cdiv(numerator: int, denominator: int) -> int:
    """ceil(numerator / denominator) for a positive denominator."""
    return -(-numerator // denominator)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (0 for n <= 0, as triton.next_power_of_2)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0
