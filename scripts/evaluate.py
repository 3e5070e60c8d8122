"""Retrieval accuracy by needle distance for a model or a checkpoint.

Metric: for each distance, ``samples`` retrieval sequences (scripts.data.RetrievalTask) are scored
under teacher forcing; a sample is correct when the argmax prediction of *every* value token after
the query equals the planted value (exact match). ``token_accuracy`` is the per-value-token rate.
Chance: 1/value_vocab per token (for a model that knows each slot's alphabet; 1/256 for one that
does not), (1/value_vocab)^value_len per sample. Each distance draws its samples from its own
generator seeded with (eval_seed, distance), so a distance's score does not depend on the others
evaluated with it.

Usage::

    python -m scripts.evaluate --checkpoint runs/toy_retrieval/ckpt.pt [--distances 16,64,256]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from nsa.model import GPT
from scripts.data import RetrievalTask, TextTask


def _distance_generator(seed: int, distance: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + distance)


@torch.no_grad()
def evaluate_retrieval(
    model: GPT,
    task: RetrievalTask,
    distances: Sequence[int],
    samples: int,
    batch_size: int = 32,
    seed: int = 1234,
    device: str | torch.device = "cpu",
) -> list[dict[str, Any]]:
    """One dict per distance: {"distance", "accuracy", "token_accuracy", "n"}. Leaves the model's
    train/eval mode as it found it and draws nothing from the global RNG."""
    was_training = model.training
    model.eval()
    positions = task.value_target_positions
    results = []
    try:
        for distance in distances:
            generator = _distance_generator(seed, distance)
            exact, tokens_right, n = 0, 0, 0
            while n < samples:
                b = min(batch_size, samples - n)
                batch = task.sample(b, generator, distance=distance)
                logits = model(batch.inputs.to(device)).logits[:, positions]
                hits = logits.argmax(-1).cpu() == batch.targets[:, positions]
                exact += int(hits.all(-1).sum())
                tokens_right += int(hits.sum())
                n += b
            results.append({
                "distance": int(distance),
                "accuracy": exact / n,
                "token_accuracy": tokens_right / (n * task.value_len),
                "n": n,
            })
    finally:
        model.train(was_training)
    return results


@torch.no_grad()
def evaluate_text(
    model: GPT,
    task: TextTask,
    samples: int,
    batch_size: int = 32,
    seed: int = 1234,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Mean next-byte loss on held-out windows of the embedded text: {"val_loss", "val_bpb", "n"}."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    total, n = 0.0, 0
    try:
        while n < samples:
            b = min(batch_size, samples - n)
            batch = task.sample(b, generator, split="val")
            loss = model(batch.inputs.to(device), batch.targets.to(device)).loss
            assert loss is not None
            total += float(loss) * b
            n += b
    finally:
        model.train(was_training)
    val_loss = total / n
    return {"val_loss": val_loss, "val_bpb": val_loss / math.log(2), "n": n}


def chance_accuracy(task: RetrievalTask) -> tuple[float, float]:
    """(exact-match, per-token) accuracy of guessing uniformly within each value slot's alphabet."""
    token = 1.0 / task.value_vocab
    return token**task.value_len, token


def format_table(results: Sequence[dict[str, Any]], task: RetrievalTask, window: int | None = None) -> str:
    """A plain-text table of evaluate_retrieval results; marks distances beyond the sliding window."""
    chance, chance_token = chance_accuracy(task)
    lines = [f"{'distance':>9} {'accuracy':>9} {'token_acc':>9} {'n':>6}  note", "-" * 50]
    for r in results:
        note = "beyond window" if window is not None and r["distance"] >= window else ""
        lines.append(f"{r['distance']:>9} {r['accuracy']:>9.3f} {r['token_accuracy']:>9.3f} {r['n']:>6}  {note}")
    lines.append(f"chance: accuracy {chance:.2e}, token_acc {chance_token:.4f}")
    return "\n".join(lines)


def window_of(model: GPT) -> int | None:
    """The NSA sliding window size, or None for dense attention."""
    return model.config.nsa.window_size if model.config.nsa is not None else None


def write_jsonl(path: str | Path, records: Sequence[dict[str, Any]]) -> None:
    """Append records as JSON lines."""
    with open(path, "a", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    # Imported here so that `import scripts.evaluate` stays light for train.py's import order.
    from scripts.checkpoint import CHECKPOINT_NAME, load_checkpoint
    from scripts.config import RunConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="ckpt.pt, or a run directory holding one")
    parser.add_argument("--distances", help="comma-separated distances (default: [data] eval_distances)")
    parser.add_argument("--samples", type=int, help="samples per distance (default: [data] eval_samples)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="JSON-lines output (default: <checkpoint dir>/eval.jsonl)")
    args = parser.parse_args(argv)

    path = Path(args.checkpoint)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    checkpoint = load_checkpoint(path, map_location=args.device)
    config = RunConfig.from_dict(checkpoint["config"])
    if config.data.task != "retrieval":
        sys.exit(f"{path}: task is {config.data.task!r}; accuracy by distance needs task 'retrieval'")
    model = GPT(config.model).to(args.device)
    model.load_state_dict(checkpoint["model"])
    task = config.data.retrieval_task()
    distances = (
        [int(d) for d in args.distances.split(",")] if args.distances else list(config.data.eval_distances)
    )
    if not distances:
        sys.exit("no distances: pass --distances or set [data] eval_distances")
    for d in distances:
        task.check_distance(d, "--distances entry")
    samples = args.samples or config.data.eval_samples
    results = evaluate_retrieval(
        model, task, distances, samples, config.data.eval_batch_size, config.data.eval_seed, args.device
    )
    print(f"checkpoint {path} (step {checkpoint['step']}, attention={config.model.attention})")
    print(format_table(results, task, window_of(model)))
    out = Path(args.out) if args.out else path.parent / "eval.jsonl"
    write_jsonl(out, [{"kind": "eval", "step": checkpoint["step"], "checkpoint": str(path), **r} for r in results])
    return results


if __name__ == "__main__":
    main()
