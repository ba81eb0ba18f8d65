"""Text-encoder OFT pinned by a trainer's file: LyCORIS 4.1.3 diag-oft on a CLIP-L-sized text model
(../shared/fixtures/lycoris/lycoris_te_diag_oft_clipl, see the fixtures README), applied by OFTLoader to ComfyUI's SD1
CLIP built by ComfyUI's own text-encoder loader from a CLIP-L state dict holding the fixture's base weights.

The CLI bake of the same file is pinned by tests/test_fixtures.py (case `lycoris_te_diag_oft_clipl`).
"""

from __future__ import annotations

import shutil

import comfy_models
import pytest
import torch
from oracle import REL_TOL, rel_err
from safetensors.torch import load_file

pytestmark = pytest.mark.comfyui

TE_DIR = comfy_models.FIXTURES / "lycoris" / "lycoris_te_diag_oft_clipl"
TE_FILE = "lycoris_te_diag_oft_clipl.safetensors"
CKPT_PREFIX = "cond_stage_model.transformer."  # the fixture's base / merged names (an SD1.5 checkpoint's)
RUNTIME_PREFIX = "clip_l.transformer."  # the same weights inside ComfyUI's SD1ClipModel


@pytest.fixture(scope="module")
def te_folder(comfyui_oft, tmp_path_factory):
    import folder_paths
    from comfyui_oft.nodes import files

    root = tmp_path_factory.mktemp("oft_te")
    shutil.copy(TE_DIR / TE_FILE, root / TE_FILE)
    files.register_folder()
    folder_paths.add_model_folder_path("oft", str(root))
    return root


@pytest.fixture(scope="module", params=["float32", "loader_default"])
def clip_l(comfyui_oft, request):
    """ComfyUI's SD1 CLIP from a CLIP-L state dict (transformers names, as CLIPLoader reads a clip_l file): seeded
    weights everywhere, the fixture's base weights and biases in its four adapted layers. In float32, and in the
    dtype ComfyUI's loader picks by itself (float16 here: what CLIPLoader gives users)."""
    import comfy.sd
    import comfy.sd1_clip

    donor = comfy_models.sd1_clip(seed=5)
    sd = {k[len(RUNTIME_PREFIX):]: v.clone() for k, v in donor.patcher.model.state_dict().items()
          if k.startswith(RUNTIME_PREFIX)}
    del donor
    base = load_file(TE_DIR / "base.safetensors")
    for k, v in base.items():
        name = k[len(CKPT_PREFIX):]
        assert name in sd and sd[name].shape == v.shape, name
        sd[name] = v
    options = {"dtype": torch.float32} if request.param == "float32" else {}
    clip = comfy.sd.load_text_encoder_state_dicts([sd], clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION,
                                                  model_options=options)
    assert type(clip.cond_stage_model).__name__ == "SD1ClipModel"
    return clip


def runtime_key(ckpt_key: str) -> str:
    return RUNTIME_PREFIX + ckpt_key[len(CKPT_PREFIX):]


def loaded_weights(clip, keys):
    """The weights as CLIPTextEncode sees them (clip.load_model: ComfyUI's model loading), then unloaded."""
    import comfy.model_management
    import comfy.utils

    comfy.model_management.load_models_gpu([clip.patcher], force_full_load=True)
    try:
        return {k: comfy.utils.get_attr(clip.patcher.model, k).detach().clone() for k in keys}
    finally:
        comfy.model_management.unload_all_models()


@pytest.mark.parametrize("strength, reference", [(1.0, "merged.safetensors"),
                                                 (0.5, "merged_multiplier0.5.safetensors")])
def test_oftloader_on_sd1_clip_matches_lycoris_merge(te_folder, clip_l, strength, reference):
    from comfyui_oft.nodes import oft_nodes

    merged = {k: v for k, v in load_file(TE_DIR / reference).items() if k.endswith(".weight")}
    base = load_file(TE_DIR / "base.safetensors")
    keys = [runtime_key(k) for k in merged]
    before = {k: v.clone() for k, v in clip_l.patcher.model.state_dict().items()}
    model = comfy_models.sd15_tiny()
    out = oft_nodes.OFTLoader.execute(model=model, clip=clip_l, adapter_name=TE_FILE, strength=strength,
                                      strength_mode="kohya")
    new_model, new_clip = out.result
    assert "4 of 4 adapter layers applied" in out.ui.value
    assert new_clip is not clip_l and not clip_l.patcher.patches  # the input CLIP is not patched
    assert not new_model.patches  # a text-encoder-only adapter leaves the diffusion model alone
    assert len(new_clip.patcher.patches) == 4
    got = loaded_weights(new_clip, keys)
    dtype = clip_l.patcher.model.state_dict()[keys[0]].dtype
    # fp32: the oracle's tolerance. fp16 (the loader's default): the base is rounded to fp16 on load and the rotated
    # weight again after patching, two roundings of 2^-11 relative each.
    tol = REL_TOL if dtype == torch.float32 else 2.0**-10
    for ckpt_key, ref in merged.items():
        w = got[runtime_key(ckpt_key)]
        assert w.dtype == dtype
        assert rel_err(w, ref) <= tol, f"{ckpt_key} at strength {strength} ({dtype})"
        assert rel_err(ref, base[ckpt_key]) > 1e-3  # the reference really is a change
    # biases untouched (LyCORIS never changes them), the input CLIP bit for bit as before
    after = clip_l.patcher.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    for k in base:
        if k.endswith(".bias"):
            assert torch.equal(after[runtime_key(k)], base[k].to(dtype))


