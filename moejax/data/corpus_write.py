"""Writing a corpus: finding source files, tokenizing them, and writing token files and meta.

On-disk corpus format (``FORMAT_VERSION`` 1), one directory per corpus:

* ``train.bin`` / ``val.bin``: raw little-endian token ids, no header; uint16 when the
  tokenizer's vocab_size <= 65536, else uint32.
* ``meta.json``: vocab_size, dtype, tokenizer name, source description, format version and
  per-split token/document counts and max token id. It is written last, so a directory
  without it is never a complete corpus.

``prepare_corpus`` / ``prepare_stdlib_corpus`` build into a hidden sibling directory and move it
into place only once it is complete and both splits hold tokens. A non-empty output directory is
refused unless it holds nothing but a corpus and ``overwrite`` is set; then old and new swap in
one atomic rename (Linux ``renameat2(RENAME_EXCHANGE)``; elsewhere two renames).

Documents (source files) are tokenized one at a time and concatenated with no separator
token; each document is made to end with exactly one trailing newline of its own (one is
appended when the file does not already end with a newline). With the byte tokenizer
(token id = byte value, vocab 256) decoding a split therefore gives back its files' bytes.

Train/val split is by file: after sorting, the file at index ``i`` goes to ``val`` when
``i % holdout_every == 0`` and to ``train`` otherwise (so file 0 is always held out and
any corpus of two or more files has both splits).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moejax.data.errors import DataError
from moejax.data.tokenizers import Tokenizer, load_tokenizer, token_dtype

FORMAT_VERSION = 1
META_FILENAME = "meta.json"
DEFAULT_HOLDOUT_EVERY = 50

# Recorded in meta.json so readers know how document boundaries look in the token stream.
_DOCUMENT_SEPARATOR = "none; each document ends with one newline of its own (appended if missing)"

# Directory names pruned from the stdlib walk; any name starting with "test" is pruned too.
_EXCLUDED_STDLIB_DIRS = frozenset({"site-packages", "dist-packages", "idle_test", "__pycache__"})


# --------------------------------------------------------------------------------------------
# Writing token files
# --------------------------------------------------------------------------------------------


def write_token_files(
    documents_by_split: Mapping[str, Iterable[bytes | str]],
    out_dir: str | os.PathLike,
    tokenizer: str | os.PathLike | Tokenizer = "byte",
    *,
    source_description: str = "",
    extra_meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Tokenize each split's documents into ``{split}.bin``, then write ``meta.json``; returns meta.

    Crash-safe: every file is written to a temporary file in ``out_dir`` and moved into place
    with ``os.replace``; an existing meta.json is removed before any token file is replaced
    and the new one is written last, so a half-written corpus never has a meta.json.
    """
    tokenizer = load_tokenizer(tokenizer)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)

    temp_paths: dict[str, Path] = {}
    split_stats: dict[str, dict[str, int]] = {}
    try:
        for split, documents in documents_by_split.items():
            temp_paths[split] = _new_temp_path(out_dir, f"{split}.bin")
            split_stats[split] = _tokenize_into(temp_paths[split], documents, tokenizer, dtype)
        meta = {
            "format_version": FORMAT_VERSION,
            "vocab_size": int(tokenizer.vocab_size),
            "dtype": dtype.name,
            "tokenizer": tokenizer.name,
            "source": source_description,
            "document_separator": _DOCUMENT_SEPARATOR,
            "num_tokens": {split: stats["num_tokens"] for split, stats in split_stats.items()},
            "splits": {
                split: {"file": f"{split}.bin", **stats} for split, stats in split_stats.items()
            },
            **(extra_meta or {}),
        }
        # An old meta.json must not vouch for token files that are about to change.
        (out_dir / META_FILENAME).unlink(missing_ok=True)
        for split, temp_path in temp_paths.items():
            os.replace(temp_path, out_dir / f"{split}.bin")
        _atomic_write_text(out_dir / META_FILENAME, json.dumps(meta, indent=2) + "\n")
    finally:
        for temp_path in temp_paths.values():
            temp_path.unlink(missing_ok=True)  # no-op for files already moved into place
    return meta


