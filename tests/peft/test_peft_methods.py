"""Every PEFT method through `jaxtune.peft.prepare` and the trainer's jitted step.

For each method: (1) at init the model equals the base model where the method defines an identity start
(LoRA family: B = 0; PiSSA: residual + s·AB = W; adapters: up = 0; (IA)^3: ones; BitFit: zero added biases;
selection methods: nothing changed; QLoRA: the dequantised base). Prompt / P-tuning / prefix methods add
virtual tokens and are not an identity in the papers or in PEFT, so they are only trained. (2) 10 jitted optax
steps change every trainable leaf and leave the frozen pytree bit-identical. (3) No weight gradient of a frozen
kernel is ever computed: the compiled training step holds no matmul / scatter-add producing a frozen kernel's
shape beyond those the forward pass itself has (full fine-tuning, checked too, has one per kernel).
"""

from collections import Counter

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from peft_helpers import as_numpy, logits, make_step, run_config, train_batch

from jaxtune import peft
from jaxtune.methods import sft
from jaxtune.methods.forward import LM
from jaxtune.models.model import Adapters, Model
from jaxtune.peft import merge_variables, names, quant
from jaxtune.train import optim

V = 3  # virtual tokens
METHODS = {
    "lora": {"method": "lora"},
    "rslora": {"method": "lora", "rslora": True, "rank": 4, "target_modules": "all-linear"},
    "dora": {"method": "dora", "target_modules": ["q_proj", "v_proj", "down_proj"]},
    "pissa": {"method": "lora", "pissa": True},
    "loraplus": {"method": "lora", "loraplus_lr_ratio": 16.0},
    "qlora_nf4": {"method": "qlora"},
    "qlora_int8": {"method": "qlora", "dora": True},  # QDoRA: magnitudes from the dequantised kernels
    "houlsby": {"method": "adapter", "adapter_size": 8},
    "pfeiffer": {"method": "adapter", "adapter_type": "pfeiffer", "adapter_size": 8, "adapter_activation": "gelu"},
    "ia3": {"method": "ia3"},
    "prompt": {"method": "prompt", "num_virtual_tokens": V},
    "ptuning_mlp": {"method": "ptuning", "num_virtual_tokens": V, "encoder_hidden_size": 20},
    "ptuning_lstm": {"method": "ptuning", "num_virtual_tokens": V, "encoder_hidden_size": 20, "ptuning_encoder": "lstm"},
    "prefix": {"method": "prefix", "num_virtual_tokens": V},
    "prefix_projection": {"method": "prefix", "num_virtual_tokens": V, "prefix_projection": True, "encoder_hidden_size": 20},
    "ptuning_v2": {"method": "ptuning_v2", "num_virtual_tokens": V},
    "bitfit": {"method": "bitfit"},  # Llama: no bias anywhere, all added at zero
    "bitfit_qwen2": {"method": "bitfit"},  # q/k/v biases exist (trained in place), o/MLP biases added
    "freeze": {"method": "freeze", "freeze_trainable_layers": 1},
    "full": {"method": "full"},
    "lora+prefix": {"method": "lora", "combine": ["prefix"], "num_virtual_tokens": V},
}  # fmt: skip
QUANT = {
    "qlora_nf4": dict(quantization="nf4", quant_block_size=16, double_quant=True),
    "qlora_int8": dict(quantization="int8"),
}
# virtual-token methods: not an identity at init (nor in the papers or PEFT)
NO_IDENTITY = {"prompt", "ptuning_mlp", "ptuning_lstm", "prefix", "prefix_projection", "ptuning_v2", "lora+prefix"}  # fmt: skip
_runs = {}


@pytest.fixture
def run(request, llama, qwen2):
    """{"plan", "traced", "step", "state"} of one method, built once: the trainer's step traced and compiled."""
    name = request.param
    if name not in _runs:
        model = qwen2 if name == "bitfit_qwen2" else llama
        plan = peft.prepare(model, METHODS[name], 0, **QUANT.get(name, {}))
        traced, step, st = make_step(plan, train_batch())
        _runs[name] = {"plan": plan, "traced": traced, "step": step, "state": st}
    return _runs[name]


