"""OFTTrainer for real use (issue 14), against the REAL ComfyUI (CPU) on the tiny SD1.5-family UNet and tiny FLUX:
loss functions, learning-rate schedule with warm-up, resume (exact start, ss_steps carried on, first mismatch
refused), checkpoints every N steps (numbered, never overwriting, in the report), several latent sizes (one size per
micro-batch, same seed = same adapter), and the pure-torch pieces behind them (residual_loss, lr_factor,
OFTTrainer.load_adapter).
"""

from __future__ import annotations

import math

import comfy_models
import pytest
import test_train_node as ttn
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.comfyui

tn = ttn.tn
_one_torch_thread = ttn._one_torch_thread
run_node, run_node_report, sd_data, weights, assert_weights_equal = (
    ttn.run_node, ttn.run_node_report, ttn.sd_data, ttn.weights, ttn.assert_weights_equal)


def gens(adapter):
    return {k: [g.clone() for g in layer.blocks] for k, layer in adapter.layers.items()}


def max_diff(a, b) -> float:
    assert a.keys() == b.keys()
    return max(float((x - y).abs().max()) for k in a for x, y in zip(a[k], b[k]))


# ------------------------------------------------------------------------------------------------ pure torch
def test_residual_loss_is_core_losses_on_the_residual():
    from oft_core.train import residual_loss

    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 8, 8, generator=g) * 2, torch.randn(2, 4, 8, 8, generator=g)
    r = pred - target
    assert torch.allclose(residual_loss("MSE", r), F.mse_loss(pred, target))
    assert torch.allclose(residual_loss("L1", r), F.l1_loss(pred, target))
    assert torch.allclose(residual_loss("Huber", r), torch.nn.HuberLoss()(pred, target))
    assert torch.allclose(residual_loss("SmoothL1", r), torch.nn.SmoothL1Loss()(pred, target))
    # the four are different functions of a residual with |r| > 1 somewhere
    vals = {n: float(residual_loss(n, r)) for n in ("MSE", "L1", "Huber")}
    assert len(set(vals.values())) == 3
    with pytest.raises(ValueError, match="loss function: expected MSE"):
        residual_loss("L3", r)


