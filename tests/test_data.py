"""Tests for moejax.data: corpus discovery, token files, caching, grain iterators, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from moejax import data
from moejax.data import corpus_read, corpus_write
from moejax.data.batches import window_starts
from moejax.data.tokenizers import token_dtype

REPO_ROOT = Path(__file__).resolve().parent.parent
PREPARE_SCRIPT = REPO_ROOT / "scripts" / "prepare_data.py"


# ----------------------------------------------------------------------------- helpers


def write_texts(directory: Path, texts: dict[str, bytes]) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in texts.items():
        (directory / name).write_bytes(content)
    return sorted(directory / name for name in texts)


def arange_tokens(length: int) -> np.ndarray:
    """Token i has value i, so a window's first value is its start offset."""
    return np.arange(length, dtype=np.uint32)


class WideTokenizer:
    """Fake tokenizer whose vocabulary needs uint32 token files."""

    name = "wide"
    vocab_size = 70_000

    def encode(self, document):
        return np.array([len(document), 69_999], dtype=np.int64)


@pytest.fixture(scope="module")
def stdlib_corpus(tmp_path_factory) -> Path:
    return data.prepare_stdlib_corpus(tmp_path_factory.mktemp("stdlib") / "corpus")


# ----------------------------------------------------------------------------- stdlib discovery


def test_stdlib_discovery_excludes_site_packages_and_tests_and_is_sorted():
    root = corpus_write.stdlib_dir()
    files = corpus_write.discover_stdlib_sources()
    relative = [path.relative_to(root).as_posix() for path in files]

    assert len(files) > 300
    assert all(name.endswith(".py") for name in relative)
    assert relative == sorted(relative)
    assert len(set(relative)) == len(relative)
    for name in relative:
        directories = name.split("/")[:-1]
        assert not {"site-packages", "dist-packages", "idle_test"} & set(directories), name
        assert not any(directory.startswith("test") for directory in directories), name
    assert "json/decoder.py" in relative and "os.py" in relative
    assert corpus_write.discover_stdlib_sources() == files


def test_split_by_file_is_disjoint_deterministic_and_every_nth_file():
    files = corpus_write.discover_stdlib_sources()
    splits = corpus_write.split_by_file(files, holdout_every=50)

    assert set(splits["train"]).isdisjoint(splits["val"])
    assert sorted(splits["train"] + splits["val"]) == sorted(files)
    assert splits["val"] == files[::50]
    assert corpus_write.split_by_file(files, holdout_every=50) == splits


def test_split_needs_two_files_and_holdout_of_at_least_two(tmp_path):
    files = write_texts(tmp_path, {"a.txt": b"a", "b.txt": b"b"})
    with pytest.raises(data.DataError, match="needs at least 2"):
        corpus_write.split_by_file(files[:1])
    with pytest.raises(data.DataError, match="holdout_every must be at least 2"):
        corpus_write.split_by_file(files, holdout_every=1)


def test_stdlib_corpus_tokens_are_the_file_bytes_in_order(stdlib_corpus):
    meta = data.read_meta(stdlib_corpus)
    val_files = corpus_write.split_by_file(corpus_write.discover_stdlib_sources())["val"]
    expected = b"".join(corpus_write._frame_document(path.read_bytes()) for path in val_files)

    assert data.ByteTokenizer().decode(data.load_split(stdlib_corpus, "val")) == expected
    assert meta["num_files"]["val"] == len(val_files)
    assert meta["num_tokens"]["train"] + meta["num_tokens"]["val"] >= meta["num_source_bytes"]
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 256 and meta["tokenizer"] == "byte"


# ----------------------------------------------------------------------------- token files


def test_byte_token_files_round_trip(tmp_path):
    documents = {"train": [b"hello\n", "w\u00f6rld", b"\x00\xff binary"], "val": [b"held out\n"]}
    meta = corpus_write.write_token_files(
        documents, tmp_path, "byte", source_description="unit test"
    )

    train = data.load_split(tmp_path, "train")
    assert isinstance(train, np.memmap) and train.dtype == np.uint16 and not train.flags.writeable
    assert (
        data.ByteTokenizer().decode(train)
        == b"hello\n" + "w\u00f6rld\n".encode("utf-8") + b"\x00\xff binary\n"
    )
    assert data.ByteTokenizer().decode(data.load_split(tmp_path, "val")) == b"held out\n"
    assert meta == data.read_meta(tmp_path)
    assert meta["num_tokens"] == {"train": len(train), "val": 9}
    assert meta["splits"]["train"]["max_token_id"] == 255
    assert meta["source"] == "unit test" and meta["format_version"] == corpus_write.FORMAT_VERSION
    assert sorted(os.listdir(tmp_path)) == ["meta.json", "train.bin", "val.bin"]


