"""Sampling and training options declared once: the generate and bench flags come from one declaration and give
the same settings, the train flags and the Train LoRA node's inputs from another; the memory plan of a stream equals
what its cache allocates."""

from __future__ import annotations

import pytest
import torch

from sf_core.cli import build_parser
from sf_core.config import WanConfig
from sf_core.errors import SelfForcingError
from sf_core.options import SAMPLING, TRAINING, stream_settings, train_settings
from sf_core.stream import Stream, StreamSettings
from sf_core.wan import WanBackbone

FLAGS = ["--frames-per-chunk", "2", "--steps", "1000, 500", "--shift", "3", "--window", "8", "--sink", "2",
         "--sink-positions", "absolute"]


def test_generate_and_bench_share_the_sampling_flags():
    parser = build_parser()
    gen = parser.parse_args(["generate", "--model", "m", "--text-encoder", "t", "--prompt", "p", "-o", "o.mp4", *FLAGS])
    bench = parser.parse_args(["bench", *FLAGS])
    want = (2, (1000.0, 500.0), 3.0, 8, 2, "absolute")
    for settings in (stream_settings(gen), stream_settings(bench)):
        assert (settings.frames_per_chunk, settings.steps, settings.shift, settings.window, settings.sink,
                settings.sink_positions) == want
    streaming = parser.parse_args(["generate", "--model", "m", "--text-encoder", "t", "--prompt", "p", "-o", "o.mp4",
                                   "--strength", "0.3", "--context", "input", "--blend-chunks", "2", "--blend", "slerp"])
    s = stream_settings(streaming)
    assert (s.strength, s.context, s.blend_chunks, s.blend) == (0.3, "input", 2, "slerp")
    defaults = stream_settings(parser.parse_args(["bench"]))
    assert defaults == StreamSettings() and defaults.window is None  # window 0 = the whole video
    assert {o.name for o in SAMPLING} == {"frames_per_chunk", "denoising_steps", "shift", "window", "sink",
                                          "sink_positions"}  # the node inputs of the sampler and the benchmark


@pytest.mark.parametrize("steps, words", [("1000,x", "numbers separated by commas"), ("500,750", "must decrease")])
def test_bad_step_lists_say_what_to_write(steps, words):
    with pytest.raises(SelfForcingError, match=words):
        stream_settings({"denoising_steps": steps})


@pytest.mark.parametrize("window, sink, positions, frames", [(None, 0, "adjacent", 6), (5, 0, "adjacent", None),
                                                              (5, 2, "adjacent", None), (5, 2, "absolute", 9)])
def test_memory_plan_equals_the_cache_a_stream_allocates(tiny_model, window, sink, positions, frames):
    settings = StreamSettings(frames_per_chunk=1, window=window, sink=sink, sink_positions=positions)
    cfg = WanConfig.preset("tiny")
    text = torch.zeros(1, 4, cfg.text_dim)
    stream = Stream(WanBackbone(tiny_model, dtype=torch.float32), text, latent_height=4, latent_width=6,
                    num_frames=frames, settings=settings)
    assert stream.cache.nbytes == settings.cache_bytes(cfg, 4, 6, frames, dtype=torch.float32)


def test_unbounded_stream_without_a_window_is_refused(tiny_model):
    with pytest.raises(SelfForcingError, match="needs a window"):
        StreamSettings().cache_bytes(WanConfig.preset("tiny"), 4, 4, None)


def test_train_flags_and_node_values_give_the_same_training_settings():
    parser = build_parser()
    args = parser.parse_args(["train", "--model", "m", "--teacher", "t", "--text-encoder", "e", "--prompts", "p",
                              "-o", "o.safetensors", "--iterations", "7", "--rank", "4", "--lr", "3e-4",
                              "--critic-lr", "5e-5", "--critic-ratio", "2", "--guidance", "1.5", "--switch-share", "0.25"])
    node = {"iterations": 7, "rank": 4, "learning_rate": 3e-4, "critic_learning_rate": 5e-5, "critic_ratio": 2,
            "guidance": 1.5, "switch_share": 0.25}  # the Train LoRA node's inputs of the same names
    a, b = train_settings(args), train_settings(node)
    assert a == b and (a.iterations, a.rank, a.lr, a.critic_lr, a.critic_ratio, a.guidance, a.switch) == (
        7, 4, 3e-4, 5e-5, 2, 1.5, 0.25)
    defaults = train_settings(parser.parse_args(["train", "--model", "m", "--teacher", "t", "--text-encoder", "e",
                                                 "--prompts", "p", "-o", "o.safetensors"]))
    assert defaults == train_settings({}) and defaults.iterations == 600
    assert [o.cli_flag for o in TRAINING] == ["--iterations", "--rank", "--lr", "--critic-lr", "--critic-ratio",
                                              "--guidance", "--switch-share"]  # the spellings users already type
    assert defaults.switch == 0.0  # no prompt-switch tuning unless asked
