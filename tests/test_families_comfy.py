"""Every family through ComfyUI's own key maps, and training on any family, against the REAL ComfyUI (CPU, tiny
SD3 / Wan 2.1 / Qwen-Image models built by ComfyUI's own classes: comfy_models.dit_tiny).

The reference tools' side (LyCORIS / PEFT files made and merged by the tools on diffusers models) is
test_tools_families.py.
"""

from __future__ import annotations

import comfy_models
import pytest
import torch

pytestmark = pytest.mark.comfyui

FAMILIES = ("sd3", "wan", "qwen", "hidream")


@pytest.fixture(scope="session")
def mods(comfyui_oft):
    from comfyui_oft.nodes import families, op_nodes, patch, train_node

    return type("M", (), {"families": families, "patch": patch, "tn": train_node, "ops": op_nodes})


def training_data(family: str, n: int = 2, seed: int = 0):
    """Latents and conditioning each family's extra_conds takes (tiny sizes of comfy_models' configs)."""
    g = torch.Generator().manual_seed(seed)
    if family == "sd3":
        latents = torch.randn(n, 16, 8, 8, generator=g)
        positive = [[torch.randn(1, 5, 64, generator=g), {"pooled_output": torch.randn(1, 32, generator=g)}]]
    elif family == "wan":
        latents = torch.randn(n, 16, 1, 8, 8, generator=g)
        positive = [[torch.randn(1, 5, 32, generator=g), {}]]
    elif family == "hidream":  # T5 features, pooled CLIP, and the Llama layers (batch, layer, tokens, features)
        latents = torch.randn(n, 16, 8, 8, generator=g)
        extra = {"pooled_output": torch.randn(1, 24, generator=g),
                 "conditioning_llama3": torch.randn(1, 1, 5, 48, generator=g)}
        positive = [[torch.randn(1, 5, 32, generator=g), extra]]
    elif family in ("lumina2", "zimage"):  # Gemma / Qwen3 features and their attention mask (→ num_tokens)
        latents = torch.randn(n, 4, 8, 8, generator=g)
        positive = [[torch.randn(1, 5, 32, generator=g), {"attention_mask": torch.ones(1, 5, dtype=torch.long)}]]
    else:
        latents = torch.randn(n, 16, 1, 8, 8, generator=g)
        positive = [[torch.randn(1, 5, 48, generator=g), {}]]
    return {"samples": latents}, positive


def train_node(mods, model, family, steps=3, **over):
    import comfy.model_management

    latents, positive = training_data(family)
    kw = dict(learning_rate=2e-2, batch_size=2, grad_accumulation=1, optimizer="AdamW", seed=0, num_blocks=4,
              constraint=0.0, cayley_neumann=False, neumann_terms=5, targets="all-linear", training_dtype="fp32",
              gradient_checkpointing=False)
    kw.update(over)
    try:
        with torch.inference_mode():  # as ComfyUI's executor runs nodes
            out = mods.tn.OFTTrainerNode.execute(model=model, latents=latents, positive=positive, steps=steps, **kw)
    finally:
        comfy.model_management.unload_all_models()
    return out.result


# ------------------------------------------------------------------------------------------------ key maps
@pytest.mark.parametrize("which", ["sd15_tiny", "flux_tiny"])
def test_comfyui_key_map_agrees_with_the_packs_tables(mods, which):
    """Where the pack's own tables (exact for kohya's names) and ComfyUI's map both name a layer, they agree."""
    from comfyui_oft.oft_core.names import _external_names, build_key_map

    model = getattr(comfy_models, which)()
    shapes = mods.patch.model_shapes(model, "diffusion_model.")
    own = build_key_map(shapes)
    both = 0
    for component, name, target in _external_names(mods.patch.comfy_key_map(model), shapes):
        mine = own.lookup(name, component)
        if mine is not None:
            both += 1
            assert mine == target, (name, mine, target)
    assert both > 50


