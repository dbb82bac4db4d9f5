"""Streaming block-wise calibration: one block (its FP copy, its quantized copy and their optimiser
state) on the device at a time, one block's inputs (all samples) off the device at a time.

Block i's inputs come from block i-1 as it is finished, starting from the captured block-0 inputs
(stream_capture.py). Which outputs feed block i+1 is `propagation`: "fp" (the FP block's outputs:
the full-precision model's own activations, as calibrate.calibrate uses; docs/CALIBRATION.md has
the measurement behind the default) or "quant" (the calibrated block's outputs). Each finished
block leaves its packed tensors in `workdir`; a new run with the same inputs replays the finished
blocks' forwards to rebuild the current inputs and continues, and the final file is assembled from
the parts without ever holding the model.

Both families: HunyuanVideo's double then single blocks, or Wan's blocks ("blocks.<i>", one hidden
state x passed on; e, RoPE, text and image tokens are per-sample constants of the capture).
"""
from __future__ import annotations

import copy
import json
import time
import weakref
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..io.checkpoint import FORMAT_NAME, FORMAT_VERSION, HEADER_KEY
from ..models.weights import atomic_save_safetensors
from ..quant.linear import QuantLinear
from ..quant.policy import default_policy, policy_to_json, quantize_model
from .calibrate import _atomic_write_text, _calib_state, _smoothquant_init, _sub_policy
from .capture import block_name
from .stream_train import BlockData, _call, autocast, fp_pass, output_pass, train_block
from .tensor_store import TensorStore

PROPAGATIONS = ("fp", "quant")


def layer_info(rule, settings) -> dict:
    """What quantize_model makes of a policy rule under these settings (the header's 'layers' entry)."""
    weight_only = rule.a_bits == 16
    smooth = settings.method not in ("quarot", "rtn") and not weight_only
    rotation = None if weight_only else ("hadamard" if settings.method == "quarot"
                                         else (settings.rotation if settings.trained else None))
    return {"w_bits": rule.w_bits, "a_bits": rule.a_bits, "smooth": smooth, "rotation": rotation}


def quantized_copy(fp_block, policy, name, settings):
    q = copy.deepcopy(fp_block)
    quantize_model(q, _sub_policy(policy, name + "."), smooth=settings.method not in ("quarot", "rtn"),
                   rotation="hadamard" if settings.method == "quarot"
                   else (settings.rotation if settings.trained else None))
    return q


def packed_block(q_block, name) -> dict:
    """The block's tensors as the compressed file stores them (full key names), frozen on the CPU."""
    q = copy.deepcopy(q_block).to("cpu")
    out, quant = {}, set()
    for sub, m in q.named_modules():
        if isinstance(m, QuantLinear):
            m.freeze()
            quant.add(sub + ".")
            out.update({f"{name}.{sub}.{leaf}": t for leaf, t in m.packed_tensors().items()})
    for k, v in q.state_dict().items():
        if not k.startswith(tuple(quant)):
            out[f"{name}.{k}"] = v.detach().to(torch.bfloat16).cpu()
    return out


