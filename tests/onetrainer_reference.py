"""OneTrainer's own OFT v2 modules, for the tests that compare our reading of its files with what it computes.

OneTrainer is not a package: its source (a checkout, `ONETRAINER_PATH`) is read as it is at run time, never copied
into this repository. `oft_utils.py` (OFTRotationModule: the generators, Scaled OFT, the Cayley–Neumann series) runs
whole; from `LoRAModule.py` only the two classes an adapted layer is (`PeftBase`, `OFTModule`: the Linear path
rotating the input, the Conv2d path rotating the weight) and from `quantization_util.py` the two weight helpers they
call are taken, their source compiled unchanged, because those modules' imports pull in OneTrainer's whole training
stack (accelerate, the model loaders, ...). The names of that stack the bodies refer to (config and quantized-layer
types) are given inert stand-ins: an adapted plain Linear / Conv2d never reaches them.
"""

from __future__ import annotations

import ast
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ENV = "ONETRAINER_PATH"
# checkouts of earlier OneTrainer revisions, for what they computed differently: Constrained OFT (until e928dda,
# 2026-05-10; e.g. 3374137) and the first revisions' series (1336b9b to 86ae381, 2025-11-14 to 16)
ENV_COFT = "ONETRAINER_COFT_PATH"
ENV_FIRST = "ONETRAINER_FIRST_PATH"


def checkout(env: str = ENV) -> Path | None:
    """The OneTrainer checkout named by the variable `env` (None: unset or not a OneTrainer tree)."""
    root = os.environ.get(env)
    if not root:
        return None
    root = Path(root)
    ok = (root / "modules" / "module" / "oft_utils.py").is_file() and (root / "modules" / "module" /
                                                                        "LoRAModule.py").is_file()
    return root if ok else None


def load(root: Path) -> dict:
    """A namespace holding OneTrainer's `OFTRotationModule`, `PeftBase` and `OFTModule`."""
    ns: dict = {"__name__": "onetrainer_oft"}
    src = root / "modules" / "module" / "oft_utils.py"
    exec(compile(src.read_text(encoding="utf-8"), str(src), "exec"), ns)
    lora = root / "modules" / "module" / "LoRAModule.py"
    tree = ast.parse(lora.read_text(encoding="utf-8"))
    classes = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name in ("PeftBase", "OFTModule")]
    if [c.name for c in classes] != ["PeftBase", "OFTModule"]:
        raise RuntimeError(f"{lora} no longer defines PeftBase and OFTModule at top level")
    ns.update(math=math, torch=torch, F=F, nn=nn, Tensor=Tensor, Any=Any, Mapping=Mapping, Linear=nn.Linear,
              Conv2d=nn.Conv2d, abstractmethod=lambda f: f)
    for name in ("FusedModuleGroup", "BaseLinearSVD", "TrainConfig", "PeftType", "ModuleFilter",
                 "QuantizedLinearMixin", "GGUFLinear"):
        ns[name] = type(name, (), {})
    # the two weight helpers the classes call, from quantization_util.py (their quantized branches never match here)
    quant = root / "modules" / "util" / "quantization_util.py"
    helpers = [n for n in ast.parse(quant.read_text(encoding="utf-8")).body
               if isinstance(n, ast.FunctionDef) and n.name in ("get_weight_shape", "get_unquantized_weight")]
    if len(helpers) != 2:
        raise RuntimeError(f"{quant} no longer defines get_weight_shape and get_unquantized_weight")
    exec(compile(ast.Module(body=helpers, type_ignores=[]), str(quant), "exec"), ns)
    exec(compile(ast.Module(body=classes, type_ignores=[]), str(lora), "exec"), ns)
    return ns