def test_sd3_diffusers_names_are_row_slices_of_comfyuis_fused_qkv(mods):
    from comfyui_oft.oft_core.names import Target, build_key_map

    model = comfy_models.dit_tiny("sd3")
    shapes = mods.patch.model_shapes(model, "diffusion_model.")
    km = build_key_map(shapes, mods.patch.comfy_key_map(model))
    qkv = "diffusion_model.joint_blocks.1.x_block.attn.qkv.weight"
    assert shapes[qkv] == (384, 128)
    for i, name in enumerate(("to_q", "to_k", "to_v")):
        assert km.lookup(f"transformer_blocks_1_attn_{name}") == Target(qkv, (0, 128 * i, 128))  # lycoris_
        assert km.lookup(f"transformer_blocks.1.attn.{name}") == Target(qkv, (0, 128 * i, 128))  # transformer.
    assert km.lookup("joint_blocks_1_x_block_attn_qkv") == Target(qkv)  # lora_unet_ / ComfyUI's own name
    # ComfyUI stores diffusers' norm_out.linear with its scale / shift halves swapped: a row permutation
    out = km.lookup("norm_out.linear")
    assert out.key == "diffusion_model.final_layer.adaLN_modulation.1.weight" and out.offset is None
    assert out.perm == tuple(range(128, 256)) + tuple(range(128))


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("family", FAMILIES)
def test_generic_all_linear_and_family_names(mods, family):
    from comfyui_oft.oft_core.train import _block_lists, detect_family, select_targets

    model = comfy_models.dit_tiny(family)
    dm = model.model.diffusion_model
    assert detect_family(dm) == "generic"
    targets = select_targets(dm, "all-linear", "generic")
    lists = tuple(f"{b}." for b in _block_lists(dm))
    in_blocks = [n for n, m in dm.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(lists)]
    assert [p for p, _ in targets] == in_blocks and len(in_blocks) >= 16
    assert not any(p.startswith(("x_embedder", "final_layer", "patch_embedding", "head", "img_in", "proj_out"))
                   for p, _ in targets)
    lay = mods.families.layout(model, targets)
    if family == "sd3":  # SimpleTuner LyCORIS names (diffusers), fused qkv in three splits
        assert lay.prefix == "lycoris_"
        assert lay.names["joint_blocks.0.x_block.attn.qkv"] == tuple(
            f"transformer_blocks.0.attn.to_{x}" for x in "qkv")
        assert lay.splits["joint_blocks.0.x_block.attn.qkv"] == (128, 128, 128)
        assert lay.names["joint_blocks.0.x_block.mlp.fc1"] == "transformer_blocks.0.ff.net.0.proj"
        # the last block's context adaLN is a permuted (scale/shift swapped) diffusers weight: no name, not trained
        assert lay.left_out == ["joint_blocks.1.context_block.adaLN_modulation.1"]
    elif family == "wan":  # no lycoris_ names in ComfyUI's Wan map: its own paths under lora_unet_ (musubi-tuner)
        assert lay.prefix == "lora_unet_" and lay.names["blocks.0.self_attn.q"] == "blocks.0.self_attn.q"
    else:  # Qwen-Image, HiDream: ComfyUI's names are diffusers'
        assert lay.prefix == "lycoris_" and all(k == v for k, v in lay.names.items()) and not lay.splits


