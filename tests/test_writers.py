"""Writers: every fixture × every target format either round-trips to the reference merged weights or is refused
with a reason; writes are atomic and never overwrite by accident."""

import json
import os

import pytest
import torch
from oracle import REL_TOL, case_ids, get_case, rel_err
from safetensors import safe_open

from oft_core import Constraint, OFTAdapter, OFTError, load_adapter, make_layer, resolve_for_weight, rotate_weight
from oft_core.cli import main as cli
from oft_core.formats import _write_kohya, _write_peft, write_adapter
from oft_core.rotation import _skew

LYCORIS_LAYOUT = "LyCORIS diag-oft derives a layer's layout from the stored block size"
# case -> {target: expected reader format after the round trip, or the reason the write must be refused}
MATRIX = {
    # kohya layouts (8 blocks of 40 on 320, 4 of 32 on 128) have more rows per block than blocks: LyCORIS cannot
    # hold them (it rebuilds a layout from the block size alone)
    "sd15_oft_attn_dim8_bf16": {"kohya": "kohya", "lycoris": LYCORIS_LAYOUT, "peft": "rotates output"},
    "flux_tiny_oft_attn_dim4": {"kohya": "kohya_flux", "lycoris": LYCORIS_LAYOUT, "peft": "rotates output"},
    "lycoris_boft_dim8": {"kohya": "BOFT", "lycoris": "lycoris_boft", "peft": "rotates output"},
    "lycoris_diag_oft_constrained": {"kohya": "kohya", "lycoris": "lycoris_diag_oft", "peft": "rotates output"},
    "lycoris_diag_oft_dim8": {"kohya": "kohya", "lycoris": "lycoris_diag_oft", "peft": "rotates output"},
    "lycoris_diag_oft_rescaled": {"kohya": "rescale", "lycoris": "lycoris_diag_oft", "peft": "rotates output"},
    "lycoris_te_diag_oft_clipl": {"kohya": "text-encoder", "lycoris": "lycoris_diag_oft", "peft": "rotates output"},
    "peft0.13.2_oft_r4": {"kohya": "kohya", "lycoris": LYCORIS_LAYOUT, "peft": "rotates output"},
    "peft0.15.2_oft_bs8": {"kohya": "input features", "lycoris": "input features", "peft": "oft_s"},
    "peft_oft_blockshare_bs8": {"kohya": "input features", "lycoris": "input features", "peft": "peft"},
    "peft_oft_cayley_bs8": {"kohya": "input features", "lycoris": "input features", "peft": "peft"},
    "peft_oft_neumann_r4": {"kohya": "input features", "lycoris": "input features", "peft": "peft"},
}
READER_FORMATS = {"kohya", "kohya_flux", "lycoris_diag_oft", "lycoris_boft", "peft"}


def _out(tmp_path, to, name="out"):
    return tmp_path / (name if to == "peft" else f"{name}.safetensors")


def _check_merged(case, adapter):
    layers = {layer.name.replace(".", "_"): layer for layer in adapter}
    checked = 0
    for strength in (1.0, 0.5):
        merged = case.expected.get(strength)
        if merged is None:  # PEFT has no strength: compare 0.5 with the source file read by our reader
            src = {layer.name.replace(".", "_"): layer for layer in load_adapter(case.adapter)}
            merged = {k: rotate_weight(resolve_for_weight(src[case.module_key[k].removeprefix(
                "cond_stage_model_transformer_")], w.shape), w, 0.5)
                      for k, w in case.originals.items()}
        for key, ref in merged.items():
            w = case.originals[key]
            name = case.module_key[key]
            layer = layers.get(name) or layers[name.removeprefix("cond_stage_model_transformer_")]  # CLIP fixture
            out = rotate_weight(resolve_for_weight(layer, w.shape), w, strength)
            assert rel_err(out, ref) <= REL_TOL, (key, strength, rel_err(out, ref))
            checked += 1
    half = case.expected.get(0.5)  # the CLIP fixture's 0.5 merge holds 2 of its 4 layers
    assert checked == len(case.originals) + (len(case.originals) if half is None else len(half)) > 0


def test_matrix_covers_every_fixture():
    assert sorted(MATRIX) == sorted(case_ids())


@pytest.mark.parametrize("to", ["kohya", "lycoris", "peft"])
@pytest.mark.parametrize("case_id", case_ids())
def test_round_trip_or_refusal(case_id, to, tmp_path):
    case = get_case(case_id)
    adapter = load_adapter(case.adapter)
    want = MATRIX[case_id][to]
    out = _out(tmp_path, to)
    if want not in READER_FORMATS:
        with pytest.raises(OFTError, match=want) as err:
            write_adapter(adapter, out, to)
        assert "cannot be written as" in str(err.value)
        assert not out.exists() and os.listdir(tmp_path) == []  # nothing left behind
        return
    write_adapter(adapter, out, to)
    back = load_adapter(out)
    assert back.format == want
    assert len(back) == len(adapter)
    assert {(layer.component, layer.name.replace(".", "_")) for layer in back} == {
        (layer.component, layer.name.replace(".", "_")) for layer in adapter}
    _check_merged(case, back)
    assert sorted(os.listdir(tmp_path)) == [out.name]  # no temporary file left


