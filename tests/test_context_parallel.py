"""Context parallelism (nsa.context_parallel, scope.context_parallel): a sequence split over P = 2, 3, 4 ranks
(gloo, CPU, float64) gives each rank its rows of the single-process result, forward and gradients.

One spawn of 4 worker processes runs every case: the groups of P = 2 and 3 are subgroups of the 4 ranks, so
the collectives also run on groups other than the default one. Each worker computes the single-process
result itself (the inputs come from fixed seeds) and compares its rows; the NSA op is also checked against
the dense float64 reference of tests/reference.py (selection and output). Lengths are prime (37) or 11 blocks,
so no split, block size or stride divides them, and the split chunks are shorter than the window and the
compressed block: the window's edge and the blocks' raw keys come from several ranks. Also: a sequence shorter
than one compressed block, planted NaN / inf (the rows poisoned and every other row and gradient as in one
process), training with Gumbel draws, and arguments rejected on one rank only. Causality (the NSA op and layer, the
SCOPE op and layer): with every input row at a position >= a cut replaced by garbage (random values in one batch
row, NaN / inf in the other; cuts inside blocks, on several ranks' shards), every output row before the cut, on
whichever rank holds it, is bitwise the clean run's, and so are the gradients from a loss over those rows; every
row after the cut changes. The rendezvous store listens on a port the OS picks (bound to 0 in this process: no
race); a hang fails after TIMEOUT_S.
"""

from __future__ import annotations

import copy
import datetime
import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import TOL64, rand, randn
from reference import dense_nsa, dense_selection_scores, ref_topn

from nsa import NSAAttention, NSAConfig, NSAInputError, nsa_attention
from nsa.block_index import num_compressed_blocks
from nsa.context_layout import ContextLayout
from nsa.context_parallel import nsa_attention_context_parallel, nsa_layer_context_parallel
from scope import ScopeConfig, ScopeInputError
from scope.context_parallel import scope_attention_context_parallel, scope_layer_context_parallel
from scope.functional import scope_attention
from scope.pointer_mask import PointerMask, build_pointer_block_mask
from scope.scope_attention import ScopeAttention, causal_representative_positions
from scope.spectral_bias import BiasCoefficients, BiasTerms, Ramp

WORLD = 4
SIZES = (2, 3, 4)
LAYOUTS = ("contiguous", "zigzag")
TIMEOUT_S = 180  # the whole run takes ~30 s on 2 shared cores

B, T = 2, 37
NSA_SIZES: dict[str, Any] = dict(block_size=8, block_stride=4, sel_block_size=8, num_selected=4, window_size=6)
SHORT_SIZES: dict[str, Any] = dict(block_size=16, block_stride=8, sel_block_size=8, num_selected=3, window_size=4)
SCOPE_BLOCK, SCOPE_BLOCKS = 4, 11


def _layout(kind: str, length: int, world_size: int, unit: int = 1) -> ContextLayout:
    return getattr(ContextLayout, kind)(length, world_size, unit=unit)


def _compare(failures: list[str], name: str, got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal within float64 rounding, NaN where the expected value is NaN (non-finite cases)."""
    if got.shape != expected.shape or not torch.allclose(got, expected, **TOL64, equal_nan=True):
        error = (got - expected).nan_to_num(1.0).abs().max().item() if got.shape == expected.shape else "shape"
        failures.append(f"{name}: max error {error}")


def _loss(out: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """sum(out * dy) over the finite rows (NaN rows of the non-finite cases carry no gradient)."""
    return (out.nan_to_num(0.0, 0.0, 0.0) * dy).sum()


def _check_planted(failures: list[str], nonfinite: bool, whole_output: torch.Tensor) -> None:
    """A non-finite case must poison some rows and leave most finite (else it tests nothing)."""
    poisoned = whole_output.isnan().any(-1).float().mean()
    if nonfinite and not 0 < poisoned < 0.5:
        failures.append(f"the planted values poison {poisoned:.0%} of the rows")


def _grad(x: torch.Tensor) -> torch.Tensor:
    """x's gradient; zeros where none reached it (k_cmp without compressed blocks)."""
    return x.grad if x.grad is not None else torch.zeros_like(x)


def _leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_() for t in tensors]


