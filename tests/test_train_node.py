"""OFTTrainer node against the REAL ComfyUI (CPU) on the tiny SD1.5-family UNet and the tiny FLUX.

Pinned: training lowers a fixed-noise loss of the family's own objective (FLUX with gradient checkpointing on and
off, both giving the same adapter); base weights bit-identical after training and after a run cancelled at step 2;
the saved kohya file reloads through the pack's loader to a model whose forward equals the trained model's;
identity at step 0; same seed -> same adapter; bad inputs rejected before any work.
"""

from __future__ import annotations

import json
import re

import comfy_models
import pytest
import test_nodes_workflows as workflows
import torch

pytestmark = pytest.mark.comfyui

comfy_nodes = workflows.comfy_nodes  # fixtures of the workflow tests: ComfyUI's node table, model folders
model_folders = workflows.model_folders

REL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tn(comfyui_oft):
    from comfyui_oft.nodes import train_node

    return train_node


@pytest.fixture(scope="session")
def patch_mod(comfyui_oft):
    from comfyui_oft.nodes import patch

    return patch


def rel_err(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def weights(patcher) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in patcher.model.diffusion_model.state_dict().items()}


def assert_weights_equal(patcher, before):
    now = patcher.model.diffusion_model.state_dict()
    assert now.keys() == before.keys()
    bad = [k for k, v in before.items() if not torch.equal(now[k], v)]
    assert not bad, f"base weights changed: {bad[:5]}"
    assert all("forward" not in m.__dict__ for m in patcher.model.modules()), "a patched forward was left behind"


def sd_data(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = {"samples": torch.randn(n, 4, 16, 16, generator=g)}
    positive = [[torch.randn(1, 5, 48, generator=g), {}] for _ in range(n)]
    return latents, positive


def flux_data(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = {"samples": torch.randn(n, 4, 16, 16, generator=g)}
    positive = [[torch.randn(1, 7, 64, generator=g), {"pooled_output": torch.randn(1, 32, generator=g),
                                                      "guidance": 3.5}]]
    return latents, positive


KW = dict(learning_rate=2e-2, batch_size=2, grad_accumulation=1, optimizer="AdamW", seed=0, num_blocks=4,
          constraint=0.0, cayley_neumann=False, neumann_terms=5, targets="attention", training_dtype="fp32",
          gradient_checkpointing=False)


def run_node(tn, model, latents, positive, steps, **over):
    """(model, adapter, loss) of the node (its 4th output, the report: `run_node_report`)."""
    return run_node_report(tn, model, latents, positive, steps, **over)[:3]


def run_node_report(tn, model, latents, positive, steps, **over):
    kw = dict(KW, **over)
    import comfy.model_management

    try:
        with torch.inference_mode():  # as ComfyUI runs nodes
            out = tn.OFTTrainerNode.execute(model=model, latents=latents, positive=positive, steps=steps, **kw)
    finally:
        # The node loads the model as ComfyUI does (load_models_gpu); free it as ComfyUI would before the next
        # prompt, so that a clone's patch_model() in these tests really applies its patches.
        comfy.model_management.unload_all_models()
    return out.result


def eval_loss(tn, patcher, latents, positive, seed=123, trainer=None, patched=False):
    """The family loss on fixed noise and noise levels (several σ), with the trained OFT attached or patched in."""
    base = patcher.model
    dev = torch.device("cpu")
    with torch.inference_mode(False), torch.no_grad():
        x0 = base.process_latent_in(latents["samples"].clone())
        per = tn.prepare_conds(base, positive, x0, dev)
        idx = list(range(x0.shape[0]))
        conds = tn.batch_conds(per, idx)
        gen = torch.Generator().manual_seed(seed)
        total = 0.0
        if patched:
            patcher.patch_model()
        try:
            for _ in range(4):
                noise = torch.randn(x0.shape, generator=gen)
                sigma = tn.sample_sigmas(base.model_sampling, len(idx), gen)
                if trainer is not None:
                    with trainer.attach():
                        total += float(tn.family_loss(base, x0, noise, sigma, conds, {}))
                else:
                    total += float(tn.family_loss(base, x0, noise, sigma, conds, {}))
        finally:
            if patched:
                patcher.unpatch_model()
    return total / 4


def forward(patcher, inputs, trainer=None, patched=False):
    if patched:
        patcher.patch_model()
    try:
        if trainer is not None:
            with trainer.attach():
                return comfy_models.apply_model(patcher, inputs)
        return comfy_models.apply_model(patcher, inputs)
    finally:
        if patched:
            patcher.unpatch_model()


# ------------------------------------------------------------------------------------------------ tests
def test_schema_has_a_tooltip_on_every_input(tn):
    schema = tn.OFTTrainerNode.define_schema()
    assert schema.node_id == "OFTTrainer" and schema.is_experimental
    for inp in schema.inputs:
        assert inp.tooltip, inp.id
    # existing workflows keep their widget slots: the issue-14 inputs come last, all optional
    ids = [inp.id for inp in schema.inputs]
    assert ids[:16] == ["model", "latents", "positive", "steps", "learning_rate", "batch_size", "grad_accumulation",
                        "optimizer", "seed", "num_blocks", "constraint", "cayley_neumann", "neumann_terms", "targets",
                        "training_dtype", "gradient_checkpointing"]
    assert ids[16:] == ["loss_function", "lr_schedule", "warmup_steps", "resume_from", "save_every",
                        "checkpoint_prefix"]
    assert all(inp.optional for inp in schema.inputs[16:])
    assert schema.is_input_list  # several LATENT batches (resolutions) arrive as one list
    assert [o.io_type for o in schema.outputs] == ["MODEL", "OFT_ADAPTER", "LOSS_MAP", "STRING"]


def test_sd_training_lowers_the_loss_keeps_base_weights_and_reloads_from_kohya(comfy, tn, patch_mod, tmp_path,
                                                                              monkeypatch):
    import folder_paths
    from comfyui_oft.nodes import files
    from comfyui_oft.nodes.oft_nodes import OFTLoader
    from comfyui_oft.oft_core import load_adapter
    from comfyui_oft.oft_core.formats import write_adapter
    from safetensors import safe_open

    mp = comfy_models.sd15_tiny()
    latents, positive = sd_data()
    before = weights(mp)
    start = eval_loss(tn, mp, latents, positive)
    # The tiny UNet's random weights (std 0.02) give its attention almost no say in the output, so the whole
    # adaptable set is trained; its ε-loss of ≈ 1 (pure noise) can only drop by a little: the margin is 0.3 %.
    model, adapter, loss = run_node(tn, mp, latents, positive, steps=12, learning_rate=5e-2,
                                    targets="all-linear+conv")
    assert_weights_equal(mp, before)
    assert len(loss["loss"]) == 12 and all(isinstance(v, float) for v in loss["loss"])
    end = eval_loss(tn, model, latents, positive, patched=True)
    assert end < start * 0.997, (start, end)
    assert_weights_equal(mp, before)  # patch_model / unpatch_model of the output restored them

    # SD1.x: sd-scripts networks.oft names layers after diffusers modules (its original_unet), not LDM ones
    assert tn.kohya_naming(mp) == "diffusers"
    names = sorted(layer.name for layer in adapter)
    assert all(n.startswith(("down_blocks.", "mid_block.", "up_blocks.")) for n in names), names[:5]
    for n in ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "down_blocks.0.downsamplers.0.conv",
              "up_blocks.0.upsamplers.0.conv", "mid_block.resnets.1.conv2", "up_blocks.1.attentions.1.proj_out"):
        assert n in names, n

    # saved kohya file -> the pack's OFTLoader (from its `oft` folder) -> same forward as the output model
    oft_dir = tmp_path / "oft"
    oft_dir.mkdir()
    path = write_adapter(adapter, oft_dir / "sd_trained.safetensors", "kohya")
    with safe_open(str(path), "pt") as f:
        stored = {k.split(".", 1)[0] for k in f.keys()}
    assert "oft_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q" in stored
    assert not any("input_blocks" in k or "output_blocks" in k or "middle_block" in k for k in stored)
    loaded = load_adapter(path)
    assert loaded.metadata["ss_network_module"] == "networks.oft" and loaded.metadata["ss_steps"] == "12"
    assert float(loaded.metadata["ss_learning_rate"]) == 5e-2
    files.register_folder()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, files.FOLDER, ([str(oft_dir)], set(files.EXTENSIONS)))
    folder_paths.filename_list_cache.clear()
    out = OFTLoader.execute(model=mp, adapter_name="sd_trained.safetensors", strength=1.0, strength_mode="kohya")
    folder_paths.filename_list_cache.clear()
    reloaded, text = out.result[0], out.ui.as_dict()["text"][0]
    assert f"{len(adapter)} of {len(adapter)} adapter layers applied" in text, text
    inputs = comfy_models.sd15_tiny_inputs(batch=2)
    out_file = forward(reloaded, inputs, patched=True)
    out_node = forward(model, inputs, patched=True)
    base_out = forward(mp, inputs)
    assert rel_err(out_file, out_node) <= REL
    assert rel_err(out_node, base_out) > 1e-4  # the adapter does something
    assert_weights_equal(mp, before)


