"""Bypass apply mode through the real ComfyUI (library level: ModelPatcher loading, injections, low-VRAM path, fp8
manual cast, LoRA stacking, clones) on the small models ComfyUI loads. Whole-model forwards are compared with
merge mode and with the trainers' merged weights; weights are checked never to change."""

from __future__ import annotations

import os

import comfy_models
import pytest
import test_nodes
import torch
from oracle import rel_err
from safetensors.torch import load_file
from test_nodes import (
    FLUX_ADAPTER,
    LYCORIS_DIRS,
    PEFT_DIRS,
    _lora_sd,
    _tiny_with_base,
    assert_same_state,
    set_patches,
    snapshot,
)
from test_train_qoft import tiny_flux_detection  # noqa: F401  (a fixture)

pack, nodes_mod = test_nodes.pack, test_nodes.nodes_mod  # shared fixtures

pytestmark = pytest.mark.comfyui


@pytest.fixture(scope="module")
def oft_folder(pack, tmp_path_factory):
    """The fixture adapters in an 'oft' folder of this module's own, names prefixed with 'bp_'."""
    return test_nodes.fixture_oft_folder(tmp_path_factory, "bp_")


def aname(name: str) -> str:
    """An adapter's name in this module's folder."""
    return "bp_" + name

# A whole tiny-model forward, bypass vs merged weights, fp32: the per-layer differences are fp32 rounding (≤ ~5e-7 of
# the layer output, tests/test_bypass.py), carried through the model's later layers.
MODEL_TOL = 1e-5


def forward(patcher, inputs, **load_kwargs):
    patcher.patch_model(**load_kwargs)
    try:
        return comfy_models.apply_model(patcher, inputs)
    finally:
        patcher.unpatch_model()


def hooked_modules(patcher):
    return [n for n, m in patcher.model.named_modules() if m._forward_hooks or m._forward_pre_hooks]


@pytest.mark.parametrize("strength, mode", [(1.0, "kohya"), (0.5, "kohya"), (-0.8, "orthogonal")])
def test_flux_bypass_equals_merge_and_sd_scripts(nodes_mod, oft_folder, strength, mode):
    base = comfy_models.flux_tiny()
    snap = snapshot(base)
    inputs = comfy_models.flux_inputs()
    out = nodes_mod.oft_nodes.OFTLoader.execute(model=base, adapter_name=aname(os.path.basename(FLUX_ADAPTER)),
                                                strength=strength, strength_mode=mode, apply_mode="bypass")
    bypass = out.result[0]
    assert "8 of 8 adapter layers applied" in out.ui.value and "bypass" in out.ui.value
    assert not bypass.patches  # no weight patch at all
    merge = nodes_mod.oft_nodes.OFTLoader.execute(model=base, adapter_name=aname(os.path.basename(FLUX_ADAPTER)),
                                                  strength=strength, strength_mode=mode).result[0]
    bypass.patch_model()
    try:
        assert len(hooked_modules(bypass)) == 8  # 8 layers (the all-zero one is found and skipped at its forward)
        assert_same_state(bypass, snap)  # nothing written to any weight while loaded
        y = comfy_models.apply_model(bypass, inputs)
    finally:
        bypass.unpatch_model()
    assert not hooked_modules(bypass)  # ejected with the unpatch
    y_merge = forward(merge, inputs)
    y_base = forward(base, inputs)
    assert rel_err(y, y_merge) <= MODEL_TOL
    assert rel_err(y_base, y_merge) > 100 * max(rel_err(y, y_merge), 1e-7)
    assert torch.equal(forward(base, inputs), y_base)  # the parent is untouched
    assert_same_state(base, snap)


def test_block_strength_in_bypass_equals_merge(nodes_mod, oft_folder, fixtures_dir):
    from comfyui_oft.nodes.op_nodes import with_block_strength

    base = comfy_models.flux_tiny()
    adapter = with_block_strength(nodes_mod.files.load(fixtures_dir / FLUX_ADAPTER), "double:0=0.3, double:1=-1")
    inputs = comfy_models.flux_inputs(seed=1)
    b, _, _ = nodes_mod.patch.apply_oft(base, None, adapter, 0.9, "kohya", "bypass")
    m, _, _ = nodes_mod.patch.apply_oft(base, None, adapter, 0.9, "kohya", "merge")
    assert rel_err(forward(b, inputs), forward(m, inputs)) <= MODEL_TOL


