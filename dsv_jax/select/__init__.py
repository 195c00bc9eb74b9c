"""Selection: fit lambda >= 0 over a whole training set, then rank.

Selection: with the training images fixed, fit
multipliers ``lambda >= 0`` so that the frozen weights satisfy stationarity,
``theta* ~= -G lambda`` with ``G`` the P x N matrix of per-sample gradients
``g_i = grad_theta L_i``, and rank the samples per class.

The fit is matrix-free. ``G`` is never formed: every solver iteration takes
one weighted backward pass (``G @ lambda``, the product of
`kkt.weighted_loss_grad`) and one forward-mode pass (``G^T @ u``, that of
`kkt.per_sample_grad_dots`), both streamed over the data in chunks by a
host-side loop over jitted per-chunk functions (on XLA:CPU a convolution
inside ``lax.scan`` runs 7-15x slower, see benchmarks/README.md) and sharded
``P("data")`` over a device mesh with the parameters replicated; each
device sums ``G @ lambda`` over its rows of every chunk, and the partial
sums are all-reduced once per product (P floats). With several processes
each holds only its own rows (`process_rows`) and their per-sample
vectors: an iteration communicates that all-reduce and a few scalars,
never an N-vector. Memory is O(P + chunk activations) for any N. Both
products go through the logits with ``softmax - onehot`` formed without
cancellation (see `dsv_jax.select.operator`): confident samples have
``1 - p_y`` far below float32's resolution of 1.

Solver: FISTA (accelerated projected gradient) with backtracking on the
step size and gradient-based adaptive restart. ``G`` is linear, so ``G y``
at the extrapolated point is ``(1 + b) G x_k - b G x_{k-1}`` from cached
products and costs no pass. ``l1_mean`` is non-smooth; its gradient comes
from a Huber smoothing of width ``l1_smoothing * mean|theta*|`` (the
reported distance is always the exact one). ``cosine`` is scale-invariant.

What makes a support vector: the representation
``theta* = -G lambda`` is not unique (a weight-decay-trained net is
represented exactly by a uniform lambda), so a fit alone does not single
out support vectors. We add a complementary-slackness term: among the
representations, prefer those with the largest total contribution
``sum_i lambda_i ||p_i - y_i||`` (``p_i`` the softmax output, ``y_i`` the
one-hot target). For a linear (or positively homogeneous) two-class model
``<theta*, -g_i> = ||p_i - y_i|| * margin_i`` up to a constant, so
``||theta*||^2 = sum_i lambda_i ||p_i - y_i|| margin_i
>= min_margin * sum_i lambda_i ||p_i - y_i||``, with equality exactly when
lambda lives on the minimum-margin samples: maximising the contribution
among exact representations selects the support vectors (complementary
slackness without knowing the margin's scale). The objective is

  F(lambda) = D(theta*, -G lambda) / D(theta*, 0)
              - slackness * sum_i lambda_i ||p_i - y_i|| / W_ref,

``W_ref = ||theta*||^2 * sum_i ||p_i - y_i|| / sum_i <theta*, -g_i>`` (sums
over the rewarded samples, see below; the contribution of an exact
representation at their average margin), so ``slackness`` is
dimensionless and roughly the relative residual traded for contribution.
With ``slackness > 0`` the reward (the sum) runs over the samples with
``<theta*, -g_i> > 0`` only (for a linear model: the correctly classified
ones); the others may carry lambda up to the best constant lambda (a soft
margin, like a soft-margin SVM's C; at a stationary point of the training
objective it is 1 / (N wd)). This keeps F bounded below (see
`fit_lambdas`) and lets an underfit classifier's misclassified samples
take their part of theta*. Samples are ranked by their contribution
``lambda_i ||p_i - y_i||``.
benchmarks/svm_sanity.py measures this choice against the alternatives on
linearly separable data with hard-margin SVM support vectors as ground
truth (see benchmarks/README.md).

Weights followed by a normalisation layer (e.g. the ConvNet's conv kernels
under instance norm) are scale-invariant: every per-sample gradient is
orthogonal to them, so no lambda represents them and the residual is at
least their share of ``||theta*||``. Fit such models with those weights
closed over in ``apply_fn`` (see `dsv_jax.kkt`), or use models without them.

The package, one idea per module: `layout` (which rows each process
holds), `operator` (the streamed products with G), `invariance` (which
parameters can be represented), `fista` (the solver state and one
iteration), `fit` (`fit_lambdas`, its phases and `select_dsvs`),
`progress` (its hooks, checkpoints and resume), `residuals`
(`stationarity_residuals`) and `ranking` (scores, per-class ranking,
metrics). Import from
``dsv_jax.select``: the names below are the public API.
"""

from dsv_jax.select.fista import SolverState
from dsv_jax.select.fit import (
  DEFAULT_DISTANCE,
  DEFAULT_INIT,
  DEFAULT_MAX_ITERS,
  DEFAULT_SLACKNESS,
  DISTANCES,
  INITS,
  FitInfo,
  Init,
  Selection,
  fit_lambdas,
  select_dsvs,
)
from dsv_jax.select.invariance import (
  DEFAULT_INVARIANCE_TOL,
  DEFAULT_NUM_PROBE,
  WRT,
  Represented,
  Wrt,
  represented_leaves,
  resolve_wrt,
)
from dsv_jax.select.layout import gather_rows, gather_state, process_rows
from dsv_jax.select.operator import (
  STRATEGIES,
  Strategy,
  prob_residual,
  resolve_strategy,
)
from dsv_jax.select.ranking import (
  DEFAULT_SCORE,
  SCORES,
  Score,
  per_class_sums,
  precision_recall_at_k,
  random_per_class,
  rank_per_class,
  scores,
  top_per_class,
)
from dsv_jax.select.residuals import stationarity_residuals

__all__ = [
  "DEFAULT_INVARIANCE_TOL",
  "DEFAULT_NUM_PROBE",
  "DEFAULT_DISTANCE",
  "DEFAULT_INIT",
  "DEFAULT_MAX_ITERS",
  "DEFAULT_SCORE",
  "DEFAULT_SLACKNESS",
  "DISTANCES",
  "FitInfo",
  "INITS",
  "Init",
  "Represented",
  "SCORES",
  "Score",
  "Selection",
  "STRATEGIES",
  "SolverState",
  "Strategy",
  "WRT",
  "Wrt",
  "fit_lambdas",
  "gather_rows",
  "gather_state",
  "per_class_sums",
  "precision_recall_at_k",
  "prob_residual",
  "process_rows",
  "random_per_class",
  "rank_per_class",
  "represented_leaves",
  "resolve_strategy",
  "resolve_wrt",
  "scores",
  "select_dsvs",
  "stationarity_residuals",
  "top_per_class",
]
