"""ComfyUI entry point of the Self Forcing node pack (V3 API).

Importing this package needs no ComfyUI: the nodes are imported only when ComfyUI asks for them.
"""


async def comfy_entrypoint():
    from .nodes import SelfForcingExtension

    return SelfForcingExtension()
