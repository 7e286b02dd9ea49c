"""Rollout plumbing: joined sequences equal what the data pipeline makes of the same text, the reference under
prompt tuning is exactly the base model, and reward functions (builtins, hooks, errors)."""

import sys

import numpy as np
import pytest
from tiny_models import save_hf

import jaxtune
from jaxtune.data.batching import token_batch
from jaxtune.data.tokenize import Example
from jaxtune.methods import rewards
from jaxtune.methods import rollout as ro
from jaxtune.methods.forward import LM


def test_join_equals_the_pipelines_left_padded_example():
    """Prompt (3 or 5 tokens, left-padded to 5) + a 3-token completion is the pipeline's left-padded example of
    prompt + completion with the completion trained: same ids, targets, loss mask, segments and positions."""
    prompts = [[11, 12, 13], [21, 22, 23, 24, 25]]
    completion = np.array([[31, 32, 33], [41, 42, 43]], np.int32)
    ids = np.zeros((2, 5), np.int32)
    mask = np.zeros((2, 5), np.int32)
    for i, p in enumerate(prompts):
        ids[i, 5 - len(p) :], mask[i, 5 - len(p) :] = p, 1
    joined = ro.join(ids, mask, completion, np.ones((2, 3), bool))
    examples = [[Example(np.array(p + c.tolist(), np.int32), np.array([0.0] * len(p) + [1.0] * 3, np.float32), len(p))]
                for p, c in zip(prompts, completion)]  # fmt: skip
    expected = token_batch(examples, 8, pad_side="left")
    for field in ("input_ids", "targets", "loss_mask", "segment_ids", "positions"):
        np.testing.assert_array_equal(getattr(joined, field), getattr(expected, field), err_msg=field)


def test_join_masks_everything_after_the_stop_token():
    """A completion that stopped after 1 of 3 tokens: its later columns are padding, neither input nor target."""
    joined = ro.join(
        np.array([[0, 5, 6]]), np.array([[0, 1, 1]]), np.array([[7, 9, 9]]), np.array([[1, 0, 0]], bool)
    )
    assert joined.input_ids.tolist() == [[0, 5, 6, 7, 0, 0]]
    assert joined.targets.tolist() == [
        [0, 6, 7, 0, 0, 0]
    ]  # the pipeline's convention: next token in the document
    assert joined.loss_mask.tolist() == [[0, 0, 1, 0, 0, 0]]  # only "6 -> 7" is a generated token
    assert joined.segment_ids.tolist() == [[0, 1, 1, 1, 0, 0]]


@pytest.mark.parametrize(
    "method", [{"method": "prompt", "num_virtual_tokens": 3}, {"method": "prefix", "num_virtual_tokens": 2}]
)
def test_reference_under_virtual_tokens_is_exactly_the_base_model(tmp_path, method):
    """Adapters off must also drop the virtual tokens' position offset (and prompt tuning's stripped outputs)."""
    save_hf("llama", tmp_path)
    model = jaxtune.load_model(tmp_path)
    adapters = jaxtune.peft.init(model, method, rng=0)
    variables = {"params": model.params, **adapters.variables}
    batch = ro.join(
        np.array([[0, 5, 6, 7]]), np.array([[0, 1, 1, 1]]), np.array([[8, 9]]), np.ones((1, 2), bool)
    )
    policy_arch = model.arch.replace(peft=adapters.spec)
    policy, ref = ro.policy_and_reference(variables)
    ref_logps = ro.token_logps(LM(ro.reference_arch(policy_arch)), ref, batch)
    base_logps = ro.token_logps(LM(model.arch), {"params": model.params}, batch)
    np.testing.assert_array_equal(np.asarray(ref_logps), np.asarray(base_logps))
    policy_logps = ro.token_logps(LM(policy_arch), policy, batch)
    assert np.abs(np.asarray(policy_logps - base_logps) * batch.loss_mask).max() > 1e-3  # the adapter acts


def test_builtin_rewards():
    answers = ["CBA", "42", "x"]
    completions = ["CBA ", "The answer is <answer>42.0</answer>", "xy"]
    assert rewards.exact_match(None, completions, answers) == [1.0, 0.0, 0.0]
    assert rewards.answer_match(None, completions, answers) == [1.0, 1.0, 0.0]
    assert rewards.answer_match(None, ["so \\boxed{7}", "#### 1,000"], ["7", "1000"]) == [1.0, 1.0]
    assert rewards.char_match(None, ["CBX", "4", "xy"], answers) == [2 / 3, 0.5, 0.5]
    assert rewards.format_answer(
        None, ["<think>a</think> <answer>b</answer>", "<answer>b</answer>"], [None] * 2
    ) == [1.0, 0.0]
    assert rewards.single_line(None, ["ab", "a\nb", " "], [None] * 3) == [1.0, 0.0, 0.0]


def test_reward_hooks_are_summed_and_checked(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def length(prompts, completions, answers):\n    return [len(c) for c in completions]\n"
        "def wrong(prompts, completions, answers):\n    return [0.0]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    total = rewards.combined(["exact_match", "my_rewards:length"])
    assert total(["p", "q"], ["ab", "c"], ["ab", "x"]) == [3.0, 1.0]
    with pytest.raises(ValueError, match="reward 'my_rewards:wrong' returned 1 values for 2 completions"):
        rewards.combined(["my_rewards:wrong"])(["p", "q"], ["a", "b"], [None, None])
    with pytest.raises(ValueError, match="grpo.reward_fns: unknown reward 'exact'; use a builtin"):
        rewards.resolve("exact")
    with pytest.raises(ValueError, match="module 'my_rewards' has no function 'nope'"):
        rewards.resolve("my_rewards:nope")
    with pytest.raises(ValueError, match="1 of 2 prompts have none"):
        rewards.exact_match(None, ["a", "b"], ["a", None])
    sys.modules.pop("my_rewards", None)
