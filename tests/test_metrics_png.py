"""Metrics against direct float64 computations; the PNG writer round-trips pixels."""
import math
import struct
import zlib

import numpy as np
import torch

from quantsparse_core.metrics import _gaussian_window, psnr, relative_error, ssim
from quantsparse_core.png import strip, to_uint8, write_apng, write_png


def test_psnr_matches_formula(rng):
    a = torch.rand(2, 3, 4, 16, 16, generator=rng)
    b = (a + 0.05 * torch.randn(a.shape, generator=rng)).clamp(0, 1)
    mse = ((a.double() - b.double()) ** 2).mean().item()
    assert abs(psnr(a, b) - 10 * math.log10(1 / mse)) < 1e-9
    assert psnr(a, a) == float("inf")


def test_ssim_equals_direct_windowed_statistics(rng):
    a = torch.rand(1, 3, 2, 20, 24, generator=rng, dtype=torch.float64)
    b = (a + 0.1 * torch.randn(a.shape, generator=rng, dtype=torch.float64)).clamp(0, 1)
    win = _gaussian_window()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    vals = []
    for c in range(3):
        for f in range(2):
            for y in range(20 - 10):
                for x in range(24 - 10):
                    pa, pb = a[0, c, f, y:y + 11, x:x + 11], b[0, c, f, y:y + 11, x:x + 11]
                    ma, mb = (win * pa).sum(), (win * pb).sum()
                    va, vb = (win * (pa - ma) ** 2).sum(), (win * (pb - mb) ** 2).sum()
                    cov = (win * (pa - ma) * (pb - mb)).sum()
                    vals.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    assert abs(ssim(a, b) - torch.stack(vals).mean().item()) < 1e-9
    assert abs(ssim(a, a) - 1.0) < 1e-12


def test_relative_error(rng):
    ref = torch.randn(50, generator=rng)
    noise = torch.randn(50, generator=rng)
    assert abs(relative_error(ref + 0.1 * noise, ref) - 0.1 * noise.norm().item() / ref.norm().item()) < 1e-6


def _read_png_frames(data: bytes):
    """Decode our 8-bit RGB, filter-0 PNG/APNG: returns a list of [H, W, 3] arrays."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, w, h, frames = 8, 0, 0, []
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        assert zlib.crc32(kind + body) & 0xFFFFFFFF == struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0]
        if kind == b"IHDR":
            w, h = struct.unpack(">II", body[:8])
        elif kind in (b"IDAT", b"fdAT"):
            raw = zlib.decompress(body if kind == b"IDAT" else body[4:])
            rows = np.frombuffer(raw, np.uint8).reshape(h, 1 + 3 * w)
            assert (rows[:, 0] == 0).all()
            frames.append(rows[:, 1:].reshape(h, w, 3))
        pos += 12 + n
    return frames


def test_png_and_apng_round_trip(rng, tmp_path):
    video = torch.rand(3, 10, 12, 3, generator=rng)
    frames = to_uint8(video)
    write_png(tmp_path / "s.png", strip(frames))
    (img,) = _read_png_frames((tmp_path / "s.png").read_bytes())
    assert np.array_equal(img[:, :12], frames[0]) and np.array_equal(img[:, 14:26], frames[1])
    write_apng(tmp_path / "a.png", frames)
    decoded = _read_png_frames((tmp_path / "a.png").read_bytes())
    assert len(decoded) == 3 and all(np.array_equal(d, f) for d, f in zip(decoded, frames))
