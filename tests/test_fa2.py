"""The opt-in FlashAttention-2 path (nsa.fa2, NSA_USE_FA2=1): its plumbing on the CPU through a stand-in flash_attn
module, and the real library's parity where flash-attn and a GPU are present.

The stand-in implements flash-attn's documented ``flash_attn_func`` (flash_attn/flash_attn_interface.py, 2.3+) on
SDPA, written from the docstring alone: layout [B, S, H, D], GQA (query head h reads kv head h // G), the causal mask
aligned to the bottom right corner (query i reads keys j <= i + S_k - S_q), window_size=(left, right) keeping keys in
[i + S_k - S_q - left, i + S_k - S_q + right], rows that read nothing output zero, and with return_attn_probs=True
(out, softmax_lse [B, H, S_q] of the scaled scores, probabilities). Its lse of rows that read nothing is NaN: the
docstring leaves it undefined, so nothing may depend on it. With it installed, the FA-2 path must give the default
PyTorch path's output, selected blocks, NaN rows and gradients (float64, TOL64: the same math in another order).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from types import ModuleType
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import F64, TOL64, Shape, make_raw_inputs, shapes
from hypothesis import given

import nsa.dispatch
import nsa.fa2
from nsa import NSAInputError, compress_mean_pool, nsa_attention
from nsa.functional import NSASizes


def flash_attn_standin(calls: list[dict[str, Any]]) -> ModuleType:
    """A flash_attn module whose flash_attn_func follows the documented semantics (module docstring); every call's
    shapes and options are appended to `calls`."""

    def flash_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                        softmax_scale: float | None = None, causal: bool = False,
                        window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0, alibi_slopes: Any = None,
                        deterministic: bool = False, return_attn_probs: bool = False) -> Any:
        assert dropout_p == 0.0 and softcap == 0.0 and alibi_slopes is None
        assert q.shape[-1] == k.shape[-1] == v.shape[-1], "flash-attn needs one head dim for q, k and v"
        calls.append({"q": tuple(q.shape), "k": tuple(k.shape), "causal": causal, "window_size": window_size})
        seqlen_q, seqlen_k = q.shape[1], k.shape[1]
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
        i = torch.arange(seqlen_q)[:, None] + seqlen_k - seqlen_q  # the bottom-right aligned query index
        j = torch.arange(seqlen_k)[None]
        keep = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool)
        if causal:
            keep &= j <= i
        if window_size[0] >= 0:
            keep &= j >= i - window_size[0]
        if window_size[1] >= 0:
            keep &= j <= i + window_size[1]
        q_, k_, v_ = (x.transpose(1, 2) for x in (q, k, v))  # SDPA's [B, H, S, D]
        out = F.scaled_dot_product_attention(q_, k_, v_, attn_mask=keep, scale=scale, enable_gqa=True)
        empty = ~keep.any(dim=1)  # [S_q]: SDPA gives NaN there, flash-attn zero
        out = torch.where(empty[:, None], 0.0, out).transpose(1, 2).to(q.dtype)
        if not return_attn_probs:
            return out
        scores = (q_ @ k_.repeat_interleave(q.shape[2] // k.shape[2], dim=1).transpose(-1, -2)) * scale
        scores = scores.masked_fill(~keep, float("-inf"))
        lse = torch.where(empty, float("nan"), torch.logsumexp(scores.float(), dim=-1))
        return out, lse, torch.softmax(scores, dim=-1)

    module = ModuleType("flash_attn")
    module.__version__ = "2.7.4"  # type: ignore[attr-defined]
    module.flash_attn_func = flash_attn_func  # type: ignore[attr-defined]
    return module


@pytest.fixture
def standin(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Installs the stand-in as flash_attn, sets NSA_USE_FA2=1 and lets the path take CPU float32 / float64 tensors
    (the real library's device and dtype rules are tested in test_obstacles_name_each_reason)."""
    calls: list[dict[str, Any]] = []
    monkeypatch.setitem(sys.modules, "flash_attn", flash_attn_standin(calls))
    monkeypatch.setenv(nsa.dispatch.FA2_ENV, "1")
    monkeypatch.setattr(nsa.fa2, "FA2_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(nsa.fa2, "FA2_DTYPES", (torch.float16, torch.bfloat16, torch.float32, torch.float64))
    return calls


def layer_inputs(s: Shape, dtype: torch.dtype = F64) -> tuple[torch.Tensor, ...]:
    """nsa_attention's positional tensors for shape s (mean-pooled compressed keys)."""
    x = make_raw_inputs(s, dtype)
    k_cmp, v_cmp = (compress_mean_pool(x[name], s.l, s.d) for name in ("k_c", "v_c"))
    return x["q"], k_cmp, v_cmp, x["k_sel"], x["v_sel"], x["k_win"], x["v_win"], x["gates"]


def default_path(s: Shape, inputs: tuple[torch.Tensor, ...]) -> Any:
    """nsa_attention's PyTorch path as it runs without NSA_USE_FA2."""
    with pytest.MonkeyPatch.context() as env:
        env.delenv(nsa.dispatch.FA2_ENV, raising=False)
        return nsa_attention(*inputs, **s.kw(), backend="torch")


def fa2_path(s: Shape, inputs: tuple[torch.Tensor, ...]) -> Any:
    return nsa.fa2.nsa_attention_fa2(*inputs, sizes=NSASizes(s.l, s.d, s.lp, s.n, s.w), scale=s.Dk**-0.5)


@given(shapes())
def test_fa2_path_equals_default_path(standin: list[dict[str, Any]], s: Shape) -> None:
    s = dataclasses.replace(s, Dv=s.Dk)  # flash-attn: one head dim for q, k and v
    inputs = layer_inputs(s)
    standin.clear()
    ref, got = default_path(s, inputs), fa2_path(s, inputs)
    torch.testing.assert_close(got.output, ref.output, **TOL64)
    assert torch.equal(got.block_indices, ref.block_indices)
    # the window in one call, the compression branch in one call per residue class that sees a block
    launched = [r for r in range(min(s.d, s.T)) if len(range(r, s.T, s.d)) + (r + 1 - s.l) // s.d > 0]
    assert [c["window_size"] for c in standin] == [(-1, -1)] * len(launched) + [(s.w - 1, 0)]
    assert all(c["causal"] for c in standin)


def test_fa2_path_gradients_equal_default_path(standin: list[dict[str, Any]]) -> None:
    s = Shape(B=2, T=37, HQ=4, Hkv=2, Dk=6, Dv=6, l=8, d=4, lp=8, n=3, w=5, seed=3)
    grads = []
    for path in (default_path, fa2_path):
        inputs = tuple(x.detach().requires_grad_() for x in layer_inputs(s))
        out = path(s, inputs).output
        (out * torch.linspace(-1, 1, out.numel(), dtype=F64).view_as(out)).sum().backward()
        grads.append([x.grad for x in inputs])
    for got, ref in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, ref, **TOL64)


def test_fa2_path_poisons_the_rows_the_default_path_poisons(standin: list[dict[str, Any]]) -> None:
    """A NaN key of the window branch and an inf compressed value: NaN in exactly the default path's rows."""
    s = Shape(B=1, T=29, HQ=2, Hkv=1, Dk=4, Dv=4, l=4, d=2, lp=4, n=3, w=6, seed=11)
    q, k_cmp, v_cmp, k_sel, v_sel, k_win, v_win, gates = layer_inputs(s)
    k_win[0, 9, 0, 1] = float("nan")
    v_cmp[0, 5, 0, 0] = float("inf")
    inputs = (q, k_cmp, v_cmp, k_sel, v_sel, k_win, v_win, gates)
    ref, got = default_path(s, inputs), fa2_path(s, inputs)
    assert ref.output.isnan().any() and not ref.output.isnan().all()
    torch.testing.assert_close(got.output, ref.output, equal_nan=True, **TOL64)
    assert torch.equal(got.block_indices, ref.block_indices)


def test_obstacles_name_each_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import flash_attn raises ImportError
    q = torch.zeros(1, 4, 2, 8, dtype=F64)
    reasons = nsa.fa2.fa2_obstacles(q, torch.zeros(1, 4, 1, 8, dtype=F64), torch.zeros(1, 4, 1, 4, dtype=F64))
    assert len(reasons) == 4
    for words in ("not installed", "not CUDA", "float16/bfloat16", "head_dim == head_dim_v"):
        assert any(words in reason for reason in reasons), words
    old = flash_attn_standin([])
    old.__version__ = "2.2.1"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "flash_attn", old)
    assert any("older than 2.3" in r for r in nsa.fa2.fa2_obstacles(q, q, q))