def _nsa_inputs(length: int = T, sizes: dict[str, Any] = NSA_SIZES, nonfinite: bool = False) -> list[torch.Tensor]:
    """nsa_attention's 8 inputs; with ``nonfinite`` (length T), a NaN in q, a selection key, a compressed value and an
    inf in a window value (rows on several ranks read them)."""
    num_cmp = num_compressed_blocks(length, sizes["block_size"], sizes["block_stride"])
    inputs = [randn(B, length, 4, 8, seed=1), randn(B, num_cmp, 2, 8, seed=2), randn(B, num_cmp, 2, 6, seed=3),
              randn(B, length, 2, 8, seed=4), randn(B, length, 2, 6, seed=5), randn(B, length, 2, 8, seed=6),
              randn(B, length, 2, 6, seed=7), rand(B, length, 4, 3, seed=8)]
    if nonfinite:
        inputs[0][0, 30, 2, 0] = inputs[3][0, 9, 1, 2] = inputs[2][1, 3, 0, 1] = float("nan")
        inputs[6][1, 20, 0, 1] = float("inf")
    return inputs


NSA_INPUTS = ("q", "k_cmp", "v_cmp", "k_sel", "v_sel", "k_win", "v_win", "gates")


def _nsa_row_layouts(layout: ContextLayout, sizes: dict[str, Any] = NSA_SIZES) -> list[ContextLayout]:
    """The layouts of nsa_attention's 8 inputs: the compressed blocks' for k_cmp / v_cmp, the tokens' otherwise."""
    cmp_layout = layout.compressed(sizes["block_size"], sizes["block_stride"])
    return [layout, cmp_layout, cmp_layout] + [layout] * 5


def case_nsa_op(layout: ContextLayout, rank: int, group: dist.ProcessGroup | None, nonfinite: bool = False,
                sizes: dict[str, Any] = NSA_SIZES) -> list[str]:
    """The op: every tensor input's gradient, the block indices, and (finite inputs) the dense reference."""
    failures: list[str] = []
    inputs, dy = _nsa_inputs(layout.length, sizes, nonfinite), randn(B, layout.length, 4, 6, seed=9)
    whole = _leaves(*inputs)
    out, indices = nsa_attention(*whole, **sizes, query_chunk_size=5, backend="torch")
    _loss(out, dy).backward()
    _check_planted(failures, nonfinite, out)
    row_layouts = _nsa_row_layouts(layout, sizes)
    local = _leaves(*(lay.shard(x, rank) for lay, x in zip(row_layouts, inputs, strict=True)))
    out_r, indices_r = nsa_attention_context_parallel(*local, **sizes, layout=layout, group=group,
                                                      query_chunk_size=3)
    _loss(out_r, layout.shard(dy, rank)).backward()
    _compare(failures, "output", out_r, layout.shard(out, rank))
    if not torch.equal(indices_r, layout.shard(indices, rank)):
        failures.append("block indices differ from nsa_attention's")
    for name, lay, x, x_r in zip(NSA_INPUTS, row_layouts, whole, local, strict=True):
        _compare(failures, f"grad {name}", _grad(x_r), lay.shard(_grad(x), rank))
    if nonfinite:
        return failures
    scores = dense_selection_scores(inputs[0], inputs[1], sizes["block_size"], sizes["block_stride"],
                                    sizes["sel_block_size"])
    ref_indices = ref_topn(scores, sizes["sel_block_size"], sizes["num_selected"])
    if not torch.equal(indices_r, layout.shard(ref_indices, rank)):
        failures.append("block indices differ from the reference selection")
    args = [*inputs, ref_indices]  # a list: mypy takes no f(*xs, y)
    dense = dense_nsa(*args, **{k: v for k, v in sizes.items() if k != "num_selected"})
    _compare(failures, "output vs dense reference", out_r, layout.shard(dense, rank))
    return failures


def _nsa_layer() -> NSAAttention:
    config = NSAConfig(hidden_size=16, num_heads=4, num_kv_heads=2, head_dim=8, head_dim_v=6, cmp_block_size=8,
                       cmp_stride=4, sel_block_size=8, num_selected=4, window_size=6, compression="mlp",
                       compression_hidden=8, query_chunk_size=4, backend="torch")
    layer = NSAAttention(config).double()
    with torch.no_grad():  # every parameter random (the MLP phi's output layer starts at zero otherwise)
        for seed, p in enumerate(layer.parameters()):
            p.copy_(randn(*p.shape, seed=100 + seed, scale=0.4))
    return layer


LayerT = TypeVar("LayerT", bound=torch.nn.Module)


