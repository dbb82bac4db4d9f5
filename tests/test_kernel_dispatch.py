import pytest
import torch

from quantsparse_core import dispatch


def test_modes_choose_as_documented(monkeypatch):
    monkeypatch.delenv(dispatch.ENV, raising=False)
    assert dispatch.mode() == "auto"
    assert dispatch.use_triton("cpu") is False  # auto never runs Triton on CPU tensors
    with dispatch.forced("torch"):
        assert dispatch.use_triton("cuda") is False
    monkeypatch.setenv(dispatch.ENV, "torch")
    assert dispatch.use_triton("cuda") is False
    monkeypatch.setenv(dispatch.ENV, "bogus")
    with pytest.raises(ValueError, match="QUANTSPARSE_KERNELS"):
        dispatch.mode()


def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch):
    if not dispatch.triton_available():
        pytest.skip("triton not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with dispatch.forced("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        dispatch.use_triton("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with dispatch.forced("triton"):
        assert dispatch.use_triton("cpu") is True
    with pytest.raises(ValueError):
        with dispatch.forced("fast"):
            pass
