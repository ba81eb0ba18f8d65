"""Runs ONE reference tool on files the pack wrote; executed by the tool venv's own python (scripts/tools_venv.sh),
never by pytest, so that sd-scripts (diffusers 0.32.1, transformers 4.x), lycoris-lora and peft never meet the main
venv. Protocol: `python tool_runner.py REQUEST.json`; the request (or each of its "jobs") names an output
.safetensors (the weights the tool computed) and an output .json (what it loaded, ignored, raised). Only the tools' own
public code paths are used:

- sdscripts: sd-scripts' own UNet (`library.original_unet`, its size constants set to the tiny test model), SDXL UNet
  (`library.sdxl_original_unet`, the same way), FLUX
  (`library.flux_models.Flux`) or Chroma (`library.chroma_models.Chroma`),
  `networks.oft.create_network_from_weights(..., for_inference=True)` + `merge_to` (SD), or `networks.oft_flux`
  (FLUX, Chroma) applied as a forward patch (its `merge_to` crashes) with the effective weight read
  from the patched forward on an identity input (bias zeroed in our copy, so the product is exact); and
  `create_network(..., **network_args)` for the layer set a training option adapts; with "make", that network with
  seeded blocks written by its own `save_weights` (a file as sd-scripts makes it), then loaded back as above.
  sd-scripts hard-codes FLUX.1's split widths (3×3072, 3×3072 + 12288) in oft_flux.py: for the tiny FLUX the source
  is loaded with only those two lists scaled (as the fixtures were made), at run time, never written anywhere.
- lycoris: `lycoris.wrapper.create_lycoris_from_weights` on a module tree of Linear / Conv2d built from the base
  file's weight names (what LyCORIS matches on), then `LycorisNetwork.merge_to(multiplier)`; with "make_sdxl",
  LyCORIS' kohya network on sd-scripts' own SDXL UNet (its source folder from the sd-scripts venv) writes the file
  and merges it back, as sd-scripts with `--network_module lycoris.kohya` does.
- peft: `PeftModel.from_pretrained` on the same kind of module tree, then `merge_and_unload()` (PEFT has no strength);
  with "make_boft" / "make_oft", PEFT's own BOFT / OFT (`BOFTConfig` / `OFTConfig`, `get_peft_model` with
  init_weights False: random generators and row scales; with bias "boft_only" / "oft_only" the adapted modules'
  biases moved as training moves them) on that tree first writes the adapter directory (`save_pretrained`), which
  is then loaded back as above (its changed weights and biases are the result).
  PEFT builds more than one butterfly factor only with its CUDA extension (else it sets the factor to 1); for
  "factors" > 1 the extension's one op, a block-diagonal matrix per factor ((N, D, H, H) -> (N, D·H, D·H), its
  docstring's definition), stands in for it, and everything else — permutations, Cayley map, factor order, row
  scale, merge — is PEFT's own code.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import logging
import sys
import traceback

import torch
from safetensors.torch import load_file, save_file
from torch import nn

logging.basicConfig(level=logging.WARNING)


# ------------------------------------------------------------------------------------------------ module trees
def skeleton(weights: dict[str, torch.Tensor]) -> nn.Module:
    """A module tree with a Linear (2-D weight) or Conv2d (4-D) at every `<path>.weight` of `weights`, loaded."""
    root = nn.Module()
    for key, w in weights.items():
        if not key.endswith(".weight") or w.ndim not in (2, 4):
            continue
        *parents, leaf = key[: -len(".weight")].split(".")
        node = root
        for p in parents:
            if not hasattr(node, p):
                node.add_module(p, nn.Module())
            node = getattr(node, p)
        bias = key[: -len(".weight")] + ".bias" in weights
        if w.ndim == 2:
            m = nn.Linear(w.shape[1], w.shape[0], bias=bias)
        else:
            m = nn.Conv2d(w.shape[1], w.shape[0], tuple(w.shape[2:]), bias=bias)
        node.add_module(leaf, m)
    missing, unexpected = root.load_state_dict(
        {k: v for k, v in weights.items() if k.endswith((".weight", ".bias"))}, strict=False)
    assert not missing, missing[:5]
    return root.float()


def weights_of(root: nn.Module, paths) -> dict[str, torch.Tensor]:
    mods = dict(root.named_modules())
    return {f"{p}.weight": mods[p].weight.detach().float().contiguous().clone() for p in paths}


# ------------------------------------------------------------------------------------------------ sd-scripts
def sd_unet(spec: dict, base: dict[str, torch.Tensor]):
    from library import original_unet as ou

    ch = tuple(spec["block_out_channels"])
    ou.BLOCK_OUT_CHANNELS = ch
    ou.TIMESTEP_INPUT_DIM = ch[0]
    ou.TIME_EMBED_DIM = ch[0] * 4
    unet = ou.UNet2DConditionModel(sample_size=spec.get("sample_size", 8),
                                   attention_head_dim=spec["attention_head_dim"],
                                   cross_attention_dim=spec["cross_attention_dim"],
                                   use_linear_projection=spec.get("use_linear_projection", False))
    missing, unexpected = unet.load_state_dict(base, strict=False)
    return unet.float().eval(), missing, unexpected


def sdxl_unet(spec: dict, base: dict[str, torch.Tensor]):
    """sd-scripts' own SDXL UNet (`library.sdxl_original_unet`: SDXL's block layout, LDM module names, heads of 64,
    cross-attention 2048 wide) with its two size constants set to the tiny model's channel count."""
    from library import sdxl_original_unet as su

    su.MODEL_CHANNELS = spec["model_channels"]
    su.TIME_EMBED_DIM = spec["model_channels"] * 4
    unet = su.SdxlUNet2DConditionModel()
    missing, unexpected = unet.load_state_dict(base, strict=False)
    return unet.float().eval(), missing, unexpected


