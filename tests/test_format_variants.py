"""Format variants users have that the fixtures do not ship directly: other LyCORIS prefixes, the old `oft_diag`
key, kohya conv layers, and PEFT 0.16–0.17 Neumann files without `peft_version`.

Each is built from a fixture (renamed or re-expressed exactly) or checked against the published formula computed
independently here (sd-scripts' einsum with an explicit inverse).
"""

import json
import shutil

import torch
from oracle import REL_TOL, get_case, rel_err
from safetensors.torch import load_file, save_file

from oft_core import load_adapter, resolve_for_weight, rotate_weight


def _merged(adapter, case, strength=1.0):
    layers = {layer.name.replace(".", "_"): layer for layer in adapter}
    return {key: rotate_weight(resolve_for_weight(layers[case.module_key[key]], w.shape), w, strength)
            for key, w in case.originals.items()}


def test_lycoris_kohya_style_prefix(tmp_path):
    case = get_case("lycoris_diag_oft_constrained")
    sd = load_file(str(case.adapter))
    renamed = {"lora_unet_" + k[len("lycoris_"):]: v for k, v in sd.items()}
    path = tmp_path / "lora_unet.safetensors"
    save_file(renamed, str(path))
    adapter = load_adapter(path)
    assert adapter.format == "lycoris_diag_oft" and {c for c, _ in adapter.layers} == {"unet"}
    for strength in (1.0, 0.5):
        for key, w in _merged(adapter, case, strength).items():
            assert rel_err(w, case.expected[strength][key]) <= REL_TOL


def test_lycoris_text_encoder_prefixes_are_components(tmp_path):
    blocks = torch.zeros(4, 8, 8)
    path = tmp_path / "te.safetensors"
    save_file({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.oft_blocks": blocks,
               "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.oft_blocks": blocks.clone(),
               "lora_te_text_model_encoder_layers_1_mlp_fc1.oft_blocks": blocks.clone()}, str(path))
    adapter = load_adapter(path)
    assert sorted(c for c, _ in adapter.layers) == ["te", "te1", "te2"]


def _old_oft_diag(case, tmp_path):
    """The fixture re-expressed as LyCORIS 2.0 wrote it: `oft_diag` = R = Cayley(Q) per block, no alpha."""
    old = {}
    for k, v in load_file(str(case.adapter)).items():
        if k.endswith(".oft_blocks"):
            q = v - v.transpose(1, 2)
            eye = torch.eye(q.shape[-1]).expand_as(q)
            old[k.replace(".oft_blocks", ".oft_diag")] = (eye + q) @ torch.linalg.inv(eye - q)
    path = tmp_path / "old.safetensors"
    save_file(old, str(path))
    return path, old


def test_old_lycoris_oft_diag_stores_the_rotation(tmp_path):
    """LyCORIS 2.0 saved `oft_diag` = R itself (its custom state dict); applied as Rᵀ·W per block like diag-oft."""
    case = get_case("lycoris_diag_oft_dim8")
    path, _ = _old_oft_diag(case, tmp_path)
    adapter = load_adapter(path)
    assert adapter.format == "lycoris_oft_diag"
    for strength in (1.0, 0.5):
        for key, w in _merged(adapter, case, strength).items():
            assert rel_err(w, case.expected[strength][key]) <= REL_TOL


