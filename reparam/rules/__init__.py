"""The rewrite rules, in the order the engine tries them at each node.

A rule is a function (node, Graph) -> Rewrite | Refusal | None: a rewrite to apply, a reason
why the place is left alone, or nothing to say. Adding a rule is adding an entry here."""
from .parallel import merge_concat, merge_sum
from .sequential import merge_sequential
from .simplify import fold_constants, remove_identity

RULES = [fold_constants, remove_identity, merge_sequential, merge_sum, merge_concat]