def test_lr_factor_schedules_and_warmup():
    from oft_core.train import lr_factor

    assert [lr_factor("constant", s, 10, 3) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert [lr_factor("linear", s, 10, 0) for s in (0, 5, 9)] == [1.0, 0.5, pytest.approx(0.1)]
    assert lr_factor("cosine", 0, 10, 2) == pytest.approx(1 / 3)
    assert lr_factor("cosine", 2, 10, 2) == 1.0
    assert lr_factor("cosine", 6, 10, 2) == pytest.approx(0.5)  # halfway through the 8 steps after warm-up
    assert all(0 < lr_factor(s, k, 10, 2) <= 1 for s in ("constant", "cosine", "linear") for k in range(10))
    with pytest.raises(ValueError, match="learning-rate schedule"):
        lr_factor("step", 0, 10)
    with pytest.raises(ValueError, match="warm-up steps"):
        lr_factor("cosine", 0, 10, -1)


def test_run_training_sets_the_scheduled_lr_every_step():
    from oft_core.demo import _ToyModel
    from oft_core.train import OFTTrainer, lr_factor, run_training, select_targets

    model = _ToyModel().requires_grad_(False)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    trainer = OFTTrainer(select_targets(model, "attention", "generic"), num_blocks=2, alpha=0.0)
    seen = []
    orig = torch.optim.SGD.step

    def spy(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return orig(self, *a, **k)

    torch.optim.SGD.step = spy
    try:
        with trainer.attach():
            run_training(trainer.parameters(), lambda s, m: model(x).square().mean(), steps=6, lr=0.1,
                         optimizer="SGD", schedule="cosine", warmup_steps=2)
    finally:
        torch.optim.SGD.step = orig
    assert seen == [pytest.approx(0.1 * lr_factor("cosine", s, 6, 2)) for s in range(6)]


def _fp16_toy_run(dtype, loss_scaling: bool, optimizer: str = "AdamW", tiny: float = 2.0**-24, steps: int = 4):
    """Generators after `steps` steps of the toy model under autocast `dtype` (CPU), its loss multiplied by `tiny`:
    the gradients a real fp16 run meets below fp16's smallest number (6·10⁻⁸) at every layer."""
    from oft_core.demo import _ToyModel
    from oft_core.train import OFTTrainer, run_training, select_targets

    model = _ToyModel().requires_grad_(False)
    teacher = _ToyModel(seed=1)
    x = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        target = teacher(x)
    trainer = OFTTrainer(select_targets(model, "all-linear", "generic"), num_blocks=2, alpha=0.0)

    def loss(s, m):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            return F.mse_loss(model(x).float(), target) * tiny

    with trainer.attach():
        losses = run_training(trainer.parameters(), loss, steps=steps, lr=1e-2, optimizer=optimizer,
                              loss_scaling=loss_scaling)
    return torch.cat([p.detach().flatten() for p in trainer.parameters()]), losses


@pytest.mark.parametrize("optimizer", ["AdamW", "Adam"])
def test_fp16_loss_scaling_keeps_the_gradients_fp16_would_lose(optimizer):
    """fp16 autocast: gradients below 6·10⁻⁸ vanish in its activations, and a run whose gradients are that small
    (here the loss × 2⁻²⁴; Adam's step does not depend on the gradient's scale) trains nothing; with the node's
    fp16 loss scaling it trains as fp32 does (to fp16's rounding of the activations)."""
    ref, ref_losses = _fp16_toy_run(torch.float32, False, optimizer)
    assert float(ref.abs().max()) > 1e-3  # fp32: the tiny gradients move the generators (Adam normalises them)
    lost, _ = _fp16_toy_run(torch.float16, False, optimizer)
    assert float(lost.abs().max()) == 0.0  # fp16 without scaling: every gradient underflowed
    scaled, scaled_losses = _fp16_toy_run(torch.float16, True, optimizer)
    assert float((scaled - ref).norm() / ref.norm()) < 0.05
    assert scaled_losses[-1] < scaled_losses[0]


def test_fp16_loss_scaling_skips_an_overflowing_step_and_lowers_the_scale():
    """A loss whose scaled gradients overflow fp16 (here × 2¹⁶ on top of the scale 2¹⁶): the step is skipped (the
    generators stay), the scale halves until the gradients fit, then the run trains."""
    first, _ = _fp16_toy_run(torch.float16, True, tiny=2.0**16, steps=1)
    assert float(first.abs().max()) == 0.0  # the one step overflowed: skipped, nothing half-applied
    later, losses = _fp16_toy_run(torch.float16, True, tiny=2.0**16, steps=24)
    assert torch.isfinite(later).all() and float(later.abs().max()) > 1e-3
    assert all(math.isfinite(v) for v in losses)


def test_the_nodes_fp16_training_scales_its_loss_and_trains_as_fp32(comfy, tn, monkeypatch):
    """The node's fp16 (GPUs without bf16) trains with dynamic loss scaling (its one GradScaler, on the model's
    device) and lands where fp32 training does, to fp16's rounding of the activations; bf16 and fp32 do not scale."""
    scalers = []
    orig = torch.amp.GradScaler.__init__

    def spy(self, *a, **k):
        scalers.append(a[0] if a else k.get("device"))
        orig(self, *a, **k)

    monkeypatch.setattr(torch.amp.GradScaler, "__init__", spy)
    latents, positive = sd_data()
    runs = {}
    for dtype in ("fp32", "fp16", "bf16"):
        _, adapter, loss = run_node(tn, comfy_models.sd15_tiny(), latents, positive, steps=6, training_dtype=dtype)
        runs[dtype] = (torch.cat([layer.blocks[0].flatten() for layer in adapter]), loss["loss"])
        assert scalers == (["cpu"] if dtype != "fp32" else []), dtype
    ref, ref_losses = runs["fp32"]
    got, losses = runs["fp16"]
    assert float(ref.abs().max()) > 1e-3 and torch.isfinite(got).all()
    assert float((got - ref).norm() / ref.norm()) < 0.1
    assert losses == pytest.approx(ref_losses, rel=1e-2)


def test_load_adapter_starts_exactly_from_a_written_file_and_names_the_first_mismatch(tmp_path):
    from oft_core import load_adapter
    from oft_core.demo import _ToyModel
    from oft_core.formats import write_adapter
    from oft_core.train import OFTTrainer, select_targets

    model = _ToyModel(dim=16).requires_grad_(False)
    targets = select_targets(model, "attention", "generic")
    a = OFTTrainer(targets, num_blocks=4, alpha=1e-3)
    with torch.no_grad():
        for i, p in enumerate(a.parameters()):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 1e-3)
    path = write_adapter(a.to_adapter({"ss_steps": "7"}), tmp_path / "a.safetensors", "kohya")
    b = OFTTrainer(targets, num_blocks=4, alpha=1e-3)
    b.load_adapter(load_adapter(path))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))  # bit for bit
    for kw, match in ((dict(num_blocks=2, alpha=1e-3), r"blocks per split × block size: expected 2×8, found 4×4"),
                      (dict(num_blocks=4, alpha=0.0), r"constraint \(alpha\): expected 0"),
                      (dict(num_blocks=4, alpha=2e-3), r"constraint \(alpha\): expected 0.002")):
        c = OFTTrainer(targets, **kw)
        before = [p.clone() for p in c.parameters()]
        with pytest.raises(ValueError, match=match) as e:
            c.load_adapter(load_adapter(path))
        assert str(path) in str(e.value) and "'attn_to_q'" in str(e.value)  # the file and the first layer
        assert all(torch.equal(p, q) for p, q in zip(before, c.parameters()))  # nothing changed
    more = OFTTrainer(select_targets(model, "all-linear", "generic"), num_blocks=4, alpha=1e-3)
    with pytest.raises(ValueError, match=r"resume: the adapter has no layer 'proj'"):
        more.load_adapter(load_adapter(path))


