"""PEFT BOFT files (`peft_type` BOFT: `.boft_R` (factors, blocks, b, b) and `.boft_s`): read as PEFT computes them,
W' = (W·Mᵀ) ⊙ s with M the product of its butterfly factors P·blockdiag((I − S_i)(I + S_i)⁻¹)·Pᵀ, S_i = ½(A_i − A_iᵀ)
(one factor, PEFT's default: no permutation), a Conv2d's (in · kh · kw) axis rotated (fp64 statements in
tests/oracle.py; PEFT's own merge in tests/test_tools.py). What the pack does not apply is refused by name: trained
biases and modules saved beside the adapter, layouts PEFT itself refuses."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from oracle import REL_TOL, peft_boft_weight, rel_err
from safetensors.torch import load_file, save_file

from oft_core import OFTError, load_adapter, match_adapter, resolve_for_weight, rotate_weight
from oft_core.bake import bake
from oft_core.combine import blend, merge
from oft_core.extract import extract
from oft_core.formats import write_adapter
from oft_core.rotation import adapted_bias, bypass_forward
from oft_core.summary import describe, format_text

PREFIX = "base_model.model."


def _boft_dir(tmp_path, tensors: dict, config: dict | None = None, name: str = "boft"):
    d = tmp_path / name
    d.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "adapter_model.safetensors"))
    cfg = {"peft_type": "BOFT", "boft_block_size": 0, "boft_block_num": 2, "boft_n_butterfly_factor": 1,
           "bias": "none", "target_modules": ["to_q", "conv1"], "peft_version": "0.21.2", **(config or {})}
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    return d


def _layers(seed: int = 0):
    """A Linear 16 → 12 and a 3×3 Conv2d 4 → 6, each with two blocks on its input axis, PEFT-shaped tensors."""
    g = torch.Generator().manual_seed(seed)
    return {
        f"{PREFIX}attn.to_q.boft_R": 0.1 * torch.randn(1, 2, 8, 8, generator=g),
        f"{PREFIX}attn.to_q.boft_s": 1 + 0.1 * torch.randn(12, 1, generator=g),
        f"{PREFIX}resnet.conv1.boft_R": 0.1 * torch.randn(1, 2, 18, 18, generator=g),
        f"{PREFIX}resnet.conv1.boft_s": 1 + 0.1 * torch.randn(1, 6, generator=g),
    }


@pytest.mark.parametrize("module, shape", [("attn.to_q", (12, 16)), ("resnet.conv1", (6, 4, 3, 3))])
def test_one_factor_is_peft_boft_merge(tmp_path, module, shape):
    tensors = _layers()
    adapter = load_adapter(_boft_dir(tmp_path, tensors))
    assert adapter.format == "peft_boft" and len(adapter) == 2
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    layer = resolve_for_weight(adapter.layers[("unet", module)], w.shape)
    got = rotate_weight(layer, w)
    want = peft_boft_weight(w, tensors[f"{PREFIX}{module}.boft_R"], tensors[f"{PREFIX}{module}.boft_s"])
    assert rel_err(got, want) <= REL_TOL
    assert rel_err(got, w.double()) > 0.05  # the layer does something


def test_zero_generators_and_unit_scale_give_the_weight(tmp_path):
    tensors = {f"{PREFIX}attn.to_q.boft_R": torch.zeros(1, 2, 8, 8), f"{PREFIX}attn.to_q.boft_s": torch.ones(12, 1)}
    layer = load_adapter(_boft_dir(tmp_path, tensors)).layers[("unet", "attn.to_q")]
    w = torch.randn(12, 16)
    assert torch.equal(rotate_weight(resolve_for_weight(layer, w.shape), w), w)


def test_without_its_config_the_tensors_say_everything(tmp_path):
    tensors = _layers(seed=1)
    d = _boft_dir(tmp_path, tensors)
    (d / "adapter_config.json").unlink()
    layer = load_adapter(d).layers[("unet", "attn.to_q")]
    w = torch.randn(12, 16)
    want = peft_boft_weight(w, tensors[f"{PREFIX}attn.to_q.boft_R"], tensors[f"{PREFIX}attn.to_q.boft_s"])
    assert rel_err(rotate_weight(resolve_for_weight(layer, w.shape), w), want) <= REL_TOL


def _refused(tmp_path, tensors, config=None, match="", name="boft"):
    with pytest.raises(OFTError, match=match) as e:
        load_adapter(_boft_dir(tmp_path, tensors, config, name))
    return str(e.value)


@pytest.mark.parametrize("factors", [2, 3])
@pytest.mark.parametrize("strength", [1.0, 0.5, -1.0])
def test_several_butterfly_factors_are_peft_boft_merge(tmp_path, factors, strength):
    """PEFT's butterfly stages (boft_n_butterfly_factor > 1, trained where PEFT's CUDA extension builds): a Linear
    with 4 blocks of 8 and 2 or 3 factors, a 3×3 Conv2d with 2 blocks of 18 and 2: each factor P·B·Pᵀ with PEFT's
    block butterfly permutation, as the fp64 statement (tests/oracle.py) says, at strengths 1, 0.5 and −1; the
    bypass path (the input rotated) gives the merged layer's output."""
    g = torch.Generator().manual_seed(factors)
    tensors = {f"{PREFIX}attn.to_q.boft_R": 0.1 * torch.randn(factors, 4, 8, 8, generator=g),
               f"{PREFIX}attn.to_q.boft_s": 1 + 0.1 * torch.randn(12, 1, generator=g),
               f"{PREFIX}resnet.conv1.boft_R": 0.1 * torch.randn(2, 2, 18, 18, generator=g),
               f"{PREFIX}resnet.conv1.boft_s": 1 + 0.1 * torch.randn(1, 6, generator=g)}
    adapter = load_adapter(_boft_dir(tmp_path, tensors, {"boft_block_num": 0, "boft_n_butterfly_factor": factors}))
    for module, shape in (("attn.to_q", (12, 32)), ("resnet.conv1", (6, 4, 3, 3))):
        layer = adapter.layers[("unet", module)]
        assert layer.kind == "butterfly" and layer.butterfly == "peft"
        w = torch.randn(*shape, generator=g)
        layer = resolve_for_weight(layer, w.shape)
        got = rotate_weight(layer, w, strength)
        want = peft_boft_weight(w, tensors[f"{PREFIX}{module}.boft_R"], tensors[f"{PREFIX}{module}.boft_s"],
                                strength)
        assert rel_err(got, want) <= REL_TOL, module
        assert rel_err(got, w.double()) > 0.05
        x = torch.randn(5, *shape[1:2], *((7, 7) if len(shape) == 4 else ()), generator=g)
        merged = F.linear(x, got) if len(shape) == 2 else F.conv2d(x, got, padding=1)
        assert rel_err(bypass_forward(layer, x, w, strength=strength, padding=1 if len(shape) == 4 else 0),
                       merged) <= 10 * REL_TOL, module


