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


def _peft_butterfly_perm(n: int, blocks: int, half: int, factors: int) -> list[int]:
    """PEFT's `block_butterfly_perm(n, blocks, half, factors − 1)` as its docstring and loop define it: identity for
    one factor; else within each group of n / blocks rows, its chunks of `half` rows in the order 0, 2, 4, …,
    1, 3, 5, …"""
    if factors == 1:
        return list(range(n))
    size = n // blocks
    chunks = size // half
    order = list(range(0, chunks, 2)) + list(range(1, chunks, 2))
    inside = [c * half + t for c in order for t in range(half)]
    return [g + i for g in range(0, n, size) for i in inside]


def peft_boft_weight(w: torch.Tensor, a: torch.Tensor, s: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """PEFT BOFT's merge in fp64: (M · W₂ᵀ)ᵀ ⊙ s with W₂ = W viewed (out, in · kh · kw), `a` the file's
    (factors, blocks, b, b) `.boft_R`, `s` its `.boft_s`: per factor f, B_f = blockdiag((I − S)(I + S)⁻¹) of
    S = ½(A − Aᵀ) (PEFT's cayley_batch), P_f the permutation matrix of its block butterfly permutation for
    blocks / 2^f blocks of size b / 2 (P[j, perm[j]] = 1), M = P_{F−1} B_{F−1} P_{F−1}ᵀ ⋯ P_0 B_0 P_0ᵀ. At another
    `strength` (PEFT has none) the pack's one definition: each block I + strength·(B − I), the row scale whole."""
    a = a.double()
    factors, nb, b = a.shape[0], a.shape[1], a.shape[-1]
    n = nb * b
    m = torch.eye(n, dtype=torch.float64)
    for f in range(factors):
        skew = 0.5 * (a[f] - a[f].transpose(1, 2))
        eye = torch.eye(b, dtype=torch.float64).expand_as(skew)
        blocks = torch.linalg.solve(eye + skew, eye - skew, left=False)
        bd = torch.block_diag(*(eye + strength * (blocks - eye)))
        p = torch.zeros(n, n, dtype=torch.float64)
        for j, k in enumerate(_peft_butterfly_perm(n, nb // 2**f, b // 2, factors)):
            p[j, k] = 1
        m = p @ bd @ p.T @ m
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
