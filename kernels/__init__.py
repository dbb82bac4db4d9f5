"""Triton kernels for QuantSparse, each beside the plain PyTorch reference it is tested against.

A leaf: the kernels take plain tensors and import nothing of the library (the types they need, the
SSAR correction's parts and the int4 layout, live here). Which path runs for a call, Triton or the
reference, is decided by the library's one dispatch module, quantsparse_core.dispatch. Installed by
pip as `quantsparse_kernels` (a PyPI package called `kernels` exists); this package never imports
itself by name, so it works under either name. Importing it needs no Triton: only the kernel
modules (not the *_ref.py references, int4.py, correction.py) import triton.
"""
