"""Training objectives: one frozen `Method` record per `config.Stage` value (methods/record.py says what each
field means). No trainer subclasses, no hooks, no attribute probing: the trainer reads the record."""

from jaxtune.methods.dpo import DPO
from jaxtune.methods.grpo import GRPO
from jaxtune.methods.kto import KTO
from jaxtune.methods.ppo import PPO
from jaxtune.methods.record import RL, Method, Prepare, Prepared, Schedule
from jaxtune.methods.rm import RM
from jaxtune.methods.sft import PT, SFT

METHODS: dict[str, Method] = {"pt": PT, "sft": SFT, "rm": RM, "dpo": DPO, "kto": KTO, "ppo": PPO, "grpo": GRPO}

__all__ = ["METHODS", "RL", "Method", "Prepare", "Prepared", "Schedule"]
