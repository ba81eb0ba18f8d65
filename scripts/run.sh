#!/usr/bin/env bash
# The one entry point of comfyui-oft for developers and CI.
#
#   bash scripts/run.sh test [pytest args]   run the test suite (pytest -q -ra) from the repo root
#   bash scripts/run.sh setup                only create/update the venv and say what was found
#   bash scripts/run.sh <anything else>      python -m oft_core <anything else>   (demo, inspect, bake, ...)
#
# It creates or updates a venv (default ~/.cache/comfyui-oft/venv, override with OFT_VENV) and installs the
# pinned torch==2.14.1 / torchvision==0.29.1 plus safetensors numpy einops pytest. When a ComfyUI source tree is
# found (COMFYUI_PATH, else ~/.cache/comfyui-oft/ComfyUI) it also installs ComfyUI's requirements.txt without
# torch/torchvision/torchaudio/spandrel, constrained to the same torch pins, and exports COMFYUI_PATH so that
# the real-ComfyUI integration tests run.
#
# Why the pins: an unpinned torch, torchvision or torchaudio (or spandrel, which requires them) makes pip
# resolve the newest release, a CUDA build of several GB. torch 2.14.1 + torchvision 0.29.1 are a pair that
# imports together (ComfyUI needs torchvision at import time) and whose cp311 wheels lie on this machine's disk.
#
# Environment knobs: OFT_VENV, OFT_PYTHON (interpreter used to create the venv), COMFYUI_PATH.
# Repeated runs take well under a second before pytest starts: the install checks read package metadata only,
# and ComfyUI's requirements are installed once per requirements.txt content (a stamp file in the venv).
set -euo pipefail

TORCH_VERSION="2.14.1"
TORCHVISION_VERSION="0.29.1"
BASE_PACKAGES=(safetensors numpy einops pytest)

log() { printf '[run.sh] %s\n' "$*" >&2; }
die() { printf '[run.sh] ERROR: %s\n' "$*" >&2; exit 2; }

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${HOME:-}" ]]; then
    HOME="$(getent passwd "$(id -u)" | cut -d: -f6)"
    export HOME
fi
CACHE_DIR="$HOME/.cache/comfyui-oft"
VENV="${OFT_VENV:-$CACHE_DIR/venv}"
VPY="$VENV/bin/python"

usage() {
    sed -n '2,6p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
}

# ---------------------------------------------------------------------------------------------- python / venv
# Interpreters to create the venv with, best first. The torch wheels on this machine's disk are cp311: prefer 3.11.
python_candidates() {
    if [[ -n "${OFT_PYTHON:-}" ]]; then
        echo "$OFT_PYTHON"
        return
    fi
    echo python3.11
    echo python3
}

create_venv() {
    local candidate py fresh=""
    [[ -e "$VENV" ]] || fresh=1
    while read -r candidate; do
        py="$(command -v "$candidate" 2>/dev/null)" || continue
        log "creating venv $VENV with $py ($("$py" --version 2>&1))"
        if "$py" -m venv "$VENV" </dev/null; then
            return 0
        fi
        log "could not create a venv with $py; trying the next interpreter"
        [[ -n "$fresh" ]] && rm -rf "$VENV"   # only remove what this attempt made
    done < <(python_candidates)
    die "no usable python3 (tried: $(python_candidates | tr '\n' ' ')); set OFT_PYTHON to an interpreter with venv"
}

# Cheap check (package metadata only, no torch import): prints what is missing or wrong, exits 1 if anything is.
base_ok() {
    "$VPY" - "$TORCH_VERSION" "$TORCHVISION_VERSION" "${BASE_PACKAGES[@]}" <<'EOF'
import sys
from importlib.metadata import version, PackageNotFoundError
want_torch, want_tv, *others = sys.argv[1:]
problems = []
for name, want in (("torch", want_torch), ("torchvision", want_tv)):
    try:
        have = version(name)
    except PackageNotFoundError:
        problems.append(f"{name} missing")
        continue
    if have.split("+")[0] != want:
        problems.append(f"{name} {have} (want {want})")
for name in others:
    try:
        version(name)
    except PackageNotFoundError:
        problems.append(f"{name} missing")
if problems:
    print(", ".join(problems))
    sys.exit(1)
EOF
}

# pip, quietly: its output goes to a log in the venv, shown (without the noise of the machine's missing local
# index folders) only when pip fails.
pip_install() {
    local pip_log="$VENV/.oft-last-pip.log"
    if ! "$VPY" -m pip install --quiet --disable-pip-version-check "$@" >"$pip_log" 2>&1; then
        grep -v "is ignored: it is neither a file nor a directory" "$pip_log" | tail -n 60 >&2 || true
        log "full pip output: $pip_log"
        return 1
    fi
}

with_lock() {
    # Serialize installs into one venv (several checkouts may share it); flock is in util-linux.
    local lockfile="$VENV.lock"
    mkdir -p "$(dirname "$lockfile")"
    if command -v flock >/dev/null 2>&1; then
        exec 9>"$lockfile"
        flock 9
    fi
}

release_lock() {
    exec 9>&-
}

ensure_venv() {
    local why
    if [[ -x "$VPY" ]] && why="$(base_ok 2>&1)"; then
        return
    fi
    with_lock
    if [[ ! -x "$VPY" ]]; then
        mkdir -p "$(dirname "$VENV")"
        create_venv
    fi
    if why="$(base_ok 2>&1)"; then   # another run installed it while we waited
        release_lock
        return
    fi
    log "installing torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION ${BASE_PACKAGES[*]} into $VENV ($why)"
    pip_install "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" "${BASE_PACKAGES[@]}" \
        || die "pip install of the base packages failed (see pip's messages above)"
    why="$(base_ok 2>&1)" || die "base packages still not right after install: $why"
    release_lock
}

