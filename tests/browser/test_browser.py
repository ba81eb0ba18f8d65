"""The `browser` tier: ComfyUI's frontend (the version ComfyUI's requirements install) in headless Chromium against a
real ComfyUI server with the pack in custom_nodes/ (tests/browser/conftest.py, tests/comfy_server.py).

- Every shipped workflow loads through the frontend's own `app.loadGraphData` with no missing node type, no broken
  link and every widget value in its slot (each value valid for the widget the frontend built for that input, and
  the frontend saves back exactly the values the file holds).
- The frontend's own API conversion (`app.graphToPrompt()`) of each workflow is accepted by POST /prompt (the queued
  prompt is then cancelled: this checks what the UI sends, the server tier runs workflows).
- After a run queued from the page, each OFT node's report is readable on the node (the pack's web extension).
"""

from __future__ import annotations

import json
import time

import comfy_server as harness
import pytest
from frontend import WORKFLOWS

CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}

# Everything the page holds after loading a workflow, as plain data.
_LOAD_JS = """async (wf) => {
  const missing = wf.nodes.map(n => n.type).filter(t => !(t in LiteGraph.registered_node_types));
  await app.loadGraphData(wf, true, true, 'oft-browser-test',
                          {showMissingNodesDialog: false, showMissingModelsDialog: false});
  const g = app.graph;
  const nodes = g.nodes.map(n => ({
    id: n.id, type: n.type, registered: n.type in LiteGraph.registered_node_types, hasErrors: !!n.has_errors,
    widgets: (n.widgets || []).filter(w => w.serialize !== false).map(w => ({name: w.name, value: w.value})),
    saved: n.serialize().widgets_values ?? [],
    inputs: (n.inputs || []).map(i => ({name: i.name, type: i.type, link: i.link ?? null})),
    outputs: (n.outputs || []).map(o => ({name: o.name, type: o.type, links: o.links || []})),
  }));
  const all = g.links instanceof Map ? [...g.links.values()] : Object.values(g.links || {});
  const links = all.filter(Boolean).map(l => ({id: l.id, origin_id: l.origin_id, origin_slot: l.origin_slot,
    target_id: l.target_id, target_slot: l.target_slot, type: l.type}));
  return {missing, nodes, links};
}"""


def _types_agree(a, b) -> bool:
    if a in ("*", "", 0) or b in ("*", "", 0):
        return True
    return bool(set(str(a).split(",")) & set(str(b).split(",")))


def _value_problem(name: str, value, spec_entry) -> str | None:
    """Why `value` cannot be the value of the widget for input `name` with /object_info entry `spec_entry`."""
    typ = spec_entry[0]
    opts = spec_entry[1] if len(spec_entry) > 1 and isinstance(spec_entry[1], dict) else {}
    if isinstance(typ, list) or typ == "COMBO":
        options = typ if isinstance(typ, list) else opts.get("options", [])
        return None if value in options else f"{name}={value!r} is not one of its options {options[:10]}"
    if typ == "INT":
        ok = isinstance(value, int) and not isinstance(value, bool)
        if not ok:
            return f"{name}={value!r} is not an integer"
    elif typ == "FLOAT":
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return f"{name}={value!r} is not a number"
    elif typ == "BOOLEAN":
        return None if isinstance(value, bool) else f"{name}={value!r} is not a boolean"
    elif typ == "STRING":
        return None if isinstance(value, str) else f"{name}={value!r} is not text"
    if typ in ("INT", "FLOAT"):
        if "min" in opts and value < opts["min"] or "max" in opts and value > opts["max"]:
            return f"{name}={value!r} is outside [{opts.get('min')}, {opts.get('max')}]"
    return None


def _spec_entry(spec: dict, name: str):
    inputs = spec.get("input") or {}
    return (inputs.get("required") or {}).get(name) or (inputs.get("optional") or {}).get(name)


def load_workflow(session, wf: dict) -> dict:
    session.page_errors.clear()
    state = session.page.evaluate(_LOAD_JS, wf)
    session.page.wait_for_timeout(200)  # one frame: errors thrown while drawing show up here
    state["page_errors"] = list(session.page_errors)
    return state


