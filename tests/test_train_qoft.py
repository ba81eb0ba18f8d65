"""QOFT: OFTTrainer on quantized bases loaded by the real loader nodes, under inference mode as the executor runs them.

- fp8: ComfyUI's own `UNETLoader` with weight_dtype fp8_e4m3fn (always tested);
- GGUF: city96's ComfyUI-GGUF `UnetLoaderGGUF` on a Q8_0 file written here (tested when that pack and the `gguf`
  package are present: COMFYUI_GGUF_PATH, else ~/.cache/comfyui-oft/ComfyUI-GGUF; skipped with the reason otherwise).

Pinned: the base weights stay as they were, bit for bit and in their quantized dtype (dequantised per forward, never
written); the generators and their optimizer state are fp32; the loss drops; and the adapter equals the one trained
on an fp32 model holding the dequantised weights (same seed), i.e. the quantized base is read exactly as its loader
dequantises it. ComfyUI's model detection knows only FLUX's real widths (hidden 3072), so for the tiny FLUX of the
fixtures its answer is replaced by the tiny config (`tiny_flux_detection`); everything else is the loaders' own code
(dtype and manual-cast choice, ops, weight loading, GGUFModelPatcher). The real-server tier runs UNETLoader fp8 on
a checkpoint the detection knows (tests/server).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import comfy_models
import pytest
import test_train_node as ttn
import torch
from oracle import rel_err

pytestmark = pytest.mark.comfyui

tn = ttn.tn
_one_torch_thread = ttn._one_torch_thread
FLUX_FILE = comfy_models.FIXTURES / comfy_models.FLUX_TINY_BASE
KW = dict(steps=6, learning_rate=2e-2, batch_size=2, alpha=0.0, targets="attention", training_dtype="fp32",
          gradient_checkpointing_on=True)


def raw(patcher) -> dict[str, torch.Tensor]:
    """Every parameter / buffer as stored (dtype, bytes), GGML tensors as their raw blocks (read from the modules:
    a GGUF model's state_dict() is a meta-tensor stand-in)."""
    out = {}
    for mname, m in patcher.model.diffusion_model.named_modules():
        for store in (m._parameters, m._buffers):
            for k, v in store.items():
                if v is None:
                    continue
                t = v.data
                if hasattr(t, "_qdata"):  # newer ComfyUI's QuantizedTensor: its stored data and scale
                    out[f"{mname}.{k}.scale"] = (t._params.scale.dtype, t._params.scale.detach().clone())
                    t = t._qdata
                t = t if type(t) is torch.Tensor else torch.Tensor(t)
                t = t.detach()
                out[f"{mname}.{k}"] = (t.dtype, t.clone().view(torch.uint8) if t.dtype.itemsize == 1 else t.clone())
    return out


def assert_raw_equal(patcher, before):
    now = raw(patcher)
    assert now.keys() == before.keys()
    bad = [k for k in before if now[k][0] != before[k][0] or not torch.equal(now[k][1], before[k][1])]
    assert not bad, f"base weights changed: {bad[:5]}"


def train(tn, patcher, seed=0):
    import comfy.model_management

    latents, positive = ttn.flux_data()
    try:
        with torch.inference_mode():  # as ComfyUI runs nodes
            trainer, losses, meta = tn.train(patcher, latents, positive, seed=seed, **KW)
    finally:
        comfy.model_management.unload_all_models()
    return trainer, losses, meta


@pytest.fixture
def tiny_flux_detection(comfy, monkeypatch):
    import comfy.model_detection
    import comfy.supported_models

    def detect(sd, prefix, metadata=None):
        return comfy.supported_models.Flux(dict(comfy_models.FLUX_TINY_CONFIG))

    monkeypatch.setattr(comfy.model_detection, "model_config_from_unet", detect)


def load_state_dict_model(sd):
    import comfy.sd

    with torch.inference_mode():  # the executor loads under inference mode: weights are inference tensors
        return comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options={"dtype": torch.float32})


