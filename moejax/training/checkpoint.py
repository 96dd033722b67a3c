"""Checkpoints with orbax: asynchronous saves of the train state and the data iterator position,
keeping the last N; restores reshard onto whatever mesh the resumed run uses."""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp


class Checkpoints:
    def __init__(self, directory: str | Path, keep: int):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max(keep, 1), enable_async_checkpointing=True, create=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict) -> None:
        """Start an asynchronous save (device arrays are copied to host before it returns)."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(data_state))
        self.manager.save(step, args=args, force=True)

    def restore(self, step: int, like_state):
        """(state, data iterator state) at `step`, placed like `like_state`'s arrays."""
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like_state
        )
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                  data=ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        return restored.state, restored.data

    def close(self) -> None:
        """Wait for pending saves to finish, then release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()
