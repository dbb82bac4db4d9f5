"""benchmarks/comfy_product.py with HunyuanVideo 1.5 (issue 17): the small `test-1.5` preset run on the CPU through
ComfyUI's own loader and sampler (ComfyUI must build its HunyuanVideo15 model and latent format), the shapes that
`--preset hunyuan-video-1.5-8b --resolutions 720p` times on the GPU, its budget estimate, and its target row.
The ComfyUI run needs COMFYUI_PATH (skipped otherwise); the rest is bookkeeping."""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from comfy_env import require_comfyui

ROOT = Path(__file__).resolve().parents[1]
STEPS = 7  # default schedule at 7 steps: dense, refresh, reuse x 4, refresh
V15 = "hunyuan-video-1.5-8b"
V15_ROW = "(Q) vs (A), HunyuanVideo 1.5, 720p x 121, 50-step sampling wall-clock"


@pytest.fixture(scope="module")
def mod():
    spec = importlib.util.spec_from_file_location("comfy_product_v15_under_test",
                                                  ROOT / "benchmarks" / "comfy_product.py")
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


def test_v15_cpu_run_through_comfyuis_hunyuanvideo15(tmp_path, mod):
    """(A) ComfyUI dense, (Q) Load Compressed DiT + sparse patch and (C) the core alone on a 1.5-shaped random model:
    ComfyUI detects HunyuanVideo 1.5, samples the 32-channel 1/16 latent with 1.5's conditioning (pooled_output
    None), SSAR runs the schedule on 1x1x1-patch tokens, and the 1.5 target rows are reported."""
    root = require_comfyui()
    out = tmp_path / "v15.json"
    env = dict(os.environ, COMFYUI_PATH=str(root), CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "comfy_product.py"), "--device", "cpu", "--preset", "test-1.5",
           "--configs", "A,Q,C", "--resolutions", "128x128x5", "--steps", str(STEPS), "--text-tokens", "16",
           "--ckpt", str(tmp_path / "q15.safetensors"), "--out", str(out)]  # with the warm-up runs: 1.5's warm latent
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    runs = {r["config"]: r for r in data["runs"]}
    assert set(runs) == {"A", "Q", "C"}
    for r in runs.values():
        assert r["completed"] and r["output_finite"] and "warm_error" not in r, r
        assert r["latent"] == [1, 32, 2, 8, 8] and r["tokens"] == 2 * 8 * 8 + 16  # patch 1x1x1 + the text
        assert len(r["per_step"]) == STEPS and r["text_real_tokens"] == 16  # 1.5's prompts are not padded
    for c in ("A", "Q"):  # what ComfyUI built from our state dict / compressed checkpoint
        assert runs[c]["comfy_model"] == "HunyuanVideo15" and runs[c]["comfy_diffusion_model"] == "HunyuanVideo"
        assert runs[c]["latent_format"] == {"name": "HunyuanVideo15", "channels": 32, "spatial_downscale": 16}
    assert runs["Q"]["warm"][0] == "8 steps at 128x128x9"

    from quantsparse_core.sparse.ssar import SparseSettings
    coarse, _ = mod.step_kinds(SparseSettings(), STEPS)
    for c in ("Q", "C"):
        assert [s["observed"] for s in runs[c]["per_step"]] == coarse and runs[c]["kinds_match_schedule"]
    assert any("sparse attention calls" in line for line in runs["Q"]["sparse_log"])

    names = [t["name"] for t in data["targets"]]
    assert names[:2] == [row[0] for row in mod.V15_TARGETS] and names[0] == V15_ROW
    assert names[2].startswith("(Q) inside ComfyUI within 5%") and len(names) == 3  # (C) ran; no 13B rows
    row = data["targets"][0]
    assert row["measured"] is None and not row["met"] and "at 720p" in row["note"] and row["target"] == ">= 2.5x"


