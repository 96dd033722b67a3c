"""Tokenizers: byte-level (token id = byte value, vocab 256) and Hugging Face ``tokenizer.json``
files (``HFTokenizer``), and the token-file dtype that a vocabulary size needs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np

from moejax.data.errors import DataError


class Tokenizer(Protocol):
    """What the corpus writer needs from a tokenizer."""

    name: str
    vocab_size: int

    def encode(self, document: bytes | str) -> np.ndarray:
        """Token ids of one document, as a 1-D integer array."""


class ByteTokenizer:
    """Token id = byte value (vocab 256); lossless for any file, text or not."""

    name = "byte"
    vocab_size = 256

    def encode(self, document: bytes | str) -> np.ndarray:
        data = document.encode("utf-8") if isinstance(document, str) else bytes(document)
        return np.frombuffer(data, dtype=np.uint8)

    def decode(self, token_ids: np.ndarray) -> bytes:
        return np.asarray(token_ids).astype(np.uint8).tobytes()


class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer loaded from a ``tokenizer.json`` file."""

    def __init__(self, tokenizer_json: str | os.PathLike):
        path = Path(tokenizer_json)
        if not path.is_file():
            raise DataError(
                f"Tokenizer file {path} does not exist or is not a file; "
                "pass 'byte' or the path to an existing tokenizer.json."
            )
        try:
            # Imported lazily: only corpora with a Hugging Face tokenizer need the package.
            from tokenizers import Tokenizer as _HFTokenizer
        except ImportError:
            raise DataError(
                f"Loading {path} needs the Hugging Face tokenizers package; "
                "install it with `pip install tokenizers`."
            ) from None
        try:
            self._tokenizer = _HFTokenizer.from_file(str(path))
        except Exception as exc:  # noqa: BLE001 (the Rust side raises plain Exception)
            raise DataError(
                f"Could not load tokenizer {path} ({exc}); "
                "check that it is a Hugging Face tokenizer.json."
            ) from None
        self.name = f"hf:{path.resolve()}"
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, document: bytes | str) -> np.ndarray:
        text = (
            document.decode("utf-8", errors="replace") if isinstance(document, bytes) else document
        )
        return np.asarray(
            self._tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64
        )

    def decode(self, token_ids: np.ndarray) -> str:
        return self._tokenizer.decode(
            [int(token) for token in token_ids], skip_special_tokens=False
        )


def load_tokenizer(spec: str | os.PathLike | Tokenizer) -> Tokenizer:
    """``"byte"`` -> ByteTokenizer; tokenizer.json path -> HFTokenizer; a tokenizer object as is."""
    if not isinstance(spec, (str, os.PathLike)):
        return spec
    if str(spec) == "byte":
        return ByteTokenizer()
    if str(spec).endswith(".json") or Path(spec).exists():
        return HFTokenizer(spec)
    raise DataError(
        f"Unknown tokenizer {str(spec)!r}; use 'byte' or the path to a Hugging Face tokenizer.json."
    )


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype for every id below vocab_size (uint16 up to 65536, else uint32)."""
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    if vocab_size <= 1 << 32:
        return np.dtype(np.uint32)
    raise DataError(
        f"Vocabulary size {vocab_size} does not fit in uint32 token files; "
        "use a tokenizer with at most 2**32 tokens."
    )
