"""The ComfyUI nodes and the patch seam (nodes/patch.py), against the REAL ComfyUI on small models it loads.

Every test uses the `comfy` fixture (via `pack`), so it is marked `comfyui` and skips when ComfyUI is absent.
Shared models from comfy_models are only ever patched through clones and always unpatched afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil

import comfy_models
import pytest
import torch
from oracle import REL_TOL, peft_boft_weight, rel_err
from safetensors import safe_open
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.comfyui

FLUX_ADAPTER = "kohya/flux_tiny_oft_attn_dim4.safetensors"
FLUX_EXPECTED = "kohya/flux_tiny_oft_attn_dim4_expected.safetensors"
SD15_ADAPTER = "kohya/sd15_oft_attn_dim8_bf16.safetensors"
SD15_EXPECTED = "kohya/sd15_oft_attn_dim8_bf16_expected.safetensors"
LYCORIS_DIRS = ["lycoris_diag_oft_dim8", "lycoris_diag_oft_constrained", "lycoris_diag_oft_rescaled",
                "lycoris_boft_dim8"]
PEFT_DIRS = ["peft_oft_cayley_bs8", "peft_oft_neumann_r4", "peft_oft_blockshare_bs8", "peft0.13.2_oft_r4",
             "peft0.15.2_oft_bs8"]
NODE_IDS = ["OFTLoader", "OFTLoadAdapter", "OFTApply", "OFTInspect", "OFTBlockStrength", "OFTBlend", "OFTMerge",
            "OFTSave", "OFTTrainer", "OFTLatentList", "OFTHook", "OFTExtractLoRA",
            "OFTLoadImages"]


# ------------------------------------------------------------------------------------------------ helpers
def fixture_oft_folder(tmp_path_factory, prefix: str):
    """The fixture adapters (FLUX kohya, every LyCORIS and PEFT fixture) in an 'oft' folder of a test module's own,
    under names prefixed with `prefix`: a second folder with the same file names as another module's would make name
    lookups ambiguous. Registered with folder_paths; returns the folder."""
    import shutil

    import folder_paths
    from comfyui_oft.nodes import files

    root = tmp_path_factory.mktemp(f"oft_{prefix.strip('_')}")
    fx = comfy_models.FIXTURES
    shutil.copy(fx / FLUX_ADAPTER, root / (prefix + os.path.basename(FLUX_ADAPTER)))
    for d in LYCORIS_DIRS:
        shutil.copy(fx / "lycoris" / d / f"{d}.safetensors", root / f"{prefix}{d}.safetensors")
    for d in PEFT_DIRS:
        (root / f"{prefix}{d}").mkdir()
        for f in ("adapter_model.safetensors", "adapter_config.json"):
            shutil.copy(fx / "peft" / d / f, root / f"{prefix}{d}" / f)
    files.register_folder()
    folder_paths.add_model_folder_path("oft", str(root))
    return root




@pytest.fixture(scope="session")
def pack(comfyui_oft):
    return comfyui_oft


@pytest.fixture(scope="session")
def nodes_mod(pack):
    from comfyui_oft.nodes import files, oft_nodes, patch

    return type("N", (), {"files": files, "oft_nodes": oft_nodes, "patch": patch})


@pytest.fixture(scope="session")
def oft_folder(tmp_path_factory, fixtures_dir, nodes_mod):
    """A models/oft folder holding the fixture adapters (copies: the cache test touches mtimes)."""
    import folder_paths

    root = tmp_path_factory.mktemp("oft_models")
    for rel in (FLUX_ADAPTER, SD15_ADAPTER):
        shutil.copy(fixtures_dir / rel, root / os.path.basename(rel))
    for d in LYCORIS_DIRS:
        shutil.copy(fixtures_dir / "lycoris" / d / f"{d}.safetensors", root / f"{d}.safetensors")
    for d in PEFT_DIRS:
        (root / d).mkdir()
        for f in ("adapter_model.safetensors", "adapter_config.json"):
            shutil.copy(fixtures_dir / "peft" / d / f, root / d / f)
    nodes_mod.files.register_folder()
    folder_paths.add_model_folder_path("oft", str(root))
    return root


def patched(patcher, keys, **load_kwargs) -> dict[str, torch.Tensor]:
    """The weights `keys` as ComfyUI computes them (patch_model), then unpatched."""
    import comfy.utils

    patcher.patch_model(**load_kwargs)
    try:
        return {k: comfy.utils.get_attr(patcher.model, k).detach().clone() for k in keys}
    finally:
        patcher.unpatch_model()


def snapshot(patcher) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in patcher.model.state_dict().items()}


def assert_same_state(patcher, snap):
    now = patcher.model.state_dict()
    bad = [k for k, v in snap.items() if not torch.equal(now[k], v)]
    assert not bad, f"{len(bad)} weights changed, e.g. {bad[:3]}"


def expected_modules(fixtures_dir, rel) -> dict:
    with safe_open(str(fixtures_dir / rel), "pt") as f:
        return json.loads(f.metadata()["modules"])


def set_patches(diffusers_sd: dict, unet_config: dict) -> dict:
    """ComfyUI "set" patches putting diffusers-named UNet weights into an SD1.x-family model (ComfyUI's own map)."""
    import comfy.utils

    d2l = comfy.utils.unet_to_diffusers(unet_config)
    out = {}
    for k, v in diffusers_sd.items():
        assert k in d2l, f"{k} has no LDM counterpart in ComfyUI's map"
        out["diffusion_model." + d2l[k]] = ("set", (v,))
    return out


# ------------------------------------------------------------------------------------------------ registration
def test_entrypoint_lists_the_nodes_with_tooltips(pack):
    import comfyui_oft.nodes as nodes_pkg
    from comfy_api.latest import ComfyExtension
    from comfyui_oft.nodes import comfy_entrypoint

    assert not hasattr(nodes_pkg, "NODE_CLASS_MAPPINGS") and not hasattr(pack, "NODE_CLASS_MAPPINGS")
    ext = comfy_entrypoint()
    assert isinstance(ext, ComfyExtension)
    classes = asyncio.run(ext.get_node_list())
    assert [c.GET_SCHEMA().node_id for c in classes] == NODE_IDS
    for c in classes:
        schema = c.GET_SCHEMA()
        for inp in schema.inputs:
            assert inp.tooltip, f"{schema.node_id}.{inp.id} has no tooltip"
    loader = next(c for c in classes if c.GET_SCHEMA().node_id == "OFTLoader").INPUT_TYPES()
    strength = loader["required"]["strength"][1]
    assert (strength["default"], strength["min"], strength["max"], strength["step"]) == (1.0, -10.0, 10.0, 0.01)
    assert loader["required"]["strength_mode"][1]["options"] == ["kohya", "orthogonal"]
    assert "clip" in loader["optional"]


def test_every_node_passes_the_executors_schema_step(pack):
    """What ComfyUI's executor does with each node's inputs before validating or running it.

    0.3.64 reads INPUT_TYPES(); newer ComfyUI (0.8) also finalises them through `_io.get_finalized_class_inputs`,
    which looks each input's type up in a dict: a list-typed input (how the Train node had ComfyUI 0.3.64 check its
    combos, `train_node.queue_checked`) made that a TypeError, so the node could not run at all. Each node's combos
    must still be checked at queue time on both (the server tier checks the message)."""
    from comfy_api.latest import _io
    from comfyui_oft.nodes import comfy_entrypoint

    classes = asyncio.run(comfy_entrypoint().get_node_list())
    finalize = getattr(_io, "get_finalized_class_inputs", None)
    for c in classes:
        info = c.INPUT_TYPES()
        names = {kind: set(info.get(kind, {})) for kind in ("required", "optional")}
        if c.GET_SCHEMA().node_id == "OFTTrainer":
            combos = {n: v[0] for kind in names for n, v in info[kind].items() if isinstance(v[0], list)
                      or v[0] == "COMBO"}
            assert set(combos) == {"optimizer", "targets", "training_dtype", "loss_function", "lr_schedule"}
            # 0.3.64 checks list types against their options at queue time, and never a "COMBO"; newer ComfyUI
            # checks "COMBO" itself and cannot take a list type
            kinds = {"list" if isinstance(t, list) else t for t in combos.values()}
            assert kinds == ({"COMBO"} if finalize is not None else {"list"}), combos
        if finalize is not None:
            out = finalize(info, {})[0]
            assert {kind: set(out[kind]) for kind in names} == names, c.__name__


def test_comfyui_loader_registers_the_v3_nodes(pack, tmp_path):
    """ComfyUI's own custom-node loader (nodes.load_custom_node) picks up comfy_entrypoint."""
    import nodes

    link = tmp_path / "comfyui-oft"
    link.symlink_to(comfy_models.REPO_ROOT, target_is_directory=True)
    for nid in NODE_IDS:
        nodes.NODE_CLASS_MAPPINGS.pop(nid, None)
    assert asyncio.run(nodes.load_custom_node(str(link), module_parent="custom_nodes")) is True
    for nid in NODE_IDS:
        assert nid in nodes.NODE_CLASS_MAPPINGS, nid
    import folder_paths

    assert "oft" in folder_paths.folder_names_and_paths


def test_oft_folder_registration_keeps_user_paths(nodes_mod, monkeypatch, tmp_path):
    import folder_paths

    files = nodes_mod.files
    table = dict(folder_paths.folder_names_and_paths)
    table["oft"] = ([str(tmp_path)], set())  # as extra_model_paths.yaml would define it
    monkeypatch.setattr(folder_paths, "folder_names_and_paths", table)
    monkeypatch.setattr(files, "_registered", False)
    files.register_folder()
    paths, exts = folder_paths.folder_names_and_paths["oft"]
    assert paths[0] == str(tmp_path) and os.path.join(folder_paths.models_dir, "oft") in paths
    assert ".safetensors" in exts


# ------------------------------------------------------------------------------------------------ kohya fixtures
@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_sd15_kohya_through_oftloader_matches_sd_scripts(nodes_mod, oft_folder, fixtures_dir, strength):
    base = comfy_models.sd15()
    loader = nodes_mod.oft_nodes.OFTLoader
    out = loader.execute(model=base, adapter_name=os.path.basename(SD15_ADAPTER), strength=strength,
                         strength_mode="kohya")
    model, clip = out.result
    assert clip is None and model is not base and not base.patches
    # exactly the adapter's 128 attention Linear layers, nothing else
    assert len(model.patches) == 128
    assert all(".transformer_blocks.0.attn" in k and k.endswith(".weight") for k in model.patches)
    assert "128 of 128 adapter layers applied" in out.ui.value

    modules = expected_modules(fixtures_dir, SD15_EXPECTED)
    ex = load_file(fixtures_dir / SD15_EXPECTED)
    keys = {"diffusion_model." + m["ldm_key"]: m["module_path"] for m in modules.values()}
    assert set(keys) <= set(model.patches)
    untouched = [k.replace(".weight", ".bias") for k in keys if "to_out" in k] + [
        "diffusion_model.input_blocks.1.1.proj_in.weight"]
    before = {k: v.clone() for k, v in base.model.state_dict().items() if k in untouched}
    got = patched(model, list(keys) + untouched)
    for key, path in keys.items():
        want = ex[f"merged_m{strength}/{path}.weight"]
        assert rel_err(got[key], want) <= REL_TOL, key
        original = ex[f"original/{path}.weight"]
        assert torch.equal(got[key], original) == torch.equal(want, original)  # (the all-zero, identity layer)
    for k in untouched:
        assert torch.equal(got[k], before[k]), k


@pytest.fixture(scope="module")
def flux_expected(fixtures_dir):
    return load_file(fixtures_dir / FLUX_EXPECTED), expected_modules(fixtures_dir, FLUX_EXPECTED)


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_flux_kohya_through_oftloader_matches_sd_scripts(nodes_mod, oft_folder, flux_expected, strength):
    base = comfy_models.flux_tiny()
    ex, modules = flux_expected
    out = nodes_mod.oft_nodes.OFTLoader.execute(model=base, adapter_name=os.path.basename(FLUX_ADAPTER),
                                                strength=strength, strength_mode="kohya")
    model = out.result[0]
    keys = {"diffusion_model." + m["module_path"] + ".weight": m["module_path"] for m in modules.values()}
    assert set(model.patches) == set(keys)  # qkv: one patch over the whole fused weight (3 splits, no offset)
    assert all(p[3] is None for k in keys for p in model.patches[k])
    got = patched(model, keys)
    for key, path in keys.items():
        assert rel_err(got[key], ex[f"merged_m{strength}/{path}.weight"]) <= REL_TOL, key

    # forward of the patched model == forward with sd-scripts' effective weights loaded ("set" patches)
    inputs = comfy_models.flux_inputs()
    model.patch_model()
    try:
        y = comfy_models.apply_model(model, inputs)
    finally:
        model.unpatch_model()
    ref = base.clone()
    ref.add_patches({k: ("set", (ex[f"merged_m{strength}/{p}.weight"],)) for k, p in keys.items()})
    ref.patch_model()
    try:
        y_ref = comfy_models.apply_model(ref, inputs)
    finally:
        ref.unpatch_model()
    y_base = comfy_models.apply_model(base, inputs)
    assert rel_err(y, y_ref) <= 1e-5
    assert rel_err(y_base, y_ref) > 100 * max(rel_err(y, y_ref), 1e-7)  # the adapter does change the output


def test_flux_diffusers_names_patch_fused_slices_in_place(nodes_mod, pack, fixtures_dir):
    """Diffusers-style FLUX layers land on (qkv key, offset) slices; the in-place write updates the parent weight.

    The kohya qkv layer (one layer, 3 splits) and the same rotation spelled as three diffusers to_q/to_k/to_v layers
    (one split each) must give the same fused weight.
    """
    from comfyui_oft import oft_core

    kohya = nodes_mod.files.load(fixtures_dir / FLUX_ADAPTER)
    qkv = kohya.layers[("unet", "double_blocks_0_img_attn_qkv")]
    layers = {}
    for i, proj in enumerate(("to_q", "to_k", "to_v")):
        name = f"transformer_blocks.0.attn.{proj}"
        layers[("unet", name)] = oft_core.make_layer(
            path="test", name=name, side="out", blocks=[qkv.blocks[i]], transpose=qkv.transpose,
            constraint=qkv.constraint, key=name)
    split = oft_core.OFTAdapter(layers, "test", "split_qkv")
    whole = oft_core.OFTAdapter({("unet", qkv.name): qkv}, kohya.format, "whole_qkv")
    base = comfy_models.flux_tiny()
    key = "diffusion_model.double_blocks.0.img_attn.qkv.weight"
    for strength in (1.0, -0.7):
        m_split, _, text = nodes_mod.patch.apply_oft(base, None, split, strength, "kohya")
        assert "3 of 3 adapter layers applied" in text
        assert sorted(p[3] for p in m_split.patches[key]) == [(0, 0, 128), (0, 128, 128), (0, 256, 128)]
        m_whole, _, _ = nodes_mod.patch.apply_oft(base, None, whole, strength, "kohya")
        a, b = patched(m_split, [key])[key], patched(m_whole, [key])[key]
        assert rel_err(a, b) <= REL_TOL
        assert not torch.equal(a, base.model.state_dict()[key])


# ------------------------------------------------------------------------------------------------ LyCORIS / PEFT
def _tiny_with_base(base_sd):
    base = comfy_models.sd15_tiny()
    model = base.clone()
    model.add_patches(set_patches(base_sd, base.model.model_config.unet_config))
    return base, model


@pytest.mark.parametrize("name", LYCORIS_DIRS)
def test_lycoris_on_sd15_tiny_matches_lycoris_merge(nodes_mod, oft_folder, fixtures_dir, name):
    """The fixtures' tiny diffusers UNet IS the SD1.x-family UNet of comfy_models.sd15_tiny (same config), so its
    diffusers-named layers map onto real ComfyUI LDM keys; its base weights go in first as "set" patches."""
    import comfy.utils

    d = fixtures_dir / "lycoris" / name
    base, model = _tiny_with_base(load_file(d / "base.safetensors"))
    d2l = comfy.utils.unet_to_diffusers(base.model.model_config.unet_config)
    for strength, merged in ((1.0, "merged.safetensors"), (0.5, "merged_multiplier0.5.safetensors")):
        out = nodes_mod.oft_nodes.OFTLoader.execute(model=model, adapter_name=f"{name}.safetensors",
                                                    strength=strength, strength_mode="kohya")
        m = out.result[0]
        assert "56 of 56 adapter layers applied" in out.ui.value
        want = load_file(d / merged)
        keys = {"diffusion_model." + d2l[k]: k for k in want if k.endswith(".weight") and k in d2l}
        assert len(keys) == 56
        got = patched(m, keys)
        for key, dk in keys.items():
            assert rel_err(got[key], want[dk]) <= REL_TOL, (key, strength)


@pytest.mark.parametrize("name", PEFT_DIRS)
def test_peft_on_sd15_tiny_matches_peft_merge(nodes_mod, oft_folder, fixtures_dir, name):
    import comfy.utils

    d = fixtures_dir / "peft" / name
    base, model = _tiny_with_base(load_file(d / "base.safetensors"))
    d2l = comfy.utils.unet_to_diffusers(base.model.model_config.unet_config)
    out = nodes_mod.oft_nodes.OFTLoader.execute(model=model, adapter_name=f"{name}/adapter_model.safetensors",
                                                strength=1.0, strength_mode="kohya")
    assert "56 of 56 adapter layers applied" in out.ui.value
    want = load_file(d / "merged.safetensors")
    keys = {"diffusion_model." + d2l[k]: k for k in want if k.endswith(".weight") and k in d2l}
    assert len(keys) == 56
    got = patched(out.result[0], keys)
    for key, dk in keys.items():
        assert rel_err(got[key], want[dk]) <= REL_TOL, key


def boft_sd_folder(folder, base_sd, d2l, factors: int, strength: float, targets, seed: int = 7):
    """A PEFT BOFT adapter directory `folder`/boft_sd for the tiny SD UNet (PEFT's layout: diffusers names under
    base_model.model., 8 blocks per layer as PEFT's examples, `.boft_s` (out, 1) / (1, out), and a trained bias
    `.base_layer.bias` (bias 'boft_only') for every adapted layer that has one) on the base weights whose names hold
    one of `targets`; returns {ComfyUI key: PEFT's merge at `strength` in fp64}, biases included
    (b + strength·(trained − b))."""
    import json

    g = torch.Generator().manual_seed(seed)
    tensors, want = {}, {}
    for k, w in sorted(base_sd.items()):
        if k in d2l and k.endswith(".weight") and any(t in k for t in targets):
            inner = w[0].numel()
            a = 0.1 * torch.randn(factors, 8, inner // 8, inner // 8, generator=g)
            s = 1 + 0.1 * torch.randn((w.shape[0], 1) if w.ndim == 2 else (1, w.shape[0]), generator=g)
            module = f"base_model.model.{k[:-len('.weight')]}"
            tensors[f"{module}.boft_R"], tensors[f"{module}.boft_s"] = a, s
            want["diffusion_model." + d2l[k]] = peft_boft_weight(w, a, s, strength)
            b = base_sd.get(k[:-len("weight")] + "bias")
            if b is not None:
                trained = b + 0.1 * torch.randn(b.shape, generator=g)
                tensors[f"{module}.base_layer.bias"] = trained
                want["diffusion_model." + d2l[k][:-len("weight")] + "bias"] = b.double() + strength * (
                    trained.double() - b.double())
    (folder / "boft_sd").mkdir(parents=True)
    save_file(tensors, str(folder / "boft_sd" / "adapter_model.safetensors"))
    (folder / "boft_sd" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "BOFT", "boft_block_num": 8, "boft_block_size": 0, "boft_n_butterfly_factor": factors,
         "bias": "boft_only"}))
    return want


