"""PEFT OFT: the current packed format (≥ 0.16) and the two legacy formats: reading; writing the current one.

Current (`<prefix><module path>.oft_R.weight`, (blocks, b(b−1)/2)): the strictly upper triangle of each block in
`torch.triu_indices(b, b, 1)` order, Q = U − Uᵀ; input features rotated, W' = W·blockdiag(R)ᵀ. `adapter_config.json`
says which parameterization was trained — exact Cayley R = (I − Q)(I + Q)⁻¹, or Cayley–Neumann
R = I + 2Q + 2Q² + … — and the two give inverse rotations for the same numbers, so the config is required. The series'
last coefficient changed in PEFT 0.18 (the first version to write `peft_version`): without `peft_version` the 0.16–0.17
series is used. COFT (`coft`, `eps`) projects each block to ‖Q_i‖_F ≤ eps/√blocks; `block_share` stores one block.

Legacy ≤ 0.13 (`.oft_r` (r, b, b) only): output features rotated, W' = Rᵀ·W with R = (I − S)(I + S)⁻¹,
S = ½(A − Aᵀ). Legacy 0.14–0.15 (`.oft_r` + `.oft_s` (out, 1)): input features rotated, W' = (W·Rᵀ) ⊙ s. Current PEFT
refuses the first and silently loads the second as identity; both are read here as those versions computed them.

PEFT BOFT (`<prefix><module path>.boft_R` (factors, blocks, b, b) + `.boft_s`, `peft_type` BOFT): with one butterfly
factor (PEFT's default, and what PEFT trains wherever its CUDA extension does not build: it then sets the factor to 1
itself) it is the 0.14–0.15 layer exactly — S = ½(A − Aᵀ), R = (I − S)(I + S)⁻¹, W' = (W·Rᵀ) ⊙ s, a Conv2d's
(in · kh · kw) axis rotated and s of shape (1, out) — and is read as that; with more, W' = (W·Mᵀ) ⊙ s with
M = Π_f P_f·blockdiag(R_f)·P_fᵀ (factor 0 applied first, P_f PEFT's block butterfly permutation), read as butterfly
stages (`OFTLayer.butterfly` "peft").

Trained biases: PEFT's `bias` "oft_only" / "boft_only" saves each adapted module's trained bias as
`<module>.base_layer.bias`; PEFT's merge keeps it in place of the base bias, and so does the pack
(`OFTLayer.bias`, `rotation.adapted_bias`: at strength s, b + s·(trained − b)). Refused by name: the biases of
modules without an adapter (`bias` "all") and whole modules (`modules_to_save`), which the pack does not apply.

OneTrainer's "OFT v2" (since 2025-11) saves PEFT's packed layer without a config (format id "peft_onetrainer"); its
code fixes what the config would say: the Cayley–Neumann series of 5 terms with the last halved, a shared block as one
row, Scaled OFT marked per layer by `oft_R.scaled_oft` (generators divided by 2·√(b − 1)); its first revisions
(2025-11-14 to 16, told by `ot_revision`) did not halve the last term, and a Constrained OFT (COFT, until 2026-05)
projects a Linear's stored numbers as PEFT's COFT does (its convolution path never projected), told only by the
training settings (`ot_config`). It rotates a Linear's input as PEFT does (W·Rᵀ) but a Conv2d's weight as W·R
(`OFTLayer.conv_transposed`, settled against the weight). Its files are told from a PEFT file without its config by
OneTrainer's header (`ot_branch` / `ot_revision`) or, without it, by names no PEFT file has (`lora_unet_`,
`lora_transformer_`, `lora_te*`, `diffusion_model.`, `text_encoders.`).

Writing (a PEFT ≥ 0.16 adapter directory, `_PEFT_VERSION`'s layout): input-side diagonal-block UNet layers, one block
size per layer (equal-size splits concatenated); parameterization, block_share and COFT eps are global in the config
(a COFT that differs between layers, or that concatenated splits would change, is applied to Q and written off).
Refused: output-side rotation (W·M ≠ M·W), text-encoder layers, BOFT, stored R, per-row scales (`oft_s`), splits of
different block sizes, and underscored names unless the base model's module names are given (`module_names`: the
"." → "_" substitution cannot be reversed by string rules).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, NamedTuple

import torch

from ..errors import OFTError
from ..safetensors_io import _Header, _parse_json
from ..spec import Constraint, OFTAdapter, OFTLayer, _neumann_coefficients, _norm_overflow_text, make_layer
from . import _write as w
from ._keys import group_by_layer
from ._triangle import block_size_of, pack_upper, unpack_upper

_CONFIG_NAME = "adapter_config.json"
_MODEL_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."  # what the writer puts before each module path
_PEFT_VERSION = "0.21.2"  # the PEFT whose file layout we write (packed oft_R, Neumann series with halved last term)
_KEY = re.compile(r"^(.+?)\.(oft_R\.weight|oft_R\.scaled_oft|oft_r|oft_s|boft_R|boft_s|base_layer\.bias)$")
# Outer prefixes PEFT / diffusers put before the module path, and the model part they name.
_PREFIXES = (
    ("base_model.model.text_encoder_2.", "te2"),
    ("base_model.model.text_encoder.", "te"),
    ("base_model.model.unet.", "unet"),
    ("base_model.model.transformer.", "unet"),
    ("base_model.model.", "unet"),
    ("text_encoder_2.", "te2"),
    ("text_encoder.", "te"),
    ("unet.", "unet"),
    ("transformer.", "unet"),
)


def claims(header: _Header, config) -> bool:
    return any(k.endswith((".oft_R.weight", ".oft_r", ".boft_R")) for k in header.tensors)


def find_config(path: str) -> tuple[str, dict | None]:
    """(adapter file, parsed adapter_config.json or None) for a PEFT directory or a file beside its config."""
    if os.path.isdir(path):
        model = os.path.join(path, _MODEL_NAME)
        if not os.path.exists(model):
            for name in ("adapter_model.bin", "adapter_model.pt"):
                if os.path.exists(os.path.join(path, name)):
                    from ..safetensors_io import _refuse_pickle

                    _refuse_pickle(os.path.join(path, name))
            raise OFTError(f"a directory without {_MODEL_NAME}: expected a PEFT adapter directory", path=path)
    else:
        model = path
    cfg_path = os.path.join(os.path.dirname(os.path.abspath(model)), _CONFIG_NAME)
    if not os.path.exists(cfg_path):
        return model, None
    try:
        with open(cfg_path, "rb") as f:
            raw = f.read(_MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise OFTError(f"cannot read {_CONFIG_NAME} ({e.strerror or e})", path=cfg_path) from None
    if len(raw) > _MAX_CONFIG_BYTES:
        raise OFTError(f"{_CONFIG_NAME} is larger than {_MAX_CONFIG_BYTES // 2**20} MiB: not a PEFT config",
                       path=cfg_path)
    config = _parse_json(raw, _CONFIG_NAME, cfg_path)
    if not isinstance(config, dict):
        raise OFTError(f"{_CONFIG_NAME} must hold a JSON object, found JSON {type(config).__name__}", path=cfg_path)
    return model, config


# OneTrainer "OFT v2" (its modules/module/oft_utils.py, since 2025-11): always the Cayley–Neumann series of 5 terms
# with the last halved (R = I + 2Q + 2Q² + 2Q³ + Q⁴), one row of generators when it shares a block; its output
# formats name layers kohya-style (KOHYA, LEGACY), ComfyUI-style (COMFY), diffusers-style or natively (ORIGINAL).
_ONETRAINER_SERIES = (1.0, 2.0, 2.0, 2.0, 1.0)
# its first four revisions (1336b9b to 86ae381, 2025-11-14 to 16; b46986d halved the last term) summed
# I + 2Q + 2Q² + 2Q³ + 2Q⁴; a file names the revision that saved it (`ot_revision`, git's short hash)
_ONETRAINER_FIRST_SERIES = (1.0, 2.0, 2.0, 2.0, 2.0)
_ONETRAINER_FIRST_REVISIONS = (
    "1336b9b894dac621647c49118e58a4009fe3ecef", "607470f7e1eb4ab72720d1f9cd4225e9834937d7",
    "75ee0917cdcb88ead6402982c166a999eecf8721", "86ae381184dbffa5a261fc2427b1a439480aa9b8",
)
# Until e928dda (2026-05-10) OneTrainer could train Constrained OFT: its rotation module's forward first projects each
# stored block's skew matrix to ‖Q_i‖_F ≤ coft_eps/√blocks (PEFT's COFT), so what it computes from a saved file is the
# projection of the stored numbers, for a Linear (its Conv2d path builds R without that forward: no projection). Only
# the training settings say so (`ot_config`, JSON, written when the user chose to include them: `oft_coft`,
# `coft_eps`, default 1e-4); without them the stored numbers are used as they are.
_ONETRAINER_COFT_EPS = 1e-4
_ONETRAINER_OWN = (
    ("lora_unet_", "unet"), ("lora_transformer_", "unet"), ("lora_te1_", "te1"), ("lora_te2_", "te2"),
    ("lora_te_", "te"), ("diffusion_model.", "unet"),
    # its COMFY output's text-encoder names (`text_encoders.<ComfyUI's encoder name>.transformer.` + the HF path):
    # CLIP-L / CLIP-G by their HF path, the others (T5, Llama, Qwen, ...) by the path in ComfyUI's CLIP state dict
    ("text_encoders.clip_l.transformer.", "te1"), ("text_encoders.clip_g.transformer.", "te2"),
    ("text_encoders.", "te"),
    # its KOHYA / DIFFUSERS names of a third and fourth encoder (SD3's and HiDream's T5, HiDream's Llama): never a
    # CLIP, found by their HF path among the CLIP state dict's other encoders
    ("lora_te3_", "te"), ("lora_te4_", "te"), ("text_encoder_3.", "te"), ("text_encoder_4.", "te"),
)
_ONETRAINER_PREFIXES = _ONETRAINER_OWN + _PREFIXES
# the name prefixes of OneTrainer's outputs that no PEFT file has (every text encoder, not only those read above)
_ONETRAINER_NAMES = ("lora_unet_", "lora_transformer_", "lora_te", "diffusion_model.", "text_encoders.")

_MAX_CONFIG_BYTES = 16 * 2**20
_MAX_NEUMANN_TERMS = 64  # PEFT's default is 5; each term is a matmul per block, and 1e5 terms ran for minutes


def _config_value(cfg: dict, name: str, default, kind: str, cfg_path: str, declared: str | None = None,
                  label: str = _CONFIG_NAME, remedy: str = ""):
    """`cfg[name]` checked against what PEFT's OFTConfig declares for it (`kind`), or `default` when absent.
    Refused with the field, the value and what PEFT accepts (`declared`: what another tool's config declares,
    `label` naming that config, `remedy` what to do, appended)."""
    if name not in cfg:
        return default
    v = cfg[name]
    ok = {
        "bool": lambda: type(v) is bool,
        "count": lambda: type(v) is int and v >= 0,
        "terms": lambda: type(v) is int and 1 <= v <= _MAX_NEUMANN_TERMS,
        # (an int beyond float's range would make isfinite raise: ot_config is parsed with Python's own ints)
        "eps": lambda: (type(v) is float and math.isfinite(v) or type(v) is int and v < 2**1000) and v >= 0,
        "text": lambda: isinstance(v, str),
    }[kind]()
    if not ok:
        want = {
            "bool": "true or false (PEFT: bool)",
            "count": "an integer ≥ 0 (PEFT: int)",
            "terms": f"an integer from 1 to {_MAX_NEUMANN_TERMS} (PEFT: int, default 5)",
            "eps": "a finite number ≥ 0 (PEFT: float, default 6e-05)",
            "text": "text",
        }[kind]
        if declared is not None:
            want = f"{want.partition(' (')[0]} ({declared})"
        shown = json.dumps(v)
        raise OFTError(f"{label}: {name}: expected {want}, found "
                       f"{shown if len(shown) <= 40 else shown[:30] + '…'}{remedy}", path=cfg_path)
    return v


def _check_layout(cfg: dict, stored: int, b: int, block_share: bool, cfg_path: str, layer: str) -> None:
    """The config's r / oft_block_size against one layer's tensors (stored blocks × block size). PEFT derives the
    other from the layer width (r = width / oft_block_size) and only changes the given one when it does not divide
    the width; so where it divides, the tensors must show exactly it. Never silently pick one of two sources."""
    if block_share:
        return  # one stored block: the width, hence the count, comes from the base weight
    width = stored * b
    r = cfg.get("r") or 0
    size = cfg.get("oft_block_size") or 0
    if size and width % size == 0 and b != size:
        raise OFTError(f"{_CONFIG_NAME} says oft_block_size {size}, but layer {layer!r} holds {stored} blocks of {b} "
                       f"(width {width}, which {size} divides): the config and the tensors disagree", path=cfg_path)
    if r and not size and width % r == 0 and width >= r and stored != r:
        raise OFTError(f"{_CONFIG_NAME} says r {r} (blocks per layer), but layer {layer!r} holds {stored} blocks of "
                       f"{b}: the config and the tensors disagree", path=cfg_path)


def _split_name(key: str, prefixes=_PREFIXES) -> tuple[str, str]:
    for prefix, component in prefixes:
        if key.startswith(prefix):
            component, name = component, key[len(prefix):]
            break
    else:
        component, name = "unet", key
    # a PEFT adapter of a CLIPTextModel on its own (diffusers' DreamBooth scripts save the text encoder's adapter
    # apart from the UNet's: `base_model.model.text_model.…`): no UNet or DiT has a `text_model`
    if component == "unet" and name.startswith("text_model."):
        return "te", name
    return component, name


def _version_tuple(v: str) -> tuple[int, ...]:
    nums = re.findall(r"\d+", v.partition("@")[0])[:3]
    return tuple(int(x) for x in nums)


def _project_legacy(a: torch.Tensor, eps: float) -> torch.Tensor:
    """PEFT ≤ 0.15 COFT: projects the raw stored blocks A (not Q) per block, radius eps/√blocks."""
    bound = eps / math.sqrt(a.shape[0])
    norms = torch.linalg.matrix_norm(a, keepdim=True)
    return torch.where(norms <= bound, a, a * (bound / norms))


class _Settings(NamedTuple):
    """What the whole file shares, from its config and its keys."""

    path: str
    cfg: dict
    cfg_path: str
    has_config: bool
    block_share: bool
    coft: bool
    eps: float
    neumann: bool
    coeffs: tuple[float, ...]
    fmt: str  # "peft", "peft_onetrainer", "peft_legacy_0.15" or "peft_legacy_0.13"


def _config_settings(config: dict | None, path: str) -> tuple[dict, str, bool, bool, float]:
    """(cfg, its path, block_share, coft, eps): every config field PEFT's OFTConfig types, checked (fail_closed
    tests pin each field's message)."""
    cfg = config or {}
    cfg_path = os.path.join(os.path.dirname(os.path.abspath(path)), _CONFIG_NAME)
    if config is not None and str(cfg.get("peft_type", "OFT")).upper() not in ("OFT",):
        raise OFTError(f"{_CONFIG_NAME} says peft_type {cfg.get('peft_type')!r}, expected 'OFT' (the file holds "
                       "OFT keys: .oft_R.weight / .oft_r)", path=path)
    block_share = _config_value(cfg, "block_share", False, "bool", cfg_path)
    coft = _config_value(cfg, "coft", False, "bool", cfg_path)
    eps = float(_config_value(cfg, "eps", 6e-5, "eps", cfg_path))
    for name in ("r", "oft_block_size"):
        _config_value(cfg, name, 0, "count", cfg_path)
    _config_value(cfg, "peft_version", None, "text", cfg_path)
    return cfg, cfg_path, block_share, coft, eps


