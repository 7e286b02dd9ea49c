"""`JaxtuneError`: the base of every error written for the user.

The CLI prints a `JaxtuneError` as one paragraph (`jaxtune: error: ...`) and exits with status 2; anything else
is a bug and keeps its traceback (`JAXTUNE_TRACEBACK=1` shows the traceback of every error). Each subclass
says what went wrong, where (file, row, field, tensor, config key) and what to do. They also subclass
`ValueError` (or `FileNotFoundError` / `FileExistsError` / `FloatingPointError` where that is what they are),
so code that catches the builtin kinds keeps working.

Kinds: `ConfigError` (typed_yaml: a config key or value), `DataError` (data/errors: file, row, field),
`CheckpointError` (a model directory or safetensors file), `UnsupportedModelError` (models/families),
`PeftConfigError` (peft/names), `GenerateError` (generate_cli), and the run-level ones below.
"""

from __future__ import annotations


class JaxtuneError(Exception):
    """An error meant for the user: what was wrong, where, and what to do."""


class RunError(JaxtuneError, ValueError):
    """A run that cannot start as configured: a mesh larger than the machine, a batch that does not split over
    it, an attention kernel this backend lacks, a stage option that contradicts another."""


class MissingError(JaxtuneError, FileNotFoundError):
    """Something the user named is not there: a run directory, a checkpoint, a model directory, a file."""


class ExistsError(JaxtuneError, FileExistsError):
    """Something would be overwritten that jaxtune never overwrites silently (e.g. a run's checkpoints)."""


class NonFiniteLoss(JaxtuneError, FloatingPointError):
    """The loss or gradient became NaN / inf and `training.nan_policy=stop` (names the last good checkpoint)."""


class CheckpointRestoreError(JaxtuneError, ValueError):
    """A run checkpoint that cannot be restored (damaged, or written by a different config); names the step."""
