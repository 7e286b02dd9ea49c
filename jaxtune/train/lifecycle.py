"""What the SFT-family loop and the RL loop share around their steps: signals, the save cadence, the end.

    with Signals() as signals:                    # SIGTERM (preemption) / SIGINT: finish the step, save, stop
        for step in ...:
            ...
            if due(run, step, stop_reason, evaluated): run.checkpointer.save(...)
    finish(run, summary, lines)                   # export, curves.png, the summary printed

A run killed at any point loses at most the steps since its last checkpoint: rerunning the same command resumes.
A signal-stopped run returns its summary with `stop_reason="signal SIGTERM"` (or SIGINT); `jaxtune train` turns
that into exit status 128 + the signal's number (cli.stop_status), so wrappers see a run that did not finish.
"""

from __future__ import annotations

import logging
import signal

log = logging.getLogger("jaxtune.train")


class Signals:
    """SIGTERM (preemption) / SIGINT (Ctrl-C) set a flag; the loop checkpoints after the current step."""

    def __init__(self):
        self.received = None
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C aborts without waiting
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def due(run, step: int, stop_reason: str, evaluated=None) -> bool:
    """Save now? Every `save_every` steps, after an eval (keep-best needs its metric), on a stop, at the end."""
    every = run.cfg.training.save_every
    return bool((every and step % every == 0) or evaluated or stop_reason != "completed" or step == run.steps)


def interrupted(signals: Signals, where: str) -> None:
    print(f"jaxtune: interrupted by {signals.received}; checkpoint saved at {where}. Rerun the same command to resume.")


def finish(run, summary: dict, lines: list[str]) -> dict:
    """Process 0: the export a finished run writes (`training.export_hf`), its loss curves, the summary."""
    if run.main and run.cfg.training.export_hf:
        from jaxtune.export import export_trained, natural_dir

        summary["export"] = str(export_trained(run, run.policy_trainable, run.run_dir / natural_dir(run)))
    if run.main and run.cfg.logging.plot:
        from jaxtune.train import plot

        summary["plot"] = str(plot.main(run.run_dir))
    if "export" in summary:
        lines.append(f"exported: {summary['export']}")
    if "plot" in summary:
        lines.append(f"loss curves: {summary['plot']}")
    print("\n".join(lines))
    return summary
