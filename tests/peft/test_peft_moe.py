"""LoRA on mixture-of-experts experts (PEFT `target_parameters`), against `peft` 0.21 on transformers 5 models.

- the layout conversion (PEFT's lora_A [r*E, in] / lora_B [out, r*E] <-> our per-expert [E, in, r] / [E, r, out])
  against PEFT's own `ParamWrapper.get_delta_weight`, and the nested wrappers' key names as PEFT saves them;
- selection: all-linear = attention + shared expert (+ its gate) + the expert parameters, never the router;
  `gate` names the router; target_parameters; the errors (dropout, DoRA, transformers-4 names, (IA)^3 on experts);
- both directions of interop within 1e-4 (Mixtral, Qwen2-MoE with its shared expert), the merged export, and the
  router frozen in training (no LoRA, no gradient on mlp/gate).
"""

import copy

import numpy as np
import pytest
import torch

from jaxtune.config import MethodConfig
from jaxtune.models.arch import ArchConfig
from jaxtune.peft import experts, names
from jaxtune.peft.names import PeftConfigError

E, R = 4, 3
MOE = dict(vocab_size=64, hidden_size=32, intermediate_size=0, num_layers=2, num_heads=4, num_kv_heads=2,
           head_dim=8, num_experts=E, experts_per_token=2, moe_intermediate_size=24)  # fmt: skip
MIXTRAL = ArchConfig(model_type="mixtral", **MOE)
QWEN2_MOE = ArchConfig(model_type="qwen2_moe", shared_expert_size=40, **MOE)


def _short(mods):
    return sorted(m.ours.split("{i}.", 1)[-1] for m in mods)


def _peft_mixtral(target_parameters):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("mixtral", vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, num_local_experts=E,
                               num_experts_per_tok=2)  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    lc = LoraConfig(r=R, lora_alpha=6, target_modules=["q_proj"], target_parameters=target_parameters)
    peft_model = get_peft_model(model, lc)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    return peft_model