@pytest.mark.parametrize("name", LYCORIS_DIRS + PEFT_DIRS)
def test_every_unet_fixture_bypass_equals_merge_on_sd15_tiny(nodes_mod, oft_folder, fixtures_dir, name):
    """Every LyCORIS / PEFT fixture on ComfyUI's SD1.x UNet: bypass forward == forward with the trainer's own merged
    weights ("set" patches), strength 1 (and 0.5 where LyCORIS merged at 0.5)."""
    import comfy.utils

    group = "lycoris" if name.startswith("lycoris") else "peft"
    d = fixtures_dir / group / name
    base, model = _tiny_with_base(load_file(d / "base.safetensors"))
    d2l = comfy.utils.unet_to_diffusers(base.model.model_config.unet_config)
    file = aname(f"{name}.safetensors" if group == "lycoris" else f"{name}/adapter_model.safetensors")
    inputs = comfy_models.sd15_tiny_inputs()
    refs = [(1.0, "merged.safetensors")] + ([(0.5, "merged_multiplier0.5.safetensors")] if group == "lycoris" else [])
    for strength, merged in refs:
        out = nodes_mod.oft_nodes.OFTLoader.execute(model=model, adapter_name=file, strength=strength,
                                                    strength_mode="kohya", apply_mode="bypass")
        assert "56 of 56 adapter layers applied" in out.ui.value
        want = load_file(d / merged)
        ref = model.clone()  # the fixture's base (weights and biases) as "set" patches, then its merged weights
        ref.add_patches(set_patches({k: v for k, v in want.items() if k in d2l},
                                    base.model.model_config.unet_config))
        y, y_ref, y_base = forward(out.result[0], inputs), forward(ref, inputs), forward(model, inputs)
        assert rel_err(y, y_ref) <= MODEL_TOL, strength
        assert rel_err(y_base, y_ref) > 100 * max(rel_err(y, y_ref), 1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bypass_survives_low_vram_offloading(nodes_mod, fixtures_dir, dtype):
    """Every module offloaded (weights cast per forward by comfy.ops): same hooks, same output as a full load."""
    base = comfy_models.flux_tiny(dtype)
    adapter = nodes_mod.files.load(fixtures_dir / FLUX_ADAPTER)
    b, _, _ = nodes_mod.patch.apply_oft(base, None, adapter, 1.0, "kohya", "bypass")
    inputs = comfy_models.flux_inputs(dtype=dtype)
    snap = snapshot(base)
    y_full = forward(b, inputs)
    b.patch_model(lowvram_model_memory=1)
    try:
        assert b.model.model_lowvram and len(hooked_modules(b)) == 8
        y_low = comfy_models.apply_model(b, inputs)
        assert_same_state(b, snap)
    finally:
        b.unpatch_model()
    assert not hooked_modules(b)
    assert torch.equal(y_low, y_full) if dtype == torch.float32 else rel_err(y_low, y_full) <= 2e-2


def _flux_fp8():
    """The tiny FLUX with fp8 (e4m3fn) weights computed in fp32 (ComfyUI's manual cast, as on a GPU without fp8
    matmuls), built like comfy.sd.load_diffusion_model_state_dict does."""
    import comfy.supported_models

    sd = load_file(comfy_models.FIXTURES / comfy_models.FLUX_TINY_BASE)
    config = comfy.supported_models.Flux(comfy_models.FLUX_TINY_CONFIG)
    config.set_inference_dtype(torch.float8_e4m3fn, torch.float32)
    model = config.get_model({}, "", device=torch.device("cpu"))
    sd = {k: (v.to(torch.float8_e4m3fn) if v.ndim == 2 else v) for k, v in config.process_unet_state_dict(sd).items()}
    missing, unexpected = model.diffusion_model.load_state_dict(sd, strict=False)
    assert not missing and not unexpected
    model.eval().requires_grad_(False)
    return comfy_models._patcher(model)


def test_fp8_base_bypass_is_exact_and_merge_is_not(nodes_mod, fixtures_dir):
    """On fp8 weights, bypass == the fp32 forward with the rotated, dequantised weights (to fp32 rounding); merge
    rounds the rotated weights back to fp8, an error larger than the adapter's own effect in places."""
    fp8 = _flux_fp8()
    adapter = nodes_mod.files.load(fixtures_dir / FLUX_ADAPTER)
    fp32 = comfy_models.flux_tiny().clone()
    # the fp32 model holding exactly the dequantised fp8 weights ("set" patches), then OFT merged in fp32
    fp32.add_patches({k: ("set", (v.to(torch.float32),)) for k, v in fp8.model.state_dict().items()
                      if v.dtype == torch.float8_e4m3fn})
    ref, _, _ = nodes_mod.patch.apply_oft(fp32, None, adapter, 1.0, "kohya", "merge")
    inputs = comfy_models.flux_inputs()
    y_ref = forward(ref, inputs)
    y_plain = forward(fp32, inputs)
    b, _, _ = nodes_mod.patch.apply_oft(fp8, None, adapter, 1.0, "kohya", "bypass")
    m, _, _ = nodes_mod.patch.apply_oft(fp8, None, adapter, 1.0, "kohya", "merge")
    snap = snapshot(fp8)
    y_bypass, y_merge = forward(b, inputs), forward(m, inputs)
    y_bypass_low = forward(b, inputs, lowvram_model_memory=1)
    assert_same_state(fp8, snap)
    effect = rel_err(y_ref, y_plain)
    err_bypass, err_merge = rel_err(y_bypass, y_ref), rel_err(y_merge, y_ref)
    assert err_bypass <= MODEL_TOL and rel_err(y_bypass_low, y_ref) <= MODEL_TOL
    assert err_merge > 100 * err_bypass and err_merge > 0.05 * effect  # fp8 re-rounding noise vs the OFT effect


def test_scaled_fp8_base_bypass_is_exact_and_merge_rotates_the_scaled_weight(nodes_mod, fixtures_dir, tmp_path,
                                                                            monkeypatch):
    """On a "scaled fp8" checkpoint (fp8 weights times scale_weight; per-layer quantized ops on ComfyUI 0.8): bypass
    equals the fp32 model holding those values with the adapter merged; merge mode hands our weight adapter the
    scaled weight (ModelPatcher converts it first), so what it rotates is that weight, exactly."""
    import comfy.sd

    scaled, values = comfy_models.scaled_fp8_flux_tiny(tmp_path, monkeypatch)
    adapter = nodes_mod.files.load(fixtures_dir / FLUX_ADAPTER)
    with torch.inference_mode():
        fp32 = comfy.sd.load_diffusion_model_state_dict(dict(values), model_options={"dtype": torch.float32})
    ref, _, _ = nodes_mod.patch.apply_oft(fp32, None, adapter, 1.0, "kohya", "merge")
    inputs = comfy_models.flux_inputs()
    b, _, _ = nodes_mod.patch.apply_oft(scaled, None, adapter, 1.0, "kohya", "bypass")
    with torch.inference_mode():  # as the executor loads (patches) and runs models
        y_ref, y_plain, y_bypass = forward(ref, inputs), forward(fp32, inputs), forward(b, inputs)
    err, effect = rel_err(y_bypass, y_ref), rel_err(y_ref, y_plain)
    assert err <= MODEL_TOL and err < effect / 100, (err, effect)
    seen = {}
    calc = nodes_mod.patch.OFTWeightAdapter.calculate_weight

    def spy(self, weight, key, *a, **k):
        seen.setdefault(key, weight.detach().float().clone())
        return calc(self, weight, key, *a, **k)

    monkeypatch.setattr(nodes_mod.patch.OFTWeightAdapter, "calculate_weight", spy)
    m, _, _ = nodes_mod.patch.apply_oft(scaled, None, adapter, 1.0, "kohya", "merge")
    with torch.inference_mode():
        forward(m, inputs)
    key = "diffusion_model.double_blocks.0.img_attn.proj.weight"
    assert len(seen) == 8 and torch.equal(seen[key], values[key[len("diffusion_model."):]])


@pytest.mark.parametrize("order", ["lora_then_oft", "oft_then_lora"])
def test_bypass_with_lora_realises_oft_after_lora(nodes_mod, fixtures_dir, order):
    """A LoRA's weight patch is inside the layer's forward: bypass OFT gives M·(W + ΔW) in both node orders (merge
    mode gives M·W + ΔW for OFT then LoRA)."""
    import comfy.sd

    base = comfy_models.flux_tiny()
    adapter = nodes_mod.files.load(fixtures_dir / FLUX_ADAPTER)
    lora = {}
    for i, p in enumerate(["double_blocks.0.img_attn.proj", "double_blocks.0.img_attn.qkv"]):
        w = base.model.state_dict()[f"diffusion_model.{p}.weight"]
        lora.update(_lora_sd(p, w.shape[0], w.shape[1], seed=i))
    if order == "lora_then_oft":
        m, _ = comfy.sd.load_lora_for_models(base, None, lora, 5.0, 0)
        m, _, _ = nodes_mod.patch.apply_oft(m, None, adapter, 0.7, "kohya", "bypass")
    else:
        m, _, _ = nodes_mod.patch.apply_oft(base, None, adapter, 0.7, "kohya", "bypass")
        m, _ = comfy.sd.load_lora_for_models(m, None, lora, 5.0, 0)
    lora_first, _ = comfy.sd.load_lora_for_models(base, None, lora, 5.0, 0)
    lora_first, _, _ = nodes_mod.patch.apply_oft(lora_first, None, adapter, 0.7, "kohya", "merge")
    oft_first, _, _ = nodes_mod.patch.apply_oft(base, None, adapter, 0.7, "kohya", "merge")
    oft_first, _ = comfy.sd.load_lora_for_models(oft_first, None, lora, 5.0, 0)
    inputs = comfy_models.flux_inputs(seed=2)
    y, y_lf, y_of = forward(m, inputs), forward(lora_first, inputs), forward(oft_first, inputs)
    assert rel_err(y, y_lf) <= MODEL_TOL
    assert rel_err(y, y_of) > 100 * max(rel_err(y, y_lf), 1e-7)


def test_bypass_stacks_and_clones_load_and_unload_cleanly(nodes_mod, fixtures_dir):
    """Two bypass Applies stacked == the two merged in that order; ComfyUI's loader swapping between clones of one
    model (load_models_gpu) leaves no hook of an unloaded clone behind."""
    import comfy.model_management

    base = comfy_models.flux_tiny()
    a = nodes_mod.files.load(fixtures_dir / FLUX_ADAPTER)
    inputs = comfy_models.flux_inputs(seed=3)
    b1, _, _ = nodes_mod.patch.apply_oft(base, None, a, 0.6, "kohya", "bypass")
    b2, _, _ = nodes_mod.patch.apply_oft(b1, None, a, -0.9, "orthogonal", "bypass")
    m2, _, _ = nodes_mod.patch.apply_oft(base, None, a, 0.6, "kohya", "merge")
    m2, _, _ = nodes_mod.patch.apply_oft(m2, None, a, -0.9, "orthogonal", "merge")
    assert rel_err(forward(b2, inputs), forward(m2, inputs)) <= MODEL_TOL

    y1 = forward(b1, inputs)
    try:
        comfy.model_management.load_models_gpu([b2])
        assert len(hooked_modules(b2)) == 8
        n_hooks = sum(len(m._forward_hooks) for m in b2.model.modules())
        assert n_hooks == 16  # two Applies, 8 modules each
        comfy.model_management.load_models_gpu([b1])  # another clone: b2's hooks ejected, b1's injected
        assert sum(len(m._forward_hooks) for m in b1.model.modules()) == 8
        assert torch.equal(comfy_models.apply_model(b1, inputs), y1)
        comfy.model_management.load_models_gpu([base])
        assert not hooked_modules(base)
    finally:
        comfy.model_management.unload_all_models()
    assert not hooked_modules(base)


def test_bypass_refuses_what_it_cannot_realise_and_patches_nothing(nodes_mod, fixtures_dir):
    """PEFT (input side) on slices of FLUX's fused qkv cannot be a forward hook: a clear error, the input intact."""
    from comfyui_oft import oft_core

    base = comfy_models.flux_tiny()
    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 8, 8, generator=g) * 0.1
    name = "transformer_blocks.0.attn.to_q"
    layer = oft_core.make_layer(path="peft_q", name=name, side="in", blocks=[a - a.transpose(-1, -2)],
                                transpose=False, key=name)
    adapter = oft_core.OFTAdapter({("unet", name): layer}, "peft", "peft_q")
    with pytest.raises(oft_core.OFTError, match="peft_q.*slice of a fused weight.*merge"):
        nodes_mod.patch.apply_oft(base, None, adapter, 1.0, "kohya", "bypass")
    assert not base.injections and not base.patches
    m, _, _ = nodes_mod.patch.apply_oft(base, None, adapter, 1.0, "kohya", "merge")  # merge mode handles it
    assert m.patches
    with pytest.raises(oft_core.OFTError, match="apply mode"):
        nodes_mod.patch.apply_oft(base, None, adapter, 1.0, "kohya", "sideways")


