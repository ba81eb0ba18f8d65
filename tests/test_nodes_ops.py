"""OFT Block Strength, OFT Blend, OFT Merge, OFT Save, and the rotation cache of the patch seam, against the REAL
ComfyUI on the tiny FLUX (models patched only through clones, always unpatched).
"""

from __future__ import annotations

import json

import comfy_models
import pytest
import torch
from oracle import REL_TOL, rel_err
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_nodes import assert_same_state, patched, snapshot

pytestmark = pytest.mark.comfyui

FLUX_ADAPTER = "kohya/flux_tiny_oft_attn_dim4.safetensors"
SD15_ADAPTER = "kohya/sd15_oft_attn_dim8_bf16.safetensors"
BLOCK0 = ["diffusion_model.double_blocks.0.img_attn.proj.weight", "diffusion_model.double_blocks.0.img_attn.qkv.weight",
          "diffusion_model.double_blocks.0.txt_attn.proj.weight", "diffusion_model.double_blocks.0.txt_attn.qkv.weight"]
BLOCK1 = [k.replace("blocks.0.", "blocks.1.") for k in BLOCK0]



@pytest.fixture(scope="module")
def n(comfyui_oft):
    from comfyui_oft.nodes import files, oft_nodes, op_nodes, patch

    return type("N", (), {"files": files, "oft_nodes": oft_nodes, "ops": op_nodes, "patch": patch})


@pytest.fixture(scope="module")
def flux_a(n, fixtures_dir):
    return n.files.load(fixtures_dir / FLUX_ADAPTER)


@pytest.fixture(scope="module")
def flux_b(n, fixtures_dir, tmp_path_factory):
    """A second kohya FLUX adapter on the same layers: the fixture's stored blocks times −0.7 plus seeded noise."""
    src = load_file(fixtures_dir / FLUX_ADAPTER)
    with safe_open(str(fixtures_dir / FLUX_ADAPTER), "pt") as f:
        meta = f.metadata()
    g = torch.Generator().manual_seed(5)
    out = {k: (-0.7 * v + 0.002 * torch.randn(v.shape, generator=g)) if ".oft_blocks" in k else v
           for k, v in src.items()}
    path = tmp_path_factory.mktemp("flux_b") / "flux_b.safetensors"
    save_file(out, str(path), metadata=meta)
    return n.files.load(path)


def apply(n, model, adapter, strength=1.0, mode="kohya"):
    out = n.oft_nodes.OFTApply.execute(model=model, oft_adapter=adapter, strength=strength, strength_mode=mode)
    return out.result[0], out.ui.value


def col_norms(w: torch.Tensor) -> torch.Tensor:
    return w.double().norm(dim=0)


# ------------------------------------------------------------------------------------------------ block strength
def test_block_strength_validate_inputs_rejects_bad_specs_with_the_parse_error(n):
    node = n.ops.OFTBlockStrength
    assert node.validate_inputs(block_spec="default=1, double:0=0, single=0.5") is True
    assert node.validate_inputs(block_spec="") is True
    for bad, words in (("double:3-1=0", "runs backwards"), ("bogus=1", "bogus"), ("input=abc", "abc")):
        msg = node.validate_inputs(block_spec=bad)
        assert isinstance(msg, str) and "block strength spec" in msg and words in msg, msg


