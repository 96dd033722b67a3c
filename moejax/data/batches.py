"""Batches from a split's token ids: the infinite, checkpointable grain train iterator (random
windows, a pure function of (seed, example index)) and deterministic eval batches."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from moejax.data.errors import DataError

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
