"""The real-ComfyUI harness itself: the small models load through ComfyUI's own classes, ComfyUI's key maps know
them, and ModelPatcher's clone/patch/unpatch cycle behaves as the pack relies on (COMFYUI_NOTES.md)."""

import comfy_models
import pytest
import torch

pytestmark = pytest.mark.comfyui

SD15_Q = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
FLUX_QKV = "diffusion_model.double_blocks.0.img_attn.qkv.weight"


def test_comfy_is_the_real_comfyui_on_cpu(comfy):
    root = comfy_models.COMFYUI_ROOT
    assert root is not None and (root / "comfy" / "model_patcher.py").is_file()
    # `comfy` has no __init__.py in ComfyUI: it is a namespace package, so check where its modules come from
    assert list(comfy.__path__) == [str(root / "comfy")]
    assert comfy.model_patcher.__file__ == str(root / "comfy" / "model_patcher.py")
    assert comfy.cli_args.args.cpu is True
    assert comfy.model_management.get_torch_device() == torch.device("cpu")
    # ComfyUI's own top-level `nodes` module, not the pack's nodes/ folder
    import nodes

    assert nodes.__file__ == str(root / "nodes.py")


def test_flux_tiny_loads_every_key_and_runs(comfy):
    patcher = comfy_models.flux_tiny()
    assert isinstance(patcher, comfy.model_patcher.ModelPatcher)
    assert type(patcher.model).__name__ == "Flux"
    from safetensors import safe_open

    with safe_open(str(comfy_models.FIXTURES / comfy_models.FLUX_TINY_BASE), "pt") as f:
        file_keys = set(f.keys())
        qkv = f.get_tensor("double_blocks.0.img_attn.qkv.weight")
    model_keys = {k[len("diffusion_model.") :] for k in patcher.model_state_dict() if k.startswith("diffusion_model.")}
    assert model_keys == file_keys  # no missing, no unexpected key
    assert sum(p.numel() for p in patcher.model.diffusion_model.parameters()) == 1_847_568  # fixture config
    assert torch.equal(patcher.model_state_dict()[FLUX_QKV], qkv)  # the weights are the file's

    inputs = comfy_models.flux_inputs(batch=2, size=16)
    out = comfy_models.apply_model(patcher, inputs)
    assert out.shape == (2, 4, 16, 16)
    assert torch.isfinite(out).all()
    assert out.std() > 0.01  # not a degenerate constant output
    out2 = comfy_models.apply_model(patcher, inputs)
    assert torch.equal(out, out2)  # deterministic on the CPU


def test_sd15_real_architecture_keys(comfy):
    patcher = comfy_models.sd15()
    sd = patcher.model_state_dict()
    assert SD15_Q in sd
    assert sd[SD15_Q].shape == (320, 320)
    assert "diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight" in sd
    assert sd["diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape == (1280, 768)
    n = sum(p.numel() for p in patcher.model.diffusion_model.parameters())
    assert n == 859_520_964  # SD1.5 UNet
    assert torch.isfinite(sd[SD15_Q]).all() and sd[SD15_Q].std() > 0.01
    # the 9 modules of the kohya expected file carry their original base weights
    from safetensors import safe_open

    with safe_open(str(comfy_models.FIXTURES / comfy_models.SD15_EXPECTED), "pt") as f:
        original = f.get_tensor("original/down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight")
    assert torch.equal(sd[SD15_Q], original)


def test_sd15_tiny_runs(comfy):
    patcher = comfy_models.sd15_tiny()
    assert SD15_Q in patcher.model_state_dict()
    out = comfy_models.apply_model(patcher, comfy_models.sd15_tiny_inputs(batch=2, size=16))
    assert out.shape == (2, 4, 16, 16)
    assert torch.isfinite(out).all()
    assert out.std() > 0.01


def test_lora_key_maps_know_the_models(comfy):
    flux_map = comfy.lora.model_lora_keys_unet(comfy_models.flux_tiny().model, {})
    assert flux_map["lora_unet_double_blocks_0_img_attn_qkv"] == FLUX_QKV
    assert flux_map["lora_unet_single_blocks_1_linear1"] == "diffusion_model.single_blocks.1.linear1.weight"
    # diffusers-style FLUX names map onto (fused key, (dim, start, length)) slices of qkv
    assert flux_map["transformer.transformer_blocks.0.attn.to_k"] == (FLUX_QKV, (0, 128, 128))

    sd15_map = comfy.lora.model_lora_keys_unet(comfy_models.sd15().model, {})
    assert sd15_map["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"] == SD15_Q
    assert sd15_map["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k"] == (
        "diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    )
    tiny_map = comfy.lora.model_lora_keys_unet(comfy_models.sd15_tiny().model, {})
    assert tiny_map["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"] == SD15_Q


@pytest.mark.parametrize("loader,key", [("flux_tiny", FLUX_QKV), ("sd15_tiny", SD15_Q)])
def test_clone_patch_unpatch_is_exact(comfy, loader, key):
    base = getattr(comfy_models, loader)()
    before = base.model_state_dict()[key].clone()
    delta = torch.full_like(before, 0.25)

    patched = base.clone()
    accepted = patched.add_patches({key: ("diff", (delta,)), "diffusion_model.no.such.weight": ("diff", (delta,))}, 2.0)
    assert accepted == [key]  # absent keys are skipped silently, the call returns the accepted ones
    assert key not in base.patches  # the clone's patch list is its own

    patched.patch_model()
    try:
        now = patched.model_state_dict()[key]
        assert torch.allclose(now, before + 0.5, atol=1e-6)
        assert not torch.equal(now, before)
    finally:
        patched.unpatch_model()
    assert torch.equal(base.model_state_dict()[key], before)  # bit-exact restore of the shared weight