def test_block_strength_zero_is_bit_exact_and_others_get_their_strength(n, flux_a):
    base = comfy_models.flux_tiny()
    snap = snapshot(base)
    out = n.ops.OFTBlockStrength.execute(oft_adapter=flux_a, block_spec="double:0=0, double:1=0.5")
    weighted = out.result[0]
    assert len(weighted) == 4 and len(flux_a) == 8  # the cached file adapter is not modified
    assert "4 of 8 layers kept" in out.ui.value and "4 layers off, 4 scaled" in out.ui.value
    model, text = apply(n, base, weighted, 0.8)
    assert "4 of 4 adapter layers applied" in text and "double:0=0" in text
    assert set(model.patches) == set(BLOCK1)
    assert all(p[0] == 0.8 * 0.5 for k in BLOCK1 for p in model.patches[k])  # one strength per weight, applied once
    got = patched(model, BLOCK0 + BLOCK1)
    for k in BLOCK0:
        assert torch.equal(got[k], snap[k]), k  # group at 0: bit for bit
    ref = patched(apply(n, base, flux_a, 0.4)[0], BLOCK1)  # 0.8 × 0.5, the same float
    for k in BLOCK1:
        assert torch.equal(got[k], ref[k]), k
        layer = flux_a.layers[("unet", k[len("diffusion_model."):-len(".weight")].replace(".", "_"))]
        identity = all(not torch.any(q) for q in layer.blocks)  # (the fixture has an all-zero layer)
        assert torch.equal(got[k], snap[k]) == identity, k

    # a second Block Strength multiplies into the first; everything off returns the model unchanged
    again = n.ops.OFTBlockStrength.execute(oft_adapter=weighted, block_spec="default=0.5").result[0]
    assert set(again.layer_strengths.values()) == {0.25}
    assert "then" in again.block_spec
    m2 = apply(n, base, again, 1.0)[0]
    assert all(p[0] == 0.25 for k in BLOCK1 for p in m2.patches[k])
    off = n.ops.OFTBlockStrength.execute(oft_adapter=flux_a, block_spec="default=0").result[0]
    m0, text = apply(n, base, off, 1.0)
    assert not m0.patches and "no layer applied" in text and "8 layers off" in text
    inspected = n.oft_nodes.OFTInspect.execute(oft_adapter=weighted, model=base).result[0]
    assert "block strength double:0=0, double:1=0.5: 4 layers off, 4 scaled" in inspected
    assert_same_state(base, snap)


def test_block_strength_is_saved_exactly_or_refused(n, flux_a, output_dir):
    from comfyui_oft.oft_core import OFTError, load_adapter, rotation_blocks

    weighted = n.ops.OFTBlockStrength.execute(oft_adapter=flux_a, block_spec="double:0=0").result[0]
    n.ops.OFTSave.execute(oft_adapter=weighted, format="kohya", filename_prefix="oft/bs",
                          fractional_block_strength="refuse")
    (path,) = (output_dir / "oft").glob("bs_*.safetensors")
    saved = load_adapter(path)
    assert sorted(layer.name for layer in saved) == sorted(k[1] for k in weighted.layers)  # block 0 not in the file
    for layer in saved:
        want = rotation_blocks(flux_a.layers[("unet", layer.name)], 1.0)
        for a, b in zip(rotation_blocks(layer, 1.0), want):
            assert rel_err(a, b) <= REL_TOL, layer.name

    nothing = n.ops.OFTBlockStrength.execute(oft_adapter=flux_a, block_spec="double=0").result[0]
    with pytest.raises(OFTError, match="nothing to save"):
        n.ops.OFTSave.execute(oft_adapter=nothing, format="kohya", filename_prefix="oft/none",
                              fractional_block_strength="refuse")
    half = n.ops.OFTBlockStrength.execute(oft_adapter=flux_a, block_spec="double:0=0, double:1=0.5").result[0]
    with pytest.raises(OFTError) as e:
        n.ops.OFTSave.execute(oft_adapter=half, format="kohya", filename_prefix="oft/half",
                              fractional_block_strength="refuse")
    assert "other than 0 or 1" in str(e.value) and "orthogonal" in str(e.value)
    assert not list((output_dir / "oft").glob("half_*"))
    n.ops.OFTSave.execute(oft_adapter=half, format="kohya", filename_prefix="oft/half",
                          fractional_block_strength="orthogonal")
    (path,) = (output_dir / "oft").glob("half_*.safetensors")
    saved = load_adapter(path)
    # the file at strength 1 == the adapter at 0.5 in the orthogonal sense, both in oft_core and patched in ComfyUI
    for layer in saved:
        for a, b in zip(rotation_blocks(layer, 1.0), rotation_blocks(flux_a.layers[("unet", layer.name)], 0.5,
                                                                      "orthogonal")):
            assert rel_err(a, b) <= REL_TOL, layer.name
    base = comfy_models.flux_tiny()
    got = patched(apply(n, base, saved, 1.0, "orthogonal")[0], BLOCK1)
    want = patched(apply(n, base, half, 1.0, "orthogonal")[0], BLOCK1)
    for k in BLOCK1:
        assert rel_err(got[k], want[k]) <= REL_TOL, k
    with safe_open(str(path), "pt") as f:
        made = json.loads(f.metadata()["comfyui_oft.made_from"])
    assert made["block_strength"] == half.block_spec and made["fractional_block_strength"] == "orthogonal"


