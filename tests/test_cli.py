"""`./run demo`: dense vs QuantSparse end to end, its table, the calibration cache (reused, rebuilt
over a corrupt file, ignored with --recalibrate), and the clear error for words outside the vocabulary.

The runs use 2 denoising steps and a 1-sample, 1-epoch MSAD calibration, so the module stays fast;
the default run (20 steps, 8 samples, 5 epochs) is measured in the demo's own report.
"""
import contextlib
import io
import math

import pytest
import torch

from quantsparse_core.cli import COLUMNS, main
from quantsparse_core import demo
from quantsparse_core.demo import DemoSettings, cache_key, cache_path
from quantsparse_core.io import load_compressed

TINY = ["--steps", "2", "--seed", "5", "--calib-samples", "1", "--calib-epochs", "1", "--calib-steps", "1"]
# Measured at these settings: 30.8 dB (seed 5, CPU; 27.3 dB for the full default run). 20 dB leaves
# room for platform differences while still catching a compressed model that draws something else.
PSNR_BOUND = 20.0


def _demo(out, *extra, capsys):
    rc = main(["demo", *TINY, "--out", str(out), *extra])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return captured.out, captured.err


def _rows(text: str) -> dict:
    """{first cell: [cells]} of the printed markdown table, header included."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| "):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


def _quantsparse_row(text: str) -> dict:
    rows = _rows(text)
    assert tuple(rows["model"]) == COLUMNS
    (name,) = [k for k in rows if k.startswith("QuantSparse")]
    return dict(zip(COLUMNS, rows[name]))


def _number(cell: str) -> float:
    return float(cell.rstrip("x%"))


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """The first run into a fresh folder (it calibrates), shared by the tests below."""
    out = tmp_path_factory.mktemp("demo")
    stdout, stderr = io.StringIO(), io.StringIO()  # capsys is per test; this run is per module
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(["demo", *TINY, "--out", str(out)])
    assert rc == 0, stderr.getvalue()
    return out, stdout.getvalue()


def test_first_run_calibrates_and_reports_every_column(first_run):
    out, text = first_run
    row = _quantsparse_row(text)
    assert "calibrated in" in text and "msad" in text
    psnr = _number(row["PSNR vs dense (dB)"])
    assert math.isfinite(psnr) and psnr > PSNR_BOUND
    assert 0.5 < _number(row["SSIM vs dense"]) <= 1.0
    assert 1.5 < _number(row["storage ratio"]) < 4.0     # 4-bit linears, bf16 embedders/refiner/final layer
    assert 0 < _number(row["mask density"]) <= 30          # 25% requested (block granularity)
    assert _number(row["mask density"]) <= _number(row["effective density"]) < 100
    for col in ("storage (MB)", "s / step"):
        assert math.isfinite(_number(row[col])) and _number(row[col]) > 0
    dense = _rows(text)["dense (bf16 storage, fp32 compute)"]
    assert _number(dense[COLUMNS.index("s / step")]) > 0
    assert "docs/BENCHMARKS.md" in text


def test_first_run_writes_side_by_side_animation_and_two_row_strip(first_run):
    out, _ = first_run
    for name in ("demo_side_by_side.png", "demo_strip.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    anim = (out / "demo_side_by_side.png").read_bytes()
    assert b"acTL" in anim
    width, height = int.from_bytes(anim[16:20], "big"), int.from_bytes(anim[20:24], "big")
    assert (width, height) == (2 * 128 + 4, 128)           # dense | gap | QuantSparse
    strip = (out / "demo_strip.png").read_bytes()
    assert int.from_bytes(strip[20:24], "big") == 2 * 128 + 4  # two rows of frames


def test_cache_file_is_a_compressed_checkpoint_named_by_the_settings(first_run):
    out, _ = first_run
    s = DemoSettings(out=out, calib_samples=1, calib_epochs=1, calib_steps=1)
    path = cache_path(s, cache_key(s))
    model, header = load_compressed(path)
    assert header["calibration"]["settings"]["method"] == "msad"
    assert not [p for p in path.parent.iterdir() if p.suffix == ".tmp"]  # written by rename
    other = DemoSettings(out=out, calib_samples=2, calib_epochs=1, calib_steps=1)
    assert cache_key(other) != cache_key(s)


def test_second_run_uses_the_cache_and_gives_the_same_video(first_run, capsys):
    out, text = first_run
    cache = next((out / "cache").glob("*.safetensors"))
    mtime = cache.stat().st_mtime_ns
    again, _ = _demo(out, capsys=capsys)
    assert "cached" in again and "calibrated in" not in again
    assert _quantsparse_row(again)["PSNR vs dense (dB)"] == _quantsparse_row(text)["PSNR vs dense (dB)"]
    assert cache.stat().st_mtime_ns == mtime


def test_corrupt_cache_is_recalibrated_over(tmp_path):
    # rtn: the same calibrate / save / load path as msad without the training, to keep this test fast
    s = DemoSettings(out=tmp_path, calib_method="rtn", calib_samples=1, calib_epochs=1, calib_steps=1)
    cache = cache_path(s, cache_key(s))
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"this is not a safetensors file")
    messages = []
    model, path, status = demo.compressed_model(s, log=lambda *a, **k: messages.append(" ".join(map(str, a))))
    assert path == cache and status.startswith("calibrated in")
    assert any("unusable" in m and "recalibrating" in m for m in messages), messages
    load_compressed(cache)  # rewritten whole
    assert isinstance(model, torch.nn.Module)


def test_cache_of_other_settings_under_our_name_is_recalibrated_over(first_run, tmp_path):
    out, _ = first_run
    good = next((out / "cache").glob("*.safetensors"))       # a valid file, but msad's
    s = DemoSettings(out=tmp_path, calib_method="rtn", calib_samples=1, calib_epochs=1, calib_steps=1)
    cache = cache_path(s, cache_key(s))
    cache.parent.mkdir(parents=True)
    cache.write_bytes(good.read_bytes())
    messages = []
    _, _, status = demo.compressed_model(s, log=lambda *a, **k: messages.append(" ".join(map(str, a))))
    assert status.startswith("calibrated in") and any("other settings" in m for m in messages), messages
    assert load_compressed(cache)[1]["calibration"]["settings"]["method"] == "rtn"


def test_recalibrate_ignores_a_good_cache(first_run, monkeypatch):
    out, _ = first_run
    s = DemoSettings(out=out, calib_samples=1, calib_epochs=1, calib_steps=1)
    assert cache_path(s, cache_key(s)).is_file()

    class Calibrating(Exception):
        pass

    def calibrate_and_save(*args):
        raise Calibrating
    monkeypatch.setattr(demo, "calibrate_and_save", calibrate_and_save)
    model, _, status = demo.compressed_model(s, log=print)   # the good cache is used ...
    assert status == "cached" and model is not None
    s.recalibrate = True
    with pytest.raises(Calibrating):                         # ... unless --recalibrate
        demo.compressed_model(s, log=print)


def test_demo_rejects_words_outside_the_vocabulary(tmp_path, capsys):
    rc = main(["demo", "--prompt", "a purple dragon flying", "--steps", "1", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "'purple' is not in the tiny model's vocabulary" in err
    assert not list(tmp_path.iterdir())  # nothing written, no calibration started


def test_demo_rejects_a_bad_density_before_any_work(tmp_path, capsys):
    rc = main(["demo", "--density", "1.5", "--out", str(tmp_path)])
    assert rc == 2 and "density" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_demo_runs_on_cuda(tmp_path, capsys):
    text, _ = _demo(tmp_path, "--device", "cuda", capsys=capsys)
    psnr = _number(_quantsparse_row(text)["PSNR vs dense (dB)"])
    assert "device: cuda" in text and math.isfinite(psnr) and psnr > PSNR_BOUND
