"""OFT → LoRA extraction (oft_core/extract.py, `python -m oft_core extract-lora`, node OFTExtractLoRA): the error
is the SVD optimum at every rank and ≈ 0 at full rank; the LoRA files load in ComfyUI's core LoRA loader and in kohya
sd-scripts (`networks.lora`, tools tier) and reproduce the trainers' merged weights at full rank."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import comfy_models
import pytest
import torch
from oracle import FIXTURES, REL_TOL, rel_err
from safetensors import safe_open
from safetensors.torch import load_file

from oft_core import OFTError, make_layer, rotate_weight
from oft_core.cli import main as cli
from oft_core.extract import extract, low_rank

FLUX_A = FIXTURES / "kohya" / "flux_tiny_oft_attn_dim4.safetensors"
FLUX_BASE = FIXTURES / "kohya" / "flux_tiny_base.safetensors"
FLUX_EXPECTED = FIXTURES / "kohya" / "flux_tiny_oft_attn_dim4_expected.safetensors"
TE_DIR = FIXTURES / "lycoris" / "lycoris_te_diag_oft_clipl"


def _optimum(dw: torch.Tensor, r: int) -> float:
    s = torch.linalg.svdvals(dw.double())
    return float(torch.sqrt((s[r:] ** 2).sum()) / torch.sqrt((s ** 2).sum()))


def _oft_delta(out, inner, b, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(out // b, b, b, generator=g) * 0.05
    layer = make_layer(path="t", name="x", side="out", blocks=[a - a.transpose(-1, -2)], transpose=True)
    w = torch.randn(out, inner, generator=g) * 0.02
    return rotate_weight(layer, w) - w


@pytest.mark.parametrize("r", [1, 8, 40])
def test_error_is_the_svd_optimum_and_zero_at_full_rank(r):
    dw = _oft_delta(96, 64, 8, 0)
    up, down, err, method = low_rank(dw, r)
    assert method == "svd" and up.shape == (96, r) and down.shape == (r, 64)
    assert err == pytest.approx(_optimum(dw, r), rel=1e-6, abs=1e-9)
    assert err == pytest.approx(rel_err_f(dw, up @ down), rel=1e-5)
    up, down, err, _ = low_rank(dw, 64)  # full rank
    assert err <= 1e-6 and rel_err(up @ down, dw) <= 1e-6
    up, down, err, _ = low_rank(dw, 10_000)  # clamped to full rank
    assert up.shape[1] == 64 and err <= 1e-6


def rel_err_f(a, approx):
    return float(torch.linalg.matrix_norm((a - approx).double()) / torch.linalg.matrix_norm(a.double()))


def test_randomized_svd_on_wide_layers_reaches_the_optimum():
    dw = _oft_delta(1536, 1024, 64, 1)
    up, down, err, method = low_rank(dw, 32)
    assert method == "randomized"
    opt = _optimum(dw, 32)
    assert opt * (1 - 1e-6) <= err <= opt * (1 + 1e-4)
    assert err == pytest.approx(rel_err_f(dw, up @ down), rel=1e-5)
    again = low_rank(dw, 32)
    assert torch.equal(again[0], up)  # seeded: the same file every time


def test_relative_error_target_picks_the_smallest_rank():
    dw = _oft_delta(96, 64, 8, 2)
    for target in (0.5, 0.1, 0.01):
        up, _, err, _ = low_rank(dw, rel_error=target)
        r = up.shape[1]
        assert err <= target and _optimum(dw, r - 1) > target
    with pytest.raises(OFTError, match="exactly one"):
        low_rank(dw, 4, 0.1)
    with pytest.raises(OFTError, match="relative error target"):
        low_rank(dw, rel_error=float("nan"))


def test_cli_full_rank_reproduces_sd_scripts_merge_and_pins_errors(tmp_path, capsys):
    ex = load_file(FLUX_EXPECTED)
    base = load_file(FLUX_BASE)
    out = tmp_path / "lora_full.safetensors"
    assert cli(["extract-lora", str(FLUX_A), "--base", str(FLUX_BASE), "--rank", "100000", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "7 LoRA layers from 8 adapted weights" in printed and "ΔW = 0, skipped" in printed
    lora = load_file(out)
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    info = json.loads(meta["comfyui_oft.extracted_from"])
    assert meta["ss_network_module"] == "networks.lora" and info["strength"] == 1.0
    checked = 0
    for key in (k for k in ex if k.startswith("merged_m1.0/")):
        path = key[len("merged_m1.0/"): -len(".weight")]
        name = "lora_unet_" + path.replace(".", "_")
        w = base[path + ".weight"]
        if f"{name}.lora_up.weight" not in lora:  # the fixture's identity layer: ΔW = 0
            assert torch.equal(ex[key], w) or rel_err(ex[key], w) < 1e-7
            continue
        up, down, alpha = lora[f"{name}.lora_up.weight"], lora[f"{name}.lora_down.weight"], lora[f"{name}.alpha"]
        assert float(alpha) == up.shape[1] == min(w.shape)  # alpha = rank: scale 1
        assert rel_err(w + up @ down, ex[key]) <= REL_TOL, name
        assert info["layers"][name]["rel_error"] <= 1e-6
        checked += 1
    assert checked == 7
    # a fixed low rank: the error reported is the SVD optimum of this layer's ΔW
    out8 = tmp_path / "lora_r8.safetensors"
    assert cli(["extract-lora", str(FLUX_A), "--base", str(FLUX_BASE), "--rank", "8", "--out", str(out8)]) == 0
    lora8 = load_file(out8)
    with safe_open(out8, "pt") as f:
        info8 = json.loads(f.metadata()["comfyui_oft.extracted_from"])
    name = "lora_unet_double_blocks_0_img_attn_proj"
    w = base["double_blocks.0.img_attn.proj.weight"]
    dw = ex["merged_m1.0/double_blocks.0.img_attn.proj.weight"] - w
    assert info8["layers"][name]["rel_error"] == pytest.approx(_optimum(dw, 8), rel=1e-4)
    assert lora8[f"{name}.lora_up.weight"].shape == (128, 8)
    # never over an existing file, and the reason is printed
    assert cli(["extract-lora", str(FLUX_A), "--base", str(FLUX_BASE), "--rank", "8", "--out", str(out8)]) == 2
    assert "output exists" in capsys.readouterr().err
    assert cli(["extract-lora", str(FLUX_A), "--base", str(FLUX_BASE), "--out", str(tmp_path / "x.safetensors")]) == 2


def test_text_encoder_and_strength(tmp_path):
    """The LyCORIS CLIP-L fixture on its checkpoint-named base: lora_te_ names, and the strength-0.5 LoRA at full
    rank gives LyCORIS' merge_to(0.5)."""
    out = tmp_path / "te.safetensors"
    assert cli(["extract-lora", str(TE_DIR / "lycoris_te_diag_oft_clipl.safetensors"), "--base",
                str(TE_DIR / "base.safetensors"), "--rank", "768", "--strength", "0.5", "--out", str(out)]) == 0
    lora, base = load_file(out), load_file(TE_DIR / "base.safetensors")
    half = load_file(TE_DIR / "merged_multiplier0.5.safetensors")
    assert len([k for k in lora if k.endswith(".alpha")]) == 4
    for key, ref in half.items():
        if not key.endswith(".weight"):
            continue
        name = "lora_te_" + key[len("cond_stage_model.transformer."): -len(".weight")].replace(".", "_")
        got = base[key] + lora[f"{name}.lora_up.weight"] @ lora[f"{name}.lora_down.weight"]
        assert rel_err(got, ref) <= REL_TOL, name


