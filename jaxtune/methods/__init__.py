"""Training objectives. Each method is one module exposing `Batch`, `loss_fn`, `denominator`, `finalize` and
`needs_reference`; this dict maps config stage names to them. No trainer subclasses, no hooks."""

from jaxtune.methods import sft

METHODS = {"pt": sft, "sft": sft}
