"""SCOPE attention against dense SDPA and a static sliding window on FlexAttention, 32k-128k tokens.

    python -m bench.bench_scope --device cuda     # H100: T = 128k, 64k, 32k, compiled, bf16 (a few minutes)
    python -m bench.bench_scope --device cuda --seq-lens 131072 --bias-impls score_mod --backends flex
    python -m bench.bench_scope                   # CPU smoke run: T = 1024, eager, fp32, forward only
    python -m bench.bench_scope --compile         # the same, compiled (CPU inductor kernels; ~1 min)

Shape (ANCHORS.md): B=1 (``--batch`` for more sequences per call; the 128k target reads B=1 rows), 16 query
heads (``--kv-heads`` for GQA), D=128, bf16 on the GPU; SCOPE blocks of 128, a total pointer budget of 32 blocks,
a local band of 4, no global block, M=4 pointers, K=16 frequencies (CPU default: 4 heads, D=64, fp32, budget 2,
local 2). Per T, largest first, in one process:

- dense: ``F.scaled_dot_product_attention(is_causal=True)``, forward (fwd) and forward+backward (fb);
- window: stock FlexAttention with a static causal sliding window of the same number of key blocks as
  SCOPE's mask (local + global + budget = 36 blocks of 128), built once, compiled ``flex_attention``;
- scope: the attention core of ``ScopeAttention`` (``scope_attention_step`` = ``ScopeAttention.attend``:
  pointer head -> bias coefficients -> block representatives -> the project's pointer mask builder -> one
  ``scope.functional.scope_attention``), compiled as one graph (fullgraph); it starts
  from the projected q, k, v (and q before RoPE, the pointer head's input) so dense vs scope is
  attention vs attention. ``--bias-impls``: ``qk_aug`` (bias as extra q/k features), ``none`` (pointer
  mask without bias: window vs none is the cost of pointers alone), ``score_mod`` (flex only; its GPU
  compile takes minutes on torch 2.11, so the GPU default is qk_aug and none). ``--backends``: the
  attention kernel, ``triton`` (scope.block_sparse_attention) and/or ``flex``; one row per pair;
- mask: the builder alone, from the block-level D* / budget logits to the BlockMask tensors, compiled
  (and eager); "fwd" builds the kv side (inference), "fb" also the q side the backward needs;
  mask_frac = mask time / scope time of the same pass;
- module: the whole ``ScopeAttention`` (projections, RoPE, o_proj included) compiled, at the largest T
  (``--module-seq-lens``).

Correctness comes first, in the same run: at ``--check-len`` (GPU 4096) the (compiled) SCOPE step is
compared with a float64 dense reference that masks with the step's own block lists and adds the bias
from the spectral formula (see ``check_scope``); a failed check stops the run before any timing.
Timings: medians of ``triton.testing.do_bench`` on CUDA, of a perf_counter loop on CPU; random inputs;
``*_first_s`` is the first call (compile + run). An OOM or an error is recorded in its cell and the run
goes on; a graph break is recorded and the call retried without fullgraph. Lengths not started within
``--max-seconds`` (GPU default 270) are recorded as skipped. FlexAttention has no CPU backward, so CPU
rows time the forward only (fb cells say n/a).
Results: ``<results dir>/scope_<cuda|cpu>.jsonl`` (appended) and ``.md`` (rewritten); the results dir
is ``--results-dir``, else $SCOPE_BENCH_RESULTS, else bench/results.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import itertools
import json
import math
import os
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from bench.env_info import (
    RESULTS_DIR,
    Distinct,
    cpu_median_ms,
    device_name,
    environment,
    file_stem,
    markdown_table,
    nonnegative_int,
    positive_float,
    positive_int,
    results_folder,
)
from scope import ScopeConfig, ScopeConfigError
from scope.block_sparse_attention import block_visibility, transpose_block_lists
from scope.scope_attention import ScopeAttention, representative_rows

GPU_SEQ_LENS = [131072, 65536, 32768]  # largest first: the 128k target is measured even if time runs short
CPU_SEQ_LENS = [1024]
TARGET_SEQ_LEN = 131072
TARGET_SPEEDUP = 8.0  # dense / scope, forward+backward, at 128k
TARGET_MASK_FRAC = 0.2
CHECK_FACTOR = 4.0  # allowed error = CHECK_FACTOR x the error of the same math at the kernel's precision
CHECK_MAX_BATCH = 2  # sequences of the check under --batch: two show the batch indexing, more only cost memory
RESULTS_ENV = "SCOPE_BENCH_RESULTS"
NA = "n/a"


# ----------------------------------------------------------------------------------------------
# configuration and inputs


def variants(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(bias_impl, backend) pairs to run, in the order given; score_mod runs in FlexAttention only."""
    return [(bias, backend) for bias in args.bias_impls for backend in args.backends
            if not (bias == "score_mod" and backend == "triton")]


def bench_config(args: argparse.Namespace, bias_impl: str, backend: str = "flex") -> ScopeConfig:
    return ScopeConfig(
        hidden_size=args.heads * args.head_dim, num_heads=args.heads, num_kv_heads=args.kv_heads,
        head_dim=args.head_dim, block=args.block, budget=args.budget, local_blocks=args.local_blocks,
        global_blocks=args.global_blocks, num_pointers=args.num_pointers, num_freqs=args.num_freqs,
        delta_max=args.delta_max, min_period=args.min_period, bias_impl=bias_impl, backend=backend,
    )


def make_layer(config: ScopeConfig, device: str, dtype: torch.dtype, seed: int = 0) -> ScopeAttention:
    """A layer whose bias is on: ``gain`` starts at 0 (a fresh layer's bias is exactly zero), set it to 0.5."""
    torch.manual_seed(seed)
    layer = ScopeAttention(config).to(device=device, dtype=dtype)
    with torch.no_grad():
        layer.spectral.pointer_head.gain.fill_(0.5)
    return layer


def randn(*shape: int, device: str, dtype: torch.dtype, generator: torch.Generator, grad: bool = False) -> Tensor:
    x = torch.randn(*shape, generator=generator, device=device, dtype=torch.float32).to(dtype)
    return x.requires_grad_(grad)


