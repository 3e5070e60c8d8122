"""Evaluation: retrieval accuracy by distance and depth, what the sparse attentions read, bits per byte.

Retrieval metric: a sample's answer (the V value tokens of a needle, one mqar query's value, the passkey's
digits) is right when the argmax prediction of every one of its tokens is (exact match); ``token_accuracy`` is
the per-token rate. Chance: ``sal_harness.data.chance_accuracy``. Each cell (distance, depth) draws its
samples from its own generator seeded with (eval seed, distance, depth index) from the held-out split, so a
cell's score depends neither on the others nor on training.

What the sparse layers read, at the positions that predict an answer, about the token the answer copies
(its ``source``):
- NSA ``selection_recall``: the source's selection block is among the blocks the layer selected
  (``NSAAux.block_indices``) for one of its kv heads, averaged over samples and answers; reported per layer
  and as the best layer's (the one that does the retrieval). One group holding the needle suffices: its query
  heads copy the answer while the other groups attend elsewhere. Per kv head too (``_by_layer_head``),
  ``selection_recall_head_mean``: the best layer's rate averaged over its kv heads instead, and
  ``selection_recall_any_layer``: the rate at which some head of some layer selects it (layers may share the
  retrieval between them, one answer each).
  ``gate_means``: the (cmp, sel, win) gates per layer.
- SCOPE ``pointer_recall``: a pointer window (centre +- its allocation, ``PointerMask.centres`` / ``alloc``)
  of one of the layer's heads covers the source's block; ``listed_recall``: the block is among the keys one
  head reads at all (local band, pointers, globals). Per layer and best layer, averaged over samples and
  answers, per head and head-averaged and over all layers (``_any_layer``) as for NSA; plus
  ``scope.telemetry.scope_stats`` (SCOPE_STATS) per layer on one batch.

Bits per byte: the mean next-byte loss on held-out corpus windows over ln 2 (tokens are bytes).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from nsa import NSAAux
from sal_harness.checkpoint import atomic_json, latest_checkpoint, load_checkpoint, load_weights
from sal_harness.config import (
    MAX_SEED,
    EvalConfig,
    RunConfig,
    describe_validation_error,
    usable_device,
    validate_run_config,
)
from sal_harness.data import Batch, RetrievalTask, TaskConfig, TextTask, build_task, chance_accuracy
from sal_harness.errors import HarnessConfigError, HarnessError
from sal_harness.model import GPT, NSAAttentionConfig, ScopeAttentionConfig, receptive_field, window_of
from sal_harness.precision import autocast
from scope import ScopeAttention, ScopeAux, scope_stats

EVAL_NAME = "eval.json"


def cell_generator(seed: int, distance: int, depth_index: int) -> torch.Generator:
    # Folded into the generator's seed range [0, 2**64): any eval.seed works, and every mix that fitted before
    # (eval seeds up to ~1.8e11) is unchanged, so recorded results stay reproducible.
    return torch.Generator().manual_seed(((seed * 1_000_003 + distance) * 101 + depth_index) % (MAX_SEED + 1))


def check_arguments(**values: Any) -> None:
    """The evaluate API's samples, batch_size, seed, distances and depths by EvalConfig's rules (the ones eval.*
    keys follow): HarnessConfigError naming each argument that breaks one."""
    try:
        EvalConfig.model_validate(values)
    except ValidationError as err:
        raise HarnessConfigError("invalid evaluation arguments:\n" + describe_validation_error(err)) from None


def answer_hits(logits: torch.Tensor, batch: Batch, answer_len: int) -> torch.Tensor:
    """bool [B, answers, answer_len]: argmax == target at each answer token."""
    positions = batch.answer_positions
    predicted = logits[:, positions].argmax(-1).cpu()
    return (predicted == batch.targets[:, positions]).unflatten(1, (-1, answer_len))


ROWS = "_rows"  # suffix of a probe's per-(sample, answer) any-head hits, ORed over layers instead of summed


def head_hits(hits: torch.Tensor, name: str) -> dict[str, torch.Tensor]:
    """Sums of hits [B, A, heads] over (sample, answer): name (any head hit), name_by_head [heads], and count;
    name + ROWS: the any-head hits themselves, bool [B, A]."""
    return {name: hits.any(-1).double().sum(), f"{name}_by_head": hits.double().sum(dim=(0, 1)),
            "count": torch.tensor(hits.shape[0] * hits.shape[1], dtype=torch.float64), f"{name}{ROWS}": hits.any(-1)}


def nsa_probe(aux: NSAAux, batch: Batch, sel_block_size: int) -> dict[str, torch.Tensor]:
    """Per layer sums over (sample, answer token) of the selection hits (any kv head, each kv head), and the
    gate sums."""
    selected = aux.block_indices[:, batch.answer_positions].cpu().long()  # [B, A, Hkv, n]
    source_block = (batch.sources // sel_block_size)[:, :, None, None]
    gates = aux.gates[:, batch.answer_positions].double().cpu()  # [B, A, HQ, 3]
    return {**head_hits((selected == source_block).any(-1), "hits"),
            "gates": gates.sum(dim=(0, 1, 2)), "gate_count": torch.tensor(gates[..., 0].numel(), dtype=torch.float64)}


def scope_probe(aux: ScopeAux, batch: Batch, block: int) -> dict[str, torch.Tensor]:
    """Per layer sums over (sample, answer token, head) of pointer hits and listed hits."""
    mask = aux.pointer_mask
    query_block = (batch.answer_positions // block).to(mask.centres.device)  # [A]
    source_block = (batch.sources // block).to(mask.centres.device)[:, None, :, None]  # [B, 1, A, 1]
    centres = mask.centres[:, :, query_block].long()  # [B, H, A, M]
    alloc = mask.alloc[:, :, query_block].long()
    low, high = centres - (alloc - 1) // 2, centres + alloc // 2
    pointed = ((alloc > 0) & (centres >= 0) & (source_block >= low) & (source_block <= high)).any(-1)  # [B, H, A]
    listed = (mask.kv_indices[:, :, query_block].long() == source_block).any(-1)
    shape = torch.broadcast_shapes(pointed.shape, listed.shape)
    return {**head_hits(pointed.expand(shape).transpose(1, 2).cpu(), "pointer_hits"),
            **head_hits(listed.expand(shape).transpose(1, 2).cpu(), "listed_hits")}


def add_into(total: dict[str, torch.Tensor], part: dict[str, torch.Tensor]) -> None:
    for key, value in part.items():
        total[key] = total[key] + value if key in total else value


class RecallSums:
    """The probes' sums over evaluation batches: per layer, and over layers (a hit of some head of some layer)."""

    def __init__(self) -> None:
        self.layers: list[dict[str, torch.Tensor]] = []
        self.any_layer: dict[str, torch.Tensor] = {}

    def add(self, parts: Sequence[dict[str, torch.Tensor]]) -> None:
        """One batch: a probe's output per layer, in layer order."""
        self.layers += [{} for _ in range(len(parts) - len(self.layers))]
        rows: dict[str, torch.Tensor] = {}
        for total, part in zip(self.layers, parts, strict=True):
            sums = {key: value for key, value in part.items() if not key.endswith(ROWS)}
            for key in part.keys() - sums.keys():
                rows[key] = rows[key] | part[key] if key in rows else part[key]
            add_into(total, sums)
        add_into(self.any_layer, {key: hit.double().sum() for key, hit in rows.items()})

    def fields(self) -> dict[str, Any]:
        return recall_fields(self.layers, self.any_layer)