# ------------------------------------------------------------------------------------------------ node
def fixed_loss(tn, patcher, latents, positive, loss_function, adapter=None, seed=123) -> float:
    """`loss_function` of the family objective on fixed noise and noise levels, with `adapter` attached (bypass)."""
    import comfy.model_management

    base = patcher.model
    dev = torch.device("cpu")
    trainer = None
    if adapter is not None:
        trainer = tn.build_trainer(patcher, "attention", 4, 0.0, 0)
        trainer.load_adapter(adapter)
    with torch.inference_mode(False), torch.no_grad():
        x0 = base.process_latent_in(latents["samples"].clone())
        conds = tn.batch_conds(tn.prepare_conds(base, positive, x0, dev), list(range(x0.shape[0])))
        gen = torch.Generator().manual_seed(seed)
        total = 0.0
        for _ in range(4):
            noise = torch.randn(x0.shape, generator=gen)
            sigma = tn.sample_sigmas(base.model_sampling, x0.shape[0], gen)
            if trainer is None:
                total += float(tn.family_loss(base, x0, noise, sigma, conds, {}, loss_function))
            else:
                with trainer.attach():
                    total += float(tn.family_loss(base, x0, noise, sigma, conds, {}, loss_function))
    comfy.model_management.unload_all_models()
    return total / 4


@pytest.mark.parametrize("loss_function", ["L1", "Huber", "SmoothL1"])
def test_each_loss_function_trains_on_the_family_objective(comfy, tn, loss_function, monkeypatch):
    """The chosen loss is the one the optimizer sees: the node's losses are that loss of the family residual
    (recomputed here for step 1 from the same draws), and it drops."""
    mp = comfy_models.flux_tiny()
    latents, positive = ttn.flux_data()
    residuals = []
    orig = tn.residual_loss

    def spy(name, r, *a):
        residuals.append((name, r.detach().clone()))
        return orig(name, r, *a)

    monkeypatch.setattr(tn, "residual_loss", spy)
    _, adapter, loss = run_node(tn, mp, latents, positive, steps=8, loss_function=loss_function)
    assert {n for n, _ in residuals} == {loss_function}
    first = residuals[0][1]
    ref = {"L1": F.l1_loss(first, torch.zeros_like(first)), "Huber": torch.nn.HuberLoss()(first, 0 * first),
           "SmoothL1": torch.nn.SmoothL1Loss()(first, 0 * first)}[loss_function]
    assert loss["loss"][0] == pytest.approx(float(ref), rel=1e-6)
    mse = float(first.square().mean())
    assert abs(loss["loss"][0] - mse) > 1e-3 * mse  # not the MSE under another name
    monkeypatch.setattr(tn, "residual_loss", orig)
    start = fixed_loss(tn, mp, latents, positive, loss_function)
    end = fixed_loss(tn, mp, latents, positive, loss_function, adapter)
    assert end < start * 0.97, (start, end)
    assert adapter.metadata["ss_loss_type"] == {"L1": "l1", "Huber": "huber", "SmoothL1": "smooth_l1"}[loss_function]


