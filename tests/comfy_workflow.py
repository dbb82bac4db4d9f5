"""Check UI-format workflows against a server's /object_info, and convert them to API format
(what ComfyUI's frontend does before queueing), for the server tests."""
from __future__ import annotations

DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"  # ComfyUI >= 0.3x: a combo whose chosen option brings its own inputs
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", DYNAMIC_COMBO}


def _inputs(info: dict) -> list:
    """[(name, type, options)] in the order the editor lays them out: required, then optional."""
    order = info.get("input_order") or {sec: list(info["input"].get(sec, {})) for sec in ("required", "optional")}
    out = []
    for sec in ("required", "optional"):
        spec = info["input"].get(sec, {})
        for name in order.get(sec, []):
            t, opts = spec[name][0], (spec[name][1] if len(spec[name]) > 1 else {})
            if isinstance(t, list):
                t, opts = "COMBO", {**opts, "options": t}
            out.append((name, t, opts))
    return out


def widget_inputs(info: dict) -> list:
    """Top-level widgets; hidden ones (a dynamic combo's legacy twin) take no widget value."""
    return [(n, t, o) for n, t, o in _inputs(info) if t in WIDGET_TYPES and not o.get("forceInput")
            and not o.get("hidden")]


def _chosen(opts: dict, key) -> list:
    """The widget inputs a dynamic combo's option `key` adds (required, then optional), or None if no such option."""
    for option in opts.get("options", []):
        if option.get("key") == key:
            return widget_inputs({"input": option.get("inputs", {})})
    return None


def socket_type(info: dict, name: str):
    for n, t, _ in _inputs(info):
        if n == name:
            return t
    return None


def _widget_values(node: dict, info: dict) -> dict:
    return _read_widgets(node, info)[0]


def _read_widgets(node: dict, info: dict) -> tuple:
    """({input name: value}, [(input name, type, options)] in widget order), skipping the editor's extra entries: 'control after generate' after a seed, and the
    upload button's value after a file combo that takes uploads (LoadImage: ["example.png", "image"])."""
    values = list(node.get("widgets_values") or [])
    out, specs = {}, []

    def take(inputs, i, prefix=""):
        """A dynamic combo's chosen option's widgets follow it, named parent.child (ComfyUI's prompt keys)."""
        for name, t, opts in inputs:
            if i >= len(values):
                raise ValueError(f"node {node['id']} ({node['type']}): no widget value for {prefix + name!r}")
            out[prefix + name] = values[i]
            specs.append((prefix + name, t, opts))
            upload = any(opts.get(k) for k in ("image_upload", "video_upload", "audio_upload"))
            i += 2 if opts.get("control_after_generate") or upload else 1
            if t == DYNAMIC_COMBO:
                children = _chosen(opts, values[i - 1])
                if children is None:
                    raise ValueError(f"node {node['id']} ({node['type']}).{prefix + name}: {values[i - 1]!r} is not one of "
                                     f"the options {[o.get('key') for o in opts.get('options', [])]}")
                i = take(children, i, f"{prefix}{name}.")
        return i
    i = take(widget_inputs(info), 0)
    if i != len(values):
        raise ValueError(f"node {node['id']} ({node['type']}): {len(values)} widget values, expected {i}")
    return out, specs


def _check_value(where: str, t: str, opts: dict, v) -> list:
    if t == DYNAMIC_COMBO:  # its key was checked when its children were read
        return []
    if t == "COMBO":
        return [] if v in opts.get("options", []) else [f"{where}: {v!r} is not one of the options"]
    if t == "INT":
        ok = isinstance(v, int) and not isinstance(v, bool)
    elif t == "FLOAT":
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
    elif t == "BOOLEAN":
        ok = isinstance(v, bool)
    else:
        ok = isinstance(v, str)
    if not ok:
        return [f"{where}: {v!r} is not a {t}"]
    if t in ("INT", "FLOAT") and (v < opts.get("min", v) or v > opts.get("max", v)):
        return [f"{where}: {v} outside [{opts.get('min')}, {opts.get('max')}]"]
    return []


def validate(workflow: dict, object_info: dict) -> list:
    """Problems found (empty = valid): node types, link types, widget values."""
    problems = []
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for n in workflow["nodes"]:
        info = object_info.get(n["type"])
        if info is None:
            problems.append(f"node {n['id']}: unknown type {n['type']}")
            continue
        try:
            values, specs = _read_widgets(n, info)
        except ValueError as e:
            problems.append(str(e))
            continue
        for name, t, opts in specs:
            problems += _check_value(f"node {n['id']} ({n['type']}).{name}", t, opts, values[name])
        required = info["input"].get("required", {})
        linked = {i["name"] for i in n.get("inputs", []) if i.get("link") is not None}
        for name, t, _ in _inputs(info):
            if name in required and t not in WIDGET_TYPES and name not in linked:
                problems.append(f"node {n['id']} ({n['type']}): required input {name!r} is not connected")
    for link_id, src, slot, dst, dst_slot, t in workflow["links"]:
        s, d = nodes.get(src), nodes.get(dst)
        if s is None or d is None:
            problems.append(f"link {link_id}: missing node")
            continue
        outs = object_info.get(s["type"], {}).get("output", [])
        if slot >= len(outs) or outs[slot] != t:
            problems.append(f"link {link_id}: {s['type']} output {slot} is {outs[slot:slot + 1]}, link says {t}")
        name = d["inputs"][dst_slot]["name"]
        want = socket_type(object_info.get(d["type"], {"input": {}}), name)
        if want != t:
            problems.append(f"link {link_id}: {d['type']}.{name} takes {want}, gets {t}")
    return problems


def to_api(workflow: dict, object_info: dict) -> dict:
    """API-format prompt {id: {class_type, inputs}} from a UI workflow."""
    links = {l[0]: l for l in workflow["links"]}
    prompt = {}
    for n in workflow["nodes"]:
        if n.get("mode", 0) != 0:
            continue
        info = object_info[n["type"]]
        inputs = dict(_widget_values(n, info))
        for name, t, opts in _inputs(info):  # hidden widgets (a dynamic combo's legacy twin): the frontend sends
            if t in WIDGET_TYPES and opts.get("hidden") and name not in inputs:  # their default
                first = (opts.get("options") or [None])[0]
                inputs[name] = opts.get("default", first.get("key") if isinstance(first, dict) else first)
        for i in n.get("inputs", []):
            if i.get("link") is not None:
                _, src, slot, _, _, _ = links[i["link"]]
                inputs[i["name"]] = [str(src), slot]
        prompt[str(n["id"])] = {"class_type": n["type"], "inputs": inputs}
    return prompt
