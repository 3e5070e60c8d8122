"""Where the time of one SCOPE attention step goes: GPU kernels by total device time (torch.profiler).

    python -m bench.profile_scope --device cuda --seq-lens 131072 --bias-impls qk_aug --backends triton
    python -m bench.profile_scope --device cuda --forward-only --top 30 --trace /tmp/scope_trace.json

The step is bench.bench_scope's (pointer head, bias coefficients, mask, attention: from projected q, k, v),
compiled as there, forward+backward in training mode unless ``--forward-only``; every option of
bench.bench_scope that shapes the layer applies (the first of ``--seq-lens``). Two warm-up steps, then
``--steps`` profiled ones; prints per variant the ``--top`` kernels (ms per step, share of the step's kernel
time) and, with ``--out``, appends them as JSON lines. ``--trace`` writes a Chrome trace of the last variant.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from bench import bench_scope
from bench.env_info import environment, markdown_table, output_file, positive_int

# bench_scope's options for its timed run, not the layer: a profile would silently ignore them
SCOPE_RUN_ONLY = ("module_seq_lens", "check_len", "skip_check", "max_seconds", "results_dir", "name")


def kernel_table(prof: profile, steps: int, top: int) -> tuple[list[dict[str, Any]], float]:
    """The ``top`` device kernels by self device time per step, with their share of all kernel time; and
    that total (ms per step)."""
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    total = sum(e.self_device_time_total for e in events)
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    return [{"kernel": e.key[:90], "calls_per_step": e.count / steps,
             "ms_per_step": round(e.self_device_time_total / 1000 / steps, 3),
             "share": round(e.self_device_time_total / total, 3)} for e in events[:top]], total / 1000 / steps


def profile_variant(args: argparse.Namespace, bias_impl: str, backend: str
                    ) -> tuple[list[dict[str, Any]], float, profile]:
    dtype = getattr(torch, args.dtype)
    layer = bench_scope.make_layer(bench_scope.bench_config(args, bias_impl, backend), args.device, dtype)
    inp = bench_scope.attention_inputs(layer.config, args.seq_lens[0], args.device, dtype, seed=0,
                                       grad=not args.forward_only, batch=args.batch)
    _, fwd, fb = bench_scope.scope_step_calls(layer, inp, args.compile)
    run_step = fwd if args.forward_only else fb
    layer.train(not args.forward_only)

    for _ in range(2):
        run_step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            run_step()
        torch.cuda.synchronize()
    return (*kernel_table(prof, args.steps, args.top), prof)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=positive_int, default=3)
    parser.add_argument("--top", type=positive_int, default=15)
    parser.add_argument("--forward-only", action="store_true")
    parser.add_argument("--out", type=output_file, help="JSON-lines file to append to")
    parser.add_argument("--trace", type=output_file, help="Chrome trace of the last variant")
    own, rest = parser.parse_known_args(argv)
    given = vars(bench_scope.build_parser().parse_args(rest))
    ignored = [f"--{dest.replace('_', '-')}" for dest in SCOPE_RUN_ONLY if given[dest] not in (None, False)]
    if ignored:
        parser.error(f"{', '.join(ignored)} set bench_scope's own run (its check, time budget and results), which "
                     "profile_scope does not do: drop them")
    args = bench_scope.parse_args(rest)
    for name, value in vars(own).items():
        setattr(args, name, value)
    if not args.device.startswith("cuda"):
        parser.error("profile_scope times GPU kernels: pass --device cuda")
    env = environment(args.device)
    prof = None
    with bench_scope.compile_settings(64, cpu_compile=False):
        for bias_impl, backend in bench_scope.variants(args):
            rows, total_ms, prof = profile_variant(args, bias_impl, backend)
            head = {"T": args.seq_lens[0], "bias_impl": bias_impl, "backend": backend,
                    "pass": "fwd" if args.forward_only else "fb", "kernel_ms_per_step": round(total_ms, 3)}
            print(f"\n{head}")
            print(markdown_table(rows, ["kernel", "calls_per_step", "ms_per_step", "share"]))
            if args.out:
                with open(args.out, "a") as handle:
                    handle.writelines(json.dumps({**head, **row, **env}) + "\n" for row in rows)
    if args.trace and prof is not None:
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
