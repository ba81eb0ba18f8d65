"""What the nodes tell a user before and after a run (issue 9): the adapter dropdown lists OFT files only, a missing
or non-OFT file is refused when the prompt is queued, block-strength items that select nothing are reported, and a
weight that already carries ComfyUI's own OFT patch is warned about. Library level, against the real ComfyUI; the
same behaviours are checked in the browser and through a running server in test_browser.py.
"""

from __future__ import annotations

import asyncio
import os
import shutil

import comfy_models
import pytest
import torch
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.comfyui

FLUX_ADAPTER = "kohya/flux_tiny_oft_attn_dim4.safetensors"
FIXTURES_DIR = comfy_models.FIXTURES
LYCORIS = "lycoris_diag_oft_dim8"


@pytest.fixture(scope="module")
def pack(comfyui_oft):
    from comfyui_oft.nodes import files, oft_nodes, op_nodes, patch

    return type("P", (), {"files": files, "oft_nodes": oft_nodes, "op_nodes": op_nodes, "patch": patch})


def _lora_file(path):
    g = torch.Generator().manual_seed(0)
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(8, 4, generator=g),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(4, 8, generator=g)},
              str(path))


@pytest.fixture()
def folders(pack, fixtures_dir, tmp_path, monkeypatch):
    """Private `oft` and `loras` folders: two OFT files, a LoRA, a damaged file and a PEFT adapter folder."""
    import folder_paths

    oft, loras = tmp_path / "oft", tmp_path / "loras"
    oft.mkdir()
    loras.mkdir()
    shutil.copy(fixtures_dir / FLUX_ADAPTER, oft / "flux_kohya.safetensors")
    (oft / "damaged.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    shutil.copy(fixtures_dir / "lycoris" / LYCORIS / f"{LYCORIS}.safetensors", loras / "lyco_oft.safetensors")
    _lora_file(loras / "some_lora.safetensors")
    peft = oft / "peft_dir"
    peft.mkdir()
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copy(fixtures_dir / "peft" / "peft_oft_cayley_bs8" / f, peft / f)
    pack.files.register_folder()
    table = dict(folder_paths.folder_names_and_paths)
    table["oft"] = ([str(oft)], {".safetensors"})
    table["loras"] = ([str(loras)], {".safetensors"})
    monkeypatch.setattr(folder_paths, "folder_names_and_paths", table)
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    pack.files.clear_cache()
    yield oft, loras
    pack.files.clear_cache()


def test_dropdown_lists_oft_files_only_from_headers_cached(pack, folders, monkeypatch):
    oft, loras = folders
    files = pack.files
    reads = []
    real = files.read_header
    monkeypatch.setattr(files, "read_header", lambda p: reads.append(os.path.basename(p)) or real(p))
    listed = files.adapter_files()
    assert listed == sorted(["flux_kohya.safetensors", "lyco_oft.safetensors",
                             os.path.join("peft_dir", "adapter_model.safetensors")])
    # every header was read once, the LoRA's and the damaged file's too (and refused)
    assert sorted(reads) == ["adapter_model.safetensors", "damaged.safetensors", "flux_kohya.safetensors",
                             "lyco_oft.safetensors", "some_lora.safetensors"]
    # the node's schema (re-read on every /object_info) shows the same list
    schema = pack.oft_nodes.OFTLoader.GET_SCHEMA()
    combo = next(i for i in schema.inputs if i.id == "adapter_name")
    assert list(combo.options) == listed
    # a second listing reads no header; a changed file is read again
    reads.clear()
    assert files.adapter_files() == listed
    assert reads == []
    st = os.stat(loras / "lyco_oft.safetensors")
    os.utime(loras / "lyco_oft.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    assert files.adapter_files() == listed
    assert reads == ["lyco_oft.safetensors"]
    # a LoRA that becomes an OFT file (same name) appears
    shutil.copy(oft / "flux_kohya.safetensors", loras / "some_lora.safetensors")
    assert "some_lora.safetensors" in files.adapter_files()


def test_what_oft_save_writes_by_default_is_listed_by_the_loaders(pack, tmp_path, monkeypatch):
    """OFT Save's default prefix writes under output/oft, which register_folder lists (as main.py lists
    output/loras): a file saved by a workflow can be loaded by the next one without moving it."""
    import folder_paths

    out = tmp_path / "output"
    out.mkdir()
    monkeypatch.setattr(folder_paths, "output_directory", str(out))
    monkeypatch.setattr(folder_paths, "folder_names_and_paths", dict(folder_paths.folder_names_and_paths))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    monkeypatch.setattr(pack.files, "_registered", False)
    pack.files.clear_cache()
    pack.files.register_folder()
    assert str(out / "oft") in folder_paths.folder_names_and_paths["oft"][0]
    adapter = pack.files.load(str(FIXTURES_DIR / FLUX_ADAPTER))
    default = next(i.default for i in pack.op_nodes.OFTSave.GET_SCHEMA().inputs if i.id == "filename_prefix")
    text = pack.op_nodes.OFTSave.execute(adapter, "kohya", default, "refuse").ui.value
    saved = text.splitlines()[0].rsplit(": ", 1)[1]
    assert os.path.dirname(saved) == str(out / "oft")
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    assert os.path.basename(saved) in pack.files.adapter_files()
    assert pack.files.resolve(os.path.basename(saved)) == saved
    pack.files.clear_cache()


def test_loaders_refuse_missing_and_non_oft_files_by_name(pack, folders):
    for node in (pack.oft_nodes.OFTLoader, pack.oft_nodes.OFTLoadAdapter):
        assert node.validate_inputs(adapter_name="flux_kohya.safetensors") is True
        assert node.validate_inputs(adapter_name=None) is True  # linked: checked when it runs
        missing = node.validate_inputs(adapter_name="gone.safetensors")
        assert "'gone.safetensors' not found" in missing and "flux_kohya.safetensors" in missing
        lora = node.validate_inputs(adapter_name="some_lora.safetensors")
        assert "some_lora.safetensors" in lora and "LoRA file, not OFT" in lora
        damaged = node.validate_inputs(adapter_name="damaged.safetensors")
        assert "damaged.safetensors" in damaged and "cannot be read as an OFT adapter" in damaged


def test_queue_time_refusal_through_comfyui_validate_prompt(pack, folders, comfyui_oft):
    """ComfyUI's own prompt validation (what POST /prompt runs) returns a node error naming adapter_name, once."""
    import execution
    from comfyui_oft.nodes import comfy_entrypoint

    import nodes

    for cls in asyncio.run(comfy_entrypoint().get_node_list()):
        nodes.NODE_CLASS_MAPPINGS.setdefault(cls.GET_SCHEMA().node_id, cls)
    prompt = {"1": {"class_type": "OFTLoadAdapter", "inputs": {"adapter_name": "gone.safetensors"}},
              "2": {"class_type": "OFTInspect", "inputs": {"oft_adapter": ["1", 0]}}}
    ok, _error, _outputs, node_errors = asyncio.run(execution.validate_prompt("t", prompt, None))
    assert not ok
    errors = node_errors["1"]["errors"]
    assert len(errors) == 1 and errors[0]["extra_info"]["input_name"] == "adapter_name"
    assert "'gone.safetensors' not found" in errors[0]["details"]
    prompt["1"]["inputs"]["adapter_name"] = "flux_kohya.safetensors"
    ok, *_ = asyncio.run(execution.validate_prompt("t", prompt, None))
    assert ok


def test_block_strength_names_items_that_select_no_layer(pack, fixtures_dir):
    adapter = pack.files.load(fixtures_dir / FLUX_ADAPTER)
    assert pack.op_nodes.adapter_groups(adapter) == "double 0-1"
    out = pack.op_nodes.OFTBlockStrength.execute(oft_adapter=adapter, block_spec="input=0.5, double:1=0.8, te=0")
    text = out.ui.value
    assert text.startswith(f"{len(adapter)} of {len(adapter)} layers kept")
    warning = text.split("\n")[1]
    assert warning == ("WARNING: input=0.5, te=0 match no layer of this adapter; its layers are in: double 0-1")
    quiet = pack.op_nodes.OFTBlockStrength.execute(oft_adapter=adapter, block_spec="double:0=0, default=0.5")
    assert "WARNING" not in quiet.ui.value and "\n" not in quiet.ui.value


def test_sd_groups_are_listed_with_their_block_numbers(pack, fixtures_dir):
    adapter = pack.files.load(fixtures_dir / "kohya/sd15_oft_attn_dim8_bf16.safetensors")
    # the 128 attention layers of SD1.5: input blocks 1,2,4,5,7,8, the middle block, output blocks 3-11
    assert pack.op_nodes.adapter_groups(adapter) == "input 1-2,4-5,7-8, middle, output 3-11"
    assert pack.op_nodes.unmatched_items(adapter, "input:0=0, output:3-5=0, double=1") == ["input:0=0", "double=1"]


def _private_oft_folder(pack, tmp_path, monkeypatch):
    """An empty `oft` models folder of this test's own (ComfyUI's folder table patched for the test only)."""
    import folder_paths

    oft = tmp_path / "oft"
    oft.mkdir()
    pack.files.register_folder()
    table = dict(folder_paths.folder_names_and_paths)
    table["oft"] = ([str(oft)], {".safetensors"})
    monkeypatch.setattr(folder_paths, "folder_names_and_paths", table)
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    return oft


def test_core_oft_patch_on_the_same_weights_is_warned(pack, fixtures_dir, tmp_path, monkeypatch):
    """Core Load LoRA of a LyCORIS OFT file + Load OFT of the same file: both rotate; the report says so."""
    import comfy.sd

    d = fixtures_dir / "lycoris" / LYCORIS
    oft = _private_oft_folder(pack, tmp_path, monkeypatch)
    shutil.copy(d / f"{LYCORIS}.safetensors", oft / "same.safetensors")

    base = comfy_models.sd15_tiny()
    plain = pack.oft_nodes.OFTLoader.execute(model=base, adapter_name="same.safetensors", strength=1.0,
                                             strength_mode="kohya")
    assert "56 of 56 adapter layers applied" in plain.ui.value and "WARNING" not in plain.ui.value

    core_model, _ = comfy.sd.load_lora_for_models(base, None, load_file(d / f"{LYCORIS}.safetensors"), 1.0, 0.0)
    assert len(core_model.patches) == 56
    out = pack.oft_nodes.OFTLoader.execute(model=core_model, adapter_name="same.safetensors", strength=1.0,
                                           strength_mode="kohya")
    first, warning = out.ui.value.split("\n")
    assert "56 of 56 adapter layers applied" in first
    assert warning.startswith("WARNING: 56 of these weights already carry ComfyUI's own OFT patch")
    assert "rotated twice" in warning
    # still applied (a warning, not a refusal): every weight now has core's patch and ours
    assert all(len(v) == 2 for v in out.result[0].patches.values())


def test_tensors_the_reader_leaves_out_are_named_in_the_report(pack, fixtures_dir, tmp_path, monkeypatch):
    """A LyCORIS file that mixes algorithms (a LoRA module beside its diag-oft ones, as a per-module preset writes
    it): the OFT layers are applied and the report says which tensors were not, instead of dropping them silently;
    a file without such tensors says nothing of the kind."""
    d = fixtures_dir / "lycoris" / LYCORIS
    oft = _private_oft_folder(pack, tmp_path, monkeypatch)
    g = torch.Generator().manual_seed(1)
    lora = {"lycoris_down_blocks_0_attentions_0_proj_out.lora_up.weight": torch.randn(32, 4, generator=g),
            "lycoris_down_blocks_0_attentions_0_proj_out.lora_down.weight": torch.randn(4, 32, generator=g)}
    save_file({**load_file(d / f"{LYCORIS}.safetensors"), **lora}, str(oft / "mixed.safetensors"))
    shutil.copy(d / f"{LYCORIS}.safetensors", oft / "plain.safetensors")

    base = comfy_models.sd15_tiny()
    out = pack.oft_nodes.OFTLoader.execute(model=base, adapter_name="mixed.safetensors", strength=1.0,
                                           strength_mode="kohya")
    text = out.ui.value
    assert "56 of 56 adapter layers applied" in text
    assert ("; 2 tensors in the file are not OFT and were not applied "
            "(lycoris_down_blocks_0_attentions_0_proj_out.lora_down.weight, …)") in text, text
    plain = pack.oft_nodes.OFTLoader.execute(model=base, adapter_name="plain.safetensors", strength=1.0,
                                             strength_mode="kohya")
    assert "56 of 56 adapter layers applied" in plain.ui.value and "not OFT" not in plain.ui.value


def test_inspect_text_names_no_command_line_flag(pack, fixtures_dir):
    adapter = pack.files.load(fixtures_dir / "kohya/sd15_oft_attn_dim8_bf16.safetensors")
    text = pack.oft_nodes.inspect_text(adapter)
    assert "more" in text  # the clamped-layer list is cut, as before
    assert "--" not in text and "json" not in text.lower()


@pytest.mark.parametrize("names,says", [
    (["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.0.mlp.fc1"], "a text encoder"),
    (["encoder.block.0.layer.0.SelfAttention.q"], "a text encoder"),
    (["blocks.0.self_attn.q", "blocks.0.ffn.net.0"], "Wan 2.x"),
    (["double_blocks.0.img_attn.qkv"], "FLUX"),
])
def test_what_an_unmatched_adapter_looks_made_for(pack, names, says):
    """A CLIP's layers (self_attn.q_proj) under the diffusion model's component were guessed to be Wan 2.x."""
    from comfyui_oft.nodes.patch import guess_target
    from comfyui_oft.oft_core import OFTAdapter, make_layer

    layers = {("unet", n): make_layer(path="x", name=n, side="out", transpose=True, blocks=[torch.zeros(2, 4, 4)])
              for n in names}
    assert guess_target(OFTAdapter(layers=layers, format="kohya")).startswith(says)
