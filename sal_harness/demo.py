"""Inference demo: one NSA GPT forward over real text, the blocks it selected, and what it read.

    sal-demo                                   # random-init small model, 8192 bytes of text
    sal-demo --seq-len 2048 --layer 1 --group 0
    sal-demo --checkpoint runs/compare/nsa-needle/ckpt-00000200.pt --seq-len 4096   # (or python -m cli.demo_infer)

The model is a small NSA GPT (paper block sizes l=32, d=16, l'=64, n=16, w=512; small widths) built
from --seed, or the model of a checkpoint written by sal_harness.train. The input is the first
--seq-len bytes of sal_harness.data.embedded_text() (Python's own docs and sources; no download), one
byte per token. One forward runs under torch.inference_mode with return_aux=True.

Outputs:
  --out (PNG)            heatmap of the selection blocks chosen per query position for one layer and
                         kv head group (rows binned for long sequences; dashed line = causal boundary)
  <out dir>/summary.jsonl  one JSON line per run (appended), the same numbers as the printed summary

Tokens read per query and kv head are measured from what the forward used: cmp = compressed blocks
visible to query t (num_cmp(t+1)), sel = tokens at positions <= t of the blocks listed in the
returned block_indices, win = min(w, t+1); dense causal attention reads t+1.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

from nsa import NSAAux, NSAConfig, num_compressed_blocks
from sal_harness.checkpoint import (
    atomic_write,
    file_in_the_way,
    finite_json,
    list_checkpoints,
    load_checkpoint,
    load_weights,
)
from sal_harness.config import MAX_SEED, usable_device, validate_run_config
from sal_harness.errors import HarnessError, RunFolderError
from sal_harness.generate import generate
from sal_harness.model import GPT, GPTConfig, ModelConfig, NSAAttentionConfig

DEFAULT_OUT = Path("runs/demo/selected_blocks.png")
SUMMARY_NAME = "summary.jsonl"
MAX_HEATMAP_ROWS = 512  # query rows are averaged in bins so the image stays readable
BYTE_VOCAB = 256
# One decode step per token, ~10 ms for the default model on one CPU core: 65536 take ~11 minutes and their
# caches ~100 MB. The demo shows what a decode step reads; it is no bulk generator.
MAX_GENERATE = 65536


def default_model_config(seq_len: int) -> GPTConfig:
    """Small widths, paper block sizes: 2 layers, hidden 128, 4 query / 2 kv heads of dim 32."""
    model = ModelConfig(vocab_size=BYTE_VOCAB, n_layer=2, hidden_size=128, num_heads=4, num_kv_heads=2, head_dim=32,
                        max_seq_len=seq_len)
    attention = NSAAttentionConfig(cmp_block_size=32, cmp_stride=16, sel_block_size=64, num_selected=16,
                                   window_size=512)
    return GPTConfig(model=model, attention=attention)


def nsa_config(config: GPTConfig) -> NSAConfig:
    """The NSAConfig of an NSA model's layers."""
    assert isinstance(config.attention, NSAAttentionConfig)
    return config.attention.build(config.model)


# ----------------------------------------------------------------------------------------------
# Arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sal-demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seq-len", type=int, default=8192, help="tokens (bytes) of text to run (default 8192)")
    parser.add_argument("--checkpoint", type=Path,
                        help="a ckpt-<step>.pt written by sal_harness.train (default: random init)")
    parser.add_argument("--layer", type=int, default=0, help="layer shown in the heatmap (default 0)")
    parser.add_argument("--group", type=int, default=0, help="kv head group shown in the heatmap (default 0)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"heatmap PNG (default {DEFAULT_OUT})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random initialisation (default 0)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:index] (default cpu)")
    parser.add_argument("--generate", type=int, default=0, metavar="N",
                        help="after the forward, prefill the text into decode caches and generate N bytes greedily "
                             f"(0: off, at most {MAX_GENERATE})")
    return parser


@dataclasses.dataclass(frozen=True)
class DemoResult:
    """What one demo run measured.

    summary: the JSON-able summary (also printed and written to summary.jsonl).
    block_indices: per layer, the forward's block_indices [B, T, Hkv, n] (CPU, int64, -1 unused).
    cmp / win / dense: LongTensor [T], tokens read by query t. sel: per layer, LongTensor [B, T, Hkv].
    """

    summary: dict[str, Any]
    block_indices: list[torch.Tensor]
    cmp: torch.Tensor
    sel: list[torch.Tensor]
    win: torch.Tensor
    dense: torch.Tensor


