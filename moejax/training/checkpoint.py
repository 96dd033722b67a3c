"""Checkpoints with orbax: asynchronous saves of the train state and the data iterator position,
keeping the last N; restores reshard onto whatever mesh the resumed run uses."""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """No checkpoint of a run can be read; the message says what to do instead."""


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
        """Start an asynchronous save (device arrays are copied to host before it returns)."""
        args = ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                  data=ocp.args.JsonSave(data_state))
        self.manager.save(step, args=args, force=True)

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
        """Wait for pending saves to finish, then release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()
