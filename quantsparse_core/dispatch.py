"""The one seam between the library and its kernels: every Triton-or-PyTorch choice is made here.

The kernels (the repository's `kernels/` folder, installed by pip as `quantsparse_kernels`) are a
leaf that takes plain tensors; the library reaches them only through this module. Per operation:

- auto (default): the Triton kernel for CUDA tensors when Triton imports and the kernel takes the
  inputs as they are; the PyTorch path everywhere else;
- QUANTSPARSE_KERNELS=torch: always the PyTorch path; =triton: always Triton (on CPU tensors only
  with TRITON_INTERPRET=1 set before the kernels are imported, as the tests do);
- `with forced(mode):` overrides the variable for a block of code (tests, benchmarks).

Where the PyTorch path is the kernel's own reference (attention), the operation here runs it;
where it is the library's own code (a quantized linear's torch math, the compiled small-op groups,
SVG's chunked error estimate, the float64 Gram loop), the `*_kernel(...)` functions return the
kernel to call, or None to take that path. `python -m quantsparse_core.dispatch` prints which path
each operation takes on this machine.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import logging
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch

ENV = "QUANTSPARSE_KERNELS"
MODES = ("auto", "triton", "torch")
PACKAGE = "quantsparse_kernels"          # the kernels' one import name, installed or not
_REPO_KERNELS = Path(__file__).resolve().parents[1] / "kernels"
_forced: Optional[str] = None
log = logging.getLogger("quantsparse")
_fallback_logged = False                 # the "references run on CUDA" line is logged once per process


# ---- finding the kernels package ------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _package() -> ModuleType:
    """The kernels package: installed as `quantsparse_kernels` (pip), else this checkout's `kernels/`
    folder loaded under that name (a ComfyUI custom-node folder or a development checkout). Never
    imported as `kernels`: another installed package (one exists on PyPI) could answer to that."""
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE]
    init = _REPO_KERNELS / "__init__.py"
    if importlib.util.find_spec(PACKAGE) is None and init.is_file():
        spec = importlib.util.spec_from_file_location(PACKAGE, init, submodule_search_locations=[str(_REPO_KERNELS)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = module
        spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(PACKAGE)
    except ImportError as e:
        raise ImportError(f"the QuantSparse kernels package is missing ({e}): reinstall with `pip install .` "
                          "from the repository, or keep the `kernels/` folder beside `quantsparse_core/`") from e


def _module(name: str) -> ModuleType:
    """A module of the kernels package that needs no Triton (references, int4 layout, correction)."""
    return importlib.import_module(f"{_package().__name__}.{name}")


@functools.lru_cache(maxsize=None)
def _triton_module(name: str) -> Optional[ModuleType]:
    """A Triton kernel module, or None when Triton (or the module) does not import here."""
    if not triton_available():
        return None
    try:
        return _module(name)
    except ImportError:
        return None


# ---- the mode ---------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install that fails on import
        return False
    return True


def interpreting() -> bool:
    """Whether Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def mode() -> str:
    m = _forced or os.environ.get(ENV, "auto").strip().lower() or "auto"
    if m not in MODES:
        raise ValueError(f"{ENV}={m!r} is not one of {MODES}")
    return m


def use_triton(device: torch.device | str) -> bool:
    """Whether a kernel call on tensors living on `device` takes the Triton path (before the kernel's
    own check that it takes the inputs)."""
    device = torch.device(device)
    m = mode()
    if m == "torch":
        return False
    if m == "triton":
        if not triton_available():
            raise RuntimeError(f"{ENV}=triton but Triton is not importable: `pip install triton`, "
                               f"or set {ENV}=auto to use the PyTorch references")
        if device.type != "cuda" and not interpreting():
            raise RuntimeError(f"{ENV}=triton on {device} tensors needs TRITON_INTERPRET=1 "
                               "(set before importing the kernels), or a CUDA device")
        return True
    return device.type == "cuda" and triton_available()


@contextlib.contextmanager
def forced(m: str) -> Iterator[None]:
    """Temporarily force a mode (tests, benchmarks): with forced("torch"): ..."""
    global _forced
    if m not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {m!r}")
    old, _forced = _forced, m
    try:
        yield
    finally:
        _forced = old


def _kernel(name: str, device) -> Optional[ModuleType]:
    """The Triton module `name` when the mode picks Triton for `device`, else None."""
    module = _triton_module(name) if use_triton(device) else None
    if module is None and not _fallback_logged and mode() == "auto" and torch.device(device).type == "cuda":
        _log_fallback(name)
    return module