def _layer_case(layer: LayerT, x: torch.Tensor, layout: ContextLayout, rank: int,
                group: dist.ProcessGroup | None, run_local: Callable[[LayerT, torch.Tensor], torch.Tensor],
                run_whole: Callable[[LayerT, torch.Tensor], torch.Tensor], nonfinite: bool) -> list[str]:
    """A layer on the whole x against its context-parallel run on this rank's rows: y, x's gradient and every
    parameter's gradient (summed over the ranks). ``nonfinite``: x holds a NaN and an inf token."""
    failures: list[str] = []
    local_layer = copy.deepcopy(layer)
    if nonfinite:
        x = x.clone()
        x[0, 13, 3], x[1, 26, 0] = float("nan"), float("-inf")
    dy = randn(*x.shape, seed=11)
    x_whole, x_local = _leaves(x, layout.shard(x, rank))
    y = run_whole(layer, x_whole)
    _loss(y, dy).backward()
    _check_planted(failures, nonfinite, y)
    y_r = run_local(local_layer, x_local)
    _loss(y_r, layout.shard(dy, rank)).backward()
    _compare(failures, "y", y_r, layout.shard(y, rank))
    assert x_local.grad is not None and x_whole.grad is not None
    _compare(failures, "grad x", x_local.grad, layout.shard(x_whole.grad, rank))
    for (name, p), p_r in zip(layer.named_parameters(), local_layer.parameters(), strict=True):
        grad = _grad(p_r)
        dist.all_reduce(grad, group=group)
        _compare(failures, f"grad {name}", grad, _grad(p))
    return failures


def case_nsa_layer(layout: ContextLayout, rank: int, group: dist.ProcessGroup | None,
                   nonfinite: bool = False) -> list[str]:
    return _layer_case(_nsa_layer(), randn(B, T, 16, seed=10), layout, rank, group,
                       lambda layer, x: nsa_layer_context_parallel(layer, x, layout=layout, group=group),
                       lambda layer, x: layer(x), nonfinite)


SCOPE_T = SCOPE_BLOCK * SCOPE_BLOCKS
SCOPE_DOCS = torch.tensor([0] * 14 + [1] * 19 + [2] * (SCOPE_T - 33))  # boundaries inside blocks


def _scope_mask(d_blk: torch.Tensor, u_blk: torch.Tensor) -> PointerMask:
    """The pointer mask of the SCOPE op's cases from block-level D* and budget logits [B, 4, SCOPE_BLOCKS, 2]."""
    t_rep = causal_representative_positions(SCOPE_BLOCKS, SCOPE_BLOCK, "last", torch.device("cpu"))
    return build_pointer_block_mask(d_blk, u_blk, SCOPE_T, block=SCOPE_BLOCK, budget=2, local_blocks=2,
                                    global_blocks=1, max_radius=1, doc_ids=SCOPE_DOCS, t_rep=t_rep)


def _scope_op_inputs() -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """The SCOPE op's 8 tensor inputs (q, k, v, A, B, c, d_star_main [B, H, T, ...], the ramp gate [H]) and the
    block-level D* and budget logits of its mask."""
    heads, kv_heads, dim, num_freqs = 4, 2, 8, 3
    rows = (B, heads, SCOPE_T)
    inputs = [randn(B, heads, SCOPE_T, dim, seed=22), randn(B, kv_heads, SCOPE_T, dim, seed=23),
              randn(B, kv_heads, SCOPE_T, 6, seed=24), randn(*rows, num_freqs, seed=25, scale=0.5),
              randn(*rows, num_freqs, seed=26, scale=0.5), randn(*rows, seed=27, scale=0.1),
              rand(*rows, seed=28) * 20, rand(heads, seed=29)]
    d_blk = rand(B, heads, SCOPE_BLOCKS, 2, seed=20) * 30
    return inputs, d_blk, randn(*d_blk.shape, seed=21)


def _scope_op_run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                  c: torch.Tensor, d_main: torch.Tensor, gate: torch.Tensor, *, mask: PointerMask,
                  attend: Callable[..., torch.Tensor]) -> torch.Tensor:
    """case_scope_op's call: ``attend`` (scope_attention or its context-parallel twin) with every bias term."""
    bias = BiasTerms(BiasCoefficients(a, b, c, d_main, None), (0.05, 0.3, 1.1), 0.8, True,  # type: ignore[arg-type]
                     Ramp(gate, "softplus", 0.5, 6.0, 2.0))
    return attend(q, k, v, mask, block=SCOPE_BLOCK, bias=bias, doc_ids=SCOPE_DOCS)


