"""Triton kernels for QuantSparse, each beside the plain PyTorch reference it is tested against.

`kernels.dispatch` decides per call whether the Triton path or the reference runs.
"""
