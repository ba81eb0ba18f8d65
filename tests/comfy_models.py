"""Small models that the REAL ComfyUI runtime loads, for the integration tests (plain helper module).

Everything here goes through ComfyUI's own classes, the code its loader runs after model detection
(`comfy.sd.load_diffusion_model_state_dict`): `comfy.supported_models.<Family>(unet_config)` →
`set_inference_dtype` → `get_model` → `diffusion_model.load_state_dict` (as `BaseModel.load_model_weights` does, but
checking the missing/unexpected lists instead of only logging them) → `comfy.model_patcher.ModelPatcher` on the CPU.
Detection itself cannot be used: it hard-codes FLUX's hidden size 3072 and only recognises SD1.5 at 320 channels with
context 768 (see ../shared/fixtures/README.md, last section).

Nothing here imports ComfyUI at import time. `import_comfy()` finds it (COMFYUI_PATH, else
~/.cache/comfyui-oft/ComfyUI), puts it first on sys.path, forces the CPU (`comfy.cli_args.args.cpu = True` must be set
before `comfy.model_management` is imported) and imports the modules tests use. The `comfy` fixture in conftest.py
calls it and turns `ComfyUINotFound` into a skip.

The loaders are cached per session (one model object per config and dtype). Callers share that object, so:
patch only clones (`patcher.clone()` + `add_patches`), and call `unpatch_model()` after `patch_model()`; both restore
the shared weights exactly. Never assign to the shared weights directly.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("OFT_FIXTURES") or REPO_ROOT.parent / "shared" / "fixtures").resolve()
DEFAULT_COMFYUI = Path.home() / ".cache" / "comfyui-oft" / "ComfyUI"

# ------------------------------------------------------------------------------------------------ configs
# ComfyUI `comfy.ldm.flux.model.Flux` parameters of kohya/flux_tiny_base.safetensors. ComfyUI counts latent channels
# before the 2×2 packing (in_channels 4, patch_size 2); sd-scripts' config file counts after it (16).
FLUX_TINY_CONFIG = {
    "image_model": "flux",
    "in_channels": 4,
    "out_channels": 4,
    "patch_size": 2,
    "hidden_size": 128,
    "num_heads": 2,
    "axes_dim": [16, 24, 24],
    "mlp_ratio": 4.0,
    "context_in_dim": 64,
    "vec_in_dim": 32,
    "depth": 2,
    "depth_single_blocks": 2,
    "theta": 10000,
    "qkv_bias": True,
    "guidance_embed": True,
}

# The real SD1.5 UNet, exactly the config `comfy.model_detection` produces for an SD1.5 checkpoint (without `dtype`,
# which `set_inference_dtype` adds). `supported_models.SD15` adds num_heads 8, num_head_channels -1.
SD15_UNET_CONFIG = {
    "use_checkpoint": False,
    "image_size": 32,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "in_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "channel_mult": [1, 2, 4, 4],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": False,
    "context_dim": 768,
    "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}

# A tiny UNet of the same family (1.07 M parameters, forward in milliseconds). `transformer_depth` has one entry per
# input res block (sum of num_res_blocks), `transformer_depth_output` one per output block (levels × (blocks + 1)).
# Its module names follow the same scheme (input_blocks.1.1.transformer_blocks.0.attn1.to_q, ...).
SD15_TINY_UNET_CONFIG = dict(
    SD15_UNET_CONFIG,
    model_channels=32,
    channel_mult=[1, 2],
    num_res_blocks=[1, 1],
    transformer_depth=[1, 1],
    transformer_depth_middle=1,
    transformer_depth_output=[1, 1, 1, 1],
    context_dim=48,
)

# Tiny models of other families, the ComfyUI side of the diffusers models in tools_dit_reference.py (same sizes).
# SD3: exactly what comfy.model_detection finds for that tiny SD3Transformer2DModel (SD3.5-style, RMS q/k norm;
# ComfyUI's MMDiT has hidden = 64 × depth and `depth` heads).
SD3_TINY_CONFIG = {
    "in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 2, "input_size": None, "adm_in_channels": 32,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 64, "out_features": 128}},
    "num_patches": 64, "pos_embed_max_size": 8, "qk_norm": "rms", "pos_embed_scaling_factor": None,
    "x_block_self_attn_layers": [],
}
WAN_TINY_CONFIG = {  # Wan 2.1 T2V (ComfyUI's detection assumes num_heads = dim // 128)
    "image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2), "in_dim": 16, "dim": 128,
    "ffn_dim": 256, "freq_dim": 256, "text_dim": 32, "out_dim": 16, "num_heads": 1, "num_layers": 2,
    "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6,
}
QWEN_TINY_CONFIG = {
    "image_model": "qwen_image", "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 2,
    "attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": 48, "axes_dims_rope": (8, 12, 12),
}
HIDREAM_TINY_CONFIG = {
    "image_model": "hidream", "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 1,
    "num_single_layers": 1, "attention_head_dim": 32, "num_attention_heads": 2, "caption_channels": [32, 48],
    "text_emb_dim": 24, "num_routed_experts": 2, "num_activated_experts": 1, "axes_dims_rope": (8, 12, 12),
    "max_resolution": (16, 16), "llama_layers": [0, 0],
}

CHROMA_TINY_CONFIG = {  # Chroma: FLUX's blocks, modulations from one approximator (in_dim 64 = 16 + 16 + 32 fixed)
    "image_model": "chroma", "in_channels": 16, "out_channels": 16, "context_in_dim": 64, "hidden_size": 128,
    "mlp_ratio": 4.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1, "axes_dim": [16, 24, 24],
    "theta": 10000, "patch_size": 2, "qkv_bias": True, "in_dim": 64, "out_dim": 128, "hidden_dim": 64,
    "n_layers": 2,
}

HUNYUAN_VIDEO_TINY_CONFIG = {  # HunyuanVideo: FLUX's double / single blocks on video latents, a token refiner
    "image_model": "hunyuan_video", "in_channels": 16, "out_channels": 16, "vec_in_dim": 32, "context_in_dim": 64,
    "hidden_size": 128, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
    "axes_dim": [16, 24, 24], "theta": 256, "patch_size": [1, 2, 2], "qkv_bias": True, "guidance_embed": True,
    "byt5": False, "meanflow": False,
}

FLUX2_TINY_CONFIG = {  # FLUX.2 (newer ComfyUI only): global modulation, SiLU-gated MLP, 4 RoPE axes, no biases
    "image_model": "flux2", "in_channels": 128, "out_channels": 128, "vec_in_dim": None, "context_in_dim": 64,
    "hidden_size": 128, "mlp_ratio": 3.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
    "axes_dim": [16, 16, 16, 16], "theta": 2000, "patch_size": 1, "qkv_bias": False, "guidance_embed": True,
    "txt_ids_dims": [3], "global_modulation": True, "mlp_silu_act": True, "ops_bias": False,
    "default_ref_method": "index", "ref_index_scale": 10.0,
}

LUMINA2_TINY_CONFIG = {  # Lumina Image 2.0 (NextDiT; Z-Image is the same class): fused qkv with fewer kv heads
    "image_model": "lumina2", "patch_size": 2, "in_channels": 4, "dim": 128, "cap_feat_dim": 32, "n_layers": 2,
    "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 1, "multiple_of": 16, "qk_norm": True,
    "axes_dims": [16, 24, 24], "axes_lens": [300, 512, 512],
}

ZIMAGE_TINY_CONFIG = {  # Z-Image (newer ComfyUI: Lumina 2's NextDiT with Z-Image modulation, as many kv heads)
    # (dim ≥ 256: its modulation width is min(dim, 256) against a 256-wide time embedding)
    "image_model": "lumina2", "patch_size": 2, "in_channels": 4, "dim": 256, "cap_feat_dim": 32, "n_layers": 2,
    "n_refiner_layers": 1, "n_heads": 4, "n_kv_heads": 4, "multiple_of": 256, "qk_norm": True,
    "axes_dims": [16, 24, 24], "axes_lens": [1536, 512, 512], "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0,
    "z_image_modulation": True, "time_scale": 1000.0,
}

# weight scale of the pseudo-random tiny DiTs: FLUX.2's gates (from its global modulation) at the default 0.02 leave
# the blocks' contribution to the output ~1e-4, too small for a training test to see the loss move
DIT_TINY_STD = {"flux2": 0.1}

FLUX_TINY_BASE = "kohya/flux_tiny_base.safetensors"
SD15_EXPECTED = "kohya/sd15_oft_attn_dim8_bf16_expected.safetensors"


# ------------------------------------------------------------------------------------------------ ComfyUI discovery
class ComfyUINotFound(RuntimeError):
    """No ComfyUI source tree: the integration tests are skipped (the message says why)."""


def find_comfyui() -> Path:
    """The ComfyUI source tree to test against: COMFYUI_PATH, else ~/.cache/comfyui-oft/ComfyUI."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        path = Path(env).expanduser().resolve()
        if not (path / "comfy" / "model_patcher.py").is_file():
            raise ComfyUINotFound(f"COMFYUI_PATH={env} is not a ComfyUI source tree (no comfy/model_patcher.py)")
        return path
    if (DEFAULT_COMFYUI / "comfy" / "model_patcher.py").is_file():
        return DEFAULT_COMFYUI.resolve()
    raise ComfyUINotFound(f"COMFYUI_PATH unset and nothing at {DEFAULT_COMFYUI}")


