"""Families beyond SD and FLUX against the reference tools themselves (tier `tools`, and `comfyui`).

For SD3 (SD3.5-style MMDiT), Wan 2.1, Qwen-Image and HiDream: a tiny diffusers transformer (small config), adapted by
LyCORIS diag-oft / BOFT through LyCORIS' own wrapper and by PEFT OFT through `get_peft_model`, with random adapter
parameters, and merged by the tool itself (tests/tools_dit_reference.py, run in the `dit` tool venv built by
`scripts/tools_venv.sh setup dit`). The same base weights go into ComfyUI's own model class of the family, converted
from diffusers names as ComfyUI's loader does it (SD3: `comfy.sd.load_diffusion_model_state_dict`, which fuses
q/k/v; Qwen-Image and HiDream: ComfyUI uses the diffusers names; Wan: ComfyUI has no diffusers converter, so the test
renames with diffusers' own conversion table, scripts/convert_wan_to_diffusers.py, reversed). The adapter file goes
through the OFTLoader node onto that model; every weight ComfyUI then computes equals the tool's merge (fp32,
<= 1e-6 relative, oracle.REL_TOL) and every other weight is unchanged.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import comfy_models
import pytest
import torch
from oracle import REL_TOL, rel_err
from safetensors.torch import load_file, save_file
from test_tools import ok, tool_python
from test_tools import run_tool as run_runner

pytestmark = [pytest.mark.tools, pytest.mark.comfyui]

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_SCRIPT = Path(__file__).resolve().parent / "tools_dit_reference.py"
FAMILIES = ("sd3", "wan", "qwen", "hidream")
TRAINED = FAMILIES  # every family: the training test builds their conditioning
TOOLS = ("lycoris", "boft", "peft")

# diffusers WanTransformer3DModel -> original Wan / ComfyUI names: diffusers' TRANSFORMER_KEYS_RENAME_DICT
# (scripts/convert_wan_to_diffusers.py) reversed. Its norm2 <-> norm3 swap: diffusers' norm2 is the cross-attention
# norm (the only one with weights), the original's norm3.
WAN_RENAMES = (
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"\.scale_shift_table$", ".modulation"),
    (r"\.attn1\.to_out\.0\.", ".self_attn.o."),
    (r"\.attn2\.to_out\.0\.", ".cross_attn.o."),
    (r"\.attn1\.to_([qkv])\.", r".self_attn.\1."),
    (r"\.attn2\.to_([qkv])\.", r".cross_attn.\1."),
    (r"\.attn1\.norm_([qk])\.", r".self_attn.norm_\1."),
    (r"\.attn2\.norm_([qk])\.", r".cross_attn.norm_\1."),
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."),
    (r"\.ffn\.net\.2\.", ".ffn.2."),
    (r"\.norm2\.", ".norm3."),
)


# ------------------------------------------------------------------------------------------------ the tool side
@pytest.fixture(scope="session")
def dit_python() -> str:
    """The `dit` tool venv's interpreter (test_tools.tool_python skips when it was not built)."""
    return tool_python("dit")


