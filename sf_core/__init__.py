"""Self Forcing engine: streaming autoregressive Wan2.1 video generation in pure PyTorch.

Nothing in this package imports ComfyUI; `nodes/` adapts it to ComfyUI.
"""

__version__ = "0.1.0"