def test_trained_bypass_equals_the_merged_output_model_and_step0_is_identity(comfy, tn):
    mp = comfy_models.sd15_tiny()
    inputs = comfy_models.sd15_tiny_inputs(batch=1)
    base_out = forward(mp, inputs)
    latents, positive = sd_data()
    trainer = tn.build_trainer(mp, "all-linear+conv", 4, 0.0, 0)
    assert torch.equal(forward(mp, inputs, trainer=trainer), base_out)  # step 0: the base model bit for bit
    trainer, _, meta = tn.train(mp, latents, positive, steps=3, learning_rate=2e-2, batch_size=2, alpha=1e-3,
                                targets="all-linear+conv", training_dtype="fp32", gradient_checkpointing_on=False)
    from comfyui_oft.nodes.patch import apply_oft

    comfy.model_management.unload_all_models()  # as ComfyUI does before loading another patcher of this model
    merged, _, _ = apply_oft(mp, None, trainer.to_adapter(meta), 1.0)
    trained = forward(mp, inputs, trainer=trainer)
    assert rel_err(forward(merged, inputs, patched=True), trained) <= REL
    assert rel_err(trained, base_out) > 1e-5


def test_sd_unet_layers_keep_their_outputs_under_checkpointing_and_train_the_same_adapter(comfy, tn, monkeypatch):
    """ComfyUI's SD UNet (openaimodel.UNetModel), trained by the node with checkpointing: every trained layer rotates
    its weight and keeps its output (`_RotateKeepOutput`, forward and recomputation); the adapter is the one the
    input- / base-output-keeping paths train, to fp32 rounding. Without checkpointing no layer keeps its output."""
    import comfyui_oft.oft_core.train as ot

    mp = comfy_models.sd15_tiny()
    latents, positive = sd_data()
    # SGD: each step moves the parameters by lr × the gradient, so the two paths' gradients (fp32 rounding apart)
    # stay comparable after the steps; Adam would scale gradients at the rounding's size up to whole steps
    kw = dict(steps=3, learning_rate=1.0, optimizer="SGD", batch_size=2, alpha=1e-3, targets="all-linear+conv",
              training_dtype="fp32")
    real = ot._RotateKeepOutput.apply
    calls = []

    def counted(*a):
        calls.append(a[1].module)
        return real(*a)
    results = {}
    for keep in (True, False):
        calls.clear()
        with monkeypatch.context() as m:
            m.setattr(ot._RotateKeepOutput, "apply", counted)
            if not keep:
                m.setattr(ot, "keeps_output", lambda root: (lambda module, rows: False))
            with torch.inference_mode():  # as ComfyUI runs nodes
                trainer, losses, _ = tn.train(mp, latents, positive, gradient_checkpointing_on=True, **kw)
            comfy.model_management.unload_all_models()
        results[keep] = (trainer, losses, len(calls), {id(c) for c in calls})
    trainer, losses, n, modules = results[True]
    kept = {tl.path for tl in trainer.layers if id(tl.module) in modules}
    paths = {tl.path for tl in trainer.layers}
    # where it is the cheaper side: the layers that keep their input (self-attention, the GEGLU projection, the
    # 1×1 projections: one row per latent position); not the time embeddings (one row per sample) nor
    # cross-attention's keys / values (5 text tokens)
    assert {p for p in paths if re.search(r"attn1\.|ff\.net\.0|proj_(in|out)$", p)} <= kept
    assert not {p for p in kept if re.search(r"emb|attn2\.to_[kv]$", p)}
    assert n >= 2 * 3 * len(kept)  # forward and recomputation of every step
    assert results[False][2] == 0
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(results[False][1]), rtol=1e-5, atol=0)
    ours = torch.cat([p.detach().flatten() for p in trainer.parameters()])
    other = torch.cat([p.detach().flatten() for p in results[False][0].parameters()])
    # compared on the whole set, against its scale: this random UNet's activations are so small that some layers'
    # bias is ~500 × their output's change (ff.net.2), and a path that takes z = out − bias rounds at the bias's
    # scale (as the base-output-keeping path always did); layers whose gradient is near zero hold rounding alone
    assert float(other.abs().max()) > 0
    torch.testing.assert_close(ours, other, rtol=1e-4, atol=1e-5 * float(other.abs().max()))
    calls.clear()
    with monkeypatch.context() as m:
        m.setattr(ot._RotateKeepOutput, "apply", counted)
        with torch.inference_mode():
            tn.train(mp, latents, positive, gradient_checkpointing_on=False, **dict(kw, steps=1))
        comfy.model_management.unload_all_models()
    assert calls == []


