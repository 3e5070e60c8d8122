"""Train a small GPT with NSA (or dense) attention on the retrieval task or the embedded text.

    python -m scripts.train                                   # configs/toy_retrieval.toml -> runs/toy_retrieval
    python -m scripts.train --config configs/toy_retrieval_dense.toml
    python -m scripts.train --out-dir runs/x --max-steps 100  # stop early ...
    python -m scripts.train --out-dir runs/x --resume         # ... and continue exactly where it stopped
    python -m scripts.train --threads 1                       # one torch thread: fastest for the toy on a busy CPU

Outputs in the run directory: metrics.jsonl (one JSON object per line: {"kind": "train", "step",
"loss", "lr", "tokens_per_s", "elapsed_s"} every log_interval steps and {"kind": "eval", "step",
"by_distance": [{"distance", "accuracy", "token_accuracy", "n"}]} -- or "val_loss" for the text task --
every eval_interval steps and at the end), ckpt.pt (atomic; see scripts/checkpoint.py), config.json,
loss_curve.png and accuracy_by_distance.png.

``--max-steps`` sets where this invocation stops; the learning-rate schedule always follows the
config's [train] max_steps, so k steps + resume to N is bitwise the same run as N steps straight.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from nsa import NSAConfigError
from nsa.model import GPT
from scripts.checkpoint import CHECKPOINT_NAME, atomic_write, load_checkpoint, restore_rng_state, save_checkpoint
from scripts.config import RunConfig, TrainConfig, load_config
from scripts.data import RetrievalTask, TextTask
from scripts.evaluate import evaluate_retrieval, evaluate_text, format_table, window_of

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "toy_retrieval.toml"
METRICS_NAME = "metrics.jsonl"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help=f"TOML run config (default: {DEFAULT_CONFIG})")
    parser.add_argument("--out-dir", type=Path, help="run directory (default: runs/<config file stem>)")
    parser.add_argument("--max-steps", type=int, help="stop after this many total steps (default: [train] max_steps)")
    parser.add_argument("--resume", action="store_true", help="continue from <out-dir>/ckpt.pt")
    parser.add_argument("--device", help="torch device (default: [train] device)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; 1 is often "
                        "fastest for the toy models and avoids oversubscribing a shared machine)")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Pieces of the training loop


def lr_at(step: int, train: TrainConfig) -> float:
    """Linear warmup over warmup_steps, then cosine from lr to min_lr at max_steps, then min_lr."""
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    if step >= train.max_steps:
        return train.min_lr
    progress = (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps)
    return train.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (train.lr - train.min_lr)


def make_optimizer(model: torch.nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (dim >= 2) only, not on norms and biases."""
    params = list(model.parameters())
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": train.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=train.lr, betas=(train.beta1, train.beta2))


def make_task(config: RunConfig) -> RetrievalTask | TextTask:
    if config.data.task == "retrieval":
        return config.data.retrieval_task()
    return TextTask(config.data.seq_len, config.data.val_fraction)


def run_eval(model: GPT, config: RunConfig, task: RetrievalTask | TextTask, step: int, device: str) -> dict[str, Any]:
    """An eval metrics record: accuracy by distance (retrieval) or validation loss (text)."""
    data = config.data
    if isinstance(task, RetrievalTask):
        by_distance = evaluate_retrieval(
            model, task, data.eval_distances, data.eval_samples, data.eval_batch_size, data.eval_seed, device
        )
        return {"kind": "eval", "step": step, "by_distance": by_distance}
    return {"kind": "eval", "step": step, **evaluate_text(model, task, data.eval_samples,
                                                          data.eval_batch_size, data.eval_seed, device)}


