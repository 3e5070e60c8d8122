"""Triton kernels of SCOPE (imported lazily: the package works with torch alone).

Each kernel has a plain PyTorch twin with the same arguments and a parity test:
block_sparse.py <-> scope.block_sparse_attention.block_sparse_attention_reference.
"""
