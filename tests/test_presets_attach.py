"""Issue 11 items 1 and 4 on ComfyUI's own modules: what each training preset adapts (the sd-scripts option it is
named after; the tools tier checks the same sets against sd-scripts itself), and `OFTTrainer.attach()` used
directly, without the node's wrappers, on ComfyUI's FLUX."""

from __future__ import annotations

import re

import comfy_models
import pytest
import torch

from oft_core import OFTError
from oft_core.train import (
    _EXTRA_PRESETS,
    PRESETS,
    OFTTrainer,
    checkpoint_blocks,
    gradient_checkpointing,
    inplace_safe,
    select_targets,
)


def _paths(dm, preset):
    return [p for p, _ in select_targets(dm, preset)]


def test_sd_presets_are_sd_scripts_options(comfy):
    dm = comfy_models.sd15_tiny().model.diffusion_model
    attn, lin, attn_conv, lin_conv = (_paths(dm, p) for p in PRESETS["sd"])
    assert attn and all(re.search(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$", p) for p in attn)
    extra = set(lin) - set(attn)  # transformer-only Linear / 1×1 conv: proj_in / proj_out and the feed-forward
    assert extra and all(re.search(r"\.(proj_in|proj_out|ff\.net\.0\.proj|ff\.net\.2)$", p) for p in extra)
    assert set(attn) < set(lin)
    conv = set(attn_conv) - set(attn)
    assert conv == set(lin_conv) - set(lin)
    # sd-scripts' enable_conv: every Conv2d and Linear of ResnetBlock2D / Downsample2D / Upsample2D, time_emb_proj
    # (LDM emb_layers.1) included — the old all-linear+conv preset left that one out
    assert any(p.endswith(".emb_layers.1") for p in conv)
    assert all(re.search(r"\.(in_layers\.2|out_layers\.3|emb_layers\.1|skip_connection|op|conv)$", p) for p in conv)
    assert not any(p.startswith(("time_embed", "input_blocks.0.", "out.")) for p in lin_conv)


def test_flux_presets_are_sd_scripts_options(comfy):
    dm = comfy_models.flux_tiny().model.diffusion_model
    attn = _paths(dm, "attention")
    assert attn == [f"double_blocks.{i}.{s}_attn.{n}" for i in range(2) for s in ("img", "txt")
                    for n in ("qkv", "proj")]
    lin = _paths(dm, "all-linear")
    assert {p for p in lin if "_mod." in p or ".modulation." in p} == {
        *(f"double_blocks.{i}.{s}_mod.lin" for i in range(2) for s in ("img", "txt")),
        *(f"single_blocks.{i}.modulation.lin" for i in range(2))}  # sd-scripts adapts the modulation layers too
    assert len(lin) == 2 * 10 + 2 * 3
    extra = _paths(dm, "attention+single")
    assert set(extra) - set(attn) == {f"single_blocks.{i}.linear{j}" for i in range(2) for j in (1, 2)}
    assert "linear1" in _EXTRA_PRESETS[("flux", "attention+single")]


def _flux_grads(dm, mp, wrap=None):
    torch.manual_seed(0)
    trainer = OFTTrainer(select_targets(dm, "all-linear"), num_blocks=4, alpha=0)
    with torch.no_grad():
        for p in trainer.parameters():
            p.normal_(0, 0.05)
    kw = dict(comfy_models.flux_inputs())
    x, t = kw.pop("x"), kw.pop("t")
    with trainer.attach():
        blocks = checkpoint_blocks(dm)
        assert all(hasattr(b.forward, "_oft_unguarded") for b in blocks)  # guarded by attach() itself
        with wrap(blocks) if wrap else torch.enable_grad():
            out = mp.model.apply_model(x, t, **kw)
            out.square().mean().backward()
    assert all("forward" not in b.__dict__ for b in checkpoint_blocks(dm))  # every forward restored
    return [p.grad.clone() for p in trainer.parameters()]


def test_attach_alone_trains_comfyui_flux(comfy):
    """Issue 11 item 4: attach() on ComfyUI's FLUX used to fail in backward ("modified by an inplace operation")
    unless wrapped the way the node wraps it."""
    mp = comfy_models.flux_tiny()
    dm = mp.model.diffusion_model
    alone = _flux_grads(dm, mp)
    assert all(torch.isfinite(g).all() for g in alone) and sum(float(g.abs().sum()) for g in alone) > 0
    # what the node does on top: inplace_safe is not applied twice, and checkpointing runs the unguarded block on its
    # own copies with the same saved-tensor copies: both bit-identical (the checkpointed gradients were 1e-4 off on
    # ComfyUI 0.8, whose double blocks update `img` in place twice: the recomputation read a saved input modified)
    again = _flux_grads(dm, mp, inplace_safe)
    assert all(torch.equal(a, b) for a, b in zip(alone, again))
    ckpt = _flux_grads(dm, mp, gradient_checkpointing)
    a, b = torch.cat([g.flatten() for g in alone]), torch.cat([g.flatten() for g in ckpt])
    assert torch.equal(a, b), float((a - b).norm() / b.norm())


def test_attach_refuses_flux_targets_without_their_model(comfy):
    dm = comfy_models.flux_tiny().model.diffusion_model
    by_hand = [(p, m) for p, m in select_targets(dm, "attention")]  # a plain list: the model is not known
    trainer = OFTTrainer(by_hand, num_blocks=4, alpha=0)
    with pytest.raises(OFTError, match=r"FLUX double/single-block layers.*select_targets\(model, preset\).*root=model"):
        with trainer.attach():
            pass
    assert all("forward" not in m.__dict__ for _, m in by_hand)  # nothing left patched
    with OFTTrainer(by_hand, num_blocks=4, alpha=0, root=dm).attach():
        assert all("forward" in b.__dict__ for b in checkpoint_blocks(dm))


def test_exported_presets_say_which_tool_layers_it_ignores(comfy, tmp_path, capsys):
    """Exporting a preset beyond what sd-scripts loads says which layers it will ignore (inspect and save report);
    the tools tier shows sd-scripts doing exactly that."""
    from oft_core import load_adapter
    from oft_core.cli import main as cli
    from oft_core.formats import write_adapter
    from oft_core.summary import tool_notes
    from oft_core.train import export_names

    flux = comfy_models.flux_tiny().model.diffusion_model
    path = write_adapter(OFTTrainer(select_targets(flux, "attention+single"), num_blocks=4).to_adapter(),
                         tmp_path / "f.safetensors", "kohya")
    notes = tool_notes(load_adapter(path))
    assert any("networks.oft_flux will ignore 4 of 12 layers (oft_unet_single_blocks_0_linear1" in n for n in notes)
    assert any("cannot merge this file" in n for n in notes)
    path = write_adapter(OFTTrainer(select_targets(flux, "attention"), num_blocks=4).to_adapter(),
                         tmp_path / "a.safetensors", "kohya")
    assert not any("will ignore" in n for n in tool_notes(load_adapter(path)))

    dm = comfy_models.sd15_tiny().model.diffusion_model
    trainer = OFTTrainer(select_targets(dm, "attention+conv"), num_blocks=4)
    path = write_adapter(trainer.to_adapter(names=export_names(dm, "diffusers")), tmp_path / "s.safetensors", "kohya")
    conv = [layer for layer in trainer.layers if "attn" not in layer.path]
    assert cli(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert f"tools:      sd-scripts networks.oft will ignore {len(conv)} ResBlock / down / up-sample layers" in text
    assert "'in_layers_2' (SD1.x/SD2.x files name layers after diffusers modules" in text
    out = tmp_path / "s2.safetensors"
    assert cli(["convert", str(path), "--to", "kohya", "--out", str(out)]) == 0
    assert f"note: sd-scripts networks.oft will ignore {len(conv)} ResBlock" in capsys.readouterr().out
