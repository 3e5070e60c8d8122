"""NSAAttention: the drop-in nn.Module (projections, RoPE, phi, gates, three branches, output)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from nsa.compress_pool import CompressPool
from nsa.config import NSAConfig
from nsa.errors import NSAInputError
from nsa.functional import nsa_attention
from nsa.rope import apply_rope


class NSAAux(NamedTuple):
    block_indices: torch.Tensor  # [B, T, Hkv, n] selected blocks, -1 = unused
    gates: torch.Tensor  # [B, T, HQ, 3] activated gates (cmp, sel, win)


class NSAAttention(nn.Module):
    """Native Sparse Attention layer: x [B, T, hidden] -> y [B, T, hidden], causal.

    Per query head: o_t = g_cmp * Attn(q_t, K_cmp, V_cmp) + g_sel * Attn(q_t, K_sel, V_sel)
    + g_win * Attn(q_t, K_win, V_win), with gates from a linear map of x_t (sigmoid by default).
    Each branch has its own K/V projection unless config.shared_kv. RoPE is applied per head to q
    and to the selection/window keys at absolute positions. The compression branch pools
    *un-rotated* keys (phi sees raw content plus its own intra-block position encoding) and then
    rotates each compressed key at its block's centre position i*d + (l-1)/2, so q . k_cmp depends
    on the query-to-block distance like every other branch.
    """

    def __init__(self, config: NSAConfig) -> None:
        super().__init__()
        self.config = c = config
        kv_sets = 1 if c.shared_kv else 3
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, kv_sets * c.num_kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, kv_sets * c.num_kv_heads * c.head_dim_v, bias=False)
        self.gate_proj = nn.Linear(c.hidden_size, c.num_heads * 3)
        nn.init.zeros_(self.gate_proj.bias)
        self.compress_k = CompressPool(c.head_dim, c.cmp_block_size, c.cmp_stride, c.compression,
                                       c.compression_hidden)
        self.compress_v = CompressPool(c.head_dim_v, c.cmp_block_size, c.cmp_stride, c.compression,
                                       c.compression_hidden)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim_v, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, return_aux: bool = False) -> torch.Tensor | tuple[torch.Tensor, NSAAux]:
        c = self.config
        if x.dim() != 3 or x.shape[-1] != c.hidden_size:
            raise NSAInputError(f"x must be [B, T, hidden_size={c.hidden_size}], got shape {tuple(x.shape)}")
        batch, seq_len, _ = x.shape
        positions = torch.arange(seq_len, device=x.device)
        q = apply_rope(self.q_proj(x).view(batch, seq_len, c.num_heads, c.head_dim), positions, c.rope_theta)
        k = self.k_proj(x).view(batch, seq_len, -1, c.num_kv_heads, c.head_dim)
        v = self.v_proj(x).view(batch, seq_len, -1, c.num_kv_heads, c.head_dim_v)
        cmp_set, sel_set, win_set = (0, 0, 0) if c.shared_kv else (0, 1, 2)
        k_cmp = self.compress_k(k[:, :, cmp_set])
        cmp_positions = torch.arange(k_cmp.shape[1], device=x.device) * c.cmp_stride + (c.cmp_block_size - 1) / 2
        k_cmp = apply_rope(k_cmp, cmp_positions, c.rope_theta)
        v_cmp = self.compress_v(v[:, :, cmp_set])
        k_sel = apply_rope(k[:, :, sel_set], positions, c.rope_theta)
        k_win = k_sel if win_set == sel_set else apply_rope(k[:, :, win_set], positions, c.rope_theta)
        gate_logits = self.gate_proj(x).view(batch, seq_len, c.num_heads, 3)
        gates = gate_logits.sigmoid() if c.gate == "sigmoid" else gate_logits.softmax(dim=-1)
        out, block_indices = nsa_attention(
            q, k_cmp, v_cmp, k_sel, v[:, :, sel_set], k_win, v[:, :, win_set], gates,
            block_size=c.cmp_block_size, block_stride=c.cmp_stride, sel_block_size=c.sel_block_size,
            num_selected=c.num_selected, window_size=c.window_size, scale=c.attention_scale,
            query_chunk_size=c.query_chunk_size,
        )
        y = self.o_proj(out.flatten(2))
        return (y, NSAAux(block_indices, gates)) if return_aux else y