@pytest.fixture(scope="module")
def object_info(comfy_page):
    return comfy_page.server.object_info()


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_workflow_loads_with_every_widget_in_its_slot(comfy_page, object_info, path):
    wf = json.loads(path.read_text())
    with comfy_page.failure_shot(f"load_{path.stem}"):
        state = load_workflow(comfy_page, wf)
        assert state["missing"] == [], f"{path.name}: node types the frontend does not know: {state['missing']}"
        assert not state["page_errors"], f"{path.name}: the page threw while loading: {state['page_errors']}"
        nodes = {n["id"]: n for n in state["nodes"]}
        assert sorted(nodes) == sorted(n["id"] for n in wf["nodes"])
        for n in state["nodes"]:
            assert n["registered"] and not n["hasErrors"], f"{path.name}: node {n['id']} ({n['type']}) is broken"

        # links: the file's links, each whole on both ends, on the inputs and outputs of the same names (the
        # frontend orders a node's inputs as /object_info does, required first, and moves link slots to match)
        links = {lk["id"]: lk for lk in state["links"]}
        assert sorted(links) == sorted(lk[0] for lk in wf["links"]), f"{path.name}: links lost or added"
        file_nodes = {n["id"]: n for n in wf["nodes"]}
        for lid, src, src_slot, dst, dst_slot, _t in wf["links"]:
            lk = links[lid]
            assert (lk["origin_id"], lk["target_id"]) == (src, dst), f"{path.name}: link {lid} moved: {lk}"
            target_input = nodes[dst]["inputs"][lk["target_slot"]]
            origin_output = nodes[src]["outputs"][lk["origin_slot"]]
            assert target_input["name"] == file_nodes[dst]["inputs"][dst_slot]["name"], (
                f"{path.name}: link {lid} now ends on input {target_input['name']!r}")
            assert origin_output["name"] == file_nodes[src]["outputs"][src_slot]["name"], (
                f"{path.name}: link {lid} now starts at output {origin_output['name']!r}")
            assert target_input["link"] == lid and lid in origin_output["links"], f"{path.name}: link {lid} broken"
            assert _types_agree(origin_output["type"], target_input["type"]), (
                f"{path.name}: link {lid} joins a {origin_output['type']} output to a {target_input['type']} input")

        # widgets: the frontend's widgets for each node are the node's inputs (plus the control after a seed), in
        # order, each holding a valid value, and saving gives back exactly what the file holds
        for node in wf["nodes"]:
            n = nodes[node["id"]]
            spec = object_info[node["type"]]
            expected = []
            for name, control in harness._widget_inputs(spec):
                expected.append(name)
                if control:
                    expected.append("control_after_generate")
            got = [w["name"] for w in n["widgets"]]
            assert got == expected, (f"{path.name}: node {node['id']} ({node['type']}) widgets {got}, "
                                     f"expected {expected}")
            assert n["saved"] == node.get("widgets_values", []), (
                f"{path.name}: node {node['id']} ({node['type']}) saves {n['saved']} but the file holds "
                f"{node.get('widgets_values')} (a value moved to another slot)")
            for i, w in enumerate(n["widgets"]):
                if w["name"] == "control_after_generate":
                    assert w["value"] in CONTROL_VALUES and got[i - 1] in ("seed", "noise_seed") or \
                        _spec_entry(spec, got[i - 1])[1].get("control_after_generate"), (
                            f"{path.name}: node {node['id']}: control widget holds {w['value']!r}")
                    continue
                problem = _value_problem(w["name"], w["value"], _spec_entry(spec, w["name"]))
                assert problem is None, f"{path.name}: node {node['id']} ({node['type']}): {problem}"


