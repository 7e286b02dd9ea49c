"""Orbax checkpoints of the train state, the data-iterator position and run metadata.

Saves are asynchronous (the device->host copy is synchronous, the write happens in the background) and atomic:
Orbax writes into a temporary directory and renames it on commit, so a kill -9 mid-save leaves the previous
checkpoint loadable. Frozen base weights are never saved — they come from the HF directory.

Retention is jaxtune's, not Orbax's: once a save has finished (checked at the next save and at close), its files
are verified (train/ckpt_check.py: the JSON items parse, every array's stored bytes are there); only then are
checkpoints beyond the last `keep_last` verified ones deleted, keeping with `keep_best` the best by the chosen
eval metric. A save that fails verification is reported in one warning and deletes nothing.

Resume tries the newest checkpoint first; one that is damaged (checked the same way before Orbax reads it, so
no traceback is printed) is reported in one line, moved to `checkpoints.damaged/`, and the one before is used.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from jaxtune.errors import CheckpointRestoreError, ExistsError, JaxtuneError, MissingError
from jaxtune.train.ckpt_check import describe, problem, quiet

log = logging.getLogger("jaxtune.train")

METRICS_KEY = "jaxtune_metrics"  # in the step's custom metadata: what keep_best ranks by


class Checkpointer:
    def __init__(self, directory: str | Path, training_cfg, is_async: bool = True):
        self.t = training_cfg
        options = ocp.CheckpointManagerOptions(
            preservation_policy=pp.PreserveAll(),  # deletion waits for verification: `_retain`
            enable_async_checkpointing=is_async,
            create=True,
            cleanup_tmp_directories=True,  # leftovers of a save that was killed midway
        )
        self.dir = Path(directory).absolute()
        with quiet():  # a step directory without its metadata file is reported by resume, not by absl here
            self.manager = ocp.CheckpointManager(self.dir, options=options, item_names=("state", "data", "meta"))
        self.pending: int | None = None  # saved by this run, not verified yet
        self.failed: set[int] = set()  # saved by this run, failed verification: not counted as kept

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
        damaged, steps = [], sorted(self.manager.all_steps(), reverse=True)  # the newest one that restores
        fresh_data = data_it.get_state()
        for i, step in enumerate(steps):
            try:
                restored, data_state, restored_meta = self.restore(step, state, expect=(fresh_data, meta))
                _set_data_state(data_it, data_state, self.dir, step)
            except CheckpointRestoreError as e:
                then = f"trying step {steps[i + 1]}" if i + 1 < len(steps) else "no earlier checkpoint"
                log.warning("%s; %s", e, then)
                damaged.append(step)
                continue
            if damaged:
                self._set_aside(damaged)
                log.warning("resuming from step %d: the later checkpoints could not be restored", step)
            return restored, restored_meta, step
        raise CheckpointRestoreError(
            f"no checkpoint in {self.dir} can be restored (steps {sorted(steps)}; each is reported above): they are "
            "damaged, or were written by a run with another model / method / stage. To start fresh, set a new "
            f"output_dir, or move {self.dir} away (e.g. to {self.dir.name}.old) and rerun"
        )

    def _set_aside(self, steps) -> None:
        """Move unrestorable checkpoints to `checkpoints.damaged/` (kept for a post-mortem, never deleted), so
        the resumed run can save those steps again."""
        if jax.process_index() == 0:
            aside = self.dir.parent / (self.dir.name + ".damaged")
            aside.mkdir(exist_ok=True)
            for step in steps:
                target = aside / str(step)
                n = 1
                while target.exists():
                    target, n = aside / f"{step}.{n}", n + 1
                (self.dir / str(step)).rename(target)
                log.warning("moved the damaged checkpoint %s/%d to %s", self.dir, step, target)
        _sync("jaxtune_set_aside")
        with quiet():
            self.manager.reload()

    def save(self, step: int, state, data_state: dict, meta: dict, metrics: dict | None = None) -> None:
        self._settle()  # the previous save: finished (Orbax would wait for it here too), verified, old ones pruned
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta),
        )
        custom = {METRICS_KEY: {k: float(v) for k, v in metrics.items()}} if metrics else {}
        self.manager.save(step, args=args, force=True, custom_metadata=custom)
        self.pending = step

    def restore(self, step: int, abstract_state, expect: tuple[dict, dict] | None = None):
        """-> (state, data_state, meta), the state placed like `abstract_state` (shapes, dtypes, shardings).
        `expect`: a (data state, meta) whose keys the restored items must hold. Raises CheckpointRestoreError in
        one line naming the step and what is wrong."""
        if step not in self.manager.all_steps():
            raise MissingError(f"{self.dir} holds no checkpoint of step {step} (it has {sorted(self.manager.all_steps())})")
        where = f"{self.dir}/{step}"
        wrong = problem(self.dir / str(step))
        if wrong:
            raise CheckpointRestoreError(f"{where}: {wrong}")
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()
        )
        try:
            with quiet():
                out = self.manager.restore(step, args=args)
        except Exception as e:  # orbax / tensorstore: a damaged file the check missed, or another config's tree
            raise CheckpointRestoreError(
                f"{where}: cannot restore it ({type(e).__name__}: {describe(e)}); it is damaged, or the run config "
                "(model, method, stage) differs from the one that wrote it"
            ) from None
        if out.data is None or out.meta is None:
            raise CheckpointRestoreError(f"{where}: the checkpoint lacks its data or meta item")
        for name, got, want in zip(("data", "meta"), (out.data, out.meta), expect or ()):
            missing = sorted(set(want) - set(got))
            if missing:
                raise CheckpointRestoreError(f"{where}: the {name} item lacks the keys {missing}")
        return out.state, out.data, out.meta

    # ------------------------------------------------------------------------------------------- retention

    def _settle(self) -> None:
        """Wait for the save in flight; verify it; then prune what `keep_last` / `keep_best` no longer keep."""
        with quiet():
            self.manager.wait_until_finished()
        if self.pending is None:
            return
        step, self.pending = self.pending, None
        wrong = problem(self.dir / str(step)) if jax.process_index() == 0 else None
        if _agree(wrong is None):
            self._retain()
            return
        self.failed.add(step)
        if jax.process_index() == 0:
            log.warning("checkpoint %s/%d failed verification after saving (%s): no older checkpoint was deleted",
                        self.dir, step, wrong or "on process 0")  # fmt: skip

    def _retain(self) -> None:
        steps = sorted(self.manager.all_steps())
        good = [s for s in steps if s not in self.failed]
        latest = good[-self.t.keep_last :]
        if not latest:
            return
        keep = set(latest)
        if self.t.keep_best:
            best = self._best(good)
            if best is not None:
                keep.add(best)
        for step in steps:
            if step not in keep and step < min(latest):
                self.manager.delete(step)
                self.failed.discard(step)

    def _best(self, steps) -> int | None:
        metric, scored = self.t.best_metric, []
        for step in steps:
            try:
                info = json.loads((self.dir / str(step) / "_CHECKPOINT_METADATA").read_text())
                value = float(((info.get("custom_metadata") or {}).get(METRICS_KEY) or {})[metric])
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue  # no eval at this save (or its metadata is gone): not a best candidate
            scored.append((value if self.t.best_mode == "min" else -value, step))
        return min(scored)[1] if scored else None

    def wait(self) -> None:
        self._settle()

    def close(self) -> None:
        self._settle()
        self.manager.close()


def _set_data_state(data_it, data_state: dict, directory: Path, step: int) -> None:
    try:
        data_it.set_state(data_state)
    except JaxtuneError:
        raise  # e.g. another seed: the config changed, the checkpoint is fine
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointRestoreError(
            f"{directory}/{step}: the data item is not a data-iterator position ({type(e).__name__}: {describe(e)})"
        ) from None


def _agree(ok: bool) -> bool:
    """Process 0's verdict, on every process (they delete together)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(jax.numpy.int32(ok)))


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
