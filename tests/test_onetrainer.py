"""OneTrainer's "OFT v2" files: read, and applied as OneTrainer computes them.

OneTrainer (since 2025-11) stores PEFT's packed generators (`<layer>.oft_R.weight`, (blocks, b(b−1)/2)) without an
adapter_config.json: its code fixes the rest (the Cayley–Neumann series of 5 terms, last halved; one row when a block
is shared; `<layer>.oft_R.scaled_oft` marks Scaled OFT, generators divided by 2·√(b − 1)). A Linear's input is
rotated (W·Rᵀ, as PEFT), a Conv2d's weight as W·R. Layer names follow its output format: `lora_unet_…` (KOHYA,
LEGACY), `diffusion_model.…` / `text_encoders.<encoder>.transformer.…` (COMFY), diffusers or native paths; every
file carries `ot_branch` / `ot_revision`, and `ot_config` (its training settings) when the user chose to include it:
before 2026-05 that says whether Constrained OFT was trained.

Here (always run): the math on Linear and Conv2d weights against the series computed in fp64 from the file's
numbers (COFT's projection and the first revisions' series too); text-encoder names on ComfyUI's CLIPs (SD1, FLUX's
CLIP-L + T5); what a OneTrainer adapter cannot be (another format, a combination) is refused. With a OneTrainer
checkout (`ONETRAINER_PATH`, tier `third_party`): OneTrainer's own OFTModule on ComfyUI's tiny SD1.x UNet layers gives
the outputs of the same file applied through the OFTLoader node; with checkouts of its earlier eras
(`ONETRAINER_COFT_PATH`, `ONETRAINER_FIRST_PATH`) its modules of then give what the pack reads from their files.
"""

from __future__ import annotations

import math
from copy import deepcopy

import onetrainer_reference
import pytest
import torch
from oracle import REL_TOL, rel_err
from safetensors.torch import save_file

from oft_core import OFTError, load_adapter, match_adapter
from oft_core.combine import blend, merge
from oft_core.formats import write_adapter
from oft_core.rotation import rotate_weight

OT_META = {"ot_branch": "master", "ot_revision": "23df3832e8f213d64c337e39f9365ba46e99fed0"}


def _packed(q_upper: torch.Tensor) -> torch.Tensor:
    """(blocks, b, b) strictly-upper values -> OneTrainer's rows, in torch.triu_indices(b, b, 1) order."""
    b = q_upper.shape[-1]
    rows, cols = torch.triu_indices(b, b, 1)
    return q_upper[:, rows, cols].contiguous()


def _series(q: torch.Tensor) -> torch.Tensor:
    """OneTrainer's R for skew blocks q, in fp64: I + 2Q + 2Q² + 2Q³ + Q⁴."""
    q = q.double()
    eye = torch.eye(q.shape[-1], dtype=torch.float64).expand_as(q)
    q2 = q @ q
    q3 = q2 @ q
    return eye + 2 * q + 2 * q2 + 2 * q3 + q3 @ q


def _blockdiag(r: torch.Tensor, repeat: int = 1) -> torch.Tensor:
    return torch.block_diag(*([*r] * repeat))


def _file(tmp_path, layers: dict[str, torch.Tensor], scaled=(), metadata=OT_META, name="ot.safetensors"):
    tensors = {f"{k}.oft_R.weight": v for k, v in layers.items()}
    tensors.update({f"{k}.oft_R.scaled_oft": torch.tensor(True) for k in scaled})
    path = tmp_path / name
    save_file(tensors, str(path), metadata)
    return path


def _skew(n: int, b: int, seed: int, std: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed rows, the skew blocks they mean)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.triu(torch.randn(n, b, b, generator=g) * std, diagonal=1)
    return _packed(u), u - u.transpose(1, 2)


BASE = {
    "lin.weight": torch.randn(12, 16, generator=torch.Generator().manual_seed(1)),
    "conv.weight": torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(2)),
}


def _applied(path, strength=1.0) -> dict[str, torch.Tensor]:
    adapter = load_adapter(path)
    report = match_adapter(adapter, {k: tuple(v.shape) for k, v in BASE.items()})
    assert not report.unmatched, report.unmatched
    return {m.target.key: rotate_weight(m.layer, BASE[m.target.key], strength) for m in report.matched}


@pytest.mark.parametrize("scaled", [False, True])
def test_linear_rotates_its_input_and_conv_its_weight_as_onetrainer(tmp_path, scaled):
    """Linear: W·blockdiag(R)ᵀ (OneTrainer rotates x by R, then the layer: as PEFT); Conv2d: W·blockdiag(R) over
    the flattened in_channels × kh × kw (its einsum 'ork,rkc->orc'). Scaled OFT divides the generators by
    2·√(b − 1) first."""
    b = 4
    lin_rows, lin_q = _skew(16 // b, b, seed=3)
    conv_rows, conv_q = _skew(36 // b, b, seed=4)
    names = {"lora_unet_lin": lin_rows, "lora_unet_conv": conv_rows}
    path = _file(tmp_path, names, scaled=names if scaled else ())
    got = _applied(path)
    k = 1 / (2 * math.sqrt(b - 1)) if scaled else 1.0
    want_lin = BASE["lin.weight"].double() @ _blockdiag(_series(k * lin_q)).T
    want_conv = (BASE["conv.weight"].double().reshape(6, 36) @ _blockdiag(_series(k * conv_q))).reshape(6, 4, 3, 3)
    assert rel_err(got["lin.weight"], want_lin) <= REL_TOL
    assert rel_err(got["conv.weight"], want_conv) <= REL_TOL
    # the two conventions really differ here: the conv rotated the Linear way is far off
    wrong = (BASE["conv.weight"].double().reshape(6, 36) @ _blockdiag(_series(k * conv_q)).T).reshape(6, 4, 3, 3)
    assert rel_err(got["conv.weight"], wrong) > 100 * REL_TOL
    adapter = load_adapter(path)
    assert adapter.format == "peft_onetrainer"
    assert adapter.info["onetrainer"] == {"ot_revision": OT_META["ot_revision"], "scaled_layers": 2 if scaled else 0}


def test_strength_is_the_one_kohya_strength(tmp_path):
    """OneTrainer has no strength of its own: the pack's one definition, R_s = I + s(R − I)."""
    rows, q = _skew(4, 4, seed=5)
    path = _file(tmp_path, {"lora_unet_lin": rows})
    r = _series(q)
    eye = torch.eye(4, dtype=torch.float64).expand_as(r)
    want = BASE["lin.weight"].double() @ _blockdiag(eye + 0.5 * (r - eye)).T
    assert rel_err(_applied(path, 0.5)["lin.weight"], want) <= REL_TOL


def test_a_shared_block_is_repeated_over_the_layer(tmp_path):
    """block_share: one row of generators, the same block along the whole input (its count from the weight)."""
    rows, q = _skew(1, 4, seed=6)
    got = _applied(_file(tmp_path, {"lora_unet_lin": rows, "lora_unet_conv": rows.clone()}))
    assert rel_err(got["lin.weight"], BASE["lin.weight"].double() @ _blockdiag(_series(q), 4).T) <= REL_TOL
    want_conv = (BASE["conv.weight"].double().reshape(6, 36) @ _blockdiag(_series(q), 9)).reshape(6, 4, 3, 3)
    assert rel_err(got["conv.weight"], want_conv) <= REL_TOL


@pytest.mark.parametrize("key, component, name", [
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "unet",
     "input_blocks_4_1_transformer_blocks_0_attn1_to_q"),  # KOHYA / LEGACY
    ("lora_transformer_single_transformer_blocks_0_attn_to_q", "unet",
     "single_transformer_blocks_0_attn_to_q"),  # LEGACY FLUX
    ("diffusion_model.double_blocks.0.img_attn.qkv", "unet", "double_blocks.0.img_attn.qkv"),  # COMFY
    ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "te1", "text_model_encoder_layers_0_self_attn_q_proj"),
    ("transformer.transformer_blocks.0.attn.to_q", "unet", "transformer_blocks.0.attn.to_q"),  # DIFFUSERS
    ("text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj", "te1",
     "text_model.encoder.layers.0.self_attn.q_proj"),  # COMFY's CLIP-L
    ("text_encoders.clip_g.transformer.text_model.encoder.layers.0.self_attn.q_proj", "te2",
     "text_model.encoder.layers.0.self_attn.q_proj"),  # COMFY's CLIP-G
])
def test_onetrainer_names_land_in_the_components_of_the_model(tmp_path, key, component, name):
    rows, _ = _skew(2, 4, seed=7)
    adapter = load_adapter(_file(tmp_path, {key: rows}))
    (layer,) = adapter
    assert (layer.component, layer.name, layer.key) == (component, name, key)


