#!/usr/bin/env bash
# Build (once) and report the reference tools' venvs of the REAL TOOLS test tier (pytest marker `tools`).
#
#   bash scripts/tools_venv.sh setup [sdscripts|lycoris|peft|dit ...] build / check them (default: all four)
#   bash scripts/tools_venv.sh python NAME                          print NAME's interpreter (after building it)
#
# Each tool lives in a venv of its own beside the main one (sd-scripts pins diffusers 0.32.1 and transformers 4.x,
# which conflict with ComfyUI's requirements):
#   ~/.cache/comfyui-oft/venv-sdscripts   kohya sd-scripts 48d368fa (source from ../shared/vendor, extracted into the
#                                         venv; never into the repo) + only what networks/oft*.py, library/utils.py,
#                                         original_unet.py and flux_models.py import, pinned as sd-scripts pins them
#   ~/.cache/comfyui-oft/venv-lycoris     lycoris-lora==4.1.3 (what the fixtures were made with) + diffusers 0.32.1
#                                         (a real SD UNet for LyCORIS' kohya-style loader)
#   ~/.cache/comfyui-oft/venv-peft        peft, newest from PyPI at build time (its version is in the stamp)
#   ~/.cache/comfyui-oft/venv-dit         diffusers + lycoris-lora + peft, all pinned: tiny diffusion transformers
#                                         (SD3, Wan, Qwen-Image, HiDream) adapted by LyCORIS' own wrapper and get_peft_model
#                                         (tests/test_tools_families.py); a venv of its own so that the two above
#                                         stay exactly what the fixtures were made with
#
# Torch is SHARED with the main venv, not installed again (OFT_TOOLS_TORCH=share, the default): a folder of
# symlinks, ~/.cache/comfyui-oft/torch-share, holds only torch, torchvision and their compiled dependencies
# (triton, nvidia-*, cuda-*) from the main venv, and each tool venv gets a .pth naming that folder — and nothing
# else of the main venv: the tools resolve every other package (numpy, transformers, ...) in their own venv, and a
# .pth path comes after the venv's own site-packages. pip, constrained to torch==2.14.1 torchvision==0.29.1, sees
# torch as installed and leaves it alone; pip never deletes files outside the venv it installs into.
# Measured on this machine (2 shared cores, torch wheels on local disk): a torch 2.14.1 + torchvision install into a
# fresh venv took 81 s and 5.5 GB — per tool venv, three times over (on a fresh CI machine that is also a multi-GB
# download each). Sharing takes < 1 s and no space; the three tool venvs then hold 590 MB (sd-scripts' diffusers,
# transformers, opencv), 301 MB (LyCORIS + diffusers) and 440 MB (PEFT, transformers, accelerate). Safe because the shared
# folder holds nothing but torch's own distributions, every tool resolves and pins the rest itself, each install is
# constrained to the same torch, and the import check below fails the build if a tool venv sees another torch.
# OFT_TOOLS_TORCH=copy installs torch into each venv instead (for a main venv that may change under the tools).
#
# Built once and reused: a stamp file per venv records a hash of what was asked for (this script's pins, the
# sd-scripts archive checksum, the shared-torch folder's target); a repeated run costs a metadata check only.
# Knobs: OFT_VENV (main venv), OFT_TOOLS_DIR (default ~/.cache/comfyui-oft), OFT_SDSCRIPTS_TARBALL,
# OFT_TOOLS_TORCH (share | copy).
set -euo pipefail

TORCH_VERSION="2.14.1"
TORCHVISION_VERSION="0.29.1"
SDSCRIPTS_COMMIT="48d368fa"
# sd-scripts' own pins (its requirements.txt) for what networks/oft.py, networks/oft_flux.py and the library modules
# they and the tests import need: diffusers/transformers (oft*.py import AutoencoderKL, CLIPTextModel), opencv,
# Pillow and torchvision (library/utils.py), einops, safetensors, huggingface-hub (diffusers/transformers).
SDSCRIPTS_PACKAGES=(diffusers==0.32.1 transformers==4.54.1 huggingface-hub==0.34.3 safetensors==0.4.5 einops==0.7.0
                    opencv-python==4.10.0.84 "numpy<2.3" pillow)
