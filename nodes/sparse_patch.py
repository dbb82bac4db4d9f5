"""Sparse attention + SSAR inside ComfyUI, through its supported hooks only.

Models: HunyuanVideo 1.0 T2V/I2V and 1.5 T2V/I2V (joint [text, video] attention in double/single blocks; 1.5's
vision and byT5 tokens sit in the text part, always attended) and ComfyUI's
plain Wan transformer (WanModel: Wan 2.1 T2V/I2V, Wan 2.2 A14B experts and TI2V-5B), whose self-attention
covers the video tokens only while text and CLIP image tokens enter through cross-attention.

On a clone of the ModelPatcher:
- `optimized_attention_override` (chained to any override already there) routes the double/single
  blocks' attention (Wan: each block's self-attention, see wan_self_attention_grid) to quantsparse_core's
  SSARAttention; the token refiner, Wan's cross-attention and calls outside a sampling run fall through
  unchanged;
- a DIFFUSION_MODEL wrapper records the video token grid of each model call and stops the run with a
  ValueError naming the step when the model's output is not finite. A reference latent (`ref_latent`,
  ComfyUI's HunyuanImageToVideo "custom" guidance) is patchified and put before the video tokens, so
  the joint sequence is [text, reference frames, video frames]: its tokens are video tokens for the
  masks, leading frames of the grid, never text. Wan: a time_dim_concat latent (Phantom's subject
  images) adds frames after the video's, as ComfyUI's RoPE places them; the grid must equal the one the
  model reports (transformer_options["grid_sizes"]);
- a second DIFFUSION_MODEL wrapper (`text_mask_wrapper`, also on the embedded tiny model's MODEL) makes
  padded text masks work at any batch: ComfyUI's HunyuanVideo builds its joint mask as [1, 1, L], so
  cond + uncond (cfg > 1) or a batch-2 latent with a [B, L] mask failed inside ComfyUI with "The expanded
  size of the tensor (1) must match the existing size (2)"; the wrapper runs each distinct mask's batch
  entries as one call, and makes the mask finite so a fully padded prompt (the empty prompt) cannot
  produce NaN;
- an OUTER_SAMPLE wrapper gives every sampling run fresh state (masks, caches), so nothing leaks
  between runs or into other users of the same MODEL, logs what the run cost, and drops the run's
  state in `finally` (an interrupt or error must not leave caches referenced by its traceback).
The original ModelPatcher and its model are never modified.
"""
from __future__ import annotations

import inspect
import logging
import math
from dataclasses import asdict, replace
from typing import Dict, Optional

import torch

from quantsparse_core.models.attention import AttentionCall, StepInfo
from quantsparse_core.models.hunyuan_video import additive_text_mask
from quantsparse_core.sparse.ssar import SparseSettings, SSARAttention

from .model_family import FUSED, SPARSE, WAN, require_supported

KEY = "quantsparse_sparse"
MASK_KEY = "quantsparse_text_mask"  # wrapper key of text_mask_wrapper
PART = "quantsparse_part"           # transformer_options: the batch entries of a split call
log = logging.getLogger("quantsparse")