@pytest.mark.parametrize("family", FAMILIES)
def test_flow_objective_from_model_sampling(mods, family):
    """SD3 / Wan / Qwen-Image train on flow matching: the loss is the MSE of the raw output against the velocity
    noise − x₀, read from the model's own model_sampling (CONST: D = x_t − σ·out)."""
    import comfy.model_sampling

    model = comfy_models.dit_tiny(family)
    base = model.model
    assert isinstance(base.model_sampling, comfy.model_sampling.CONST)
    latents, positive = training_data(family)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        x0 = base.process_latent_in(latents["samples"])
        conds = mods.tn.batch_conds(mods.tn.prepare_conds(base, positive, x0, torch.device("cpu")), [0, 1])
        noise = torch.randn(x0.shape, generator=g)
        sigma = mods.tn.sample_sigmas(base.model_sampling, 2, g)
        assert ((sigma > 0) & (sigma < 1)).all()
        loss = mods.tn.family_loss(base, x0, noise, sigma, conds, {})
        s = sigma.view(-1, *([1] * (x0.ndim - 1)))
        xt = (1 - s) * x0 + s * noise
        out = (xt - base.apply_model(xt, sigma, **conds)) / s
        want = ((out - (noise - x0)) ** 2).mean()
    assert float(loss) == pytest.approx(float(want), rel=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_any_family_through_the_node(mods, family, tmp_path):
    """all-linear on SD3 / Wan / Qwen-Image / HiDream through the OFTTrainer node under inference mode: the loss
    moves, the base weights stay, the adapter carries the family's LyCORIS names, kohya is refused, LyCORIS is
    written, and that file loaded back through OFTLoader patches exactly what the node's output model patches."""
    from comfyui_oft.oft_core import OFTError, load_adapter
    from comfyui_oft.oft_core.formats import write_adapter

    model = comfy_models.dit_tiny(family)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    new_model, adapter, loss, report = train_node(mods, model, family, num_blocks=32)  # LyCORIS: block size ≤ count
    assert len(loss["loss"]) == 3 and all(torch.isfinite(torch.tensor(loss["loss"])))
    if family == "sd3":  # the one layer its diffusers names cannot hold is named on the node, not trained
        assert "1 selected layers not trained" in report and "joint_blocks.1.context_block.adaLN_modulation.1" in \
            report, report
    else:
        assert "not trained" not in report, report
    assert all(torch.equal(v, before[k]) for k, v in model.model.state_dict().items())
    assert adapter.format == "lycoris_diag_oft"
    names = {layer.name for layer in adapter}
    if family == "sd3":
        assert {"transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.1.ff.net.2",
                "transformer_blocks.0.attn.add_v_proj"} <= names
        assert all(layer.key.startswith("lycoris_transformer_blocks_") for layer in adapter)
    elif family == "wan":
        assert "blocks.1.cross_attn.o" in names
        assert all(layer.key.startswith("lora_unet_blocks_") for layer in adapter)
    elif family == "hidream":  # both streams' attention, the text stream's projections, the MoE experts
        assert {"double_stream_blocks.0.block.attn1.to_q", "double_stream_blocks.0.block.attn1.to_q_t",
                "double_stream_blocks.0.block.ff_i.experts.1.w2", "single_stream_blocks.0.block.attn1.to_out",
                "single_stream_blocks.0.block.ff_i.shared_experts.w3"} <= names
        assert all(layer.key.startswith("lycoris_") for layer in adapter)
    else:
        assert "transformer_blocks.1.attn.to_add_out" in names
        assert all(layer.key.startswith("lycoris_transformer_blocks_") for layer in adapter)
    assert any(not torch.equal(g, torch.zeros_like(g)) for layer in adapter for g in layer.blocks)

    with pytest.raises(OFTError, match="sd-scripts has no OFT network for"):
        write_adapter(adapter, str(tmp_path / "k.safetensors"), "kohya")
    path = write_adapter(adapter, str(tmp_path / f"{family}.safetensors"), "lycoris")
    reread = load_adapter(path)
    assert {layer.key for layer in reread} == {layer.key for layer in adapter}

    assert_loaded_back_patches_as_trained(model, new_model, adapter, tmp_path / f"{family}.safetensors", before,
                                          min_changed=16)


def assert_loaded_back_patches_as_trained(model, new_model, adapter, path, before: dict, min_changed: int):
    """The LyCORIS file at `path`, loaded through OFTLoader onto `model`, patches exactly what the trainer node's
    output model `new_model` patches (every layer applied; at least `min_changed` weights changed from `before`)."""
    import folder_paths
    from comfyui_oft.nodes import files, oft_nodes

    files.register_folder()
    folder_paths.add_model_folder_path("oft", str(path.parent))
    out = oft_nodes.OFTLoader.execute(model=model, adapter_name=path.name, strength=1.0, strength_mode="kohya")
    assert f"{len(adapter)} of {len(adapter)} adapter layers applied" in out.ui.value
    got, want = {}, {}
    for patcher, dest in ((out.result[0], got), (new_model, want)):
        patcher.patch_model()
        try:
            dest.update({k: v.detach().clone() for k, v in patcher.model.state_dict().items()})
        finally:
            patcher.unpatch_model()
    assert len([k for k in want if not torch.equal(want[k], before[k])]) >= min_changed
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=0, atol=1e-6 * float(want[k].abs().max())), k


