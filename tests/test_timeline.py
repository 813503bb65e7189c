"""Timeline text: time / chunk tags and the keyframe schedules of ComfyUI prompt-schedule nodes."""

import pytest

from sf_core.errors import SelfForcingError
from sf_core.timeline import parse_entries, parse_timeline


def test_tagged_lines_and_a_single_prompt():
    assert parse_timeline("a fox in the snow") == [(0, "a fox in the snow")]
    # 5 s at 16 fps = frame 80 = latent 20 = chunk 6 (3 latent frames per chunk)
    assert parse_timeline("0s: a fox\n5s: a wolf\n#9: a bear") == [(0, "a fox"), (6, "a wolf"), (9, "a bear")]


@pytest.mark.parametrize("text", [
    '"0": "a fox",\n"48": "a wolf",\n"96": "a bear"',
    '{"0": "a fox", "48": "a wolf", "96": "a bear"}',
    '{\n  "0" : "a fox",\n  "48" : "a wolf",\n  "96" : "a bear"\n}\n',
])
def test_keyframe_schedules_by_video_frame(text):
    # frame 48 -> latent 12 -> chunk 4; frame 96 -> latent 24 -> chunk 8
    assert parse_timeline(text) == [(0, "a fox"), (4, "a wolf"), (8, "a bear")]
    assert parse_timeline(text, frames_per_chunk=1) == [(0, "a fox"), (12, "a wolf"), (24, "a bear")]
    assert [e.frame for e in parse_entries(text)] == [0, 48, 96]


@pytest.mark.parametrize("text, words", [
    ('"0": "a fox"\n"48": "a wolf"', r"line 2 \(Expecting ',' delimiter\): '\"48\": \"a wolf\"'"),
    ('"0": "a fox", "48": ""', "keyframe 48 has no prompt"),
    ('"0": "a fox", "soon": "a wolf"', "'soon' is not a frame number"),
    ('"0": "a fox", "0": "a wolf"', "keyframe 0 appears twice"),
    ('"0": "a fox", "4": "a wolf"', "both start in chunk 0"),
    ('"12": "a fox"', r'must start at 0s .*keyframe "0"'),
    ('{"0": 3}', "keyframe 0 has no prompt"),
    ("0s: a fox\nthen a wolf", "line 2 has no time"),
])
def test_malformed_timelines_say_what_to_fix(text, words):
    with pytest.raises(SelfForcingError, match=words):
        parse_timeline(text)


def test_format_timeline_reads_back():
    from sf_core.stream import PromptSegment
    from sf_core.timeline import format_timeline

    segments = [PromptSegment(0, None, "a red fox\nin the snow"), PromptSegment(7, None, "a wolf  howls")]
    text = format_timeline(segments)
    assert text == "#0: a red fox in the snow\n#7: a wolf howls\n"
    assert parse_timeline(text) == [(0, "a red fox in the snow"), (7, "a wolf howls")]
