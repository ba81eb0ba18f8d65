"""The trainer as users run it: ComfyUI's main.py, the stock loader and dataset nodes, the executor's inference mode.

CheckpointLoaderSimple → Load Image Dataset from Folder → VAE Encode → OFTTrainer → OFT Save, then the saved file
through OFTLoader → KSampler → VAE Decode → Save Image; training again after a KSampler loaded and patched the
model; Cancel mid-training. "Base unchanged" is checked on the numbers: a KSampler on the model object the trainer
used (the checkpoint loader's cached output) must give the same latent, bit for bit, as on a separate load.
"""

from __future__ import annotations

import time
from pathlib import Path

import comfy_server as harness
import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.server

CKPT = harness.CHECKPOINT_NAME
FRESH_CKPT = "oft_tiny_sd15_fresh.safetensors"  # a second name for the same file: loaded only by the first training
INTERRUPT_CKPT = "oft_tiny_sd15_interrupt.safetensors"
IMAGES = "oft_server_train"


def _link(server, name):
    target = server.base / "models" / "checkpoints" / name
    if not target.exists():
        target.symlink_to(harness.tiny_sd15_checkpoint())
    return name


def train_prompt(ckpt: str, *, steps: int = 3, prefix: str = "loras/oft_server", checkpointing: bool = True,
                 lr: float = 5e-2, dtype: str = "fp32", seed: int = 0) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "OFTLoadImages", "inputs": {"folder": IMAGES, "longer_side": 0}},
        "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 2]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of sks pattern"}},
        "5": {"class_type": "OFTTrainer", "inputs": {
            "model": ["1", 0], "latents": ["3", 0], "positive": ["4", 0], "steps": steps, "learning_rate": lr,
            "batch_size": 1, "grad_accumulation": 1, "optimizer": "AdamW", "seed": seed, "num_blocks": 4,
            "constraint": 0.0, "cayley_neumann": False, "neumann_terms": 5, "targets": "attention",
            "training_dtype": dtype, "gradient_checkpointing": checkpointing}},
        "6": {"class_type": "OFTSave", "inputs": {"oft_adapter": ["5", 1], "format": "kohya",
                                                  "filename_prefix": prefix, "fractional_block_strength": "refuse"}},
    }


def sample_prompt(ckpt: str, *, adapter: str | None = None, strength: float = 1.0, prefix: str = "oft_srv") -> dict:
    """ckpt [→ OFTLoader] → KSampler (2 steps, 64×64) → SaveLatent + VAE Decode → Save Image."""
    p = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of sks pattern"}},
        "10": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "11": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["4", 0], "negative": ["4", 0], "latent_image": ["10", 0], "seed": 7,
            "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "12": {"class_type": "SaveLatent", "inputs": {"samples": ["11", 0], "filename_prefix": f"latents/{prefix}"}},
        "13": {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["1", 2]}},
        "14": {"class_type": "SaveImage", "inputs": {"images": ["13", 0], "filename_prefix": prefix}},
    }
    if adapter is not None:
        p["20"] = {"class_type": "OFTLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "adapter_name": adapter,
                                                         "strength": strength, "strength_mode": "kohya"}}
        p["11"]["inputs"]["model"] = ["20", 0]
    return p


def _latent(server, entry, node="12") -> torch.Tensor:
    item = server.outputs(entry, node)["latents"][0]
    return load_file(str(server.base / "output" / item["subfolder"] / item["filename"]))["latent_tensor"]


def _saved_path(server, entry, node="6") -> Path:
    text = "\n".join(server.outputs(entry, node).get("text", [])).splitlines()[0]  # (format notes may follow)
    assert "saved kohya adapter" in text, f"OFTSave reported {text!r}"
    path = Path(text.split("\n", 1)[0].rsplit(": ", 1)[1].strip())  # line 1; "note: …" lines may follow
    assert path.is_file() and path.is_relative_to(server.base / "output"), path
    return path


def _executed(server, prompt_id) -> set[str]:
    """Node ids the executor actually ran (not served from its cache) for a prompt, from the websocket."""
    cached = set()
    for m in server.ws_for(prompt_id, "execution_cached"):
        cached.update(m["data"].get("nodes", []))
    ran = {m["data"]["node"] for m in server.ws_for(prompt_id, "executing") if m["data"].get("node")}
    return ran - cached


@pytest.fixture(scope="module")
def srv(comfy_server):
    harness.write_images(comfy_server.base / "input" / IMAGES, n=2, size=64)
    return comfy_server


@pytest.fixture(scope="module")
def reference_latent(srv):
    """KSampler's latent on a separately loaded copy of the checkpoint (never trained on)."""
    name = _link(srv, "oft_tiny_sd15_reference.safetensors")
    return _latent(srv, srv.run(sample_prompt(name, prefix="reference")))


