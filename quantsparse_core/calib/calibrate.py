"""Block-wise post-training calibration with MSAD, and the baselines, in one loop.

Each block gets FP inputs (captured), is quantized per the policy, and (for the trained methods)
its clipping / smoothing / rotation parameters are fitted for `epochs` passes over the samples
with AdamW + cosine: loss = block-output MSE + lambda_g * global + lambda_l * local, each MSAD term
rescaled at the first iteration to the block loss's magnitude. Finished blocks are checkpointed, so
an interrupted run resumes after its last finished block.

Memory (`device=`): the model stays where it is (CPU); only the block being calibrated (its FP copy
and its quantized copy) moves to `device`, and goes back to the CPU when finished. Captured inputs
and FP block-output targets stay on the CPU (pin them with `pin_captured`) and move per sample.
MSAD targets (`msad_targets=`): "store" (default) computes the FP global map / salient indices /
local map once per block and keeps them on the CPU, moved per step; "recompute" keeps nothing and
reruns the FP block each step (one extra FP forward per step, no host memory: for 13B, where the
local map is ~2.9 GB per sample). Both give the same result (same computation, same order).
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ..models.attention import dense_attention
from ..models.weights import atomic_save_safetensors
from ..quant.linear import QuantLinear
from ..quant.policy import default_policy, quantize_model
from ..quant.quantizers import check_bits
from . import msad
from .capture import block_list, block_name

METHODS = ("rtn", "smoothquant", "quarot", "block", "block+global", "block+local", "msad")


@dataclass
class CalibSettings:
    method: str = "msad"
    w_bits: int = 4
    a_bits: int = 8
    epochs: int = 15
    lr_transform: float = 5e-3
    lr_clip: float = 5e-2
    lambda_g: float = 0.1        # applied after auto-balancing to the block loss (sweep: docs/RESULTS.md)
    lambda_l: float = 0.1
    stride: int = 128
    top_k: int = 256
    rotation: str | None = None  # None or "learned" for the trained methods
    sq_alpha: float = 0.5
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} unknown; choose one of {METHODS}")
        if self.epochs < 1 or self.stride < 1 or self.top_k < 1:
            raise ValueError("epochs, stride and top_k must be at least 1")
        check_bits(self.w_bits, self.a_bits)

    @property
    def trained(self) -> bool:
        return self.method.startswith("block") or self.method == "msad"

    @property
    def uses_global(self) -> bool:
        return self.method in ("block+global", "msad")

    @property
    def uses_local(self) -> bool:
        return self.method in ("block+local", "msad")


def _run_block(block, kind, inputs, record=None):
    """Call a block on captured inputs; optionally record its attention q, k. Returns one tensor."""
    def attn(q, k, v, mask, call):
        if record is not None:
            record.append((q, k, mask))
        return dense_attention(q, k, v, mask, call)

    dev = next(block.parameters()).device
    args = tuple(a.to(dev, non_blocking=True) if torch.is_tensor(a) else a for a in inputs.args)  # offloaded
    out = block(*args, attn, inputs.call)
    return torch.cat(out, dim=1) if isinstance(out, tuple) else out  # a double block returns (img, txt)


def _sub_policy(policy, prefix):
    return {name[len(prefix):]: rule for name, rule in policy.items() if name.startswith(prefix)}


def _smoothquant_init(fp_block, q_block, kind, samples, alpha):
    """log s_j = alpha log max|X_j| - (1 - alpha) log max|W_j| from FP activation statistics."""
    stats, handles = {}, []
    fp_mods = dict(fp_block.named_modules())
    q_mods = {n: m for n, m in q_block.named_modules() if isinstance(m, QuantLinear) and m.log_smooth is not None}
    for name in q_mods:
        def hook(mod, args, name=name):
            amax = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0)
            stats[name] = torch.maximum(stats[name], amax) if name in stats else amax
        handles.append(fp_mods[name].register_forward_pre_hook(hook))
    with torch.no_grad():
        for s in samples:
            _run_block(fp_block, kind, s)
    for h in handles:
        h.remove()
    with torch.no_grad():
        for name, q in q_mods.items():
            w_max = q.weight.abs().amax(0).clamp_min(1e-5)
            q.log_smooth.copy_(alpha * stats[name].clamp_min(1e-5).log() - (1 - alpha) * w_max.log())


def _calib_params(q_block):
    """(clipping params, transform params) of all QuantLinears in a block."""
    clips, transforms = [], []
    for m in q_block.modules():
        if isinstance(m, QuantLinear):
            clips += [m.w_clip, m.a_clip]
            if m.log_smooth is not None:
                transforms.append(m.log_smooth)
            for f in (m.r1, m.r2):
                if f is not None:
                    transforms.append(f.param)
    return clips, transforms


def _calib_state(q_block) -> dict:
    clips, transforms = _calib_params(q_block)
    names = {id(p): n for n, p in q_block.named_parameters()}
    return {names[id(p)]: p.detach().cpu().contiguous() for p in clips + transforms}


def block_output_mse(block, kind, samples) -> float:
    with torch.no_grad():
        return sum(F.mse_loss(_run_block(block, kind, s).float(), _on(s.target, block)).item()
                   for s in samples) / len(samples)


def _on(t, block):
    return t.to(next(block.parameters()).device, non_blocking=True)


def pin_captured(captured: dict) -> dict:
    """Page-lock captured CPU tensors (faster, asynchronous copies to CUDA); in place, returns it."""
    if torch.cuda.is_available():
        for samples in captured.values():
            for s in samples:
                s.args = tuple(a.pin_memory() if torch.is_tensor(a) and a.device.type == "cpu" else a
                               for a in s.args)
    return captured


MSAD_TARGETS = ("store", "recompute")


def _atomic_write_text(path: Path, text: str) -> None:
    """A killed process leaves the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def calibrate(model, captured: dict, settings: CalibSettings, policy=None, checkpoint_dir=None, progress=None,
              only=None, device=None, msad_targets: str = "store"):
    """Quantize `model` in place block by block. captured: {(kind, i): [BlockInputs]} from capture.
    only: optional block names ("double_blocks.0", ...) to calibrate; the rest stay as they are.
    device: None = calibrate each block where it is; else move only the current block there (the
    rest of the model never leaves its device) and return the finished block to where it was.
    msad_targets: "store" or "recompute" (see the module docstring).

    Returns a report {block name: {"quant": final block MSE, "rtn": RTN block MSE, ...}}.
    """
    if msad_targets not in MSAD_TARGETS:
        raise ValueError(f"msad_targets {msad_targets!r} unknown; choose one of {MSAD_TARGETS}")
    policy = policy if policy is not None else default_policy(model, settings.w_bits, settings.a_bits)
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    if ckpt:
        ckpt.mkdir(parents=True, exist_ok=True)
        meta_path = ckpt / "settings.json"
        if meta_path.exists() and json.loads(meta_path.read_text()) != asdict(settings):
            raise ValueError(f"{ckpt} holds a calibration with other settings; use another folder or delete it")
        _atomic_write_text(meta_path, json.dumps(asdict(settings)))
    blocks = block_list(model)
    report = {}
    for bi, (kind, idx, fp_block) in enumerate(blocks):
        name = block_name(kind, idx)
        if only is not None and name not in only:
            continue
        samples = captured[(kind, idx)]
        if not samples:
            raise ValueError(f"no captured inputs for {name}; capture at least one sample")
        home = next(fp_block.parameters()).device
        if device is not None:
            fp_block = copy.deepcopy(fp_block).to(device)   # the model's own copy stays home
        with torch.no_grad():
            for s in samples:
                s.target = _run_block(fp_block, kind, s).float().to(s.args[0].device)
        q_block = copy.deepcopy(fp_block)
        quantize_model(q_block, _sub_policy(policy, name + "."), smooth=settings.method != "quarot" and
                       settings.method != "rtn", rotation="hadamard" if settings.method == "quarot"
                       else (settings.rotation if settings.trained else None))
        if settings.method == "smoothquant":
            _smoothquant_init(fp_block, q_block, kind, samples, settings.sq_alpha)
        done = ckpt / f"{name}.safetensors" if ckpt else None
        if done is not None and done.exists():
            q_block.load_state_dict(load_file(str(done)), strict=False)
            entry = json.loads((ckpt / f"{name}.json").read_text())
        else:
            entry = {}
            if settings.trained:
                entry = _train_block(fp_block, q_block, kind, samples, settings, bi, len(blocks), progress,
                                     msad_targets)
            elif progress:
                progress(bi, len(blocks), settings.epochs, None)
            entry["quant"] = block_output_mse(q_block, kind, samples)
            if done is not None:  # the .safetensors is the completion marker, so it is written last
                _atomic_write_text(ckpt / f"{name}.json", json.dumps(entry))
                atomic_save_safetensors(_calib_state(q_block), done)
        report[name] = entry
        parent = model.get_submodule(name.rpartition(".")[0])
        parent[idx] = q_block.to(home) if device is not None else q_block
        del fp_block
        for s in samples:
            del s.target
    return report


