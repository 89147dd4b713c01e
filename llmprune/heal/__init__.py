"""Recovery after pruning: PERP (norms and biases), masked LoRA merged through the mask, distillation.

    result = heal_model(model, mode="lora", train_ids=ids, eval_ids=held_out, steps=200, lr=1e-3)
    result.loss_before, result.loss_after, result.trainable_parameters

See `llmprune/heal/core.py` for the modes and `llmprune heal --help` for the command.
"""
from llmprune.heal.core import (DEFAULT_LR, DISTILL_LOSSES, HEAL_MODES, TRAIN_SETS, HealResult, heal_model, mean_nll,
                                perp_parameters)
from llmprune.heal.data import HealWindows, heal_windows
from llmprune.heal.distill import generate_responses, kl_sum
from llmprune.heal.lora import MaskedLoRA, attach_lora, merge_lora

__all__ = ["heal_model", "HealResult", "HEAL_MODES", "TRAIN_SETS", "DISTILL_LOSSES", "DEFAULT_LR", "mean_nll",
           "perp_parameters", "heal_windows", "HealWindows", "MaskedLoRA", "attach_lora", "merge_lora", "generate_responses", "kl_sum"]
