"""Self-Forcing Benchmark: first-frame latency, FPS with and without decoding, peak VRAM."""

from __future__ import annotations

import json

import torch

import comfy.model_management as mm
from comfy_api.latest import io

from ..sf_core.latents import latent_size_for
from ..sf_core.pipeline import Background, Timings, decode_stream
from ..sf_core.stream import Stream
from ..sf_core.timing import peak_memory, reset_peak
from . import bridge
from .common import CATEGORY, check_size, sampling_inputs, size_inputs, stream_settings


class Benchmark(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SelfForcingBenchmark",
            display_name="Self-Forcing Benchmark",
            category=CATEGORY,
            description="Runs the given model (and VAE) for N chunks with a fixed random prompt embedding and reports "
                        "first-frame latency, frames per second with and without decoding, and peak VRAM.",
            inputs=[
                io.Model.Input("model", tooltip="The Wan2.1-family model to time (random prompt embedding)."),
                io.Vae.Input("vae", optional=True, tooltip="Also time streaming decoding with this VAE."),
                io.Int.Input("chunks", default=7, min=1, max=10000, tooltip="Chunks to time (7 chunks of 3 = 81 frames)."),
                *size_inputs(),
                *sampling_inputs(),
                io.Int.Input("warmup_chunks", default=1, min=0, max=100, tooltip="Chunks run first and not timed."),
            ],
            outputs=[io.String.Output(display_name="report", tooltip="The measurements as JSON: first-frame latency, FPS "
                                      "with and without decoding, seconds per chunk, peak VRAM.")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
            not_idempotent=True,
        )

    @classmethod
    def validate_inputs(cls, width=None, height=None):
        return check_size(width, height)

    @classmethod
    def fingerprint_inputs(cls, **kw):
        return float("nan")  # a benchmark always runs

    @classmethod
    def execute(cls, model, chunks, width, height, warmup_chunks, vae=None, **sampling) -> io.NodeOutput:
        settings = stream_settings(sampling)
        frames_per_chunk = settings.frames_per_chunk
        h, w = latent_size_for(height, width)
        _, cfg = bridge.wan_dit(model)
        text = torch.randn(1, cfg.text_len, cfg.text_dim, generator=torch.Generator().manual_seed(0)) * 0.1
        decoder = bridge.stream_decoder(vae) if vae is not None else None
        cache = settings.cache_bytes(cfg, h, w, chunks * frames_per_chunk, dtype=bridge.compute_dtype(model))
        bridge.load([model], memory_required=cache + (bridge.module_bytes(decoder) if decoder else 0))
        backbone = bridge.wan_backbone(model)
        device = backbone.device

        def run(n_chunks, timings):
            stream = Stream(backbone, text, latent_height=h, latent_width=w, num_frames=n_chunks * frames_per_chunk,
                            settings=settings, generator=0)
            with Background(lambda: decode_stream(stream, decoder.stream_decoder() if decoder else None, timings)) as steps:
                for _ in steps:
                    mm.throw_exception_if_processing_interrupted()
            stream.close()

        if warmup_chunks:
            run(warmup_chunks, Timings())
        reset_peak(device)
        timings = Timings()
        run(chunks, timings)
        report = {"device": str(device), "dtype": str(backbone.dtype).replace("torch.", ""),
                  "attention": backbone.attn_backend, "size": f"{width}x{height}", "chunks": chunks,
                  **timings.summary(), "seconds_per_chunk": timings.per_chunk_s, **peak_memory(device)}
        text_report = json.dumps(report, indent=1)
        bridge.LiveProgress(cls.hidden.unique_id, 1).status(
            f"first frame {report['first_frame_latency_s'] or report['first_chunk_latency_s']}s · "
            f"{report.get('fps_with_decoding', '-')} FPS decoded · {report.get('fps_without_decoding') or report['latent_fps_dit_only']} "
            f"{'FPS' if decoder else 'latent FPS'} DiT only · peak VRAM {report.get('peak_vram_gib', '-')} GiB")
        return io.NodeOutput(text_report, ui={"text": [text_report]})
