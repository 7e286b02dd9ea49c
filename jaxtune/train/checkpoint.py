"""Orbax checkpoints of the train state, the data-iterator position and run metadata.

Saves are asynchronous (the device->host copy is synchronous, the write happens in the background) and atomic:
Orbax writes into a temporary directory and renames it on commit, so a kill -9 mid-save leaves the previous
checkpoint loadable. Frozen base weights are never saved — they come from the HF directory. Retention keeps
the last `keep_last` checkpoints plus, with `keep_best`, the best by the chosen eval metric.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from jaxtune.errors import CheckpointRestoreError, ExistsError, MissingError

log = logging.getLogger("jaxtune.train")


class Checkpointer:
    def __init__(self, directory: str | Path, training_cfg, is_async: bool = True):
        t = training_cfg
        policies = [pp.LatestN(n=t.keep_last)]
        if t.keep_best:
            metric = t.best_metric
            policies.append(
                pp.BestN(
                    get_metric_fn=lambda m: m[metric],
                    reverse=t.best_mode == "min",
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=pp.AnyPreservationPolicy(policies),
            enable_async_checkpointing=is_async,
            create=True,
            cleanup_tmp_directories=True,  # leftovers of a save that was killed midway
        )
        self.dir = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(self.dir, options=options, item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def resume(self, policy: str, state, data_it, meta: dict):
        """`training.resume`: "auto" restores the latest checkpoint when there is one, "must" requires one,
        "never" starts fresh, and refuses a directory that already holds checkpoints (never overwritten or deleted
        silently). Restores the data iterator's position too. -> (state, meta, restored step or None)."""
        latest = self.latest_step()
        if policy == "never" and latest is not None:
            raise ExistsError(
                f"training.resume=never but {self.dir} already holds checkpoints (latest: step {latest}): set a new "
                "output_dir, or remove that directory to start over"
            )
        if policy == "must" and latest is None:
            raise MissingError(f"training.resume=must but {self.dir} holds no checkpoint")
        if latest is None:
            return state, meta, None
        damaged = []
        for step in sorted(self.manager.all_steps(), reverse=True):  # the newest one that restores
            try:
                restored, data_state, meta = self.restore(step, state)
            except CheckpointRestoreError as e:
                log.warning("%s; trying the one before", e)
                damaged.append(step)
                continue
            data_it.set_state(data_state)
            if damaged:
                self._set_aside(damaged)
                log.warning("resuming from step %d: the later checkpoints could not be restored", step)
            return restored, meta, step
        raise CheckpointRestoreError(
            f"no checkpoint in {self.dir} can be restored (steps {sorted(self.manager.all_steps())}): they are damaged "
            "or were written by a run with another model / method; set a new output_dir to start over"
        )

    def _set_aside(self, steps) -> None:
        """Move unrestorable checkpoints to `checkpoints.damaged/` (kept for a post-mortem, never deleted), so
        the resumed run can save those steps again."""
        aside = self.dir.parent / (self.dir.name + ".damaged")
        aside.mkdir(exist_ok=True)
        for step in steps:
            target = aside / str(step)
            n = 1
            while target.exists():
                target, n = aside / f"{step}.{n}", n + 1
            (self.dir / str(step)).rename(target)
            log.warning("moved the damaged checkpoint %s/%d to %s", self.dir, step, target)
        self.manager.reload()

    def save(self, step: int, state, data_state: dict, meta: dict, metrics: dict | None = None) -> None:
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta),
        )
        self.manager.save(step, args=args, metrics=metrics, force=True)

    def restore(self, step: int, abstract_state):
        """-> (state, data_state, meta), the state placed like `abstract_state` (shapes, dtypes, shardings)."""
        if step not in self.manager.all_steps():
            raise MissingError(f"{self.dir} holds no checkpoint of step {step} (it has {sorted(self.manager.all_steps())})")
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()
        )
        try:
            out = self.manager.restore(step, args=args)
        except Exception as e:  # orbax / tensorstore: a damaged file, or a tree another config wrote
            detail = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise CheckpointRestoreError(
                f"{self.dir}/{step}: cannot restore this checkpoint ({type(e).__name__}: {detail}); it is damaged, "
                "or the run config (model, method, stage) differs from the one that wrote it"
            ) from e
        if out.data is None or out.meta is None:
            raise CheckpointRestoreError(f"{self.dir}/{step}: the checkpoint lacks its data or meta item")
        return out.state, out.data, out.meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
