"""The comfy-free parts of "every family": a host key map handed to build_key_map, generic all-linear by place,
output splits from a host map, export as one layer per split. ComfyUI's own maps: test_families_comfy.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from oft_core import OFTError
from oft_core.names import Target, _external_names, build_key_map
from oft_core.rotation import rotate_weight
from oft_core.train import OFTTrainer, _block_lists, select_targets

QKV = "diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"
PROJ = "diffusion_model.joint_blocks.0.x_block.attn.proj.weight"
SHAPES = {QKV: (24, 8), QKV[:-6] + "bias": (24,), PROJ: (8, 8), "diffusion_model.final.weight": (8, 8)}


def _swap(t):  # ComfyUI's swap_scale_shift
    shift, scale = t.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def _not_a_permutation(t):
    return t * 2


HOST = {  # what comfy.lora.model_lora_keys_unet gives for an SD3 model (shape of its entries)
    "lycoris_transformer_blocks_0_attn_to_q": (QKV, (0, 0, 8)),
    "lycoris_transformer_blocks_0_attn_to_k": (QKV, (0, 8, 8)),
    "transformer.transformer_blocks.0.attn.to_v": (QKV, (0, 16, 8)),
    "transformer.transformer_blocks.0.attn.to_out.0": PROJ,
    "lora_unet_joint_blocks_0_x_block_attn_proj": PROJ,
    "diffusion_model.joint_blocks.0.x_block.attn.qkv.bias": QKV[:-6] + "bias",  # not a weight
    "transformer.norm_out.linear": ("diffusion_model.final.weight", None, _swap),  # rows permuted
    "transformer.scaled": ("diffusion_model.final.weight", None, _not_a_permutation),  # left out
    "transformer.outside": (QKV, (0, 20, 8)),  # slice beyond the weight: left out
    "text_encoders.clip_l.x": "clip_l.x.weight",  # not an adapter name
    "lora_te1_text_model_x": "clip_l.transformer.text_model.x.weight",  # not in these shapes
}


def test_host_key_map_names_fused_slices_in_both_spellings():
    km = build_key_map(SHAPES, external=HOST)
    assert km.lookup("transformer_blocks_0_attn_to_q") == Target(QKV, (0, 0, 8))
    assert km.lookup("transformer_blocks.0.attn.to_k") is None  # only the underscored name was given
    assert km.lookup("transformer_blocks_0_attn_to_k") == Target(QKV, (0, 8, 8))
    assert km.lookup("transformer_blocks.0.attn.to_v") == Target(QKV, (0, 16, 8))
    assert km.lookup("transformer_blocks_0_attn_to_v") == Target(QKV, (0, 16, 8))
    assert km.lookup("transformer_blocks.0.attn.to_out.0") == Target(PROJ)
    assert km.lookup("joint_blocks_0_x_block_attn_proj") == Target(PROJ)
    assert km.lookup("norm_out.linear") == Target("diffusion_model.final.weight", None, (4, 5, 6, 7, 0, 1, 2, 3))
    assert km.lookup("outside") is None and km.lookup("scaled") is None
    assert km.external == 6
    names = {(c, n) for c, n, _ in _external_names(HOST, SHAPES)}
    assert ("te1", "text_model_x") not in names


def test_pack_tables_win_over_a_disagreeing_host_map():
    flux = {"double_blocks.0.img_attn.qkv.weight": (12, 4), "double_blocks.0.img_attn.proj.weight": (4, 4)}
    wrong = {"transformer.transformer_blocks.0.attn.to_q": "double_blocks.0.img_attn.proj.weight",
             "transformer.transformer_blocks.0.attn.to_out.0": "double_blocks.0.img_attn.proj.weight"}
    km = build_key_map(flux, external=wrong)
    assert km.lookup("transformer_blocks.0.attn.to_q") == Target("double_blocks.0.img_attn.qkv.weight", (0, 0, 4))
    assert km.lookup("transformer_blocks.0.attn.to_out.0") == Target("double_blocks.0.img_attn.proj.weight")


def test_wan_diffusers_names_map_onto_original_names():
    shapes = {f"diffusion_model.{k}.weight": (8, 8) for k in (
        "blocks.0.self_attn.q", "blocks.0.cross_attn.o", "blocks.0.ffn.0", "text_embedding.0", "head.head")}
    km = build_key_map(shapes)
    assert km.architecture == "wan"
    assert km.lookup("blocks_0_attn1_to_q") == Target("diffusion_model.blocks.0.self_attn.q.weight")
    assert km.lookup("blocks.0.attn2.to_out.0") == Target("diffusion_model.blocks.0.cross_attn.o.weight")
    assert km.lookup("blocks.0.ffn.net.0.proj") == Target("diffusion_model.blocks.0.ffn.0.weight")
    assert km.lookup("condition_embedder_text_embedder_linear_1") == Target("diffusion_model.text_embedding.0.weight")
    assert km.lookup("proj_out") == Target("diffusion_model.head.head.weight")
    assert km.lookup("blocks.0.self_attn.q") == Target("diffusion_model.blocks.0.self_attn.q.weight")


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)


class DiT(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.empty = nn.ModuleList()
        self.head = nn.Linear(8, 4)


def test_generic_all_linear_is_the_blocks_linears():
    m = DiT()
    assert _block_lists(m) == ["blocks"]
    assert [p for p, _ in select_targets(m, "all-linear", "generic")] == [
        "blocks.0.qkv", "blocks.0.proj", "blocks.1.qkv", "blocks.1.proj"]
    # without block lists: every Linear, as before
    flat = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4))
    assert [p for p, _ in select_targets(flat, "all-linear", "generic")] == ["0", "1"]


def test_host_splits_train_and_export_one_layer_per_split():
    m = DiT()
    targets = [(p, mod) for p, mod in select_targets(m, "all-linear", "generic") if p.startswith("blocks.0.")]
    trainer = OFTTrainer(targets, num_blocks=2, alpha=0, splits={"blocks.0.qkv": (8, 8, 8)})
    assert [len(tl.params) for tl in trainer.layers] == [3, 1]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in trainer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    names = {"blocks.0.qkv": ("b0.to_q", "b0.to_k", "b0.to_v"), "blocks.0.proj": "b0.to_out.0"}
    adapter = trainer.to_adapter({}, names=names, prefix="lycoris_", fmt="lycoris_diag_oft")
    assert adapter.format == "lycoris_diag_oft"
    assert sorted(layer.key for layer in adapter) == ["lycoris_b0_to_k", "lycoris_b0_to_out_0", "lycoris_b0_to_q",
                                                      "lycoris_b0_to_v"]
    # each exported split rotates its rows exactly as the fused trained layer does
    fused = trainer.to_adapter({})
    w = m.blocks[0].qkv.weight.detach()
    want = rotate_weight(fused.layers[("unet", "blocks.0.qkv")], w, 1.0)
    got = torch.cat([rotate_weight(adapter.layers[("unet", f"b0.{n}")], w[i * 8:(i + 1) * 8], 1.0)
                     for i, n in enumerate(("to_q", "to_k", "to_v"))])
    assert torch.equal(got, want)
    with pytest.raises(OFTError, match="output splits"):
        OFTTrainer(targets, num_blocks=2, alpha=0, splits={"blocks.0.qkv": (8, 8)})
    with pytest.raises(OFTError, match="2 export names for a layer with 3 splits"):
        trainer.to_adapter({}, names={"blocks.0.qkv": ("a", "b"), "blocks.0.proj": "c"})
