"""The shipped workflows in ComfyUI's real frontend (its comfyui-frontend-package), in headless
Chromium driven by playwright: each loads with every node type registered, no node in error (red),
no error banner, no node drawn over another, every combo value one of its options and every number in range, and the frontend's
own API prompt equal to what the server tests queue (comfy_workflow.to_api), so a widget value the
editor puts in another input (as it does for an extra `seed` control) is caught. A screenshot of
each is taken; with QS_UPDATE_SCREENSHOTS=1 it replaces docs/screenshots/<workflow>.png (the README's),
otherwise it goes to the test's temporary folder, so a test run leaves the checkout unchanged.

Needs COMFYUI_PATH (as test_comfy_server.py), `pip install playwright` in that Python and a Chromium
binary: QS_CHROMIUM, else `chromium` / `chromium-browser` / `google-chrome` on PATH (Debian:
`apt-get install chromium`), else playwright's own download. Skipped when one is missing.
"""
import copy
import json
import os
import shutil
import urllib.request
from pathlib import Path

import pytest

from comfy_workflow import to_api
from test_comfy_server import ROOT, WORKFLOWS, server  # noqa: F401  (the server fixture)

SHOTS = ROOT / "docs" / "screenshots"
SETTINGS = {"Comfy.TutorialCompleted": True,        # no template browser over the graph
            "Comfy.Minimap.Visible": False,
            "LiteGraph.Canvas.MinFontSizeForLOD": 1}  # draw widget text at small zoom in screenshots

# Loads a UI workflow the way a user's drop does, then reads back what the editor made of it.
LOAD_AND_CHECK = """async (wf) => {
  await app.loadGraphData(wf);
  const problems = [];
  for (const n of app.graph._nodes) {
    const at = `node ${n.id} (${n.type})`;
    if (!LiteGraph.registered_node_types[n.type]) problems.push(`${at}: node type not registered`);
    if (n.has_errors) problems.push(`${at}: node in error`);
    for (const w of n.widgets || []) {
      const o = w.options || {};
      if (Array.isArray(o.values) && !o.values.includes(w.value))
        problems.push(`${at}.${w.name}: ${JSON.stringify(w.value)} is not one of its options`);
      if (w.type === 'number' && (typeof w.value !== 'number' || w.value < o.min || w.value > o.max))
        problems.push(`${at}.${w.name}: ${JSON.stringify(w.value)} outside [${o.min}, ${o.max}]`);
    }
  }
  const t = LiteGraph.NODE_TITLE_HEIGHT, box = n => [n.pos[0], n.pos[1] - t, n.pos[0] + n.size[0], n.pos[1] + n.size[1]];
  const ns = app.graph._nodes;
  for (let i = 0; i < ns.length; i++)      // a node drawn over another hides its widgets in the editor
    for (let j = i + 1; j < ns.length; j++) {
      const a = box(ns[i]), b = box(ns[j]);
      if (a[0] < b[2] && b[0] < a[2] && a[1] < b[3] && b[1] < a[3])
        problems.push(`node ${ns[i].id} (${ns[i].type}) overlaps node ${ns[j].id} (${ns[j].type})`);
    }
  await new Promise(r => setTimeout(r, 300));   // banners are shown after the load
  for (const e of document.querySelectorAll('[role=status][class*=destructive], .p-toast-message-error'))
    if (e.offsetParent !== null) problems.push(`error banner: ${e.innerText.replace(/\\s+/g, ' ')}`);
  return {problems, prompt: (await app.graphToPrompt()).output};
}"""

# Centres the whole graph at the largest zoom (at most 1) that shows it, for the screenshot.
FIT = """() => {
  const ns = app.graph._nodes, t = LiteGraph.NODE_TITLE_HEIGHT, el = app.canvas.canvas;
  const x0 = Math.min(...ns.map(n => n.pos[0])), y0 = Math.min(...ns.map(n => n.pos[1] - t));
  const x1 = Math.max(...ns.map(n => n.pos[0] + n.size[0])), y1 = Math.max(...ns.map(n => n.pos[1] + n.size[1]));
  const s = Math.min(1, (el.clientWidth - 140) / (x1 - x0), (el.clientHeight - 260) / (y1 - y0));
  app.canvas.ds.scale = s;
  app.canvas.ds.offset = [(el.clientWidth / s - (x1 - x0)) / 2 - x0, (el.clientHeight / s - (y1 - y0)) / 2 - y0];
  app.canvas.setDirty(true, true);
}"""