def test_blend_and_merge_refuse_adapters_with_block_strength(n, flux_a):
    from comfyui_oft.oft_core import OFTError

    weighted = n.ops.OFTBlockStrength.execute(oft_adapter=flux_a, block_spec="single=0, double:1=0.5").result[0]
    with pytest.raises(OFTError, match="per-block strengths.*blend first"):
        n.ops.OFTBlend.execute(adapter_a=flux_a, adapter_b=weighted, ratio=0.5)
    with pytest.raises(OFTError, match="per-block strengths.*merge first"):
        n.ops.OFTMerge.execute(mode="compose", adapter_1=weighted, weight_1=1.0)
    plain = n.ops.OFTBlockStrength.execute(oft_adapter=flux_a, block_spec="default=1").result[0]  # nothing changed
    assert len(n.ops.OFTBlend.execute(adapter_a=plain, adapter_b=flux_a, ratio=0.5).result[0]) == 8


# ------------------------------------------------------------------------------------------------ blend / merge
def test_blend_node_endpoints_are_exact_and_midpoint_is_a_rotation(n, flux_a, flux_b):
    base = comfy_models.flux_tiny()
    snap = snapshot(base)
    keys = BLOCK0 + BLOCK1
    ref_a = patched(apply(n, base, flux_a)[0], keys)
    ref_b = patched(apply(n, base, flux_b)[0], keys)
    blended = {}
    for t in (0.0, 0.5, 1.0):
        out = n.ops.OFTBlend.execute(adapter_a=flux_a, adapter_b=flux_b, ratio=t)
        adapter = out.result[0]
        assert adapter.made_from["blend"]["ratio"] == t and f"ratio {t:g}" in out.ui.value
        blended[t] = patched(apply(n, base, adapter)[0], keys)
    for k in keys:
        assert torch.equal(blended[0.0][k], ref_a[k]) and torch.equal(blended[1.0][k], ref_b[k]), k
        mid = blended[0.5][k]
        if not torch.equal(ref_a[k], ref_b[k]):
            assert rel_err(mid, ref_a[k]) > 1e-4 and rel_err(mid, ref_b[k]) > 1e-4, k
        # a rotation of the output features keeps every column's norm
        assert rel_err(col_norms(mid), col_norms(snap[k])) <= 1e-6, k


def test_blend_of_different_adapters_fails_with_the_reason(n, flux_a, fixtures_dir):
    from comfyui_oft.oft_core import OFTError

    sd15 = n.files.load(fixtures_dir / SD15_ADAPTER)
    with pytest.raises(OFTError, match="cannot blend: the adapters have different layers"):
        n.ops.OFTBlend.execute(adapter_a=flux_a, adapter_b=sd15, ratio=0.5)
    with pytest.raises(OFTError, match="cannot average: the adapters have different layers"):
        n.ops.OFTMerge.execute(mode="average", adapter_1=flux_a, weight_1=1.0, adapter_2=sd15, weight_2=1.0)


def test_merge_node_compose_and_average(n, flux_a, flux_b):
    from comfyui_oft.oft_core import rotate_weight

    base = comfy_models.flux_tiny()
    snap = snapshot(base)
    keys = BLOCK0 + BLOCK1
    out = n.ops.OFTMerge.execute(mode="compose", adapter_1=flux_a, weight_1=1.0, adapter_3=flux_b, weight_3=0.5,
                                 weight_2=7.0)  # weight of an unconnected slot is ignored
    merged = out.result[0]
    assert "compose of 2 adapters (weights 1, 0.5)" in out.ui.value
    assert [e["weight"] for e in merged.made_from["merge"]["adapters"]] == [1.0, 0.5]
    got = patched(apply(n, base, merged)[0], keys)
    for k in keys:
        name = k[len("diffusion_model."):-len(".weight")].replace(".", "_")
        w = snap[k]
        want = rotate_weight(flux_b.layers[("unet", name)],
                             rotate_weight(flux_a.layers[("unet", name)], w, 1.0, "orthogonal"), 0.5, "orthogonal")
        assert rel_err(got[k], want) <= 1e-5, k  # A first, then B^0.5
    avg = n.ops.OFTMerge.execute(mode="average", adapter_1=flux_a, weight_1=1.0, adapter_2=flux_a, weight_2=3.0)
    got = patched(apply(n, base, avg.result[0])[0], keys)
    ref = patched(apply(n, base, flux_a)[0], keys)
    for k in keys:
        assert rel_err(got[k], ref[k]) <= REL_TOL, k


