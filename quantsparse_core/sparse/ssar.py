"""SSAR: second-order sparse attention reparameterization (METHOD.md §4), as a model attention_fn.

Every `tau` steps (a refresh step) a joint block computes full and SVG-sparse attention, outputs the
exact full attention and caches the residual C = D + SVD_r(D - D_prev), D = O_full - O_sparse. In
between it outputs O_sparse(t) + C with the refresh step's block mask. Use as

    ssar = SSARAttention(SparseSettings(density=0.15))
    with model.attention(ssar):
        sample_euler(model, ...)

State is per (block_type, block_index, batch size), so cond and uncond may arrive batched together
or as separate calls of different batch sizes. It is dropped by `reset()`, and automatically when a
call's step index is lower than the last one seen (a new sampling run starts at step 0 again).

Which steps are dense, refreshed or reused follows a StepPlan (`SparseSettings.plan(num_steps)`), from
the step count the sampler passes in: the standard schedule (dense warm-up, refresh every tau steps),
or for short runs of distilled models the few-step schedule (see SparseSettings.schedule).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from ..dispatch import (PRECISIONS, Correction, block_sparse_attention, int8_dense_attention, int8_rows,
                        quantized_dense_attention, refresh_attention, residual_kernel)
from ..hostmem import pinnable_host_bytes
from ..models.attention import AttentionCall, allowed_keys, dense_attention, without_padded_keys
from .cache import CacheStore, check_policy, choose_placement, working_bytes
from .host_eigh import TopVectorsJob
from .low_rank import factor_rank, gram_matrices, heads_first, project, truncated_factors
from .masks import BLOCK, BlockMask, check_density, svg_masks

ORDERS = (0, 1, 2)
SCHEDULES = ("auto", "standard", "few-step", "sparse-only")
FEW_STEP_MAX = 8    # "auto" runs the few-step schedule at this many steps or fewer (measured: see SparseSettings)
FEW_STEP_TAU = 2    # the few-step schedule refreshes every other step, from step 0
FEW_STEP_ORDER = 1  # ... with the first-order correction only (see SparseSettings)

log = logging.getLogger("quantsparse")


def _gb(n) -> str:
    return "unlimited" if n is None or n == float("inf") else f"{n / 1e9:.1f} GB"


@dataclass
class SparseSettings:
    """density: kept fraction of attention; tau: refresh interval in steps; svd_rank: rank of the
    second-order denoising (0 = plain second order); order: 0 no cache, 1 first-, 2 second-order;
    warmup_steps: dense first steps (None = round(0.1 * num_steps)); warmup_blocks: dense first joint
    blocks, double then single; n_rows/block/seed: SVG head classification; placement: cache policy
    ("auto" picks from budget_bytes, default free CUDA memory, and for the cpu-pinned placement
    host_budget_bytes, default on CUDA the host memory available minus hostmem.HOST_RESERVE_BYTES:
    a cache the host cannot hold goes low-rank instead); placement_rank: rank of the
    "low-rank" placement; layers: joint blocks for the auto budget (None = counted from calls);
    host_eigh: the rank-r truncation's eigendecompositions on a host thread, overlapped with the GPU
    (None = when the residual is on CUDA; see host_eigh.py), its D2 kept in the cache meanwhile;
    merged_refresh: a refresh's full attention as the sparse kernel over the mask and over its
    complement merged by log-sum-exp, one read of the keys (kernels/refresh_attention.py), instead of
    dense SDPA plus a second sparse pass. Off by default: on an H200 at 720p / 15% it took 367 ms per
    layer against 361 for cuDNN + the sparse pass (benchmarks/results/, run 10); with the kernel's TMA
    key tiles 339.8 against 356.7 on an H100 (2026-12-07, kernel alone), which in ComfyUI's 720p sampling
    (config QM, 4 steps) saved only 0.14 s of a 24-s refresh step. Without Triton it runs the kernel's PyTorch
    reference.

    schedule: which steps are dense, refreshed or reused, resolved per run from the step count the
    sampler passes in (StepPlan). "standard": warmup_steps dense steps, then a refresh every tau steps
    (the paper's). "few-step": step 0 is already a refresh (dense output + residual), then a refresh
    every FEW_STEP_TAU = 2 steps with a first-order correction in between; tau, warmup_steps and order
    above apply to "standard" only. "sparse-only": a dense first step, then a fresh SVG mask every
    step and no residual cache (no cache memory at all). "auto" (default): "few-step" for runs of at
    most few_step_max steps, else "standard". Why: the standard schedule gives a short run one
    refresh at most (4 steps: the one at step 0, then 3 steps on that stale correction).
    Measured (benchmarks/few_step_fidelity.py, tiny model, W4A8 + 15%, 3 prompts, PSNR vs FP dense;
    attention cost = attention_cost()): 4 steps few-step 30.5 dB at 0.75 vs standard 26.4 at 0.56 and
    sparse-only 21.7 at 0.54; 8 steps 28.7 / 23.5 / 21.4 dB at 0.75 / 0.64 / 0.47; 50 steps standard
    26.5 dB at 0.57, few-step 27.6 at 0.75: past a few refreshes per run the standard schedule is within
    ~1 dB for a quarter less attention, hence auto's threshold few_step_max = 8 (measured at 4, 8, 50;
    the crossover between 8 and 50 is not located). Second order at tau 2 lost 2-3 dB to first order
    at 4-8 steps (27.3 / 26.4 dB): D2 between refreshes far apart in sigma extrapolates the wrong drift.

    int8_attention: the dense passes inside the run (dense warm-up steps, the dense first blocks, a
    refresh's full output) compute Q.K^T in INT8 (dispatch.int8_dense_attention: K smoothed by its mean,
    per-block scales, fp32 softmax, P.V in V's dtype), so the refresh residual D = O_full - O_sparse
    carries that rounding too. Attention outside a sampling run and masks that are not key padding stay
    on dense_attention; merged_refresh keeps its own (bf16) kernel.

    host_attention: the same dense passes run the host's attention where the call brings one
    (AttentionCall.dense; ComfyUI: the attention it is set to, e.g. comfy kitchen's INT8 attention with
    --use-ck-attention or a Model Attention Backend node), so a faster stock kernel serves the ~60% of a
    50-step run that is dense; a refresh then takes its full output from it and a sparse pass (not
    merged_refresh), D carrying the host kernel's rounding. Takes precedence over int8_attention.

    attention_precision: "bf16" (default), "int8" or "int8-fp8": every pass of the run, sparse and dense,
    on the block-sparse kernel with Q.K^T from INT8 codes (Q per token, K minus its mean per mask block) and,
    for "int8-fp8", P.V in float8 e4m3 (P x 448, V per channel): a dense pass is that kernel over every
    key block and a refresh its runs over the mask and the complement merged (merged_refresh's one read
    of the keys), so O_full and O_sparse round alike and D = O_full - O_sparse carries no mismatch
    between two kernels. Takes precedence over int8_attention; host_attention still serves dense
    passes where the call brings one. Measured: within 0.6 dB of bf16 attention at 50 steps on the tiny
    model, but not faster than the bf16 kernel on an H100 in its first version (docs/BENCHMARKS.md), hence
    off by default and not in the nodes."""
    density: float = 0.15
    tau: int = 5
    svd_rank: int = 16
    order: int = 2
    warmup_steps: Optional[int] = None
    warmup_blocks: int = 1
    n_rows: int = 64
    block: int = BLOCK
    seed: int = 0
    placement: str = "auto"
    budget_bytes: Optional[int] = None
    host_budget_bytes: Optional[int] = None
    placement_rank: int = 16
    layers: Optional[int] = None
    host_eigh: Optional[bool] = None
    merged_refresh: bool = False
    int8_attention: bool = False
    host_attention: bool = False
    attention_precision: str = "bf16"
    schedule: str = "auto"
    few_step_max: int = FEW_STEP_MAX

    def __post_init__(self):
        self.density = check_density(self.density)
        if isinstance(self.tau, bool) or int(self.tau) != self.tau or self.tau < 1:
            raise ValueError(f"refresh interval tau must be an integer >= 1, got {self.tau!r}")
        if self.order not in ORDERS:
            raise ValueError(f"unknown SSAR order {self.order!r}; use 0 (no cache), 1 (first) or 2 (second order)")
        if int(self.svd_rank) != self.svd_rank or self.svd_rank < 0:
            raise ValueError(f"svd_rank must be an integer >= 0 (0 = no SVD denoising), got {self.svd_rank!r}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.warmup_blocks < 0:
            raise ValueError(f"warmup_blocks must be >= 0, got {self.warmup_blocks}")
        if self.n_rows < 1 or self.block < 1:
            raise ValueError(f"n_rows and block must be >= 1, got {self.n_rows} and {self.block}")
        check_policy(self.placement)
        if self.attention_precision not in PRECISIONS:
            raise ValueError(f"unknown attention_precision {self.attention_precision!r}; use one of {', '.join(PRECISIONS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown sparse schedule {self.schedule!r}; use one of {', '.join(SCHEDULES)}")
        if isinstance(self.few_step_max, bool) or int(self.few_step_max) != self.few_step_max or self.few_step_max < 0:
            raise ValueError(f"few_step_max must be an integer >= 0 (0 = auto never picks few-step), got {self.few_step_max!r}")

    def resolved_schedule(self, num_steps: int) -> str:
        """The schedule a run of `num_steps` sampling steps uses: "auto" resolved by the step count."""
        if self.schedule != "auto":
            return self.schedule
        return "few-step" if num_steps <= self.few_step_max else "standard"

    def plan(self, num_steps: int) -> "StepPlan":
        """What each step of a `num_steps`-step run does under these settings."""
        schedule = self.resolved_schedule(num_steps)
        if schedule == "few-step":
            return StepPlan(schedule, num_steps, warmup_steps=0, tau=FEW_STEP_TAU, order=min(self.order, FEW_STEP_ORDER))
        if schedule == "sparse-only":
            return StepPlan(schedule, num_steps, warmup_steps=min(1, num_steps), tau=1, order=0, remask=True)
        w = int(round(0.1 * num_steps)) if self.warmup_steps is None else int(self.warmup_steps)
        return StepPlan(schedule, num_steps, warmup_steps=w, tau=int(self.tau), order=self.order)


@dataclass(frozen=True)
class StepPlan:
    """One run's step schedule (the dense first `warmup_blocks` joint blocks aside, which every schedule
    keeps). kind(i) of step i: "dense" (warm-up: full attention, nothing cached), "refresh" (full
    attention output; new mask; with order > 0 a new residual), "reuse" (block-sparse with the last
    refresh's mask + its correction when order > 0), "sparse" (a fresh mask from this step's q/k,
    block-sparse, no correction: remask)."""
    schedule: str
    num_steps: int
    warmup_steps: int
    tau: int
    order: int
    remask: bool = False

    def kind(self, index: int) -> str:
        if index < self.warmup_steps:
            return "dense"
        if self.remask:
            return "sparse"
        return "refresh" if (index - self.warmup_steps) % self.tau == 0 else "reuse"

    def kinds(self) -> list:
        return [self.kind(i) for i in range(self.num_steps)]


@dataclass
class _BlockState:
    """One block and batch size: the refresh step's mask, and whether D / the correction are stored."""
    mask: Optional[BlockMask] = None
    density: float = 1.0  # the mask's, read once per refresh: on a GPU mask each read syncs the host
    has_d: bool = False
    corr: Optional[str] = None  # None, "factors" (rank-r SVD of D2), "full" (D2 itself, rank 0) or
    # "pending" (D2 stored, its factors' eigenvectors being computed on the host thread)
    stats: Dict = field(default_factory=dict)