def _log_fallback(name: str) -> None:
    """Say once that a CUDA run takes the slow PyTorch references: a user with no Triton (or a broken
    one) would otherwise see only a slow run."""
    global _fallback_logged
    _fallback_logged = True
    why = "Triton does not import" if not triton_available() else f"the Triton kernel {name!r} failed to import"
    log.warning("QuantSparse: %s, so the PyTorch reference implementations run on CUDA (correct but slower). "
                "Install `triton` (Linux) or `triton-windows` (Windows) in ComfyUI's Python for the fast "
                "kernels; `python -m quantsparse_core.dispatch` shows the path of each operation.", why)


# ---- kernel-side types the library uses ------------------------------------------------------------
# The SSAR correction's parts and the int4 layout live with the kernels (they read them); the library
# takes them from here.
Correction = _module("correction").Correction
as_correction = _module("correction").as_correction
pack_int4 = _module("int4").pack_int4
unpack_int4 = _module("int4").unpack_int4


# ---- attention --------------------------------------------------------------------------------------
def _check_call(q, block_mask, txt_len: int, grid) -> None:
    from .sparse.layout import check_layout

    _, heads, length, _ = q.shape
    check_layout(length, txt_len, grid)
    if block_mask.seq_len != length or block_mask.num_heads != heads:
        raise ValueError(f"block mask is for {block_mask.num_heads} heads x {block_mask.seq_len} tokens, "
                         f"attention has {heads} heads x {length} tokens")


def _indices(keep: torch.Tensor, block_mask, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """kv_index / kv_count of the mask (or, keep=~mask.keep, of its complement) on `device`, cached on
    the mask object for the mask itself (masks are never modified in place). The complement, made at every
    merged refresh of every layer, is padded to every key block: its longest row is not read to the host."""
    if keep is not block_mask.keep:
        from .sparse.masks import BlockMask
        return tuple(t.to(device) for t in BlockMask(keep, list(block_mask.kinds), block_mask.block,
                                                       block_mask.seq_len).to_indices(full_width=True))
    version = -1 if keep.is_inference() else keep._version
    key = (str(device), version, id(keep))
    cached = block_mask.__dict__.get("_qs_kernel_indices")
    if cached is not None and cached[0] == key:
        return cached[1]
    index, count = block_mask.to_indices()
    val = (index.to(device), count.to(device))
    block_mask.__dict__["_qs_kernel_indices"] = (key, val)
    return val


@functools.lru_cache(maxsize=16)
def _temporal_perm(txt_len: int, grid: tuple, device: torch.device) -> torch.Tensor:
    """The temporal permutation as the kernel reads it (int32, contiguous), made once per layout: one
    tensor object for every layer, so the kernel's per-call caches keyed on it hit."""
    from .sparse.layout import temporal_permutation
    return temporal_permutation(txt_len, grid, device=device).to(torch.int32).contiguous()


def _mask_arguments(q, mask, block_mask, txt_len: int, grid) -> dict:
    """The kernels' mask keywords (block, key_bias, perm, permuted_heads) for a BlockMask and the
    model's additive mask, on q's device."""
    from .sparse.masks import key_bias

    b, heads, length, _ = q.shape
    permuted = [block_mask.permuted(h) for h in range(heads)]
    perm = _temporal_perm(txt_len, tuple(int(n) for n in grid), q.device) if any(permuted) else None
    bias = key_bias(mask, b, length)
    return dict(block=block_mask.block, perm=perm, permuted_heads=permuted,
                key_bias=None if bias is None else bias.to(q.device))


def block_sparse_attention(q, k, v, mask, block_mask, txt_len: int, grid, correction=None,
                           precision: str = "bf16") -> torch.Tensor:
    """Exact softmax over the key blocks `block_mask` keeps, plus the SSAR `correction` (a [B, L, H*D]
    tensor or a Correction) added to the result. q, k, v: [B, H, L, D]; mask: the model's additive key
    mask [B|1, 1, L] or None; heads of kind "temporal" are computed in temporal order and put back.
    Returns [B, L, H*D] in q's dtype. The Triton kernel (correction rebuilt in its epilogue) where
    the mode picks it and it takes the inputs; else the PyTorch reference (memory-bounded, the
    correction materialised and added in fp32). precision: "bf16" (the inputs' own), "int8" (Q.K^T from
    INT8 codes) or "int8-fp8" (also P.V in float8 e4m3): kernels/sparse_attention_ref.py's
    quantized_sparse_attention_ref is the arithmetic."""
    b, heads, length, d = q.shape
    _check_precision(precision)
    _check_call(q, block_mask, txt_len, grid)
    correction = as_correction(correction)
    if correction is not None and tuple(correction.shape) != (b, length, heads * d):
        raise ValueError(f"correction must be [B, L, H*D] = {(b, length, heads * d)}, got {tuple(correction.shape)}")
    index, count = _indices(block_mask.keep, block_mask, q.device)
    kw = _mask_arguments(q, mask, block_mask, txt_len, grid)
    kernel = _kernel("sparse_attention", q.device)
    precision = _runnable_precision(q, block_mask.block, precision, kernel)
    if kernel is not None and kernel.supports(q, block_mask.block, precision):
        if correction is not None:
            correction = correction.to(q.device)
        return kernel.sparse_attention(q, k, v, index, count, correction=correction, precision=precision, **kw)
    ref = _module("sparse_attention_ref")
    if precision != "bf16":
        return ref.quantized_sparse_attention_ref(q, k, v, index, count, correction=correction, precision=precision,
                                                  **kw)
    return ref.sparse_attention_ref(q, k, v, index, count, correction=correction, **kw)


PRECISIONS = ("bf16", "int8", "int8-fp8")
_precision_warned = set()


def _runnable_precision(q, block: int, precision: str, kernel) -> str:
    """The precision a call runs in: a quantised one on CUDA only where the Triton kernel takes it (else
    bf16, said once per precision: the PyTorch emulation in float64 would copy q/k/v in float64, ~9 GB
    at 720p, and run for minutes); on the CPU the emulation is the reference and stays."""
    if precision == "bf16" or not q.is_cuda or (kernel is not None and kernel.supports(q, block, precision)):
        return precision
    if precision not in _precision_warned:
        _precision_warned.add(precision)
        why = "the Triton kernels are not in use" if kernel is None else (
            f"the kernel does not take head_dim {q.shape[-1]}, mask block {block}, {q.dtype} on this GPU")
        log.warning("QuantSparse: attention precision %r is not available here (%s); running bf16 attention instead. "
                    "int8 needs head_dim >= 32; int8-fp8 also a mask block >= 32 and a GPU with float8 "
                    "(compute capability 8.9+: Ada, Hopper, Blackwell).", precision, why)
    return "bf16"


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"attention precision must be one of {PRECISIONS}, got {precision!r}")


