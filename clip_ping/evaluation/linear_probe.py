"""Linear probe: logistic regression on frozen, L2-normalised image features.

The regularisation strength C is chosen by accuracy on the validation split;
the classifier is then refitted with that C on train + validation and scored
on the test split, the usual protocol (CLIP paper, appendix A.3).
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np

from ..environment import require
from ..errors import DataError

# Features are unit length, so useful C values are large-ish; a log grid covers them.
DEFAULT_CS: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)


def _as_features(x) -> np.ndarray:
    x = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def _as_labels(y) -> np.ndarray:
    return np.asarray(y.detach().cpu() if hasattr(y, "detach") else y).reshape(-1)


def _fit(x: np.ndarray, y: np.ndarray, c: float, max_iter: int, seed: int) -> tuple[Any, bool]:
    # scikit-learn is the optional 'probe' extra: imported here, checked by linear_probe().
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    model = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
    # One BLAS thread: these matrices are small, and threaded BLAS on a busy
    # machine made the fit several times slower, not faster.
    with warnings.catch_warnings(record=True) as caught, threadpool_limits(limits=1):
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(x, y)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return model, converged


def _accuracy(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    return 100.0 * int(np.sum(model.predict(x) == y)) / len(y)


def linear_probe(
    train_x,
    train_y,
    val_x,
    val_y,
    test_x,
    test_y,
    Cs: Sequence[float] = DEFAULT_CS,
    refit_on_train_val: bool = True,
    max_iter: int = 1000,
    seed: int = 0,
) -> dict:
    """Fit, select C on validation, refit, and score on test. Accuracies in %.

    Features (N x d) and labels (N) may be tensors or arrays. Returns
    ``{"accuracy", "C", "val_accuracy", "val_accuracy_by_C", "converged",
    "n_train", "n_val", "n_test", "n_classes"}``; ``accuracy`` is on the test split.
    Raises `DataError` when the training labels hold fewer than two classes.
    """
    require("probe")
    xtr, xva, xte = _as_features(train_x), _as_features(val_x), _as_features(test_x)
    ytr, yva, yte = _as_labels(train_y), _as_labels(val_y), _as_labels(test_y)
    if len(np.unique(ytr)) < 2:
        raise DataError("linear probe: the training labels hold fewer than two classes")
    if len(yva) == 0 or len(yte) == 0:
        raise DataError("linear probe: the validation and test splits must not be empty")
    if not Cs:
        raise ValueError("linear probe needs at least one C value")

    # Pick the best validation accuracy; on ties the smaller C (stronger regularisation).
    by_c: dict[str, float] = {}
    best_c, best_acc = float(Cs[0]), -1.0
    for c in sorted(Cs):
        model, _ = _fit(xtr, ytr, c, max_iter, seed)
        acc = _accuracy(model, xva, yva)
        by_c[f"{c:g}"] = acc
        if acc > best_acc:
            best_c, best_acc = c, acc

    if refit_on_train_val:
        xfit, yfit = np.concatenate([xtr, xva]), np.concatenate([ytr, yva])
    else:
        xfit, yfit = xtr, ytr
    model, converged = _fit(xfit, yfit, best_c, max_iter, seed)
    return {
        "accuracy": _accuracy(model, xte, yte),
        "C": float(best_c),
        "val_accuracy": best_acc,
        "val_accuracy_by_C": by_c,
        "converged": converged,
        "n_train": int(len(ytr)),
        "n_val": int(len(yva)),
        "n_test": int(len(yte)),
        "n_classes": int(len(np.unique(np.concatenate([ytr, yva])))),
    }