def case_scope_op(layout: ContextLayout, rank: int, group: dist.ProcessGroup | None,
                  nonfinite: bool = False) -> list[str]:
    """The op with every bias term (spectral, slope, ramp) and documents; gradients of q, k, v and the bias.
    ``nonfinite``: a NaN in q, k and a bias coefficient, an inf in v."""
    failures: list[str] = []
    inputs, d_blk, u_blk = _scope_op_inputs()
    mask = _scope_mask(d_blk, u_blk)
    if nonfinite:
        inputs[0][0, 1, 30, 2] = inputs[1][1, 0, 9, 4] = inputs[3][1, 3, 21, 0] = float("nan")
        inputs[2][0, 1, 17, 5] = float("inf")
    dy = randn(B, inputs[0].shape[1], SCOPE_T, 6, seed=30)
    run = functools.partial(_scope_op_run, mask=mask)
    whole = _leaves(*inputs)
    out = run(*whole, attend=lambda *a, **kw: scope_attention(*a, **kw, backend="torch"))
    _loss(out, dy).backward()
    _check_planted(failures, nonfinite, out)
    local = _leaves(*(layout.shard(x, rank, dim=2) for x in inputs[:-1]), inputs[-1])
    out_r = run(*local, attend=lambda *a, **kw: scope_attention_context_parallel(*a, **kw, layout=layout,
                                                                                  group=group))
    _loss(out_r, layout.shard(dy, rank, dim=2)).backward()
    _compare(failures, "output", out_r, layout.shard(out.detach(), rank, dim=2))
    for name, x, x_r in zip(("q", "k", "v", "A", "B", "c", "d_star_main"), whole, local, strict=False):
        assert x_r.grad is not None and x.grad is not None
        _compare(failures, f"grad {name}", x_r.grad, layout.shard(x.grad, rank, dim=2))
    assert local[-1].grad is not None and whole[-1].grad is not None
    gate_grad = local[-1].grad.clone()
    dist.all_reduce(gate_grad, group=group)
    _compare(failures, "grad ramp gate", gate_grad, whole[-1].grad)
    return failures


def _scope_layer(**overrides: object) -> ScopeAttention:
    values: dict[str, object] = dict(
        hidden_size=16, num_heads=4, num_kv_heads=2, head_dim=8, num_pointers=2, num_freqs=3, l_max=4096.0,
        min_period=8.0, delta_max=30.0, mlp_hidden=8, block=SCOPE_BLOCK, budget=2, local_blocks=2, global_blocks=1,
        max_radius=1, c_scale=0.2, gate_kind="softplus", ramp_lambda=0.5, ramp_width=6.0, ramp_tau=2.0,
        backend="torch")
    values.update(overrides)
    layer = ScopeAttention(ScopeConfig(**values)).double()  # type: ignore[arg-type]
    with torch.no_grad():  # every parameter random: the bias (gain, ramp gate) starts at zero otherwise
        for seed, p in enumerate(layer.parameters()):
            p.copy_(randn(*p.shape, seed=200 + seed, scale=0.5))
    return layer


def case_scope_layer(layout: ContextLayout, rank: int, group: dist.ProcessGroup | None,
                     nonfinite: bool = False) -> list[str]:
    """Eval with documents and the last-token representative."""
    return _layer_case(_scope_layer().eval(), randn(B, SCOPE_T, 16, seed=31), layout, rank, group,
                       lambda layer, x: scope_layer_context_parallel(layer, x, layout=layout, group=group,
                                                                     doc_ids=SCOPE_DOCS),
                       lambda layer, x: layer(x, doc_ids=SCOPE_DOCS), nonfinite)


def case_scope_layer_gumbel(layout: ContextLayout, rank: int, group: dist.ProcessGroup | None) -> list[str]:
    """Training with Gumbel top-k (the same seeded draws on every rank) and the mean representative."""

    def generator() -> torch.Generator:
        return torch.Generator().manual_seed(5)

    return _layer_case(_scope_layer(gumbel_topk=1, representative="mean").train(), randn(B, SCOPE_T, 16, seed=32),
                       layout, rank, group,
                       lambda layer, x: scope_layer_context_parallel(layer, x, layout=layout, group=group,
                                                                     generator=generator()),
                       lambda layer, x: layer(x, generator=generator()), False)


class _Rows(NamedTuple):
    """An input of a causality case: its rows along ``dim`` stand for the whole-sequence positions ``times`` (a
    compressed block for its last token, a query block's pointer parameters for its first; None: not positional,
    never garbage), and each rank passes ``layout``'s shard of it (None: the whole tensor)."""

    name: str
    dim: int
    times: torch.Tensor | None = None
    layout: ContextLayout | None = None


def _garbage(x: torch.Tensor, dim: int, dirty: torch.Tensor, nonfinite_row: int, seed: int) -> torch.Tensor:
    """x with its rows along ``dim`` where ``dirty`` [B, N] replaced: by NaN, inf and -inf (a whole row each, in
    turn) in batch row ``nonfinite_row``, by random values of ``seed`` in the other batch row."""
    y = x.detach().movedim(dim, 1)
    trailing = [1] * (y.dim() - 2)
    cycle = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=x.dtype)[torch.arange(y.shape[1]) % 3]
    garbage = torch.where((torch.arange(y.shape[0]) == nonfinite_row).view(-1, 1, *trailing),
                          cycle.view(1, -1, *trailing), randn(*y.shape, seed=seed, scale=3.0))
    return torch.where(dirty.view(*dirty.shape, *trailing), garbage, y).movedim(1, dim)


