"""Where metrics go: a tqdm progress bar, `metrics.jsonl` (one JSON object per line) and TensorBoard.

Only process 0 writes. TensorBoard uses `tensorboardX` (no TensorFlow); where it is not installed the run goes
on with a warning, since JSONL holds the same numbers.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

log = logging.getLogger("jaxtune.train")


class MetricsWriter:
    def __init__(self, run_dir: Path, logging_cfg, total_steps: int, start_step: int, enabled: bool = True):
        self.enabled = enabled
        self.jsonl = open(run_dir / "metrics.jsonl", "a") if enabled and logging_cfg.jsonl else None  # noqa: SIM115
        self.tb = None
        if enabled and logging_cfg.tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                log.warning("tensorboardX is not installed: TensorBoard logging is off (metrics.jsonl has it all)")
        self.bar = None
        if enabled and logging_cfg.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        self.last_time, self.tokens = time.perf_counter(), 0.0

    def write(self, step: int, metrics: dict, split: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": split, "time": round(time.time(), 3)}
        record.update({k: float(v) for k, v in metrics.items()})
        if self.jsonl:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        if self.tb:
            for k, v in metrics.items():
                self.tb.add_scalar(f"{split}/{k}", float(v), step)

    def progress(self, step: int, metrics: dict, tokens: float) -> None:
        """Advance the bar by one step; show loss, tokens/s and (tqdm's) ETA."""
        if not self.bar:
            return
        now = time.perf_counter()
        self.tokens += tokens
        self.bar.update(1)
        if now - self.last_time > 0.5:
            rate = self.tokens / (now - self.last_time)
            self.bar.set_postfix(loss=f"{float(metrics['loss']):.4f}", tok_s=f"{rate:,.0f}")
            self.last_time, self.tokens = now, 0.0

    def close(self) -> None:
        if self.bar:
            self.bar.close()
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()
