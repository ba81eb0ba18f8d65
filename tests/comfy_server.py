"""A real ComfyUI server for tests (the `server` and `browser` tiers): plain helper module, no pytest import needed.

What it gives (each documented below):

- `private_comfyui(dest, pack_root=REPO_ROOT)`: a private ComfyUI folder under `dest`: symlinks to every file and
  folder of the read-only source tree except `custom_nodes/`, `models/`, `input/`, `output/`, `temp/`, `user/`,
  which are private (models/ gets the stock sub-folders, empty); the pack is linked into `custom_nodes/comfyui-oft`.
- `tiny_sd15_unet()` / `install_unet(base)`: the same UNet alone, for `UNETLoader`.
- `tiny_sd15_checkpoint()`: path of a small SD1.5-family checkpoint that the STOCK `CheckpointLoaderSimple` detects
  and loads (UNet, CLIP-L text encoder and a TAESD VAE, fp16, deterministic pseudo-random weights), written once
  and cached under ~/.cache/comfyui-oft/test-models/ (about 300 MB; ~10 s to make the first time).
- `ComfyServer`: starts ComfyUI's own `main.py --cpu` on a free loopback port in such a private folder, waits until
  it answers, and offers `get` / `post` / `object_info()` / `queue(prompt)` / `wait(prompt_id)` / `run(prompt)` /
  `interrupt()` and a websocket listener (`ws_messages`, `wait_ws(predicate)`); `stop()` ends it by its PID.
  Its console log is `server.log_path` (the tail is included in every error this module raises).
- `shared_server()`: one server per pytest process for all tiers (started on first use, stopped at exit or by
  `stop_shared_server()`); use it from a session-scoped fixture (tests/server/conftest.py has `comfy_server`).
- `workflow_to_api(workflow, object_info)`: a UI workflow (the JSON the frontend saves, as in workflows/) in the
  API format `/prompt` takes, widget values mapped by the node's `/object_info` inputs (incl. the frontend's
  "control after generate" slot after `seed` / `noise_seed` / `control_after_generate` INT inputs).

Facts this relies on (ComfyUI 0.3.64): `--base-directory` moves models/custom_nodes/input/output/temp/user; the
database defaults to <ComfyUI>/user/comfyui.db (we pass an in-memory one); every node runs under
`torch.inference_mode()`; `CheckpointLoaderSimple` detects SD1.5 by 320 channels and context 768 only, reads a
TAESD VAE from `first_stage_model.taesd_{encoder,decoder}.*` keys, and loads the full CLIP-L shape (its config is
fixed: a smaller text encoder is not accepted). Python byte code of the server goes to a cache folder
(PYTHONPYCACHEPREFIX) so nothing is written into the read-only ComfyUI tree.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

import comfy_models  # noqa: E402  (plain helper next to this file)

log = logging.getLogger(__name__)

REPO_ROOT = TESTS_DIR.parent
CACHE_DIR = Path.home() / ".cache" / "comfyui-oft"
MODEL_CACHE = CACHE_DIR / "test-models"
PACK_DIR_NAME = "comfyui-oft"
PRIVATE_DIRS = ("custom_nodes", "models", "input", "output", "temp", "user")
CHECKPOINT_NAME = "oft_tiny_sd15.safetensors"
UNET_NAME = "oft_tiny_sd15_unet.safetensors"
CHECKPOINT_VERSION = 1  # bump when the checkpoint's contents change (new cache file name)

# One-level SD1.5-family UNet with the real channel counts (320, context 768): the smallest UNet that
# comfy.model_detection still recognises as SD1.5 (25.8 M parameters).
TINY_SD15_UNET = dict(
    comfy_models.SD15_UNET_CONFIG,
    channel_mult=[1],
    num_res_blocks=[1],
    transformer_depth=[1],
    transformer_depth_output=[1, 1],
    transformer_depth_middle=1,
)


# ------------------------------------------------------------------------------------------------ private tree
def find_comfyui() -> Path:
    """The read-only ComfyUI source tree (COMFYUI_PATH, else ~/.cache/comfyui-oft/ComfyUI); raises
    comfy_models.ComfyUINotFound."""
    return comfy_models.find_comfyui()


def private_comfyui(dest: Path | str, pack_root: Path | str = REPO_ROOT, comfy_root: Path | str | None = None) -> Path:
    """Make `dest` a ComfyUI folder of its own and return it (see the module docstring). Idempotent."""
    src = Path(comfy_root) if comfy_root else find_comfyui()
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for entry in src.iterdir():
        if entry.name in PRIVATE_DIRS or entry.name == "__pycache__":
            continue
        link = dest / entry.name
        if not link.exists() and not link.is_symlink():
            link.symlink_to(entry)
    for name in PRIVATE_DIRS:
        (dest / name).mkdir(exist_ok=True)
    if (src / "models").is_dir():
        for sub in (src / "models").iterdir():
            if sub.is_dir():
                (dest / "models" / sub.name).mkdir(exist_ok=True)
    (dest / "models" / "oft").mkdir(exist_ok=True)
    pack_link = dest / "custom_nodes" / PACK_DIR_NAME
    if not pack_link.exists() and not pack_link.is_symlink():
        pack_link.symlink_to(Path(pack_root).resolve(), target_is_directory=True)
    return dest


# ------------------------------------------------------------------------------------------------ tiny checkpoint
def _fill(name: str, shape: tuple, gen) -> "torch.Tensor":  # noqa: F821
    """Deterministic values that keep activations sane: norms 1, biases 0, weights N(0, 1/fan_in)."""
    import torch

    if len(shape) == 0:
        return torch.tensor(0.0 if name.endswith("vae_shift") else 1.0)
    if name.endswith("bias"):
        return torch.zeros(shape)
    if len(shape) == 1:
        return torch.ones(shape) if ("norm" in name or name.endswith("weight")) else torch.zeros(shape)
    fan_in = 1
    for d in shape[1:]:
        fan_in *= d
    std = 0.02 if "embedding" in name else fan_in ** -0.5
    return torch.randn(shape, generator=gen) * std


def tiny_sd15_state_dict(seed: int = 0, dtype=None) -> dict:
    """The checkpoint's tensors: `model.diffusion_model.*` (TINY_SD15_UNET), `cond_stage_model.transformer.*` (CLIP-L
    as ComfyUI builds it) and `first_stage_model.taesd_*` (TAESD). Shapes come from ComfyUI's own classes built on
    the meta device, so they are exactly what the loaders expect. Imports ComfyUI (CPU) in this process."""
    import torch

    comfy_models.import_comfy()
    import comfy.clip_model
    import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
    import comfy.ops
    import comfy.sd1_clip
    import comfy.taesd.taesd

    dtype = dtype or torch.float16
    ops = comfy.ops.disable_weight_init
    unet_cfg = {k: v for k, v in TINY_SD15_UNET.items()}
    unet_cfg.update(num_heads=8, num_head_channels=-1)
    with open(Path(comfy.sd1_clip.__file__).with_name("sd1_clip_config.json")) as f:
        clip_cfg = json.load(f)
    with torch.device("meta"):
        parts = {
            "model.diffusion_model.": openaimodel.UNetModel(**unet_cfg, operations=ops),
            "cond_stage_model.transformer.": comfy.clip_model.CLIPTextModel(clip_cfg, torch.float32, "meta", ops),
            "first_stage_model.": comfy.taesd.taesd.TAESD(),
        }
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for prefix, module in parts.items():
        for name, t in module.state_dict().items():
            if name in ("logit_scale",):
                continue
            key = prefix + name
            out[key] = _fill(key, tuple(t.shape), gen).to(dtype).contiguous()
    return out


def tiny_sd15_checkpoint(cache_dir: Path | str = MODEL_CACHE) -> Path:
    """The cached tiny SD1.5 checkpoint (made on first use; written to a temp name, then renamed)."""
    cache_dir = Path(cache_dir)
    path = cache_dir / f"oft_tiny_sd15_v{CHECKPOINT_VERSION}.safetensors"
    if path.is_file():
        return path
    from safetensors.torch import save_file

    cache_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    sd = tiny_sd15_state_dict()
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
    os.close(fd)
    try:
        save_file(sd, tmp, metadata={"comfyui_oft.test": "tiny SD1.5-family checkpoint, random weights"})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("wrote %s (%d tensors) in %.1fs", path, len(sd), time.monotonic() - t0)
    return path


def tiny_sd15_unet(cache_dir: Path | str = MODEL_CACHE) -> Path:
    """The tiny checkpoint's UNet alone (keys without `model.diffusion_model.`), as `UNETLoader` reads a diffusion
    model file from models/diffusion_models; cached next to the checkpoint (about 52 MB)."""
    cache_dir = Path(cache_dir)
    path = cache_dir / f"oft_tiny_sd15_unet_v{CHECKPOINT_VERSION}.safetensors"
    if path.is_file():
        return path
    from safetensors.torch import load_file, save_file

    prefix = "model.diffusion_model."
    sd = {k[len(prefix):]: v for k, v in load_file(str(tiny_sd15_checkpoint(cache_dir))).items()
          if k.startswith(prefix)}
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
    os.close(fd)
    try:
        save_file(sd, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def install_unet(base: Path, name: str = UNET_NAME) -> str:
    """Link the cached UNet-only file into `base`/models/diffusion_models/`name` (for UNETLoader)."""
    target = Path(base) / "models" / "diffusion_models" / name
    if not target.exists():
        target.symlink_to(tiny_sd15_unet())
    return name


def install_checkpoint(base: Path, name: str = CHECKPOINT_NAME) -> str:
    """Link the cached tiny checkpoint into `base`/models/checkpoints/`name`; returns the name loaders see."""
    target = Path(base) / "models" / "checkpoints" / name
    if not target.exists():
        target.symlink_to(tiny_sd15_checkpoint())
    return name


def write_images(folder: Path, n: int = 2, size: int = 64, seed: int = 0) -> list[Path]:
    """`n` deterministic RGB PNGs (smooth colour gradients plus noise) of `size`×`size` in `folder`."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    yy, xx = np.mgrid[0:size, 0:size] / max(1, size - 1)
    for i in range(n):
        img = np.stack([xx * (i + 1) % 1.0, yy, (xx + yy) / 2], axis=-1) * 200 + rng.uniform(0, 55, (size, size, 3))
        p = folder / f"train_{i:02d}.png"
        Image.fromarray(img.clip(0, 255).astype("uint8")).save(p)
        paths.append(p)
    return paths


