"""benchmarks/comfy_product.py (the product-path GPU benchmark) run on the CPU at a tiny size through the
same code path: ComfyUI's loader and comfy.sample.sample, the pack's Load Compressed DiT + sparse patch.
Checks the result file's schema and that (Q)'s steps did what the SparseSettings schedule says."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from comfy_env import require_comfyui

ROOT = Path(__file__).resolve().parents[1]
STEPS = 9  # the standard schedule (above few_step_max = 8): dense, refresh, reuse x 4, refresh, reuse x 2


def _module():
    spec = importlib.util.spec_from_file_location("comfy_product_under_test", ROOT / "benchmarks" / "comfy_product.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _check_targets(data):
    names = [t["name"] for t in data["targets"]]
    lora = any(r["config"] == "QL" for r in data["runs"])  # the LoRA row only where (QL) ran
    qi = any(r["config"] == "QI" for r in data["runs"])      # the INT8 row only where (QI) ran
    core = any(r["config"] == "C" for r in data["runs"])     # the core-alone row only where (C) ran
    kitchen = sum(any(r["config"] == c for r in data["runs"]) for c in ("AK", "QK"))  # ComfyUI's INT8 rows
    n = 7 + lora + qi + core + kitchen
    assert len(names) == n and len(set(names)) == n
    for t in data["targets"]:
        assert set(t) >= {"name", "measured", "target", "met"}
        if t["measured"] is None:
            assert t["met"] is False and t["note"].startswith("not measured")


def test_cpu_run_schema_and_schedule(tmp_path):
    root = require_comfyui()
    out = tmp_path / "product.json"
    env = dict(os.environ, COMFYUI_PATH=str(root), CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "comfy_product.py"), "--device", "cpu", "--preset", "test",
           "--configs", "A,AK,Q,C,QI,QK,QL", "--loras", "2", "--lora-rank", "4", "--resolutions", "256x256x5", "--steps", str(STEPS), "--text-tokens", "16",
           "--no-warm-run", "--ckpt", str(tmp_path / "q.safetensors"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert {"run", "date", "device", "versions", "command", "runs", "tables", "targets", "notes"} <= set(data)
    assert data["versions"]["comfyui"] and data["comfyui"]["in_process"]
    _check_targets(data)
    runs = {r["config"]: r for r in data["runs"]}
    for config in ("AK", "QK"):  # ComfyUI's kitchen INT8 attention: refused with the reason on this ComfyUI / CPU
        refused = runs.pop(config)
        assert not refused["completed"] and "load failed" in refused["error"], refused
        assert "ComfyUI >= 0.33" in refused["error"] or "CUDA extension" in refused["error"], refused
    assert set(runs) == {"A", "Q", "C", "QI", "QL"}
    assert runs["QI"]["sparse_settings"]["int8_attention"] and not runs["Q"]["sparse_settings"]["int8_attention"]
    loras = runs["QL"]["loras"]  # every block linear, quantized ones included, carries both LoRAs
    assert loras["count"] == 2 and loras["layers"] >= 10 and loras["patched_layers"] == loras["layers"]
    lora = next(t for t in data["targets"] if t["name"].startswith("3 stacked LoRAs"))
    seconds = {c: sum(s["s"] for s in runs[c]["per_step"]) for c in ("QL", "Q")}  # unrounded (steps of ~10 ms)
    assert lora["measured"] == pytest.approx(seconds["QL"] / seconds["Q"], rel=0.01)
    for r in runs.values():
        assert r["completed"] and r["output_finite"], r
        assert len(r["per_step"]) == STEPS and all(s["s"] > 0 for s in r["per_step"])
        assert r["schedule_s"] == pytest.approx(sum(s["s"] for s in r["per_step"]), abs=0.05)

    from quantsparse_core.sparse.ssar import SparseSettings
    coarse, _ = _module().step_kinds(SparseSettings(), STEPS)
    assert coarse == ["dense", "refresh", "reuse", "reuse", "reuse", "reuse", "refresh", "reuse", "reuse"]
    q = runs["Q"]
    assert [s["kind"] for s in runs["QL"]["per_step"]] == coarse
    assert [s["kind"] for s in q["per_step"]] == coarse
    assert [s["observed"] for s in q["per_step"]] == coarse  # what SSAR did in each model call
    assert q["kinds_match_schedule"] and set(q["per_kind"]) == {"dense", "refresh", "reuse"}
    assert any("sparse attention calls" in line for line in q["sparse_log"])
    assert all(s["observed"] is None for s in runs["A"]["per_step"])
    c = runs["C"]   # quantsparse_core alone on the same checkpoint: the same schedule, observed through its SSAR
    assert [s["observed"] for s in c["per_step"]] == coarse and c["kinds_match_schedule"]
    core = next(t for t in data["targets"] if t["name"].startswith("(Q) inside ComfyUI within 5%"))
    assert core["measured"] == pytest.approx(sum(s["s"] for s in q["per_step"]) / sum(s["s"] for s in c["per_step"]),
                                             rel=0.01)

    merged = tmp_path / "merged.json"
    _module().merge([out, out], merged)  # no ComfyUI import: merging is pure bookkeeping
    m = json.loads(merged.read_text())
    assert len(m["runs"]) == 14
    _check_targets(m)


def _run(config, res, n, schedule=50, step_s=1.0, cap=None, kinds=None):
    per = [dict(i=i, s=step_s, kind=(kinds[i] if kinds else "dense")) for i in range(n)]
    return dict(label=f"{config}@{res}", config=config, resolution=res, cap_gb=cap, schedule_steps=schedule,
                completed=True, per_step=per, peak_allocated_gb=20.0,
                stall=dict(worst_ratio=1.0, worst_step=0, worst_kind="dense"))


def test_targets_from_runs():
    mod = _module()
    from quantsparse_core.sparse.ssar import SparseSettings
    kinds, _ = mod.step_kinds(SparseSettings(), 50)
    assert kinds.count("dense") == 5 and kinds.count("refresh") == 9 and kinds.count("reuse") == 36
    runs = [_run("A", "720p", 3, step_s=30.0), _run("Q", "720p", 50, step_s=9.0, kinds=kinds),
            _run("A", "544p", 50, step_s=10.0), _run("A8", "544p", 50, step_s=11.0),
            _run("Q", "544p", 50, step_s=4.0, kinds=kinds), _run("Q", "544p", 50, step_s=5.0, cap=24.0, kinds=kinds)]
    t = {x["name"]: x for x in mod.targets(runs)}
    r720 = t["(Q) vs (A), 720p/129f, 50-step sampling wall-clock"]
    assert r720["measured"] == pytest.approx(1500 / 450, abs=1e-3) and r720["met"]
    assert "timed over 3 of 50 steps" in r720["note"]
    assert t["(Q) vs (A), 544p/129f, 50-step sampling wall-clock"]["measured"] == pytest.approx(2.5)
    assert not t["(Q) vs (A), 544p/129f, 50-step sampling wall-clock"]["met"]
    assert t["(Q) vs (A8), 544p/129f, 50-step sampling wall-clock"]["met"]
    assert t["(Q) completes 50 steps at 544p/129f within 24 GB"]["met"]
    assert t["(Q) completes 50 steps at 544p/129f within 16 GB"]["measured"] is None
    assert not t["(Q) completes 50 steps at 720p/129f within 24 GB"]["met"]
    stall = t["no step slower than 1.2x its kind's median (measured 50-step runs)"]
    assert stall["met"] and stall["measured"] == 1.0
    assert not any("(QI)" in name or "(A8F)" in name for name in t)  # those rows appear where their configs ran
    fast = {x["name"]: x for x in mod.targets(runs + [_run("A8F", "544p", 3, step_s=9.0)])}
    row = fast["(Q) vs (A8F), 544p/129f, 50-step sampling wall-clock"]
    assert row["measured"] == pytest.approx(450 / 200, abs=1e-3) and not row["met"] and "timed over 3 of 50" in row["note"]
    ck = {x["name"]: x for x in mod.targets(runs + [_run("AK", "544p", 3, step_s=7.0)])}
    row = ck["(Q) vs (AK), 544p/129f, 50-step sampling wall-clock: faster than ComfyUI's comfy kitchen INT8 attention"]
    assert row["measured"] == pytest.approx(350 / 200, abs=1e-3) and row["met"] and "AK timed over 3 of 50" in row["note"]
    qi = {x["name"]: x for x in mod.targets(runs + [_run("QI", "720p", 50, step_s=7.0, kinds=kinds)])}
    row = qi["(QI) vs (A), 720p/129f, 50-step sampling wall-clock (INT8 dense passes)"]
    assert row["measured"] == pytest.approx(1500 / 350, abs=1e-3) and row["met"] and "(QI) 350.0 s" in row["note"]


def test_wan_cpu_run_through_comfyuis_wanmodel(tmp_path):
    """--preset wan-test: ComfyUI's WanModel dense (A) and through Load Compressed DiT + the sparse patch (Q);
    (Q) runs the fused Wan blocks, every self-attention call is counted by SSAR, and Wan's own target rows apply."""
    root = require_comfyui()
    out = tmp_path / "wan.json"
    env = dict(os.environ, COMFYUI_PATH=str(root), CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "comfy_product.py"), "--device", "cpu", "--preset", "wan-test",
           "--configs", "A,Q", "--resolutions", "128x128x5", "--steps", str(STEPS), "--text-tokens", "16",
           "--no-warm-run", "--ckpt", str(tmp_path / "wq.safetensors"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    runs = {r["config"]: r for r in data["runs"]}
    assert set(runs) == {"A", "Q"} and all(r["completed"] and r["output_finite"] for r in runs.values())
    q = runs["Q"]
    assert q["fused_blocks"] is True and q["tokens"] == 2 * 8 * 8  # video tokens only: Wan's self-attention
    assert q["fused_block_calls"] == {"wan": 2 * STEPS}  # both blocks fused at every timed step, no fallback
    from quantsparse_core.sparse.ssar import SparseSettings
    coarse, _ = _module().step_kinds(SparseSettings(), STEPS)
    assert [s["observed"] for s in q["per_step"]] == coarse and q["kinds_match_schedule"]
    names = [t["name"] for t in data["targets"]]
    assert names == [t[0] for t in _module().WAN_TARGETS]
    ratio = data["targets"][0]
    assert ratio["measured"] is None and "wan720p" in ratio["note"]


def test_timed_steps_are_the_first_steps_of_the_real_schedule_after_a_warm_up_of_every_kind(tmp_path):
    """--timed-steps N stops after N steps of the --steps schedule: the sparse plan is the full schedule's
    (dense warm-up first), not one planned for N steps. The warm-up before it: a tiny run, one step of the real
    schedule at the timed latent, and 4 steps there on the compact schedule that reaches every step kind
    (refresh, reuse, refresh, second-order reuse), which leaves the timed run's schedule as it was."""
    root = require_comfyui()
    out = tmp_path / "short.json"
    env = dict(os.environ, COMFYUI_PATH=str(root), CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "comfy_product.py"), "--device", "cpu", "--preset", "test",
           "--configs", "Q", "--resolutions", "256x256x5", "--steps", "20", "--timed-steps", "4", "--text-tokens", "16",
           "--ckpt", str(tmp_path / "q.safetensors"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    q = json.loads(out.read_text())["runs"][0]
    from quantsparse_core.sparse.ssar import SparseSettings
    kinds = SparseSettings(schedule="standard").plan(20).kinds()[:4]
    assert kinds == ["dense", "dense", "refresh", "reuse"]  # 20 steps: 2 dense warm-up steps
    assert q["completed"] and q["output_finite"] and len(q["per_step"]) == 4
    assert [s["observed"] for s in q["per_step"]] == kinds and q["kinds_match_schedule"]
    jobs = q["warm_jobs"]
    assert len(jobs) == 3 and not q.get("warm_error")
    assert jobs[1]["kinds"] == ["dense"] and jobs[2]["kinds"] == ["refresh", "reuse", "refresh", "reuse"]
    assert all("triton_compiles" in j or not j.get("triton_kernels") for j in jobs)


def test_a_four_step_run_samples_the_few_step_schedule_through_comfyui(tmp_path):
    """--steps 4: (Q) runs what the Sparse Sampler runs at 4 steps (few-step: refresh, reuse, refresh, reuse, seen
    in each model call). The 4-step row's arithmetic is tested above (its resolution, 720p, is too big here).
    --profile-steps 1 profiles that one step."""
    root = require_comfyui()
    out = tmp_path / "four.json"
    env = dict(os.environ, COMFYUI_PATH=str(root), CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "comfy_product.py"), "--device", "cpu", "--preset", "test",
           "--configs", "Q", "--resolutions", "256x256x5", "--steps", "4", "--text-tokens", "16",
           "--no-warm-run", "--profile-steps", "1", "--ckpt", str(tmp_path / "q.safetensors"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    runs = {r["config"]: r for r in data["runs"]}
    assert [s["observed"] for s in runs["Q"]["per_step"]] == ["refresh", "reuse", "refresh", "reuse"]
    assert runs["Q"]["profiled_steps"] == [1] and list(runs["Q"]["step_profiles"]) == ["1"]   # the reuse step
    assert runs["Q"]["step_profiles"]["1"]["top"] and runs["Q"]["step_profiles"]["1"]["wall_s"] > 0
    assert runs["Q"]["sparse_settings"]["schedule"] == "auto" and runs["Q"]["kinds_match_schedule"]
    assert runs["Q"]["completed"] and runs["Q"]["output_finite"]


def test_kitchen_cuda_extension_is_unpacked_where_the_carried_kitchen_looks(tmp_path, monkeypatch, rng):
    """The carried xz file is decompressed once into comfy_kitchen/backends/cuda/ (byte for byte), and left
    alone when the extension is there; without the package or the file it only says so."""
    import lzma
    mod = _module()
    import torch
    payload = torch.randint(0, 256, (300_000,), generator=rng, dtype=torch.uint8).numpy().tobytes()
    xz = tmp_path / "carry" / "_C.abi3.so.xz"
    xz.parent.mkdir()
    xz.write_bytes(lzma.compress(payload))
    pkg = tmp_path / "site" / "comfy_kitchen"
    (pkg / "backends" / "cuda").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    monkeypatch.setattr(mod, "KITCHEN_CUDA_XZ", xz)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "comfy_kitchen", raising=False)
    assert mod.unpack_kitchen_cuda().startswith("unpacked")
    target = pkg / "backends" / "cuda" / "_C.abi3.so"
    assert target.read_bytes() == payload
    assert mod.unpack_kitchen_cuda().startswith("present")
    target.unlink()
    xz.unlink()
    assert mod.unpack_kitchen_cuda().startswith("missing")


def test_kitchen_attention_baseline_is_set_as_comfyuis_node_sets_it_or_refused(monkeypatch):
    """(AK): ComfyUI's registered "comfy_kitchen_int8" attention put on the patcher through
    set_model_optimized_attention (what its ModelAttentionBackend node does); a ComfyUI without the registry
    (< 0.33) or without kitchen's INT8 kernel is refused with the reason."""
    import sys
    import types
    mod = _module()
    calls = []

    class Patcher:
        def set_model_optimized_attention(self, fn):
            calls.append(fn)

    def kitchen(*a, **k):
        return None
    attention = types.ModuleType("comfy.ldm.modules.attention")
    for name in ("comfy", "comfy.ldm", "comfy.ldm.modules"):
        monkeypatch.setitem(sys.modules, name, sys.modules.get(name) or types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "comfy.ldm.modules.attention", attention)
    monkeypatch.setattr(sys.modules["comfy.ldm.modules"], "attention", attention, raising=False)
    with pytest.raises(RuntimeError, match="needs ComfyUI >= 0.33"):
        mod.use_kitchen_attention(Patcher())
    attention.get_attention_function = lambda name, default=None: {"pytorch": print}.get(name, default)
    with pytest.raises(RuntimeError, match="CUDA extension"):
        mod.use_kitchen_attention(Patcher())
    attention.get_attention_function = lambda name, default=None: {"comfy_kitchen_int8": kitchen}.get(name, default)
    assert mod.use_kitchen_attention(Patcher()) == "comfy_kitchen_int8" and calls == [kitchen]


def test_stall_trace_names_the_arguments_that_made_a_compile(rng):
    """A compile during a timed step is explained by the arguments whose specialisation differs from the
    nearest earlier compile of the same kernel (Triton's compile-hook repr, nested brackets and quotes kept)."""
    import torch
    mod = _module()
    log = mod.CompileLog()  # the process's own (mod.compile_log()) would install Triton's hook here
    warm_trace = mod.StallTrace(cuda=False, log=log)

    class Info:  # what Triton passes as fn: JitFunctionInfo(module, name, jit_function)
        name = "_sparse_attn_fwd"

    names = [f"a{i}" for i in range(8)]
    specs = {n: f"('i32', '{'D' if i % 2 else ''}')" for i, n in enumerate(names)}
    specs["Q"], specs["ROW64"] = "('*bf16', 'D')", "('constexpr', False)"

    def repr_of(spec):
        return "_sparse_attn_fwd[num_warps=8, num_ctas=1](" + ", ".join(f"{k}: {v}" for k, v in spec.items()) + ")"

    assert mod.kernel_args(repr_of(specs)) == specs
    log.hook(key=1, repr=repr_of(specs), fn=Info())  # e.g. compiled by the warm-up run, before the timed run
    first = warm_trace.take()
    assert "triton_new_specialisations" not in first or not first["triton_new_specialisations"]
    log.hook(key=1, repr=repr_of(specs), fn=Info())
    trace = mod.StallTrace(cuda=False, log=log)  # the timed run: earlier compiles are not its events ...
    assert trace.take().get("triton_compiles", 0) == 0
    changed = dict(specs)
    pick = names[int(torch.randint(0, len(names), (1,), generator=rng))]
    changed[pick] = "('i32', '')" if "D" in specs[pick] else "('i32', 'D')"
    changed["ROW64"] = "('constexpr', True)"
    log.hook(key=2, repr=repr_of(changed), fn=Info())  # ... but its compile is compared with them
    out = trace.take()["triton_new_specialisations"]
    assert out == [dict(kernel="_sparse_attn_fwd", differs=sorted(
        [f"{pick}: {specs[pick]} -> {changed[pick]}", "ROW64: ('constexpr', False) -> ('constexpr', True)"]))]
    assert mod.kernel_args("not a repr") == {}
    # a warm-up run's steps summed: its compiles and what made them new end up in the run's warm_compiles
    counts = torch.randint(0, 5, (3,), generator=rng).tolist()
    events = [dict(triton_compiles=counts[0], triton_kernels=["_tile8", "_sparse_attn_fwd"],
                   triton_new_specialisations=out), {},
              dict(triton_compiles=counts[1], triton_kernels=["_gram"]), dict(triton_compiles=counts[2])]
    assert mod.warm_compiles(events) == dict(triton_compiles=sum(counts),
                                             triton_kernels=["_gram", "_sparse_attn_fwd", "_tile8"],
                                             triton_new_specialisations=out)


def test_few_step_runs_are_scored_against_the_baseline_at_their_own_step_count(rng):
    """A 4- or 8-step (Q) run (few-step schedule) against a dense baseline timed over a few steps of a 50-step
    schedule: the baseline counted over the same number of steps (its measured ones, then its median step);
    the 50-step rows never take a few-step run."""
    import torch
    mod = _module()
    from quantsparse_core.sparse.ssar import SparseSettings
    kinds4, fine4 = mod.step_kinds(SparseSettings(), 4)
    assert kinds4 == ["refresh", "reuse", "refresh", "reuse"] and fine4 == ["refresh1", "reuse", "refresh1", "reuse"]
    assert mod.step_kinds(SparseSettings(schedule="standard"), 4)[0] == ["refresh", "reuse", "reuse", "reuse"]
    a_steps = (25.0 + 10.0 * torch.rand(3, generator=rng)).tolist()
    base = _run("A", "720p", 3)
    for st, x in zip(base["per_step"], a_steps):
        st["s"] = x
    q4 = _run("Q", "720p", 4, schedule=4, step_s=float(5.0 + 10.0 * torch.rand(1, generator=rng)), kinds=kinds4)
    q8 = _run("Q", "720p", 8, schedule=8, step_s=30.0, kinds=mod.step_kinds(SparseSettings(), 8)[0])
    t = {x["name"]: x for x in mod.targets([base, q4, q8])}
    r4 = t["(Q) vs (A), 720p/129f, 4-step sampling wall-clock (few-step schedule)"]
    want = (sum(a_steps) + sorted(a_steps)[1]) / (4 * q4["per_step"][0]["s"])
    assert r4["measured"] == pytest.approx(want, abs=1e-3) and r4["met"] == (want >= 2.0)
    r8 = t["(Q) vs (A), 720p/129f, 8-step sampling wall-clock (few-step schedule)"]
    assert r8["measured"] == pytest.approx((sum(a_steps) + 5 * sorted(a_steps)[1]) / 240.0, abs=1e-3)
    assert not r8["met"]
    r50 = t["(Q) vs (A), 720p/129f, 50-step sampling wall-clock"]
    assert r50["measured"] is None and "50-step" in r50["note"]


def test_kernel_lazy_flag_reaches_the_kernels_the_dispatch_calls():
    """--kernel-lazy turns on LAZY in the kernels package quantsparse_core.dispatch launches from (one import
    name, whoever imports it), and off again."""
    mod = _module()
    from quantsparse_core import dispatch
    import importlib
    try:
        mods = mod.set_kernel_lazy(True)
        assert [m.__name__ for m in mods] == [f"{dispatch.PACKAGE}.sparse_attention", f"{dispatch.PACKAGE}.int8_attention"]
        assert all(importlib.import_module(m.__name__).LAZY is True for m in mods)
    finally:
        mods = mod.set_kernel_lazy(False)
    assert not any(m.LAZY for m in mods)


def test_step_profiler_summarises_the_listed_steps_with_their_host_syncs(rng):
    """benchmarks/step_profile.py on the CPU: only the listed steps are profiled (begin/end as the step callback
    calls them), each summary counts the host reads of tensor values (item() -> _local_scalar_dense) and lists
    the matmuls among its operators."""
    _module()  # puts benchmarks/ on sys.path
    import torch
    from step_profile import StepProfiler
    prof = StepProfiler([1], cuda=False)
    n_items = int(torch.randint(2, 6, (1,), generator=rng))
    x = torch.randn(64, 64, generator=rng)
    prof.begin(0)                          # not listed: nothing starts
    for step in range(3):
        for _ in range(n_items if step == 1 else 1):
            float((x @ x).sum().item())
        prof.end(step)
        prof.begin(step + 1)
    prof.close()
    out = prof.summaries()
    assert list(out) == ["1"]
    s = out["1"]
    assert s["syncs"].get("aten::_local_scalar_dense") == n_items and s["sorted_by"] == "cpu_ms"
    mm = [r for r in s["top"] if r["op"] in ("aten::mm", "aten::matmul")]
    assert mm and all(r["count"] == n_items for r in mm)
    # and where they come from: this test's line that reads the value (where this torch's profiler records
    # Python frames: 2.13 does; 2.9.1 on a CPU-only build records none, and every source reads "?")
    src = [r for r in s["sync_sources"] if r["op"] == "aten::_local_scalar_dense"]
    assert len(src) == 1 and src[0]["count"] == n_items, src
    if src[0]["where"] == "?":
        pytest.skip(f"torch {torch.__version__}'s profiler recorded no Python frames: callers not checked")
    assert "test_comfy_product_benchmark.py" in src[0]["where"], src