def _onetrainer(header: _Header, modules: dict) -> bool:
    """Whether a packed file without a config was written by OneTrainer ("OFT v2") rather than PEFT: OneTrainer
    stamps `ot_branch` / `ot_revision` into every file it saves, and names layers kohya-style (`lora_unet_…`) or
    ComfyUI-style (`diffusion_model.…`), never under PEFT's `base_model.model.`."""
    if any(k in header.metadata for k in ("ot_branch", "ot_revision")):
        return bool(modules)
    return bool(modules) and all(k.startswith(_ONETRAINER_NAMES) for k in modules)


def _onetrainer_settings(header: _Header) -> tuple[tuple[float, ...], float | None]:
    """(series coefficients, COFT eps or None) of a OneTrainer file, from the revision that saved it and the
    training settings it carries (`ot_config`); the settings checked where they change the rotation."""
    rev = header.metadata.get("ot_revision")
    first = (isinstance(rev, str) and len(rev) >= 7 and re.fullmatch(r"[0-9a-fA-F]+", rev) is not None
             and any(full.startswith(rev.lower()) for full in _ONETRAINER_FIRST_REVISIONS))
    series = _ONETRAINER_FIRST_SERIES if first else _ONETRAINER_SERIES
    raw = header.metadata.get("ot_config")
    if raw is None:
        return series, None
    what = "its ot_config (OneTrainer's training settings, which say whether Constrained OFT was trained)"
    remedy = ("; save the adapter again from OneTrainer, or, if that run did not use Constrained OFT, remove the "
              "file's ot_config entry")
    try:  # OneTrainer writes it with Python's json.dumps: NaN / Infinity may stand in fields this never reads
        cfg = json.loads(raw, parse_constant=float) if isinstance(raw, str) else None
    except RecursionError:
        raise OFTError(f"{what} is nested too deeply to be read{remedy}", path=header.path) from None
    except ValueError as e:
        raise OFTError(f"{what} is not valid JSON ({e}){remedy}", path=header.path) from None
    if not isinstance(cfg, dict):
        raise OFTError(f"{what}: expected a JSON object, found {type(cfg).__name__}{remedy}", path=header.path)
    coft = _config_value(cfg, "oft_coft", False, "bool", header.path, "OneTrainer: bool, default false", "ot_config",
                         remedy)
    if not coft:
        return series, None
    eps = _config_value(cfg, "coft_eps", _ONETRAINER_COFT_EPS, "eps", header.path,
                        "OneTrainer: float, default 0.0001", "ot_config", remedy)
    return series, float(eps)


