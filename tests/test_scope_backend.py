"""ScopeAttention's attention backend: the Triton block-sparse kernels inside the layer (CPU: Triton
interpreter) against the float64 dense reference of tests/test_scope_attention.py, the choice rules
(config errors, refusals that name the reason, what "auto" picks), and the CPU training path (the dense
torch path, chosen where FlexAttention has no backward) with its refusals."""

from __future__ import annotations

import logging

import pytest
import torch
from test_scope_attention import allowed_from_lists, dense_reference, make_layer, small_config

import nsa.dispatch
from scope import ScopeConfig, ScopeInputError, scope_attention_backend
from scope.errors import ScopeConfigError
from scope.scope_attention import ScopeAttention

F64 = torch.float64


def layer_pair(bias_impl: str) -> tuple[ScopeAttention, ScopeAttention]:
    """The same weights twice: float32 with backend="triton", float64 for the reference."""
    config = small_config(head_dim=16, hidden_size=64, block=16, bias_impl=bias_impl, backend="triton", c_scale=0.2)
    torch.manual_seed(0)
    layer = ScopeAttention(config).eval()
    with torch.no_grad():
        layer.spectral.pointer_head.gain.fill_(0.7)
    reference = ScopeAttention(config).double().eval()
    reference.load_state_dict({name: t.double() for name, t in layer.state_dict().items()})
    return layer, reference


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.detach().double() - ref.detach()).norm() / ref.detach().norm())


@pytest.mark.parametrize("bias_impl", ["qk_aug", "none"])
def test_triton_layer_forward_and_backward_match_float64_reference(bias_impl: str) -> None:
    """float32 kernels vs float64: every op is a short sum of O(1) terms, so relative errors stay near
    float32's epsilon (1.2e-7) times a few hundred; 2e-5 leaves margin and still catches a wrong block
    (an O(1) change of its rows) or a wrong gradient term."""
    layer, reference = layer_pair(bias_impl)
    x = torch.randn(2, 64, 64, dtype=F64, generator=torch.Generator().manual_seed(1))
    dy = torch.randn(x.shape, dtype=F64, generator=torch.Generator().manual_seed(2))
    x32 = x.float().requires_grad_(True)
    y, aux = layer(x32, return_aux=True)
    allowed = allowed_from_lists(aux.pointer_mask.kv_indices, 4)
    assert not bool(allowed.all())  # the lists really skip blocks
    params = {n: p for n, p in layer.named_parameters() if bias_impl == "qk_aug" or not n.startswith("spectral.")}
    grads = torch.autograd.grad(y, [x32, *params.values()], dy.float())
    x64 = x.clone().requires_grad_(True)
    ref_params = dict(reference.named_parameters())
    y64 = dense_reference(reference, x64, allowed)
    grads64 = torch.autograd.grad(y64, [x64, *(ref_params[n] for n in params)], dy)
    assert rel(y, y64) < 2e-5
    for name, g, g64 in zip(["x", *params], grads, grads64, strict=True):
        assert rel(g, g64) < 2e-5, name


def test_triton_backend_refuses_what_it_cannot_run() -> None:
    with pytest.raises(ScopeConfigError, match=r"backend='triton'.*bias_impl"):
        ScopeConfig(backend="triton", bias_impl="score_mod")
    with pytest.raises(ScopeConfigError, match="backend='cuda' must be one of"):
        ScopeConfig(backend="cuda", bias_impl="qk_aug")
    layer, _ = layer_pair("qk_aug")
    x = torch.randn(1, 32, 64)
    with pytest.raises(ScopeInputError, match="document masks run in FlexAttention"):
        layer(x, doc_ids=torch.zeros(1, 32, dtype=torch.long))
    small = ScopeAttention(small_config(block=8, bias_impl="none", backend="triton"))
    with pytest.raises(ScopeInputError, match="block=8 is not a power of two >= 16"):
        small(torch.randn(1, 32, 32))


def auto_choice(config: ScopeConfig, dtype: torch.dtype) -> str:
    """What "auto" picks for a prefill of this config (no gradients: the CPU's Flex needs none)."""
    layer = ScopeAttention(config)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, config.num_heads, 32, config.head_dim, generator=gen).to(dtype)
    k = v = torch.randn(1, config.num_kv_heads, 32, config.head_dim, generator=gen).to(dtype)
    with torch.no_grad():
        bias = None if config.bias_impl == "none" else layer.spectral.terms(layer.spectral.coefficients(q))
        return scope_attention_backend(q, k, v, block=config.block, bias=bias, qk_align=config.qk_align,
                                       bias_impl="qk_aug" if config.bias_impl == "qk_aug" else "score_mod").name