class SparseRun:
    """One sampling run's state: an SSARAttention per group of conds (cond and uncond may come in
    separate calls of the same batch size, so they must not share caches)."""

    def __init__(self, settings: SparseSettings, patch_size, wan: bool = False):
        self.settings = settings
        self.patch_size = tuple(int(p) for p in patch_size)
        self.wan = wan  # ComfyUI's WanModel: video-only self-attention among cross-attention calls
        self.latent_shape: Optional[tuple] = None
        self.ref_shape: Optional[tuple] = None  # of the current model call's reference latent, if any
        self.concat_frames = 0  # Wan: patch frames of the call's time_dim_concat (Phantom's subject images)
        self.step: Optional[StepInfo] = None  # of the current model call; None outside the run's schedule
        self.by_group: Dict[tuple, SSARAttention] = {}
        self.call_marker: Optional[object] = None  # a new object per model call (Wan without grid_sizes)
        self.wan_marker: Optional[object] = None   # the model call whose Wan blocks wan_seen lists
        self.wan_seen: set = set()                 # block indices whose self-attention that call has run
        self.scheduled_calls = 0  # model calls on the run's schedule: each should reach SSARAttention

    def fresh(self) -> "SparseRun":
        return SparseRun(self.settings, self.patch_size, self.wan)

    def close(self) -> None:
        """Drop every mask, cache and pending host job of this run (the end of a run, also on errors)."""
        for a in self.by_group.values():
            a.reset()
        self.by_group.clear()
        self.latent_shape = None
        self.ref_shape = None
        self.concat_frames = 0
        self.step = None
        self.call_marker = self.wan_marker = None
        self.wan_seen = set()

    def grid(self) -> tuple:
        """(frames, rows, columns) of the video tokens: the reference latent's frames, then the latent's
        (Wan: the latent's, then time_dim_concat's). ComfyUI pads every latent to whole patches (PatchEmbed,
        WanModel's pad_to_patch_size), hence the ceilings."""
        t, h, w = (-(-n // p) for n, p in zip(self.latent_shape[-3:], self.patch_size))
        if self.ref_shape is None:
            return t + self.concat_frames, h, w
        rt, rh, rw = (-(-n // p) for n, p in zip(self.ref_shape[-3:], self.patch_size))
        if (rh, rw) != (h, w):
            raise ValueError(f"the reference latent ({tuple(self.ref_shape)}) has a {rh} x {rw} token grid and the "
                             f"latent ({tuple(self.latent_shape)}) {h} x {w}: QuantSparse sparse attention needs the "
                             "reference image at the video's size (HunyuanImageToVideo resizes it so)")
        return rt + t, h, w

    def attention_for(self, group: tuple) -> SSARAttention:
        if group not in self.by_group:
            self.by_group[group] = SSARAttention(replace(self.settings))
        return self.by_group[group]

    def summary(self) -> str:
        stats = [a.stats for a in self.by_group.values()]
        dense = sum(s["dense"] for s in stats)
        sparse = sum(s["sparse"] for s in stats)
        cost = sum(s["sparse_density"] for s in stats)
        total = dense + sparse
        eff = (dense + cost) / total if total else 1.0
        host = sum(s["host_dense"] for s in stats)
        return (f"{int(dense)} dense and {int(sparse)} sparse attention calls; effective attention cost "
                f"{eff:.2f} of dense (density {self.settings.density:.2f}, refresh every {self.settings.tau})"
                + (f"; {int(host)} dense passes on ComfyUI's attention" if host else ""))


def step_index(sigma: torch.Tensor, sample_sigmas: torch.Tensor) -> Optional[int]:
    """Index of the current sigma in the run's schedule, or None if it is not in it."""
    s = float(sigma.flatten()[0])
    sched = sample_sigmas.detach().float().cpu().flatten()  # a no-op when already on the CPU
    i = int(torch.argmin((sched - s).abs()))
    return i if math.isclose(float(sched[i]), s, rel_tol=1e-4, abs_tol=1e-6) else None


def _fall_through(previous, func, args, kwargs):
    return previous(func, *args, **kwargs) if previous is not None else func(*args, **kwargs)


def _comfy_dense(run: SparseRun, previous, func, heads: int, kwargs):
    """This call's attention as ComfyUI is set to run it (the override before ours, else ComfyUI's
    optimized_attention: comfy kitchen INT8 with --use-ck-attention), as (q, k, v [B, H, L, D], mask) ->
    [B, L, H*D]: what SparseSettings.host_attention runs the dense passes with; None when the run does not."""
    if not run.settings.host_attention:
        return None

    def dense(q, k, v, mask):
        kw = dict(kwargs, mask=mask, skip_reshape=True, skip_output_reshape=False)
        kw.pop("heads", None)
        return _fall_through(previous, func, (q, k, v, heads), kw)
    return dense


def make_override(previous=None):
    """An optimized_attention_override that applies the run's SSARAttention, else defers."""

    def quantsparse_attention(func, *args, **kwargs):
        to = kwargs.get("transformer_options") or {}
        run: Optional[SparseRun] = to.get(KEY)
        block_type = to.get("block_type")
        if run is None or run.latent_shape is None or run.step is None or block_type not in ("double", "single"):
            return _fall_through(previous, func, args, kwargs)
        if run.wan:
            return _wan_attention(run, to, previous, func, args, kwargs)
        if not kwargs.get("skip_reshape", False):
            return _fall_through(previous, func, args, kwargs)
        q, k, v = args[0], args[1], args[2]
        grid = run.grid()
        txt_len = q.shape[2] - grid[0] * grid[1] * grid[2]
        if txt_len < 0:
            raise ValueError(f"attention sequence of {q.shape[2]} tokens is shorter than the latent's video grid "
                             f"{grid}: this model's token layout is not HunyuanVideo's [text, video]")
        call = AttentionCall(block_type, int(to.get("block_index", 0)), int(to.get("total_blocks", 1)),
                             txt_len, grid, run.step, dense=_comfy_dense(run, previous, func, q.shape[1], kwargs))
        out = run.attention_for(_group(to))(q, k, v, kwargs.get("mask"), call)
        if kwargs.get("skip_output_reshape", False):
            b, length, _ = out.shape
            out = out.view(b, length, q.shape[1], -1).transpose(1, 2)
        return out

    quantsparse_attention.quantsparse_previous = previous
    return quantsparse_attention


def _group(to: dict) -> tuple:
    return tuple(int(c) for c in to.get("cond_or_uncond", ())), to.get(PART)


def wan_self_attention_grid(run: SparseRun, to: dict, q: torch.Tensor, k: torch.Tensor) -> Optional[tuple]:
    """The video token grid when this attention call is a Wan block's self-attention, None when it is one of
    the block's cross-attentions (text; on Wan 2.1 I2V also the CLIP image tokens).

    Rule: within one model call, the first attention call at a block_index is that block's self-attention
    (WanAttentionBlock runs self-attention, then its cross-attention calls). Shapes cannot tell them apart: a
    prompt of as many tokens as the video has looks like self-attention. A model call is known by the
    torch.Size that WanModel.forward_orig stores in transformer_options["grid_sizes"] (a new object per call,
    held here so its identity is not reused; a split batch or a separate cond/uncond call starts over), else
    by the diffusion wrapper's marker of the call. A self-attention whose sequence is not exactly the grid's
    tokens (in-context reference latents, a Wan-based model's extra tokens) is refused: masks built for the
    grid would be wrong for it."""
    sizes = to.get("grid_sizes")
    marker = sizes if sizes is not None else run.call_marker
    if marker is not run.wan_marker:
        run.wan_marker, run.wan_seen = marker, set()
    index = int(to.get("block_index", 0))
    if index in run.wan_seen:
        return None
    run.wan_seen.add(index)
    grid = run.grid()
    if sizes is not None and tuple(int(n) for n in sizes) != grid:
        raise ValueError(f"QuantSparse sparse attention: the Wan model patchified its input to a {tuple(sizes)} "
                         f"token grid, but the latent {run.latent_shape} gives {grid}; this Wan input layout is not "
                         "supported (run this sampler without the QuantSparse sparse node)")
    n = grid[0] * grid[1] * grid[2]
    if q.shape[1] != n or k.shape[1] != n:
        raise ValueError(f"QuantSparse sparse attention: Wan block {index}'s self-attention has {q.shape[1]} query "
                         f"and {k.shape[1]} key tokens, but the video grid {grid} has {n}: the model adds tokens to "
                         "its self-attention (in-context reference latents such as context_latents, or a Wan-based "
                         "model's extra tokens), which the sparse masks do not cover. Remove that conditioning or "
                         "sample without the QuantSparse sparse node")
    return grid


def _wan_attention(run: SparseRun, to: dict, previous, func, args, kwargs):
    """A Wan attention call: self-attention ([B, L, H*D] q/k/v) through SSAR with no text tokens; anything
    else (cross-attention, already split heads) to the previous override or ComfyUI's attention."""
    q, k, v = args[0], args[1], args[2]
    if kwargs.get("skip_reshape", False) or q.ndim != 3:
        return _fall_through(previous, func, args, kwargs)
    grid = wan_self_attention_grid(run, to, q, k)
    if grid is None:
        return _fall_through(previous, func, args, kwargs)
    heads = kwargs.get("heads", args[3] if len(args) > 3 else None)
    b, length, width = q.shape
    if not isinstance(heads, int) or heads < 1 or width % heads:
        raise ValueError(f"Wan self-attention called with heads={heads!r} for a width of {width}: cannot split heads")
    qh, kh, vh = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
    call = AttentionCall(to["block_type"], int(to.get("block_index", 0)), int(to.get("total_blocks", 1)), 0,
                         grid, run.step, dense=_comfy_dense(run, previous, func, heads, kwargs))
    out = run.attention_for(_group(to))(qh, kh, vh, kwargs.get("mask"), call)  # [B, L, H*D]
    if kwargs.get("skip_output_reshape", False):
        out = out.view(b, length, heads, -1).transpose(1, 2)
    return out


def _transformer_options(args, kwargs) -> dict:
    to = kwargs.get("transformer_options")
    if isinstance(to, dict):
        return to
    for a in reversed(args):
        if isinstance(a, dict):
            return a
    return {}


def _argument(executor, args, kwargs, name: str):
    """The forward argument `name` of a wrapped diffusion-model call, passed by position or keyword."""
    if name in kwargs:
        return kwargs[name]
    try:
        return inspect.signature(executor.original).bind_partial(*args, **kwargs).arguments.get(name)
    except (TypeError, ValueError):
        return None


def diffusion_model_wrapper(executor, *args, **kwargs):
    """Once per model call: the latent's token grid and the step (one host sync here, none per attention)."""
    to = _transformer_options(args, kwargs)
    run = to.get(KEY)
    if run is not None and torch.is_tensor(args[0]):
        x = args[0]
        if x.ndim != 5:
            raise ValueError(f"QuantSparse sparse attention needs a video latent [B, C, T, H, W], got {tuple(x.shape)}")
        ref = _argument(executor, args, kwargs, "ref_latent")
        run.latent_shape = tuple(x.shape)
        run.ref_shape = tuple(ref.shape) if torch.is_tensor(ref) else None
        run.concat_frames = 0
        if run.wan:
            # Phantom (WanPhantomSubjectToVideo): subject-image latents concatenated after the video frames,
            # each padded to whole patches; ComfyUI's RoPE places them as further frames of the grid.
            extra = _argument(executor, args, kwargs, "time_dim_concat")
            if torch.is_tensor(extra):
                run.concat_frames = -(-extra.shape[2] // run.patch_size[0])
        run.grid()  # a reference latent that does not fit the grid is refused before the model runs
        run.call_marker = object()
        run.step = None
        sample, sigma = to.get("sample_sigmas"), to.get("sigmas")
        if sample is not None and sigma is not None:
            sample = sample.detach().float().cpu()
            idx = step_index(sigma, sample)
            run.step = None if idx is None else StepInfo(idx, sample)
            run.scheduled_calls += run.step is not None
    out = executor(*args, **kwargs)
    if run is not None:
        check_finite(out, args[0] if args else None, to)
    return out


def _step_text(to: dict) -> str:
    sample, sigma = to.get("sample_sigmas"), to.get("sigmas")
    if sample is None or sigma is None:
        return "a model call outside a sampler's schedule"
    sample = sample.detach().float().cpu()
    idx = step_index(sigma, sample)
    s = float(sigma.flatten()[0])
    return f"sigma {s:.4g}" if idx is None else f"step {idx + 1} of {len(sample) - 1} (sigma {s:.4g})"


def check_finite(out, x, to: dict) -> None:
    """Raise a ValueError naming the step and what to check when the model output has NaN/inf
    (one host sync per model call, not per attention)."""
    if not torch.is_tensor(out) or bool(torch.isfinite(out).all()):
        return
    bad = int((~torch.isfinite(out)).sum())
    who = {0: "cond", 1: "uncond"}
    conds = "/".join(who.get(int(c), str(c)) for c in to.get("cond_or_uncond", ())) or "?"
    where = (f"the diffusion model's output at {_step_text(to)} for {conds} (batch {out.shape[0]}) has {bad} "
             f"NaN/inf of {out.numel()} values")
    if torch.is_tensor(x) and not bool(torch.isfinite(x).all()):
        raise ValueError(f"QuantSparse: {where}, and its input latent already had NaN/inf: check the LATENT "
                         "fed to the sampler (a previous sampler or node produced it) and the sampler settings")
    raise ValueError(f"QuantSparse: {where}, stopped instead of decoding a NaN video. Check the conditioning "
                     "(NaN/inf in the pooled output or text embedding, or a text encoder for another model), "
                     "an fp16 overflow (load the model in bf16 or fp32), and the checkpoint (a damaged or "
                     "mis-calibrated file); if the same prompt is finite without the QuantSparse sparse nodes, "
                     "report it with the sparse settings")


# ---- text masks of any batch ---------------------------------------------------------------------------------
def _take(value, idx: torch.Tensor, batch: int):
    """The batch entries `idx` of a forward argument (tensors with a leading batch dimension; nested in
    dicts/lists such as ControlNet outputs); anything else (broadcast or not per batch) as it is."""
    if torch.is_tensor(value):
        return value.index_select(0, idx.to(value.device)) if value.ndim and value.shape[0] == batch else value
    if isinstance(value, dict):
        return {k: _take(v, idx, batch) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_take(v, idx, batch) for v in value)
    return value


def _part_options(to: dict, entries: list, batch: int) -> dict:
    """transformer_options of a call over batch entries `entries`: cond_or_uncond and uuids cut to them."""
    part = dict(to)
    part[PART] = tuple(entries)
    labels = to.get("cond_or_uncond")
    if labels and batch % len(labels) == 0:
        chunk = batch // len(labels)
        chunks = sorted({e // chunk for e in entries})
        whole = len(entries) == len(chunks) * chunk
        pick = chunks if whole else [e // chunk for e in entries]
        part["cond_or_uncond"] = [labels[c] for c in pick]
        uuids = to.get("uuids")
        if isinstance(uuids, (list, tuple)) and len(uuids) == len(labels):
            part["uuids"] = [uuids[c] for c in pick]
    return part


def text_mask_wrapper(executor, *args, **kwargs):
    """DIFFUSION_MODEL wrapper: a [B, L] text mask becomes one finite [1, L] mask per call, the batch
    entries that share a mask running together (one call when all do, e.g. a batch-2 latent at cfg 1)."""
    try:
        bound = inspect.signature(executor.original).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return executor(*args, **kwargs)
    a = bound.arguments
    mask, x = a.get("attention_mask"), a.get("x")
    to = a.get("transformer_options") if isinstance(a.get("transformer_options"), dict) else {}
    if not torch.is_tensor(mask) or not torch.is_tensor(x) or mask.ndim != 2:
        out = executor(*args, **kwargs)
    else:
        batch = x.shape[0]
        mask = additive_text_mask(mask, x.dtype)
        if mask.shape[0] not in (1, batch):
            raise ValueError(f"text attention mask of batch {mask.shape[0]} for a latent batch of {batch}: the "
                             "conditioning's attention_mask must have one row per conditioning entry")
        rows, inverse = torch.unique(mask, dim=0, return_inverse=True)
        if rows.shape[0] == 1:
            a["attention_mask"] = rows
            out = executor(*bound.args, **bound.kwargs)
        else:
            out = None
            for r in range(rows.shape[0]):
                idx = torch.nonzero(inverse == r).flatten()
                entries = idx.tolist()
                part = {k: (v if k == "transformer_options" else _take(v, idx, batch)) for k, v in a.items()}
                part["attention_mask"] = rows[r:r + 1]
                if "transformer_options" in part:
                    part["transformer_options"] = _part_options(to, entries, batch)
                call = inspect.BoundArguments(bound.signature, part)
                y = executor(*call.args, **call.kwargs)
                if out is None:
                    out = y.new_empty((batch, *y.shape[1:]))
                out[idx.to(y.device)] = y
    if to.get(KEY) is None:  # the sparse wrapper checks its own calls
        check_finite(out, x, to)
    return out


def add_text_mask_batching(patcher) -> None:
    """Install text_mask_wrapper on `patcher` itself (a clone you own); installing it twice keeps one."""
    import comfy.patcher_extension
    kind = comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
    patcher.remove_wrappers_with_key(kind, MASK_KEY)
    patcher.add_wrapper_with_key(kind, MASK_KEY, text_mask_wrapper)


def outer_sample_wrapper(executor, *args, **kwargs):
    import comfy.model_patcher

    guider = executor.class_obj
    original = guider.model_options
    guider.model_options = comfy.model_patcher.create_model_options_clone(original)
    to = guider.model_options.setdefault("transformer_options", {})
    run = to[KEY].fresh()
    to[KEY] = run
    done = False
    try:
        out = executor(*args, **kwargs)
        done = True
        return out
    finally:
        if run.by_group:
            log.info("QuantSparse: %s", run.summary())
        elif done and run.scheduled_calls:  # model calls on the schedule, none of whose attention came to us:
            # our hook was replaced after we set it
            log.warning("QuantSparse: no attention call of this run reached sparse attention, so it ran dense: a node "
                        "applied after the Sparse Sampler / Sparse Attention node replaced its attention hook (e.g. "
                        "Model Attention Backend). Put such nodes before it.")
        run.close()  # an interrupted run's traceback must not keep its caches on the device
        guider.model_options = original


def apply_sparse(model, settings: SparseSettings, fused: bool = True, node_name: str = "QuantSparse Sparse Attention"):
    """A clone of `model` (a ComfyUI ModelPatcher) whose sampling runs use sparse attention + SSAR.
    fused: its double/single blocks also run QuantSparse's fused forms (nodes/fused_blocks.py: grouped
    small ops, producer-quantized activations, q/k norm + RoPE kernel; Wan's in nodes/fused_wan.py); False
    runs ComfyUI's blocks (and removes fused blocks a loader had turned on)."""
    import comfy.patcher_extension

    from .fused_blocks import install_fused_blocks, remove_fused_blocks

    variant = require_supported(model, node_name, SPARSE)
    wan = variant in WAN
    patched = model.clone()
    to = patched.model_options.setdefault("transformer_options", {})
    to = patched.model_options["transformer_options"] = dict(to)  # never write into a shared dict
    previous = to.get("optimized_attention_override")
    # Re-patching an already patched MODEL replaces our settings instead of stacking two of us.
    previous = getattr(previous, "quantsparse_previous", previous)
    to["optimized_attention_override"] = make_override(previous)
    dit = model.model.diffusion_model
    if settings.layers is None:  # the auto cache placement must budget for every sparse block, not those seen so far
        names = ("blocks",) if wan else ("double_blocks", "single_blocks")
        joint = sum(len(getattr(dit, n, [])) for n in names)
        settings = replace(settings, layers=max(1, joint - settings.warmup_blocks))
    to[KEY] = SparseRun(settings, dit.patch_size, wan=wan)
    for kind, wrapper in ((comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, outer_sample_wrapper),
                          (comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, diffusion_model_wrapper)):
        patched.remove_wrappers_with_key(kind, KEY)
        patched.add_wrapper_with_key(kind, KEY, wrapper)
    add_text_mask_batching(patched)
    if fused and variant not in FUSED:
        log.info("QuantSparse: no fused blocks for %s; it runs ComfyUI's blocks", variant)
        fused = False
    (install_fused_blocks if fused else remove_fused_blocks)(patched)
    log.info("QuantSparse sparse attention on %s: %s (fused blocks %s)", variant, asdict(settings),
             "on" if fused else "off")
    return patched