_COMFY = None
COMFYUI_ROOT = None  # where the imported ComfyUI lives, once import_comfy() succeeded


def import_comfy():
    """Import ComfyUI as a library on the CPU and return the `comfy` package (idempotent).

    Raises ComfyUINotFound when there is no ComfyUI; any other exception means ComfyUI is there but broken.
    """
    global _COMFY
    if _COMFY is not None:
        return _COMFY
    root = find_comfyui()
    # ComfyUI's own top-level modules (`nodes`, `folder_paths`, `server`, ...) must win over same-named folders of
    # this repo (our `nodes/` package!), so ComfyUI goes first on sys.path.
    if str(root) in sys.path:
        sys.path.remove(str(root))
    sys.path.insert(0, str(root))
    clash = sys.modules.get("nodes")
    if clash is not None and not str(getattr(clash, "__file__", "") or "").startswith(str(root)):
        raise RuntimeError(
            f"a module named 'nodes' was imported from {getattr(clash, '__file__', clash)!r} before ComfyUI: "
            "import the pack's nodes as comfyui_oft.nodes (the comfyui_oft fixture), never as top-level 'nodes'"
        )

    import comfy.cli_args

    if "comfy.model_management" not in sys.modules:
        # Must happen before comfy.model_management is imported: it picks the device at import time.
        comfy.cli_args.args.cpu = True
    import comfy.model_management

    if comfy.model_management.cpu_state != comfy.model_management.CPUState.CPU:
        raise RuntimeError(
            "comfy.model_management was imported before comfy.cli_args.args.cpu was set: it is not in CPU mode; "
            "import ComfyUI only through the `comfy` fixture / comfy_models.import_comfy()"
        )
    import comfy.lora
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    import comfy.utils

    _fit_flux_tiny_config()
    _rope_backward()
    global COMFYUI_ROOT
    COMFYUI_ROOT = root
    _COMFY = comfy
    return comfy