def check_qoft(tn, quantized, reference, quant_dtypes):
    before = raw(quantized)
    assert {d for d, _ in before.values()} & quant_dtypes, {d for d, _ in before.values()}
    latents, positive = ttn.flux_data()
    start = ttn.eval_loss(tn, quantized, latents, positive)
    trainer, losses, meta = train(tn, quantized)
    assert_raw_equal(quantized, before)
    assert all(p.dtype == torch.float32 for p in trainer.parameters())
    end_model = tn.apply_oft(quantized, None, tn.export_adapter(quantized, trainer, meta), 1.0)[0]
    end = ttn.eval_loss(tn, end_model, latents, positive, patched=True)
    assert end < start * 0.95, (start, end, losses)
    assert_raw_equal(quantized, before)
    ref_trainer, ref_losses, _ = train(tn, reference)
    assert torch.allclose(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-4), (losses, ref_losses)
    worst = max(float((p - q).detach().abs().max()) for p, q in zip(trainer.parameters(), ref_trainer.parameters()))
    scale = max(float(q.detach().abs().max()) for q in ref_trainer.parameters())
    assert worst <= 1e-3 * scale, (worst, scale)


def test_fp8_base_from_unetloader_trains_fp32_adapter_weights_untouched(comfy, tn, tmp_path, monkeypatch,
                                                                       tiny_flux_detection):
    import folder_paths
    from safetensors.torch import load_file

    import nodes

    (tmp_path / "diffusion_models").mkdir()
    (tmp_path / "diffusion_models" / "flux_tiny.safetensors").symlink_to(FLUX_FILE)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusion_models",
                        ([str(tmp_path / "diffusion_models")], folder_paths.supported_pt_extensions))
    folder_paths.filename_list_cache.clear()
    try:
        with torch.inference_mode():
            (fp8,) = nodes.UNETLoader().load_unet("flux_tiny.safetensors", "fp8_e4m3fn")
    finally:
        folder_paths.filename_list_cache.clear()
    # the reference: an fp32 model holding exactly the fp8 values
    sd = load_file(str(FLUX_FILE))
    dequantised = {k: v.to(torch.float8_e4m3fn).to(torch.float32) if v.is_floating_point() else v
                   for k, v in sd.items()}
    check_qoft(tn, fp8, load_state_dict_model(dequantised), {torch.float8_e4m3fn})


# ------------------------------------------------------------------------------------------------ scaled fp8
def test_scaled_fp8_checkpoint_trains_on_the_scaled_weights(comfy, tn, tmp_path, monkeypatch):
    """A "scaled fp8" checkpoint (fp8 weights and a per-layer scale_weight, as ComfyUI's fp8 *_scaled files ship
    FLUX, Wan, HiDream, T5): its Linear layers compute with fp8(W / s)·s. The trainer must read that weight, not
    the stored fp8 values without their scale (it did: the loss was NaN at the first step). Newer ComfyUI (0.8)
    loads the file as per-layer quantized Linear ops (no nn.Linear; QuantizedTensor weights): trained the same."""
    model, values = comfy_models.scaled_fp8_flux_tiny(tmp_path, monkeypatch)
    kinds = tn._weight_kinds(model.model.diffusion_model)  # what the node's report says of the base
    assert kinds in ("float8_e4m3fn scaled (36 layers)", "float8_e4m3fn quantized (float8_e4m3fn) (36 layers)"), kinds
    check_qoft(tn, model, load_state_dict_model(values), {torch.float8_e4m3fn})


def test_a_scaled_fp8_model_samples_after_training_in_the_same_session(comfy, tn, tmp_path, monkeypatch):
    """Train, then sample the same quantized model, everything in the executor's inference mode (as one workflow
    does): its weights stay inference tensors, and the base, the merged and the bypass model all run. On ComfyUI 0.8
    the trainer's load in normal mode left its QuantizedTensor weights re-wrapped as normal tensors around inference
    data, and every later load of that model failed ("Cannot set version_counter for inference tensor")."""
    import comfy.model_management

    model, _ = comfy_models.scaled_fp8_flux_tiny(tmp_path, monkeypatch)
    dm = model.model.diffusion_model
    latents, positive = ttn.flux_data()
    inputs = comfy_models.flux_inputs()
    outs = []
    try:
        with torch.inference_mode():
            trainer, _, meta = tn.train(model, latents, positive, seed=0, **dict(KW, steps=2))
            assert all(p.is_inference() for p in dm.parameters())
            comfy.model_management.unload_all_models()
            adapter = tn.export_adapter(model, trainer, meta)
            for patcher in (model.clone(), tn.apply_oft(model, None, adapter, 1.0)[0],
                            tn.apply_oft(model, None, adapter, 1.0, apply_mode="bypass")[0]):
                patcher.patch_model()
                try:
                    outs.append(comfy_models.apply_model(patcher, inputs))
                finally:
                    patcher.unpatch_model()
    finally:
        comfy.model_management.unload_all_models()
    base, merged, bypass = outs
    assert all(torch.isfinite(y).all() for y in outs)
    assert rel_err(bypass, base) > 1e-5 and rel_err(merged, base) > 1e-5  # the trained adapter acts in both modes


