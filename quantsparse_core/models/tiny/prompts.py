"""The tiny model's prompt grammar and its fixed prompt encoder (no downloaded text encoder).

Prompts follow one template, "a {color} {shape} moving {direction} {speed} on a {background}
background", so generated videos can be checked against them (see shapes.analyse). Each word maps
to vectors derived from SHAKE-256 of the word, so the encoding is identical on every machine and
with every version of every library, and a trained model stays valid forever.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields

import numpy as np
import torch

COLORS_RGB = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.8, 0.2),
    "blue": (0.15, 0.3, 0.95),
    "yellow": (0.95, 0.9, 0.1),
    "magenta": (0.9, 0.15, 0.85),
    "cyan": (0.1, 0.85, 0.9),
    "orange": (1.0, 0.55, 0.05),
}
BACKGROUNDS_RGB = {"black": (0.05, 0.05, 0.05), "white": (0.95, 0.95, 0.95), "gray": (0.5, 0.5, 0.5)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
SPEEDS = ("slowly", "quickly")

TEMPLATE = "a {color} {shape} moving {direction} {speed} on a {background} background"
_FIXED_WORDS = ("a", "moving", "on", "background")
VOCABULARY = tuple(sorted(set(COLORS_RGB) | set(SHAPES) | set(DIRECTIONS) | set(SPEEDS)
                          | set(BACKGROUNDS_RGB) | set(_FIXED_WORDS)))

# Allowed values of each Scene field, in field order (also the order random_scenes draws them in).
CHOICES = {"color": tuple(COLORS_RGB), "shape": SHAPES, "direction": DIRECTIONS, "speed": SPEEDS,
           "background": tuple(BACKGROUNDS_RGB)}


@dataclass(frozen=True)
class Scene:
    """One video's content; every field must be a word the grammar allows."""
    color: str
    shape: str
    direction: str
    speed: str
    background: str

    def __post_init__(self):
        """Reject values outside the grammar early, before they reach the renderer as a KeyError."""
        for f in fields(self):
            value = getattr(self, f.name)
            if value not in CHOICES[f.name]:
                raise ValueError(f"{f.name} {value!r} is not one of {list(CHOICES[f.name])}")

    def prompt(self) -> str:
        """The text the model is conditioned on."""
        return TEMPLATE.format(color=self.color, shape=self.shape, direction=self.direction,
                               speed=self.speed, background=self.background)

    @classmethod
    def parse(cls, text: str) -> "Scene":
        """Inverse of prompt(); ValueError for text the grammar does not produce."""
        words = text.lower().split()
        slots = TEMPLATE.split()
        if len(words) != len(slots):
            raise ValueError(f"prompt {text!r} has {len(words)} words; the grammar {TEMPLATE!r} has {len(slots)}")
        values = {}
        for word, slot in zip(words, slots):
            if slot.startswith("{"):
                values[slot[1:-1]] = word
            elif word != slot:
                raise ValueError(f"prompt {text!r} has {word!r} where the grammar {TEMPLATE!r} has {slot!r}")
        try:
            return cls(**values)
        except ValueError as err:
            raise ValueError(f"prompt {text!r}: {err}") from None


def hash_normal(key: str, n: int) -> np.ndarray:
    """n standard-normal float64 values that depend only on `key`.

    SHAKE-256 bytes -> little-endian uint32 -> uniform in (0, 1) (never 0, so the log is finite)
    -> Box-Muller pairs (cos, sin).
    """
    pairs = (n + 1) // 2
    raw = np.frombuffer(hashlib.shake_256(key.encode()).digest(8 * pairs), dtype="<u4").astype(np.float64)
    u = (raw + 0.5) / 2.0 ** 32
    radius = np.sqrt(-2.0 * np.log(u[0::2]))
    angle = 2.0 * np.pi * u[1::2]
    return np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1).reshape(-1)[:n]


def token_vector(word: str, dim: int = 64) -> np.ndarray:
    """A word's context-token vector, rescaled so its entries have std exactly 1 (like a normed embedding)."""
    v = hash_normal("qs-token:" + word, dim)
    return v / v.std()


def pooled_vector(word: str, dim: int = 768) -> np.ndarray:
    """A word's contribution to the pooled prompt vector (standard normal entries)."""
    return hash_normal("qs-pooled:" + word, dim)


class PromptEncoder:
    """Prompts -> (context [B, 24, 64] float32, mask [B, 24] int64 (1 = word), pooled [B, 768] float32).

    Stands in for HunyuanVideo's LLM + CLIP text encoders: the context goes to the token refiner,
    the pooled vector to the vector-in embedding. The empty prompt is all padding with a zero pooled
    vector (the unconditional input).
    """
    MAX_TOKENS = 24
    TOKEN_DIM = 64
    POOLED_DIM = 768

    def __init__(self):
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def word_vectors(self, word: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(token [64], pooled [768]) float32 for one vocabulary word; cached because hashing is per call."""
        if word not in self._cache:
            if word not in VOCABULARY:
                raise ValueError(f"word {word!r} is not in the tiny model's vocabulary; use only: "
                                 + ", ".join(VOCABULARY))
            self._cache[word] = (torch.from_numpy(token_vector(word, self.TOKEN_DIM)).float(),
                                 torch.from_numpy(pooled_vector(word, self.POOLED_DIM)).float())
        return self._cache[word]

    def _words(self, text: str) -> list[str]:
        """Lowercased whitespace split, checked against the token limit."""
        words = text.lower().split()
        if len(words) > self.MAX_TOKENS:
            raise ValueError(f"prompt {text!r} has {len(words)} words; at most {self.MAX_TOKENS} fit")
        return words

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode a batch of prompts (a list, not one string, so a batch of characters is never encoded)."""
        if isinstance(prompts, str):
            raise TypeError("encode() takes a list of prompts, not one string")
        b = len(prompts)
        context = torch.zeros(b, self.MAX_TOKENS, self.TOKEN_DIM)
        mask = torch.zeros(b, self.MAX_TOKENS, dtype=torch.int64)
        pooled = torch.zeros(b, self.POOLED_DIM)
        for i, text in enumerate(prompts):
            words = self._words(text)
            if not words:
                continue
            tokens, pools = zip(*(self.word_vectors(w) for w in words))
            context[i, :len(words)] = torch.stack(tokens)
            mask[i, :len(words)] = 1
            pooled[i] = torch.stack(pools).mean(dim=0)
        return context, mask, pooled

    def encode_wan(self, prompts: list[str], text_dim: int = 4096, device=None) -> torch.Tensor:
        """Wan's conditioning for the tiny Wan model: [B, 24, text_dim], each word's 64-wide token in the
        first channels, zero elsewhere and on padding (ComfyUI pads Wan's umt5 context with zeros too).
        device: where the result is wanted; the zero padding is made there, so only the 64 wide tokens
        cross the bus (at 4096 wide and batch 32 the padding took 7.5 ms of one CPU core, the copy 12.6 MB, per
        training step; the whole GPU step was 51 ms on an H200)."""
        if text_dim < self.TOKEN_DIM:
            raise ValueError(f"text_dim {text_dim} is narrower than the tiny encoder's {self.TOKEN_DIM} channels")
        context, _, _ = self.encode(prompts)
        return torch.nn.functional.pad(context.to(device), (0, text_dim - self.TOKEN_DIM))