def test_apply_mode_is_the_last_input_of_the_nodes(nodes_mod):
    for node in (nodes_mod.oft_nodes.OFTLoader, nodes_mod.oft_nodes.OFTApply):
        schema = node.define_schema()
        last = schema.inputs[-1]
        assert last.id == "apply_mode" and last.default == "merge" and last.options == ["merge", "bypass"]
        assert last.tooltip


def test_oftapply_bypass_and_default_merge(nodes_mod, fixtures_dir):
    """Apply OFT: apply_mode bypass adds an injection and no weight patch; without apply_mode (older API prompts)
    it merges, as before."""
    base = comfy_models.flux_tiny()
    adapter = nodes_mod.files.load(fixtures_dir / FLUX_ADAPTER)
    out = nodes_mod.oft_nodes.OFTApply.execute(model=base, oft_adapter=adapter, strength=0.5, strength_mode="kohya",
                                               apply_mode="bypass")
    m = out.result[0]
    assert not m.patches and [k for k in m.injections if k.startswith("comfyui_oft_bypass:")]
    merged = nodes_mod.oft_nodes.OFTApply.execute(model=base, oft_adapter=adapter, strength=0.5,
                                                  strength_mode="kohya").result[0]
    assert len(merged.patches) == 8 and not merged.injections
    inputs = comfy_models.flux_inputs(seed=4)
    assert rel_err(forward(m, inputs), forward(merged, inputs)) <= MODEL_TOL