def _series(cfg: dict, config: dict | None, packed: bool, modules: dict, path: str,
            cfg_path: str) -> tuple[bool, tuple[float, ...], str]:
    """(use_cayley_neumann, series coefficients, format id). A packed file needs its config: exact Cayley and
    Cayley–Neumann give inverse rotations for the same numbers; the series changed in PEFT 0.18."""
    if not packed:
        fmt = "peft_legacy_0.15" if any("oft_s" in p for p in modules.values()) else "peft_legacy_0.13"
        return False, (), fmt
    if config is None:
        raise OFTError(
            f"a PEFT OFT file needs its {_CONFIG_NAME} beside it: exact Cayley and Cayley–Neumann give inverse "
            "rotations for the same numbers, and only the config says which was trained",
            path=path,
        )
    neumann = _config_value(cfg, "use_cayley_neumann", True, "bool", cfg_path)  # PEFT ≥ 0.16 default
    terms = _config_value(cfg, "num_cayley_neumann_terms", 5, "terms", cfg_path)
    version = cfg.get("peft_version")
    new_series = version is not None and _version_tuple(str(version)) >= (0, 18)
    coeffs = _neumann_coefficients(terms, last_term_halved=new_series) if neumann else ()
    return neumann, coeffs, "peft"


def _packed_layer(key: str, parts: dict, st: _Settings) -> OFTLayer:
    """One `.oft_R.weight` layer: (blocks, b(b−1)/2) unpacked to Q = U − Uᵀ, checked against the config's layout.
    OneTrainer's (`st.fmt` "peft_onetrainer"): its names, its Scaled-OFT marker, its convolution convention."""
    onetrainer = st.fmt == "peft_onetrainer"
    component, name = _split_name(key, _ONETRAINER_PREFIXES if onetrainer else _PREFIXES)
    vec = parts.get("oft_R.weight")
    if vec is None:
        raise OFTError(f"has {sorted(parts)} but no .oft_R.weight", path=st.path, layer=key)
    if vec.ndim != 2:
        raise OFTError(f".oft_R.weight: expected (blocks, b(b−1)/2), found {tuple(vec.shape)}", path=st.path,
                       layer=key)
    b = block_size_of(int(vec.shape[1]))
    if b is None:
        raise OFTError(f".oft_R.weight: {vec.shape[1]} values per block is not b(b−1)/2 for any block "
                       "size b ≥ 2", path=st.path, layer=key)
    shared = st.block_share and vec.shape[0] == 1
    _check_layout(st.cfg, int(vec.shape[0]), b, shared, st.cfg_path, key)
    u = unpack_upper(vec.to(torch.float32), b)
    q = u - u.transpose(1, 2)
    scaled = onetrainer and _scaled_oft(parts.get("oft_R.scaled_oft"), st.path, key)
    eps = st.eps
    if scaled:  # OneTrainer's Scaled OFT: the generator divided by 2·√(b − 1) before the series
        q = q / (2.0 * math.sqrt(b - 1))
        eps = eps / (2.0 * math.sqrt(b - 1))  # a projection of the stored numbers, so of q at this radius
    return make_layer(
        path=st.path, name=name, component=component, side="in", blocks=[q],
        transpose=st.neumann,  # the series approximates Cayley(Q), the transpose of PEFT's exact branch
        parameterization="neumann" if st.neumann else "cayley", neumann_coeffs=st.coeffs,
        constraint=Constraint("block_projection", eps) if st.coft else Constraint(),
        source=st.fmt + ("_scaled" if scaled else ""), key=key, block_share=shared,
        # OneTrainer rotates a Linear's input (W·Rᵀ, as PEFT) but a convolution's weight as W·R
        conv_transposed=onetrainer, bias=parts.get("base_layer.bias"),
    )


