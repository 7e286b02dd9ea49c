"""QLoRA's frozen base: NF4 or int8 block-wise quantised kernels, dequantised on the fly inside each matmul.

NF4 (Dettmers et al. 2023, sec. 3): each block of `block_size` (64) consecutive weights is divided by its
absmax and rounded to the nearest of 16 NormalFloat levels (the bitsandbytes table below); two 4-bit codes
share a byte. Double quantisation (sec. 3, "Double Quantization") centres the fp32 block scales on their mean
and stores them as 8-bit values with one fp32 scale per 256 — bitsandbytes uses its 8-bit dynamic map there;
we use symmetric int8, whose error on the scales is far below the NF4 rounding error. Storage per weight:
4 bits + 32/64 (scales) = 0.5625 bytes, or 4 + 8/64 + 32/(64*256) bits ~ 0.516 bytes with double quant.
`int8` is the same block-wise absmax scheme with 8-bit codes (1.0625 bytes per weight).

Blocks run along the input axis of our [in, out] kernels, i.e. along the contiguous rows of HF's [out, in]
weights, as bitsandbytes blocks the flattened torch weight; each block's codes and scale keep the kernel's 2-D
layout ([in/2, out] codes, [in/block, out] scales), so quantised kernels shard like the kernels they replace.

`load_quantized` builds the quantised model tensor by tensor from a HF directory: a full-precision copy of one
tensor exists at a time, never of the model.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxtune.models import adapters_hook
from jaxtune.models.families import TensorMap, tensor_maps
from jaxtune.models.family_moe import checkpoint_maps
from jaxtune.models.hf import _layer_tensor, arch_of, load_tokenizer, read_hf_config
from jaxtune.models.model import Model
from jaxtune.models.safetensors_io import SafetensorsReader
from jaxtune.peft import names
from jaxtune.peft.names import PeftConfigError

FORMATS = ("nf4", "int8")
# bitsandbytes `create_normal_map()` / QLoRA appendix E: the 16 NF4 levels (quantiles of N(0, 1), rescaled).
NF4 = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    np.float32,
)  # fmt: skip
SCALE_BLOCK = 256  # double quantisation: one fp32 scale per 256 block scales (QLoRA sec. 3)


def _quantize_scales(absmax):
    """Double quantisation of the block scales [nb, out]: int8 around their mean, one fp32 scale per 256."""
    nb, out = absmax.shape
    mean = absmax.mean()
    c = absmax - mean
    pad = (-out) % SCALE_BLOCK
    blocks = jnp.pad(c, ((0, 0), (0, pad))).reshape(nb, -1, SCALE_BLOCK)  # [nb, out/256, 256]
    s2 = jnp.max(jnp.abs(blocks), axis=-1)  # [nb, out/256]
    q = jnp.round(blocks / jnp.where(s2 == 0, 1, s2)[..., None] * 127).astype(jnp.int8)
    return {"scales_q": q.reshape(nb, -1)[:, :out], "scales_scale": s2, "scales_mean": mean}


def _dequantize_scales(q: dict):
    codes = q["scales_q"]
    nb, out = codes.shape
    pad = (-out) % SCALE_BLOCK
    blocks = jnp.pad(codes.astype(jnp.float32), ((0, 0), (0, pad))).reshape(nb, -1, SCALE_BLOCK)
    c = (blocks * (q["scales_scale"][..., None] / 127)).reshape(nb, -1)[:, :out]
    return c + q["scales_mean"]


@partial(jax.jit, static_argnames=("fmt", "block_size", "double_quant"))
def quantize(kernel, fmt: str = "nf4", block_size: int = 64, double_quant: bool = False) -> dict:
    """One kernel [in, out] -> {"codes", "scales" | "scales_q"/"scales_scale"/"scales_mean"}."""
    n_in, out = kernel.shape
    w = jnp.pad(kernel.astype(jnp.float32), ((0, (-n_in) % block_size), (0, 0)))
    blocks = w.reshape(-1, block_size, out)  # [nb, block, out]
    absmax = jnp.max(jnp.abs(blocks), axis=1)  # [nb, out]
    x = blocks / jnp.where(absmax == 0, 1, absmax)[:, None]  # in [-1, 1]
    if fmt == "nf4":
        mid = jnp.asarray((NF4[1:] + NF4[:-1]) / 2)  # nearest level = count of midpoints below
        idx = jnp.searchsorted(mid, x.reshape(-1)).astype(jnp.uint8).reshape(-1, out)  # [in_pad, out]
        codes = (idx[0::2] << 4) | idx[1::2]  # [in_pad / 2, out]: two 4-bit codes per byte
    else:
        codes = jnp.round(x * 127).astype(jnp.int8).reshape(-1, out)  # [in_pad, out]
    q = {"codes": codes}
    q.update(_quantize_scales(absmax) if double_quant else {"scales": absmax})
    return q


def dequantize(q: dict, shape: tuple[int, int], dtype, fmt: str):
    """The kernel [in, out] back from its codes and scales (inside the jitted step: fused into the matmul)."""
    n_in, out = shape
    codes = q["codes"]
    if fmt == "nf4":
        idx = jnp.stack([codes >> 4, codes & 15], axis=1).reshape(-1, out)  # [in_pad, out]
        vals = jnp.asarray(NF4)[idx.astype(jnp.int32)]
    else:
        vals = codes.astype(jnp.float32) / 127
    scales = _dequantize_scales(q) if "scales_q" in q else q["scales"]  # [nb, out]
    nb = scales.shape[0]
    w = vals.reshape(nb, -1, out) * scales[:, None, :].astype(jnp.float32)  # [nb, block, out]
    return w.reshape(-1, out)[:n_in].astype(dtype)


for _fmt in FORMATS:
    adapters_hook.DEQUANTIZERS[_fmt] = lambda q, shape, dtype, fmt=_fmt: dequantize(q, shape, dtype, fmt)


def check(fmt: str, block_size: int) -> None:
    if fmt not in FORMATS:
        raise PeftConfigError(
            f"quantization={fmt!r} is not supported (supported: none, {', '.join(FORMATS)})"
        )
    if block_size < 2 or block_size % 2:
        raise PeftConfigError(f"quant_block_size must be an even number >= 2, got {block_size}")


def quantized_modules(arch) -> list[names.Module]:
    """The kernels QLoRA stores quantised: every linear layer in the blocks (bitsandbytes keeps lm_head, and an MoE
    model's router and expert parameters, which are not nn.Linear in transformers 5: see experts.log_unquantized)."""
    return [m for m in names.modules(arch) if m.per_layer and m.kind == "linear"]


def quantize_params(params: dict, arch, fmt: str, block_size: int = 64, double_quant: bool = False):
    """(params without the quantised kernels, `quant` collection): layer by layer, one kernel at a time."""
    check(fmt, block_size)
    quant = {}
    for m in quantized_modules(arch):
        path = (*m.path, "kernel")
        stacked = names.get_path(params, path)  # [L, in, out]
        layers = [quantize(stacked[i], fmt, block_size, double_quant) for i in range(stacked.shape[0])]
        quant = names.set_path(quant, m.path, jax.tree.map(lambda *xs: jnp.stack(xs), *layers))
        params = names.set_path(
            params, m.path, {k: v for k, v in names.get_path(params, m.path).items() if k != "kernel"}
        )
    return params, quant


def dequantize_kernel(quant: dict, m: names.Module, arch):
    """One module's stacked kernel [L, in, out] in full precision (QDoRA's magnitudes need ||W||)."""
    one = partial(
        dequantize, shape=(m.in_features, m.out_features), dtype=arch.weight_dtype, fmt=arch.peft.quant
    )
    return jax.vmap(one)(names.get_path(quant, m.path))


def dequantize_params(params: dict, quant: dict, arch) -> dict:
    """Full-precision kernels back into params (for merged export of a QLoRA model)."""
    for m in quantized_modules(arch):
        try:
            names.get_path(quant, m.path)
        except KeyError:
            continue
        params = names.set_path(params, (*m.path, "kernel"), dequantize_kernel(quant, m, arch))
    return params


def stored_bytes(quant: dict) -> int:
    return int(sum(x.nbytes for x in jax.tree.leaves(quant)))


def bytes_per_param(quant: dict, arch) -> float:
    """Stored bytes of the quantised kernels per weight they hold (~0.5625 NF4, ~0.516 NF4 + double quant)."""
    n = arch.num_layers * sum(m.in_features * m.out_features for m in quantized_modules(arch))
    return stored_bytes(quant) / n


def load_quantized(path, fmt: str = "nf4", block_size: int = 64, double_quant: bool = False, **runtime):
    """(Model without the quantised kernels, `quant` collection) straight from a HF directory.

    Each HF tensor is read (memory-mapped), quantised and dropped before the next one, so peak memory is the
    quantised model plus one full-precision tensor. Pass both to `jaxtune.peft.prepare(..., quantized=quant)`.
    """
    check(fmt, block_size)
    cfg = read_hf_config(path)
    arch = arch_of(path, cfg, **runtime)
    reader = SafetensorsReader(path)
    dtype = arch.weight_dtype
    quantized = {(*m.path, "kernel") for m in quantized_modules(arch)}
    flat, quant = {}, {}

    def read(m: TensorMap, i=None):
        if m.experts:  # a stacked MoE expert leaf, assembled from per-expert tensors as load_params does
            return np.asarray(_layer_tensor(reader, m, i, (slice(None),)), np.float32)
        t = np.asarray(reader.get(m.hf.format(i=i)), np.float32)
        if m.part is not None:
            k, n = m.part
            t = t[..., k * t.shape[-1] // n : (k + 1) * t.shape[-1] // n]
        return np.swapaxes(t, -1, -2) if m.transpose else t  # [E, out, in] fused experts too

    for m in checkpoint_maps(arch, tensor_maps(arch), reader):  # MoE: the legacy or the fused expert layout
        missing = [n for n in m.names(0) if n not in reader]
        if missing:
            raise PeftConfigError(f"{path}: missing tensor {missing[0]}")
        if m.path in quantized:
            layers = [quantize(read(m, i), fmt, block_size, double_quant) for i in range(arch.num_layers)]
            quant = names.set_path(quant, m.path[:-1], jax.tree.map(lambda *xs: jnp.stack(xs), *layers))
        elif m.per_layer:
            flat[m.path] = jnp.asarray(np.stack([read(m, i) for i in range(arch.num_layers)]), dtype)
        else:
            flat[m.path] = jnp.asarray(read(m), dtype)
    params = traverse_util.unflatten_dict(flat)
    model = Model(arch=arch, params=params, tokenizer=load_tokenizer(path), hf_config=cfg, path=str(path))
    return model, quant