def flux_model(spec: dict, base: dict[str, torch.Tensor]):
    from library import flux_models

    params = flux_models.FluxParams(**{k: v for k, v in spec.items() if not k.startswith("_")})
    model = flux_models.Flux(params)
    missing, unexpected = model.load_state_dict(base, strict=False)
    return model.float().eval(), missing, unexpected


def chroma_model(spec: dict, base: dict[str, torch.Tensor]):
    from library import chroma_models

    params = chroma_models.ChromaParams(**{k: v for k, v in spec.items() if not k.startswith("_")},
                                        _use_compiled=False)
    model = chroma_models.Chroma(params)
    missing, unexpected = model.load_state_dict(base, strict=False)
    return model.float().eval(), missing, unexpected


def oft_flux_module(hidden: int, mlp: int):
    """networks.oft_flux with its two hard-coded FLUX.1 split lists scaled to this model (see module docstring)."""
    import networks

    src_path = networks.__path__[0] + "/oft_flux.py"
    src = open(src_path, encoding="utf-8").read()
    old_qkv, old_l1 = "split_dims = [3072] * 3\n", "split_dims = [3072] * 3 + [12288]\n"
    if src.count(old_qkv) != 1 or src.count(old_l1) != 1:
        raise RuntimeError("oft_flux.py no longer hard-codes the split widths as expected")
    src = src.replace(old_qkv, f"split_dims = [{hidden}] * 3\n")
    src = src.replace(old_l1, f"split_dims = [{hidden}] * 3 + [{mlp}]\n")
    spec = importlib.util.spec_from_loader("networks.oft_flux", loader=None, origin=src_path)
    mod = importlib.util.module_from_spec(spec)
    mod.__file__ = src_path
    exec(compile(src, src_path, "exec"), mod.__dict__)
    return mod


def _oft_module(req):
    if req["kind"] in ("flux", "chroma"):
        spec = req["model"]
        return oft_flux_module(spec["hidden_size"], int(spec["hidden_size"] * spec["mlp_ratio"]))
    import networks.oft as oft

    return oft


def _build(req, base):
    build = {"flux": flux_model, "chroma": chroma_model, "sd": sd_unet, "sdxl": sdxl_unet}[req["kind"]]
    return build(req["model"], base)


def _lists(oft):
    """sd-scripts' create_network extends its class-level target list in place (`target_modules += ...`): later
    networks in the same process would adapt the conv blocks too. Snapshot, to restore after each network."""
    net = oft.OFTNetwork
    return {k: list(v) for k, v in vars(net).items() if k.endswith("_MODULE") or "_MODULE_" in k}