@pytest.mark.parametrize("run", sorted(set(METHODS) - NO_IDENTITY), indirect=True)
def test_identity_at_init(run):
    """The trainer's view (frozen + trainable collections, the plan's arch) equals the base model."""
    plan = run["plan"]
    ids = np.random.RandomState(0).randint(1, 64, (2, 7))
    variables = merge_variables(plan.frozen, plan.trainable)
    params = variables.pop("params")
    ours = logits(Model(plan.arch, params), ids, Adapters(variables, plan.spec))
    base = plan.model
    if plan.spec.quant != "none":  # QLoRA starts at the quantised base, not the full-precision one
        params = quant.dequantize_params(plan.frozen["params"], plan.frozen["quant"], plan.arch)
        base = Model(base.arch, params)
    np.testing.assert_allclose(ours, logits(base, ids), atol=2e-5, rtol=0)


@pytest.mark.parametrize("run", sorted(METHODS), indirect=True)
def test_ten_steps_change_only_the_trainable_tree(run):
    plan, step, st = run["plan"], run["step"], run["state"]
    frozen_before, trainable_before = as_numpy(plan.frozen), as_numpy(plan.trainable)
    batch = train_batch()
    losses = []
    for _ in range(10):
        st, metrics = step(st, plan.frozen, batch)
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    chex.assert_trees_all_equal(as_numpy(plan.frozen), frozen_before)  # bit-identical, never donated
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), st.trainable, trainable_before)
    assert all(jax.tree.leaves(changed)), changed
    if "params" in plan.trainable:  # selection methods: the untouched base leaves are the model's own
        merged = dict(jax.tree_util.tree_leaves_with_path(plan.base_model(st.trainable).params))
        for path, old in jax.tree_util.tree_leaves_with_path(plan.model.params):
            if not _is_trained(plan, path):
                np.testing.assert_array_equal(merged[path], old, err_msg=str(path))


def _is_trained(plan, path) -> bool:
    keys = tuple(k.key for k in path)
    tree = plan.trainable.get("params", {})
    if plan.spec.layer_split and keys[0] == "layers":
        return keys[1:] in _paths(tree.get("top_layers", {}))  # the trained group of a split stack
    return keys in _paths(tree)


def _paths(tree) -> set:
    return {tuple(k.key for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)}


def matmul_shapes(jaxpr) -> Counter:
    """2-D outputs of every dot_general / scatter-add in a jaxpr, nested ones (scan, remat, pjit) included,
    keyed by their sorted dims (a weight gradient may come out as dWᵀ)."""
    out = Counter()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("dot_general", "scatter-add", "scatter_add"):
            shape = tuple(eqn.outvars[0].aval.shape)
            if len(shape) == 2:
                out[tuple(sorted(shape))] += 1
        for v in eqn.params.values():
            for sub in v if isinstance(v, tuple | list) else [v]:
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    out += matmul_shapes(sub)
    return out


def weight_grad_shapes(run) -> tuple[Counter, set]:
    """(matmuls the compiled training step has beyond the forward pass, by output shape; the shapes of the frozen
    kernels and embedding)."""
    plan, cfg, batch = run["plan"], run_config(), train_batch()
    lm = LM(plan.arch)

    def loss(trainable):
        return sft.loss_fn(lm, merge_variables(plan.frozen, trainable), batch, None, cfg)[0]

    fwd = matmul_shapes(jax.make_jaxpr(loss)(plan.trainable).jaxpr)
    step = matmul_shapes(run["traced"].jaxpr.jaxpr)
    arch = plan.model.arch
    kernels = {tuple(sorted((m.in_features, m.out_features))) for m in names.modules(arch)}  # + embedding
    trainable_shapes = {tuple(sorted(x.shape[-2:])) for x in jax.tree.leaves(plan.trainable) if x.ndim >= 2}
    return step - fwd, kernels - trainable_shapes


