"""names.py: adapter layer names -> base weights, checked against the reference fixtures and hand-derived names.

Expected LDM names are written out here from the architectures (not computed by the code under test); when a ComfyUI
source tree is present, its real models' keys and its own name tables are a second, independent oracle.
"""

import json
import re

import comfy_models
import pytest
from oracle import FIXTURES
from safetensors import safe_open

from oft_core.names import Target, build_key_map

LDM = "model.diffusion_model."
KOHYA = FIXTURES / "kohya"


def header_shapes(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def layer_names(path, prefix: str) -> list[str]:
    """Adapter layer names as a reader hands them over: file prefix and tensor suffix stripped."""
    names = {k.split(".", 1)[0] for k in header_shapes(path)}
    assert names and all(n.startswith(prefix) for n in names)
    return sorted(n[len(prefix):] for n in names)


def weights_and_biases(modules, prefix="", shape=(4, 4)) -> dict:
    return {f"{prefix}{m}.{leaf}": shape for m in modules for leaf in ("weight", "bias")}


# --- SD1.5 UNet LDM module names, written out from the architecture ----------------------------------------------
# channel_mult (1, 2, 4, 4), 2 res blocks per level, one transformer per attention, attention on the 3 outer levels.
RES = ("in_layers.0", "in_layers.2", "emb_layers.1", "out_layers.0", "out_layers.3")
ATTN_LINEARS = tuple(f"{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0"))
TRANSFORMER = ("norm", "proj_in", "proj_out") + tuple(
    f"transformer_blocks.0.{m}" for m in ATTN_LINEARS + ("ff.net.0.proj", "ff.net.2", "norm1", "norm2", "norm3")
)


def sd15_ldm_modules() -> list[str]:
    mods = ["time_embed.0", "time_embed.2", "input_blocks.0.0", "out.0", "out.2"]
    for n in (1, 2, 4, 5, 7, 8, 10, 11):  # input resnets; 3, 6, 9 are the down-samplers
        mods += [f"input_blocks.{n}.0.{r}" for r in RES + (("skip_connection",) if n in (4, 7) else ())]
        if n <= 8:
            mods += [f"input_blocks.{n}.1.{t}" for t in TRANSFORMER]
    mods += [f"input_blocks.{n}.0.op" for n in (3, 6, 9)]
    mods += [f"middle_block.{n}.{r}" for n in (0, 2) for r in RES] + [f"middle_block.1.{t}" for t in TRANSFORMER]
    for n in range(12):  # output blocks: 0-2 deepest level (no attention), 3-11 with attention
        mods += [f"output_blocks.{n}.0.{r}" for r in RES + ("skip_connection",)]
        if n >= 3:
            mods += [f"output_blocks.{n}.1.{t}" for t in TRANSFORMER]
    mods += ["output_blocks.2.1.conv", "output_blocks.5.2.conv", "output_blocks.8.2.conv"]  # up-samplers
    return mods


SD15_MODULES = sd15_ldm_modules()


def sd15_map(prefix=LDM):
    return build_key_map(weights_and_biases(SD15_MODULES, prefix))


def test_sd15_module_list_is_the_real_architecture():
    # 16 attention modules x 8 attention Linears = the 128 layers of the kohya SD1.5 file; 686 weights + biases.
    attention_linears = [m for m in SD15_MODULES if re.search(r"attn[12]\.(to_[qkv]|to_out\.0)$", m)]
    assert len(attention_linears) == 128
    assert len(set(SD15_MODULES)) == len(SD15_MODULES)


# --- 1. the 9 modules of the kohya expected file, with their recorded ldm_key ------------------------------------
def kohya_expected_modules() -> dict:
    with safe_open(str(KOHYA / "sd15_oft_attn_dim8_bf16_expected.safetensors"), "pt") as f:
        return json.loads(f.metadata()["modules"])


def test_kohya_expected_modules_on_a_partial_ldm_state_dict():
    modules = kohya_expected_modules()
    assert len(modules) == 9
    originals = header_shapes(KOHYA / "sd15_oft_attn_dim8_bf16_expected.safetensors")
    shapes = {LDM + info["ldm_key"]: originals[f"original/{info['module_path']}.weight"] for info in modules.values()}
    assert shapes[LDM + "middle_block.1.transformer_blocks.0.attn2.to_k.weight"] == (1280, 768)
    km = build_key_map(shapes)
    assert km.architecture == "sd_unet_ldm"
    assert km.layers_per_block == 2  # no sampler in these keys: the SD1/SD2 standard layout
    for oft_name, info in modules.items():
        assert km.lookup(oft_name[len("oft_unet_"):]) == Target(LDM + info["ldm_key"]), oft_name
        assert km.lookup(info["module_path"]) == Target(LDM + info["ldm_key"]), info["module_path"]


