"""Personalized models per institution, after (or during) collaborative training — claim 4.

Every method ends with one model per institution, scored on that institution's own test split.

Methods
-------
``finetune_all`` / ``finetune_head``
    Local fine-tuning of the final global model on the institution's own train split (all layers,
    or only the classifier head with the feature extractor frozen — its BatchNorm statistics
    included), selecting the epoch on the institution's validation split by the metric it is
    judged on (:func:`finetune`; one model per metric).
    Nothing is communicated.
``fedper``
    FedPer (Arivazhagan et al., 2019): the classifier head (``head.*``) stays local *during*
    collaborative training — it is never uploaded, never overwritten by the global model
    (the task's policy ``keep_local="fedper"``), see :func:`run_local_mask`.
``fedbn``
    FedBN (Li et al., ICLR 2021): every BatchNorm layer (affine weights and running statistics)
    stays local in the same way.

References
----------
``majority`` (the institution's training majority class), ``local_only`` (the institution alone),
``global`` (the collaborative model as is) and two no-training *label-prior corrections* of the
global model (logit adjustment, Menon et al. 2021), one per metric:

``global_prior``
    add ``log p_local(y) − log p_train(y)`` to the logits, where ``p_local`` are the institution's
    training label frequencies and ``p_train`` those of all institutions' training data pooled
    (what the global model learnt). The Bayes rule for the institution's own label mix: it
    maximizes plain **ACC**, and can lower balanced ACC.
``global_uniform``
    subtract ``log p_train(y)`` (the target prior is uniform): the Bayes rule for **balanced ACC**
    (the mean per-class recall), which weighs every class equally whatever the local mix.

Both need no images, only K class counts per institution. Under label skew most of a
personalization gain can be this label-mix adaptation alone, so each metric is judged against its
matching correction (:data:`MATCHING_REFERENCE`), and each personalization method is selected on
the validation metric it is judged on.

Balanced ACC of a test split holding one class is the accuracy on that class (a majority vote
scores 1.0); :func:`split_metrics` reports NaN there and records ``classes_in_test``.

"Stays local" is checked on the chain itself: :func:`audit_local_only` decodes every payload of
every round from the ledger and the blob store and proves that no local-only coordinate was
ever shared, and that each institution's personal model carries its own local values.

Modules: :mod:`~medchain.personalize.choices` (names), :mod:`~medchain.personalize.priors`
(label-prior correction, metrics), :mod:`~medchain.personalize.finetune` (local fine-tuning),
:mod:`~medchain.personalize.local_only` (FedPer, FedBN, the audit).
"""
from medchain.personalize.choices import (HEAD_PATTERNS, MATCHING_REFERENCE, METHODS, REFERENCES,
                                          SELECT_METRICS)
from medchain.personalize.priors import (LogitAdjusted, adjust_logits, label_frequencies, majority_metrics,
                                         prior_corrected, prior_shift, split_metrics, undefined_balanced,
                                         uniform_corrected)
from medchain.personalize.finetune import (FinetuneConfig, FinetuneResult, Selection, add_to_head_bias,
                                           finetune, fit_selecting)
from medchain.personalize.local_only import (LocalOnlyAudit, audit_local_only, local_mask_for,
                                             personal_models, run_local_mask)

__all__ = [
    "METHODS", "REFERENCES", "HEAD_PATTERNS",
    "MATCHING_REFERENCE", "SELECT_METRICS",
    "label_frequencies", "prior_shift", "adjust_logits", "LogitAdjusted", "prior_corrected",
    "uniform_corrected", "split_metrics", "undefined_balanced", "majority_metrics",
    "Selection", "fit_selecting", "FinetuneConfig", "FinetuneResult", "finetune", "add_to_head_bias",
    "local_mask_for", "run_local_mask", "personal_models",
    "LocalOnlyAudit", "audit_local_only",
]
