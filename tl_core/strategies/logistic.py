"""A linear head on fixed features, solved to its optimum: multinomial logistic regression.

On frozen features a linear head is a convex problem, so it has one best answer and no
learning rate, epochs or batch size to get wrong. We minimise, as scikit-learn's
`LogisticRegression` does (the same objective, scaled by 1/n),

    J(W, b) = mean_i CE(W x_i + b, y_i) + ||W - W0||^2 / (2 C n)

with full-batch L-BFGS in float64 until the gradient vanishes (SciPy's L-BFGS-B, as scikit-learn). W0 is zero (a plain L2 penalty),
or the head the run started from (`--head-init descriptions`: the zero-shot head of the class
descriptions; `source`: the backbone's own): the penalty then pulls towards it, and C weighs it
against the labels (C -> 0: that head; C -> inf: the labels alone). The bias is not penalised.

C is chosen by stratified k-fold cross-validation on the labelled training set only (the best
mean held-out accuracy, ties to the lower held-out log-loss). Where some class has fewer than two
labels there is nothing to cross-validate on: then C is DEFAULT_C, scikit-learn's default. From
ONE_FOLD_FROM labels on, C is scored on one held-out fold of the k, not all k: a fifth of 1,000
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


def objective(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, C: float,
              prior: torch.Tensor | None = None) -> torch.Tensor:
    """J(W, b) above, in the dtype of `x`."""
    anchor = weight if prior is None else weight - prior
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
                   w0: np.ndarray) -> dict[float, tuple[float, float]]:
    """{C: mean held-out (accuracy, log-loss)} over C_GRID, each fold's head solved on the other
    folds; along the grid each solve starts from the previous C's solution (fewer steps: J is
    strictly convex, so the optimum does not depend on the start)."""
    onehot = np.eye(num_classes)[labels]
    held_out = {C: [] for C in C_GRID}
    for held in folds:
        kept = np.setdiff1d(np.arange(len(labels)), held)
        theta = None
        for C in C_GRID:
            # To 1e-5: held-out scores do not move past that, and it takes a third of the steps
            theta = _solve(x[kept], onehot[kept], C, w0, theta, 1e-5)
            weight, bias = theta[:-num_classes].reshape(num_classes, -1), theta[-num_classes:]
            logits = x[held] @ weight.T + bias
            logits -= logits.max(1, keepdims=True)
            log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
            held_out[C].append(((logits.argmax(1) == labels[held]).mean(),
                                -log_p[np.arange(len(held)), labels[held]].mean()))
    return {C: tuple(np.mean(scores, axis=0).tolist()) for C, scores in held_out.items()}


def choose_and_fit(x: torch.Tensor, y: torch.Tensor, num_classes: int, C: float | None = None,
                   prior: torch.Tensor | None = None, seed: int = 0) -> Solved:
    """The head solved on all of (x, y), with `C` if given, else the C of C_GRID that k-fold
    cross-validation on (x, y) prefers (one held-out fold from ONE_FOLD_FROM labels on; DEFAULT_C
    where some class has fewer than 2 labels)."""
    x64, labels, w0 = _as_arrays(x, y, num_classes, prior)
    counts = np.bincount(labels, minlength=num_classes)
    present = counts[counts > 0]
    folds = min(FOLDS, int(present.min())) if len(present) else 0
    cv_accuracy = None
    with one_thread():
        if C is None and folds >= 2:
            held_out = stratified_folds(labels, folds, seed)
            if len(labels) >= ONE_FOLD_FROM:
                held_out, folds = held_out[:1], 1
            scores = cross_validate(x64, labels, num_classes, held_out, w0)
            C = max(C_GRID, key=lambda c: (scores[c][0], -scores[c][1]))
            cv_accuracy = scores[C][0]
        else:
            folds = 0
        C = DEFAULT_C if C is None else C
        weight, bias = _unflatten(_solve(x64, np.eye(num_classes)[labels], C, w0, None, 1e-9), num_classes)
    return Solved(weight, bias, C, cv_accuracy, folds)