@pytest.mark.parametrize("prefix", [LDM, "diffusion_model.", ""])
def test_kohya_expected_modules_on_the_full_sd15_unet(prefix):
    km = sd15_map(prefix)
    assert (km.architecture, km.layers_per_block) == ("sd_unet_ldm", 2)
    assert km.ambiguous() == set()
    for oft_name, info in kohya_expected_modules().items():
        assert km.lookup(oft_name[len("oft_unet_"):]) == Target(prefix + info["ldm_key"])


# --- 2. all 128 layers of the kohya SD1.5 file ---------------------------------------------------------------------
SD15_LAYERS = layer_names(KOHYA / "sd15_oft_attn_dim8_bf16.safetensors", "oft_unet_")
PLAUSIBLE = re.compile(
    r"model\.diffusion_model\.(input_blocks\.\d+\.1|middle_block\.1|output_blocks\.\d+\.1)"
    r"\.transformer_blocks\.0\.attn[12]\.(to_q|to_k|to_v|to_out\.0)\.weight"
)
HAND_DERIVED = {  # diffusers attention -> LDM block, by counting blocks in the SD1.5 layout by hand
    "down_blocks_0_attentions_0": "input_blocks.1.1", "down_blocks_0_attentions_1": "input_blocks.2.1",
    "down_blocks_1_attentions_0": "input_blocks.4.1", "down_blocks_2_attentions_1": "input_blocks.8.1",
    "mid_block_attentions_0": "middle_block.1",
    "up_blocks_1_attentions_0": "output_blocks.3.1", "up_blocks_2_attentions_1": "output_blocks.7.1",
    "up_blocks_3_attentions_2": "output_blocks.11.1",
}


@pytest.mark.parametrize("base", ["full", "attention_only"])
def test_all_128_kohya_sd15_layers_map_to_distinct_attention_weights(base):
    modules = SD15_MODULES if base == "full" else [m for m in SD15_MODULES if "transformer_blocks" in m]
    km = build_key_map(weights_and_biases(modules, LDM))
    assert len(SD15_LAYERS) == 128
    targets = {name: km.lookup(name) for name in SD15_LAYERS}
    assert all(t is not None and t.offset is None and PLAUSIBLE.fullmatch(t.key) for t in targets.values()), targets
    assert len({t.key for t in targets.values()}) == 128
    for name, t in targets.items():  # the layer inside the transformer block keeps its name (attn2_to_out_0 ...)
        inner = t.key.split(".transformer_blocks.0.")[1]
        assert inner.replace(".", "_") == name.split("_transformer_blocks_0_")[1] + "_weight"
    for block, ldm in HAND_DERIVED.items():
        for linear in ATTN_LINEARS:
            name = f"{block}_transformer_blocks_0_{linear.replace('.', '_')}"
            assert targets[name] == Target(f"{LDM}{ldm}.transformer_blocks.0.{linear}.weight")


