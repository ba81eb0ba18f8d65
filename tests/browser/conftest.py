"""Fixtures of the `browser` tier: ComfyUI's own frontend in headless Chromium, driven by Python playwright, against
the real server of tests/comfy_server.py (the same shared server as the `server` tier).

- `comfy_page` (session): the shared server with the files the shipped workflows name (tiny SD1.5 checkpoint under
  the SD1.5 name, OFT fixture adapters under the adapter names, empty FLUX files, a training image folder) and one
  Chromium page with the frontend loaded. Every test that uses it is marked `browser`.
- `BrowserSession.failure_shot(name)`: a context manager that, when the block fails, saves a screenshot into the
  session's failure folder and names the file in the failure message.

Prerequisites, each a skip with its reason when missing: ComfyUI (COMFYUI_PATH or the default folder), the Python
package playwright (scripts/run.sh installs it) and a Chromium executable (OFT_CHROMIUM, else /usr/bin/chromium or
`chromium` on PATH; .ci/run installs Debian's package). Playwright's own browser download is never used.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

import comfy_models
import comfy_server as harness

BROWSER_DIR = Path(__file__).resolve().parent
WORKFLOWS = sorted((harness.REPO_ROOT / "workflows").glob("*.json"))
VIEWPORT = {"width": 1600, "height": 1000}
FRONTEND_TIMEOUT_MS = 180_000

# What the shipped workflows name, by model folder. OFT adapters are the reference fixtures (they must pass the
# header check); other model files only need to exist for /prompt validation (those workflows are not run here).
SD15_ADAPTER = "kohya/sd15_oft_attn_dim8_bf16.safetensors"
FLUX_ADAPTER = "kohya/flux_tiny_oft_attn_dim4.safetensors"


def pytest_configure(config):
    config.addinivalue_line("markers", "browser: ComfyUI's frontend in headless Chromium (playwright) against a real "
                            "ComfyUI server (tests/browser)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if BROWSER_DIR in Path(str(item.fspath)).resolve().parents and item.get_closest_marker("browser") is None:
            item.add_marker(pytest.mark.browser)


def chromium_executable() -> str | None:
    env = os.environ.get("OFT_CHROMIUM")
    if env:
        return env if os.access(env, os.X_OK) else None
    for candidate in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def install_workflow_files(base: Path, fixtures: Path) -> None:
    """Put a file under every name the shipped workflows use into the server's private folders."""
    models = base / "models"
    for wf in WORKFLOWS:
        for node in json.loads(wf.read_text())["nodes"]:
            values = node.get("widgets_values") or []
            t = node["type"]
            if t == "CheckpointLoaderSimple":
                harness.install_checkpoint(base, values[0])
            elif t == "UNETLoader":
                (models / "diffusion_models" / values[0]).touch()
            elif t == "DualCLIPLoader":
                for name in values[:2]:
                    (models / "text_encoders" / name).touch()
            elif t == "VAELoader":
                (models / "vae" / values[0]).touch()
            elif t in ("OFTLoader", "OFTLoadAdapter"):
                src = fixtures / (FLUX_ADAPTER if "flux" in values[0] else SD15_ADAPTER)
                dest = models / "oft" / values[0]
                if not dest.exists():
                    shutil.copy(src, dest)
            elif t == "LoadImageSetFromFolderNode":
                folder = base / "input" / values[0]
                if not folder.is_dir():
                    harness.write_images(folder, 2)


def install_report_files(base: Path, fixtures: Path) -> None:
    """Adapters for the tiny checkpoint (test_reports_*): the sd-scripts fixture's 16 layers of two SD1.5 blocks,
    of which the one-level tiny UNet has the first (down_blocks.0, 8 layers) and not the second (up_blocks.3):
    `models/oft/tiny_sd15_oft.safetensors` (kohya) and, with the same blocks under LyCORIS names (core Load LoRA
    reads them as its own OFT), `models/loras/tiny_sd15_lycoris_oft.safetensors`."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    kohya = base / "models" / "oft" / "tiny_sd15_oft.safetensors"
    lyco = base / "models" / "loras" / "tiny_sd15_lycoris_oft.safetensors"
    if kohya.exists() and lyco.exists():
        return
    with safe_open(str(fixtures / SD15_ADAPTER), "pt") as f:
        meta = f.metadata()
        keep = {k: f.get_tensor(k) for k in f.keys()
                if "_down_blocks_0_attentions_0_" in k or "_up_blocks_3_attentions_2_" in k}
    assert len(keep) == 32, sorted(keep)
    save_file(keep, str(kohya), metadata=meta)
    lyco_sd = {"lycoris_" + k[len("oft_unet_"):]: v.float() for k, v in keep.items()}
    save_file({k: (v if k.endswith(".oft_blocks") else v.new_zeros(())) for k, v in lyco_sd.items()}, str(lyco))


class BrowserSession:
    def __init__(self, server, page, shots_dir: Path):
        self.server = server
        self.page = page
        self.shots_dir = shots_dir
        self.page_errors: list[str] = []
        self.console_errors: list[str] = []
        page.on("pageerror", lambda e: self.page_errors.append(str(e)))
        page.on("console", lambda m: self.console_errors.append(m.text) if m.type == "error" else None)

    def screenshot(self, name: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        path = self.shots_dir / f"{safe}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    @contextlib.contextmanager
    def failure_shot(self, name: str):
        """On an exception in the block: screenshot, and the path appended to the failure message."""
        try:
            yield
        except BaseException as e:
            if isinstance(e, (KeyboardInterrupt, pytest.skip.Exception)):
                raise
            try:
                where = f"screenshot of the page: {self.screenshot(name)} (failures folder {self.shots_dir})"
            except Exception as shot_error:  # noqa: BLE001  (the original failure matters more)
                where = f"(no screenshot: {shot_error})"
            pytest.fail(f"{type(e).__name__}: {e}\n{where}", pytrace=True)

    def reload(self) -> None:
        # a first visit opens the template browser over the canvas ("Get Started"): this user has seen it
        self.server.post("/settings/Comfy.TutorialCompleted", True)
        self.page.goto(self.server.url)
        self.page.wait_for_function("window.app && window.app.graph && window.app.canvas && "
                                    "window.app.extensions && window.app.extensions.length > 0",
                                    timeout=FRONTEND_TIMEOUT_MS)
        self.page.wait_for_function("app.extensions.some(e => e.name === 'comfyui-oft.NodeReports')",
                                    timeout=FRONTEND_TIMEOUT_MS)


@pytest.fixture(scope="session")
def comfy_page(fixtures_dir):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the Python package playwright is not installed (bash scripts/run.sh installs it): browser tests "
                    "skipped")
    exe = chromium_executable()
    if exe is None:
        pytest.skip("no Chromium executable (OFT_CHROMIUM, /usr/bin/chromium or chromium on PATH; .ci/run installs "
                    "Debian's chromium): browser tests skipped")
    try:
        server = harness.shared_server()
    except comfy_models.ComfyUINotFound as e:
        pytest.skip(f"ComfyUI not found ({e}): browser tests skipped")
    install_workflow_files(server.base, fixtures_dir)
    install_report_files(server.base, fixtures_dir)
    shots = Path(tempfile.mkdtemp(prefix="oft-browser-failures-"))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu",
                                                                "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport=VIEWPORT)
            session = BrowserSession(server, page, shots)
            with session.failure_shot("frontend_start"):
                session.reload()
            yield session
        finally:
            browser.close()
    if not any(shots.iterdir()):
        shots.rmdir()
