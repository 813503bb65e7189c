"""Timeline text: time / chunk tags and the keyframe schedules of ComfyUI prompt-schedule nodes, and every rule
that needs no model (worked by hand)."""

import pytest

from sf_core.errors import SelfForcingError
from sf_core.timeline import parse_entries, parse_timeline, resolve


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


def test_times_map_to_the_chunk_that_shows_them():
    # 16 fps, 3 latent frames per chunk: chunk 1 starts at latent 3 = video frame 9 = 0.5625 s
    assert parse_timeline("3s: c\n0s: a\n0.6s: b", 16.0, 3) == [(0, "a"), (1, "b"), (4, "c")]  # 3 s = frame 48 = latent 13
    assert resolve(parse_entries("0s: a\n0.6s: b"), 16.0, 3) == [0, 1]
    assert resolve(parse_entries("#0: a\n#5: b"), 16.0, 3, num_chunks=6) == [0, 5]


@pytest.mark.parametrize("text, words", [
    ("", "prompt is empty"),
    ("  \n \n", "prompt is empty"),
    ("0s: a fox\n3s:", "line 2 has a time but no prompt"),
    ("0s: a fox\nthe fox jumps", "line 2 has no time"),
])
def test_parse_refuses(text, words):
    with pytest.raises(SelfForcingError, match=words):
        parse_entries(text)


def test_timeline_must_start_at_zero():
    with pytest.raises(SelfForcingError, match="must start at 0s"):
        resolve(parse_entries("1s: a\n2s: b"), 16.0, 3)
    assert resolve(parse_entries("0.5s: a\n2s: b"), 16.0, 3)[0] == 0  # 0.5 s is still in chunk 0 at 3 frames/chunk


def test_two_prompts_in_one_chunk_are_refused():
    # 0.5 s = frame 8 = latent 2 -> chunk 0, like 0 s
    with pytest.raises(SelfForcingError, match="prompts 1 and 2 both start in chunk 0"):
        resolve(parse_entries("0s: a\n0.5s: b"), 16.0, 3)
    assert resolve(parse_entries("0s: a\n0.5s: b"), 16.0, 1) == [0, 2]  # one latent frame per chunk: apart


def test_a_prompt_after_the_video_is_refused():
    # 81 frames = 21 latent frames = 7 chunks (0..6); chunk 6 starts at latent 18 = frame 69 = 4.3125 s
    entries = parse_entries("0s: a\n4.3s: b\n100s: c")
    with pytest.raises(SelfForcingError, match=r"prompt 3 starts at 100s \(chunk \d+\) but the video's last chunk is 6.*4.31s"):
        resolve(entries, 16.0, 3, num_chunks=7)
    assert resolve(entries[:2], 16.0, 3, num_chunks=7) == [0, 6]
    with pytest.raises(SelfForcingError, match="last chunk is 5"):
        resolve(entries[:2], 16.0, 3, num_chunks=6)
    assert parse_timeline("0s: a\n#6: b", 16.0, 3, num_chunks=7) == [(0, "a"), (6, "b")]