def test_v15_resolution_latent_and_tokens(mod):
    """`720p` is 1280x720x121 for 1.5 (EmptyHunyuanVideo15Latent: 32 channels, 1/16, time /4; patch 1), and stays
    1280x720x129 for the 13B."""
    res = mod.parse_resolution("720p", V15)
    assert res == (1280, 720, 121)
    shape = mod.latent_shape(res, V15)
    assert shape == (1, 32, 31, 45, 80) and mod.video_tokens(shape, V15) == 111_600
    assert mod.parse_resolution("720p") == (1280, 720, 129)
    assert mod.latent_shape((1280, 720, 129)) == (1, 16, 33, 90, 160) and mod.video_tokens((1, 16, 33, 90, 160)) == 118_800
    assert mod.latent_shape((128, 128, 5), "test-1.5") == (1, 32, 2, 8, 8)
    assert mod.parse_resolution("544p", V15) == (960, 544, 129)  # the shared names keep their sizes
    with pytest.raises(SystemExit, match="480p"):
        mod.parse_resolution("1080p", V15)


def test_v15_budget_fits_the_documented_gpu_command(mod):
    """`--preset hunyuan-video-1.5-8b --configs Q,A --resolutions 720p --baseline-steps 720p=3` is estimated to
    fit the default --budget-s at the priors (the 13B's 720p steps scaled by 1.5's FLOPs per step), so neither
    config is skipped before a measured step has refined the scale."""
    from quantsparse_core.sparse.ssar import SparseSettings
    bench = object.__new__(mod.Bench)  # only the estimate: no ComfyUI
    bench.a = argparse.Namespace(preset=V15, text_tokens=256, warm_full_steps=1, cap_gb=None, steps=50)
    bench.scale, bench.settings = 1.0, SparseSettings()   # the compact warm-up's 4 steps are counted too
    shape = mod.latent_shape(mod.parse_resolution("720p", V15), V15)
    kinds, _ = mod.step_kinds(SparseSettings(schedule="standard"), 50)
    a = mod.LOAD_PRIOR_S["A"] + bench.estimate("A", "720p", shape, 3, ["dense"] * 50)
    q = mod.LOAD_PRIOR_S["Q"] + bench.estimate("Q", "720p", shape, 50, kinds)
    assert 0 < a < q and a + q <= mod.BUDGET_S
    pri, base = mod.prior_steps(V15, "720p", shape, 256), mod.PRIORS["720p"]
    ratio = pri["A"] / base["A"]
    assert 0.3 < ratio < 0.8 and all(pri[k] == pytest.approx(v * ratio) for k, v in base.items())
    assert mod.has_priors(V15) and not mod.has_priors("test-1.5")


def _run(config, res, n, step_s, kinds=None):
    per = [dict(i=i, s=step_s, kind=(kinds[i] if kinds else "dense")) for i in range(n)]
    return dict(label=f"{config}@{res}", config=config, resolution=res, cap_gb=None, schedule_steps=50,
                completed=True, per_step=per, stall=dict(worst_ratio=1.0, worst_step=0, worst_kind="dense"))


def test_v15_target_row_from_runs(mod):
    """The 1.5 row is (A)'s 50-step time (3 dense steps timed, the rest at their median) over (Q)'s, >= 2.5x."""
    from quantsparse_core.sparse.ssar import SparseSettings
    kinds, _ = mod.step_kinds(SparseSettings(), 50)
    runs = [_run("A", "720p", 3, 16.0), _run("Q", "720p", 50, 6.0, kinds)]
    rows = {t["name"]: t for t in mod.targets(runs, V15)}
    assert list(rows) == [r[0] for r in mod.V15_TARGETS]
    row = rows[V15_ROW]
    assert row["measured"] == pytest.approx(800 / 300, abs=1e-3) and row["met"] and "timed over 3 of 50" in row["note"]
    slow = {t["name"]: t for t in mod.targets([runs[0], _run("Q", "720p", 50, 7.0, kinds)], V15)}[V15_ROW]
    assert slow["measured"] == pytest.approx(800 / 350, abs=1e-3) and not slow["met"]
    assert V15_ROW not in {t["name"] for t in mod.targets(runs)}  # the 13B keeps its own rows
