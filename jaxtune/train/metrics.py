"""Where metrics go: a tqdm progress bar, `metrics.jsonl` (one JSON object per line) and TensorBoard.

Only process 0 writes. TensorBoard uses `tensorboardX` (no TensorFlow); where it is not installed the run goes
on with a warning, since JSONL holds the same numbers.

Each step is recorded once: a run that starts from step S (resumed from checkpoint S, or S = 0 when fresh) first
drops every record of a step > S — the steps a killed run logged after its last checkpoint, which it is about to
log again — from `metrics.jsonl` and from the TensorBoard event files (each rewritten to a temporary file,
fsynced and renamed over the old one), and opens its TensorBoard writer with `purge_step=S+1`.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import time
from pathlib import Path

log = logging.getLogger("jaxtune.train")


class MetricsWriter:
    def __init__(self, run_dir: Path, logging_cfg, total_steps: int, start_step: int, enabled: bool = True):
        self.enabled = enabled
        if enabled:
            drop_after(run_dir, start_step)
        self.jsonl = open(run_dir / "metrics.jsonl", "a") if enabled and logging_cfg.jsonl else None  # noqa: SIM115
        self.tb = None
        if enabled and logging_cfg.tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
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


# ------------------------------------------------------------------------------- records of steps > S dropped


def drop_after(run_dir: Path, step: int) -> None:
    """Remove every record of a step > `step` from the run's metrics.jsonl and TensorBoard event files."""
    path = Path(run_dir) / "metrics.jsonl"
    if path.exists():
        lines = path.read_bytes().split(b"\n")
        kept = [line for line in lines[:-1] if _jsonl_step(line) is not None and _jsonl_step(line) <= step]
        if len(kept) != len(lines) - 1 or lines[-1]:  # some record dropped, or a line cut short by a kill
            _replace(path, b"".join(line + b"\n" for line in kept))
    tb = Path(run_dir) / "tensorboard"
    if tb.is_dir():
        for events in sorted(tb.glob("events.out.tfevents.*")):
            _filter_events(events, step)


def _jsonl_step(line: bytes) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _replace(path: Path, data: bytes) -> None:
    """Atomically: a temporary file beside `path`, fsynced, renamed over it (then the directory fsynced)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_records(path: Path) -> list[bytes]:
    """The records of a TFRecord file (u64 length, u32 masked crc of it, data, u32 masked crc of the data); a
    last record cut short or failing its checksum (a kill mid-write) ends the list."""
    from tensorboardX.record_writer import masked_crc32c

    buf, out, pos = path.read_bytes(), [], 0
    while pos + 12 <= len(buf):
        header = buf[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        end = pos + 12 + length + 4
        if end > len(buf) or struct.unpack("<I", buf[pos + 8 : pos + 12])[0] != masked_crc32c(header):
            break
        data = buf[pos + 12 : pos + 12 + length]
        if struct.unpack("<I", buf[end - 4 : end])[0] != masked_crc32c(data):
            break
        out.append(data)
        pos = end
    return out


def _filter_events(path: Path, step: int) -> None:
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.record_writer import masked_crc32c

    records = read_records(path)
    kept = [r for r in records if Event.FromString(r).step <= step]
    framed = b"".join(
        struct.pack("<Q", len(r)) + struct.pack("<I", masked_crc32c(struct.pack("<Q", len(r)))) + r
        + struct.pack("<I", masked_crc32c(r))
        for r in kept
    )  # fmt: skip
    if framed != path.read_bytes():
        _replace(path, framed)
