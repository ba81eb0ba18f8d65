"""Reference side of the family tests (tests/test_tools_families.py): runs INSIDE the `dit` tool venv
(scripts/tools_venv.sh: diffusers, lycoris-lora, peft), never in the main venv, never imports the pack.

    python tools_dit_reference.py make OUT_ROOT FAMILY:TOOL [FAMILY:TOOL ...]

make — FAMILY: sd3 | wan | qwen | hidream (a tiny diffusers transformer of that family, from the small config below);
TOOL: lycoris (diag-oft through LyCORIS' own wrapper, the modules SimpleTuner's LyCORIS presets target: attention and
feed-forward modules) | boft (LyCORIS BOFT, same modules) | peft (OFT through `get_peft_model`, every Linear inside
the transformer blocks). Writes into OUT_ROOT/FAMILY_TOOL: base.safetensors (the model's state dict, diffusers names),
the adapter as the tool saves it (adapter.safetensors via LyCORIS' `save_weights`; peft/ via `save_pretrained`),
merged.safetensors (the state dict after the TOOL's OWN merge: LyCORIS `merge_to(1.0)`, PEFT `merge_and_unload()`),
and info.json (versions, the adapted modules). The adapter's parameters are drawn at random (seeded): a freshly
initialised OFT is the identity and would prove nothing. One process for all pairs (importing diffusers is slow).

Files the pack writes are loaded by the tools through tests/tool_runner.py (the lycoris / peft venvs); this script
only makes what needs diffusers' model classes.
"""

from __future__ import annotations

import json
import os
import sys

import torch


def tiny_model(family: str):
    import diffusers

    if family == "sd3":
        # SD3.5-style MMDiT: hidden = 64 x heads as ComfyUI's detection assumes (depth = hidden // 64), RMS q/k norm.
        return diffusers.SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=64,
            num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=128, pooled_projection_dim=32,
            pos_embed_max_size=8, qk_norm="rms_norm",
        )
    if family == "wan":
        # Wan 2.1 T2V: ComfyUI's detection takes num_heads = dim // 128.
        return diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=1, attention_head_dim=128, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=256, ffn_dim=256, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=32,
        )
    if family == "qwen":
        return diffusers.QwenImageTransformer2DModel(
            patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=32, num_attention_heads=2,
            joint_attention_dim=48, guidance_embeds=False, axes_dims_rope=(8, 12, 12),
        )
    if family == "hidream":
        # HiDream-I1 (double / single stream blocks, MoE feed-forward): ComfyUI's module names are diffusers' own
        return diffusers.HiDreamImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=32,
            num_attention_heads=2, caption_channels=[32, 48], text_emb_dim=24, num_routed_experts=2,
            num_activated_experts=1, axes_dims_rope=(8, 12, 12), max_resolution=(16, 16), llama_layers=[0, 0],
        )
    raise SystemExit(f"unknown family {family!r} (sd3 | wan | qwen | hidream)")


def fill(module, seed: int, std: float = 0.05) -> None:
    """Every parameter and persistent buffer random (diffusers zero-initialises some layers, e.g. output projections;
    a zero weight stays zero under any rotation and would hide a wrong one)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def block_linears(model) -> list[str]:
    """Every nn.Linear inside the transformer blocks (the elements of the ModuleLists directly under the model)."""
    lists = {n for n, m in model.named_children() if isinstance(m, torch.nn.ModuleList)}
    out = []
    for name, m in model.named_modules():
        head = name.split(".", 2)
        if isinstance(m, torch.nn.Linear) and len(head) == 3 and head[0] in lists:
            out.append(name)
    return out


def make(out_dir: str, family: str, tool: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    from importlib.metadata import version

    from safetensors.torch import save_file

    model = tiny_model(family).to(torch.float32).eval()
    fill(model, seed={"sd3": 3, "wan": 21, "qwen": 7, "hidream": 11}[family])
    base = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(base, os.path.join(out_dir, "base.safetensors"))
    info = {"family": family, "tool": tool, "model_class": type(model).__name__,
            "versions": {p: version(p) for p in ("torch", "diffusers", "lycoris-lora", "peft")}}

    g = torch.Generator().manual_seed(1234)
    if tool in ("lycoris", "boft"):
        from lycoris import LycorisNetwork, create_lycoris

        # SimpleTuner's LyCORIS presets target the attention and feed-forward modules by class; Wan's attention class
        # is WanAttention, the others' Attention.
        targets = sorted({type(m).__name__ for m in model.modules()
                          if type(m).__name__.endswith("Attention") or "FeedForward" in type(m).__name__})
        LycorisNetwork.apply_preset({"target_module": targets, "lora_prefix": "lycoris"})
        algo = "diag-oft" if tool == "lycoris" else "boft"
        net = create_lycoris(model, 1.0, linear_dim=16 if tool == "lycoris" else 8, linear_alpha=1.0, algo=algo)
        net.apply_to()
        with torch.no_grad():
            for name, p in net.named_parameters():
                if name.endswith("oft_blocks"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        net.save_weights(os.path.join(out_dir, "adapter.safetensors"), torch.float32, {})
        info["adapted"] = sorted(lora.lora_name for lora in net.loras)
        info["targets"] = targets
        net.merge_to(1.0)
        net.restore()  # the modules' forward back to the originals; the merged weights stay
    elif tool == "peft":
        from peft import OFTConfig, get_peft_model

        targets = block_linears(model)
        config = OFTConfig(r=0, oft_block_size=16, target_modules=targets, init_weights=False, module_dropout=0.0)
        pm = get_peft_model(model, config)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "oft_R" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        pm.save_pretrained(os.path.join(out_dir, "peft"))
        info["adapted"] = targets
        model = pm.merge_and_unload()
    else:
        raise SystemExit(f"unknown tool {tool!r} (lycoris | boft | peft)")

    merged = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if set(merged) != set(base):
        raise SystemExit(f"merged state dict keys differ from the base's: {sorted(set(merged) ^ set(base))[:5]}")
    save_file(merged, os.path.join(out_dir, "merged.safetensors"))
    info["changed"] = sorted(k for k in base if not torch.equal(base[k], merged[k]))
    with open(os.path.join(out_dir, "info.json"), "w") as f:
        json.dump(info, f, indent=1)


def main() -> None:
    cmd = sys.argv[1]
    if cmd == "make":
        root = sys.argv[2]
        for pair in sys.argv[3:]:
            family, tool = pair.split(":")
            torch.manual_seed(0)
            make(os.path.join(root, f"{family}_{tool}"), family, tool)
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