@functools.lru_cache(maxsize=2)
def _all_blocks(heads: int, length: int, block: int):
    """masks.dense_block_mask, kept for the last two shapes: its kernel indices are cached on it (24 heads x
    931^2 int32 = 83 MB on the GPU at 720p x 129 frames, computed)."""
    from .sparse.masks import dense_block_mask
    return dense_block_mask(heads, length, block)


def quantized_dense_attention(q, k, v, mask, txt_len: int, grid, precision: str, block: int = 128) -> torch.Tensor:
    """Dense attention in a quantised precision ("int8" / "int8-fp8"): the block-sparse kernel over every
    key block, so a dense pass rounds exactly as the run's sparse passes do. [B, L, H*D] in q's dtype."""
    if precision == "bf16":
        raise ValueError("quantized_dense_attention takes precision 'int8' or 'int8-fp8'")
    return block_sparse_attention(q, k, v, mask, _all_blocks(q.shape[1], q.shape[2], block), txt_len, grid,
                                  precision=precision)


def refresh_attention(q, k, v, mask, block_mask, txt_len: int, grid,
                      precision: str = "bf16") -> Tuple[torch.Tensor, torch.Tensor]:
    """An SSAR refresh's (O_full in q's dtype, D = O_full - O_sparse in fp32) under the new mask: the
    kernel's two runs over the mask and its complement merged by log-sum-exp (one read of the keys),
    else dense SDPA and the sparse reference. precision as block_sparse_attention's (both runs)."""
    _check_precision(precision)
    _check_call(q, block_mask, txt_len, grid)
    index, count = _indices(block_mask.keep, block_mask, q.device)
    kw = _mask_arguments(q, mask, block_mask, txt_len, grid)
    kernel = _kernel("refresh_attention", q.device)
    precision = _runnable_precision(q, block_mask.block, precision,
                                    None if kernel is None else _triton_module("sparse_attention"))
    if kernel is not None and _triton_module("sparse_attention").supports(q, block_mask.block, precision):
        rest = _indices(~block_mask.keep, block_mask, q.device)
        return kernel.refresh_attention(q, k, v, index, count, *rest, precision=precision, **kw)
    if precision != "bf16":
        full = quantized_dense_attention(q, k, v, mask, txt_len, grid, precision, block_mask.block)
        sparse = block_sparse_attention(q, k, v, mask, block_mask, txt_len, grid, precision=precision)
        return full, full.float() - sparse.float()
    return _module("refresh_attention_ref").refresh_attention_ref(q, k, v, index, count, **kw)