def test_recognised_by_names_when_the_metadata_is_gone(tmp_path):
    rows, _ = _skew(2, 4, seed=8)
    assert load_adapter(_file(tmp_path, {"lora_unet_lin": rows}, metadata=None)).format == "peft_onetrainer"
    # a packed file with PEFT's names and no config is still PEFT's, and still needs its config
    with pytest.raises(OFTError, match="a PEFT OFT file needs its adapter_config.json"):
        load_adapter(_file(tmp_path, {"base_model.model.lin": rows}, metadata=None, name="peft.safetensors"))


@pytest.mark.parametrize("marker, found", [
    (torch.tensor([True, True]), r"\(2,\)"), (torch.tensor(2.0), "2.0"), (torch.tensor(float("nan")), "nan"),
])
def test_a_bad_scaled_marker_is_refused(tmp_path, marker, found):
    rows, _ = _skew(4, 4, seed=9)
    path = tmp_path / "bad.safetensors"
    save_file({"lora_unet_lin.oft_R.weight": rows, "lora_unet_lin.oft_R.scaled_oft": marker}, str(path), OT_META)
    with pytest.raises(OFTError, match=f"scaled_oft: expected OneTrainer's one-element marker.*found {found}") as e:
        load_adapter(path)
    assert "lora_unet_lin" in str(e.value) and str(path) in str(e.value)


@pytest.mark.parametrize("fmt", ["kohya", "lycoris", "peft"])
def test_written_as_another_format_is_refused_with_the_reason(tmp_path, fmt):
    """Whether a OneTrainer layer rotates as a Linear or, transposed, as a convolution only the model says: no other
    format can hold it before that, so writing one is refused, naming why, and nothing is written."""
    rows, _ = _skew(4, 4, seed=10)
    adapter = load_adapter(_file(tmp_path, {"lora_unet_lin": rows}))
    out = tmp_path / f"out_{fmt}"
    with pytest.raises(OFTError, match="OneTrainer layer.*apply the file to a model"):
        write_adapter(adapter, out if fmt == "peft" else out.with_suffix(".safetensors"), fmt)
    assert not any(p.name.startswith("out_") for p in tmp_path.iterdir())


def test_combining_is_refused_with_what_to_do_instead(tmp_path):
    rows, _ = _skew(4, 4, seed=11)
    a = load_adapter(_file(tmp_path, {"lora_unet_lin": rows}))
    with pytest.raises(OFTError, match="cannot blend a OneTrainer adapter.*apply the adapters one after another"):
        blend(a, a, 0.5)
    for mode in ("compose", "average"):
        with pytest.raises(OFTError, match="cannot merge a OneTrainer adapter"):
            merge([(a, 1.0), (a, 1.0)], mode)


def _coft_projected(q: torch.Tensor, eps: float) -> torch.Tensor:
    """OneTrainer's COFT (its `_project_batch`, until 2026-05) in fp64: each skew block projected onto the ball of
    radius eps/√(stored blocks) about 0 (Frobenius norm), blocks inside it untouched."""
    q = q.double()
    radius = eps / math.sqrt(q.shape[0])
    norms = torch.linalg.matrix_norm(q, keepdim=True)
    return torch.where(norms <= radius, q, radius * q / norms)


def _ot_config(**fields) -> dict:
    """OneTrainer's header with its training settings (`ot_config`: json.dumps of the whole config; a few of its
    other fields stand beside the two read here)."""
    import json

    cfg = {"__version": 9, "training_method": "LORA", "peft_type": "OFT_2", "oft_block_size": 4,
           "oft_block_share": False, "learning_rate": 0.0003, **fields}
    return {**OT_META, "ot_config": json.dumps(cfg)}


