"""Training on families the pack's own tables do not know (SD3.5, Qwen-Image, Wan 2.x, HiDream, Lumina, ...): how the
trained layers are split and named, read from ComfyUI's own LoRA key map (`comfy.lora.model_lora_keys_unet`).

The trainer adapts ComfyUI's modules (`joint_blocks.0.x_block.attn.qkv`); the file must carry the names the family's
LyCORIS users have, so that their tools and ComfyUI load it:

- where ComfyUI maps `lycoris_<name>` for the family (SimpleTuner's LyCORIS files: SD3, Qwen-Image, HiDream, FLUX,
  SD UNets), the layers get those diffusers module names (dotted, from the map's `transformer.<name>` entries), and a
  weight ComfyUI fuses (SD3's q|k|v) is trained as one split per diffusers layer and exported as those layers;
- otherwise (Wan, Lumina 2, HunyuanVideo, ...: ComfyUI's map has no `lycoris_` names) ComfyUI's own module paths
  under `lora_unet_`, which is what kohya-style LyCORIS trainers for those families (musubi-tuner's `lycoris.kohya`)
  write and what ComfyUI maps for every model.

sd-scripts has OFT networks for SD1.x/SD2.x/SDXL (`networks.oft`) and FLUX.1 (`networks.oft_flux`) only: for these
families the adapter is LyCORIS diag-oft and a kohya save is refused with that reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .patch import UNET_PREFIX, comfy_key_map, model_kind

LYCORIS_FORMAT = "lycoris_diag_oft"


@dataclass
class FamilyLayout:
    prefix: str  # "lycoris_" (diffusers names) or "lora_unet_" (ComfyUI's module paths)
    names: dict[str, str | tuple[str, ...]] = field(default_factory=dict)  # trained path -> name(s), one per split
    splits: dict[str, tuple[int, ...]] = field(default_factory=dict)  # trained path -> split widths (fused weights)
    left_out: list[str] = field(default_factory=list)  # selected paths with no name in the family's convention

    def keep(self, targets):
        return [(p, m) for p, m in targets if p in self.names]


def _diffusers_names(model) -> dict[str, list[tuple[tuple | None, str]]]:
    """ComfyUI weight key -> [(row slice or None, dotted diffusers name)] for the names ComfyUI also maps as
    `lycoris_<name with _>` (no entry with a transform: those weights are permuted, not sliced)."""
    key_map = comfy_key_map(model)
    lycoris = {k[len("lycoris_"):] for k in key_map if k.startswith("lycoris_")}
    out: dict[str, list] = {}
    for k, v in key_map.items():
        if not k.startswith("transformer.") or k[len("transformer."):].replace(".", "_") not in lycoris:
            continue
        if isinstance(v, str):
            key, offset = v, None
        else:
            if len(v) > 2 and v[2] is not None:
                continue
            key, offset = v[0], None if v[1] is None else tuple(v[1])
        out.setdefault(key, []).append((offset, k[len("transformer."):]))
    return out


def layout(model, targets) -> FamilyLayout:
    """Names and splits of `targets` [(path under diffusion_model, module)] in the family's LyCORIS convention."""
    named = _diffusers_names(model)
    if not named:
        return FamilyLayout("lora_unet_", names={p: p for p, _ in targets})
    out = FamilyLayout("lycoris_")
    for path, module in targets:
        entries = named.get(f"{UNET_PREFIX}{path}.weight", [])
        rows = int(module.weight.shape[0])
        whole = sorted(n for off, n in entries if off is None)
        parts = sorted((off[1], off[2], n) for off, n in entries if off is not None and off[0] == 0)
        if whole:
            out.names[path] = whole[0]
        elif parts and _tiles(parts, rows):
            out.names[path] = tuple(n for _, _, n in parts)
            out.splits[path] = tuple(length for _, length, _ in parts)
        else:
            out.left_out.append(path)
    return out


def _tiles(parts, rows: int) -> bool:
    """Whether sorted (start, length, name) slices cover rows 0..rows exactly, once each."""
    pos = 0
    for start, length, _ in parts:
        if start != pos:
            return False
        pos += length
    return pos == rows


def kohya_refusal(model) -> str:
    return (f"sd-scripts has no OFT network for {model_kind(model)} models (networks.oft: SD1.x / SD2.x / SDXL, "
            "networks.oft_flux: FLUX.1); save it as lycoris")


def export(model, trainer, meta: dict):
    """The trained adapter with the family's LyCORIS names (`layout`), kohya refused."""
    lay = layout(model, [(tl.path, tl.module) for tl in trainer.layers])
    adapter = trainer.to_adapter(meta, names=lay.names, prefix=lay.prefix, fmt=LYCORIS_FORMAT)
    return replace(adapter, refused_formats={"kohya": kohya_refusal(model)})
