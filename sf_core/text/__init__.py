"""Text conditioning: the UMT5-XXL encoder (`model`), its file layouts (`layouts`), the sentencepiece
tokenizer (`tokenizer`) and the loader the engine uses (`encoder`).

    from sf_core.text import load_text_encoder
    with load_text_encoder("umt5_xxl_fp8_e4m3fn_scaled.safetensors") as te:   # freed on exit
        context = te.encode(["a red fox running through snow"])              # [1, 512, 4096]
"""

from .encoder import TextEncoder, encode_prompts, load_text_encoder, load_tokenizer
from .layouts import TextEncoderFileInfo, inspect_text_encoder, read_embedded_tokenizer
from .model import UMT5Config, UMT5Encoder
from .tokenizer import DEFAULT_LENGTH, EOS_ID, PAD_ID, Tokenizer

__all__ = [
    "DEFAULT_LENGTH",
    "EOS_ID",
    "PAD_ID",
    "TextEncoder",
    "TextEncoderFileInfo",
    "Tokenizer",
    "UMT5Config",
    "UMT5Encoder",
    "encode_prompts",
    "inspect_text_encoder",
    "load_text_encoder",
    "load_tokenizer",
    "read_embedded_tokenizer",
]
