"""The milestone smokes (`pytest -m long`, the design card's `uv run -q pytest -m long`): one end-to-end check per
milestone M0-M6 of PRD.md, named after it, so the run reads as the milestones' state.

Each runs the public API (nsa, sal_harness, the bench scripts) at small sizes and checks it against something
written independently: the float64 references of tests/reference.py (written from NSA.md, they never import nsa),
NSA.md's read formula spelled out here, or a property of the run itself (a loss that falls, rows that stay equal).
M4 and M5 run the Triton kernels: on the GPU where there is one, else in Triton's CPU interpreter (conftest.py sets
TRITON_INTERPRET=1 before triton is imported). M6's speed targets are GPU measurements
(bench/results/prefill_cuda.md); its smoke covers what the CPU can show: robustness, and the benchmark's run.

Tolerances: float64 against float64, TOL64 (conftest: O(K eps) reduction-order differences); float32 kernels
against float64 math, 1e-5 (a few float32 roundings of O(1) values, as in tests/test_nsa_prefill.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import F64, TOL64, randn
from reference import (
    check_selection,
    dense_cmp_mask,
    dense_masked_attention,
    dense_nsa,
    dense_selection_scores,
    dense_window_mask,
    ref_compress_mean,
    ref_nsa,
    ref_select,
)
from test_inv_nonfinite import make_layer  # every parameter redrawn ~N(0, 1/fan_in), phi's zero output layer too
from torch.autograd import gradcheck
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import nsa.dispatch
from nsa import (
    CompressPool,
    NSAConfig,
    NSAConfigError,
    NSAInputError,
    compress_mean_pool,
    compressed_attention,
    nsa_attention,
    sliding_window_attention,
)
from nsa.kernels import tiles
from sal_harness.model import GPT, GPTConfig, ModelConfig, NSAAttentionConfig

pytestmark = pytest.mark.long

REPO = Path(__file__).resolve().parent.parent
KERNEL_TOL: dict[str, Any] = {"rtol": 1e-5, "atol": 1e-5}
# l=8, d=4, l'=8, n=4 (one free slot beside the three forced blocks, so top-n really chooses), w=10.
SIZES = (8, 4, 8, 4, 10)
BLOCKS: dict[str, Any] = dict(zip(("block_size", "block_stride", "sel_block_size", "num_selected", "window_size"),
                                  SIZES, strict=True))
DENSE_SIZES = {key: BLOCKS[key] for key in ("block_size", "block_stride", "sel_block_size", "window_size")}
LAYER: dict[str, Any] = {"hidden_size": 16, "num_heads": 4, "num_kv_heads": 2, "head_dim": 8, "head_dim_v": 6,
                         "backend": "torch", **dict(zip(("cmp_block_size", "cmp_stride", "sel_block_size",
                                                         "num_selected", "window_size"), SIZES, strict=True))}


def branch_inputs(batch: int, seq_len: int, heads: int, kv_heads: int, dk: int, dv: int,
                  seed: int) -> list[torch.Tensor]:
    """nsa_attention's eight float64 inputs [B, T, H, D] (k_cmp / v_cmp mean-pooled by the reference), gates in
    (0, 1)."""
    raw = [randn(batch, seq_len, *size, seed=seed + i) for i, size in enumerate(
        [(heads, dk), (kv_heads, dk), (kv_heads, dv), (kv_heads, dk), (kv_heads, dv), (kv_heads, dk), (kv_heads, dv)])]
    q, k_raw, v_raw, *rest = raw
    pooled = [ref_compress_mean(x, BLOCKS["block_size"], BLOCKS["block_stride"]) for x in (k_raw, v_raw)]
    gates = torch.sigmoid(randn(batch, seq_len, heads, 3, seed=seed + 7))
    return [q, *pooled, *rest, gates]


def nsa_reads(seq_len: int, config: NSAConfig, blocks: list[int]) -> list[int]:
    """NSA.md's tokens read by the query at position S - 1 per branch: num_cmp(S) compressed blocks, the tokens
    <= S - 1 of its selected blocks, min(w, S) window keys."""
    l, d, l_sel = config.cmp_block_size, config.cmp_stride, config.sel_block_size
    cmp = 0 if seq_len < l else (seq_len - l) // d + 1
    sel = sum(min(l_sel, seq_len - j * l_sel) for j in blocks if j >= 0)
    return [cmp, sel, min(config.window_size, seq_len)]


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor (elements) any aten op produces while active, backward ops included."""

    def __init__(self) -> None:
        super().__init__()
        self.numel, self.shape = 0, torch.Size()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.numel() > self.numel:
                self.numel, self.shape = leaf.numel(), leaf.shape
        return out