def test_sd15_resnets_samplers_and_embeddings_hand_derived():
    km = sd15_map()
    expected = {
        "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
        "time_embedding.linear_2": "time_embed.2",
        "down_blocks.0.resnets.1.conv1": "input_blocks.2.0.in_layers.2",
        "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
        "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
        "down_blocks.2.downsamplers.0.conv": "input_blocks.9.0.op",
        "down_blocks.3.resnets.1.time_emb_proj": "input_blocks.11.0.emb_layers.1",
        "mid_block.resnets.1.time_emb_proj": "middle_block.2.emb_layers.1",
        "mid_block.resnets.0.norm1": "middle_block.0.in_layers.0",
        "up_blocks.0.upsamplers.0.conv": "output_blocks.2.1.conv",
        "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
        "up_blocks.2.upsamplers.0.conv": "output_blocks.8.2.conv",
        "up_blocks.3.resnets.2.norm2": "output_blocks.11.0.out_layers.0",
        "up_blocks.2.resnets.0.conv2": "output_blocks.6.0.out_layers.3",
        "up_blocks.1.attentions.2.proj_in": "output_blocks.5.1.proj_in",
    }
    for diffusers, ldm in expected.items():
        want = Target(f"{LDM}{ldm}.weight")
        assert km.lookup(diffusers) == want, diffusers
        assert km.lookup(diffusers.replace(".", "_")) == want, diffusers
    # LDM names (kohya SDXL style) are matched as they are
    assert km.lookup("input_blocks_4_1_transformer_blocks_0_attn1_to_q") == Target(
        LDM + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight")
    # slots that do not exist in this layout resolve to nothing
    for missing in ("up_blocks.3.upsamplers.0.conv", "down_blocks.3.downsamplers.0.conv",
                    "down_blocks.3.attentions.0.proj_in", "up_blocks.0.attentions.0.proj_in",
                    "down_blocks.0.resnets.2.conv1"):
        assert km.lookup(missing) is None, missing


# --- ComfyUI as a second, independent oracle: its real models' keys and its own name tables ---------------------
# (the `comfy` fixture skips these without a ComfyUI source tree; see conftest.py)
def comfy_shapes(patcher) -> dict:
    return {k: tuple(v.shape) for k, v in patcher.model.state_dict().items()}


@pytest.mark.parametrize("model", ["sd15", "sd15_tiny"])
def test_diffusers_names_agree_with_comfyui_on_its_real_unets(comfy, model):
    patcher = getattr(comfy_models, model)()
    shapes = comfy_shapes(patcher)
    km = build_key_map(shapes)
    config = patcher.model.model_config.unet_config
    assert (km.architecture, km.layers_per_block) == ("sd_unet_ldm", config["num_res_blocks"][0])
    # diffusers key -> LDM key (its table also names modules a model may lack, e.g. every resnet's skip_connection)
    table = comfy.utils.unet_to_diffusers(config)
    weights = {d: ldm for d, ldm in table.items() if d.endswith(".weight") and "diffusion_model." + ldm in shapes}
    # every weight of the model is in the table, under one diffusers name or two (label_emb: add_/class_embedding)
    assert {"diffusion_model." + ldm for ldm in weights.values()} == {k for k in shapes if k.endswith(".weight")}
    for diffusers, ldm in weights.items():
        path = diffusers[: -len(".weight")]
        assert km.lookup(path) == Target("diffusion_model." + ldm), diffusers
        assert km.lookup(path.replace(".", "_")) == Target("diffusion_model." + ldm), diffusers
    assert km.ambiguous() == set()
    if model == "sd15":  # the full LDM key list of a real SD1.5 UNet, and the kohya file's 128 layers on it
        assert {k[len("diffusion_model."):] for k in shapes if k.endswith(".weight")} == {
            m + ".weight" for m in SD15_MODULES}
        targets = {km.lookup(name) for name in SD15_LAYERS}
        assert len(targets) == 128 and all(t.key in shapes for t in targets)


def test_diffusers_names_agree_with_comfyui_on_sdxl_names(comfy):
    config = dict(num_res_blocks=[2] * 3, channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10],
                  transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], transformer_depth_middle=10)
    table = comfy.utils.unet_to_diffusers(config)
    km = build_key_map({LDM + ldm: (4, 4) for ldm in table.values()})
    assert km.layers_per_block == 2
    for diffusers, ldm in table.items():
        if diffusers.endswith(".weight"):
            assert km.lookup(diffusers[: -len(".weight")].replace(".", "_")) == Target(LDM + ldm), diffusers
    # SDXL's add_embedding is label_emb in LDM names
    assert km.lookup("add_embedding_linear_2") == Target(LDM + "label_emb.0.2.weight")


def test_diffusers_flux_names_agree_with_comfyui(comfy):
    shapes = comfy_shapes(comfy_models.flux_tiny())
    km = build_key_map(shapes)
    assert km.architecture == "flux"
    table = comfy.utils.flux_to_diffusers(comfy_models.FLUX_TINY_CONFIG, output_prefix="diffusion_model.")
    checked = 0
    for diffusers, target in table.items():
        key, offset = (target, None) if isinstance(target, str) else target[:2]
        if isinstance(target, tuple) and len(target) == 3:
            assert "norm_out" in diffusers  # halves swapped: a function, not a slice, so we leave it unmatched
            assert km.lookup(diffusers[: -len(".weight")]) is None
            continue
        if not diffusers.endswith(".weight") or not key.endswith(".weight") or key not in shapes:
            continue  # biases, RMSNorm `.scale`s (not weights), modules this model lacks (controlnet inputs)
        path = diffusers[: -len(".weight")]
        assert km.lookup(path) == Target(key, offset), diffusers
        assert km.lookup(path.replace(".", "_")) == Target(key, offset), diffusers
        checked += 1
    assert checked >= 2 * 11 + 2 * 6 + 5


# --- 3. FLUX --------------------------------------------------------------------------------------------------------
FLUX_BASE = header_shapes(KOHYA / "flux_tiny_base.safetensors")


