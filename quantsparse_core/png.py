"""Minimal PNG and animated-PNG writer (zlib only), so results can be viewed with no imaging library."""
from __future__ import annotations

import os
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _rows(img: np.ndarray) -> bytes:
    """Filter type 0 per scanline."""
    h = img.shape[0]
    return b"".join(b"\x00" + img[y].tobytes() for y in range(h))


def to_uint8(frames) -> np.ndarray:
    """[F, H, W, 3] floats in [0, 1] (numpy or torch) -> uint8."""
    arr = frames.detach().cpu().numpy() if hasattr(frames, "detach") else np.asarray(frames)
    return (np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8)


def _atomic_write(path, data: bytes):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_png(path, image: np.ndarray) -> None:
    """image: uint8 [H, W, 3]."""
    h, w, _ = image.shape
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(_rows(image), 9)) \
        + _chunk(b"IEND", b"")
    _atomic_write(path, data)


def write_apng(path, frames: np.ndarray, fps: int = 6) -> None:
    """frames: uint8 [F, H, W, 3] -> looping animated PNG (shown as a still first frame by old viewers)."""
    n, h, w, _ = frames.shape
    out = [b"\x89PNG\r\n\x1a\n", _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)),
           _chunk(b"acTL", struct.pack(">II", n, 0))]
    seq = 0
    for i in range(n):
        out.append(_chunk(b"fcTL", struct.pack(">IIIIIHHBB", seq, w, h, 0, 0, 1, fps, 0, 0)))
        seq += 1
        data = zlib.compress(_rows(frames[i]), 9)
        if i == 0:
            out.append(_chunk(b"IDAT", data))
        else:
            out.append(_chunk(b"fdAT", struct.pack(">I", seq) + data))
            seq += 1
    out.append(_chunk(b"IEND", b""))
    _atomic_write(path, b"".join(out))


def strip(frames: np.ndarray, gap: int = 2) -> np.ndarray:
    """Frames side by side with a white gap: [F, H, W, 3] -> [H, F*W + (F-1)*gap, 3]."""
    n, h, w, c = frames.shape
    out = np.full((h, n * w + (n - 1) * gap, c), 255, dtype=np.uint8)
    for i in range(n):
        out[:, i * (w + gap): i * (w + gap) + w] = frames[i]
    return out