def test_bypass_on_sd1_clip_equals_the_lycoris_forward(te_folder, clip_l):
    """Apply mode bypass on the CLIP: each adapted layer's forward == LyCORIS's own wrapped-layer output
    (forward_io.safetensors, strength 1); no weight written; the input CLIP untouched."""
    import comfy.model_management
    import comfy.utils
    from comfyui_oft.nodes import oft_nodes

    io = load_file(TE_DIR / "forward_io.safetensors")
    before = {k: v.clone() for k, v in clip_l.patcher.model.state_dict().items()}
    out = oft_nodes.OFTLoader.execute(model=comfy_models.sd15_tiny(), clip=clip_l, adapter_name=TE_FILE,
                                      strength=1.0, strength_mode="kohya", apply_mode="bypass")
    new_clip = out.result[1]
    assert "4 of 4 adapter layers applied" in out.ui.value and not new_clip.patcher.patches
    comfy.model_management.load_models_gpu([new_clip.patcher], force_full_load=True)
    try:
        dtype = None
        for key in io:
            if key.endswith(".out"):
                continue
            module = comfy.utils.get_attr(new_clip.patcher.model, runtime_key(key))
            dtype = module.weight.dtype
            y = module(io[key].to(dtype))
            # fp32: the trainer's forward to fp32 rounding; fp16: the layer's own fp16 rounding (inputs, weights and
            # output in fp16), well under the adapter's effect (3e-2 relative)
            tol = 2e-6 if dtype == torch.float32 else 2e-3
            assert rel_err(y, io[key + ".out"]) <= tol, (key, dtype)
        assert all(torch.equal(v, before[k]) for k, v in new_clip.patcher.model.state_dict().items())
    finally:
        comfy.model_management.unload_all_models()
    assert not any(m._forward_hooks for m in clip_l.patcher.model.modules())


def test_a_peft_text_encoder_adapter_saved_alone_applies_to_the_clip(clip_l, tmp_path, monkeypatch):
    """A PEFT adapter of a CLIPTextModel saved on its own (`base_model.model.text_model.…`: what diffusers'
    DreamBooth scripts write for the text encoder beside the UNet's; here PEFT BOFT with a trained bias) is the
    text encoder's, not the UNet's: OFTLoader applies it to the CLIP, each weight PEFT's merge in fp64, each bias the
    trained one, the diffusion model untouched."""
    import json

    import folder_paths
    from comfyui_oft.nodes import oft_nodes
    from oracle import peft_boft_weight
    from safetensors.torch import save_file

    base = load_file(TE_DIR / "base.safetensors")
    g = torch.Generator().manual_seed(12)
    tensors, want = {}, {}
    for k, w in base.items():
        if k.endswith(".weight"):
            module = "base_model.model." + k[len(CKPT_PREFIX):-len(".weight")]
            a = 0.02 * torch.randn(1, 8, 96, 96, generator=g)
            s = 1 + 0.1 * torch.randn(768, 1, generator=g)
            trained = 0.1 * torch.randn(768, generator=g)
            tensors.update({f"{module}.boft_R": a, f"{module}.boft_s": s, f"{module}.base_layer.bias": trained})
            want[runtime_key(k)] = peft_boft_weight(w, a, s)
            want[runtime_key(k[:-len("weight")] + "bias")] = trained.double()
    d = tmp_path / "oft" / "text_encoder"
    d.mkdir(parents=True)
    save_file(tensors, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "BOFT", "boft_block_num": 8,
                                                       "boft_block_size": 0, "bias": "boft_only"}))
    table = dict(folder_paths.folder_names_and_paths)
    table["oft"] = ([str(tmp_path / "oft")], {".safetensors"})
    monkeypatch.setattr(folder_paths, "folder_names_and_paths", table)
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    model = comfy_models.sd15_tiny()
    out = oft_nodes.OFTLoader.execute(model=model, clip=clip_l, adapter_name="text_encoder/adapter_model.safetensors",
                                      strength=1.0, strength_mode="kohya")
    new_model, new_clip = out.result
    assert "4 of 4 adapter layers applied" in out.ui.value, out.ui.value
    assert not new_model.patches and len(new_clip.patcher.patches) == 8  # 4 weights, 4 biases
    got = loaded_weights(new_clip, list(want))
    dtype = clip_l.patcher.model.state_dict()[next(iter(want))].dtype
    tol = REL_TOL if dtype == torch.float32 else 2.0**-10  # fp16: as the test above
    for key, w in want.items():
        assert rel_err(got[key], w) <= tol, key