class SSARAttention:
    """attention_fn(q, k, v, mask, call) -> [B, L, H*D] applying SVG sparsity with the SSAR cache."""

    def __init__(self, settings: Optional[SparseSettings] = None):
        self.settings = settings or SparseSettings()
        self.placement: Optional[str] = None if self.settings.placement == "auto" else self.settings.placement
        self.reset()

    def reset(self) -> None:
        """Forget masks, caches, statistics and the chosen auto placement (start of a new video)."""
        for job in getattr(self, "_pending", {}).values():
            job.cancel()  # queued jobs of the old run would delay the new run's
        self._states: Dict = {}
        self._order: list = []  # block keys in the order the model calls them
        self._store: Optional[CacheStore] = None
        self._last_step: Optional[int] = None
        self._num_blocks: Dict[str, int] = {}
        self._step_batch: Dict = {}
        self._max_batch = 1
        self._pending: Dict = {}  # block key -> TopVectorsJob of its D2 (host_eigh)
        if self.settings.placement == "auto":
            self.placement = None
        self._plan: Optional[StepPlan] = None
        # dense / sparse: attention calls (x batch entries); sparse_density: their masks' densities summed;
        # refresh: the dense calls that refreshed; refresh_sparse: the refreshes' sparse passes (densities);
        # profile: SVG mask selection, in dense-call units (see attention_cost); int8_dense: dense passes run in INT8;
        # quantized_dense: dense passes on the quantised block-sparse kernel (attention_precision)
        self.stats = dict(dense=0.0, sparse=0.0, sparse_density=0.0, refresh=0.0, mask_changed=0.0,
                          refresh_sparse=0.0, profile=0.0, int8_dense=0.0, host_dense=0.0, quantized_dense=0.0)

    def _rows_generator(self, call: AttentionCall) -> torch.Generator:
        """SVG's sampled query rows depend only on the seed and the block, so a refresh on unchanged
        inputs reproduces the same mask, whatever order cond/uncond calls come in."""
        kind = ("double", "single").index(call.block_type) if call.block_type in ("double", "single") else 2
        return torch.Generator().manual_seed(int(self.settings.seed) * 1_000_003 + kind * 10_007 + call.block_index)

    # ---- bookkeeping ------------------------------------------------------------------------------
    def plan(self, num_steps: int) -> StepPlan:
        """The run's StepPlan (kept: resolved once per run and step count)."""
        if self._plan is None or self._plan.num_steps != num_steps:
            self._plan = self.settings.plan(num_steps)
        return self._plan

    def _block_position(self, call: AttentionCall) -> int:
        """Index among joint blocks, double blocks first (single blocks follow all double blocks)."""
        return call.block_index + (self._num_blocks.get("double", 0) if call.block_type == "single" else 0)

    def _observe(self, call: AttentionCall, batch: int) -> None:
        idx = call.step.index
        if self._last_step is not None and idx < self._last_step:
            self.reset()  # a new sampling run: stale caches would corrupt it
        if self._last_step != idx:
            self._step_batch = {}
        self._last_step = idx
        self._num_blocks[call.block_type] = call.num_blocks
        key = (call.block_type, call.block_index)
        self._step_batch[key] = self._step_batch.get(key, 0) + batch
        self._max_batch = max(self._max_batch, self._step_batch[key])

    def _count(self, kind: str, batch: int, density: float = 1.0) -> None:
        self.stats[kind] += batch
        if kind == "sparse":
            self.stats["sparse_density"] += batch * density

    def effective_density(self) -> float:
        """Attention cost of the joint blocks relative to all-dense: full-attention evaluations
        (warm-up, refresh) count 1, reuse steps their mask density; weighted by batch entries."""
        calls = self.stats["dense"] + self.stats["sparse"]
        return 1.0 if calls == 0 else (self.stats["dense"] + self.stats["sparse_density"]) / calls

    def attention_cost(self) -> float:
        """All attention arithmetic of the joint blocks as a fraction of all-dense: effective_density
        plus what it leaves out, the sparse pass of each refresh that stores a residual (its mask's
        density; none with merged_refresh, whose two passes add up to one dense call) and SVG's mask
        selection (n sampled query rows' exact attention plus their two banded variants: (n / L) x
        (1 + density) of a dense call). A step's mask is counted as used by every block call."""
        s = self.stats
        calls = s["dense"] + s["sparse"]
        return 1.0 if calls == 0 else (s["dense"] + s["sparse_density"] + s["refresh_sparse"] + s["profile"]) / calls

    def _new_mask(self, q, k, v, mask, call: AttentionCall) -> BlockMask:
        """SVG's mask for this block and step, its selection's cost counted."""
        s = self.settings
        block_mask = svg_masks(q, k, v, mask, call.txt_len, call.grid, s.density, s.n_rows, s.block,
                               self._rows_generator(call))
        if s.density < 1.0:  # density 1 takes the dense mask without any selection
            length = q.shape[2]
            rows = min(s.n_rows, length - call.txt_len)
            self.stats["profile"] += q.shape[0] * rows / length * (1.0 + block_mask.density())
        return block_mask

    def _store_for(self, q: torch.Tensor) -> CacheStore:
        """Resolve "auto" once, at the first cache write, from the run's size seen so far."""
        if self._store is None:
            s = self.settings
            if self.placement is None:
                b, heads, length, dim = q.shape
                layers = s.layers or max(1, sum(self._num_blocks.values()) - s.warmup_blocks)
                budget, host_budget = s.budget_bytes, s.host_budget_bytes
                if budget is None and q.is_cuda:
                    budget = max(0, torch.cuda.mem_get_info(q.device)[0] - working_bytes(b, length, heads * dim))
                if host_budget is None and q.is_cuda:
                    host_budget = pinnable_host_bytes()
                order = self._plan.order if self._plan is not None else s.order
                self.placement = choose_placement(
                    length, heads * dim, layers, budget, self._max_batch, s.placement_rank, heads,
                    host_budget_bytes=host_budget, tensors=2 if order == 2 and s.svd_rank == 0 else 1,
                    factor_rank=s.svd_rank if order == 2 else 0)
                log.info("QuantSparse: SSAR cache placement %s (%d tokens x %d layers; device budget %s, host %s)",
                         self.placement, length, layers, _gb(budget), _gb(host_budget))
            self._store = CacheStore(self.placement, s.placement_rank)
        return self._store

    def _prefetch_after(self, key, device) -> None:
        """Start moving the next block's cached residual towards `device` (cpu-pinned placement), so
        its copy overlaps this block's attention instead of stalling the next one."""
        if self._store is None or len(self._order) < 2:
            return
        nxt = self._order[(self._order.index(key) + 1) % len(self._order)]
        self._store.prefetch((nxt, "D"), device)

    # ---- deferred rank-r factors (host_eigh) --------------------------------------------------------
    def _defer(self, key, d2: torch.Tensor, heads: int) -> None:
        """Queue D2's eigendecomposition on the host thread; keep D2 in the cache until it is back."""
        xh = heads_first(d2, heads)
        job = TopVectorsJob(gram_matrices(xh), factor_rank(self.settings.svd_rank, xh.shape[-2], xh.shape[-1]))
        self._store.put((key, "D2"), d2, heads)
        self._pending[key] = job

    def _settle(self, key=None) -> None:
        """Turn finished jobs (or, with `key`, that block's job, waiting for it) into stored factors."""
        for k in list(self._pending):
            job = self._pending[k]
            if k != key and (key is not None or not job.done()):
                continue
            del self._pending[k]
            try:
                v = job.result()
            except Exception as e:
                self._store.drop((k, "D2"))   # the block keeps D (first order) until its next refresh
                self._states[k].corr = None
                raise RuntimeError(f"SSAR: the rank-{self.settings.svd_rank} truncation of block {k[:2]}'s "
                                   f"second-order residual failed on the host thread ({e}); set host_eigh=False "
                                   "to run it inline, or svd_rank=0") from e
            d2 = heads_first(self._store.get((k, "D2"), v.device), v.shape[1])
            self._store.put_factors((k, "corr"), *project(d2, v))
            self._store.drop((k, "D2"))
            self._states[k].corr = "factors"

    def _cancel(self, key) -> None:
        if self._pending.pop(key, None) is not None:
            self._store.drop((key, "D2"))

    def correction(self, key, device) -> Optional[Correction]:
        """The correction C of block `key` on `device`, in the parts the cache holds (see correction.py)."""
        st = self._states.get(key)
        if st is None or not st.has_d:
            return None
        if st.corr == "pending":
            if key not in self._pending:
                raise RuntimeError(f"SSAR internal state: block {key[:2]} waits for factors no job computes")
            self._settle(key)
        parts = self._store.get_parts((key, "D"), device)
        if st.corr == "factors":
            us, vh = self._store.get_factors((key, "corr"), device)
            return Correction(**parts, us=us, vh=vh)
        if st.corr == "full":  # rank 0: D + D2 as one dense tensor
            return Correction(dense=Correction(**parts).materialize() + self._store.get((key, "corr"), device))
        return Correction(**parts)

    # ---- public views (diagnostics and tests) -----------------------------------------------------
    def block_mask(self, block_type: str, block_index: int, batch: int) -> Optional[BlockMask]:
        st = self._states.get((block_type, block_index, batch))
        return None if st is None else st.mask

    def cache(self, block_type: str, block_index: int, batch: int, device=None) -> Optional[torch.Tensor]:
        """The correction C [B, L, H*D] (fp32) added between refreshes, or None."""
        c = self.correction((block_type, block_index, batch), device or "cpu")
        return None if c is None else c.materialize()

    # ---- the attention function -------------------------------------------------------------------
    def __call__(self, q, k, v, mask, call: AttentionCall) -> torch.Tensor:
        if call.block_type == "refiner" or call.step is None:
            return dense_attention(q, k, v, mask, call)
        s = self.settings
        b, heads, length, dim = q.shape
        if s.svd_rank > dim:
            raise ValueError(f"svd_rank {s.svd_rank} exceeds head_dim {dim}: an L x head_dim residual has rank <= {dim}")
        self._observe(call, b)
        if self._pending:
            self._settle()
        plan = self.plan(call.step.num_steps)
        kind = plan.kind(call.step.index)
        if kind == "dense" or self._block_position(call) < s.warmup_blocks:
            self._count("dense", b)
            return self._dense(q, k, v, mask, call)

        key = (call.block_type, call.block_index, b)
        if key not in self._states:
            self._order.append(key)
        st = self._states.setdefault(key, _BlockState())
        if kind == "sparse":
            # sparse-only: this step's own mask, no residual, nothing kept for later steps but the mask
            st.mask = self._new_mask(q, k, v, mask, call)
            st.density = st.mask.density()
            self._count("sparse", b, st.density)
            return block_sparse_attention(q, k, v, mask, st.mask, call.txt_len, call.grid,
                                          precision=s.attention_precision)
        order = plan.order
        refresh = kind == "refresh" or st.mask is None or (order > 0 and not st.has_d)
        if not refresh:
            # Between refreshes: O_sparse + C, the correction added in the kernel's epilogue.
            if order > 0:
                self._prefetch_after(key, q.device)
            corr = None if order == 0 else self.correction(key, q.device)
            self._count("sparse", b, st.density)
            return block_sparse_attention(q, k, v, mask, st.mask, call.txt_len, call.grid, correction=corr,
                                          precision=s.attention_precision)

        # Refresh: new mask from this step's q/k, exact output, new residual cache.
        old_mask = st.mask
        self._cancel(key)  # a refresh supersedes factors still being computed
        st.mask = self._new_mask(q, k, v, mask, call)
        st.density = st.mask.density()
        self._count("dense", b)
        self.stats["refresh"] += b
        if order == 0:
            return self._dense(q, k, v, mask, call)
        if not self._merged(call):  # dense SDPA plus a sparse pass; merged: the two halves of one dense call
            self.stats["refresh_sparse"] += b * st.density
        second = order == 2 and st.has_d and _same_mask(old_mask, st.mask)
        full, d, d2 = self._refresh_outputs(q, k, v, mask, st.mask, call, key, second)
        store = self._store_for(q)
        if order == 2 and st.has_d and not second:
            # D and D_prev are residuals of different sparse operators; their difference is the mask
            # change, not the drift over steps. Fall back to first order until two refreshes agree.
            store.drop((key, "corr"))
            st.corr = None
            self.stats["mask_changed"] += b
        elif second:
            # The low-rank placement would truncate the pending D2 itself, on this thread: no gain.
            deferred = d2.is_cuda if s.host_eigh is None else s.host_eigh
            if s.svd_rank > 0 and deferred and store.policy != "low-rank":
                self._defer(key, d2, heads)
                st.corr = "pending"
            elif s.svd_rank > 0:
                store.put_factors((key, "corr"), *truncated_factors(d2, heads, s.svd_rank))
                st.corr = "factors"
            else:
                store.put((key, "corr"), d2, heads)
                st.corr = "full"
        store.put((key, "D"), d, heads)
        st.has_d = True
        return full

    def _merged(self, call: AttentionCall) -> bool:
        """Whether a refresh runs merged_refresh's kernel (always in a quantised attention_precision; not when
        the host's dense attention serves it)."""
        s = self.settings
        return (s.merged_refresh or s.attention_precision != "bf16") and not (s.host_attention and call.dense is not None)

    def _dense(self, q, k, v, mask, call: AttentionCall) -> torch.Tensor:
        """A dense pass of the run: the host's attention with host_attention (where the call brings one), INT8
        Q.K^T with int8_attention (key-padding masks only), else SDPA."""
        if self.settings.host_attention and call.dense is not None:
            self.stats["host_dense"] += q.shape[0]
            return call.dense(q, *without_padded_keys(k, v, mask))  # the host's unmasked kernel
        if self.settings.attention_precision != "bf16" and call.grid is not None:
            self.stats["quantized_dense"] += q.shape[0]
            return quantized_dense_attention(q, k, v, mask, call.txt_len, call.grid, self.settings.attention_precision,
                                             self.settings.block)
        if self.settings.int8_attention:
            keep = "all" if mask is None else allowed_keys(mask)
            if keep is not None:
                self.stats["int8_dense"] += q.shape[0]
                return int8_dense_attention(q, k, v, keep=keep)
        return dense_attention(q, k, v, mask, call)

    def _refresh_outputs(self, q, k, v, mask, block_mask: BlockMask, call: AttentionCall, key, second: bool):
        """(O_full, D = O_full - O_sparse, D2 = D - D_prev in fp32 or None) of a refresh. O_full and O_sparse:
        merged from the kernel's runs over the mask and its complement with merged_refresh (D in fp32), else
        dense SDPA and a sparse pass. With second (a second-order refresh under an unchanged mask) D2 against
        the cached D. Where the cache keeps D in bf16 (gpu-bf16, cpu-pinned) D and D2 come from one pass over
        O_full, O_sparse and D_prev (kernels/residual.py where Triton runs: D computed in fp32 and stored in
        bf16, as the cache would round it; ~10 -> ~2.5 GB of memory traffic per layer at 544p, computed), at a
        lower peak. Where it keeps D as int8 rows (gpu-int8) D comes back as the (codes, scale) put() takes
        and D2 against the cached codes, from one pass too (dispatch.int8_rows)."""
        def drift(d):  # d - D_prev in the fp32 tensor get() returned (one [B, L, H*D] fp32 temporary fewer at
            # the peak; with the "exact" placement that is the stored D itself, replaced by the caller)
            return self._store.get((key, "D"), q.device).neg_().add_(d) if second else None

        if self._merged(call):
            full, d = refresh_attention(q, k, v, mask, block_mask, call.txt_len, call.grid,
                                        precision=self.settings.attention_precision)
            return full, d, drift(d)
        full = self._dense(q, k, v, mask, call)
        # in the run's precision, as every later sparse pass that D corrects (with host_attention too)
        sparse = block_sparse_attention(q, k, v, mask, block_mask, call.txt_len, call.grid,
                                        precision=self.settings.attention_precision)
        store = self._store  # None until the first refresh resolves "auto" (from free memory, after D exists)
        if store is not None and store.policy == "gpu-int8":
            # D as the cache's int8 rows and D2 against the cached codes, in one pass (dispatch.int8_rows)
            prev = store.get_parts((key, "D"), q.device) if second else {}
            codes, scale, d2 = int8_rows(full, sparse, prev.get("codes"), prev.get("scale"))
            return full, (codes, scale), d2
        if store is not None and store.dense_dtype is not None:
            prev = store.get_parts((key, "D"), q.device).get("dense") if second else None
            one_pass = residual_kernel(full, sparse, prev) if (prev is not None or not second) else None
            if one_pass is not None:
                d, d2 = one_pass(full, sparse, prev, store.dense_dtype)
                return full, d, d2
        d = full.to(torch.float32, copy=True).sub_(sparse)  # = full.float() - sparse.float(), one temporary fewer
        del sparse
        return full, d, drift(d)


def _same_mask(a: Optional[BlockMask], b: BlockMask) -> bool:
    # svg_masks' masks share one keep tensor: no GPU compare (a host sync) between them
    return a is not None and a.kinds == b.kinds and (a.keep is b.keep or torch.equal(a.keep, b.keep))


__all__ = ["SCHEDULES", "SparseSettings", "SSARAttention", "StepPlan"]
