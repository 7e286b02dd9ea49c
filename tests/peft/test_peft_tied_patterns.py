"""PEFT interop beyond the plain case, against `peft` 0.21 on a tied Qwen2 (tiny_models' "qwen2"):

- LoRA on `lm_head` of a tied model (PEFT wraps the tied head, the embedding stays): import gives PEFT's logits,
  and dropping that LoRA would not (so the test sees a dropped head LoRA); jaxtune's own head LoRA exports to
  a PEFT adapter with the same logits, and trains;
- per-layer and regex `rank_pattern` / `alpha_pattern` keys resolve as PEFT's `get_pattern_key` does;
- every invalid adapter config or tensor is a PeftConfigError naming the key or tensor, and no tensor of an
  adapter file is ever dropped.
"""

import copy
import json
import warnings

import numpy as np
import pytest
import torch
from peft_helpers import logits, make_step, train_batch
from safetensors.numpy import load_file, save_file
from tiny_models import hf_logits

import jaxtune
from jaxtune import peft as jpeft
from jaxtune.models import Adapters
from jaxtune.peft import PeftConfigError

IDS = np.random.RandomState(0).randint(1, 128, (2, 9))
ATOL = 1e-4
PATTERNS = dict(  # a layer-0-only rank, a regex rank for layer 1's v_proj, a per-layer alpha
    rank_pattern={"model.layers.0.self_attn.q_proj": 2, "^model.layers.1.*v_proj": 3},
    alpha_pattern={"layers.1.self_attn.q_proj": 3},
)


@pytest.fixture(scope="module")
def tied(hf_dir):
    """(transformers qwen2 with tied embeddings, its directory, the jaxtune model)."""
    hf, directory = hf_dir("qwen2")
    assert hf.config.tie_word_embeddings
    return hf, directory, jaxtune.load_model(directory)


