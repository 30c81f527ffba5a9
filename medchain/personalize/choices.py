"""The names personalization works with: its methods, the references they are compared with,
the metrics a method is selected on and each metric's matching reference, the head's tensor names."""
from __future__ import annotations

#: Personalization methods (each gives one model per institution).
METHODS: tuple[str, ...] = ("finetune_all", "finetune_head", "fedper", "fedbn")
#: References every method is compared with.
REFERENCES: tuple[str, ...] = ("majority", "local_only", "global", "global_prior", "global_uniform")
#: The metrics a method can be selected on and judged by.
SELECT_METRICS: tuple[str, ...] = ("acc", "balanced_acc")
#: Each metric's no-training reference: the label-prior correction that is Bayes-optimal for it.
MATCHING_REFERENCE: dict[str, str] = {"acc": "global_prior", "balanced_acc": "global_uniform"}
#: Tensor-name patterns of the classifier head (every medchain model names it ``head``).
HEAD_PATTERNS: tuple[str, ...] = ("head.*",)