def _restore(oft, saved):
    for k, v in saved.items():
        getattr(oft.OFTNetwork, k)[:] = v


@contextlib.contextmanager
def _train_util_hashes():
    """`OFTNetwork.save_weights` imports `library.train_util` for two metadata hashes; that module imports accelerate,
    diffusers' pipelines, cv2 and the rest of sd-scripts' training stack, which this venv leaves out. For the duration
    of the save, `library.train_util` is a module holding only sd-scripts' own three hash functions, their source
    taken from train_util.py as it is (never written anywhere): the file is then byte for byte what save_weights
    writes in a full install."""
    import ast
    import hashlib
    import io
    import types

    import library
    import safetensors.torch

    path = library.__path__[0] + "/train_util.py"
    tree = ast.parse(open(path, encoding="utf-8").read())
    wanted = {"precalculate_safetensors_hashes", "addnet_hash_legacy", "addnet_hash_safetensors"}
    funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted]
    if {f.name for f in funcs} != wanted:
        raise RuntimeError(f"train_util.py no longer defines {sorted(wanted - {f.name for f in funcs})}")
    mod = types.ModuleType("library.train_util")
    mod.__file__ = path
    mod.__dict__.update(hashlib=hashlib, BytesIO=io.BytesIO, safetensors=safetensors)
    exec(compile(ast.Module(body=funcs, type_ignores=[]), path, "exec"), mod.__dict__)
    before = sys.modules.get("library.train_util")
    sys.modules["library.train_util"] = mod
    had = hasattr(library, "train_util")
    old = getattr(library, "train_util", None)
    library.train_util = mod
    try:
        yield
    finally:
        if before is None:
            sys.modules.pop("library.train_util", None)
        else:
            sys.modules["library.train_util"] = before
        if had:
            library.train_util = old
        else:
            del library.train_util


def _network(oft, req, model, m, sd, saved):
    if req.get("network_args") is None:  # what a user's tool run does with a file
        net, _ = oft.create_network_from_weights(m, req["adapter"], None, None, model, weights_sd=sd,
                                                 for_inference=True)
    else:  # the module set of a training option (SD1/2 conv: the loader drops it), the loader's own module class
        alpha = float(next(v for k, v in sd.items() if k.endswith(".alpha")))
        net = oft.OFTNetwork(None, model, multiplier=m, dim=req["dim"], alpha=alpha, module_class=oft.OFTInfModule,
                             **req["network_args"])
    _restore(oft, saved)
    return net


