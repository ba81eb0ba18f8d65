"""Render the template thumbnails: workflows/<stem>.jpg, each shipped workflow as ComfyUI's frontend draws it.

    ~/.cache/comfyui-oft/venv/bin/python tests/browser/make_thumbnails.py [stem ...]

A private ComfyUI server (tests/comfy_server.py) with the files the workflows name, its frontend in headless Chromium
(the system executable), each workflow loaded as opening the file does, the graph's area captured at a zoom where
node text is drawn, padded to a square with the canvas colour and scaled to SIZE × SIZE (the template browser shows
it within a 256 px square). Run it again after a workflow changes; tests/browser/test_templates.py checks the
result.
"""

from __future__ import annotations

import io
import json
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import frontend  # noqa: E402  (plain helper next to this file)
from frontend import harness  # noqa: E402

SIZE = 512
QUALITY = 82
MARGIN = 24  # px around the graph, on screen
SCALE = 0.8  # canvas zoom while capturing (node text is drawn at this zoom with the settings below)
SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Minimap.Visible": False,
    "Comfy.Graph.CanvasInfo": False,
    "LiteGraph.Canvas.MinFontSizeForLOD": 1,
}

_PLACE_JS = """([scale, left, top]) => {
  const xs = [], ys = [], xe = [], ye = [];
  const title = LiteGraph.NODE_TITLE_HEIGHT;
  for (const n of app.graph.nodes) {
    xs.push(n.pos[0]); ys.push(n.pos[1] - title);
    xe.push(n.pos[0] + n.size[0]); ye.push(n.pos[1] + n.size[1]);
  }
  const x0 = Math.min(...xs), y0 = Math.min(...ys), x1 = Math.max(...xe), y1 = Math.max(...ye);
  app.canvas.ds.scale = scale;
  app.canvas.ds.offset = [left / scale - x0, top / scale - y0];
  app.canvas.setDirty(true, true);
  app.canvas.draw(true, true);
  return [(x1 - x0) * scale, (y1 - y0) * scale];
}"""


def render(session, wf: dict, out: Path) -> None:
    from PIL import Image

    page = session.page
    page.evaluate("""async (wf) => { await app.loadGraphData(wf, true, false, 'thumbnail',
                     {showMissingNodesDialog: false, showMissingModelsDialog: false}); }""", wf)
    left, top = 2 * MARGIN, 2 * MARGIN  # focus mode: no side bar, no menu
    w, h = page.evaluate(_PLACE_JS, [SCALE, left, top])
    # the canvas toolbar sits in the window's bottom-right corner: keep it outside the captured area
    width, height = int(left + w + 2 * MARGIN + 320), int(top + h + 2 * MARGIN + 120)
    page.set_viewport_size({"width": width, "height": height})
    page.wait_for_function("([w, h]) => app.canvas.canvas.clientWidth >= w && app.canvas.canvas.clientHeight >= h",
                           arg=[width, height])
    page.evaluate(_PLACE_JS, [SCALE, left, top])
    page.wait_for_timeout(500)
    png = page.screenshot(clip={"x": left - MARGIN, "y": top - MARGIN, "width": w + 2 * MARGIN,
                                "height": h + 2 * MARGIN})
    img = Image.open(io.BytesIO(png)).convert("RGB")
    side = max(img.size)
    square = Image.new("RGB", (side, side), img.getpixel((2, 2)))
    square.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    square.resize((SIZE, SIZE), Image.LANCZOS).save(out, "JPEG", quality=QUALITY, optimize=True)


def main(stems: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    workflows = [p for p in frontend.WORKFLOWS if not stems or p.stem in stems]
    fixtures = harness.comfy_models.FIXTURES
    with tempfile.TemporaryDirectory(prefix="oft-thumbnails-") as tmp:
        base = harness.private_comfyui(Path(tmp) / "ComfyUI")
        frontend.install_workflow_files(base, fixtures)
        with harness.ComfyServer(base) as server:
            for key, value in SETTINGS.items():
                server.post(f"/settings/{key}", value)
            with frontend.open_frontend(server, Path(tmp)) as session:
                session.page.evaluate("app.extensionManager.command.execute('Workspace.ToggleFocusMode')")
                for path in workflows:
                    out = path.with_suffix(".jpg")
                    render(session, json.loads(path.read_text()), out)
                    logging.info("wrote %s (%d bytes)", out, out.stat().st_size)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