@pytest.mark.parametrize("family", ["lumina2", pytest.param("zimage", marks=pytest.mark.newer_comfyui)])
def test_lumina2_and_z_image_train_through_the_node(mods, family, tmp_path):
    """Lumina Image 2.0 and Z-Image (NextDiT; Z-Image only in newer ComfyUI): all-linear through the node under
    inference mode, the base untouched, LyCORIS written with the names ComfyUI's key map has, and that file loaded
    back through OFTLoader patches exactly what the node's output model patches. Names: Z-Image's diffusers names
    (`lycoris_`, fused qkv as to_q / to_k / to_v) where ComfyUI maps them (0.8), else ComfyUI's own paths under
    `lora_unet_` (0.3.64). On 0.8 Lumina 2.0 gets Z-Image's map, which cannot name its fused qkv (fewer kv heads)
    or its adaLN_modulation.1: the node says those are not trained."""
    import comfy.supported_models
    from comfyui_oft.oft_core.formats import write_adapter
    from comfyui_oft.oft_core.train import select_targets

    if family == "zimage" and not hasattr(comfy.supported_models, "ZImage"):
        pytest.skip("this ComfyUI has no Z-Image (0.8 has)")
    model = comfy_models.dit_tiny(family)
    dm = model.model.diffusion_model
    lay = mods.families.layout(model, select_targets(dm, "all-linear", "generic"))
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    new_model, adapter, loss, report = train_node(mods, model, family, num_blocks=32)
    assert all(torch.equal(v, before[k]) for k, v in model.model.state_dict().items())
    assert all(torch.isfinite(torch.tensor(loss["loss"])))
    names = {layer.name for layer in adapter}
    if lay.prefix == "lora_unet_":  # no diffusers map: ComfyUI's paths, every selected layer
        assert not lay.left_out and "not trained" not in report
        assert {"layers.0.attention.qkv", "noise_refiner.0.feed_forward.w2", "context_refiner.0.attention.out"} <= \
            names and all(layer.key.startswith("lora_unet_") for layer in adapter)
    elif family == "zimage":
        assert not lay.left_out and "not trained" not in report
        assert {f"layers.1.attention.to_{x}" for x in "qkv"} | {"layers.1.attention.to_out.0"} <= names
        assert all(layer.key.startswith("lycoris_") for layer in adapter)
    else:  # Lumina 2.0 under Z-Image's map
        assert lay.left_out and all(p.endswith(("attention.qkv", "adaLN_modulation.1")) for p in lay.left_out)
        assert f"{len(lay.left_out)} selected layers not trained" in report and lay.left_out[0] in report, report
    write_adapter(adapter, str(tmp_path / f"{family}.safetensors"), "lycoris")
    assert_loaded_back_patches_as_trained(model, new_model, adapter, tmp_path / f"{family}.safetensors", before,
                                          min_changed=10)