def test_M0_steel_thread_matches_the_float64_reference() -> None:
    """M0 steel thread: mean-pooling phi, selection (Eq. 8-12), the three gated branches and a causal layer."""
    k_raw = randn(2, 45, 2, 8, seed=2)
    torch.testing.assert_close(compress_mean_pool(k_raw, BLOCKS["block_size"], BLOCKS["block_stride"]),
                               ref_compress_mean(k_raw, BLOCKS["block_size"], BLOCKS["block_stride"]), **TOL64)
    inputs = branch_inputs(2, 45, 4, 2, 8, 6, seed=1)
    q, k_cmp = inputs[:2]
    out, indices = nsa_attention(*inputs, **BLOCKS, backend="torch")
    _, scores = ref_select(q, k_cmp, *SIZES[:4])
    check_selection(indices, scores, BLOCKS["sel_block_size"], BLOCKS["num_selected"])
    expected, _ = ref_nsa(*inputs, **BLOCKS, block_indices=indices)
    torch.testing.assert_close(out, expected, **TOL64)

    layer = make_layer(NSAConfig(**LAYER), 3, F64)
    x = randn(1, 45, 16, seed=4)
    changed = x.clone()
    changed[:, 30:] = randn(1, 15, 16, seed=5)
    with torch.no_grad():
        y, y_changed = layer(x), layer(changed)
    torch.testing.assert_close(y_changed[:, :30], y[:, :30], **TOL64)  # later tokens never reach earlier rows
    assert not torch.allclose(y_changed[:, 30:], y[:, 30:])


def test_M1_memory_bounded_window_and_compressed_branches() -> None:
    """M1 memory-bounded branches: window and compressed, fwd+bwd, equal float64 at T=1024, no [T, T] tensor."""
    seq_len, l, d, w = 1024, 16, 8, 128
    q = randn(1, seq_len, 2, 8, seed=1).requires_grad_()
    k_cmp, v_cmp = (compress_mean_pool(randn(1, seq_len, 1, 8, seed=s), l, d).requires_grad_() for s in (2, 3))
    k_win, v_win = (randn(1, seq_len, 1, 8, seed=s).requires_grad_() for s in (4, 5))
    leaves = [q, k_cmp, v_cmp, k_win, v_win]
    dout = randn(1, seq_len, 2, 8, seed=6)
    largest = LargestTensor()
    with largest:
        o_cmp, _ = compressed_attention(q, k_cmp, v_cmp, l, d)
        o_win = sliding_window_attention(q, k_win, v_win, w)
        grads = torch.autograd.grad(((o_cmp + o_win) * dout).sum(), leaves)
    # The chunked path holds O(T * (T/d + w)) per head; one head's [T, T] scores would be seq_len**2 elements.
    assert largest.numel < seq_len**2, f"a tensor of shape {largest.shape} is as large as [T, T]"

    ref_cmp = dense_masked_attention(q, k_cmp, v_cmp, dense_cmp_mask(seq_len, k_cmp.shape[1], l, d))
    ref_win = dense_masked_attention(q, k_win, v_win, dense_window_mask(seq_len, w))
    torch.testing.assert_close(o_cmp, ref_cmp, **TOL64)
    torch.testing.assert_close(o_win, ref_win, **TOL64)
    torch.testing.assert_close(grads, torch.autograd.grad(((ref_cmp + ref_win) * dout).sum(), leaves), **TOL64)