def test_conv_layers_are_written_as_kohya_conv_loras():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 4, 4, generator=g) * 0.1
    layer = make_layer(path="t", name="conv_in", side="out", blocks=[a - a.transpose(-1, -2)], transpose=True)
    from oft_core.spec import OFTAdapter

    adapter = OFTAdapter({("unet", "conv_in"): layer}, "test", "t")
    w = torch.randn(16, 8, 3, 3, generator=g)
    tensors, layers = extract(adapter, {"conv_in.weight": w}, {"conv_in.weight": w.shape}, rank=72)
    up, down = tensors["lora_unet_conv_in.lora_up.weight"], tensors["lora_unet_conv_in.lora_down.weight"]
    assert up.shape == (16, 16, 1, 1) and down.shape == (16, 8, 3, 3)  # rank clamped to min(16, 72)
    merged = w + (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
    assert rel_err(merged, rotate_weight(layer, w)) <= REL_TOL and layers[0].rel_error <= 1e-6


@pytest.mark.comfyui
def test_comfyui_core_lora_loader_applies_the_extracted_lora(comfyui_oft, tmp_path):
    """comfy.sd.load_lora_for_models (what LoraLoader runs) maps every extracted layer of the FLUX file and the
    patched weights are W + up·down; at full rank, sd-scripts' merged weights."""
    import comfy.sd
    import comfy.utils

    out = tmp_path / "lora.safetensors"
    assert cli(["extract-lora", str(FLUX_A), "--base", str(FLUX_BASE), "--rank", "128", "--out", str(out)]) == 0
    lora = comfy.utils.load_torch_file(str(out), safe_load=True)
    base = comfy_models.flux_tiny()
    model, _ = comfy.sd.load_lora_for_models(base, None, lora, 1.0, 0)
    assert len(model.patches) == 7
    ex = load_file(FLUX_EXPECTED)
    model.patch_model()
    try:
        for key in model.patches:
            path = key[len("diffusion_model."): -len(".weight")]
            got = comfy.utils.get_attr(model.model, key)
            assert rel_err(got, ex[f"merged_m1.0/{path}.weight"]) <= 1e-5, key
    finally:
        model.unpatch_model()


@pytest.mark.comfyui
def test_oft_extract_lora_node(comfyui_oft, tmp_path, monkeypatch):
    import folder_paths
    from comfyui_oft.nodes import files, hook_nodes  # noqa: F401
    from comfyui_oft.nodes.extract_node import OFTExtractLoRA

    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path))
    adapter = files.load(FLUX_A)
    base = comfy_models.flux_tiny()
    res = OFTExtractLoRA.execute(model=base, oft_adapter=adapter, rank=128, rel_error=0.0, strength=1.0,
                                 strength_mode="kohya", filename_prefix="loras/oft_lora")
    text = res.result[0]
    written = sorted(Path(tmp_path, "loras").glob("oft_lora*.safetensors"))
    assert len(written) == 1 and "7 LoRA layers from 8 adapted weights" in text
    res2 = OFTExtractLoRA.execute(model=base, oft_adapter=adapter, rank=4, rel_error=0.0, strength=1.0,
                                  strength_mode="kohya", filename_prefix="loras/oft_lora")
    assert len(sorted(Path(tmp_path, "loras").glob("oft_lora*.safetensors"))) == 2  # never over the first
    lora = load_file(written[0])
    ex = load_file(FLUX_EXPECTED)
    w = base.model.state_dict()["diffusion_model.double_blocks.0.img_attn.proj.weight"]
    name = "lora_unet_double_blocks_0_img_attn_proj"
    assert rel_err(w + lora[f"{name}.lora_up.weight"] @ lora[f"{name}.lora_down.weight"],
                   ex["merged_m1.0/double_blocks.0.img_attn.proj.weight"]) <= REL_TOL
    assert "rank 4" in res2.result[0]


