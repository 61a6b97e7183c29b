"""The rewrite rules, in the order the engine tries them at each node.

A rule is a function (node, Graph) -> Rewrite | Refusal | None: a rewrite to apply, a reason
why the place is left alone, or nothing to say. Adding a rule is adding an entry here."""
from .distribute import fold_into_sum
from .pad import pad_border
from .parallel import merge_concat, merge_sum
from .sequential import merge_sequential
from .simplify import fold_constants, remove_identity
from .views import fold_through_flatten, fold_through_permute, undo_reshape

RULES = [fold_constants, remove_identity, undo_reshape, pad_border, merge_sequential, merge_sum, merge_concat, fold_into_sum,
         fold_through_flatten, fold_through_permute]
