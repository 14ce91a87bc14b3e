"""Numerical ops for RWKV. Each op lives in its own folder with a reference, a PyTorch and a CUDA variant.

Importing this package never needs CUDA: CUDA variants are imported and built on first use.
"""
