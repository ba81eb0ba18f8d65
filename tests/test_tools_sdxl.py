"""SDXL against sd-scripts itself (tiers `tools` and `comfyui`): the kohya OFT files SDXL users have.

A tiny SDXL UNet with SDXL's exact block layout (3 levels, transformer depths 0 / 2 / 10, heads of 64, cross-attention
2048 wide, the 2816-wide label embedding) and 32 model channels: ComfyUI's own `SDXL` model class on one side,
sd-scripts' own `library.sdxl_original_unet.SdxlUNet2DConditionModel` (its two size constants set to 32 channels) on
the other, with the same weights (both use SDXL's LDM module names, so the state dict loads into sd-scripts' UNet
strictly). Both directions of the format are checked with sd-scripts' `networks.oft`:

- files sd-scripts writes (`create_network` of each training option, seeded blocks, its own `save_weights`, fp32 and
  bf16 as users save them, the constraint active and not) go through the OFTLoader node onto ComfyUI's SDXL, and every
  weight ComfyUI then computes equals sd-scripts' own merge of the same file (`create_network_from_weights` +
  `merge_to`) at multipliers 1.0 and 0.5, ≤ 1e-6 relative in fp32 (oracle.REL_TOL, never loosened);
- files our trainer node writes after training on ComfyUI's SDXL load in sd-scripts with every layer, and its merge
  equals the OFTLoader patch of the same file;
- each preset adapts exactly the layers of the sd-scripts option it is named after (on SDXL, unlike SD1.x, the
  `+conv` presets' 3×3 convolutions load in sd-scripts too: its conv detection looks for an LDM name);
- files LyCORIS writes for SDXL as sd-scripts runs it (`--network_module lycoris.kohya`: LyCORIS' kohya network on
  sd-scripts' SDXL UNet; diag-oft plain, rescaled + constrained in fp16, BOFT) go through the OFTLoader node and equal
  LyCORIS' own merge (lycoris venv; sd-scripts' UNet source from the sd-scripts venv).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import comfy_models
import pytest
import test_tools_families
import torch
from oracle import REL_TOL, rel_err
from safetensors import safe_open
from safetensors.torch import save_file
from test_tools import SD_OPTIONS, TOOLS_DIR, _job, _spawn, ok, run_tool, tool_python

pytestmark = [pytest.mark.tools, pytest.mark.comfyui]
oft_folder = test_tools_families.oft_folder  # the fixture: an oft model folder registered with ComfyUI

# ComfyUI's unet config of a real SDXL base with 32 model channels instead of 320 (56.8 M parameters)
SDXL_TINY = dict(comfy_models.SD15_UNET_CONFIG, model_channels=32, num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4],
                 transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_middle=10,
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], use_linear_in_transformer=True,
                 context_dim=2048, adm_in_channels=2816, num_classes="sequential", num_head_channels=64,
                 num_heads=-1)
SDXL_TINY_SDSCRIPTS = {"model_channels": 32}
STRENGTHS = (1.0, 0.5)
PRESETS = tuple(SD_OPTIONS)
# Files as sd-scripts writes them: (option, network_dim = blocks per layer, network_alpha, save dtype). Alpha 1e-3
# (sd-scripts' default) clamps the random blocks' norm (alpha × out_dim); 1.0 leaves it inactive.
MADE = {
    "attention_fp32": ("attention", 8, 1.0, "float32"),
    "attention_bf16_clamped": ("attention", 8, 1e-3, "bfloat16"),
    "all-linear+conv_bf16": ("all-linear+conv", 16, 1e-3, "bfloat16"),
    "all-linear_fp32": ("all-linear", 16, 1.0, "float32"),
}


def _metadata(option: str, dim: int, alpha: float) -> dict:
    """The ss_* keys sd-scripts' train_network.py writes that describe the network (its values, as strings)."""
    meta = {"ss_network_module": "networks.oft", "ss_network_dim": str(dim), "ss_network_alpha": str(alpha),
            "ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False"}
    if SD_OPTIONS[option]:
        meta["ss_network_args"] = json.dumps({k: str(v) for k, v in SD_OPTIONS[option].items()})
    return meta


def _req(**kw) -> dict:
    return dict(kind="sdxl", model=SDXL_TINY_SDSCRIPTS, multipliers=list(STRENGTHS), **kw)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("tools_sdxl")


