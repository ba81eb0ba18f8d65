"""The shipped workflows as templates (issue 9, item 6), in the running server and in its frontend's template browser.

What frontend 1.27.10 reads for a custom node pack's template (workflowTemplatesStore / useTemplateWorkflows): only
the names GET /workflow_templates lists, i.e. the workflow file stems. A card's title is the stem, its description the
stem with "-" and "_" turned into spaces, its image `<stem>.jpg` beside the workflow; nothing inside the workflow file
is read. So the stems are the readable titles, and each has a thumbnail (tests/browser/make_thumbnails.py).
"""

from __future__ import annotations

import io
import json
import urllib.parse

import comfy_server as harness
import pytest
from frontend import WORKFLOWS

STEMS = sorted(p.stem for p in WORKFLOWS)
MAX_BYTES = 100_000


def test_every_workflow_has_a_small_thumbnail_and_a_readable_name():
    from PIL import Image

    for path in WORKFLOWS:
        thumb = path.with_suffix(".jpg")
        assert thumb.is_file(), f"{path.name} has no thumbnail {thumb.name}"
        assert thumb.stat().st_size <= MAX_BYTES, f"{thumb.name}: {thumb.stat().st_size} bytes"
        with Image.open(thumb) as img:
            assert img.format == "JPEG" and img.size == (512, 512), (thumb.name, img.format, img.size)
            # a picture, not a blank card: the screenshot has node boxes and text (many grey levels)
            assert len(img.convert("L").getcolors(256)) > 32, f"{thumb.name} looks blank"
        # the card shows the stem as title and description: words, no file-name punctuation
        assert path.stem.startswith("OFT ") and "_" not in path.stem and "-" not in path.stem, path.stem
        assert json.loads(path.read_text())["extra"]["info"], f"{path.name} says nothing about itself"
    assert sorted(p.stem for p in WORKFLOWS[0].parent.glob("*.jpg")) == STEMS, "a thumbnail without its workflow"


def test_server_serves_the_templates_and_their_thumbnails(comfy_page):
    server = comfy_page.server
    listed = server.get("/workflow_templates")
    assert sorted(listed.get(harness.PACK_DIR_NAME, [])) == STEMS, listed
    for stem in STEMS:
        q = urllib.parse.quote(stem)
        wf = server.get(f"/api/workflow_templates/{harness.PACK_DIR_NAME}/{q}.json")
        assert isinstance(wf, dict) and wf["nodes"], stem
        raw = server.get(f"/api/workflow_templates/{harness.PACK_DIR_NAME}/{q}.jpg")
        assert isinstance(raw, bytes) and raw[:3] == b"\xff\xd8\xff", f"{stem}.jpg is not served as a JPEG"
        from PIL import Image

        assert Image.open(io.BytesIO(raw)).size == (512, 512)


@pytest.fixture()
def template_dialog(comfy_page):
    page = comfy_page.page
    page.evaluate("app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    page.wait_for_selector('[data-testid="template-workflows-content"]', timeout=60_000)
    yield page
    if page.locator('[data-testid="template-workflows-content"]').count():
        page.keyboard.press("Escape")


def test_template_browser_shows_the_cards_with_title_and_picture(comfy_page, template_dialog):
    page = template_dialog
    with comfy_page.failure_shot("template_browser"):
        # the pack's category: a listbox option in frontend 1.27, a plain navigation entry in 1.35 (ComfyUI 0.8)
        category = page.get_by_role("option", name=harness.PACK_DIR_NAME, exact=True)
        category.or_(page.get_by_text(harness.PACK_DIR_NAME, exact=True)).first.click()
        for stem in STEMS:
            card = page.locator(f'[data-testid="template-workflow-{stem}"]')
            card.wait_for(timeout=30_000)
            card.scroll_into_view_if_needed()
            assert card.locator("h3").inner_text().strip() == stem
            assert card.locator("p").first.inner_text().strip() == stem
            img = card.locator("img").first
            img.wait_for(timeout=30_000)
            # LazyImage shows the fetched file through a blob: URL; our thumbnails are 512 x 512
            page.wait_for_function("(el) => el.complete && el.naturalWidth > 0", arg=img.element_handle(),
                                   timeout=30_000)
            size = img.evaluate("(el) => [el.naturalWidth, el.naturalHeight]")
            assert size == [512, 512], f"{stem}: the card shows an image of {size}, not the thumbnail"
        # a card opens its workflow
        stem = "OFT train an adapter"
        page.locator(f'[data-testid="template-workflow-{stem}"]').click()
        page.wait_for_function("() => !document.querySelector('[data-testid=\"template-workflows-content\"]')",
                               timeout=60_000)
        want = sorted(n["type"] for n in json.loads((WORKFLOWS[0].parent / f"{stem}.json").read_text())["nodes"])
        page.wait_for_function("(n) => app.graph.nodes.length === n", arg=len(want), timeout=60_000)
        assert sorted(page.evaluate("app.graph.nodes.map(n => n.type)")) == want
