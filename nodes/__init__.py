"""ComfyUI nodes of the Self Forcing pack: thin adapters over sf_core (V3 API)."""

from comfy_api.latest import ComfyExtension, io

from .benchmark import Benchmark
from .decode import StreamingDecode
from .loader import LoadModel
from .lora import LoadLoRA
from .sampler import StreamSampler
from .timeline import PromptTimeline
from .toy import LoadToyTextEncoder
from .train import TrainLoRA

NODES = [LoadModel, LoadLoRA, PromptTimeline, StreamSampler, StreamingDecode, Benchmark, TrainLoRA, LoadToyTextEncoder]


class SelfForcingExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        from .queue_checks import install
        from .steering import add_routes

        add_routes()  # live prompts for running samplers (POST /selfforcing/steer)
        install()  # queue-time checks across inputs and nodes (this ComfyUI calls no on_load)
        return NODES
