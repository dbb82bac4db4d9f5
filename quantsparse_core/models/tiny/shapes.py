"""Procedural training videos (one moving colored shape) and an analyser that reads them back.

render() makes the tiny model's training data on the training device; analyse() / agrees() judge
whether a generated video shows what its prompt asked for (color and motion direction).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .prompts import BACKGROUNDS_RGB, CHOICES, COLORS_RGB, SHAPES, Scene

SPEED_PX = {"slowly": 3.0, "quickly": 7.0}                # pixels per frame
DIRECTION_XY = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}  # row 0 = top
SIZE_RANGE = (14.0, 22.0)                                  # circle radius / square half-side / triangle half-size
# px between the shape's box and the frame edge. 2, not 1: the triangle's distance is a lower bound
# outside its base corners, which at 1 px let its anti-aliased edge reach the border pixels (up to
# 19% coverage); at 2 px the bound is > 0.5 px there, so no edge reaches the border.
_MARGIN = 2.0


def random_scenes(n: int, generator: torch.Generator) -> list[Scene]:
    """n scenes drawn uniformly and independently from the grammar."""
    picks = {name: torch.randint(len(options), (n,), generator=generator).tolist()
             for name, options in CHOICES.items()}
    return [Scene(**{name: CHOICES[name][picks[name][i]] for name in CHOICES}) for i in range(n)]


def _check_fits(scenes, frames: int, size: int) -> None:
    """The largest shape plus its travel must fit in the frame, else no start position keeps it inside."""
    for speed in {s.speed for s in scenes}:
        need = SPEED_PX[speed] * (frames - 1) + 2 * (SIZE_RANGE[1] + _MARGIN)
        if need > size:
            raise ValueError(f"a shape moving {speed} for {frames} frames needs {need:.0f} px; size is {size}")


def signed_distance(kind: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Signed distance (px, negative inside) from offset (dx, dy) to a shape of size r.

    kind 0: circle of radius r; 1: square of half-side r; 2: upward triangle with apex (0, -r) and
    base corners (+-r, r) (exact along edges, a lower bound near corners, which is enough for a 1-px edge).
    """
    circle = torch.sqrt(dx * dx + dy * dy) - r
    square = torch.maximum(dx.abs(), dy.abs()) - r
    edge = 5.0 ** -0.5                                     # the slanted edges have normals (+-2, -1) / sqrt(5)
    triangle = torch.maximum(dy - r, (2 * dx.abs() - dy - r) * edge)
    return torch.where(kind == 0, circle, torch.where(kind == 1, square, triangle))


def _motion(scenes, device) -> torch.Tensor:
    """Per-scene velocity [B, 2] (x, y) in px per frame."""
    return torch.tensor([[v * SPEED_PX[s.speed] for v in DIRECTION_XY[s.direction]] for s in scenes],
                        dtype=torch.float32, device=device)


def _start(r: torch.Tensor, travel: torch.Tensor, size: int, u: torch.Tensor) -> torch.Tensor:
    """Start centres [B, 2] uniform (by u in [0, 1)) over the positions that keep the shape inside for all frames."""
    lo = r[:, None] + _MARGIN - travel.clamp(max=0)
    hi = size - r[:, None] - _MARGIN - travel.clamp(min=0)
    return lo + (hi - lo) * u


def render(scenes: list[Scene], frames: int = 8, size: int = 128, generator: torch.Generator | None = None,
           device="cpu") -> torch.Tensor:
    """[B, 3, frames, size, size] float32 in [0, 1]: each scene's shape moving over its background.

    Shape size and start position are random (from generator, which must live on device); the shape
    stays fully inside the frame in every frame. Edges are anti-aliased over 1 px.
    """
    _check_fits(scenes, frames, size)
    dev = torch.device(device)
    n = len(scenes)
    f32 = dict(dtype=torch.float32, device=dev)
    r = SIZE_RANGE[0] + (SIZE_RANGE[1] - SIZE_RANGE[0]) * torch.rand(n, generator=generator, **f32)
    velocity = _motion(scenes, dev)
    start = _start(r, velocity * (frames - 1), size, torch.rand(n, 2, generator=generator, **f32))
    centre = start[:, None] + torch.arange(frames, **f32)[None, :, None] * velocity[:, None]  # [B, F, 2]

    pixel = torch.arange(size, **f32) + 0.5                                          # pixel centres
    dx = pixel.view(1, 1, 1, size) - centre[..., 0, None, None]                      # [B, F, 1, W]
    dy = pixel.view(1, 1, size, 1) - centre[..., 1, None, None]                      # [B, F, H, 1]
    kind = torch.tensor([SHAPES.index(s.shape) for s in scenes], device=dev).view(n, 1, 1, 1)
    alpha = (0.5 - signed_distance(kind, dx, dy, r.view(n, 1, 1, 1))).clamp(0, 1)   # [B, F, H, W]

    color = torch.tensor([COLORS_RGB[s.color] for s in scenes], **f32).view(n, 3, 1, 1, 1)
    background = torch.tensor([BACKGROUNDS_RGB[s.background] for s in scenes], **f32).view(n, 3, 1, 1, 1)
    return background + alpha[:, None] * (color - background)


