"""OFT as ComfyUI hooks (nodes/hook_nodes.py) with core's hook machinery, against the trainers' merges at each
keyframe strength, and in a real sampling run (comfy.sample.sample, euler) where the strength changes between steps.
Library level against the real ComfyUI."""

from __future__ import annotations

import os

import comfy_models
import pytest
import test_nodes
import torch
from oracle import REL_TOL, rel_err
from safetensors.torch import load_file
from test_nodes import FLUX_ADAPTER, FLUX_EXPECTED, _tiny_with_base, expected_modules

pack, nodes_mod = test_nodes.pack, test_nodes.nodes_mod  # shared fixtures

pytestmark = pytest.mark.comfyui


@pytest.fixture(scope="module")
def oft_folder(pack, tmp_path_factory):
    """The fixture adapters in an 'oft' folder of this module's own, names prefixed with 'hk_'."""
    return test_nodes.fixture_oft_folder(tmp_path_factory, "hk_")


def aname(name: str) -> str:
    """An adapter's name in this module's folder."""
    return "hk_" + name


def hook_weights(model, hooks, keys, target="model"):
    """The weights `keys` with `hooks` applied at their current keyframe strength, the way sampling applies them
    (register_all_hook_patches, then apply_hooks on the loaded model)."""
    import comfy.hooks
    import comfy.utils

    m = model.clone()
    t = comfy.hooks.EnumWeightTarget.Clip if target == "clip" else comfy.hooks.EnumWeightTarget.Model
    m.register_all_hook_patches(hooks, comfy.hooks.create_target_dict(t))
    m.patch_model()
    try:
        m.apply_hooks(hooks, force_apply=True)
        return {k: comfy.utils.get_attr(m.model, k).detach().clone() for k in keys}
    finally:
        m.unpatch_model()


def with_strength(hooks, strength):
    """`hooks` with one keyframe at `strength`, made current the way sampling makes it (Set Hook Keyframes)."""
    import comfy.hooks

    kf = comfy.hooks.HookKeyframeGroup()
    kf.add(comfy.hooks.HookKeyframe(strength=strength, start_percent=0.0))
    hooks = hooks.clone()
    hooks.set_keyframes_on_hooks(hook_kf=kf)
    for h in hooks.hooks:
        h.hook_keyframe._set_first_as_current()
    return hooks


def test_kohya_flux_hook_gives_the_sd_scripts_merge_at_each_keyframe(nodes_mod, oft_folder, fixtures_dir):
    from comfyui_oft.nodes import hook_nodes

    base = comfy_models.flux_tiny()
    ex = load_file(fixtures_dir / FLUX_EXPECTED)
    paths = [m["module_path"] for m in expected_modules(fixtures_dir, FLUX_EXPECTED).values()]
    keys = {f"diffusion_model.{p}.weight": p for p in paths}
    hooks = hook_nodes.OFTHook.execute(adapter_name=aname(os.path.basename(FLUX_ADAPTER)), strength_model=1.0,
                                       strength_clip=1.0, strength_mode="kohya").result[0]
    assert len(hooks.hooks) == 1 and isinstance(hooks.hooks[0], hook_nodes.OFTWeightHook)
    for s in (1.0, 0.5):
        got = hook_weights(base, with_strength(hooks, s), keys)
        for key, p in keys.items():
            assert rel_err(got[key], ex[f"merged_m{s}/{p}.weight"]) <= REL_TOL, (key, s)
    got = hook_weights(base, with_strength(hooks, 0.0), keys)
    assert all(torch.equal(got[k], base.model.state_dict()[k]) for k in keys)  # keyframe 0: the base, bit for bit
    assert not base.hook_patches


