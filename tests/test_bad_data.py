"""Bad corpus input: each case answers with one sentence naming the problem and the
fix, and loses nothing (no corpus overwritten, no partial directory or file left behind)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import load_script, tiny_config

from moejax import data
from moejax.data import corpus_write, load_corpus


def write_texts(directory: Path, texts: dict[str, bytes]) -> str:
    """Write the files; returns a glob matching them all."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in texts.items():
        (directory / name).write_bytes(content)
    return str(directory / "*.txt")


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under directory (hidden ones included), by relative path -> bytes."""
    return {
        path.relative_to(directory).as_posix(): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def prepare(capsys, *argv: str) -> tuple[int, str]:
    """Run scripts/prepare_data.py in-process; returns (exit code, stderr)."""
    exit_code = load_script("prepare_data").main(list(argv))
    return exit_code, capsys.readouterr().err


def assert_one_line_error(stderr: str, *phrases: str) -> None:
    assert stderr.startswith("prepare_data.py: error: ") and stderr.count("\n") == 1
    assert "Traceback" not in stderr
    for phrase in phrases:
        assert phrase in stderr


def assert_one_sentence(error: data.DataError, *phrases: str) -> None:
    message = str(error)
    assert "\n" not in message and message.endswith(".") and "; " in message  # problem; fix.
    for phrase in phrases:
        assert phrase in message


@pytest.fixture
def old_corpus(tmp_path) -> Path:
    sources = write_texts(tmp_path / "old_src", {"a.txt": b"old val\n", "b.txt": b"old train\n"})
    return data.prepare_corpus([sources], tmp_path / "corpus", holdout_every=2)


# ----------------------------------------------------------------------------- 1. existing corpus


def test_prepare_onto_an_existing_corpus_refuses_without_overwrite(tmp_path, capsys, old_corpus):
    sources = write_texts(tmp_path / "new_src", {"c.txt": b"new val\n", "d.txt": b"new\n"})
    before = snapshot(tmp_path)
    exit_code, stderr = prepare(capsys, str(old_corpus), sources, "--holdout-every", "2")

    assert exit_code == 2
    assert_one_line_error(stderr, f"{old_corpus} already holds a corpus", "pass --overwrite")
    assert snapshot(tmp_path) == before


def test_prepare_onto_a_non_corpus_directory_refuses_even_with_overwrite(tmp_path, capsys):
    sources = write_texts(tmp_path / "src", {"a.txt": b"alpha\n", "b.txt": b"beta\n"})
    notes = tmp_path / "notes"
    write_texts(notes, {"todo.txt": b"keep me\n"})
    for extra in ([], ["--overwrite"]):
        exit_code, stderr = prepare(capsys, str(notes), sources, "--holdout-every", "2", *extra)

        assert exit_code == 2
        assert_one_line_error(
            stderr, "holds files that are not a corpus (todo.txt)", "new or empty"
        )
        assert snapshot(notes) == {"todo.txt": b"keep me\n"}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes", "src"]


@pytest.mark.parametrize("atomic_exchange", [True, False], ids=["renameat2", "two_renames"])
def test_overwrite_replaces_the_corpus_only_once_the_new_one_is_complete(
    tmp_path, capsys, monkeypatch, old_corpus, atomic_exchange
):
    if not atomic_exchange:
        monkeypatch.setattr(corpus_write, "_rename_exchange", lambda first, second: False)
    reader = data.load_split(old_corpus, "train")  # a run still reading the old corpus
    sources = write_texts(tmp_path / "new_src", {"c.txt": b"new val\n", "d.txt": b"new train\n"})
    exit_code, stderr = prepare(
        capsys, str(old_corpus), sources, "--holdout-every", "2", "--overwrite"
    )

    assert exit_code == 0, stderr
    assert data.ByteTokenizer().decode(data.load_split(old_corpus, "train")) == b"new train\n"
    assert sorted(path.name for path in old_corpus.iterdir()) == [
        "meta.json",
        "train.bin",
        "val.bin",
    ]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["corpus", "new_src", "old_src"]
    assert data.ByteTokenizer().decode(reader) == b"old train\n"  # open files stay readable


def test_overwrite_that_fails_midway_keeps_the_old_corpus(tmp_path, old_corpus):
    class CrashingTokenizer(data.ByteTokenizer):
        def encode(self, document):
            raise RuntimeError("tokenizer crashed")

    sources = write_texts(tmp_path / "new_src", {"c.txt": b"new val\n", "d.txt": b"new\n"})
    before = snapshot(tmp_path)
    with pytest.raises(RuntimeError, match="tokenizer crashed"):
        data.prepare_corpus([sources], old_corpus, CrashingTokenizer(), 2, overwrite=True)

    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- 2. empty input


def test_prepare_from_empty_files_writes_nothing(tmp_path, capsys):
    sources = write_texts(tmp_path / "src", {"a.txt": b"", "b.txt": b"", "c.txt": b""})
    out_dir = tmp_path / "new" / "corpus"  # missing parents must not be created either
    exit_code, stderr = prepare(capsys, str(out_dir), sources)

    assert exit_code == 2
    assert_one_line_error(stderr, "All 3 source files are empty (0 tokens)", "files that hold text")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["src"]


def test_prepare_that_leaves_a_split_empty_writes_nothing_and_keeps_the_old_corpus(
    tmp_path, capsys, old_corpus
):
    before = snapshot(old_corpus)
    # Sorted file 0 (a.txt, empty) is the only val file.
    sources = write_texts(tmp_path / "new_src", {"a.txt": b"", "b.txt": b"x\n", "c.txt": b"y\n"})
    for out_dir, extra in ((tmp_path / "fresh", []), (old_corpus, ["--overwrite"])):
        exit_code, stderr = prepare(capsys, str(out_dir), sources, *extra)

        assert exit_code == 2
        assert_one_line_error(
            stderr,
            "Split 'val' would get 0 tokens because its 1 file(s) are empty",
            "add non-empty files or change holdout_every (--holdout-every)",
        )
    assert snapshot(old_corpus) == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["corpus", "new_src", "old_src"]


# ----------------------------------------------------------------------------- 3. training input


def test_training_on_a_missing_or_empty_corpus_directory(tmp_path):
    missing, empty = tmp_path / "missing", tmp_path / "empty"
    empty.mkdir()
    for corpus_dir, problem in ((missing, "does not exist"), (empty, "is empty")):
        with pytest.raises(data.DataError) as error:
            load_corpus(tiny_config(f"data.corpus_dir={corpus_dir}"))

        assert_one_sentence(
            error.value,
            f"Corpus directory {corpus_dir} {problem}",
            f"build it with `python scripts/prepare_data.py {corpus_dir}`",
        )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["empty"]
    assert list(empty.iterdir()) == []


# ----------------------------------------------------------------------------- 4. token ids


def test_token_id_beyond_vocab_size_is_caught_from_the_token_files(old_corpus):
    tokens = np.fromfile(old_corpus / "train.bin", dtype=np.uint16)
    tokens[3] = 300  # meta.json still says vocab 256 and a max id below it
    tokens.tofile(old_corpus / "train.bin")
    before = snapshot(old_corpus)
    with pytest.raises(data.DataError) as error:
        load_corpus(tiny_config(f"data.corpus_dir={old_corpus}", "model.vocab_size=256"))

    assert_one_sentence(
        error.value,
        "contains token id 300 but model.vocab_size is 256",
        "raise model.vocab_size to at least 301 or re-tokenize",
    )
    assert snapshot(old_corpus) == before


# ----------------------------------------------------------------------------- 5. seq_len vs corpus


@pytest.mark.parametrize(
    ("train_length", "val_length", "phrases"),
    [
        (
            16,
            100,
            (
                "The train split has 16 tokens, room for 0 windows of train.seq_len + 1 = 17",
                "one batch of train.global_batch_size = 4 needs 4",
                "lower train.seq_len or train.global_batch_size",
            ),
        ),
        (19, 100, ("The train split has 19 tokens, room for 3 windows", "needs 4")),
        (
            100,
            27,
            (
                "The val split has 27 tokens, room for 11 windows",
                "train.eval_batches x train.global_batch_size = 3 x 4 needs 12",
                "lower train.seq_len or train.eval_batches, or use a larger corpus",
            ),
        ),
    ],
    ids=["shorter_than_one_window", "fewer_windows_than_a_batch", "fewer_than_eval_batches"],
)
def test_corpus_too_short_for_seq_len_and_batches(train_length, val_length, phrases):
    train_tokens, val_tokens = np.arange(train_length), np.arange(val_length)
    with pytest.raises(data.DataError) as error:
        data.check_corpus_fits(
            train_tokens, val_tokens, seq_len=16, global_batch_size=4, eval_batches=3
        )
    assert_one_sentence(error.value, *phrases)


def test_corpus_that_just_fits():
    data.check_corpus_fits(
        np.arange(20), np.arange(28), seq_len=16, global_batch_size=4, eval_batches=3
    )
