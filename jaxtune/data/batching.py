"""Examples -> typed batches: bucketed dynamic padding, packing, truncation, and the preference/KTO/prompt forms.

- Padding rounds the batch length up to a multiple of `bucket_multiple`, so a run sees few distinct shapes
  (few jit recompilations).
- Packing puts several examples in one row with best-fit-decreasing bin packing; each keeps its own
  `segment_ids` value, positions restart at 0 and targets never cross into the next document.
- Truncation cuts the prompt first (its oldest tokens, keeping a leading BOS) and the response only when it
  alone would not fit beside a quarter of the budget of prompt.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np

from jaxtune.data.batch import KTOBatch, PreferenceBatch, PromptBatch, TokenBatch
from jaxtune.data.tokenize import Example
from jaxtune.errors import RunError


def bucket_len(n: int, multiple: int, cap: int | None = None) -> int:
    """`n` rounded up to a multiple of `multiple`, but never past `cap` (cutoff_len) when `n` fits in it."""
    multiple = max(1, int(multiple or 1))
    t = max(multiple, -(-n // multiple) * multiple)
    return min(t, cap) if cap is not None and n <= cap else t


def truncate(
    ex: Example, cutoff_len: int, bos_id: int | None = None, response_len: int | None = None
) -> Example:
    """Fit `ex` into `cutoff_len` tokens. `response_len` (preference pairs) shares one prompt budget."""
    p = ex.prompt_len
    r = len(ex) - p if response_len is None else max(response_len, len(ex) - p)
    if p + r <= cutoff_len:
        return ex
    keep_bos = p > 0 and bos_id is not None and int(ex.ids[0]) == bos_id
    # The response keeps what is left after a minimum prompt (a quarter of the budget, or all of a short one).
    prompt_keep = max(cutoff_len - r, min(p, cutoff_len // 4))
    prompt_keep = min(p, prompt_keep)
    resp_keep = min(len(ex) - p, cutoff_len - prompt_keep)
    head = 1 if keep_bos and prompt_keep > 0 else 0
    idx = np.concatenate([np.arange(head), np.arange(p - prompt_keep + head, p + resp_keep)]).astype(np.int64)
    return Example(ex.ids[idx], ex.weights[idx], prompt_keep)


def chunk(ex: Example, cutoff_len: int) -> list[Example]:
    """Pre-training documents longer than a row become several rows rather than being cut."""
    return [
        Example(ex.ids[i : i + cutoff_len], ex.weights[i : i + cutoff_len], 0)
        for i in range(0, len(ex), cutoff_len)
    ]


def pack(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """Best-fit decreasing: rows of example indices whose lengths sum to at most `seq_len`."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    free: list[tuple[int, int]] = []  # (remaining space, row) sorted, to find the tightest row by bisect
    rows: list[list[int]] = []
    for i in order:
        n = lengths[i]
        if n > seq_len:
            raise RunError(
                f"example of {n} tokens does not fit in a packed row of {seq_len}; truncate first"
            )
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, row = free.pop(k)
        else:
            space, row = seq_len, len(rows)
            rows.append([])
        rows[row].append(i)
        if space - n > 0:
            bisect.insort(free, (space - n, row))
    return rows


def token_batch(rows: Sequence[Sequence[Example]], seq_len: int, pad_side: str = "right") -> TokenBatch:
    """Each row is a list of examples packed left to right; `pad_side="left"` right-aligns (for generation)."""
    if pad_side not in ("right", "left"):
        raise RunError(f"pad_side must be 'right' or 'left', got {pad_side!r}")
    b = len(rows)
    input_ids = np.zeros((b, seq_len), np.int32)
    targets = np.zeros((b, seq_len), np.int32)
    loss_mask = np.zeros((b, seq_len), np.float32)
    segment_ids = np.zeros((b, seq_len), np.int32)
    positions = np.zeros((b, seq_len), np.int32)
    for r, row in enumerate(rows):
        used = sum(len(ex) for ex in row)
        if used > seq_len:
            raise ValueError(f"row {r} holds {used} tokens, more than seq_len={seq_len}")
        t = seq_len - used if pad_side == "left" else 0
        for s, ex in enumerate((ex for ex in row if len(ex)), start=1):
            n = len(ex)
            input_ids[r, t : t + n] = ex.ids
            # Shift inside the segment: the last token of a document has no target.
            targets[r, t : t + n - 1] = ex.ids[1:]
            loss_mask[r, t : t + n - 1] = ex.weights[1:]
            segment_ids[r, t : t + n] = s
            positions[r, t : t + n] = np.arange(n)
            t += n
    return TokenBatch(input_ids, targets, loss_mask, segment_ids, positions)