def test_choice_follows_the_switch_and_logs_why_once(monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(nsa.dispatch, "_logged", set())
    q = torch.zeros(1, 4, 2, 8, dtype=F64)
    with caplog.at_level(logging.INFO, logger="nsa.dispatch"):
        monkeypatch.delenv(nsa.dispatch.FA2_ENV, raising=False)
        assert not nsa.dispatch.choose_fa2(q, q, q)
        assert caplog.text == ""  # not asked for: silent
        monkeypatch.setenv(nsa.dispatch.FA2_ENV, "1")
        monkeypatch.setitem(sys.modules, "flash_attn", None)
        assert not nsa.dispatch.choose_fa2(q, q, q)
        assert not nsa.dispatch.choose_fa2(q, q, q)
    assert caplog.text.count("nsa prefill torch path backend: torch (flash-attn is not installed") == 1
    monkeypatch.setitem(sys.modules, "flash_attn", flash_attn_standin([]))
    monkeypatch.setattr(nsa.fa2, "FA2_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(nsa.fa2, "FA2_DTYPES", (F64,))
    assert nsa.dispatch.choose_fa2(q, q, q)
    monkeypatch.setenv(nsa.dispatch.FA2_ENV, "yes")
    with pytest.raises(NSAInputError, match="NSA_USE_FA2"):
        nsa.dispatch.choose_fa2(q, q, q)


def test_nsa_attention_takes_the_fa2_path_when_asked(standin: list[dict[str, Any]]) -> None:
    s = Shape(B=1, T=40, HQ=4, Hkv=2, Dk=8, Dv=8, l=8, d=4, lp=8, n=4, w=9, seed=5)
    inputs = layer_inputs(s)
    got = nsa_attention(*inputs, **s.kw(), backend="torch")
    assert standin, "NSA_USE_FA2=1 with flash-attn present: the window and compression branches run in flash-attn"
    standin.clear()
    ref = default_path(s, inputs)
    assert not standin
    torch.testing.assert_close(got.output, ref.output, **TOL64)
    assert torch.equal(got.block_indices, ref.block_indices)


@pytest.mark.gpu
def test_real_flash_attn_matches_the_default_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where flash-attn (the optional extra) is installed: bf16 on the GPU, the FA-2 path against the default path.
    Tolerance: both round the branch outputs to bf16 (rel. 2^-8) from float32 accumulations; the selections may
    differ only where two blocks' float32 importances are within rounding of each other, so they are compared as a
    fraction (random inputs have no such near-ties but in a handful of rows)."""
    pytest.importorskip("flash_attn", reason="flash-attn is not installed (optional extra)")
    monkeypatch.setenv(nsa.dispatch.FA2_ENV, "1")
    s = Shape(B=2, T=4096, HQ=16, Hkv=2, Dk=128, Dv=128, l=32, d=16, lp=64, n=16, w=512, seed=7)
    inputs = tuple(x.cuda() for x in layer_inputs(s, torch.bfloat16))
    assert nsa.dispatch.choose_fa2(inputs[0], inputs[1], inputs[2])
    got, ref = fa2_path(s, inputs), default_path(s, inputs)
    assert (got.block_indices == ref.block_indices).float().mean() > 0.999
    torch.testing.assert_close(got.output.float(), ref.output.float(), rtol=2e-2, atol=2e-2)
