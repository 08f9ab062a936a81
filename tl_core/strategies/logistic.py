"""A linear head on fixed features, solved to its optimum: multinomial logistic regression.

On frozen features a linear head is a convex problem, so it has one best answer and no
learning rate, epochs or batch size to get wrong. We minimise, as scikit-learn's
`LogisticRegression` does (the same objective, scaled by 1/n),

    J(W, b) = mean_i CE(W x_i + b, y_i) + ||W - W0||^2 / (2 C n)

with full-batch L-BFGS in float64 until the gradient vanishes (SciPy's L-BFGS-B, as scikit-learn). W0 is zero (a plain L2 penalty),
or the head the run started from (`--head-init descriptions`: the zero-shot head of the class
descriptions; `source`: the backbone's own): the penalty then pulls towards it, and C weighs it
against the labels (C -> 0: that head; C -> inf: the labels alone). The bias is not penalised.
C is scikit-learn's C for two classes too, which it fits as one logistic regression (`penalty_c`).

C is chosen by stratified k-fold cross-validation on the labelled training set only:
- with a plain L2 penalty, C is DEFAULT_C (scikit-learn's default) unless another C is right on
  more of the same held-out labels beyond chance at one standard error (`clear_gain`). So the probe
  is scikit-learn's LogisticRegression wherever a few labels cannot tell the Cs apart, and departs
  from it on evidence only. (The best held-out accuracy, ties to the lower log-loss, won by one
  label of 10 and lost 2.6 points on the test photos: EfficientNet-Lite2 at 5 shots, seed 2.)
- with a prior head, C is how far the labels may pull from it (C -> 0: that head, zero-shot), which
  only the labels can say: the best mean held-out accuracy, ties to the lower held-out log-loss.
  The head of a descriptions file's sentences (`prior_default`) is itself the default (C = 0, nothing
  fitted), against which a C needs the evidence above: otherwise the best of nine Cs on 16 labels
  is mostly luck, and lost 2 points to the zero-shot head it started from (SST-2, 8 shots). With
  one label a class (nothing to cross-validate) DEFAULT_C still pulls towards it.
  A prior that is only a guess (text's class names read as descriptions: `prior_optional`) competes
  with the plain penalty's Cs, and scikit-learn's C=1 is the default against which it needs the
  evidence above (AG News's four names pulled the probe 3 points below scikit-learn at 8 shots).
- where some class has fewer than two labels there is nothing to cross-validate on: DEFAULT_C.
From ONE_FOLD_FROM labels on, C is scored on one held-out fold of the k, not all k: a fifth of 1,000
labels or more measures each C's accuracy to a couple of points, and all k folds cost k times as
much (choosing and fitting on USPS's 7,291 training images: 25 s with 5 folds, 7 s with one,
where the probe's other work takes seconds; issue 27 asks a cached probe for <= 10 s).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_C = 1.0  # scikit-learn's default, used where the labels are too few to cross-validate
C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
FOLDS = 5
ONE_FOLD_FROM = 1000


@dataclass
class Solved:
    weight: torch.Tensor  # (classes, features), float32
    bias: torch.Tensor  # (classes,)
    C: float
    cv_accuracy: float | None  # the chosen C's mean held-out accuracy; None where C was not cross-validated
    folds: int  # the held-out folds C was scored on: k, 1 (ONE_FOLD_FROM labels on), or 0 (not cross-validated)
    anchored: bool = False  # the penalty pulled towards the prior head (False: towards zero)


def penalty_c(C: float, num_classes: int) -> float:
    """The C in J for a given C of scikit-learn's. scikit-learn fits two classes as one logistic
    regression, one weight vector w penalised by ||w||^2; as the two rows of a softmax the same
    model is W = [w/2, -w/2] at the optimum, penalised by ||W||^2 = ||w||^2 / 2. Without the
    halving, C=1 here was scikit-learn's C=2 on every two-class task (ants/bees, SST-2)."""
    return C / 2 if num_classes == 2 else C


def objective(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, C: float,
              prior: torch.Tensor | None = None) -> torch.Tensor:
    """J(W, b) above, in the dtype of `x`."""
    anchor = weight if prior is None else weight - prior
    C = penalty_c(C, len(weight))
    return F.cross_entropy(x @ weight.T + bias, y) + (anchor**2).sum() / (2 * C * len(y))


def one_thread():
    """Many small products: one BLAS and one torch thread. More spin-wait on each other, 60x
    slower on a busy 2-core machine (measured: 1.3 s against 0.02 s for 100 x 64 features)."""
    from contextlib import contextmanager

    from threadpoolctl import threadpool_limits

    @contextmanager
    def limited():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with threadpool_limits(1):
                yield
        finally:
            torch.set_num_threads(threads)

    return limited()


