"""Issue 10 through the nodes, under the REAL ComfyUI library: the classes of tests/test_fail_closed.py that reach a
node raise an `OFTError` with the same words the CLI prints, patch nothing, write nothing, and leave every input file
as it was.

What has no node: baking (no bake node; the kill and concurrency tests are CLI / library tests) and `--overwrite`
(OFT Save never overwrites: it takes the next free counter, and publishes without replacing).
"""

from __future__ import annotations

import errno
import json
import os
import shutil

import comfy_models
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_fail_closed import (
    LYCORIS,
    MALFORMED,
    PEFT,
    _disk_full_after,
    _fail_opens_in,
    digest,
    kohya_file,
    malformed,
)
from test_nodes import assert_same_state, snapshot

from oft_core.cli import main as cli

pytestmark = pytest.mark.comfyui

FLUX_ADAPTER = "kohya/flux_tiny_oft_attn_dim4.safetensors"


@pytest.fixture(scope="module")
def n(comfyui_oft):
    from comfyui_oft.nodes import files, oft_nodes, op_nodes, patch
    from comfyui_oft.oft_core import OFTError

    return type("N", (), {"files": files, "oft_nodes": oft_nodes, "ops": op_nodes, "patch": patch,
                          "OFTError": OFTError})


@pytest.fixture()
def folder(n, tmp_path):
    """A fresh `oft` model folder for hostile files (registered with folder_paths for this test only)."""
    import folder_paths

    d = tmp_path / "oft_models"
    d.mkdir()
    n.files.register_folder()
    paths, exts = folder_paths.folder_names_and_paths["oft"]
    paths.append(str(d))
    folder_paths.filename_list_cache.clear()
    yield d
    paths.remove(str(d))
    folder_paths.filename_list_cache.clear()
    n.files.clear_cache()


@pytest.fixture(scope="module")
def flux_a(n, fixtures_dir):
    return n.files.load(fixtures_dir / FLUX_ADAPTER)


