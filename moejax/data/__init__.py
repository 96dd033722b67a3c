"""Data pipeline: tokenizers, corpus files on disk, and batches. One concept per module:

- ``errors``: ``DataError``, raised for every corpus, tokenizer or batching problem.
- ``tokenizers``: byte-level and Hugging Face ``tokenizer.json`` tokenizers; token-file dtype.
- ``corpus_write``: finding and tokenizing source files; writing token files and meta.json
  (the on-disk format, and the atomic swap behind ``--overwrite``).
- ``corpus_read``: meta.json and memory-mapped splits, vocab/size checks, the cached default
  corpus, and ``Corpus`` / ``load_corpus(cfg)`` for the trainer.
- ``batches``: the checkpointable grain train iterator and deterministic eval batches.
"""

from moejax.data.batches import make_eval_batches, make_train_iterator
from moejax.data.corpus_read import (
    Corpus,
    check_corpus_fits,
    check_vocab,
    default_corpus_dir,
    load_corpus,
    load_split,
    read_meta,
)
from moejax.data.corpus_write import DEFAULT_HOLDOUT_EVERY, prepare_corpus, prepare_stdlib_corpus
from moejax.data.errors import DataError
from moejax.data.tokenizers import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = [
    "DEFAULT_HOLDOUT_EVERY",
    "ByteTokenizer",
    "Corpus",
    "DataError",
    "HFTokenizer",
    "check_corpus_fits",
    "check_vocab",
    "default_corpus_dir",
    "load_corpus",
    "load_split",
    "load_tokenizer",
    "make_eval_batches",
    "make_train_iterator",
    "prepare_corpus",
    "prepare_stdlib_corpus",
    "read_meta",
]
