"""The reference fixtures (../shared/fixtures) as test cases: adapter, base weights, and what the trainer computed.

Each case yields, per adapted weight: the base weight, and the reference merged weight at each strength the reference
tool computed. Read-only: fixtures are never copied or edited.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

FIXTURES = Path(os.environ.get("OFT_FIXTURES") or Path(__file__).resolve().parents[2] / "shared" / "fixtures")
TE_CHECKPOINT_PREFIX = "cond_stage_model.transformer."
REL_TOL = 1e-6  # fp32: bit-for-bit or ≤ 1e-6 relative (fixtures README); never loosened


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b|."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def peft_boft_weight(w: torch.Tensor, a: torch.Tensor, s: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """PEFT BOFT's merge of a layer of one butterfly factor, in fp64: (M · W₂ᵀ)ᵀ ⊙ s with W₂ = W viewed
    (out, in · kh · kw), M = blockdiag(B_i), B_i = (I − S_i)(I + S_i)⁻¹, S_i = ½(A_i − A_iᵀ) (PEFT's cayley_batch),
    `a` the file's (1, blocks, b, b) `.boft_R`, `s` its `.boft_s`. At another `strength` (PEFT has none) the pack's
    one definition: each block I + strength·(B_i − I), the row scale whole."""
    a = a[0].double()
    skew = 0.5 * (a - a.transpose(1, 2))
    eye = torch.eye(a.shape[-1], dtype=torch.float64).expand_as(skew)
    blocks = torch.linalg.solve(eye + skew, eye - skew, left=False)
    m = torch.block_diag(*(eye + strength * (blocks - eye)))
    w2 = w.double().reshape(w.shape[0], -1)
    return ((m @ w2.T).T * s.double().reshape(-1, 1)).reshape(w.shape)


@dataclass(frozen=True)
class Case:
    id: str
    adapter: Path  # file or PEFT directory
    base_file: Path | None  # a safetensors base holding every adapted weight (None: built from `expected`)
    expected: dict  # strength -> {base key: merged tensor}
    originals: dict  # base key -> original tensor
    module_key: dict  # base key -> adapter layer name (underscored) for the direct per-layer checks


def _kohya_case(stem: str) -> Case:
    ex = load_file(FIXTURES / "kohya" / f"{stem}_expected.safetensors")
    with safe_open(FIXTURES / "kohya" / f"{stem}_expected.safetensors", "pt") as f:
        modules = json.loads(f.metadata()["modules"])
    originals, expected, module_key = {}, {1.0: {}, 0.5: {}}, {}
    for oft_name, info in modules.items():
        path = info["module_path"]
        # SD1.5 bases are LDM checkpoints (`ldm_key`); FLUX bases use BFL names = module_path.
        key = "model.diffusion_model." + (info.get("ldm_key") or path + ".weight")
        originals[key] = ex[f"original/{path}.weight"]
        for s in expected:
            expected[s][key] = ex[f"merged_m{s}/{path}.weight"]
        module_key[key] = oft_name[len("oft_unet_"):]
    return Case(stem, FIXTURES / "kohya" / f"{stem}.safetensors", None, expected, originals, module_key)


def _dir_case(d: Path) -> Case:
    lycoris = d.parent.name == "lycoris"
    adapter = d / f"{d.name}.safetensors" if lycoris else d
    base = load_file(d / "base.safetensors")
    merged = load_file(d / "merged.safetensors")
    expected = {1.0: {k: merged[k] for k in merged if k.endswith(".weight")}}
    half = d / "merged_multiplier0.5.safetensors"
    if half.exists():
        m = load_file(half)
        expected[0.5] = {k: m[k] for k in m if k.endswith(".weight")}
    keys = [k for k in expected[1.0]]
    # text-encoder fixtures name their weights as an SD1.5 checkpoint does (cond_stage_model.transformer.…); the
    # adapter's `lora_te_` layer names are the transformers paths below that prefix
    return Case(d.name, adapter, d / "base.safetensors", expected, {k: base[k] for k in keys},
                {k: k[: -len(".weight")].removeprefix(TE_CHECKPOINT_PREFIX).replace(".", "_") for k in keys})


@functools.lru_cache(maxsize=None)
def all_cases() -> tuple[Case, ...]:
    cases = [_kohya_case("sd15_oft_attn_dim8_bf16"), _kohya_case("flux_tiny_oft_attn_dim4")]
    for group in ("lycoris", "peft"):
        cases += [_dir_case(d) for d in sorted((FIXTURES / group).iterdir()) if d.is_dir()]
    return tuple(cases)


def case_ids() -> list[str]:
    return [c.id for c in all_cases()]


def get_case(case_id: str) -> Case:
    return next(c for c in all_cases() if c.id == case_id)
