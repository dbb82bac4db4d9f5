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