def _cancel(server, prompt_id: str, timeout: float = 180.0) -> None:
    """Take a queued prompt off the queue, or interrupt it if it already runs; return when it is neither."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        q = server.get("/queue")
        running = [item[1] for item in q.get("queue_running", [])]
        pending = [item[1] for item in q.get("queue_pending", [])]
        if prompt_id in pending:
            server.post("/queue", {"delete": [prompt_id]})
        elif prompt_id in running:
            server.post("/interrupt", {"prompt_id": prompt_id})
        else:
            return
        time.sleep(0.2)
    raise AssertionError(f"prompt {prompt_id} still queued or running after {timeout:.0f}s{server.log_tail(20)}")


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_frontend_api_conversion_is_accepted_by_prompt(comfy_page, object_info, path):
    wf = json.loads(path.read_text())
    server = comfy_page.server
    with comfy_page.failure_shot(f"api_{path.stem}"):
        load_workflow(comfy_page, wf)
        prompt = comfy_page.page.evaluate("async () => (await app.graphToPrompt()).output")
        assert sorted(prompt) == sorted(str(n["id"]) for n in wf["nodes"])
        # the harness's converter (used by the server tier) reads a workflow as the frontend does
        mine = harness.workflow_to_api(wf, object_info)
        for nid, node in prompt.items():
            assert node["class_type"] == mine[nid]["class_type"]
            assert node["inputs"] == mine[nid]["inputs"], (
                f"{path.name}: node {nid} ({node['class_type']}): the frontend sends {node['inputs']}, "
                f"comfy_server.workflow_to_api gives {mine[nid]['inputs']}")
        try:
            r = server.post("/prompt", {"prompt": prompt, "client_id": server.client_id})
        except harness.ComfyError as e:
            raise AssertionError(f"{path.name}: POST /prompt refused the frontend's prompt: "
                                 f"{getattr(e, 'payload', e)}") from None
        assert r.get("node_errors") == {}, r
        _cancel(server, r["prompt_id"])


# ------------------------------------------------------------------------------------------------ reports on nodes
REPORTS = {  # node title -> what its report must say
    "load": ["OFT tiny_sd15_oft.safetensors: 8 of 16 adapter layers applied (strength 1, mode kohya)",
             "not found in the model: 8 (", "up_blocks_3_attentions_2"],
    "file": ["tiny_sd15_oft.safetensors: 16 layers (kohya)"],
    "blocks": ["16 of 16 layers kept; block strength double=0.5, input=0.8: 0 layers off, 8 scaled",
               "WARNING: double=0.5 matches no layer of this adapter; its layers are in: input 1, output 11"],
    "apply": ["OFT tiny_sd15_oft.safetensors: 8 of 16 adapter layers applied (strength 0.9, mode orthogonal)",
              "block strength double=0.5, input=0.8"],
    "inspect": ["format:     kohya", "on this SD15 model: 8 of 16 diffusion-model layers match; not found: 8"],
    "save": ["saved kohya adapter (16 layers): ", "oft_browser_"],
    "double": ["8 of 16 adapter layers applied",
               "WARNING: 8 of these weights already carry ComfyUI's own OFT patch (a Load LoRA node loaded an OFT "
               "file)"],
}

# The graph, built with the frontend's own node classes: [title, type, widget values, {input: (title, slot)}]
_GRAPH = [
    ["ckpt", "CheckpointLoaderSimple", {"ckpt_name": harness.CHECKPOINT_NAME}, {}],
    ["load", "OFTLoader", {"adapter_name": "tiny_sd15_oft.safetensors"}, {"model": ("ckpt", 0), "clip": ("ckpt", 1)}],
    ["show_load", "PreviewAny", {}, {"source": ("load", 0)}],
    ["file", "OFTLoadAdapter", {"adapter_name": "tiny_sd15_oft.safetensors"}, {}],
    ["blocks", "OFTBlockStrength", {"block_spec": "double=0.5, input=0.8"}, {"oft_adapter": ("file", 0)}],
    ["apply", "OFTApply", {"strength": 0.9, "strength_mode": "orthogonal"},
     {"model": ("ckpt", 0), "oft_adapter": ("blocks", 0)}],
    ["show_apply", "PreviewAny", {}, {"source": ("apply", 0)}],
    ["inspect", "OFTInspect", {}, {"oft_adapter": ("file", 0), "model": ("ckpt", 0)}],
    ["save", "OFTSave", {"filename_prefix": "oft/oft_browser", "fractional_block_strength": "orthogonal"},
     {"oft_adapter": ("blocks", 0)}],
    ["core_lora", "LoraLoader", {"lora_name": "tiny_sd15_lycoris_oft.safetensors"},
     {"model": ("ckpt", 0), "clip": ("ckpt", 1)}],
    ["double", "OFTLoader", {"adapter_name": "tiny_sd15_lycoris_oft.safetensors"}, {"model": ("core_lora", 0)}],
    ["show_double", "PreviewAny", {}, {"source": ("double", 0)}],
]

_BUILD_JS = """(graph) => {
  app.graph.clear();
  const made = {};
  graph.forEach(([title, type, values, _], i) => {
    const n = LiteGraph.createNode(type);
    if (!n) throw new Error('cannot create ' + type);
    n.title = title;
    n.pos = [40 + (i % 4) * 420, 40 + Math.floor(i / 4) * 380];
    app.graph.add(n);
    for (const [k, v] of Object.entries(values)) {
      const w = n.widgets.find(w => w.name === k);
      if (!w) throw new Error(type + ' has no widget ' + k);
      w.value = v;
    }
    made[title] = n;
  });
  for (const [title, , , inputs] of graph) {
    for (const [name, [src, slot]] of Object.entries(inputs)) {
      const dst = made[title];
      const at = dst.inputs.findIndex(x => x.name === name);
      if (at < 0 || !made[src].connect(slot, dst, at)) {
        throw new Error('cannot link ' + src + ' -> ' + title + '.' + name);
      }
    }
  }
  app.graph.setDirtyCanvas(true, true);
  return Object.fromEntries(Object.entries(made).map(([t, n]) => [t, n.id]));
}"""

_VISIBLE_JS = """(id) => {
  const node = app.graph.getNodeById(id);
  app.canvas.ds.scale = 1;
  app.canvas.centerOnNode(node);
  app.canvas.setDirty(true, true);
  app.canvas.draw(true, true);
  return true;
}"""

_REPORT_JS = """(id) => {
  const el = document.querySelector(`textarea[data-oft-report="${id}"]`);
  if (!el) return null;
  const r = el.getBoundingClientRect();
  const cx = r.left + r.width / 2, cy = r.top + Math.min(r.height / 2, 10);
  const top = document.elementFromPoint(cx, cy);
  const style = getComputedStyle(el);
  return {text: el.value, width: r.width, height: r.height, left: r.left, top: r.top,
          onTop: top === el || el.contains(top), hidden: style.display === 'none' || style.visibility === 'hidden',
          viewW: window.innerWidth, viewH: window.innerHeight};
}"""


def test_reports_are_readable_on_the_nodes_after_a_run(comfy_page):
    page, server = comfy_page.page, comfy_page.server
    with comfy_page.failure_shot("reports_after_run"):
        comfy_page.page_errors.clear()
        ids = page.evaluate(_BUILD_JS, _GRAPH)
        # queued as the Run button does; frontend 1.27.10's queuePrompt returns !node_errors, false even on success
        # ({}), so the node errors themselves are checked
        errors = page.evaluate("async () => { await app.queuePrompt(0, 1); return app.lastNodeErrors; }")
        assert not errors, f"the server refused the graph: {errors}"
        # the run: loads the tiny checkpoint, patches (lazily), saves one small file
        for title in REPORTS:
            page.wait_for_function(
                "(id) => { const el = document.querySelector(`textarea[data-oft-report=\"${id}\"]`);"
                " return el && el.value.length > 0; }", arg=ids[title], timeout=300_000)
        assert not comfy_page.page_errors, comfy_page.page_errors
        for title, wanted in REPORTS.items():
            page.evaluate(_VISIBLE_JS, ids[title])
            page.wait_for_timeout(150)
            r = page.evaluate(_REPORT_JS, ids[title])
            assert r is not None, f"node {title!r}: no report box"
            for part in wanted:
                assert part in r["text"], f"node {title!r}: report {r['text']!r} lacks {part!r}"
            assert "--" not in r["text"], f"node {title!r}: the report names a command-line flag: {r['text']!r}"
            if any(part.startswith("WARNING:") for part in wanted):  # warnings first: seen without scrolling
                assert r["text"].startswith("WARNING:"), f"node {title!r}: the warning is not on top: {r['text']!r}"
            assert not r["hidden"] and r["width"] > 100 and r["height"] > 30, f"node {title!r}: box not shown: {r}"
            assert 0 <= r["left"] < r["viewW"] and 0 <= r["top"] < r["viewH"], f"node {title!r}: box off screen: {r}"
            assert r["onTop"], f"node {title!r}: the report box is covered by another element: {r}"
        # the report box is not a setting: saving the graph stores no report, the prompt sends none
        saved = page.evaluate("(id) => app.graph.getNodeById(id).serialize().widgets_values", ids["load"])
        assert saved == ["tiny_sd15_oft.safetensors", 1.0, "kohya", "merge"], saved
        prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
        assert all("oft_report" not in n["inputs"] for n in prompt.values())
    assert list((server.base / "output" / "oft").glob("oft_browser_*.safetensors"))


def test_a_missing_adapter_file_is_refused_when_queued_from_the_page(comfy_page):
    """Run with an adapter name the server does not have: the server refuses the prompt at once (no run), the node
    error names adapter_name, and the frontend shows it in its error dialog."""
    page = comfy_page.page
    graph = [["file", "OFTLoadAdapter", {"adapter_name": "no_such_adapter.safetensors"}, {}],
             ["inspect", "OFTInspect", {}, {"oft_adapter": ("file", 0)}]]
    with comfy_page.failure_shot("missing_adapter_queued"):
        ids = page.evaluate(_BUILD_JS, graph)
        before = len(comfy_page.server.get("/history"))
        errors = page.evaluate("async () => { await app.queuePrompt(0, 1); return app.lastNodeErrors; }")
        node_errors = errors[str(ids["file"])]["errors"]
        assert len(node_errors) == 1 and node_errors[0]["extra_info"]["input_name"] == "adapter_name"
        assert "'no_such_adapter.safetensors' not found" in node_errors[0]["details"]
        dialog = page.get_by_text("Prompt execution failed")
        dialog.wait_for(timeout=30_000)
        assert page.get_by_text("no_such_adapter.safetensors' not found", exact=False).first.is_visible()
        assert len(comfy_page.server.get("/history")) == before  # nothing ran
        page.keyboard.press("Escape")
        dialog.wait_for(state="hidden", timeout=30_000)
