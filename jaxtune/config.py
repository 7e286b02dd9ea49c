"""Run configuration: frozen dataclasses (the only home of defaults), YAML files and dotted overrides.

A YAML file holds only the differences from these defaults, one mapping per section::

    stage: sft
    model: {path: /ckpt/llama-3.2-1b, dtype: bfloat16}
    training: {learning_rate: 2.0e-4, batch_size: 16}

and any field can be overridden on the command line as ``section.field=value`` (``training.learning_rate=1e-4``,
``data.train=[a.json,b.json]``). Values are read with YAML 1.2 rules and checked against the annotations below
by `jaxtune.typed_yaml`; unknown keys, wrong types, invalid choices and the ``__post_init__`` checks raise
`ConfigError`, one paragraph naming the dotted field, the file and line (or the override) and, for typos, the
closest valid key. Importing this module never imports jax.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

from jaxtune import config_rules, typed_yaml
from jaxtune.config_rules import config_error
from jaxtune.typed_yaml import ConfigError, check, fraction, non_negative, positive, regexes

__all__ = [
    "ConfigError", "RunConfig", "ModelConfig", "DataConfig", "DataSource", "MethodConfig", "TrainingConfig",
    "ParallelConfig", "LoggingConfig", "DPOConfig", "RMConfig", "PPOConfig", "GRPOConfig", "GenerationConfig",
    "load_config", "to_dict", "dump_yaml", "config_error",
]  # fmt: skip

Stage = Literal["pt", "sft", "rm", "dpo", "kto", "ppo", "grpo"]
MethodName = Literal[
    "full", "lora", "qlora", "dora", "adapter", "ia3", "prompt", "ptuning", "prefix", "ptuning_v2", "bitfit", "freeze"
]  # fmt: skip
Dtype = Literal["float32", "bfloat16", "float16"]


# ----------------------------------------------------------------------------------------------- sections


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The base model: a local Hugging Face directory, or a random init from HF-config-style keys."""

    path: str | None = None  # local HF directory (config.json + safetensors)
    random_init: dict[str, Any] | None = None  # HF config keys: {model_type: llama, hidden_size: 64, ...}
    tokenizer: str | None = None  # None: same directory as `path`
    dtype: Dtype = "float32"  # compute dtype
    param_dtype: Dtype = "float32"  # storage dtype of the parameters
    # auto: splash on TPU, pallas_gpu on GPU, xla elsewhere (jaxtune/models/attention.py); xla is the reference
    attention_impl: Literal["auto", "xla", "cudnn", "splash", "pallas_gpu"] = "auto"
    # splash block sizes (tokens; multiples of 128, clipped to the sequence): forward q / kv, backward q / kv
    attention_block_q: int = 512
    attention_block_kv: int = 512
    attention_block_q_bwd: int = 512
    attention_block_kv_bwd: int = 512
    remat: Literal["none", "full", "dots", "offload"] = "none"  # activation checkpointing policy per layer
    scan_layers: bool = True  # nn.scan over layers: compile time independent of depth
    rope_scaling: dict[str, Any] | None = None  # None: the checkpoint's own; else overrides HF `rope_scaling`
    quantization: Literal["none", "nf4", "int8"] = "none"  # of the frozen base weights
    double_quant: bool = False  # quantise the NF4 block scales too
    quant_block_size: int = 64
    # mixture of experts (Mixtral, Qwen2/3-MoE): weight of the load-balancing loss (None: the checkpoint's
    # router_aux_loss_coef, as transformers trains with output_router_logits) and of the router z-loss
    moe_aux_loss_coef: float | None = None
    moe_z_loss_coef: float = 0.0

    def __post_init__(self):
        check(
            self.path is None or self.random_init is None,
            "path",
            "excludes model.random_init; give one of them",
        )
        positive(self, "quant_block_size")
        for name in ("attention_block_q", "attention_block_kv", "attention_block_q_bwd", "attention_block_kv_bwd"):
            value = getattr(self, name)
            check(value > 0 and value % 128 == 0, name, "must be a positive multiple of 128 (TPU lanes)", value)