@pytest.mark.parametrize("checkpointing", [False, True])
def test_flux_training_lowers_the_loss_with_and_without_checkpointing(comfy, tn, checkpointing):
    mp = comfy_models.flux_tiny()
    latents, positive = flux_data()
    before = weights(mp)
    inputs = comfy_models.flux_inputs(batch=1)
    base_out = forward(mp, inputs)
    trainer = tn.build_trainer(mp, "attention", 4, 0.0, 0)
    assert torch.equal(forward(mp, inputs, trainer=trainer), base_out)  # step 0
    start = eval_loss(tn, mp, latents, positive)
    model, adapter, loss = run_node(tn, mp, latents, positive, steps=8, gradient_checkpointing=checkpointing,
                                    targets="attention+single")
    assert_weights_equal(mp, before)
    end = eval_loss(tn, model, latents, positive, patched=True)
    assert end < start * 0.95, (start, end, loss)
    qkv = adapter.layers[("unet", "double_blocks.0.img_attn.qkv")]
    assert qkv.split_sizes == (128, 128, 128)
    assert adapter.layers[("unet", "single_blocks.0.linear1")].split_sizes == (128, 128, 128, 512)
    # checkpointing changes memory, not results (up to the recomputation's rounding, which Adam's normalised
    # first steps can amplify for near-zero gradients: compare the loss curves)
    ref = _CACHE.setdefault("flux_losses", loss["loss"])
    assert torch.allclose(torch.tensor(loss["loss"]), torch.tensor(ref), rtol=1e-4)