def attention_inputs(config: ScopeConfig, seq_len: int, device: str, dtype: torch.dtype, seed: int,
                     grad: bool, batch: int = 1) -> dict[str, Tensor]:
    """q [B, H, T, D] (rotated), k / v [B, H_kv, T, D], q_content [B, H, T, D] (q before RoPE), dout."""
    gen = torch.Generator(device=device).manual_seed(seed)
    h, hkv, d = config.num_heads, config.num_kv_heads, config.head_dim
    return {
        "q": randn(batch, h, seq_len, d, device=device, dtype=dtype, generator=gen, grad=grad),
        "k": randn(batch, hkv, seq_len, d, device=device, dtype=dtype, generator=gen, grad=grad),
        "v": randn(batch, hkv, seq_len, d, device=device, dtype=dtype, generator=gen, grad=grad),
        "q_content": randn(batch, h, seq_len, d, device=device, dtype=dtype, generator=gen, grad=grad),
        "dout": randn(batch, h, seq_len, d, device=device, dtype=dtype, generator=gen),
    }


# ----------------------------------------------------------------------------------------------
# the functions that are timed


def scope_attention_step(layer: ScopeAttention, q: Tensor, k: Tensor, v: Tensor, q_content: Tensor
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """ScopeAttention's prefill after the projections (``ScopeAttention.attend``): bias coefficients from the
    pointer head, block representatives, the pointer mask, one ``scope.functional.scope_attention``.
    -> (out [B, H, T, D], kv_indices, kv_num_blocks): the block lists the attention used (for the check;
    returning them costs nothing, they exist anyway)."""
    out, aux = layer.attend(q, k, v, q_content)
    return out, aux.pointer_mask.kv_indices, aux.pointer_mask.kv_num_blocks


def pointer_mask_tensors(layer: ScopeAttention, d_blk: Tensor, u_blk: Tensor, seq_len: int) -> tuple[Tensor, ...]:
    """The mask building alone: block-level D* / budget logits -> the block lists the attention reads (kv
    side; the q side too when the layer is in training mode, as the backward needs): for flex the
    BlockMask's tensors, for the Triton kernels the kv lists and their transpose."""
    backend = layer.config.backend
    mask = layer.pointer_mask(d_blk, u_blk, seq_len, q_side=backend == "flex" and layer.training)
    if backend == "triton":
        lists = (mask.kv_num_blocks, mask.kv_indices)
        return (*lists, *transpose_block_lists(*lists, seq_len // layer.config.block)) if layer.training else lists
    bm = mask.block_mask
    parts = (bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices,
             bm.q_num_blocks, bm.q_indices, bm.full_q_num_blocks, bm.full_q_indices)
    return tuple(t for t in parts if t is not None)


def block_mask_from_kv(kv_num: Tensor, kv_idx: Tensor, full_num: Tensor, full_idx: Tensor, *, block: int,
                       seq_len: int, mask_mod: Callable[..., Tensor]) -> BlockMask:
    """Stock ``BlockMask.from_kv_blocks`` (q side computed by torch), tolerant of versions without
    ``seq_lengths``."""
    kwargs: dict[str, Any] = {"BLOCK_SIZE": block, "mask_mod": mask_mod}
    if "seq_lengths" in inspect.signature(BlockMask.from_kv_blocks).parameters:
        kwargs["seq_lengths"] = (seq_len, seq_len)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, **kwargs)


def sliding_window_mask(seq_len: int, block: int, window_blocks: int, device: str) -> BlockMask:
    """Static causal sliding window of ``window_blocks`` key blocks per query block (the diagonal block
    partial, the others full), from kv lists with stock FlexAttention. The lists are padded to width
    QB: ``from_kv_blocks`` builds the q side through a [QB, width] dense matrix and the compiled CPU
    kernel asserts width * block >= T. The mask_mod also applies the window, so eager flex (which
    ignores block lists) computes the same function."""
    num_blocks = seq_len // block
    qb = torch.arange(num_blocks, device=device)[:, None]
    slot = torch.arange(num_blocks, device=device)[None, :]
    n_full = qb.clamp(max=window_blocks - 1)  # [QB, 1]
    full_idx = torch.where(slot < n_full, qb - n_full + slot, 0).to(torch.int32)
    part_idx = torch.where(slot == 0, qb, 0).to(torch.int32)
    full_num = n_full[:, 0].to(torch.int32)
    part_num = torch.ones(num_blocks, dtype=torch.int32, device=device)

    def window_causal(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (q_idx >= kv_idx) & (q_idx // block - kv_idx // block < window_blocks)

    return block_mask_from_kv(part_num[None, None], part_idx[None, None], full_num[None, None],
                              full_idx[None, None], block=block, seq_len=seq_len, mask_mod=window_causal)


def score_elements(kv_num_blocks: Tensor, block: int) -> float:
    """Scores a block-sparse causal mask computes: (kv blocks - 1) full tiles + half the diagonal tile,
    summed over (b, h, query block). Every list here holds the diagonal block."""
    tiles = kv_num_blocks.double() - 1
    return float((tiles * block * block + block * (block + 1) / 2).sum())


# ----------------------------------------------------------------------------------------------
# timing


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], Any], device: str) -> float:
    """Median milliseconds: triton.testing.do_bench on CUDA (with enough repeats for slow calls), a
    perf_counter loop of 5 on CPU."""
    if device.startswith("cuda"):
        from triton.testing import do_bench

        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        estimate = (time.perf_counter() - start) * 1e3
        rep = min(3000.0, max(100.0, 6 * estimate))
        return float(do_bench(fn, warmup=min(100.0, max(25.0, 2 * estimate)), rep=rep, return_mode="median"))
    return cpu_median_ms(fn)


def compile_settings(limit: int, cpu_compile: bool) -> contextlib.ExitStack:
    """Config patches for the run (undone on exit). Every (T, mode, variant) is a static-shape recompile
    of the same code objects, so the recompile limit is raised. On CPU, torch 2.11 / 2.13's flex lowering
    fails (NoValidChoicesError) when a score_mod captures a tensor inductor left unrealized, here the
    pointer-weighted sums over M = 4 (an unrolled small reduction): keep reductions as reductions.
    (The slope and ramp terms capture pointwise tensors too; the CPU compile of those still fails.)"""
    stack = contextlib.ExitStack()
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            value = max(limit, getattr(torch._dynamo.config, name))
            stack.enter_context(torch._dynamo.config.patch({name: value}))
    if cpu_compile:
        stack.enter_context(torch._inductor.config.patch(unroll_reductions_threshold=1))
    return stack


class Compiled:
    """torch.compile(fn, fullgraph=True, dynamic=False) when ``enabled`` (else fn itself). A graph break
    is recorded in ``graph_break`` and the call retried without fullgraph, so the timing still comes."""

    def __init__(self, fn: Callable[..., Any], enabled: bool) -> None:
        self.fn, self.enabled = fn, enabled
        self.graph_break: str | None = None
        self.call = torch.compile(fn, fullgraph=True, dynamic=False) if enabled else fn

    def __call__(self, *args: Any) -> Any:
        try:
            return self.call(*args)
        except torch._dynamo.exc.Unsupported as exc:
            if self.graph_break is not None:
                raise
            self.graph_break = str(exc).strip().splitlines()[0][:300]
            print(f"  graph break ({self.graph_break}); retrying without fullgraph", flush=True)
            self.call = torch.compile(self.fn, dynamic=False)
            return self.call(*args)


class Row:
    """One result row; ``measure`` records a median (and the first call's seconds: compile + run), an
    "OOM" or an error string, never raising."""

    def __init__(self, device: str, **fields: Any) -> None:
        self.device = device
        self.data: dict[str, Any] = dict(fields)
        self.errors: dict[str, str] = {}

    def measure(self, name: str, fn: Callable[[], Any]) -> float | None:
        try:
            start = time.perf_counter()
            fn()
            sync(self.device)
            self.data[f"{name}_first_s"] = round(time.perf_counter() - start, 2)
            ms = median_ms(fn, self.device)
            self.data[f"{name}_ms"] = round(ms, 3)
            print(f"  {name}: {ms:.3f} ms (first call {self.data[f'{name}_first_s']} s)", flush=True)
            return ms
        except torch.cuda.OutOfMemoryError:
            self.data[f"{name}_ms"] = "OOM"
            print(f"  {name}: OOM", flush=True)
        except Exception as exc:
            self.data[f"{name}_ms"] = "error"
            self.errors[name] = f"{type(exc).__name__}: {str(exc).strip()[:400]}"
            print(f"  {name}: {self.errors[name]}\n{traceback.format_exc(limit=4)}", flush=True)
        finally:
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()
        return None

    def ratio(self, name: str, numerator: str, denominator: str) -> None:
        a, b = self.data.get(numerator), self.data.get(denominator)
        if isinstance(a, float) and isinstance(b, float) and b > 0:
            self.data[name] = round(a / b, 3)

    def record(self) -> dict[str, Any]:
        return {**self.data, **({"errors": self.errors} if self.errors else {})}


def grads_of(out: Tensor, inputs: Sequence[Tensor], dout: Tensor) -> tuple[Tensor | None, ...]:
    """Gradients of ``out`` (cotangent ``dout``); None for inputs it does not depend on (with
    bias_impl none, q_content and the pointer head only choose blocks: no gradient reaches them)."""
    return torch.autograd.grad(out, list(inputs), dout, allow_unused=True)


# ----------------------------------------------------------------------------------------------
# correctness: float64 dense reference


def spectral_bias_float64(coef_a: Tensor, coef_b: Tensor, slope: Tensor | None, freqs: Sequence[float],
                          seq_len: int) -> Tensor:
    """beta-less bias b_i(i - j) [..., T, T] in float64 from per-row coefficients A, B [..., T, K] (slope c
    [..., T] or None), written from SCOPE.md: sum_k A_k cos(w_k D) + B_k sin(w_k D) - sum_k A_k + c D,
    with cos(w (i - j)) expanded as cos(w i) cos(w j) + sin(w i) sin(w j) (sin likewise), so it is a
    product of [T, 2K] factors instead of a [T, T, K] tensor."""
    a, b = coef_a.double(), coef_b.double()
    pos = torch.arange(seq_len, device=a.device, dtype=torch.float64)
    w = torch.tensor(list(freqs), dtype=torch.float64, device=a.device)
    cos, sin = torch.cos(pos[:, None] * w), torch.sin(pos[:, None] * w)  # [T, K]
    rows = torch.cat([a * cos + b * sin, a * sin - b * cos], dim=-1)  # [H, T, 2K]
    cols = torch.cat([cos, sin], dim=-1)  # [T, 2K]
    bias = rows @ cols.T - a.sum(-1)[..., None]
    if slope is not None:
        bias = bias + slope.double()[..., None] * (pos[:, None] - pos[None, :])
    return bias


def spectral_bias_float32(coef_a: Tensor, coef_b: Tensor, slope: Tensor | None, freqs: Sequence[float],
                          seq_len: int) -> Tensor:
    """The same bias the way score_mod computes it: D in float32, cos / sin of D * w_k, summed over k."""
    a, b = coef_a.float(), coef_b.float()
    pos = torch.arange(seq_len, device=a.device)
    delta = (pos[:, None] - pos[None, :]).float()
    bias = -a.sum(-1)[..., None].expand(*a.shape[:-1], seq_len).clone()
    for k, w in enumerate(freqs):
        bias += a[..., k, None] * torch.cos(delta * w) + b[..., k, None] * torch.sin(delta * w)
    if slope is not None:
        bias += slope.float()[..., None] * delta
    return bias


def dense_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, bias: Tensor | None, allowed: Tensor,
                    round_to: torch.dtype | None = None) -> Tensor:
    """softmax(q k^T * scale + bias, masked to ``allowed``) v in q's dtype, one (sequence, head) at a time
    (GQA: head h reads kv head h // G); ``bias`` [B, H, T, T], ``allowed`` [B | 1, H, T, T] (1: the same for
    every sequence). ``round_to`` rounds the probabilities before P @ V and the output to that dtype (the two
    places a bf16 flash-style kernel rounds)."""
    heads, group = q.shape[1], q.shape[1] // k.shape[1]
    allowed = allowed.expand(q.shape[0], -1, -1, -1)
    outs = []
    for b, h in itertools.product(range(q.shape[0]), range(heads)):
        s = (q[b, h] @ k[b, h // group].T) * scale
        if bias is not None:
            s = s + bias[b, h]
        p = torch.softmax(s.masked_fill(~allowed[b, h], float("-inf")), dim=-1)
        vh = v[b, h // group]
        o = (p.to(round_to).to(p.dtype) @ vh) if round_to is not None else p @ vh
        outs.append(o.to(round_to).to(o.dtype) if round_to is not None else o)
    return torch.stack(outs).unflatten(0, (q.shape[0], heads))


def rel_err(x: Tensor, ref: Tensor) -> float:
    return float((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300))


def max_err(x: Tensor, ref: Tensor) -> float:
    return float((x.double() - ref.double()).abs().max())


def check_scope(layer: ScopeAttention, step: Callable[..., tuple[Tensor, Tensor, Tensor]], seq_len: int,
                device: str, dtype: torch.dtype, backward: bool, batch: int = 1) -> dict[str, Any]:
    """The SCOPE step (as timed: compiled on the GPU) against a float64 dense reference, on ``batch`` sequences.

    The reference masks with the step's own block lists (the mask is discrete: D* computed by a
    different kernel could put a centre across a block edge, so the reference must not re-derive it;
    ``list_rows_differing`` counts the rows where an eager build disagrees, expected 0), causal at
    token level, and adds beta * b from the coefficients of ``layer.spectral.coefficients`` via the
    spectral formula in float64 (``spectral_bias_float64``). Tolerance: ``own`` is the error of the
    same dense math at the kernel's precision (scores and bias in float32 as score_mod computes them,
    probabilities and output rounded to the input dtype); the step may be CHECK_FACTOR times worse
    (summation order, online softmax), in relative Frobenius norm and in max abs. Backward (CUDA):
    gradients of q, k, v and q_content (the last flows through the captured bias coefficients) against
    float64 autograd of the reference, in relative Frobenius norm, within CHECK_FACTOR x the larger of
    the same autograd at the kernel's precision and the gradient error of PyTorch's own SDPA in this
    dtype on a dense causal problem with the same inputs (flash kernels also round dS to the input
    dtype). q_content's gradient is ill-conditioned (it sums dS_ij cos(w_k (i - j)) over a row whose
    dS sums to zero), hence its larger own error.
    """
    c = layer.config
    if c.has_ramp:
        raise ValueError("check_scope's reference has no ramp term: benchmark a config without a ramp")
    num_blocks = seq_len // c.block
    inputs = attention_inputs(c, seq_len, device, dtype, seed=1234, grad=backward, batch=batch)
    q, k, v, qc, dout = (inputs[n] for n in ("q", "k", "v", "q_content", "dout"))
    layer.train(backward)
    with torch.set_grad_enabled(backward):  # forward-only (CPU): parameters requiring grad need no_grad too
        out, kv_idx, kv_num = step(layer, q, k, v, qc)
    grads = grads_of(out, (q, k, v, qc), dout) if backward else ()
    with torch.no_grad():
        params = layer.spectral.coefficients(qc).params
        d_blk, u_blk = (representative_rows(t, num_blocks, c.block, c.representative)
                        for t in (params.d_star, params.budget_logits))
        eager_lists = layer.pointer_mask(d_blk, u_blk, seq_len)
        differing = (block_visibility(eager_lists.kv_num_blocks, eager_lists.kv_indices, num_blocks)
                     != block_visibility(kv_num, kv_idx, num_blocks)).any(-1).sum()
    pos = torch.arange(seq_len, device=device)
    blocks = block_visibility(kv_num, kv_idx, num_blocks)  # [B, H, QB, KB]
    allowed = blocks[:, :, pos // c.block][..., pos // c.block] & (pos[:, None] >= pos[None, :])
    scale = layer.scale
    use_bias = c.bias_impl != "none"
    freqs = layer.spectral.freqs

    def reference(q64: Tensor, k64: Tensor, v64: Tensor, qc64: Tensor) -> Tensor:
        bias = None
        if use_bias:
            coeffs = layer.spectral.coefficients(qc64)  # float64 for float64 input
            slope = coeffs.c if c.c_scale > 0 else None
            bias = c.beta * spectral_bias_float64(coeffs.A, coeffs.B, slope, freqs, seq_len)
        return dense_attention(q64, k64, v64, scale, bias, allowed)

    def low_precision(q32: Tensor, k32: Tensor, v32: Tensor, qc_in: Tensor) -> Tensor:
        bias = None
        if use_bias:
            coeffs = layer.spectral.coefficients(qc_in)  # float32 from the input dtype, as in the layer
            slope = coeffs.c if c.c_scale > 0 else None
            bias = c.beta * spectral_bias_float32(coeffs.A, coeffs.B, slope, freqs, seq_len)
        return dense_attention(q32, k32, v32, scale, bias, allowed, round_to=dtype)

    leaves64 = [t.detach().double().requires_grad_(backward) for t in (q, k, v, qc)]
    leaves_low = [*(t.detach().float().requires_grad_(backward) for t in (q, k, v)),
                  qc.detach().clone().requires_grad_(backward)]
    with torch.set_grad_enabled(backward):
        ref = reference(*leaves64)
        low = low_precision(*leaves_low)
    result: dict[str, Any] = {
        "T": seq_len, "batch": batch, "bias_impl": c.bias_impl, "backend": c.backend,
        "dtype": str(dtype).removeprefix("torch."),
        "list_rows_differing": int(differing),
        "out_rel_err": rel_err(out, ref), "out_rel_own": rel_err(low, ref),
        "out_max_err": max_err(out, ref), "out_max_own": max_err(low, ref),
    }
    failures = [name for name in ("rel", "max")
                if not result[f"out_{name}_err"] <= CHECK_FACTOR * result[f"out_{name}_own"] + 1e-12]
    if backward:
        ref_grads = grads_of(ref, leaves64, dout.double())
        low_grads = grads_of(low, leaves_low, dout.float())
        sdpa_own = sdpa_grad_error(q, k, v, dout, scale)
        result["sdpa_own_grad_rel_err"] = {name: float(f"{e:.3g}") for name, e in sdpa_own.items()}
        for name, g, r, g_low in zip(("dq", "dk", "dv", "dq_content"), grads, ref_grads, low_grads, strict=True):
            if g is None or r is None or g_low is None:  # bias_impl none: no gradient reaches q_content
                if not (g is None and r is None):
                    failures.append(name)
                continue
            result[f"{name}_rel_err"] = rel_err(g, r)
            result[f"{name}_rel_own"] = rel_err(g_low, r)
            result[f"{name}_bound"] = CHECK_FACTOR * max(result[f"{name}_rel_own"], *sdpa_own.values())
            if not result[f"{name}_rel_err"] <= result[f"{name}_bound"]:
                failures.append(name)
    layer.eval()
    result["ok"] = not failures
    result["failed"] = failures
    return result


def sdpa_grad_error(q: Tensor, k: Tensor, v: Tensor, dout: Tensor, scale: float) -> dict[str, float]:
    """Relative gradient errors of F.scaled_dot_product_attention (causal, q's dtype) against float64
    dense autograd with the same inputs: the error a production kernel of this precision makes."""
    ql, kl, vl = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = F.scaled_dot_product_attention(ql, kl, vl, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    grads = torch.autograd.grad(out, (ql, kl, vl), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    seq_len = q.shape[2]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=q.device).tril().expand(1, q.shape[1], -1, -1)
    ref = dense_attention(q64, k64, v64, scale, None, causal)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    return {name: rel_err(g, r) for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True)}


# ----------------------------------------------------------------------------------------------
# one sequence length


def time_baselines(row: Row, args: argparse.Namespace, seq_len: int, inp: dict[str, Tensor], compiled: bool,
                   backward: bool, window_blocks: int) -> None:
    """dense SDPA and the static-window FlexAttention, fwd and fb, into ``row``."""
    q, k, v, dout = inp["q"], inp["k"], inp["v"], inp["dout"]
    gqa = q.shape[1] != k.shape[1]

    def dense_fwd() -> Tensor:
        with torch.no_grad():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)

    def dense_fb() -> tuple[Tensor | None, ...]:
        return grads_of(F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa), (q, k, v), dout)

    row.measure("dense_fwd", dense_fwd)
    if backward:
        row.measure("dense_fb", dense_fb)

    window = sliding_window_mask(seq_len, args.block, window_blocks, row.device)
    flex = Compiled(flex_attention, compiled)

    def window_fwd() -> Tensor:
        with torch.no_grad():
            return flex(q, k, v, None, window, None, gqa)

    def window_fb() -> tuple[Tensor | None, ...]:
        return grads_of(flex(q, k, v, None, window, None, gqa), (q, k, v), dout)

    row.measure("window_fwd", window_fwd)
    if backward:
        row.measure("window_fb", window_fb)
    if flex.graph_break:
        row.errors["window_graph_break"] = flex.graph_break
    counts = torch.arange(1, seq_len // args.block + 1).clamp(max=window_blocks)  # key blocks per query block
    row.data["kv_blocks_window"] = round(float(counts.double().mean()), 2)
    dense_scores = seq_len * (seq_len + 1) / 2
    row.data["flop_ratio_window"] = round(dense_scores / score_elements(counts, args.block), 2)


def time_scope(row: Row, layer: ScopeAttention, inp: dict[str, Tensor], compiled: bool, backward: bool) -> None:
    """The SCOPE attention step, fwd and fb, into ``row`` (and the mask's size and score FLOPs)."""
    c = layer.config
    q, qc = inp["q"], inp["q_content"]
    seq_len = q.shape[2]
    step, scope_fwd, scope_fb = scope_step_calls(layer, inp, compiled)
    with torch.no_grad():
        layer.eval()
        d_blk, u_blk = block_pointer_rows(layer, qc)
        kv_num = layer.pointer_mask(d_blk, u_blk, seq_len).kv_num_blocks
    row.data["kv_blocks_scope"] = round(float(kv_num.double().mean()), 2)
    dense_scores = q.shape[0] * q.shape[1] * seq_len * (seq_len + 1) / 2
    row.data["flop_ratio_scope"] = round(dense_scores / score_elements(kv_num, c.block), 2)
    measure_fwd_fb(row, "scope", layer, scope_fwd, scope_fb if backward else None, step)


def scope_step_calls(layer: ScopeAttention, inp: dict[str, Tensor], compiled: bool
                     ) -> tuple[Compiled, Callable[[], Tensor], Callable[[], tuple[Tensor | None, ...]]]:
    """The timed SCOPE step (``scope_attention_step``, compiled when asked) and two calls of it on ``inp``:
    forward without grad, and forward+backward to q, k, v, q_content and the spectral parameters."""
    q, k, v, qc, dout = (inp[n] for n in ("q", "k", "v", "q_content", "dout"))
    params = [p for p in layer.spectral.parameters() if p.requires_grad]
    step = Compiled(scope_attention_step, compiled)

    def fwd() -> Tensor:
        with torch.no_grad():
            return step(layer, q, k, v, qc)[0]

    def fb() -> tuple[Tensor | None, ...]:
        return grads_of(step(layer, q, k, v, qc)[0], (q, k, v, qc, *params), dout)

    return step, fwd, fb


def measure_fwd_fb(row: Row, name: str, layer: ScopeAttention, fwd: Callable[[], Any],
                   fb: Callable[[], Any] | None, wrapped: Compiled) -> None:
    """`name`_fwd in eval mode, `name`_fb (when given) in training mode, where the mask also builds the
    q-side lists the backward needs; a graph break of `wrapped` goes into the row's errors."""
    layer.eval()
    row.measure(f"{name}_fwd", fwd)
    if fb is not None:
        layer.train()
        row.measure(f"{name}_fb", fb)
    layer.eval()
    if wrapped.graph_break:
        row.errors[f"{name}_graph_break"] = wrapped.graph_break


def block_pointer_rows(layer: ScopeAttention, q_content: Tensor) -> tuple[Tensor, Tensor]:
    """Block-level D* and budget logits [B, H, QB, M] of q_content (the mask builder's inputs)."""
    c = layer.config
    num_blocks = q_content.shape[2] // c.block
    params = layer.spectral.coefficients(q_content).params
    return (representative_rows(params.d_star, num_blocks, c.block, c.representative).contiguous(),
            representative_rows(params.budget_logits, num_blocks, c.block, c.representative).contiguous())


def time_mask(row: Row, layer: ScopeAttention, q_content: Tensor, compiled: bool, backward: bool) -> None:
    """The mask builder alone, compiled (and eager when compiling): "fwd" = kv side (inference),
    "fb" = with the q side (training)."""
    seq_len = q_content.shape[2]
    with torch.no_grad():
        d_blk, u_blk = block_pointer_rows(layer, q_content)
    build = Compiled(pointer_mask_tensors, compiled)

    def compiled_build() -> tuple[Tensor, ...]:
        with torch.no_grad():
            return build(layer, d_blk, u_blk, seq_len)

    def eager_build() -> tuple[Tensor, ...]:
        with torch.no_grad():
            return pointer_mask_tensors(layer, d_blk, u_blk, seq_len)

    for mode, training in (("fwd", False), ("fb", True)):
        if mode == "fb" and not backward:
            continue
        layer.train(training)
        row.measure(f"mask_{mode}", compiled_build)
        if compiled:
            row.measure(f"mask_eager_{mode}", eager_build)
    layer.eval()
    if build.graph_break:
        row.errors["mask_graph_break"] = build.graph_break


def time_module(row: Row, layer: ScopeAttention, seq_len: int, compiled: bool, backward: bool, batch: int = 1
                ) -> None:
    """The whole ScopeAttention (projections, RoPE, o_proj) on ``batch`` sequences, compiled, fwd and fb."""
    weight = layer.q_proj.weight
    gen = torch.Generator(device=weight.device).manual_seed(5)
    x = randn(batch, seq_len, layer.config.hidden_size, device=str(weight.device), dtype=weight.dtype, generator=gen,
              grad=backward)
    dy = torch.randn_like(x)
    module = Compiled(layer, compiled)
    params = [p for p in layer.parameters() if p.requires_grad]

    def module_fwd() -> Tensor:
        with torch.no_grad():
            return module(x)

    def module_fb() -> tuple[Tensor | None, ...]:
        return grads_of(module(x), (x, *params), dy)

    measure_fwd_fb(row, "module", layer, module_fwd, module_fb if backward else None, module)


def run_length(args: argparse.Namespace, seq_len: int, device: str, dtype: torch.dtype, compiled: bool,
               backward: bool, with_module: bool) -> list[dict[str, Any]]:
    """Rows for one T: dense and window once, then one row per (bias_impl, backend); the mask builder once
    per backend (its lists differ), the module with the first variant."""
    torch._dynamo.reset()
    base_cfg = bench_config(args, args.bias_impls[0])
    window_blocks = base_cfg.local_blocks + base_cfg.global_blocks + base_cfg.budget
    print(f"T={seq_len}", flush=True)
    common = Row(device, T=seq_len, batch=args.batch, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                 dtype=str(dtype).removeprefix("torch."), block=args.block, budget=args.budget,
                 local_blocks=args.local_blocks, global_blocks=args.global_blocks, window_blocks=window_blocks,
                 compiled=compiled)
    inp = attention_inputs(base_cfg, seq_len, device, dtype, seed=0, grad=backward, batch=args.batch)
    time_baselines(common, args, seq_len, inp, compiled, backward, window_blocks)
    rows = []
    mask_times: dict[str, dict[str, Any]] = {}  # backend -> its mask_* cells (same pointer head for every bias)
    for index, (bias_impl, backend) in enumerate(variants(args)):
        print(f"T={seq_len} scope {bias_impl} {backend}", flush=True)
        row = Row(device, **common.data, bias_impl=bias_impl, backend=backend)
        row.errors.update(common.errors)
        layer = make_layer(bench_config(args, bias_impl, backend), device, dtype)
        time_scope(row, layer, inp, compiled, backward)
        if backend not in mask_times:
            time_mask(row, layer, inp["q_content"], compiled, backward)
            mask_times[backend] = {k: v for k, v in row.data.items() if k.startswith("mask_")}
        row.data.update(mask_times[backend])
        if index == 0 and with_module:
            time_module(row, layer, seq_len, compiled, backward, args.batch)
            row.ratio("mask_frac_module_fb", "mask_fb_ms", "module_fb_ms")
        row.ratio("mask_frac_fwd", "mask_fwd_ms", "scope_fwd_ms")
        row.ratio("mask_frac_fb", "mask_fb_ms", "scope_fb_ms")
        for pass_ in ("fwd", "fb"):
            row.ratio(f"dense/scope_{pass_}", f"dense_{pass_}_ms", f"scope_{pass_}_ms")
            row.ratio(f"dense/window_{pass_}", f"dense_{pass_}_ms", f"window_{pass_}_ms")
            row.ratio(f"window/scope_{pass_}", f"window_{pass_}_ms", f"scope_{pass_}_ms")
        if not backward:
            for key in ("dense_fb_ms", "window_fb_ms", "scope_fb_ms", "mask_fb_ms"):
                row.data.setdefault(key, NA)
        rows.append(row.record())
        del layer
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------------
# main


TABLE_COLUMNS = ["T", "batch", "bias_impl", "backend", "dense_fwd_ms", "dense_fb_ms", "window_fwd_ms", "window_fb_ms",
                 "scope_fwd_ms", "scope_fb_ms", "mask_fwd_ms", "mask_fb_ms", "mask_frac_fwd", "mask_frac_fb",
                 "dense/scope_fwd", "dense/scope_fb", "dense/window_fb", "window/scope_fb", "kv_blocks_scope",
                 "kv_blocks_window", "flop_ratio_scope"]
MODULE_COLUMNS = ["T", "batch", "bias_impl", "backend", "module_fwd_ms", "module_fb_ms", "scope_fb_ms", "mask_fb_ms",
                  "mask_frac_module_fb", "mask_eager_fwd_ms", "mask_eager_fb_ms"]
SHORT_COLUMNS = {pass_: ["T", "bias_impl", "backend", f"dense_{pass_}_ms", f"window_{pass_}_ms", f"scope_{pass_}_ms",
                         f"dense/scope_{pass_}", f"window/scope_{pass_}", f"mask_frac_{pass_}"]
                 for pass_ in ("fb", "fwd")}
CHECK_COLUMNS = ["T", "batch", "bias_impl", "backend", "dtype", "ok", "out_rel_err", "out_rel_own", "out_max_err",
                 "out_max_own", "dq_rel_err", "dq_bound", "dk_rel_err", "dk_bound", "dv_rel_err", "dv_bound",
                 "dq_content_rel_err", "dq_content_rel_own", "dq_content_bound", "list_rows_differing"]


def results_dir(arg: str | Path | None) -> Path:
    return Path(arg or os.environ.get(RESULTS_ENV) or RESULTS_DIR)


def target_lines(rows: list[dict[str, Any]]) -> list[str]:
    """One verdict per variant measured at 128k on one sequence (the target: forward+backward >= 8x dense, mask
    < 20%)."""
    lines = []
    for row in rows:
        if row["T"] != TARGET_SEQ_LEN or row.get("batch", 1) != 1:
            continue
        name = f"{row['bias_impl']}, {row['backend']}"
        speedup, frac = row.get("dense/scope_fb"), row.get("mask_frac_fb")
        if not isinstance(speedup, float) or not isinstance(frac, float):
            lines.append(f"Target at 128k ({name}): not measured ({speedup}, {frac})")
            continue
        verdict = "met" if speedup >= TARGET_SPEEDUP and frac < TARGET_MASK_FRAC else "NOT met"
        lines.append(f"Target at 128k ({name}; forward+backward): dense/scope = {speedup}x (>= {TARGET_SPEEDUP}), "
                     f"mask building {frac:.1%} of the layer (< {TARGET_MASK_FRAC:.0%}): {verdict}")
    return lines


def rounded(record: dict[str, Any]) -> dict[str, Any]:
    return {k: (float(f"{v:.3g}") if isinstance(v, float) and k.endswith(("err", "own", "bound")) else v)
            for k, v in record.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", type=device_name, default="cpu")
    parser.add_argument("--seq-lens", type=positive_int, nargs="+", action=Distinct,
                        help="default: GPU 131072 65536 32768, CPU 1024; multiples of --block")
    parser.add_argument("--module-seq-lens", type=positive_int, nargs="*", action=Distinct,
                        help="those of --seq-lens at which the whole ScopeAttention module is timed (default: the "
                        "largest; none when given empty)")
    parser.add_argument("--bias-impls", nargs="+", action=Distinct, choices=["score_mod", "qk_aug", "none"],
                        help="SCOPE bias implementations to time (default: score_mod)")
    parser.add_argument("--backends", nargs="+", action=Distinct, choices=["flex", "triton"],
                        help="attention kernels (default: GPU triton flex, CPU flex); score_mod runs in flex only")
    parser.add_argument("--heads", type=positive_int, default=None, help="query heads (default: GPU 16, CPU 4)")
    parser.add_argument("--kv-heads", type=positive_int, default=None,
                        help="kv heads, < heads for GQA (default: heads)")
    parser.add_argument("--head-dim", type=positive_int, default=None, help="default: GPU 128, CPU 64")
    parser.add_argument("--batch", type=positive_int, default=1, help="sequences per call (the check runs on at "
                        f"most {CHECK_MAX_BATCH}: its float64 reference holds [B, H, T, T] scores)")
    parser.add_argument("--block", type=positive_int, default=128)
    parser.add_argument("--budget", type=nonnegative_int, default=None,
                        help="pointer blocks per query block (GPU 32, CPU 2)")
    parser.add_argument("--local-blocks", type=positive_int, default=None, help="local band (GPU 4, CPU 2)")
    parser.add_argument("--global-blocks", type=nonnegative_int, default=0)
    parser.add_argument("--num-pointers", type=positive_int, default=4)
    parser.add_argument("--num-freqs", type=positive_int, default=16)
    parser.add_argument("--delta-max", type=positive_float, default=65536.0)
    parser.add_argument("--min-period", type=positive_float, default=256.0)
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="default: GPU bf16, CPU fp32")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the flex paths (default: on for CUDA, off (eager) on CPU)")
    parser.add_argument("--check-len", type=positive_int, default=None,
                        help="T of the correctness check (GPU 4096, CPU 1024; a multiple of --block)")
    parser.add_argument("--skip-check", action="store_true", help="no correctness check (not for recorded results)")
    parser.add_argument("--max-seconds", type=positive_float, default=None,
                        help="skip the lengths not started after this many seconds (default: GPU 270, CPU none)")
    parser.add_argument("--results-dir", type=results_folder,
                        help=f"where results go (default: ${RESULTS_ENV}, else bench/results)")
    parser.add_argument("--name", type=file_stem,
                        help="file stem of the results (default: scope_cuda / scope_cpu)")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    fill_defaults(args)
    problem = refused_settings(args)
    if problem:
        parser.error(problem)
    return args


def fill_defaults(args: argparse.Namespace) -> None:
    """The device's defaults for the settings left out (every flag given is >= 1 here: none falls back)."""
    cuda = args.device.startswith("cuda")
    args.seq_lens = args.seq_lens or (GPU_SEQ_LENS if cuda else CPU_SEQ_LENS)
    # score_mod's flex fwd+bwd takes minutes to compile on the GPU (torch 2.11): asked for explicitly only
    args.bias_impls = args.bias_impls or (["qk_aug", "none"] if cuda else ["score_mod"])
    args.backends = args.backends or (["triton", "flex"] if cuda else ["flex"])
    args.heads = args.heads or (16 if cuda else 4)
    args.kv_heads = args.kv_heads or args.heads
    args.head_dim = args.head_dim or (128 if cuda else 64)
    args.budget = args.budget if args.budget is not None else (32 if cuda else 2)
    args.local_blocks = args.local_blocks or (4 if cuda else 2)
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.compile = cuda if args.compile is None else args.compile
    args.check_len = args.check_len or (4096 if cuda else 1024)
    args.max_seconds = args.max_seconds if args.max_seconds is not None else (270.0 if cuda else math.inf)
    if args.module_seq_lens is None:
        args.module_seq_lens = [max(args.seq_lens)]


def refused_settings(args: argparse.Namespace) -> str | None:
    """Why these settings (defaults filled) would time nothing, fail after the results folder is made, or leave a
    flag unused; None when they run."""
    if "triton" in args.backends and not args.device.startswith("cuda"):
        return "--backends triton runs the block-sparse Triton kernels on CUDA tensors: use --device cuda"
    if not variants(args):
        return "--bias-impls score_mod runs in flex only: with --backends triton alone nothing would be timed"
    uneven = [t for t in args.seq_lens if t % args.block]
    if uneven:
        return f"--seq-lens {uneven} are not multiples of --block {args.block}"
    if not args.skip_check and args.check_len % args.block:
        return f"--check-len {args.check_len} is not a multiple of --block {args.block}"
    from_env = os.environ.get(RESULTS_ENV) if args.results_dir is None else None
    if from_env:  # the folder --results-dir would have checked, found only after the timing otherwise
        try:
            results_folder(from_env)
        except argparse.ArgumentTypeError as error:
            return f"${RESULTS_ENV} (the results folder when --results-dir is left out): {error}"
    unused = sorted(set(args.module_seq_lens) - set(args.seq_lens))
    if unused:
        return f"--module-seq-lens {unused} are not among the timed lengths {args.seq_lens} (--seq-lens)"
    try:  # the layer's own rules (heads a multiple of kv heads, min period below delta max, ...), before any work
        for bias_impl, backend in variants(args):
            bench_config(args, bias_impl, backend)
    except ScopeConfigError as error:
        return f"the layer these flags describe is refused: {error}"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with compile_settings(64, cpu_compile=args.compile and not args.device.startswith("cuda")):
        return run(args)


def run(args: argparse.Namespace) -> int:
    device = args.device
    cuda = device.startswith("cuda")
    dtype = getattr(torch, args.dtype)
    backward = cuda  # FlexAttention has no CPU backward (NotImplementedError in torch 2.11 - 2.13)
    start = time.perf_counter()
    env = environment(device)
    print(f"{env['device']} | torch {env['torch']} | triton {env['triton']} | commit {env['commit']}", flush=True)
    print(f"shape B={args.batch} H={args.heads} H_kv={args.kv_heads} D={args.head_dim} {args.dtype}; "
          f"block {args.block}, budget {args.budget}, local {args.local_blocks}, global {args.global_blocks}; "
          f"{'compiled' if args.compile else 'eager'}", flush=True)

    checks: list[dict[str, Any]] = []
    if not args.skip_check:
        for bias_impl, backend in variants(args):
            torch._dynamo.reset()
            layer = make_layer(bench_config(args, bias_impl, backend), device, dtype)
            step = Compiled(scope_attention_step, args.compile)
            t0 = time.perf_counter()
            result = check_scope(layer, step, args.check_len, device, dtype, backward, min(args.batch, CHECK_MAX_BATCH))
            result["seconds"] = round(time.perf_counter() - t0, 1)
            checks.append(rounded(result))
            print(f"check {bias_impl} {backend} T={args.check_len}: {json.dumps(checks[-1])}", flush=True)
            del layer, step
            if cuda:
                torch.cuda.empty_cache()

    rows: list[dict[str, Any]] = []
    if all(check["ok"] for check in checks):
        for seq_len in args.seq_lens:
            elapsed = time.perf_counter() - start
            if elapsed > args.max_seconds:
                print(f"T={seq_len}: skipped, {elapsed:.0f} s > --max-seconds {args.max_seconds}", flush=True)
                rows += [{"T": seq_len, "bias_impl": b, "backend": k, "skipped": "time budget"}
                         for b, k in variants(args)]
                continue
            rows += run_length(args, seq_len, device, dtype, args.compile, backward,
                               with_module=seq_len in args.module_seq_lens)
    total_s = round(time.perf_counter() - start, 1)
    rows.sort(key=lambda r: (r["T"], variants(args).index((r["bias_impl"], r["backend"]))))

    out_dir = results_dir(args.results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / (args.name or f"scope_{'cuda' if cuda else 'cpu'}")
    settings = {k: v for k, v in vars(args).items() if k not in ("results_dir", "name")}
    settings["max_seconds"] = None if math.isinf(args.max_seconds) else args.max_seconds
    with open(stem.with_suffix(".jsonl"), "a") as handle:
        handle.writelines(json.dumps({"table": "check", **c, **env}) + "\n" for c in checks)
        handle.writelines(json.dumps({"table": "timing", **r, **env}) + "\n" for r in rows)
        handle.write(json.dumps({"table": "run", "total_s": total_s, "settings": settings, **env}) + "\n")
    text = [f"# SCOPE attention vs dense SDPA and a static window, {env['device']}", "",
            f"torch {env['torch']}, triton {env['triton']}, commit {env['commit']}; B={args.batch}, H={args.heads}, "
            f"H_kv={args.kv_heads}, D={args.head_dim}, {args.dtype}, {'torch.compile' if args.compile else 'eager'}; "
            f"blocks of {args.block}, budget {args.budget}, local {args.local_blocks}, global {args.global_blocks}, "
            f"M={args.num_pointers}, K={args.num_freqs}; whole run {total_s} s.", "",
            "Milliseconds (medians). fwd = forward, fb = forward+backward. scope = the attention core of "
            "ScopeAttention (pointer head, bias coefficients, mask building, attention in the row's backend: "
            "flex_attention or the block-sparse Triton kernels), from projected q, k, v; mask = the mask "
            "builder alone (fwd: kv side; fb: with the q side the backward needs: the transposed lists); "
            "mask_frac = mask / scope of the same pass; window/scope = what the pointers cost over a static "
            "window of the same number of blocks (bias_impl none: the pointers alone); flop_ratio = dense "
            "causal scores / scores in the mask's blocks.", ""]
    if checks:
        text += [f"## Correctness (before timing): SCOPE step vs float64 dense reference, T={args.check_len}", "",
                 markdown_table(checks, CHECK_COLUMNS), "",
                 f"Allowed: {CHECK_FACTOR} x the error of the same math at the kernel's precision (*_own); for "
                 f"gradients at least {CHECK_FACTOR} x SDPA's own gradient error in this dtype (*_bound).", ""]
    text += ["## Attention", "", markdown_table(rows, TABLE_COLUMNS), ""]
    if any("module_fwd_ms" in r for r in rows):
        text += ["## Whole ScopeAttention module (projections included) and mask building", "",
                 markdown_table([r for r in rows if "module_fwd_ms" in r], MODULE_COLUMNS), ""]
    errors = [f"- T={r['T']} {r['bias_impl']} {r['backend']}: {json.dumps(r['errors'])}"
              for r in rows if r.get("errors")]
    if errors:
        text += ["## Errors and graph breaks", "", *errors, ""]
    targets = target_lines(rows)
    if targets:
        text += ["## Target", "", *(f"- {line}" for line in targets), ""]
    stem.with_suffix(".md").write_text("\n".join(text))
    print("\n".join(text[:4]))
    if checks:
        print(markdown_table(checks, ["T", "bias_impl", "backend", "ok", "out_rel_err", "out_rel_own", "dq_rel_err",
                                      "dq_bound", "dq_content_rel_err", "dq_content_bound"]))
    print(markdown_table(rows, SHORT_COLUMNS["fb" if backward else "fwd"]))
    for line in targets:
        print(line)
    print(f"results: {stem}.jsonl / .md")
    if not all(check["ok"] for check in checks):
        print("correctness check FAILED: no timings taken")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