def test_a_factor_that_does_not_fit_the_blocks_is_refused(tmp_path):
    """PEFT's own rule: the block count a multiple of 2^(factors − 1), the block size even."""
    tensors = _layers()
    tensors[f"{PREFIX}attn.to_q.boft_R"] = torch.zeros(3, 2, 8, 8)  # 2 blocks cannot take 3 factors
    _refused(tmp_path, tensors, {"boft_n_butterfly_factor": 3}, match="PEFT BOFT layout")
    tensors = _layers()
    tensors[f"{PREFIX}resnet.conv1.boft_R"] = torch.zeros(2, 4, 9, 9)  # odd blocks cannot be halved
    _refused(tmp_path, tensors, {"boft_block_num": 0}, match="PEFT BOFT layout", name="odd")


@pytest.mark.parametrize("extra, what", [
    ({f"{PREFIX}attn.to_k.base_layer.bias": torch.zeros(12)}, "attn.to_k.base_layer.bias"),
    ({f"{PREFIX}norm.bias": torch.zeros(12)}, "norm.bias"),
    ({f"{PREFIX}conv_out.weight": torch.zeros(4, 6, 3, 3)}, "conv_out.weight"),
])
def test_trained_tensors_of_modules_without_an_adapter_are_refused(tmp_path, extra, what):
    """PEFT's bias 'all' saves every bias of the model, modules_to_save whole modules: the pack applies adapters
    only, so such a file is refused by name, with what to do instead."""
    text = _refused(tmp_path, {**_layers(), **extra}, {"bias": "all"}, match="trained base-model tensor")
    assert what in text and "'all'" in text and "adapter_model.safetensors" in text
    assert "merge_and_unload" in text and "bias 'none'" in text  # what to do instead


