"""The loaders' checks as a user meets them in a running ComfyUI (issue 9, item 5): the adapter dropdown of /object_info
lists the OFT files only, and POST /prompt refuses a missing or non-OFT adapter file with a node error naming
adapter_name, as core's Load LoRA refuses a missing LoRA.
"""

from __future__ import annotations

import json
import shutil

import comfy_server as harness
import pytest
import torch
from safetensors.torch import save_file

FLUX_ADAPTER = "kohya/flux_tiny_oft_attn_dim4.safetensors"


@pytest.fixture(scope="module")
def adapter_files(comfy_server, fixtures_dir):
    models = comfy_server.base / "models"
    shutil.copy(fixtures_dir / FLUX_ADAPTER, models / "oft" / "server_oft_a.safetensors")
    shutil.copy(fixtures_dir / FLUX_ADAPTER, models / "loras" / "server_oft_in_loras.safetensors")
    g = torch.Generator().manual_seed(0)
    save_file({"lora_unet_x.lora_up.weight": torch.randn(8, 4, generator=g),
               "lora_unet_x.lora_down.weight": torch.randn(4, 8, generator=g)},
              str(models / "loras" / "server_a_lora.safetensors"))
    return comfy_server


def _options(server, node: str, name: str) -> list:
    spec = server.get(f"/object_info/{node}")[node]["input"]["required"][name]
    return spec[1]["options"] if spec[0] == "COMBO" else spec[0]


def test_adapter_dropdown_lists_oft_files_only(adapter_files):
    server = adapter_files
    for node in ("OFTLoader", "OFTLoadAdapter"):
        options = _options(server, node, "adapter_name")
        assert {"server_oft_a.safetensors", "server_oft_in_loras.safetensors"} <= set(options), options
        assert "server_a_lora.safetensors" not in options
    assert "server_a_lora.safetensors" in _options(server, "LoraLoader", "lora_name")  # core still lists it


@pytest.mark.parametrize("name, says", [
    ("server_missing.safetensors", "'server_missing.safetensors' not found"),
    ("server_a_lora.safetensors", "this is a LoRA file, not OFT"),
])
def test_prompt_with_a_bad_adapter_file_is_refused_at_queue_time(adapter_files, name, says):
    server = adapter_files
    prompt = {"1": {"class_type": "OFTLoadAdapter", "inputs": {"adapter_name": name}},
              "2": {"class_type": "OFTInspect", "inputs": {"oft_adapter": ["1", 0]}}}
    with pytest.raises(harness.ComfyError) as e:
        server.queue(prompt)
    assert e.value.status == 400
    errors = e.value.payload["node_errors"]["1"]["errors"]
    assert len(errors) == 1, errors  # one message, for the input it is about
    assert errors[0]["extra_info"]["input_name"] == "adapter_name"
    assert errors[0]["details"].startswith("adapter_name - ") and says in errors[0]["details"], errors[0]
    # and core's own check of the same kind, for comparison: Load LoRA with a missing file
    core = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": harness.CHECKPOINT_NAME}},
            "2": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": name,
                                                                  "strength_model": 1.0}},
            "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}}
    if name.endswith("missing.safetensors"):
        with pytest.raises(harness.ComfyError) as core_e:
            server.queue(core)
        assert core_e.value.payload["node_errors"]["2"]["errors"][0]["type"] == "value_not_in_list"


def test_prompt_with_a_good_adapter_runs(adapter_files):
    server = adapter_files
    prompt = {"1": {"class_type": "OFTLoadAdapter", "inputs": {"adapter_name": "server_oft_in_loras.safetensors"}},
              "2": {"class_type": "OFTInspect", "inputs": {"oft_adapter": ["1", 0]}}}
    entry = server.run(prompt, timeout=300)
    assert "server_oft_in_loras.safetensors: 8 layers (kohya_flux)" in server.outputs(entry, "1")["text"][0]
    assert "format:     kohya" in server.outputs(entry, "2")["text"][0]


def _onetrainer_file(server, coft: bool = False) -> str:
    """A OneTrainer "OFT v2" file for two layers of the server's tiny checkpoint: an attention Linear and a
    ResBlock's 3×3 conv (OneTrainer rotates those the other way round); its COMFY output's names and its header.
    `coft`: as its Constrained-OFT era wrote it (training settings saying COFT; no Scaled OFT then), else as it
    writes now (one layer Scaled). Written into the server's oft folder; returns its name."""
    from safetensors import safe_open

    ckpt = server.base / "models" / "checkpoints" / harness.CHECKPOINT_NAME
    layers = ("input_blocks.1.1.transformer_blocks.0.attn1.to_q", "input_blocks.1.0.in_layers.2")
    g = torch.Generator().manual_seed(3)
    tensors = {}
    with safe_open(str(ckpt), "pt") as f:
        for i, path in enumerate(layers):
            shape = f.get_slice(f"model.diffusion_model.{path}.weight").get_shape()
            inner = 1
            for d in shape[1:]:
                inner *= d
            b = 4
            tensors[f"diffusion_model.{path}.oft_R.weight"] = torch.randn(inner // b, b * (b - 1) // 2,
                                                                          generator=g) * 0.1
            if i == 1 and not coft:
                tensors[f"diffusion_model.{path}.oft_R.scaled_oft"] = torch.tensor(True)
    name = f"server_onetrainer_oft{'_coft' if coft else ''}.safetensors"
    header = {"ot_branch": "master", "ot_revision": "23df383"}
    if coft:  # its training settings: Constrained OFT on, a radius the generators exceed
        header = {"ot_branch": "master", "ot_revision": "3374137", "ot_config": json.dumps(
            {"__version": 9, "oft_block_size": 4, "oft_coft": True, "coft_eps": 0.5})}
    save_file(tensors, str(server.base / "models" / "oft" / name), header)
    return name