# diffusers only to build a real SD UNet for LyCORIS' kohya-style loader (the version sd-scripts pins)
LYCORIS_PACKAGES=(lycoris-lora==4.1.3 diffusers==0.32.1)
PEFT_PACKAGES=("peft>=0.21.2")
# diffusers 0.42.1 has SD3Transformer2DModel, WanTransformer3DModel and QwenImageTransformer2DModel; it imports no
# transformers for these model classes.
DIT_PACKAGES=(diffusers==0.42.1 lycoris-lora==4.1.3 peft==0.21.2 safetensors)
SCRIPT_VERSION=2  # bump to rebuild every tool venv

log() { printf '[tools_venv] %s\n' "$*" >&2; }
die() { printf '[tools_venv] ERROR: %s\n' "$*" >&2; exit 2; }

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${HOME:-}" ]]; then
    HOME="$(getent passwd "$(id -u)" | cut -d: -f6)"
    export HOME
fi
TOOLS_DIR="${OFT_TOOLS_DIR:-$HOME/.cache/comfyui-oft}"
MAIN_VENV="${OFT_VENV:-$HOME/.cache/comfyui-oft/venv}"
TORCH_MODE="${OFT_TOOLS_TORCH:-share}"
TARBALL="${OFT_SDSCRIPTS_TARBALL:-$REPO_ROOT/../shared/vendor/sd-scripts-$SDSCRIPTS_COMMIT.tar.gz}"
SHARE="$TOOLS_DIR/torch-share"
[[ "$TORCH_MODE" == share || "$TORCH_MODE" == copy ]] || die "OFT_TOOLS_TORCH must be share or copy, not $TORCH_MODE"

with_lock() {  # one builder at a time per venv (several checkouts share them)
    mkdir -p "$TOOLS_DIR"
    exec 8>"$1.lock"
    command -v flock >/dev/null 2>&1 && flock 8
    return 0
}

main_python() {  # the main venv, created or checked by scripts/run.sh (a metadata check when it is ready)
    OFT_VENV="$MAIN_VENV" bash "$REPO_ROOT/scripts/run.sh" setup >/dev/null 2>&1 \
        || OFT_VENV="$MAIN_VENV" bash "$REPO_ROOT/scripts/run.sh" setup >&2 || die "scripts/run.sh setup failed"
    echo "$MAIN_VENV/bin/python"
}

# The shared-torch folder: symlinks to the main venv's torch, torchvision and their compiled dependencies.
build_share() {
    local mpy
    mpy="$(main_python)"
    "$mpy" - "$SHARE" "$TORCH_VERSION" "$TORCHVISION_VERSION" <<'EOF'
import os, re, shutil, sys, tempfile
from importlib.metadata import distribution, PackageNotFoundError
share, want_torch, want_tv = sys.argv[1:]
try:
    from packaging.markers import Marker
except ImportError:  # pip vendors packaging
    from pip._vendor.packaging.markers import Marker

def norm(n):
    return re.sub(r"[-_.]+", "-", n).lower()

# Only the big compiled dependencies are shared; pure-Python ones (sympy, numpy, ...) each venv resolves itself.
SHARED = re.compile(r"^(torch|torchvision|triton|nvidia-.*|cuda-.*)$")
for name, want in (("torch", want_torch), ("torchvision", want_tv)):
    have = distribution(name).version.split("+")[0]
    if have != want:
        sys.exit(f"main venv has {name} {have}, want {want}: run scripts/run.sh setup")
seen, todo, dists = set(), [("torch", ()), ("torchvision", ())], {}
while todo:  # the dependency closure, extras included (torch needs cuda-toolkit[cublas,cudart,...])
    n, extras = todo.pop()
    n = norm(n)
    if (n, extras) in seen or not SHARED.match(n):
        continue
    seen.add((n, extras))
    try:
        d = distribution(n)
    except PackageNotFoundError:
        continue  # an optional compiled dependency the main venv does not have
    dists[n] = d
    for r in d.requires or []:
        spec, _, marker = r.partition(";")
        if marker and not any(Marker(marker).evaluate({"extra": e}) for e in extras + ("",)):
            continue
        m = re.match(r"\s*([A-Za-z0-9_.-]+)\s*(?:\[([^\]]*)\])?", spec)
        todo.append((m.group(1), tuple(x.strip() for x in (m.group(2) or "").split(",") if x.strip())))
dists = list(dists.values())
entries = set()
for d in dists:
    site = os.path.realpath(str(d.locate_file("")))
    for f in d.files or []:
        top = f.parts[0]
        if top not in ("..", "__pycache__") and os.path.exists(os.path.join(site, top)):
            entries.add((site, top))
tmp = tempfile.mkdtemp(prefix=".torch-share-", dir=os.path.dirname(share))
for site, top in sorted(entries):
    os.symlink(os.path.join(site, top), os.path.join(tmp, top))
if os.path.lexists(share):
    old = share + ".old"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(share, old)
    shutil.rmtree(old, ignore_errors=True)
os.replace(tmp, share)
print(f"{len(entries)} entries from {len(dists)} distributions: {', '.join(sorted(d.metadata['Name'] for d in dists))}")
EOF
}