@torch.no_grad()
def evaluate_cell(model: GPT, task: RetrievalTask, distance: int, depth: float | None, samples: int,
                  batch_size: int, generator: torch.Generator, device: torch.device | str) -> dict[str, Any]:
    """Accuracy (and the sparse layers' recall) of ``samples`` held-out samples at one distance and depth
    (None: depths drawn uniformly from what fits)."""
    attention = model.config.attention
    probe = isinstance(attention, NSAAttentionConfig | ScopeAttentionConfig)
    answer_len = task.config.answer_len
    exact = tokens = answers = 0
    recall = RecallSums()
    done = 0
    while done < samples:
        batch = task.sample(min(batch_size, samples - done), generator, split="val", distance=distance, depth=depth)
        out = model(batch.inputs.to(device), return_aux=probe)
        hits = answer_hits(out.logits, batch, answer_len)
        exact += int(hits.all(-1).sum())
        tokens += int(hits.sum())
        answers += hits.shape[0] * hits.shape[1]
        parts = []
        for aux in out.aux or ():
            if isinstance(aux, ScopeAux) and isinstance(attention, ScopeAttentionConfig):
                parts.append(scope_probe(aux, batch, attention.block))
            elif isinstance(aux, NSAAux) and isinstance(attention, NSAAttentionConfig):
                parts.append(nsa_probe(aux, batch, attention.sel_block_size))
        if parts:
            recall.add(parts)
        done += len(batch)
    cell: dict[str, Any] = {"distance": distance, "accuracy": exact / answers,
                            "token_accuracy": tokens / (answers * answer_len), "n": answers}
    if depth is not None:
        cell["depth"] = depth
    cell.update(recall.fields())
    return cell