@pytest.mark.parametrize("prefix", ["", LDM, "diffusion_model."])
def test_kohya_flux_layers_map_to_their_bfl_weights(prefix):
    km = build_key_map({prefix + k: s for k, s in FLUX_BASE.items()})
    assert km.architecture == "flux"
    layers = layer_names(KOHYA / "flux_tiny_oft_attn_dim4.safetensors", "oft_unet_")
    with safe_open(str(KOHYA / "flux_tiny_oft_attn_dim4_expected.safetensors"), "pt") as f:
        modules = json.loads(f.metadata()["modules"])
    assert sorted("oft_unet_" + name for name in layers) == sorted(modules)
    for name in layers:
        want = Target(prefix + modules["oft_unet_" + name]["module_path"] + ".weight")
        assert km.lookup(name) == want
        assert list(FLUX_BASE[want.key[len(prefix):]]) == modules["oft_unet_" + name]["weight_shape"]
    assert km.lookup("double_blocks_1_txt_attn_qkv") == Target(prefix + "double_blocks.1.txt_attn.qkv.weight")


FLUX_DIFFUSERS = {  # diffusers name -> (BFL weight, row slice); tiny FLUX: hidden 128, mlp 512
    "transformer_blocks.0.attn.to_q": ("double_blocks.0.img_attn.qkv", (0, 0, 128)),
    "transformer_blocks.0.attn.to_k": ("double_blocks.0.img_attn.qkv", (0, 128, 128)),
    "transformer_blocks.1.attn.to_v": ("double_blocks.1.img_attn.qkv", (0, 256, 128)),
    "transformer_blocks.1.attn.add_q_proj": ("double_blocks.1.txt_attn.qkv", (0, 0, 128)),
    "transformer_blocks.0.attn.add_v_proj": ("double_blocks.0.txt_attn.qkv", (0, 256, 128)),
    "transformer_blocks.0.attn.to_out.0": ("double_blocks.0.img_attn.proj", None),
    "transformer_blocks.1.attn.to_add_out": ("double_blocks.1.txt_attn.proj", None),
    "transformer_blocks.0.ff.net.0.proj": ("double_blocks.0.img_mlp.0", None),
    "transformer_blocks.0.ff.net.2": ("double_blocks.0.img_mlp.2", None),
    "transformer_blocks.1.ff_context.net.0.proj": ("double_blocks.1.txt_mlp.0", None),
    "transformer_blocks.1.ff_context.net.2": ("double_blocks.1.txt_mlp.2", None),
    "transformer_blocks.0.norm1.linear": ("double_blocks.0.img_mod.lin", None),
    "transformer_blocks.0.norm1_context.linear": ("double_blocks.0.txt_mod.lin", None),
    "single_transformer_blocks.0.attn.to_q": ("single_blocks.0.linear1", (0, 0, 128)),
    "single_transformer_blocks.1.attn.to_v": ("single_blocks.1.linear1", (0, 256, 128)),
    "single_transformer_blocks.1.proj_mlp": ("single_blocks.1.linear1", (0, 384, 512)),
    "single_transformer_blocks.0.proj_out": ("single_blocks.0.linear2", None),
    "single_transformer_blocks.1.norm.linear": ("single_blocks.1.modulation.lin", None),
    "x_embedder": ("img_in", None),
    "proj_out": ("final_layer.linear", None),
}


@pytest.mark.parametrize("prefix", ["", LDM])
@pytest.mark.parametrize("name", sorted(FLUX_DIFFUSERS))
def test_diffusers_flux_names_map_to_bfl_slices(prefix, name):
    km = build_key_map({prefix + k: s for k, s in FLUX_BASE.items()})
    key, offset = FLUX_DIFFUSERS[name]
    assert km.lookup(name) == Target(f"{prefix}{key}.weight", offset)
    assert km.lookup(name.replace(".", "_")) == Target(f"{prefix}{key}.weight", offset)


def test_flux_slices_tile_the_fused_weights_exactly():
    km = build_key_map(FLUX_BASE)
    for block in (0, 1):
        for fused, names in (
            ("single_blocks.{}.linear1.weight", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),
            ("double_blocks.{}.img_attn.qkv.weight", None), ("double_blocks.{}.txt_attn.qkv.weight", None),
        ):
            key = fused.format(block)
            if names:
                targets = [km.lookup(f"single_transformer_blocks.{block}.{n}") for n in names]
            else:
                qkv = ("to_q", "to_k", "to_v") if ".img_" in key else ("add_q_proj", "add_k_proj", "add_v_proj")
                targets = [km.lookup(f"transformer_blocks.{block}.attn.{n}") for n in qkv]
            assert {t.key for t in targets} == {key}
            rows, end = FLUX_BASE[key][0], 0
            for t in targets:  # consecutive, non-overlapping, ending at the row count of the header
                dim, start, length = t.offset
                assert (dim, start) == (0, end)
                end += length
            assert end == rows
    # diffusers' norm_out halves are swapped relative to BFL: never mapped
    assert km.lookup("norm_out.linear") is None


