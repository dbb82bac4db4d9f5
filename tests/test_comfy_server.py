"""The pack inside a running ComfyUI server (CPU): /object_info, the shipped workflows, and an
API-format graph run end to end (calibrate -> save -> load -> sparse sample) equal to the core.

Needs COMFYUI_PATH (a ComfyUI checkout whose Python deps are installed in the interpreter running
pytest); skipped otherwise. The server runs from a temporary base directory with the pack linked
into its custom_nodes, so the user's ComfyUI installation is never touched.
"""
import copy
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from comfy_env import require_comfyui
from comfy_workflow import to_api, validate

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
PLACEHOLDERS = ["diffusion_models/hunyuan_video_t2v_720p_bf16.safetensors",
                "diffusion_models/quantsparse/hunyuan_video_quantsparse_w4a8.safetensors",
                "text_encoders/clip_l.safetensors", "text_encoders/llava_llama3_fp8_scaled.safetensors",
                "vae/hunyuan_video_vae_bf16.safetensors",
                # Wan (ComfyUI's Wan 2.1 / 2.2 examples' names, and what the Wan calibrate workflow writes)
                "diffusion_models/wan2.1_t2v_14B_bf16.safetensors",
                "diffusion_models/wan2.2_t2v_high_noise_14B_fp16.safetensors",
                "diffusion_models/wan2.2_t2v_low_noise_14B_fp16.safetensors",
                "diffusion_models/quantsparse/wan2.1_t2v_14B_quantsparse_w4a8.safetensors",
                "diffusion_models/quantsparse/wan2.2_t2v_high_noise_14B_quantsparse_w4a8.safetensors",
                "diffusion_models/quantsparse/wan2.2_t2v_low_noise_14B_quantsparse_w4a8.safetensors",
                "text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors", "vae/wan_2.1_vae.safetensors",
                # HunyuanVideo 1.5 (ComfyUI's 1.5 example names, and what its calibrate workflow writes)
                "diffusion_models/hunyuanvideo1.5_720p_t2v_fp16.safetensors",
                "diffusion_models/quantsparse/hunyuanvideo1.5_720p_t2v_quantsparse_w4a8.safetensors",
                "text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors",
                "text_encoders/byt5_small_glyphxl_fp16.safetensors", "vae/hunyuanvideo15_vae_fp16.safetensors",
                "diffusion_models/quantsparse/hunyuanvideo1.5_720p_i2v_quantsparse_w4a8.safetensors",
                "clip_vision/sigclip_vision_patch14_384.safetensors"]
