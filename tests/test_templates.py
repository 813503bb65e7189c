"""The shipped templates (workflows/) match their single source (tests/workflow_sources.py): one JSON and one
thumbnail per source, a Note that says what the graph does, and on every loader the published download link
and model folder of its file (what the frontend's missing-models dialog offers). No ComfyUI needed."""

import json
from pathlib import Path

import pytest

import workflow_sources as src

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"


def test_one_template_and_one_thumbnail_per_source():
    assert sorted(p.stem for p in WORKFLOWS.glob("*.json")) == sorted(src.WORKFLOWS)
    assert sorted(p.stem for p in WORKFLOWS.glob("*.jpg")) == sorted(src.WORKFLOWS)


@pytest.mark.parametrize("name", sorted(src.WORKFLOWS))
def test_template_has_a_note_models_and_a_thumbnail(name):
    from PIL import Image

    wf = json.loads((WORKFLOWS / f"{name}.json").read_text())
    notes = [n for n in wf["nodes"] if n["type"] == "Note"]
    assert len(notes) == 1 and notes[0]["widgets_values"][0] == src.NOTES[name]
    nodes = {str(n["id"]): n for n in wf["nodes"]}
    want = src.model_entries(src.WORKFLOWS[name])
    assert {i: nodes[i]["properties"].get("models") for i in want} == want
    for entries in want.values():  # the frontend offers an entry only when its name is the loader's current value
        for e in entries:
            loader = next(n for n in wf["nodes"] if n.get("properties", {}).get("models") == entries)
            assert e["name"] in loader["widgets_values"] and e["url"].startswith("https://huggingface.co/")
    files = {e["name"] for entries in want.values() for e in entries}
    named = {v for n in src.WORKFLOWS[name].values() for k, v in n["inputs"].items()
             if k == src.MODEL_WIDGETS.get(n["class_type"]) and v != src.EMBEDDED}
    assert files == named  # every model file the graph names has its download entry
    with Image.open(WORKFLOWS / f"{name}.jpg") as im:
        assert im.format == "JPEG" and im.size[0] >= 256