@pytest.mark.parametrize("group, name, file", [
    ("lycoris", "lycoris_diag_oft_dim8", "lycoris_diag_oft_dim8.safetensors"),
    ("lycoris", "lycoris_diag_oft_rescaled", "lycoris_diag_oft_rescaled.safetensors"),
    ("peft", "peft_oft_cayley_bs8", "peft_oft_cayley_bs8/adapter_model.safetensors"),
])
def test_lycoris_and_peft_hooks_give_the_trainers_merge(nodes_mod, oft_folder, fixtures_dir, group, name, file):
    import comfy.utils
    from comfyui_oft.nodes import hook_nodes

    d = fixtures_dir / group / name
    base, model = _tiny_with_base(load_file(d / "base.safetensors"))
    d2l = comfy.utils.unet_to_diffusers(base.model.model_config.unet_config)
    hooks = hook_nodes.OFTHook.execute(adapter_name=aname(file), strength_model=1.0, strength_clip=0.0,
                                       strength_mode="kohya").result[0]
    refs = [(1.0, "merged.safetensors")] + ([(0.5, "merged_multiplier0.5.safetensors")] if group == "lycoris" else [])
    for s, ref_file in refs:
        want = load_file(d / ref_file)
        keys = {"diffusion_model." + d2l[k]: k for k in want if k.endswith(".weight") and k in d2l}
        assert len(keys) == 56
        got = hook_weights(model, with_strength(hooks, s), keys)
        for key, dk in keys.items():
            assert rel_err(got[key], want[dk]) <= REL_TOL, (key, s)


def test_a_peft_boft_hook_with_trained_biases_gives_peft_merge_at_each_keyframe(nodes_mod, fixtures_dir, tmp_path,
                                                                              monkeypatch):
    """A PEFT BOFT adapter with trained biases (bias 'boft_only', two butterfly factors) as an OFT hook: at keyframe
    1 each weight is PEFT's merge and each bias the trained one; at 0.5 the pack's strength for both; at 0 the base,
    bit for bit."""
    import comfy.utils
    import folder_paths
    from comfyui_oft.nodes import hook_nodes

    base_sd = load_file(fixtures_dir / "peft" / "base_unet.safetensors")
    base, model = _tiny_with_base(base_sd)
    d2l = comfy.utils.unet_to_diffusers(base.model.model_config.unet_config)
    folder = tmp_path / "oft"
    table = dict(folder_paths.folder_names_and_paths)
    table["oft"] = ([str(folder)], {".safetensors"})
    monkeypatch.setattr(folder_paths, "folder_names_and_paths", table)
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    hooks = None
    for s in (1.0, 0.5):
        sub = folder / str(s)  # one folder per strength: the statement of each is made with its strength
        sub.mkdir(parents=True)
        want = test_nodes.boft_sd_folder(sub, base_sd, d2l, 2, s, ("attn1.to_q", "proj_in", "conv1"))
        assert sum(k.endswith(".bias") for k in want) >= 5
        table["oft"] = ([str(sub)], {".safetensors"})
        monkeypatch.setattr(folder_paths, "filename_list_cache", {})
        hooks = hook_nodes.OFTHook.execute(adapter_name="boft_sd/adapter_model.safetensors", strength_model=1.0,
                                           strength_clip=0.0, strength_mode="kohya").result[0]
        got = hook_weights(model, with_strength(hooks, s), list(want))
        for key, w in want.items():
            assert rel_err(got[key], w) <= REL_TOL, (key, s)
    got = hook_weights(model, with_strength(hooks, 0.0), list(want))
    model.patch_model()  # (the tiny UNet's base weights are "set" patches: the base is the patched model)
    try:
        before = {k: comfy.utils.get_attr(model.model, k).detach().clone() for k in want}
    finally:
        model.unpatch_model()
    assert all(torch.equal(got[k], before[k]) for k in want)


