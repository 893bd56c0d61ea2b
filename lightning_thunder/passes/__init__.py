"""Generic trace passes: dead code elimination, CSE, del insertion."""

from lightning_thunder.passes.cse import common_subexpression_elimination
from lightning_thunder.passes.dce import dead_code_elimination
from lightning_thunder.passes.deletion import insert_deletions
from lightning_thunder.passes.mutation import mutated_arguments, protect_mutated_saved_inputs
from lightning_thunder.passes.purity import is_deterministic, is_pure

__all__ = [
    "common_subexpression_elimination",
    "dead_code_elimination",
    "insert_deletions",
    "is_deterministic",
    "is_pure",
    "mutated_arguments",
    "protect_mutated_saved_inputs",
]