def _causality_case(layout: ContextLayout, rank: int, cuts: tuple[int, int],
                    run: Callable[[list[torch.Tensor]], list[torch.Tensor]], inputs: list[torch.Tensor],
                    rows: list[_Rows], out_dim: int, params: dict[str, torch.Tensor] | None = None) -> list[str]:
    """Causality under context parallelism. In batch row b every input row standing for a position >= cuts[b] is
    replaced by garbage (_garbage: NaN / inf in batch row P mod 2, so each cut meets both kinds over P = 2, 3, 4;
    random values in the other), and ``run`` (this rank's shards -> its outputs, rows along ``out_dim``, the first
    differentiable) runs clean and garbled. The rows before the cut, wherever the layout puts them, must be
    bitwise equal to the clean run's (every output: nsa.nonfinite's contract, masked entries meet probabilities
    that are exactly 0), and so must the gradients from a loss over those rows alone: of the input rows before
    the cut, of the inputs that are not positional, and of ``params``. Every row after the cut must change (else
    the garbage tests nothing)."""
    failures: list[str] = []
    params = params or {}
    cut = torch.tensor(cuts)[:, None]
    nonfinite_row = layout.world_size % 2
    garbled = [x if r.times is None else _garbage(x, r.dim, r.times >= cut, nonfinite_row, seed=60 + i)
               for i, (x, r) in enumerate(zip(inputs, rows, strict=True))]
    keep = layout.positions(rank) < cut  # [B, T_r]: this rank's rows before the cut
    runs = []
    for tensors in (inputs, garbled):
        local = _leaves(*(x if r.layout is None else r.layout.shard(x, rank, r.dim)
                          for x, r in zip(tensors, rows, strict=True)))
        outs = [out.movedim(out_dim, 1) for out in run(local)]
        dy = randn(*outs[0].shape, seed=61) * keep.view(*keep.shape, *[1] * (outs[0].dim() - 2))
        grads = torch.autograd.grad(_loss(outs[0], dy), [*local, *params.values()], allow_unused=True,
                                    materialize_grads=True)
        runs.append(([out.detach() for out in outs], grads))
    (clean, clean_grads), (dirty, dirty_grads) = runs
    for i, (out, out_clean) in enumerate(zip(dirty, clean, strict=True)):
        if not torch.equal(out[keep], out_clean[keep]):
            failures.append(f"output {i}: rows before the cut differ from the clean run's")
    unchanged = int((dirty[0] == clean[0]).flatten(2).all(-1)[~keep].sum())
    if unchanged:
        failures.append(f"the garbage left {unchanged} row(s) after the cut unchanged")
    for r, grad, grad_clean in zip([*rows, *(_Rows(name, 0) for name in params)], dirty_grads, clean_grads,
                                   strict=True):
        if r.times is not None:  # the rows before the cut
            times = r.times if r.layout is None else r.times[r.layout.positions(rank)]
            grad, grad_clean = (g.movedim(r.dim, 1)[times < cut] for g in (grad, grad_clean))
        if not torch.equal(grad, grad_clean):
            failures.append(f"grad {r.name}: differs from the clean run's")
    return failures


NSA_CUTS = (13, 23)  # T = 37: no block size, stride, window or query chunk divides them; several ranks hold garbage
SCOPE_CUTS = (17, 30)  # SCOPE_T = 44: inside query blocks (of 4) and inside documents


