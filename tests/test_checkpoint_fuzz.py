"""Checkpoint fuzzer: every mutant of a valid compressed file either loads to a model whose outputs
are finite or is refused with the project's own CheckpointError. Nothing else may escape (a raw
safetensors / torch / JSON error, a crash), hang or allocate without bound.

Mutations: bit flips in the header and in the data, truncation, a huge header length, header JSON
edits (dtypes, shapes incl. odd int4 sizes, offsets out of range or overlapping, missing / extra
keys, the QuantSparse header's version, config and policy with wrong types or values), and stored
values set to NaN / inf / 0 / huge / negative. Each mutant is drawn from its own seed, printed on
failure. QS_FUZZ_MUTANTS sets how many (default 240 in CI; the slow mode is e.g.
QS_FUZZ_MUTANTS=2000), QS_FUZZ_SEED the first seed (default: fresh, printed): a failure is replayed by
QS_FUZZ_SEED=<its seed> QS_FUZZ_MUTANTS=1. Found this way: a 'layers' entry whose key name a bit flip
had changed passed validation and failed later with a KeyError (now: the entry must hold exactly
w_bits, a_bits, smooth, rotation).
"""
import json
import os
import random
import struct
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantsparse_core.io import CheckpointError, load_compressed, save_compressed
from test_checkpoint import _inputs, _quantized

MUTANTS = int(os.environ.get("QS_FUZZ_MUTANTS", "240"))
SECONDS_PER_MUTANT = 20.0  # a hang or an unbounded allocation shows up as a slow mutant


def _split(raw: bytes):
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(header: dict, data: bytes) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(text)) + text + data


def _flip_bits(raw: bytes, lo: int, hi: int, r: random.Random, flips: int) -> bytes:
    b = bytearray(raw)
    for _ in range(flips):
        i = r.randrange(lo, hi)
        b[i] ^= 1 << r.randrange(8)
    return bytes(b)


def _edit_quantsparse(meta: dict, r: random.Random) -> str:
    h = json.loads(meta["quantsparse"])
    junk = r.choice([None, "4", -1, 3, 10 ** 9, 2.5, [], {}, True])
    kind = r.randrange(8)
    if kind == 0:
        h[r.choice(["version", "format", "model_family"])] = junk
    elif kind == 1:
        h["config"][r.choice(sorted(h["config"]))] = junk
    elif kind == 2:
        h["config"][r.choice(["depth_double", "depth_single", "refiner_blocks"])] = r.choice([10 ** 7, -3, 0, 2])
    elif kind == 3:
        name = r.choice(sorted(h["policy"]))
        h["policy"][name][r.choice(["w_bits", "a_bits"])] = junk
    elif kind == 4:
        name = r.choice(sorted(h["layers"]))
        h["layers"][name][r.choice(["w_bits", "a_bits", "smooth", "rotation"])] = r.choice([junk, "bogus", "hadamard"])
    elif kind == 5:
        del h[r.choice(["policy", "layers", "config"])]
    elif kind == 6:
        h["policy"][r.choice(sorted(h["policy"]))] = junk
    else:
        meta["quantsparse"] = meta["quantsparse"][: r.randrange(len(meta["quantsparse"]))]
        return "header JSON truncated"
    meta["quantsparse"] = json.dumps(h)
    return f"quantsparse header edit {kind}"


def _edit_header(raw: bytes, r: random.Random) -> tuple:
    header, data = _split(raw)
    keys = sorted(k for k in header if k != "__metadata__")
    key = r.choice(keys)
    entry = header[key]
    kind = r.randrange(7)
    if kind == 0:
        entry["dtype"] = r.choice(["F32", "BF16", "U8", "I8", "F16", "I64", "X9"])
    elif kind == 1:
        shape = entry["shape"]
        if key.endswith("weight_packed") and shape:
            shape[-1] = shape[-1] * 2 + 1          # an odd int4 width
        else:
            entry["shape"] = r.choice([shape + [1], shape[:-1], [x + r.randrange(1, 3) for x in shape], [2 ** 40]])
    elif kind == 2:
        b, e = entry["data_offsets"]
        entry["data_offsets"] = r.choice([[b, len(data) + 8], [b - 1, e], [e, b], [0, e - b], [b, 2 ** 62]])
    elif kind == 3:
        other = header[r.choice(keys)]["data_offsets"]
        entry["data_offsets"] = list(other)          # overlapping another tensor
    elif kind == 4:
        del header[key]
    elif kind == 5:
        header[key + "_extra"] = dict(entry)
    else:
        return _join(header, data)[:0] + _join(dict(header, __metadata__=_meta_edit(header, r)), data), "metadata edit"
    return _join(header, data), f"header edit {kind} on {key}"