def test_same_format_rewrite_keeps_generators_and_alpha_bit_exact(tmp_path):
    case = get_case("sd15_oft_attn_dim8_bf16")
    a = load_adapter(case.adapter)
    _write_kohya(a, tmp_path / "k.safetensors")
    b = load_adapter(tmp_path / "k.safetensors")
    for k, layer in a.layers.items():
        assert torch.equal(b.layers[k].blocks[0], layer.blocks[0])
        assert b.layers[k].constraint == Constraint("norm_clamp", 0.00099945068359375)
    with safe_open(str(tmp_path / "k.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.oft"
    assert meta["ss_network_dim"] == "8"
    assert float(meta["ss_network_alpha"]) == 0.00099945068359375
    assert meta["ss_base_model_version"] == "sd_v1"  # carried over from the source
    assert "sshs_model_hash" not in meta  # a hash of the source's bytes would be false


def test_flux_kohya_keeps_splits_and_metadata(tmp_path):
    a = load_adapter(get_case("flux_tiny_oft_attn_dim4").adapter)
    _write_kohya(a, tmp_path / "f.safetensors", metadata={"ss_output_name": "mine"})
    with safe_open(str(tmp_path / "f.safetensors"), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "oft_unet_double_blocks_0_img_attn_qkv.oft_blocks.2" in keys
    assert "oft_unet_double_blocks_0_img_attn_proj.oft_blocks.0" in keys
    assert meta["ss_network_module"] == "networks.oft_flux" and meta["ss_network_dim"] == "4"
    assert meta["ss_output_name"] == "mine"


def _layer(q, constraint=None, side="out", transpose=True, name="down_blocks_0_attentions_0_proj_in", **kw):
    return make_layer(path="t", name=name, side=side, blocks=[q], transpose=transpose,
                      constraint=constraint, **kw)


def test_unconstrained_layer_gets_an_alpha_that_never_clamps(tmp_path):
    torch.manual_seed(0)
    big, small = _skew(torch.randn(4, 8, 8)), _skew(torch.randn(4, 8, 8) * 1e-3)
    a = OFTAdapter({("unet", "x_a"): _layer(big, name="x_a"), ("unet", "x_b"): _layer(small, name="x_b")}, "test")
    _write_kohya(a, tmp_path / "k.safetensors")
    b = load_adapter(tmp_path / "k.safetensors")
    alpha = b.layers[("unet", "x_a")].constraint.value
    assert alpha == b.layers[("unet", "x_b")].constraint.value  # one alpha per file, as sd-scripts reads it
    assert alpha * 32 >= 2 * float(torch.norm(big))  # at least twice the largest ‖Q‖/dim ratio
    assert alpha == 2.0 ** round(torch.log2(torch.tensor(alpha)).item())  # a power of two: exact in any float
    w = torch.randn(32, 16)
    for k in a.layers:
        assert torch.equal(rotate_weight(b.layers[k], w), rotate_weight(a.layers[k], w))


def test_mixed_alphas_are_applied_then_written_under_one_alpha(tmp_path):
    torch.manual_seed(1)
    q1, q2 = _skew(torch.randn(4, 8, 8)), _skew(torch.randn(4, 8, 8))
    a = OFTAdapter({("unet", "x_a"): _layer(q1, Constraint("norm_clamp", 1e-3), name="x_a"),
                    ("unet", "x_b"): _layer(q2, Constraint("norm_clamp", 2e-3), name="x_b")}, "test")
    _write_kohya(a, tmp_path / "k.safetensors")
    b = load_adapter(tmp_path / "k.safetensors")
    w = torch.randn(32, 5)
    for k in a.layers:
        assert rel_err(rotate_weight(b.layers[k], w, 0.5), rotate_weight(a.layers[k], w, 0.5)) <= REL_TOL


def test_a_format_the_adapter_refuses_is_refused_with_its_reason(tmp_path):
    """OFTAdapter.refused_formats (the trainer sets {"kohya": ...} for families sd-scripts has no OFT network for):
    that writer refuses naming the reason and writes nothing; the other formats still write."""
    from dataclasses import replace

    a = replace(load_adapter(get_case("lycoris_diag_oft_dim8").adapter),
                refused_formats={"kohya": "sd-scripts has no OFT network for SD3 models"})
    out = tmp_path / "k.safetensors"
    for write in (lambda: _write_kohya(a, out), lambda: write_adapter(a, out, "kohya")):
        with pytest.raises(OFTError, match="cannot be written as kohya: sd-scripts has no OFT network for SD3"):
            write()
        assert not out.exists()
    assert os.path.isfile(write_adapter(a, tmp_path / "l.safetensors", "lycoris"))


def test_refuses_to_overwrite_and_overwrites_when_asked(tmp_path):
    a = load_adapter(get_case("lycoris_diag_oft_dim8").adapter)
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(OFTError, match="output exists"):
        write_adapter(a, out, "lycoris")
    assert out.read_bytes() == b"keep me"
    write_adapter(a, out, "lycoris", overwrite=True)
    assert len(load_adapter(out)) == 56
    peft = load_adapter(get_case("peft_oft_cayley_bs8").adapter)
    d = tmp_path / "p"
    _write_peft(peft, d)
    with pytest.raises(OFTError, match="output exists"):
        _write_peft(peft, d)
    _write_peft(peft, d, overwrite=True)
    assert sorted(os.listdir(d)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.safetensors", "p"]


def test_peft_config_fields(tmp_path):
    for case_id, want in [("peft_oft_neumann_r4", {"r": 4, "oft_block_size": 0, "use_cayley_neumann": True,
                                                   "num_cayley_neumann_terms": 5, "peft_version": "0.21.2"}),
                          ("peft_oft_cayley_bs8", {"r": 0, "oft_block_size": 8, "use_cayley_neumann": False,
                                                   "block_share": False, "coft": False}),
                          ("peft_oft_blockshare_bs8", {"r": 0, "oft_block_size": 8, "block_share": True})]:
        d = tmp_path / case_id
        _write_peft(load_adapter(get_case(case_id).adapter), d)
        cfg = json.loads((d / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "OFT"
        assert {k: cfg[k] for k in want} == want
        assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" in cfg["target_modules"]
        with safe_open(str(d / "adapter_model.safetensors"), "pt") as f:
            key = "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.oft_R.weight"
            assert key in f.keys()


def test_peft_coft_is_kept_and_underscored_names_need_module_names(tmp_path):
    torch.manual_seed(2)
    q = _skew(torch.randn(4, 8, 8))
    coft = _layer(q, Constraint("block_projection", 1e-2), side="in", transpose=False, name="mid_block.attn.to_q")
    _write_peft(OFTAdapter({("unet", coft.name): coft}, "test"), tmp_path / "c")
    back = load_adapter(tmp_path / "c")
    (layer,) = back
    assert layer.constraint == Constraint("block_projection", 1e-2)
    assert torch.equal(layer.blocks[0], q)
    under = _layer(q, side="in", transpose=False, name="mid_block_attn_to_q")
    a = OFTAdapter({("unet", under.name): under}, "test")
    with pytest.raises(OFTError, match="module_names"):
        _write_peft(a, tmp_path / "u")
    _write_peft(a, tmp_path / "u", module_names=["mid_block.attn.to_q.weight", "mid_block.attn.to_k.weight"])
    (layer,) = load_adapter(tmp_path / "u")
    assert layer.name == "mid_block.attn.to_q"
    w = torch.randn(6, 32)
    assert torch.equal(rotate_weight(layer, w), rotate_weight(under, w))


def test_neumann_is_refused_outside_peft_and_te_outside_lycoris(tmp_path):
    q = _skew(torch.randn(4, 4, 4) * 0.01)
    neu = _layer(q, parameterization="neumann", neumann_coeffs=(1, 2, 2, 2, 1))
    with pytest.raises(OFTError, match="Cayley–Neumann"):
        _write_kohya(OFTAdapter({("unet", neu.name): neu}, "t"), tmp_path / "n.safetensors")
    te = make_layer(path="t", name="text_model_encoder_layers_0_mlp_fc1", component="te", side="out",
                    blocks=[q], transpose=True)
    a = OFTAdapter({("te", te.name): te}, "t")
    with pytest.raises(OFTError, match="text-encoder"):
        _write_kohya(a, tmp_path / "t.safetensors")
    write_adapter(a, tmp_path / "t.safetensors", "lycoris")
    with safe_open(str(tmp_path / "t.safetensors"), "pt") as f:
        assert "lora_te_text_model_encoder_layers_0_mlp_fc1.oft_blocks" in f.keys()
    assert list(load_adapter(tmp_path / "t.safetensors"))[0].component == "te"


@pytest.mark.parametrize("case_id,to", [("lycoris_diag_oft_constrained", "kohya"), ("peft_oft_neumann_r4", "peft"),
                                        ("flux_tiny_oft_attn_dim4", "lycoris"), ("lycoris_boft_dim8", "kohya")])
def test_cli_convert(case_id, to, tmp_path, capsys):
    case = get_case(case_id)
    out = _out(tmp_path, to)
    rc = cli(["convert", str(case.adapter), "--to", to, "--out", str(out)])
    if MATRIX[case_id][to] not in READER_FORMATS:
        assert rc == 2 and not out.exists()
        assert MATRIX[case_id][to] in capsys.readouterr().err
        return
    assert rc == 0 and "wrote" in capsys.readouterr().out
    _check_merged(case, load_adapter(out))
    assert cli(["convert", str(case.adapter), "--to", to, "--out", str(out)]) == 2  # exists: refused
    assert "output exists" in capsys.readouterr().err