def _new_temp_path(directory: Path, final_name: str) -> Path:
    """A fresh hidden file beside its final location (same filesystem -> atomic rename)."""
    handle, name = tempfile.mkstemp(prefix=f".{final_name}.", suffix=".tmp", dir=directory)
    os.close(handle)
    os.chmod(name, 0o644)  # mkstemp creates 0600; token files should be as readable as any output
    return Path(name)


def _frame_document(document: bytes | str) -> bytes | str:
    """The document with exactly one trailing newline of its own (empty documents stay empty)."""
    newline = b"\n" if isinstance(document, bytes) else "\n"
    if not document or document.endswith(newline):
        return document
    return document + newline


def _tokenize_into(
    path: Path, documents: Iterable[bytes | str], tokenizer: Tokenizer, dtype: np.dtype
) -> dict[str, int]:
    """Append each document's token ids to ``path``; returns token/document counts and max id."""
    num_tokens = num_documents = 0
    max_token_id = -1
    with open(path, "wb") as token_file:
        for document in documents:
            token_ids = np.asarray(tokenizer.encode(_frame_document(document)))
            num_documents += 1
            if token_ids.size == 0:
                continue
            if token_ids.min() < 0 or token_ids.max() >= tokenizer.vocab_size:
                raise DataError(
                    f"Tokenizer {tokenizer.name} produced id {int(token_ids.max())} outside its "
                    f"vocab_size {tokenizer.vocab_size}; fix the tokenizer's vocab_size."
                )
            token_ids.astype(dtype).tofile(token_file)
            num_tokens += token_ids.size
            max_token_id = max(max_token_id, int(token_ids.max()))
        token_file.flush()
        os.fsync(token_file.fileno())
    return {"num_tokens": num_tokens, "num_documents": num_documents, "max_token_id": max_token_id}


def _atomic_write_text(path: Path, text: str) -> None:
    temp_path = _new_temp_path(path.parent, path.name)
    try:
        with open(temp_path, "w", encoding="utf-8") as text_file:
            text_file.write(text)
            text_file.flush()
            os.fsync(text_file.fileno())
        os.replace(temp_path, path)
    finally:
        temp_path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Sources and corpus preparation
# --------------------------------------------------------------------------------------------


def stdlib_dir() -> Path:
    """The running interpreter's standard-library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def _is_excluded_stdlib_dir(name: str) -> bool:
    return name in _EXCLUDED_STDLIB_DIRS or name.lower().startswith("test")


def discover_stdlib_sources(root: str | os.PathLike | None = None) -> list[Path]:
    """The stdlib's ``.py`` files minus site/dist-packages and test dirs, by relative path."""
    root = Path(root) if root is not None else stdlib_dir()
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [
            name for name in dirnames if not _is_excluded_stdlib_dir(name)
        ]  # prune in place
        found.extend(Path(dirpath, name) for name in filenames if name.endswith(".py"))
    return sorted(found, key=lambda path: path.relative_to(root).as_posix())