def _flux_like(family: str):
    """(latents, positive, apply_model inputs, expected trained layer names) of a tiny flux-family DiT."""
    g = torch.Generator().manual_seed(0)
    blocks = [f"double_blocks.0.{s}_{m}" for s in ("img", "txt") for m in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")]
    blocks += ["single_blocks.0.linear1", "single_blocks.0.linear2"]
    if family == "chroma":  # no modulation Linear: one approximator makes every block's modulations
        latents, positive = flux_data()
        inputs = {k: v for k, v in comfy_models.flux_inputs(batch=1).items() if k != "y"}
        return latents, positive, inputs, sorted(blocks)
    if family == "flux2":  # modulation from the root (global), 128 latent channels, no pooled vector
        latents = {"samples": torch.randn(2, 128, 8, 8, generator=g)}
        positive = [[torch.randn(1, 5, 64, generator=g), {"pooled_output": None, "guidance": 3.5}]]  # as its TE gives
        inputs = {"x": torch.randn(1, 128, 8, 8, generator=g), "t": torch.full((1,), 0.5),
                  "c_crossattn": torch.randn(1, 5, 64, generator=g), "guidance": torch.full((1,), 3.5)}
        return latents, positive, inputs, sorted(blocks)
    # HunyuanVideo: video latents (batch, 16, frames, h, w), LLaVA-like tokens and a pooled CLIP vector
    latents = {"samples": torch.randn(2, 16, 1, 8, 8, generator=g)}
    positive = [[torch.randn(1, 5, 64, generator=g), {"pooled_output": torch.randn(1, 32, generator=g)}]]
    inputs = {"x": torch.randn(1, 16, 1, 8, 8, generator=g), "t": torch.full((1,), 0.5),
              "c_crossattn": torch.randn(1, 5, 64, generator=g), "y": torch.randn(1, 32, generator=g),
              "guidance": torch.full((1,), 6.0)}
    blocks += ["double_blocks.0.img_mod.lin", "double_blocks.0.txt_mod.lin", "single_blocks.0.modulation.lin"]
    return latents, positive, inputs, sorted(blocks)


@pytest.mark.parametrize("family", ["chroma", "hunyuan_video", pytest.param("flux2", marks=pytest.mark.newer_comfyui)])
def test_flux_like_dits_train_as_flux_and_their_kohya_file_applies_back(comfy, tn, tmp_path, family):
    """Chroma, HunyuanVideo and FLUX.2 (FLUX's double / single blocks; Chroma and FLUX.2 without per-block
    modulation Linears, HunyuanVideo on video latents; FLUX.2 only in newer ComfyUI) train as the flux family: the
    loss drops, the base is untouched, the file is kohya oft_flux with BFL names and the family in
    ss_base_model_version, and loaded back from disk and applied through the loader's path its merged forward is the
    trained model's."""
    import comfy.model_management
    import comfy.supported_models
    from comfyui_oft.nodes import files
    from comfyui_oft.nodes.patch import apply_oft
    from comfyui_oft.oft_core.formats import write_adapter

    if family == "flux2" and not hasattr(comfy.supported_models, "Flux2"):
        pytest.skip("this ComfyUI has no FLUX.2 (0.8 has)")
    mp = comfy_models.dit_tiny(family)
    module = {"flux2": "flux"}.get(family, family)
    assert type(mp.model.diffusion_model).__module__ == f"comfy.ldm.{module}.model"
    latents, positive, inputs, expected = _flux_like(family)
    before = weights(mp)
    base_out = forward(mp, inputs)
    start = eval_loss(tn, mp, latents, positive)
    model, adapter, loss = run_node(tn, mp, latents, positive, steps=20, targets="all-linear", learning_rate=5e-2,
                                    gradient_checkpointing=True)
    assert_weights_equal(mp, before)
    end = eval_loss(tn, model, latents, positive, patched=True)
    # (the tiny HunyuanVideo's output moves ~5x less for the same rotations: 0.992 of the loss after 20 steps)
    assert end < start * {"chroma": 0.95, "hunyuan_video": 0.995, "flux2": 0.95}[family], (start, end, loss)
    names = sorted(name for _, name in adapter.layers)
    assert names == expected, names
    path = write_adapter(adapter, tmp_path / f"{family}_oft.safetensors", "kohya")
    loaded = files.load(path)
    assert loaded.metadata["ss_network_module"] == "networks.oft_flux" and len(loaded.layers) == len(expected)
    assert loaded.metadata["ss_base_model_version"] == family  # not FLUX: the file says what it was trained on
    assert "modelspec.architecture" not in loaded.metadata  # (the FLUX.1 default is not written for these)
    comfy.model_management.unload_all_models()
    merged, _, text = apply_oft(mp, None, loaded, 1.0)
    assert "WARNING" not in text, text
    assert rel_err(forward(merged, inputs, patched=True), forward(model, inputs, patched=True)) <= REL
    assert rel_err(forward(merged, inputs, patched=True), base_out) > 1e-5
    if family == "chroma":  # the tiny FLUX has the same widths and names: it applies there, and says what it is
        _, _, text = apply_oft(comfy_models.flux_tiny(), None, loaded, 1.0)
        assert "trained on chroma (its ss_base_model_version) and this is a Flux model" in text, text


def test_base_version_is_the_name_trainers_write(comfyui_oft):
    """ss_base_model_version per loaded family: sd-scripts' names (every FLUX.1 variant is flux1), musubi-tuner's for
    HunyuanVideo, else the family's own name (what the family warning compares)."""
    from types import SimpleNamespace

    from comfyui_oft.nodes.patch import base_version

    def loaded(config_name):
        return SimpleNamespace(model=SimpleNamespace(model_config=type(config_name, (), {})()))

    names = ("SD15", "SD20", "SDXL", "Flux", "FluxSchnell", "FluxInpaint", "Chroma", "HunyuanVideo", "Flux2")
    assert [base_version(loaded(n)) for n in names] == ["sd_v1", "sd_v2", "sdxl_base_v1-0", "flux1", "flux1",
                                                        "flux1", "chroma", "hunyuan_video", "flux2"]


_CACHE: dict = {}


def test_same_seed_same_adapter(comfy, tn):
    mp = comfy_models.sd15_tiny()
    latents, positive = sd_data()
    a = run_node(tn, mp, latents, positive, steps=3, seed=7)[1]
    b = run_node(tn, mp, latents, positive, steps=3, seed=7)[1]
    c = run_node(tn, mp, latents, positive, steps=3, seed=8)[1]
    assert a.layers.keys() == b.layers.keys()
    assert all(torch.equal(x, y) for k in a.layers for x, y in zip(a.layers[k].blocks, b.layers[k].blocks))
    assert any(not torch.equal(x, y) for k in a.layers for x, y in zip(a.layers[k].blocks,
                                                                       c.layers[k].blocks))


def test_cancel_at_step_2_leaves_the_base_model_untouched(comfy, tn, monkeypatch):
    mp = comfy_models.sd15_tiny()
    latents, positive = sd_data()
    before = weights(mp)
    inputs = comfy_models.sd15_tiny_inputs(batch=1)
    base_out = forward(mp, inputs)
    mm = comfy.model_management
    calls = []

    def interrupt():
        calls.append(1)
        if len(calls) == 3:  # before step index 2
            raise mm.InterruptProcessingException()

    monkeypatch.setattr(mm, "throw_exception_if_processing_interrupted", interrupt)
    with pytest.raises(mm.InterruptProcessingException):
        run_node(tn, mp, latents, positive, steps=10)
    assert len(calls) == 3  # honoured within one step
    assert_weights_equal(mp, before)
    assert torch.equal(forward(mp, inputs), base_out)


def test_objects_made_before_training_are_frozen_for_the_collector_during_the_steps_only(comfy, tn, monkeypatch):
    """Full collections while training walk only what the training made (`gc.freeze` for its duration), undone at
    the end, after a Cancel too, and a freeze made by someone else is left as it was."""
    import gc

    mp = comfy_models.sd15_tiny()
    latents, positive = sd_data()
    mm = comfy.model_management
    seen = []
    marker = [object()]  # a container made before training: frozen while the steps run
    plain_interrupt = mm.throw_exception_if_processing_interrupted

    def interrupt(stop_at=None):
        seen.append((gc.get_freeze_count(), gc.is_tracked(marker), any(o is marker for o in gc.get_objects())))
        if stop_at is not None and len(seen) == stop_at:
            raise mm.InterruptProcessingException()
        plain_interrupt()

    assert gc.get_freeze_count() == 0
    monkeypatch.setattr(mm, "throw_exception_if_processing_interrupted", interrupt)
    run_node(tn, mp, latents, positive, steps=2)
    assert len(seen) == 2 and all(n > 0 and tracked and not visible for n, tracked, visible in seen), seen
    assert gc.get_freeze_count() == 0 and any(o is marker for o in gc.get_objects())

    seen.clear()
    monkeypatch.setattr(mm, "throw_exception_if_processing_interrupted", lambda: interrupt(stop_at=2))
    with pytest.raises(mm.InterruptProcessingException):
        run_node(tn, mp, latents, positive, steps=5)
    assert len(seen) == 2 and seen[0][0] > 0 and gc.get_freeze_count() == 0

    gc.freeze()  # someone else's freeze (e.g. before a fork): not undone by a training
    try:
        seen.clear()
        monkeypatch.setattr(mm, "throw_exception_if_processing_interrupted", interrupt)
        run_node(tn, mp, latents, positive, steps=1)
        assert seen and gc.get_freeze_count() > 0 and not any(o is marker for o in gc.get_objects())
    finally:
        gc.unfreeze()


@pytest.mark.parametrize("case, match", [
    ("empty", r"training latents: expected a LATENT batch of at least one image"),
    ("conds", r"conditioning count: expected 1 \(for all images\) or 2 \(one per image\), found 3"),
    ("steps", r"steps: expected ≥ 1, found 0"),
    ("blocks", r"SD15 model, targets 'attention': layer 'input_blocks.1.1.transformer_blocks.0.attn1.to_q'.*"
               r"num_blocks.*divisor of 32, found 5"),
    ("flux_blocks", r"Flux model.*num_blocks.*found 3"),
])
def test_bad_inputs_fail_clearly_before_any_work(comfy, tn, monkeypatch, case, match):
    from comfyui_oft.oft_core import OFTError

    def no_work(*a, **k):
        raise AssertionError("work started before validation")

    monkeypatch.setattr(comfy.model_management, "load_models_gpu", no_work)
    mp = comfy_models.flux_tiny() if case == "flux_blocks" else comfy_models.sd15_tiny()
    latents, positive = flux_data() if case == "flux_blocks" else sd_data()
    steps, over = 2, {}
    if case == "empty":
        latents = {"samples": torch.zeros(0, 4, 16, 16)}
    elif case == "conds":
        positive = positive + positive[:1]
    elif case == "steps":
        steps = 0
    elif case in ("blocks", "flux_blocks"):
        over["num_blocks"] = 5 if case == "blocks" else 3
    with pytest.raises(OFTError, match=match):
        run_node(tn, mp, latents, positive, steps=steps, **over)


def test_queue_time_checks_are_comfyuis_own(tn):
    """No node-level validate_inputs (ComfyUI would repeat its message once per named input and drop its own
    min/max checks for them); the combos carry their options as V1 list type, which ComfyUI checks at queue time
    (tests/server/test_server_train.py sends the bad values through a real server)."""
    assert "validate_inputs" not in vars(tn.OFTTrainerNode)
    req = tn.OFTTrainerNode.INPUT_TYPES()["required"]
    if tn._TYPES_LOOKED_UP:  # newer ComfyUI checks V3 Combos itself (and cannot take a list type)
        assert req["targets"][0] == req["training_dtype"][0] == req["optimizer"][0] == "COMBO"
        req = {k: ([*v[1]["options"]], v[1]) if v[0] == "COMBO" else v for k, v in req.items()}
    assert req["targets"][0] == tn.TARGETS
    assert req["training_dtype"][0] == list(tn.DTYPES) and req["optimizer"][0] == ["AdamW", "Adam", "SGD"]
    assert req["targets"][1]["default"] == "attention" and req["targets"][1]["tooltip"]
    # no "widgetType": frontend 1.27.10 builds no widget for an input that names one it does not know (h9b found it)
    assert all("widgetType" not in req[k][1] for k in ("targets", "training_dtype", "optimizer"))
    assert req["steps"][0] == "INT" and req["steps"][1]["min"] == 1


@pytest.mark.parametrize("model_dtype", ["fp32", "bf16"])
def test_bf16_training_lowers_the_loss_with_fp32_generators_and_untouched_weights(comfy, tn, model_dtype,
                                                                                   monkeypatch):
    """training_dtype bf16: the forward/backward runs under CPU autocast in bf16 (on an fp32 model, and on a model
    stored in bf16), the generators and their optimizer state stay fp32, the loss drops, the base weights do not
    change by a single bit."""
    mp = comfy_models.flux_tiny(torch.bfloat16 if model_dtype == "bf16" else None)
    latents, positive = flux_data()
    before = weights(mp)
    start = eval_loss(tn, mp, latents, positive)
    seen, out_dtypes = [], []
    orig = tn.family_loss

    def spy(*args):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return orig(*args)

    monkeypatch.setattr(tn, "family_loss", spy)
    qkv = mp.model.diffusion_model.double_blocks[0].img_attn.qkv  # an adapted layer: its (rotated) output dtype
    hook = qkv.register_forward_hook(lambda m, i, o: out_dtypes.append(o.dtype))
    try:
        with torch.inference_mode():
            trainer, losses, meta = tn.train(mp, latents, positive, steps=8, learning_rate=2e-2, batch_size=2,
                                             alpha=0.0, targets="attention", training_dtype="bf16",
                                             gradient_checkpointing_on=False)
    finally:
        hook.remove()
        comfy.model_management.unload_all_models()
    assert set(seen) == {(True, torch.bfloat16)} and len(seen) == 8
    assert set(out_dtypes) == {torch.bfloat16}
    assert meta["ss_mixed_precision"] == "bf16"
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
               for p in trainer.parameters())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert_weights_equal(mp, before)
    end = eval_loss(tn, mp, latents, positive, trainer=trainer)  # the trained rotation, evaluated without autocast
    assert end < start * 0.95, (start, end, losses)