@pytest.mark.parametrize("factors", [1, 2])
@pytest.mark.parametrize("strength", [1.0, 0.5])
@pytest.mark.parametrize("apply_mode", ["merge", "bypass"])
def test_peft_boft_on_sd15_tiny_through_the_loader(nodes_mod, fixtures_dir, tmp_path, monkeypatch, strength,
                                                   factors, apply_mode):
    """A PEFT BOFT directory (one or two butterfly factors, trained biases as its examples train them; the rotated
    input axis of Linear, 1×1 and, merged, 3×3 Conv2d layers) in the models/oft folder: OFTLoader lists it and applies
    every layer to ComfyUI's LDM keys, each weight PEFT's merge in fp64 and each trained bias in place of the base's
    (at 0.5 the pack's strength: blocks I + 0.5·(B − I), the row scale whole, the bias halfway). In bypass mode the
    weights stay as they are, the output is the merged layer's, and the biases are patched alike."""
    import comfy.utils
    import folder_paths

    base_sd = load_file(fixtures_dir / "peft" / "base_unet.safetensors")
    base, model = _tiny_with_base(base_sd)
    d2l = comfy.utils.unet_to_diffusers(base.model.model_config.unet_config)
    folder = tmp_path / "oft"
    targets = ("attn1.to_q", "attn2.to_v", "proj_in") + (("conv1",) if apply_mode == "merge" else ())
    want = boft_sd_folder(folder, base_sd, d2l, factors, strength, targets)
    biases = [k for k in want if k.endswith(".bias")]
    assert len(biases) >= 5 and (apply_mode == "bypass" or any(w.ndim == 4 and w.shape[-1] == 3
                                                               for w in want.values()))
    table = dict(folder_paths.folder_names_and_paths)
    table["oft"] = ([str(folder)], {".safetensors"})
    monkeypatch.setattr(folder_paths, "folder_names_and_paths", table)
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    assert nodes_mod.files.adapter_files() == ["boft_sd/adapter_model.safetensors"]
    out = nodes_mod.oft_nodes.OFTLoader.execute(model=model, adapter_name="boft_sd/adapter_model.safetensors",
                                                strength=strength, strength_mode="kohya", apply_mode=apply_mode)
    layers = len(want) - len(biases)
    assert f"{layers} of {layers} adapter layers applied" in out.ui.value
    got = patched(out.result[0], list(want))
    for key in biases:
        assert rel_err(got[key], want[key]) <= REL_TOL, key
    if apply_mode == "merge":
        for key, w in want.items():
            assert rel_err(got[key], w) <= REL_TOL, key
        return
    before = patched(model, list(want))
    for key in want:
        if key.endswith(".weight"):
            assert torch.equal(got[key], before[key]), key  # bypass: no weight rewritten
    # the bypassed forward of an adapted Linear and of a 1×1 Conv2d with its trained bias equals the merged layer's
    key = next(k for k in want if k.endswith("attn1.to_q.weight"))
    conv_key = next(k for k in want if k.endswith("proj_in.weight"))
    linear = comfy.utils.get_attr(out.result[0].model, key[:-len(".weight")])
    conv = comfy.utils.get_attr(out.result[0].model, conv_key[:-len(".weight")])
    g = torch.Generator().manual_seed(1)
    x, xc = torch.randn(3, linear.in_features, generator=g), torch.randn(1, conv.in_channels, 4, 4, generator=g)
    out.result[0].patch_model()
    try:
        y, yc = linear(x), conv(xc)
    finally:
        out.result[0].unpatch_model()
    assert rel_err(y, torch.nn.functional.linear(x.double(), want[key])) <= 10 * REL_TOL
    conv_bias = want[conv_key[:-len("weight")] + "bias"]
    assert rel_err(yc, torch.nn.functional.conv2d(xc.double(), want[conv_key], conv_bias)) <= 10 * REL_TOL