@pytest.fixture(scope="module")
def sdxl(comfy, work):
    """ComfyUI's SDXL (tiny) as a ModelPatcher, and its weights saved with their LDM names (sd-scripts' names)."""
    model = comfy_models._build(comfy.supported_models.SDXL, SDXL_TINY, torch.float32)
    comfy_models.fill_deterministic(model.diffusion_model, 21, std=0.05)
    base = {k: v.detach().clone().contiguous() for k, v in model.diffusion_model.state_dict().items()}
    base_path = work / "sdxl_base.safetensors"
    save_file(base, str(base_path))
    return {"mp": comfy_models._patcher(model), "base": base_path, "base_sd": base}


@pytest.fixture(scope="module")
def trained(comfy, comfyui_oft, sdxl, work):
    """preset -> path of the kohya file the trainer node writes after training on the tiny SDXL (16 blocks a layer)."""
    import comfy.model_management
    from comfyui_oft.nodes import train_node
    from comfyui_oft.oft_core.formats import write_adapter

    g = torch.Generator().manual_seed(0)
    latents = {"samples": torch.randn(2, 4, 16, 16, generator=g)}
    positive = [[torch.randn(1, 5, 2048, generator=g), {"pooled_output": torch.randn(1, 1280, generator=g)}]]
    files = {}
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for preset in PRESETS:
            try:
                with torch.inference_mode():  # as ComfyUI runs nodes
                    out = train_node.OFTTrainerNode.execute(
                        model=sdxl["mp"], latents=latents, positive=positive, steps=3, learning_rate=5e-2,
                        batch_size=2, grad_accumulation=1, optimizer="AdamW", seed=0, num_blocks=16, constraint=0.0,
                        cayley_neumann=False, neumann_terms=5, targets=preset, training_dtype="fp32",
                        gradient_checkpointing=True)
            finally:
                comfy.model_management.unload_all_models()
            adapter = out.result[1]
            files[preset] = Path(write_adapter(adapter, work / f"trained_{preset}.safetensors", "kohya"))
    finally:
        torch.set_num_threads(n)
    return files


@pytest.fixture(scope="module")
def sdscripts(sdxl, trained, work):
    """Every sd-scripts job of this module in one tool process (importing sd-scripts takes seconds); tag -> request."""
    files = trained
    jobs = {"sdxl_targets": _req(base=str(sdxl["base"]), targets_for=SD_OPTIONS, dim=4)}
    for preset, path in files.items():
        jobs[f"sdxl_trained_{preset}"] = _req(base=str(sdxl["base"]), adapter=str(path))
    for tag, (option, dim, alpha, dtype) in MADE.items():
        jobs[f"sdxl_made_{tag}"] = _req(base=str(sdxl["base"]), make=dict(
            dim=dim, alpha=alpha, network_args=SD_OPTIONS[option], seed=len(tag), std=0.05, dtype=dtype,
            metadata=_metadata(option, dim, alpha), save=str(work / f"made_{tag}.safetensors")))
    why = _spawn("sdscripts", [_job("sdscripts", req, work, tag) for tag, req in jobs.items()], work, "sdscripts")
    missing = [tag for tag in jobs if not (work / f"{tag}.json").is_file()]
    assert not missing, f"sd-scripts runner stopped before {missing[:3]} ({why})"
    return jobs


# Files as LyCORIS writes them for SDXL through sd-scripts (`--network_module lycoris.kohya`, its network on
# sd-scripts' SDXL UNet, LDM names under lora_unet_, every Linear and conv of the transformer and ResNet blocks):
# (LyCORIS network_args, network_dim, network_alpha, save dtype)
LYCORIS_MADE = {
    "diag-oft": ({"algo": "diag-oft"}, 8, 1.0, "float32"),
    "diag-oft_rescaled_constrained_fp16": ({"algo": "diag-oft", "rescaled": True, "constraint": 1e-3}, 8, 1.0,
                                           "float16"),
    "boft": ({"algo": "boft"}, 8, 1.0, "float32"),
}


