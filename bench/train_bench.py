"""What users run: the real `jaxtune train` side by side with transformers Trainer (+ PEFT), same data and shapes.

    python bench/train_bench.py --preset tiny --steps 4 --side both      # CPU smoke (orientation only)
    python bench/train_bench.py --preset 1b --method full --steps 12      # TinyLlama shape, full fine-tuning
    python bench/train_bench.py --preset 1b --method lora --steps 12      # LoRA r16 all-linear
    python bench/train_bench.py --preset 8b --steps 8                     # Llama-3-8B shape, LoRA r16, bf16 base
    python bench/train_bench.py --preset 8b-qlora --steps 8               # the same over an NF4 base

Both sides read one generated Alpaca-style dataset (instruction / input / output rows of realistic lengths,
written to a temp dir) tokenised by a BPE tokenizer trained on it locally (nothing is downloaded), packed to
`seq` tokens per row, `batch` rows per step: the same tokens per step on both sides. Weights are random
(`model.random_init`). jaxtune runs `jaxtune.train.loop.run(load_config(...))` in its own process and its
figures come from the run's metrics.jsonl; the peer is `transformers.Trainer` (+ PEFT LoRA; bitsandbytes 4-bit
for qlora when importable, else skipped with the reason), attn_implementation "sdpa" on packed rows, or
FlashAttention-2 with padding-free packing (`DataCollatorWithFlattening`) when `flash_attn` is importable.

Prints one JSON line per side with the keys of `KEYS`: tokens_per_s is the steady state (the first `--skip`
steps, compilation included, are left out), compile_s the first step's wall time, mfu the convention and peak
table of bench/train_throughput.py (null off a known accelerator), peak_device_mem_gb from
`memory_stats()["peak_bytes_in_use"]` (jax) / `max_memory_allocated` (torch) or null, host_rss_gb the process's
peak RSS. Never asserted anywhere: figures go to bench/RESULTS.md with date and device.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import ALL_LINEAR, flops_per_token, host_peak_gb, peak_tflops  # noqa: E402

KEYS = ("side", "preset", "method", "seq", "batch", "steps", "tokens_per_step", "tokens_per_s", "mfu",
        "compile_s", "peak_device_mem_gb", "host_rss_gb", "loss", "device", "attention", "skipped")  # fmt: skip
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000)  # fmt: skip
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0)  # fmt: skip
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=2048)  # fmt: skip
# preset -> (shape, default method, seq, batch, remat)
PRESETS = {
    "tiny": (TINY, "full", 256, 1, "none"),
    "1b": (LLAMA_1B, "full", 2048, 8, "dots"),
    "8b": (LLAMA3_8B, "lora", 2048, 4, "full"),
    "8b-qlora": (LLAMA3_8B, "qlora", 2048, 4, "full"),
}
LR = {"full": 1e-5, "lora": 2e-4, "qlora": 2e-4}


# ---------------------------------------------------------------- data


def _words(rng: random.Random, n: int) -> str:
    syll = (
        "ka",
        "lo",
        "mi",
        "ne",
        "ru",
        "sa",
        "ti",
        "vo",
        "be",
        "da",
        "fu",
        "ge",
        "ho",
        "ji",
        "pe",
        "qu",
        "ze",
    )
    return " ".join("".join(rng.choice(syll) for _ in range(rng.randint(1, 3))) for _ in range(n))


def make_dataset(directory: Path, tokens_needed: int, seed: int = 0) -> Path:
    """Alpaca rows (instruction 8-40 words, input empty or 10-80, output 30-400) until ~tokens_needed tokens."""
    rng, rows, words = random.Random(seed), [], 0
    while words < tokens_needed // 2 + 200:  # ~2+ BPE tokens per synthetic word: ample rows
        row = {"instruction": _words(rng, rng.randint(8, 40)),
               "input": "" if rng.random() < 0.6 else _words(rng, rng.randint(10, 80)),
               "output": _words(rng, int(min(400, rng.expovariate(1 / 120)) + 30))}  # fmt: skip
        rows.append(row)
        words += sum(len(v.split()) for v in row.values())
    path = directory / "alpaca_bench.json"
    path.write_text(json.dumps(rows))
    return path


def make_tokenizer(directory: Path, data: Path, vocab: int) -> Path:
    """A byte-level BPE trained on the generated rows, as a directory `AutoTokenizer` loads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    rows = json.loads(data.read_text())
    tok.train_from_iterator((" ".join(r.values()) for r in rows[:2000]), trainer)
    out = directory / "tokenizer"  # written by hand: importing transformers here costs seconds
    out.mkdir()
    tok.save(str(out / "tokenizer.json"))
    special = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}
    (out / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **special})
    )
    return out


def alpaca_pairs(rows, template) -> list[tuple[str, str]]:
    """(prompt, answer) texts the way jaxtune's `alpaca` template renders them (bos / eos as tokens, later)."""
    out = []
    for r in rows:
        user = r["instruction"] + ("\n\n" + r["input"] if r["input"] else "")
        prompt = template.system.format(content=template.default_system) + template.user.format(content=user)
        out.append((prompt + template.assistant_prompt, r["output"]))
    return out


