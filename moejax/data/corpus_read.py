"""Reading a corpus: ``meta.json`` and memory-mapped splits, checks of a corpus against a config
(vocabulary, enough windows), the cached default corpus, and ``Corpus`` / ``load_corpus(cfg)`` for
the trainer. The on-disk format is described in ``moejax.data.corpus_write``.

The default corpus is the running Python's standard library ``.py`` files, built once into
a cache directory by ``default_corpus_dir()``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from moejax.config import Config
from moejax.data.corpus_write import (
    FORMAT_VERSION,
    META_FILENAME,
    is_complete_corpus,
    prepare_stdlib_corpus,
)
from moejax.data.errors import DataError

CACHE_ENV_VAR = "MOEJAX_CACHE"


# --------------------------------------------------------------------------------------------
# The cached default corpus
# --------------------------------------------------------------------------------------------


def default_cache_root() -> Path:
    """``$MOEJAX_CACHE`` if set, else ``~/.cache/moejax``."""
    return Path(os.environ.get(CACHE_ENV_VAR) or Path.home() / ".cache" / "moejax")


def default_corpus_dir(cache_root: str | os.PathLike | None = None) -> Path:
    """The stdlib byte corpus, built on first use into ``{cache_root}/corpus/stdlib-py{XY}-byte``.

    Safe under concurrent callers: each builds into its own temporary directory and renames it
    into place; whoever loses the race keeps the winner's (identical) corpus.
    """
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    target = root / "corpus" / f"stdlib-py{sys.version_info.major}{sys.version_info.minor}-byte"
    if is_complete_corpus(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    build_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.build-", dir=target.parent))
    try:
        os.chmod(build_dir, 0o755)  # mkdtemp creates 0700
        prepare_stdlib_corpus(build_dir)
        _install_directory(build_dir, target)
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)  # gone already when the rename succeeded
    return target


def _install_directory(build_dir: Path, target: Path) -> None:
    """Rename build_dir to target, replacing a stale target but keeping a complete one."""
    for _ in range(3):
        try:
            os.rename(build_dir, target)
            return
        except OSError:
            if is_complete_corpus(target):
                return  # another process finished first; its corpus is as good as ours
            _discard_directory(target)
    raise DataError(
        f"Could not install the corpus at {target}; remove that directory and try again."
    )


def _discard_directory(directory: Path) -> None:
    """Atomically move a directory aside, then delete it (open files stay readable)."""
    trash = directory.with_name(f".{directory.name}.stale-{os.getpid()}-{time.monotonic_ns()}")
    try:
        os.rename(directory, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Reading a corpus
# --------------------------------------------------------------------------------------------


def read_meta(corpus_dir: str | os.PathLike) -> dict[str, Any]:
    """The corpus's meta.json as a dict, after checking that the corpus exists and is complete."""
    corpus_dir = Path(corpus_dir)
    build = f"build it with `python scripts/prepare_data.py {corpus_dir}`"
    fix = f"rebuild it with `python scripts/prepare_data.py {corpus_dir} --overwrite`"
    if corpus_dir.exists() and not corpus_dir.is_dir():
        raise DataError(
            f"Corpus path {corpus_dir} is a file, not a corpus directory; "
            "point data.corpus_dir at the directory that prepare_data.py wrote."
        )
    if not corpus_dir.is_dir():
        raise DataError(f"Corpus directory {corpus_dir} does not exist; {build}.")
    meta_path = corpus_dir / META_FILENAME
    if not meta_path.is_file() and not os.listdir(corpus_dir):
        raise DataError(f"Corpus directory {corpus_dir} is empty; {build}.")
    if not meta_path.is_file():
        raise DataError(
            f"Corpus directory {corpus_dir} has no {META_FILENAME} (not a corpus, or its "
            f"preparation was interrupted); point data.corpus_dir at a prepared corpus or {fix}."
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"Could not read {meta_path} ({exc}); {fix}.") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"Corpus {corpus_dir} has format version {meta.get('format_version')} "
            f"but this moejax reads version {FORMAT_VERSION}; {fix}."
        )
    return meta


