"""The launchers' plain-Python integer helpers give Triton's own values (triton.cdiv / triton.next_power_of_2,
called on the host, are the reference)."""

import triton
from hypothesis import given, settings
from hypothesis import strategies as st

from nsa.kernels.launch_args import cdiv, next_power_of_2


def test_next_power_of_2_matches_triton_on_every_small_int_and_around_each_power():
    values = [*range(-3, 4100), *(2**e + off for e in range(12, 63) for off in (-1, 0, 1))]
    assert [next_power_of_2(n) for n in values] == [triton.next_power_of_2(n) for n in values]


@settings(max_examples=300, derandomize=True, deadline=None)
@given(st.integers(-(2**40), 2**40), st.integers(1, 2**20))
def test_cdiv_matches_triton(numerator, denominator):
    assert cdiv(numerator, denominator) == triton.cdiv(numerator, denominator)