# ------------------------------------------------------------------------------------------------ workflow
class _TinyClip:
    """Stands in for the checkpoint's CLIP (no tiny SD1.5 text encoder exists): CLIPTextEncode calls exactly these
    two methods. The conditioning is the tiny UNet's context width, seeded by the text."""

    def tokenize(self, text):
        return text

    def encode_from_tokens_scheduled(self, tokens):
        g = torch.Generator().manual_seed(sum(map(ord, tokens)))
        return [[torch.randn(1, 5, comfy_models.SD15_TINY_UNET_CONFIG["context_dim"], generator=g), {}]]


class _TinyVae:
    """Stands in for the checkpoint's VAE: VAEEncode calls `encode(pixels)` (B, H, W, 3) -> latents (B, 4, H/8, W/8);
    here an 8×8 average pool and a fixed 3 -> 4 channel mix (a deterministic function of the images)."""

    def encode(self, pixels):
        x = torch.nn.functional.avg_pool2d(pixels.movedim(-1, 1).float(), 8)
        mix = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.5, -0.5, 0.25]])
        return torch.einsum("oc,bchw->bohw", mix, x * 2 - 1)


def test_train_workflow_runs_in_comfyui_executor(comfy_nodes, model_folders, monkeypatch, tmp_path):
    """Workflow "OFT train an adapter" as the UI sends it (3 steps instead of 200) through ComfyUI's PromptExecutor:
    OFTLoadImages -> VAEEncode, CLIPTextEncode -> OFTTrainer -> OFTSave + core LossGraphNode; the folder holds images
    of two sizes (one batch each, trained as buckets).
    The checkpoint loader is monkeypatched to give the tiny SD1.5 UNet (ComfyUI cannot detect it) with stand-ins
    for its CLIP and VAE. The saved file has sd-scripts' diffusers names and reloads onto the model, every layer
    matched; the loss graph PNG is written."""
    import comfy.model_management
    import comfy.sd
    import folder_paths
    import numpy as np
    from comfyui_oft.oft_core import load_adapter
    from PIL import Image

    nodes, _ = comfy_nodes
    base = comfy_models.sd15_tiny()
    before = weights(base)
    ckpt = model_folders / "checkpoints" / "v1-5-pruned-emaonly.safetensors"

    def load_checkpoint_guess_config(path, *args, **kwargs):
        assert path == str(ckpt)
        return base.clone(), _TinyClip(), _TinyVae(), None

    monkeypatch.setattr(comfy.sd, "load_checkpoint_guess_config", load_checkpoint_guess_config)
    for name in ("input", "output", "temp"):
        (tmp_path / name).mkdir()
    monkeypatch.setattr(folder_paths, "input_directory", str(tmp_path / "input"))
    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path / "output"))
    monkeypatch.setattr(folder_paths, "temp_directory", str(tmp_path / "temp"))
    images = tmp_path / "input" / "oft_train_images"
    images.mkdir()
    g = np.random.default_rng(0)
    for i, (h, w) in enumerate([(64, 64), (64, 96), (64, 64)]):
        Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / f"img{i}.png")

    wf = json.loads((comfy_models.REPO_ROOT / "workflows" / "OFT train an adapter.json").read_text())
    prompt = workflows.to_api_prompt(wf, nodes.NODE_CLASS_MAPPINGS)
    trainer_id = workflows._node_id(wf, "OFTTrainer")
    assert prompt[trainer_id]["inputs"]["steps"] == 200
    prompt[trainer_id]["inputs"].update(steps=3, learning_rate=2e-2)
    try:
        executor, _server = workflows._execute(nodes, prompt, "train")
        assert executor.success, [m for m in executor.status_messages if m[0] == "execution_error"]
        outputs = executor.history_result["outputs"]
        text = outputs[workflows._node_id(wf, "OFTSave")]["text"][0]
        assert "saved kohya adapter (56 layers)" in text, text
        graph = outputs[workflows._node_id(wf, "LossGraphNode")]["images"][0]
        assert (tmp_path / "temp" / graph["filename"]).is_file()
    finally:
        comfy.model_management.unload_all_models()
    assert_weights_equal(base, before)
    (saved,) = (tmp_path / "output" / "oft").glob("oft_trained_*.safetensors")
    adapter = load_adapter(saved)
    assert adapter.metadata["ss_steps"] == "3" and adapter.metadata["ss_num_train_images"] == "3"
    assert adapter.metadata["ss_enable_bucket"] == "True"
    assert json.loads(adapter.metadata["comfyui_oft.latent_sizes"]) == {"8x8": 2, "8x12": 1}
    assert adapter.metadata["ss_mixed_precision"] == "bf16"
    names = [layer.name for layer in adapter]  # as stored: kohya names with "_"
    assert "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in names
    assert all(n.startswith(("down_blocks_", "mid_block_", "up_blocks_")) for n in names), names[:3]
    from comfyui_oft.nodes.patch import apply_oft

    _model, _, report = apply_oft(base, None, adapter, 1.0)
    assert "56 of 56 adapter layers applied" in report, report