def _scaled_oft(marker: torch.Tensor | None, path: str, key: str) -> bool:
    """Whether OneTrainer's `oft_R.scaled_oft` marker (a one-element True) says the layer is Scaled OFT."""
    if marker is None:
        return False
    if marker.numel() != 1 or not bool(torch.isfinite(marker.double()).all()) or float(marker) not in (0.0, 1.0):
        shown = tuple(marker.shape) if marker.numel() != 1 else float(marker)
        raise OFTError(f".oft_R.scaled_oft: expected OneTrainer's one-element marker (True), found {shown}",
                       path=path, layer=key)
    return bool(float(marker))


def _legacy_layer(key: str, parts: dict, st: _Settings) -> OFTLayer:
    """One `.oft_r` (+ `.oft_s`) layer of PEFT ≤ 0.15: Q = ½(A − Aᵀ) after the legacy COFT projection of A."""
    component, name = _split_name(key)
    a = parts.get("oft_r")
    if a is None:
        raise OFTError(f"has {sorted(parts)} but no .oft_r", path=st.path, layer=key)
    if a.ndim != 3 or a.shape[1] != a.shape[2]:
        raise OFTError(f".oft_r: expected (r, b, b), found {tuple(a.shape)}", path=st.path, layer=key)
    shared = st.block_share and a.shape[0] == 1
    if st.has_config:
        _check_layout(st.cfg, int(a.shape[0]), int(a.shape[-1]), shared, st.cfg_path, key)
    a = a.to(torch.float32)
    if st.coft:
        if bool(torch.isfinite(a).all()) and not bool(torch.isfinite(torch.linalg.matrix_norm(a)).all()):
            raise OFTError(_norm_overflow_text("a block's ‖A_i‖_F", a, Constraint("block_projection", st.eps)),
                           path=st.path, layer=key)
        a = _project_legacy(a, st.eps)
    s = parts.get("oft_s")
    if st.fmt == "peft_legacy_0.15" and s is None:
        raise OFTError("has .oft_r but no .oft_s while other layers have both", path=st.path, layer=key)
    return make_layer(
        path=st.path, name=name, component=component, side="in" if st.fmt == "peft_legacy_0.15" else "out",
        blocks=[0.5 * (a - a.transpose(1, 2))], transpose=False, row_scale=s, source=st.fmt, key=key,
        block_share=shared, bias=parts.get("base_layer.bias"),
    )