# ---------------------------------------------------------------- jaxtune side


def jaxtune_config(args, shape, data: Path, tok: Path, out: Path) -> dict:
    method = {"name": args.method}
    if args.method != "full":
        method.update(rank=16, alpha=32, target_modules="all-linear")
    full = args.method == "full"
    return {
        "stage": "sft", "output_dir": str(out),
        "model": {"tokenizer": str(tok), "random_init": {"model_type": "llama", "max_position_embeddings": args.seq,
                                                          **shape},
                  "dtype": "bfloat16", "param_dtype": "float32" if full or args.method == "qlora" else "bfloat16",
                  "remat": args.remat, "quantization": "nf4" if args.method == "qlora" else "none"},
        "data": {"train": [str(data)], "format": "alpaca", "template": "alpaca", "cutoff_len": args.seq,
                 "packing": True, "shuffle": False},
        "method": method,
        "training": {"learning_rate": LR[args.method], "batch_size": args.batch, "max_steps": args.steps,
                     "warmup_steps": 0, "save_every": 0},
        "logging": {"log_every": 1, "progress": False, "tensorboard": False, "plot": False},
    }  # fmt: skip


def run_jaxtune(args, shape, data, tok, work: Path) -> dict:
    import jax

    from jaxtune.config import load_config
    from jaxtune.train.loop import run

    out = work / "jaxtune_run"
    run(load_config(jaxtune_config(args, shape, data, tok, out)))
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if r.get("split") == "train"]
    steady = [r for r in recs if r["step"] > args.skip] or recs[-1:]
    dev = jax.devices()[0]
    peak = (dev.memory_stats() or {}).get("peak_bytes_in_use")
    from jaxtune.train.setup import check_attention_impl

    return {
        "tokens_per_s": sum(r["tokens"] for r in steady) / sum(r["step_time_s"] for r in steady),
        "compile_s": recs[0]["step_time_s"],
        "peak_device_mem_gb": peak / 2**30 if peak else None,
        "loss": recs[-1]["loss"],
        "device": dev.device_kind,
        "attention": check_attention_impl("auto"),
        "tokens_per_step": args.batch * args.seq,
    }


# ---------------------------------------------------------------- transformers side


