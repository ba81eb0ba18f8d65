"""oft_core works with no ComfyUI anywhere, and `inspect` says what a file holds."""

import json
import subprocess
import sys
from pathlib import Path

from oracle import FIXTURES, get_case
from safetensors import safe_open

from oft_core.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]

# sys.modules[name] = None is how Python spells "not installed": imports fail and find_spec returns None.
_BLOCK_COMFY = """
import sys
for name in ('comfy', 'comfy_api', 'comfy_extras', 'folder_paths', 'nodes', 'server', 'execution'):
    sys.modules[name] = None
"""


def test_oft_core_imports_and_runs_without_comfyui():
    code = _BLOCK_COMFY + f"""
sys.path.insert(0, {str(ROOT)!r})
import oft_core, torch
from oft_core import load_adapter, rotate_weight, resolve_for_weight
a = load_adapter({str(get_case('lycoris_diag_oft_dim8').adapter)!r})
layer = resolve_for_weight(next(iter(a)), (32, 32))
print(float(rotate_weight(layer, torch.eye(32)).sum()))
comfy_names = ('comfy', 'comfy_api', 'folder_paths')
assert not [m for m, v in sys.modules.items() if v is not None and m.split('.')[0] in comfy_names]
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip()) != 32.0  # the rotation did something


def test_pack_root_imports_without_comfyui():
    code = _BLOCK_COMFY + f"""
import importlib.util
spec = importlib.util.spec_from_file_location('comfyui_oft', {str(ROOT / '__init__.py')!r},
                                              submodule_search_locations=[{str(ROOT)!r}])
mod = importlib.util.module_from_spec(spec); sys.modules['comfyui_oft'] = mod; spec.loader.exec_module(mod)
print(hasattr(mod, 'comfy_entrypoint'), hasattr(mod, 'NODE_CLASS_MAPPINGS'))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_module_entry_point_runs(tmp_path):
    out = subprocess.run([sys.executable, "-m", "oft_core", "inspect", str(FIXTURES / "kohya" /
                                                                          "flux_tiny_oft_attn_dim4.safetensors")],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "kohya_flux" in out.stdout and "layers:     8" in out.stdout


def test_inspect_kohya_reports_clamped_layers_like_the_fixture(capsys):
    path = FIXTURES / "kohya" / "sd15_oft_attn_dim8_bf16.safetensors"
    assert cli(["inspect", str(path), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["format"] == "kohya" and d["layers"] == 128
    assert d["block_layouts"][0]["num_blocks"] == [8]
    per = {x["name"]: x for x in d["per_layer"]}
    with safe_open(str(FIXTURES / "kohya" / "sd15_oft_attn_dim8_bf16_expected.safetensors"), "pt") as f:
        modules = json.loads(f.metadata()["modules"])
    for name, info in modules.items():
        # norm_ratio = ‖Q‖ / (alpha·out_dim) as the fixture generator set it: > 1 means the clamp bites
        assert per[name]["clamped"] == (info["norm_ratio"] > 1.0), name
        assert per[name]["block_size"] == [info["block_size"]]
        assert abs(per[name]["bound"][0] - 0.00099945068359375 * info["out_dim"]) < 1e-6
    # every layer has 8 blocks of b(b−1)/2 free parameters
    assert d["parameters"] == sum(8 * b * (b - 1) // 2 for b in (x["block_size"][0] for x in d["per_layer"]))


def test_inspect_flux_splits_and_text(capsys):
    path = FIXTURES / "kohya" / "flux_tiny_oft_attn_dim4.safetensors"
    assert cli(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "kohya_flux" in text and "4+4+4 × 32+32+32" in text and "4 × 32" in text
    assert cli(["inspect", str(path), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    with safe_open(str(FIXTURES / "kohya" / "flux_tiny_oft_attn_dim4_expected.safetensors"), "pt") as f:
        modules = json.loads(f.metadata()["modules"])
    per = {x["name"]: x for x in d["per_layer"]}
    for name, info in modules.items():
        assert per[name]["clamped"] == any(r > 1.0 for r in info["norm_ratio"]), name


def test_inspect_peft_directory(capsys):
    assert cli(["inspect", str(get_case("peft_oft_neumann_r4").adapter)]) == 0
    text = capsys.readouterr().out
    assert "format:     peft" in text and "layers:     56" in text


def test_cli_error_is_one_line(tmp_path, capsys):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"\x00" * 3)
    assert cli(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(bad) in err[0]