class MetricsLog:
    """Append-only JSON-lines file; on resume, lines past the checkpoint's step are dropped."""

    def __init__(self, path: Path, fresh: bool) -> None:
        self.path = path
        if fresh:
            atomic_write(path, lambda handle: None)

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        records = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        kept = "".join(json.dumps(r) + "\n" for r in records if r["step"] <= step)
        atomic_write(self.path, lambda handle: handle.write(kept.encode()))

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def plot_results(out_dir: Path, records: list[dict[str, Any]], window: int | None) -> None:
    """loss_curve.png (train loss by step) and, for retrieval, accuracy_by_distance.png (last eval)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if evals and "val_loss" in evals[-1]:
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "loss_curve.png", dpi=100)
    plt.close(fig)

    if not evals or "by_distance" not in evals[-1]:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, record in enumerate(evals):
        last = i == len(evals) - 1
        xs = [r["distance"] for r in record["by_distance"]]
        ys = [r["accuracy"] for r in record["by_distance"]]
        ax.plot(xs, ys, "o-" if last else "-", alpha=1.0 if last else 0.25, color="C0",
                label=f"step {record['step']}" if last else None)
    if window is not None:
        ax.axvline(window, color="gray", linestyle="--", label=f"window w={window}")
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("needle distance (tokens)")
    ax.set_ylabel("exact-match accuracy")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "accuracy_by_distance.png", dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# The run


def resolve_config(args: argparse.Namespace) -> tuple[RunConfig, Path]:
    """The run config and directory. With --resume the checkpoint's config is used; a --config that
    disagrees with it is an error."""
    config_path = args.config or DEFAULT_CONFIG
    out_dir = args.out_dir or Path("runs") / config_path.stem
    if not args.resume:
        return load_config(config_path), out_dir
    checkpoint_path = out_dir / CHECKPOINT_NAME
    if not checkpoint_path.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {checkpoint_path}")
    saved = RunConfig.from_dict(load_checkpoint(checkpoint_path)["config"])
    if args.config is not None and load_config(args.config) != saved:
        raise NSAConfigError(f"--config {args.config} differs from the config stored in {checkpoint_path}")
    return saved, out_dir


def train(config: RunConfig, out_dir: Path, *, stop_step: int | None = None, resume: bool = False,
          device: str | None = None) -> dict[str, Any]:
    """Train until ``stop_step`` (default [train] max_steps); returns a summary dict."""
    tc = config.train
    device = device or tc.device
    stop_step = tc.max_steps if stop_step is None else stop_step
    checkpoint_path = out_dir / CHECKPOINT_NAME
    if not resume and checkpoint_path.exists():
        raise FileExistsError(f"{checkpoint_path} exists: pass --resume to continue it, or another --out-dir")
    out_dir.mkdir(parents=True, exist_ok=True)

    # Model, optimizer, data generator. The global seed fixes the initial weights.
    torch.manual_seed(tc.seed)
    model = GPT(config.model).to(device)
    optimizer = make_optimizer(model, tc)
    data_generator = torch.Generator().manual_seed(config.data.seed)
    task = make_task(config)
    metrics = MetricsLog(out_dir / METRICS_NAME, fresh=not resume)
    step = 0
    if resume:
        checkpoint = load_checkpoint(checkpoint_path, map_location=device)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        restore_rng_state(checkpoint["rng"], data_generator)
        step = checkpoint["step"]
        metrics.truncate_after(step)
    config_json = json.dumps(config.to_dict(), indent=2).encode()
    atomic_write(out_dir / "config.json", lambda handle: handle.write(config_json))

    def checkpoint_now() -> None:
        save_checkpoint(checkpoint_path, model=model, optimizer=optimizer, step=step,
                        data_generator=data_generator, config=config.to_dict())

    print(f"{config.model.attention} GPT, {model.num_parameters():,} parameters, device {device}, "
          f"steps {step} -> {stop_step}, out {out_dir}")
    model.train()
    tokens_per_step = tc.batch_size * config.data.seq_len
    start_time = time.perf_counter()
    window_losses: list[float] = []
    window_start = time.perf_counter()
    last_eval: dict[str, Any] | None = None
    progress = tqdm(total=stop_step, initial=step, desc="train", unit="step", dynamic_ncols=True)
    while step < stop_step:
        # One optimizer step.
        lr = lr_at(step, tc)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = task.sample(tc.batch_size, data_generator)
        loss = model(batch.inputs.to(device), batch.targets.to(device)).loss
        assert loss is not None
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        step += 1
        window_losses.append(loss.item())
        progress.update(1)
        progress.set_postfix(loss=f"{window_losses[-1]:.3f}", lr=f"{lr:.2e}")

        # Bookkeeping: metrics, evaluation, checkpoint.
        if step % tc.log_interval == 0 or step == stop_step:
            now = time.perf_counter()
            metrics.append({
                "kind": "train", "step": step, "loss": sum(window_losses) / len(window_losses), "lr": lr,
                "tokens_per_s": tokens_per_step * len(window_losses) / max(now - window_start, 1e-9),
                "elapsed_s": now - start_time,
            })
            window_losses, window_start = [], time.perf_counter()
        if (tc.eval_interval and step % tc.eval_interval == 0) or step == stop_step:
            last_eval = run_eval(model, config, task, step, device)
            metrics.append(last_eval)
            window_start = time.perf_counter()  # do not count evaluation time in tokens/s
        if (tc.ckpt_interval and step % tc.ckpt_interval == 0) or step == stop_step:
            checkpoint_now()
    progress.close()
    elapsed = time.perf_counter() - start_time

    records = metrics.read()
    plot_results(out_dir, records, window_of(model))
    train_records = [r for r in records if r["kind"] == "train"]
    if last_eval is not None and "by_distance" in last_eval:
        assert isinstance(task, RetrievalTask)
        print(format_table(last_eval["by_distance"], task, window_of(model)))
    elif last_eval is not None:
        print(f"val_loss {last_eval['val_loss']:.4f} ({last_eval['val_bpb']:.3f} bits/byte)")
    print(f"done: step {step}, {elapsed:.1f} s, outputs in {out_dir}")
    return {
        "step": step,
        "elapsed_s": elapsed,
        "final_loss": train_records[-1]["loss"] if train_records else None,
        "eval": last_eval,
        "out_dir": str(out_dir),
    }


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config, out_dir = resolve_config(args)
    train(config, out_dir, stop_step=args.max_steps, resume=args.resume, device=args.device)


if __name__ == "__main__":
    main()