def _fail(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    parser.error(message)


def _check_basic_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The flags that need no model, before any work or any file written."""
    if args.seq_len < 1:
        _fail(parser, f"--seq-len must be >= 1, got {args.seq_len}")
    if not 0 <= args.seed <= MAX_SEED:
        _fail(parser, f"--seed must be in [0, {MAX_SEED}] (torch's generator seeds), got {args.seed}")
    if not 0 <= args.generate <= MAX_GENERATE:
        _fail(parser, f"--generate must be in [0, {MAX_GENERATE}] (0: off), got {args.generate}")
    if args.checkpoint is not None:
        _check_checkpoint_path(parser, args.checkpoint)
    _check_out(parser, args.out)
    try:
        usable_device(args.device, "--device")
    except HarnessError as err:
        _fail(parser, str(err))


def _check_checkpoint_path(parser: argparse.ArgumentParser, path: Path) -> None:
    if not path.exists():  # a file, or an FSDP2 run's sharded folder
        _fail(parser, f"--checkpoint {path}: no such file or folder")
    inside = list_checkpoints(path)
    if inside:
        _fail(parser, f"--checkpoint {path} is a run folder: pass one of its checkpoints (newest: {inside[-1]})")


def _check_out(parser: argparse.ArgumentParser, out: Path) -> None:
    if out.is_dir():  # "" too: Path("") is the current folder
        _fail(parser, f"--out {str(out)!r} is a folder: give the heatmap's file name (e.g. {out / DEFAULT_OUT.name})")
    blocking = file_in_the_way(out.parent)
    if blocking is not None:
        _fail(parser, f"--out {out}: {blocking} is a file, not a folder")


def load_model(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[GPT, str]:
    """The model (eval mode, on args.device) and a short description of where its weights came from."""
    if args.checkpoint is None:
        torch.manual_seed(args.seed)
        return GPT(default_model_config(args.seq_len)).to(args.device).eval(), f"random init (seed {args.seed})"

    try:
        checkpoint = load_checkpoint(args.checkpoint, map_location=args.device)
        config = validate_run_config(checkpoint["config"]).gpt
    except Exception as err:  # any unreadable file: torch.load, format check, non-finite weights, config validation
        _fail(parser, f"--checkpoint {args.checkpoint}: cannot read it as a sal_harness checkpoint: {err}")
    if not isinstance(config.attention, NSAAttentionConfig):
        _fail(parser, f"--checkpoint {args.checkpoint}: the model uses attention={config.attention.kind!r}; "
                      "the demo shows NSA block selection and needs attention 'nsa'")
    if config.model.vocab_size < BYTE_VOCAB:
        _fail(parser, f"--checkpoint {args.checkpoint}: vocab_size={config.model.vocab_size} < {BYTE_VOCAB} "
                      "cannot take byte tokens")
    note = f"checkpoint {args.checkpoint} (step {checkpoint['step']})"
    if args.seq_len > config.model.max_seq_len:
        # Positions are RoPE only (no table), so a longer input runs; it is beyond what was trained.
        note += f", run past its max_seq_len={config.model.max_seq_len}"
        longer = ModelConfig.model_validate({**config.model.model_dump(), "max_seq_len": args.seq_len})
        config = GPTConfig(model=longer, attention=config.attention)
    model = GPT(config)
    try:
        load_weights(model, checkpoint, args.checkpoint)
    except RunFolderError as err:
        _fail(parser, f"--checkpoint {args.checkpoint}: {err}")
    return model.to(args.device).eval(), note


def text_tokens(parser: argparse.ArgumentParser, seq_len: int) -> torch.Tensor:
    """LongTensor [1, seq_len]: the first seq_len bytes of the embedded text."""
    from sal_harness.data import embedded_text

    data = embedded_text().encode("utf-8")
    if seq_len > len(data):
        _fail(parser, f"--seq-len {seq_len} exceeds the embedded text ({len(data)} bytes)")
    return torch.tensor(list(data[:seq_len]), dtype=torch.long).unsqueeze(0)


# ----------------------------------------------------------------------------------------------
# Measurement


def selected_tokens(block_indices: torch.Tensor, sel_block_size: int) -> torch.Tensor:
    """LongTensor [B, T, Hkv]: tokens at positions <= t inside the blocks listed for query t.

    Block j covers [j*l', (j+1)*l'); -1 slots count nothing; the block holding t counts t+1 - j*l'.
    """
    seq_len = block_indices.shape[1]
    t = torch.arange(seq_len, device=block_indices.device).view(1, seq_len, 1, 1)
    bi = block_indices.long()
    start = bi.clamp(min=0) * sel_block_size
    end = torch.minimum(start + sel_block_size, t + 1)
    tokens = (end - start).clamp(min=0) * (bi >= 0)
    return tokens.sum(dim=-1)


def measure_reads(auxes: list[NSAAux], nsa: NSAConfig, seq_len: int) -> tuple[torch.Tensor, list[torch.Tensor],
                                                                               torch.Tensor, torch.Tensor]:
    """(cmp [T], sel per layer [B, T, Hkv], win [T], dense [T]) tokens read per query and kv head."""
    positions = torch.arange(seq_len)
    cmp = torch.tensor([num_compressed_blocks(t + 1, nsa.cmp_block_size, nsa.cmp_stride) for t in range(seq_len)],
                       dtype=torch.long)
    sel = [selected_tokens(aux.block_indices, nsa.sel_block_size).cpu() for aux in auxes]
    win = torch.clamp(positions + 1, max=nsa.window_size)
    dense = positions + 1
    return cmp, sel, win, dense


def _mean(x: torch.Tensor) -> float:
    return float(x.double().mean())


def reads_summary(cmp: torch.Tensor, sel: list[torch.Tensor], win: torch.Tensor, dense: torch.Tensor
                  ) -> dict[str, Any]:
    """Means over queries (and batch, kv groups) and values at the last position, per layer for sel.

    ratio = dense / (cmp + sel + win): for the mean, total dense reads over total sparse reads."""
    out: dict[str, Any] = {
        "unit": "tokens read per query and kv head",
        "cmp": {"mean": _mean(cmp), "last": int(cmp[-1])},
        "win": {"mean": _mean(win), "last": int(win[-1])},
        "dense": {"mean": _mean(dense), "last": int(dense[-1])},
        "layers": [],
    }
    for layer, s in enumerate(sel):
        s_mean = _mean(s)
        s_last = _mean(s[:, -1])
        total_mean = out["cmp"]["mean"] + s_mean + out["win"]["mean"]
        total_last = int(cmp[-1]) + s_last + int(win[-1])
        out["layers"].append({
            "layer": layer,
            "sel": {"mean": s_mean, "last": s_last, "max": int(s.max()),
                    "mean_per_group": [_mean(s[:, :, g]) for g in range(s.shape[2])]},
            "total": {"mean": total_mean, "last": total_last},
            "ratio_dense_over_sparse": {"mean": out["dense"]["mean"] / total_mean,
                                        "last": int(dense[-1]) / total_last},
        })
    return out


def config_line(config: GPTConfig, num_params: int) -> str:
    nsa = nsa_config(config)
    return (f"NSA GPT: {config.model.n_layer} layers, hidden {nsa.hidden_size}, heads {nsa.num_heads} "
            f"(kv {nsa.num_kv_heads}, G={nsa.group_size}), head_dim "
            f"{nsa.head_dim}/{nsa.head_dim_v}; l={nsa.cmp_block_size} d={nsa.cmp_stride} "
            f"l'={nsa.sel_block_size} n={nsa.num_selected} w={nsa.window_size}, phi={nsa.compression}, "
            f"gate={nsa.gate}; {num_params / 1e6:.2f}M parameters")


# ----------------------------------------------------------------------------------------------
# Heatmap


def selection_matrix(block_indices: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """Float [T, num_blocks]: 1 where query t selected block j (block_indices [T, n], -1 unused)."""
    seq_len = block_indices.shape[0]
    idx = block_indices.long().clone()
    idx[idx < 0] = num_blocks  # a dump column, dropped below
    onehot = torch.zeros(seq_len, num_blocks + 1)
    onehot.scatter_(1, idx, 1.0)
    return onehot[:, :num_blocks]


def row_bin_size(seq_len: int, max_rows: int) -> int:
    return max(1, math.ceil(seq_len / max_rows))


def bin_rows(matrix: torch.Tensor, max_rows: int) -> tuple[torch.Tensor, int]:
    """Average consecutive rows in bins of row_bin_size; returns (binned, bin size)."""
    seq_len = matrix.shape[0]
    size = row_bin_size(seq_len, max_rows)
    rows = math.ceil(seq_len / size)
    padded = torch.zeros(rows * size, matrix.shape[1])
    padded[:seq_len] = matrix
    counts = torch.full((rows,), float(size))
    counts[-1] = seq_len - (rows - 1) * size
    return padded.view(rows, size, -1).sum(dim=1) / counts[:, None], size


def plot_selection(path: Path, block_indices: torch.Tensor, sel_block_size: int, title: str) -> None:
    """Write the heatmap PNG for block_indices [T, n] (rows binned by row_bin_size)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seq_len = block_indices.shape[0]
    num_blocks = -(-seq_len // sel_block_size)
    binned, size = bin_rows(selection_matrix(block_indices, num_blocks), MAX_HEATMAP_ROWS)
    fig, ax = plt.subplots(figsize=(8, 8))
    image = ax.imshow(binned.numpy(), aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0,
                      vmax=1.0, extent=(-0.5, num_blocks - 0.5, seq_len, 0))
    # Block j holds tokens from j*l': cells right of this line would be future blocks.
    ax.plot([-0.5, num_blocks - 0.5], [0, num_blocks * sel_block_size], color="tab:red", ls="--", lw=0.7,
            label="causal boundary (block start = t)")
    ax.set_xlim(-0.5, num_blocks - 0.5)
    ax.set_ylim(seq_len, 0)
    ax.set_xlabel(f"selection block index j (tokens [{sel_block_size}j, {sel_block_size}(j+1)))")
    ax.set_ylabel("query position t")
    ax.legend(loc="upper right", fontsize=8)
    label = "selected" if size == 1 else f"fraction of the {size} queries in the row bin that selected the block"
    fig.colorbar(image, ax=ax, label=label)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    try:  # a reader (or an interrupted run) sees the old PNG or the new one, never half of one
        atomic_write(path, lambda handle: fig.savefig(handle, dpi=110, format="png"))
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------------------------
# The run


def run(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> DemoResult:
    """Build/load the model, run the forward, write the PNG and summary.jsonl; returns the measurements."""
    parser = parser or build_parser()
    _check_basic_args(parser, args)
    model, weights = load_model(parser, args)
    config = model.config
    nsa = nsa_config(config)
    n_layer = config.model.n_layer
    if not 0 <= args.layer < n_layer:
        _fail(parser, f"--layer must be in [0, {n_layer}) for this {n_layer}-layer model, "
                      f"got {args.layer}")
    if not 0 <= args.group < nsa.num_kv_heads:
        _fail(parser, f"--group must be in [0, {nsa.num_kv_heads}) (kv head groups), got {args.group}")
    idx = text_tokens(parser, args.seq_len).to(args.device)

    start = time.perf_counter()
    with torch.inference_mode():
        output = model(idx, return_aux=True)
    if idx.device.type == "cuda":
        torch.cuda.synchronize()
    forward_s = time.perf_counter() - start
    assert output.aux is not None
    auxes = [aux for aux in output.aux if aux is not None]
    assert len(auxes) == n_layer

    cmp, sel, win, dense = measure_reads(auxes, nsa, args.seq_len)
    gate_means = [
        dict(zip(("cmp", "sel", "win"), aux.gates.double().mean(dim=(0, 1, 2)).cpu().tolist(), strict=True))
        for aux in auxes
    ]
    heads = range(args.group * nsa.group_size, (args.group + 1) * nsa.group_size)
    title = (f"NSA selected blocks: layer {args.layer}, kv group {args.group} (query heads "
             f"{heads.start}-{heads.stop - 1}), T={args.seq_len}, {weights}\n"
             f"l={nsa.cmp_block_size} d={nsa.cmp_stride} l'={nsa.sel_block_size} n={nsa.num_selected} "
             f"w={nsa.window_size}, hidden {nsa.hidden_size}, {n_layer} layers, "
             f"HQ={nsa.num_heads} Hkv={nsa.num_kv_heads}")
    block_indices = [aux.block_indices.cpu() for aux in auxes]
    shown = block_indices[args.layer][0, :, args.group]
    summary = {
        "model": config.model_dump(mode="json"),
        "num_parameters": model.num_parameters(),
        "weights": weights,
        "seq_len": args.seq_len,
        "device": str(idx.device),
        "forward_s": forward_s,
        "gate_means": [{"layer": i, **g} for i, g in enumerate(gate_means)],
        "reads": reads_summary(cmp, sel, win, dense),
        "heatmap": {"path": str(args.out), "layer": args.layer, "group": args.group,
                    "row_bin": row_bin_size(shown.shape[0], MAX_HEATMAP_ROWS)},
    }
    if args.generate:
        summary["generation"] = generate_summary(model, idx, args.generate)
    summary_path = args.out.parent / SUMMARY_NAME
    line = finite_json(summary, summary_path)  # checked before the first file is written
    plot_selection(args.out, shown, nsa.sel_block_size, title)
    with open(summary_path, "a", encoding="utf-8") as handle:
        handle.write(line)
    print(format_summary(summary, config_line(config, model.num_parameters())))
    print(f"wrote {args.out} and {summary_path}")
    return DemoResult(summary, block_indices, cmp, sel, win, dense)


def generate_summary(model: GPT, idx: torch.Tensor, num_tokens: int) -> dict[str, Any]:
    """Greedy decode through the per-layer caches; the reads are those of the last step (layer 0)."""
    start = time.perf_counter()
    generation = generate(model, idx, num_tokens)
    seconds = time.perf_counter() - start
    last_reads = generation.caches[0].last_reads
    assert last_reads is not None
    cmp, sel, win = last_reads[0, -1].double().mean(dim=0).tolist()  # mean over kv heads
    return {"tokens": num_tokens, "text": bytes(generation.tokens[0].tolist()).decode("utf-8", "replace"),
            "seconds": seconds, "context": generation.caches[0].lengths[0],
            "last_step_reads": {"cmp": cmp, "sel": sel, "win": win, "dense": generation.caches[0].lengths[0]}}


def format_summary(summary: dict[str, Any], model_line: str) -> str:
    reads = summary["reads"]
    seq_len = summary["seq_len"]
    lines = [
        model_line,
        f"weights: {summary['weights']}; input: first {seq_len} bytes of the embedded text; "
        f"forward {summary['forward_s']:.1f} s on {summary['device']}",
        "gate means (cmp / sel / win):",
    ]
    lines += [f"  layer {g['layer']}: {g['cmp']:.3f} / {g['sel']:.3f} / {g['win']:.3f}" for g in summary["gate_means"]]
    lines.append(f"tokens read per query and kv head, measured: mean over {seq_len} queries | at t={seq_len - 1}")

    def row(name: str, mean: float, last: float) -> str:
        return f"  {name:<34}{mean:>10.1f} | {last:>8.1f}"

    lines.append(row("cmp   num_cmp(t+1)", reads["cmp"]["mean"], reads["cmp"]["last"]))
    for layer in reads["layers"]:
        lines.append(row(f"sel   layer {layer['layer']} (from block_indices)", layer["sel"]["mean"],
                         layer["sel"]["last"]))
    lines.append(row("win   min(w, t+1)", reads["win"]["mean"], reads["win"]["last"]))
    for layer in reads["layers"]:
        lines.append(row(f"cmp+sel+win   layer {layer['layer']}", layer["total"]["mean"], layer["total"]["last"]))
    lines.append(row("dense t+1", reads["dense"]["mean"], reads["dense"]["last"]))
    for layer in reads["layers"]:
        ratio = layer["ratio_dense_over_sparse"]
        lines.append(f"  {'dense / sparse   layer ' + str(layer['layer']):<34}{ratio['mean']:>9.2f}x | "
                     f"{ratio['last']:>7.2f}x")
    if "generation" in summary:
        gen = summary["generation"]
        reads = gen["last_step_reads"]
        lines.append(f"generated {gen['tokens']} bytes in {gen['seconds']:.1f} s (decode caches, greedy): "
                     f"{gen['text']!r}")
        lines.append(f"  last decode step at context {gen['context']}: read cmp {reads['cmp']:.0f} + sel "
                     f"{reads['sel']:.0f} + win {reads['win']:.0f} tokens vs dense {reads['dense']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run(args, parser)
    except HarnessError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
