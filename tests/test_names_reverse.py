"""names.ldm_to_diffusers: LDM UNet module -> the diffusers module path sd-scripts names SD1.x/SD2.x layers after.

Oracles: the kohya SD1.5 fixture's own metadata (sd-scripts' `module_path` next to ComfyUI's `ldm_key` for each of its
modules), and the forward map `build_key_map` (the reverse must land on the same weight, for every module).
"""

import json

import pytest
from oracle import FIXTURES
from safetensors import safe_open
from test_names import sd15_ldm_modules

from oft_core.names import _ldm_to_diffusers_names, build_key_map

SD15_EXPECTED = FIXTURES / "kohya" / "sd15_oft_attn_dim8_bf16_expected.safetensors"


def fixture_modules() -> dict:
    with safe_open(str(SD15_EXPECTED), "pt") as f:
        return json.loads(f.metadata()["modules"])


def full_sd15_shapes(prefix="diffusion_model.") -> dict:
    return {f"{prefix}{m}.{leaf}": (4, 4) for m in sd15_ldm_modules() for leaf in ("weight", "bias")}


@pytest.mark.parametrize("whole_unet", [False, True], ids=["fixture keys only", "whole SD1.5 UNet"])
def test_fixture_modules_get_sd_scripts_module_paths(whole_unet):
    modules = fixture_modules()
    assert len(modules) == 9
    shapes = full_sd15_shapes() if whole_unet else {
        "model.diffusion_model." + m["ldm_key"]: tuple(m["weight_shape"]) for m in modules.values()}
    names = _ldm_to_diffusers_names(shapes)
    for kohya_key, m in modules.items():
        ldm = m["ldm_key"][: -len(".weight")]
        assert names[ldm] == m["module_path"], ldm
        assert "oft_unet_" + names[ldm].replace(".", "_") == kohya_key


def test_reverse_agrees_with_the_forward_map_on_every_module():
    shapes = full_sd15_shapes()
    names = _ldm_to_diffusers_names(shapes)
    keymap = build_key_map(shapes)
    # every module except the ones diffusers has no name for (none in SD1.5: even the down-sampler ops have one)
    assert set(names) == set(sd15_ldm_modules())
    assert len(set(names.values())) == len(names)
    for ldm, diffusers in names.items():
        for spelling in (diffusers, diffusers.replace(".", "_")):
            target = keymap.lookup(spelling)
            assert target is not None and target.key == f"diffusion_model.{ldm}.weight", (ldm, spelling)
    # a few written out by hand (diffusers' UNet2DConditionModel layout)
    assert names["input_blocks.3.0.op"] == "down_blocks.0.downsamplers.0.conv"
    assert names["input_blocks.4.0.skip_connection"] == "down_blocks.1.resnets.0.conv_shortcut"
    assert names["middle_block.2.out_layers.3"] == "mid_block.resnets.1.conv2"
    assert names["output_blocks.5.2.conv"] == "up_blocks.1.upsamplers.0.conv"
    assert names["output_blocks.11.1.proj_out"] == "up_blocks.3.attentions.2.proj_out"
    assert names["time_embed.0"] == "time_embedding.linear_1"


def test_layers_per_block_1_and_refusals():
    # a tiny UNet with one res block per level: input 1 = res+attn, 2 = down-sampler, 3 = res+attn
    mods = ["input_blocks.0.0", "input_blocks.1.0.in_layers.2", "input_blocks.1.1.proj_in", "input_blocks.2.0.op",
            "input_blocks.3.0.in_layers.2", "input_blocks.3.1.transformer_blocks.0.attn1.to_q",
            "output_blocks.1.2.conv", "output_blocks.3.1.proj_out"]
    names = _ldm_to_diffusers_names([f"{m}.weight" for m in mods])
    assert names["input_blocks.3.1.transformer_blocks.0.attn1.to_q"] == \
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert names["input_blocks.2.0.op"] == "down_blocks.0.downsamplers.0.conv"
    assert names["output_blocks.1.2.conv"] == "up_blocks.0.upsamplers.0.conv"
    assert names["output_blocks.3.1.proj_out"] == "up_blocks.1.attentions.1.proj_out"
    with pytest.raises(ValueError, match="not an LDM UNet"):
        _ldm_to_diffusers_names({"double_blocks.0.img_attn.qkv.weight": (12, 4)})
    with pytest.raises(ValueError, match="layers_per_block"):  # attention of blocks 1 and 3 only: L is not known
        _ldm_to_diffusers_names(["input_blocks.1.1.proj_in.weight", "input_blocks.3.1.proj_in.weight"])
