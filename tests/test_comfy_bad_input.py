"""Nodes refuse bad input with a message that says what to change, and leave nothing on disk."""
import pytest
import torch

from test_comfy_nodes import load_pack
from test_comfy_pipeline import _empty_latent, pack  # noqa: F401  (fixture)

CALIB = dict(weight_bits="4", activation_bits="8", method="rtn", samples=1, steps=2, epochs=1, lambda_global=1.0,
             lambda_local=1.0, pool_stride=16, salient_tokens=16, seed=0)


class _NotHunyuan:
    """A MODEL-like object wrapping some other diffusion model class."""
    class model:
        class diffusion_model:
            pass


def test_calibrate_refuses_bad_input_before_writing(pack):
    nodes, models = pack
    (model,) = nodes["QuantSparseLoadEmbeddedTinyDiT"].execute().result
    (cond,) = nodes["QuantSparseTinyPromptEncode"].execute("a red circle moving right slowly on a black background").result
    calib = nodes["QuantSparseCalibrate"]
    good = _empty_latent(width=64, height=64, length=5)
    with pytest.raises(ValueError, match="HunyuanVideo"):
        calib.execute(model=_NotHunyuan(), positive=cond, latent=good, output_name="x", **CALIB)
    with pytest.raises(ValueError, match="plain file name"):
        calib.execute(model=model, positive=cond, latent=good, output_name="../escape", **CALIB)
    with pytest.raises(ValueError, match="divisible|patch|fit"):
        calib.execute(model=model, positive=cond, latent=_empty_latent(width=72, height=64, length=5),
                      output_name="odd", **CALIB)
    with pytest.raises(ValueError, match="channels"):
        calib.execute(model=model, positive=cond, latent={"samples": torch.zeros(1, 4, 2, 8, 8)},
                      output_name="chan", **CALIB)
    with pytest.raises(ValueError, match="needs a video latent.*image latent"):  # EmptyLatentImage's [B, C, H, W]
        calib.execute(model=model, positive=cond, latent={"samples": torch.zeros(1, 16, 8, 8)},
                      output_name="image", **CALIB)
    folder = models / "quantsparse"
    assert not folder.exists() or not [p for p in folder.rglob("*") if p.is_file()]


def test_sparse_nodes_refuse_bad_settings_and_models(pack):
    nodes, _ = pack
    (model,) = nodes["QuantSparseLoadEmbeddedTinyDiT"].execute().result
    patch = nodes["QuantSparseSparseAttention"]
    ok = dict(density=0.15, refresh_interval=5, svd_rank=16, warmup_steps=-1, warmup_blocks=1, cache_placement="auto")
    with pytest.raises(ValueError, match="HunyuanVideo"):
        patch.execute(model=_NotHunyuan(), **ok)
    with pytest.raises(ValueError, match="density"):
        patch.execute(model=model, **{**ok, "density": 0.0})
    with pytest.raises(ValueError, match="refresh interval"):
        patch.execute(model=model, **{**ok, "refresh_interval": 0})
    with pytest.raises(ValueError, match="head dimension"):
        patch.execute(model=model, **{**ok, "svd_rank": 129})
    (patched,) = patch.execute(model=model, **ok).result
    assert patched is not model and "optimized_attention_override" not in \
        model.model_options.get("transformer_options", {})
    run = patched.model_options["transformer_options"]["quantsparse_sparse"]
    assert run.settings.layers == 2 + 2 - 1   # every joint block of the tiny model but the dense warm-up one


def test_calibrate_honours_cancel_and_resumes(pack, monkeypatch):
    """Cancel (ComfyUI's interrupt) stops calibration between epochs; running the node again resumes
    after the last finished block and writes the same file as an uninterrupted run."""
    import sys

    import comfy.model_management
    from safetensors.torch import load_file

    nodes, models = pack
    model_nodes = sys.modules[nodes["QuantSparseCalibrate"].__module__]
    (model,) = nodes["QuantSparseLoadEmbeddedTinyDiT"].execute().result
    (cond,) = nodes["QuantSparseTinyPromptEncode"].execute("a blue square moving up quickly on a white background").result
    kw = dict(model=model, positive=cond, latent=_empty_latent(width=64, height=64, length=5),
              **{**CALIB, "method": "block", "epochs": 2})
    nodes["QuantSparseCalibrate"].execute(output_name="whole", **kw)

    original = model_nodes.ProgressReporter.calibration
    blocks, cancelled = [], []

    def cancel_in_third_block(self, block, n_blocks, epoch, epochs):
        blocks.append(block)
        if block == 2 and not cancelled:
            cancelled.append(True)
            comfy.model_management.interrupt_current_processing(True)
        return original(self, block, n_blocks, epoch, epochs)

    monkeypatch.setattr(model_nodes.ProgressReporter, "calibration", cancel_in_third_block)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            nodes["QuantSparseCalibrate"].execute(output_name="resumed", **kw)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert not (models / "quantsparse" / "resumed.safetensors").exists()
    blocks.clear()
    nodes["QuantSparseCalibrate"].execute(output_name="resumed", **kw)
    # blocks 0 and 1 were not trained again: one progress tick each as they are replayed (Cancel works there
    # too), where a trained block ticks once per epoch
    assert blocks.count(0) == blocks.count(1) == 1 and blocks.count(2) == kw["epochs"] == 2
    a = load_file(str(models / "quantsparse" / "whole.safetensors"))
    b = load_file(str(models / "quantsparse" / "resumed.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_calibrate_counts_pinned_memory_pytorch_keeps_cached_as_available(pack, monkeypatch):
    """Page-locked memory PyTorch caches from an earlier run is reused, not lost: Calibrate's host budget is half
    of (available + cached pinned) bytes, so a second Calibrate in the same process does not spill to disk."""
    import sys
    nodes, _ = pack
    model_nodes = sys.modules[nodes["QuantSparseCalibrate"].__module__]
    g = 2 ** 30
    monkeypatch.setattr(model_nodes, "available_host_memory", lambda: 10 * g)
    monkeypatch.setattr(model_nodes, "cached_pinned_bytes", lambda: 4 * g)
    seen = {}

    def stop(*args, **kwargs):
        seen["host_budget"] = kwargs["host_budget"]
        raise RuntimeError("stop here")
    monkeypatch.setattr(model_nodes, "compress_streaming", stop)
    (model,) = nodes["QuantSparseLoadEmbeddedTinyDiT"].execute().result
    (cond,) = nodes["QuantSparseTinyPromptEncode"].execute("a red circle moving right slowly on a black background").result
    with pytest.raises(RuntimeError, match="stop here"):
        nodes["QuantSparseCalibrate"].execute(model=model, positive=cond, latent=_empty_latent(width=64, height=64, length=5),
                                              output_name="budget", **CALIB)
    assert seen["host_budget"] == 7 * g


def test_cancel_stops_the_source_fingerprint(pack):
    """Calibrate fingerprints the whole source model first (30-60 s for 14B): ComfyUI's Cancel stops it at the
    next block instead of being ignored until calibration starts."""
    import sys

    import comfy.model_management
    nodes, _ = pack
    model_nodes = sys.modules[nodes["QuantSparseCalibrate"].__module__]
    (model,) = nodes["QuantSparseLoadEmbeddedTinyDiT"].execute().result
    source = model_nodes.ComfyBlockSource(model, torch.float32)
    want = source.fingerprint()
    comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            source.fingerprint()
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert source.fingerprint() == want