EXPECTED_INPUTS = {
    "QuantSparseCalibrate": {"model": "MODEL", "positive": "CONDITIONING", "latent": "LATENT", "weight_bits": "COMBO",
                             "activation_bits": "COMBO", "method": "COMBO", "samples": "INT", "steps": "INT",
                             "epochs": "INT", "lambda_global": "FLOAT", "lambda_local": "FLOAT", "pool_stride": "INT",
                             "salient_tokens": "INT", "seed": "INT", "output_name": "STRING", "expert_role": "COMBO",
                             "other_expert": "MODEL", "expert_boundary": "FLOAT"},
    "QuantSparseLoadCompressedDiT": {"checkpoint": "COMBO"},
    "QuantSparseSparseSampler": {"model": "MODEL", "seed": "INT", "steps": "INT", "cfg": "FLOAT",
                                 "sampler_name": "COMBO", "scheduler": "COMBO", "positive": "CONDITIONING",
                                 "negative": "CONDITIONING", "latent_image": "LATENT", "denoise": "FLOAT",
                                 "density": "FLOAT", "refresh_interval": "INT", "svd_rank": "INT",
                                 "warmup_steps": "INT", "warmup_blocks": "INT", "cache_placement": "COMBO",
                                   "fused_blocks": "BOOLEAN", "schedule": "COMBO",
                                   "int8_attention": "BOOLEAN", "dense_attention": "COMBO"},
    "QuantSparseSparseAttention": {"model": "MODEL", "density": "FLOAT", "refresh_interval": "INT", "svd_rank": "INT",
                                   "warmup_steps": "INT", "warmup_blocks": "INT", "cache_placement": "COMBO",
                                   "fused_blocks": "BOOLEAN", "schedule": "COMBO",
                                   "int8_attention": "BOOLEAN", "dense_attention": "COMBO"},
    "QuantSparseLoadEmbeddedTinyDiT": {"family": "COMBO"},
    "QuantSparseTinyPromptEncode": {"text": "STRING", "family": "COMBO"},
    "QuantSparseTinyDecode": {"samples": "LATENT", "family": "COMBO"},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url, base, proc):
        self.url, self.base, self.proc = url, base, proc

    def get(self, path):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def run(self, prompt, timeout=600):
        """Queue an API prompt, wait for it, return its history entry (fails with the server's error)."""
        req = urllib.request.Request(self.url + "/prompt", data=json.dumps({"prompt": prompt}).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                reply = json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise AssertionError(f"prompt refused: {e.read().decode()[:2000]}") from None
        if reply.get("node_errors"):  # ComfyUI still runs the outputs that do not depend on them
            raise AssertionError(f"prompt has node errors: {json.dumps(reply['node_errors'])[:2000]}")
        pid = reply["prompt_id"]
        end = time.time() + timeout
        while time.time() < end:
            hist = self.get(f"/history/{pid}")
            if pid in hist and hist[pid].get("status", {}).get("completed") is not None:
                entry = hist[pid]
                status = entry["status"]
                assert status.get("status_str") == "success", json.dumps(status.get("messages"))[:3000]
                return entry
            time.sleep(0.5)
        raise AssertionError(f"prompt {pid} did not finish in {timeout} s")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = require_comfyui()
    base = tmp_path_factory.mktemp("comfy_base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "comfyui-quantsparse").symlink_to(ROOT, target_is_directory=True)
    # test-only random conditioning (tests/comfy_test_nodes): variants without a text encoder in the tests
    (base / "custom_nodes" / "quantsparse-test-nodes").symlink_to(ROOT / "tests" / "comfy_test_nodes",
                                                                   target_is_directory=True)
    for rel in PLACEHOLDERS:  # so the shipped workflows' file names are valid choices
        p = base / "models" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.touch()
    (base / "input").mkdir()  # LoadImage's example.png, as ComfyUI ships one
    from PIL import Image
    Image.new("RGB", (16, 16), (200, 40, 40)).save(base / "input" / "example.png")
    port = _free_port()
    log = open(base / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                             "--base-directory", str(base), "--cache-none", "--disable-auto-launch"],
                            cwd=root, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(url + "/object_info/KSampler", timeout=5).read()
                break
            except Exception:
                if proc.poll() is not None or time.time() > end:
                    raise AssertionError("ComfyUI did not start:\n" + (base / "server.log").read_text()[-3000:])
                time.sleep(0.5)
        yield Server(url, base, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_object_info_lists_every_node_with_its_inputs(server):
    info = server.get("/object_info")
    for node, inputs in EXPECTED_INPUTS.items():
        assert node in info, f"{node} missing; server log: {(server.base / 'server.log').read_text()[-2000:]}"
        entry = info[node]
        assert entry["category"] == "QuantSparse"
        got = {}
        for sec in ("required", "optional"):
            for name, spec in entry["input"].get(sec, {}).items():
                got[name] = "COMBO" if isinstance(spec[0], list) else spec[0]
                assert spec[1].get("tooltip"), f"{node}.{name} has no tooltip"
        assert got == inputs, node
    assert info["QuantSparseLoadCompressedDiT"]["input"]["required"]["checkpoint"][1]["options"] == \
        sorted(p.split("/", 1)[1] for p in PLACEHOLDERS if p.startswith("diffusion_models/quantsparse/"))
    assert info["QuantSparseCalibrate"]["output_node"] is True


def test_shipped_workflows_are_valid_and_listed_as_templates(server):
    info = server.get("/object_info")
    assert len(WORKFLOWS) >= 3
    for path in WORKFLOWS:
        wf = json.loads(path.read_text())
        assert validate(wf, info) == [], path.name
    templates = server.get("/workflow_templates")
    assert sorted(templates["comfyui-quantsparse"]) == sorted(p.stem for p in WORKFLOWS)
    # The checker is not blind: a wrong combo value, a bad link type and a missing link are caught.
    wf = json.loads((ROOT / "workflows" / "quantsparse_text_to_video.json").read_text())
    bad = copy.deepcopy(wf)
    sampler = next(n for n in bad["nodes"] if n["type"] == "QuantSparseSparseSampler")
    sampler["widgets_values"][-2] = "vram-please"  # schedule
    bad["links"][0][5] = "IMAGE"
    assert len(validate(bad, info)) >= 2
    bad = copy.deepcopy(wf)
    next(i for i in sampler_of(bad)["inputs"] if i["name"] == "model")["link"] = None
    assert any("not connected" in p for p in validate(bad, info))


def sampler_of(wf):
    return next(n for n in wf["nodes"] if n["type"] == "QuantSparseSparseSampler")


def _saved_latent(server, entry, node_id) -> torch.Tensor:
    out = entry["outputs"][node_id]["latents"][0]
    path = server.base / "output" / out["subfolder"] / out["filename"]
    return load_file(str(path))["latent_tensor"]


STEPS, SEED = 8, 5
SPARSE = dict(density=0.3, refresh_interval=3, svd_rank=8, warmup_steps=1, warmup_blocks=1, cache_placement="auto")


def _demo_prompt(info):
    """The shipped tiny-model workflow in API format, made quick (short calibration, 8 steps), with the
    latents of both samplers saved."""
    prompt = to_api(json.loads((ROOT / "workflows" / "quantsparse_tiny_model_demo.json").read_text()), info)
    by_type = {}
    for nid, n in prompt.items():
        by_type.setdefault(n["class_type"], []).append(nid)
    (cal,) = by_type["QuantSparseCalibrate"]
    prompt[cal]["inputs"].update(method="block", samples=2, steps=4, epochs=1, pool_stride=16, salient_tokens=16,
                                 output_name="tiny server test")
    calib_latent = prompt[cal]["inputs"]["latent"][0]
    prompt[calib_latent]["inputs"].update(width=64, height=64, length=5)
    (dense,) = by_type["KSampler"]
    (sparse,) = by_type["QuantSparseSparseSampler"]
    for nid in (dense, sparse):
        prompt[nid]["inputs"].update(seed=SEED, steps=STEPS)
    prompt[sparse]["inputs"].update(SPARSE)
    prompt["900"] = {"class_type": "SaveLatent", "inputs": {"samples": [dense, 0], "filename_prefix": "qs/dense"}}
    prompt["901"] = {"class_type": "SaveLatent", "inputs": {"samples": [sparse, 0], "filename_prefix": "qs/sparse"}}
    dense_only = {k: prompt[k] for k in ("900", dense, *[v[0] for v in prompt[dense]["inputs"].values()
                                                          if isinstance(v, list)])}
    return prompt, dense_only


def test_api_graph_end_to_end_equals_core_and_leaves_dense_untouched(server):
    import comfy.latent_formats  # noqa: F401  (ComfyUI importable in this interpreter: require_comfyui)
    from quantsparse_core.io.checkpoint import load_compressed
    from quantsparse_core.models.tiny.prompts import PromptEncoder
    from quantsparse_core.models.sampler import flow_sigmas, initial_noise, sample_euler
    from quantsparse_core.sparse.ssar import SparseSettings, SSARAttention

    info = server.get("/object_info")
    prompt, dense_only = _demo_prompt(info)
    before = _saved_latent(server, server.run(dense_only), "900")
    entry = server.run(prompt)
    dense_mid, sparse = _saved_latent(server, entry, "900"), _saved_latent(server, entry, "901")
    after = _saved_latent(server, server.run(dense_only), "900")
    assert torch.equal(before, dense_mid) and torch.equal(before, after)   # no state leaks into dense runs

    ckpt = server.base / "models" / "diffusion_models" / "quantsparse" / "tiny server test.safetensors"
    core, header = load_compressed(ckpt)
    assert header["calibration"]["settings"]["method"] == "block"
    text = prompt[[k for k, n in prompt.items() if n["class_type"] == "QuantSparseTinyPromptEncode"][0]]["inputs"]["text"]
    ctx, mask, pooled = PromptEncoder().encode([text])
    ssar = SSARAttention(SparseSettings(density=0.3, tau=3, svd_rank=8, warmup_steps=1, warmup_blocks=1))
    with core.attention(ssar):
        ref = sample_euler(core, initial_noise((1, 16, 8, 32, 32), SEED), ctx, pooled, flow_sigmas(STEPS),
                           attention_mask=mask, guidance=6.0)
    got = sparse.float() * comfy.latent_formats.HunyuanVideo().scale_factor
    rel = float((got - ref).norm() / ref.norm())
    assert rel < 5e-3, rel  # W4A8 rounding flips: see test_comfy_pipeline.py
    assert float((dense_mid.float() - sparse.float()).norm() / sparse.float().norm()) > 1e-3
    assert ssar.stats["sparse"] > 0


def test_bad_inputs_fail_on_the_node_with_a_fix(server):
    info = server.get("/object_info")
    prompt, _ = _demo_prompt(info)
    sparse = next(k for k, n in prompt.items() if n["class_type"] == "QuantSparseSparseSampler")
    prompt[sparse]["inputs"]["svd_rank"] = 4096
    with pytest.raises(AssertionError, match="svd_rank"):
        server.run(prompt)

    # A file in the compressed folder that is not ours: the loader says so on the node.
    foreign = server.base / "models" / "diffusion_models" / "quantsparse" / "hunyuan_video_quantsparse_w4a8.safetensors"
    from safetensors.torch import save_file
    save_file({"img_in.proj.weight": torch.randn(4, 4)}, str(foreign))
    load = {"1": {"class_type": "QuantSparseLoadCompressedDiT",
                  "inputs": {"checkpoint": "quantsparse/hunyuan_video_quantsparse_w4a8.safetensors"}},
            "2": {"class_type": "QuantSparseSparseAttention", "inputs": {"model": ["1", 0], **SPARSE}},
            "3": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 64, "height": 64, "length": 5,
                                                                     "batch_size": 1}},
            "4": {"class_type": "QuantSparseTinyPromptEncode", "inputs": {"text": "a red circle moving right slowly "
                                                                               "on a black background"}},
            "5": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "seed": 0, "steps": 2, "cfg": 1.0,
                                                       "sampler_name": "euler", "scheduler": "simple",
                                                       "positive": ["4", 0], "negative": ["4", 0],
                                                       "latent_image": ["3", 0], "denoise": 1.0}},
            "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "qs/bad"}}}
    with pytest.raises(AssertionError, match="not a QuantSparse compressed checkpoint"):
        server.run(load)