ensure_share() {
    local want
    want="$(realpath "$MAIN_VENV")|$TORCH_VERSION|$TORCHVISION_VERSION"
    if [[ -f "$SHARE/.oft-share" && "$(cat "$SHARE/.oft-share")" == "$want" && -e "$SHARE/torch/__init__.py" ]]; then
        return
    fi
    with_lock "$SHARE"
    if [[ -f "$SHARE/.oft-share" && "$(cat "$SHARE/.oft-share")" == "$want" && -e "$SHARE/torch/__init__.py" ]]; then
        return
    fi
    log "sharing the main venv's torch: $(build_share)"
    echo "$want" >"$SHARE/.oft-share"
}

packages_of() {
    case "$1" in
        sdscripts) printf '%s\n' "${SDSCRIPTS_PACKAGES[@]}" ;;
        lycoris) printf '%s\n' "${LYCORIS_PACKAGES[@]}" ;;
        peft) printf '%s\n' "${PEFT_PACKAGES[@]}" ;;
        dit) printf '%s\n' "${DIT_PACKAGES[@]}" ;;
        *) die "unknown tool $1 (sdscripts | lycoris | peft | dit)" ;;
    esac
}

spec_hash() {
    local name="$1"
    {
        echo "v$SCRIPT_VERSION $TORCH_MODE $TORCH_VERSION $TORCHVISION_VERSION"
        packages_of "$name"
        [[ "$name" == sdscripts ]] && sha256sum "$TARBALL" | cut -c1-64
        [[ "$TORCH_MODE" == share ]] && cat "$SHARE/.oft-share"
    } | sha256sum | cut -c1-16
}

# The import check of each tool, run by its own interpreter (the torch it finds must be 2.14.1).
check_tool() {
    local name="$1" vpy="$2"
    "$vpy" - "$name" "$TORCH_VERSION" "$1" <<'EOF'
import logging, sys, importlib.metadata as md
name, want = sys.argv[1], sys.argv[2]
import torch
if torch.__version__.split("+")[0] != want:
    sys.exit(f"torch {torch.__version__} in the {name} venv, want {want}")
if name == "sdscripts":
    import networks.oft, networks.oft_flux, library.original_unet, library.flux_models  # noqa: F401
    print(f"sd-scripts {name and '48d368fa'} (diffusers {md.version('diffusers')}, transformers "
          f"{md.version('transformers')}), torch {torch.__version__}")
elif name == "lycoris":
    import lycoris  # noqa: F401
    print(f"lycoris-lora {md.version('lycoris-lora')}, torch {torch.__version__}")
elif name == "dit":
    import lycoris, peft  # noqa: F401, E401
    from diffusers import QwenImageTransformer2DModel, SD3Transformer2DModel, WanTransformer3DModel  # noqa: F401
    print(f"diffusers {md.version('diffusers')}, lycoris-lora {md.version('lycoris-lora')}, "
          f"peft {md.version('peft')}, torch {torch.__version__}")
else:
    import peft  # noqa: F401
    print(f"peft {md.version('peft')}, torch {torch.__version__}")
EOF
}