def test_layout_matches_peft_delta_weight_and_keys(tmp_path):
    from safetensors.torch import load_file

    pm = _peft_mixtral(["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    outer = pm.base_model.model.model.layers[0].mlp.experts
    for wrapper in (outer.base_layer, outer):  # gate_up_proj is the inner wrapper, down_proj the outer
        big_a = wrapper.lora_A["default"].weight.detach().numpy()
        big_b = wrapper.lora_B["default"].weight.detach().numpy()
        a, b = experts.from_peft(big_a, big_b, E)
        assert a.shape[::2] == (E, R) and b.shape[:2] == (E, R)
        ours = wrapper.scaling["default"] * np.einsum("eir,ero->eio", a, b)  # [E, in, out]
        theirs = wrapper.get_delta_weight("default").detach().numpy()  # [E, out, in]: the HF parameter's
        np.testing.assert_allclose(ours.transpose(0, 2, 1), theirs, atol=1e-6, rtol=0)
        back = experts.to_peft(a, b)
        np.testing.assert_array_equal(back[0], big_a)
        np.testing.assert_array_equal(back[1], big_b)
    pm.save_pretrained(tmp_path)
    saved = {k for k in load_file(tmp_path / "adapter_model.safetensors") if ".experts." in k}
    nest = experts.key_prefixes(["gate_up_proj", "down_proj"])
    prefix = "base_model.model."
    want = {experts.tensor_name(prefix, 0, nest[n], f) for n in nest for f in ("lora_A", "lora_B")}
    assert saved == want
    assert experts.key_prefixes(["down_proj"]) == {"down_proj": ""}


def test_selection_on_moe_models():
    assert _short(names.select(MIXTRAL, "all-linear")) == [
        "mlp.experts.down_proj", "mlp.experts.gate_up_proj", "self_attn.k_proj", "self_attn.o_proj",
        "self_attn.q_proj", "self_attn.v_proj"]  # fmt: skip
    qwen = _short(names.select(QWEN2_MOE, "all-linear"))
    assert "mlp.gate" not in qwen and {"mlp.shared_expert.down_proj", "mlp.shared_expert_gate"} <= set(qwen)
    assert _short(names.select(MIXTRAL, ["gate"])) == ["mlp.gate"]  # the router, only when named
    assert _short(names.select(MIXTRAL, ["experts.gate_up_proj"])) == ["mlp.experts.gate_up_proj"]
    both = ["mlp.experts.down_proj", "mlp.shared_expert.down_proj"]
    assert _short(names.select(QWEN2_MOE, ["down_proj"])) == both
    got = names.select_parameters(MIXTRAL, ["mlp.experts.down_proj", "mlp.gate.weight"])
    assert _short(got) == ["mlp.experts.down_proj", "mlp.gate"]
    assert names.select(MIXTRAL, ["gate_up_proj"])[0].scale_key == "experts.gate_up_proj"
    with pytest.raises(PeftConfigError, match="names no parameter"):
        names.select_parameters(MIXTRAL, ["mlp.experts.w1"])
    with pytest.raises(PeftConfigError, match="transformers-4 expert projection"):
        names.select(MIXTRAL, ["q_proj", "w1"])
    with pytest.raises(PeftConfigError, match="only LoRA can adapt"):
        names.select(QWEN2_MOE, ["k_proj", "down_proj"], linear_only=True)  # (IA)^3 / BitFit
    assert "mlp.experts.down_proj" not in _short(names.select(QWEN2_MOE, "all-linear", linear_only=True))
    chosen = names.select(MIXTRAL, "all-linear")
    with pytest.raises(PeftConfigError, match="method.dropout=0.1"):
        experts.check_lora(MethodConfig(dropout=0.1), chosen, dora=False)
    with pytest.raises(PeftConfigError, match="DoRA"):
        experts.check_lora(MethodConfig(), chosen, dora=True)
    experts.check_lora(MethodConfig(dropout=0.1), names.select(MIXTRAL, ["q_proj"]), dora=False)


# ------------------------------------------------------------------------------- with the real models

IDS = np.random.RandomState(0).randint(1, 128, (2, 9))
ATOL = 1e-4
ALL = {"method": "lora", "rank": 4, "alpha": 8, "target_modules": "all-linear",
       "rank_pattern": {"down_proj": 2}}  # fmt: skip
# the router when named (PEFT matches its patterns to the parameter name), experts through PEFT's own spelling
ROUTER = {"method": "lora", "rank": 4, "alpha": 8, "target_modules": ["gate", "q_proj"],
          "target_parameters": ["mlp.experts.down_proj"], "rank_pattern": {"gate.weight": 2}}  # fmt: skip


def _randomise(tree, seed):
    import jax

    rng = np.random.RandomState(seed)
    move = lambda p, x: x + 0.1 * rng.normal(0, 1, x.shape).astype(np.float32) if p[-1].key == "lora_b" else x  # noqa: E731
    return jax.tree_util.tree_map_with_path(move, tree)


TO_PEFT = [("mixtral", ALL), ("qwen2_moe", {**ALL, "rslora": True}), ("qwen3_moe", ROUTER)]


@pytest.mark.parametrize("family, cfg", TO_PEFT)
def test_jaxtune_moe_adapter_loads_in_peft_and_merges(family, cfg, hf_dir, tmp_path):
    import json

    from peft import PeftModel
    from peft_helpers import logits
    from tiny_models import hf_logits
    from transformers import AutoModelForCausalLM

    import jaxtune
    from jaxtune import peft as jpeft

    hf, directory = hf_dir(family)
    model = jaxtune.load_model(directory)
    np.testing.assert_allclose(logits(model, IDS), hf_logits(hf, IDS), atol=ATOL, rtol=0)  # the base agrees
    plan = jpeft.prepare(model, cfg, 0)
    # the router: only when named
    assert ("gate" in plan.trainable["lora"]["layers"]["mlp"]) == (cfg is ROUTER)
    adapters = plan.adapters(_randomise(plan.trainable, seed=1))
    ours = logits(model, IDS, adapters)
    assert np.abs(ours - logits(model, IDS)).max() > 1e-2
    jpeft.save_adapter(model, adapters, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    if cfg is not ROUTER:
        assert config["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
        assert config["rank_pattern"] == {"mlp.experts.down_proj": 2} | (
            {"mlp.shared_expert.down_proj": 2} if family == "qwen2_moe" else {}
        )
    else:  # the router is a parameter of a custom module for PEFT
        assert config["target_parameters"] == ["mlp.gate.weight", "mlp.experts.down_proj"]
        assert config["rank_pattern"] == {"mlp.gate.weight": 2}
    theirs = PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "adapter").eval()
    np.testing.assert_allclose(ours, hf_logits(theirs, IDS), atol=ATOL, rtol=0)
    jpeft.merge_and_export(model, adapters, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    np.testing.assert_allclose(ours, hf_logits(merged, IDS), atol=ATOL, rtol=0)


FROM_PEFT = [("mixtral", False), ("qwen2_moe", False), ("qwen3_moe", True)]


@pytest.mark.parametrize("family, peft_all_linear", FROM_PEFT)
def test_peft_moe_adapter_loads_in_jaxtune(family, peft_all_linear, hf_dir, tmp_path):
    """PEFT's own all-linear on Qwen3-MoE (and Mixtral) also adapts the router (`gate.weight`) and gives
    gate_up_proj rank 2r (its transformers-4 compatibility mapping of gate_proj + up_proj)."""
    from peft import LoraConfig, get_peft_model
    from peft_helpers import logits
    from tiny_models import hf_logits

    import jaxtune
    from jaxtune import peft as jpeft

    hf, directory = hf_dir(family)
    lc = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], rank_pattern={"gate_up_proj": 2},
                    target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])  # fmt: skip
    if peft_all_linear:
        lc = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", alpha_pattern={"gate.weight": 3})
    torch.manual_seed(2)
    theirs = get_peft_model(copy.deepcopy(hf), lc).eval()
    with torch.no_grad():
        for _, p in theirs.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    theirs.save_pretrained(tmp_path / "peft")
    model = jaxtune.load_model(directory)
    adapters = jpeft.load_adapter(model, tmp_path / "peft")
    lora = adapters.variables["lora"]["layers"]["mlp"]["experts"]
    assert lora["gate_up_proj"]["lora_a"].shape == (2, E, model.arch.hidden_size, 8 if peft_all_linear else 2)
    assert ("gate" in adapters.variables["lora"]["layers"]["mlp"]) == peft_all_linear
    ours = logits(model, IDS, adapters)
    assert np.abs(ours - logits(model, IDS)).max() > 1e-2
    np.testing.assert_allclose(ours, hf_logits(theirs, IDS), atol=ATOL, rtol=0)


def test_training_reaches_the_experts_not_the_router():
    import jax
    from peft_helpers import as_numpy, make_step, train_batch
    from tiny_models import FAMILIES

    import jaxtune
    from jaxtune import peft as jpeft

    model = jaxtune.from_hf_config(FAMILIES["mixtral"], rng=0)
    plan = jpeft.prepare(model, {"method": "lora", "rank": 2, "target_modules": ["experts.gate_up_proj",
                                                                                  "experts.down_proj"]}, 0)  # fmt: skip
    assert set(plan.trainable["lora"]["layers"]["mlp"]) == {"experts"}
    # the router: frozen, never differentiated
    assert "kernel" in plan.frozen["params"]["layers"]["mlp"]["gate"]
    _, step, st = make_step(plan, train_batch())
    before = as_numpy(plan.trainable)
    losses = []
    for _ in range(3):
        st, metrics = step(st, plan.frozen, train_batch())
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), st.trainable, before)
    assert all(jax.tree.leaves(changed)), changed


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_transformers4_expert_adapter_loads_as_peft_converts_it(family, hf_dir, tmp_path):
    """A PEFT adapter saved against transformers 4 (one LoRA per expert Linear: Mixtral w1/w3/w2 under
    block_sparse_moe, Qwen gate_proj/up_proj/down_proj) loads with the logits PEFT gives after its own fusion."""
    import json

    from peft import PeftModel
    from peft_helpers import logits
    from safetensors.numpy import save_file
    from tiny_models import hf_logits

    import jaxtune
    from jaxtune import peft as jpeft
    from jaxtune.peft.experts_v4 import V4_EXPERTS

    hf, directory = hf_dir(family)
    model = jaxtune.load_model(directory)
    a = model.arch
    d, f, r = a.hidden_size, a.moe_intermediate_size, 2
    block, (gate, up, down) = V4_EXPERTS[family]
    rng = np.random.RandomState(3)
    tensors, pre = {}, "base_model.model.model.layers."
    for i in range(a.num_layers):
        shapes = {f"{block}.gate": (d, a.num_experts), "self_attn.q_proj": (d, a.num_heads * a.head_dim)}
        for e in range(a.num_experts):
            shapes.update({f"{block}.experts.{e}.{p}": (d, f) for p in (gate, up)})
            shapes[f"{block}.experts.{e}.{down}"] = (f, d)
        for mod, (n_in, n_out) in shapes.items():
            tensors[f"{pre}{i}.{mod}.lora_A.weight"] = (0.1 * rng.normal(size=(r, n_in))).astype(np.float32)
            tensors[f"{pre}{i}.{mod}.lora_B.weight"] = (0.1 * rng.normal(size=(n_out, r))).astype(np.float32)
    out = tmp_path / "v4"
    out.mkdir()
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 3, "target_modules": ["q_proj", gate, up, down, "gate"],
              "task_type": "CAUSAL_LM", "lora_dropout": 0.0, "bias": "none"}  # fmt: skip
    (out / "adapter_config.json").write_text(json.dumps(config))
    theirs = PeftModel.from_pretrained(copy.deepcopy(hf), out).eval()
    adapters = jpeft.load_adapter(model, out)
    assert adapters.variables["lora"]["layers"]["mlp"]["experts"]["gate_up_proj"]["lora_a"].shape[-1] == 2 * r
    ours = logits(model, IDS, adapters)
    assert np.abs(ours - logits(model, IDS)).max() > 1e-2
    np.testing.assert_allclose(ours, hf_logits(theirs, IDS), atol=ATOL, rtol=0)
