"""The compatibility oracle: every reference fixture, read by our readers, gives the reference tool's merged weights.

fp32 results must be bit-for-bit or within 1e-6 relative (the fixtures README); the kohya SD1.5 file stores bf16
blocks over an fp32 base, and sd-scripts computes in fp32 from the bf16 values, as we do.
"""

import json

import pytest
import torch
from oracle import REL_TOL, case_ids, get_case, rel_err
from safetensors.torch import load_file, save_file

from oft_core import load_adapter, resolve_for_weight, rotate_weight
from oft_core.cli import main as cli


def _by_underscored(adapter):
    return {layer.name.replace(".", "_"): layer for layer in adapter}


EXPECTED_FORMATS = {
    "sd15_oft_attn_dim8_bf16": ("kohya", 128),
    "flux_tiny_oft_attn_dim4": ("kohya_flux", 8),
    "lycoris_boft_dim8": ("lycoris_boft", 56),
    "lycoris_diag_oft_constrained": ("lycoris_diag_oft", 56),
    "lycoris_diag_oft_dim8": ("lycoris_diag_oft", 56),
    "lycoris_diag_oft_rescaled": ("lycoris_diag_oft", 56),
    "lycoris_te_diag_oft_clipl": ("lycoris_diag_oft", 4),
    "peft0.13.2_oft_r4": ("peft_legacy_0.13", 56),
    "peft0.15.2_oft_bs8": ("peft_legacy_0.15", 56),
    "peft_oft_blockshare_bs8": ("peft", 56),
    "peft_oft_cayley_bs8": ("peft", 56),
    "peft_oft_neumann_r4": ("peft", 56),
}


def test_every_fixture_is_a_case():
    assert sorted(case_ids()) == sorted(EXPECTED_FORMATS)


@pytest.mark.parametrize("case_id", case_ids())
def test_reader_detects_format_and_layers(case_id):
    case = get_case(case_id)
    adapter = load_adapter(case.adapter)
    fmt, n = EXPECTED_FORMATS[case_id]
    assert adapter.format == fmt
    assert len(adapter) == n


@pytest.mark.parametrize("case_id", case_ids())
def test_merge_reproduces_reference(case_id):
    case = get_case(case_id)
    layers = _by_underscored(load_adapter(case.adapter))
    checked = unchanged = 0
    for strength, merged in case.expected.items():
        for key, ref in merged.items():
            w = case.originals[key]
            layer = resolve_for_weight(layers[case.module_key[key]], w.shape)
            out = rotate_weight(layer, w, strength)
            assert out.dtype == w.dtype and out.shape == w.shape
            err = rel_err(out, ref)
            assert err <= REL_TOL, f"{key} at strength {strength}: relative error {err:.3g}"
            if torch.equal(w, ref):  # the tool left the weight alone: right only at strength 0 or for a zero layer
                assert strength == 0 or not any(g.any() for g in layer.blocks), (
                    f"{key} at strength {strength}: the reference equals the base, yet the layer is not the identity")
                unchanged += 1
            else:  # the reference really differs from the base, so matching it means something
                assert rel_err(w, ref) > 1e-3, f"{key} at strength {strength}: the reference barely differs"
            checked += 1
    assert checked == sum(len(m) for m in case.expected.values())
    assert unchanged < checked, "every reference weight equals the base: the case checks nothing"


def _base_file(case, tmp_path):
    if case.base_file is not None:
        return case.base_file
    path = tmp_path / "base.safetensors"
    tensors = dict(case.originals)
    tensors["model.diffusion_model.untouched.weight"] = torch.randn(4, 4, dtype=torch.bfloat16)
    save_file(tensors, str(path), metadata={"base": "synthetic"})
    return path