def _biased(seed: int = 4):
    g = torch.Generator().manual_seed(seed)
    return {**_layers(seed), f"{PREFIX}attn.to_q.base_layer.bias": torch.randn(12, generator=g),
            f"{PREFIX}resnet.conv1.base_layer.bias": torch.randn(6, generator=g)}


@pytest.mark.parametrize("strength", [1.0, 0.5, -1.0, 0.0])
def test_a_trained_bias_replaces_the_base_bias(tmp_path, strength):
    """PEFT's bias 'boft_only' / 'oft_only' (its BOFT examples' setting) saves each adapted module's trained bias
    (`base_layer.bias`); PEFT's merge keeps it in place of the base bias, the pack too: at strength s,
    b + s·(trained − b), the base itself at 0."""
    tensors = _biased()
    adapter = load_adapter(_boft_dir(tmp_path, tensors, {"bias": "boft_only"}))
    base = torch.randn(12, generator=torch.Generator().manual_seed(9))
    for module in ("attn.to_q", "resnet.conv1"):
        assert torch.equal(adapter.layers[("unet", module)].bias, tensors[f"{PREFIX}{module}.base_layer.bias"])
    layer = adapter.layers[("unet", "attn.to_q")]
    trained = tensors[f"{PREFIX}attn.to_q.base_layer.bias"]
    got = adapted_bias(layer, base, strength)
    assert rel_err(got, base.double() + strength * (trained.double() - base.double())) <= REL_TOL
    if strength == 1.0:
        assert torch.equal(got, trained)
    if strength == 0.0:
        assert got is base
    assert "biases:     2 layers train their bias" in format_text(describe(adapter))
    # the activation-side forward: the merged weight's output with the adapted bias
    layer = resolve_for_weight(layer, (12, 16))
    x, w = torch.randn(3, 16), torch.randn(12, 16)
    want = F.linear(x.double(), rotate_weight(layer, w, strength).double(), got.double())
    assert rel_err(bypass_forward(layer, x, w, base, strength), want) <= 10 * REL_TOL
    with pytest.raises(OFTError, match="trains its bias, and no base bias"):
        bypass_forward(layer, x, w, None, strength)


def test_a_peft_oft_file_with_trained_biases_reads_them_too(tmp_path):
    """The same for PEFT OFT (bias 'oft_only'): its trained biases were silently left out before."""
    d = tmp_path / "oft"
    d.mkdir()
    b = 4
    bias = torch.randn(12, generator=torch.Generator().manual_seed(2))
    save_file({f"{PREFIX}attn.to_q.oft_R.weight": torch.zeros(4, b * (b - 1) // 2),
               f"{PREFIX}attn.to_q.base_layer.bias": bias}, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "OFT", "oft_block_size": b, "r": 0,
                                                       "bias": "oft_only", "use_cayley_neumann": False}))
    layer = load_adapter(d).layers[("unet", "attn.to_q")]
    assert torch.equal(layer.bias, bias)
    with pytest.raises(OFTError, match="trained bias length: expected 10"):
        resolve_for_weight(layer, (10, 16))


