"""The demo task: a synthetic, checkable instruction dataset and a character-level tokenizer, made offline.

`jaxtune train configs/demo.yaml` trains a small randomly initialised Llama on it. Each sample asks for a
string transformation whose answer is unique, so exact-match accuracy of greedy generations measures what was
learned: reverse a word, or upper-case it. Sources named `builtin:demo` and tokenizers named
`builtin:chars` resolve here.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

TASKS = {
    "Reverse the word.": lambda w: w[::-1],
    "Uppercase the word.": lambda w: w.upper(),
}
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
CHARS = string.ascii_letters + string.digits + string.punctuation + " \n"
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def samples(n: int, seed: int, min_len: int = 5, max_len: int = 5, letters: str = "abcdefgh") -> list[dict]:
    """Alpaca records {instruction, input, output}; the answer is a deterministic function of the input.

    Words have a fixed length by default: then every output letter sits at a fixed distance from the input
    letter it comes from, which a few-layer RoPE model learns in a few hundred steps on a CPU. Eval words
    are drawn from 8^5 = 32768 possibilities, so most were never seen in training."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        instruction = rng.choice(sorted(TASKS))
        word = "".join(rng.choice(letters) for _ in range(rng.randint(min_len, max_len)))
        out.append({"instruction": instruction, "input": word, "output": TASKS[instruction](word)})
    return out


def write_dataset(directory: Path, n_train: int = 4000, n_eval: int = 200, seed: int = 0) -> tuple[Path, Path]:
    """Train and eval JSON files (disjoint seeds, so eval inputs are mostly unseen)."""
    directory.mkdir(parents=True, exist_ok=True)
    train, evals = directory / "demo_train.json", directory / "demo_eval.json"
    train.write_text(json.dumps(samples(n_train, seed), indent=0))
    evals.write_text(json.dumps(samples(n_eval, seed + 1), indent=0))
    return train, evals


def char_tokenizer():
    """A character-level `PreTrainedTokenizerFast` with chat special tokens and a Jinja chat template."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(CHARS))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=SPECIALS[4:],
    )  # fmt: skip
    tok.chat_template = CHAT_TEMPLATE
    return tok