def _meta_edit(header: dict, r: random.Random) -> dict:
    meta = dict(header.get("__metadata__", {}))
    _edit_quantsparse(meta, r)
    return meta


def _edit_values(path, r: random.Random) -> str:
    tensors = load_file(str(path))
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    floats = sorted(k for k, t in tensors.items() if t.is_floating_point() and t.numel())
    preferred = [k for k in floats if k.endswith(("weight_scale", "act_clip", "smooth", "rot1", "rot2"))]
    key = r.choice(preferred if preferred and r.random() < 0.7 else floats)
    value = r.choice([float("nan"), float("inf"), -float("inf"), 0.0, 1e30, -1.0, 1e5, 3.0])
    t = tensors[key].clone()
    flat = t.view(-1)
    flat[r.randrange(flat.numel())] = value
    if r.random() < 0.3:
        t.fill_(value)
    tensors[key] = t
    save_file(tensors, str(path), metadata=meta)
    return f"value {value} in {key}"


def _mutate(base: bytes, path, r: random.Random) -> str:
    header_len = struct.unpack("<Q", base[:8])[0]
    kind = r.randrange(7)
    if kind == 0:
        raw, what = _flip_bits(base, 8, 8 + header_len, r, r.randint(1, 4)), "header bit flips"
    elif kind == 1:
        raw, what = _flip_bits(base, 8 + header_len, len(base), r, r.randint(1, 16)), "data bit flips"
    elif kind == 2:
        cut = r.randrange(len(base))
        raw, what = base[:cut], f"truncated at {cut}"
    elif kind == 3:
        raw, what = struct.pack("<Q", r.choice([2 ** 40, 2 ** 63, header_len + 1, len(base)])) + base[8:], "header length"
    elif kind in (4, 5):
        raw, what = _edit_header(base, r)
    else:
        path.write_bytes(base)
        return _edit_values(path, r)
    path.write_bytes(raw)
    return what


@pytest.fixture(scope="module")
def base_file(tmp_path_factory):
    rng = torch.Generator().manual_seed(1234)
    torch.set_num_threads(1)
    model, policy = _quantized(rng, 4, 8, smooth=True, rotation="learned")
    path = tmp_path_factory.mktemp("fuzz") / "base.safetensors"
    save_compressed(model, path, policy)
    return path.read_bytes(), _inputs(rng)


def test_every_mutant_loads_finite_or_is_refused_clearly(base_file, tmp_path):
    base, inputs = base_file
    first = int(os.environ.get("QS_FUZZ_SEED", random.SystemRandom().randrange(2 ** 31)))
    print(f"QS_FUZZ_SEED={first} QS_FUZZ_MUTANTS={MUTANTS}")
    path = tmp_path / "mutant.safetensors"
    loaded = refused = 0
    for i in range(MUTANTS):
        seed = first + i
        what = _mutate(base, path, random.Random(seed))
        t0 = time.perf_counter()
        try:
            model, _ = load_compressed(path)
        except CheckpointError as e:
            assert str(path) in str(e) or "checkpoint" in str(e).lower(), (seed, what, str(e))
            refused += 1
        except Exception as e:  # noqa: BLE001  any other error type is a finding
            pytest.fail(f"QS_FUZZ_SEED={seed} ({what}): {type(e).__name__} escaped the loader: {e}")
        else:
            with torch.no_grad():
                out = model(*inputs)
            assert bool(torch.isfinite(out).all()), f"QS_FUZZ_SEED={seed} ({what}) loaded to non-finite outputs"
            loaded += 1
        assert time.perf_counter() - t0 < SECONDS_PER_MUTANT, f"QS_FUZZ_SEED={seed} ({what}) took too long"
    print(f"{loaded} mutants loaded to finite outputs, {refused} refused")
    if MUTANTS >= 100:  # (a replay of one seed need not reach both outcomes)
        assert refused > MUTANTS // 4 and loaded > 0   # the mutations reach both outcomes


def test_a_valid_file_with_one_nan_scale_is_refused_by_name(base_file, tmp_path):
    base, _ = base_file
    path = tmp_path / "nan.safetensors"
    path.write_bytes(base)
    tensors = load_file(str(path))
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    key = sorted(k for k in tensors if k.endswith("weight_scale"))[0]
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match="non-finite") as e:
        load_compressed(path)
    assert key in str(e.value)