def _chromium(playwright) -> str | None:
    """The browser to drive (None: playwright's own download); skips when there is none."""
    exe = os.environ.get("QS_CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    if exe is None and not Path(playwright.chromium.executable_path).is_file():
        pytest.skip("no Chromium: `apt-get install chromium` (or set QS_CHROMIUM, or `playwright install chromium`)")
    return exe


@pytest.fixture(scope="module")
def page(request):
    """The frontend in headless Chromium; the browser is looked for before the server starts."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (in ComfyUI's Python)")
    with sync_api.sync_playwright() as p:
        exe = _chromium(p)
        srv = request.getfixturevalue("server")
        for key, value in SETTINGS.items():
            req = urllib.request.Request(f"{srv.url}/api/settings/{key}", data=json.dumps(value).encode(),
                                         method="POST")
            urllib.request.urlopen(req, timeout=30).read()
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])  # root in CI/containers
        try:
            pg = browser.new_page(viewport={"width": 2400, "height": 1200})
            pg.goto(srv.url + "/")
            pg.wait_for_function("() => window.LiteGraph && window.app && app.canvas && "
                                 "LiteGraph.registered_node_types['QuantSparseSparseSampler']", timeout=120_000)
            yield pg
        finally:
            browser.close()


def _load(page, workflow):
    return page.evaluate(LOAD_AND_CHECK, workflow)


def _api(prompt):
    """{id: (class_type, inputs)}: the frontend's prompt less its `_meta` titles."""
    return {k: (v["class_type"], v["inputs"]) for k, v in prompt.items()}


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_loads_clean_in_the_real_frontend(page, server, path, tmp_path):  # noqa: F811
    wf = json.loads(path.read_text())
    got = _load(page, wf)
    page.evaluate(FIT)
    page.wait_for_timeout(300)
    shots = SHOTS if os.environ.get("QS_UPDATE_SCREENSHOTS") == "1" else tmp_path
    shots.mkdir(parents=True, exist_ok=True)
    shot = shots / f"{path.stem}.png"
    page.screenshot(path=str(shot))  # before the asserts: a failure is shown too
    assert shot.stat().st_size > 10_000   # a drawn graph, not an empty page
    assert got["problems"] == []
    assert _api(got["prompt"]) == _api(to_api(wf, server.get("/object_info")))


def test_the_frontend_check_is_not_blind(page, server):  # noqa: F811
    """A node type that is not installed, a combo value that is not an option, an out-of-range number
    and a widget value moved to another input are each reported."""
    wf = json.loads((ROOT / "workflows" / "quantsparse_text_to_video.json").read_text())
    bad = copy.deepcopy(wf)
    by_type = {n["type"]: n for n in bad["nodes"]}
    by_type["DualCLIPLoader"]["type"] = "NoSuchNode"
    sampler = by_type["QuantSparseSparseSampler"]["widgets_values"]
    sampler[-5] = "vram-please"   # cache_placement
    sampler[2] = 0                # steps (after seed and its control), minimum 1
    problems = "\n".join(_load(page, bad)["problems"])
    for expected in ("NoSuchNode): node type not registered", "NoSuchNode): node in error", "Missing node",
                     "cache_placement: \"vram-please\"", ".steps: 0 outside"):
        assert expected in problems, problems
    shifted = copy.deepcopy(wf)
    values = next(n for n in shifted["nodes"] if n["type"] == "QuantSparseSparseSampler")["widgets_values"]
    del values[1]                 # no control value after the seed: every later value lands one input early
    values.append(True)
    got = _load(page, shifted)
    assert _api(got["prompt"]) != _api(to_api(wf, server.get("/object_info")))