def _permuted_and_sliced_sd3_file(tmp_path, g: torch.Generator):
    """A LyCORIS file for SD3 with diffusers names, read back: `norm_out.linear` (rows permuted in ComfyUI) and
    `transformer_blocks.1.attn.to_k` (a row slice of the fused qkv)."""
    from comfyui_oft.oft_core import load_adapter
    from safetensors.torch import save_file

    save_file({"lycoris_norm_out_linear.oft_blocks": torch.randn(16, 16, 16, generator=g) * 0.1,
               "lycoris_norm_out_linear.alpha": torch.tensor(0.0),
               "lycoris_transformer_blocks_1_attn_to_k.oft_blocks": torch.randn(16, 8, 8, generator=g) * 0.1,
               "lycoris_transformer_blocks_1_attn_to_k.alpha": torch.tensor(0.0)}, str(tmp_path / "a.safetensors"))
    return load_adapter(str(tmp_path / "a.safetensors"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_permuted_and_sliced_layers_full_load_and_low_vram(mods, tmp_path, dtype):
    """A LyCORIS file with diffusers names on ComfyUI's SD3: `norm_out.linear` (scale/shift halves swapped in ComfyUI:
    rotated in the file's row order, Target.perm) and `attn.to_k` (a row slice of the fused qkv). Full load equals
    the rotation computed by hand on the diffusers-ordered weight; the low-VRAM path (every forward, in the layer's
    dtype) equals the full load up to that dtype's rounding."""
    import comfy.ops
    import comfy.utils
    from comfyui_oft.oft_core import rotate_weight

    g = torch.Generator().manual_seed(3)
    adapter = _permuted_and_sliced_sd3_file(tmp_path, g)
    base = comfy_models.dit_tiny("sd3", dtype=dtype)
    model, _, text = mods.patch.apply_oft(base, None, adapter, 1.0)
    assert "2 of 2 adapter layers applied" in text
    final = "diffusion_model.final_layer.adaLN_modulation.1.weight"
    qkv = "diffusion_model.joint_blocks.1.x_block.attn.qkv.weight"
    sd = base.model.state_dict()
    w = sd[final].float()
    swap = torch.cat([w[128:], w[:128]])  # diffusers' order = ComfyUI's with the halves swapped back
    r = rotate_weight(adapter.layers[("unet", "norm_out_linear")], swap, 1.0)
    want_final = torch.cat([r[128:], r[:128]])
    want_qkv = sd[qkv].float().clone()
    want_qkv[128:256] = rotate_weight(adapter.layers[("unet", "transformer_blocks_1_attn_to_k")],
                                      want_qkv[128:256], 1.0)
    model.patch_model()
    try:
        full = {k: comfy.utils.get_attr(model.model, k).detach().clone() for k in (final, qkv)}
    finally:
        model.unpatch_model()
    tol = {torch.float32: 1e-6, torch.bfloat16: 2.0**-7}[dtype]
    for k, want in ((final, want_final), (qkv, want_qkv)):
        assert float((full[k].float() - want).abs().max() / want.abs().max()) <= tol, k
    assert not torch.equal(full[final], sd[final])
    model.patch_model(lowvram_model_memory=1)  # every module offloaded: the patches run in cast_bias_weight
    try:
        for k in (final, qkv):
            module = comfy.utils.get_attr(model.model, k.rsplit(".", 1)[0])
            assert any(type(f).__name__ == "LowVramPatch" for f in module.weight_function), k
            w_low, _ = comfy.ops.cast_bias_weight(module, torch.zeros(1, 1, dtype=dtype))
            assert w_low.dtype == dtype
            assert float((w_low.float() - full[k].float()).abs().max() / full[k].float().abs().max()) <= tol, k
    finally:
        model.unpatch_model()
    assert all(torch.equal(v, sd[k]) for k, v in base.model.state_dict().items())


def test_permuted_and_sliced_layers_in_bypass_mode_equal_the_merge(mods, tmp_path):
    """The same SD3 file in bypass mode: the hooked `final_layer.adaLN_modulation.1` (rows permuted) and fused qkv
    (a row slice) give the forward of the weights the merge path computes; the base weights are never written."""
    import comfy.model_management
    import comfy.utils
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(3)
    adapter = _permuted_and_sliced_sd3_file(tmp_path, g)
    base = comfy_models.dit_tiny("sd3", dtype=torch.float32)
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    merged, _, _ = mods.patch.apply_oft(base, None, adapter, 0.8)
    bypass, _, text = mods.patch.apply_oft(base, None, adapter, 0.8, apply_mode="bypass")
    assert "2 of 2 adapter layers applied" in text
    keys = ("diffusion_model.final_layer.adaLN_modulation.1", "diffusion_model.joint_blocks.1.x_block.attn.qkv")
    merged.patch_model()
    try:
        want = {k: comfy.utils.get_attr(merged.model, k + ".weight").detach().clone() for k in keys}
    finally:
        merged.unpatch_model()
    comfy.model_management.load_models_gpu([bypass])
    try:
        for k in keys:
            module = comfy.utils.get_attr(bypass.model, k)
            x = torch.randn(3, module.weight.shape[1], generator=g)
            got = module(x)
            ref = F.linear(x, want[k], module.bias)
            assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-6, k
            assert not torch.allclose(got, F.linear(x, module.weight, module.bias)), k
    finally:
        bypass.detach()
    assert all(torch.equal(v, before[k]) for k, v in base.model.state_dict().items())


def test_inspect_on_sd3_counts_the_layers_the_loader_applies(mods, tmp_path):
    """OFT Inspect with a model matches through the same key map as the loader (ComfyUI's, fused slices)."""
    from comfyui_oft.nodes import oft_nodes
    from comfyui_oft.oft_core import load_adapter
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(4)
    save_file({f"lycoris_transformer_blocks_0_attn_to_{x}.oft_blocks": torch.randn(16, 8, 8, generator=g) * 0.1
               for x in "qkv"}, str(tmp_path / "s.safetensors"))
    adapter = load_adapter(str(tmp_path / "s.safetensors"))
    text = oft_nodes.inspect_text(adapter, comfy_models.dit_tiny("sd3"))
    assert "on this SD3 model: 3 of 3 diffusion-model layers match; 3 land on slices of fused weights" in text


def test_a_family_without_a_kohya_network_checkpoints_as_lycoris_and_its_blends_still_refuse_kohya(mods, tmp_path,
                                                                                                  monkeypatch):
    """SD3 (no sd-scripts OFT network): the node's checkpoints are LyCORIS files (kohya would stop the run at the
    first one) that load with the adapter's layers; an OFT Blend / Merge of such adapters still refuses kohya."""
    import folder_paths
    from comfyui_oft.oft_core import OFTError, load_adapter
    from comfyui_oft.oft_core.combine import blend, merge
    from comfyui_oft.oft_core.formats import write_adapter

    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path))
    model = comfy_models.dit_tiny("sd3")
    _, adapter, _, report = train_node(mods, model, "sd3", steps=2, num_blocks=32, save_every=1,
                                       checkpoint_prefix="ck")
    files = sorted(tmp_path.glob("ck_*.safetensors"))
    assert [f.name for f in files] == ["ck_00001_step000001.safetensors", "ck_00002_step000002.safetensors"]
    for f in files:
        assert str(f) in str(report)
        saved = load_adapter(f)
        assert saved.format == "lycoris_diag_oft" and {la.key for la in saved} == {la.key for la in adapter}
    for combined in (blend(adapter, adapter, 0.5), merge([(adapter, 1.0), (adapter, 2.0)], "average"),
                     merge([(adapter, 1.0), (adapter, 1.0)], "compose")):
        with pytest.raises(OFTError, match="sd-scripts has no OFT network for"):
            write_adapter(combined, str(tmp_path / "k.safetensors"), "kohya")


def test_a_block_layout_lycoris_cannot_hold_is_refused_before_training(mods, monkeypatch):
    """For a family saved as LyCORIS only, num_blocks giving blocks larger than their count (LyCORIS derives the
    layout from the block size alone) stops the node before any step, saying to raise num_blocks."""
    from comfyui_oft.oft_core import OFTError

    runs = []
    monkeypatch.setattr(mods.tn, "run_training", lambda *a, **k: runs.append(1))
    with pytest.raises(OFTError, match=r"num_blocks 4: .*can only be saved as LyCORIS.*train with ≥ \d+ blocks"):
        train_node(mods, comfy_models.dit_tiny("sd3"), "sd3", num_blocks=4)
    assert runs == []
