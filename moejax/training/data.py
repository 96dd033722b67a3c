"""Data pipeline: corpus preparation, token files on disk, and grain batch iterators.

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

The default corpus is the running Python's standard library ``.py`` files, built once into
a cache directory by ``default_corpus_dir()``.
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
from typing import Any, Protocol

import numpy as np

FORMAT_VERSION = 1
META_FILENAME = "meta.json"
DEFAULT_HOLDOUT_EVERY = 50
CACHE_ENV_VAR = "MOEJAX_CACHE"

# Recorded in meta.json so readers know how document boundaries look in the token stream.
_DOCUMENT_SEPARATOR = "none; each document ends with one newline of its own (appended if missing)"

# Directory names pruned from the stdlib walk; any name starting with "test" is pruned too.
_EXCLUDED_STDLIB_DIRS = frozenset({"site-packages", "dist-packages", "idle_test", "__pycache__"})


class DataError(ValueError):
    """A corpus, tokenizer or batching problem, with a one-sentence message saying how to fix it."""


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------


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
        what = "a corpus" if _is_complete_corpus(target) else "an incomplete corpus"
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
    if _is_complete_corpus(target):
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


def _is_complete_corpus(corpus_dir: Path) -> bool:
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


def _install_directory(build_dir: Path, target: Path) -> None:
    """Rename build_dir to target, replacing a stale target but keeping a complete one."""
    for _ in range(3):
        try:
            os.rename(build_dir, target)
            return
        except OSError:
            if _is_complete_corpus(target):
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
# Batches
# --------------------------------------------------------------------------------------------

# SplitMix64 constants (Steele et al., 2014): a counter-based generator, so the window start of
# any example index is computed directly, with no generator state to checkpoint.
_SPLITMIX_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_SPLITMIX_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_SPLITMIX_MUL2 = np.uint64(0x94D049BB133111EB)


def _splitmix64_mix(values: np.ndarray) -> np.ndarray:
    """SplitMix64's output function, elementwise on a uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        values = (values ^ (values >> np.uint64(30))) * _SPLITMIX_MUL1
        values = (values ^ (values >> np.uint64(27))) * _SPLITMIX_MUL2
        return values ^ (values >> np.uint64(31))


def window_starts(seed: int, example_indices: np.ndarray, num_starts: int) -> np.ndarray:
    """Window start per global example index, uniform over [0, num_starts); pure in (seed, index).

    Bits: SplitMix64 keyed by seed, evaluated at counter = index; the top 53 bits scaled to
    [0, num_starts) (bias below num_starts / 2**53, i.e. none in practice).
    """
    seed_key = _splitmix64_mix(np.array([seed % (1 << 64)], dtype=np.uint64) + _SPLITMIX_GAMMA)
    counters = np.asarray(example_indices, dtype=np.uint64) + np.uint64(1)
    with np.errstate(over="ignore"):
        random_bits = _splitmix64_mix(seed_key + counters * _SPLITMIX_GAMMA)
    unit_interval = (random_bits >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return np.minimum((unit_interval * num_starts).astype(np.int64), num_starts - 1)


def _local_batch_size(global_batch_size: int, process_index: int, process_count: int) -> int:
    if global_batch_size < 1 or process_count < 1:
        raise DataError(
            f"Batch size ({global_batch_size}) and process_count ({process_count}) "
            "must be positive."
        )
    if not 0 <= process_index < process_count:
        raise DataError(
            f"process_index {process_index} is outside [0, {process_count}); "
            "pass jax.process_index() and jax.process_count()."
        )
    if global_batch_size % process_count:
        raise DataError(
            f"Global batch size {global_batch_size} is not divisible by process_count "
            f"{process_count}; "
            "choose a batch size that is a multiple of the number of processes."
        )
    return global_batch_size // process_count


def _all_windows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """Zero-copy view [num_starts, seq_len + 1] of all windows; row r = tokens[r : r+seq_len+1]."""
    tokens = np.asarray(tokens)  # a memmap stays a (lazy) view of the file
    if tokens.ndim != 1:
        raise DataError(
            f"Tokens must be a 1-D array of token ids, got shape {tokens.shape}; "
            "pass load_split(corpus_dir, split)."
        )
    if seq_len < 1:
        raise DataError(f"seq_len must be positive, got {seq_len}.")
    if tokens.size < seq_len + 1:
        raise DataError(
            f"Split has {tokens.size} tokens but one window needs seq_len + 1 = {seq_len + 1}; "
            "lower seq_len or use a larger corpus."
        )
    return np.lib.stride_tricks.sliding_window_view(tokens, seq_len + 1)


def make_train_iterator(
    tokens: np.ndarray,
    *,
    seq_len: int,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    seed: int = 0,
    read_options: Any = None,
):
    """Infinite, checkpointable grain iterator of random windows.

    ``next(it)`` -> ``{"tokens": int32 [local, seq_len + 1]}``, local = global_batch_size //
    process_count. Step s's global batch holds example indices ``s * global_batch_size + row``
    with window starts ``window_starts(seed, index, len(tokens) - seq_len)``; process p gets
    rows ``[p * local, (p + 1) * local)``, so the data do not depend on process_count.
    ``it.get_state()`` is a small JSON-serialisable dict; ``it.set_state(state)`` resumes exactly.
    ``read_options`` (a ``grain.ReadOptions``) defaults to 2 threads prefetching 4 batches.
    """
    import grain  # imported lazily: ~1.5 s, and corpus preparation does not need it

    windows = _all_windows(tokens, seq_len)
    local_batch_size = _local_batch_size(global_batch_size, process_index, process_count)
    num_starts = windows.shape[0]
    first_row = process_index * local_batch_size

    def local_batch(step: int) -> dict[str, np.ndarray]:
        example_indices = step * global_batch_size + first_row + np.arange(local_batch_size)
        starts = window_starts(seed, example_indices, num_starts)
        return {"tokens": windows[starts].astype(np.int32)}

    # One dataset element per step, so the iterator state is just the next step index.
    steps = grain.MapDataset.range(sys.maxsize // global_batch_size).map(local_batch)
    options = read_options or grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
    return iter(steps.to_iter_dataset(options))


def eval_window_starts(num_windows: int, num_starts: int) -> np.ndarray:
    """num_windows starts evenly spaced over [0, num_starts - 1], first and last included."""
    return (np.arange(num_windows, dtype=np.int64) * (num_starts - 1)) // max(num_windows - 1, 1)


def make_eval_batches(
    tokens: np.ndarray,
    *,
    seq_len: int,
    batch_size: int,
    num_batches: int,
    process_index: int = 0,
    process_count: int = 1,
) -> list[dict[str, np.ndarray]]:
    """Deterministic eval batches: ``num_batches * batch_size`` evenly spaced windows.

    Global batch b holds windows ``[b * batch_size, (b + 1) * batch_size)``; process p gets its rows
    ``[p * local, (p + 1) * local)``. Each item is ``{"tokens": int32 [local, seq_len + 1]}``.
    Windows overlap (and may repeat) when the split is shorter than the windows requested.
    """
    windows = _all_windows(tokens, seq_len)
    local_batch_size = _local_batch_size(batch_size, process_index, process_count)
    if num_batches < 1:
        raise DataError(f"num_batches must be positive, got {num_batches}.")
    starts = eval_window_starts(num_batches * batch_size, windows.shape[0])
    first_row = process_index * local_batch_size
    return [
        {"tokens": windows[starts[offset : offset + local_batch_size]].astype(np.int32)}
        for offset in range(first_row, num_batches * batch_size, batch_size)
    ]
