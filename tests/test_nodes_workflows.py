"""The example workflows in workflows/: they parse, use only core nodes and ours, fit each node's schema (ComfyUI's
own `execution.validate_prompt` checks types, ranges, combos and links), and one runs end to end through ComfyUI's
own executor on the tiny FLUX.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil

import comfy_models
import pytest
import torch
from oracle import REL_TOL, rel_err
from safetensors.torch import load_file

pytestmark = pytest.mark.comfyui

WORKFLOWS = sorted((comfy_models.REPO_ROOT / "workflows").glob("*.json"))
OUR_NODES = {"OFTLoader", "OFTLoadAdapter", "OFTApply", "OFTInspect", "OFTBlockStrength", "OFTBlend", "OFTMerge",
             "OFTSave", "OFTTrainer", "OFTHook", "OFTExtractLoRA", "OFTLatentList",
             "OFTLoadImages"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# file dropdowns: their options depend on the user's folders, so the test gives them files of these names
FILE_INPUTS = {"ckpt_name": "checkpoints", "unet_name": "diffusion_models", "clip_name1": "text_encoders",
               "clip_name2": "text_encoders", "vae_name": "vae", "adapter_name": "oft"}



@pytest.fixture(scope="module")
def comfy_nodes(comfyui_oft):
    """ComfyUI's node table with core + comfy_extras nodes and ours, loaded by ComfyUI's own loaders."""
    from comfyui_oft.nodes import comfy_entrypoint

    import nodes

    asyncio.run(nodes.init_builtin_extra_nodes())
    core = set(nodes.NODE_CLASS_MAPPINGS) - OUR_NODES
    for cls in asyncio.run(comfy_entrypoint().get_node_list()):
        nodes.NODE_CLASS_MAPPINGS[cls.GET_SCHEMA().node_id] = cls
    return nodes, core


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory, comfyui_oft):
    """Temporary model folders holding files with the names the workflows use (empty, except the adapters)."""
    import folder_paths
    from comfyui_oft.nodes import files

    files.register_folder()
    root = tmp_path_factory.mktemp("models")
    for wf in WORKFLOWS:
        for node in json.loads(wf.read_text())["nodes"]:
            for name, folder in FILE_INPUTS.items():
                for value in _widget_map(node, None).get(name, []):
                    (root / folder).mkdir(exist_ok=True)
                    path = root / folder / value
                    if folder == "oft":
                        shutil.copy(comfy_models.FIXTURES / "kohya/flux_tiny_oft_attn_dim4.safetensors", path)
                    elif folder == "diffusion_models":
                        shutil.copy(comfy_models.FIXTURES / comfy_models.FLUX_TINY_BASE, path)
                    else:
                        path.touch()
    for folder in set(FILE_INPUTS.values()):
        (root / folder).mkdir(exist_ok=True)
        folder_paths.add_model_folder_path(folder, str(root / folder), is_default=True)
    folder_paths.filename_list_cache.clear()
    # OFTLoadImages' dropdown lists the input folder's subfolders: give it the ones the workflows use
    for sub in ("oft_train_images", "oft_train_square", "oft_train_wide"):
        (root / "input" / sub).mkdir(parents=True)
    saved_input = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(root / "input"))
    yield root
    folder_paths.set_input_directory(saved_input)


def _widget_map(node, nodes_table):
    """Best-effort {input name: [value]} of a UI node for the file inputs (names from the properties)."""
    known = {"CheckpointLoaderSimple": ["ckpt_name"], "UNETLoader": ["unet_name"],
             "DualCLIPLoader": ["clip_name1", "clip_name2"], "VAELoader": ["vae_name"],
             "OFTLoader": ["adapter_name"], "OFTLoadAdapter": ["adapter_name"]}
    names = known.get(node["type"], [])
    return {n: [v] for n, v in zip(names, node.get("widgets_values", []))}


def _widget_inputs(cls):
    """(name, type, options) of a node class's widget inputs, in the order the UI stores widgets_values."""
    spec = cls.INPUT_TYPES()
    out = []
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            t, opts = entry[0], (entry[1] if len(entry) > 1 else {})
            if isinstance(t, list):
                out.append((name, "COMBO", {"options": t, **opts}))
            elif t in WIDGET_TYPES and not opts.get("forceInput"):
                out.append((name, t, opts))
    return out


def has_control_widget(name: str, t: str, opts: dict) -> bool:
    """Whether the frontend (1.27.10, useIntWidget / migrateWidgetsValues) adds a "control after generate" widget
    after this input: a flagged input, or an INT named seed / noise_seed (the legacy convention), flag or not."""
    return bool(opts.get("control_after_generate")) or (t == "INT" and name in ("seed", "noise_seed"))