HUNYUAN_REFINER_BASE = {  # a HunyuanVideo state dict's FLUX-like blocks and its text token refiner (hidden 128)
    **{k: v for k, v in FLUX_BASE.items() if k.startswith(("double_blocks.", "single_blocks."))},
    "txt_in.input_embedder.weight": (128, 64),
    "txt_in.t_embedder.in_layer.weight": (128, 256), "txt_in.t_embedder.out_layer.weight": (128, 128),
    "txt_in.c_embedder.in_layer.weight": (128, 64), "txt_in.c_embedder.out_layer.weight": (128, 128),
    **{f"txt_in.individual_token_refiner.blocks.{n}.{child}.weight": shape for n in (0, 1) for child, shape in (
        ("self_attn.qkv", (384, 128)), ("self_attn.proj", (128, 128)), ("mlp.0", (512, 128)), ("mlp.2", (128, 512)),
        ("adaLN_modulation.1", (256, 128)), ("norm1", (128,)))},
}
HUNYUAN_REFINER_DIFFUSERS = {  # diffusers' HunyuanVideoTokenRefiner name -> (ComfyUI module, row slice)
    "context_embedder.proj_in": ("txt_in.input_embedder", None),
    "context_embedder.time_text_embed.timestep_embedder.linear_1": ("txt_in.t_embedder.in_layer", None),
    "context_embedder.time_text_embed.timestep_embedder.linear_2": ("txt_in.t_embedder.out_layer", None),
    "context_embedder.time_text_embed.text_embedder.linear_1": ("txt_in.c_embedder.in_layer", None),
    "context_embedder.time_text_embed.text_embedder.linear_2": ("txt_in.c_embedder.out_layer", None),
    "context_embedder.token_refiner.refiner_blocks.0.attn.to_q":
        ("txt_in.individual_token_refiner.blocks.0.self_attn.qkv", (0, 0, 128)),
    "context_embedder.token_refiner.refiner_blocks.1.attn.to_k":
        ("txt_in.individual_token_refiner.blocks.1.self_attn.qkv", (0, 128, 128)),
    "context_embedder.token_refiner.refiner_blocks.0.attn.to_v":
        ("txt_in.individual_token_refiner.blocks.0.self_attn.qkv", (0, 256, 128)),
    "context_embedder.token_refiner.refiner_blocks.1.attn.to_out.0":
        ("txt_in.individual_token_refiner.blocks.1.self_attn.proj", None),
    "context_embedder.token_refiner.refiner_blocks.0.ff.net.0.proj":
        ("txt_in.individual_token_refiner.blocks.0.mlp.0", None),
    "context_embedder.token_refiner.refiner_blocks.1.ff.net.2":
        ("txt_in.individual_token_refiner.blocks.1.mlp.2", None),
    "context_embedder.token_refiner.refiner_blocks.0.norm_out.linear":
        ("txt_in.individual_token_refiner.blocks.0.adaLN_modulation.1", None),
}


@pytest.mark.parametrize("prefix", ["", LDM])
@pytest.mark.parametrize("name", sorted(HUNYUAN_REFINER_DIFFUSERS))
def test_diffusers_hunyuan_video_refiner_names_map_to_comfyuis_txt_in(prefix, name):
    """HunyuanVideo's text token refiner (ComfyUI's `txt_in`, diffusers' `context_embedder`), which ComfyUI's key
    map names only in the original spelling: every diffusers name, dotted and underscored, lands on its weight, the
    refiner's q / k / v on their thirds of the fused `self_attn.qkv`."""
    km = build_key_map({prefix + k: s for k, s in HUNYUAN_REFINER_BASE.items()})
    key, offset = HUNYUAN_REFINER_DIFFUSERS[name]
    assert km.lookup(name) == Target(f"{prefix}{key}.weight", offset)
    assert km.lookup(name.replace(".", "_")) == Target(f"{prefix}{key}.weight", offset)