def test_lr_schedule_and_warmup_are_applied_and_saved(comfy, tn, monkeypatch):
    from comfyui_oft.oft_core import train as core_train

    mp = comfy_models.sd15_tiny()
    latents, positive = sd_data()
    seen = []
    orig = core_train.lr_factor

    def spy(schedule, step, steps, warmup=0):
        v = orig(schedule, step, steps, warmup)
        seen.append((schedule, step, steps, warmup, v))
        return v

    monkeypatch.setattr(core_train, "lr_factor", spy)
    _, adapter, _, report = run_node_report(tn, mp, latents, positive, steps=5, lr_schedule="linear",
                                            warmup_steps=2)
    used = [s for s in seen if s[1] >= 0][-5:]
    assert [(s[1], s[4]) for s in used] == [(0, 1 / 3), (1, 2 / 3), (2, 1.0), (3, pytest.approx(2 / 3)),
                                            (4, pytest.approx(1 / 3))]
    meta = adapter.metadata
    assert meta["ss_lr_scheduler"] == "linear" and meta["ss_lr_warmup_steps"] == "2"
    assert "lr 0.02 linear after 2 warm-up steps" in report


def test_resume_continues_the_adapter_and_carries_its_steps(comfy, tn, tmp_path):
    from comfyui_oft.oft_core import load_adapter
    from comfyui_oft.oft_core.formats import write_adapter

    mp = comfy_models.sd15_tiny()
    latents, positive = sd_data()
    before = weights(mp)
    _, first, _ = run_node(tn, mp, latents, positive, steps=4, constraint=1e-2)
    path = write_adapter(first, tmp_path / "first.safetensors", "kohya")  # diffusers names, as sd-scripts
    loaded = load_adapter(path)
    assert loaded.metadata["ss_steps"] == "4"
    # a learning rate so small that one step barely moves: the result is the resumed adapter, not a fresh one
    _, again, _, report = run_node_report(tn, mp, latents, positive, steps=1, constraint=1e-2, learning_rate=1e-7,
                                          optimizer="SGD", resume_from=loaded)
    assert max_diff(gens(again), gens(first)) < 1e-6
    assert max(float(g.abs().max()) for gl in gens(first).values() for g in gl) > 1e-3
    assert again.metadata["ss_steps"] == "5" and again.metadata["comfyui_oft.resumed_from_steps"] == "4"
    assert f"resumed from {path} at step 4" in report
    # continuing in the graph (the adapter output itself, dotted names) works the same
    _, third, _ = run_node(tn, mp, latents, positive, steps=2, constraint=1e-2, resume_from=again)
    assert third.metadata["ss_steps"] == "7"
    assert max_diff(gens(third), gens(again)) > 1e-6  # it trained on
    assert_weights_equal(mp, before)