def resolve_sources(patterns: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand file paths and globs (``**`` allowed) into unique files, sorted by absolute path."""
    if not patterns:
        raise DataError("No source files given; pass at least two files or globs.")
    files: set[Path] = set()
    for pattern in patterns:
        pattern = str(pattern)
        matches = [Path(match) for match in glob.glob(os.path.expanduser(pattern), recursive=True)]
        matched_files = [match.resolve() for match in matches if match.is_file()]
        if not matched_files:
            raise DataError(
                f"No files match {pattern!r}; check the path, "
                "or use a glob such as 'dir/**/*.txt' for a directory."
            )
        files.update(matched_files)
    return sorted(files, key=lambda path: path.as_posix())


def split_by_file(
    files: Sequence[Path], holdout_every: int = DEFAULT_HOLDOUT_EVERY
) -> dict[str, list[Path]]:
    """Split sorted files: index % holdout_every == 0 -> val, the rest -> train."""
    if holdout_every < 2:
        raise DataError(
            f"holdout_every must be at least 2 (got {holdout_every}), "
            "otherwise no file is left for training."
        )
    if len(files) < 2:
        raise DataError(
            f"Got {len(files)} source file(s) but the by-file split needs at least 2; "
            "add more files."
        )
    return {
        "train": [path for index, path in enumerate(files) if index % holdout_every != 0],
        "val": [path for index, path in enumerate(files) if index % holdout_every == 0],
    }


def _build_corpus(
    files: Sequence[Path],
    out_dir: str | os.PathLike,
    tokenizer: str | os.PathLike | Tokenizer,
    holdout_every: int,
    source_description: str,
    overwrite: bool,
) -> Path:
    """Tokenize into a hidden sibling directory, check it, then move it into place as out_dir.

    Nothing appears at out_dir (not even missing parent directories) until the new corpus is
    complete and every split holds tokens; an old corpus is replaced by one atomic swap.
    """
    files_by_split = split_by_file(files, holdout_every)
    target = Path(out_dir).resolve()  # a symlinked corpus is replaced where it really lives
    _check_output_dir(target, overwrite)
    documents_by_split = {
        split: (path.read_bytes() for path in paths) for split, paths in files_by_split.items()
    }
    extra_meta = {
        "split_rule": f"by file: sorted index % {holdout_every} == 0 -> val",
        "holdout_every": holdout_every,
        "num_files": {split: len(paths) for split, paths in files_by_split.items()},
        "num_source_bytes": sum(path.stat().st_size for path in files),
    }
    build_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.build-", dir=_nearest_dir(target)))
    try:
        os.chmod(build_dir, 0o755)  # mkdtemp creates 0700
        meta = write_token_files(
            documents_by_split,
            build_dir,
            tokenizer,
            source_description=source_description,
            extra_meta=extra_meta,
        )
        _check_splits_have_tokens(meta, files_by_split)
        _move_corpus_into_place(build_dir, target, overwrite)
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)  # the old corpus after a swap, else leftovers
    return Path(out_dir)


# Names a corpus directory may hold; --overwrite replaces a directory only if it holds nothing else.
_CORPUS_FILE_NAMES = frozenset({META_FILENAME, "train.bin", "val.bin"})


def _is_corpus_file(name: str) -> bool:
    """A corpus file, or a temporary one left by an interrupted ``write_token_files``."""
    return name in _CORPUS_FILE_NAMES or (name.startswith(".") and name.endswith(".tmp"))


def _check_output_dir(target: Path, overwrite: bool) -> None:
    """Refuse a file, a directory holding anything but a corpus, and a corpus without overwrite."""
    if target.exists() and not target.is_dir():
        raise DataError(f"Output path {target} is a file; choose a directory path for the corpus.")
    entries = sorted(os.listdir(target)) if target.is_dir() else []
    foreign = [name for name in entries if not _is_corpus_file(name)]
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise DataError(
            f"Output directory {target} is not empty and holds files that are not a corpus "
            f"({shown}); choose a new or empty directory (--overwrite replaces only a corpus)."
        )
    if entries and not overwrite:
        what = "a corpus" if is_complete_corpus(target) else "an incomplete corpus"
        raise DataError(
            f"Output directory {target} already holds {what}; pass --overwrite "
            "(overwrite=True) to replace it, or choose another directory."
        )


def _nearest_dir(target: Path) -> Path:
    """target's parent, or its nearest existing ancestor (same filesystem, so rename works)."""
    directory = target.parent
    while not directory.is_dir():
        directory = directory.parent
    return directory


def _check_splits_have_tokens(meta: Mapping[str, Any], files_by_split: Mapping[str, list]) -> None:
    num_tokens = meta["num_tokens"]
    if not any(num_tokens.values()):
        num_files = sum(len(paths) for paths in files_by_split.values())
        raise DataError(
            f"All {num_files} source files are empty (0 tokens); pass files that hold text."
        )
    for split, count in num_tokens.items():
        if count == 0:
            raise DataError(
                f"Split {split!r} would get 0 tokens because its {len(files_by_split[split])} "
                "file(s) are empty; add non-empty files or change holdout_every "
                "(--holdout-every) so that it gets some."
            )


def _move_corpus_into_place(build_dir: Path, target: Path, overwrite: bool) -> None:
    """Rename build_dir to target; with overwrite a non-empty target swaps places with it
    (build_dir then holds the old corpus, for the caller to delete)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if overwrite and target.is_dir() and os.listdir(target):
        _exchange_directories(build_dir, target)
        return
    try:
        os.rename(build_dir, target)  # replaces an empty directory, as POSIX rename allows
    except OSError as exc:
        raise DataError(
            f"Could not move the new corpus into {target} ({exc.strerror}); "
            "check that nothing else is writing there and run again."
        ) from None


def _exchange_directories(first: Path, second: Path) -> None:
    """Swap two directories: atomically with Linux renameat2(RENAME_EXCHANGE), else with two
    renames (a crash between them leaves second's old contents at a hidden ``.stale-`` name)."""
    if _rename_exchange(first, second):
        return
    aside = second.with_name(f".{second.name}.stale-{os.getpid()}-{time.monotonic_ns()}")
    os.rename(second, aside)
    try:
        os.rename(first, second)
    except OSError:
        os.rename(aside, second)  # put the old corpus back
        raise
    os.rename(aside, first)


def _rename_exchange(first: Path, second: Path) -> bool:
    """True if the kernel swapped the two paths in one step; False where it cannot."""
    try:
        import ctypes  # imported lazily: only replacing a corpus needs it

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (AttributeError, OSError, TypeError):  # not Linux/glibc
        return False
    at_current_dir, rename_exchange = -100, 2  # AT_FDCWD and RENAME_EXCHANGE from <fcntl.h>
    result = renameat2(
        at_current_dir, os.fsencode(first), at_current_dir, os.fsencode(second), rename_exchange
    )
    return result == 0


def prepare_corpus(
    sources: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    tokenizer: str | os.PathLike | Tokenizer = "byte",
    holdout_every: int = DEFAULT_HOLDOUT_EVERY,
    *,
    overwrite: bool = False,
) -> Path:
    """Tokenize files/globs into out_dir (train.bin, val.bin, meta.json); returns out_dir.

    out_dir must be missing or empty, or, with overwrite, hold nothing but a corpus (which is
    replaced only once the new one is complete).
    """
    files = resolve_sources(sources)
    shown_patterns = ", ".join(map(str, sources[:3])) + (", ..." if len(sources) > 3 else "")
    description = f"{len(files)} files from {shown_patterns}"
    return _build_corpus(files, out_dir, tokenizer, holdout_every, description, overwrite)


def prepare_stdlib_corpus(
    out_dir: str | os.PathLike,
    tokenizer: str | os.PathLike | Tokenizer = "byte",
    holdout_every: int = DEFAULT_HOLDOUT_EVERY,
    *,
    overwrite: bool = False,
) -> Path:
    """Tokenize the running Python's standard-library ``.py`` files into out_dir; returns it.

    out_dir rules as in ``prepare_corpus``.
    """
    root = stdlib_dir()
    files = discover_stdlib_sources(root)
    description = (
        f"Python {sys.version_info.major}.{sys.version_info.minor} standard library .py files "
        f"under {root} (excluding site-packages, dist-packages and test* / idle_test dirs), "
        "sorted by relative path"
    )
    return _build_corpus(files, out_dir, tokenizer, holdout_every, description, overwrite)


# --------------------------------------------------------------------------------------------
# Checking a written corpus
# --------------------------------------------------------------------------------------------


def is_complete_corpus(corpus_dir: Path) -> bool:
    """meta.json readable, current format version, and every split file of the recorded size."""
    try:
        meta = json.loads((corpus_dir / META_FILENAME).read_text(encoding="utf-8"))
        if meta.get("format_version") != FORMAT_VERSION:
            return False
        itemsize = np.dtype(meta["dtype"]).itemsize
        return all(
            (corpus_dir / info["file"]).stat().st_size == info["num_tokens"] * itemsize
            for info in meta["splits"].values()
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False