def _msad_targets(fp_block, kind, smp, s: CalibSettings, store) -> dict:
    """FP global map / salient indices / local map of one sample, placed on `store`."""
    with torch.no_grad():
        rec = []
        _run_block(fp_block, kind, smp, rec)
        q, k, mask = rec[0]
        t = {}
        if s.uses_global:
            t["global"] = msad.global_attention(q, k, mask, s.stride).to(store)
        if s.uses_local:
            idx = msad.salient_indices(q, k, mask, s.top_k)
            t["local"] = msad.local_attention(q, k, mask, idx).to(store)
            t["idx"] = idx.to(store)
        return t


def block_optimiser(q_block, s: CalibSettings, n_samples: int, bi: int):
    """(AdamW over the block's clipping and transform parameters at their learning rates, its cosine
    schedule over all steps, the generator of the sample order) for block index bi."""
    clips, transforms = _calib_params(q_block)
    groups = [{"params": clips, "lr": s.lr_clip}]
    if transforms:
        groups.append({"params": transforms, "lr": s.lr_transform})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    total = s.epochs * n_samples
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 0.5 * (1 + math.cos(math.pi * it / total)))
    return opt, sched, torch.Generator().manual_seed(s.seed * 100003 + bi)


def optimise_step(opt, sched, terms: dict, balance: dict, s: CalibSettings) -> torch.Tensor:
    """One step on L_quant + lambda_g b_g L_global + lambda_l b_l L_local; the balance factors b
    scale each MSAD term to L_quant at the first step and stay fixed (METHOD.md §2)."""
    if not balance:
        for t in ("global", "local"):
            if t in terms:
                balance[t] = (terms["quant"] / terms[t].clamp_min(1e-20)).detach()
    loss = terms["quant"]
    if "global" in terms:
        loss = loss + s.lambda_g * balance["global"] * terms["global"]
    if "local" in terms:
        loss = loss + s.lambda_l * balance["local"] * terms["local"]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    return loss


