"""Host work of one NSA layer's forward + backward on the kernel path, counted on any machine (no GPU needed).

    python -m bench.host_ops                          # the 4-layer GPT's attention (B=4, HQ=4, H_kv=2, d=64)
    python -m bench.host_ops --batch 1 --heads 64 --kv-heads 4 --head-dim 128 --seq-len 512
    python -m bench.host_ops --gpt                    # and a training step of the 4-layer GPT, NSA and dense

An eager training step of a small model is host-bound on the GPU (docs/PERF_NOTES.md: the 4-layer GPT at 16k tokens
spends more host time per step than GPU time), and what it costs there is mostly the number of launches: each
tensor op and each Triton launch. This runs ``NSAAttention`` (and, apart, the fused op ``nsa.prefill.PrefillRun``
alone) on CPU tensors along the path eager CUDA takes, with every Triton launch replaced by a counter (the
kernels' outputs stay uninitialised), and reports the tensor ops it issues (all, and those that launch a kernel
on the GPU: not views, not allocations), the Triton launches by kernel, and its host time here. The times are this
CPU's and include the CPU's own arithmetic of the tensor ops (the projections' matmuls dominate the module's);
the counts are the device's. Run it from a checkout whose ``nsa`` to measure (an older tree: copy this file into
it, and label its rows with BENCH_COMMIT); ``--results-dir bench/results`` records the rows.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench.env_info import environment, positive_int, results_folder

# ops that launch no kernel although their schema does not mark them as views: allocations, and _unsafe_view (a
# reshape's view of a fresh tensor)
NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_unsafe_view"}


class OpCounter(TorchDispatchMode):
    """Counts the tensor ops dispatched under it: all of them, and those that launch a kernel on the GPU (not views,
    not ``NO_KERNEL``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.launching: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = func.overloadpacket.__name__
        if func.namespace != "nsa":  # nsa::prefill / prefill_backward: their own ops are counted inside them
            self.ops[name] += 1
            if not func.is_view and name not in NO_KERNEL:
                self.launching[name] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def kernel_path_on_cpu(launches: collections.Counter[str]) -> Iterator[None]:
    """CPU tensors take eager CUDA's path: the fused kernels (dispatch sees no obstacle), the memory-bound passes'
    kernels and the TMA descriptors; each Triton launch only counts into ``launches``."""
    import triton.runtime.jit as jit

    import nsa.dispatch
    import nsa.kernels.tiles
    import nsa.rope

    def count(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        launches[self.fn.__name__] += 1

    patches: list[tuple[Any, str, Any]] = [
        (jit.JITFunction, "run", count),
        (nsa.dispatch, "triton_obstacles", lambda tensors, allow_interpreter, inference_only: []),
        (nsa.dispatch, "elementwise_kernel_applies", nsa.dispatch.elementwise_kernel_fits),
        (nsa.rope, "elementwise_kernel_applies", nsa.dispatch.elementwise_kernel_fits),
        (nsa.kernels.tiles, "tma_capable", lambda device: True),
    ]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    try:
        for owner, name, value in patches:
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def measure(step: Callable[[], None], repeats: int) -> dict[str, Any]:
    """Counts of one ``step`` (after two warm-up steps, which build what is kept) and its median host time. The
    fused op's own ops are counted around PrefillRun's methods: a custom op's implementation runs outside the
    dispatch mode that saw the op (where ``step`` calls PrefillRun directly, they count once, inside)."""
    from nsa import prefill

    launches: collections.Counter[str] = collections.Counter()
    # the stubbed kernels leave their outputs uninitialised: denormal garbage would slow the CPU's own arithmetic
    with kernel_path_on_cpu(launches), contextlib.ExitStack() as undo:
        undo.callback(torch.set_flush_denormal, False)
        torch.set_flush_denormal(True)
        for _ in range(2):
            step()
        launches.clear()
        inside = OpCounter()
        methods = {name: getattr(prefill.PrefillRun, name) for name in ("__init__", "forward", "backward")}

        def counted(method: Callable[..., Any]) -> Callable[..., Any]:
            def run(*args: Any, **kwargs: Any) -> Any:
                with torch.utils._python_dispatch._disable_current_modes(), inside:
                    return method(*args, **kwargs)
            return run

        for name, method in methods.items():
            setattr(prefill.PrefillRun, name, counted(method))
        try:
            with OpCounter() as outside:
                step()
        finally:
            for name, method in methods.items():
                setattr(prefill.PrefillRun, name, method)
        counted_launches = dict(sorted(launches.items()))
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            step()
            times.append((time.perf_counter() - started) * 1e3)
    ops = outside.ops + inside.ops
    launching = outside.launching + inside.launching
    return {"tensor_ops": sum(ops.values()), "launching_ops": sum(launching.values()),
            "triton_launches": sum(counted_launches.values()), "fused_op_tensor_ops": sum(inside.ops.values()),
            "host_ms": round(statistics.median(times), 3), "launches": counted_launches,
            "launching": dict(launching.most_common())}


def module_step(args: argparse.Namespace) -> Callable[[], None]:
    """NSAAttention forward + backward (bf16) on x [B, T, hidden]."""
    from nsa import NSAAttention, NSAConfig

    torch.manual_seed(0)
    config = NSAConfig(hidden_size=args.heads * args.head_dim, num_heads=args.heads, num_kv_heads=args.kv_heads,
                       head_dim=args.head_dim, head_dim_v=args.head_dim, cmp_block_size=32, cmp_stride=16,
                       sel_block_size=64, num_selected=16, window_size=512)
    layer = NSAAttention(config).to(torch.bfloat16)
    x = torch.randn(args.batch, args.seq_len, config.hidden_size, dtype=torch.bfloat16, requires_grad=True)

    def step() -> None:
        layer(x).backward(torch.ones(x.shape, dtype=x.dtype))
        layer.zero_grad(set_to_none=True)  # as a training step does: no accumulation into .grad
        x.grad = None

    return step


def op_step(args: argparse.Namespace) -> Callable[[], None]:
    """nsa::prefill's forward and backward runs (PrefillRun) alone, on bf16 inputs of the module's shapes."""
    from nsa.prefill import PrefillRun, PrefillSizes

    gen = torch.Generator().manual_seed(0)
    num_cmp = (args.seq_len - 32) // 16 + 1
    shapes = [(args.seq_len, args.heads), (num_cmp, args.kv_heads), (num_cmp, args.kv_heads)] + [
        (args.seq_len, args.kv_heads)] * 4
    q, k_cmp, v_cmp, k_sel, v_sel, k_win, v_win = (
        torch.randn(args.batch, n, h, args.head_dim, generator=gen).bfloat16() for n, h in shapes)
    gates = torch.rand(args.batch, args.seq_len, args.heads, 3, generator=gen).bfloat16()
    sizes, scale = PrefillSizes(32, 16, 64, 16, 512), args.head_dim**-0.5
    dout = torch.randn(args.batch, args.seq_len, args.heads, args.head_dim, generator=gen).bfloat16()
    run_args = (q, k_cmp, v_cmp, k_sel, v_sel, k_win, v_win, gates, None, sizes, scale)

    def step() -> None:
        _, indices, lse_cmp, lse_sel, lse_win, branch_outs, blocks, counts = PrefillRun(*run_args).forward()
        PrefillRun(*run_args, forward_outputs=False).backward(
            dout, indices, (lse_cmp, lse_sel, lse_win), branch_outs, (blocks, counts))

    return step


def gpt_step(attention: str) -> Callable[[argparse.Namespace], Callable[[], None]]:
    """A training step's forward + backward of bench_prefill's 4-layer GPT (width 256, 4 heads of d = 64, 2 kv heads)
    with NSA or dense attention, in bf16 (no optimizer step: the fused AdamW is a handful of launches)."""
    def make(args: argparse.Namespace) -> Callable[[], None]:
        from sal_harness.model import GPT, DenseAttentionConfig, GPTConfig, ModelConfig, NSAAttentionConfig

        torch.manual_seed(0)
        model = ModelConfig(vocab_size=256, n_layer=4, hidden_size=256, num_heads=4, num_kv_heads=2, head_dim=64,
                            max_seq_len=args.seq_len)
        layer = (NSAAttentionConfig(cmp_block_size=32, cmp_stride=16, sel_block_size=64, num_selected=16,
                                    window_size=512) if attention == "nsa" else DenseAttentionConfig())
        gpt = GPT(GPTConfig(model=model, attention=layer)).to(torch.bfloat16)
        tokens = torch.randint(0, 256, (args.batch, args.seq_len + 1))

        def step() -> None:
            gpt(tokens[:, :-1], targets=tokens[:, 1:]).loss.backward()
            gpt.zero_grad(set_to_none=True)

        return step

    return make


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=positive_int, default=4)
    parser.add_argument("--seq-len", type=positive_int, default=256, help="T (the counts do not depend on it; >= 64)")
    parser.add_argument("--heads", type=positive_int, default=4)
    parser.add_argument("--kv-heads", type=positive_int, default=2)
    parser.add_argument("--head-dim", type=positive_int, default=64)
    parser.add_argument("--repeats", type=positive_int, default=20)
    parser.add_argument("--gpt", action="store_true", help="also a training step of bench_prefill's 4-layer GPT, "
                        "with NSA and with dense attention (its layers at the GPT's shape, whatever the flags above)")
    parser.add_argument("--results-dir", type=results_folder, default=None,
                        help="also append the rows to host_ops_cpu.jsonl there (bench/results: the recorded ones)")
    args = parser.parse_args(argv)
    if args.seq_len < 64:
        parser.error(f"--seq-len must be >= 64 (a selection block), got {args.seq_len}")
    if args.heads % args.kv_heads:
        parser.error(f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads}")
    env = environment("cpu")
    steps: list[tuple[str, Callable[[argparse.Namespace], Callable[[], None]]]] = [
        ("nsa_module", module_step), ("nsa_prefill_op", op_step)]
    if args.gpt:
        steps += [("gpt_nsa", gpt_step("nsa")), ("gpt_dense", gpt_step("dense"))]
    for name, make in steps:
        shape = ({"HQ": 4, "H_kv": 2, "d": 64} if name.startswith("gpt") else
                 {"HQ": args.heads, "H_kv": args.kv_heads, "d": args.head_dim})
        row = {"what": name, "B": args.batch, "T": args.seq_len, **shape, **measure(make(args), args.repeats), **env}
        print(json.dumps(row), flush=True)
        if args.results_dir is not None:
            args.results_dir.mkdir(parents=True, exist_ok=True)
            with (args.results_dir / "host_ops_cpu.jsonl").open("a") as handle:
                handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
