"""PEFT OFT: the current packed format (≥ 0.16) and the two legacy formats.

Current (`<prefix><module path>.oft_R.weight`, (blocks, b(b−1)/2)): the strictly upper triangle of each block in
`torch.triu_indices(b, b, 1)` order, Q = U − Uᵀ; input features rotated, W' = W·blockdiag(R)ᵀ. `adapter_config.json`
says which parameterization was trained — exact Cayley R = (I − Q)(I + Q)⁻¹, or Cayley–Neumann
R = I + 2Q + 2Q² + … — and the two give inverse rotations for the same numbers, so the config is required. The series'
last coefficient changed in PEFT 0.18 (the first version to write `peft_version`): without `peft_version` the 0.16–0.17
series is used. COFT (`coft`, `eps`) projects each block to ‖Q_i‖_F ≤ eps/√blocks; `block_share` stores one block.

Legacy ≤ 0.13 (`.oft_r` (r, b, b) only): output features rotated, W' = Rᵀ·W with R = (I − S)(I + S)⁻¹,
S = ½(A − Aᵀ). Legacy 0.14–0.15 (`.oft_r` + `.oft_s` (out, 1)): input features rotated, W' = (W·Rᵀ) ⊙ s. Current PEFT
refuses the first and silently loads the second as identity; both are read here as those versions computed them.
"""

from __future__ import annotations

import json
import math
import os
import re

import torch

from ..errors import OFTError
from ..safetensors_io import Header, parse_json
from ..spec import Constraint, OFTAdapter, make_layer, neumann_coefficients
from ._keys import group_by_layer

CONFIG_NAME = "adapter_config.json"
MODEL_NAME = "adapter_model.safetensors"
KEY = re.compile(r"^(.+?)\.(oft_R\.weight|oft_r|oft_s)$")
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


def claims(header: Header, config) -> bool:
    return any(k.endswith((".oft_R.weight", ".oft_r")) for k in header.tensors)