def _boft_layer(key: str, parts: dict, st: _Settings) -> OFTLayer:
    """One PEFT BOFT layer: `.boft_R` (factors, blocks, b, b) and `.boft_s`; of one factor read as the 0.14–0.15
    layer it equals (S = ½(A − Aᵀ), input side, the row scale), of several as PEFT's butterfly stages."""
    component, name = _split_name(key)
    a, s = parts.get("boft_R"), parts.get("boft_s")
    if a is None:
        raise OFTError(f"has {sorted(parts)} but no .boft_R", path=st.path, layer=key)
    if a.ndim != 4 or a.shape[-1] != a.shape[-2]:
        raise OFTError(f".boft_R: expected (butterfly factors, blocks, b, b), found {tuple(a.shape)}", path=st.path,
                       layer=key)
    size, num = st.cfg.get("boft_block_size") or 0, st.cfg.get("boft_block_num") or 0
    for field, want, found in (("boft_block_size", size, a.shape[-1]), ("boft_block_num", num, a.shape[1])):
        if want and want != found:
            raise OFTError(f"{_CONFIG_NAME} says {field} {want}, but layer {key!r} holds {a.shape[1]} blocks of "
                           f"{a.shape[-1]}: the config and the tensors disagree", path=st.cfg_path)
    if s is None:
        raise OFTError("has .boft_R but no .boft_s (PEFT saves both)", path=st.path, layer=key)
    if s.ndim != 2 or 1 not in s.shape:
        raise OFTError(f".boft_s: expected (out, 1) (a Linear) or (1, out) (a Conv2d), found {tuple(s.shape)}",
                       path=st.path, layer=key)
    a = a.to(torch.float32)
    skew = 0.5 * (a - a.transpose(-1, -2))
    if a.shape[0] == 1:
        return make_layer(path=st.path, name=name, component=component, side="in", blocks=[skew[0]],
                          transpose=False, row_scale=s.reshape(-1), source=st.fmt, key=key,
                          bias=parts.get("base_layer.bias"))
    # several factors: W' = W·Mᵀ_peft ⊙ s, M_peft = Π_f P_f B_f P_fᵀ (factor 0 applied first); as W·M with M the
    # factors' transposes in reverse order, each Bᵀ = the pack's Cayley of S (`spec.OFTLayer.butterfly`)
    return make_layer(path=st.path, name=name, component=component, side="in", kind="butterfly",
                      blocks=[skew.flip(0)], transpose=False, row_scale=s.reshape(-1), source=st.fmt, key=key,
                      butterfly="peft", bias=parts.get("base_layer.bias"))