def _nearest(rgb: torch.Tensor, table: dict) -> str:
    """Name of the table color closest (Euclidean RGB) to rgb."""
    names = list(table)
    ref = torch.tensor([table[k] for k in names], dtype=rgb.dtype)
    return names[int(((ref - rgb) ** 2).sum(-1).argmin())]


def _denoise(video: torch.Tensor) -> torch.Tensor:
    """3x3 box blur per frame: generated videos carry pixel noise that would otherwise count as foreground."""
    frames_first = video.transpose(0, 1)                                               # [F, 3, H, W]
    blurred = F.avg_pool2d(frames_first, 3, stride=1, padding=1, count_include_pad=False)
    return blurred.transpose(0, 1)


def _background(video: torch.Tensor) -> torch.Tensor:
    """Median RGB of frame 0's border pixels (the shape never covers most of the border)."""
    first = video[:, 0]
    border = torch.cat([first[:, 0], first[:, -1], first[:, 1:-1, 0], first[:, 1:-1, -1]], dim=1)
    return border.median(dim=1).values


def _direction(fg: torch.Tensor, min_px: float = 2.0) -> str:
    """Direction of the larger axis of the foreground centroid's move from the first to the last frame that has one."""
    present = [f for f in range(fg.shape[0]) if fg[f].any()]
    if len(present) < 2:
        return "none"
    ys, xs = torch.meshgrid(torch.arange(fg.shape[1], dtype=torch.float32),
                            torch.arange(fg.shape[2], dtype=torch.float32), indexing="ij")

    def centroid(f):
        m = fg[f].float()
        return float((xs * m).sum() / m.sum()), float((ys * m).sum() / m.sum())

    (x0, y0), (x1, y1) = centroid(present[0]), centroid(present[-1])
    ddx, ddy = x1 - x0, y1 - y0
    if max(abs(ddx), abs(ddy)) < min_px:
        return "none"
    if abs(ddx) >= abs(ddy):
        return "right" if ddx > 0 else "left"
    return "down" if ddy > 0 else "up"


def analyse(video: torch.Tensor, threshold: float = 0.25) -> dict:
    """Read background, shape color and motion direction off one video [3, F, H, W] in [0, 1].

    Foreground = pixels farther than threshold (RGB distance) from the background. The color is the
    nearest named color to the mean of the foreground's stronger half (pixels at least as far from the
    background as the median foreground pixel), so anti-aliased or blurred edges, which mix in the
    background, do not pull it toward the background. "none" where there is no foreground / no motion.
    """
    v = _denoise(video.detach().float().cpu().clamp(0, 1))
    bg = _background(v)
    dist = (v - bg.view(3, 1, 1, 1)).norm(dim=0)                                     # [F, H, W]
    fg = dist > threshold
    result = {"background": _nearest(bg, BACKGROUNDS_RGB), "color": "none", "direction": "none"}
    if not fg.any():
        return result
    core = fg & (dist >= dist[fg].median())
    result["color"] = _nearest(v[:, core].mean(dim=1), COLORS_RGB)
    result["direction"] = _direction(fg)
    return result


def agrees(video: torch.Tensor, scene: Scene) -> bool:
    """True when the video's analysed color and motion direction are the scene's."""
    found = analyse(video)
    return found["color"] == scene.color and found["direction"] == scene.direction