@pytest.mark.parametrize("run", sorted(set(METHODS) - {"full", "freeze"}), indirect=True)
def test_no_weight_gradient_for_frozen_kernels(run):
    added, frozen_shapes = weight_grad_shapes(run)
    assert frozen_shapes
    assert {s: n for s, n in added.items() if s in frozen_shapes} == {}


@pytest.mark.parametrize("run", ["full", "freeze"], indirect=True)
def test_weight_gradients_only_for_trained_layers(run):
    """The check above can fail: full fine-tuning adds one weight gradient per kernel of the (scanned) block,
    the head and the embedding; freeze-tuning of the last layer of 2 runs the stack as two scans and adds only
    the top block's 7 kernels (q, k, v, o, gate, up, down), none for the frozen bottom block, head or embedding."""
    added, _ = weight_grad_shapes(run)
    plan = run["plan"]
    block = {tuple(sorted((m.in_features, m.out_features))) for m in names.modules(plan.arch) if m.per_layer}
    assert sum(added[s] for s in block) == 7
    head = tuple(sorted((plan.arch.hidden_size, plan.arch.vocab_size)))  # lm_head [D, V], embedding [V, D]
    assert added[head] == (2 if plan.methods == ("full",) else 0)
    assert plan.spec.layer_split == (1 if plan.methods == ("freeze",) else 0)


@pytest.mark.parametrize("run", ["loraplus"], indirect=True)
def test_loraplus_scales_only_b_updates(run):
    """LoRA+ (Hayou et al. 2024): lr(B) = ratio · lr(A). With the same gradients, the update of every lora_b is
    exactly ratio times the one without LoRA+, and every lora_a update is unchanged."""
    plan = run["plan"]
    cfg = run_config().training
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), plan.trainable)
    with_ratio, _ = optim.build(cfg, plan.trainable, 10, plan.lr_multipliers)
    plain, _ = optim.build(cfg, plan.trainable, 10)
    u1 = with_ratio.update(grads, with_ratio.init(plan.trainable), plan.trainable)[0]
    u0 = plain.update(grads, plain.init(plan.trainable), plan.trainable)[0]
    ratio = METHODS["loraplus"]["loraplus_lr_ratio"]
    for path, a in jax.tree_util.tree_leaves_with_path(u1):
        b = dict(jax.tree_util.tree_leaves_with_path(u0))[path]
        factor = ratio if path[-1].key == "lora_b" else 1.0
        np.testing.assert_allclose(a, factor * b, rtol=1e-6, err_msg=str(path))
    assert optax.tree.norm(u0) > 0


def test_describe_counts_trainable_params_and_optimizer_state(llama):
    """LoRA r=8 on q (32->32) and v (32->16), 2 layers: 2 * (8*(32+32) + 8*(32+16)) = 1792 trainable params;
    AdamW keeps 2 fp32 moments each: 1792 * 8 bytes = 14.0 KB."""
    plan = peft.prepare(llama, {"method": "lora"}, 0)
    total = llama.num_params() + 1792
    assert f"trainable params 1,792 / {total:,}" in plan.describe()
    assert "AdamW state 14.0 KB" in plan.describe()
    opt, _ = optim.build(run_config().training, plan.trainable, 10)
    # + two int32 step counts (Adam's bias correction and the lr schedule's)
    assert optim.state_bytes(opt.init(plan.trainable)) == 1792 * 2 * 4 + 2 * 4


def test_bitfit_on_bias_less_model_adds_zero_biases(llama, qwen2):
    plan = peft.prepare(llama, METHODS["bitfit"], 0)
    assert set(plan.trainable) == {"bitfit"}  # Llama has no bias to train in place
    added = plan.trainable["bitfit"]["layers"]
    assert set(added["self_attn"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert set(added["mlp"]) == {"gate_proj", "up_proj", "down_proj"}
    plan = peft.prepare(qwen2, METHODS["bitfit"], 0)
    trained = plan.trainable["params"]["layers"]["self_attn"]
    assert set(trained) == {"q_proj", "k_proj", "v_proj"} and set(trained["q_proj"]) == {"bias"}
    assert set(plan.trainable["bitfit"]["layers"]["self_attn"]) == {"o_proj"}