@pytest.fixture(scope="module")
def lycoris_made(sdxl, work):
    """Every LyCORIS job of this module in one tool process; tag -> request. sd-scripts' SDXL UNet comes from the
    sd-scripts venv's source folder."""
    tool_python("sdscripts")  # (skips, with the reason, when that venv is not built)
    source = TOOLS_DIR / "venv-sdscripts" / "sd-scripts"
    jobs = {}
    for tag, (args, dim, alpha, dtype) in LYCORIS_MADE.items():
        jobs[f"sdxl_lycoris_{tag}"] = _req(base=str(sdxl["base"]), make_sdxl=dict(
            source=str(source), dim=dim, alpha=alpha, network_args=args, seed=len(tag), std=0.05, dtype=dtype,
            metadata={"ss_network_module": "lycoris.kohya", "ss_base_model_version": "sdxl_base_v1-0"},
            save=str(work / f"lycoris_{tag}.safetensors")))
    why = _spawn("lycoris", [_job("lycoris", req, work, tag) for tag, req in jobs.items()], work, "lycoris_sdxl")
    missing = [tag for tag in jobs if not (work / f"{tag}.json").is_file()]
    assert not missing, f"LyCORIS runner stopped before {missing[:3]} ({why})"
    return jobs


def _through_oftloader(sdxl, oft_folder, path, strength: float) -> tuple[dict, str]:
    """(the patched diffusion-model weights, the node's report) of `path` applied by OFTLoader onto the tiny SDXL."""
    from comfyui_oft.nodes import oft_nodes

    name = f"sdxl_{path.name}"
    if not (oft_folder / name).exists():
        shutil.copy(path, oft_folder / name)
    out = oft_nodes.OFTLoader.execute(model=sdxl["mp"], adapter_name=name, strength=strength, strength_mode="kohya")
    patcher = out.result[0]
    patcher.patch_model()
    try:
        got = {k[len("diffusion_model."):]: v.detach().clone() for k, v in patcher.model.state_dict().items()
               if k.startswith("diffusion_model.")}
    finally:
        patcher.unpatch_model()
    assert all(torch.equal(v, sdxl["base_sd"][k]) for k, v in sdxl["mp"].model.diffusion_model.state_dict().items())
    return got, out.ui.value


def _assert_equals_the_tools_merge(sdxl, oft_folder, path, res, tensors) -> int:
    """Every weight sd-scripts merged equals ComfyUI's patched weight at that multiplier (≤ REL_TOL), every other
    weight is the base's; returns how many weights were compared."""
    n = 0
    for s in STRENGTHS:
        got, text = _through_oftloader(sdxl, oft_folder, path, s)
        layers = len(res["loaded"])
        assert f"{layers} of {layers} adapter layers applied" in text, text
        merged = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(f"m{s}/")}
        assert len(merged) == layers
        moved = 0.0
        for k, v in got.items():
            if k in merged:
                assert rel_err(v, merged[k]) <= REL_TOL, (s, k, rel_err(v, merged[k]))
                moved = max(moved, rel_err(merged[k], sdxl["base_sd"][k]))
                n += 1
            else:
                assert torch.equal(v, sdxl["base_sd"][k]), (s, k)
        assert moved > 1e-3, f"sd-scripts' merge at {s} barely moved any weight ({moved})"
    return n


# ------------------------------------------------------------------------------------------------ tests
def test_presets_adapt_exactly_the_layers_of_the_sd_scripts_options_on_sdxl(sdxl, work, sdscripts):
    from comfyui_oft.oft_core.train import select_targets

    res, _ = run_tool("sdscripts", sdscripts["sdxl_targets"], work, "sdxl_targets")
    ok(res)
    assert res["unexpected_base_keys"] == []
    dm = sdxl["mp"].model.diffusion_model
    for preset in PRESETS:
        ours = {"oft_unet_" + p.replace(".", "_") for p, _ in select_targets(dm, preset)}
        theirs = set(res["targets"][preset])
        assert ours == theirs, (preset, sorted(ours ^ theirs)[:6])
    # the 3×3 convs load in sd-scripts on SDXL: every ResBlock's first conv is among them
    convs = [k for k in res["targets"]["all-linear+conv"] if k.endswith("in_layers_2")]
    assert len(convs) == sum(1 for n, _ in dm.named_modules() if n.endswith("in_layers.2")) > 0


