"""Preparing a tokenised dataset: first preparation, a cached start, and resident memory (issue 14).

    python bench/data_prepare.py                    # 100,000 synthetic Alpaca rows, 2 workers
    python bench/data_prepare.py --rows 1000000     # the 1M-row memory check (peak RSS < 4 GB)
    python bench/data_prepare.py --tiny             # 300 rows, 1,000-token vocabulary: a quick smoke run

Generates N deterministic Alpaca rows of varied lengths, trains a byte-level BPE tokenizer here with
`tokenizers` (16k vocabulary by default; not timed into the figures) wrapped as a `transformers` fast tokenizer
with a ChatML chat template, then runs, each in a fresh process:
- `prepare`: `pipeline.iterators` with `num_workers` workers on an empty cache directory (load, clean,
  template, tokenise, write the memory-mapped arrays);
- `start`: the same call on the warm cache, with the encoder patched to fail (it proves nothing is tokenised),
  then one pass over every item to touch every page: the RSS it adds is compared with the token arrays' size;
- `datasets`: the reference, `datasets.Dataset.map(num_proc=workers)` doing the same tokenisation through
  `tokenizer.apply_chat_template` (skipped, and said so, when `datasets` is not installed).
Peak RSS: the main process's high-water mark (VmHWM; getrusage's ru_maxrss is printed too, but Linux carries it
over fork + exec from the bench parent), and the process tree's (main plus workers), sampled every 0.2 s.
Prints one JSON line.
Targets (not asserted): preparation <= 40 s on 2 cores with 2 workers, cached start <= 3 s, the mapped set's
resident memory <= its token arrays + 10%, 1M rows within 4 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there one all we their has been would when who will more if no out so said what up its "
    "about into than them can only other new some could time these two may then do first any my now such like "
    "our over man me even most made after also did many before must through back years where much your way well "
    "down should because each just those people how too little state good very make world still own see men work "
    "long get here between both life being under never day same another know while last might us great old year "
    "off come since against go came right used take three explain describe write list poem story recipe summary "
    "function python code error data model train answer question river mountain city history science energy"
).split()


def rows(n: int, seed: int = 0) -> list[dict]:
    import numpy as np

    rng = np.random.default_rng(seed)
    words = np.asarray(WORDS)

    def text(k):
        return " ".join(words[rng.integers(0, len(words), k)])

    out = []
    for _ in range(n):
        ins = text(int(rng.integers(4, 40))).capitalize() + "?"
        inp = text(int(rng.integers(5, 30))) if rng.random() < 0.4 else ""
        k = int(rng.lognormal(4.3, 0.7))  # outputs of ~10 to ~1,000 words, median ~75
        out.append({"instruction": ins, "input": inp, "output": text(max(1, min(k, 1200))) + "."})
    return out


def build_tokenizer(data: list[dict], vocab: int, out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((r[k] for r in data[:20000] for k in ("instruction", "input", "output")), trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf.chat_template = CHATML
    hf.save_pretrained(out)


# ---- memory ------------------------------------------------------------------------------------------------
def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _tree(pid: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(p))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


class Peak:
    """Samples the RSS of this process and of its whole tree (the workers) every 0.2 s."""

    def __init__(self):
        self.main = self.tree = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.main = max(self.main, _rss(os.getpid()))
            self.tree = max(self.tree, sum(_rss(p) for p in _tree(os.getpid())))
            self._stop.wait(0.2)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        import resource

        # VmHWM, this process's own high-water mark: Linux carries ru_maxrss over fork + exec, so getrusage
        # reports the bench parent's peak (it held the generated rows) in every child.
        with open("/proc/self/status") as f:
            hwm = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM:"))
        return {
            "peak_rss_main_mb": round(max(self.main, hwm) / 2**20),
            "peak_rss_tree_mb": round(max(self.tree, hwm) / 2**20),
            "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        }


# ---- children ----------------------------------------------------------------------------------------------
def child(args) -> dict:
    peak = Peak()
    t_start = time.perf_counter()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.dir / "tok")
    if args.child == "datasets":
        return {**reference(args, tok), **peak.stop()}
    from jaxtune.data import items, pipeline

    if args.child == "start":

        def boom(*a, **k):
            raise AssertionError("the cached start tokenised")

        items.Encoder._items = boom
    t0 = time.perf_counter()
    train, _ = pipeline.iterators(
        str(args.dir / "alpaca.json"), tok, 8, "lm", cutoff_len=1024, num_workers=args.workers,
        cache_dir=str(args.dir / "cache"),
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    out = {"seconds": round(seconds, 2), "process_seconds": round(time.perf_counter() - t_start, 2)}
    info = train.cache
    out.update(hit=info.hit, items=sum(info.items.values()), tokens=sum(info.tokens.values()),
               bytes_on_disk=info.bytes)  # fmt: skip
    if args.child == "start":
        before = _rss(os.getpid())
        total = 0
        for ds in train.order.datasets:
            for i in range(len(ds)):
                ex = ds[i]
                total += int(ex.ids[-1]) + int(ex.weights[-1] > 0)  # reads every page of ids and weights
        out["mapped_rss_mb"] = round((_rss(os.getpid()) - before) / 2**20, 1)
        out["token_arrays_mb"] = round(info.bytes / 2**20, 1)
        next(train)
    return {**out, **peak.stop()}


def reference(args, tok) -> dict:
    try:
        import datasets
    except ImportError:
        return {"skipped": "the datasets package is not installed"}
    data = json.loads((args.dir / "alpaca.json").read_text())
    t0 = time.perf_counter()
    ds = datasets.Dataset.from_list(data)

    def encode(row):
        user = row["instruction"] + ("\n" + row["input"] if row["input"] else "")
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
        out = tok.apply_chat_template(msgs, tokenize=True, return_dict=True)
        return {"input_ids": out["input_ids"][:1024]}

    ds = ds.map(encode, num_proc=args.workers, remove_columns=ds.column_names, load_from_cache_file=False)
    seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 2), "tokens": int(sum(len(x) for x in ds["input_ids"]))}


def run_child(args, name: str) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--dir", str(args.dir), "--workers", str(args.workers)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=16_000)
    p.add_argument("--tiny", action="store_true", help="300 rows, 1,000-token vocabulary")
    p.add_argument("--no-reference", action="store_true", help="skip the datasets.map reference")
    p.add_argument("--child", choices=["prepare", "start", "datasets"], help=argparse.SUPPRESS)
    p.add_argument("--dir", type=Path, help="work directory (default: a temporary one)")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    if args.tiny:
        args.rows, args.vocab = 300, 1000
    with tempfile.TemporaryDirectory(prefix="jaxtune-bench-data-") as tmp:
        args.dir = args.dir or Path(tmp)
        args.dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        data = rows(args.rows)
        (args.dir / "alpaca.json").write_text(json.dumps(data))
        gen_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        build_tokenizer(data, args.vocab, args.dir / "tok")
        tok_s = time.perf_counter() - t0
        del data
        first = run_child(args, "prepare")
        start = run_child(args, "start")
        ref = {"skipped": "--no-reference"} if args.no_reference else run_child(args, "datasets")
    print(json.dumps({
        "bench": "data_prepare", "rows": args.rows, "vocab": args.vocab, "workers": args.workers,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "generate_seconds": round(gen_s, 1), "tokenizer_train_seconds": round(tok_s, 1),
        "first_preparation": first, "cached_start": start, "second_start_tokenised": not start["hit"],
        "datasets_map_reference": ref,
        "targets": {"first_preparation_s": 40, "cached_start_s": 3, "mapped_rss": "<= token arrays + 10%",
                    "peak_rss_1M_mb": 4096},
    }))  # fmt: skip


if __name__ == "__main__":
    main()