@dataclasses.dataclass(frozen=True)
class DataSource:
    """One dataset in a mixture; a bare string in `data.train` means a path or a dataset_info.json name."""

    path: str | None = None  # a file, or a directory (every data file under it)
    name: str | None = None  # entry of `data.dataset_dir`/dataset_info.json
    format: str | None = None  # None: auto-detect (alpaca, sharegpt, openai, text, preference, ...)
    ratio: float | None = None  # mixture weight; None: natural size
    columns: dict[str, str] = dataclasses.field(default_factory=dict)  # record field -> column name
    tags: dict[str, str] = dataclasses.field(default_factory=dict)  # e.g. {role_tag: from, user_tag: human}
    ranking: bool | None = None  # alpaca / sharegpt rows hold chosen/rejected pairs; None: as dataset_info says
    split: str = "train"
    max_samples: int | None = None

    def __post_init__(self):
        check((self.path is None) != (self.name is None), "path", "or name: give exactly one of them")
        positive(self, "ratio", "max_samples")


Sources = tuple[str | DataSource, ...]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Datasets, prompt template, tokenisation and batching."""

    train: Sources = ()  # each a path, a dataset name, or a DataSource mapping
    eval: Sources = ()
    dataset_dir: str | None = None  # directory holding dataset_info.json and the files it names
    format: str | None = None  # default format for sources that give none; None: auto-detect
    template: str | None = None  # chat template name or Jinja text; None: the tokenizer's own
    template_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. {enable_thinking: false}
    # Turns a Jinja template writes differently in history than as the last turn (Qwen3/QwQ drop earlier
    # reasoning): split = one example per such turn, trained as the template renders it last; final = not
    # trained; as_rendered = trained as written in the whole conversation. See jaxtune/data/jinja.py.
    rewritten_history: Literal["split", "final", "as_rendered"] = "split"
    cutoff_len: int = 1024  # tokens per sequence (longer examples are truncated)
    overlength: Literal["truncate", "drop"] = "truncate"  # longer than cutoff_len: cut (text: split), or drop
    packing: bool = False  # several documents per row, separated by segment ids
    train_on_prompt: bool = False  # also compute the loss on prompt tokens
    mask_history: bool = False  # loss on the last assistant turn only
    val_size: float = 0.0  # < 1: fraction of train held out for eval; >= 1: number of examples
    shuffle: bool = True
    dedup: Literal["none", "exact", "near"] = "none"
    streaming: bool = False  # read lazily instead of loading the whole set
    on_error: Literal["raise", "skip"] = "raise"  # a malformed row: stop, or skip it with a warning
    min_length: int = 1  # drop examples with fewer tokens
    bucket_multiple: int = 64  # pad lengths up to a multiple of this (fewer compiled shapes)
    max_samples: int | None = None  # per source, after shuffling
    # Tokenised-dataset cache (in-memory mode only; streaming never caches): the items are written once as
    # memory-mapped arrays under cache_dir, keyed by everything they depend on, and mapped by later runs,
    # resumes and hosts (jaxtune/data/cache.py); `jaxtune data prepare CONFIG` builds it ahead of time.
    cache: bool = True
    cache_dir: str | None = None  # None: $JAXTUNE_DATA_CACHE if set, else ~/.cache/jaxtune/data
    num_workers: int = 1  # tokenisation processes (spawned); the items are identical for any count

    def __post_init__(self):
        positive(self, "cutoff_len", "bucket_multiple", "max_samples", "num_workers")
        non_negative(self, "val_size", "min_length")


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """The trainable part: which PEFT method (or full / partial fine-tuning) and its hyper-parameters."""

    name: MethodName = "lora"
    combine: tuple[MethodName, ...] = ()  # extra methods trained together, e.g. [prefix] with lora
    # LoRA family (lora, qlora, dora)
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] = ("q_proj", "v_proj")  # PEFT semantics; "all-linear" allowed
    # PEFT `target_parameters`: parameters adapted directly, e.g. MoE experts [mlp.experts.gate_up_proj,
    # mlp.experts.down_proj] (also reachable through target_modules: experts.gate_up_proj, or all-linear)
    target_parameters: tuple[str, ...] = ()
    rslora: bool = False  # scale alpha / sqrt(rank) instead of alpha / rank
    dora: bool = False  # weight-decomposed LoRA
    pissa: bool = False  # init from the principal singular vectors
    loraplus_lr_ratio: float | None = None  # LoRA+: lr of B = ratio * lr of A
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)  # module regex -> rank
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)  # module regex -> alpha
    # bottleneck adapters
    adapter_size: int = 64
    adapter_type: Literal["houlsby", "pfeiffer"] = "houlsby"
    adapter_activation: str = "relu"
    # prompt, P-tuning, prefix
    num_virtual_tokens: int = 20
    prompt_init_text: str | None = None  # None: random init
    ptuning_encoder: Literal["mlp", "lstm"] = "mlp"
    prefix_projection: bool = False  # reparametrise prefixes through an MLP
    encoder_hidden_size: int | None = None  # None: the model's hidden size
    # freeze-tuning and explicit selection (regexes searched in '/'-joined parameter paths)
    freeze_trainable_layers: int = 2  # last N layers trainable; negative: first N
    freeze_trainable_modules: tuple[str, ...] = ("all",)  # module names inside those layers
    trainable_patterns: tuple[str, ...] = ()
    frozen_patterns: tuple[str, ...] = ()

    def __post_init__(self):
        check(self.name not in self.combine, "combine", f"repeats method.name '{self.name}'")
        check(len(set(self.combine)) == len(self.combine), "combine", "lists a method twice")
        redundant = sorted({"lora", "dora", "ia3"} & {self.name, *self.combine})
        detail = (f"puts {'/'.join(redundant)} beside full fine-tuning, which already trains every weight they "
                  "would adapt: use one of them, not both")  # fmt: skip
        check("full" not in (self.name, *self.combine) or not redundant, "combine", detail)
        positive(self, "rank", "alpha", "adapter_size", "num_virtual_tokens", "loraplus_lr_ratio")
        positive(self, "encoder_hidden_size")
        fraction(self, "dropout", closed=False)
        check(self.freeze_trainable_layers != 0, "freeze_trainable_layers", "must not be 0 (use > 0 or < 0)")
        check(
            len(self.target_modules) > 0 or len(self.target_parameters) > 0,
            "target_modules",
            "must name at least one module (or set target_parameters)",
        )
        regexes(self, "trainable_patterns", "frozen_patterns", "rank_pattern", "alpha_pattern")


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """Optimiser, schedule, batch, evaluation, checkpointing and loss options shared by every stage."""

    optimizer: Literal["adamw", "adafactor", "lion", "sgd"] = "adamw"
    learning_rate: float = 1e-4  # peak
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0  # global-norm clipping; 0 disables
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # fraction of total steps; used when warmup_steps is 0
    min_lr_ratio: float = 0.0  # final lr = min_lr_ratio * learning_rate
    num_epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides num_epochs
    batch_size: int = 8  # global sequences per optimizer step
    micro_batch_size: int | None = None  # None: no accumulation; else batch_size / micro_batch_size steps
    eval_batch_size: int | None = None  # None: batch_size
    eval_every: int = 0  # steps; 0: at the end only
    eval_steps: int | None = None  # batches per evaluation; None: the full eval set
    eval_generate: int = 0  # eval samples answered by greedy generation, scored by exact match (before/after)
    save_every: int = 500  # steps; 0: at the end only
    keep_last: int = 2  # checkpoints kept besides the best
    keep_best: bool = True
    best_metric: str = "eval_loss"
    best_mode: Literal["min", "max"] = "min"
    early_stopping_patience: int | None = None  # evaluations without improvement; None: never stop early
    z_loss: float = 0.0  # coefficient of log(Z)^2 (PaLM)
    label_smoothing: float = 0.0
    neftune_alpha: float | None = None  # NEFTune embedding noise; None: off
    nan_policy: Literal["stop", "skip"] = "stop"  # non-finite loss: stop (naming the last good checkpoint), or skip the update
    loss_chunk_size: int | None = None  # vocab chunk for log-probs; None: auto
    resume: Literal["auto", "never", "must"] = "auto"  # latest checkpoint in output_dir; never: refuse one
    async_checkpointing: bool = True
    prefetch: int = 2  # batches a producer thread keeps placed on the mesh ahead of the step; 0: synchronous
    export_hf: bool = True  # write a Hugging Face directory (or PEFT adapter) at the end
    no_decay_patterns: tuple[str, ...] = (r"bias$", "norm")  # regexes over parameter paths
    lr_multipliers: dict[str, float] = dataclasses.field(default_factory=dict)  # path regex -> lr multiplier

    def __post_init__(self):
        positive(self, "learning_rate", "adam_eps", "num_epochs", "batch_size", "micro_batch_size")
        positive(self, "eval_batch_size", "eval_steps", "keep_last", "early_stopping_patience")
        positive(self, "neftune_alpha", "loss_chunk_size")
        non_negative(self, "weight_decay", "max_grad_norm", "warmup_steps", "eval_every", "save_every")
        non_negative(self, "eval_generate", "prefetch")
        non_negative(self, "z_loss")
        regexes(self, "no_decay_patterns", "lr_multipliers")
        fraction(self, "warmup_ratio", "min_lr_ratio")
        fraction(self, "adam_beta1", "adam_beta2", "label_smoothing", closed=False)
        steps, mbs = self.max_steps, self.micro_batch_size
        check(steps == -1 or steps > 0, "max_steps", "must be -1 (use num_epochs) or > 0", steps)
        both = self.warmup_steps and self.warmup_ratio
        check(not both, "warmup_steps", "and training.warmup_ratio are both set; keep one")
        ok = mbs is None or self.batch_size % mbs == 0
        check(ok, "micro_batch_size", f"must divide batch_size={self.batch_size} (no remainder)", mbs)

    @property
    def accumulation_steps(self) -> int:
        return self.batch_size // (self.micro_batch_size or self.batch_size)


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """Device mesh sizes (ICI within a slice, DCN across slices/hosts) and multi-host setup."""

    data: int = -1  # -1: all devices left over by the other axes
    fsdp: int = 1
    tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1
    distributed: Literal["auto", "on", "off"] = "auto"  # jax.distributed.initialize; auto: when multi-host
    coordinator_address: str | None = None  # "host:port"; None: auto-detect (TPU, SLURM, ...)
    num_processes: int | None = None
    process_id: int | None = None

    def __post_init__(self):
        check(self.data == -1 or self.data >= 1, "data", "must be -1 (remaining devices) or >= 1", self.data)
        positive(self, "fsdp", "tensor", "dcn_data", "dcn_fsdp", "dcn_tensor", "num_processes")
        non_negative(self, "process_id")
        manual = (self.coordinator_address, self.num_processes, self.process_id)
        given = sum(v is not None for v in manual)
        detail = (
            "goes with parallel.num_processes and parallel.process_id: give all three or none (auto-detect)"
        )
        check(given in (0, 3), "coordinator_address", detail, manual)
        if given == 3:
            pid = self.process_id
            check(
                pid < self.num_processes, "process_id", f"must be < num_processes={self.num_processes}", pid
            )


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    """Where metrics go: progress bar, metrics.jsonl, TensorBoard, loss-curve plot, all in output_dir."""

    log_every: int = 10  # steps
    progress: bool = True
    jsonl: bool = True
    tensorboard: bool = True
    plot: bool = True

    def __post_init__(self):
        positive(self, "log_every")


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """Preference optimisation (stages dpo and kto): DPO and its variants."""

    beta: float = 0.1
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "simpo", "orpo", "kto"] = "sigmoid"
    label_smoothing: float = 0.0  # conservative DPO / robust DPO noise rate
    simpo_gamma: float = 0.5  # SimPO target reward margin
    orpo_alpha: float = 1.0  # ORPO: weight of the NLL term on chosen
    orpo_beta: float = 0.1  # ORPO: weight (lambda) of the odds-ratio term
    # ORPO's NLL term. "sequence" (TRL's ORPOTrainer): the mean NLL over every predicted token, prompt included,
    # of the micro-batch's chosen rows; "response" (Hong et al. 2024, Eq. 2): each chosen response's mean token
    # NLL, averaged over pairs.
    orpo_nll: Literal["sequence", "response"] = "sequence"
    # IPO's logged rewards/*, margins, accuracy and logps/*. "sum" (TRL's DPOTrainer): β × the summed log-ratios
    # and summed log-probs, as for every DPOTrainer loss; "mean": the per-token means the IPO loss itself uses.
    ipo_rewards: Literal["sum", "mean"] = "sum"
    desirable_weight: float = 1.0  # KTO
    undesirable_weight: float = 1.0  # KTO
    precompute_ref_log_probs: bool = False  # one reference pass before training, then no reference model
    reference: Literal["auto", "adapters_off", "frozen_copy"] = "auto"  # auto: adapters_off under PEFT

    def __post_init__(self):
        positive(self, "beta", "desirable_weight", "undesirable_weight")
        non_negative(self, "simpo_gamma", "orpo_alpha", "orpo_beta")
        check(0 <= self.label_smoothing < 0.5, "label_smoothing", "must be in [0, 0.5)", self.label_smoothing)


@dataclasses.dataclass(frozen=True)
class RMConfig:
    """Reward-model training (Bradley-Terry on chosen/rejected pairs)."""

    margin: float = 0.0  # subtracted inside the sigmoid: -log sigmoid(r_c - r_r - margin)
    center_rewards_coef: float = 0.0  # + coef * (r_c + r_r)^2 keeps rewards centred at 0

    def __post_init__(self):
        non_negative(self, "center_rewards_coef")


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Sampling for chat, evaluation and RL rollouts."""

    max_new_tokens: int = 64
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    stop: tuple[str, ...] = ()  # strings that end a completion, besides the EOS token

    def __post_init__(self):
        positive(self, "max_new_tokens")
        non_negative(self, "temperature", "top_k")
        check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]", self.top_p)


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """PPO with a value head, clipped objective and a KL penalty against the reference policy."""

    rollout_batch_size: int | None = None  # prompts per rollout; None: training.batch_size
    ppo_epochs: int = 4
    mini_batch_size: int | None = None  # None: the whole rollout batch
    clip_range: float = 0.2
    value_clip: float = 0.2
    kl_coef: float = 0.05
    adaptive_kl: bool = False
    target_kl: float = 6.0
    kl_horizon: int = 10000  # adaptive KL controller horizon (Ziegler et al.)
    gamma: float = 1.0
    lam: float = 0.95  # GAE lambda
    whiten_advantages: bool = True
    vf_coef: float = 0.1
    reward_model: str | None = None  # directory of a trained reward model
    reward_fn: str | None = None  # "module:function" or a builtin reward name
    value_model: Literal["lora", "shared"] = "lora"  # own LoRA on the frozen base, or a head on the policy

    def __post_init__(self):
        positive(self, "rollout_batch_size", "ppo_epochs", "mini_batch_size", "clip_range", "target_kl")
        positive(self, "kl_horizon")
        non_negative(self, "value_clip", "kl_coef", "vf_coef")
        fraction(self, "gamma", "lam")
        r, m = self.rollout_batch_size, self.mini_batch_size
        check(
            r is None or m is None or r % m == 0, "mini_batch_size", f"must divide rollout_batch_size={r}", m
        )
        one = self.reward_model is None or self.reward_fn is None
        check(one, "reward_fn", "excludes ppo.reward_model; give one of them")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """Group-relative policy optimisation: several completions per prompt, rewards normalised per group."""

    num_generations: int = 4  # completions per prompt (the group)
    num_iterations: int = 1  # passes over each generated batch (mu in DeepSeekMath Alg. 1)
    mini_batch_size: int | None = None  # completions per optimiser update; None: the whole generated batch
    beta: float = 0.04  # KL coefficient; 0 drops the reference model
    clip_range: float = 0.2
    scale_rewards: bool = True  # divide by the group's reward std (False: Dr. GRPO)
    reward_fns: tuple[str, ...] = ()  # "module:function" or builtin reward names, summed

    def __post_init__(self):
        n = self.num_generations
        check(n >= 2, "num_generations", "must be >= 2 (advantages are relative to the group)", n)
        positive(self, "num_iterations", "clip_range", "mini_batch_size")
        non_negative(self, "beta")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A whole run: the stage, where it writes, and one section per concern."""

    stage: Stage = "sft"
    seed: int = 0
    output_dir: str = "runs/default"
    run_name: str | None = None  # None: the last component of output_dir
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    method: MethodConfig = MethodConfig()
    training: TrainingConfig = TrainingConfig()
    parallel: ParallelConfig = ParallelConfig()
    logging: LoggingConfig = LoggingConfig()
    generation: GenerationConfig = GenerationConfig()
    dpo: DPOConfig = DPOConfig()
    rm: RMConfig = RMConfig()
    ppo: PPOConfig = PPOConfig()
    grpo: GRPOConfig = GRPOConfig()

    ALIASES: ClassVar[dict[str, str]] = {"parallelism": "parallel"}

    def __post_init__(self):
        methods = (self.method.name, *self.method.combine)
        quant = self.model.quantization
        detail = "is qlora (LoRA over a quantised base), so set model.quantization to nf4 or int8"
        check("qlora" not in methods or quant != "none", "method.name", detail)
        detail = "cannot go with method.name=full (quantised weights stay frozen); use qlora"
        check(quant == "none" or "full" not in methods, "model.quantization", detail)
        has_reward = self.ppo.reward_model is not None or self.ppo.reward_fn is not None
        check(
            self.stage != "ppo" or has_reward, "ppo.reward_model", "or ppo.reward_fn is needed by stage ppo"
        )
        check(
            self.stage != "grpo" or self.grpo.reward_fns, "grpo.reward_fns", "is empty; stage grpo needs one"
        )
        detail = "is kto, which trains on unpaired labelled completions: set stage: kto"
        check(self.stage != "dpo" or self.dpo.loss_type != "kto", "dpo.loss_type", detail)
        detail = (
            "is a URL; jaxtune writes checkpoints, metrics and exports through the file system: mount the bucket "
            "on every host (e.g. Cloud Storage FUSE: `gcsfuse --implicit-dirs BUCKET /mnt/gcs`) and give that "
            "path, e.g. output_dir=/mnt/gcs/run1"
        )
        check("://" not in self.output_dir, "output_dir", detail, self.output_dir)
        config_rules.check_stage_fit(self, methods)

    @property
    def parallelism(self) -> ParallelConfig:
        return self.parallel


# ----------------------------------------------------------------------------------------------- API


def load_config(source: str | Path | Mapping | RunConfig | None, overrides: Sequence[str] = ()) -> RunConfig:
    """A RunConfig from a YAML path, a mapping or a RunConfig (None: all defaults), then dotted overrides
    such as ``training.learning_rate=1e-4``. Raises ConfigError naming the field, the file and line."""
    return typed_yaml.load(RunConfig, source, overrides)


def to_dict(cfg: Any) -> Any:
    """Plain dicts, lists and scalars (YAML/JSON-ready); ``load_config(to_dict(cfg)) == cfg``."""
    return typed_yaml.to_dict(cfg)


def dump_yaml(cfg: RunConfig, path: str | Path | None = None) -> str:
    """The full resolved config as YAML text; also written to `path` when given (e.g. run_dir/config.yaml)."""
    text = typed_yaml.dump(to_dict(cfg))
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text, encoding="utf-8")
    return text
