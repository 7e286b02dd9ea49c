"""Every file of LLaMA-Factory's demo data folder loads, templates and batches (via its registry entry too).

Entries of `dataset_info.json` whose files are not in the folder (hub datasets, multimodal demos) are skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jaxtune import data
from jaxtune.data.files import SUFFIXES, suffix_of
from jaxtune.data.pipeline import iterators

SHARED = Path(__file__).parents[2] / ".." / "shared" / "data" / "llamafactory"
INFO = (
    json.loads((SHARED / "dataset_info.json").read_text()) if (SHARED / "dataset_info.json").exists() else {}
)
LOCAL_ENTRIES = sorted(name for name, e in INFO.items() if e.get("file_name"))
FILES = (
    sorted(p.name for p in SHARED.glob("*") if suffix_of(p) in SUFFIXES and p.name != "dataset_info.json")
    if INFO
    else []
)


def kind_of(record) -> str:
    """The data kind a record of this type trains."""
    if isinstance(record, data.Preference):
        return "pair"
    if isinstance(record, data.Text):
        return "text"
    return "kto" if record.label is not None else "lm"


def check_batch(batch, kind: str):
    tb = batch.chosen if kind == "pair" else batch.batch if kind == "kto" else batch
    assert tb.input_ids.dtype == np.int32 and tb.input_ids.shape[0] == 4
    assert tb.loss_mask.sum() > 0  # something is trained in every batch
    assert ((tb.segment_ids > 0) | (tb.input_ids == 0)).all()  # padding is id 0


@pytest.mark.parametrize("name", LOCAL_ENTRIES)
def test_registry_entry_loads_templates_and_batches(name, shared_dir, chatml_tok, llama3_tok):
    file_name = INFO[name]["file_name"]
    if not (shared_dir / file_name).exists():
        pytest.skip(f"{file_name} is not in the demo folder")
    records = data.load(name, dataset_dir=shared_dir)
    assert records and all(r.file == str(shared_dir / file_name) for r in records[:5])
    kind = kind_of(records[0])
    for tok in (chatml_tok, llama3_tok):
        for rec in records[:10]:
            out = data.encode(rec, tok)
            pairs = out if kind == "pair" else [out]
            for ids, labels in pairs:
                assert len(ids) == len(labels) and any(lab != -100 for lab in labels)
    it = iterators(
        {"name": name},
        chatml_tok,
        4,
        kind,
        dataset_dir=shared_dir,
        cutoff_len=512,
        epochs=1,
    )
    batches = list(it.train)
    assert batches
    for b in batches[:3]:
        check_batch(b, kind)


@pytest.mark.parametrize("file_name", FILES)
def test_every_file_loads_by_path_with_detected_format(file_name, shared_dir):
    records = data.load(shared_dir / file_name)
    expected = {"dpo": data.Preference, "c4": data.Text, "wiki": data.Text}.get(
        file_name.split("_")[0], data.Conversation
    )
    assert records and all(isinstance(r, expected) for r in records)
    if file_name.startswith("dpo"):
        assert all(r.chosen[0].role == "assistant" and r.prompt[-1].role == "user" for r in records)


def test_entries_with_absent_files_are_reported(shared_dir):
    for name in LOCAL_ENTRIES:
        if not (shared_dir / INFO[name]["file_name"]).exists():
            with pytest.raises(data.DataError, match="no such file"):
                data.load(name, dataset_dir=shared_dir)
            return
    pytest.skip("every registry file is present")