def peft_adapter(hf, out, **lora):
    """A PEFT LoRA with every adapter parameter moved off its init, saved to `out`; -> the PEFT model."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about LoRA on a tied layer
        theirs = get_peft_model(copy.deepcopy(hf), LoraConfig(task_type="CAUSAL_LM", **lora)).eval()
        with torch.no_grad():
            for _, p in theirs.named_parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn_like(p))
        theirs.save_pretrained(out)
    return theirs


def peft_logits(hf, directory):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hf_logits(PeftModel.from_pretrained(copy.deepcopy(hf), directory).eval(), IDS)


LORAS = {
    "lm_head": dict(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]),
    "embed+lm_head": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head"]),
    "tied adapters": dict(
        r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head"], ensure_weight_tying=True
    ),
    "patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **PATTERNS),
    "patterns+rslora": dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True, **PATTERNS
    ),
}


@pytest.mark.parametrize("case", list(LORAS))
def test_peft_adapter_loads_with_peft_logits(case, tied, tmp_path):
    hf, _, model = tied
    theirs = hf_logits(peft_adapter(hf, tmp_path / "peft", **LORAS[case]), IDS)
    adapters = jpeft.load_adapter(model, tmp_path / "peft")
    ours = logits(model, IDS, adapters)
    np.testing.assert_allclose(ours, theirs, atol=ATOL, rtol=0)
    if case.startswith("patterns"):  # layer 0's rank-2 q_proj is zero-padded to the stack's rank 4
        a = np.asarray(adapters.variables["lora"]["layers"]["self_attn"]["q_proj"]["lora_a"])
        assert a.shape == (2, 64, 4) and not a[0, :, 2:].any() and a[1, :, 2:].any()
    if "lm_head" in adapters.variables["lora"]:  # the head LoRA matters: without it the logits are off
        rest = {k: v for k, v in adapters.variables["lora"].items() if k != "lm_head"}
        assert np.abs(logits(model, IDS, Adapters({"lora": rest}, adapters.spec)) - theirs).max() > 1e-2
    # and back: what jaxtune writes loads in PEFT with the same logits
    jpeft.save_adapter(model, adapters, tmp_path / "back")
    np.testing.assert_allclose(peft_logits(hf, tmp_path / "back"), theirs, atol=ATOL, rtol=0)


def test_tied_lm_head_lora_trains_exports_and_refuses_merge(tied, tmp_path):
    hf, _, model = tied
    cfg = {"method": "lora", "rank": 4, "alpha": 8, "target_modules": ["q_proj", "lm_head"]}
    plan = jpeft.prepare(model, cfg, 0)
    head = plan.trainable["lora"]["lm_head"]
    assert head["lora_a"].shape == (64, 4) and head["lora_b"].shape == (4, 128)  # D = 64, V = 128
    _, step, st = make_step(plan, train_batch())
    st, _ = step(st, plan.frozen, train_batch())
    assert np.abs(np.asarray(st.trainable["lora"]["lm_head"]["lora_b"])).max() > 0  # B = 0 at init: it learnt
    adapters = plan.adapters(st.trainable)
    ours = logits(model, IDS, adapters)
    assert np.abs(ours - logits(model, IDS)).max() > 1e-3
    jpeft.save_adapter(model, adapters, tmp_path / "adapter")
    assert (
        "lm_head" in json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"]
    )
    np.testing.assert_allclose(peft_logits(hf, tmp_path / "adapter"), ours, atol=ATOL, rtol=0)
    with pytest.raises(PeftConfigError, match="lm_head"):
        jpeft.merge_and_export(model, adapters, tmp_path / "merged")
    for method in ({"method": "dora"}, {"method": "lora", "pissa": True}):
        with pytest.raises(PeftConfigError, match="lm_head"):
            jpeft.prepare(model, {**cfg, **method}, 0)
    with pytest.raises(PeftConfigError, match="lm_head"):
        jpeft.prepare(model, {"method": "ia3", "target_modules": ["v_proj", "lm_head"]}, 0)


@pytest.fixture(scope="module")
def good(tied, tmp_path_factory):
    """A valid PEFT LoRA (q_proj, v_proj, lm_head) on the tied model: (config dict, tensors dict)."""
    hf, _, _ = tied
    d = tmp_path_factory.mktemp("good")
    peft_adapter(hf, d, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"])
    return json.loads((d / "adapter_config.json").read_text()), load_file(d / "adapter_model.safetensors")


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
HEAD_COPY = "base_model.model.lm_head.base_layer.weight"  # PEFT saves the base head beside a head LoRA


def _extra(t):
    return {**t, "base_model.model.model.norm.lora_A.weight": np.zeros((4, 64), np.float32)}


def _modified_copy(t):
    return {**t, HEAD_COPY: t[HEAD_COPY] + 1.0}


def _resized_copy(t):
    return {**t, HEAD_COPY: np.zeros((130, 64), np.float32)}


def _transposed(t):
    return {**t, f"{Q0}.lora_A.weight": np.ascontiguousarray(t[f"{Q0}.lora_A.weight"].T)}


def _no_b(t):
    return {k: v for k, v in t.items() if k != "base_model.model.lm_head.lora_B.weight"}


def _magnitude(t):
    return {**t, f"{Q0}.lora_magnitude_vector": np.ones(64, np.float32)}


INVALID = {  # name: (config changes, tensor change, what the message must name)
    "r zero": ({"r": 0}, None, "r=0"),
    "r string": ({"r": "4"}, None, "r='4'"),
    "r bool": ({"r": True}, None, "r=True"),
    "alpha string": ({"lora_alpha": "eight"}, None, "lora_alpha='eight'"),
    "alpha nan": ({"lora_alpha": float("nan")}, None, "lora_alpha=nan"),
    "dropout": ({"lora_dropout": 1.5}, None, "lora_dropout=1.5"),
    "unknown target": ({"target_modules": ["qq_proj"]}, None, "target_modules=['qq_proj']"),
    "target regex": ({"target_modules": "(q_proj"}, None, "target_modules='(q_proj'"),
    "peft_type": ({"peft_type": "LOHA"}, None, "peft_type 'LOHA'"),
    "rank value": ({"rank_pattern": {"q_proj": 0}}, None, "rank_pattern['q_proj'] = 0"),
    "rank float": ({"rank_pattern": {"q_proj": 2.5}}, None, "rank_pattern['q_proj'] = 2.5"),
    "rank regex": ({"rank_pattern": {"q_proj(": 2}}, None, "rank_pattern key 'q_proj('"),
    "rank vs shape": ({"rank_pattern": {"layers.0.self_attn.q_proj": 2}}, None, "rank_pattern['layers.0.self_attn.q_proj']=2"),
    "r vs shape": ({"r": 5}, None, "r=5"),
    "alpha value": ({"alpha_pattern": {"v_proj": "x"}}, None, "alpha_pattern['v_proj'] = 'x'"),
    "pattern type": ({"rank_pattern": [2]}, None, "rank_pattern"),
    "modules_to_save": ({"modules_to_save": ["lm_head"]}, None, "modules_to_save=['lm_head']"),
    "bias": ({"bias": "all"}, None, "bias='all'"),
    "transposed A": ({}, _transposed, f"{Q0}.lora_A.weight"),
    "missing B": ({}, _no_b, "lm_head has lora_A.weight but no lora_B.weight"),
    "stray tensor": ({}, _extra, "base_model.model.model.norm.lora_A.weight"),
    "magnitude without use_dora": ({}, _magnitude, f"{Q0}.lora_magnitude_vector"),
    "use_dora without magnitude": ({"use_dora": True}, None, "use_dora"),
    "modified base copy": ({}, _modified_copy, HEAD_COPY),
    "resized base copy": ({}, _resized_copy, HEAD_COPY),
}  # fmt: skip


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_adapter_is_a_peft_config_error_naming_the_key(case, good, tied, tmp_path):
    _, _, model = tied
    config, tensors = good
    changes, edit, named = INVALID[case]
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    save_file(edit(tensors) if edit else tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(PeftConfigError) as err:
        jpeft.load_adapter(model, tmp_path)
    assert named in str(err.value)
    assert str(tmp_path) in str(err.value)  # and the file


def test_the_unchanged_adapter_loads(good, tied, tmp_path):
    """The base of INVALID's cases is valid (each case's error comes from its one change)."""
    _, _, model = tied
    config, tensors = good
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    assert HEAD_COPY in tensors
    lora = jpeft.load_adapter(model, tmp_path).variables["lora"]
    assert set(lora) == {"layers", "lm_head"}


def test_unreadable_config_and_missing_prompt_tensor(tied, tmp_path):
    _, _, model = tied
    save_file({"x": np.zeros(2, np.float32)}, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(PeftConfigError, match="not valid JSON"):
        jpeft.load_adapter(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING"}))
    with pytest.raises(PeftConfigError, match="prompt_embeddings"):
        jpeft.load_adapter(model, tmp_path)
    emb = {"prompt_embeddings": np.zeros((3, 63), np.float32)}
    save_file(emb, tmp_path / "adapter_model.safetensors")
    with pytest.raises(PeftConfigError, match=r"\[3, 64\]"):
        jpeft.load_adapter(model, tmp_path)
