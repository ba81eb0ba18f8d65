"""Issue 14 in a real ComfyUI main.py: the shipped "workflows/OFT train on fp8 with several sizes and checkpoints.json"
as the UI saves it (converted by the server's own /object_info), then a resume run and a refused resume, queued
through /prompt.

The workflow: the tiny SD1.5 checkpoint's UNet loaded by the stock UNETLoader with weight_dtype fp8_e4m3fn (QOFT),
CLIP and VAE from CheckpointLoaderSimple, two image folders of different sizes → VAE Encode each → OFT Latent List →
OFTTrainer (cosine schedule after warm-up, a checkpoint every 2 steps; its report on the node) → OFT Save, Plot
Loss Graph. Checked: the report (base weights fp8, both latent sizes, the checkpoint files), the checkpoints
(numbered, ss_steps, schedule and loss type in the metadata), the final file; then Load OFT Adapter → resume_from
continues it (ss_steps carried on) and a different num_blocks is refused naming the mismatch.
"""

from __future__ import annotations

import json
from pathlib import Path

import comfy_models
import comfy_server as harness
import pytest
from safetensors import safe_open

pytestmark = pytest.mark.server

WORKFLOW = comfy_models.REPO_ROOT / "workflows" / "OFT train on fp8 with several sizes and checkpoints.json"


def _node_id(wf: dict, node_type: str) -> str:
    (nid,) = [str(n["id"]) for n in wf["nodes"] if n["type"] == node_type]
    return nid


def _images(folder: Path, size: tuple[int, int], n: int, seed: int) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"img_{i}.png")


def _saved(srv, entry, node) -> Path:
    """The file OFT Save wrote: the path on its report's first line (notes about the format may follow)."""
    text = "\n".join(srv.outputs(entry, node).get("text", []))
    first = text.splitlines()[0]
    assert "saved kohya adapter" in first, text
    return Path(first.rsplit(": ", 1)[1].strip())


