"""The loaders' checks as a user meets them in a running ComfyUI (issue 9, item 5): the adapter dropdown of /object_info
lists the OFT files only, and POST /prompt refuses a missing or non-OFT adapter file with a node error naming
adapter_name, as core's Load LoRA refuses a missing LoRA.
"""

from __future__ import annotations

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
