"""Where the GPU memory of one streaming-calibration training step goes, measured on the CPU.

Builds one HunyuanVideo-13B-width block (double or single; random bf16 weights), its quantized copy
as streaming.py makes it (quantized_copy, method msad), and runs the exact stream_train step
(stream_train.train_block, 1 sample, 1 epoch: fake-quant forward under bf16 autocast, L_quant +
MSAD global + local, backward, AdamW step) at a reduced token count L, accounting:
  (a) bytes saved for backward, per autograd node type and per module (saved_tensors_hooks and a
      walk of the graph before backward; storages counted once),
  (b) the peak of live tensor bytes created during the step (a TorchDispatchMode that follows every
      storage an op returns until it is freed),
  (c) persistent state: FP block weights, quantized block weights, learnable parameters, AdamW state.
CPU autocast differs from CUDA autocast in which ops run in float32; the step runs under a mode
that applies CUDA's float32 list (layer_norm, softmax, rms_norm, sum, mse_loss, ...) so the dtypes, and
hence the bytes, are the GPU's. Two L values give the per-token slope (memory is linear in L: SDPA,
and MSAD's local map is k x L); the result is projected to --project-tokens (30,466: 848x480x73).

  python benchmarks/calibration_memory.py --tokens 1024 2048 --variant old new --out results.json
Widths: --preset hunyuan-video-13b (default) or test (tiny; used by tests/test_calibration_memory.py).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
import weakref
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantsparse_core.calib import stream_train  # noqa: E402
from quantsparse_core.calib.calibrate import CalibSettings  # noqa: E402
from quantsparse_core.calib.capture import BlockInputs  # noqa: E402
from quantsparse_core.calib.streaming import quantized_copy  # noqa: E402
from quantsparse_core.models.attention import AttentionCall  # noqa: E402
from quantsparse_core.models.blocks import DoubleStreamBlock, SingleStreamBlock  # noqa: E402
from quantsparse_core.models.config import get_preset  # noqa: E402
from quantsparse_core.models.layers import rope_table  # noqa: E402
from quantsparse_core.quant import linear as qlinear  # noqa: E402
from quantsparse_core.quant.policy import hunyuan_policy  # noqa: E402

GB = 2 ** 30
TXT = 256


# -- CUDA autocast's float32 ops, applied on the CPU ------------------------------------------------
_F32 = {F.layer_norm, F.group_norm, F.softmax, F.log_softmax, F.mse_loss, torch.softmax, torch.log_softmax,
        torch.Tensor.softmax, torch.Tensor.log_softmax, torch.exp, torch.Tensor.exp, torch.pow, torch.Tensor.pow,
        torch.sum, torch.Tensor.sum, torch.rsqrt, torch.Tensor.rsqrt, torch.cumsum, torch.prod, F.rms_norm,
        torch.rms_norm}


class CudaAutocastF32(TorchFunctionMode):
    """Inside torch.autocast("cpu", bf16): cast bf16/fp16 tensor arguments of the ops CUDA autocast
    runs in float32 to float32 first (as CUDA autocast does), so the CPU step has the GPU's dtypes."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _F32 and torch.is_autocast_enabled("cpu"):
            cast = lambda a: a.float() if torch.is_tensor(a) and a.dtype in (torch.bfloat16, torch.float16) else a  # noqa: E731
            args = tuple(cast(a) for a in args)
            kwargs = {k: cast(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


# -- live bytes -------------------------------------------------------------------------------------
class LiveBytes(TorchDispatchMode):
    """Follows every storage returned by an op while active (until the storage is freed): live bytes,
    and the peak with what was live at it (by the op that made each storage)."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak, self.at_peak, self.phase = {}, 0, 0, {}, "forward"

    def _drop(self, key):
        n, _ = self.live.pop(key, (0, None))
        self.now -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key = st.data_ptr()
            if key in self.live or st.nbytes() == 0:
                continue
            self.live[key] = (st.nbytes(), f"{self.phase}:{func.overloadpacket.__name__}:{t.dtype}".replace("torch.", ""))
            self.now += st.nbytes()
            weakref.finalize(st, self._drop, key)
            if self.now > self.peak:
                self.peak = self.now
                self.at_peak = self._by_tag()
        return out

    def _by_tag(self):
        d = defaultdict(int)
        for n, tag in self.live.values():
            d[tag] += n
        return dict(d)


# -- saved tensors ------------------------------------------------------------------------------------
class SavedBytes:
    """saved_tensors_hooks that note each saved storage once, with the module running when it was saved."""

    def __init__(self, model):
        self.stack, self.by_module, self.seen, self.handles = ["(outside modules)"], defaultdict(int), set(), []
        self.model, self.persistent = model, None
        for name, m in model.named_modules():
            if isinstance(m, qlinear.QuantLinear) or not any(True for _ in m.children()):
                self.handles.append(m.register_forward_pre_hook(lambda mod, a, n=name: self.stack.append(n)))
                self.handles.append(m.register_forward_hook(lambda mod, a, o: self.stack.pop() and None))

    def pack(self, t):
        if self.persistent is None:  # at the first save: the weights as train_block holds them (maybe bf16 now)
            self.persistent = {p.untyped_storage().data_ptr() for p in self.model.parameters()} | \
                              {b.untyped_storage().data_ptr() for b in self.model.buffers()}
        st = t.untyped_storage()
        key = st.data_ptr()
        if key not in self.seen and key not in self.persistent:
            self.seen.add(key)
            self.by_module[self.stack[-1]] += st.nbytes()
        return t

    def remove(self):
        for h in self.handles:
            h.remove()


def saved_by_node(roots) -> dict:
    """Walk the autograd graph from `roots`: bytes of saved tensors per node type (storages once)."""
    seen_nodes, seen_st, out, todo = set(), set(), defaultdict(int), [r.grad_fn for r in roots if r.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen_nodes:
            continue
        seen_nodes.add(node)
        tensors = []
        for attr in dir(node):
            if attr.startswith("_saved_"):
                try:
                    v = getattr(node, attr)
                except RuntimeError:
                    continue
                tensors += [v] if torch.is_tensor(v) else [x for x in v if torch.is_tensor(x)] if isinstance(v, (tuple, list)) else []
        if hasattr(node, "saved_tensors") and not any(a.startswith("_saved_") for a in dir(node)):
            with contextlib.suppress(RuntimeError):
                tensors += [t for t in node.saved_tensors if torch.is_tensor(t)]
        for t in tensors:
            if t.requires_grad and t.grad_fn is None and t.is_leaf and isinstance(t, nn.Parameter):
                continue  # a parameter: persistent, counted in (c)
            st = t.untyped_storage()
            if st.data_ptr() not in seen_st and st.nbytes():
                seen_st.add(st.data_ptr())
                out[type(node).__name__] += st.nbytes()
        todo += [f for f, _ in node.next_functions]
    return dict(out)


# -- one block and its step --------------------------------------------------------------------------
class _Data:
    """stream_train.BlockData's interface for one in-memory sample. sample() / target() copy their
    tensors as BlockData's host-to-device transfers do, so the device copies count as step memory."""

    def __init__(self, kind, args, call, target):
        self.kind, self.args, self.call, self.tgt, self.device = kind, args, call, target, torch.device("cpu")

    def __len__(self):
        return 1

    def sample(self, j):
        return BlockInputs(tuple(a.clone() if torch.is_tensor(a) else a for a in self.args), self.call)

    def target(self, j):
        return self.tgt.clone().float()


class _Store:
    def __init__(self, items):
        self.items = items

    def get(self, j):
        return tuple(None if t is None else t.clone() for t in self.items[j])


def build(config, kind, seed=0):
    """FP block (bf16, random) and its quantized copy as streaming.quantized_copy makes it."""
    torch.manual_seed(seed)
    c, h, m = config.hidden_size, config.num_heads, config.mlp_hidden
    cls = DoubleStreamBlock if kind == "double" else SingleStreamBlock
    fp = cls(c, h, m, dtype=torch.bfloat16)
    for p in fp.parameters():  # random weights of a trained model's size (no 0-init effects)
        with torch.no_grad():
            p.normal_(0, 0.02 if p.ndim > 1 else 0.1)
    holder = nn.Module()
    setattr(holder, f"{kind}_blocks", nn.ModuleList([fp]))
    settings = CalibSettings(method="msad", epochs=1)
    policy = hunyuan_policy(holder, settings.w_bits, settings.a_bits)
    return fp, quantized_copy(fp, policy, f"{kind}_blocks.0", settings), settings


def inputs(config, kind, tokens, seed=1):
    g = torch.Generator().manual_seed(seed)
    c, n_img = config.hidden_size, tokens - TXT
    grid = (1, 1, n_img)
    pos = torch.zeros(1, tokens, 3)
    pos[0, TXT:, 2] = torch.arange(n_img, dtype=torch.float32)
    rope = rope_table(pos, config.rope_axes, config.rope_theta)
    vec = torch.randn(1, c, generator=g).to(torch.bfloat16)
    mask = torch.zeros(1, 1, tokens, dtype=torch.bfloat16)
    call = AttentionCall(kind, 0, 1, TXT, grid, None)
    if kind == "double":
        hidden = (torch.randn(1, n_img, c, generator=g).to(torch.bfloat16), torch.randn(1, TXT, c, generator=g).to(torch.bfloat16))
    else:
        hidden = (torch.randn(1, tokens, c, generator=g).to(torch.bfloat16),)
    return BlockInputs(hidden + (vec, rope, mask), call)


def persistent(fp, q, opt_state_factor=2) -> dict:
    learn = [p for p in q.parameters() if p.requires_grad]
    frozen = [p for p in q.parameters() if not p.requires_grad] + list(q.buffers())
    b = lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
    return {"fp_block_weights": b(fp.parameters()), "q_block_frozen": b(frozen),
            "q_block_learnable": b(learn), "grads": b(learn), "adamw_state": opt_state_factor * b(learn)}


def set_variant(variant):
    new = variant == "new"
    qlinear.LEAN_AMP = qlinear.AMP_OUTPUT_AUTOCAST_DTYPE = stream_train.BF16_FROZEN_WEIGHTS = new


def step(config, kind, tokens, variant) -> dict:
    """One exact stream_train step at `tokens`; the accounting (a), (b), (c)."""
    set_variant(variant)
    fp, q, settings = build(config, kind)
    smp = inputs(config, kind, tokens)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), CudaAutocastF32():
        rec = []
        out = stream_train._call(fp, kind, smp, rec)
        target = torch.cat(out, dim=1) if len(out) > 1 else out[0]
        target = target.to(torch.bfloat16)
        msad = stream_train.msad_targets(rec, settings, torch.bfloat16)
    del out, rec
    data, store = _Data(kind, smp.args, smp.call, target), _Store([msad])
    saved = SavedBytes(q)
    nodes = {}
    real_step = stream_train.optimise_step

    def probe(opt, sched, terms, balance, s):  # the graph is complete here: walk it, then the real step
        nodes.update(saved_by_node(list(terms.values())))
        live.phase = "backward"
        return real_step(opt, sched, terms, balance, s)
    live = LiveBytes()
    stream_train.optimise_step = probe
    gc.collect()
    t0 = time.perf_counter()
    try:
        with CudaAutocastF32(), torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t), live:
            stream_train.train_block(fp, q, data, settings, 0, 1, None, store, amp=True)
    finally:
        stream_train.optimise_step = real_step
        saved.remove()
    seconds = time.perf_counter() - t0
    # (c) with the weights as they are held while training (bf16 frozen weights in the new variant)
    lowered = stream_train._frozen_weights_to_bf16(q) if variant == "new" else []
    pers = persistent(fp, q)
    stream_train._frozen_weights_back(lowered)
    return {"kind": kind, "tokens": tokens, "variant": variant, "seconds": seconds,
            "saved_total": sum(saved.by_module.values()), "saved_by_module": dict(saved.by_module),
            "saved_by_node": nodes, "live_peak": live.peak, "live_at_peak": live.at_peak, "persistent": pers}