def _fit_flux_tiny_config():
    """Give FLUX_TINY_CONFIG (and CHROMA_TINY_CONFIG) the fields this ComfyUI's FluxParams (ChromaParams) requires
    and detection sets for a FLUX.1 (Chroma) checkpoint.

    ComfyUI 0.8.0 added the required `txt_ids_dims` (`comfy/ldm/flux/model.py` FluxParams; `comfy/model_detection.py`
    sets `[]` for FLUX.1); 0.3.64's FluxParams rejects it. Feature detection, not a version check.
    """
    import dataclasses

    import comfy.ldm.flux.model

    fields = {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}
    if "txt_ids_dims" in fields:
        FLUX_TINY_CONFIG.setdefault("txt_ids_dims", [])
    import comfy.ldm.chroma.model  # (0.8.0 also made Chroma's txt_ids_dims and vec_in_dim required: [] and None)

    fields = {f.name for f in dataclasses.fields(comfy.ldm.chroma.model.ChromaParams)}
    if "txt_ids_dims" in fields:
        CHROMA_TINY_CONFIG.setdefault("txt_ids_dims", [])
    if "vec_in_dim" in fields:
        CHROMA_TINY_CONFIG.setdefault("vec_in_dim", None)
    import comfy.ldm.hunyuan_video.model  # (0.8.0: three more required fields, set as detection does for 1.0)

    fields = {f.name for f in dataclasses.fields(comfy.ldm.hunyuan_video.model.HunyuanVideoParams)}
    for name, value in (("use_cond_type_embedding", False), ("vision_in_dim", None), ("meanflow_sum", False)):
        if name in fields:
            HUNYUAN_VIDEO_TINY_CONFIG.setdefault(name, value)