def run_sdscripts(req, result):
    base = load_file(req["base"])
    oft = _oft_module(req)
    model, missing, unexpected = _build(req, base)
    result["unexpected_base_keys"] = list(unexpected)
    saved = _lists(oft)
    if "targets_for" in req:  # the layers a training option adapts
        out = {}
        for name, args in req["targets_for"].items():
            net = oft.create_network(1.0, req.get("dim", 4), 1e-3, None, None, model, **args)
            _restore(oft, saved)
            out[name] = {o.oft_name: _path_of(model, o.org_module[0]) for o in net.unet_ofts}
        result["targets"] = out
    if "make" in req:  # sd-scripts writes the file: a training option's network, seeded blocks, its save_weights
        mk = req["make"]
        own = copy.deepcopy(model)  # apply_to (which registers the modules train_network saves) patches forwards
        net = oft.create_network(1.0, mk["dim"], mk["alpha"], None, None, own, **mk.get("network_args", {}))
        _restore(oft, saved)
        net.apply_to(None, own, apply_text_encoder=False, apply_unet=True)
        g = torch.Generator().manual_seed(mk["seed"])
        with torch.no_grad():
            for o in net.unet_ofts:
                o.oft_blocks.copy_(torch.randn(o.oft_blocks.shape, generator=g) * mk["std"])
        with _train_util_hashes():
            net.save_weights(mk["save"], getattr(torch, mk["dtype"]) if mk.get("dtype") else None,
                             dict(mk.get("metadata", {})))
        result["made"] = len(net.unet_ofts)
        req = dict(req, adapter=mk["save"])
    if "adapter" not in req:
        return {}
    sd = load_file(req["adapter"])
    file_layers = sorted({k.split(".")[0] for k in sd})
    tensors = {}
    for m in req["multipliers"]:
        net_model = copy.deepcopy(model)
        net = _network(oft, req, net_model, m, sd, saved)
        names = {o.oft_name for o in net.unet_ofts}
        loaded = [n for n in file_layers if n in names]
        result["loaded"], result["ignored"], result["dim"] = loaded, [n for n in file_layers if n not in names], net.dim
        paths = {o.oft_name: _path_of(net_model, o.org_module[0]) for o in net.unet_ofts if o.oft_name in loaded}
        result["paths"] = paths
        if req["kind"] in ("flux", "chroma"):
            try:
                net.merge_to(None, net_model, sd, torch.float32, "cpu")
                result["flux_merge"] = "merged"
            except Exception as e:  # sd-scripts cannot merge FLUX OFT (known): its forward is the reference
                result["flux_merge"] = f"{type(e).__name__}: {e}"
            net_model = copy.deepcopy(model)
            net = _network(oft, req, net_model, m, sd, saved)
            net.apply_to(None, net_model, apply_text_encoder=False, apply_unet=True)
            info = net.load_state_dict(sd, False)
            result["unexpected_adapter_keys"] = list(info.unexpected_keys)
            with torch.no_grad():
                for o in net.unet_ofts:
                    if o.oft_name not in paths:
                        continue
                    lin = o.org_module[0]
                    keep = lin.bias.detach().clone()
                    lin.bias.zero_()
                    y = o.forward(torch.eye(lin.in_features))  # I·(R·W)ᵀ + 0: the effective weight, exactly
                    lin.bias.copy_(keep)
                    tensors[f"m{m}/{paths[o.oft_name]}.weight"] = y.T.contiguous()
            continue
        net.merge_to(None, net_model, sd, torch.float32, "cpu")
        mods = dict(net_model.named_modules())
        for path in paths.values():
            tensors[f"m{m}/{path}.weight"] = mods[path].weight.detach().float().contiguous().clone()
    if req.get("merge_to_argument") is not None and req["kind"] == "sd":
        # OFTInfModule.merge_to(multiplier) ignores its argument (known): merge one module at network multiplier 1
        net_model = copy.deepcopy(model)
        net = _network(oft, req, net_model, 1.0, sd, saved)
        o = next(o for o in net.unet_ofts if o.oft_name in set(result["loaded"]))
        o.load_state_dict({k[len(o.oft_name) + 1:]: v for k, v in sd.items() if k.startswith(o.oft_name + ".")},
                          False)
        o.merge_to(req["merge_to_argument"])
        tensors[f"merge_to_arg/{result['paths'][o.oft_name]}.weight"] = o.org_module[0].weight.detach().clone()
    return tensors


def _path_of(root, module):
    for n, m in root.named_modules():
        if m is module:
            return n
    raise KeyError(module)


# ------------------------------------------------------------------------------------------------ LyCORIS
def _sd_scripts_sdxl_in_this_venv(source: str, spec: dict, base: dict[str, torch.Tensor]):
    """sd-scripts' own SDXL UNet (`sdxl_unet`) built from its source folder in another tool's venv, as a user of
    sd-scripts with `--network_module lycoris.kohya` has it. `library.sdxl_original_unet` imports only torch, einops
    and `library.utils`, whose import of cv2 (absent here) is for image helpers: where it cannot be imported,
    `library.utils` is a module holding a no-op `setup_logging`, the one name the UNet module takes from it."""
    import types

    if source not in sys.path:
        sys.path.insert(0, source)
    try:
        import library.utils  # noqa: F401
    except ModuleNotFoundError:
        stub = types.ModuleType("library.utils")
        stub.setup_logging = lambda *a, **k: None
        sys.modules["library.utils"] = stub
    return sdxl_unet(spec, base)


