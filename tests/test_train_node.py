"""OFTTrainer node against the REAL ComfyUI (CPU) on the tiny SD1.5-family UNet and the tiny FLUX.

Pinned: training lowers a fixed-noise loss of the family's own objective (FLUX with gradient checkpointing on and
off, both giving the same adapter); base weights bit-identical after training and after a run cancelled at step 2;
the saved kohya file reloads through the pack's loader to a model whose forward equals the trained model's;
identity at step 0; same seed -> same adapter; bad inputs rejected before any work.
"""

from __future__ import annotations

import comfy_models
import pytest
import torch

pytestmark = pytest.mark.comfyui

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
    assert [o.io_type for o in schema.outputs] == ["MODEL", "OFT_ADAPTER", "LOSS_MAP"]


def test_sd_training_lowers_the_loss_keeps_base_weights_and_reloads_from_kohya(comfy, tn, patch_mod, tmp_path):
    from comfyui_oft.oft_core import load_adapter
    from comfyui_oft.oft_core.writers import write_adapter

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

    # saved kohya file -> the pack's loader -> same forward as the output model, and as the trained bypass
    path = write_adapter(adapter, tmp_path / "sd_trained.safetensors", "kohya")
    loaded = load_adapter(path)
    assert loaded.metadata["ss_network_module"] == "networks.oft" and loaded.metadata["ss_steps"] == "12"
    assert float(loaded.metadata["ss_learning_rate"]) == 5e-2
    reloaded, _, text = patch_mod.apply_oft(mp, None, loaded, 1.0)
    assert f"{len(adapter)} of {len(adapter)} adapter layers applied" in text
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
    model, adapter, loss = run_node(tn, mp, latents, positive, steps=8, gradient_checkpointing=checkpointing)
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


_CACHE: dict = {}


def test_same_seed_same_adapter(comfy, tn):
    mp = comfy_models.sd15_tiny()
    latents, positive = sd_data()
    a = run_node(tn, mp, latents, positive, steps=3, seed=7)[1]
    b = run_node(tn, mp, latents, positive, steps=3, seed=7)[1]
    c = run_node(tn, mp, latents, positive, steps=3, seed=8)[1]
    assert a.layers.keys() == b.layers.keys()
    assert all(torch.equal(x, y) for k in a.layers for x, y in zip(a.layers[k].generators, b.layers[k].generators))
    assert any(not torch.equal(x, y) for k in a.layers for x, y in zip(a.layers[k].generators,
                                                                       c.layers[k].generators))


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
    assert tn.OFTTrainerNode.validate_inputs(steps=0) == "steps: expected ≥ 1, found 0"
