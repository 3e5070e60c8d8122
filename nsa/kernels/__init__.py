"""Triton kernels (imported lazily: the package works with torch alone).

Each kernel has a plain PyTorch twin with the same meaning in the package and a parity test:
decode.py <-> nsa.decode_attention.decode_attention_reference.
"""
