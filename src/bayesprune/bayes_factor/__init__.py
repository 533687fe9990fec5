"""Bayes-factor gated weight pruning (Mathew and Rowe; docs/maths.md section 5).

Unstructured (weight-level) pruning of an ordinary network during training.  At the end of every
epoch, if the Bayes factor of the *last* pruning step exceeds a threshold ``beta``, the weights of
every prunable layer are pruned to the target sparsity ``r`` (randomly or by magnitude), and the
new Bayes factor of the pruned against the unpruned network is computed from the two log
posteriors::

    log p(w | D) = sum_i log p(y_i | x_i, w) + sum_j log N(w_j; m0, s0^2)   (up to log p(D))
    log BF       = log p(w_after | D) - log p(w_before | D)

Everything is kept in log space (``exp`` of a difference of summed log-likelihoods overflows).
The defaults the paper leaves open are documented in ``docs/bayes_factor.md``.

Modules: :mod:`.posterior` (``log_likelihood``, ``log_prior``, ``log_posterior``,
``fixed_batches``), :mod:`.masks` (``prunable_weights``, ``WeightMasks``, ``random_prune``,
``magnitude_prune``), :mod:`.gate` (``BayesFactorPruner``), :mod:`.dead`
(``count_dead_structures``, ``shrink_dead``).  The training loop is
``bayesprune.experiments.bf_training``.
"""

from ..noise import PRUNABLE_TYPES
from .dead import SHRINK_DEAD_RTOL, count_dead_structures, shrink_dead
from .gate import MODES, SKIP_POLICIES, BayesFactorPruner
from .masks import WeightMasks, magnitude_prune, prunable_weights, random_prune
from .posterior import LIKELIHOOD_BATCH_SIZE, fixed_batches, log_likelihood, log_posterior, log_prior

__all__ = [
    "PRUNABLE_TYPES",
    "MODES",
    "SKIP_POLICIES",
    "LIKELIHOOD_BATCH_SIZE",
    "SHRINK_DEAD_RTOL",
    "prunable_weights",
    "log_likelihood",
    "log_prior",
    "log_posterior",
    "WeightMasks",
    "random_prune",
    "magnitude_prune",
    "BayesFactorPruner",
    "count_dead_structures",
    "shrink_dead",
    "fixed_batches",
]