@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("scaled", [False, True])
def test_constrained_oft_projects_the_stored_numbers_as_onetrainer_did(tmp_path, share, scaled):
    """OneTrainer until 2026-05 could train Constrained OFT: its rotation module's forward first projects each
    block's skew matrix to ‖Q_i‖_F ≤ coft_eps/√(stored blocks). The file's numbers are the last optimizer step's, past
    the radius; what OneTrainer computes from them is their projection, said only by `ot_config`. Blocks inside the
    radius stay. Its Conv2d path builds R from the stored numbers without that forward: a convolution is never
    projected. (Scaled OFT came after COFT was removed; were both there, the projection of the stored numbers is the
    projection of the scaled generators at the scaled radius.)"""
    b, eps = 4, 0.05
    n = 1 if share else 16 // b
    rows, q = _skew(n, b, seed=20, std=0.05)
    if not share:  # one block well inside the radius (eps/√4 = 0.025): kept as it is
        rows[0] *= 0.01
        q[0] *= 0.01
    radius = eps / math.sqrt(n)
    norms = torch.linalg.matrix_norm(q)
    assert (norms > 1.5 * radius).sum() >= (1 if share else 3)
    conv_rows, conv_q = _skew(1 if share else 36 // b, b, seed=25, std=0.05)
    names = {"lora_unet_lin": rows, "lora_unet_conv": conv_rows}
    path = _file(tmp_path, names, scaled=names if scaled else (), metadata=_ot_config(oft_coft=True, coft_eps=eps))
    adapter = load_adapter(path)
    assert adapter.info["onetrainer"]["coft_eps"] == eps
    k = 1 / (2 * math.sqrt(b - 1)) if scaled else 1.0
    want_q = k * _coft_projected(q, eps)
    applied = _applied(path)
    got = applied["lin.weight"]
    want = BASE["lin.weight"].double() @ _blockdiag(_series(want_q), 4 if share else 1).T
    assert rel_err(got, want) <= REL_TOL
    want_conv = BASE["conv.weight"].double().reshape(6, 36) @ _blockdiag(_series(k * conv_q), 9 if share else 1)
    assert rel_err(applied["conv.weight"], want_conv.reshape(6, 4, 3, 3)) <= REL_TOL
    assert (torch.linalg.matrix_norm(conv_q) > 1.5 * eps / math.sqrt(conv_q.shape[0])).all()  # projecting would move it
    # the stored numbers unprojected are far from what OneTrainer computed
    raw = BASE["lin.weight"].double() @ _blockdiag(_series(k * q), 4 if share else 1).T
    assert rel_err(got, raw) > 100 * REL_TOL
    # without the settings the file does not say it was constrained: the numbers as stored
    plain = _file(tmp_path, {"lora_unet_lin": rows}, scaled=["lora_unet_lin"] if scaled else (),
                  name="plain.safetensors")
    assert rel_err(_applied(plain)["lin.weight"], raw) <= REL_TOL
    # settings without COFT, or with it off, change nothing
    off = _file(tmp_path, {"lora_unet_lin": rows}, scaled=["lora_unet_lin"] if scaled else (),
                metadata=_ot_config(oft_coft=False, coft_eps=eps), name="off.safetensors")
    assert torch.equal(_applied(off)["lin.weight"], _applied(plain)["lin.weight"])


def test_constrained_oft_default_radius(tmp_path):
    """`coft_eps` absent: OneTrainer's default 1e-4."""
    rows, q = _skew(4, 4, seed=21)
    path = _file(tmp_path, {"lora_unet_lin": rows}, metadata=_ot_config(oft_coft=True))
    assert load_adapter(path).info["onetrainer"]["coft_eps"] == 1e-4
    want = BASE["lin.weight"].double() @ _blockdiag(_series(_coft_projected(q, 1e-4))).T
    assert rel_err(_applied(path)["lin.weight"], want) <= REL_TOL


@pytest.mark.parametrize("revision, halved", [
    ("1336b9b", False), ("607470f", False), ("75ee091", False), ("86ae3811", False),  # 2025-11-14 to 16
    ("b46986d", True), ("23df383", True), ("1336b9c", True), ("1336", True), ("git not installed", True),
])
def test_the_first_revisions_did_not_halve_the_last_term(tmp_path, revision, halved):
    """OneTrainer's first four revisions with OFT summed I + 2Q + 2Q² + 2Q³ + 2Q⁴; b46986d (2025-11-16) halved the
    last term. The file names the revision that saved it (`ot_revision`, git's short hash); anything else, including
    a hash too short to be one of those, is read with the halved series."""
    rows, q = _skew(4, 4, seed=22, std=0.2)
    path = _file(tmp_path, {"lora_unet_lin": rows}, metadata={"ot_branch": "master", "ot_revision": revision})
    q = q.double()
    first = _series(q) + (q @ q @ q @ q)  # the last term counted twice
    want = _series(q) if halved else first
    got = _applied(path)["lin.weight"]
    assert rel_err(got, BASE["lin.weight"].double() @ _blockdiag(want).T) <= REL_TOL
    other = first if halved else _series(q)
    assert rel_err(got, BASE["lin.weight"].double() @ _blockdiag(other).T) > 100 * REL_TOL
    assert ("series" in load_adapter(path).info["onetrainer"]) == (not halved)


@pytest.mark.parametrize("raw, found", [
    ("{oft_coft: true", "is not valid JSON"),
    ("[true]", "expected a JSON object, found list"),
    ('{"oft_coft": "yes"}', 'oft_coft: expected true or false.*found "yes"'),
    ('{"oft_coft": 1}', "oft_coft: expected true or false.*found 1"),
    ('{"oft_coft": true, "coft_eps": NaN}', "coft_eps: expected a finite number ≥ 0.*found NaN"),
    ('{"oft_coft": true, "coft_eps": -1}', "coft_eps: expected a finite number ≥ 0.*found -1"),
    ('{"oft_coft": true, "coft_eps": "1e-4"}', "coft_eps: expected a finite number"),
    ('{"oft_coft": true, "coft_eps": 1' + "0" * 400 + "}", "coft_eps: expected a finite number"),
    ("[" * 100000 + "]" * 100000, "nested too deeply|not valid JSON"),
])
def test_bad_training_settings_are_refused_naming_the_field(tmp_path, raw, found):
    """`ot_config` decides the rotation when it says COFT: unreadable, or COFT / its radius not what OneTrainer
    writes, the file is refused naming the file and the field. A NaN in a field never read is no reason to refuse
    (OneTrainer writes its settings with Python's json.dumps, which writes NaN)."""
    rows, _ = _skew(4, 4, seed=23)
    path = _file(tmp_path, {"lora_unet_lin": rows}, metadata={**OT_META, "ot_config": raw})
    with pytest.raises(OFTError, match=found) as e:
        load_adapter(path)
    assert str(path) in str(e.value) and "ot_config" in str(e.value)
    ok = _file(tmp_path, {"lora_unet_lin": rows}, metadata={**OT_META, "ot_config": '{"max_grad_norm": NaN}'},
               name="ok.safetensors")
    assert load_adapter(ok).info["onetrainer"].get("coft_eps") is None


# ------------------------------------------------------------------------------------------------ OneTrainer itself
@pytest.mark.third_party
@pytest.mark.parametrize("apply_mode", ["merge", "bypass"])
@pytest.mark.parametrize("scaled, share, naming", [(False, False, "kohya"), (True, False, "kohya"),
                                                   (True, True, "kohya"), (True, False, "comfy")])
def test_onetrainer_modules_on_comfyui_layers_equal_the_oftloader_patch(comfy, comfyui_oft, tmp_path, scaled, share,
                                                                        naming, apply_mode):
    """OneTrainer's own OFTModule (its source, ONETRAINER_PATH) hooked onto ComfyUI's tiny SD1.x UNet layers —
    attention Linears, the 1×1 proj_in / proj_out and the ResBlocks' 3×3 convs — with seeded generators, saved with
    the names its KOHYA output gives them (kohya-flattened diffusers paths under lora_unet_) or its COMFY output
    (diffusion_model. + ComfyUI's paths), and its header; the
    same file through the OFTLoader node, merged or as bypass hooks (without the 3×3 convs, which bypass refuses on the
    input side): every layer's output equals OneTrainer's (≤ 1e-6 relative, fp32)."""
    import comfy_models
    import folder_paths
    from comfyui_oft.nodes import files, oft_nodes

    from oft_core.names import _ldm_to_diffusers_names

    root = onetrainer_reference.checkout()
    if root is None:
        pytest.skip(f"OneTrainer test: set {onetrainer_reference.ENV} to a OneTrainer checkout")
    ot = onetrainer_reference.load(root)
    mp = comfy_models.sd15_tiny()
    dm = mp.model.diffusion_model
    modules = dict(dm.named_modules())
    to_diff = _ldm_to_diffusers_names({k: tuple(v.shape) for k, v in dm.state_dict().items()})
    chosen = [p for p, m in modules.items() if p in to_diff and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
              and (".attn1." in p or ".attn2." in p or p.endswith(("proj_in", "proj_out", "in_layers.2",
                                                                  "out_layers.3")))]
    if apply_mode == "bypass":  # (bypass refuses the input side of a k×k convolution, k > 1: merge rotates those)
        chosen = [p for p in chosen if not p.endswith(("in_layers.2", "out_layers.3"))]
    else:
        assert any(isinstance(modules[p], torch.nn.Conv2d) and modules[p].kernel_size == (3, 3) for p in chosen)
    assert any(isinstance(modules[p], torch.nn.Conv2d) and modules[p].kernel_size == (1, 1) for p in chosen)
    g = torch.Generator().manual_seed(12)
    tensors, wrapped = {}, {}
    for p in chosen:
        copy = deepcopy(modules[p])  # ComfyUI's layer, its own weights and hooks
        # its KOHYA output: diffusers paths flattened under lora_unet_; COMFY: ComfyUI's own paths
        prefix = "lora_unet_" + to_diff[p].replace(".", "_") if naming == "kohya" else "diffusion_model." + p
        mod = ot["OFTModule"](prefix, copy, 4, share, scaled)
        with torch.no_grad():
            mod.oft_R.weight.copy_(torch.randn(mod.oft_R.weight.shape, generator=g) * 0.05)
        mod.hook_to_module()
        wrapped[p] = (copy, mod)
        for k, v in mod.state_dict().items():
            tensors[f"{prefix}.{k}"] = v.detach().clone().contiguous()
    assert all(k.endswith((".oft_R.weight", ".oft_R.scaled_oft")) for k in tensors)
    assert any(k.endswith(".oft_R.scaled_oft") for k in tensors) == scaled
    folder = tmp_path / "oft"
    folder.mkdir()
    files.register_folder()
    folder_paths.add_model_folder_path("oft", str(folder))
    name = f"onetrainer_{scaled}_{share}_{naming}_{apply_mode}.safetensors"
    save_file(tensors, str(folder / name), OT_META)
    out = oft_nodes.OFTLoader.execute(model=mp, adapter_name=name, strength=1.0, strength_mode="kohya",
                                      apply_mode=apply_mode)
    assert f"{len(chosen)} of {len(chosen)} adapter layers applied" in out.ui.value, out.ui.value
    patched = out.result[0]
    patched.patch_model()
    try:
        for p, (copy, mod) in wrapped.items():
            m = modules[p]
            x = (torch.randn(2, 5, m.in_features, generator=g) if isinstance(m, torch.nn.Linear)
                 else torch.randn(1, m.in_channels, 6, 6, generator=g))
            with torch.no_grad():
                want, got, base = copy(x), m(x), mod.orig_forward(x)
            assert rel_err(got, want) <= REL_TOL, (p, rel_err(got, want))
            assert rel_err(want, base) > 1e-3, p  # the adapter moved this layer
    finally:
        patched.unpatch_model()


@pytest.mark.comfyui
@pytest.mark.parametrize("key", ["lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                                 "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj"])
def test_text_encoder_layers_apply_to_comfyuis_clip(comfy, comfyui_oft, tmp_path, key):
    """Its KOHYA and COMFY names of a CLIP-L layer reach ComfyUI's SD1 CLIP through the OFTLoader node, rotating that
    Linear's input as the fp64 series says (the UNet layer beside it is applied too)."""
    import comfy_models
    import folder_paths
    from comfyui_oft.nodes import files, oft_nodes

    clip = comfy_models.sd1_clip(seed=4)
    rows, q = _skew(768 // 8, 8, seed=13)
    unet_rows, _ = _skew(32 // 4, 4, seed=14)
    folder = tmp_path / "oft"
    folder.mkdir()
    files.register_folder()
    folder_paths.add_model_folder_path("oft", str(folder))
    name = f"onetrainer_te_{key[:12]}.safetensors"
    _file(folder, {key: rows, "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": unet_rows},
          name=name)
    out = oft_nodes.OFTLoader.execute(model=comfy_models.sd15_tiny(), clip=clip, adapter_name=name, strength=1.0,
                                      strength_mode="kohya")
    assert "2 of 2 adapter layers applied" in out.ui.value, out.ui.value
    import comfy.model_management
    import comfy.utils

    patcher = out.result[1].patcher
    wkey = next(k for k in patcher.model.state_dict() if k.endswith("encoder.layers.0.self_attn.q_proj.weight"))
    base = patcher.model.state_dict()[wkey].clone()
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)  # as CLIPTextEncode loads it
    try:
        got = comfy.utils.get_attr(patcher.model, wkey).detach().clone()
    finally:
        comfy.model_management.unload_all_models()
    # fp32: the oracle's tolerance; fp16 (what ComfyUI's CLIP loader gives): the rotated weight rounded once more
    tol = REL_TOL if base.dtype == torch.float32 else 2.0**-10
    assert got.dtype == base.dtype
    assert rel_err(got, base.double() @ _blockdiag(_series(q)).T) <= tol
    assert rel_err(got, base) > 10 * tol  # a change far beyond the rounding


@pytest.mark.comfyui
@pytest.mark.parametrize("naming", ["comfy", "kohya", "diffusers"])
def test_t5_layers_apply_to_comfyuis_flux_clip(comfy, comfyui_oft, tmp_path, naming):
    """FLUX as OneTrainer trains its text encoders: CLIP-L and T5 layers, named by its COMFY output
    (`text_encoders.clip_l.transformer.` / `text_encoders.t5xxl.transformer.` + the HF path, i.e. the path in
    ComfyUI's CLIP state dict), its KOHYA output (`lora_te1_` / `lora_te2_`, T5 as the second) or its DIFFUSERS
    output (`text_encoder.` / `text_encoder_2.` + the HF path, `transformer.` + diffusers' path), reach ComfyUI's
    FLUX CLIP through the OFTLoader node (the UNet layer beside them too), each Linear's input rotated as the fp64
    series says; CLIPTextEncode's conditioning moves."""
    import comfy.model_management
    import comfy.utils
    import comfy_models
    import folder_paths
    from comfyui_oft.nodes import files, oft_nodes

    clip = comfy_models.flux_clip_tiny(seed=6)
    t5_rows, t5_q = _skew(96 // 8, 8, seed=26, std=0.2)  # the feed-forward output layers: in 96 and 128
    l_rows, l_q = _skew(128 // 8, 8, seed=27, std=0.2)
    unet_rows, _ = _skew(128 // 4, 4, seed=28)
    if naming == "comfy":
        keys = {"text_encoders.t5xxl.transformer.encoder.block.1.layer.1.DenseReluDense.wo": t5_rows,
                "text_encoders.clip_l.transformer.text_model.encoder.layers.1.mlp.fc2": l_rows,
                "diffusion_model.double_blocks.0.img_attn.proj": unet_rows}
    elif naming == "kohya":
        keys = {"lora_te2_encoder_block_1_layer_1_DenseReluDense_wo": t5_rows,
                "lora_te1_text_model_encoder_layers_1_mlp_fc2": l_rows,
                "lora_transformer_double_blocks_0_img_attn_proj": unet_rows}
    else:
        keys = {"text_encoder_2.encoder.block.1.layer.1.DenseReluDense.wo": t5_rows,
                "text_encoder.text_model.encoder.layers.1.mlp.fc2": l_rows,
                "transformer.transformer_blocks.0.attn.to_out.0": unet_rows}
    folder = tmp_path / "oft"
    folder.mkdir()
    files.register_folder()
    folder_paths.add_model_folder_path("oft", str(folder))
    name = f"onetrainer_flux_te_{naming}.safetensors"
    _file(folder, keys, name=name)
    model = comfy_models.flux_tiny()
    base_cond, base_pooled = clip.encode_from_tokens(clip.tokenize("a cat"), return_pooled=True)
    out = oft_nodes.OFTLoader.execute(model=model, clip=clip, adapter_name=name, strength=1.0, strength_mode="kohya")
    assert "3 of 3 adapter layers applied" in out.ui.value, out.ui.value
    patcher = out.result[1].patcher
    sd = patcher.model.state_dict()
    t5_key = "t5xxl.transformer.encoder.block.1.layer.1.DenseReluDense.wo.weight"
    l_key = "clip_l.transformer.text_model.encoder.layers.1.mlp.fc2.weight"
    bases = {t5_key: sd[t5_key].clone(), l_key: sd[l_key].clone()}
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)  # as CLIPTextEncode loads it
    try:
        got = {k: comfy.utils.get_attr(patcher.model, k).detach().clone() for k in bases}
    finally:
        comfy.model_management.unload_all_models()
    for k, q in ((t5_key, t5_q), (l_key, l_q)):
        base = bases[k]
        tol = REL_TOL if base.dtype == torch.float32 else 2.0**-10
        assert rel_err(got[k], base.double() @ _blockdiag(_series(q)).T) <= tol, k
        assert rel_err(got[k], base) > 10 * tol, k
    cond, pooled = out.result[1].encode_from_tokens(out.result[1].tokenize("a cat"), return_pooled=True)
    assert float((cond - base_cond).abs().max()) > 1e-3 * float(base_cond.abs().max())  # T5's output
    assert float((pooled - base_pooled).abs().max()) > 1e-3 * float(base_pooled.abs().max())  # CLIP-L's pooled


@pytest.mark.parametrize("encoder, path", [
    ("qwen25_7b", "model.layers.0.self_attn.q_proj"), ("llama", "model.layers.0.self_attn.q_proj"),
    ("t5xxl", "encoder.block.0.layer.0.SelfAttention.q"),
])
def test_its_comfy_names_of_other_text_encoders_name_the_clip_state_dict(tmp_path, encoder, path):
    """Its COMFY output names every text encoder `text_encoders.<ComfyUI's encoder name>.transformer.` + the path in
    ComfyUI's CLIP state dict (Qwen-Image's Qwen2.5-VL, HiDream's / HunyuanVideo's Llama, T5): matched to that weight
    of a CLIP state dict, nothing else."""
    from oft_core.names import build_key_map

    rows, _ = _skew(32 // 4, 4, seed=29)
    adapter = load_adapter(_file(tmp_path, {f"text_encoders.{encoder}.transformer.{path}": rows}))
    shapes = {f"{encoder}.transformer.{path}.weight": (32, 32), f"{encoder}.transformer.{path[:-1]}k.weight": (32, 32),
              "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": (64, 64)}
    report = match_adapter(adapter, shapes, build_key_map(shapes), components=("te", "te1", "te2"))
    assert [m.target.key for m in report.matched] == [f"{encoder}.transformer.{path}.weight"]
    assert not report.unmatched
    # a model without that encoder: reported, not applied
    other = {"clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": (64, 64)}
    assert match_adapter(adapter, other, build_key_map(other), components=("te", "te1", "te2")).unmatched


_CLIP_Q = "text_model.encoder.layers.0.self_attn.q_proj"
_T5_Q = "encoder.block.0.layer.0.SelfAttention.q"
_LLAMA_Q = "model.layers.0.self_attn.q_proj"
# family: (its CLIP state dict's encoders and their layer, [(OneTrainer's name of a layer, the encoder it is)])
_POSITIONAL = {
    "flux": ({"clip_l": _CLIP_Q, "t5xxl": _T5_Q},
             [("lora_te1_" + _CLIP_Q.replace(".", "_"), "clip_l"), ("lora_te2_" + _T5_Q.replace(".", "_"), "t5xxl"),
              ("text_encoder." + _CLIP_Q, "clip_l"), ("text_encoder_2." + _T5_Q, "t5xxl")]),
    "chroma": ({"t5xxl": _T5_Q},
               [("lora_te1_" + _T5_Q.replace(".", "_"), "t5xxl"), ("text_encoder." + _T5_Q, "t5xxl")]),
    "sd3": ({"clip_l": _CLIP_Q, "clip_g": _CLIP_Q, "t5xxl": _T5_Q},
            [("lora_te3_" + _T5_Q.replace(".", "_"), "t5xxl"), ("text_encoder_3." + _T5_Q, "t5xxl"),
             ("lora_te2_" + _CLIP_Q.replace(".", "_"), "clip_g"), ("text_encoder_2." + _CLIP_Q, "clip_g")]),
    "hidream": ({"clip_l": _CLIP_Q, "clip_g": _CLIP_Q, "t5xxl": _T5_Q, "llama": _LLAMA_Q},
                [("lora_te3_" + _T5_Q.replace(".", "_"), "t5xxl"), ("lora_te4_" + _LLAMA_Q.replace(".", "_"), "llama"),
                 ("text_encoder_3." + _T5_Q, "t5xxl"), ("text_encoder_4." + _LLAMA_Q, "llama")]),
    "hunyuan_video": ({"llama": _LLAMA_Q, "clip_l": _CLIP_Q},
                      [("lora_te1_" + _LLAMA_Q.replace(".", "_"), "llama"), ("text_encoder." + _LLAMA_Q, "llama"),
                       ("lora_te2_" + _CLIP_Q.replace(".", "_"), "clip_l"), ("text_encoder_2." + _CLIP_Q, "clip_l")]),
    "qwen": ({"qwen25_7b": _LLAMA_Q},
             [("lora_te_" + _LLAMA_Q.replace(".", "_"), "qwen25_7b"), ("text_encoder." + _LLAMA_Q, "qwen25_7b")]),
}


@pytest.mark.parametrize("family", sorted(_POSITIONAL))
def test_its_positional_text_encoder_names_find_their_encoder(tmp_path, family):
    """Its KOHYA (`lora_te1_`…`lora_te4_`, Qwen's `lora_te_`) and DIFFUSERS (`text_encoder.`…`text_encoder_4.`)
    names number a model's text encoders in its own order (FLUX: CLIP-L, T5; Chroma: T5; SD3: CLIP-L, CLIP-G, T5;
    HiDream: + Llama; HunyuanVideo: Llama, CLIP-L; Qwen-Image: Qwen2.5-VL). Each lands on its encoder's weight in
    ComfyUI's CLIP state dict of that family: T5 / Llama / Qwen by their HF path (no CLIP has one of those), the
    CLIPs as ever, and HunyuanVideo's CLIP-L as its second too (no CLIP-G there). An SD1 CLIP (CLIP-L alone)
    still has no second encoder."""
    from oft_core.names import build_key_map

    encoders, names = _POSITIONAL[family]
    shapes = {f"{enc}.transformer.{path}.weight": (32, 32) for enc, path in encoders.items()}
    rows, _ = _skew(32 // 4, 4, seed=30)
    for key, encoder in names:
        adapter = load_adapter(_file(tmp_path, {key: rows}, name=f"{family}_{encoder}.safetensors"))
        report = match_adapter(adapter, shapes, build_key_map(shapes), components=("te", "te1", "te2"))
        assert [m.target.key for m in report.matched] == [f"{encoder}.transformer.{encoders[encoder]}.weight"], key
        assert not report.unmatched, key
    sd1 = {f"clip_l.transformer.{_CLIP_Q}.weight": (32, 32)}
    second = load_adapter(_file(tmp_path, {"lora_te2_" + _CLIP_Q.replace(".", "_"): rows}, name="sd1.safetensors"))
    assert match_adapter(second, sd1, build_key_map(sd1), components=("te", "te1", "te2")).unmatched


@pytest.mark.comfyui
def test_flux_names_of_its_kohya_and_legacy_outputs_rotate_the_fused_weights(comfy, comfyui_oft, tmp_path):
    """FLUX as OneTrainer saves it: KOHYA names the fused qkv (`lora_unet_double_blocks_0_img_attn_qkv`, one input
    rotation for the whole weight); LEGACY keeps diffusers' split q / k / v (`lora_transformer_…_attn_to_q`), each
    its own input rotation of its rows of ComfyUI's fused weight. Through the loader's path, merged: each row block
    equals W_rows·blockdiag(R)ᵀ of the fp64 series, the rows no layer names are untouched."""
    import comfy_models
    from comfyui_oft.nodes.patch import apply_oft

    mp = comfy_models.flux_tiny()
    sd = mp.model.diffusion_model.state_dict()
    hidden = sd["double_blocks.0.img_attn.qkv.weight"].shape[1]
    fused_rows, fused_q = _skew(hidden // 4, 4, seed=15)
    q_rows, q_q = _skew(hidden // 4, 4, seed=16)
    v_rows, v_q = _skew(hidden // 4, 4, seed=17)
    adapter = load_adapter(_file(tmp_path, {"lora_unet_double_blocks_0_img_attn_qkv": fused_rows,
                                            "lora_transformer_transformer_blocks_1_attn_to_q": q_rows,
                                            "lora_transformer_transformer_blocks_1_attn_to_v": v_rows}))
    merged, _, text = apply_oft(mp, None, adapter, 1.0)
    assert "3 of 3 adapter layers applied" in text, text
    merged.patch_model()
    try:
        got = {k: v.detach().clone() for k, v in merged.model.diffusion_model.state_dict().items()}
    finally:
        merged.unpatch_model()
    w0, w1 = sd["double_blocks.0.img_attn.qkv.weight"].double(), sd["double_blocks.1.img_attn.qkv.weight"].double()
    assert rel_err(got["double_blocks.0.img_attn.qkv.weight"], w0 @ _blockdiag(_series(fused_q)).T) <= REL_TOL
    g1 = got["double_blocks.1.img_attn.qkv.weight"]
    q, k, v = (slice(i * hidden, (i + 1) * hidden) for i in range(3))
    assert rel_err(g1[q], w1[q] @ _blockdiag(_series(q_q)).T) <= REL_TOL
    assert torch.equal(g1[k], sd["double_blocks.1.img_attn.qkv.weight"][k])
    assert rel_err(g1[v], w1[v] @ _blockdiag(_series(v_q)).T) <= REL_TOL


@pytest.mark.comfyui
@pytest.mark.parametrize("naming", ["diffusers", "legacy"])
@pytest.mark.parametrize("family", ["sd3", "qwen", "hidream", "chroma"])
def test_its_dit_names_rotate_comfyuis_weights_in_every_family(comfy, comfyui_oft, tmp_path, family, naming):
    """The DiT families OneTrainer trains, named as its DIFFUSERS (`transformer.` + diffusers' path) or LEGACY
    (`lora_transformer_` + that path underscored) output names them: each layer lands where ComfyUI's own key map puts
    that diffusers name — a whole weight, or its rows of a fused one (SD3's, Chroma's qkv) — and, merged through the
    loader's path, those rows equal W_rows·blockdiag(R)ᵀ of the fp64 series; rows no layer names are untouched.
    (HunyuanVideo, whose diffusers names ComfyUI does not map: the next test.)"""
    import comfy.lora
    import comfy_models
    from comfyui_oft.nodes.patch import apply_oft

    mp = comfy_models.dit_tiny(family)
    sd = mp.model.diffusion_model.state_dict()
    key_map = comfy.lora.model_lora_keys_unet(mp.model, {})
    plain, fused = [], []
    for name, target in sorted(key_map.items()):
        if not name.startswith("transformer.") or ".attn" not in name:
            continue
        key, offset = (target, None) if isinstance(target, str) else (target[0], target[1])
        rel = key[len("diffusion_model."):]
        if not key.startswith("diffusion_model.") or rel not in sd or sd[rel].ndim != 2:
            continue  # (the map also names layers a tiny config leaves out, e.g. SD3.5's second attention)
        if offset is None and len(plain) < 2:
            plain.append((name, key, None))
        elif offset is not None and offset[0] == 0 and len(fused) < 2:
            fused.append((name, key, offset))
    chosen = plain + fused
    assert plain and (fused or family not in ("sd3", "chroma")), (plain, fused)  # (their qkv is fused in ComfyUI)
    layers, want = {}, {}
    for i, (name, key, offset) in enumerate(chosen):
        weight = sd[key[len("diffusion_model."):]]
        rows, q = _skew(weight.shape[1] // 4, 4, seed=40 + i)
        path = name[len("transformer."):]
        layers["transformer." + path if naming == "diffusers" else "lora_transformer_" + path.replace(".", "_")] = rows
        want.setdefault(key[len("diffusion_model."):], []).append((offset, q))
    adapter = load_adapter(_file(tmp_path, layers, name=f"{family}_{naming}.safetensors"))
    merged, _, text = apply_oft(mp, None, adapter, 1.0)
    assert f"{len(chosen)} of {len(chosen)} adapter layers applied" in text, text
    merged.patch_model()
    try:
        got = {k: merged.model.diffusion_model.state_dict()[k].detach().clone() for k in want}
    finally:
        merged.unpatch_model()
    for key, parts in want.items():
        base = sd[key].double()
        expect = base.clone()
        for offset, q in parts:
            r = slice(None) if offset is None else slice(offset[1], offset[1] + offset[2])
            expect[r] = base[r] @ _blockdiag(_series(q)).T
        assert rel_err(got[key], expect) <= REL_TOL, (family, key)
        assert rel_err(got[key], base) > 1e-3, (family, key)


@pytest.mark.comfyui
@pytest.mark.parametrize("naming", ["diffusers", "legacy", "kohya"])
def test_its_hunyuan_video_diffusers_names_rotate_comfyuis_fused_weights(comfy, comfyui_oft, tmp_path, naming):
    """HunyuanVideo in its DIFFUSERS / LEGACY names (diffusers' HunyuanVideoTransformer3DModel: FLUX's diffusers
    block names), which ComfyUI's own key map does not cover: `to_q` is the first third of ComfyUI's fused
    `double_blocks.0.img_attn.qkv`, the single block's `to_k` the second hidden-wide rows of `linear1`, `ff.net.0.proj`
    is `img_mlp.0`, `proj_out` is `linear2`, and the text token refiner (diffusers' `context_embedder`, ComfyUI's
    `txt_in`, which the pack's table names too): a refiner block's `attn.to_v` the last third of `self_attn.qkv`,
    its `norm_out.linear` `adaLN_modulation.1`, `proj_in` `input_embedder`, the pooled text embedder's `linear_1`
    `c_embedder.in_layer`; and in its KOHYA names (HunyuanVideo's original spelling under `lora_unet_`, fused as the
    original: `img_attn_qkv`, `img_mlp_fc1`, `linear1`, `linear2`, the refiner's `self_attn_qkv` and `mlp_fc2`, read
    through ComfyUI's diffusion-pipe map). Merged through the loader's path each equals the fp64 series."""
    import comfy_models
    from comfyui_oft.nodes.patch import apply_oft

    mp = comfy_models.dit_tiny("hunyuan_video")
    sd = mp.model.diffusion_model.state_dict()
    hidden = sd["double_blocks.0.img_attn.qkv.weight"].shape[1]
    cases = [  # (diffusers path, ComfyUI weight, its rows)
        ("transformer_blocks.0.attn.to_q", "double_blocks.0.img_attn.qkv.weight", slice(0, hidden)),
        ("transformer_blocks.0.ff.net.0.proj", "double_blocks.0.img_mlp.0.weight", slice(None)),
        ("single_transformer_blocks.0.attn.to_k", "single_blocks.0.linear1.weight", slice(hidden, 2 * hidden)),
        ("single_transformer_blocks.0.proj_out", "single_blocks.0.linear2.weight", slice(None)),
        ("context_embedder.token_refiner.refiner_blocks.0.attn.to_v",
         "txt_in.individual_token_refiner.blocks.0.self_attn.qkv.weight", slice(2 * hidden, 3 * hidden)),
        ("context_embedder.token_refiner.refiner_blocks.1.norm_out.linear",
         "txt_in.individual_token_refiner.blocks.1.adaLN_modulation.1.weight", slice(None)),
        ("context_embedder.proj_in", "txt_in.input_embedder.weight", slice(None)),
        ("context_embedder.time_text_embed.text_embedder.linear_1", "txt_in.c_embedder.in_layer.weight",
         slice(None)),
    ]
    if naming == "kohya":  # (original path, ComfyUI weight, its rows)
        cases = [("double_blocks.0.img_attn_qkv", "double_blocks.0.img_attn.qkv.weight", slice(None)),
                 ("double_blocks.0.img_mlp.fc1", "double_blocks.0.img_mlp.0.weight", slice(None)),
                 ("single_blocks.0.linear1", "single_blocks.0.linear1.weight", slice(None)),
                 ("single_blocks.0.linear2", "single_blocks.0.linear2.weight", slice(None)),
                 ("txt_in.individual_token_refiner.blocks.0.self_attn_qkv",
                  "txt_in.individual_token_refiner.blocks.0.self_attn.qkv.weight", slice(None)),
                 ("txt_in.individual_token_refiner.blocks.1.mlp.fc2",
                  "txt_in.individual_token_refiner.blocks.1.mlp.2.weight", slice(None))]
    layers, want = {}, []
    for i, (path, key, rows) in enumerate(cases):
        packed, q = _skew(sd[key].shape[1] // 4, 4, seed=50 + i)
        name = {"diffusers": "transformer." + path, "legacy": "lora_transformer_" + path.replace(".", "_"),
                "kohya": "lora_unet_" + path.replace(".", "_")}[naming]
        layers[name] = packed
        want.append((key, rows, q))
    merged, _, text = apply_oft(mp, None, load_adapter(_file(tmp_path, layers)), 1.0)
    assert f"{len(cases)} of {len(cases)} adapter layers applied" in text, text
    merged.patch_model()
    try:
        got = {key: merged.model.diffusion_model.state_dict()[key].detach().clone() for key, _, _ in want}
    finally:
        merged.unpatch_model()
    for key, rows, q in want:
        base = sd[key].double()
        expect = base.clone()
        expect[rows] = base[rows] @ _blockdiag(_series(q)).T
        assert rel_err(got[key], expect) <= REL_TOL, key
        assert rel_err(got[key], base) > 1e-3, key


def test_baked_and_extracted_as_a_lora(tmp_path, capsys):
    """A OneTrainer file is baked into a base file (the CLI), each layer as OneTrainer computes it, and extracted as a
    LoRA whose ΔW is the bake's: the route from its files to every tool that reads LoRAs."""
    from safetensors.torch import load_file

    from oft_core.cli import main as cli

    b = 4
    lin_rows, lin_q = _skew(16 // b, b, seed=18)
    conv_rows, conv_q = _skew(36 // b, b, seed=19)
    path = _file(tmp_path, {"lora_unet_lin": lin_rows, "lora_unet_conv": conv_rows})
    base = tmp_path / "base.safetensors"
    save_file(BASE, str(base))
    baked, lora = tmp_path / "baked.safetensors", tmp_path / "lora.safetensors"
    assert cli(["bake", "--base", str(base), "--adapter", str(path), "--out", str(baked)]) == 0
    assert cli(["extract-lora", str(path), "--base", str(base), "--rank", "36", "--out", str(lora)]) == 0
    got = load_file(str(baked))
    want = {"lin.weight": BASE["lin.weight"].double() @ _blockdiag(_series(lin_q)).T,
            "conv.weight": (BASE["conv.weight"].double().reshape(6, 36) @ _blockdiag(_series(conv_q)))
            .reshape(6, 4, 3, 3)}
    lo = load_file(str(lora))
    for name, w in want.items():
        assert rel_err(got[name], w) <= REL_TOL, name
        pre = "lora_unet_" + name.removesuffix(".weight")
        up, down = lo[f"{pre}.lora_up.weight"].double(), lo[f"{pre}.lora_down.weight"].double()
        delta = (up.flatten(1) @ down.flatten(1)) * float(lo[f"{pre}.alpha"]) / up.shape[1]
        assert rel_err(delta, (got[name].double() - BASE[name].double()).flatten(1)) <= REL_TOL, name


@pytest.mark.third_party
@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("era, revision", [("coft", "3374137"), ("first", "1336b9b")])
def test_onetrainers_earlier_modules_equal_the_loaded_file(tmp_path, era, revision, share):
    """OneTrainer's own OFTModule of an earlier revision (its source: a checkout at ONETRAINER_COFT_PATH from before
    COFT's removal, or at ONETRAINER_FIRST_PATH from 2025-11-14 to 16) hooked onto a Linear and a 3×3 Conv2d,
    generators seeded past COFT's radius and saved as its saver writes them (before any forward: COFT projects in
    place as the forward starts), with its header (`ot_revision`, and `ot_config` saying COFT and its radius): the
    file as the pack applies it gives OneTrainer's outputs (≤ 1e-6 relative, fp32)."""
    import json

    env = onetrainer_reference.ENV_COFT if era == "coft" else onetrainer_reference.ENV_FIRST
    root = onetrainer_reference.checkout(env)
    if root is None:
        pytest.skip(f"OneTrainer test: set {env} to a OneTrainer checkout of that era")
    ot = onetrainer_reference.load(root)
    g = torch.Generator().manual_seed(24)
    coft, eps = era == "coft", 0.05
    layers = {"lin": torch.nn.Linear(16, 12), "conv": torch.nn.Conv2d(4, 6, 3, padding=1)}
    for m in layers.values():
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
    tensors, hooked = {}, {}
    for name, m in layers.items():
        copy = deepcopy(m)
        mod = ot["OFTModule"](f"lora_unet_{name}", copy, 4, coft, eps, share)
        with torch.no_grad():
            mod.oft_R.weight.copy_(torch.randn(mod.oft_R.weight.shape, generator=g) * (0.05 if coft else 0.2))
        mod.hook_to_module()
        hooked[name] = copy
        tensors.update({f"lora_unet_{name}.{k}": v.detach().clone() for k, v in mod.state_dict().items()})
    cfg = json.dumps({"__version": 9, "oft_block_size": 4, "oft_coft": coft, "coft_eps": eps,
                      "oft_block_share": share, "max_norm": float("nan")})  # NaN as json.dumps writes it
    path = tmp_path / f"{era}_{share}.safetensors"
    save_file(tensors, str(path), {"ot_branch": "master", "ot_revision": revision, "ot_config": cfg})
    adapter = load_adapter(path)
    report = match_adapter(adapter, {f"{n}.weight": tuple(m.weight.shape) for n, m in layers.items()})
    assert len(report.matched) == 2 and not report.unmatched
    for mt in report.matched:
        name = mt.target.key.removesuffix(".weight")
        m = layers[name]
        w = rotate_weight(mt.layer, m.weight.detach(), 1.0)
        x = (torch.randn(2, 5, 16, generator=g) if name == "lin" else torch.randn(1, 4, 6, 6, generator=g))
        with torch.no_grad():
            want = hooked[name](x)
            got = (torch.nn.functional.linear(x, w, m.bias) if name == "lin"
                   else torch.nn.functional.conv2d(x, w, m.bias, padding=1))
            base = m(x)
        assert rel_err(got, want) <= REL_TOL, (name, rel_err(got, want))
        assert rel_err(want, base) > 1e-3, name  # the adapter moved this layer