def test_an_unconstrained_run_resumes_its_own_kohya_file(comfy, tn, tmp_path):
    """kohya has no "no constraint": an alpha-0 adapter is written with an alpha whose clamp never bites, and says so
    in its metadata; resuming it with alpha 0 continues it (it was refused: "expected 0, found ‖Q‖ ≤ 0.0625·dim").
    A file with a real constraint is still refused by an alpha-0 run, and so is the marked file by a constrained
    run."""
    from comfyui_oft.oft_core import load_adapter
    from comfyui_oft.oft_core.formats import write_adapter

    mp = comfy_models.sd15_tiny()
    latents, positive = sd_data()
    _, first, _ = run_node(tn, mp, latents, positive, steps=3, constraint=0.0)
    assert all(layer.constraint.kind == "none" for layer in first.layers.values())
    path = write_adapter(first, tmp_path / "free.safetensors", "kohya")
    loaded = load_adapter(path)
    assert loaded.metadata["comfyui_oft.unconstrained"] == "true"
    assert {layer.constraint.kind for layer in loaded.layers.values()} == {"norm_clamp"}
    _, again, _ = run_node(tn, mp, latents, positive, steps=1, constraint=0.0, learning_rate=1e-7,
                           optimizer="SGD", resume_from=loaded)
    assert max_diff(gens(again), gens(first)) < 1e-6
    assert max(float(g.abs().max()) for gl in gens(first).values() for g in gl) > 1e-3
    assert again.metadata["ss_steps"] == "4"
    with pytest.raises(ValueError, match=r"constraint \(alpha\): expected 0.01, found ‖Q‖ ≤ 0.0625·dim"):
        run_node(tn, mp, latents, positive, steps=1, constraint=1e-2, resume_from=loaded)
    _, held, _ = run_node(tn, mp, latents, positive, steps=1, constraint=1e-2)
    real = load_adapter(write_adapter(held, tmp_path / "held.safetensors", "kohya"))
    assert "comfyui_oft.unconstrained" not in real.metadata
    with pytest.raises(ValueError, match=r"constraint \(alpha\): expected 0, found ‖Q‖ ≤ 0.01·dim"):
        run_node(tn, mp, latents, positive, steps=1, constraint=0.0, resume_from=real)


@pytest.mark.parametrize("change, match", [
    (dict(num_blocks=2), r"blocks per split × block size: expected 2×\d+, found 4×\d+"),
    (dict(constraint=0.0), r"constraint \(alpha\): expected 0, found ‖Q‖ ≤ 0.01·dim"),
    (dict(targets="all-linear"), r"the adapter has no layer '[a-z_0-9.]+proj_in'"),
])
def test_resume_refuses_a_different_adapter_naming_the_first_mismatch(comfy, tn, change, match):
    mp = comfy_models.sd15_tiny()
    latents, positive = sd_data()
    _, first, _ = run_node(tn, mp, latents, positive, steps=1, constraint=1e-2)
    kw = dict(dict(constraint=1e-2, resume_from=first), **change)
    calls = []
    with pytest.raises(ValueError, match=match):
        with pytest.MonkeyPatch.context() as m:  # refused before any training step
            m.setattr(comfy.model_management, "throw_exception_if_processing_interrupted", lambda: calls.append(1))
            run_node(tn, mp, latents, positive, steps=2, **kw)
    assert calls == []


def test_checkpoints_every_n_steps_numbered_never_overwriting_and_reported(comfy, tn, tmp_path, monkeypatch):
    import folder_paths
    from comfyui_oft.oft_core import load_adapter

    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path))
    (tmp_path / "loras").mkdir()
    taken = tmp_path / "loras" / "ck_00001_step000002.safetensors"  # a file that is already there
    taken.write_bytes(b"keep me")
    mp = comfy_models.sd15_tiny()
    latents, positive = sd_data()
    _, final, _, report = run_node_report(tn, mp, latents, positive, steps=5, save_every=2,
                                          checkpoint_prefix="loras/ck")
    assert taken.read_bytes() == b"keep me"
    files = sorted(p.name for p in (tmp_path / "loras").glob("ck_*.safetensors"))
    assert files == ["ck_00001_step000002.safetensors", "ck_00002_step000002.safetensors",
                     "ck_00003_step000004.safetensors"], files
    for name, step in (("ck_00002_step000002.safetensors", "2"), ("ck_00003_step000004.safetensors", "4")):
        assert str(tmp_path / "loras" / name) in report
        saved = load_adapter(tmp_path / "loras" / name)
        assert saved.metadata["ss_steps"] == step and saved.metadata["ss_max_train_steps"] == "5"
        assert saved.metadata["ss_network_module"] == "networks.oft" and len(saved) == len(final)
    assert "2 checkpoints:" in report
    assert final.metadata["ss_steps"] == "5"