# ---------------------------------------------------------------------------------------------- ComfyUI
COMFY_FOUND=""
COMFY_WHY=""
find_comfyui() {
    local candidate
    if [[ -n "${COMFYUI_PATH:-}" ]]; then
        candidate="$COMFYUI_PATH"
        if [[ ! -f "$candidate/comfy/model_patcher.py" ]]; then
            die "COMFYUI_PATH=$COMFYUI_PATH is not a ComfyUI source tree (no comfy/model_patcher.py)"
        fi
    else
        candidate="$CACHE_DIR/ComfyUI"
        if [[ ! -f "$candidate/comfy/model_patcher.py" ]]; then
            COMFY_WHY="ComfyUI not found (COMFYUI_PATH unset, nothing at $candidate)"
            return
        fi
    fi
    COMFY_FOUND="$(cd "$candidate" && pwd)"
}

ensure_comfy_requirements() {
    local req="$COMFY_FOUND/requirements.txt"
    [[ -f "$req" ]] || die "$req not found: ComfyUI at $COMFY_FOUND looks incomplete"
    local hash stamp
    hash="$( (cat "$req"; echo "torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION") | sha256sum | cut -c1-16)"
    stamp="$VENV/.oft-comfyui-requirements-$hash"
    [[ -f "$stamp" ]] && return
    with_lock
    if [[ -f "$stamp" ]]; then release_lock; return; fi
    local tmp
    tmp="$(mktemp -d)"
    # Drop torch, torchvision, torchaudio and spandrel (spandrel pulls an unpinned torch); keep torchsde etc.
    grep -Eiv '^[[:space:]]*(torch|torchvision|torchaudio|spandrel)[[:space:]]*([<>=!~;[].*)?$' "$req" >"$tmp/requirements.txt"
    printf 'torch==%s\ntorchvision==%s\n' "$TORCH_VERSION" "$TORCHVISION_VERSION" >"$tmp/constraints.txt"
    log "installing ComfyUI's requirements (without torch/torchvision/torchaudio/spandrel) + requests into $VENV"
    if ! pip_install -r "$tmp/requirements.txt" -c "$tmp/constraints.txt" requests; then
        rm -rf "$tmp"
        die "pip install of ComfyUI's requirements failed (see pip's messages above)"
    fi
    rm -rf "$tmp"
    local why
    why="$(base_ok 2>&1)" || die "ComfyUI's requirements changed the torch pins: $why"
    rm -f "$VENV"/.oft-comfyui-requirements-*
    touch "$stamp"
    release_lock
}

# ---------------------------------------------------------------------------------------------- browser tier
# The browser tests (tests/browser) drive ComfyUI's frontend with Python playwright and the system Chromium
# (never playwright's own browser download). spandrel: ComfyUI's UpscaleModelLoader imports it, and frontend 1.27.10
# throws while building any ckpt_name / lora_name / vae_name combo when that node is missing from /object_info.
# Both are installed within the torch pins (spandrel's own torch requirement is unpinned).
BROWSER_PACKAGES=(playwright==1.65.2 spandrel==0.4.2)
browser_packages_ok() {
    "$VPY" - "${BROWSER_PACKAGES[@]}" <<'EOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
sys.exit(any(version(n) != v for n, v in (s.split("==") for s in sys.argv[1:])))
EOF
}

ensure_browser_packages() {
    browser_packages_ok && return
    with_lock
    if browser_packages_ok; then release_lock; return; fi
    local tmp
    tmp="$(mktemp -d)"
    printf 'torch==%s\ntorchvision==%s\n' "$TORCH_VERSION" "$TORCHVISION_VERSION" >"$tmp/constraints.txt"
    log "installing ${BROWSER_PACKAGES[*]} (browser tests) into $VENV"
    if ! pip_install "${BROWSER_PACKAGES[@]}" -c "$tmp/constraints.txt"; then
        rm -rf "$tmp"
        die "pip install of ${BROWSER_PACKAGES[*]} failed (see pip's messages above)"
    fi
    rm -rf "$tmp"
    release_lock
}

# ---------------------------------------------------------------------------------------------- main
cmd="${1:-}"
case "$cmd" in
    ""|-h|--help|help)
        usage
        [[ -n "$cmd" ]] && exit 0 || exit 2
        ;;
esac
shift

ensure_venv
find_comfyui
if [[ -n "$COMFY_FOUND" ]]; then
    ensure_comfy_requirements
    ensure_browser_packages
    export COMFYUI_PATH="$COMFY_FOUND"
else
    unset COMFYUI_PATH
fi

case "$cmd" in
    setup)
        log "venv: $VENV ($("$VPY" --version 2>&1))"
        if [[ -n "$COMFY_FOUND" ]]; then
            log "ComfyUI: $COMFY_FOUND (requirements installed)"
        else
            log "$COMFY_WHY: the real-ComfyUI integration tests will be skipped"
        fi
        ;;
    test)
        if [[ -n "$COMFY_FOUND" ]]; then
            log "ComfyUI at $COMFY_FOUND: integration tests enabled"
        else
            log "$COMFY_WHY: integration tests will be skipped"
        fi
        cd "$REPO_ROOT"
        log "$VPY -m pytest -q -ra $*"
        exec "$VPY" -m pytest -q -ra "$@"
        ;;
    *)
        export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
        exec "$VPY" -m oft_core "$cmd" "$@"
        ;;
esac
