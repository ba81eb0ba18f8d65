"""blend / merge (average, compose) and per-block strength, checked in merged weights."""

import os

import pytest
import torch
from oracle import REL_TOL, get_case, rel_err

from oft_core import OFTAdapter, OFTError, load_adapter, make_layer, resolve_for_weight, rotate_weight
from oft_core.blocks import _apply_block_strength, _effective_strengths, _layer_strengths, layer_block, parse_block_spec
from oft_core.cli import main as cli
from oft_core.combine import blend, merge
from oft_core.rotation import _orthogonality_error, _skew, rotation_blocks

LYC = "lycoris_diag_oft_dim8"
LYC_C = "lycoris_diag_oft_constrained"


def _merged(adapter, case, strength=1.0, mode="kohya"):
    layers = {layer.name.replace(".", "_"): layer for layer in adapter}
    out = {}
    for key, w in case.originals.items():
        layer = layers.get(case.module_key[key])
        out[key] = w if layer is None else rotate_weight(resolve_for_weight(layer, w.shape), w, strength, mode)
    return out


def _same(a, b, tol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        if tol == 0:
            assert torch.equal(a[k], b[k]), k
        else:
            assert rel_err(a[k], b[k]) <= tol, (k, rel_err(a[k], b[k]))


def _zero(adapter):
    layers = {k: layer.with_(blocks=tuple(torch.zeros_like(q) for q in layer.blocks))
              for k, layer in adapter.layers.items()}
    return OFTAdapter(layers, adapter.format)


@pytest.mark.parametrize("case_id", [LYC_C, "sd15_oft_attn_dim8_bf16", "flux_tiny_oft_attn_dim4"])
def test_blend_with_itself_is_bit_exact(case_id):
    case = get_case(case_id)
    a = load_adapter(case.adapter)
    for t in (0.0, 0.3, 1.0):
        b = blend(a, a, t)
        assert all(layer.constraint.kind == "none" for layer in b)
        for s in (1.0, 0.5):
            _same(_merged(b, case, s), _merged(a, case, s))


def test_blend_endpoints_and_orthogonality():
    case = get_case(LYC)
    a, c = load_adapter(case.adapter), load_adapter(get_case(LYC_C).adapter)
    _same(_merged(blend(a, c, 0.0), case), _merged(a, case))
    _same(_merged(blend(a, c, 1.0), case), _merged(c, case), REL_TOL)
    mid = blend(a, c, 0.5)
    for layer in mid:
        assert _orthogonality_error(layer) < 2e-6
    # midpoint generator is the mean of the constrained generators
    k = next(iter(a.layers))
    from oft_core.rotation import _constrain
    want = 0.5 * (_constrain(a.layers[k], a.layers[k].blocks[0], 0)
                  + _constrain(c.layers[k], c.layers[k].blocks[0], 0))
    assert torch.allclose(mid.layers[k].blocks[0], want, atol=1e-7, rtol=0)
    merged_mid = _merged(mid, case)
    assert any(rel_err(merged_mid[k], _merged(a, case)[k]) > 1e-4 for k in merged_mid)


def test_blend_refuses_different_structures():
    a = load_adapter(get_case(LYC).adapter)
    b = load_adapter(get_case("lycoris_boft_dim8").adapter)
    with pytest.raises(OFTError, match="different structure"):
        blend(a, b, 0.5)
    with pytest.raises(OFTError, match="different layers"):
        blend(a, OFTAdapter(dict(list(a.layers.items())[:3]), a.format), 0.5)


def test_average_of_one_is_itself_and_of_two_is_blend():
    case = get_case(LYC_C)
    a, c = load_adapter(case.adapter), load_adapter(get_case(LYC).adapter)
    _same(_merged(merge([(a, 2.5)], "average"), case, 0.5), _merged(a, case, 0.5))
    avg = merge([(a, 1.0), (c, 3.0)], "average")
    _same(_merged(avg, case), _merged(blend(a, c, 0.75), case), 1e-6)
    with pytest.raises(OFTError, match="non-zero sum"):
        merge([(a, 1.0), (c, -1.0)], "average")


def test_blend_and_merge_record_their_provenance_in_the_typed_field():
    """made_from, not info: the operation, its numbers and each input's own provenance (its file, or the tree that
    made it), so a blend of a merge keeps the whole history."""
    a, c = load_adapter(get_case(LYC).adapter), load_adapter(get_case(LYC_C).adapter)
    a_file = {"file": os.path.basename(a.path), "format": a.format}
    c_file = {"file": os.path.basename(c.path), "format": c.format}
    b = blend(a, c, 0.25)
    assert b.made_from == {"blend": {"ratio": 0.25, "a": a_file, "b": c_file}} and "blend" not in b.info
    for mode in ("average", "compose"):
        m = merge([(b, 2.0), (c, 1.0)], mode)
        assert "merge" not in m.info
        assert m.made_from == {"merge": {"mode": mode, "adapters": [{"weight": 2.0, "adapter": b.made_from},
                                                                   {"weight": 1.0, "adapter": c_file}]}}


@pytest.mark.parametrize("case_id", [LYC_C, "flux_tiny_oft_attn_dim4", "peft_oft_cayley_bs8"])
def test_compose_with_identity_and_with_itself(case_id):
    case = get_case(case_id)
    a = load_adapter(case.adapter)
    ident = _zero(a)
    _same(_merged(merge([(a, 1.0), (ident, 1.0)]), case), _merged(a, case))
    _same(_merged(merge([(ident, 1.0), (a, 1.0)]), case, 0.5), _merged(a, case, 0.5))
    twice = merge([(a, 1.0), (a, 1.0)])
    assert all(layer.parameterization == "cayley" and layer.constraint.kind == "none" for layer in twice)
    for layer in list(twice)[:8]:
        assert _orthogonality_error(layer) < 2e-6
    once = _merged(a, case)
    applied_twice = {}
    layers = {layer.name.replace(".", "_"): layer for layer in a}
    for key, w in once.items():
        applied_twice[key] = rotate_weight(resolve_for_weight(layers[case.module_key[key]], w.shape), w)
    _same(_merged(twice, case), applied_twice, 1e-5)


def test_compose_weight_is_orthogonal_power_and_passthrough():
    case = get_case(LYC)
    a = load_adapter(case.adapter)
    part = OFTAdapter(dict(list(a.layers.items())[:5]), a.format)
    # weight 0.5 twice is R(Q/2)·R(Q/2) (the Cayley map is not exp: that is not R(Q))
    half_twice = merge([(a, 0.5), (a, 0.5)])
    once = _merged(a, case, 0.5, "orthogonal")
    layers = {layer.name: layer for layer in a}
    want = {k: rotate_weight(resolve_for_weight(layers[case.module_key[k]], w.shape), w, 0.5, "orthogonal")
            for k, w in once.items()}
    _same(_merged(half_twice, case), want, 1e-5)
    # layers in only one adapter pass through, scaled as R(w·Q)
    mix = merge([(part, 1.0), (a, 0.5)])
    assert len(mix) == len(a)
    only_b = next(k for k in a.layers if k not in part.layers)
    w = torch.randn(a.layers[only_b].dim, 7)
    assert torch.equal(rotate_weight(mix.layers[only_b], w), rotate_weight(a.layers[only_b], w, 0.5, "orthogonal"))


def test_compose_different_block_sizes_uses_their_lcm():
    torch.manual_seed(3)
    q4, q8 = _skew(torch.randn(8, 4, 4) * 0.1), _skew(torch.randn(4, 8, 8) * 0.1)
    la = make_layer(path="a", name="x", side="out", blocks=[q4], transpose=True)
    lb = make_layer(path="b", name="x", side="out", blocks=[q8], transpose=True)
    c = merge([(OFTAdapter({("unet", "x"): la}, "t"), 1.0), (OFTAdapter({("unet", "x"): lb}, "t"), 1.0)])
    (layer,) = c
    assert layer.block_sizes == (8,)
    w = torch.randn(32, 6)
    assert rel_err(rotate_weight(layer, w), rotate_weight(lb, rotate_weight(la, w))) <= 1e-5
    l3 = make_layer(path="d", name="y", side="out", blocks=[_skew(torch.randn(4, 3, 3))], transpose=True)
    l4 = make_layer(path="d", name="y", side="out", blocks=[_skew(torch.randn(3, 4, 4))], transpose=True)
    (dense,) = merge([(OFTAdapter({("unet", "y"): l3}, "t"), 1), (OFTAdapter({("unet", "y"): l4}, "t"), 1)])
    assert dense.block_sizes == (12,) and dense.num_blocks == (1,)  # lcm(3, 4) = 12: one dense block
    v = torch.randn(12, 3)
    assert rel_err(rotate_weight(dense, v), rotate_weight(l4, rotate_weight(l3, v))) <= 1e-5
    l6 = make_layer(path="d", name="y", side="out", blocks=[_skew(torch.randn(3, 6, 6))], transpose=True)
    l9 = make_layer(path="d", name="y", side="out", blocks=[_skew(torch.randn(1, 9, 9))], transpose=True)
    with pytest.raises(OFTError, match="split sizes differ"):
        merge([(OFTAdapter({("unet", "y"): l6}, "t"), 1), (OFTAdapter({("unet", "y"): l9}, "t"), 1)])


def test_compose_refuses_what_is_not_an_oft_layer():
    a = load_adapter(get_case(LYC).adapter)
    k = next(iter(a.layers))
    l_out = a.layers[k]
    l_in = l_out.with_(side="in")
    with pytest.raises(OFTError, match="input features and another its output"):
        merge([(OFTAdapter({k: l_out}, "t"), 1), (OFTAdapter({k: l_in}, "t"), 1)])
    neu = load_adapter(get_case("peft_oft_neumann_r4").adapter)
    with pytest.raises(OFTError, match="not exactly orthogonal"):
        merge([(neu, 1), (neu, 1)])
    resc = load_adapter(get_case("lycoris_diag_oft_rescaled").adapter)
    with pytest.raises(OFTError, match="rescaled layer followed"):
        merge([(resc, 1), (a, 1)])
    merge([(a, 1), (resc, 1)])  # the rescale of the last-applied layer survives
    # a half turn: Q with Cayley(Q) = −I does not exist
    flip = make_layer(path="h", name="z", side="out", blocks=[torch.tensor([[[0.0, 1.0], [-1.0, 0.0]]])],
                      transpose=False)
    with pytest.raises(OFTError, match="half"):
        merge([(OFTAdapter({("unet", "z"): flip}, "t"), 1), (OFTAdapter({("unet", "z"): flip}, "t"), 1)])


# ------------------------------------------------------------------------------------------- per-block strength
def test_parse_block_spec_and_errors():
    spec = parse_block_spec("default=1, input=0.5, middle=1, output:3-5=0, double:0-9=0.8, single=0")
    assert spec.default == 1.0 and len(spec.rules) == 5
    assert spec.multiplier("unet", "output_blocks.4.1.proj_in") == 0.0
    assert spec.multiplier("unet", "output_blocks.6.1.proj_in") == 1.0
    assert spec.multiplier("unet", "double_blocks_9_img_attn_qkv") == 0.8
    assert spec.multiplier("unet", "double_blocks_10_img_attn_qkv") == 1.0
    assert spec.multiplier("unet", "time_embed.0") == 1.0
    assert parse_block_spec("").multiplier("te", "x") == 1.0
    assert parse_block_spec("unet=0, te=2").multiplier("te1", "x") == 2.0
    assert parse_block_spec("input=0, input:4=1").multiplier("unet", "input_blocks.4.1.x") == 1.0  # last wins
    for bad, token in [("input=abc", "input=abc"), ("inptu=1", "inptu"), ("middle:2=1", "middle:2=1"),
                       ("output:5-3=1", "runs backwards"), ("input=1,,single=0", "empty item"),
                       ("double=inf", "expected a finite number"), ("input 0.5", "input0.5")]:
        with pytest.raises(OFTError, match=token):
            parse_block_spec(bad)


def test_block_index_mapping_for_sd15_kohya_and_flux_names():
    sd = {layer.name for layer in load_adapter(get_case("sd15_oft_attn_dim8_bf16").adapter)}
    blocks = {layer_block("unet", n) for n in sd}
    # SD1.5 attention lives in LDM input blocks 1,2,4,5,7,8, the middle block and output blocks 3–11
    assert blocks == {("input", i) for i in (1, 2, 4, 5, 7, 8)} | {("middle", None)} | {
        ("output", i) for i in range(3, 12)}
    assert layer_block("unet", "down_blocks_1_attentions_1_transformer_blocks_0_attn1_to_q") == ("input", 5)
    assert layer_block("unet", "up_blocks.3.attentions.2.proj_out") == ("output", 11)
    assert layer_block("unet", "down_blocks.2.downsamplers.0.conv") == ("input", 9)
    assert layer_block("unet", "conv_in") == ("input", 0)
    assert layer_block("unet", "input_blocks_7_1_proj_in") == ("input", 7)
    flux = {layer.name for layer in load_adapter(get_case("flux_tiny_oft_attn_dim4").adapter)}
    assert {layer_block("unet", n) for n in flux} == {("double", 0), ("double", 1)}
    assert layer_block("unet", "single_blocks.1.linear1") == ("single", 1)
    assert layer_block("unet", "transformer_blocks.3.attn.to_q") == ("double", 3)
    assert layer_block("unet", "single_transformer_blocks_7_attn_to_q") == ("single", 7)
    assert layer_block("te1", "text_model.encoder.layers.0.mlp.fc1") == ("te1", None)


def test_block_strength_zero_leaves_weights_bit_exact():
    case = get_case("sd15_oft_attn_dim8_bf16")
    a = load_adapter(case.adapter)
    spec = parse_block_spec("input:1=0, middle=0.5")  # the 9 reference modules: input 1 + middle
    eff = _effective_strengths(a, spec, 0.8)
    mult = _layer_strengths(a, spec)
    assert set(mult.values()) == {0.0, 0.5, 1.0}
    layers = {layer.name: (k, layer) for k, layer in a.layers.items()}
    seen = set()
    for key, w in case.originals.items():
        k, layer = layers[case.module_key[key]]
        out = rotate_weight(resolve_for_weight(layer, w.shape), w, eff[k])
        group = layer_block("unet", layer.name)[0]
        seen.add(group)
        index = layer_block("unet", layer.name)[1]
        if group == "input" and index == 1:
            assert eff[k] == 0 and torch.equal(out, w)  # switched off: bit for bit
            seen.add("off")
        else:
            assert eff[k] == pytest.approx(0.8 * (0.5 if group == "middle" else 1.0))
            assert not torch.equal(out, w) or not torch.any(layer.blocks[0])
    assert seen == {"off", "input", "middle"}
    kept, strengths = _apply_block_strength(a, spec, 0.8)
    assert len(kept) == sum(1 for v in eff.values() if v != 0) and 0 not in strengths.values()


def test_block_strength_is_carried_in_typed_fields_and_scaled_by_one_core_function():
    from oft_core.blocks import _has_layer_strengths, provenance, scale_layers, with_block_strength

    a = load_adapter(get_case("flux_tiny_oft_attn_dim4").adapter)
    assert not _has_layer_strengths(a) and a.block_spec is None and a.made_from is None
    once = with_block_strength(a, "double:0=0, double:1=0.5")
    twice = with_block_strength(once, "default=0.5")
    n1 = sum(1 for layer in a if layer_block("unet", layer.name) == ("double", 1))
    assert len(once) == n1 and once.layers_off == len(a) - n1 and set(once.layer_strengths.values()) == {0.5}
    assert twice.block_spec == f"{once.block_spec} then default=0.5" and set(twice.layer_strengths.values()) == {0.25}
    assert twice.made_from == {"block_strength": "default=0.5", "of": provenance(once)}
    assert provenance(a)["format"] == a.format and a.layer_strengths == {} and a.layers_off == 0  # a untouched
    assert "block_strength" not in once.info and "layer_strengths" not in once.info  # info: reader facts only
    with pytest.raises(OFTError, match="other than 0 or 1"):
        scale_layers(once, "kohya")
    with pytest.raises(OFTError, match="expected kohya or orthogonal"):
        scale_layers(once, "refuse")
    scaled = scale_layers(once, "orthogonal")
    assert scaled.layer_strengths == {} and scaled.block_spec == once.block_spec and len(scaled) == len(once)
    for k, layer in scaled.layers.items():
        for x, y in zip(rotation_blocks(layer, 1.0), rotation_blocks(a.layers[k], 0.5, "orthogonal")):
            assert rel_err(x, y) <= REL_TOL, k
    only_off = with_block_strength(a, "double:0=0")
    assert scale_layers(only_off, "kohya") is only_off  # 0 and 1 only: nothing to write into the layers


# ------------------------------------------------------------------------------------------------------- CLI
def test_cli_convert_writes_a_block_scaled_adapter_or_refuses_what_the_mode_cannot_hold(tmp_path, capsys):
    src = get_case("flux_tiny_oft_attn_dim4").adapter
    a = load_adapter(src)
    block = {layer.name: layer_block("unet", layer.name) for layer in a}
    # 0 and 1: exact in any mode; the layers at 0 are left out
    out = tmp_path / "off.safetensors"
    assert cli(["convert", str(src), "--blocks", "double:0=0", "--to", "kohya", "--out", str(out)]) == 0
    saved = load_adapter(out)
    assert sorted(layer.name for layer in saved) == sorted(n for n, b in block.items() if b != ("double", 0))
    for layer in saved:
        for x, y in zip(rotation_blocks(layer, 1.0), rotation_blocks(a.layers[("unet", layer.name)], 1.0)):
            assert rel_err(x, y) <= REL_TOL, layer.name
    # a fraction: refused in kohya mode (no file written), R(m·Q) in orthogonal mode
    half = tmp_path / "half.safetensors"
    capsys.readouterr()
    assert cli(["convert", str(src), "--blocks", "double:1=0.5", "--to", "kohya", "--out", str(half)]) == 2
    assert "other than 0 or 1" in capsys.readouterr().err and not half.exists()
    assert cli(["convert", str(src), "--blocks", "double:1=0.5", "--block-mode", "orthogonal", "--to", "kohya",
                "--out", str(half)]) == 0
    saved = load_adapter(half)
    assert len(saved) == len(a)
    for layer in saved:
        m = 0.5 if block[layer.name] == ("double", 1) else 1.0
        for x, y in zip(rotation_blocks(layer, 1.0), rotation_blocks(a.layers[("unet", layer.name)], m, "orthogonal")):
            assert rel_err(x, y) <= REL_TOL, (layer.name, m)
    # every layer off: nothing to write
    none = tmp_path / "none.safetensors"
    capsys.readouterr()
    assert cli(["convert", str(src), "--blocks", "double=0", "--to", "kohya", "--out", str(none)]) == 2
    assert "nothing to write" in capsys.readouterr().err and not none.exists()


def test_cli_merge_compose_and_average(tmp_path, capsys):
    case = get_case(LYC)
    other = get_case(LYC_C)
    a, c = load_adapter(case.adapter), load_adapter(other.adapter)
    out = tmp_path / "composed.safetensors"
    rc = cli(["merge", f"{case.adapter}:1", str(other.adapter), "--mode", "compose", "--out", str(out),
              "--format", "kohya"])
    assert rc == 0, capsys.readouterr().err
    composed = load_adapter(out)
    assert composed.format == "kohya"
    step = _merged(a, case)
    layers = {layer.name: layer for layer in c}
    want = {key: rotate_weight(resolve_for_weight(layers[case.module_key[key]], w.shape), w)
            for key, w in step.items()}
    _same(_merged(composed, case), want, 1e-5)
    avg = tmp_path / "avg.safetensors"
    assert cli(["merge", f"{case.adapter}:1", f"{other.adapter}:1", "--mode", "average", "--out", str(avg)]) == 0
    back = load_adapter(avg)
    assert back.format == "lycoris_diag_oft"
    _same(_merged(back, case), _merged(blend(a, c, 0.5), case), 1e-6)
    assert cli(["merge", str(case.adapter), "--out", str(avg)]) == 2  # exists
    assert "output exists" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- PEFT block_share
def test_merge_with_peft_block_share_equals_applying_in_order(tmp_path, capsys):
    """Issue 11: merging a PEFT block_share adapter used to stop with an internal message. Met with an unshared
    adapter, the shared block is expanded to that layer's width (the only width they can meet); composed with itself
    it stays shared. Checked against applying the adapters one after another on the fixture's base weights."""
    case = get_case("peft_oft_blockshare_bs8")
    shared = load_adapter(case.adapter)
    plain = load_adapter(get_case("peft_oft_cayley_bs8").adapter)
    assert all(layer.block_share for layer in shared) and not any(layer.block_share for layer in plain)
    in_order = {}
    first = _merged(shared, case)
    for key in case.originals:  # shared first, then plain
        layer = {x.name.replace(".", "_"): x for x in plain}[case.module_key[key]]
        in_order[key] = rotate_weight(resolve_for_weight(layer, first[key].shape), first[key])
    composed = merge([(shared, 1.0), (plain, 1.0)])
    assert not any(layer.block_share for layer in composed)
    _same(_merged(composed, case), in_order, 1e-5)
    twice = merge([(shared, 1.0), (shared, 0.5)])
    assert all(layer.block_share and layer.num_blocks == (1,) for layer in twice)
    half = merge([(shared, 0.5)])
    once_more = {k: rotate_weight(resolve_for_weight({x.name.replace(".", "_"): x for x in half}[case.module_key[k]],
                                                     w.shape), w) for k, w in _merged(shared, case).items()}
    _same(_merged(twice, case), once_more, 1e-5)
    avg = merge([(shared, 1.0), (plain, 1.0)], mode="average")  # the shared block repeated, averaged per block
    assert not any(layer.block_share for layer in avg)
    assert blend(shared, plain, 0.0).layers.keys() == shared.layers.keys()
    # a width the shared block does not tile: a message that says what to do
    k, layer = next(iter(shared.layers.items()))
    odd = make_layer(path="o", name=layer.name, side="in", blocks=[_skew(torch.randn(3, 5, 5))], transpose=True)
    with pytest.raises(OFTError, match=r"block_share.*not a multiple of 8.*chain OFT loader nodes.*bake --adapter A"):
        merge([(OFTAdapter({k: layer}, "peft"), 1.0), (OFTAdapter({k: odd}, "t"), 1.0)])
    out = tmp_path / "merged"
    assert cli(["merge", str(case.adapter), str(get_case("peft_oft_cayley_bs8").adapter), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    _same(_merged(load_adapter(out), case), in_order, 1e-5)
