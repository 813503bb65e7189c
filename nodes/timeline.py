"""Self-Forcing Prompt Timeline: prompts that change at given times, encoded with a stock CLIP."""

from __future__ import annotations

from comfy_api.latest import io

from ..sf_core.stream import SWITCH_MODES
from ..sf_core.timeline import parse_entries
from .common import CATEGORY, Timeline


class PromptTimeline(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SelfForcingPromptTimeline",
            display_name="Self-Forcing Prompt Timeline",
            category=CATEGORY,
            description="One prompt per line, each starting at a time ('5s: ...') or a chunk ('#4: ...'), or a keyframe "
                        "schedule by video frame as prompt-schedule nodes write it ('\"0\": \"...\", \"48\": \"...\"'). "
                        "The sampler switches prompts at chunk boundaries while the video streams.",
            inputs=[
                io.Clip.Input("clip", tooltip="CLIPLoader with type 'wan' (umt5_xxl)."),
                io.String.Input("timeline", multiline=True,
                                default="0s: a red fox trots through fresh snow in a sunlit pine forest\n"
                                        "3s: the fox stops and looks straight into the camera",
                                tooltip="Lines like '0s: prompt' / '2.5s: prompt' / '#7: prompt', or a keyframe schedule "
                                        "'\"0\": \"prompt\", \"48\": \"prompt\"' (video frames). One untagged line = one prompt."),
                io.Combo.Input("switch", options=list(SWITCH_MODES), default="recache",
                               tooltip="recache: re-encode the cached frames under the new prompt (smooth change, scene kept); "
                                       "cut: flush the cache (hard cut)."),
            ],
            outputs=[Timeline.Output(display_name="TIMELINE", tooltip="The encoded prompts with their start times, for the "
                                     "sampler's timeline input (it switches prompts at chunk boundaries).")],
        )

    @classmethod
    def validate_inputs(cls, timeline=None):
        """The text alone (the rules against the sampler's length and chunking are in queue_checks.py)."""
        if timeline is None:
            return True
        try:
            parse_entries(timeline)
        except ValueError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, clip, timeline, switch) -> io.NodeOutput:
        entries = parse_entries(timeline)
        conds = [clip.encode_from_tokens_scheduled(clip.tokenize(e.prompt)) for e in entries]
        return io.NodeOutput({"entries": entries, "conditionings": conds, "switch": switch})
