"""ComfyUI entry point of the Self Forcing node pack (V3 API).

Importing this package needs no ComfyUI: the nodes are imported only when ComfyUI asks for them.
WEB_DIRECTORY: the frontend extension (web/*.js) that adds the live prompt box to the Stream Sampler.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import SelfForcingExtension

    return SelfForcingExtension()
