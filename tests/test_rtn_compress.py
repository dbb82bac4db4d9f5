"""Round-to-nearest compression straight from a ComfyUI-format state dict (io/rtn.py), for both families:
the file loads, and equals quantizing the float model in memory; a stop leaves no file."""
import pytest
import torch

from quantsparse_core.io import load_compressed
from quantsparse_core.io.rtn import compress_rtn
from quantsparse_core.models import HunyuanVideoDiT, WanDiT, get_preset, get_wan_preset
from quantsparse_core.quant.linear import QuantLinear
from quantsparse_core.quant.policy import default_policy, quantize_model


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def bf16_source(rng, model):
    """A ComfyUI-style bf16 state dict of random weights, and the float32 model holding exactly them."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((torch.randn(p.shape, generator=rng) * 0.05).bfloat16().float())
    return {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, model.eval()


def in_memory_rtn(model, w_bits, a_bits):
    policy = default_policy(model, w_bits, a_bits)
    quantize_model(model, policy)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.freeze()
    return model


CASES = {
    "wan-t2v": (lambda: WanDiT(get_wan_preset("wan-test")),
                lambda rng: (torch.randn(2, 16, 2, 6, 8, generator=rng), torch.rand(2, generator=rng) * 1000,
                             torch.randn(2, 5, 4096, generator=rng))),
    "wan-i2v": (lambda: WanDiT(get_wan_preset("wan-test-i2v")),
                lambda rng: (torch.randn(1, 36, 2, 6, 8, generator=rng), torch.rand(1, generator=rng) * 1000,
                             torch.randn(1, 5, 4096, generator=rng), torch.randn(1, 257, 1280, generator=rng))),
    "hunyuan-t2v": (lambda: HunyuanVideoDiT(get_preset("test")),
                    lambda rng: (torch.randn(1, 16, 2, 8, 8, generator=rng), torch.tensor([500.0]),
                                 torch.randn(1, 5, 32, generator=rng), torch.randn(1, 768, generator=rng),
                                 torch.tensor([6.0]))),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("w_bits,a_bits", [(4, 8), (8, 16)])
def test_file_equals_in_memory_rtn(rng, tmp_path, case, w_bits, a_bits):
    build, inputs = CASES[case]
    sd, model = bf16_source(rng, build())
    ticks = []
    path = tmp_path / "rtn.safetensors"
    variant = compress_rtn(sd, path, w_bits, a_bits, progress=lambda d, n: ticks.append((d, n)))
    loaded, header = load_compressed(path)
    assert variant == loaded.config.variant and header["calibration"]["settings"]["method"] == "rtn"
    n = len(header["policy"])
    assert ticks == [(i, n) for i in range(1, n + 1)]
    reference = in_memory_rtn(model, w_bits, a_bits)
    args = inputs(rng)
    with torch.no_grad():
        want, got = reference(*args), loaded(*args)
    assert torch.isfinite(want).all()
    # same codes and scales from the same bf16 weights: equal up to float32 summation order
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_stop_leaves_no_file_and_bad_sources_are_named(rng, tmp_path):
    sd, _ = bf16_source(rng, WanDiT(get_wan_preset("wan-test")))

    def stop(done, total):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        compress_rtn(sd, tmp_path / "a.safetensors", progress=stop)
    assert not list(tmp_path.iterdir())
    del sd["blocks.1.ffn.2.weight"]
    with pytest.raises(ValueError, match="missing"):
        compress_rtn(sd, tmp_path / "b.safetensors")
    with pytest.raises(ValueError, match="neither a HunyuanVideo nor a Wan"):
        compress_rtn({"x.weight": torch.ones(2, 2)}, tmp_path / "c.safetensors")
    hv, _ = bf16_source(rng, HunyuanVideoDiT(get_preset("test")))
    hv["extra.weight"] = torch.ones(1)
    with pytest.raises(ValueError, match="unexpected keys"):
        compress_rtn(hv, tmp_path / "d.safetensors")
    assert not list(tmp_path.iterdir())