def test_bench_train_quick_runs(tmp_path):
    """benchmarks/bench_train.py --quick: both trainers run in their own subprocess on the tiny UNet and the script
    prints its same-run ratios and the machine load, and appends them to its results file (no timing asserted)."""
    import re
    import subprocess
    import sys

    results = tmp_path / "bench_train.results.txt"
    run = subprocess.run([sys.executable, str(comfy_models.REPO_ROOT / "benchmarks" / "bench_train.py"), "--quick",
                          "--threads", "1", "--rounds", "2", "--results", str(results)], capture_output=True, text=True,
                         timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    m = re.search(r"ratios ours/core: step time (\d+\.\d+) wall clock, (\d+\.\d+) thread CPU time \([\d.]+ vs [\d.]+ "
                  r"ms; goal ≤ 0\.5\), peak memory (\d+\.\d+) \(goal ≤ 0\.5\); machine load \[", out)
    assert m and float(m[1]) > 0 and float(m[2]) > 0 and float(m[3]) > 0, out
    assert "attention kernel: ours attention_pytorch, core attention_pytorch" in out  # the same kernel
    # the floor's step against core's, and the step-time ratios of both rounds (ours, core, floor back to back)
    floor = re.search(r"floor \(ours with only the model's input layer trained.*\): step +(\d+\.\d) ms = (\d+\.\d+) of "
                      r"core's; ours adds -?\d+ ms above it, core -?\d+ ms", out)
    assert floor and float(floor[1]) > 0 and float(floor[2]) > 0, out
    rounds = re.search(r"step-time ratios in 2 rounds .*: ours/core (\d+\.\d+), (\d+\.\d+) \(median (\d+\.\d+); "
                       r"goal ≤ 0\.5\), floor/core (\d+\.\d+), (\d+\.\d+) \(median", out)
    assert rounds, out
    a, b, median = float(rounds[1]), float(rounds[2]), float(rounds[3])
    assert a > 0 and b > 0 and abs(median - (a + b) / 2) <= 0.01, out  # of two rounds: their mean (printed rounded)
    # same layers and the same block structure on both sides: core stores full b×b blocks, we the b(b−1)/2 upper
    # triangle, so its OFT parameter count is larger by a factor between 2 (large b) and 4 (b = 2)
    ours = re.search(r"ours \(OFTTrainer\): (\d+) layers \(0 with block size 1 left out\), (\d+) trained params", out)
    core = re.search(r"core \(TrainLoraNode OFT\): (\d+) layers, \d+ trained params \((\d+) OFT", out)
    assert ours and core and ours[1] == core[1], out
    assert 2 < int(core[2]) / int(ours[2]) < 4
    assert "ratios input/weight-centric: time" in out and "machine: load" in out
    # the breakdown: live tensor bytes at the peak of each side and of the floor run (only the input layer trained)
    live = re.search(r"live-tensor ratio ours/core (\d+\.\d+); the floor alone would be (\d+\.\d+)", out)
    assert live and 0 < float(live[2]) < float(live[1]), out
    assert re.search(r"floor \(only the model's input layer trained.*\): peak +\d+\.\d MiB \(kept", out), out
    assert results.read_text().strip().splitlines()[-1].startswith("  machine: load")


def test_bench_train_qoft_depth_extrapolation(monkeypatch):
    """The QOFT part's FLUX.1-dev line: the Linear parameter count from the shapes gives FLUX.1's published 11.9 G
    at 19 double + 38 single blocks, and the ratio carries the stored weights by that count and keeps the growth."""
    import importlib.util

    monkeypatch.syspath_prepend(str(comfy_models.REPO_ROOT / "benchmarks"))  # its `_common`
    spec = importlib.util.spec_from_file_location("bench_train_qoft", comfy_models.REPO_ROOT / "benchmarks" /
                                                  "bench_train.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def count(blocks):
        return sum(i * o + o for _n, _t, i, o in bench.flux_linears(blocks))

    assert 11.85e9 < count((19, 38)) < 11.95e9  # FLUX.1-dev: 11.9 G parameters, nearly all in these Linears
    assert count((2, 2)) == count(None)  # the race model's own depth by default
    k = count((19, 38)) / count((6, 12))
    line = bench.qoft_depth_line({"model_MiB": 1000.0, "peak_rss_growth_MiB": 100.0},
                                 {"model_MiB": 500.0, "peak_rss_growth_MiB": 150.0}, (6, 12))
    want = (500.0 * k + 150.0) / (1000.0 * k + 100.0)
    assert f"the weights × {k:.2f}" in line and line.endswith(f"ratio ≈ {want:.2f}"), line
    assert 0.5 < want < 0.55


def test_bench_train_executor_and_allocator_lines(monkeypatch):
    """The SD part's two lines that only a full run prints (`--quick` leaves their workers out): the executor-made
    weights' goal is measured in live tensors (a copy of the weights shows there; RSS is printed as noise), and the
    warm RSS is printed with glibc's per-thread cache off too, whose workers get the tunable in their environment."""
    import importlib.util

    monkeypatch.syspath_prepend(str(comfy_models.REPO_ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_train_lines", comfy_models.REPO_ROOT / "benchmarks" /
                                                  "bench_train.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def trace(mib):
        return {"live": {"peak_MiB": mib, "by_phase": {"forward": 1.0}, "by_tag": {}}}

    r = {"ours": {"peak_rss_growth_MiB": 180.0, "step_s": 2.0},
         "ours-executor": {"inference_tensors": 434, "step_s": 2.1, "largest_layer_MiB": 4.5, "model_MiB_stored": 95.4,
                           "peak_rss_growth_MiB": 191.5},
         "ours#trace": trace(63.5), "ours-executor#trace": trace(159.0)}
    line = bench.executor_lines(r)
    assert "live tensors at the peak 159.0 MiB, minus normal weights' 63.5 MiB = +95.5 MiB" in line, line
    assert "peak RSS growth 191.5 MiB against 180.0 (+11.5: cold runs, noise" in line, line

    r = {f"{s}#trace": trace(60.0) for s in ("ours", "core", "ours-floor")}
    for side, warm, off in (("ours", 160.0, 108.0), ("core", 320.0, 250.0), ("ours-floor", 128.0, 111.0)):
        r[f"{side}#warmup"] = {"peak_rss_growth_MiB": warm, "step_s": 1.0}
        r[f"{side}#warmup#tcache0"] = {"peak_rss_growth_MiB": off, "step_s": 1.5}
    lines = bench.breakdown_lines(r)
    assert "ours 160.0 MiB, core 320.0 MiB, ours-floor 128.0 MiB; ratio ours/core 0.50" in lines[-3], lines[-3]
    assert "ours 100.0 MiB, core 260.0 MiB, ours-floor 68.0 MiB" in lines[-2], lines[-2]
    assert ("cache of small freed chunks off (GLIBC_TUNABLES=glibc.malloc.tcache_count=0" in lines[-1]
            and "ours 108.0 MiB, core 250.0 MiB, ours-floor 111.0 MiB; ratio ours/core 0.43" in lines[-1]
            and "step ours 1.50 s" in lines[-1] and "(with the cache: ours 1.00 s" in lines[-1]), lines[-1]
    del r["core#warmup#tcache0"], r["ours#warmup#tcache0"], r["ours-floor#warmup#tcache0"]
    assert "tcache" not in "\n".join(bench.breakdown_lines(r))

    # the flag is the environment, not a worker argument
    seen = []

    class Done:
        returncode, stdout, stderr = 0, '{"ok": 1}\n', ""

    def fake_run(cmd, **kw):
        seen.append((cmd, kw.get("env")))
        return Done()
    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    args = type("A", (), {"rank": 8, "lr": 1e-3, "threads": 1, "no_checkpointing": False})()
    out = bench.run_workers(args, comfy_models.REPO_ROOT / "nowhere", "default", 6, "fp32", "fp32",
                            who=("ours#warmup#tcache0", "core"))
    assert set(out) == {"ours#warmup#tcache0", "core"}
    (cmd0, env0), (cmd1, env1) = seen
    assert "--warmup" in cmd0 and "--tcache0" not in cmd0 and env0["GLIBC_TUNABLES"] == bench.TCACHE_OFF
    assert env0["PATH"] == bench.os.environ["PATH"] and env1 is None and "--warmup" not in cmd1