def rates(layers: list[dict[str, torch.Tensor]], hits: str, name: str) -> dict[str, Any]:
    """name (the best layer's any-head rate), name_by_layer, name_by_layer_head and name_head_mean (the best
    layer's rate averaged over heads) from the probe sums under key ``hits``."""
    by_layer = [float(t[hits] / t["count"]) for t in layers]
    by_head = [(t[f"{hits}_by_head"] / t["count"]).tolist() for t in layers]
    return {name: max(by_layer), f"{name}_by_layer": by_layer, f"{name}_by_layer_head": by_head,
            f"{name}_head_mean": max(sum(h) / len(h) for h in by_head)}


def recall_fields(layers: list[dict[str, torch.Tensor]], any_layer: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Per-layer (and per-head) rates, the best layer's and the any-layer rate, from the probe sums."""
    if not layers or not layers[0]:
        return {}
    names = {"hits": "selection_recall"} if "hits" in layers[0] else {"pointer_hits": "pointer_recall",
                                                                       "listed_hits": "listed_recall"}
    fields: dict[str, Any] = {}
    for hits, name in names.items():
        fields.update(rates(layers, hits, name))
        fields[f"{name}_any_layer"] = float(any_layer[hits + ROWS] / layers[0]["count"])
    if "hits" in layers[0]:
        gates = [(t["gates"] / t["gate_count"]).tolist() for t in layers]
        fields["gate_means_by_layer"] = [dict(zip(("cmp", "sel", "win"), g, strict=True)) for g in gates]
    return fields


def evaluate_retrieval(model: GPT, task_config: TaskConfig, distances: Sequence[int], *, samples: int,
                       batch_size: int, seed: int, device: torch.device | str,
                       depths: Sequence[float] | None = None, progress: bool = False) -> list[dict[str, Any]]:
    """One cell per distance (depths drawn per sample) or, with ``depths``, per (distance, depth) that fits.
    Leaves the model's train/eval mode as it found it; draws nothing from the global RNG. progress: a bar over
    the cells (on a terminal only, as training's)."""
    from tqdm import tqdm

    check_arguments(samples=samples, batch_size=batch_size, seed=seed, distances=list(distances),
                    **({} if depths is None else {"depths": list(depths)}))
    usable_device(str(device), "device")
    task = build_task(task_config)
    assert isinstance(task, RetrievalTask)
    for distance in distances:
        task.check_distance(distance, "distances entry")
    axis = [None] if depths is None else depths
    was_training = model.training
    model.eval()
    cells = []
    try:
        with tqdm(total=len(distances) * len(axis), desc="eval", unit="cell", dynamic_ncols=True, leave=False,
                  disable=None if progress else True) as bar:
            for distance in distances:
                for index, depth in enumerate(axis):
                    bar.update(1)
                    if depth is not None and not task.fits(distance, depth):
                        continue
                    generator = cell_generator(seed, distance, index + (depths is not None))
                    cells.append(evaluate_cell(model, task, distance, depth, samples, batch_size, generator, device))
    finally:
        model.train(was_training)
    return cells


@torch.no_grad()
def evaluate_text(model: GPT, task_config: TaskConfig, samples: int, batch_size: int, seed: int,
                  device: torch.device | str) -> dict[str, Any]:
    """Mean next-byte loss on held-out windows: {"val_loss", "bpb", "n"} (windows of task_config.seq_len)."""
    check_arguments(samples=samples, batch_size=batch_size, seed=seed)
    usable_device(str(device), "device")
    text = TextTask(task_config)
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    total, done = 0.0, 0
    try:
        while done < samples:
            batch = text.sample(min(batch_size, samples - done), generator, split="val")
            loss = model(batch.inputs.to(device), batch.targets.to(device)).loss
            assert loss is not None
            total += float(loss) * len(batch)
            done += len(batch)
    finally:
        model.train(was_training)
    return {"val_loss": total / done, "bpb": total / done / math.log(2), "n": done}


def eval_distances(config: RunConfig) -> list[int]:
    """eval.distances, or when it is empty eval.num_distances log-spaced distances from 8 (or the smallest that
    fits) to the largest that fits; [] for the text task."""
    task = build_task(config.task)
    if not isinstance(task, RetrievalTask):
        return []
    if config.eval.distances:
        return list(config.eval.distances)
    lo, hi = max(8, task.smallest_distance), task.largest_distance
    count = config.eval.num_distances
    return sorted({round(lo * (hi / lo) ** (i / max(count - 1, 1))) for i in range(count)})


def periodic_evaluation(model: GPT, config: RunConfig, device: torch.device | str,
                        progress: bool = False) -> dict[str, Any]:
    """What training logs every eval_interval steps: accuracy by distance (retrieval) and / or bits per byte, in
    the precision the run trains in (train.precision). progress: evaluate_retrieval's bar."""
    ev = config.eval
    record: dict[str, Any] = {}
    distances = eval_distances(config)
    with autocast(device, config.train.precision):
        if distances:
            record["by_distance"] = evaluate_retrieval(model, config.task, distances, samples=ev.samples,
                                                       batch_size=ev.batch_size, seed=ev.seed, device=device,
                                                       progress=progress)
        if ev.text_samples:
            record.update(evaluate_text(model, config.task, ev.text_samples, ev.batch_size, ev.seed, device))
    return record


def final_evaluation(model: GPT, config: RunConfig, step: int, device: torch.device | str,
                     progress: bool = False) -> dict[str, Any]:
    """Everything the report reads from a run: the periodic metrics, the distance x depth grid, chance, the
    model's reach, SCOPE_STATS and one example's selection / pointer maps. progress: bars over the cells."""
    result: dict[str, Any] = {
        "attention": config.attention.kind, "task": config.task.name, "step": step,
        "train_seq_len": config.task.seq_len, "window": window_of(config.gpt),
        "receptive_field": receptive_field(config.gpt), "num_parameters": model.num_parameters(),
        "recipe": config.recipe(),
        **periodic_evaluation(model, config, device, progress),
    }
    ev = config.eval
    distances = eval_distances(config)
    if distances:
        exact, token = chance_accuracy(config.task)
        result["chance"] = {"accuracy": exact, "token_accuracy": token}
        with autocast(device, config.train.precision):
            result["grid"] = evaluate_retrieval(model, config.task, distances, samples=ev.samples,
                                                batch_size=ev.batch_size, seed=ev.seed, device=device,
                                                depths=ev.depths, progress=progress)
            # Not the farthest distance: its needle sits in block 0, which NSA always selects and SCOPE lists as
            # global.
            result["example"] = example_maps(model, config, distances[len(distances) * 2 // 3], device)
    return result


@torch.no_grad()
def example_maps(model: GPT, config: RunConfig, distance: int, device: torch.device | str) -> dict[str, Any]:
    """One held-out sample at ``distance``: NSA's selected blocks per query position, or SCOPE's
    listed key blocks per query block (kv group / head 0, every layer), with the needle."""
    task = build_task(config.task)
    assert isinstance(task, RetrievalTask)
    batch = task.sample(1, cell_generator(config.eval.seed, distance, 99), split="val", distance=distance)
    was_training = model.training
    model.eval()
    try:
        out = model(batch.inputs.to(device), return_aux=True)
    finally:
        model.train(was_training)
    example: dict[str, Any] = {"distance": distance, "source": int(batch.sources[0, 0]),
                               "query": int(batch.answer_positions[0]), "seq_len": batch.inputs.shape[1]}
    attention = config.attention
    auxes = out.aux or []
    if isinstance(attention, NSAAttentionConfig):
        maps = [aux.block_indices[0, :, 0].cpu().tolist() for aux in auxes if isinstance(aux, NSAAux)]
        example.update(kind="nsa_selection", block=attention.sel_block_size, layers=maps)
    elif isinstance(attention, ScopeAttentionConfig):
        maps = [aux.pointer_mask.kv_indices[0, 0].cpu().tolist() for aux in auxes if isinstance(aux, ScopeAux)]
        layers = [block.attn for block in model.blocks]
        stats = [scope_stats(aux, layer.config) for aux, layer in zip(auxes, layers, strict=True)
                 if isinstance(aux, ScopeAux) and isinstance(layer, ScopeAttention)]
        example.update(kind="scope_pointer", block=attention.block, layers=maps, scope_stats=stats)
    return example


def format_table(result: dict[str, Any]) -> str:
    """One run's accuracy by distance as plain text, marking distances beyond a window model's reach."""
    lines = [f"{result['attention']} on {result['task']} (step {result['step']})",
             f"{'distance':>9} {'accuracy':>9} {'token_acc':>9} {'recall':>7}  note"]
    reach = result.get("receptive_field")  # None but for window models: NSA's and SCOPE's other branches reach all
    for cell in result.get("by_distance", []):
        recall = cell.get("selection_recall", cell.get("pointer_recall"))
        shown = "" if recall is None else f"{recall:.2f}"
        note = "beyond the window's reach" if reach is not None and cell["distance"] > reach else ""
        lines.append(f"{cell['distance']:>9} {cell['accuracy']:>9.3f} {cell['token_accuracy']:>9.3f} {shown:>7}  "
                     f"{note}")
    if "chance" in result:
        chance = result["chance"]
        lines.append(f"chance: accuracy {chance['accuracy']:.2e}, token {chance['token_accuracy']:.3f}")
    if "bpb" in result:
        lines.append(f"held-out text: {result['bpb']:.3f} bits per byte")
    return "\n".join(lines)


def load_run_model(run_dir: Path, device: str = "cpu") -> tuple[GPT, RunConfig, int]:
    """The latest checkpoint's model (eval mode), its run config and step."""
    path = latest_checkpoint(run_dir, "evaluate", "pass the folder sal-train wrote (its out_dir) once it has saved "
                                                  "a checkpoint")
    checkpoint = load_checkpoint(path, map_location=device)
    config = validate_run_config(checkpoint["config"])
    model = GPT(config.gpt).to(device)
    load_weights(model, checkpoint, path)
    return model.eval(), config, checkpoint["step"]


def main(argv: Sequence[str] | None = None) -> int:
    """sal-eval RUN_DIR: evaluate a run folder's latest checkpoint, write RUN_DIR/eval.json, print the table."""
    parser = argparse.ArgumentParser(prog="sal-eval", description=main.__doc__)
    parser.add_argument("run_dir", type=Path, help="a run folder written by sal-train")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:index] (default cpu)")
    args = parser.parse_args(argv)
    if not args.run_dir.is_dir():
        parser.error(f"run_dir {args.run_dir}: " + ("is a file, not a run folder" if args.run_dir.exists() else
                                                    "no such run folder"))
    try:
        usable_device(args.device, "--device")
    except HarnessError as err:
        parser.error(str(err))
    try:
        model, config, step = load_run_model(args.run_dir, args.device)
        result = final_evaluation(model, config, step, args.device, progress=True)
        atomic_json(args.run_dir / EVAL_NAME, result)
    except HarnessError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