def _meta(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


@pytest.fixture(scope="module")
def advanced(comfy_server):
    srv = comfy_server
    name = harness.CHECKPOINT_NAME
    unet = srv.base / "models" / "diffusion_models" / name  # the checkpoint file: UNETLoader takes its UNet
    if not unet.exists():
        unet.symlink_to(harness.tiny_sd15_checkpoint())
    wf = json.loads(WORKFLOW.read_text())
    folders = {n["widgets_values"][0]: n for n in wf["nodes"] if n["type"] == "OFTLoadImages"}
    assert set(folders) == {"oft_train_square", "oft_train_wide"}
    _images(srv.base / "input" / "oft_train_square", (64, 64), 2, 0)
    _images(srv.base / "input" / "oft_train_wide", (96, 64), 2, 1)
    prompt = harness.workflow_to_api(wf, srv.object_info())
    ids = {t: _node_id(wf, t) for t in ("CheckpointLoaderSimple", "UNETLoader", "OFTTrainer", "OFTSave",
                                        "OFTLatentList")}
    trainer = prompt[ids["OFTTrainer"]]["inputs"]
    # as shipped: fp8, cosine after warm-up, checkpoints, two sizes through the list node
    assert prompt[ids["UNETLoader"]]["inputs"]["weight_dtype"] == "fp8_e4m3fn"
    assert (trainer["lr_schedule"], trainer["warmup_steps"], trainer["save_every"]) == ("cosine", 20, 100)
    assert trainer["latents"][0] == ids["OFTLatentList"]
    prompt[ids["CheckpointLoaderSimple"]]["inputs"]["ckpt_name"] = name
    prompt[ids["UNETLoader"]]["inputs"]["unet_name"] = name
    trainer.update(steps=4, learning_rate=5e-2, warmup_steps=1, save_every=2, checkpoint_prefix="loras/oft_adv_ck",
                   training_dtype="fp32")
    prompt[ids["OFTSave"]]["inputs"]["filename_prefix"] = "loras/oft_adv"
    entry = srv.run(prompt)
    return srv, wf, prompt, ids, entry


def test_advanced_workflow_trains_fp8_base_two_sizes_with_schedule_and_checkpoints(advanced):
    srv, _wf, _prompt, ids, entry = advanced
    report = " ".join(srv.outputs(entry, ids["OFTTrainer"]).get("text", []))
    assert "base weights: float8_e4m3fn" in report, report
    assert "latent sizes: 8x8 (2 images), 8x12 (2 images)" in report, report
    assert "lr 0.05 cosine after 1 warm-up steps" in report and "(ss_steps 4)" in report, report
    loras = srv.base / "output" / "loras"
    ck = sorted(loras.glob("oft_adv_ck_*.safetensors"))
    assert [p.name for p in ck] == ["oft_adv_ck_00001_step000002.safetensors",
                                    "oft_adv_ck_00002_step000004.safetensors"], ck
    assert "2 checkpoints:" in report and all(str(p) in report for p in ck), report
    for p, steps in zip(ck, ("2", "4")):
        meta = _meta(p)
        assert meta["ss_steps"] == steps and meta["ss_max_train_steps"] == "4"
        assert meta["ss_lr_scheduler"] == "cosine" and meta["ss_lr_warmup_steps"] == "1"
        assert meta["ss_loss_type"] == "l2" and meta["ss_network_module"] == "networks.oft"
        assert json.loads(meta["comfyui_oft.latent_sizes"]) == {"8x8": 2, "8x12": 2}
    final = _saved(srv, entry, ids["OFTSave"])
    assert final.is_file() and _meta(final)["ss_steps"] == "4"


def _resume_prompt(prompt: dict, ids: dict, adapter_name: str, **trainer_over) -> dict:
    p = json.loads(json.dumps(prompt))
    p["90"] = {"class_type": "OFTLoadAdapter", "inputs": {"adapter_name": adapter_name}}
    t = p[ids["OFTTrainer"]]["inputs"]
    t.update(resume_from=["90", 0], steps=2, save_every=0, **trainer_over)
    p[ids["OFTSave"]]["inputs"]["filename_prefix"] = "loras/oft_adv_resumed"
    return p


def test_resume_from_a_checkpoint_carries_its_steps(advanced):
    srv, _wf, prompt, ids, _entry = advanced
    entry = srv.run(_resume_prompt(prompt, ids, "oft_adv_ck_00002_step000004.safetensors"))
    report = " ".join(srv.outputs(entry, ids["OFTTrainer"]).get("text", []))
    assert "resumed from" in report and "oft_adv_ck_00002_step000004.safetensors at step 4" in report, report
    meta = _meta(_saved(srv, entry, ids["OFTSave"]))
    assert meta["ss_steps"] == "6" and meta["comfyui_oft.resumed_from_steps"] == "4"


def test_resume_with_other_blocks_is_refused_naming_the_mismatch(advanced):
    srv, _wf, prompt, ids, _entry = advanced
    pid = srv.queue(_resume_prompt(prompt, ids, "oft_adv_ck_00001_step000002.safetensors", num_blocks=2))
    entry = srv.wait(pid)
    err = harness.execution_error(entry)
    assert err is not None, harness.history_messages(entry)
    assert "blocks per split × block size: expected 2×" in err["exception_message"], err
    assert "oft_adv_ck_00001_step000002.safetensors" in err["exception_message"], err


def _scaled_fp8_checkpoint(src: Path, dst: Path) -> None:
    """`src` with its UNet's Linear weights as a "scaled fp8" checkpoint stores them (fp8(W / s), `scale_weight` s,
    `scale_input` 1, the `scaled_fp8` marker), as many *_fp8_scaled files ship; written once (temp name, rename)."""
    import torch
    from safetensors.torch import load_file, save_file

    if dst.is_file():
        return
    fp8, prefix = torch.float8_e4m3fn, "model.diffusion_model."
    sd = load_file(str(src))
    out = {f"{prefix}scaled_fp8": torch.tensor([], dtype=fp8)}
    for k, v in sd.items():
        if k.startswith(prefix) and k.endswith(".weight") and v.ndim == 2:
            s = (v.float().abs().max() / torch.finfo(fp8).max).reshape(())
            layer = k[: -len("weight")]
            out[k], out[layer + "scale_weight"] = (v.float() / s).to(fp8), s
            out[layer + "scale_input"] = torch.ones((), dtype=torch.float32)
        else:
            out[k] = v
    tmp = dst.with_suffix(".tmp")
    save_file(out, str(tmp))
    tmp.rename(dst)


def test_a_scaled_fp8_checkpoint_trains_and_samples_in_one_workflow(advanced):
    """A "scaled fp8" UNet (as many *_fp8_scaled files ship) through the stock UNETLoader at weight_dtype default:
    Train OFT reads its weights times their scale (the report names them), and the trained model samples in the
    same workflow (KSampler → VAE Decode → Preview). Before: training ran on the unscaled fp8 values; on ComfyUI 0.8
    (per-layer quantized ops) the trainer found no layer, and after training the model could not be loaded again."""
    srv, _wf, prompt, ids, _entry = advanced
    name = "oft_tiny_sd15_scaled_fp8.safetensors"
    _scaled_fp8_checkpoint(harness.tiny_sd15_checkpoint(), srv.base / "models" / "diffusion_models" / name)
    p = json.loads(json.dumps(prompt))
    p[ids["UNETLoader"]]["inputs"].update(unet_name=name, weight_dtype="default")
    p[ids["OFTTrainer"]]["inputs"].update(steps=2, save_every=0)
    p[ids["OFTSave"]]["inputs"]["filename_prefix"] = "loras/oft_scaled"
    (text,) = [nid for nid, n in p.items() if n["class_type"] == "CLIPTextEncode"]
    (ckpt,) = [nid for nid, n in p.items() if n["class_type"] == "CheckpointLoaderSimple"]
    p["91"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    p["92"] = {"class_type": "KSampler", "inputs": {
        "model": [ids["OFTTrainer"], 0], "seed": 0, "steps": 2, "cfg": 1.0, "sampler_name": "euler",
        "scheduler": "normal", "positive": [text, 0], "negative": [text, 0], "latent_image": ["91", 0],
        "denoise": 1.0}}
    p["93"] = {"class_type": "VAEDecode", "inputs": {"samples": ["92", 0], "vae": [ckpt, 2]}}
    p["94"] = {"class_type": "PreviewImage", "inputs": {"images": ["93", 0]}}
    entry = srv.run(p)
    report = " ".join(srv.outputs(entry, ids["OFTTrainer"]).get("text", []))
    assert ("base weights: float8_e4m3fn scaled" in report
            or "base weights: float8_e4m3fn quantized" in report), report
    assert "(ss_steps 2)" in report, report
    assert len(srv.outputs(entry, "94").get("images", [])) == 1, entry.get("outputs")
    assert _meta(_saved(srv, entry, ids["OFTSave"]))["ss_steps"] == "2"