# ------------------------------------------------------------------------------------------------ GGUF
def gguf_pack():
    """city96's ComfyUI-GGUF imported as a package, or pytest.skip with the reason."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        pytest.skip("GGUF test: the `gguf` package is not installed (pip install gguf; ComfyUI-GGUF needs it)")
    root = Path(os.environ.get("COMFYUI_GGUF_PATH") or Path.home() / ".cache" / "comfyui-oft" / "ComfyUI-GGUF")
    if not (root / "ops.py").is_file() or not (root / "loader.py").is_file():
        pytest.skip(f"GGUF test: city96/ComfyUI-GGUF not found at {root} (set COMFYUI_GGUF_PATH to a checkout)")
    name = "comfyui_gguf_for_tests"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, root / "__init__.py",
                                                      submodule_search_locations=[str(root)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    import importlib as il

    return il.import_module(f"{name}.nodes"), il.import_module(f"{name}.loader"), il.import_module(f"{name}.dequant")


def write_gguf_q8(sd: dict[str, torch.Tensor], path: Path) -> None:
    """A FLUX GGUF as city96's tools/convert.py writes one: Q8_0 for 2-D weights whose rows are a multiple of 32,
    F32 for the rest."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="flux")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, v in sd.items():
        arr = v.float().numpy()
        if v.ndim == 2 and v.shape[1] % 32 == 0:
            q = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(key, gguf.quants.quantize(arr, q), raw_dtype=q)
        else:
            writer.add_tensor(key, arr, raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def load_tiny_flux_gguf(tmp_path: Path, monkeypatch):
    """The tiny FLUX written as a Q8_0 GGUF and loaded by city96's UnetLoaderGGUF (as users load FLUX); returns
    (the GGUF ModelPatcher, the GGUF file, the pack's loader and dequant modules). Needs `tiny_flux_detection`."""
    import folder_paths
    from safetensors.torch import load_file

    gg_nodes, gg_loader, gg_dequant = gguf_pack()
    (tmp_path / "unet").mkdir()
    path = tmp_path / "unet" / "flux_tiny_Q8_0.gguf"
    write_gguf_q8(load_file(str(FLUX_FILE)), path)
    # ("unet" is the legacy name of the diffusion_models folder)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusion_models", ([str(tmp_path / "unet")], {".gguf"}))
    folder_paths.filename_list_cache.clear()
    try:
        with torch.inference_mode():
            (model,) = gg_nodes.UnetLoaderGGUF().load_unet("flux_tiny_Q8_0.gguf")
    finally:
        folder_paths.filename_list_cache.clear()
    assert type(model).__name__ == "GGUFModelPatcher"
    qkv = model.model.diffusion_model.double_blocks[0].img_attn.qkv
    assert type(qkv.weight).__name__ == "GGMLTensor" and qkv.weight.tensor_type.name == "Q8_0"
    return model, path, gg_loader, gg_dequant


def dequantised_reference(path: Path, gg_loader, gg_dequant):
    """An fp32 model holding exactly what the GGUF loader dequantises from `path`."""
    dequantised = {k: gg_dequant.dequantize_tensor(v, torch.float32).reshape(v.tensor_shape).clone()
                   for k, v in gg_loader.gguf_sd_loader(str(path)).items()}
    return load_state_dict_model({k: torch.Tensor(v) if type(v) is not torch.Tensor else v
                                  for k, v in dequantised.items()})


@pytest.mark.third_party
def test_gguf_base_from_unetloadergguf_trains_fp32_adapter_weights_untouched(comfy, tn, tmp_path, monkeypatch,
                                                                             tiny_flux_detection):
    model, path, gg_loader, gg_dequant = load_tiny_flux_gguf(tmp_path, monkeypatch)
    check_qoft(tn, model, dequantised_reference(path, gg_loader, gg_dequant), {torch.uint8})