@pytest.mark.comfyui
def test_oft_extract_lora_node_reads_a_scaled_fp8_models_weights(comfyui_oft, tmp_path, monkeypatch):
    """On a "scaled fp8" checkpoint (fp8 weights times a per-layer scale_weight) the LoRA is ΔW of the weights the
    layers compute with, as on an fp32 model holding those values (it was ΔW of the stored fp8 values, off by
    1/scale)."""
    import comfy.sd
    import folder_paths
    from comfyui_oft.nodes import files
    from comfyui_oft.nodes.extract_node import OFTExtractLoRA

    out = tmp_path / "out"
    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(out))
    adapter = files.load(FLUX_A)
    scaled, values = comfy_models.scaled_fp8_flux_tiny(tmp_path, monkeypatch)
    with torch.inference_mode():
        reference = comfy.sd.load_diffusion_model_state_dict(dict(values), model_options={"dtype": torch.float32})
    loras = []
    for model, prefix in ((scaled, "loras/scaled"), (reference, "loras/reference")):
        OFTExtractLoRA.execute(model=model, oft_adapter=adapter, rank=128, rel_error=0.0, strength=1.0,
                               strength_mode="kohya", filename_prefix=prefix)
        (written,) = Path(out, "loras").glob(f"{prefix.split('/')[1]}*.safetensors")
        loras.append(load_file(written))
    got, want = loras
    assert got.keys() == want.keys() and len(got) == 3 * 7
    name = "lora_unet_double_blocks_0_img_attn_proj"
    delta = lambda lora: lora[f"{name}.lora_up.weight"] @ lora[f"{name}.lora_down.weight"]  # noqa: E731
    assert rel_err(delta(got), delta(want)) <= 1e-5
    # and the reference's ΔW is what the rotation makes of those weights
    w = values["double_blocks.0.img_attn.proj.weight"]
    layer = next(x for x in adapter if x.name.replace(".", "_") == "double_blocks_0_img_attn_proj")
    assert rel_err(w + delta(want), rotate_weight(layer, w)) <= 1e-5