def _fit(a, b, key):
    """(intercept, bytes per token) of a two-point line through a[key], b[key]."""
    slope = (b[key] - a[key]) / (b["tokens"] - a["tokens"])
    return a[key] - slope * a["tokens"], slope


def project(runs, tokens) -> dict:
    """Per (kind, variant): the per-token slope of saved and peak live bytes, linearity, projection."""
    out = {}
    groups = defaultdict(list)
    for r in runs:
        groups[(r["kind"], r["variant"])].append(r)
    for (kind, variant), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["tokens"])
        if len(rs) < 2:
            continue
        a, b = rs[0], rs[-1]
        p0, ps = _fit(a, b, "live_peak")
        s0, ss = _fit(a, b, "saved_total")
        pers = sum(b["persistent"].values())
        per_module = {m: (b["saved_by_module"].get(m, 0) - a["saved_by_module"].get(m, 0)) / (b["tokens"] - a["tokens"])
                      for m in b["saved_by_module"]}
        per_node = {n: (b["saved_by_node"].get(n, 0) - a["saved_by_node"].get(n, 0)) / (b["tokens"] - a["tokens"])
                    for n in b["saved_by_node"]}
        out[f"{kind}/{variant}"] = {
            "tokens_measured": [r["tokens"] for r in rs],
            "live_peak_bytes": [r["live_peak"] for r in rs], "saved_bytes": [r["saved_total"] for r in rs],
            "peak_bytes_per_token": ps, "peak_intercept": p0, "saved_bytes_per_token": ss, "saved_intercept": s0,
            "ratio_peak_2L_over_L": b["live_peak"] / a["live_peak"],
            "persistent_bytes": pers, "persistent": b["persistent"],
            "projected_tokens": tokens, "projected_saved": s0 + ss * tokens,
            "projected_step_peak": p0 + ps * tokens, "projected_gpu_peak": pers + p0 + ps * tokens,
            "saved_per_token_by_module": dict(sorted(per_module.items(), key=lambda kv: -kv[1])),
            "saved_per_token_by_node": dict(sorted(per_node.items(), key=lambda kv: -kv[1])),
        }
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="hunyuan-video-13b")
    ap.add_argument("--kinds", nargs="+", default=["double", "single"])
    ap.add_argument("--tokens", nargs=2, type=int, default=[1024, 2048])
    ap.add_argument("--variant", nargs="+", default=["old", "new"], choices=["old", "new"])
    ap.add_argument("--project-tokens", type=int, default=30466)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    config = get_preset(a.preset)
    runs = []
    for kind in a.kinds:
        for variant in a.variant:
            for tokens in a.tokens:
                r = step(config, kind, tokens, variant)
                runs.append(r)
                print(f"{kind:6s} {variant:3s} L={tokens:6d}: saved {r['saved_total'] / GB:6.3f} GB, live peak "
                      f"{r['live_peak'] / GB:6.3f} GB, persistent {sum(r['persistent'].values()) / GB:5.2f} GB "
                      f"({r['seconds']:.0f} s)", flush=True)
                gc.collect()
    proj = project(runs, a.project_tokens)
    for key, p in proj.items():
        print(f"\n== {key}: peak {p['peak_bytes_per_token'] / 2**10:.1f} KiB/token (+{p['peak_intercept'] / GB:.2f} GB), "
              f"saved {p['saved_bytes_per_token'] / 2**10:.1f} KiB/token; peak(2L)/peak(L) = {p['ratio_peak_2L_over_L']:.3f}")
        print(f"   at {a.project_tokens:,} tokens: saved {p['projected_saved'] / GB:.2f} GB, step peak "
              f"{p['projected_step_peak'] / GB:.2f} GB + persistent {p['persistent_bytes'] / GB:.2f} GB "
              f"= {p['projected_gpu_peak'] / GB:.2f} GB")
        print("   persistent: " + ", ".join(f"{k} {v / GB:.2f} GB" for k, v in p["persistent"].items()))
        top = list(p["saved_per_token_by_module"].items())[:12]
        print("   saved per token by module (KiB): " + ", ".join(f"{m} {v / 2**10:.1f}" for m, v in top))
        top = list(p["saved_per_token_by_node"].items())[:12]
        print("   saved per token by autograd node (KiB): " + ", ".join(f"{m} {v / 2**10:.1f}" for m, v in top))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"runs": runs, "projection": proj, "argv": sys.argv[1:],
                                           "torch": torch.__version__}, indent=1))
    return runs, proj


if __name__ == "__main__":
    main()
