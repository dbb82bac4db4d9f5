"""Shared pytest marks for the kernel tests."""
import pytest
import torch

from quantsparse_core import dispatch

# Tests that push CPU tensors through a Triton kernel: they need Triton's interpreter, which the
# conftest turns on only where CUDA is absent. On a GPU machine the CUDA versions in
# tests/test_kernels_cuda.py (and the files' own CUDA tests) cover the same kernels.
interpreted = pytest.mark.skipif(
    not dispatch.triton_available() or (torch.cuda.is_available() and not dispatch.interpreting()),
    reason="runs a Triton kernel on CPU tensors in the interpreter; on a GPU see the CUDA tests")