def pad_batch(examples: Sequence[Example], bucket_multiple: int = 64, pad_side: str = "right", cap=None):
    """One example per row, padded to a bucketed length at most `cap` (cutoff_len)."""
    longest = max((len(ex) for ex in examples), default=1)
    return token_batch([[ex] for ex in examples], bucket_len(longest, bucket_multiple, cap), pad_side)


def preference_batch(pairs: Sequence[tuple[Example, Example]], bucket_multiple: int = 64, cap=None):
    longest = max((max(len(c), len(r)) for c, r in pairs), default=1)
    t = bucket_len(longest, bucket_multiple, cap)
    return PreferenceBatch(token_batch([[c] for c, _ in pairs], t), token_batch([[r] for _, r in pairs], t))


def kto_batch(examples: Sequence[tuple[Example, bool]], bucket_multiple: int = 64, cap=None) -> KTOBatch:
    """Padded wide enough for KTO's KL rows too (`methods/kto.mismatched`: a row's prompt, everything before its
    first trained token, followed by another row's completion): the longest prompt plus the longest completion,
    up to `cap`, so no bucketing ever cuts them."""
    exs = [ex for ex, _ in examples]
    trained = [(ex.weights[1:] > 0, len(ex)) for ex in exs]  # token 0 is never a target
    prompts = [(int(np.argmax(t)) + 1, n) for t, n in trained if t.any()]
    kl_len = max((p for p, _ in prompts), default=0) + max((n - p for p, n in prompts), default=0)
    if cap is not None:
        kl_len = min(kl_len, cap)  # longer KL rows are cut at cutoff_len (TRL cuts them at max_length)
    longest = max([len(ex) for ex in exs] + [kl_len, 1])
    batch = token_batch([[ex] for ex in exs], bucket_len(longest, bucket_multiple, cap))
    return KTOBatch(batch, np.asarray([bool(lab) for _, lab in examples], bool))


def prompt_batch(prompts: Sequence[tuple[np.ndarray, str | None]], bucket_multiple: int = 64, cap=None):
    """Left-padded prompts (generation appends on the right) and their reference answers."""
    exs = [Example(ids, np.zeros(len(ids), np.float32), len(ids)) for ids, _ in prompts]
    batch = pad_batch(exs, bucket_multiple, pad_side="left", cap=cap)
    return PromptBatch(batch, tuple(answer for _, answer in prompts))


def efficiency(batch: TokenBatch) -> float:
    """Non-pad tokens / all tokens."""
    return float((batch.segment_ids > 0).mean())


EMPTY = Example(np.zeros(0, np.int32), np.zeros(0, np.float32), 0)
KINDS = ("lm", "pair", "kto", "prompt")  # batch kinds; the data kinds text and lm both make "lm" batches


def item_len(kind: str, item) -> int:
    if kind == "lm":
        return len(item)
    if kind == "pair":
        return max(len(item[0]), len(item[1]))
    return len(item[0])


def collate(kind: str, rows, batch_size: int, seq_len: int, packed: bool = False, bucket_multiple: int = 64):
    """Rows of items -> the stage's batch type, [B, seq_len] when packed, else bucketed up to seq_len.

    Missing rows (the last eval batch) are all padding.
    """
    rows = list(rows) + [[]] * (batch_size - len(rows))
    first = lambda row, empty: row[0] if row else empty
    if kind == "lm":
        if packed:  # one fixed shape for the whole run
            return token_batch(rows, seq_len)
        return pad_batch([first(r, EMPTY) for r in rows], bucket_multiple, cap=seq_len)
    if kind == "pair":
        return preference_batch([first(r, (EMPTY, EMPTY)) for r in rows], bucket_multiple, cap=seq_len)
    if kind == "kto":
        return kto_batch([first(r, (EMPTY, False)) for r in rows], bucket_multiple, cap=seq_len)
    if kind == "prompt":
        return prompt_batch([first(r, (EMPTY.ids, None)) for r in rows], bucket_multiple, cap=seq_len)
    raise RunError(f"unknown batch kind {kind!r} (one of {KINDS})")