def _train_block(fp_block, q_block, kind, samples, s: CalibSettings, bi, n_blocks, progress,
                 msad_targets="store") -> dict:
    opt, sched, gen = block_optimiser(q_block, s, len(samples), bi)

    # MSAD targets from the FP block (which, with its inputs, does not change while this block
    # trains): computed once and kept where the captured inputs live, or recomputed per step.
    targets = []
    if (s.uses_global or s.uses_local) and msad_targets == "store":
        targets = [_msad_targets(fp_block, kind, smp, s, smp.args[0].device) for smp in samples]
    balance = {}
    last = {}
    for epoch in range(s.epochs):
        for j in torch.randperm(len(samples), generator=gen).tolist():
            smp = samples[j]
            terms = {}
            rec_q = []
            out = _run_block(q_block, kind, smp, rec_q if (s.uses_global or s.uses_local) else None)
            terms["quant"] = F.mse_loss(out.float(), smp.target.to(out.device, non_blocking=True))
            if rec_q:
                qq, kq, mask = rec_q[0]
                tgt = targets[j] if targets else _msad_targets(fp_block, kind, smp, s, qq.device)
                if s.uses_global:
                    terms["global"] = F.mse_loss(msad.global_attention(qq, kq, mask, s.stride),
                                                 tgt["global"].to(qq.device))
                if s.uses_local:
                    terms["local"] = F.mse_loss(msad.local_attention(qq, kq, mask, tgt["idx"].to(qq.device)),
                                                tgt["local"].to(qq.device))
            loss = optimise_step(opt, sched, terms, balance, s)
            last = {k: v.item() for k, v in terms.items()}
        if progress:
            progress(bi, n_blocks, epoch + 1, loss.item())
    return {f"final_{k}": v for k, v in last.items()}