def _solve(x: np.ndarray, onehot: np.ndarray, C: float, w0: np.ndarray, theta: np.ndarray | None,
           tolerance: float) -> np.ndarray:
    """argmin J as one flat vector [W, b] (float64), by SciPy's L-BFGS-B on J and its exact
    gradient, as scikit-learn solves it: a step costs microseconds in NumPy."""
    from scipy.optimize import minimize

    n, d = x.shape
    k = onehot.shape[1]
    C = penalty_c(C, k)
    if theta is None:
        theta = np.concatenate([w0.ravel(), np.zeros(k)])

    def j_and_gradient(theta):
        weight, bias = theta[: k * d].reshape(k, d), theta[k * d :]
        logits = x @ weight.T + bias
        logits -= logits.max(1, keepdims=True)
        log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        anchor = weight - w0
        value = -(onehot * log_p).sum() / n + (anchor**2).sum() / (2 * C * n)
        residual = (np.exp(log_p) - onehot) / n
        return value, np.concatenate([(residual.T @ x + anchor / (C * n)).ravel(), residual.sum(0)])

    return minimize(j_and_gradient, theta, jac=True, method="L-BFGS-B",
                    options={"maxiter": 2000, "gtol": tolerance, "ftol": tolerance * 1e-4}).x


def _as_arrays(x: torch.Tensor, y: torch.Tensor, num_classes: int, prior: torch.Tensor | None):
    x64 = x.detach().double().numpy()
    w0 = np.zeros((num_classes, x64.shape[1])) if prior is None else prior.detach().double().numpy()
    return x64, y.long().numpy(), w0