def _lycoris_on_sdxl(req, result, base):
    """LyCORIS' kohya network (what sd-scripts runs for `--network_module lycoris.kohya`) on sd-scripts' SDXL UNet:
    `create_network` with the request's algo arguments, seeded parameters, LyCORIS' own `save_weights`, then the file
    loaded back (`create_network_from_weights`) and merged (`merge_to`) at each multiplier."""
    from lycoris import kohya, wrapper

    mk = req["make_sdxl"]
    model, _, unexpected = _sd_scripts_sdxl_in_this_venv(mk["source"], req["model"], base)
    result["unexpected_base_keys"] = list(unexpected)
    own = copy.deepcopy(model)
    net = kohya.create_network(1.0, mk["dim"], mk["alpha"], None, [], own, **mk["network_args"])
    net.apply_to([], own, apply_text_encoder=False, apply_unet=True)
    g = torch.Generator().manual_seed(mk["seed"])
    with torch.no_grad():
        for name, p in net.named_parameters():  # the rescale around 1, every rotation parameter around 0
            p.copy_((1.0 if name.endswith("rescale") else 0.0) + torch.randn(p.shape, generator=g) * mk["std"])
    net.save_weights(mk["save"], getattr(torch, mk.get("dtype", "float32")), dict(mk.get("metadata", {})))
    sd = load_file(mk["save"])
    result["made"] = len({k.split(".")[0] for k in sd})
    tensors = {}
    for m in req["multipliers"]:
        # what sd-scripts calls to merge a lycoris.kohya network (its merge_to merges at 1 whatever the multiplier:
        # a known limit, kept under "kohya<m>/"), and LyCORIS' network merge at the multiplier itself ("m<m>/")
        for tag in ("kohya", "m"):
            merged = copy.deepcopy(model)
            net2, _ = kohya.create_network_from_weights(m, mk["save"], None, [], merged, weights_sd=sd,
                                                        for_inference=True)
            result["loaded"] = sorted(lora.lora_name for lora in net2.unet_loras)
            if tag == "kohya":
                net2.merge_to([], merged, sd, torch.float32, "cpu")
            else:
                net2.loras = net2.text_encoder_loras + net2.unet_loras
                wrapper.LycorisNetwork.merge_to(net2, m)
            for k, v in merged.state_dict().items():
                if not torch.equal(v, base[k]):
                    tensors[f"{tag}{m}/{k}"] = v.float().contiguous()
    return tensors


def run_lycoris(req, result):
    from lycoris import wrapper

    base = load_file(req["base"])
    if "make_sdxl" in req:
        return _lycoris_on_sdxl(req, result, base)
    sd = load_file(req["adapter"])
    wrapper.LycorisNetwork.LORA_PREFIX = req["prefix"]
    tensors = {}
    file_layers = sorted({k.split(".")[0] for k in sd})
    for m in req["multipliers"]:
        model = skeleton(base)
        names = {f"{req['prefix']}_{n}".replace(".", "_"): n for n, _ in model.named_modules()}
        net, _ = wrapper.create_lycoris_from_weights(m, req["adapter"], model, weights_sd=sd)
        result.setdefault("loaded", sorted(lora.lora_name for lora in net.loras))
        result.setdefault("ignored", [n for n in file_layers if n not in {lo.lora_name for lo in net.loras}])
        net.merge_to(m)
        for lora in net.loras:
            path = names[lora.lora_name]
            tensors[f"m{m}/{path}.weight"] = dict(model.named_modules())[path].weight.detach().float().clone()
    if req.get("kohya_sd_unet"):  # LyCORIS' kohya-style loader on a real (diffusers) SD UNet of this config
        import inspect

        from diffusers import UNet2DConditionModel
        from lycoris import kohya

        cfg = json.load(open(req["kohya_sd_unet"], encoding="utf-8"))
        allowed = inspect.signature(UNet2DConditionModel.__init__).parameters
        unet = UNet2DConditionModel(**{k: v for k, v in cfg.items() if k in allowed})
        try:
            net, _ = kohya.create_network_from_weights(1.0, req["adapter"], None, None, unet, weights_sd=sd,
                                                       for_inference=True)
            result["kohya_sd_unet"] = f"loaded {len(net.loras)} modules"
        except BaseException as e:  # noqa: BLE001  (an AssertionError is what 4.1.3 raises here)
            result["kohya_sd_unet"] = f"{type(e).__name__}: {e}"
    if req.get("kohya_loader"):  # LyCORIS' kohya-style path (what sd-scripts runs for a lycoris.kohya network)
        from lycoris import kohya

        m = req["kohya_loader"]
        model = skeleton(base)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        try:
            net, _ = kohya.create_network_from_weights(m, req["adapter"], None, None, model, weights_sd=sd,
                                                       for_inference=True)
            net.merge_to(None, model, sd, torch.float32, "cpu")
            result["kohya_loader"] = "merged"
            for k, v in model.state_dict().items():
                if not torch.equal(v, before[k]):
                    tensors[f"kohya{m}/{k}"] = v.float().contiguous()
        except Exception as e:
            result["kohya_loader"] = f"{type(e).__name__}: {e}"
    return tensors