# ------------------------------------------------------------------------------------------------ server
def free_port() -> int:
    """A free loopback TCP port (bind port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the process that started it dies, so that a test run killed
    hard (SIGKILL, no atexit) leaves no server behind. Elsewhere a no-op."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class ComfyError(RuntimeError):
    """A prompt was rejected or failed, or the server misbehaved; the message includes what ComfyUI said."""


class ComfyServer:
    """ComfyUI's main.py in a private folder, on a free loopback port, driven over HTTP and the websocket.

    `ComfyServer(base).start()`; `base` is made with `private_comfyui` if it is not one yet. `extra_args` go to
    main.py after the defaults (`--cpu --listen 127.0.0.1 --port P --base-directory base --disable-auto-launch
    --database-url sqlite:///:memory: --disable-api-nodes`: the paid cloud API nodes are ~100 modules of startup
    time and unused here). Startup takes ~25 s on an idle 2-core machine, minutes when it is shared (the timeout
    is generous). Always call `stop()` (also a context manager)."""

    def __init__(self, base: Path | str, *, extra_args: tuple[str, ...] = (), python: str = sys.executable,
                 startup_timeout: float = 900.0, nice: int = 5):
        self.base = Path(base)
        self.extra_args = tuple(extra_args)
        self.python = python
        self.startup_timeout = startup_timeout
        self.nice = nice
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.log_path = self.base / "server.log"
        self.client_id = uuid.uuid4().hex
        self.ws_messages: list[dict] = []  # every JSON message received on the websocket, in order
        self._ws_cond = threading.Condition()
        self._ws_thread: threading.Thread | None = None
        self._ws_loop: asyncio.AbstractEventLoop | None = None
        self._ws_stop: asyncio.Event | None = None
        self.startup_seconds: float | None = None
        self.final_cpu_seconds: float | None = None

    # -------------------------------------------------------------------------------------------- lifecycle
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def start(self) -> "ComfyServer":
        if not (self.base / "main.py").exists():
            private_comfyui(self.base)
        self.port = free_port()
        cmd = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base), "--disable-auto-launch",
               "--database-url", "sqlite:///:memory:", "--disable-api-nodes", *self.extra_args]
        env = dict(os.environ)
        env["PYTHONPYCACHEPREFIX"] = str(CACHE_DIR / "pycache-server")
        env.setdefault("OMP_NUM_THREADS", "1")
        env.pop("COMFYUI_PATH", None)
        logf = open(self.log_path, "ab")
        nice = self.nice

        def child_setup():
            if nice:
                os.nice(nice)
            _die_with_parent()

        t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=self.base, stdout=logf, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, preexec_fn=child_setup)
        logf.close()
        deadline = t0 + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise ComfyError(f"ComfyUI exited with code {self.proc.returncode} while starting "
                                 f"({' '.join(cmd)}){self.log_tail()}")
            try:
                self.get("/system_stats", timeout=5)
                break
            except (OSError, ComfyError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise ComfyError(f"ComfyUI did not answer on {self.url} within {self.startup_timeout:.0f}s"
                                     f"{self.log_tail()}") from None
                time.sleep(0.5)
        self.startup_seconds = time.monotonic() - t0
        self._start_ws()
        log.info("ComfyUI pid %d on %s (started in %.1fs)", self.proc.pid, self.url, self.startup_seconds)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cpu_seconds(self) -> float | None:
        """CPU time (user + system) the server process has used so far, from /proc (Linux), else None."""
        if not self.alive():
            return self.final_cpu_seconds
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None

    def stop(self, timeout: float = 20.0) -> None:
        """End the server by its PID: SIGTERM, then SIGKILL after `timeout` s. Idempotent. Keeps the CPU time it
        used in `final_cpu_seconds`."""
        self._stop_ws()
        if self.alive():
            self.final_cpu_seconds = self.cpu_seconds()
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()[-n:]
        except OSError:
            return ""
        return f"\n--- last {len(lines)} lines of {self.log_path} ---\n" + "\n".join(lines)

    # -------------------------------------------------------------------------------------------- HTTP
    def _request(self, method: str, path: str, body=None, timeout: float = 60.0):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            text = e.read().decode(errors="replace")
            try:
                payload = json.loads(text)
            except ValueError:
                payload = text
            err = ComfyError(f"{method} {path}: HTTP {e.code}: {text[:4000]}")
            err.status, err.payload = e.code, payload
            raise err from None
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw

    def get(self, path: str, timeout: float = 60.0):
        return self._request("GET", path, timeout=timeout)

    def post(self, path: str, body=None, timeout: float = 60.0):
        return self._request("POST", path, body if body is not None else {}, timeout=timeout)

    def object_info(self) -> dict:
        return self.get("/object_info")

    # -------------------------------------------------------------------------------------------- prompts
    def queue(self, prompt: dict) -> str:
        """POST /prompt; returns the prompt id. A validation failure raises ComfyError with `.payload` (ComfyUI's
        `error` and `node_errors`)."""
        r = self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})
        return r["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600.0) -> dict:
        """Wait until the prompt has finished (success, error or interrupt); returns its /history entry."""
        deadline = time.monotonic() + timeout
        while True:
            h = self.get(f"/history/{prompt_id}")
            if h and prompt_id in h and h[prompt_id].get("status", {}).get("completed") is not None:
                st = h[prompt_id]["status"]
                if st.get("completed") or st.get("status_str") in ("error", "success"):
                    return h[prompt_id]
                # completed False with messages: interrupted or error
                if any(m[0] in ("execution_error", "execution_interrupted") for m in st.get("messages", [])):
                    return h[prompt_id]
            if not self.alive():
                raise ComfyError(f"ComfyUI died while running prompt {prompt_id}{self.log_tail()}")
            if time.monotonic() > deadline:
                raise ComfyError(f"prompt {prompt_id} did not finish within {timeout:.0f}s{self.log_tail()}")
            time.sleep(0.25)

    def run(self, prompt: dict, timeout: float = 600.0) -> dict:
        """Queue `prompt`, wait, and return its /history entry; raises ComfyError with the node's exception
        message and traceback when it failed or was interrupted."""
        pid = self.queue(prompt)
        entry = self.wait(pid, timeout)
        status = entry.get("status", {})
        if status.get("status_str") != "success":
            raise ComfyError(f"prompt {pid} ended with {status.get('status_str')}: "
                             f"{json.dumps(history_messages(entry), indent=1)[:6000]}")
        return entry

    def interrupt(self) -> None:
        self.post("/interrupt", {})

    def outputs(self, entry: dict, node_id: str) -> dict:
        """The `ui` output a node stored in a /history entry ({} if none)."""
        return entry.get("outputs", {}).get(str(node_id), {})

    # -------------------------------------------------------------------------------------------- websocket
    def _start_ws(self) -> None:
        ready = threading.Event()
        errors: list[BaseException] = []

        async def main():
            import aiohttp

            self._ws_stop = asyncio.Event()
            try:
                async with aiohttp.ClientSession() as session:
                    async with session.ws_connect(f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}",
                                                  heartbeat=30) as ws:
                        ready.set()
                        stop = asyncio.ensure_future(self._ws_stop.wait())
                        while not stop.done():
                            recv = asyncio.ensure_future(ws.receive())
                            done, _ = await asyncio.wait({recv, stop}, return_when=asyncio.FIRST_COMPLETED)
                            if recv not in done:
                                recv.cancel()
                                break
                            msg = recv.result()
                            if msg.type == aiohttp.WSMsgType.TEXT:
                                with self._ws_cond:
                                    self.ws_messages.append(json.loads(msg.data))
                                    self._ws_cond.notify_all()
                            elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR,
                                              aiohttp.WSMsgType.CLOSE):
                                break
                            # binary frames (previews) are ignored
            except BaseException as e:  # noqa: BLE001  (reported to start(); the thread must not die silently)
                errors.append(e)
                ready.set()

        def thread():
            self._ws_loop = asyncio.new_event_loop()
            try:
                self._ws_loop.run_until_complete(main())
            finally:
                self._ws_loop.close()

        self._ws_thread = threading.Thread(target=thread, name="comfy-ws", daemon=True)
        self._ws_thread.start()
        ready.wait(30)
        if errors:
            raise ComfyError(f"websocket connection to {self.url}/ws failed: {errors[0]!r}")

    def _stop_ws(self) -> None:
        if self._ws_thread is None:
            return
        if self._ws_loop is not None and self._ws_stop is not None and not self._ws_loop.is_closed():
            try:
                self._ws_loop.call_soon_threadsafe(self._ws_stop.set)
            except RuntimeError:
                pass
        self._ws_thread.join(10)
        self._ws_thread = None

    def wait_ws(self, predicate, timeout: float = 120.0, start: int = 0) -> dict:
        """The first websocket message (from index `start` of `ws_messages`) for which predicate(msg) is true."""
        deadline = time.monotonic() + timeout
        i = start
        with self._ws_cond:
            while True:
                while i < len(self.ws_messages):
                    if predicate(self.ws_messages[i]):
                        return self.ws_messages[i]
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ComfyError(f"no matching websocket message within {timeout:.0f}s "
                                     f"(last: {self.ws_messages[-3:]}){self.log_tail(15)}")
                self._ws_cond.wait(min(left, 1.0))

    def ws_for(self, prompt_id: str, type_: str | None = None) -> list[dict]:
        """Websocket messages about `prompt_id` (optionally of one type)."""
        with self._ws_cond:
            return [m for m in self.ws_messages if (m.get("data") or {}).get("prompt_id") == prompt_id
                    and (type_ is None or m.get("type") == type_)]


def history_messages(entry: dict) -> list:
    """The status messages of a /history entry, execution errors shortened to type, node, message, traceback."""
    out = []
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            out.append({"type": kind, "node_id": data.get("node_id"), "node_type": data.get("node_type"),
                        "exception_type": data.get("exception_type"), "message": data.get("exception_message"),
                        "traceback": "".join(data.get("traceback", []))[-3000:]})
        elif kind != "execution_cached":
            out.append({"type": kind, **{k: v for k, v in data.items() if k in ("node_id", "node_type")}})
    return out


def execution_error(entry: dict) -> dict | None:
    """The execution_error message data of a /history entry, or None."""
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return data
    return None


# ------------------------------------------------------------------------------------------------ shared server
_SHARED: ComfyServer | None = None
_SHARED_TMP: tempfile.TemporaryDirectory | None = None
_SHARED_ERROR: BaseException | None = None


def shared_server() -> ComfyServer:
    """One server for the whole test process: a private ComfyUI in a temp dir, the tiny checkpoint installed as
    `CHECKPOINT_NAME` (and its UNet alone as `UNET_NAME` in diffusion_models), started on first call. Raises
    comfy_models.ComfyUINotFound without ComfyUI; a failed start is remembered (later calls raise the same error
    instead of trying again)."""
    global _SHARED, _SHARED_TMP, _SHARED_ERROR
    if _SHARED is not None:
        return _SHARED
    if _SHARED_ERROR is not None:
        raise ComfyError(f"the shared ComfyUI server failed to start earlier: {_SHARED_ERROR}")
    comfy_root = find_comfyui()
    try:
        _SHARED_TMP = tempfile.TemporaryDirectory(prefix="oft-comfyui-")
        base = private_comfyui(Path(_SHARED_TMP.name) / "ComfyUI", comfy_root=comfy_root)
        install_checkpoint(base)
        install_unet(base)
        server = ComfyServer(base)
        server.start()
    except BaseException as e:
        _SHARED_ERROR = e
        raise
    _SHARED = server
    import atexit

    atexit.register(stop_shared_server)
    return server


def stop_shared_server() -> None:
    """Stop the shared server (by PID) and remove its private folder. Idempotent."""
    global _SHARED, _SHARED_TMP
    if _SHARED is not None:
        _SHARED.stop()
        _SHARED = None
    if _SHARED_TMP is not None:
        _SHARED_TMP.cleanup()
        _SHARED_TMP = None


# ------------------------------------------------------------------------------------------------ workflows
CONTROL_AFTER_GENERATE_NAMES = ("seed", "noise_seed")
_PRIMITIVE_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def _widget_inputs(spec: dict) -> list[tuple[str, bool]]:
    """(input name, has a control-after-generate slot) for the widget inputs of a node, in frontend order."""
    out = []
    order = spec.get("input_order") or {}
    inputs = spec.get("input") or {}
    for section in ("required", "optional"):
        names = order.get(section) or list((inputs.get(section) or {}).keys())
        for name in names:
            entry = (inputs.get(section) or {}).get(name)
            if entry is None:
                continue
            typ = entry[0]
            opts = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
            if isinstance(typ, list) or typ in _PRIMITIVE_TYPES:
                if opts.get("forceInput"):
                    continue
                control = typ == "INT" and (name in CONTROL_AFTER_GENERATE_NAMES or opts.get("control_after_generate"))
                control = control or bool(opts.get("control_after_generate"))
                out.append((name, bool(control)))
    return out


def workflow_to_api(workflow: dict, object_info: dict) -> dict:
    """A UI workflow in the API prompt format. Raises ComfyError naming the node for anything the server does not
    know (missing node type, a widget count that does not match the node's inputs, links to missing nodes).
    Notes/reroutes (no class in object_info and no outputs used) are dropped; muted (mode 2) and bypassed (mode 4)
    nodes are not supported (ComfyError)."""
    nodes = {n["id"]: n for n in workflow.get("nodes", [])}
    links = {lk[0]: lk for lk in workflow.get("links", [])}  # [id, from_node, from_slot, to_node, to_slot, type]
    prompt: dict = {}
    problems = []
    for nid, node in nodes.items():
        ntype = node.get("type")
        if ntype in ("Note", "MarkdownNote", "Reroute", "PrimitiveNode"):
            if ntype in ("Reroute", "PrimitiveNode"):
                problems.append(f"node {nid} ({ntype}): not supported by this converter")
            continue
        if node.get("mode", 0) in (2, 4):
            problems.append(f"node {nid} ({ntype}): muted/bypassed nodes are not supported")
            continue
        spec = object_info.get(ntype)
        if spec is None:
            problems.append(f"node {nid}: type {ntype!r} is not known to the server (/object_info)")
            continue
        inputs: dict = {}
        linked = {}
        for inp in node.get("inputs", []) or []:
            if inp.get("link") is not None:
                lk = links.get(inp["link"])
                if lk is None or lk[1] not in nodes:
                    problems.append(f"node {nid} ({ntype}): input {inp.get('name')!r} has a broken link")
                    continue
                linked[inp["name"]] = [str(lk[1]), lk[2]]
        values = list(node.get("widgets_values") or [])
        if isinstance(node.get("widgets_values"), dict):
            problems.append(f"node {nid} ({ntype}): dict widgets_values are not supported")
            continue
        widgets = _widget_inputs(spec)
        expected = sum(2 if c else 1 for _, c in widgets)
        # a workflow saved before an optional widget was added at the end of a node (OFTLoader's apply_mode) has no
        # value for it: the frontend keeps that widget's default and no other value moves, so the prompt omits it
        optional = set((spec.get("input") or {}).get("optional") or {})
        while widgets and len(values) < expected and widgets[-1][0] in optional and not widgets[-1][1]:
            widgets = widgets[:-1]
            expected -= 1
        if len(values) != expected:
            problems.append(f"node {nid} ({ntype}): {len(values)} widget values, the node's inputs need {expected} "
                            f"({', '.join(n + (' +control' if c else '') for n, c in widgets)})")
            continue
        i = 0
        for name, control in widgets:
            inputs[name] = values[i]
            i += 2 if control else 1
        inputs.update(linked)
        prompt[str(nid)] = {"class_type": ntype, "inputs": inputs, "_meta": {"title": node.get("title") or ntype}}
    if problems:
        raise ComfyError("workflow cannot be converted: " + "; ".join(problems))
    return prompt


def validate_prompt(server: ComfyServer, prompt: dict) -> None:
    """Check `prompt` against the server's /object_info without running it (ComfyUI has no dry-run endpoint; POST
    /prompt would run it): every input of every node present (required ones), combo values among the
    options, numbers within min/max, links to existing nodes and output slots. Raises ComfyError listing problems."""
    info = server.object_info()
    problems = []
    for nid, node in prompt.items():
        spec = info.get(node["class_type"])
        if spec is None:
            problems.append(f"{nid}: unknown type {node['class_type']}")
            continue
        req = (spec.get("input") or {}).get("required") or {}
        opt = (spec.get("input") or {}).get("optional") or {}
        for name, entry in {**req, **opt}.items():
            if name not in node["inputs"]:
                if name in req:
                    problems.append(f"{nid} ({node['class_type']}): required input {name!r} missing")
                continue
            v = node["inputs"][name]
            typ = entry[0]
            opts = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
            if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str):
                src = prompt.get(v[0])
                if src is None:
                    problems.append(f"{nid}: input {name!r} links to missing node {v[0]}")
                    continue
                outs = (info.get(src["class_type"]) or {}).get("output") or []
                if not (0 <= v[1] < len(outs)):
                    problems.append(f"{nid}: input {name!r} links to output {v[1]} of {src['class_type']} "
                                    f"which has {len(outs)}")
                elif "*" not in (typ, outs[v[1]]) and not set(str(typ).split(",")) & set(str(outs[v[1]]).split(",")):
                    problems.append(f"{nid}: input {name!r} ({typ}) linked to a {outs[v[1]]} output")
                continue
            if isinstance(typ, list) or typ == "COMBO":
                options = typ if isinstance(typ, list) else opts.get("options", [])
                if v not in options:
                    problems.append(f"{nid} ({node['class_type']}): {name}={v!r} not among {options[:8]}")
            elif typ in ("INT", "FLOAT"):
                if not isinstance(v, (int, float)) or isinstance(v, bool):
                    problems.append(f"{nid} ({node['class_type']}): {name}={v!r} is not a number")
                else:
                    if "min" in opts and v < opts["min"]:
                        problems.append(f"{nid} ({node['class_type']}): {name}={v} < min {opts['min']}")
                    if "max" in opts and v > opts["max"]:
                        problems.append(f"{nid} ({node['class_type']}): {name}={v} > max {opts['max']}")
            elif typ == "BOOLEAN" and not isinstance(v, bool):
                problems.append(f"{nid} ({node['class_type']}): {name}={v!r} is not a boolean")
            elif typ == "STRING" and not isinstance(v, str):
                problems.append(f"{nid} ({node['class_type']}): {name}={v!r} is not a string")
    if problems:
        raise ComfyError("prompt does not validate against /object_info: " + "; ".join(problems))


if __name__ == "__main__":  # python tests/comfy_server.py [dir]: start a server by hand (Ctrl-C stops it)
    logging.basicConfig(level=logging.INFO)
    d = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="oft-comfyui-"))
    base = private_comfyui(d / "ComfyUI")
    install_checkpoint(base)
    write_images(base / "input" / "oft_train", 2)
    with ComfyServer(base) as s:
        log.info("ComfyUI at %s (pid %d), folder %s, log %s", s.url, s.pid, base, s.log_path)
        try:
            while s.alive():
                time.sleep(1)
        except KeyboardInterrupt:
            pass