def _unflatten(theta: np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    weight = torch.from_numpy(theta[: -k].reshape(k, -1).copy()).float()
    return weight, torch.from_numpy(theta[-k:].copy()).float()


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, C: float,
                 prior: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The (weight, bias) that minimise J, from W = W0, b = 0."""
    x64, labels, w0 = _as_arrays(x, y, num_classes, prior)
    with one_thread():
        return _unflatten(_solve(x64, np.eye(num_classes)[labels], C, w0, None, 1e-9), num_classes)


def stratified_folds(y: np.ndarray, folds: int, seed: int) -> list[np.ndarray]:
    """`folds` disjoint index sets, each class spread evenly over them (shuffled by `seed`)."""
    rng = np.random.default_rng(seed)
    parts = [[] for _ in range(folds)]
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        for i, index in enumerate(members):
            parts[i % folds].append(index)
    return [np.sort(np.array(p, dtype=np.int64)) for p in parts]


def cross_validate(x: np.ndarray, labels: np.ndarray, num_classes: int, folds: list[np.ndarray],
                   w0: np.ndarray) -> dict[float, tuple[np.ndarray, np.ndarray]]:
    """{C: (held-out correct, held-out log-loss)} over C_GRID, one entry per label the folds hold
    out (in the folds' order), each fold's head solved on the other folds; along the grid each
    solve starts from the previous C's solution (fewer steps: J is strictly convex, so the
    optimum does not depend on the start)."""
    onehot = np.eye(num_classes)[labels]
    held_out = {C: ([], []) for C in C_GRID}
    for held in folds:
        kept = np.setdiff1d(np.arange(len(labels)), held)
        theta = None
        for C in C_GRID:
            # To 1e-5: held-out scores do not move past that, and it takes a third of the steps
            theta = _solve(x[kept], onehot[kept], C, w0, theta, 1e-5)
            weight, bias = theta[:-num_classes].reshape(num_classes, -1), theta[-num_classes:]
            right, loss = scored(x[held] @ weight.T + bias, labels[held])
            held_out[C][0].append(right)
            held_out[C][1].append(loss)
    return {C: (np.concatenate(right), np.concatenate(loss)) for C, (right, loss) in held_out.items()}


def scored(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(right: 1.0 or 0.0, log-loss) of each label under `logits`."""
    logits = logits - logits.max(1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    return (logits.argmax(1) == labels).astype(np.float64), -log_p[np.arange(len(labels)), labels]


Candidate = tuple[bool, float]  # (the penalty pulls towards the prior head, not zero; C)
SCIKIT_LEARN: Candidate = (False, DEFAULT_C)
THE_PRIOR: Candidate = (True, 0.0)  # the prior head as it is, nothing fitted (C -> 0)


def prior_scores(x: np.ndarray, labels: np.ndarray, folds: list[np.ndarray], w0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """THE_PRIOR's (held-out correct, held-out log-loss), as `cross_validate` lists its labels."""
    held = np.concatenate(folds)
    return scored(x[held] @ w0.T, labels[held])


def choose_c(held_out: dict[Candidate, tuple[np.ndarray, np.ndarray]], default: Candidate | None = None) -> Candidate:
    """The (anchor, C) that cross-validation supports (the module's docstring): the best mean
    held-out accuracy, ties to the lower log-loss; where a `default` is given (scikit-learn's own,
    or the descriptions' head as it is), that one unless the best's paired gain over it on the same
    held-out labels is evidence (`clear_gain`)."""
    best = max(held_out, key=lambda c: (held_out[c][0].mean(), -held_out[c][1].mean()))
    if default is None:
        return best
    return best if clear_gain(held_out[best][0] - held_out[default][0]) else default


EVIDENCE = 0.1587  # one-sided: the chance of a normal draw beyond one standard error


def sign_test(gain: np.ndarray) -> tuple[int, int, float]:
    """(wins, losses, p) of a paired gain (+1, 0 or -1 per held-out label): the labels the one got
    right and the other wrong, the reverse, and the chance that a fair coin on the labels where
    they differ gives at least `wins` (the exact one-sided sign test, McNemar's)."""
    from scipy.stats import binom

    wins, losses = int((gain > 0).sum()), int((gain < 0).sum())
    return wins, losses, float(binom.sf(wins - 1, wins + losses, 0.5)) if wins else 1.0


def clear_gain(gain: np.ndarray, comparisons: int = 1) -> bool:
    """Whether one choice's paired gain over another on the same held-out labels is evidence: it
    wins more of the labels where they differ than a fair coin would, beyond chance at the level
    of one standard error (`sign_test`'s p <= EVIDENCE), shared among `comparisons` such tests of
    one default (Bonferroni: p <= EVIDENCE / comparisons). The mean gain over its standard error says
    the same on many labels, but few fool it: 2 of 4 won and none lost is "one standard error"
    (0.5 > 0.29) by the spread of those very 4, yet a coin does it one time in four (auto on SST-2
    at 8 shots took finetune so, 5 points below the probe). One label's net gain is never evidence.
    `choose_c` and auto's choice (tl_core/auto.py) both decide by it."""
    wins, losses, p = sign_test(gain)
    return wins > losses and p <= EVIDENCE / comparisons


def choose_and_fit(x: torch.Tensor, y: torch.Tensor, num_classes: int, C: float | None = None,
                   prior: torch.Tensor | None = None, seed: int = 0, prior_optional: bool = False,
                   prior_default: bool = False) -> Solved:
    """The head solved on all of (x, y), with `C` if given, else the C of C_GRID that k-fold
    cross-validation on (x, y) supports (`choose_c`; one held-out fold from ONE_FOLD_FROM labels
    on; DEFAULT_C where some class has fewer than 2 labels). With `prior_default` the prior head as
    it is (a zero-shot head from a descriptions file) is the default the Cs need evidence against,
    instead of scikit-learn's. `prior_optional`:
    the penalty may pull towards zero instead of `prior`, scikit-learn's own, unless the labels show
    that the prior helps (a prior guessed from class names; one from a descriptions file or the
    source always pulls)."""
    x64, labels, w0 = _as_arrays(x, y, num_classes, prior)
    counts = np.bincount(labels, minlength=num_classes)
    present = counts[counts > 0]
    folds = min(FOLDS, int(present.min())) if len(present) else 0
    cv_accuracy = None
    anchored = prior is not None
    if anchored and prior_default:
        default = THE_PRIOR
    elif not anchored or prior_optional:
        default = SCIKIT_LEARN
    else:  # a source head: how far to pull from it is the labels' to say
        default = None
    with one_thread():
        if C is None and folds >= 2:
            held_out = stratified_folds(labels, folds, seed)
            if len(labels) >= ONE_FOLD_FROM:
                held_out, folds = held_out[:1], 1
            anchors = [True, False] if anchored and prior_optional else [anchored]
            zero = np.zeros_like(w0)
            scores = {(anchor, c): result for anchor in anchors for c, result in
                      cross_validate(x64, labels, num_classes, held_out, w0 if anchor else zero).items()}
            if default == THE_PRIOR:
                scores[THE_PRIOR] = prior_scores(x64, labels, held_out, w0)
            anchored, C = choose_c(scores, default)
            cv_accuracy = float(scores[anchored, C][0].mean())
        else:
            folds = 0
        C = DEFAULT_C if C is None else C  # nothing to cross-validate on: towards the prior, or zero
        w0 = w0 if anchored else np.zeros_like(w0)
        if C == 0:  # the prior head itself
            return Solved(torch.from_numpy(w0).float(), torch.zeros(num_classes), C, cv_accuracy, folds, anchored)
        weight, bias = _unflatten(_solve(x64, np.eye(num_classes)[labels], C, w0, None, 1e-9), num_classes)
    return Solved(weight, bias, C, cv_accuracy, folds, anchored)