@pytest.mark.parametrize("bias, match", [
    (torch.full((12,), float("nan")), "trained bias contains NaN"),
    (torch.zeros(3, 4), r"trained bias: expected a floating-point vector"),
])
def test_a_hostile_bias_is_refused(tmp_path, bias, match):
    tensors = {**_layers(), f"{PREFIX}attn.to_q.base_layer.bias": bias}
    _refused(tmp_path, tensors, match=match)


def test_a_bias_the_base_cannot_take_is_refused_by_name(tmp_path):
    """Matched against a base without a bias there, or of another length: refused naming the layer, never applied
    without its bias."""
    adapter = load_adapter(_boft_dir(tmp_path, _biased()))
    shapes = {"attn.to_q.weight": (12, 16), "resnet.conv1.weight": (6, 4, 3, 3), "resnet.conv1.bias": (6,)}
    with pytest.raises(OFTError, match="trains a bias of 12 values for attn.to_q.weight.*has no bias") as e:
        match_adapter(adapter, shapes)
    assert "attn.to_q" in str(e.value)
    with pytest.raises(OFTError, match=r"has a bias of shape \(10,\) there"):
        match_adapter(adapter, {**shapes, "attn.to_q.bias": (10,)})
    assert len(match_adapter(adapter, {**shapes, "attn.to_q.bias": (12,)}).matched) == 2


def test_what_cannot_hold_a_trained_bias_refuses_it(tmp_path):
    """Writers (no OFT file the pack writes holds a bias), blend / merge of adapters and LoRA extraction: each
    refuses a layer that trains its bias, naming it, instead of dropping the bias."""
    adapter = load_adapter(_boft_dir(tmp_path, _biased()))
    for fmt in ("kohya", "lycoris", "peft"):
        with pytest.raises(OFTError, match="trains its layer's bias"):
            write_adapter(adapter, tmp_path / f"out_{fmt}", fmt)
    with pytest.raises(OFTError, match="trains its bias"):
        blend(adapter, adapter, 0.5)
    with pytest.raises(OFTError, match="trains its bias"):
        merge([(adapter, 1.0), (adapter, 1.0)])
    shapes = {"attn.to_q.weight": (12, 16), "attn.to_q.bias": (12,), "resnet.conv1.weight": (6, 4, 3, 3),
              "resnet.conv1.bias": (6,)}
    with pytest.raises(OFTError, match="train their bias.*LoRA"):
        extract(adapter, {k: torch.randn(*v) for k, v in shapes.items()}, shapes, rank=2)


def test_a_blend_keeps_pefts_butterfly_stages(tmp_path):
    """Blending a PEFT BOFT adapter of two factors with itself gives its own rotation: the blended layer keeps
    PEFT's stage permutation (a rebuilt layer once fell back to LyCORIS's)."""
    g = torch.Generator().manual_seed(8)
    tensors = {f"{PREFIX}attn.to_q.boft_R": 0.1 * torch.randn(2, 4, 8, 8, generator=g),
               f"{PREFIX}attn.to_q.boft_s": torch.ones(12, 1)}
    adapter = load_adapter(_boft_dir(tmp_path, tensors, {"boft_block_num": 0}))
    blended = blend(adapter, adapter, 0.5)
    layer, mixed = (resolve_for_weight(a.layers[("unet", "attn.to_q")], (12, 32)) for a in (adapter, blended))
    assert mixed.butterfly == "peft"
    w = torch.randn(12, 32, generator=g)
    assert rel_err(rotate_weight(mixed, w), rotate_weight(layer, w).double()) <= REL_TOL