def to_api_prompt(workflow: dict, nodes_table) -> dict:
    """Convert a UI (litegraph) workflow into the API prompt ComfyUI executes (what the frontend sends)."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        cls = nodes_table[node["type"]]
        values = list(node.get("widgets_values", []))
        inputs = {}
        linked = {i["name"]: i["link"] for i in node.get("inputs", []) if i.get("link") is not None}
        for name, t, opts in _widget_inputs(cls):
            if not values:
                break
            value = values.pop(0)
            if has_control_widget(name, t, opts):
                values.pop(0)  # the "fixed" / "randomize" widget the frontend adds after a seed
            if name not in linked:
                inputs[name] = value
        assert not values, f"{node['type']}: {len(values)} widget values left over"
        for name, lid in linked.items():
            _, src, src_slot, _, _, _ = links[lid]
            inputs[name] = [str(src), src_slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_workflow_is_valid_for_comfyui(path, comfy_nodes, model_folders):
    import execution

    nodes, core = comfy_nodes
    wf = json.loads(path.read_text())
    types = {n["type"] for n in wf["nodes"]}
    assert types <= core | OUR_NODES, f"not core and not ours: {types - core - OUR_NODES}"
    assert types & OUR_NODES
    # links: ids unique, endpoints exist, types agree on both ends
    by_id = {n["id"]: n for n in wf["nodes"]}
    assert len(by_id) == len(wf["nodes"]) and wf["last_node_id"] >= max(by_id)
    for lid, src, src_slot, dst, dst_slot, t in wf["links"]:
        assert by_id[src]["outputs"][src_slot]["type"] == t and lid in by_id[src]["outputs"][src_slot]["links"]
        assert by_id[dst]["inputs"][dst_slot]["type"] == t and by_id[dst]["inputs"][dst_slot]["link"] == lid
    # widget values: count and type against each node's own schema
    for node in wf["nodes"]:
        widgets = _widget_inputs(nodes.NODE_CLASS_MAPPINGS[node["type"]])
        extra = sum(1 for name, t, o in widgets if has_control_widget(name, t, o))
        # a workflow saved before an optional widget was added at the end (apply_mode) has no value for it: the
        # frontend keeps that widget's default, and no other value moves
        optional = set(nodes.NODE_CLASS_MAPPINGS[node["type"]].INPUT_TYPES().get("optional", {}))
        n = len(node.get("widgets_values", []))
        trailing = 0
        while trailing < len(widgets) and widgets[len(widgets) - 1 - trailing][0] in optional:
            trailing += 1
        assert len(widgets) + extra - trailing <= n <= len(widgets) + extra, node["type"]
    prompt = to_api_prompt(wf, nodes.NODE_CLASS_MAPPINGS)
    ok, error, outputs, node_errors = asyncio.run(execution.validate_prompt("test", prompt, None))
    assert ok, (error, node_errors)
    assert outputs


class _Server:
    """What PromptExecutor needs of ComfyUI's PromptServer: it records the messages instead of sending them."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.sockets_metadata = {}
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


def test_flux_inspect_and_bake_runs_in_comfyui_executor(comfy_nodes, model_folders, monkeypatch, tmp_path):
    """The workflow "OFT FLUX inspect and bake into the model" through execution.PromptExecutor on the tiny FLUX:
    OFTInspect's text comes back in the history and the file written by core's ModelSave holds sd-scripts' merged
    weights."""
    import comfy.model_management
    import comfy.sd
    import execution
    import folder_paths

    nodes, _ = comfy_nodes
    base = comfy_models.flux_tiny()
    snap = {k: v.clone() for k, v in base.model.state_dict().items()}
    unet_file = model_folders / "diffusion_models" / "flux1-dev.safetensors"
    loaded = []

    def load_diffusion_model(path, model_options={}):
        # ComfyUI's detection hard-codes FLUX's width 3072; the tiny FLUX in that file is built by comfy_models
        # through the same ComfyUI classes the loader uses after detection.
        assert path == str(unet_file)
        loaded.append(path)
        return base.clone()

    monkeypatch.setattr(comfy.sd, "load_diffusion_model", load_diffusion_model)
    out_dir = tmp_path / "output"
    out_dir.mkdir()
    monkeypatch.setattr(folder_paths, "output_directory", str(out_dir))

    wf = json.loads((comfy_models.REPO_ROOT / "workflows" / "OFT FLUX inspect and bake into the model.json")
                    .read_text())
    prompt = to_api_prompt(wf, nodes.NODE_CLASS_MAPPINGS)
    ok, error, outputs, node_errors = asyncio.run(execution.validate_prompt("bake", prompt, None))
    assert ok, (error, node_errors)
    server = _Server()
    executor = _executor(server)
    try:
        executor.execute(prompt, "bake", {}, outputs)
        errors = [m for m in server.messages if m[0] == "execution_error"]
        assert executor.success, errors
        assert loaded == [str(unet_file)]
        inspect_id = next(str(n["id"]) for n in wf["nodes"] if n["type"] == "OFTInspect")
        text = executor.history_result["outputs"][inspect_id]["text"][0]
        assert "on this Flux model: 8 of 8 diffusion-model layers match" in text
        saved = list((out_dir / "diffusion_models").glob("flux_oft_baked_*.safetensors"))
        assert len(saved) == 1
        sd = load_file(saved[0])
    finally:
        comfy.model_management.unload_all_models()
    expected = load_file(comfy_models.FIXTURES / "kohya/flux_tiny_oft_attn_dim4_expected.safetensors")
    checked = 0
    for k, want in expected.items():
        if k.startswith("merged_m1.0/"):
            got = sd["model.diffusion_model." + k[len("merged_m1.0/"):]]
            assert rel_err(got, want) <= REL_TOL, k
            checked += 1
    assert checked == 8
    untouched = "model.diffusion_model.double_blocks.0.img_mlp.0.weight"
    assert torch.equal(sd[untouched], snap["diffusion_model.double_blocks.0.img_mlp.0.weight"])
    now = base.model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in snap.items())  # the shared model is back to its base weights