# ------------------------------------------------------------------------------------------------ save
def test_save_never_overwrites_and_records_what_it_was_made_from(n, flux_a, flux_b, output_dir, monkeypatch):
    import folder_paths
    from comfyui_oft.oft_core import load_adapter, rotation_blocks

    blended = n.ops.OFTBlend.execute(adapter_a=flux_a, adapter_b=flux_b, ratio=0.25).result[0]
    texts = [n.ops.OFTSave.execute(oft_adapter=blended, format="kohya", filename_prefix="oft/blend",
                                   fractional_block_strength="refuse").ui.value for _ in range(2)]
    saved = sorted((output_dir / "oft").iterdir())
    assert [p.name for p in saved] == ["blend_00001_.safetensors", "blend_00002_.safetensors"]
    assert str(saved[0]) in texts[0] and str(saved[1]) in texts[1] and "saved kohya adapter (8 layers)" in texts[0]
    # the save report says what sd-scripts will do differently with the file (issue 11)
    assert "note: sd-scripts networks.oft_flux cannot merge this file" in texts[0]
    assert "hard-codes FLUX.1's split widths" in texts[0]
    with safe_open(str(saved[0]), "pt") as f:
        meta = f.metadata()
    made = json.loads(meta["comfyui_oft.made_from"])
    assert made["source_format"] == "kohya_flux" and made["saved_as"] == "kohya"
    tree = made["made_from"]["blend"]
    assert tree["ratio"] == 0.25 and tree["a"]["file"] == "flux_tiny_oft_attn_dim4.safetensors"
    assert tree["b"]["file"] == "flux_b.safetensors"
    for layer in load_adapter(saved[0]):  # the file holds the blend's rotation
        for a, b in zip(rotation_blocks(layer), rotation_blocks(blended.layers[("unet", layer.name)])):
            assert rel_err(a, b) <= REL_TOL, layer.name

    # a counter that ComfyUI's scan would give again (e.g. a file written meanwhile) is skipped, never replaced
    real = folder_paths.get_save_image_path
    monkeypatch.setattr(folder_paths, "get_save_image_path",
                        lambda prefix, out: (real(prefix, out)[0], "blend", 1, "oft", prefix))
    before = saved[0].read_bytes()
    n.ops.OFTSave.execute(oft_adapter=flux_a, format="kohya", filename_prefix="oft/blend",
                          fractional_block_strength="refuse")
    assert saved[0].read_bytes() == before
    assert (output_dir / "oft" / "blend_00003_.safetensors").is_file()
    with pytest.raises(Exception, match="outside the output folder"):
        n.ops.OFTSave.execute(oft_adapter=flux_a, format="kohya", filename_prefix="../escape",
                              fractional_block_strength="refuse")


@pytest.mark.parametrize("src,fmt", [("lycoris/lycoris_diag_oft_dim8/lycoris_diag_oft_dim8.safetensors", "lycoris"),
                                     ("peft/peft_oft_cayley_bs8/adapter_model.safetensors", "peft")])
def test_save_lycoris_and_peft(n, fixtures_dir, output_dir, src, fmt):
    from comfyui_oft.oft_core import load_adapter, rotation_blocks

    adapter = n.files.load(fixtures_dir / src)
    for _ in range(2):
        text = n.ops.OFTSave.execute(oft_adapter=adapter, format=fmt, filename_prefix=f"oft/{fmt}",
                                     fractional_block_strength="refuse").ui.value
    assert ("note: LyCORIS: the kohya-style network's merge_to always merges at strength 1" in text) == (
        fmt == "lycoris")
    saved = sorted((output_dir / "oft").iterdir())
    suffix = "" if fmt == "peft" else ".safetensors"
    assert [p.name for p in saved] == [f"{fmt}_00001_{suffix}", f"{fmt}_00002_{suffix}"]
    if fmt == "peft":
        assert all(p.is_dir() and (p / "adapter_config.json").is_file() for p in saved)
        target = saved[0] / "adapter_model.safetensors"
    else:
        target = saved[0]
    back = load_adapter(target)
    assert len(back) == len(adapter) == 56
    by_name = {layer.name.replace(".", "_"): layer for layer in adapter}
    for layer in back:
        for a, b in zip(rotation_blocks(layer), rotation_blocks(by_name[layer.name.replace(".", "_")])):
            assert rel_err(a, b) <= REL_TOL, layer.name