@pytest.mark.third_party
@pytest.mark.usefixtures("tiny_flux_detection")
def test_gguf_base_bypass_equals_the_fp32_reference_of_the_dequantised_weights(nodes_mod, fixtures_dir, tmp_path,
                                                                                monkeypatch):
    """City96's ComfyUI-GGUF (UnetLoaderGGUF, Q8_0): bypass rotates the outputs of the layers' own dequantised
    forward, so the model equals the fp32 model holding the dequantised weights with OFT merged in fp32 (to fp32
    rounding), full load and low VRAM alike; nothing of the GGUF model is written. Runs where that pack is present."""
    from test_train_qoft import assert_raw_equal, dequantised_reference, load_tiny_flux_gguf, raw

    gguf_model, path, gg_loader, gg_dequant = load_tiny_flux_gguf(tmp_path, monkeypatch)
    reference = dequantised_reference(path, gg_loader, gg_dequant)
    adapter = nodes_mod.files.load(fixtures_dir / FLUX_ADAPTER)
    ref, _, _ = nodes_mod.patch.apply_oft(reference, None, adapter, 1.0, "kohya", "merge")
    inputs = comfy_models.flux_inputs()
    with torch.inference_mode():
        y_ref, y_plain = forward(ref, inputs), forward(reference, inputs)
        bypass, _, text = nodes_mod.patch.apply_oft(gguf_model, None, adapter, 1.0, "kohya", "bypass")
        assert "bypass" in text
        raw_before = raw(gguf_model)
        y_bypass = forward(bypass, inputs)
        y_bypass_low = forward(bypass, inputs, lowvram_model_memory=1)
    assert_raw_equal(gguf_model, raw_before)
    assert rel_err(y_ref, y_plain) > 10 * MODEL_TOL  # the adapter's effect (~3e-4) stands well above the tolerance
    assert rel_err(y_bypass, y_ref) <= MODEL_TOL and rel_err(y_bypass_low, y_ref) <= MODEL_TOL