SDSCRIPTS_VENV = Path(os.environ.get("OFT_SDSCRIPTS_VENV", Path.home() / ".cache" / "comfyui-oft" / "venv-sdscripts"))

_SDSCRIPTS_CHECK = r"""
import json, sys, torch
from safetensors.torch import load_file
from diffusers import UNet2DConditionModel
import networks.lora as lora
fx, lora_path = sys.argv[1], sys.argv[2]
cfg = json.load(open(fx + "/unet_config.json"))
unet = UNet2DConditionModel.from_config(cfg)
base = load_file(fx + "/base_unet.safetensors")
unet.load_state_dict(base)
sd = load_file(lora_path)
net, _ = lora.create_network_from_weights(1.0, lora_path, None, [], unet, weights_sd=sd, for_inference=True)
net.merge_to([], unet, sd, torch.float32, "cpu")
names = [l.lora_name for l in net.unet_loras]
out = {k: v for k, v in unet.state_dict().items() if k.endswith(".weight")}
from safetensors.torch import save_file
save_file({k: v.contiguous() for k, v in out.items()}, sys.argv[3])
print(json.dumps({"loras": len(names)}))
"""


@pytest.mark.tools
def test_kohya_sd_scripts_loads_and_merges_the_extracted_lora(tmp_path):
    """sd-scripts' own networks.lora (in its venv) creates every module of a LoRA extracted from the LyCORIS
    fixture on the tiny diffusers UNet, and its merge_to gives the LyCORIS merged weights (full rank)."""
    py = SDSCRIPTS_VENV / "bin" / "python"
    if not py.is_file():
        pytest.skip(f"kohya sd-scripts venv not found at {SDSCRIPTS_VENV} (set OFT_SDSCRIPTS_VENV)")
    d = FIXTURES / "lycoris" / "lycoris_diag_oft_dim8"
    full = FIXTURES / "peft" / "base_unet.safetensors"
    out = tmp_path / "lora.safetensors"
    assert cli(["extract-lora", str(d / "lycoris_diag_oft_dim8.safetensors"), "--base", str(full), "--rank", "1000",
                "--out", str(out)]) == 0
    merged_out = tmp_path / "merged_by_sd_scripts.safetensors"
    run = subprocess.run([str(py), "-c", _SDSCRIPTS_CHECK, str(FIXTURES / "peft"), str(out), str(merged_out)],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1])["loras"] == 56
    got, want = load_file(merged_out), load_file(d / "merged.safetensors")
    for k, ref in want.items():
        if k.endswith(".weight"):
            assert rel_err(got[k], ref) <= 1e-5, k