ensure_tool() {
    local name="$1" venv="$TOOLS_DIR/venv-$1" hash stamp
    [[ "$TORCH_MODE" == share ]] && ensure_share
    [[ "$name" == sdscripts && ! -f "$TARBALL" ]] && die "sd-scripts source not found at $TARBALL (set OFT_SDSCRIPTS_TARBALL)"
    hash="$(spec_hash "$name")"
    stamp="$venv/.oft-tools-$hash"
    [[ -f "$stamp" ]] && return
    with_lock "$venv"
    [[ -f "$stamp" ]] && return
    local start=$SECONDS py
    py="$(sed -n 's/^home = //p' "$MAIN_VENV/pyvenv.cfg")/python3"
    [[ -x "$py" ]] || py="$(command -v python3.11 || command -v python3)"
    log "building $venv (torch: $TORCH_MODE) with $py"
    rm -rf "$venv"
    "$py" -m venv "$venv"
    local vpy="$venv/bin/python" site
    site="$("$vpy" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    local tmp
    tmp="$(mktemp -d)"
    printf 'torch==%s\ntorchvision==%s\n' "$TORCH_VERSION" "$TORCHVISION_VERSION" >"$tmp/constraints.txt"
    # torch and torchvision are always named: shared, pip finds them installed and still resolves their pure-Python
    # dependencies (sympy, networkx, jinja2, ...) into this venv; copied, it installs them.
    local extra=("torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION")
    [[ "$TORCH_MODE" == share ]] && echo "$SHARE" >"$site/_oft_shared_torch.pth"
    if [[ "$name" == sdscripts ]]; then
        # sd-scripts is not a package: its source tree goes into the venv and onto its path (never into the repo)
        tar -xzf "$TARBALL" -C "$venv"
        echo "$venv/sd-scripts" >"$site/_oft_sd_scripts.pth"
    fi
    local pip_log="$venv/.oft-pip.log"
    mapfile -t pkgs < <(packages_of "$name")
    if ! nice "$vpy" -m pip install --disable-pip-version-check -c "$tmp/constraints.txt" "${extra[@]}" \
            "${pkgs[@]}" >"$pip_log" 2>&1; then
        grep -v "is ignored: it is neither a file nor a directory" "$pip_log" | tail -n 40 >&2 || true
        rm -rf "$tmp"
        die "pip install for $name failed (full log: $pip_log)"
    fi
    rm -rf "$tmp"
    local what
    what="$(check_tool "$name" "$vpy" 2>/dev/null | tail -n 1)" || die "$name venv built but its import check failed"
    "$vpy" -m pip freeze --disable-pip-version-check >"$venv/.oft-freeze.txt" 2>/dev/null || true
    rm -f "$venv"/.oft-tools-*
    echo "$what" >"$stamp"
    log "$name ready in $((SECONDS - start))s: $what ($(du -sh "$venv" | cut -f1) on disk)"
}

cmd="${1:-setup}"
shift || true
case "$cmd" in
    setup)
        tools=("$@")
        [[ ${#tools[@]} -eq 0 ]] && tools=(sdscripts lycoris peft dit)
        [[ "$TORCH_MODE" == share ]] && ensure_share
        # the venvs are independent: built side by side (downloads and unpacking overlap; measured 7.9 min one after
        # another from scratch on a loaded 2-core machine)
        pids=()
        for t in "${tools[@]}"; do
            ensure_tool "$t" &
            pids+=($!)
        done
        failed=0
        for i in "${!pids[@]}"; do
            wait "${pids[$i]}" || { log "${tools[$i]}: build failed"; failed=1; }
        done
        [[ $failed -eq 0 ]] || die "some tool venvs could not be built"
        for t in "${tools[@]}"; do
            log "$t: $TOOLS_DIR/venv-$t ($(cat "$TOOLS_DIR/venv-$t"/.oft-tools-*))"
        done
        ;;
    python)
        [[ $# -eq 1 ]] || die "usage: tools_venv.sh python NAME"
        ensure_tool "$1"
        echo "$TOOLS_DIR/venv-$1/bin/python"
        ;;
    *)
        sed -n '2,5p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
        exit 2
        ;;
esac
