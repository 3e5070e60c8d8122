"""NSA.md invariant 6: torch.autograd.gradcheck in float64 on small shapes for every differentiable
path (the fast ops, the naive_* ops, phi, the whole module). Shapes include rows that see no
compressed block / no selected token (their gradient must be 0, not NaN)."""

from __future__ import annotations

import pytest
import torch
from conftest import F64, Shape, make_raw_inputs, randn
from reference import ref_compress_mean, ref_select
from torch.autograd import gradcheck
from torch.func import functional_call

from nsa import (
    CompressPool,
    NSAAttention,
    NSAConfig,
    compress_mean_pool,
    compressed_attention,
    naive_compressed_attention,
    naive_nsa_attention,
    naive_selected_attention,
    naive_sliding_window_attention,
    nsa_attention,
    selected_attention,
    sliding_window_attention,
)

# l=4, d=2, l'=4, n=3, w=3, G=2, d_k=4 != d_v=3, T=11 (not a multiple of any block size).
S = Shape(B=1, T=11, HQ=4, Hkv=2, Dk=4, Dv=3, l=4, d=2, lp=4, n=3, w=3, seed=123)


def _inputs(s: Shape = S) -> dict:
    x = make_raw_inputs(s)
    x["k_cmp"] = ref_compress_mean(x.pop("k_c"), s.l, s.d)
    x["v_cmp"] = ref_compress_mean(x.pop("v_c"), s.l, s.d)
    return {name: val.clone().requires_grad_(True) for name, val in x.items()}


@pytest.mark.parametrize("op", [compressed_attention, naive_compressed_attention], ids=lambda f: f.__name__)
def test_gradcheck_compressed_attention(op):
    x = _inputs()

    def fn(q, k_cmp, v_cmp):
        return op(q, k_cmp, v_cmp, S.l, S.d)[0]

    assert gradcheck(fn, (x["q"], x["k_cmp"], x["v_cmp"]))
    # Rows t < l - 1 see no block: zero output and an exactly zero (finite) gradient for their q.
    out = fn(x["q"], x["k_cmp"], x["v_cmp"])
    (grad_q,) = torch.autograd.grad(out.sum(), x["q"])
    assert torch.isfinite(grad_q).all()
    assert torch.equal(grad_q[:, : S.l - 1], torch.zeros_like(grad_q[:, : S.l - 1]))


@pytest.mark.parametrize("op", [selected_attention, naive_selected_attention], ids=lambda f: f.__name__)
def test_gradcheck_selected_attention(op):
    x = _inputs()
    idx, _ = ref_select(x["q"].detach(), x["k_cmp"].detach(), S.l, S.d, S.lp, S.n)
    idx[:, 5, 0] = -1  # one empty row (group 0 at t=5): zero output, zero gradient

    def fn(q, k, v):
        return op(q, k, v, idx, S.lp)

    assert gradcheck(fn, (x["q"], x["k_sel"], x["v_sel"]))


@pytest.mark.parametrize(
    "op", [sliding_window_attention, naive_sliding_window_attention], ids=lambda f: f.__name__
)
def test_gradcheck_sliding_window(op):
    x = _inputs()

    def fn(q, k, v):
        return op(q, k, v, S.w)

    assert gradcheck(fn, (x["q"], x["k_win"], x["v_win"]))


@pytest.mark.parametrize("op", [nsa_attention, naive_nsa_attention], ids=lambda f: f.__name__)
def test_gradcheck_nsa_attention(op):
    """All float inputs incl. gates. Selection is piecewise constant in q and k_cmp; with this fixed
    seed no block ranking is within gradcheck's eps (1e-6) of a tie, so the check is exact."""
    x = _inputs()
    names = ["q", "k_cmp", "v_cmp", "k_sel", "v_sel", "k_win", "v_win", "gates"]

    def fn(*args):
        return op(*args, **S.kw()).output

    assert gradcheck(fn, tuple(x[n] for n in names))


def test_nsa_selection_carries_no_gradient():
    """With only the selection gate on, k_cmp gets no gradient (selection is not differentiable)."""
    x = _inputs()
    gates = torch.zeros_like(x["gates"])
    gates[..., 1] = 1.0
    out = nsa_attention(
        x["q"], x["k_cmp"], x["v_cmp"], x["k_sel"], x["v_sel"], x["k_win"], x["v_win"], gates, **S.kw()
    )
    assert not out.block_indices.requires_grad
    g = torch.autograd.grad(out.output.sum(), x["k_cmp"], allow_unused=True)[0]
    assert g is None or torch.equal(g, torch.zeros_like(g))


def test_gradcheck_compress_mean_pool():
    x = randn(2, 11, 2, 3, seed=4).requires_grad_(True)
    assert gradcheck(lambda t: compress_mean_pool(t, 4, 2), (x,))
    assert gradcheck(lambda t: compress_mean_pool(t, 3, 3), (x,))


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Perturb every parameter (some layers start at zero) so every gradient path is non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=F64) * 0.3)


def test_gradcheck_compress_pool_mlp():
    pool = CompressPool(3, 4, 2, kind="mlp", hidden=5).double()
    _randomise(pool, 1)
    names = [n for n, _ in pool.named_parameters()]
    assert names, "mlp phi must have learnable parameters"
    params = tuple(p.detach().clone().requires_grad_(True) for _, p in pool.named_parameters())
    x = randn(1, 9, 2, 3, seed=2).requires_grad_(True)

    def fn(x, *ps):
        return functional_call(pool, dict(zip(names, ps, strict=True)), (x,))

    assert gradcheck(fn, (x, *params))


@pytest.mark.parametrize("compression", ["mean", "mlp"])
@pytest.mark.parametrize("shared_kv", [False, True])
def test_gradcheck_module_parameters(compression, shared_kv):
    cfg = NSAConfig(
        hidden_size=6, num_heads=4, num_kv_heads=2, head_dim=4, head_dim_v=2, cmp_block_size=4,
        cmp_stride=2, sel_block_size=4, num_selected=3, window_size=3, compression=compression,
        compression_hidden=3, shared_kv=shared_kv,
    )
    torch.manual_seed(0)
    mod = NSAAttention(cfg).double()
    _randomise(mod, 7)
    names = [n for n, _ in mod.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for _, p in mod.named_parameters())
    x = randn(1, 10, 6, seed=3).requires_grad_(True)

    def fn(x, *ps):
        return functional_call(mod, dict(zip(names, ps, strict=True)), (x,))

    assert gradcheck(fn, (x, *params), fast_mode=True)
    # Every parameter receives a (non-None) gradient.
    grads = torch.autograd.grad(fn(x, *params).square().sum(), params, allow_unused=True)
    missing = [n for n, g in zip(names, grads, strict=True) if g is None]
    assert not missing, missing