@pytest.fixture(scope="module")
def trained(srv, reference_latent):
    """First training run, on a model no KSampler has touched, then the base checked: (history entry, file)."""
    name = _link(srv, FRESH_CKPT)
    t0 = time.monotonic()
    entry = srv.run(train_prompt(name, steps=3))
    seconds = time.monotonic() - t0
    path = _saved_path(srv, entry)
    return entry, path, seconds


def test_train_on_stock_loader_model_first_run(srv, trained, reference_latent):
    entry, path, seconds = trained
    sd = load_file(str(path))
    blocks = {k: v for k, v in sd.items() if k.endswith(".oft_blocks")}
    assert blocks and all(k.startswith("oft_unet_") for k in blocks)
    # transformers: 1 in the input level, 1 in the middle, 2 in the output level (num_res_blocks + 1);
    # attn1/attn2 × to_q/k/v/out = 8 layers each
    assert len(blocks) == 4 * 8, sorted(blocks)[:5]
    assert all(torch.isfinite(v).all() for v in blocks.values())
    assert sum(float(v.abs().max()) > 0 for v in blocks.values()) >= len(blocks) // 2, "training changed nothing"
    loss = srv.outputs(entry, "5")
    # the base model object the trainer used (cached loader output) still samples exactly as a separate load
    check = srv.queue(sample_prompt(FRESH_CKPT, prefix="after_first"))
    after = srv.wait(check)
    assert after["status"]["status_str"] == "success", harness.history_messages(after)
    assert "1" not in _executed(srv, check), "the checkpoint was reloaded: the check would prove nothing"
    assert torch.equal(_latent(srv, after), reference_latent), "base weights changed by training"
    assert loss is not None


def test_trained_file_loads_and_samples(srv, trained, reference_latent):
    _entry, path, _ = trained
    name = path.name  # output/loras is one of the 'loras' folders main.py registers; OFTLoader lists them
    info = srv.object_info()["OFTLoader"]["input"]["required"]["adapter_name"]
    options = info[0] if isinstance(info[0], list) else info[1].get("options", [])
    assert name in options, f"{name} not offered by OFTLoader: {options}"
    entry = srv.run(sample_prompt(harness.CHECKPOINT_NAME, adapter=name, prefix="with_adapter"))
    text = " ".join(srv.outputs(entry, "20").get("text", []))
    assert "32 of 32" in text, text
    lat = _latent(srv, entry)
    assert torch.isfinite(lat).all()
    assert not torch.equal(lat, reference_latent), "the adapter changed nothing in the sampled latent"
    images = srv.outputs(entry, "14")["images"]
    assert (srv.base / "output" / images[0]["subfolder"] / images[0]["filename"]).is_file()


def test_train_again_after_ksampler_loaded_and_patched_the_model(srv, trained, reference_latent):
    _entry, path, _ = trained
    # A KSampler runs the OFT-patched clone of this checkpoint's model: its weights are loaded and patched.
    srv.run(sample_prompt(harness.CHECKPOINT_NAME, adapter=path.name, prefix="before_retrain"))
    entry = srv.run(train_prompt(harness.CHECKPOINT_NAME, steps=2, prefix="loras/oft_retrain", checkpointing=False,
                                 dtype="bf16"))
    assert _saved_path(srv, entry).is_file()
    check = srv.queue(sample_prompt(harness.CHECKPOINT_NAME, prefix="after_retrain"))
    after = srv.wait(check)
    assert after["status"]["status_str"] == "success", harness.history_messages(after)
    assert "1" not in _executed(srv, check)
    assert torch.equal(_latent(srv, after), reference_latent), "base weights changed by the second training"


def test_fp16_training_in_the_server_trains_and_samples(srv, reference_latent):
    """training_dtype fp16 (GPUs without bf16; dynamic loss scaling) under the executor: the run saves a kohya file
    whose blocks moved and are finite, and KSampler with it samples a finite latent that differs from the base's."""
    entry = srv.run(train_prompt(harness.CHECKPOINT_NAME, steps=3, prefix="loras/oft_fp16", dtype="fp16"))
    path = _saved_path(srv, entry)
    blocks = [v for k, v in load_file(str(path)).items() if k.endswith(".oft_blocks")]
    assert blocks and all(torch.isfinite(b).all() for b in blocks)
    assert max(float(b.abs().max()) for b in blocks) > 1e-4
    lat = _latent(srv, srv.run(sample_prompt(harness.CHECKPOINT_NAME, adapter=path.name, prefix="fp16_adapter")))
    assert torch.isfinite(lat).all() and not torch.equal(lat, reference_latent)


