"""bench.model_query_unions counts the unions the selection's several-token programs walk: checked against unions
taken by plain loops."""

from __future__ import annotations

import pytest

from bench.model_query_unions import random_selection, union_shares


@pytest.mark.parametrize(("seq_len", "tokens", "group"), [(1000, 4, 16), (777, 8, 16), (640, 16, 4)])
def test_union_shares_match_unions_by_plain_loops(seq_len, tokens, group):
    indices = random_selection(seq_len, seed=seq_len)
    rows = [[b for b in row if b >= 0] for row in indices[:, 0].tolist()]
    reads = sum(len(row) for row in rows)
    union = sum(len(set().union(*rows[start:start + tokens])) for start in range(0, seq_len, tokens))
    assert union_shares(indices, tokens, group) == pytest.approx((union / reads, union * tokens / reads))


def test_a_program_shape_the_kernels_do_not_run_is_refused():
    with pytest.raises(ValueError, match="not a program"):
        union_shares(random_selection(200), tokens=2, group=4)  # 8 rows: padded to 4 tokens (16 rows)