def _boft_settings(config: dict | None, path: str) -> _Settings:
    """A BOFT file's settings: the tensors say everything the math needs (PEFT's BOFT has one parameterization
    and no constraint); the config, when beside it, is checked where it speaks about them."""
    cfg = config or {}
    cfg_path = os.path.join(os.path.dirname(os.path.abspath(path)), _CONFIG_NAME)
    if config is not None and str(cfg.get("peft_type", "BOFT")).upper() != "BOFT":
        raise OFTError(f"{_CONFIG_NAME} says peft_type {cfg.get('peft_type')!r}, expected 'BOFT' (the file holds "
                       "BOFT keys: .boft_R)", path=path)
    for name in ("boft_block_size", "boft_block_num", "boft_n_butterfly_factor"):
        _config_value(cfg, name, 0, "count", cfg_path)
    if _config_value(cfg, "fan_in_fan_out", False, "bool", cfg_path):
        raise OFTError(f"{_CONFIG_NAME} says fan_in_fan_out true (weights stored as (in, out), GPT-2's Conv1D): "
                       "expected false, the layout of the Linear / Conv2d layers this pack patches", path=cfg_path)
    _config_value(cfg, "peft_version", None, "text", cfg_path)
    return _Settings(path, cfg, cfg_path, config is not None, False, False, 0.0, False, (), "peft_boft")


def _refuse_trained_base(ignored: list[str], modules: dict, cfg: dict, path: str) -> None:
    """A PEFT file holding trained base-model tensors the pack does not apply: biases of modules without an adapter
    (`bias` "all" saves every bias of the model) and whole modules (`modules_to_save`). Refused, since the result
    would not be the trained model. The adapted modules' own trained biases (`<module>.base_layer.bias`, `bias`
    "oft_only" / "boft_only") are read with their layers (`OFTLayer.bias`)."""
    trained = [k for k in ignored if k.endswith((".bias", ".weight"))]
    trained += [f"{key}.base_layer.bias" for key, parts in modules.items() if set(parts) == {"base_layer.bias"}]
    if not trained:
        return
    trained.sort()
    why = f" (its config: bias {cfg.get('bias')!r})" if cfg.get("bias") not in (None, "none") else ""
    raise OFTError(f"holds {len(trained)} trained base-model tensor{'s' if len(trained) > 1 else ''} of modules "
                   f"without an adapter ({trained[0]!r}{', …' if len(trained) > 1 else ''}){why}: PEFT saves the "
                   "biases of bias 'all' and modules_to_save this way, and this pack applies adapters (their "
                   "rotations and their own trained biases) only, which without them would not give the trained "
                   "model. Merge it with PEFT (merge_and_unload) and load the merged model, or train with bias "
                   "'none' / 'oft_only' / 'boft_only'", path=path)


