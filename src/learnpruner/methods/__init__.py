"""The pruning methods: the :class:`Method` type and its one registry (:mod:`.base`), and one module per method
family registering its methods (:mod:`.baselines`, :mod:`.fastv`, :mod:`.learnpruner` with its ablations). The
peers' families register from :mod:`learnpruner.peers`, next to their rules.

A method pairs a stage-1 rule (after the vision encoder) and/or a stage-2 rule (inside the LLM) with its paper's
defaults and two mappings from a token budget to a :class:`~learnpruner.budget.Schedule`: ``budget="average"``
(the default: the AVERAGE number of visual tokens per LLM layer) and ``budget="paper"`` (the label of the
method's published configuration; see :mod:`learnpruner.budget`). Every method also takes the ``positions``
option (``"original"`` or ``"contiguous"`` position ids after a drop), its default being what its official code
does.
"""

from . import baselines, fastv, learnpruner, learnpruner_set  # noqa: F401  (register in this order)
from .base import (
    ABLATIONS,
    COMMON,
    METHODS,
    Method,
    Option,
    boolean,
    check_layer,
    choice,
    describe_budgets,
    fraction,
    get_method,
    int_sequence,
    positions_for,
    positive_int,
    register,
    stage1_schedule,
    stage2_schedule,
)
from .learnpruner import learnpruner_schedule

__all__ = ["Method", "Option", "COMMON", "boolean", "choice", "fraction", "int_sequence", "positive_int", "METHODS",
           "ABLATIONS", "register", "get_method", "positions_for", "describe_budgets",
           "check_layer", "stage1_schedule", "stage2_schedule", "learnpruner_schedule"]

# the peers register their methods next to their rules (learnpruner.peers imports this package's names above)
from .. import peers  # noqa: E402,F401
