"""The jitted step against closed-form references: loss, accumulation = big batch, chunked log-probs."""


import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxtune
from jaxtune.config import load_config
from jaxtune.data.batch import TokenBatch
from jaxtune.methods import sft
from jaxtune.methods.forward import LM
from jaxtune.methods.logps import token_losses, token_stats
from jaxtune.train import optim, state
from jaxtune.train.step import make_train_step

TINY = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)


def random_batch(seed=0, b=8, t=12, vocab=64):
    """Rows with uneven numbers of trained tokens (0 .. t-1), some right padding."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(1, vocab, (b, t)).astype(np.int32)
    lengths = rng.randint(3, t + 1, b)
    seg = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    targets = np.where(np.arange(t)[None] < lengths[:, None] - 1, np.roll(ids, -1, 1), 0).astype(np.int32)
    prompt = rng.randint(0, 3, b)
    mask = ((np.arange(t)[None] >= prompt[:, None]) & (np.arange(t)[None] < lengths[:, None] - 1)).astype(np.float32)
    mask[0] = 0  # a row with nothing to train on
    pos = np.where(seg > 0, np.arange(t)[None], 0).astype(np.int32)
    return TokenBatch(ids * seg, targets, mask, seg, pos)


@pytest.fixture(scope="module")
def model():
    return jaxtune.from_hf_config(TINY, rng=0)


def make(model, batch_size=8, micro=None, **training):
    cfg = load_config({"training": dict(batch_size=batch_size, micro_batch_size=micro, learning_rate=1e-2,
                                        max_grad_norm=0.0, **training)})
    trainable = {"params": model.params}
    opt, lr = optim.build(cfg.training, trainable, total_steps=10)
    step = make_train_step(sft.SFT, LM(model.arch), cfg, opt, lr, accum=cfg.training.accumulation_steps)
    return step, state.create(jax.tree.map(jnp.array, trainable), opt, seed=0)


def numpy_loss(model, batch):
    """Reference: full logits -> log-softmax in float64 -> masked mean over all trained tokens."""
    logits = np.asarray(model.logits(batch.input_ids, segment_ids=batch.segment_ids, positions=batch.positions), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, batch.targets[..., None], -1)[..., 0]
    return (nll * batch.loss_mask).sum() / batch.loss_mask.sum()


def test_step_loss_equals_numpy_reference(model):
    batch = random_batch()
    step, st = make(model)
    _, metrics = step(st, {}, batch)
    np.testing.assert_allclose(float(metrics["loss"]), numpy_loss(model, batch), rtol=1e-5)
    assert float(metrics["tokens"]) == batch.loss_mask.sum()


def test_accumulation_equals_one_big_batch(model):
    """4 micro-batches with uneven token counts give the big batch's loss and the same updated weights."""
    batch = random_batch(seed=1)
    # SGD keeps the update linear in the gradient (Adam's g / sqrt(v) would amplify fp32 rounding of ~0 grads)
    big_step, big = make(model, optimizer="sgd", adam_beta1=0.0)
    acc_step, acc = make(model, micro=2, optimizer="sgd", adam_beta1=0.0)
    big, m_big = big_step(big, {}, batch)
    acc, m_acc = acc_step(acc, {}, batch)
    np.testing.assert_allclose(float(m_acc["loss"]), float(m_big["loss"]), rtol=1e-6)
    chex.assert_trees_all_close(acc.trainable, big.trainable, atol=1e-6)
    # a mean of per-micro-batch means would differ here, since the micro-batches hold different token counts
    counts = [batch.loss_mask[i::4].sum() for i in range(4)]
    assert len(set(counts)) > 1


def test_chunked_logps_equal_unchunked(model):
    batch = random_batch(seed=2)
    lm = LM(model.arch)
    variables = {"params": model.params}
    hidden = lm.hidden(variables, batch)
    from jaxtune.models.decoder import Decoder

    head = lambda h: Decoder(model.arch).apply(variables, h, method=Decoder.logits)
    whole = token_stats(head, hidden, batch.targets, chunk=batch.shape[1])
    chunked = token_stats(head, hidden, batch.targets, chunk=5)  # 12 = 5 + 5 + 2 (padded last chunk)
    chex.assert_trees_all_close(whole, chunked, atol=1e-6)