def same_words_as_cli(n, path, node_call, capsys) -> str:
    """The node's OFTError for the file at `path` is word for word the CLI's `inspect` error line; the file is
    unchanged. Returns the message."""
    before = digest(path)
    with pytest.raises(n.OFTError) as e:
        node_call()
    capsys.readouterr()
    assert cli(["inspect", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {e.value}", (err, str(e.value))
    assert digest(path) == before
    return str(e.value)


# ------------------------------------------------------------------------------------------------ hostile files
@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_adapter_through_load_nodes(n, folder, case, capsys):
    path = malformed(LYCORIS.adapter, folder / "bad.safetensors", case)
    base = comfy_models.sd15_tiny()
    snap = snapshot(base)
    msg = same_words_as_cli(n, path, lambda: n.oft_nodes.OFTLoadAdapter.execute(adapter_name="bad.safetensors"),
                            capsys)
    assert MALFORMED[case][1] in msg and str(path) in msg
    with pytest.raises(n.OFTError, match="bad.safetensors"):
        n.oft_nodes.OFTLoader.execute(model=base, adapter_name="bad.safetensors", strength=1.0, strength_mode="kohya")
    assert not base.patches
    assert_same_state(base, snap)


@pytest.mark.parametrize("field,value,words", [
    ("num_cayley_neumann_terms", '"abc"', "expected an integer from 1 to 64 (PEFT: int, default 5)"),
    ("num_cayley_neumann_terms", "1e400", "found Infinity"),
    ("num_cayley_neumann_terms", "2000000000", "found 2000000000"),
    ("eps", "null", "eps: expected a finite number ≥ 0"),
    ("use_cayley_neumann", '"yes"', "use_cayley_neumann: expected true or false"),
    ("oft_block_size", "4", "disagree"),
])
def test_peft_config_through_load_node(n, folder, field, value, words, capsys):
    d = folder / "peft"
    shutil.copytree(PEFT.adapter, d)
    cfg = d / "adapter_config.json"
    cfg.write_text(json.dumps(json.loads(cfg.read_text()) | {field: "@@"}).replace('"@@"', value))
    before = digest(cfg)
    msg = same_words_as_cli(n, d, lambda: n.oft_nodes.OFTLoadAdapter.execute(
        adapter_name="peft/adapter_model.safetensors"), capsys)
    assert words in msg and str(cfg) in msg
    assert digest(cfg) == before


def test_deep_config_and_integer_generators_through_load_node(n, folder, capsys):
    d = folder / "peft"
    shutil.copytree(PEFT.adapter, d)
    (d / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    msg = same_words_as_cli(n, d, lambda: n.oft_nodes.OFTLoadAdapter.execute(
        adapter_name="peft/adapter_model.safetensors"), capsys)
    assert "nested too deeply" in msg
    path = kohya_file(folder / "int.safetensors", torch.zeros(8, 40, 40, dtype=torch.int32))
    msg = same_words_as_cli(n, path, lambda: n.oft_nodes.OFTLoadAdapter.execute(adapter_name="int.safetensors"),
                            capsys)
    assert "expected a floating point dtype" in msg


@pytest.mark.parametrize("alpha", [float("nan"), 3e38])
def test_alpha_nan_and_overflow_through_load_node(n, folder, alpha, capsys):
    sd = load_file(str(LYCORIS.adapter))
    for k in sd:
        if k.endswith(".alpha"):
            sd[k] = torch.tensor(alpha)
    save_file(sd, str(folder / "lyco.safetensors"))
    path = kohya_file(folder / "kohya.safetensors", torch.zeros(8, 40, 40), alpha=alpha)
    for p in (folder / "lyco.safetensors", path):
        msg = same_words_as_cli(n, p, lambda: n.oft_nodes.OFTLoadAdapter.execute(adapter_name=p.name), capsys)
        assert "constraint (alpha): expected" in msg


# ------------------------------------------------------------------------------------------------ numbers
@pytest.mark.parametrize("strength,words", [(float("nan"), "expected a finite number, found nan"),
                                            (float("inf"), "expected a finite number, found inf"),
                                            (-float("inf"), "expected a finite number, found -inf"),
                                            (1e30, "expected a number from -1000 to 1000, found 1e+30")])
@pytest.mark.parametrize("mode", ["kohya", "orthogonal"])
def test_non_finite_strength_through_apply_nodes(n, flux_a, fixtures_dir, strength, words, mode):
    base = comfy_models.flux_tiny()
    snap = snapshot(base)
    with pytest.raises(n.OFTError, match="strength") as e:
        n.oft_nodes.OFTApply.execute(model=base, oft_adapter=flux_a, strength=strength, strength_mode=mode)
    assert words in str(e.value) and "flux_tiny_oft_attn_dim4.safetensors" in str(e.value)
    assert not base.patches
    assert_same_state(base, snap)


def test_non_finite_weights_ratios_and_multipliers_through_operation_nodes(n, flux_a):
    with pytest.raises(n.OFTError, match="expected a finite number, found nan"):
        n.ops.OFTMerge.execute(mode="compose", adapter_1=flux_a, weight_1=float("nan"))
    with pytest.raises(n.OFTError, match="finite"):
        n.ops.OFTMerge.execute(mode="average", adapter_1=flux_a, weight_1=1.0, adapter_2=flux_a,
                               weight_2=float("inf"))
    with pytest.raises(n.OFTError, match="expected a finite number, found nan"):
        n.ops.OFTBlend.execute(adapter_a=flux_a, adapter_b=flux_a, ratio=float("nan"))
    node = n.ops.OFTBlockStrength
    for spec, words in (("default=1e300", "multiplier: expected a number from -1000 to 1000"),
                        ("single=nan", "expected a finite number"),
                        (f"double:{'9' * 5000}=1", "block index of 5000 digits")):
        msg = node.validate_inputs(block_spec=spec)
        assert isinstance(msg, str) and words in msg and len(msg) < 400, msg
        with pytest.raises(n.OFTError, match="block strength spec"):
            node.execute(oft_adapter=flux_a, block_spec=spec)
    # each multiplier fine, strength × multiplier not
    scaled = node.execute(oft_adapter=flux_a, block_spec="default=100").result[0]
    base = comfy_models.flux_tiny()
    with pytest.raises(n.OFTError, match="strength 20 × block multiplier 100"):
        n.oft_nodes.OFTApply.execute(model=base, oft_adapter=scaled, strength=20.0, strength_mode="kohya")
    assert not base.patches


def test_patch_that_would_overflow_fp16_raises_naming_the_layer(n, flux_a):
    """The weight patch never hands ComfyUI NaN/Inf the weight did not have (fp16 at a large strength)."""
    base = comfy_models.flux_tiny()
    model = n.oft_nodes.OFTApply.execute(model=base, oft_adapter=flux_a, strength=10.0,
                                         strength_mode="kohya").result[0]
    key, patches = next((k, v) for k, v in model.patches.items() if not isinstance(k, tuple))
    adapter = patches[0][1]
    shape = adapter.layer.dim, model.model.state_dict()[key].shape[1]
    big = (torch.rand(shape, generator=torch.Generator().manual_seed(0)) * 2 - 1) * 60000
    weight = big.to(torch.float16)
    with pytest.raises(n.OFTError, match="NaN or Inf") as e:
        adapter.calculate_weight(weight.clone(), key, 1000.0, 1.0, None, None)
    assert adapter.layer.key in str(e.value)
    small = (big / 1000).to(torch.float16)
    out = adapter.calculate_weight(small.clone(), key, 1.0, 1.0, None, None)
    assert torch.isfinite(out).all() and not torch.equal(out, small)


# ------------------------------------------------------------------------------------------------ OFT Save
@pytest.mark.parametrize("prefix,words", [("oft/a\0b", "without NUL characters"), ("", "a path ending in a file name"),
                                          ("   ", "a path ending in a file name"), ("oft/", "a path ending in a file"),
                                          ("oft/.hidden", "does not start with '.'")])
def test_save_prefix_refused(n, flux_a, output_dir, prefix, words):
    with pytest.raises(n.OFTError, match="filename_prefix") as e:
        n.ops.OFTSave.execute(oft_adapter=flux_a, format="kohya", filename_prefix=prefix,
                              fractional_block_strength="refuse")
    assert words in str(e.value)
    assert list(output_dir.rglob("*")) == []


@pytest.mark.parametrize("err,words", [(errno.EACCES, "not writable (Permission denied)"),
                                       (errno.EROFS, "not writable (Read-only file system)")])
@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_save_into_read_only_folder(n, fixtures_dir, output_dir, monkeypatch, err, words, fmt):
    adapter = n.files.load(fixtures_dir / "peft/peft_oft_cayley_bs8/adapter_model.safetensors") if fmt == "peft" \
        else n.files.load(fixtures_dir / FLUX_ADAPTER)
    (output_dir / "oft").mkdir()
    _fail_opens_in(monkeypatch, output_dir / "oft", err)
    with pytest.raises(n.OFTError, match="cannot write") as e:
        n.ops.OFTSave.execute(oft_adapter=adapter, format=fmt, filename_prefix="oft/x",
                              fractional_block_strength="refuse")
    assert words in str(e.value) and str(output_dir / "oft") in str(e.value)
    assert os.listdir(output_dir / "oft") == []


def test_save_onto_a_full_disk(n, flux_a, output_dir, monkeypatch):
    _disk_full_after(monkeypatch, 1000)
    with pytest.raises(n.OFTError, match="no space left on the device") as e:
        n.ops.OFTSave.execute(oft_adapter=flux_a, format="kohya", filename_prefix="oft/x",
                              fractional_block_strength="refuse")
    assert "x_00001_.safetensors" in str(e.value) and "nothing was written" in str(e.value)
    assert os.listdir(output_dir / "oft") == []


def test_save_never_replaces_a_name_taken_meanwhile(n, flux_a, output_dir, monkeypatch):
    """Two saves picking the same counter (two queues, two ComfyUI processes): the second is refused, the first's
    file stays."""
    import folder_paths

    (output_dir / "oft").mkdir()
    target = output_dir / "oft" / "x_00001_.safetensors"
    monkeypatch.setattr(n.ops, "next_free_path", lambda prefix, suffix: str(target))
    real = n.ops.write_adapter

    def other_run_first(*a, **k):
        target.write_bytes(b"the other save")
        return real(*a, **k)

    monkeypatch.setattr(n.ops, "write_adapter", other_run_first)
    with pytest.raises(n.OFTError, match="output exists|appeared while"):
        n.ops.OFTSave.execute(oft_adapter=flux_a, format="kohya", filename_prefix="oft/x",
                              fractional_block_strength="refuse")
    assert target.read_bytes() == b"the other save" and os.listdir(output_dir / "oft") == [target.name]
    assert folder_paths.get_output_directory() == str(output_dir)