def test_interrupt_stops_training_within_one_step(srv, reference_latent):
    name = _link(srv, INTERRUPT_CKPT)
    steps = 400
    start = len(srv.ws_messages)
    pid = srv.queue(train_prompt(name, steps=steps, prefix="loras/oft_interrupted"))

    def progress(m, at_least=2):
        d = m.get("data") or {}
        return m.get("type") == "progress" and d.get("prompt_id") == pid and d.get("node") == "5" and \
            d.get("value", 0) >= at_least

    seen = srv.wait_ws(progress, timeout=300, start=start)
    srv.interrupt()
    t_interrupt = time.monotonic()
    at_interrupt = max(m["data"]["value"] for m in srv.ws_for(pid, "progress") if m["data"].get("node") == "5")
    entry = srv.wait(pid, timeout=120)
    stopped_after = time.monotonic() - t_interrupt
    kinds = [k for k, _ in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds, harness.history_messages(entry)
    last = max(m["data"]["value"] for m in srv.ws_for(pid, "progress") if m["data"].get("node") == "5")
    assert seen["data"]["value"] >= 2 and last <= at_interrupt + 1, (at_interrupt, last)
    assert last < steps
    assert not list((srv.base / "output" / "loras").glob("oft_interrupted*")), "a file was saved after Cancel"
    # healthy: answers, and the interrupted model (same cached loader output) samples exactly as before
    assert srv.get("/system_stats")["system"]
    check = srv.queue(sample_prompt(name, prefix="after_interrupt"))
    after = srv.wait(check)
    assert after["status"]["status_str"] == "success", harness.history_messages(after)
    assert "1" not in _executed(srv, check)
    assert torch.equal(_latent(srv, after), reference_latent), "base weights changed by an interrupted training"
    assert stopped_after < 60, stopped_after


def test_bad_trainer_inputs_rejected_at_queue_time_by_name(srv):
    """One message per wrong input, naming it; ComfyUI's own min/max and list checks stay on."""
    p = train_prompt(harness.CHECKPOINT_NAME)
    p["5"]["inputs"].update(steps=0, targets="bf16", training_dtype="fp64", learning_rate=2.0)
    with pytest.raises(harness.ComfyError) as e:
        srv.queue(p)
    errors = e.value.payload["node_errors"]["5"]["errors"]
    by_input = {}
    for err in errors:
        by_input.setdefault(err.get("extra_info", {}).get("input_name"), []).append(err)
    assert set(by_input) == {"steps", "targets", "training_dtype", "learning_rate"}, errors
    assert all(len(v) == 1 for v in by_input.values()), errors
    assert by_input["steps"][0]["type"] == "value_smaller_than_min"
    assert by_input["learning_rate"][0]["type"] == "value_bigger_than_max"
    for name, bad in (("targets", "bf16"), ("training_dtype", "fp64")):
        err = by_input[name][0]
        assert err["type"] == "value_not_in_list" and f"'{bad}'" in err["details"], err
    assert "attention" in by_input["targets"][0]["details"]
    # a good prompt passes the same checks (nothing else is rejected)
    ok = train_prompt(harness.CHECKPOINT_NAME, steps=1)
    ok["5"]["inputs"]["learning_rate"] = float("nan")  # NaN passes every min/max comparison: refused by the node
    entry = srv.wait(srv.queue(ok))
    err = harness.execution_error(entry)
    assert err is not None and err["node_id"] == "5", harness.history_messages(entry)
    assert "learning_rate: expected a finite number, found nan" in err["exception_message"]


def test_train_on_unet_loader_model(srv, reference_latent):
    """UNETLoader (diffusion model file) + the checkpoint's CLIP and VAE: the trainer works on that model too."""
    p = train_prompt(harness.CHECKPOINT_NAME, steps=2, prefix="loras/oft_unet_loader")
    p["30"] = {"class_type": "UNETLoader", "inputs": {"unet_name": harness.UNET_NAME, "weight_dtype": "default"}}
    p["5"]["inputs"]["model"] = ["30", 0]
    entry = srv.run(p)
    blocks = {k for k in load_file(str(_saved_path(srv, entry))) if k.endswith(".oft_blocks")}
    assert len(blocks) == 4 * 8
    s = sample_prompt(harness.CHECKPOINT_NAME, prefix="after_unet_loader")
    s["30"] = p["30"]
    s["11"]["inputs"]["model"] = ["30", 0]
    check = srv.queue(s)
    after = srv.wait(check)
    assert after["status"]["status_str"] == "success", harness.history_messages(after)
    assert "30" not in _executed(srv, check)
    assert torch.equal(_latent(srv, after), reference_latent), "base weights changed by training"