def read(header: _Header, tensors: dict[str, torch.Tensor], config) -> OFTAdapter:
    """The adapter of a PEFT OFT or BOFT file; `config` is the parsed adapter_config.json beside it (None: absent)."""
    path = header.path
    modules, ignored = group_by_layer(tensors, _KEY)
    packed = any("oft_R.weight" in parts for parts in modules.values())
    if packed and any("oft_r" in parts for parts in modules.values()):
        raise OFTError("mixes current (.oft_R.weight) and legacy (.oft_r) PEFT OFT keys", path=path)
    if any("boft_R" in parts or "boft_s" in parts for parts in modules.values()):
        if any(p in parts for parts in modules.values() for p in ("oft_R.weight", "oft_r", "oft_s")):
            raise OFTError("mixes PEFT BOFT (.boft_R) and OFT (.oft_R.weight / .oft_r) keys", path=path)
        st = _boft_settings(config, path)
        _refuse_trained_base(ignored, modules, st.cfg, path)
        layers = {}
        for key, parts in sorted(modules.items()):
            layer = _boft_layer(key, parts, st)
            layers[(layer.component, layer.name)] = layer
        info = {"peft_config": {k: st.cfg.get(k) for k in ("boft_block_size", "boft_block_num",
                                                            "boft_n_butterfly_factor", "peft_version")
                                if k in st.cfg}}
        if ignored:
            info["ignored_keys"] = ignored
        return OFTAdapter(layers, st.fmt, path, dict(header.metadata), info)
    cfg, cfg_path, block_share, coft, eps = _config_settings(config, path)
    onetrainer = packed and config is None and _onetrainer(header, modules)
    if onetrainer:  # OneTrainer "OFT v2": PEFT's layer, its settings fixed by OneTrainer's code (no config)
        series, coft_eps = _onetrainer_settings(header)
        st = _Settings(path, cfg, cfg_path, False, True, coft_eps is not None, coft_eps or 0.0, True, series,
                       "peft_onetrainer")
    else:
        neumann, coeffs, fmt = _series(cfg, config, packed, modules, path, cfg_path)
        st = _Settings(path, cfg, cfg_path, config is not None, block_share, coft, eps, neumann, coeffs, fmt)
    if not onetrainer:
        _refuse_trained_base(ignored, modules, cfg, path)
    one = _packed_layer if packed else _legacy_layer
    layers = {}
    for key, parts in sorted(modules.items()):
        layer = one(key, parts, st)
        layers[(layer.component, layer.name)] = layer
    if onetrainer:
        info = {"onetrainer": {"ot_revision": header.metadata.get("ot_revision"),
                               "scaled_layers": sum(1 for layer in layers.values() if layer.source.endswith("scaled"))}}
        if st.coeffs != _ONETRAINER_SERIES:
            info["onetrainer"]["series"] = "first (2025-11-14 to 16: last term not halved)"
        if st.coft:
            info["onetrainer"]["coft_eps"] = st.eps
            info["onetrainer"]["coft_applies_to"] = "Linear layers (its Conv2d path never projected)"
    else:
        info = {"peft_config": {k: cfg.get(k) for k in ("r", "oft_block_size", "use_cayley_neumann",
                                                         "num_cayley_neumann_terms", "coft", "eps", "block_share",
                                                         "peft_version") if k in cfg}}
    if ignored:
        info["ignored_keys"] = ignored
    return OFTAdapter(layers, st.fmt, path, dict(header.metadata), info)


# ------------------------------------------------------------------------------------------------ writing


@dataclass(frozen=True)
class _PeftLayer:
    path: str
    q: torch.Tensor  # (stored blocks, b, b), for PEFT's convention


def _neumann_terms(coeffs: tuple[float, ...]) -> tuple[int, bool] | None:
    """(num_cayley_neumann_terms, written by PEFT ≥ 0.18) whose series has exactly these coefficients."""
    for halved in (True, False):
        for n in range(1, 65):
            if _neumann_coefficients(n, last_term_halved=halved) == tuple(coeffs):
                return n, halved
    return None


def _dotted_names(module_names: Iterable[str] | None) -> dict[str, str | None]:
    """underscored -> dotted module path (None when two paths collide), from weight keys or module paths."""
    out: dict[str, str | None] = {}
    for n in module_names or ():
        for suffix in (".weight", ".bias"):
            if n.endswith(suffix):
                n = n[: -len(suffix)]
        u = n.replace(".", "_")
        out[u] = n if out.get(u, n) == n else None
    return out


def _why_not(layer: OFTLayer, dotted: dict[str, str | None]) -> str | None:
    """Why this layer has no exact PEFT form (the first reason), or None."""
    if layer.side != "in":
        return ("rotates output features (M·W); PEFT ≥ 0.14 rotates input features (W·M), a different weight for "
                "the same blocks")
    if layer.component != "unet":
        return "is a text-encoder layer; a PEFT adapter directory holds the layers of one model"
    if layer.kind == "butterfly":
        return "is BOFT; PEFT's OFT has no butterfly stages (PEFT BOFT is another adapter type)"
    if layer.parameterization == "matrix":
        return "stores the rotation R itself: it has no exact Cayley generator in fp32"
    if not w.identity_scale(layer):
        return "has a per-row scale (PEFT 0.14–0.15 oft_s), which current PEFT OFT does not store"
    if len(layer.blocks) > 1 and w.merge_splits(list(layer.blocks)) is None:
        return f"has splits with different block sizes {layer.block_sizes}; PEFT stores one block size per layer"
    if "." not in layer.name and layer.name not in dotted and "_" in layer.name:
        return ("has an underscored name, and PEFT needs the dotted module path: the '.' → '_' substitution "
                "cannot be undone by string rules; pass the base model's module names (module_names)")
    if "." not in layer.name and dotted.get(layer.name, "") is None:
        return "matches two module paths of the base model once dots become underscores"
    return None


class _Global(NamedTuple):
    """The settings adapter_config.json holds once for every layer."""

    neumann: bool
    terms: int
    new_series: bool
    block_share: bool
    coft: bool
    eps: float


def _one_setting(adapter: OFTAdapter, values: set, what: str):
    if len(values) > 1:
        raise OFTError(f"mixes {what}", path=adapter.path or None)
    return next(iter(values))