def torch_steps(args, pairs, tokenizer, flatten: bool) -> list[dict]:
    """Per step, `batch * seq` tokens: packed [batch, seq] rows (sdpa), or one flattened row of whole examples
    with position ids restarting per example (flash_attention_2, padding-free)."""
    import torch

    examples = []
    for prompt, answer in pairs:
        p = [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (p + a)[: args.seq]
        examples.append((ids, ([-100] * len(p) + a)[: args.seq]))
    per_step, steps, i = args.batch * args.seq, [], 0
    while len(steps) < args.steps:
        ids, labels, pos = [], [], []
        while len(ids) < per_step:
            e_ids, e_lab = examples[i % len(examples)]
            i += 1
            take = min(len(e_ids), per_step - len(ids))
            ids += e_ids[:take]
            labels += [-100] + e_lab[1:take]  # no loss across the document boundary
            pos += list(range(take))
        t = lambda x: torch.tensor(x).view(1, -1) if flatten else torch.tensor(x).view(args.batch, args.seq)  # noqa: E731
        step = {"input_ids": t(ids), "labels": t(labels)}
        if flatten:
            step["position_ids"] = t(pos)
        steps.append(step)
    return steps


def run_torch(args, shape, data, tok, work: Path) -> dict:
    import importlib.util

    import torch
    import transformers

    cuda = torch.cuda.is_available()
    if args.method == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        return {"skipped": "bitsandbytes is not importable: no 4-bit (NF4) base for transformers"}
    flash = cuda and importlib.util.find_spec("flash_attn") is not None
    attn = "flash_attention_2" if flash else "sdpa"
    tokenizer = transformers.AutoTokenizer.from_pretrained(tok)
    from jaxtune.data.templates import TEMPLATES

    steps = torch_steps(
        args, alpaca_pairs(json.loads(data.read_text()), TEMPLATES["alpaca"]), tokenizer, flash
    )

    torch.manual_seed(0)
    dtype = torch.bfloat16 if cuda else torch.float32
    config = transformers.LlamaConfig(**shape, max_position_embeddings=args.seq)
    kw = {"attn_implementation": attn}
    if args.method == "qlora":
        kw["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip
    with torch.device("cuda" if cuda else "cpu"):
        model = transformers.LlamaForCausalLM._from_config(
            config, torch_dtype=torch.float32 if args.method == "full" else dtype, **kw)  # fmt: skip
    if args.method != "full":
        import peft

        lora = peft.LoraConfig(r=16, lora_alpha=32, target_modules=list(ALL_LINEAR), task_type="CAUSAL_LM")
        model = peft.get_peft_model(model, lora)

    class Steps(torch.utils.data.Dataset):
        def __len__(self):
            return len(steps)

        def __getitem__(self, i):
            return steps[i]

    times = []

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            times.append([time.perf_counter()])

        def on_step_end(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            times[-1].append(time.perf_counter())

    # transformers 5 renames gradient_checkpointing
    fields = transformers.TrainingArguments.__dataclass_fields__
    ckpt = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    targs = transformers.TrainingArguments(
        output_dir=str(work / "torch_run"), per_device_train_batch_size=1, max_steps=args.steps,
        learning_rate=LR[args.method], warmup_steps=0, lr_scheduler_type="cosine", weight_decay=0.0,
        max_grad_norm=1.0, bf16=cuda, logging_steps=1, save_strategy="no", report_to=[], use_cpu=not cuda,
        **{ckpt: args.remat != "none", f"{ckpt}_kwargs": {"use_reentrant": False}},
        dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True)  # fmt: skip
    trainer = transformers.Trainer(model=model, args=targs, train_dataset=Steps(),
                                   data_collator=lambda items: items[0], callbacks=[Clock()])  # fmt: skip
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    durations = [b - a for a, b in times]
    steady = durations[args.skip :] or durations[-1:]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "tokens_per_s": args.batch * args.seq * len(steady) / sum(steady),
        "compile_s": durations[0],  # eager: the first step (allocator, kernels' autotuning)
        "peak_device_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "loss": losses[-1] if losses else None,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "attention": attn,
        "tokens_per_step": args.batch * args.seq,
    }


# ---------------------------------------------------------------- driver


def one_side(args) -> dict:
    shape = PRESETS[args.preset][0]
    work = Path(args.workdir)
    data, tok = work / "alpaca_bench.json", work / "tokenizer"
    line = {"side": args.side, "preset": args.preset, "method": args.method, "seq": args.seq, "batch": args.batch,
            "steps": args.steps, "tokens_per_step": args.batch * args.seq, "tokens_per_s": None, "mfu": None,
            "compile_s": None, "peak_device_mem_gb": None, "loss": None, "device": None, "attention": None,
            "skipped": None}  # fmt: skip
    line.update((run_jaxtune if args.side == "jaxtune" else run_torch)(args, shape, data, tok, work))
    peak = peak_tflops(line["device"] or "")
    if peak and line["tokens_per_s"]:
        method = "full" if args.method == "full" else "lora"
        line["mfu"] = line["tokens_per_s"] * flops_per_token(shape, args.seq, method) / (peak * 1e12)
    line["host_rss_gb"] = host_peak_gb()
    return {k: line.get(k) for k in KEYS}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--method", choices=("full", "lora", "qlora"), default=None, help="default: the preset's")
    p.add_argument("--side", choices=("jaxtune", "torch", "both"), default="both")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--skip", type=int, default=2, help="first steps left out of tokens/s (compilation)")
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--remat", choices=("none", "full", "dots", "offload"), default=None)
    p.add_argument("--timeout", type=float, default=None, help="seconds per side (subprocess)")
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)  # set for the per-side subprocesses
    args = p.parse_args(argv)
    shape, method, seq, batch, remat = PRESETS[args.preset]
    args.method, args.seq = args.method or method, args.seq or seq
    args.batch, args.remat = args.batch or batch, args.remat or remat
    args.skip = min(args.skip, args.steps - 1)
    if args.workdir:  # one side, in this process
        out = [one_side(args)]
        print(json.dumps(out[0]), flush=True)
        return out
    lines = []
    with tempfile.TemporaryDirectory(prefix="train_bench_") as tmp:
        work = Path(tmp)
        data = make_dataset(work, args.steps * args.batch * args.seq * 2)
        make_tokenizer(work, data, min(shape["vocab_size"], 4096))
        for side in ("jaxtune", "torch") if args.side == "both" else (args.side,):
            cmd = [sys.executable, __file__, "--preset", args.preset, "--method", args.method, "--side", side,
                   "--steps", str(args.steps), "--skip", str(args.skip), "--seq", str(args.seq),
                   "--batch", str(args.batch), "--remat", args.remat, "--workdir", tmp]  # fmt: skip
            try:
                proc = subprocess.run(
                    cmd, capture_output=True, text=True, timeout=args.timeout, env=os.environ
                )
                found = [ln for ln in proc.stdout.splitlines() if ln.startswith('{"side"')]
                reason = None if found else f"exit {proc.returncode}: {proc.stderr.strip()[-400:]}"
            except subprocess.TimeoutExpired:
                found, reason = [], f"timed out after {args.timeout:.0f} s"
            line = json.loads(found[-1]) if found else {k: None for k in KEYS} | {
                "side": side, "preset": args.preset, "method": args.method, "seq": args.seq, "batch": args.batch,
                "steps": args.steps, "tokens_per_step": args.batch * args.seq, "skipped": reason}  # fmt: skip
            print(json.dumps(line), flush=True)
            lines.append(line)
    return lines


if __name__ == "__main__":
    main()