def test_a_refiner_qkv_that_is_not_three_hidden_widths_gets_no_diffusers_names():
    """A fused refiner `self_attn.qkv` whose rows are not 3 × its input width cannot be cut into q / k / v by shape:
    its diffusers names stay unmapped (reported not found), never a guessed slice."""
    base = dict(HUNYUAN_REFINER_BASE)
    base["txt_in.individual_token_refiner.blocks.0.self_attn.qkv.weight"] = (320, 128)
    km = build_key_map(base)
    assert km.lookup("context_embedder.token_refiner.refiner_blocks.0.attn.to_q") is None
    assert km.lookup("context_embedder.token_refiner.refiner_blocks.1.attn.to_q") == Target(
        "txt_in.individual_token_refiner.blocks.1.self_attn.qkv.weight", (0, 0, 128))

# --- 4. diffusers UNet base, and its LDM-converted key set -----------------------------------------------------------
PEFT_DIR = FIXTURES / "peft"
TINY_BASE = header_shapes(PEFT_DIR / "base_unet.safetensors")
PEFT_PATHS = sorted(k[len("base_model.model."): -len(".oft_R.weight")]
                    for k in header_shapes(PEFT_DIR / "peft_oft_cayley_bs8" / "adapter_model.safetensors"))
LYCORIS_NAMES = layer_names(FIXTURES / "lycoris" / "lycoris_diag_oft_dim8" / "lycoris_diag_oft_dim8.safetensors",
                            "lycoris_")


def test_peft_and_lycoris_names_on_a_diffusers_unet():
    km = build_key_map(TINY_BASE)
    assert km.architecture == "sd_unet_diffusers"
    assert len(PEFT_PATHS) == 56
    assert sorted(p.replace(".", "_") for p in PEFT_PATHS) == LYCORIS_NAMES
    for path in PEFT_PATHS:
        assert path + ".weight" in TINY_BASE
        assert km.lookup(path) == Target(path + ".weight")
        assert km.lookup(path.replace(".", "_")) == Target(path + ".weight")
    assert km.lookup("up_blocks_1_attentions_1_transformer_blocks_0_attn2_to_out_0") == Target(
        "up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_out.0.weight")


# The tiny UNet (2 levels, layers_per_block 1, attention everywhere) in LDM names, block by block, by hand.
TINY_LDM_BLOCKS = {
    "conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "conv_norm_out": "out.0", "conv_out": "out.2",
    "down_blocks.0.resnets.0": "input_blocks.1.0", "down_blocks.0.attentions.0": "input_blocks.1.1",
    "down_blocks.0.downsamplers.0.conv": "input_blocks.2.0.op",
    "down_blocks.1.resnets.0": "input_blocks.3.0", "down_blocks.1.attentions.0": "input_blocks.3.1",
    "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
    "mid_block.resnets.1": "middle_block.2",
    "up_blocks.0.resnets.0": "output_blocks.0.0", "up_blocks.0.attentions.0": "output_blocks.0.1",
    "up_blocks.0.resnets.1": "output_blocks.1.0", "up_blocks.0.attentions.1": "output_blocks.1.1",
    "up_blocks.0.upsamplers.0.conv": "output_blocks.1.2.conv",
    "up_blocks.1.resnets.0": "output_blocks.2.0", "up_blocks.1.attentions.0": "output_blocks.2.1",
    "up_blocks.1.resnets.1": "output_blocks.3.0", "up_blocks.1.attentions.1": "output_blocks.3.1",
}
RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                 "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def tiny_key_to_ldm(key: str) -> str:
    module, leaf = key.rsplit(".", 1)
    for diffusers, ldm in TINY_LDM_BLOCKS.items():
        if module == diffusers:
            return f"{ldm}.{leaf}"
        if module.startswith(diffusers + "."):
            rest = module[len(diffusers) + 1:]
            return f"{ldm}.{RESNET_TO_LDM[rest] if '.resnets.' in diffusers else rest}.{leaf}"
    raise KeyError(key)


@pytest.mark.parametrize("prefix", [LDM, "diffusion_model."])
def test_diffusers_names_on_the_ldm_converted_tiny_unet(prefix):
    to_ldm = {k: prefix + tiny_key_to_ldm(k) for k in TINY_BASE}
    assert len(set(to_ldm.values())) == len(TINY_BASE)
    km = build_key_map({to_ldm[k]: s for k, s in TINY_BASE.items()})
    assert (km.architecture, km.layers_per_block) == ("sd_unet_ldm", 1)  # inferred from input 2 = down-sampler
    assert to_ldm["up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_v.weight"] == (
        prefix + "output_blocks.3.1.transformer_blocks.0.attn2.to_v.weight")
    assert to_ldm["down_blocks.1.resnets.0.conv_shortcut.weight"] == prefix + "input_blocks.3.0.skip_connection.weight"
    for path in PEFT_PATHS:  # the 56 adapted layers, dotted (PEFT) and underscored (LyCORIS)
        assert km.lookup(path) == Target(to_ldm[path + ".weight"])
        assert km.lookup(path.replace(".", "_")) == Target(to_ldm[path + ".weight"])
    for key in TINY_BASE:  # and every other weight of the model
        if key.endswith(".weight"):
            assert km.lookup(key[: -len(".weight")].replace(".", "_")) == Target(to_ldm[key]), key


