"""The tiny model's prompt grammar and its fixed prompt encoder (no downloaded text encoder).

Every word maps to a vector derived from a hash of the word, so the encoding is the same on every
machine and every version of every library.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

COLORS_RGB = {
    "red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.3, 0.95),
    "yellow": (0.95, 0.9, 0.1), "magenta": (0.9, 0.15, 0.85), "cyan": (0.1, 0.85, 0.9),
    "orange": (1.0, 0.55, 0.05),
}
BACKGROUNDS_RGB = {"black": (0.05, 0.05, 0.05), "white": (0.95, 0.95, 0.95), "gray": (0.5, 0.5, 0.5)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
SPEEDS = ("slowly", "quickly")
_TEMPLATE = "a {color} {shape} moving {direction} {speed} on a {background} background"
VOCABULARY = tuple(sorted(set(COLORS_RGB) | set(BACKGROUNDS_RGB) | set(SHAPES) | set(DIRECTIONS) | set(SPEEDS)
                          | {"a", "moving", "on", "background"}))


@dataclass(frozen=True)
class Scene:
    color: str
    shape: str
    direction: str
    speed: str
    background: str

    def prompt(self) -> str:
        return _TEMPLATE.format(**self.__dict__)

    @classmethod
    def parse(cls, text: str) -> "Scene":
        words = text.lower().split()
        form = "a COLOR SHAPE moving DIRECTION SPEED on a BACKGROUND background"
        if len(words) != 10 or [words[i] for i in (0, 3, 6, 7, 9)] != ["a", "moving", "on", "a", "background"]:
            raise ValueError(f"prompt {text!r} does not follow the grammar {form!r}")
        scene = cls(words[1], words[2], words[4], words[5], words[8])
        for value, allowed in ((scene.color, COLORS_RGB), (scene.shape, SHAPES), (scene.direction, DIRECTIONS),
                               (scene.speed, SPEEDS), (scene.background, BACKGROUNDS_RGB)):
            if value not in allowed:
                raise ValueError(f"{value!r} in prompt {text!r} is not one of {sorted(allowed)}")
        return scene


def _hash_normal(key: str, n: int) -> np.ndarray:
    """n standard-normal floats from SHAKE-256 of `key` (Box-Muller on 32-bit uniforms)."""
    raw = np.frombuffer(hashlib.shake_256(key.encode()).digest(8 * ((n + 1) // 2)), dtype="<u4").astype(np.float64)
    u = (raw + 0.5) / 2.0 ** 32
    u1, u2 = u[0::2], u[1::2]
    r = np.sqrt(-2.0 * np.log(u1))
    return np.stack([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)], axis=1).reshape(-1)[:n]


class PromptEncoder:
    """Prompt -> (context [B, 24, 64], mask [B, 24] (1 = token), pooled [B, 768])."""
    MAX_TOKENS = 24
    TOKEN_DIM = 64
    POOLED_DIM = 768

    def __init__(self):
        self._cache = {}

    def _word(self, word: str):
        if word not in self._cache:
            if word not in VOCABULARY:
                raise ValueError(f"word {word!r} is not in the tiny model's vocabulary; use only: "
                                 + ", ".join(VOCABULARY))
            self._cache[word] = (torch.from_numpy(_hash_normal("qs-token:" + word, self.TOKEN_DIM)).float(),
                                 torch.from_numpy(_hash_normal("qs-pooled:" + word, self.POOLED_DIM)).float())
        return self._cache[word]

    def encode(self, prompts):
        if isinstance(prompts, str):
            raise TypeError("encode() takes a list of prompts")
        b = len(prompts)
        ctx = torch.zeros(b, self.MAX_TOKENS, self.TOKEN_DIM)
        mask = torch.zeros(b, self.MAX_TOKENS, dtype=torch.long)
        pooled = torch.zeros(b, self.POOLED_DIM)
        for i, text in enumerate(prompts):
            words = text.lower().split()
            if len(words) > self.MAX_TOKENS:
                raise ValueError(f"prompt has {len(words)} words; at most {self.MAX_TOKENS} fit")
            for j, w in enumerate(words):
                tok, pool = self._word(w)
                ctx[i, j] = tok
                pooled[i] += pool / len(words)
            mask[i, :len(words)] = 1
        return ctx, mask, pooled
