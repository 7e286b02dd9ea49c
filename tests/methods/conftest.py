"""Fixtures for the alignment tests: the synthetic preference task (`alignment_helpers`) written to files."""

from __future__ import annotations

import json
import random

import pytest
from alignment_helpers import preference_pairs


@pytest.fixture(scope="session")
def preference_files(tmp_path_factory):
    """(train.json, heldout.json): 1000 and 200 synthetic pairs in the `preference` format."""
    d = tmp_path_factory.mktemp("prefs")
    (d / "train.json").write_text(json.dumps(preference_pairs(1000, seed=0)))
    (d / "heldout.json").write_text(json.dumps(preference_pairs(200, seed=1)))
    return d / "train.json", d / "heldout.json"


@pytest.fixture(scope="session")
def kto_file(tmp_path_factory):
    """Unpaired completions of the same task: desirable = correct answer, undesirable = corrupted."""
    rng = random.Random(7)
    rows = []
    for i, p in enumerate(preference_pairs(64, seed=2)):
        good = i % 2 == 0
        rows.append(
            {"prompt": p["prompt"], "completion": p["chosen"] if good else p["rejected"], "label": good}
        )
    path = tmp_path_factory.mktemp("kto") / "kto.json"
    rng.shuffle(rows)
    path.write_text(json.dumps(rows))
    return path