def find_config(path: str) -> tuple[str, dict | None]:
    """(adapter file, parsed adapter_config.json or None) for a PEFT directory or a file beside its config."""
    if os.path.isdir(path):
        model = os.path.join(path, MODEL_NAME)
        if not os.path.exists(model):
            for name in ("adapter_model.bin", "adapter_model.pt"):
                if os.path.exists(os.path.join(path, name)):
                    from ..safetensors_io import refuse_pickle

                    refuse_pickle(os.path.join(path, name))
            raise OFTError(f"a directory without {MODEL_NAME}: expected a PEFT adapter directory", path=path)
    else:
        model = path
    cfg_path = os.path.join(os.path.dirname(os.path.abspath(model)), CONFIG_NAME)
    if not os.path.exists(cfg_path):
        return model, None
    try:
        with open(cfg_path, "rb") as f:
            raw = f.read(_MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise OFTError(f"cannot read {CONFIG_NAME} ({e.strerror or e})", path=cfg_path) from None
    if len(raw) > _MAX_CONFIG_BYTES:
        raise OFTError(f"{CONFIG_NAME} is larger than {_MAX_CONFIG_BYTES // 2**20} MiB: not a PEFT config",
                       path=cfg_path)
    config = parse_json(raw, CONFIG_NAME, cfg_path)
    if not isinstance(config, dict):
        raise OFTError(f"{CONFIG_NAME} must hold a JSON object, found JSON {type(config).__name__}", path=cfg_path)
    return model, config


_MAX_CONFIG_BYTES = 16 * 2**20
_MAX_NEUMANN_TERMS = 64  # PEFT's default is 5; each term is a matmul per block, and 1e5 terms ran for minutes


def _config_value(cfg: dict, name: str, default, kind: str, cfg_path: str):
    """`cfg[name]` checked against what PEFT's OFTConfig declares for it (`kind`), or `default` when absent.
    Refused with the field, the value and what PEFT accepts."""
    if name not in cfg:
        return default
    v = cfg[name]
    ok = {
        "bool": lambda: type(v) is bool,
        "count": lambda: type(v) is int and v >= 0,
        "terms": lambda: type(v) is int and 1 <= v <= _MAX_NEUMANN_TERMS,
        "eps": lambda: type(v) in (int, float) and math.isfinite(v) and v >= 0,
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
        shown = json.dumps(v)
        raise OFTError(f"{CONFIG_NAME}: {name}: expected {want}, found "
                       f"{shown if len(shown) <= 40 else shown[:30] + '…'}", path=cfg_path)
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
        raise OFTError(f"{CONFIG_NAME} says oft_block_size {size}, but layer {layer!r} holds {stored} blocks of {b} "
                       f"(width {width}, which {size} divides): the config and the tensors disagree", path=cfg_path)
    if r and not size and width % r == 0 and width >= r and stored != r:
        raise OFTError(f"{CONFIG_NAME} says r {r} (blocks per layer), but layer {layer!r} holds {stored} blocks of "
                       f"{b}: the config and the tensors disagree", path=cfg_path)


def _split_name(key: str) -> tuple[str, str]:
    for prefix, component in _PREFIXES:
        if key.startswith(prefix):
            return component, key[len(prefix):]
    return "unet", key


def _block_size(n_elements: int) -> int | None:
    b = (1 + math.isqrt(1 + 8 * n_elements)) // 2
    return b if b * (b - 1) // 2 == n_elements and b >= 2 else None


def _version_tuple(v: str) -> tuple[int, ...]:
    nums = re.findall(r"\d+", v.partition("@")[0])[:3]
    return tuple(int(x) for x in nums)


def _project_legacy(a: torch.Tensor, eps: float) -> torch.Tensor:
    """PEFT ≤ 0.15 COFT: projects the raw stored blocks A (not Q) per block, radius eps/√blocks."""
    bound = eps / math.sqrt(a.shape[0])
    norms = torch.linalg.matrix_norm(a, keepdim=True)
    return torch.where(norms <= bound, a, a * (bound / norms))


def read(header: Header, tensors: dict[str, torch.Tensor], config) -> OFTAdapter:
    path = header.path
    modules, ignored = group_by_layer(tensors, KEY)
    packed = any("oft_R.weight" in parts for parts in modules.values())
    legacy = any("oft_r" in parts for parts in modules.values())
    if packed and legacy:
        raise OFTError("mixes current (.oft_R.weight) and legacy (.oft_r) PEFT OFT keys", path=path)
    cfg = config or {}
    cfg_path = os.path.join(os.path.dirname(os.path.abspath(path)), CONFIG_NAME)
    if config is not None and str(cfg.get("peft_type", "OFT")).upper() not in ("OFT",):
        raise OFTError(f"{CONFIG_NAME} says peft_type {cfg.get('peft_type')!r}, expected 'OFT'", path=path)
    block_share = _config_value(cfg, "block_share", False, "bool", cfg_path)
    coft = _config_value(cfg, "coft", False, "bool", cfg_path)
    eps = float(_config_value(cfg, "eps", 6e-5, "eps", cfg_path))
    for name in ("r", "oft_block_size"):
        _config_value(cfg, name, 0, "count", cfg_path)
    _config_value(cfg, "peft_version", None, "text", cfg_path)

    if packed:
        if config is None:
            raise OFTError(
                f"a PEFT OFT file needs its {CONFIG_NAME} beside it: exact Cayley and Cayley–Neumann give inverse "
                "rotations for the same numbers, and only the config says which was trained",
                path=path,
            )
        neumann = _config_value(cfg, "use_cayley_neumann", True, "bool", cfg_path)  # PEFT ≥ 0.16 default
        terms = _config_value(cfg, "num_cayley_neumann_terms", 5, "terms", cfg_path)
        version = cfg.get("peft_version")
        new_series = version is not None and _version_tuple(str(version)) >= (0, 18)
        coeffs = neumann_coefficients(terms, last_term_halved=new_series) if neumann else ()
        fmt = "peft"
    else:
        neumann, coeffs, version = False, (), cfg.get("peft_version")
        fmt = "peft_legacy_0.15" if any("oft_s" in p for p in modules.values()) else "peft_legacy_0.13"

    layers = {}
    for key, parts in sorted(modules.items()):
        component, name = _split_name(key)
        if packed:
            vec = parts.get("oft_R.weight")
            if vec is None:
                raise OFTError(f"has {sorted(parts)} but no .oft_R.weight", path=path, layer=key)
            if vec.ndim != 2:
                raise OFTError(f".oft_R.weight: expected (blocks, b(b−1)/2), found {tuple(vec.shape)}", path=path,
                               layer=key)
            b = _block_size(int(vec.shape[1]))
            if b is None:
                raise OFTError(f".oft_R.weight: {vec.shape[1]} values per block is not b(b−1)/2 for any block "
                               "size b ≥ 2", path=path, layer=key)
            _check_layout(cfg, int(vec.shape[0]), b, block_share and vec.shape[0] == 1, cfg_path, key)
            rows, cols = torch.triu_indices(b, b, 1)
            u = torch.zeros(vec.shape[0], b, b, dtype=torch.float32, device=vec.device)
            u[:, rows, cols] = vec.to(torch.float32)
            q = u - u.transpose(1, 2)
            layer = make_layer(
                path=path, name=name, component=component, side="in", generators=[q],
                transpose=neumann,  # the series approximates Cayley(Q), the transpose of PEFT's exact branch
                parameterization="neumann" if neumann else "cayley", neumann_coeffs=coeffs,
                constraint=Constraint("block_projection", eps) if coft else Constraint(),
                source=fmt, key=key, block_share=block_share and vec.shape[0] == 1,
            )
        else:
            a = parts.get("oft_r")
            if a is None:
                raise OFTError(f"has {sorted(parts)} but no .oft_r", path=path, layer=key)
            if a.ndim != 3 or a.shape[1] != a.shape[2]:
                raise OFTError(f".oft_r: expected (r, b, b), found {tuple(a.shape)}", path=path, layer=key)
            if config is not None:
                _check_layout(cfg, int(a.shape[0]), int(a.shape[-1]), block_share and a.shape[0] == 1, cfg_path, key)
            a = a.to(torch.float32)
            if coft:
                a = _project_legacy(a, eps)
            q = 0.5 * (a - a.transpose(1, 2))
            s = parts.get("oft_s")
            if fmt == "peft_legacy_0.15" and s is None:
                raise OFTError("has .oft_r but no .oft_s while other layers have both", path=path, layer=key)
            layer = make_layer(
                path=path, name=name, component=component,
                side="in" if fmt == "peft_legacy_0.15" else "out",
                generators=[q], transpose=False, row_scale=s, source=fmt, key=key,
                block_share=block_share and a.shape[0] == 1,
            )
        layers[(component, name)] = layer
    info = {"peft_config": {k: cfg.get(k) for k in ("r", "oft_block_size", "use_cayley_neumann",
                                                     "num_cayley_neumann_terms", "coft", "eps", "block_share",
                                                     "peft_version") if k in cfg}}
    if ignored:
        info["ignored_keys"] = ignored
    return OFTAdapter(layers, fmt, path, dict(header.metadata), info)
