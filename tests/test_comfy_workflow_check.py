"""The workflow checker the server tests use (tests/comfy_workflow.py) reads newer ComfyUI's dynamic combos:
a combo whose chosen option adds its own widgets (SaveVideo's format -> codec in ComfyUI >= 0.33), named
parent.child in the API prompt, and hidden legacy inputs that take no widget value (the frontend sends their
default). No ComfyUI needed: the
node info below has /object_info's shape."""
from comfy_workflow import to_api, validate

CODEC = ["COMFY_DYNAMICCOMBO_V3", {"options": [
    {"key": "auto", "inputs": {"required": {}}},
    {"key": "h264", "inputs": {"required": {"crf": ["FLOAT", {"min": 0.0, "max": 51.0}]}}}]}]
INFO = {"SaveVideo": {
    "input": {"required": {"video": ["VIDEO", {}], "filename_prefix": ["STRING", {}],
                           "format": ["COMFY_DYNAMICCOMBO_V3", {"options": [
                               {"key": "auto", "inputs": {"required": {"codec": CODEC}}},
                               {"key": "webm", "inputs": {"required": {}}}]}]},
              "optional": {"codec": [CODEC[0], dict(CODEC[1], hidden=True)]}},
    "input_order": {"required": ["video", "filename_prefix", "format"], "optional": ["codec"]},
    "output": ["VIDEO"]},
    "Source": {"input": {"required": {}}, "output": ["VIDEO"]}}


def workflow(values):
    return {"nodes": [{"id": 1, "type": "Source", "widgets_values": []},
                      {"id": 2, "type": "SaveVideo", "widgets_values": values,
                       "inputs": [{"name": "video", "link": 7}]}],
            "links": [[7, 1, 0, 2, 0, "VIDEO"]]}


def test_dynamic_combo_children_follow_their_parent_and_become_dotted_prompt_keys():
    wf = workflow(["video/x", "auto", "h264", 18.0])  # format auto -> codec h264 -> crf
    assert validate(wf, INFO) == []
    assert to_api(wf, INFO)["2"]["inputs"] == {"filename_prefix": "video/x", "format": "auto", "format.codec": "h264",
                                               "format.codec.crf": 18.0, "codec": "auto", "video": ["1", 0]}
    assert to_api(workflow(["v", "webm"]), INFO)["2"]["inputs"]["format"] == "webm"  # an option without children


def test_dynamic_combo_values_are_checked():
    assert validate(workflow(["video/x", "auto", "h264", 99.0]), INFO) == ["node 2 (SaveVideo).format.codec.crf: 99.0 "
                                                                          "outside [0.0, 51.0]"]
    assert "'mov' is not one of the options ['auto', 'webm']" in validate(workflow(["v", "mov"]), INFO)[0]
    assert validate(workflow(["v", "auto", "auto", "extra"]), INFO) == [
        "node 2 (SaveVideo): 4 widget values, expected 3"]