def test_several_latent_sizes_one_size_per_micro_batch_same_seed_same_adapter(comfy, tn, monkeypatch):
    mp = comfy_models.sd15_tiny()
    g = torch.Generator().manual_seed(3)
    small = {"samples": torch.randn(3, 4, 16, 16, generator=g)}
    wide = {"samples": torch.randn(2, 4, 16, 24, generator=g)}
    cond = [[torch.randn(1, 5, 48, generator=g), {}]]
    shapes = []
    orig = tn.family_loss

    def spy(*args):
        shapes.append(tuple(args[1].shape))
        return orig(*args)

    monkeypatch.setattr(tn, "family_loss", spy)
    # as ComfyUI passes them with is_input_list: a list of LATENT batches, a list of CONDITIONINGs
    out = run_node_report(tn, mp, [small, wide], [cond, cond], steps=6, batch_size=2, seed=5)
    assert set(shapes) == {(2, 4, 16, 16), (2, 4, 16, 24)}  # both sizes trained, never mixed in one batch
    a = gens(out[1])
    assert out[1].metadata["comfyui_oft.latent_sizes"] == '{"16x16": 3, "16x24": 2}'
    assert "latent sizes: 16x16 (3 images), 16x24 (2 images)" in out[3]
    assert out[1].metadata["ss_num_train_images"] == "5" and out[1].metadata["ss_enable_bucket"] == "True"
    b = gens(run_node(tn, mp, [small, wide], [cond], steps=6, batch_size=2, seed=5)[1])  # one shared conditioning
    c = gens(run_node(tn, mp, [small, wide], [cond], steps=6, batch_size=2, seed=6)[1])
    assert max_diff(a, b) == 0.0
    assert max_diff(a, c) > 0.0


def test_micro_batch_plan_covers_every_image_each_epoch(tn):
    plan = tn.micro_batch_plan([3, 2], 2, 30, torch.Generator().manual_seed(0))
    assert len(plan) == 30 and all(len(idx) == 2 for _, idx in plan)
    assert all(max(idx) < (3 if k == 0 else 2) for k, idx in plan)
    # an epoch is 2 batches of bucket 0 (3 images topped up to 4) and 1 of bucket 1
    epoch = plan[:3]
    assert sorted(k for k, _ in epoch) == [0, 0, 1]
    assert set(i for k, idx in epoch if k == 0 for i in idx) == {0, 1, 2}
    again = tn.micro_batch_plan([3, 2], 2, 30, torch.Generator().manual_seed(0))
    assert again == plan


@pytest.mark.parametrize("case, match", [
    ("channels", r"batch 2 of 2\): expected 4 latent channels like the first batch, found 16"),
    ("conds", r"conditioning 2 \(for latent batch 2\): expected 1 entry or 2 \(one per image\), found 3"),
    ("count", r"expected one CONDITIONING for all 2 latent batches or one per batch, found 3"),
    ("loss", r"loss function: expected one of MSE, L1, Huber, SmoothL1, found 'L2'"),
    ("schedule", r"learning-rate schedule: expected constant \| cosine \| linear, found 'step'"),
])
def test_bad_feature_inputs_fail_clearly_before_any_work(comfy, tn, case, match):
    mp = comfy_models.sd15_tiny()
    g = torch.Generator().manual_seed(0)
    a = {"samples": torch.randn(2, 4, 16, 16, generator=g)}
    b = {"samples": torch.randn(2, 16 if case == "channels" else 4, 8, 8, generator=g)}
    c1 = [[torch.randn(1, 5, 48, generator=g), {}]]
    positive = {"conds": [c1, c1 * 3], "count": [c1, c1, c1]}.get(case, [c1])
    over = {"loss": dict(loss_function="L2"), "schedule": dict(lr_schedule="step")}.get(case, {})
    with pytest.raises(ValueError, match=match):
        run_node(tn, mp, [a, b], positive, steps=2, **over)
