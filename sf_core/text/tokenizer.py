"""UMT5 tokenizer: text -> token ids [B, L] with EOS appended, truncated and padded to L.

Sources, in the order `tokenizer_from` tries them for a path:
- a sentencepiece model as bytes / a uint8 tensor (ComfyUI's text-encoder files carry it as the
  tensor ``spiece_model``), or a sentencepiece ``.model`` file;
- a tokenizer folder in Hugging Face layout (e.g. ``google/umt5-xxl``, the one Wan's own pipeline
  uses): ``tokenizer.json`` through the ``tokenizers`` library when that is installed (that is what
  Wan's pipeline runs), else the folder's ``spiece.model`` through sentencepiece;
- a ``tokenizer.json`` file (needs ``tokenizers``).
(A text-encoder file holding ``spiece_model`` is opened by `sf_core.text.load_tokenizer`, which hands the
bytes here.)

Ids follow what the sentencepiece library gives for the model (no text cleaning on top). UMT5 appends
EOS (id 1); a prompt longer than the length keeps its first L-1 pieces and EOS as the last token
(as Hugging Face truncation does); the rest is padded with pad id 0 and masked out.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence, Union

import sentencepiece
import torch

from ..errors import CheckpointError, SelfForcingError

try:  # optional: only tokenizer.json files need it
    import tokenizers
except ImportError:
    tokenizers = None

DEFAULT_LENGTH = 512
PAD_ID = 0
EOS_ID = 1

TokenizerSource = Union[str, os.PathLike, bytes, torch.Tensor, "Tokenizer"]


class Tokenizer:
    """Prompts -> (ids [B, L] int64, mask [B, L] bool). Build it with `tokenizer_from`."""

    def __init__(
        self,
        encode_fn: Callable[[str], list[int]],
        vocab_size: int,
        eos_id: int = EOS_ID,
        pad_id: int = PAD_ID,
        source: str = "",
    ):
        self._encode_fn = encode_fn
        self.vocab_size = int(vocab_size)
        self.eos_id = int(eos_id)
        self.pad_id = int(pad_id)
        self.source = source

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id}, source={self.source!r})"

    def encode(self, text: str) -> list[int]:
        """One prompt -> its piece ids, without EOS and without truncation."""
        if not isinstance(text, str):
            raise SelfForcingError(f"a prompt must be a string, got {type(text).__name__}")
        return list(self._encode_fn(text))

    def __call__(self, prompts: Sequence[str] | str, length: int = DEFAULT_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts (B strings) -> ids [B, length] int64 (EOS appended, pad 0), mask [B, length] bool."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if length < 1:
            raise SelfForcingError(f"token length must be at least 1, got {length}")
        ids = torch.full((len(prompts), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), length), dtype=torch.bool)
        for row, text in enumerate(prompts):
            pieces = self.encode(text)
            if len(pieces) > length - 1:
                logging.getLogger("sf_core.text").warning(
                    "prompt %r... is %d tokens long; only the first %d are read (the text encoder takes %d with "
                    "its end token): shorten it", text[:40], len(pieces), length - 1, length)
            pieces = pieces[: length - 1] + [self.eos_id]
            ids[row, : len(pieces)] = torch.tensor(pieces, dtype=torch.long)
            mask[row, : len(pieces)] = True
        return ids, mask


def train_sentencepiece(sentences: Iterable[str], vocab_size: int, model_type: str = "unigram") -> bytes:
    """A sentencepiece model trained on `sentences` with UMT5's special ids (pad 0, eos 1, unk 2, no bos);
    returns the serialized model proto (what a text-encoder file embeds as `spiece_model`)."""
    out = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=out, vocab_size=vocab_size, model_type=model_type,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, hard_vocab_limit=False, minloglevel=2,
        num_threads=1,
    )
    return out.getvalue()


def _sentencepiece_tokenizer(model_proto: bytes, source: str) -> Tokenizer:
    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(model_proto)
    except Exception as e:
        raise CheckpointError(f"{source}: not a valid sentencepiece tokenizer model ({e})") from e
    eos = sp.eos_id() if sp.eos_id() >= 0 else EOS_ID
    pad = sp.pad_id() if sp.pad_id() >= 0 else PAD_ID

    def encode(text: str) -> list[int]:
        return sp.EncodeAsIds(text)

    return Tokenizer(encode, sp.GetPieceSize(), eos_id=eos, pad_id=pad, source=source)


def _tokenizer_json(path: Path) -> Tokenizer:
    if tokenizers is None:
        raise SelfForcingError(
            f"{path}: reading tokenizer.json needs the 'tokenizers' package (pip install tokenizers); "
            "or pass the folder's spiece.model instead"
        )
    try:
        tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable tokenizer.json ({e})") from e
    tok.no_truncation()
    tok.no_padding()
    eos = tok.token_to_id("</s>")
    pad = tok.token_to_id("<pad>")

    def encode(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False).ids

    return Tokenizer(
        encode,
        tok.get_vocab_size(with_added_tokens=True),
        eos_id=EOS_ID if eos is None else eos,
        pad_id=PAD_ID if pad is None else pad,
        source=str(path),
    )


def _from_folder(folder: Path) -> Tokenizer:
    tj, sp = folder / "tokenizer.json", folder / "spiece.model"
    if tj.is_file() and tokenizers is not None:
        return _tokenizer_json(tj)
    if sp.is_file():
        return _sentencepiece_tokenizer(sp.read_bytes(), str(sp))
    if tj.is_file():
        return _tokenizer_json(tj)  # raises the "install tokenizers" error
    found = sorted(p.name for p in folder.iterdir())[:10]
    raise CheckpointError(
        f"{folder}: no tokenizer found (expected tokenizer.json or spiece.model, as in the google/umt5-xxl "
        f"tokenizer folder); the folder holds {found or 'nothing'}"
    )


def tokenizer_from(source: TokenizerSource) -> Tokenizer:
    """A Tokenizer from a model proto (bytes or uint8 tensor), a .model / tokenizer.json file or a
    tokenizer folder (see the module docstring). Raises CheckpointError saying what was found."""
    if isinstance(source, Tokenizer):
        return source
    if isinstance(source, torch.Tensor):
        if source.dtype != torch.uint8:
            raise CheckpointError(f"a sentencepiece model tensor must be uint8 bytes, got {source.dtype}")
        return _sentencepiece_tokenizer(source.contiguous().cpu().numpy().tobytes(), "spiece_model tensor")
    if isinstance(source, (bytes, bytearray)):
        return _sentencepiece_tokenizer(bytes(source), "sentencepiece bytes")
    path = Path(source)
    if path.is_dir():
        return _from_folder(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such tokenizer file or folder")
    suffix = path.suffix.lower()
    if suffix == ".json":
        return _tokenizer_json(path)
    return _sentencepiece_tokenizer(path.read_bytes(), str(path))