def _executor(server):
    """A PromptExecutor without a cache, built as main.py builds it (newer ComfyUI takes `cache_args` and reads its
    "ram" entry after each node; 0.3.64 has no such parameter)."""
    import inspect

    import execution

    if "cache_args" in inspect.signature(execution.PromptExecutor).parameters:
        return execution.PromptExecutor(server, cache_type=False, cache_args={"lru": 0, "ram": 0})
    return execution.PromptExecutor(server, cache_type=False)


def _execute(nodes, prompt, prompt_id):
    """Validate with ComfyUI's validate_prompt, then run in a fresh PromptExecutor (no cache carried over)."""
    import execution

    ok, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    assert ok, (error, node_errors)
    server = _Server()
    executor = _executor(server)
    executor.execute(prompt, prompt_id, {}, outputs)
    return executor, server


def _node_id(wf, node_type):
    return next(str(n["id"]) for n in wf["nodes"] if n["type"] == node_type)


def test_merge_and_save_runs_in_comfyui_executor(comfy_nodes, model_folders, monkeypatch, tmp_path):
    """The workflow "OFT merge two adapters and save" (both adapters are the fixture's FLUX adapter A here): the file
    OFT Save writes holds A then A^0.7; run twice, it writes two files."""
    import folder_paths
    from comfyui_oft.oft_core import load_adapter, rotate_weight

    nodes, _ = comfy_nodes
    out_dir = tmp_path / "output"
    out_dir.mkdir()
    monkeypatch.setattr(folder_paths, "output_directory", str(out_dir))
    wf = json.loads((comfy_models.REPO_ROOT / "workflows" / "OFT merge two adapters and save.json").read_text())
    prompt = to_api_prompt(wf, nodes.NODE_CLASS_MAPPINGS)
    for run in range(2):
        executor, _ = _execute(nodes, prompt, f"merge{run}")
        assert executor.success, [m for m in executor.status_messages if m[0] == "execution_error"]
        text = executor.history_result["outputs"][_node_id(wf, "OFTSave")]["text"][0]
        assert f"merged_oft_0000{run + 1}_.safetensors" in text and str(out_dir) in text
        assert "layers:     8" in executor.history_result["outputs"][_node_id(wf, "OFTInspect")]["text"][0]
    saved = sorted((out_dir / "oft").glob("merged_oft_*.safetensors"))
    assert [p.name for p in saved] == ["merged_oft_00001_.safetensors", "merged_oft_00002_.safetensors"]
    merged = load_adapter(saved[0])
    a = load_adapter(comfy_models.FIXTURES / "kohya/flux_tiny_oft_attn_dim4.safetensors")
    base = load_file(comfy_models.FIXTURES / comfy_models.FLUX_TINY_BASE)
    for layer in merged:
        w = base[re.sub(r"^double_blocks_(\d+)_(img|txt)_attn_(qkv|proj)$", r"double_blocks.\1.\2_attn.\3", layer.name)
                 + ".weight"]
        src = a.layers[("unet", layer.name)]
        want = rotate_weight(src, rotate_weight(src, w, 1.0, "orthogonal"), 0.7, "orthogonal")
        assert rel_err(rotate_weight(layer, w), want) <= 1e-5, layer.name