def test_save_refusal_surfaces_the_writer_reason(n, fixtures_dir, output_dir):
    from comfyui_oft.oft_core import OFTError

    rescaled = n.files.load(fixtures_dir / "lycoris/lycoris_diag_oft_rescaled/lycoris_diag_oft_rescaled.safetensors")
    with pytest.raises(OFTError, match="cannot be written as kohya.*rescale"):
        n.ops.OFTSave.execute(oft_adapter=rescaled, format="kohya", filename_prefix="oft/x",
                              fractional_block_strength="refuse")
    assert not [p for p in (output_dir / "oft").iterdir() if not p.name.startswith(".")]
    assert not list((output_dir / "oft").iterdir())  # no temporary file left either


# ------------------------------------------------------------------------------------------------ rotation cache
def test_weight_adapter_caches_rotation_blocks(n, flux_a, monkeypatch):
    from comfyui_oft.oft_core import rotate_weight

    calls = []
    real = n.patch.rotation_blocks

    def counting(layer, strength=1.0, mode="kohya", **kw):
        calls.append((layer.name, strength, mode))
        return real(layer, strength, mode, **kw)

    monkeypatch.setattr(n.patch, "rotation_blocks", counting)
    layer = flux_a.layers[("unet", "double_blocks_1_img_attn_qkv")]
    w = comfy_models.flux_tiny().model.state_dict()["diffusion_model.double_blocks.1.img_attn.qkv.weight"]
    wa = n.patch.OFTWeightAdapter(layer, "kohya")
    for dtype in (torch.float32, torch.float32, torch.bfloat16, torch.float32):
        got = wa.calculate_weight(w.clone().to(dtype), "k", 0.7, 1.0, None, None)
        want = rotate_weight(layer, w.to(dtype).float(), 0.7, "kohya").to(dtype)
        assert torch.equal(got, want)
    # kept from the second patch at a strength on (a weight patched once keeps no R), then reused
    assert calls == [(layer.name, 0.7, "kohya")]
    wa.calculate_weight(w.clone(), "k", -0.3, 1.0, None, None)
    assert len(calls) == 1
    for _ in range(3):
        wa.calculate_weight(w.clone(), "k", -0.3, 1.0, None, None)
        wa.calculate_weight(w.clone(), "k", 0.7, 1.0, None, None)
    assert calls == [(layer.name, 0.7, "kohya"), (layer.name, -0.3, "kohya")]


def test_low_vram_forwards_build_the_rotation_once(n, flux_a, monkeypatch):
    """In the low-VRAM path cast_bias_weight runs the patch on every forward: rotation_blocks runs once per layer
    (from its second patch on)."""
    import comfy.ops
    import comfy.utils

    calls = []
    real = n.patch.rotation_blocks
    monkeypatch.setattr(n.patch, "rotation_blocks", lambda *a, **kw: calls.append(a[0].name) or real(*a, **kw))
    base = comfy_models.flux_tiny(torch.bfloat16)
    snap = snapshot(base)
    m = apply(n, base, flux_a, 1.0)[0]
    full = patched(m, BLOCK1)  # full load: builds each rotation once (cached in the patch objects)
    m.patch_model(lowvram_model_memory=1)
    try:
        for _ in range(3):
            for k in BLOCK1:
                module = comfy.utils.get_attr(m.model, k.rsplit(".", 1)[0])
                w, _ = comfy.ops.cast_bias_weight(module, torch.zeros(1, 1, dtype=torch.bfloat16))
                assert rel_err(w, full[k]) <= 2.0**-7, k
                assert torch.equal(w, snap[k]) == torch.equal(full[k], snap[k]), k  # the patch did run
    finally:
        m.unpatch_model()
    # the full load patched every weight once (no R kept); the forwards re-patched BLOCK1's weights: each of those
    # layers built its rotation exactly once, on its second patch, and reused it after
    assert len(calls) == len(set(calls)) and calls
    block1 = {k[len("diffusion_model."):-len(".weight")].replace(".", "_") for k in BLOCK1}
    assert set(calls) == block1 and block1 <= {layer.name for layer in flux_a}
    assert_same_state(base, snap)
