"""Tokenising the Alpaca demo on one CPU core: load + template + label mask for every sample.

    python bench/tokenize_speed.py [--data PATH] [--template jinja|chatml|llama3|...]

Prints one JSON line. Target (issue 3): the 1,000-sample Alpaca demo in < 10 s on one core. The tokenizer is
a byte-level BPE trained here with `tokenizers` on the same text (training time is reported, not counted),
wrapped as a `transformers` fast tokenizer with a ChatML Jinja chat template, so the measured path is the one
real models take: Jinja rendering of prefixes, one tokenisation with offsets, span -> token mask.
"""

from __future__ import annotations

import os

# One core: the Rust tokenizer would otherwise use a thread pool.
os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

DEFAULT = (
    Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "llamafactory" / "alpaca_en_demo.json"
)
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_tokenizer(texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=8000,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf.chat_template = CHATML
    return hf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT))
    parser.add_argument("--template", default="jinja")
    args = parser.parse_args()
    try:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # pin to one core where the OS allows it
    except (AttributeError, OSError):
        pass

    from jaxtune import data
    from jaxtune.data.items import Encoder

    rows = json.loads(Path(args.data).read_text(encoding="utf-8"))
    t0 = time.perf_counter()
    tok = build_tokenizer([r.get(k) or "" for r in rows for k in ("instruction", "input", "output")])
    train_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    records = data.load(args.data)
    load_s = time.perf_counter() - t0
    enc = Encoder(tok, "lm", template=args.template, cutoff_len=4096)
    t0 = time.perf_counter()
    examples = [ex for r in records for ex in enc(r)]
    encode_s = time.perf_counter() - t0
    tokens = sum(len(ex) for ex in examples)
    total = load_s + encode_s
    print(
        json.dumps(
            {
                "bench": "tokenize_speed",
                "data": Path(args.data).name,
                "template": args.template,
                "samples": len(examples),
                "tokens": tokens,
                "seconds": round(total, 3),
                "load_seconds": round(load_s, 3),
                "encode_seconds": round(encode_s, 3),
                "samples_per_s": round(len(examples) / total, 1),
                "tokens_per_s": round(tokens / total),
                "tokenizer_train_seconds": round(train_s, 3),
                "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                "target": "< 10 s",
            }
        )
    )


if __name__ == "__main__":
    main()
