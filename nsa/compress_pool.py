"""Compression phi: pools each block of l raw keys (or values), stride d, into one token."""

from __future__ import annotations

import torch
from torch import nn

from nsa.block_index import num_compressed_blocks
from nsa.errors import NSAInputError
from nsa.validation import check_divides, check_float_tensor, check_positive_int


def block_windows(x: torch.Tensor, block_size: int, block_stride: int) -> torch.Tensor:
    """x [B, T, H, D] -> overlapping blocks [B, num_cmp(T), H, l, D] (a view where possible)."""
    check_float_tensor("x", x, 4)
    check_positive_int("block_size", block_size)
    check_positive_int("block_stride", block_stride)
    check_divides("block_stride", block_stride, "block_size", block_size)
    batch, seq_len, num_heads, dim = x.shape
    if num_compressed_blocks(seq_len, block_size, block_stride) == 0:
        return x.new_zeros(batch, 0, num_heads, block_size, dim)
    return x.unfold(1, block_size, block_stride).transpose(-1, -2)


def compress_mean_pool(x: torch.Tensor, block_size: int, block_stride: int) -> torch.Tensor:
    """Mean of each compressed block: x [B, T, H, D] -> [B, num_cmp(T), H, D], block i = [i*d, i*d + l)."""
    return block_windows(x, block_size, block_stride).mean(dim=-2)


def _check_pool_arguments(head_dim: int, block_size: int, block_stride: int, kind: str, hidden: int | None) -> None:
    check_positive_int("head_dim", head_dim)
    check_positive_int("block_size", block_size)
    check_positive_int("block_stride", block_stride)
    check_divides("block_stride", block_stride, "block_size", block_size)
    if hidden is not None:
        check_positive_int("hidden", hidden)
    if kind not in ("mean", "mlp"):
        raise NSAInputError(f"kind={kind!r} must be 'mean' or 'mlp'")


class CompressPool(nn.Module):
    """phi of the compression branch, shared across heads.

    kind="mean": mean pooling. kind="mlp": mean pooling plus an MLP over the block's l tokens
    concatenated, each with a learnable intra-block position encoding. The MLP's output layer starts
    at zero, so a fresh "mlp" phi equals mean pooling exactly and learns a correction from there.
    """

    def __init__(self, head_dim: int, block_size: int, block_stride: int, kind: str = "mlp",
                 hidden: int | None = None) -> None:
        """hidden: the MLP's width, None -> 2 * head_dim (NSAConfig.compression_hidden's default). NSAInputError
        naming the argument: sizes positive ints, block_stride dividing block_size (d | l), hidden None or a
        positive int, kind "mean" or "mlp"."""
        _check_pool_arguments(head_dim, block_size, block_stride, kind, hidden)
        super().__init__()
        self.block_size, self.block_stride, self.kind = block_size, block_stride, kind
        if kind == "mlp":
            hidden = 2 * head_dim if hidden is None else hidden
            self.position = nn.Parameter(torch.randn(block_size, head_dim) * 0.02)
            output_layer = nn.Linear(hidden, head_dim)
            nn.init.zeros_(output_layer.weight)
            nn.init.zeros_(output_layer.bias)
            self.mlp = nn.Sequential(nn.Linear(block_size * head_dim, hidden), nn.GELU(), output_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, H, D] -> compressed [B, num_cmp(T), H, D]."""
        return self.pool(block_windows(x, self.block_size, self.block_stride))

    def pool(self, blocks: torch.Tensor) -> torch.Tensor:
        """Blocks [..., l, D] in token order -> one token each [..., D] (the decode cache calls this)."""
        pooled = blocks.mean(dim=-2)
        if self.kind == "mean":
            return pooled
        return pooled + self.mlp((blocks + self.position.to(blocks.dtype)).flatten(-2))