def pinned_bytes(expected_bytes: int, entries: int) -> int:
    """Host bytes `entries` equal entries of `expected_bytes` in all take page-locked: PyTorch's pinned allocator
    rounds every tensor up to a power of two (0.19 GB activations of 848x480x73 take 0.27 GB), counted here per
    entry (its largest tensor dominates), plus 2% for the small ones."""
    if expected_bytes <= 0 or entries <= 0:
        return 0
    per = -(-expected_bytes // entries)
    return int(entries * (1 << (per - 1).bit_length()) * 1.02)


class _Stores:
    """New per-block stores within the host budget, counting the RAM stores still open (a block holds its inputs,
    its targets and its MSAD maps at once): page-locked in RAM when their pinned size fits (the fastest copies),
    else in ordinary RAM at their exact size (the prefetch ring stages them), else on disk in `workdir`."""

    def __init__(self, workdir, host_budget, pinning: bool = None):
        self.workdir, self.host_budget, self.spilled_bytes = workdir, host_budget, 0
        self.pinning = torch.cuda.is_available() if pinning is None else pinning
        self._ram = []   # (store, host bytes it takes) of the RAM stores made here
        self._made = weakref.WeakSet()  # the stores made here still alive: a failed or cancelled job deletes their
        # spill files (weak: a store dropped on the way frees its memory as before)

    def discard(self) -> None:
        """Close every store made here and delete its file (a job that stops early: its per-block data are
        rebuilt on resume, and on disk they can be a whole block's worth, ~14 GB at 848x480x73)."""
        for st in list(self._made):
            st.close(delete=True)
        self._made, self._ram = weakref.WeakSet(), []

    def in_ram(self) -> int:
        """Host bytes of this job's RAM stores still open."""
        self._ram = [(st, n) for st, n in self._ram if not st.closed]
        return sum(n for _, n in self._ram)

    def new(self, tag: str, expected_bytes: int, entries: int = 1, pin: bool = True) -> TensorStore:
        store = self._new(tag, expected_bytes, entries, pin)
        self._made.add(store)
        return store

    def _new(self, tag: str, expected_bytes: int, entries: int, pin: bool) -> TensorStore:
        if self.workdir is None or self.host_budget is None:
            return TensorStore(pin=pin)
        left = self.host_budget - self.in_ram()
        pinned = pinned_bytes(expected_bytes, entries) if pin and self.pinning else expected_bytes
        if pinned <= left:
            store, held = TensorStore(pin=pin), pinned
        elif expected_bytes <= left:
            store, held = TensorStore(pin=False), expected_bytes
        else:
            self.spilled_bytes += expected_bytes
            return TensorStore(Path(self.workdir) / f"{tag}.bin")
        self._ram.append((store, held))
        return store


def calibrate_streaming(source, capture, settings, *, device="cpu", workdir=None, propagation="fp", amp=False,
                        store_dtype=None, msad_targets="store", host_budget=None, progress=None, max_blocks=None,
                        on_block=None, stats=None, first_block: int = 0):
    """Calibrate every block of `source` from `capture` (block-0 inputs). Returns (policy, report, parts):
    parts is {block name: packed tensors} when workdir is None, else the folder holding them.

    store_dtype: how inputs / targets / MSAD maps are held (default: the source's dtype).
    host_budget: bytes of host memory one block's data may use before they go to disk in workdir.
    max_blocks: stop after this many blocks (measurements); on_block(name, seconds, phase) reports times.
    first_block: blocks before this index only propagate their FP outputs (measurements; "fp" only).
    stats: an optional dict that receives {"spilled_bytes": bytes written to disk for lack of host memory}.
    """
    if propagation not in PROPAGATIONS:
        raise ValueError(f"propagation {propagation!r} unknown; choose one of {PROPAGATIONS}")
    if msad_targets not in ("store", "recompute"):
        raise ValueError(f"msad_targets {msad_targets!r} unknown; choose 'store' or 'recompute'")
    device = torch.device(device)
    store_dtype = store_dtype or source.dtype
    policy = default_policy(source.skeleton, settings.w_bits, settings.a_bits)
    ckpt = Path(workdir) if workdir is not None else None
    if ckpt is not None:
        ckpt.mkdir(parents=True, exist_ok=True)
        meta_path = ckpt / "settings.json"
        if meta_path.exists() and json.loads(meta_path.read_text()) != asdict(settings):
            raise ValueError(f"{ckpt} holds a calibration with other settings; use another folder or delete it")
        _atomic_write_text(meta_path, json.dumps(asdict(settings)))
    stores = _Stores(ckpt, host_budget)
    if first_block and propagation != "fp":
        raise ValueError("first_block needs propagation='fp' (earlier blocks are not calibrated)")
    names = source.names()
    names = names[:first_block + max_blocks] if max_blocks else names
    hidden = source.hidden_size
    report, parts = {}, {}
    cur, prev_kind = capture.store, None
    use_msad = settings.trained and (settings.uses_global or settings.uses_local) and msad_targets == "store"
    try:
        for bi, (kind, idx) in enumerate(names):
            name = block_name(kind, idx)
            t0 = time.perf_counter()
            last = bi == len(names) - 1
            marker = ckpt / f"{name}.safetensors" if ckpt is not None else None
            fp = source.block(kind, idx, device)
            data = BlockData(capture, cur, kind, idx, source.count(kind), device, next(fp.parameters()).dtype,
                             joint=kind == "single" and prev_kind == "double")
            tokens = sum(m["txt_len"] + m["grid"][0] * m["grid"][1] * m["grid"][2] for m in capture.meta)
            one_set = tokens * hidden * torch.empty((), dtype=store_dtype).element_size()
            nxt = None
            if bi < first_block or (marker is not None and marker.exists()):
                entry = {} if bi < first_block else json.loads((ckpt / f"{name}.json").read_text())
                if not last:  # replay this block's forward to rebuild the next block's inputs
                    block = fp
                    if propagation == "quant":
                        block = quantized_copy(fp, policy, name, settings)
                        block.load_state_dict({k: v.to(device) for k, v in load_file(str(marker)).items()}, strict=False)
                    nxt = stores.new(f"inputs-{bi + 1}", one_set, len(data))
                    for j in range(len(data)):
                        with torch.no_grad(), autocast(device, amp):
                            nxt.append(tuple(o.to(store_dtype) for o in _call(block, kind, data.sample(j))))
                    del block
                if progress and bi >= first_block:  # a finished block replayed on resume: the bar moves, Cancel works
                    progress(bi, len(names), settings.epochs, None)
                phase = "replayed"
            else:
                targets = stores.new(f"targets-{bi}", one_set, len(data))
                msad_store = None
                if use_msad:
                    heads, k = source.config.num_heads, settings.top_k
                    per = sum(heads * min(k, m["txt_len"] + m["grid"][0] * m["grid"][1] * m["grid"][2]) *
                              (m["txt_len"] + m["grid"][0] * m["grid"][1] * m["grid"][2]) for m in capture.meta)
                    msad_store = stores.new(f"msad-{bi}", per * torch.empty((), dtype=store_dtype).element_size(), len(data))
                fp_pass(fp, data, settings, amp, targets, msad_store, store_dtype)
                data.targets = targets
                q = quantized_copy(fp, policy, name, settings)
                if settings.method == "smoothquant":
                    _smoothquant_init(fp, q, kind, (data.sample(j) for j in range(len(data))), settings.sq_alpha)
                entry = {}
                if settings.trained:
                    entry = train_block(fp, q, data, settings, bi, len(names), progress, msad_store, amp)
                elif progress:
                    progress(bi, len(names), settings.epochs, None)
                qstore = stores.new(f"inputs-{bi + 1}", one_set, len(data)) if propagation == "quant" and not last else None
                entry["quant"] = output_pass(q, data, amp, qstore)
                nxt = None if last else (targets if propagation == "fp" else qstore)
                if propagation == "quant" or last:
                    targets.close(delete=True)
                if msad_store is not None:
                    msad_store.close(delete=True)
                packed = packed_block(q, name)
                if ckpt is not None:  # the calibration state (the completion marker) is written last
                    _atomic_write_text(ckpt / f"{name}.json", json.dumps(entry))
                    atomic_save_safetensors(packed, ckpt / f"{name}.packed.safetensors")
                    atomic_save_safetensors(_calib_state(q), marker)
                else:
                    parts[name] = packed
                del q
                phase = "calibrated"
            if bi >= first_block:
                report[name] = entry
            del fp, data
            if cur is not capture.store:
                cur.close(delete=True)
            cur, prev_kind = nxt, kind
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if on_block is not None:
                on_block(name, time.perf_counter() - t0, phase)
        if cur is not None and cur is not capture.store:
            cur.close(delete=True)
    except BaseException:  # cancelled or failed: no spill file stays behind (the capture and finished blocks do,
        stores.discard()    # for the resume)
        raise
    if stats is not None:
        stats["spilled_bytes"] = stores.spilled_bytes
    return policy, report, (ckpt if ckpt is not None else parts)


def assemble(source, policy, settings, parts, out_path, calibration: dict, source_hash: str | None) -> None:
    """Write the compressed file (docs/FORMAT.md) from the per-block parts plus the source's other
    weights in bf16: the same tensors and header as io.checkpoint.save_compressed of the whole model
    (model_family: the source's, "hunyuan_video" or "wan")."""
    tensors = {k: v.detach().to("cpu", torch.bfloat16) for k, v in source.other_tensors().items()}
    for kind, idx in source.names():
        name = block_name(kind, idx)
        tensors.update(parts[name] if isinstance(parts, dict) else load_file(str(Path(parts) / f"{name}.packed.safetensors")))
    header = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "model_family": source.family.name,
              "config": source.config.to_dict(), "policy": policy_to_json(policy),
              "layers": {n: layer_info(r, settings) for n, r in policy.items()},
              "calibration": calibration or {}, "source_hash": source_hash}
    atomic_save_safetensors(tensors, out_path, metadata={HEADER_KEY: json.dumps(header)})