def test_label_smoothing_and_z_loss_closed_form():
    """logits [ln 1, ln 2, ln 1] (Z = 4), target 1: CE = -ln(2/4) = ln 2;
    smoothing eps: (1 - eps) ln 2 + eps * mean_v(-log p_v) = (1-eps) ln 2 + eps (ln 4 - ln 2 / 3); z-loss: c (ln 4)^2."""
    logits = jnp.log(jnp.array([[[1.0, 2.0, 1.0]]]))
    stats = token_stats(lambda h: h, logits, jnp.array([[1]]), chunk=1)
    eps, c = 0.1, 1e-2
    expected = (1 - eps) * np.log(2) + eps * (np.log(4) - np.log(2) / 3) + c * np.log(4) ** 2
    np.testing.assert_allclose(token_losses(stats, eps, c)[0, 0], expected, rtol=1e-6)


def test_nan_skip_keeps_weights(model):
    batch = random_batch()
    step, st = make(model, nan_policy="skip")
    before = jax.tree.map(np.asarray, st.trainable)
    poisoned = jax.tree.map(lambda x: x, st)
    poisoned = poisoned.replace(trainable={"params": {**st.trainable["params"],
        "norm": {"scale": jnp.full_like(st.trainable["params"]["norm"]["scale"], jnp.nan)}}})
    new, metrics = step(poisoned, {}, batch)
    assert not bool(metrics["finite"])
    chex.assert_trees_all_equal(new.trainable["params"]["layers"], before["params"]["layers"])


def test_neftune_noise_is_bounded_masked_and_train_only(model):
    """NEFTune adds Uniform(-1, 1) * alpha / sqrt(L d) to the embeddings of real tokens only, in training only."""
    from jaxtune.models.decoder import neftune_noise

    seg = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 2, 2, 2, 2]])
    x = jnp.zeros((2, 6, 32))
    noise = np.asarray(neftune_noise(jax.random.PRNGKey(0), x, seg, alpha=5.0))
    bound = 5.0 / np.sqrt(np.array([4, 6])[:, None, None] * 32)
    assert np.all(np.abs(noise) <= bound + 1e-7) and np.abs(noise[0, 4:]).max() == 0
    np.testing.assert_allclose(np.abs(noise[1]).mean(), bound[1, 0, 0] / 2, rtol=0.1)  # E|U(-b, b)| = b / 2

    batch = random_batch(seed=3)
    noisy = LM(model.arch.replace(neftune_alpha=5.0))
    variables = {"params": model.params}
    clean = LM(model.arch).hidden(variables, batch)
    chex.assert_trees_all_close(noisy.hidden(variables, batch, jax.random.PRNGKey(1), train=False), clean)
    assert not np.allclose(noisy.hidden(variables, batch, jax.random.PRNGKey(1), train=True), clean, atol=1e-4)


def test_bf16_compute_keeps_fp32_master_weights():
    """dtype=bfloat16, param_dtype=float32: the loss is the fp32 loss to bf16 precision and the updated
    weights stay float32 (the optimiser accumulates small updates at full precision)."""
    fp32 = jaxtune.from_hf_config(TINY, rng=0)
    mixed = jaxtune.from_hf_config(TINY, rng=0, dtype="bfloat16", param_dtype="float32")
    batch = random_batch(seed=4)
    step32, st32 = make(fp32)
    step16, st16 = make(mixed)
    new32, m32 = step32(st32, {}, batch)
    new16, m16 = step16(st16, {}, batch)
    np.testing.assert_allclose(float(m16["loss"]), float(m32["loss"]), rtol=2e-2)
    assert {x.dtype for x in jax.tree.leaves(new16.trainable)} == {jnp.dtype("float32")}
    assert {x.dtype for x in jax.tree.leaves(new16.opt_state) if x.ndim} == {jnp.dtype("float32")}