def test_M2_trainability_phi_gates_gradcheck_and_toy_training() -> None:
    """M2 trainability: a fresh MLP phi is mean pooling, phi and gates pass gradcheck, a toy NSA GPT learns."""
    keys = randn(2, 30, 2, 8, seed=1)
    fresh = CompressPool(8, BLOCKS["block_size"], BLOCKS["block_stride"], kind="mlp").double()
    torch.testing.assert_close(fresh(keys), ref_compress_mean(keys, BLOCKS["block_size"], BLOCKS["block_stride"]),
                               **TOL64)

    layer = make_layer(NSAConfig(**{**LAYER, "compression": "mlp", "compression_hidden": 8}), 2, F64)
    trained = {name: p.detach().clone().requires_grad_() for name, p in layer.named_parameters()
               if name.startswith(("gate_proj.", "compress_k.", "compress_v."))}
    assert len(trained) == 12, sorted(trained)  # the gates' weight and bias, each phi's position table and MLP
    x = randn(1, 13, 16, seed=3, scale=0.5).requires_grad_()

    def forward(x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        return functional_call(layer, dict(zip(trained, params, strict=True)), (x,), strict=False)

    torch.manual_seed(0)  # fast_mode's random projections of the Jacobian
    assert gradcheck(forward, (x, *trained.values()), fast_mode=True)

    torch.manual_seed(0)
    model = GPT(GPTConfig(
        model=ModelConfig(vocab_size=32, n_layer=1, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8,
                          max_seq_len=48),
        attention=NSAAttentionConfig(cmp_block_size=8, cmp_stride=4, sel_block_size=8, num_selected=4,
                                     window_size=8, backend="torch")))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    tokens = torch.randint(0, 32, (4, 49), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = model(tokens[:, :-1], tokens[:, 1:]).loss
        assert loss is not None
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses  # it memorises the fixed batch
    moved = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert any("gate_proj" in name for name in moved) and any("compress" in name for name in moved), sorted(moved)


def test_M3_decode_caches_equal_prefill_and_reads_equal_the_formula(tmp_path: Path) -> None:
    """M3 decode: cached decode equals prefill, reads equal NSA.md's formula (bench_decode.py: 5631 at 64k)."""
    config = NSAConfig(**{**LAYER, "compression": "mlp", "compression_hidden": 8})
    layer = make_layer(config, 1, F64)
    x = randn(2, 45, 16, seed=2)
    cache = layer.new_cache(2, 45)
    steps = []
    with torch.no_grad():
        prefill, prefill_aux = layer(x, return_aux=True)
        for t in range(45):
            y, aux = layer(x[:, t:t + 1], return_aux=True, cache=cache)
            assert cache.last_reads is not None
            steps.append((y, aux.block_indices, cache.last_reads.clone()))
    torch.testing.assert_close(torch.cat([y for y, _, _ in steps], 1), prefill, **TOL64)
    assert torch.equal(torch.cat([blocks for _, blocks, _ in steps], 1), prefill_aux.block_indices)
    for t, (_, blocks, reads) in enumerate(steps):
        for b in range(2):
            for g in range(config.num_kv_heads):
                assert reads[b, 0, g].tolist() == nsa_reads(t + 1, config, blocks[b, 0, g].tolist()), (t, b, g)

    script = REPO / "bench" / "bench_decode.py"
    result = subprocess.run([sys.executable, str(script), "--skip-latency", "--read-lengths", "1024", "65536",
                             "--results-dir", str(tmp_path)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    paper = NSAConfig(cmp_block_size=32, cmp_stride=16, sel_block_size=64, num_selected=16, window_size=512)
    rows = [json.loads(line) for line in (tmp_path / "decode_cpu.jsonl").read_text().splitlines()]
    assert [row["S"] for row in rows] == [1024, 65536]
    for row in rows:
        # Which blocks the query at S - 1 selects does not change the count: block 0, n - 2 complete blocks and the
        # current (partial) one once there are more than n blocks, else all of them.
        current = (row["S"] - 1) // 64
        blocks = list(range(current + 1)) if current < 16 else [0, *range(current - 14, current + 1)]
        assert [row["cmp"], row["sel"], row["win"]] == nsa_reads(row["S"], paper, blocks), row
    assert rows[-1]["measured"] == 4095 + 1024 + 512  # the paper's figure at 64k


def kernel_inputs(device: str) -> list[torch.Tensor]:
    """float32 inputs (G = 2, T = 37, not a multiple of any block) on the device the kernels run on."""
    return [x.float().to(device).requires_grad_() for x in branch_inputs(1, 37, 2, 1, 16, 16, seed=11)]


def dense_reference(wide: list[torch.Tensor], indices: torch.Tensor) -> torch.Tensor:
    """The float64 reference output of nsa_attention's eight inputs with the given selection (dense masks)."""
    q, k_cmp, v_cmp, k_sel, v_sel, k_win, v_win, gates = wide
    return dense_nsa(q, k_cmp, v_cmp, k_sel, v_sel, k_win, v_win, gates, indices.cpu(), **DENSE_SIZES)


@pytest.fixture
def kernel_device(monkeypatch: pytest.MonkeyPatch) -> str:
    """The GPU where there is one, else the CPU with Triton's interpreter; outputs start poisoned (NaN / INT_MIN),
    so an element a kernel failed to write shows."""
    monkeypatch.setattr(tiles, "POISON_OUTPUTS", True)
    return "cuda" if torch.cuda.is_available() else "cpu"


def test_M4_triton_prefill_forward(kernel_device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """M4 Triton forward: NSA_BACKEND=triton runs the fused prefill kernels; selection, output equal float64."""
    monkeypatch.setenv("NSA_BACKEND", "triton")
    inputs = kernel_inputs(kernel_device)
    assert nsa.dispatch.choose_prefill_backend("auto", inputs[0], tuple(inputs[1:]), SIZES).name == "triton"
    with torch.no_grad():
        out, indices = nsa_attention(*inputs, **BLOCKS)
    wide = [x.detach().cpu().double() for x in inputs]
    scores = dense_selection_scores(wide[0], wide[1], *SIZES[:3])
    check_selection(indices.cpu(), scores, BLOCKS["sel_block_size"], BLOCKS["num_selected"],
                    tol=1e-5 * max(1.0, float(scores.max())))
    torch.testing.assert_close(out.cpu().double(), dense_reference(wide, indices), **KERNEL_TOL)


def test_M5_triton_prefill_backward(kernel_device: str) -> None:
    """M5 Triton backward: the kernels' eight gradients equal float64's and are bitwise deterministic."""
    inputs = kernel_inputs(kernel_device)
    dout = randn(1, 37, 2, 16, seed=99).float().to(kernel_device)
    runs = []
    for _ in range(2):
        out, indices = nsa_attention(*inputs, **BLOCKS, backend="triton")
        runs.append(torch.autograd.grad(out, inputs, dout))
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
    wide = [x.detach().cpu().double().requires_grad_() for x in inputs]
    expected = dense_reference(wide, indices)
    names = ("dq", "dk_cmp", "dv_cmp", "dk_sel", "dv_sel", "dk_win", "dv_win", "dgates")
    want = torch.autograd.grad(expected, wide, dout.cpu().double())
    torch.testing.assert_close(dict(zip(names, (g.cpu().double() for g in runs[0]), strict=True)),
                               dict(zip(names, want, strict=True)), **KERNEL_TOL)


def test_M6_robustness_and_the_prefill_benchmark(tmp_path: Path) -> None:
    """M6 robustness, benchmark (CPU part): NaN stays in the rows that read it, typed errors, bench_prefill runs."""
    layer = make_layer(NSAConfig(**LAYER), 1, F64)
    x = randn(1, 40, 16, seed=2)
    poisoned = x.clone()
    poisoned[0, 25, 3] = float("nan")
    rows = []
    for inputs in (x, poisoned):
        y = layer(inputs)
        grads = torch.autograd.grad(y[:, :25].sum(), list(layer.parameters()))
        rows.append((y, grads))
    (clean, clean_grads), (bad, bad_grads) = rows
    assert torch.equal(bad[:, :25], clean[:, :25]) and bad[:, 25].isnan().all()
    assert all(torch.equal(a, b) for a, b in zip(bad_grads, clean_grads, strict=True))
    with pytest.raises(NSAInputError, match="hidden"):
        layer(randn(1, 40, 12, seed=3))
    with pytest.raises(NSAConfigError, match="window_size"):
        NSAConfig(**{**LAYER, "window_size": 0})

    result = subprocess.run([sys.executable, "-m", "bench.bench_prefill", "--parts", "layer", "--shapes", "g4",
                             "--seq-lens", "64", "--results-dir", str(tmp_path), "--name", "smoke"],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    timed = {row["impl"]: row for row in map(json.loads, (tmp_path / "smoke.jsonl").read_text().splitlines())}
    for impl in ("nsa", "dense"):
        assert timed[impl]["fwd_ms"] > 0 and timed[impl]["fwdbwd_ms"] > 0 and "error" not in timed[impl], timed
    assert "fwd_vs_dense" in (tmp_path / "smoke.md").read_text()
