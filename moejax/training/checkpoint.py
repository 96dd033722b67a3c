"""Checkpoints with orbax: asynchronous saves of the train state and the data iterator position,
keeping the last N; restores reshard onto whatever mesh the resumed run uses.

A save that fails for the storage (full disk, quota, I/O error, read-only or forbidden
directory) raises CheckpointSaveError with one line: at the next save, at `close`, or, in a
single-process run, at the first `raise_if_save_failed` after the background write failed.
Orbax writes each step into `<step>.orbax-checkpoint-tmp` and renames it on commit, so a failed
save never lists as a step; its partial directory is removed (it only holds space) and the
older checkpoints are kept (orbax deletes old steps only after a save has committed). Orbax,
asyncio and tensorstore each report the same failed write again (logs, tracebacks); those
reports are filtered out (see _QuietStorageFaults, _quiet_unraisable)."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """No checkpoint of a run can be read; the message says what to do instead."""


# Storage faults a save reports in one line, each with what to do before resuming.
STORAGE_FAULTS = {
    errno.ENOSPC: "free space on that filesystem (or raise the quota)",
    errno.EDQUOT: "raise the quota or free space under it",
    errno.EIO: "check the storage device or network filesystem (an I/O error; see dmesg)",
    errno.EROFS: "make that filesystem writable again",
    errno.EACCES: "make the checkpoint directory writable for this user",
    errno.EFBIG: "raise the file size limit (ulimit -f)",
}
# a failed save's partial directory must stay absent this long at close (at most the max)
PARTIAL_SETTLE_S, PARTIAL_SETTLE_MAX_S = 0.2, 5.0
# tensorstore reports the errno of a failed write as [os_error_code='28']
_OS_ERROR_CODE = re.compile(r"os_error_code\W{0,3}(\d+)")


class CheckpointSaveError(RuntimeError):
    """A checkpoint save failed for the storage; the message says which step, why, what was
    kept and how to resume."""

    def __init__(self, message: str, step: int, code: int):
        super().__init__(message)
        self.step, self.errno = step, code


def storage_errno(err: BaseException) -> int | None:
    """The STORAGE_FAULTS errno behind `err` (an OSError, or orbax/tensorstore's ValueError
    whose text carries the os error code), looking through its causes; None for anything
    else (a bug, which keeps its traceback)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in STORAGE_FAULTS:
            return err.errno
        text = str(err)
        for match in _OS_ERROR_CODE.finditer(text):
            if int(match.group(1)) in STORAGE_FAULTS:
                return int(match.group(1))
        for code in STORAGE_FAULTS:
            if os.strerror(code) in text:
                return code
        err = err.__cause__ or err.__context__
    return None


def save_failure_message(step: int, directory: Path, code: int,
                         newest_complete: int | None) -> str:
    """The one line for a save of `step` that failed with `code` (a STORAGE_FAULTS errno)."""
    kept = (f"keeping checkpoint {newest_complete} (the newest complete one)"
            if newest_complete is not None else "before any checkpoint was complete")
    return (f"checkpoint save of step {step} in {directory} failed: {os.strerror(code)} "
            f"({errno.errorcode[code]}); the run stopped, {kept}; "
            f"{STORAGE_FAULTS[code]}, then resume with --run-dir {directory.parent} --resume.")


