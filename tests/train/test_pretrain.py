"""Continued pre-training (`stage: pt`) on plain text through the same loop: packed rows, every token trained,
the loss falls, and metrics land in both metrics.jsonl and TensorBoard event files."""

import json
import struct
from pathlib import Path

from jaxtune.config import load_config
from jaxtune.train.loop import run

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "llamafactory"


def tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Read tensorboardX event files: TFRecord framing (u64 length, u32 crc, payload, u32 crc) of Event protos."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        data = path.read_bytes()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_pretraining_on_text_lowers_the_loss_and_logs_to_tensorboard(tmp_path):
    lines = [ln for ln in (SHARED / "wiki_demo.txt").read_text().splitlines() if ln.strip()][:200]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join("".join(c for c in ln if c.isascii()) for ln in lines))
    cfg = load_config({
        "stage": "pt", "output_dir": str(tmp_path / "run"),
        "model": {"tokenizer": "builtin:chars", "random_init": {
            "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}},
        "data": {"train": [str(corpus)], "cutoff_len": 128, "packing": True},
        "method": {"name": "full"},
        "training": {"learning_rate": 3e-3, "batch_size": 8, "max_steps": 60, "save_every": 0, "warmup_steps": 5},
        "logging": {"log_every": 1, "progress": False, "tensorboard": True, "plot": False},
    })  # fmt: skip
    summary = run(cfg)
    assert summary["stop_reason"] == "completed"
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert len(train) == 60
    # pt trains every next-token target of full packed rows: ~cutoff tokens per row, nearly no padding
    assert all(r["tokens"] > 0.95 * 8 * 127 for r in train)
    assert train[-1]["data_efficiency"] > 0.95
    first, last = train[0]["loss"], sum(r["loss"] for r in train[-10:]) / 10
    assert last < first - 1.5, (first, last)  # from ~ln(vocab) to character statistics of English
    scalars = tensorboard_scalars(tmp_path / "run")
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, 61))
    assert abs(scalars["train/loss"][-1][1] - train[-1]["loss"]) < 1e-4