def load_split(corpus_dir: str | os.PathLike, split: str) -> np.memmap:
    """Read-only memory map of one split's token ids (dtype from meta.json); read lazily."""
    corpus_dir = Path(corpus_dir)
    meta = read_meta(corpus_dir)
    fix = f"rebuild it with `python scripts/prepare_data.py {corpus_dir} --overwrite`"
    if split not in meta["splits"]:
        raise DataError(
            f"Corpus {corpus_dir} has no split {split!r} (it has {sorted(meta['splits'])}); "
            f"use one of those or {fix}."
        )
    token_path = corpus_dir / meta["splits"][split]["file"]
    if not token_path.is_file():
        raise DataError(f"Token file {token_path} is missing; {fix}.")
    size_bytes = token_path.stat().st_size
    if size_bytes == 0:
        raise DataError(
            f"Token file {token_path} is empty (0 tokens); rebuild the corpus with "
            f"`python scripts/prepare_data.py {corpus_dir} FILES... --overwrite` from more "
            f"non-empty files or another --holdout-every so split {split!r} gets tokens."
        )
    expected_bytes = meta["splits"][split]["num_tokens"] * np.dtype(meta["dtype"]).itemsize
    if size_bytes != expected_bytes:
        raise DataError(
            f"Token file {token_path} has {size_bytes} bytes "
            f"but meta.json expects {expected_bytes}; {fix}."
        )
    return np.memmap(token_path, dtype=meta["dtype"], mode="r")


def check_vocab(corpus_dir: str | os.PathLike, vocab_size: int) -> int:
    """Raise DataError if a corpus token id is >= the model's vocab_size; returns the max id.

    Scans the token files themselves (one pass over a memory map: ~6 ms per 100 MB in the page
    cache) rather than trusting meta.json's record, so files that disagree with it are caught.
    """
    meta = read_meta(corpus_dir)
    max_token_id = max(int(load_split(corpus_dir, split).max()) for split in meta["splits"])
    if max_token_id >= vocab_size:
        raise DataError(
            f"Corpus {corpus_dir} contains token id {max_token_id} but model.vocab_size is "
            f"{vocab_size}; raise model.vocab_size to at least {max_token_id + 1} "
            "or re-tokenize the corpus with a smaller vocabulary."
        )
    return max_token_id


def check_corpus_fits(
    train_tokens: np.ndarray,
    val_tokens: np.ndarray,
    *,
    seq_len: int,
    global_batch_size: int,
    eval_batches: int,
) -> None:
    """Raise DataError unless each split has as many distinct windows of seq_len + 1 tokens as
    one use of it reads: global_batch_size for train, eval_batches * global_batch_size for val."""
    needs = {  # split: (tokens, windows needed, where that count comes from, settings to lower)
        "train": (
            train_tokens,
            global_batch_size,
            f"one batch of train.global_batch_size = {global_batch_size}",
            "train.seq_len or train.global_batch_size",
        ),
        "val": (
            val_tokens,
            eval_batches * global_batch_size,
            f"train.eval_batches x train.global_batch_size = {eval_batches} x {global_batch_size}",
            "train.seq_len or train.eval_batches",
        ),
    }
    for split, (tokens, windows_needed, reason, settings) in needs.items():
        windows = max(len(tokens) - seq_len, 0)  # distinct starts of a seq_len + 1 window
        if windows < windows_needed:
            raise DataError(
                f"The {split} split has {len(tokens)} tokens, room for {windows} windows of "
                f"train.seq_len + 1 = {seq_len + 1} tokens, but {reason} needs {windows_needed}; "
                f"lower {settings}, or use a larger corpus."
            )


# --------------------------------------------------------------------------------------------
# The trainer's corpus
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Corpus:
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    bytes_per_token: float | None  # 1.0 for byte-level tokens: bits per byte = loss / ln 2


def load_corpus(cfg: Config) -> Corpus:
    corpus_dir = cfg.data.corpus_dir or default_corpus_dir(cfg.data.cache_dir)
    check_vocab(corpus_dir, cfg.model.vocab_size)
    byte_level = read_meta(corpus_dir)["tokenizer"] == "byte"
    corpus = Corpus(
        load_split(corpus_dir, "train"), load_split(corpus_dir, "val"), 1.0 if byte_level else None
    )
    t = cfg.train
    check_corpus_fits(
        corpus.train_tokens,
        corpus.val_tokens,
        seq_len=t.seq_len,
        global_batch_size=t.global_batch_size,
        eval_batches=t.eval_batches,
    )
    return corpus
