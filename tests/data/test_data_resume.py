"""Resume: stop after k batches, restore the JSON state in a fresh iterator -> exactly batches k+1, ... again.

Oracle: an uninterrupted run of the same config. Small windows make the runs cross window and epoch
boundaries, where resume bugs live.
"""

from __future__ import annotations

import json
import random

import chex
import pytest

from jaxtune.data.pipeline import iterators

WORDS = "the a sea sky tree river stone light quick brown fox jumps over lazy dog answer question".split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    rng = random.Random(0)
    d = tmp_path_factory.mktemp("resume")
    alpaca = [
        {
            "instruction": sentence(rng, rng.randint(2, 30)),
            "input": "",
            "output": sentence(rng, rng.randint(1, 60)),
        }
        for _ in range(90)
    ]
    (d / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in alpaca))
    chat = [
        {
            "messages": [
                {"role": "user", "content": sentence(rng, 5)},
                {"role": "assistant", "content": sentence(rng, 9)},
            ]
        }
        for _ in range(40)
    ]
    (d / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    (d / "docs.txt").write_text("\n".join(sentence(rng, rng.randint(5, 200)) for _ in range(40)))
    return d


CASES = {
    "padded": dict(),
    "packed": dict(packing=True, cutoff_len=128),
    "mixture": dict(mixture=True),
    "mixture_packed": dict(mixture=True, packing=True, cutoff_len=128),
    "streaming": dict(streaming=True),
    "streaming_mixture_packed": dict(streaming=True, mixture=True, packing=True, cutoff_len=128),
    "streaming_pt_chunks": dict(streaming=True, kind="text", packing=True, cutoff_len=32, docs=True),
}


def make(files, tok, mixture=False, docs=False, kind="lm", **kw):
    if docs:
        train = str(files / "docs.txt")
    elif mixture:
        train = [
            {"path": str(files / "a.jsonl"), "ratio": 0.7},
            {"path": str(files / "b.jsonl"), "ratio": 0.3},
        ]
    else:
        train = str(files / "a.jsonl")
    kw.setdefault("cutoff_len", 256)
    return iterators(train, tok, 3, kind, seed=5, window=16, bucket_multiple=16, **kw).train


@pytest.mark.parametrize("case", list(CASES))
def test_resume_matches_uninterrupted_run(files, chatml_tok, case):
    n = 45  # several epochs of small windows
    full = [next(it) for it in [make(files, chatml_tok, **CASES[case])] for _ in range(n)]
    for k in (1, 17, 31):
        first = make(files, chatml_tok, **CASES[case])
        for _ in range(k):
            next(first)
        state = json.loads(json.dumps(first.get_state()))  # must survive a JSON checkpoint
        fresh = make(files, chatml_tok, **CASES[case])
        fresh.set_state(state)
        for j in range(k, n):
            chex.assert_trees_all_equal(next(fresh), full[j])
    assert full[0].input_ids.shape[0] == 3


def test_state_is_small_and_epochs_advance(files, chatml_tok):
    it = make(files, chatml_tok)
    for _ in range(40):
        next(it)
    state = it.get_state()
    assert set(state) == {"epoch", "window", "row", "cursor", "seed"} and state["epoch"] >= 1
    assert len(json.dumps(state)) < 200


def test_shuffle_is_seeded(files, chatml_tok):
    a = [next(it).input_ids for it in [make(files, chatml_tok)] for _ in range(5)]
    b = [next(it).input_ids for it in [make(files, chatml_tok)] for _ in range(5)]
    chex.assert_trees_all_equal(a, b)
    other = iterators(str(files / "a.jsonl"), chatml_tok, 3, "lm", seed=6, window=16).train
    assert any(
        x.shape != y.shape or (x != y).any() for x, y in zip(a, [next(other).input_ids for _ in range(5)])
    )


def test_restoring_with_another_seed_is_refused(files, chatml_tok):
    it = make(files, chatml_tok)
    next(it)
    other = iterators(str(files / "a.jsonl"), chatml_tok, 3, "lm", seed=6).train
    with pytest.raises(ValueError, match="seed 5"):
        other.set_state(it.get_state())