# ------------------------------------------------------------------------------------------------ strength / unpatch
def test_strength_zero_and_unpatch_are_bit_exact(nodes_mod, fixtures_dir):
    base = comfy_models.flux_tiny()
    adapter = nodes_mod.files.load(fixtures_dir / FLUX_ADAPTER)
    snap = snapshot(base)
    m0, _, _ = nodes_mod.patch.apply_oft(base, None, adapter, 0.0, "kohya")
    assert len(m0.patches) == 8  # patched at strength 0 all the same, and the result is the base, bit for bit
    m0.patch_model()
    try:
        assert_same_state(m0, snap)
    finally:
        m0.unpatch_model()
    key = "diffusion_model.double_blocks.1.txt_attn.qkv.weight"
    first = None
    for i in range(100):
        m, _, _ = nodes_mod.patch.apply_oft(base, None, adapter, 1.0 if i % 2 else -1.0,
                                            "orthogonal" if i % 3 else "kohya")
        w = patched(m, [key])[key]
        assert not torch.equal(w, snap[key])
        if i == 1:
            first = w
        elif i == 97:  # same strength and mode as i == 1: deterministic
            assert torch.equal(w, first)
    assert_same_state(base, snap)


def test_strength_is_applied_once(nodes_mod, fixtures_dir):
    """kohya strength is linear in the weight change: Δ(0.5) = ½Δ(1) (vanilla ComfyUI OFT would give ¼)."""
    base = comfy_models.flux_tiny()
    adapter = nodes_mod.files.load(fixtures_dir / FLUX_ADAPTER)
    key = "diffusion_model.double_blocks.0.img_attn.proj.weight"
    w0 = base.model.state_dict()[key].clone()
    d1 = patched(nodes_mod.patch.apply_oft(base, None, adapter, 1.0, "kohya")[0], [key])[key] - w0
    dh = patched(nodes_mod.patch.apply_oft(base, None, adapter, 0.5, "kohya")[0], [key])[key] - w0
    # fp32 rounding of W (|W| ~ 0.1) is ~1e-4 of these small changes; s² (0.25) would be off by 100 %
    assert rel_err(dh, 0.5 * d1) <= 1e-4
    assert rel_err(dh, 0.25 * d1) > 0.5