# ------------------------------------------------------------------------------------------------ PEFT
class _BlockDiagPerFactor:
    """The one op of PEFT's BOFT CUDA extension (fbd_cuda.forward), by its definition: (N, D, H, H) blocks ->
    [(N, D·H, D·H)], one block-diagonal matrix per butterfly factor. Inference only (no backward)."""

    @staticmethod
    def forward(blocks):
        return [torch.stack([torch.block_diag(*factor) for factor in blocks])]


def run_peft(req, result):
    import peft

    base = load_file(req["base"])
    if req.get("make_boft", {}).get("factors", 1) > 1:
        import peft.tuners.boft.layer as boft_layer

        boft_layer._FBD_CUDA = _BlockDiagPerFactor  # get_fbd_cuda() returns it: PEFT keeps several factors
    if "make_boft" in req or "make_oft" in req:  # PEFT writes a BOFT / OFT adapter for this tree itself
        spec = req.get("make_boft") or req["make_oft"]
        torch.manual_seed(spec.get("seed", 0))
        if "make_boft" in req:
            cfg = peft.BOFTConfig(boft_block_size=0, boft_block_num=spec["block_num"],
                                  boft_n_butterfly_factor=spec.get("factors", 1),
                                  target_modules=spec["target_modules"], bias=spec.get("bias", "none"),
                                  init_weights=False)
        else:
            cfg = peft.OFTConfig(r=0, oft_block_size=spec["block_size"], target_modules=spec["target_modules"],
                                 bias=spec.get("bias", "none"), use_cayley_neumann=spec.get("neumann", False),
                                 init_weights=False)
        made = peft.get_peft_model(skeleton(base), cfg)
        with torch.no_grad():  # a trained bias (bias "boft_only" trains the adapted modules' biases)
            for name, p in made.named_parameters():
                if name.endswith(".bias") and p.requires_grad:
                    p.add_(0.1 * torch.randn(p.shape))
        made.save_pretrained(req["adapter"])
        result["made_type"] = str(made.peft_config["default"].peft_type)
    model = skeleton(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pm = peft.PeftModel.from_pretrained(model, req["adapter"])
    file_keys = set(load_file(req["adapter"] + "/adapter_model.safetensors"))
    every_key = {k.replace(".default", "") for k in pm.state_dict()}
    model_keys = {k for k in every_key if "oft_" in k}
    result["missing"] = sorted(model_keys - file_keys)
    result["unexpected"] = sorted(file_keys - every_key)  # (a trained bias is a key of the model too)
    result["peft_version"] = peft.__version__
    merged = pm.merge_and_unload()
    sd = merged.state_dict()
    tensors = {f"m1.0/{k}": v.float().contiguous() for k, v in sd.items()
               if k.endswith((".weight", ".bias")) and not torch.equal(v, before[k])}
    result["loaded"] = sorted(k[len("m1.0/"):-len(".weight")] for k in tensors if k.endswith(".weight"))
    return tensors


def run_one(req: dict) -> None:
    result: dict = {"ok": True}
    try:
        tensors = {"sdscripts": run_sdscripts, "lycoris": run_lycoris, "peft": run_peft}[req["tool"]](req, result)
        if tensors:
            save_file(tensors, req["out"])
    except Exception as e:
        result.update(ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
    with open(req["result"], "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)


def main() -> int:
    req = json.load(open(sys.argv[1], encoding="utf-8"))
    for job in req.get("jobs", [req]):  # several jobs share one start-up (importing a tool takes seconds)
        run_one(job)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
