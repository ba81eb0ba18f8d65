"""The frontend side of the `browser` tier, as a plain module (conftest.py and make_thumbnails.py use it): which
Chromium to drive, the files the shipped workflows name, and a page with ComfyUI's frontend loaded.

Facts this relies on (ComfyUI 0.3.64, frontend 1.27.10, seen in the page):
- `window.app` is the ComfyApp; `app.loadGraphData(json, clean, restoreView, name, {showMissingNodesDialog,
  showMissingModelsDialog})` loads a workflow as opening a file does; `app.graphToPrompt()` gives `{output, workflow}`,
  `output` being what Run sends to POST /prompt; `app.queuePrompt(0, 1)` is the Run button and returns
  `!node_errors`, which is false even on success ({}), so check `app.lastNodeErrors` instead.
- A first visit opens the template browser over the canvas unless the setting Comfy.TutorialCompleted is true.
- The frontend throws while building any `ckpt_name` / `lora_name` / `vae_name` combo when a node class its model
  table names is missing from /object_info: core's UpscaleModelLoader is missing when `spandrel` is not installed
  (ComfyUI's nodes_upscale_model.py imports it). scripts/run.sh installs spandrel within the torch pins for that.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parents[1]
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

import comfy_server as harness  # noqa: E402  (plain helper in tests/)

BROWSER_DIR = Path(__file__).resolve().parent
WORKFLOWS = sorted((harness.REPO_ROOT / "workflows").glob("*.json"))
VIEWPORT = {"width": 1600, "height": 1000}
FRONTEND_TIMEOUT_MS = 180_000

# What the shipped workflows name, by model folder. OFT adapters are the reference fixtures (they must pass the
# header check); other model files only need to exist for /prompt validation (those workflows are not run here).
SD15_ADAPTER = "kohya/sd15_oft_attn_dim8_bf16.safetensors"
FLUX_ADAPTER = "kohya/flux_tiny_oft_attn_dim4.safetensors"


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
            elif t in ("OFTLoader", "OFTLoadAdapter", "OFTHook"):
                src = fixtures / (FLUX_ADAPTER if "flux" in values[0] else SD15_ADAPTER)
                dest = models / "oft" / values[0]
                if not dest.exists():
                    shutil.copy(src, dest)
            elif t == "OFTLoadImages":
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
    """One Chromium page on a server's frontend; records page errors and console errors."""

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
            if isinstance(e, KeyboardInterrupt) or type(e).__name__ == "Skipped":
                raise
            try:
                where = f"screenshot of the page: {self.screenshot(name)} (failures folder {self.shots_dir})"
            except Exception as shot_error:  # noqa: BLE001  (the original failure matters more)
                where = f"(no screenshot: {shot_error})"
            raise AssertionError(f"{type(e).__name__}: {e}\n{where}") from e

    def reload(self) -> None:
        # a first visit opens the template browser over the canvas ("Get Started"): this user has seen it
        self.server.post("/settings/Comfy.TutorialCompleted", True)
        self.page.goto(self.server.url)
        self.page.wait_for_function("window.app && window.app.graph && window.app.canvas && "
                                    "window.app.extensions && window.app.extensions.length > 0",
                                    timeout=FRONTEND_TIMEOUT_MS)
        self.page.wait_for_function("app.extensions.some(e => e.name === 'comfyui-oft.NodeReports')",
                                    timeout=FRONTEND_TIMEOUT_MS)




LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]


@contextlib.contextmanager
def open_frontend(server, shots_dir: Path, viewport: dict | None = None):
    """A BrowserSession on `server`'s frontend in headless Chromium (the system executable, never a download).
    Raises RuntimeError when playwright or Chromium is missing (callers that are tests skip before)."""
    from playwright.sync_api import sync_playwright

    exe = chromium_executable()
    if exe is None:
        raise RuntimeError("no Chromium executable (OFT_CHROMIUM, /usr/bin/chromium or chromium on PATH)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=LAUNCH_ARGS)
        try:
            page = browser.new_page(viewport=viewport or VIEWPORT)
            session = BrowserSession(server, page, Path(shots_dir))
            with session.failure_shot("frontend_start"):
                session.reload()
            yield session
        finally:
            browser.close()