def test_patch_function_maps_the_change_and_identity_patches_in_place(nodes_mod, fixtures_dir):
    """ComfyUI's (key, offset, function) patches: `function` maps the change (as for LoRA); the identity lambda
    ComfyUI passes by default takes the in-place path, with the same result as the exact one."""
    from oft_core import resolve_for_weight, rotate_weight

    adapter = nodes_mod.files.load(fixtures_dir / FLUX_ADAPTER)
    layer = next(iter(adapter))
    torch.manual_seed(0)
    w = torch.randn(layer.dim, 16)
    layer = resolve_for_weight(layer, w.shape)
    patch = nodes_mod.patch.OFTWeightAdapter(layer)
    exact = rotate_weight(layer, w, 0.7)
    for function in (None, lambda a: a):
        t = w.clone()
        out = patch.calculate_weight(t, "k", 0.7, 1.0, None, function)
        assert out is t and torch.equal(out, exact)
    # R is kept from the second patch at a strength on (the low-VRAM path patches on every forward), not before
    assert list(patch._rotations) == [(0.7, "kohya", "cpu")]
    assert patch.calculate_weight(w.clone(), "k", 0.3, 1.0, None, None) is not None
    assert (0.3, "kohya", "cpu") not in patch._rotations
    half = patch.calculate_weight(w.clone(), "k", 0.7, 1.0, None, lambda a: 0.5 * a)
    assert rel_err(half, w + 0.5 * (exact - w)) <= 1e-6  # the weight, to fp32 rounding of |W|
    assert rel_err(half - w, exact - w) > 0.4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_vram_path_matches_full_load(nodes_mod, fixtures_dir, dtype):
    """LowVramPatch (run by comfy.ops.cast_bias_weight every forward, in the layer's dtype) == full-load patching."""
    import comfy.ops
    import comfy.utils

    base = comfy_models.flux_tiny(dtype)
    adapter = nodes_mod.files.load(fixtures_dir / FLUX_ADAPTER)
    m, _, _ = nodes_mod.patch.apply_oft(base, None, adapter, 1.0, "kohya")
    keys = sorted(m.patches)
    inputs = comfy_models.flux_inputs(dtype=dtype)
    full = patched(m, keys)
    m.patch_model()
    try:
        y_full = comfy_models.apply_model(m, inputs)
    finally:
        m.unpatch_model()
    snap = snapshot(base)
    m.patch_model(lowvram_model_memory=1)  # every module offloaded: patches run in cast_bias_weight
    try:
        assert_same_state(m, snap)  # nothing baked into the stored weights
        for k in keys:
            module = comfy.utils.get_attr(m.model, k.rsplit(".", 1)[0])
            assert any(type(f).__name__ == "LowVramPatch" for f in module.weight_function), k
            w, _ = comfy.ops.cast_bias_weight(module, torch.zeros(1, 1, dtype=dtype))
            assert w.dtype == dtype
            ulp = {torch.float32: 0.0, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]
            assert rel_err(w, full[k]) <= max(ulp, 1e-7), k
            assert torch.equal(w, snap[k]) == torch.equal(full[k], snap[k])  # (one fixture layer is identity)
        y_low = comfy_models.apply_model(m, inputs)
    finally:
        m.unpatch_model()
    assert_same_state(base, snap)
    tol = {torch.float32: 1e-6, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    assert rel_err(y_low, y_full) <= tol


def _lora_sd(key_bfl: str, out_dim: int, in_dim: int, rank: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    name = "lora_unet_" + key_bfl.replace(".", "_")
    return {
        f"{name}.lora_up.weight": torch.randn(out_dim, rank, generator=g) * 0.05,
        f"{name}.lora_down.weight": torch.randn(rank, in_dim, generator=g) * 0.05,
        f"{name}.alpha": torch.tensor(2.0),
    }


@pytest.mark.parametrize("order", ["lora_then_oft", "oft_then_lora"])
def test_lora_and_oft_stack_in_order(nodes_mod, fixtures_dir, order):
    import comfy.sd
    from comfyui_oft.oft_core import rotate_weight

    base = comfy_models.flux_tiny()
    adapter = nodes_mod.files.load(fixtures_dir / FLUX_ADAPTER)
    paths = ["double_blocks.0.img_attn.proj", "double_blocks.0.img_attn.qkv"]
    lora = {}
    for i, p in enumerate(paths):
        w = base.model.state_dict()[f"diffusion_model.{p}.weight"]
        lora.update(_lora_sd(p, w.shape[0], w.shape[1], seed=i))
    s_lora, s_oft = 0.8, 0.7
    if order == "lora_then_oft":
        m, _ = comfy.sd.load_lora_for_models(base, None, lora, s_lora, 0)
        m, _, _ = nodes_mod.patch.apply_oft(m, None, adapter, s_oft, "kohya")
    else:
        m, _, _ = nodes_mod.patch.apply_oft(base, None, adapter, s_oft, "kohya")
        m, _ = comfy.sd.load_lora_for_models(m, None, lora, s_lora, 0)
    keys = [f"diffusion_model.{p}.weight" for p in paths]
    got = patched(m, keys)
    for p, key in zip(paths, keys):
        assert len(m.patches[key]) == 2
        w = base.model.state_dict()[key].double()
        name = "lora_unet_" + p.replace(".", "_")
        delta = (lora[f"{name}.lora_up.weight"].double() @ lora[f"{name}.lora_down.weight"].double()) * (2.0 / 4)
        layer = adapter.layers[("unet", p.replace(".", "_"))]
        if order == "lora_then_oft":
            want = rotate_weight(layer, (w + s_lora * delta).float(), s_oft, "kohya")
        else:
            want = rotate_weight(layer, w.float(), s_oft, "kohya").double() + s_lora * delta
        assert rel_err(got[key], want.float()) <= 1e-6, key
        other = (rotate_weight(layer, w.float(), s_oft, "kohya").double() + s_lora * delta if order == "lora_then_oft"
                 else rotate_weight(layer, (w + s_lora * delta).float(), s_oft, "kohya"))
        assert rel_err(got[key], other.float()) > 1e-5  # the order matters, and it is respected


# ------------------------------------------------------------------------------------------------ CLIP
@pytest.fixture(scope="module")
def tiny_clip(comfy):
    """ComfyUI's SD1 CLIP-L (comfy.sd.CLIP around comfy.sd1_clip.SD1ClipModel) with seeded weights."""
    return comfy_models.sd1_clip(seed=3)


def test_text_encoder_layers_patch_the_clip_only(nodes_mod, pack, tiny_clip, tmp_path):
    from comfyui_oft.oft_core import rotate_weight

    g = torch.Generator().manual_seed(1)
    path = tmp_path / "te_oft.safetensors"
    save_file({
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.oft_blocks": torch.randn(96, 8, 8, generator=g) * 0.1,
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(0.0),
        "lycoris_double_blocks_0_img_attn_proj.oft_blocks": torch.randn(16, 8, 8, generator=g) * 0.1,
        "lycoris_double_blocks_0_img_attn_proj.alpha": torch.tensor(0.0),
    }, str(path))
    adapter = nodes_mod.files.load(path)
    base = comfy_models.flux_tiny()
    model, clip, text = nodes_mod.patch.apply_oft(base, tiny_clip, adapter, 1.0, "kohya")
    assert "2 of 2 adapter layers applied" in text
    assert clip is not tiny_clip and not tiny_clip.patcher.patches
    key = "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    assert list(clip.patcher.patches) == [key]
    assert list(model.patches) == ["diffusion_model.double_blocks.0.img_attn.proj.weight"]
    w = tiny_clip.patcher.model.state_dict()[key].clone()
    # the way CLIPTextEncode loads a CLIP (clip.load_model): ComfyUI unloads the unpatched base patcher first
    import comfy.model_management
    import comfy.utils

    comfy.model_management.load_models_gpu([clip.patcher], force_full_load=True)
    try:
        got = comfy.utils.get_attr(clip.patcher.model, key).detach().clone()
    finally:
        comfy.model_management.unload_all_models()
    layer = adapter.layers[("te", "text_model_encoder_layers_0_self_attn_q_proj")]
    assert rel_err(got, rotate_weight(layer, w, 1.0, "kohya")) <= REL_TOL
    assert torch.equal(tiny_clip.patcher.model.state_dict()[key], w)

    # an adapter without text-encoder layers returns the very CLIP it was given
    flux = nodes_mod.files.load(comfy_models.FIXTURES / FLUX_ADAPTER)
    _, same, text = nodes_mod.patch.apply_oft(base, tiny_clip, flux, 1.0, "kohya")
    assert same is tiny_clip and "8 of 8" in text
    # without a CLIP, the text-encoder layers are reported as skipped, not silently dropped
    _, none_clip, text = nodes_mod.patch.apply_oft(base, None, adapter, 1.0, "kohya")
    assert none_clip is None and "1 of 2 adapter layers applied" in text and "no CLIP connected" in text


# ------------------------------------------------------------------------------------------------ errors
def test_adapter_for_another_model_fails_clearly_and_changes_nothing(nodes_mod, oft_folder):
    from comfyui_oft.oft_core import OFTError

    base = comfy_models.flux_tiny()
    snap = snapshot(base)
    with pytest.raises(OFTError) as e:
        nodes_mod.oft_nodes.OFTLoader.execute(model=base, adapter_name=os.path.basename(SD15_ADAPTER),
                                              strength=1.0, strength_mode="kohya")
    msg = str(e.value)
    assert "sd15_oft_attn_dim8_bf16.safetensors" in msg and "none of its 128 layers" in msg
    assert "Flux" in msg and "SD1.x" in msg
    assert not base.patches
    assert_same_state(base, snap)


def test_wrong_shapes_fail_naming_layer_and_sizes(nodes_mod, oft_folder, fixtures_dir):
    """One layer of a file does not fit: the error names file, layer, expected and found; nothing is patched."""
    from comfyui_oft.oft_core import OFTError

    src = load_file(fixtures_dir / FLUX_ADAPTER)
    bad = dict(src)
    bad["oft_unet_double_blocks_1_txt_attn_proj.oft_blocks.0"] = torch.zeros(2, 32, 32)  # 64 rows, weight has 128
    path = oft_folder / "flux_wrong_width.safetensors"
    with safe_open(str(fixtures_dir / FLUX_ADAPTER), "pt") as f:
        meta = f.metadata()
    save_file(bad, str(path), metadata=meta)
    base = comfy_models.flux_tiny()
    snap = snapshot(base)
    with pytest.raises(OFTError) as e:
        nodes_mod.oft_nodes.OFTLoader.execute(model=base, adapter_name=path.name, strength=1.0,
                                              strength_mode="kohya")
    msg = str(e.value)
    assert "flux_wrong_width.safetensors" in msg and "double_blocks_1_txt_attn_proj" in msg
    assert "expected 64" in msg and "128" in msg
    assert not base.patches
    assert_same_state(base, snap)


@pytest.mark.parametrize("kind", ["lora", "truncated", "missing"])
def test_bad_files_raise_actionable_errors(nodes_mod, oft_folder, kind):
    import folder_paths

    base = comfy_models.flux_tiny()
    name = f"bad_{kind}.safetensors"
    if kind == "lora":
        save_file(_lora_sd("double_blocks.0.img_attn.proj", 128, 128), str(oft_folder / name))
        want = "LoRA file, not OFT"
    elif kind == "truncated":
        data = (comfy_models.FIXTURES / FLUX_ADAPTER).read_bytes()
        (oft_folder / name).write_bytes(data[: len(data) // 2])
        want = name
    else:
        want = "not found"
    folder_paths.filename_list_cache.clear()
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        nodes_mod.oft_nodes.OFTLoader.execute(model=base, adapter_name=name, strength=1.0, strength_mode="kohya")
    assert want in str(e.value)
    assert not base.patches


# ------------------------------------------------------------------------------------------------ caching
def test_changing_only_strength_does_not_reread_the_file(nodes_mod, oft_folder, monkeypatch):
    files = nodes_mod.files
    files.clear_cache()
    reads = []
    real = files.oft_core.load_adapter

    def counting(path):
        reads.append(path)
        return real(path)

    monkeypatch.setattr(files.oft_core, "load_adapter", counting)
    base = comfy_models.flux_tiny()
    name = os.path.basename(FLUX_ADAPTER)
    for s in (1.0, 0.5, -0.25, 1.0):
        out = nodes_mod.oft_nodes.OFTLoader.execute(model=base, adapter_name=name, strength=s, strength_mode="kohya")
        assert f"strength {s:g}" in out.ui.value
    nodes_mod.oft_nodes.OFTLoadAdapter.execute(adapter_name=name)
    assert len(reads) == 1
    path = oft_folder / name
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # the file changed: read again
    nodes_mod.oft_nodes.OFTLoader.execute(model=base, adapter_name=name, strength=1.0, strength_mode="kohya")
    assert len(reads) == 2


# ------------------------------------------------------------------------------------------------ apply / inspect
def test_load_adapter_apply_and_inspect_nodes(nodes_mod, oft_folder, flux_expected, fixtures_dir):
    n = nodes_mod.oft_nodes
    base = comfy_models.flux_tiny()
    adapter = n.OFTLoadAdapter.execute(adapter_name=os.path.basename(FLUX_ADAPTER)).result[0]
    via_apply = n.OFTApply.execute(model=base, oft_adapter=adapter, strength=1.0, strength_mode="kohya").result[0]
    via_loader = n.OFTLoader.execute(model=base, adapter_name=os.path.basename(FLUX_ADAPTER), strength=1.0,
                                     strength_mode="kohya").result[0]
    keys = sorted(via_apply.patches)
    a, b = patched(via_apply, keys), patched(via_loader, keys)
    assert all(torch.equal(a[k], b[k]) for k in keys)

    ex, modules = flux_expected
    clamped = sum(any(r > 1 for r in (m["norm_ratio"] if isinstance(m["norm_ratio"], list) else [m["norm_ratio"]]))
                  for m in modules.values())
    out = n.OFTInspect.execute(oft_adapter=adapter, model=base)
    text = out.result[0]
    assert out.ui.value == text
    assert "layers:     8" in text and f"clamped:    {clamped} of 8 layers" in text
    assert "on this Flux model: 8 of 8 diffusion-model layers match" in text
    sd15 = n.OFTLoadAdapter.execute(adapter_name=os.path.basename(SD15_ADAPTER)).result[0]
    text = n.OFTInspect.execute(oft_adapter=sd15, model=base).result[0]
    assert "0 of 128 diffusion-model layers match" in text
    assert "layers:     128" in n.OFTInspect.execute(oft_adapter=sd15).result[0]