def int8_dense_attention(q, k, v, mask=None, *, keep=None, return_lse: bool = False):
    """Dense attention with INT8 Q.K^T (K smoothed by its mean, per-block INT8 scales, fp32 softmax,
    P.V in V's dtype): the arithmetic of kernels/int8_attention_ref.py. q, k, v: [B, H, L, D]. Keys
    left out by `mask` (the model's additive mask; only one that blocks whole keys, as text padding
    does, models.attention.allowed_keys) or by `keep` (allowed_keys's answer: None / "all" / an index
    of the allowed keys) take no part; a row with no allowed key gives 0. Returns [B, L, H*D] in q's
    dtype, and with return_lse also the fp32 [B, H, L] base-2 log-sum-exp of the scaled scores (two
    runs over disjoint key sets merge exactly, kernels/refresh_attention.merge). The Triton kernel
    where the mode picks it and it takes the inputs; else the PyTorch reference."""
    if mask is not None:
        if keep is not None:
            raise ValueError("int8_dense_attention takes mask or keep, not both")
        from .models.attention import allowed_keys
        keep = allowed_keys(mask)
        if keep is None:
            raise ValueError("int8_dense_attention takes only a key mask that blocks whole keys (entries 0 or "
                             "<= -1e4, one row for every batch entry), as text padding does; use "
                             "models.attention.dense_attention for other masks")
    kernel = _kernel("int8_attention", q.device)
    if kernel is not None and kernel.supports(q):
        b, heads, length, _ = q.shape
        lse = torch.empty(b, heads, length, dtype=torch.float32, device=q.device) if return_lse else None
        out = kernel.int8_attention(q, k, v, keep=keep, lse=lse)
        return (out, lse) if return_lse else out
    return _module("int8_attention_ref").int8_attention_ref(q, k, v, keep=keep, return_lse=return_lse)


def svg_profile_kernel(q, k, v, block: int):
    """kernels.svg_profile.svg_errors where the mode picks Triton and it takes these inputs (27.5 ->
    a few ms per 720p layer on an H100), else None: svg_masks' chunked PyTorch estimate."""
    module = _kernel("svg_profile", q.device)
    return module.svg_errors if module is not None and module.supports(q, k, v, block) else None


def residual_kernel(full, sparse, prev=None):
    """kernels.residual.refresh_residuals where the mode picks Triton and the kernel takes these tensors
    (an SSAR refresh's D = full - sparse in the cache's dtype and D2 = D - prev in fp32, in one pass), else
    None: the caller keeps its own fp32 sequence, which frees O_sparse before making D2 (the PyTorch
    version of the one pass would hold more at once)."""
    module = _kernel("residual", full.device)
    return module.refresh_residuals if module is not None and module.supports(full, sparse, prev) else None


kernel_failures: Dict[str, str] = {}     # guarded(): kernels that failed in this process, and why
STRICT_ENV = "QUANTSPARSE_STRICT_KERNELS"


def device_fault(e: BaseException) -> bool:
    """Out of memory or a CUDA fault: no compile failure, so a fallback would meet it too."""
    return isinstance(e, torch.OutOfMemoryError) or "CUDA error" in str(e) or "Triton Error [CUDA]" in str(e)


def guarded(name: str, fast: Callable, slow: Callable, consequence: str):
    """fast() (a Triton kernel's path) unless kernel `name` already failed in this process, else slow() (the same
    math in PyTorch). A kernel that fails to compile or launch here is said once, with `consequence`, and left:
    a new kernel must not end a user's run. A ValueError (the caller's tensors are wrong), out of memory and
    device faults still raise, and everything does with QUANTSPARSE_STRICT_KERNELS=1 (the tests set it, so a bug
    in the fast path fails them instead of hiding behind the fallback)."""
    if name not in kernel_failures:
        try:
            return fast()
        except ValueError:
            raise
        except Exception as e:  # Triton's CompilationError is no RuntimeError
            if device_fault(e) or os.environ.get(STRICT_ENV, "").strip() not in ("", "0"):
                raise
            kernel_failures[name] = f"{type(e).__name__}: {str(e)[:300]}"
            log.warning("QuantSparse: the %s kernel failed (%s); %s from now on. Please report it with the output of "
                        "`python -m quantsparse_core.dispatch`.", name, kernel_failures[name], consequence)
    return slow()