def _rope_backward():
    """Tests that train a ComfyUI model with oft_core directly (not through the node, which does this itself) need
    the RoPE backward the pack registers when comfy-kitchen has none (ComfyUI >= 0.8; nodes/rope_grad.py). The module
    imports only torch, so it is loaded by path without importing the pack."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_oft_rope_grad", REPO_ROOT / "nodes" / "rope_grad.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.ensure_rope_backward()


# ------------------------------------------------------------------------------------------------ loaders
_CACHE: dict = {}


def _patcher(model):
    comfy = import_comfy()
    mm = comfy.model_management
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def _build(model_config_cls, unet_config, dtype, state_dict=None):
    """Build a ComfyUI BaseModel like comfy.sd.load_diffusion_model_state_dict does; load `state_dict` strictly."""
    import torch

    import_comfy()
    model_config = model_config_cls(unet_config)
    model_config.set_inference_dtype(dtype, None)  # CPU + float32/bf16: no manual cast
    model = model_config.get_model(state_dict or {}, "", device=torch.device("cpu"))
    if state_dict is not None:
        sd = model_config.process_unet_state_dict(dict(state_dict))
        missing, unexpected = model.diffusion_model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise RuntimeError(
                f"{model_config_cls.__name__} with {unet_config}: {len(missing)} missing keys {missing[:5]}, "
                f"{len(unexpected)} unexpected keys {unexpected[:5]}"
            )
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def sd1_clip(seed: int = 3):
    """ComfyUI's SD1 CLIP-L (comfy.sd.CLIP around comfy.sd1_clip.SD1ClipModel, the real architecture) with seeded
    weights (`fill_deterministic`)."""
    import comfy.sd
    import comfy.sd1_clip

    class Target:
        params = {}
        clip = comfy.sd1_clip.SD1ClipModel
        tokenizer = comfy.sd1_clip.SD1Tokenizer

    clip = comfy.sd.CLIP(Target())
    fill_deterministic(clip.patcher.model, seed=seed)
    return clip


def flux_clip_tiny(seed: int = 5):
    """ComfyUI's FLUX CLIP layout (comfy.sd.CLIP around ComfyUI's `FluxClipModel`: `clip_l` and `t5xxl`, each a
    comfy.sd1_clip.SDClipModel holding ComfyUI's own CLIPTextModel / T5 classes, and FLUX's tokenizer) at tiny widths
    (CLIP 64 wide, T5 32 wide, 2 layers each; the real vocabularies, so text encodes), seeded weights."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.text_encoders.flux
    import comfy.text_encoders.t5

    clip_config = {"hidden_act": "quick_gelu", "hidden_size": 64, "intermediate_size": 128, "layer_norm_eps": 1e-05,
                   "max_position_embeddings": 77, "num_attention_heads": 4, "num_hidden_layers": 2,
                   "projection_dim": 64, "vocab_size": 49408, "bos_token_id": 0, "eos_token_id": 49407,
                   "pad_token_id": 1, "model_type": "clip_text_model"}
    t5_config = {"d_ff": 96, "d_kv": 8, "d_model": 32, "num_heads": 4, "num_layers": 2, "vocab_size": 32128,
                 "dense_act_fn": "gelu_pytorch_tanh", "is_gated_act": True, "layer_norm_epsilon": 1e-06,
                 "model_type": "t5", "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128}

    class TinyFluxClip(comfy.text_encoders.flux.FluxClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            torch.nn.Module.__init__(self)
            self.clip_l = comfy.sd1_clip.SDClipModel(
                device=device, dtype=dtype, textmodel_json_config=dict(clip_config), return_projected_pooled=False,
                model_options={**model_options, "model_name": "clip_l"})
            self.t5xxl = comfy.sd1_clip.SDClipModel(
                device=device, dtype=dtype, textmodel_json_config=dict(t5_config),
                model_class=comfy.text_encoders.t5.T5, special_tokens={"end": 1, "pad": 0},
                model_options={**model_options, "model_name": "t5xxl"})
            self.dtypes = {dtype}

    class Target:
        params = {}
        clip = TinyFluxClip
        tokenizer = comfy.text_encoders.flux.FluxTokenizer

    import torch

    clip = comfy.sd.CLIP(Target())
    fill_deterministic(clip.patcher.model, seed=seed)
    with torch.no_grad():  # norms' scales at 1, as trained encoders have them: activations of order 1
        for name, p in clip.patcher.model.named_parameters():
            if "norm" in name and name.endswith(".weight"):
                p.fill_(1.0)
    return clip


def fill_deterministic(module, seed: int, std: float = 0.02):
    """Fill every parameter with fixed pseudo-random values, fast.

    ComfyUI's ops skip weight init (`torch.empty`), so a model built without a state dict holds garbage. Drawing 860 M
    normals for the real SD1.5 takes ~17 s on 2 cores; cycling through one seeded buffer of a prime length is
    memory-bound (~1 s) and still gives every weight a distinct, reproducible, non-degenerate value pattern.
    """
    import torch

    period = 1_048_573  # prime, so the cycle never lines up with a weight's rows
    buf = torch.randn(period, generator=torch.Generator().manual_seed(seed)) * std
    cursor = 0
    with torch.no_grad():
        for p in module.parameters():
            flat = p.data.view(-1)
            pos, n = 0, flat.numel()
            while pos < n:
                take = min(period - cursor, n - pos)
                flat[pos : pos + take].copy_(buf[cursor : cursor + take])
                pos += take
                cursor = (cursor + take) % period


def flux_tiny(dtype=None):
    """The tiny FLUX of kohya/flux_tiny_base.safetensors as a ComfyUI ModelPatcher (CPU; float32 unless `dtype`).

    Loaded through `comfy.supported_models.Flux(FLUX_TINY_CONFIG)` with no missing or unexpected key (checked).
    """
    import safetensors.torch
    import torch

    dtype = dtype or torch.float32
    key = ("flux_tiny", dtype)
    if key not in _CACHE:
        comfy = import_comfy()
        path = FIXTURES / FLUX_TINY_BASE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (fixtures at {FIXTURES}; set OFT_FIXTURES to move them)")
        sd = safetensors.torch.load_file(str(path))
        sd = {k: v.to(dtype) for k, v in sd.items()}
        _CACHE[key] = _patcher(_build(comfy.supported_models.Flux, FLUX_TINY_CONFIG, dtype, sd))
    return _CACHE[key]


def scaled_fp8(sd: dict) -> tuple[dict, dict]:
    """(a "scaled fp8" checkpoint as ComfyUI's own save writes one, an fp32 state dict of the values its layers
    compute with): every Linear weight stored as fp8(W / s) with its `scale_weight` s (the largest |W| at fp8's
    largest value) and `scale_input` (1: read only by fp8 matrix multiplication, which a CPU has not), the
    `scaled_fp8` marker, everything else as it was. ComfyUI 0.3.x makes a scaled layer's parameters in fp8 and
    loads the stored bias into it, so that bias computes as fp8 (unscaled); `scaled_fp8_flux_tiny` gives the values
    of the ComfyUI it loads with."""
    import torch

    fp8 = torch.float8_e4m3fn
    stored, values = {"scaled_fp8": torch.tensor([], dtype=fp8)}, {}
    scaled = {k[: -len("weight")] for k, v in sd.items() if k.endswith(".weight") and v.ndim == 2}
    for k, v in sd.items():
        layer = k[: -len("weight")] if k.endswith(".weight") else None
        if layer in scaled:
            s = (v.float().abs().max() / torch.finfo(fp8).max).reshape(())
            q = (v.float() / s).to(fp8)
            stored[k], stored[layer + "scale_weight"] = q, s
            stored[layer + "scale_input"] = torch.ones((), dtype=torch.float32)
            values[k] = q.float() * s
        elif k.endswith(".bias") and k[: -len("bias")] in scaled:
            stored[k], values[k] = v, v.to(fp8).float()
        else:
            stored[k] = values[k] = v
    return stored, values


def scaled_fp8_flux_tiny(tmp_path: Path, monkeypatch):
    """(the tiny FLUX saved as a scaled fp8 checkpoint and loaded by ComfyUI's own UNETLoader with weight_dtype
    "default", an fp32 state dict of the values its layers compute with). Detection knows only FLUX's real widths,
    so its answer is replaced by the tiny config, reading the quantization as `model_config_from_unet` does: the
    `scaled_fp8` marker (ComfyUI 0.3.x: scaled fp8 ops), or newer ComfyUI's per-layer quantization, into which its
    loader converts scaled fp8 files (QuantizedTensor weights). The stand-in stays for the test's rest (so a
    reference loaded from `values` gets the same tiny config)."""
    import safetensors.torch
    import torch

    import_comfy()
    import comfy.model_detection
    import comfy.supported_models
    import comfy.utils
    import folder_paths

    import nodes

    def detect(sd, prefix, metadata=None):
        config = comfy.supported_models.Flux(dict(FLUX_TINY_CONFIG))
        if hasattr(comfy.utils, "detect_layer_quantization"):  # newer ComfyUI: converted to per-layer quantization
            config.quant_config = comfy.utils.detect_layer_quantization(sd, prefix)
        elif f"{prefix}scaled_fp8" in sd:
            marker = sd.pop(f"{prefix}scaled_fp8")
            config.scaled_fp8 = marker.dtype
            config.optimizations["fp8"] = marker.nelement() != 2
        return config

    monkeypatch.setattr(comfy.model_detection, "model_config_from_unet", detect)
    stored, values = scaled_fp8(safetensors.torch.load_file(str(FIXTURES / FLUX_TINY_BASE)))
    folder = tmp_path / "diffusion_models"
    folder.mkdir()
    safetensors.torch.save_file(stored, str(folder / "flux_tiny_scaled.safetensors"))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusion_models",
                        ([str(folder)], folder_paths.supported_pt_extensions))
    folder_paths.filename_list_cache.clear()
    try:
        with torch.inference_mode():  # as the executor runs the loader
            (model,) = nodes.UNETLoader().load_unet("flux_tiny_scaled.safetensors", "default")
    finally:
        folder_paths.filename_list_cache.clear()
    qkv = model.model.diffusion_model.double_blocks[0].img_attn.qkv
    if getattr(qkv, "layout_type", None) is None:  # ComfyUI 0.3.x: scaled fp8 ops (fp8 weight, scale_weight)
        assert qkv.weight.dtype == torch.float8_e4m3fn and float(qkv.scale_weight) != 1.0, type(qkv)
    else:  # newer: converted to a per-layer quantized (comfy_quant) layer holding a QuantizedTensor
        assert "fp8" in str(qkv.layout_type).lower() and qkv.weight._qdata.dtype == torch.float8_e4m3fn, qkv.weight
        # whose bias is made in the compute dtype: loaded as stored
        values = {k: stored[k] if k.endswith(".bias") else v for k, v in values.items()}
    return model, values


def sd15(dtype=None, seed: int = 0, expected_originals: bool = True):
    """The real SD1.5 UNet architecture (859.5 M parameters) with deterministic pseudo-random weights, as a
    ComfyUI ModelPatcher (CPU; float32 unless `dtype`). Builds in ~2 s; a forward takes ~20 s: do not sample with it.

    With `expected_originals` the 9 modules of kohya/sd15_oft_attn_dim8_bf16_expected.safetensors get their
    `original/<path>.weight` (the base the kohya fixture was merged on), so a merge done in ComfyUI can be compared
    with `merged_m1.0/…` and `merged_m0.5/…` directly.
    """
    import torch

    dtype = dtype or torch.float32
    key = ("sd15", dtype, seed, expected_originals)
    if key not in _CACHE:
        comfy = import_comfy()
        model = _build(comfy.supported_models.SD15, SD15_UNET_CONFIG, dtype)
        fill_deterministic(model.diffusion_model, seed)
        if expected_originals:
            _load_sd15_expected_originals(model)
        _CACHE[key] = _patcher(model)
    return _CACHE[key]


def _load_sd15_expected_originals(model):
    from safetensors import safe_open

    path = FIXTURES / SD15_EXPECTED
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (fixtures at {FIXTURES}; set OFT_FIXTURES to move them)")
    params = dict(model.diffusion_model.named_parameters())
    with safe_open(str(path), "pt") as f:
        modules = json.loads(f.metadata()["modules"])
        for info in modules.values():
            target = params.get(info["ldm_key"])
            if target is None:
                raise KeyError(f"{info['ldm_key']} (from {path.name}) is not a parameter of ComfyUI's SD1.5 UNet")
            original = f.get_tensor(f"original/{info['module_path']}.weight")
            if tuple(original.shape) != tuple(target.shape):
                raise ValueError(f"{info['ldm_key']}: fixture shape {tuple(original.shape)} "
                                 f"!= model {tuple(target.shape)}")
            target.data.copy_(original.to(target.dtype))


def sd15_tiny(dtype=None, seed: int = 0):
    """A tiny SD1.5-family UNet (SD15_TINY_UNET_CONFIG, 1.07 M parameters) with deterministic pseudo-random weights,
    as a ComfyUI ModelPatcher (CPU; float32 unless `dtype`). A 16×16 latent forward takes milliseconds."""
    import torch

    dtype = dtype or torch.float32
    key = ("sd15_tiny", dtype, seed)
    if key not in _CACHE:
        comfy = import_comfy()
        model = _build(comfy.supported_models.SD15, SD15_TINY_UNET_CONFIG, dtype)
        fill_deterministic(model.diffusion_model, seed)
        _CACHE[key] = _patcher(model)
    return _CACHE[key]


def dit_tiny(family: str, state_dict: dict | None = None, dtype=None, seed: int = 0):
    """A tiny SD3 / Wan 2.1 / Qwen-Image / HiDream / Chroma / HunyuanVideo as a ComfyUI ModelPatcher (CPU; float32
    unless `dtype`), through `comfy.supported_models.<Family>` with the configs above. `state_dict`
    (ComfyUI names) is loaded strictly; without one the weights are deterministic pseudo-random (cached per family,
    dtype, seed)."""
    import torch

    dtype = dtype or torch.float32
    comfy = import_comfy()
    cls, config = {"sd3": (comfy.supported_models.SD3, SD3_TINY_CONFIG),
                   "wan": (comfy.supported_models.WAN21_T2V, WAN_TINY_CONFIG),
                   "qwen": (comfy.supported_models.QwenImage, QWEN_TINY_CONFIG),
                   "hidream": (comfy.supported_models.HiDream, HIDREAM_TINY_CONFIG),
                   "chroma": (comfy.supported_models.Chroma, CHROMA_TINY_CONFIG),
                   "hunyuan_video": (comfy.supported_models.HunyuanVideo, HUNYUAN_VIDEO_TINY_CONFIG),
                   "flux2": (getattr(comfy.supported_models, "Flux2", None), FLUX2_TINY_CONFIG),
                   "lumina2": (comfy.supported_models.Lumina2, LUMINA2_TINY_CONFIG),
                   "zimage": (getattr(comfy.supported_models, "ZImage", None), ZIMAGE_TINY_CONFIG)}[family]
    if cls is None:
        raise RuntimeError(f"this ComfyUI ({COMFYUI_ROOT}) has no {family} model class")
    if state_dict is not None:
        return _patcher(_build(cls, config, dtype, state_dict))
    key = ("dit_tiny", family, dtype, seed)
    if key not in _CACHE:
        model = _build(cls, config, dtype)
        fill_deterministic(model.diffusion_model, seed, std=DIT_TINY_STD.get(family, 0.02))
        # persistent buffers are weights too (SD3's pos_embed) and ComfyUI leaves them uninitialised (torch.empty)
        g = torch.Generator().manual_seed(seed + 1)
        state = model.diffusion_model.state_dict()
        with torch.no_grad():
            for name, b in model.diffusion_model.named_buffers():
                if name in state and b.is_floating_point():
                    b.copy_(torch.randn(b.shape, generator=g) * 0.02)
        _CACHE[key] = _patcher(model)
    return _CACHE[key]


# ------------------------------------------------------------------------------------------------ forwards
def flux_inputs(batch: int = 1, size: int = 16, tokens: int = 7, seed: int = 0, dtype=None):
    """Deterministic apply_model kwargs for flux_tiny: latent (B, 4, size, size), sigma, T5-like context (B, tokens,
    64), pooled vector y (B, 32), guidance."""
    import torch

    g = torch.Generator().manual_seed(seed)
    dtype = dtype or torch.float32
    return {
        "x": torch.randn(batch, 4, size, size, generator=g).to(dtype),
        "t": torch.full((batch,), 0.5),
        "c_crossattn": torch.randn(batch, tokens, FLUX_TINY_CONFIG["context_in_dim"], generator=g).to(dtype),
        "y": torch.randn(batch, FLUX_TINY_CONFIG["vec_in_dim"], generator=g).to(dtype),
        "guidance": torch.full((batch,), 3.5),
    }


def sd15_tiny_inputs(batch: int = 1, size: int = 16, tokens: int = 5, seed: int = 0, dtype=None):
    """Deterministic apply_model kwargs for sd15_tiny: latent (B, 4, size, size), sigma, context (B, tokens, 48)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    dtype = dtype or torch.float32
    return {
        "x": torch.randn(batch, 4, size, size, generator=g).to(dtype),
        "t": torch.full((batch,), 1.0),
        "c_crossattn": torch.randn(batch, tokens, SD15_TINY_UNET_CONFIG["context_dim"], generator=g).to(dtype),
    }


def apply_model(patcher, inputs: dict):
    """`BaseModel.apply_model(x, t, **conds)` under no_grad on the patcher's model, as the sampler calls it.

    Weights are whatever is in the module now: call `patcher.patch_model()` first to see patches (and
    `unpatch_model()` after).
    """
    import torch

    kwargs = dict(inputs)
    x, t = kwargs.pop("x"), kwargs.pop("t")
    with torch.no_grad():
        return patcher.model.apply_model(x, t, **kwargs)