def run_dit(dit_python: str, *args: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", DIFFUSERS_VERBOSITY="error")
    proc = subprocess.run([dit_python, str(REFERENCE_SCRIPT), *args], env=env, capture_output=True, text=True,
                          timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{REFERENCE_SCRIPT.name} {' '.join(args)} failed ({proc.returncode}):\n"
                           f"{proc.stderr[-4000:]}")


@pytest.fixture(scope="session")
def references(dit_python, tmp_path_factory) -> Path:
    """Every (family, tool) reference, made in ONE tool process (importing diffusers costs ~15 s a time)."""
    root = tmp_path_factory.mktemp("dit_references")
    run_dit(dit_python, "make", str(root), *(f"{f}:{t}" for f in FAMILIES for t in TOOLS))
    return root


@pytest.fixture(scope="session")
def reference(references):
    """reference(family, tool) -> the folder tools_dit_reference.py wrote for that pair."""
    return lambda family, tool: references / f"{family}_{tool}"


# ------------------------------------------------------------------------------------------------ the ComfyUI side
def to_comfy(family: str, sd: dict) -> dict:
    """A diffusers state dict in ComfyUI's names for `family` (see the module docstring)."""
    import comfy.model_detection

    if family == "sd3":
        # copies: ComfyUI's converter writes the swapped-halves weights back into the tensors it is given
        out = comfy.model_detection.convert_diffusers_mmdit({k: v.clone() for k, v in sd.items()}, "")
        assert out is not None, "ComfyUI does not recognise the tiny SD3 as a diffusers MMDiT"
        return out
    if family in ("qwen", "hidream"):  # ComfyUI's module names are diffusers'
        return dict(sd)
    out = {}
    for k, v in sd.items():
        for pattern, repl in WAN_RENAMES:
            k = re.sub(pattern, repl, k)
        out[k] = v
    return out


def comfy_model(family: str, base: dict):
    """The family's ComfyUI ModelPatcher (CPU, float32) holding `base` (diffusers names)."""
    comfy = comfy_models.import_comfy()
    if family == "sd3":
        # ComfyUI's own loader: diffusers MMDiT detection, conversion (fused qkv) and model config.
        patcher = comfy.sd.load_diffusion_model_state_dict({k: v.clone() for k, v in base.items()},
                                                           model_options={"dtype": torch.float32})
        assert patcher is not None and type(patcher.model).__name__ == "SD3"
        config = dict(patcher.model.model_config.unet_config)
        assert config.pop("dtype") == torch.float32 and config == comfy_models.SD3_TINY_CONFIG
        loaded = {k[len("diffusion_model."):]: v for k, v in patcher.model.state_dict().items()}
        want = to_comfy(family, base)
        assert set(want) <= set(loaded), sorted(set(want) - set(loaded))[:5]
        assert all(torch.equal(loaded[k], want[k]) for k in want)
        return patcher
    return comfy_models.dit_tiny(family, to_comfy(family, base))


def adapter_path(family: str, tool: str, ref: Path, folder: Path) -> str:
    """Put the tool's adapter into the oft model folder; the name OFTLoader takes."""
    if tool == "peft":
        d = folder / f"{family}_peft"
        shutil.copytree(ref / "peft", d, dirs_exist_ok=True)
        return f"{family}_peft/adapter_model.safetensors"
    shutil.copy(ref / "adapter.safetensors", folder / f"{family}_{tool}.safetensors")
    return f"{family}_{tool}.safetensors"


@pytest.fixture(scope="module")
def oft_folder(comfyui_oft, tmp_path_factory):
    import folder_paths
    from comfyui_oft.nodes import files

    root = tmp_path_factory.mktemp("oft_families")
    files.register_folder()
    folder_paths.add_model_folder_path("oft", str(root))
    return root


def patched_state(patcher) -> dict:
    patcher.patch_model()
    try:
        return {k: v.detach().clone() for k, v in patcher.model.state_dict().items()}
    finally:
        patcher.unpatch_model()


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("family", FAMILIES)
def test_family_adapter_through_oftloader_equals_the_tools_merge(reference, oft_folder, family, tool):
    from comfyui_oft.nodes import oft_nodes

    ref = reference(family, tool)
    info = json.loads((ref / "info.json").read_text())
    base, merged = load_file(ref / "base.safetensors"), load_file(ref / "merged.safetensors")
    n_adapted = len(info["adapted"])
    assert n_adapted >= 8 and len(info["changed"]) == n_adapted, info["changed"][:5]

    model = comfy_model(family, base)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    out = oft_nodes.OFTLoader.execute(model=model, adapter_name=adapter_path(family, tool, ref, oft_folder),
                                      strength=1.0, strength_mode="kohya")
    assert f"{n_adapted} of {n_adapted} adapter layers applied" in out.ui.value, out.ui.value
    got = patched_state(out.result[0])
    want = {"diffusion_model." + k: v for k, v in to_comfy(family, merged).items()}
    orig = {"diffusion_model." + k: v for k, v in to_comfy(family, base).items()}
    changed = [k for k in want if not torch.equal(want[k], orig[k])]
    assert changed, "the tool's merge changed nothing"
    for k in want:
        if k in changed:
            assert rel_err(got[k], want[k]) <= REL_TOL, (k, rel_err(got[k], want[k]))
        else:
            assert torch.equal(got[k], want[k]), k
    # the input model is untouched
    assert all(torch.equal(v, before[k]) for k, v in model.model.state_dict().items())
    if family == "sd3" and tool != "peft":
        # diffusers' separate to_q / to_k / to_v became row slices of ComfyUI's fused qkv
        assert any(k.endswith(".attn.qkv.weight") for k in changed)


@pytest.mark.parametrize("made_for, loaded_on, says", [
    ("wan", "qwen", r"none of its \d+ layers matches the loaded QwenImage model.*made for Wan"),
    ("sd3", "wan", r"none of its \d+ layers matches the loaded WAN21_T2V model.*made for SD3"),
    ("hidream", "qwen", r"none of its \d+ layers matches the loaded QwenImage model.*made for HiDream"),
    # both use diffusers' `transformer_blocks.N.attn.*` names: they match, the widths do not
    ("qwen", "sd3", r"expected 64 .* found 128 in the loaded SD3 model's .*made for another model"),
])
def test_family_file_on_another_family_is_reported(reference, oft_folder, made_for, loaded_on, says):
    """A file of one family on another family's model: refused before anything is patched, the message names the
    file, the loaded model and what the file looks made for."""
    from comfyui_oft.nodes import oft_nodes
    from comfyui_oft.oft_core import OFTError

    model = comfy_model(loaded_on, load_file(reference(loaded_on, "lycoris") / "base.safetensors"))
    name = adapter_path(made_for, "lycoris", reference(made_for, "lycoris"), oft_folder)
    with pytest.raises(OFTError, match=says) as e:
        oft_nodes.OFTLoader.execute(model=model, adapter_name=name, strength=1.0, strength_mode="kohya")
    assert f"{made_for}_lycoris.safetensors" in str(e.value)


@pytest.mark.parametrize("family", TRAINED)
def test_trained_family_adapter_loads_in_lycoris_and_merges_the_same(comfyui_oft, reference, tmp_path, family):
    """all-linear trained on ComfyUI's model of the family through the OFTTrainer node, saved as LyCORIS with the
    family's names, loaded by LyCORIS itself (tool_runner.py in the lycoris venv: `create_lycoris_from_weights` on
    modules named as the file's base, diffusers names for `lycoris_` files, ComfyUI's for `lora_unet_` ones) and
    merged at multipliers 1.0 and 0.5: equal to the pack's patch at strengths 1.0 and 0.5."""
    import comfy.model_management
    from comfyui_oft.nodes import patch, train_node
    from comfyui_oft.oft_core.formats import write_adapter
    from test_families_comfy import training_data

    base = load_file(reference(family, "lycoris") / "base.safetensors")
    model = comfy_model(family, base)
    latents, positive = training_data(family)
    try:
        with torch.inference_mode():
            new_model, adapter, _loss, _report = train_node.OFTTrainerNode.execute(
                model=model, latents=latents, positive=positive, steps=2, learning_rate=2e-2, batch_size=2,
                grad_accumulation=1, optimizer="AdamW", seed=0, num_blocks=32, constraint=0.0,
                cayley_neumann=False, neumann_terms=5, targets="all-linear", training_dtype="fp32",
                gradient_checkpointing=False).result
    finally:
        comfy.model_management.unload_all_models()
    path = write_adapter(adapter, str(tmp_path / f"{family}_trained.safetensors"), "lycoris")
    native = all(layer.key.startswith("lora_unet_") for layer in adapter)
    assert native == (family == "wan")
    if native:  # a file named after ComfyUI's (the original) modules: LyCORIS gets a base named so
        tool_base = tmp_path / "base_comfy.safetensors"
        save_file({k: v.contiguous() for k, v in to_comfy(family, base).items()}, str(tool_base))
    else:
        tool_base = reference(family, "lycoris") / "base.safetensors"
    result, tool = run_runner("lycoris", {"adapter": path, "base": str(tool_base), "multipliers": [1.0, 0.5],
                                          "prefix": "lora_unet" if native else "lycoris"}, tmp_path, family)
    ok(result)
    assert len(result["loaded"]) == len(adapter) and not result["ignored"]
    orig = {"diffusion_model." + k: v for k, v in to_comfy(family, base).items()}
    for strength in (1.0, 0.5):
        merged = dict(base if not native else to_comfy(family, base))
        merged.update({k[len(f"m{strength}/"):]: v for k, v in tool.items() if k.startswith(f"m{strength}/")})
        want = {"diffusion_model." + k: v for k, v in (merged if native else to_comfy(family, merged)).items()}
        patched = new_model if strength == 1.0 else patch.apply_oft(model, None, adapter, strength)[0]
        got = patched_state(patched)
        changed = [k for k in want if not torch.equal(want[k], orig[k])]
        assert len(changed) >= 16
        for k in want:
            if k in changed:
                assert rel_err(got[k], want[k]) <= REL_TOL, (k, strength, rel_err(got[k], want[k]))
            else:
                assert torch.equal(got[k], want[k]), k


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