def int8_rows(x: torch.Tensor, sparse: Optional[torch.Tensor] = None, prev_codes: Optional[torch.Tensor] = None,
              prev_scale: Optional[torch.Tensor] = None):
    """(codes int8, row scale fp32 [..., 1], D2 fp32 or None): the gpu-int8 cache's form of D = x - sparse (x alone
    without sparse), and D's drift from a previous entry; kernels/residual.int8_residuals in one pass where the
    mode picks Triton and it takes the tensors, else its reference (the same numbers). A kernel that fails to
    compile here is left for the reference (guarded): a refresh must not end a run."""
    def reference():
        return _module("residual_ref").int8_residuals_ref(x, sparse, prev_codes, prev_scale)

    module = _kernel("residual", x.device)
    if module is None or not module.supports_int8(x, sparse, prev_codes):
        return reference()
    return guarded("int8 residual", lambda: module.int8_residuals(x, sparse, prev_codes, prev_scale), reference,
                   "the SSAR cache's int8 rows come from the PyTorch version (the same numbers, slower refresh steps)")


def head_gram_kernel(x: torch.Tensor, heads: int):
    """kernels.gram.head_gram for an fp32 [B, L, H*D] residual where the mode picks Triton and the
    kernel takes it (bf16 hi/lo products on the tensor cores, ~1e-5 relative), else None: the
    library's float64 loop over heads."""
    module = _kernel("gram", x.device)
    return module.head_gram if module is not None and module.supports(x, heads) else None


# ---- quantized linears and the ops that feed them ---------------------------------------------------
def quantized_linear_kernels(device) -> Optional[Tuple[ModuleType, ModuleType]]:
    """(act_quant, int_gemm) modules for a frozen QuantLinear's fused path on `device` (per-token
    activation quantization with smoothing / rotation, then the int8 x int8/int4 GEMM with scales and
    bias in the epilogue), or None: QuantLinear's PyTorch math."""
    act, gemm = _kernel("act_quant", device), _kernel("int_gemm", device)
    return None if act is None or gemm is None else (act, gemm)


def producer_quant_kernels(device) -> Optional[ModuleType]:
    """kernels.producer_quant (LayerNorm + modulation, or GELU, emitting the next linear's int8 codes)
    where the mode picks Triton for `device`, else None: the bf16 group then a separate quantization."""
    return _kernel("producer_quant", device)


def qk_norm_rope_kernel(qkvs, weights, table, heads: int) -> Optional[ModuleType]:
    """kernels.qk_norm_rope where the mode picks Triton and the kernel takes these inputs as they are
    (dtypes, weights, an fp32 RoPE table, no autograd), else None: the compiled small-op group."""
    module = _kernel("qk_norm_rope", qkvs[0].device)
    return module if module is not None and module.applicable(qkvs, weights, table, heads) else None


def wan_qk_kernel(q, k, heads: int, wq, wk, table) -> Optional[ModuleType]:
    """kernels.wan_qk_norm_rope (Wan's whole-width q/k RMSNorm + RoPE) where the mode picks Triton and the
    kernel takes these inputs as they are, else None: the caller's PyTorch group."""
    module = _kernel("wan_qk_norm_rope", q.device)
    return module if module is not None and module.applicable(q, k, heads, wq, wk, table) else None


# ---- the report ---------------------------------------------------------------------------------------
OPERATIONS = ("sparse_attention", "refresh_attention", "int8_attention", "svg_profile", "gram", "residual", "act_quant",
              "int_gemm", "producer_quant", "qk_norm_rope", "wan_qk_norm_rope")


def report(device: torch.device | str | None = None) -> Dict[str, str]:
    """{operation: "triton" or "torch (why)"} for tensors on `device` (default: cuda when present)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = {"kernels package": f"{_package().__name__} from {Path(_package().__file__).parent}", "mode": mode(),
           "device": str(device)}
    for op in OPERATIONS:
        if not triton_available():
            out[op] = "torch (Triton does not import)"
        elif not use_triton(device):
            out[op] = f"torch ({ENV}=torch)" if mode() == "torch" else f"torch ({device.type} tensors)"
        else:
            out[op] = "triton" if _triton_module(op) is not None else "torch (kernel module failed to import)"
    return out


def main() -> int:
    for name, value in report().items():
        print(f"{name:>18}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
