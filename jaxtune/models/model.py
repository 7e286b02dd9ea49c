"""`jaxtune.Model`: an ArchConfig, a params pytree and a tokenizer — and the jitted forward pass users call.

The model object holds no hidden state: `logits()` is a pure function of (params, adapters, inputs), compiled
once per (ArchConfig, PeftSpec, shape). Adapter collections come in as `Adapters` (trainable values + static
spec) and are passed beside `params` to `Decoder.apply`; the same call without them is the base model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.models.arch import ArchConfig, PeftSpec
from jaxtune.models.decoder import Decoder, segment_positions


@flax.struct.dataclass
class Adapters:
    """Trainable adapter collections ({"lora": ..., "prefix": ...}) plus the static settings they need."""

    variables: dict
    spec: PeftSpec = flax.struct.field(pytree_node=False, default_factory=PeftSpec)


def split_adapters(adapters) -> tuple[dict, PeftSpec | None]:
    if adapters is None:
        return {}, None
    if isinstance(adapters, Adapters):
        return dict(adapters.variables), adapters.spec
    return dict(adapters), None


def with_peft(arch: ArchConfig, spec: PeftSpec | None) -> ArchConfig:
    return arch if spec is None or spec == arch.peft else arch.replace(peft=spec)


def abstract_variables(arch: ArchConfig):
    """Shapes and logical axes of every parameter, without allocating anything."""
    ids = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(
        lambda: Decoder(arch).init(jax.random.key(0), ids, ids, ids, method=Decoder.forward_logits)
    )


def param_logical_axes(arch: ArchConfig):
    """Tree of `PartitionSpec`s over logical axis names ("layers", "embed", "heads", ...), shaped like params."""
    return nn.get_partition_spec(abstract_variables(arch))["params"]


def param_shardings(arch: ArchConfig, mesh):
    """`NamedSharding` of every parameter on `mesh`, from its logical axes and `parallel/rules.py`."""
    from jaxtune.parallel.rules import tree_shardings

    return tree_shardings(abstract_variables(arch)["params"], None, mesh)


def init_params(arch: ArchConfig, rng: jax.Array | int = 0, shardings=None):
    """Random params; with `shardings` (e.g. `param_shardings(arch, mesh)`) each is created in its shards."""
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    ids = jnp.zeros((1, 1), jnp.int32)
    init = lambda key: nn.meta.unbox(Decoder(arch).init(key, ids, ids, ids, method=Decoder.forward_logits))["params"]
    return init(rng) if shardings is None else jax.jit(init, out_shardings=shardings)(rng)


@partial(jax.jit, static_argnames=("arch", "hidden_only"))
def forward(arch: ArchConfig, params, adapter_vars, input_ids, segment_ids, positions, hidden_only=False):
    """Logits [B, T, V] (or final hidden states [B, T, D]) of the base model plus adapter collections."""
    variables = {"params": params, **adapter_vars}
    method = Decoder.__call__ if hidden_only else Decoder.forward_logits
    return Decoder(arch).apply(variables, input_ids, segment_ids, positions, method=method)


def prepare_inputs(input_ids, attention_mask=None, segment_ids=None, positions=None):
    """Fill in segment ids (from the attention mask: 1 = real, 0 = pad) and per-segment positions."""
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if segment_ids is None:
        mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask)
        segment_ids = (mask != 0).astype(jnp.int32)
    segment_ids = jnp.asarray(segment_ids, jnp.int32)
    if positions is None:
        positions = segment_positions(segment_ids)
    return input_ids, segment_ids, jnp.asarray(positions, jnp.int32)


@dataclass
class Model:
    arch: ArchConfig
    params: Any
    tokenizer: Any = None
    hf_config: dict = field(default_factory=dict)
    path: str | None = None

    @property
    def config(self) -> ArchConfig:
        return self.arch

    def logits(self, input_ids, attention_mask=None, segment_ids=None, adapters=None, positions=None):
        """[B, T] token ids -> [B, T, V] logits in the compute dtype.

        `attention_mask` (1 = token, 0 = padding, left or right) or `segment_ids` (1, 2, ... per packed
        document, 0 = padding) define who attends to whom; positions restart at 0 in every segment.
        """
        ids, seg, pos = prepare_inputs(input_ids, attention_mask, segment_ids, positions)
        variables, spec = split_adapters(adapters)
        return forward(with_peft(self.arch, spec), self.params, variables, ids, seg, pos)

    def hidden_states(self, input_ids, attention_mask=None, segment_ids=None, adapters=None, positions=None):
        ids, seg, pos = prepare_inputs(input_ids, attention_mask, segment_ids, positions)
        variables, spec = split_adapters(adapters)
        return forward(with_peft(self.arch, spec), self.params, variables, ids, seg, pos, hidden_only=True)

    def num_params(self) -> int:
        return int(sum(np.prod(x.shape) for x in jax.tree.leaves(self.params)))