def case_nsa_op_causal(layout: ContextLayout, rank: int, group: dist.ProcessGroup | None) -> list[str]:
    """Causality of the op (_causality_case): its output and block indices, the gradients of all 8 inputs."""
    l, d = NSA_SIZES["block_size"], NSA_SIZES["block_stride"]
    tokens, blocks = torch.arange(T), torch.arange(num_compressed_blocks(T, l, d)) * d + l - 1
    rows = [_Rows(name, 1, blocks if name in ("k_cmp", "v_cmp") else tokens, lay)
            for name, lay in zip(NSA_INPUTS, _nsa_row_layouts(layout), strict=True)]

    def run(local: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(nsa_attention_context_parallel(*local, **NSA_SIZES, layout=layout, group=group,
                                                   query_chunk_size=3))

    return _causality_case(layout, rank, NSA_CUTS, run, _nsa_inputs(), rows, 1)


def case_nsa_layer_causal(layout: ContextLayout, rank: int, group: dist.ProcessGroup | None) -> list[str]:
    """Causality of the layer (_causality_case): y, the gradients of x and of every parameter (this rank's share)."""
    layer = _nsa_layer()

    def run(local: list[torch.Tensor]) -> list[torch.Tensor]:
        return [nsa_layer_context_parallel(layer, local[0], layout=layout, group=group)]

    return _causality_case(layout, rank, NSA_CUTS, run, [randn(B, T, 16, seed=10)],
                           [_Rows("x", 1, torch.arange(T), layout)], 1, dict(layer.named_parameters()))


def case_scope_op_causal(layout: ContextLayout, rank: int, group: dist.ProcessGroup | None) -> list[str]:
    """Causality of the op (_causality_case) with every bias term and documents; the pointer mask's lists of the
    query blocks wholly after the cut are garbage too (their block-level D* and budget logits), so the ranks
    fetch other key blocks."""
    inputs, d_blk, u_blk = _scope_op_inputs()
    tokens, query_blocks = torch.arange(SCOPE_T), torch.arange(SCOPE_BLOCKS) * SCOPE_BLOCK
    rows = [*(_Rows(name, 2, tokens, layout) for name in ("q", "k", "v", "A", "B", "c", "d_star_main")),
            _Rows("ramp gate", 0), _Rows("block D*", 2, query_blocks), _Rows("block budget logits", 2, query_blocks)]
    attend = functools.partial(scope_attention_context_parallel, layout=layout, group=group)

    def run(local: list[torch.Tensor]) -> list[torch.Tensor]:
        *tensors, d_star, logits = local
        return [_scope_op_run(*tensors, mask=_scope_mask(d_star, logits), attend=attend)]

    return _causality_case(layout, rank, SCOPE_CUTS, run, [*inputs, d_blk, u_blk], rows, 2)


def case_scope_layer_causal(layout: ContextLayout, rank: int, group: dist.ProcessGroup | None) -> list[str]:
    """Causality of the layer (_causality_case, eval, documents): y, the gradients of x and of every parameter."""
    layer = _scope_layer().eval()

    def run(local: list[torch.Tensor]) -> list[torch.Tensor]:
        return [scope_layer_context_parallel(layer, local[0], layout=layout, group=group, doc_ids=SCOPE_DOCS)]

    return _causality_case(layout, rank, SCOPE_CUTS, run, [randn(B, SCOPE_T, 16, seed=31)],
                           [_Rows("x", 1, torch.arange(SCOPE_T), layout)], 1, dict(layer.named_parameters()))


def case_errors(layout: ContextLayout, rank: int, group: dist.ProcessGroup | None) -> list[str]:
    """A bad argument on one rank raises a typed error on every rank (none is left in a collective)."""
    failures: list[str] = []
    inputs = [lay.shard(x, rank) for lay, x in zip(_nsa_row_layouts(layout), _nsa_inputs(), strict=True)]
    if rank == 1:
        inputs[7] = inputs[7][..., :2]  # gates with 2 branches
    failures += _expect_rejection(functools.partial(nsa_attention_context_parallel, *inputs, **NSA_SIZES,
                                                    layout=layout, group=group), NSAInputError, "gates", rank)
    try:
        nsa_attention_context_parallel(*inputs, **NSA_SIZES, layout=ContextLayout.contiguous(T, layout.world_size + 1),
                                       group=group)
        failures.append("a layout for another number of ranks was accepted")
    except NSAInputError as err:
        if "but the group has" not in str(err):
            failures.append(f"unexpected message: {err}")
    # rank 1's token rows one longer than its share of the layout, then its compressed blocks one more
    for grown, words in (((0, 3, 4, 5, 6, 7), "rows of the layout"), ((1, 2), "compressed blocks")):
        local = [lay.shard(x, rank) for lay, x in zip(_nsa_row_layouts(layout), _nsa_inputs(), strict=True)]
        if rank == 1:
            local = [torch.cat((x, x[:, :1]), dim=1) if i in grown else x for i, x in enumerate(local)]
        call = functools.partial(nsa_attention_context_parallel, *local, **NSA_SIZES, layout=layout, group=group)
        failures += _expect_rejection(call, NSAInputError, words, rank)
    x = randn(B, layout.local_length(rank) + (rank == 1), 16, seed=35)
    failures += _expect_rejection(lambda: nsa_layer_context_parallel(_nsa_layer(), x, layout=layout, group=group),
                                  NSAInputError, "rows of the layout", rank)
    failures += _scope_op_rejection(layout, rank, group)
    x = randn(B, layout.local_length(rank), 16, seed=33)
    try:
        scope_layer_context_parallel(_scope_layer(), x, layout=layout, group=group)
        failures.append("a layout in rows that are not whole blocks was accepted")
    except ScopeInputError as err:
        if "whole query blocks" not in str(err) and "rejected" not in str(err):
            failures.append(f"unexpected message: {err}")
    blocks = ContextLayout.contiguous(SCOPE_BLOCK * SCOPE_BLOCKS, layout.world_size, unit=SCOPE_BLOCK)
    x = randn(B, blocks.local_length(rank), 16, seed=34)
    for bad in ("step", "dtype"):  # checked before the ranks agree, on rank 1 only
        scope_call = functools.partial(scope_layer_context_parallel, _scope_layer(),
                                       x.float() if bad == "dtype" and rank == 1 else x, layout=blocks, group=group,
                                       step=-1 if bad == "step" and rank == 1 else 0)
        failures += _expect_rejection(scope_call, ScopeInputError, bad, rank)
    return failures


def _expect_rejection(call: Callable[[], object], error: type[Exception], words: str, rank: int) -> list[str]:
    """[] if ``call`` raises ``error`` naming ``words`` on rank 1 and the other ranks' "rank(s) [1] rejected"."""
    try:
        call()
    except error as err:
        expected = words if rank == 1 else "rank(s) [1] rejected"
        return [] if expected in str(err) else [f"unexpected message: {err}"]
    return [f"a bad argument on rank 1 was accepted ({words})"]


def _scope_op_rejection(layout: ContextLayout, rank: int, group: dist.ProcessGroup | None) -> list[str]:
    """scope_attention_context_parallel with a query block more than rank 1's share of the layout (in whole blocks)."""
    blocks = ContextLayout.contiguous(SCOPE_T, layout.world_size, unit=SCOPE_BLOCK)
    d_blk = rand(B, 4, SCOPE_BLOCKS, 2, seed=36) * 30
    mask = build_pointer_block_mask(d_blk, randn(*d_blk.shape, seed=37), SCOPE_T, block=SCOPE_BLOCK, budget=2,
                                    local_blocks=2, global_blocks=1, max_radius=1)
    rows = blocks.local_length(rank) + SCOPE_BLOCK * (rank == 1)
    q, k, v = (randn(B, heads, rows, 8, seed=38 + heads) for heads in (4, 2, 1))
    v = v.expand(B, 2, rows, 8)
    return _expect_rejection(lambda: scope_attention_context_parallel(q, k, v, mask, block=SCOPE_BLOCK, layout=blocks,
                                                                      group=group),
                             ScopeInputError, "rows of the layout", rank)


CASES: dict[str, tuple[Callable[[ContextLayout, int, dist.ProcessGroup | None], list[str]], int, int]] = {
    "nsa_op": (case_nsa_op, T, 1),
    "nsa_op_nonfinite": (functools.partial(case_nsa_op, nonfinite=True), T, 1),
    # T < l: no compressed block at all (zero cmp output, selection of the forced blocks only)
    "nsa_op_short": (functools.partial(case_nsa_op, sizes=SHORT_SIZES), 9, 1),
    "nsa_layer": (case_nsa_layer, T, 1),
    "nsa_layer_nonfinite": (functools.partial(case_nsa_layer, nonfinite=True), T, 1),
    "scope_op": (case_scope_op, SCOPE_T, SCOPE_BLOCK),
    "scope_op_nonfinite": (functools.partial(case_scope_op, nonfinite=True), SCOPE_T, SCOPE_BLOCK),
    "scope_layer": (case_scope_layer, SCOPE_T, SCOPE_BLOCK),
    "scope_layer_nonfinite": (functools.partial(case_scope_layer, nonfinite=True), SCOPE_T, SCOPE_BLOCK),
    "scope_layer_gumbel": (case_scope_layer_gumbel, SCOPE_T, SCOPE_BLOCK),
    "nsa_op_causal": (case_nsa_op_causal, T, 1),
    "nsa_layer_causal": (case_nsa_layer_causal, T, 1),
    "scope_op_causal": (case_scope_op_causal, SCOPE_T, SCOPE_BLOCK),
    "scope_layer_causal": (case_scope_layer_causal, SCOPE_T, SCOPE_BLOCK),
    "errors": (case_errors, T, 1),
}


def _worker(rank: int, port: int, out_dir: str) -> None:
    """Rank ``rank`` of WORLD: every case for every P it belongs to; the failures as JSON (an exception ends the
    worker, and the fixture's join raises it)."""
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=TIMEOUT_S)
    store = dist.TCPStore("127.0.0.1", port, WORLD, is_master=False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD, timeout=timeout)
    groups = {size: dist.new_group(list(range(size))) for size in SIZES[:-1]}
    results: dict[str, list[str]] = {}
    for size in SIZES:
        if rank >= size:
            continue
        for kind in LAYOUTS:
            for name, (case, length, unit) in CASES.items():  # an exception ends the worker and the test
                results[f"{name}-{size}-{kind}"] = case(_layout(kind, length, size, unit), rank, groups.get(size))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, list[str]]]:
    out_dir = tmp_path_factory.mktemp("context_parallel")
    store = dist.TCPStore("127.0.0.1", 0, WORLD + 1, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=TIMEOUT_S))
    context = mp.spawn(_worker, args=(store.port, str(out_dir)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.terminate()
                process.join()
            pytest.fail(f"context-parallel workers did not finish in {TIMEOUT_S} s (a collective hung)")
    return {rank: json.loads(Path(out_dir, f"rank{rank}.json").read_text()) for rank in range(WORLD)}


@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("case", list(CASES))
def test_context_parallel_equals_single_process(worker_results: dict[int, dict[str, list[str]]], case: str,
                                                size: int, kind: str) -> None:
    failures = {rank: worker_results[rank][f"{case}-{size}-{kind}"] for rank in range(size)}
    assert failures == {rank: [] for rank in range(size)}


@pytest.mark.parametrize(("kind", "length", "world_size", "unit", "expected"), [
    ("contiguous", 10, 3, 1, (((0, 4),), ((4, 7),), ((7, 10),))),
    ("zigzag", 10, 2, 1, (((0, 3), (8, 10)), ((3, 6), (6, 8)))),
    ("zigzag", 44, 2, 4, (((0, 12), (36, 44)), ((12, 24), (24, 36)))),
])
def test_layouts(kind: str, length: int, world_size: int, unit: int, expected: tuple) -> None:
    layout = _layout(kind, length, world_size, unit)
    assert layout.segments == expected
    rows = torch.cat([layout.positions(r) for r in range(world_size)])
    assert torch.equal(rows.sort().values, torch.arange(length))
    owner, local = layout.owners(torch.arange(length))
    for r in range(world_size):
        assert torch.equal(local[owner == r].sort().values, torch.arange(layout.local_length(r)))
        assert torch.equal(layout.positions(r)[local[owner == r]], torch.arange(length)[owner == r])


def test_compressed_layout_gives_each_block_to_the_owner_of_its_last_token() -> None:
    layout = ContextLayout.zigzag(37, 3)
    blocks = layout.compressed(8, 4)
    last_tokens = torch.arange(blocks.length) * 4 + 7
    assert torch.equal(blocks.owners(torch.arange(blocks.length))[0], layout.owners(last_tokens)[0])


# segments of the wrong types on purpose (the checks under test)
FLOAT_SEGMENTS: Any = (((0, 2.5), (2.5, 4)),)
LIST_SEGMENTS: Any = ([(0, 4)],)


@pytest.mark.parametrize(("call", "message"), [
    (lambda: ContextLayout.zigzag(7, 4), "fewer than the 8 chunks"),
    (lambda: ContextLayout.contiguous(10, 2, unit=4), "multiple of unit"),
    (lambda: ContextLayout(5, (((0, 2),), ((3, 5),))), "exactly once"),
    (lambda: ContextLayout(5, (((2, 5), (0, 2)),)), "ascending"),
    (lambda: ContextLayout(4, FLOAT_SEGMENTS), "int pairs"),
    (lambda: ContextLayout(4, LIST_SEGMENTS), "int pairs"),
    (lambda: ContextLayout.contiguous(4, 1).positions(1), r"rank must be an int in \[0, world_size=1\)"),
    (lambda: ContextLayout.contiguous(4, 1).positions(-1), "rank must be"),
    (lambda: ContextLayout.contiguous(4, 1).local_length(True), "rank must be"),
])
def test_bad_layouts_raise(call: Callable[[], ContextLayout], message: str) -> None:
    with pytest.raises(NSAInputError, match=message):
        call()


def test_bad_layout_and_group_arguments_are_named() -> None:
    """Checked before the process group is asked anything (no group is initialised here)."""
    inputs = _nsa_inputs()
    with pytest.raises(NSAInputError, match="layout must be a ContextLayout"):
        nsa_attention_context_parallel(*inputs, **NSA_SIZES, layout=13)  # type: ignore[arg-type]
    with pytest.raises(NSAInputError, match=r"group must be a torch\.distributed ProcessGroup"):
        nsa_attention_context_parallel(*inputs, **NSA_SIZES, layout=ContextLayout.contiguous(T, 1),
                                       group="x")  # type: ignore[arg-type]