def _global_settings(adapter: OFTAdapter, layers: list[OFTLayer]) -> _Global:
    """Parameterization, series, block_share and COFT, each one value for the file (or refused)."""
    param, coeffs = _one_setting(adapter, {(layer.parameterization, layer.neumann_coeffs) for layer in layers},
                                 "exact Cayley and Cayley–Neumann layers (or different series lengths); PEFT's "
                                 "config holds one for the whole adapter")
    neumann = param == "neumann"
    terms, new_series = (5, True)
    if neumann:
        found = _neumann_terms(coeffs)
        if found is None:
            raise OFTError(f"Cayley–Neumann coefficients {coeffs} are not a series any PEFT version computes",
                           path=adapter.path or None)
        terms, new_series = found
    block_share = _one_setting(adapter, {layer.block_share for layer in layers},
                               "block_share layers with unshared ones; PEFT's block_share is one setting")
    # COFT (eps) is kept when every layer has the same one, otherwise applied to Q here (exact); its bound depends on
    # the stored block count, so concatenated splits are written projected too.
    cons = {(layer.constraint.kind, layer.constraint.value) for layer in layers}
    coft = len(cons) == 1 and next(iter(cons))[0] == "block_projection"
    eps = next(iter(cons))[1] if coft else 6e-5  # PEFT's default eps; unused with coft false
    coft = coft and not any(len(layer.blocks) > 1 for layer in layers)
    return _Global(neumann, terms, new_series, block_share, coft, eps)


def _peft_layers(adapter: OFTAdapter, layers: list[OFTLayer], g: _Global,
                 dotted: dict[str, str | None]) -> list[_PeftLayer]:
    """Each layer's module path and Q in PEFT's convention (exact branch applies Cayley(Q)ᵀ, Neumann ≈ Cayley(Q))."""
    written = []
    for layer in layers:
        gens = list(layer.blocks) if g.coft else w.constrained(layer)
        q = w.merge_splits(w.with_transpose(gens, layer.transpose, g.neumann))
        path = layer.name if "." in layer.name or layer.name not in dotted else dotted[layer.name]
        written.append(_PeftLayer(path, q))
    paths = [x.path for x in written]
    if len(set(paths)) != len(paths):
        raise OFTError("two layers map to the same PEFT module path", path=adapter.path or None)
    return written


def _r_and_block_size(adapter: OFTAdapter, written: list[_PeftLayer], block_share: bool) -> tuple[int, int]:
    """(r, oft_block_size) for the config: one of them set, as PEFT derives the other from each layer's width.
    r is kept when the source set it (test_writers pins both round trips)."""
    sizes = {int(x.q.shape[-1]) for x in written}
    counts = {int(x.q.shape[0]) for x in written}
    source_r = int((adapter.info.get("peft_config") or {}).get("r") or 0)
    if block_share:
        if len(sizes) != 1:
            raise OFTError(f"block_share layers with block sizes {sorted(sizes)}: PEFT derives them from one "
                           "oft_block_size", path=adapter.path or None)
        return 0, sizes.pop()
    if len(counts) == 1 and (source_r or len(sizes) != 1):
        return counts.pop(), 0
    if len(sizes) == 1:
        return 0, sizes.pop()
    raise OFTError(f"layers differ both in block size {sorted(sizes)} and in block count {sorted(counts)}; PEFT's "
                   "config sets one r or one oft_block_size for every layer", path=adapter.path or None)


def _config(g: _Global, r: int, block: int, paths: list[str]) -> dict:
    """adapter_config.json as PEFT's OFTConfig saves it."""
    config = {
        "peft_type": "OFT", "r": r, "oft_block_size": block, "use_cayley_neumann": g.neumann,
        "num_cayley_neumann_terms": g.terms, "coft": g.coft, "eps": g.eps, "block_share": g.block_share,
        "target_modules": sorted(paths), "module_dropout": 0.0, "bias": "none", "init_weights": True,
        "inference_mode": True, "fan_in_fan_out": False, "base_model_name_or_path": None, "revision": None,
        "task_type": None, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "exclude_modules": None,
    }
    if not g.neumann or g.new_series:
        config["peft_version"] = _PEFT_VERSION
    # else: the 0.16–0.17 series (last coefficient 2) is what a config without peft_version means to our reader and
    # to those PEFT versions; PEFT ≥ 0.18 would compute its newer series for such a file whatever we write.
    return config


def write(adapter: OFTAdapter, out, *, overwrite: bool = False, metadata: Mapping[str, str] | None = None,
          module_names: Iterable[str] | None = None, inputs: Iterable = ()) -> str:
    """Write a PEFT (≥ 0.16 layout) OFT adapter directory: adapter_model.safetensors + adapter_config.json.

    `module_names`: the base model's module paths or weight keys (e.g. a diffusers UNet's state-dict keys), needed
    only to turn underscored layer names back into PEFT's dotted module paths.
    """
    dotted = _dotted_names(module_names)
    w.check_all(adapter, "PEFT", lambda layer: _why_not(layer, dotted))
    layers = list(adapter)
    if not layers:
        raise OFTError("no layers to write", path=adapter.path or None)
    g = _global_settings(adapter, layers)
    written = _peft_layers(adapter, layers, g, dotted)
    r, block = _r_and_block_size(adapter, written, g.block_share)
    config = _config(g, r, block, [x.path for x in written])
    tensors = {f"{_PREFIX}{x.path}.oft_R.weight": pack_upper(x.q) for x in written}
    meta = w.finish_metadata({"format": "pt"}, metadata)

    def write_files(tmp_dir: str) -> None:
        with open(os.path.join(tmp_dir, _MODEL_NAME), "wb") as f:
            f.write(w.serialize(tensors, meta))
        with open(os.path.join(tmp_dir, _CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)

    return w.atomic_dir(out, overwrite, write_files, adapter, inputs)
