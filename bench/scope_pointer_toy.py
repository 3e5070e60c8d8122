"""Does the teacher signal move SCOPE's pointers? A toy with a planted far block at a fixed distance.

    python -m bench.scope_pointer_toy            # CPU, a few seconds; writes bench/results/scope_pointer_toy.*

x_t = z_(t mod 160) with random unit vectors z: query t's only strong match is key t - 160, which lies
in block qb - 20 for every query of block qb (blocks of 8). q and k read the content through the slow
RoPE pairs only (theta = 1e12: dims 2..7 and 10..15 turn by < 0.2 rad over 160 tokens), so the match
survives rotation. Only the pointer head trains, on the teacher loss (scope/teacher.py). Recorded per
step: teacher coverage, covered teacher mass, the mean distance of the nearest pointer to the planted
offset, and the planted block's inclusion probability, over the query blocks that have one.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from bench.env_info import RESULTS_DIR, environment, markdown_table, positive_int
from scope import ScopeConfig
from scope.scope_attention import ScopeAttention, causal_representative_positions, representative_rows
from scope.teacher import inclusion_probability, layer_teacher_loss

PERIOD = 160  # planted retrieval distance in tokens
BLOCK = 8


def toy_config() -> ScopeConfig:
    return ScopeConfig(hidden_size=16, num_heads=1, num_kv_heads=1, head_dim=16, num_pointers=2, num_freqs=6,
                       l_max=4096.0, min_period=16.0, delta_max=256.0, mlp_hidden=16, block=BLOCK, budget=2,
                       local_blocks=1, global_blocks=0, max_radius=1, rope_theta=1e12)


def periodic_retrieval_layer_and_input(seq_len: int, seed: int = 9) -> tuple[ScopeAttention, torch.Tensor]:
    """A float64 layer and input [1, seq_len, 16] with the planted far block (see the module docstring)."""
    torch.manual_seed(seed)
    layer = ScopeAttention(toy_config()).double().eval()
    generator = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.normalize(torch.randn(PERIOD, 16, dtype=torch.float64, generator=generator), dim=-1)
    slow = torch.zeros(16, 16, dtype=torch.float64)
    for i in range(2, 8):
        slow[i, i] = slow[i + 8, i + 8] = 6.0
    with torch.no_grad():
        layer.q_proj.weight.copy_(slow)
        layer.k_proj.weight.copy_(slow)
    return layer, z[torch.arange(seq_len) % PERIOD][None]


def pointer_progress(layer: ScopeAttention, x: torch.Tensor) -> dict[str, float]:
    """Mean |nearest D* - planted offset| and planted-block inclusion over the query blocks with a target."""
    seq_len = x.shape[1]
    num_blocks = seq_len // BLOCK
    rows = torch.arange(PERIOD // BLOCK + 1, num_blocks)
    planted = rows - PERIOD // BLOCK
    t_rep = causal_representative_positions(num_blocks, BLOCK, "last", x.device)
    wanted = t_rep[rows] - (planted + 0.5) * BLOCK
    with torch.no_grad():
        _, _, _, q_content = layer.project(x, torch.arange(seq_len))
        params = layer.spectral.pointer_head(q_content)
        d_blk, u_blk = (representative_rows(v, num_blocks, BLOCK, "last")
                        for v in (params.d_star, params.budget_logits))
        p = inclusion_probability(d_blk, u_blk, t_rep, block=BLOCK, budget=layer.config.budget, budget_temp=1.0,
                                  tau=0.5, local_blocks=layer.config.local_blocks)
    distance = (d_blk[0, 0, rows] - wanted[:, None]).abs().min(dim=-1).values
    return {"dstar_distance_tokens": float(distance.mean()), "planted_inclusion": float(p[0, 0, rows, planted].mean())}


def train_pointers(steps: int = 40, lr: float = 0.05, seq_len: int = 256) -> list[dict[str, Any]]:
    """Teacher-distillation steps on the pointer head alone; one record per step (step 0 = before)."""
    layer, x = periodic_retrieval_layer_and_input(seq_len)
    optimiser = torch.optim.Adam(layer.spectral.pointer_head.parameters(), lr=lr)
    history = []
    for step in range(steps + 1):
        loss = layer_teacher_loss(layer, x, tau=0.5)
        history.append({"step": step, "teacher_coverage": float(loss.coverage.detach()),
                        "teacher_budget": float(loss.budget.detach()),
                        "covered_teacher_mass": float(loss.target_inclusion), **pointer_progress(layer, x)})
        if step == steps:
            break
        optimiser.zero_grad()
        loss.total.backward()
        optimiser.step()
    return history


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=positive_int, default=40, help="Adam steps (the recorded table is "
                        "overwritten: 0 would replace it by the untrained layer's row)")
    args = parser.parse_args(argv)
    history = train_pointers(args.steps)
    env = environment("cpu")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stem = RESULTS_DIR / "scope_pointer_toy"
    with open(stem.with_suffix(".jsonl"), "w") as handle:
        handle.writelines(json.dumps({**row, **env}) + "\n" for row in history)
    shown = history[:: max(1, len(history) // 8)]
    shown += [] if shown[-1] is history[-1] else history[-1:]
    rows = [{k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()} for row in shown]
    table = markdown_table(rows, ["step", "teacher_coverage", "covered_teacher_mass", "dstar_distance_tokens",
                                  "planted_inclusion"])
    stem.with_suffix(".md").write_text(
        f"# SCOPE pointer learning on a planted far block (distance {PERIOD} tokens), commit {env['commit']}\n\n"
        f"Teacher distillation on the pointer head alone ({args.steps} Adam steps, lr 0.05). "
        "dstar_distance_tokens: mean distance of the nearest pointer's D* to the planted offset; "
        "planted_inclusion: the planted block's inclusion probability (query blocks with a target).\n\n"
        f"{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
