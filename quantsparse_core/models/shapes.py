"""Procedural training videos (one moving colored shape) and an analyser that reads them back."""
from __future__ import annotations

import torch

from .prompts import BACKGROUNDS_RGB, COLORS_RGB, DIRECTIONS, SHAPES, SPEEDS, Scene

SPEED_PX = {"slowly": 3.0, "quickly": 7.0}
_DIR_VEC = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
SIZE_RANGE = (14.0, 22.0)


def random_scenes(n: int, generator: torch.Generator) -> list:
    """n scenes drawn uniformly from the grammar."""
    pools = (tuple(COLORS_RGB), SHAPES, DIRECTIONS, SPEEDS, tuple(BACKGROUNDS_RGB))
    picks = [torch.randint(len(p), (n,), generator=generator).tolist() for p in pools]
    return [Scene(*(p[i[j]] for p, i in zip(pools, picks))) for j in range(n)]


def _signed_distance(kind, dx, dy, r):
    """Signed distance (px, negative inside) to a circle / square / upward triangle of size r."""
    circle = torch.sqrt(dx * dx + dy * dy) - r
    square = torch.maximum(dx.abs(), dy.abs()) - r
    s5 = 5.0 ** 0.5
    triangle = torch.maximum(dy - r, torch.maximum((2 * dx - dy - r) / s5, (-2 * dx - dy - r) / s5))
    return torch.where(kind == 0, circle, torch.where(kind == 1, square, triangle))


def render(scenes, frames: int = 8, size: int = 128, generator: torch.Generator | None = None,
           device="cpu") -> torch.Tensor:
    """[B, 3, frames, size, size] in [0, 1]; each shape stays fully inside the frame throughout."""
    dev = torch.device(device)
    n = len(scenes)
    rand = lambda: torch.rand(n, generator=generator, device=dev)  # noqa: E731
    f32 = dict(device=dev, dtype=torch.float32)
    r = SIZE_RANGE[0] + (SIZE_RANGE[1] - SIZE_RANGE[0]) * rand()
    vel = torch.tensor([_DIR_VEC[s.direction] for s in scenes], **f32) * \
        torch.tensor([SPEED_PX[s.speed] for s in scenes], **f32)[:, None]
    travel = vel * (frames - 1)
    lo = r[:, None] + 1 - torch.clamp(travel, max=0)          # keep start + travel inside [r+1, size-r-1]
    hi = size - r[:, None] - 1 - torch.clamp(travel, min=0)
    start = lo + (hi - lo) * torch.stack([rand(), rand()], dim=1)
    kind = torch.tensor([SHAPES.index(s.shape) for s in scenes], device=dev)
    color = torch.tensor([COLORS_RGB[s.color] for s in scenes], **f32)
    bg = torch.tensor([BACKGROUNDS_RGB[s.background] for s in scenes], **f32)

    t = torch.arange(frames, **f32)
    centre = start[:, None, :] + t[None, :, None] * vel[:, None, :]            # [B, F, 2]
    coords = torch.arange(size, **f32) + 0.5
    dx = coords[None, None, None, :] - centre[..., 0, None, None]              # [B, F, 1, W]
    dy = coords[None, None, :, None] - centre[..., 1, None, None]              # [B, F, H, 1]
    sd = _signed_distance(kind.view(-1, 1, 1, 1), dx, dy, r.view(-1, 1, 1, 1))
    alpha = (0.5 - sd).clamp(0, 1)                                              # 1-px anti-aliased edge
    video = bg.view(n, 3, 1, 1, 1) + alpha[:, None] * (color - bg).view(n, 3, 1, 1, 1)
    return video


def _nearest(rgb: torch.Tensor, table: dict) -> str:
    names = list(table)
    ref = torch.tensor([table[k] for k in names], dtype=rgb.dtype, device=rgb.device)
    return names[int(((ref - rgb) ** 2).sum(-1).argmin())]


def analyse(video: torch.Tensor, threshold: float = 0.25) -> dict:
    """Read background, dominant shape color and motion direction off a [3, F, H, W] video."""
    v = video.detach().float().cpu().clamp(0, 1)
    first = v[:, 0]
    border = torch.cat([first[:, 0], first[:, -1], first[:, :, 0], first[:, :, -1]], dim=1)
    bg_rgb = border.median(dim=1).values
    dist = (v - bg_rgb.view(3, 1, 1, 1)).norm(dim=0)                             # [F, H, W]
    fg = dist > threshold
    result = {"background": _nearest(bg_rgb, BACKGROUNDS_RGB), "color": "none", "direction": "none"}
    if fg.sum() == 0:
        return result
    # The shape's core (farthest from the background) carries its color; soft edges mix in background.
    core = dist >= dist[fg].median()
    result["color"] = _nearest(v[:, core].mean(dim=1), COLORS_RGB)
    present = [f for f in range(v.shape[1]) if fg[f].any()]
    if len(present) < 2:
        return result
    ys, xs = torch.meshgrid(torch.arange(v.shape[2]), torch.arange(v.shape[3]), indexing="ij")

    def centroid(f):
        m = fg[f].float()
        return (xs * m).sum() / m.sum(), (ys * m).sum() / m.sum()

    (x0, y0), (x1, y1) = centroid(present[0]), centroid(present[-1])
    ddx, ddy = float(x1 - x0), float(y1 - y0)
    if max(abs(ddx), abs(ddy)) >= 2:
        result["direction"] = ("right" if ddx > 0 else "left") if abs(ddx) >= abs(ddy) else \
            ("down" if ddy > 0 else "up")
    return result


def agrees(video: torch.Tensor, scene: Scene) -> bool:
    """Color and motion direction of the video match the scene."""
    found = analyse(video)
    return found["color"] == scene.color and found["direction"] == scene.direction
