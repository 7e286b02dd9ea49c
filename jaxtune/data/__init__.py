"""Data pipeline: load any common dataset format, template, mask, pack and batch it resumably.

Public API (see `../shared/DESIGN.md`):
    records = jaxtune.data.load(source, dataset_dir=None, format=None)
    ids, labels = jaxtune.data.encode(record, tokenizer, template=None)
    train_it, eval_it = jaxtune.data.pipeline.build(data_cfg, tokenizer, batch_size, kind)  # items.DATA_KINDS
    jaxtune.data.inspect.run(data_cfg, tokenizer, kind)
    jaxtune.data.prepare_cmd.prepare(data_cfg, tokenizer, kind)  # build the tokenised cache (data/cache.py) ahead
"""

from jaxtune.data import inspect, pipeline
from jaxtune.data.batch import KTOBatch, PreferenceBatch, PromptBatch, TokenBatch
from jaxtune.data.errors import DataError
from jaxtune.data.loading import load
from jaxtune.data.records import Conversation, Message, Preference, Text
from jaxtune.data.templates import TEMPLATES
from jaxtune.data.tokenize import encode

__all__ = [
    "TEMPLATES",
    "Conversation",
    "DataError",
    "KTOBatch",
    "Message",
    "Preference",
    "PreferenceBatch",
    "PromptBatch",
    "Text",
    "TokenBatch",
    "encode",
    "inspect",
    "load",
    "pipeline",
]
