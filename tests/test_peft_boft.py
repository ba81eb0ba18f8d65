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
from safetensors.torch import save_file

from oft_core import OFTError, load_adapter, resolve_for_weight, rotate_weight
from oft_core.rotation import bypass_forward

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
    ({f"{PREFIX}attn.to_q.base_layer.bias": torch.zeros(12)}, "base_layer.bias"),
    ({f"{PREFIX}conv_out.weight": torch.zeros(4, 6, 3, 3)}, "conv_out.weight"),
])
def test_trained_biases_and_saved_modules_are_refused(tmp_path, extra, what):
    """PEFT's bias 'boft_only' (its dreambooth example's setting) saves the adapted modules' trained biases, and
    modules_to_save whole modules: applying only the rotations would not give the trained model."""
    text = _refused(tmp_path, {**_layers(), **extra}, {"bias": "boft_only"}, match="trained base-model tensor")
    assert what in text and "'boft_only'" in text and "adapter_model.safetensors" in text
    assert "merge_and_unload" in text and "bias 'none'" in text  # what to do instead


def test_a_peft_oft_file_with_trained_biases_is_refused_too(tmp_path):
    """The same rule for PEFT OFT (bias 'oft_only'): its trained biases were silently left out before."""
    d = tmp_path / "oft"
    d.mkdir()
    b = 4
    save_file({f"{PREFIX}attn.to_q.oft_R.weight": torch.zeros(4, b * (b - 1) // 2),
               f"{PREFIX}attn.to_q.base_layer.bias": torch.zeros(12)}, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "OFT", "oft_block_size": b, "r": 0,
                                                       "bias": "oft_only", "use_cayley_neumann": False}))
    with pytest.raises(OFTError, match="trained base-model tensor") as e:
        load_adapter(d)
    assert "'oft_only'" in str(e.value)


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