def test_token_dtype_follows_vocab_size(tmp_path):
    assert token_dtype(256) == np.uint16
    assert token_dtype(65_536) == np.uint16
    assert token_dtype(65_537) == np.uint32

    corpus_write.write_token_files({"train": [b"abc", b"de"]}, tmp_path, WideTokenizer())
    assert data.read_meta(tmp_path)["dtype"] == "uint32"
    np.testing.assert_array_equal(data.load_split(tmp_path, "train"), [4, 69_999, 3, 69_999])


def failing_documents(count_before_failure: int):
    for index in range(count_before_failure):
        yield f"document {index}\n".encode()
    raise RuntimeError("disk on fire")


def test_crash_while_tokenizing_leaves_no_files(tmp_path):
    with pytest.raises(RuntimeError, match="disk on fire"):
        corpus_write.write_token_files(
            {"train": [b"fine\n"], "val": failing_documents(3)}, tmp_path
        )
    assert os.listdir(tmp_path) == []


def test_crash_while_tokenizing_keeps_the_previous_complete_corpus(tmp_path):
    corpus_write.write_token_files({"train": [b"old train\n"], "val": [b"old val\n"]}, tmp_path)
    with pytest.raises(RuntimeError):
        corpus_write.write_token_files({"train": failing_documents(2), "val": [b"new\n"]}, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["meta.json", "train.bin", "val.bin"]
    assert data.ByteTokenizer().decode(data.load_split(tmp_path, "train")) == b"old train\n"


def test_crash_before_meta_is_written_leaves_no_meta(tmp_path, monkeypatch):
    corpus_write.write_token_files({"train": [b"old train\n"], "val": [b"old val\n"]}, tmp_path)
    real_replace = os.replace

    def replace_failing_on_meta(source, destination):
        if Path(destination).name == corpus_write.META_FILENAME:
            raise OSError("power cut")
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", replace_failing_on_meta)
    with pytest.raises(OSError, match="power cut"):
        corpus_write.write_token_files({"train": [b"new train\n"], "val": [b"new val\n"]}, tmp_path)
    monkeypatch.undo()

    assert sorted(os.listdir(tmp_path)) == ["train.bin", "val.bin"]  # no temp files, no meta.json
    with pytest.raises(data.DataError, match="has no meta.json"):
        data.load_split(tmp_path, "train")


# ----------------------------------------------------------------------------- prepare_corpus


def test_prepare_corpus_with_globs_and_byte_tokenizer(tmp_path):
    files = write_texts(
        tmp_path / "src" / "nested",
        {f"{index}.txt": f"text {index}".encode() for index in range(5)},
    )
    corpus = data.prepare_corpus(
        [str(tmp_path / "src" / "**" / "*.txt")], tmp_path / "out", holdout_every=2
    )

    meta = data.read_meta(corpus)
    assert meta["num_files"] == {"train": 2, "val": 3}
    expected_val = b"".join(
        corpus_write._frame_document(files[index].read_bytes()) for index in (0, 2, 4)
    )
    assert data.ByteTokenizer().decode(data.load_split(corpus, "val")) == expected_val


def test_prepare_corpus_glob_matching_nothing_names_the_pattern(tmp_path):
    pattern = str(tmp_path / "missing" / "*.txt")
    with pytest.raises(data.DataError, match=r"No files match .*missing.*\*\.txt"):
        data.prepare_corpus([pattern], tmp_path / "out")


def train_small_hf_tokenizer(texts: list[str], path: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.save(str(path))
    return path


def test_prepare_corpus_with_hugging_face_tokenizer(tmp_path):
    texts = {
        f"{index}.py": f"def f{index}(x):\n    return x + {index}\n".encode() for index in range(6)
    }
    files = write_texts(tmp_path / "src", texts)
    tokenizer_json = train_small_hf_tokenizer(
        [path.read_text() for path in files], tmp_path / "tokenizer.json"
    )

    corpus = data.prepare_corpus(
        [str(tmp_path / "src" / "*.py")], tmp_path / "out", str(tokenizer_json), holdout_every=3
    )

    meta = data.read_meta(corpus)
    hf = data.HFTokenizer(tokenizer_json)
    assert meta["tokenizer"].startswith("hf:") and meta["vocab_size"] == hf.vocab_size > 256
    train = data.load_split(corpus, "train")
    assert train.dtype == np.uint16 and len(train) < sum(
        len(files[i].read_bytes()) for i in (1, 2, 4, 5)
    )
    assert hf.decode(train) == "".join(files[i].read_text() for i in (1, 2, 4, 5))
    assert hf.decode(data.load_split(corpus, "val")) == files[0].read_text() + files[3].read_text()


def test_missing_tokenizers_package_says_pip_install(tmp_path, monkeypatch):
    tokenizer_json = tmp_path / "tokenizer.json"
    tokenizer_json.write_text("{}")
    monkeypatch.setitem(
        sys.modules, "tokenizers", None
    )  # makes `import tokenizers` raise ImportError
    with pytest.raises(data.DataError, match="pip install tokenizers"):
        data.load_tokenizer(str(tokenizer_json))


def test_unknown_tokenizer_spec():
    with pytest.raises(data.DataError, match="Unknown tokenizer 'gpt9'"):
        data.load_tokenizer("gpt9")


# ----------------------------------------------------------------------------- train iterator


def take(iterator, count: int) -> list[np.ndarray]:
    return [next(iterator)["tokens"] for _ in range(count)]


def test_train_iterator_shapes_dtype_and_windows_are_contiguous():
    tokens = arange_tokens(500)
    batch = next(data.make_train_iterator(tokens, seq_len=16, global_batch_size=8))["tokens"]

    assert batch.shape == (8, 17) and batch.dtype == np.int32
    np.testing.assert_array_equal(
        batch, batch[:, :1] + np.arange(17)
    )  # each row is tokens[s : s + 17]
    assert batch[:, 0].min() >= 0 and batch[:, -1].max() <= 499


def test_train_iterator_on_memmapped_split(stdlib_corpus):
    train = data.load_split(stdlib_corpus, "train")
    batch = next(data.make_train_iterator(train, seq_len=64, global_batch_size=4, seed=3))["tokens"]
    assert batch.shape == (4, 65) and batch.dtype == np.int32
    starts = window_starts(3, np.arange(4), len(train) - 64)
    np.testing.assert_array_equal(batch, np.stack([train[start : start + 65] for start in starts]))


def test_window_starts_cover_the_whole_valid_range_uniformly():
    starts = window_starts(0, np.arange(20_000), 10)
    assert starts.min() == 0 and starts.max() == 9
    assert np.all(np.abs(np.bincount(starts, minlength=10) - 2_000) < 200)
    np.testing.assert_array_equal(
        window_starts(0, np.arange(5, 10), 10**9),
        window_starts(0, np.arange(20), 10**9)[5:10],
    )


def test_set_state_after_k_steps_reproduces_the_stream():
    tokens = arange_tokens(10_000)
    uninterrupted = take(
        data.make_train_iterator(tokens, seq_len=32, global_batch_size=4, seed=7), 8
    )

    first = data.make_train_iterator(tokens, seq_len=32, global_batch_size=4, seed=7)
    take(first, 5)
    saved_state = json.loads(json.dumps(first.get_state()))  # must survive a JSON checkpoint
    resumed = data.make_train_iterator(tokens, seq_len=32, global_batch_size=4, seed=7)
    resumed.set_state(saved_state)

    for expected, actual in zip(uninterrupted[5:], take(resumed, 3)):
        np.testing.assert_array_equal(expected, actual)


def test_two_processes_see_exactly_the_one_process_global_batch():
    tokens = arange_tokens(10_000)
    single = take(data.make_train_iterator(tokens, seq_len=8, global_batch_size=6, seed=1), 3)
    per_process = [
        take(
            data.make_train_iterator(
                tokens, seq_len=8, global_batch_size=6, seed=1, process_index=p, process_count=2
            ),
            3,
        )
        for p in range(2)
    ]
    for step in range(3):
        assert per_process[0][step].shape == (3, 9)
        np.testing.assert_array_equal(
            np.concatenate([per_process[0][step], per_process[1][step]]), single[step]
        )


def test_different_seeds_and_steps_give_different_batches():
    tokens = arange_tokens(100_000)
    seed0 = take(data.make_train_iterator(tokens, seq_len=8, global_batch_size=4, seed=0), 2)
    seed1 = take(data.make_train_iterator(tokens, seq_len=8, global_batch_size=4, seed=1), 2)
    assert not np.array_equal(seed0[0], seed1[0])
    assert not np.array_equal(seed0[0], seed0[1])


def test_batch_not_divisible_by_process_count():
    with pytest.raises(
        data.DataError, match="Global batch size 6 is not divisible by process_count 4"
    ):
        data.make_train_iterator(
            arange_tokens(100), seq_len=8, global_batch_size=6, process_count=4
        )


# ----------------------------------------------------------------------------- eval batches


def test_eval_batches_are_evenly_spaced_and_sliced_per_process():
    tokens = arange_tokens(1_000)
    batches = data.make_eval_batches(tokens, seq_len=9, batch_size=4, num_batches=3)

    assert len(batches) == 3 and all(batch["tokens"].shape == (4, 10) for batch in batches)
    assert batches[0]["tokens"].dtype == np.int32
    starts = np.concatenate([batch["tokens"][:, 0] for batch in batches])
    assert starts[0] == 0 and starts[-1] == 1_000 - 10  # first and last possible windows
    assert len(set(np.diff(starts).tolist()) - {89, 90}) == 0  # evenly spaced (integer rounding)

    halves = [
        data.make_eval_batches(
            tokens, seq_len=9, batch_size=4, num_batches=3, process_index=p, process_count=2
        )
        for p in range(2)
    ]
    for index, batch in enumerate(batches):
        np.testing.assert_array_equal(
            np.concatenate([halves[0][index]["tokens"], halves[1][index]["tokens"]]),
            batch["tokens"],
        )
    np.testing.assert_array_equal(
        data.make_eval_batches(tokens, seq_len=9, batch_size=4, num_batches=3)[2]["tokens"],
        batches[2]["tokens"],
    )


# ----------------------------------------------------------------------------- errors


def test_missing_corpus_directory(tmp_path):
    with pytest.raises(
        data.DataError,
        match=r"Corpus directory .*nowhere does not exist; build it with .*prepare_data\.py",
    ):
        data.load_split(tmp_path / "nowhere", "train")


def test_missing_token_file(tmp_path):
    corpus_write.write_token_files({"train": [b"abc"], "val": [b"d"]}, tmp_path)
    (tmp_path / "val.bin").unlink()
    with pytest.raises(data.DataError, match=r"Token file .*val\.bin is missing"):
        data.load_split(tmp_path, "val")


def test_empty_token_file(tmp_path):
    corpus_write.write_token_files({"train": [b"abc"], "val": []}, tmp_path)
    with pytest.raises(data.DataError, match=r"val\.bin is empty \(0 tokens\)"):
        data.load_split(tmp_path, "val")


def test_truncated_token_file(tmp_path):
    corpus_write.write_token_files({"train": [b"abcdef"]}, tmp_path)
    with open(tmp_path / "train.bin", "r+b") as token_file:
        token_file.truncate(4)
    with pytest.raises(data.DataError, match="has 4 bytes but meta.json expects 14"):
        data.load_split(tmp_path, "train")


def test_split_too_short_for_one_window():
    with pytest.raises(
        data.DataError, match=r"Split has 10 tokens but one window needs seq_len \+ 1 = 11"
    ):
        data.make_train_iterator(arange_tokens(10), seq_len=10, global_batch_size=2)
    with pytest.raises(data.DataError, match="Split has 10 tokens"):
        data.make_eval_batches(arange_tokens(10), seq_len=64, batch_size=2, num_batches=1)
    assert next(data.make_train_iterator(arange_tokens(11), seq_len=10, global_batch_size=2))[
        "tokens"
    ].shape == (2, 11)


def test_check_vocab(tmp_path):
    # max id: ord("z") = 122
    corpus_write.write_token_files({"train": [b"az"], "val": [b"b"]}, tmp_path)
    assert data.check_vocab(tmp_path, 256) == 122
    assert data.check_vocab(tmp_path, 123) == 122
    with pytest.raises(
        data.DataError,
        match=r"id 122 but model\.vocab_size is 100; raise model\.vocab_size .* or re-tokenize",
    ):
        data.check_vocab(tmp_path, 100)


# ----------------------------------------------------------------------------- default corpus cache


def test_default_corpus_is_built_once_and_then_reused(tmp_path, monkeypatch):
    monkeypatch.setenv(corpus_read.CACHE_ENV_VAR, str(tmp_path))
    corpus = data.default_corpus_dir()

    assert (
        corpus
        == tmp_path / "corpus" / f"stdlib-py{sys.version_info.major}{sys.version_info.minor}-byte"
    )
    assert data.read_meta(corpus)["num_files"]["train"] > 300
    assert os.listdir(corpus.parent) == [corpus.name]  # no build directories left behind

    def no_rebuild(*args, **kwargs):
        raise AssertionError("cached corpus was rebuilt")

    monkeypatch.setattr(corpus_read, "prepare_stdlib_corpus", no_rebuild)
    assert data.default_corpus_dir() == corpus
    assert data.default_corpus_dir(cache_root=tmp_path) == corpus


def test_default_corpus_rebuilds_a_stale_format_version(tmp_path):
    corpus = data.default_corpus_dir(tmp_path)
    meta = json.loads((corpus / "meta.json").read_text())
    (corpus / "meta.json").write_text(json.dumps({**meta, "format_version": 0}))
    with pytest.raises(data.DataError, match="format version 0"):
        data.read_meta(corpus)

    assert data.default_corpus_dir(tmp_path) == corpus
    assert data.read_meta(corpus)["format_version"] == corpus_write.FORMAT_VERSION


def test_concurrent_default_corpus_builds_agree(tmp_path, monkeypatch):
    few_files = corpus_write.discover_stdlib_sources()[:30]
    monkeypatch.setattr(corpus_write, "discover_stdlib_sources", lambda root=None: few_files)
    with ThreadPoolExecutor(max_workers=4) as pool:  # exceptions re-raise in list()
        results = list(pool.map(data.default_corpus_dir, [tmp_path] * 4))

    assert len(set(results)) == 1
    assert data.read_meta(results[0])["num_files"] == {"train": 29, "val": 1}
    assert os.listdir(results[0].parent) == [results[0].name]


# ----------------------------------------------------------------------------- CLI


def run_prepare_script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(PREPARE_SCRIPT), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_prepares_text_files(tmp_path):
    write_texts(tmp_path / "src", {"a.txt": b"alpha\n", "b.txt": b"beta", "c.txt": b"gamma\n"})
    result = run_prepare_script(
        str(tmp_path / "out"), str(tmp_path / "src" / "*.txt"), "--holdout-every", "2", cwd=tmp_path
    )

    assert result.returncode == 0, result.stderr
    assert "files:     3" in result.stdout
    assert "train:     1 files, 5 tokens" in result.stdout
    assert "val:       2 files, 12 tokens" in result.stdout
    assert str((tmp_path / "out").resolve()) in result.stdout
    assert data.ByteTokenizer().decode(data.load_split(tmp_path / "out", "train")) == b"beta\n"


def test_cli_bad_glob_exits_2_with_one_line(tmp_path):
    result = run_prepare_script(
        str(tmp_path / "out"), str(tmp_path / "nothing" / "*.txt"), cwd=REPO_ROOT
    )

    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    assert (
        "No files match" in result.stderr
        and "nothing" in result.stderr
        and "Traceback" not in result.stderr
    )
    assert not (tmp_path / "out").exists()


def test_default_corpus_keeps_a_corpus_that_another_process_finished_first(tmp_path, monkeypatch):
    target = tmp_path / "corpus" / f"stdlib-py{sys.version_info.major}{sys.version_info.minor}-byte"
    real_prepare = data.prepare_stdlib_corpus

    def prepare_while_another_process_wins(out_dir, *args, **kwargs):
        corpus_write.write_token_files(
            {"train": [b"winner\n"], "val": [b"v\n"]}, target, source_description="winner"
        )
        return real_prepare(out_dir, *args, **kwargs)

    monkeypatch.setattr(corpus_read, "prepare_stdlib_corpus", prepare_while_another_process_wins)
    assert data.default_corpus_dir(tmp_path) == target
    assert data.read_meta(target)["source"] == "winner"
    assert os.listdir(target.parent) == [target.name]


def test_cli_runs_from_a_checkout_without_an_installed_package(tmp_path):
    write_texts(tmp_path / "src", {"a.txt": b"alpha\n", "b.txt": b"beta\n"})
    # -S skips site (and so any editable install); PYTHONPATH keeps numpy but not the repo root.
    other_paths = [entry for entry in sys.path if entry and Path(entry).resolve() != REPO_ROOT]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(other_paths)}
    command = [sys.executable, "-S", str(PREPARE_SCRIPT), str(tmp_path / "out"), "src/*.txt"]
    result = subprocess.run(
        command, cwd=tmp_path, env=environment, capture_output=True, text=True, check=False
    )

    assert result.returncode == 0, result.stderr
    assert data.read_meta(tmp_path / "out")["num_files"] == {"train": 1, "val": 1}
