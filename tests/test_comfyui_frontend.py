"""The pack as the real ComfyUI frontend shows it (headless chromium): the error dialog of a refused prompt,
the template browser, and the missing-models dialog of a template. Screenshots are kept in artifacts/.

Needs COMFYUI_DIR (a ComfyUI checkout) and chromium; skipped otherwise.
"""

from __future__ import annotations

import json
import time

import pytest

from comfy_fixtures import tiny_comfy_server
from comfy_server import REPO_ROOT, BrowserPage, chromium_skip_reason, comfyui_skip_reason

_skip = comfyui_skip_reason() or chromium_skip_reason()
pytestmark = pytest.mark.skipif(_skip is not None, reason=_skip or "")

ARTIFACTS = REPO_ROOT / "artifacts"
SAMPLER = "SelfForcingStreamSampler"

_DIALOG_TEXT_JS = "Array.from(document.querySelectorAll('.p-dialog')).map(d => d.innerText).join('\\n---\\n')"


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    server, files = tiny_comfy_server(tmp_path_factory.mktemp("comfy_frontend"))
    with server:
        server.assert_pack_loaded()
        server.set_setting("Comfy.TutorialCompleted", True)
        server.set_setting("Comfy.Minimap.Visible", False)
        yield server, files


def _wait(page, expression: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        value = page.evaluate(expression)
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.25)


def test_a_bad_width_is_reported_on_the_size_inputs_only(comfy):
    from test_comfyui_pack import _t2v

    server, files = comfy
    ARTIFACTS.mkdir(exist_ok=True)
    with BrowserPage(server) as page:
        page.load_api_json(_t2v(files))
        # the width widget rounds typed values to its step: set the value as a script (or an API client) could
        page.evaluate(f"(() => {{ const n = app.graph.nodes.find(n => n.type === '{SAMPLER}');"
                      " n.widgets.find(w => w.name === 'width').value = 70; return true; })()")
        page.queue_prompt()
        text = _wait(page, _DIALOG_TEXT_JS)
        page.screenshot(ARTIFACTS / "validation_dialog.png")
        marked = page.evaluate("Object.fromEntries(Object.entries(app.lastNodeErrors || {}).map(([k, v]) =>"
                               " [k, v.errors.map(e => e.extra_info.input_name)]))")
    assert "not divisible by 16" in text, text
    assert 1 <= text.count("size 70x48 is not divisible by 16") <= 2, text
    assert {k: sorted(v) for k, v in marked.items()} == {"5": ["height", "width"]}, marked
    assert server.get_json("/history") == {}  # refused when queued: nothing ran


def _template_titles():
    import workflow_sources as src

    return sorted(src.WORKFLOWS), src


def test_the_template_browser_lists_the_packs_templates_with_thumbnails(comfy):
    names, _ = _template_titles()
    server, _ = comfy
    listed = server.get_json("/workflow_templates")[server.pack_name]
    assert sorted(listed) == names
    with BrowserPage(server, width=1400, height=900) as page:
        page.evaluate("(async () => { await app.extensionManager.command.execute('Comfy.BrowseTemplates'); return 1; })()")
        assert _wait(page, "!!document.querySelector('[data-testid=\"template-workflows-content\"]')"), "no template dialog"
        # the pack's own category in the browser's navigation
        clicked = _wait(page, f"""(() => {{
            const item = Array.from(document.querySelectorAll('.p-dialog *')).find(e => e.children.length === 0
                && e.textContent.trim() === {json.dumps(server.pack_name)});
            if (!item) return false; item.click(); return true; }})()""")
        assert clicked, "the pack has no category in the template browser"
        cards_js = ("Array.from(document.querySelectorAll('[data-testid^=\"template-workflow-\"]')).map(c => ({"
                    "name: c.getAttribute('data-testid').slice('template-workflow-'.length), text: c.innerText,"
                    "imgs: Array.from(c.querySelectorAll('img')).map(i => [i.complete && i.naturalWidth, i.naturalHeight])}))")
        # the first row, as the browser opens on the pack's category
        _wait(page, f"(() => {{ const c = {cards_js}; return c.length >= {len(names)} && "
                    "c.filter(x => x.imgs.some(i => i[0] > 0)).length >= Math.min(3, c.length); })()", timeout=30)
        page.screenshot(ARTIFACTS / "template_browser.png")
        cards = page.evaluate(cards_js)
        for card in cards:  # each card loads its thumbnail when it scrolls into view
            sel = json.dumps(f'[data-testid="template-workflow-{card["name"]}"]')
            card["imgs"] = _wait(page, f"""(() => {{ const el = document.querySelector({sel});
                el.scrollIntoView({{block: 'center'}});
                const i = Array.from(el.querySelectorAll('img')).filter(i => i.complete && i.naturalWidth > 0);
                return i.length ? i.map(i => [i.naturalWidth, i.naturalHeight]) : null; }})()""") or []
    assert sorted(c["name"] for c in cards) == names, cards
    from PIL import Image

    for card in cards:
        assert card["name"] in card["text"], card  # the readable title is what the card shows
        with Image.open(REPO_ROOT / "workflows" / f"{card['name']}.jpg") as im:
            assert list(im.size) in card["imgs"], card  # our thumbnail is the picture on the card


def test_text_to_video_template_offers_its_missing_models(comfy):
    _, src = _template_titles()
    server, _ = comfy  # the release files are absent here (the tiny test files have other names)
    wf = json.loads((REPO_ROOT / "workflows" / f"{src.T2V}.json").read_text())
    with BrowserPage(server, width=1400, height=900) as page:
        page.evaluate(f"(async () => {{ await app.loadGraphData({json.dumps(wf)}); return 1; }})()")
        text = _wait(page, "(() => { const t = Array.from(document.querySelectorAll('.p-dialog')).map(d => d.innerText)"
                           ".join('\\n'); return t.includes('Missing Models') ? t : null; })()")
        page.screenshot(ARTIFACTS / "missing_models_dialog.png")
    assert text, "no missing-models dialog"
    for name, (url, folder) in src.DOWNLOADS.items():
        if name in (src.DIT_PT, src.TE, src.VAE):
            assert f"{folder} / {name}" in text, text  # file and folder, as the dialog labels them
    assert src.TEACHER not in text  # only what this graph uses