def test_bake_writes_the_trained_bias_beside_the_rotated_weight(tmp_path):
    """The command line's bake (streamed, layer by layer): each weight as PEFT merges it, each trained bias in place
    of the base's at strength 1, halfway at 0.5; every other tensor as it was."""
    tensors = _biased()
    d = _boft_dir(tmp_path, tensors, {"bias": "boft_only"})
    g = torch.Generator().manual_seed(11)
    base = {"attn.to_q.weight": torch.randn(12, 16, generator=g), "attn.to_q.bias": torch.randn(12, generator=g),
            "resnet.conv1.weight": torch.randn(6, 4, 3, 3, generator=g),
            "resnet.conv1.bias": torch.randn(6, generator=g), "other.bias": torch.randn(5, generator=g)}
    save_file(base, str(tmp_path / "base.safetensors"))
    for strength in (1.0, 0.5):
        out = tmp_path / f"baked_{strength}.safetensors"
        bake(str(tmp_path / "base.safetensors"), [(str(d), strength)], str(out), show_progress=False)
        got = load_file(str(out))
        for module in ("attn.to_q", "resnet.conv1"):
            want_w = peft_boft_weight(base[f"{module}.weight"], tensors[f"{PREFIX}{module}.boft_R"],
                                      tensors[f"{PREFIX}{module}.boft_s"], strength)
            assert rel_err(got[f"{module}.weight"], want_w) <= REL_TOL, module
            b, t = base[f"{module}.bias"].double(), tensors[f"{PREFIX}{module}.base_layer.bias"].double()
            assert rel_err(got[f"{module}.bias"], b + strength * (t - b)) <= REL_TOL, module
        assert torch.equal(got["other.bias"], base["other.bias"])


@pytest.mark.parametrize("change, match", [
    ({"peft_type": "OFT"}, "expected 'BOFT'"),
    ({"boft_block_size": 4, "boft_block_num": 0}, "boft_block_size 4"),
    ({"boft_block_num": 3}, "boft_block_num 3"),
    ({"boft_block_num": -1}, "boft_block_num: expected an integer ≥ 0"),
    ({"boft_n_butterfly_factor": "2"}, "boft_n_butterfly_factor: expected an integer ≥ 0"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out"),
])
def test_a_config_that_disagrees_is_refused(tmp_path, change, match):
    _refused(tmp_path, _layers(), change, match=match)


@pytest.mark.parametrize("key, value, match", [
    ("attn.to_q.boft_R", torch.zeros(2, 8, 8), r"expected \(butterfly factors, blocks, b, b\)"),
    ("attn.to_q.boft_R", torch.zeros(1, 2, 8, 7), r"expected \(butterfly factors, blocks, b, b\)"),
    ("attn.to_q.boft_s", torch.ones(12), r"expected \(out, 1\)"),
    ("attn.to_q.boft_s", torch.ones(3, 4), r"expected \(out, 1\)"),
    ("attn.to_q.boft_R", torch.full((1, 2, 8, 8), float("nan")), "NaN"),
])
def test_hostile_tensors_are_refused(tmp_path, key, value, match):
    tensors = _layers()
    tensors[PREFIX + key] = value
    _refused(tmp_path, tensors, match=match)


def test_a_missing_scale_and_a_wrong_width_are_refused(tmp_path):
    tensors = _layers()
    del tensors[f"{PREFIX}attn.to_q.boft_s"]
    _refused(tmp_path, tensors, match="no .boft_s")
    layer = load_adapter(_boft_dir(tmp_path, _layers(), name="ok")).layers[("unet", "attn.to_q")]
    with pytest.raises(OFTError, match="attn.to_q"):
        resolve_for_weight(layer, (12, 24))  # 2 blocks of 8 rotate 16 input features, not 24
    with pytest.raises(OFTError, match="attn.to_q"):
        resolve_for_weight(layer, (10, 16))  # 12 row scales for 10 output rows


def test_mixed_with_oft_keys_is_refused(tmp_path):
    tensors = {**_layers(), f"{PREFIX}attn.to_k.oft_R.weight": torch.zeros(2, 28)}
    _refused(tmp_path, tensors, match="mixes PEFT BOFT")
