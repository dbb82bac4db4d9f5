"""The Wan fidelity table's pipeline (quantsparse_core/wan_results.py) end to end on the CPU at a toy size: a
random-weights tiny Wan in the trained file's format, calibrated RTN and MSAD, sampled dense and sparse, rendered.
The table itself needs the trained tiny Wan (a GPU run); this checks every row is produced and measured."""
import math

import torch

from quantsparse_core import wan_results
from quantsparse_core.models.weights import atomic_save_safetensors
from quantsparse_core.models.wan import WanDiT, get_wan_preset


def test_wan_table_rows_and_render(tmp_path, rng):
    weights = tmp_path / "tiny_wan.safetensors"
    m = WanDiT(get_wan_preset("tiny-wan"))
    sd = {k: (torch.randn(v.shape, generator=rng) * 0.05).to(torch.bfloat16) for k, v in m.state_dict().items()}
    atomic_save_safetensors(sd, weights, {"format": "quantsparse-tiny-wan"})
    lines = []
    rows = wan_results.wan_table("cpu", steps=6, samples=2, epochs=1, n_prompts=2, weights=weights,
                                 latent_shape=(16, 4, 16, 16), log=lines.append)  # 256 tokens: 4 blocks of 64
    assert [r[0] for r in rows] == ["W4A8 RTN, dense attention", "W4A8 RTN + SVG 15%, no cache",
                                    "W4A8 MSAD, dense attention", "QuantSparse: W4A8 MSAD + 15% + SSAR"]
    for label, p, s, density, sec in rows:
        assert math.isfinite(p) and -1 <= s <= 1 and 0 < density <= 1, label
    assert rows[0][3] == 1.0 and rows[1][3] < 1.0 and rows[3][3] < 1.0  # the sparse rows ran sparse
    text = wan_results.render(rows, "cpu", 6, 2, 1)
    assert text.startswith(wan_results.TITLE) and f"{wan_results.margin(rows):+.2f} dB" in text
    assert len(lines) == 5  # the reference and one line per row