def test_combine_hooks_and_strengths_multiply_once(nodes_mod, oft_folder, fixtures_dir):
    """Hook strength × keyframe strength is one strength, applied once (core's OFT would give s² here); Combine
    Hooks with a second OFT hook applies both, in order."""
    import comfy_extras.nodes_hooks as core_hooks
    from comfyui_oft.nodes import hook_nodes
    from comfyui_oft.oft_core import rotate_weight

    base = comfy_models.flux_tiny()
    adapter = nodes_mod.files.load(fixtures_dir / FLUX_ADAPTER)
    key = "diffusion_model.double_blocks.0.img_attn.proj.weight"
    layer = adapter.layers[("unet", "double_blocks_0_img_attn_proj")]
    w = base.model.state_dict()[key]
    h1 = hook_nodes.create_oft_hook(adapter, 0.8, 0.0, "kohya")
    got = hook_weights(base, with_strength(h1, 0.5), [key])[key]
    assert rel_err(got, rotate_weight(layer, w, 0.4, "kohya")) <= REL_TOL
    h2 = hook_nodes.create_oft_hook(adapter, -0.3, 0.0, "orthogonal")
    (both,) = core_hooks.CombineHooks().combine_hooks(hooks_A=h1, hooks_B=h2)
    got = hook_weights(base, both, [key])[key]
    want = rotate_weight(layer, rotate_weight(layer, w, 0.8, "kohya"), -0.3, "orthogonal")
    assert rel_err(got, want) <= REL_TOL


def test_text_encoder_hook_through_set_clip_hooks(nodes_mod, pack, tmp_path):
    """Set CLIP Hooks registers the OFT hook on the CLIP: its LyCORIS text-encoder layers at strength_clip."""
    import comfy.model_management
    import comfy.sd
    import comfy.sd1_clip
    import comfy.utils
    import comfy_extras.nodes_hooks as core_hooks
    from comfyui_oft.nodes import hook_nodes
    from comfyui_oft.oft_core import rotate_weight
    from test_te_clip import RUNTIME_PREFIX, TE_DIR, TE_FILE

    clip = comfy_models.sd1_clip(seed=3)
    adapter = nodes_mod.files.load(TE_DIR / TE_FILE)
    hooks = hook_nodes.create_oft_hook(adapter, 1.0, 0.5, "kohya")
    (hooked,) = core_hooks.SetClipHooks().apply_hooks(clip=clip, schedule_clip=False, apply_to_conds=True,
                                                      hooks=hooks)
    key = RUNTIME_PREFIX + "text_model.encoder.layers.5.self_attn.out_proj.weight"
    w = clip.patcher.model.state_dict()[key].clone()
    comfy.model_management.load_models_gpu([hooked.patcher], force_full_load=True)
    try:
        hooked.patcher.apply_hooks(hooked.patcher.forced_hooks, force_apply=True)
        got = comfy.utils.get_attr(hooked.patcher.model, key).detach().clone()
    finally:
        comfy.model_management.unload_all_models()
    layer = adapter.layers[("te", "text_model_encoder_layers_5_self_attn_out_proj")]
    assert rel_err(got, rotate_weight(layer, w, 0.5, "kohya")) <= REL_TOL
    assert torch.equal(clip.patcher.model.state_dict()[key], w)


def test_wrong_model_fails_when_registered(nodes_mod, oft_folder, fixtures_dir):
    from comfyui_oft.nodes import hook_nodes
    from comfyui_oft.oft_core import OFTError

    hooks = hook_nodes.create_oft_hook(nodes_mod.files.load(fixtures_dir / FLUX_ADAPTER), 1.0, 1.0)
    with pytest.raises(OFTError, match="none of its 8 layers matches the SD15 model"):
        hook_weights(comfy_models.sd15_tiny(), hooks, [])