@pytest.mark.parametrize("coft", [False, True])
def test_a_onetrainer_file_loads_and_changes_what_ksampler_samples(adapter_files, coft):
    """OneTrainer's OFT files in the running server: listed, read (OFT Inspect names the format and the Constrained
    OFT its training settings say), applied by OFT Loader to the stock loader's model ("2 of 2 adapter layers
    applied"), and the sampled latent moves."""
    server = adapter_files
    name = _onetrainer_file(server, coft)
    assert name in _options(server, "OFTLoader", "adapter_name")
    entry = server.run({"1": {"class_type": "OFTLoadAdapter", "inputs": {"adapter_name": name}},
                        "2": {"class_type": "OFTInspect", "inputs": {"oft_adapter": ["1", 0]}}}, timeout=300)
    text = server.outputs(entry, "2")["text"][0]
    assert "format:     peft_onetrainer" in text
    want = "constraint: COFT eps 0.5 (Linear layers only) (2 layers)" if coft else "constraint: none (2 layers)"
    assert want in text, text

    base, adapted = _sampled(server, None, f"onetrainer_{coft}"), _sampled(server, name, f"onetrainer_{coft}")
    assert float((adapted - base).abs().max()) > 1e-3 * float(base.abs().max())


def _sampled(server, adapter: str | None, tag: str, layers: int = 2) -> torch.Tensor:
    """The latent KSampler makes (2 euler steps, seed 5) from the stock checkpoint loader's model, through OFT
    Loader with `adapter` (None: without), asserting the loader's report."""
    from safetensors.torch import load_file

    p = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": harness.CHECKPOINT_NAME}},
         "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a cat"}},
         "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
         "6": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["3", 0], "negative": ["3", 0],
                                                    "latent_image": ["5", 0], "seed": 5, "steps": 2, "cfg": 1.0,
                                                    "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
         "7": {"class_type": "SaveLatent",
               "inputs": {"samples": ["6", 0], "filename_prefix": f"latents/{tag}_{adapter is not None}"}}}
    if adapter is not None:
        p["2"] = {"class_type": "OFTLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "adapter_name": adapter,
                                                        "strength": 1.0, "strength_mode": "kohya"}}
        p["6"]["inputs"]["model"] = ["2", 0]
    entry = server.run(p, timeout=600)
    if adapter is not None:
        assert f"{layers} of {layers} adapter layers applied" in server.outputs(entry, "2")["text"][0]
    (path,) = sorted((server.base / "output" / "latents").glob(f"{tag}_{adapter is not None}_*.latent"))
    return load_file(str(path))["latent_tensor"].float()


def test_a_peft_boft_adapter_with_trained_biases_changes_what_ksampler_samples(adapter_files):
    """A PEFT BOFT adapter directory (two butterfly factors, a trained bias as PEFT's BOFT examples train it, diffusers
    names) in the running server: listed, read (OFT Inspect: format peft_boft, one layer training its bias), applied
    by OFT Loader to the stock loader's model, and the sampled latent moves."""
    from safetensors import safe_open

    from oft_core.names import _ldm_to_diffusers_names

    server = adapter_files
    ckpt = server.base / "models" / "checkpoints" / harness.CHECKPOINT_NAME
    with safe_open(str(ckpt), "pt") as f:
        shapes = {k[len("model.diffusion_model."):]: tuple(f.get_slice(k).get_shape()) for k in f.keys()
                  if k.startswith("model.diffusion_model.")}
    to_diffusers = _ldm_to_diffusers_names(shapes)
    g = torch.Generator().manual_seed(4)
    tensors = {}
    for path in ("input_blocks.1.1.transformer_blocks.0.attn1.to_q", "input_blocks.1.0.in_layers.2"):
        shape = shapes[f"{path}.weight"]
        inner = 1
        for d in shape[1:]:
            inner *= d
        module = f"base_model.model.{to_diffusers[path]}"
        tensors[f"{module}.boft_R"] = 0.1 * torch.randn(2, 4, inner // 4, inner // 4, generator=g)
        tensors[f"{module}.boft_s"] = 1 + 0.1 * torch.randn((shape[0], 1) if len(shape) == 2 else (1, shape[0]),
                                                            generator=g)
        if f"{path}.bias" in shapes:
            tensors[f"{module}.base_layer.bias"] = torch.randn(shape[0], generator=g)
    d = server.base / "models" / "oft" / "server_boft"
    d.mkdir()
    save_file(tensors, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "BOFT", "boft_block_num": 4,
                                                       "boft_block_size": 0, "boft_n_butterfly_factor": 2,
                                                       "bias": "boft_only"}))
    name = "server_boft/adapter_model.safetensors"
    assert name in _options(server, "OFTLoader", "adapter_name")
    entry = server.run({"1": {"class_type": "OFTLoadAdapter", "inputs": {"adapter_name": name}},
                        "2": {"class_type": "OFTInspect", "inputs": {"oft_adapter": ["1", 0]}}}, timeout=300)
    text = server.outputs(entry, "2")["text"][0]
    assert "format:     peft_boft" in text and "biases:     1 layers train their bias" in text, text
    base, adapted = _sampled(server, None, "boft"), _sampled(server, name, "boft")
    assert float((adapted - base).abs().max()) > 1e-3 * float(base.abs().max())