@pytest.mark.parametrize("tag", list(MADE))
def test_sd_scripts_sdxl_file_through_oftloader_equals_its_merge(sdxl, oft_folder, work, sdscripts, tag):
    """A kohya OFT file sd-scripts writes for SDXL: our loader applies every layer, as sd-scripts merges it."""
    res, tensors = run_tool("sdscripts", sdscripts[f"sdxl_made_{tag}"], work, f"sdxl_made_{tag}")
    ok(res)
    option, dim, alpha, dtype = MADE[tag]
    path = work / f"made_{tag}.safetensors"
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        assert {str(f.get_tensor(k).dtype) for k in keys if k.endswith(".oft_blocks")} == {f"torch.{dtype}"}
        assert f.metadata()["ss_network_module"] == "networks.oft"
    assert res["made"] == len(res["loaded"]) and res["ignored"] == []
    assert len({k.split(".")[0] for k in keys}) == res["made"]
    n = _assert_equals_the_tools_merge(sdxl, oft_folder, path, res, tensors)
    assert n == 2 * res["made"]


@pytest.mark.parametrize("preset", PRESETS)
def test_trained_sdxl_adapter_loads_in_sd_scripts_and_merges_the_same(sdxl, trained, oft_folder, work, sdscripts,
                                                                      preset):
    """The trainer node's kohya file of an SDXL: LDM names sd-scripts' SDXL UNet has, every layer loaded there (3×3
    convs included), and sd-scripts' merge equals what our loader patches into ComfyUI's SDXL."""
    files = trained
    res, tensors = run_tool("sdscripts", sdscripts[f"sdxl_trained_{preset}"], work, f"sdxl_trained_{preset}")
    ok(res)
    with safe_open(str(files[preset]), "pt") as f:
        meta = f.metadata()
        file_layers = {k.split(".")[0] for k in f.keys()}
    assert meta["ss_network_module"] == "networks.oft" and meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert res["ignored"] == [] and set(res["loaded"]) == file_layers and res["dim"] == 16
    if preset.endswith("+conv"):
        assert any(k.endswith("in_layers_2") for k in res["loaded"])
    # and inspect / the save report say nothing of layers sd-scripts would drop (they do for SD1.x's +conv files)
    from comfyui_oft.oft_core.formats import load_adapter
    from comfyui_oft.oft_core.summary import tool_notes

    notes = tool_notes(load_adapter(files[preset]))
    assert not any("will ignore" in note for note in notes), notes
    n = _assert_equals_the_tools_merge(sdxl, oft_folder, files[preset], res, tensors)
    assert n == 2 * len(file_layers)


@pytest.mark.parametrize("tag", list(LYCORIS_MADE))
def test_lycoris_sdxl_file_through_oftloader_equals_its_merge(sdxl, oft_folder, work, lycoris_made, tag):
    """The SDXL OFT files users mostly have: LyCORIS diag-oft / BOFT trained with sd-scripts on SDXL. LyCORIS' own
    kohya network on sd-scripts' SDXL UNet writes the file (ResNet convs included; rescale, constraint, fp16 as
    saved) and merges it back; our loader applies every layer onto ComfyUI's SDXL as LyCORIS merges it."""
    res, tensors = run_tool("lycoris", lycoris_made[f"sdxl_lycoris_{tag}"], work, f"sdxl_lycoris_{tag}")
    ok(res)
    assert res["unexpected_base_keys"] == [] and res["made"] == len(res["loaded"]) > 100
    assert any(name.endswith("in_layers_2") for name in res["loaded"])  # the 3×3 convs are in the file
    n = _assert_equals_the_tools_merge(sdxl, oft_folder, work / f"lycoris_{tag}.safetensors", res, tensors)
    assert n == 2 * res["made"]
    # what sd-scripts calls to merge such a network (LycorisNetworkKohya.merge_to) merges at 1 whatever its
    # multiplier: at 1 it is the merge above, at 0.5 the same weights again (a known limit of that path)
    kohya = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("kohya1.0/")}
    assert kohya.keys() == {k.split("/", 1)[1] for k in tensors if k.startswith("m1.0/")}
    assert all(torch.equal(v, tensors["m1.0/" + k]) and torch.equal(v, tensors["kohya0.5/" + k])
               for k, v in kohya.items())