def test_bake_into_checkpoint_runs_in_comfyui_executor(comfy_nodes, model_folders, monkeypatch, tmp_path):
    """The workflow "OFT bake into a checkpoint" on the tiny FLUX: core CheckpointSave writes sd-scripts' merged
    weights."""
    import comfy.model_management
    import comfy.sd
    import folder_paths

    nodes, _ = comfy_nodes
    base = comfy_models.flux_tiny()
    snap = {k: v.clone() for k, v in base.model.state_dict().items()}
    ckpt = model_folders / "checkpoints" / "v1-5-pruned-emaonly.safetensors"

    def load_checkpoint_guess_config(path, *args, **kwargs):
        # ComfyUI's detection cannot recognise the tiny FLUX (see comfy_models); same classes, built by comfy_models
        assert path == str(ckpt)
        return base.clone(), None, None, None

    monkeypatch.setattr(comfy.sd, "load_checkpoint_guess_config", load_checkpoint_guess_config)
    out_dir = tmp_path / "output"
    out_dir.mkdir()
    monkeypatch.setattr(folder_paths, "output_directory", str(out_dir))
    wf = json.loads((comfy_models.REPO_ROOT / "workflows" / "OFT bake into a checkpoint.json").read_text())
    prompt = to_api_prompt(wf, nodes.NODE_CLASS_MAPPINGS)
    try:
        executor, _ = _execute(nodes, prompt, "bake_ckpt")
        assert executor.success, [m for m in executor.status_messages if m[0] == "execution_error"]
        assert "8 of 8 adapter layers applied" in executor.history_result["outputs"][_node_id(wf, "OFTLoader")][
            "text"][0]
        (saved,) = (out_dir / "checkpoints").glob("sd15_oft_baked_*.safetensors")
        sd = load_file(saved)
    finally:
        comfy.model_management.unload_all_models()
    expected = load_file(comfy_models.FIXTURES / "kohya/flux_tiny_oft_attn_dim4_expected.safetensors")
    merged = {k[len("merged_m1.0/"):]: v for k, v in expected.items() if k.startswith("merged_m1.0/")}
    assert len(merged) == 8
    for k, want in merged.items():
        assert rel_err(sd["model.diffusion_model." + k], want) <= REL_TOL, k
    untouched = "double_blocks.0.img_mlp.0.weight"
    assert torch.equal(sd["model.diffusion_model." + untouched], snap["diffusion_model." + untouched])
    now = base.model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in snap.items())


def test_bad_block_spec_is_rejected_before_the_run(comfy_nodes, model_folders):
    import execution

    prompt = {
        "1": {"class_type": "OFTLoadAdapter", "inputs": {"adapter_name": "my_oft_subject.safetensors"}},
        "2": {"class_type": "OFTBlockStrength", "inputs": {"oft_adapter": ["1", 0], "block_spec": "double:3-1=0"}},
        "3": {"class_type": "OFTSave", "inputs": {"oft_adapter": ["2", 0], "format": "kohya",
                                                  "filename_prefix": "oft/x", "fractional_block_strength": "refuse"}},
    }
    ok, _error, _outputs, node_errors = asyncio.run(execution.validate_prompt("bad_spec", prompt, None))
    assert not ok
    details = [e["details"] for e in node_errors["2"]["errors"]]
    assert any("block_spec" in d and "range 3-1 runs backwards" in d for d in details), details
    prompt["2"]["inputs"]["block_spec"] = "double:1-3=0, single=0.5"
    ok, error, _outputs, node_errors = asyncio.run(execution.validate_prompt("good_spec", prompt, None))
    assert ok, (error, node_errors)


def test_blend_refusal_surfaces_as_a_node_error(comfy_nodes, model_folders, monkeypatch, tmp_path):
    import folder_paths

    nodes, _ = comfy_nodes
    shutil.copy(comfy_models.FIXTURES / "kohya/sd15_oft_attn_dim8_bf16.safetensors",
                model_folders / "oft" / "sd15_for_blend.safetensors")
    folder_paths.filename_list_cache.clear()
    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path))
    prompt = {
        "1": {"class_type": "OFTLoadAdapter", "inputs": {"adapter_name": "my_oft_subject.safetensors"}},
        "2": {"class_type": "OFTLoadAdapter", "inputs": {"adapter_name": "sd15_for_blend.safetensors"}},
        "3": {"class_type": "OFTBlend", "inputs": {"adapter_a": ["1", 0], "adapter_b": ["2", 0], "ratio": 0.5}},
        "4": {"class_type": "OFTSave", "inputs": {"oft_adapter": ["3", 0], "format": "kohya",
                                                  "filename_prefix": "oft/x", "fractional_block_strength": "refuse"}},
    }
    executor, _ = _execute(nodes, prompt, "blend_error")
    assert not executor.success
    (err,) = [m[1] for m in executor.status_messages if m[0] == "execution_error"]  # what /history records
    assert err["node_id"] == "3" and err["node_type"] == "OFTBlend"
    assert "cannot blend: the adapters have different layers" in err["exception_message"]
    assert not list(tmp_path.iterdir())