def test_layers_per_block_is_not_guessed_from_keys_that_contradict_the_standard_layout():
    # An attention at input block 3 is impossible with L = 2 (block 3 is its down-sampler) and no sampler tells L.
    km = build_key_map({LDM + "input_blocks.3.1.transformer_blocks.0.attn1.to_q.weight": (8, 8)})
    assert km.layers_per_block is None
    assert km.lookup("down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q") is None
    assert km.lookup("input_blocks_3_1_transformer_blocks_0_attn1_to_q") == Target(
        LDM + "input_blocks.3.1.transformer_blocks.0.attn1.to_q.weight")
    # a down-sampler at input 4 alone does not settle it either (L = 1 or 3 both fit) ...
    km = build_key_map({LDM + "input_blocks.3.1.transformer_blocks.0.attn1.to_q.weight": (8, 8),
                        LDM + "input_blocks.4.0.op.weight": (8, 8, 3, 3)})
    assert km.layers_per_block is None
    # ... but a whole first level does: resnets at inputs 1, 2, 3, then the down-sampler at 4 (L = 3)
    km = build_key_map({LDM + "input_blocks.3.1.transformer_blocks.0.attn1.to_q.weight": (8, 8),
                        LDM + "input_blocks.4.0.op.weight": (8, 8, 3, 3)}
                       | {f"{LDM}input_blocks.{n}.0.in_layers.2.weight": (8, 8, 3, 3) for n in (1, 2, 3, 5)})
    assert km.layers_per_block == 3
    assert km.lookup("down_blocks.1.resnets.0.conv1") == Target(LDM + "input_blocks.5.0.in_layers.2.weight")
    assert km.lookup("down_blocks_0_attentions_2_transformer_blocks_0_attn1_to_q") == Target(
        LDM + "input_blocks.3.1.transformer_blocks.0.attn1.to_q.weight")
    assert km.lookup("down_blocks.0.downsamplers.0.conv") == Target(LDM + "input_blocks.4.0.op.weight")


# --- 5. text encoders -------------------------------------------------------------------------------------------------
CLIP_LAYERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def clip_keys(prefix: str, layers=2) -> dict:
    mods = [f"text_model.encoder.layers.{i}.{m}" for i in range(layers) for m in CLIP_LAYERS]
    return weights_and_biases(mods + ["text_model.final_layer_norm"], prefix, (8, 8))


def test_sd1_checkpoint_text_encoder():
    te = "cond_stage_model.transformer."
    shapes = {**clip_keys(te), LDM + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (8, 8),
              "first_stage_model.decoder.conv_in.weight": (8, 8, 3, 3)}
    km = build_key_map(shapes)
    assert km.architecture == "sd_unet_ldm"
    want = Target(te + "text_model.encoder.layers.1.self_attn.q_proj.weight")
    assert km.lookup("text_model_encoder_layers_1_self_attn_q_proj", "te") == want
    assert km.lookup("text_model.encoder.layers.1.self_attn.q_proj", "te1") == want
    assert km.lookup("text_model_encoder_layers_0_mlp_fc2", "te") == Target(
        te + "text_model.encoder.layers.0.mlp.fc2.weight")
    assert km.lookup("text_model_encoder_layers_1_self_attn_q_proj", "te2") is None
    assert km.lookup("text_model_encoder_layers_1_self_attn_q_proj", "unet") is None
    assert km.lookup("decoder_conv_in") is None  # the VAE is not the UNet
    assert km.lookup("input_blocks_1_1_transformer_blocks_0_attn1_to_q", "te") is None


