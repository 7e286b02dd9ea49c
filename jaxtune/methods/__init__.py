"""Training objectives. Each method is one module exposing `Batch`, `loss_fn`, `denominator`, `finalize` and
`needs_reference`; this dict maps config stage names to them. No trainer subclasses, no hooks.

Optional: `prepare(cfg, lm, plan, tokenizer, train_it, eval_it) -> (trainable, frozen, lr_multipliers, train_it,
eval_it)` runs once before the step is built (rm adds its score head, dpo/kto their reference), and
`export(model, plan, trainable, run_dir)` replaces the default export (rm writes a sequence classifier)."""

from jaxtune.methods import dpo, grpo, kto, ppo, rm, sft

METHODS = {"pt": sft, "sft": sft, "rm": rm, "dpo": dpo, "kto": kto, "ppo": ppo, "grpo": grpo}