class _QuietStorageFaults(logging.Filter):
    """A failed background write is logged many times over with tracebacks before the error
    reaches the main thread, which reports a storage fault in one line: orbax logs it (absl
    logger) from each of its threads, and asyncio (its logger) logs the gathers and tasks of the
    same save that orbax abandons. Those records are dropped; other records pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        message = record.getMessage()
        if record.name == "asyncio":
            if "was destroyed but it is pending" in message and "orbax" in message:
                return False  # orbax's abandoned write coroutines
        elif "orbax" not in record.pathname:
            return True
        err = record.exc_info[1] if record.exc_info else None
        if err is not None and storage_errno(err) is not None:
            return False
        return storage_errno(RuntimeError(message)) is None


def _quiet_unraisable(previous):
    """sys.unraisablehook without the leftovers of a failed save: when one write fails, orbax
    closes that save's event loop while tensorstore still runs its other writes, and each one's
    completion callback finds the loop closed ("Event loop is closed", from tensorstore's C++
    side); their abandoned coroutines may then be destroyed as late as interpreter shutdown.
    Self-contained (no module globals), since it may run while modules are torn down."""

    def hook(unraisable, previous=previous):
        try:
            tb, code = unraisable.exc_traceback, getattr(unraisable.object, "cr_code", None)
            closed_loop = (isinstance(unraisable.exc_value, RuntimeError)
                           and str(unraisable.exc_value) == "Event loop is closed"
                           and tb is not None
                           and tb.tb_frame.f_code.co_name == "call_soon_threadsafe")
            drop = closed_loop or (code is not None and "orbax" in code.co_filename)
        except Exception:  # noqa: BLE001 (never fail inside the hook)
            drop = False
        if not drop:
            previous(unraisable)

    hook.quiets_failed_saves = True
    return hook


def _quiet_orbax_storage_faults() -> None:
    for name in ("absl", "asyncio"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _QuietStorageFaults) for f in logger.filters):
            logger.addFilter(_QuietStorageFaults())
    if not getattr(sys.unraisablehook, "quiets_failed_saves", False):
        sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)


def set_aside(directory: Path, step: int) -> Path:
    """Rename an unreadable checkpoint to `unreadable-<step>` (kept for inspection, invisible to
    orbax, whose steps are numeric names) so the resumed run can save that step again."""
    target = directory / f"unreadable-{step}"
    suffix = 1
    while target.exists():
        target, suffix = directory / f"unreadable-{step}-{suffix}", suffix + 1
    (directory / str(step)).rename(target)
    return target


class Checkpoints:
    def __init__(self, directory: str | Path, keep: int | None = None):
        """`keep`: how many checkpoints saving keeps; None (for readers) deletes nothing."""
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if keep is None else max(keep, 1), enable_async_checkpointing=True,
            create=True,
        )
        # Replica-parallel saving compiles one small slicing program per array (seconds per
        # save on small models); every array here is written by its primary replica instead.
        arrays = ocp.type_handlers.ArrayHandler(use_replica_parallel=False)
        registry = ocp.type_handlers.create_type_handler_registry((jax.Array, arrays))
        handlers = {"state": ocp.PyTreeCheckpointHandler(type_handler_registry=registry),
                    "data": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_handlers=handlers)
        self.pending_step = None  # the step of the save that may still be running
        self.failed_steps: set[int] = set()  # saves that failed: their partials go at close
        _quiet_orbax_storage_faults()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore_newest_intact(self, like_state, report=print):
        """(step, state, data state, unreadable steps) of the newest checkpoint that restores,
        or None when there is none at all. Each unreadable newer one is reported in one line
        and left where it is; raises CheckpointError when every checkpoint is unreadable."""
        unreadable = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state, data_state = self.restore(step, like_state)
            except Exception as err:  # noqa: BLE001 (orbax/tensorstore raise many types)
                reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
                report(f"checkpoint {step} in {self.directory} cannot be read ({reason}); "
                       "trying the next older one")
                unreadable.append(step)
                continue
            return step, state, data_state, unreadable
        if unreadable:
            raise CheckpointError(
                f"no readable checkpoint in {self.directory}: steps {sorted(unreadable)} are all "
                "damaged; restore a copy, or start a new run with a new --run-dir.")
        return None

    def save(self, step: int, state, data_state: dict) -> None:
        """Start an asynchronous save (device arrays are copied to host before it returns),
        once the previous one has finished; raises CheckpointSaveError when either failed."""
        self._wait()
        args = ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                  data=ocp.args.JsonSave(data_state))
        self.pending_step = step
        with self._reporting_failure():
            self.manager.save(step, args=args, force=True)

    def raise_if_save_failed(self) -> None:
        """Raise CheckpointSaveError if the last save has failed in the background; returns at
        once while it is still running. Single-process runs only (a no-op otherwise: processes
        would notice at different steps, and one leaving early would hang the others'
        collectives; they notice at the next save or at `close`, together)."""
        if (self.pending_step is not None and jax.process_count() == 1
                and not self.manager.is_saving_in_progress()):
            self._wait()

    def _wait(self) -> None:
        """Wait for the pending save; raise CheckpointSaveError if it failed for the storage."""
        if self.pending_step is None:
            return
        with self._reporting_failure():
            self.manager.wait_until_finished()
        self.pending_step = None

    @contextlib.contextmanager
    def _reporting_failure(self):
        """A storage fault raised inside becomes CheckpointSaveError (anything else passes)."""
        try:
            yield
        except Exception as err:
            failure = self._failed(err)
            if failure is None:
                raise
            raise failure from err

    def restore(self, step: int, like_state):
        """(state, data iterator state) at `step`, placed like `like_state`'s arrays."""
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like_state
        )
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
        args = ocp.args.Composite(
            state=ocp.args.PyTreeRestore(abstract, restore_args=restore_args),
            data=ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        return restored.state, restored.data

    def restore_model(self, step: int, like: dict) -> dict:
        """Only {"params": ..., "router": ...} of the state at `step` (no optimizer state),
        placed as `like`'s ShapeDtypeStructs (with shardings) say."""
        restore_args = ocp.checkpoint_utils.construct_restore_args(like)
        restore = ocp.args.PyTreeRestore(like, restore_args=restore_args, partial_restore=True)
        return self.manager.restore(step, args=ocp.args.Composite(state=restore)).state

    def close(self) -> None:
        """Wait for pending saves to finish, then release the manager; raises
        CheckpointSaveError when the last save failed. Every failed save's partial directory is
        removed again once the manager's writer threads have stopped: a thread still writing
        into it when the failure surfaced (at close, or in a save's synchronous part) could
        leave files the first removal missed, and `<step>.orbax-checkpoint-tmp` behind."""
        try:
            self._wait()
        finally:
            try:
                self.manager.close()
            finally:
                for step in sorted(self.failed_steps):
                    self._remove_partial(step, settle=True)

    def _remove_partial(self, step: int, settle: bool = False) -> None:
        """Remove a failed save's `<step>.orbax-checkpoint-tmp*` directory (it only holds
        space); with several processes others may still be writing it, so they keep it.
        `settle`: remove again until none has reappeared for PARTIAL_SETTLE_S (at most
        PARTIAL_SETTLE_MAX_S): tensorstore's writer threads can still create files in it after
        orbax has reported the failure and closed (CI saw the directory left behind)."""
        if jax.process_count() > 1:
            return
        deadline = time.monotonic() + PARTIAL_SETTLE_MAX_S
        quiet_since = None
        while True:
            partials = list(self.directory.glob(f"{step}.orbax-checkpoint-tmp*"))
            for partial in partials:
                shutil.rmtree(partial, ignore_errors=True)
            if not settle:
                return
            now = time.monotonic()
            quiet_since = None if partials else (quiet_since or now)
            if (quiet_since is not None and now - quiet_since >= PARTIAL_SETTLE_S) \
                    or now >= deadline:
                return
            time.sleep(0.02)

    def _failed(self, err: BaseException) -> CheckpointSaveError | None:
        """The one-line error for a failed save of the pending step (its partial directory
        removed), or None when `err` is not a storage fault."""
        code = storage_errno(err)
        if code is None:
            return None
        step, self.pending_step = self.pending_step, None
        self.failed_steps.add(step)
        self._remove_partial(step)
        try:
            complete = [s for s in self.manager.all_steps() if s != step]
        except Exception:  # noqa: BLE001 (the same storage may fail again while listing)
            complete = []
        return CheckpointSaveError(
            save_failure_message(step, self.directory, code, max(complete, default=None)),
            step, code)