@pytest.mark.parametrize("case_id", case_ids())
def test_bake_cli_reproduces_reference(case_id, tmp_path, capsys):
    case = get_case(case_id)
    base = _base_file(case, tmp_path)
    base_sd = load_file(str(base))
    for strength, merged in case.expected.items():
        out = tmp_path / f"baked_{strength}.safetensors"
        partial = ["--allow-unmatched"] if case.id == "sd15_oft_attn_dim8_bf16" else []  # 9 of 128 weights here
        rc = cli(["bake", "--base", str(base), "--adapter", f"{case.adapter}:{strength}", "--out", str(out)] + partial)
        assert rc == 0
        printed = capsys.readouterr().out
        n = len(load_adapter(case.adapter)) if case.id != "sd15_oft_attn_dim8_bf16" else len(merged)
        baked = load_file(str(out))
        assert baked.keys() == base_sd.keys()
        for key, t in baked.items():
            assert t.dtype == base_sd[key].dtype and t.shape == base_sd[key].shape
            if key in merged:
                assert rel_err(t, merged[key]) <= REL_TOL, key
            elif key in case.expected[1.0]:  # adapted, but the tool stored no reference at this strength (size)
                assert rel_err(t, base_sd[key]) > 1e-3, f"{key} not changed by the adapter"
            else:
                assert torch.equal(t, base_sd[key]), f"{key} changed although no adapter layer targets it"
        if case.id == "sd15_oft_attn_dim8_bf16":
            # only 9 of the file's 128 layers have base weights here: baked with --allow-unmatched below instead
            continue
        assert f"{n} of {n} adapter layers matched" in printed


def test_bake_sd15_partial_base_reports_unmatched(tmp_path, capsys):
    case = get_case("sd15_oft_attn_dim8_bf16")
    base = _base_file(case, tmp_path)
    out = tmp_path / "out.safetensors"
    rc = cli(["bake", "--base", str(base), "--adapter", str(case.adapter), "--out", str(out)])
    assert rc == 2 and not out.exists()
    assert "9 of 128 adapter layers applied" in capsys.readouterr().err
    rc = cli(["bake", "--base", str(base), "--adapter", str(case.adapter), "--out", str(out), "--allow-unmatched"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "9 of 128 adapter layers matched base keys" in printed
    assert printed.count("not matched: unet:oft_unet_") == 119
    baked = load_file(str(out))
    for key, ref in case.expected[1.0].items():
        assert rel_err(baked[key], ref) <= REL_TOL


def test_bake_flux_onto_full_base_keeps_everything_else(tmp_path):
    from oracle import FIXTURES

    case = get_case("flux_tiny_oft_attn_dim4")
    base = FIXTURES / "kohya" / "flux_tiny_base.safetensors"
    out = tmp_path / "flux_baked.safetensors"
    assert cli(["bake", "--base", str(base), "--adapter", f"{case.adapter}:0.5", "--out", str(out)]) == 0
    base_sd, baked = load_file(str(base)), load_file(str(out))
    changed = {k for k in base_sd if not torch.equal(base_sd[k], baked[k])}
    expected = {k[len("model.diffusion_model."):] for k in case.expected[0.5]}
    # txt_attn.qkv of double block 0 is the all-zero (identity) module: unchanged, as sd-scripts computes it
    assert changed == expected - {"double_blocks.0.txt_attn.qkv.weight"}
    for k in expected:
        assert rel_err(baked[k], case.expected[0.5]["model.diffusion_model." + k]) <= REL_TOL


def test_bake_applies_adapters_in_order(tmp_path):
    case = get_case("lycoris_diag_oft_dim8")
    other = get_case("lycoris_diag_oft_constrained")
    out = tmp_path / "two.safetensors"
    assert cli(["bake", "--base", str(case.base_file), "--adapter", f"{case.adapter}:0.7",
                "--adapter", f"{other.adapter}:1", "--out", str(out)]) == 0
    baked = load_file(str(out))
    a, b = _by_underscored(load_adapter(case.adapter)), _by_underscored(load_adapter(other.adapter))
    for key, w in case.originals.items():
        name = case.module_key[key]
        first = rotate_weight(resolve_for_weight(a[name], w.shape), w, 0.7)
        both = rotate_weight(resolve_for_weight(b[name], w.shape), first, 1.0)
        assert rel_err(baked[key], both) <= REL_TOL
    meta = json.loads(__import__("safetensors").safe_open(str(out), "pt").metadata()["comfyui_oft.baked"])
    assert [m["strength"] for m in meta] == [0.7, 1.0]