def test_keyframes_change_the_strength_between_steps_of_a_real_sampling_run(nodes_mod, oft_folder, fixtures_dir):
    """comfy.sample.sample (euler, 6 steps) on the tiny FLUX, the OFT hook on the positive conditioning with
    keyframes 1.0 → 0.5 → 0.0 (Create Hook Keyframe + Set Hook Keyframes + Cond Set Props): at every model call the
    adapted weights are the merge at the keyframe strength ComfyUI made current, and that strength changes."""
    import comfy.sample
    import comfy.utils
    import comfy_extras.nodes_hooks as core_hooks
    from comfyui_oft.nodes import hook_nodes
    from comfyui_oft.oft_core import rotate_weight

    base = comfy_models.flux_tiny()
    adapter = nodes_mod.files.load(fixtures_dir / FLUX_ADAPTER)
    hooks = hook_nodes.OFTHook.execute(adapter_name=aname(os.path.basename(FLUX_ADAPTER)), strength_model=1.0,
                                       strength_clip=1.0, strength_mode="kohya").result[0]
    (kf,) = core_hooks.CreateHookKeyframe().create_hook_keyframe(strength_mult=1.0, start_percent=0.0)
    (kf,) = core_hooks.CreateHookKeyframe().create_hook_keyframe(strength_mult=0.5, start_percent=0.3,
                                                                 prev_hook_kf=kf)
    (kf,) = core_hooks.CreateHookKeyframe().create_hook_keyframe(strength_mult=0.0, start_percent=0.6,
                                                                 prev_hook_kf=kf)
    (hooks,) = core_hooks.SetHookKeyframes().set_hook_keyframes(hooks=hooks, hook_kf=kf)
    inputs = comfy_models.flux_inputs()
    cond = [[inputs["c_crossattn"], {"pooled_output": inputs["y"], "guidance": 3.5}]]
    (positive,) = core_hooks.ConditioningSetProperties().set_properties(cond_NEW=cond, strength=1.0,
                                                                         set_cond_area="default", hooks=hooks)
    key = "diffusion_model.double_blocks.1.img_attn.qkv.weight"
    layer = adapter.layers[("unet", "double_blocks_1_img_attn_qkv")]
    w = base.model.state_dict()[key].clone()
    seen = []

    def wrapper(apply_model, args):
        inner = apply_model.__self__
        current = inner.current_patcher.current_hooks
        strength = [h.strength for h in current.hooks][0] if current is not None else None
        seen.append((float(args["timestep"][0]), strength, comfy.utils.get_attr(inner, key).detach().clone()))
        return apply_model(args["input"], args["timestep"], **args["c"])

    model = base.clone()
    model.set_model_unet_function_wrapper(wrapper)
    latent = torch.zeros(1, 4, 16, 16)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    import comfy.model_management

    try:
        out = comfy.sample.sample(model, noise, 6, 1.0, "euler", "simple", positive, cond, latent, seed=0,
                                  disable_pbar=True)
    finally:  # sampling leaves the model loaded (patched flags set): other tests share this model
        comfy.model_management.unload_all_models()
    assert torch.isfinite(out).all()
    strengths = [s for _, s, _ in seen]
    assert len(seen) == 6 and strengths[0] == 1.0 and 0.5 in strengths and strengths[-1] == 0.0, strengths
    assert strengths == sorted(strengths, reverse=True)
    assert strengths == [1.0, 1.0, 0.5, 0.5, 0.0, 0.0]  # keyframes at 0 %, 30 %, 60 % of 6 simple-schedule steps
    for sigma, s, got in seen:
        want = rotate_weight(layer, w, s, "kohya") if s != 0 else w
        assert rel_err(got, want) <= REL_TOL, (sigma, s)
    assert torch.equal(base.model.state_dict()[key], w)  # unpatched after sampling


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e30])
def test_a_non_finite_or_huge_hook_strength_is_refused_before_any_hook(nodes_mod, bad):
    """NaN passes ComfyUI's min/max check: Create Hook OFT refuses it with oft_core's strength check, naming the input
    and the file, and makes no hook."""
    from comfyui_oft.nodes import hook_nodes
    from comfyui_oft.oft_core import OFTError

    adapter = nodes_mod.files.load(comfy_models.FIXTURES / FLUX_ADAPTER)
    for kw in ({"strength_model": bad, "strength_clip": 1.0}, {"strength_model": 1.0, "strength_clip": bad}):
        with pytest.raises(OFTError) as e:
            hook_nodes.create_oft_hook(adapter, mode="kohya", **kw)
        name = next(k for k, v in kw.items() if v is bad)
        assert name in str(e.value) and "flux_tiny_oft_attn_dim4.safetensors" in str(e.value)