def test_comfyui_clip_state_dict_text_encoders():
    km = build_key_map({**clip_keys("clip_l.transformer."), **clip_keys("clip_g.transformer.", 3),
                        "clip_l.logit_scale": (), "clip_g.transformer.text_projection.weight": (8, 8)})
    assert km.architecture == "text_encoder"
    name = "text_model_encoder_layers_1_self_attn_v_proj"
    assert km.lookup(name, "te") == Target("clip_l.transformer.text_model.encoder.layers.1.self_attn.v_proj.weight")
    assert km.lookup(name, "te1") == Target("clip_l.transformer.text_model.encoder.layers.1.self_attn.v_proj.weight")
    assert km.lookup(name, "te2") == Target("clip_g.transformer.text_model.encoder.layers.1.self_attn.v_proj.weight")
    assert km.lookup("text_model_encoder_layers_2_mlp_fc1", "te2") == Target(
        "clip_g.transformer.text_model.encoder.layers.2.mlp.fc1.weight")
    assert km.lookup("text_model_encoder_layers_2_mlp_fc1", "te1") is None  # CLIP-L here has 2 layers
    assert km.lookup(name) is None  # not a UNet name
    assert km.ambiguous() == set()


def test_sdxl_checkpoint_text_encoders():
    shapes = {**clip_keys("conditioner.embedders.0.transformer."),
              # SDXL's te2 in the checkpoint is open_clip-named: no HF name fits it
              "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": (24, 8),
              "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight": (32, 8),
              LDM + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight": (8, 8)}
    km = build_key_map(shapes)
    assert km.lookup("text_model_encoder_layers_0_self_attn_q_proj", "te1") == Target(
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight")
    for name in ("text_model_encoder_layers_0_self_attn_q_proj", "text_model_encoder_layers_0_mlp_fc1"):
        assert km.lookup(name, "te2") is None
    # where the te2 names do match, they are used
    assert km.lookup("transformer_resblocks_0_mlp_c_fc", "te2") == Target(
        "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight")


# --- 6. ambiguity, 7. unknown names --------------------------------------------------------------------------------
def test_names_two_weights_share_are_never_resolved():
    km = build_key_map({"diffusion_model.block_1.proj.weight": (4, 4), "diffusion_model.block.1_proj.weight": (4, 4),
                        "diffusion_model.block.2.proj.weight": (4, 4)})
    assert km.ambiguous() == {"block_1_proj"}
    assert km.lookup("block_1_proj") is None
    assert km.lookup("block_1.proj") == Target("diffusion_model.block_1.proj.weight")  # dotted is exact
    assert km.lookup("block.1_proj") == Target("diffusion_model.block.1_proj.weight")
    assert km.lookup("block_2_proj") == Target("diffusion_model.block.2.proj.weight")


def test_ambiguity_between_a_native_and_a_converted_name():
    # a mixed state dict holding both an LDM weight and a diffusers one that the LDM one converts to
    km = build_key_map(weights_and_biases(SD15_MODULES, LDM)
                       | {LDM + "down_blocks.0.attentions.0.proj_in.weight": (4, 4)})
    assert "down_blocks_0_attentions_0_proj_in" in km.ambiguous()
    assert km.lookup("down_blocks_0_attentions_0_proj_in") is None
    assert km.lookup("down_blocks.0.attentions.0.proj_in") is None


def test_the_same_module_under_two_prefixes_is_ambiguous():
    km = build_key_map({LDM + "input_blocks.1.1.proj_in.weight": (4, 4),
                        "diffusion_model.input_blocks.1.1.proj_in.weight": (4, 4)})
    assert km.ambiguous() == {"input_blocks_1_1_proj_in", "down_blocks_0_attentions_0_proj_in"}
    assert km.lookup("input_blocks.1.1.proj_in") is None
    assert km.lookup("down_blocks_0_attentions_0_proj_in") is None


def test_unknown_names_and_non_weights_return_none():
    km = sd15_map()
    for name in ("", "nonsense", "down_blocks_9_attentions_0_transformer_blocks_0_attn1_to_q",
                 "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",  # a key, not a module
                 "down_blocks.0.attentions.0.transformer_blocks.0.attn1_to_q",  # half-underscored
                 "model_diffusion_model_input_blocks_1_1_proj_in"):  # the prefix is not part of a name
        assert km.lookup(name) is None, name
    assert km.lookup("down_blocks_0_attentions_0_proj_in", "vae") is None
    assert km.lookup("down_blocks_0_attentions_0_proj_in", "te") is None
    flux = build_key_map(FLUX_BASE)
    assert flux.lookup("double_blocks.0.img_attn.norm.key_norm") is None  # `.scale`, not a weight
    assert flux.lookup("double_blocks.0.img_attn.qkv") == Target("double_blocks.0.img_attn.qkv.weight")
    only_bias = build_key_map({"conv_in.bias": (4,)})
    assert only_bias.lookup("conv_in") is None
    assert only_bias.architecture == "unknown"
    assert build_key_map({}).architecture == "unknown"