def test_a_matrix_layer_holds_counts_and_reports_its_rotation_not_a_generator(tmp_path):
    """A "matrix" layer's `blocks` are the stored R themselves: `num_params` counts b² free values per block (a skew
    Q has b(b−1)/2), and the summary reports ‖R − I‖_F per split, named "R − I", with no bound (no Q is stored, no
    constraint applies); the same fixture read as Cayley reports ‖Q‖_F, named "Q"."""
    from oft_core.summary import describe

    case = get_case("lycoris_diag_oft_dim8")
    path, old = _old_oft_diag(case, tmp_path)
    matrix, cayley = load_adapter(path), load_adapter(case.adapter)
    assert matrix.layers.keys() == cayley.layers.keys()
    for key, layer in matrix.layers.items():
        assert layer.parameterization == "matrix" and layer.row_scale is None
        r = old[f"{layer.key}.oft_diag"]
        assert len(layer.blocks) == 1 and torch.equal(layer.blocks[0], r)  # R itself, not a generator
        n, b = r.shape[0], r.shape[-1]
        assert layer.num_params() == n * b * b
        q_layer = cayley.layers[key]
        assert q_layer.parameterization == "cayley" and q_layer.num_params() == n * b * (b - 1) // 2
    assert matrix.num_params() == sum(layer.blocks[0].numel() for layer in matrix)
    by_name = {x["name"]: x for x in describe(matrix)["per_layer"]}
    q_by_name = {x["name"]: x for x in describe(cayley)["per_layer"]}
    for key, layer in matrix.layers.items():
        r, q = old[f"{layer.key}.oft_diag"], cayley.layers[key].blocks[0]
        x, y = by_name[layer.key], q_by_name[layer.key]
        assert x["norm_of"] == "R − I" and x["bound"] == [None] and not x["clamped"]
        assert x["params"] == layer.num_params()
        want = float(torch.linalg.vector_norm(r - torch.eye(r.shape[-1])))  # ‖R − I‖_F (describe rounds to 1e-6)
        assert abs(x["norm"][0] - want) <= 1e-6 * max(1.0, want)
        assert y["norm_of"] == "Q" and abs(y["norm"][0] - float(torch.linalg.vector_norm(q))) <= 1e-6
        assert abs(x["norm"][0] - y["norm"][0]) > 1e-4  # the two measure different things


def test_kohya_conv_layer_matches_sd_scripts_formula(tmp_path):
    torch.manual_seed(3)
    name = "oft_unet_down_blocks_0_resnets_0_conv1"
    a = torch.randn(4, 8, 8) * 0.05
    alpha = 1e-3
    path = tmp_path / "conv.safetensors"
    save_file({f"{name}.oft_blocks": a.to(torch.bfloat16), f"{name}.alpha": torch.tensor(alpha)}, str(path))
    w = torch.randn(32, 16, 3, 3)
    layer = resolve_for_weight(next(iter(load_adapter(path))), w.shape)
    for m in (1.0, 0.5):
        # sd-scripts networks/oft.py, written out independently: clamp, explicit inverse, R_m, einsum on rows
        q = a.to(torch.bfloat16).float()
        q = q - q.transpose(1, 2)
        norm = torch.norm(q.flatten())
        c = float(torch.tensor(alpha).item()) * 32
        q = q * ((torch.clamp(norm, max=c) + 1e-8) / (norm + 1e-8))
        eye = torch.eye(8).expand_as(q)
        r = torch.matmul(eye + q, (eye - q).inverse())
        r = m * (r - eye) + eye
        ref = torch.einsum("k n m, k n ... -> k m ...", r, w.reshape(4, 8, 16, 3, 3)).reshape(w.shape)
        assert rel_err(rotate_weight(layer, w, m), ref) <= REL_TOL


def test_peft_neumann_without_peft_version_uses_the_0_16_series(tmp_path):
    case = get_case("peft_oft_neumann_r4")
    d = tmp_path / "old_peft"
    shutil.copytree(case.adapter, d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    del cfg["peft_version"]
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    new, old = load_adapter(case.adapter), load_adapter(d)
    assert next(iter(new)).neumann_coeffs == (1, 2, 2, 2, 1)
    assert next(iter(old)).neumann_coeffs == (1, 2, 2, 2, 2)
    # PEFT 0.16–0.17: R = I + 2Q + 2Q² + 2Q³ + 2Q⁴, applied as W·Rᵀ; written out here per block
    layer = next(iter(old))
    vec = load_file(str(d / "adapter_model.safetensors"))[layer.key + ".oft_R.weight"]
    b = layer.block_sizes[0]
    rows, cols = torch.triu_indices(b, b, 1)
    u = torch.zeros(vec.shape[0], b, b)
    u[:, rows, cols] = vec
    q = u - u.transpose(1, 2)
    eye = torch.eye(b).expand_as(q)
    r = eye + 2 * q + 2 * q @ q + 2 * q @ q @ q + 2 * q @ q @ q @ q
    key = layer.name + ".weight"
    w = case.originals[key]
    ref = w @ torch.block_diag(*r).T
    assert rel_err(rotate_weight(resolve_for_weight(layer, w.shape), w), ref) <= REL_TOL
    assert rel_err(ref, case.expected[1.0][key]) > 1e-6  # the two series really differ