@pytest.mark.parametrize(("overrides", "expected"), [
    (dict(bias_impl="qk_aug", head_dim=16, num_freqs=12), "triton"),  # q.k width 16 + 24 -> 48
    (dict(bias_impl="qk_aug", head_dim=16, num_freqs=8), "flex"),  # 16 + 16 = 32, a power of two
    (dict(bias_impl="none", head_dim=16), "flex"),
    (dict(bias_impl="none", head_dim=24), "triton"),
    (dict(bias_impl="score_mod", head_dim=24), "flex"),
    (dict(bias_impl="qk_aug", head_dim=16, num_freqs=12, block=8), "flex"),
])
def test_auto_takes_triton_only_where_flex_pads_the_width(monkeypatch: pytest.MonkeyPatch, overrides: dict,
                                                          expected: str) -> None:
    """With the device obstacles out of the way (as on a GPU), "auto" picks the kernels at a q.k width that
    is not a power of two and Flex otherwise, in bf16 and float32 alike; on this CPU (no interpreter
    request) always flex."""
    config = small_config(**{"hidden_size": 64, "block": 16, "backend": "auto", **overrides})
    assert auto_choice(config, torch.bfloat16) == "flex"  # CPU tensors: never the interpreter on its own
    monkeypatch.setattr(nsa.dispatch, "triton_obstacles", lambda *args, **kwargs: [])
    assert auto_choice(config, torch.bfloat16) == expected
    assert auto_choice(config, torch.float32) == expected


# ----------------------------------------------------------------------------------------------------------
# training on the CPU: FlexAttention has no CPU backward, so "auto" takes the dense torch path


@pytest.mark.parametrize("bias_impl", ["score_mod", "qk_aug"])
def test_cpu_training_takes_the_dense_path_and_says_why(bias_impl: str, monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """A backward through the layer on the CPU works and equals the float64 dense reference's gradients
    (x and every parameter); the dispatch logs the reason."""
    monkeypatch.setattr(nsa.dispatch, "_logged", set())  # log this choice afresh
    layer = make_layer(small_config(bias_impl=bias_impl, c_scale=0.2)).train()
    x = torch.randn(1, 32, 32, dtype=F64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    dy = torch.randn(x.shape, dtype=F64, generator=torch.Generator().manual_seed(4))
    with caplog.at_level(logging.INFO, logger="nsa.dispatch"):
        y, aux = layer(x, return_aux=True)
    assert "scope attention backend: torch (" in caplog.text and "no backward on the CPU" in caplog.text
    params = dict(layer.named_parameters())
    grads = torch.autograd.grad(y, [x, *params.values()], dy, allow_unused=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = dense_reference(layer, x_ref, allowed_from_lists(aux.pointer_mask.kv_indices, 4))
    ref_grads = torch.autograd.grad(y_ref, [x_ref, *params.values()], dy, allow_unused=True)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-10)
    for name, g, ref in zip(["x", *params], grads, ref_grads, strict=True):
        if ref is None:  # nothing reaches it in the reference either (e.g. through the discrete mask only)
            assert g is None or not bool(g.any()), name
        else:
            torch.testing.assert_close(g, ref, rtol=1e-9, atol=1e-10, msg=name)


def test_cpu_training_refusals_say_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(1, 32, 32, dtype=F64, requires_grad=True)
    flex = make_layer(small_config(backend="flex"))
    with pytest.raises(ScopeInputError, match="backend='flex' cannot run scope attention: FlexAttention has no "
                                              "backward on the CPU"):
        flex(x)
    with torch.no_grad():
        flex(x)  # without gradients Flex runs
    monkeypatch.setattr(nsa.dispatch, "SCOPE_DENSE_SCORE_LIMIT", 4 * 32 * 32 - 1)  # B * H * T^2 is one over
    with pytest.raises(ScopeInputError, match=r"no backend can run scope attention .*train on CUDA"):
        make_layer(small_config())(x)
    with pytest.raises(ScopeInputError, match=r"backend='torch' cannot run .*dense path would hold"):
        make_layer(small_config(backend="torch"))(x)
