"""EventScorerModel: the event scorer's gradient-boosted trees, evaluated with numpy alone.

The event scorer rescores candidate game events into three classes (:data:`CLASSES`: death,
reward, none).  It is trained offline with scikit-learn's ``HistGradientBoostingClassifier``;
:meth:`EventScorerModel.from_sklearn` copies the fitted trees into flat node arrays, and from then
on nothing needs scikit-learn: the runtime is numpy only, so the cheap path of the pipeline does
not pull in a training library, and a model trained by one scikit-learn version keeps working
under another.

The file is one ``.npz`` (read with ``allow_pickle=False``: no pickle anywhere, so loading a model
cannot run code) holding the node arrays and a JSON ``meta`` entry: the format and its version,
the signal version the features were computed by, the feature names in input order, the
calibration temperature, decision thresholds and a free-form model card.

Probabilities are ``softmax(raw / temperature)``: the temperature is fitted after training on
held-out data so that the probabilities are calibrated; 1.0 gives scikit-learn's own.

Every problem loading a file is one line (:class:`~copilot.errors.UsageError`) starting with
the path.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from copilot.errors import UsageError, first_line

FORMAT = "gamecopilot-event-scorer"
FORMAT_VERSION = 1
CLASSES = ("death", "reward", "none")

_ARRAYS = {
    "feature": np.int32,
    "threshold": np.float64,
    "left": np.int32,
    "right": np.int32,
    "is_leaf": np.bool_,
    "value": np.float64,
    "missing_left": np.bool_,
    "roots": np.int32,
    "tree_class": np.int32,
    "baseline": np.float64,
}
_NODE_ARRAYS = ("feature", "threshold", "left", "right", "is_leaf", "value", "missing_left")


def _some(names: Iterable[str], limit: int = 5) -> str:
    """Up to ``limit`` names joined by commas, then ``+N more``."""
    names = list(names)
    text = ", ".join(names[:limit])
    return f"{text} +{len(names) - limit} more" if len(names) > limit else text


class EventScorerModel:
    """Gradient-boosted trees for :data:`CLASSES`, as flat node arrays over all trees."""

    def __init__(
        self,
        *,
        feature: np.ndarray,
        threshold: np.ndarray,
        left: np.ndarray,
        right: np.ndarray,
        is_leaf: np.ndarray,
        value: np.ndarray,
        missing_left: np.ndarray,
        roots: np.ndarray,
        tree_class: np.ndarray,
        baseline: np.ndarray,
        feature_names: Sequence[str],
        signal_version: int,
        temperature: float = 1.0,
        thresholds: Mapping[str, float] | None = None,
        card: Mapping[str, Any] | None = None,
        depth: int | None = None,
    ) -> None:
        self.feature = np.ascontiguousarray(feature, dtype=np.int32)
        self.threshold = np.ascontiguousarray(threshold, dtype=np.float64)
        self.left = np.ascontiguousarray(left, dtype=np.int32)
        self.right = np.ascontiguousarray(right, dtype=np.int32)
        self.is_leaf = np.ascontiguousarray(is_leaf, dtype=np.bool_)
        self.value = np.ascontiguousarray(value, dtype=np.float64)
        self.missing_left = np.ascontiguousarray(missing_left, dtype=np.bool_)
        self.roots = np.ascontiguousarray(roots, dtype=np.int32)
        self.tree_class = np.ascontiguousarray(tree_class, dtype=np.int32)
        self.baseline = np.ascontiguousarray(baseline, dtype=np.float64)
        self.feature_names: list[str] = [str(n) for n in feature_names]
        self.signal_version = int(signal_version)
        self.temperature = float(temperature)
        self.thresholds: dict[str, float] = {str(k): float(v) for k, v in (thresholds or {}).items()}
        self.card: dict[str, Any] = dict(card or {})
        computed = self._check()
        if depth is not None and int(depth) != computed:
            raise ValueError(f"depth {depth} does not match the trees' depth {computed}")
        self.depth = computed
        # One column per class: a tree's leaf value goes to its class's raw score.
        self._onehot = np.zeros((len(self.roots), len(CLASSES)))
        self._onehot[np.arange(len(self.roots)), self.tree_class] = 1.0

    def _check(self) -> int:
        """Check the arrays fit together (ValueError if not) and return the trees' max depth."""
        n_nodes = len(self.feature)
        for name in _NODE_ARRAYS:
            arr = getattr(self, name)
            if arr.ndim != 1 or len(arr) != n_nodes:
                raise ValueError(f"node array {name!r} has shape {arr.shape}, expected ({n_nodes},)")
        if self.baseline.shape != (len(CLASSES),):
            raise ValueError(f"baseline has shape {self.baseline.shape}, expected ({len(CLASSES)},)")
        if self.roots.ndim != 1 or self.tree_class.shape != self.roots.shape:
            raise ValueError(f"roots {self.roots.shape} and tree_class {self.tree_class.shape} differ")
        if len(set(self.feature_names)) != len(self.feature_names):
            raise ValueError("feature names repeat")
        if not (self.temperature > 0 and np.isfinite(self.temperature)):
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if np.any((self.tree_class < 0) | (self.tree_class >= len(CLASSES))):
            raise ValueError("tree_class out of range")
        if np.any((self.roots < 0) | (self.roots >= n_nodes)):
            raise ValueError("root index out of range")
        # Leaves too: the traversal reads every node's fields before it sees that a node is a leaf.
        for name in ("left", "right"):
            child = getattr(self, name)
            if np.any((child < 0) | (child >= n_nodes)):
                raise ValueError(f"{name} child index out of range")
        if np.any((self.feature < 0) | (self.feature >= len(self.feature_names))):
            raise ValueError("feature index out of range")
        # Walk down level by level from the roots; a level past n_nodes means a cycle.
        frontier = np.unique(self.roots)
        depth = 0
        while True:
            frontier = frontier[~self.is_leaf[frontier]]
            if not len(frontier):
                return depth
            depth += 1
            if depth > n_nodes:
                raise ValueError("the trees have a cycle")
            frontier = np.unique(np.concatenate([self.left[frontier], self.right[frontier]]))

    @property
    def n_trees(self) -> int:
        return len(self.roots)

    def raw(self, X: np.ndarray) -> np.ndarray:
        """Raw scores (n, n_classes): baseline plus the leaf values of every tree."""
        X = np.atleast_2d(np.asarray(X, dtype=np.float64))
        if X.ndim != 2 or X.shape[1] != len(self.feature_names):
            raise ValueError(f"expected rows of {len(self.feature_names)} features, got shape {X.shape}")
        n = X.shape[0]
        rows = np.arange(n)[:, None]
        idx = np.broadcast_to(self.roots, (n, len(self.roots)))
        for _ in range(self.depth):
            x = X[rows, self.feature[idx]]
            go_left = (x <= self.threshold[idx]) | (np.isnan(x) & self.missing_left[idx])
            child = np.where(go_left, self.left[idx], self.right[idx])
            idx = np.where(self.is_leaf[idx], idx, child)
        result: np.ndarray = self.value[idx] @ self._onehot + self.baseline
        return result

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Calibrated probabilities (n, 3) in :data:`CLASSES` order: ``softmax(raw / temperature)``."""
        z = self.raw(X) / self.temperature
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        result: np.ndarray = e / e.sum(axis=1, keepdims=True)
        return result

    def vector(self, named: Mapping[str, float]) -> np.ndarray:
        """The input row for ``named`` features, in :attr:`feature_names` order."""
        missing = [n for n in self.feature_names if n not in named]
        if missing:
            raise UsageError(f"event scorer: {len(missing)} input feature(s) missing: {_some(missing)}")
        return np.array([named[n] for n in self.feature_names], dtype=np.float64)

    @classmethod
    def from_sklearn(
        cls,
        clf: Any,
        feature_names: Sequence[str],
        *,
        signal_version: int,
        temperature: float = 1.0,
        thresholds: Mapping[str, float] | None = None,
        card: Mapping[str, Any] | None = None,
    ) -> EventScorerModel:
        """Export a fitted 3-class ``HistGradientBoostingClassifier`` fitted on labels 0=death, 1=reward, 2=none."""
        predictors = getattr(clf, "_predictors", None)
        if not predictors:
            raise ValueError("the classifier is not fitted (no trees)")
        classes = [c.item() if hasattr(c, "item") else c for c in getattr(clf, "classes_", [])]
        if classes != [0, 1, 2]:
            raise ValueError(f"the classifier's classes are {classes}, expected [0, 1, 2] (= {', '.join(CLASSES)})")
        names = list(feature_names)
        n_in = getattr(clf, "n_features_in_", len(names))
        if len(names) != n_in:
            raise ValueError(f"{len(names)} feature names for a classifier of {n_in} features")
        fitted_names = getattr(clf, "feature_names_in_", None)
        if fitted_names is not None and list(fitted_names) != names:
            raise ValueError("feature names differ from the ones the classifier was fitted with")
        baseline = np.asarray(clf._baseline_prediction, dtype=np.float64).reshape(-1)
        if baseline.shape != (len(CLASSES),):
            raise ValueError(f"baseline has shape {baseline.shape}; only 3-class models are supported")

        parts: dict[str, list[np.ndarray]] = {name: [] for name in _NODE_ARRAYS}
        roots: list[int] = []
        tree_class: list[int] = []
        offset = 0
        for iteration in predictors:
            if len(iteration) != len(CLASSES):
                raise ValueError(f"{len(iteration)} trees per iteration; only 3-class models are supported")
            for k, predictor in enumerate(iteration):
                nodes = predictor.nodes
                if np.any(nodes["is_categorical"]):
                    raise ValueError("categorical splits are not supported")
                leaf = nodes["is_leaf"].astype(bool)
                n = len(nodes)
                own = np.arange(offset, offset + n)
                # Leaves point at themselves, so extra traversal steps stay put.
                parts["left"].append(np.where(leaf, own, nodes["left"].astype(np.int64) + offset))
                parts["right"].append(np.where(leaf, own, nodes["right"].astype(np.int64) + offset))
                parts["feature"].append(np.where(leaf, 0, nodes["feature_idx"]))
                parts["threshold"].append(np.where(leaf, 0.0, nodes["num_threshold"]))
                parts["is_leaf"].append(leaf)
                parts["value"].append(nodes["value"].astype(np.float64))
                parts["missing_left"].append(nodes["missing_go_to_left"].astype(bool))
                roots.append(offset)
                tree_class.append(k)
                offset += n
        flat = {name: np.concatenate(arrs) for name, arrs in parts.items()}
        return cls(
            feature=flat["feature"],
            threshold=flat["threshold"],
            left=flat["left"],
            right=flat["right"],
            is_leaf=flat["is_leaf"],
            value=flat["value"],
            missing_left=flat["missing_left"],
            roots=np.array(roots),
            tree_class=np.array(tree_class),
            baseline=baseline,
            feature_names=names,
            signal_version=signal_version,
            temperature=temperature,
            thresholds=thresholds,
            card=card,
        )

    def meta(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "signal_version": self.signal_version,
            "feature_names": self.feature_names,
            "classes": list(CLASSES),
            "temperature": self.temperature,
            "thresholds": self.thresholds,
            "card": self.card,
            "depth": self.depth,
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write one ``.npz``, through a temporary file beside it, so a crash never leaves half a file."""
        path = Path(path)
        meta = json.dumps(self.meta())
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:  # a file object: savez would add ".npz" to a name
                np.savez_compressed(f, meta=np.array(meta), **{name: getattr(self, name) for name in _ARRAYS})
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        signal_version: int | None = None,
        available: set[str] | None = None,
    ) -> EventScorerModel:
        """Read a model written by :meth:`save`; every problem is a one-line UsageError naming ``path``."""
        if not Path(path).is_file():
            raise UsageError(f"{path}: event scorer model not found")
        try:
            with np.load(path, allow_pickle=False) as data:
                if not isinstance(data, np.lib.npyio.NpzFile):
                    raise UsageError(f"{path}: not an event scorer model (not an .npz file)")
                arrays = {name: data[name] for name in data.files}
        except UsageError:
            raise
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise UsageError(f"{path}: not an event scorer model (unreadable .npz: {first_line(exc)})") from None
        if "meta" not in arrays:
            raise UsageError(f"{path}: not an event scorer model (no meta entry)")
        try:
            meta = json.loads(str(arrays["meta"][()]))
        except (ValueError, IndexError) as exc:
            raise UsageError(f"{path}: unreadable meta entry ({first_line(exc)})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else None
            raise UsageError(f"{path}: not an event scorer model (format {found!r}, expected {FORMAT!r})")
        version = meta.get("format_version")
        if not isinstance(version, int) or version < 1:
            raise UsageError(f"{path}: bad format version {version!r}")
        if version > FORMAT_VERSION:
            raise UsageError(f"{path}: format version {version} is newer than this build reads ({FORMAT_VERSION})")
        if signal_version is not None and meta.get("signal_version") != signal_version:
            raise UsageError(
                f"{path}: was trained on signal version {meta.get('signal_version')}; this build computes version "
                f"{signal_version}: retrain it with `gamecopilot train scorer`"
            )
        if meta.get("classes") != list(CLASSES):
            raise UsageError(f"{path}: classes {meta.get('classes')} differ from {list(CLASSES)}")
        missing = [name for name in _ARRAYS if name not in arrays]
        if missing:
            raise UsageError(f"{path}: missing arrays: {_some(missing)}")
        names = meta.get("feature_names")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise UsageError(f"{path}: feature_names is not a list of names")
        if available is not None:
            unknown = [n for n in names if n not in available]
            if unknown:
                raise UsageError(
                    f"{path}: needs {len(unknown)} feature(s) this pipeline does not compute: {_some(unknown)}"
                )
        try:
            return cls(
                **{name: arrays[name] for name in _ARRAYS},
                feature_names=names,
                signal_version=int(meta["signal_version"]),
                temperature=float(meta.get("temperature", 1.0)),
                thresholds=meta.get("thresholds") or {},
                card=meta.get("card") or {},
                depth=meta.get("depth"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"{path}: broken event scorer model ({first_line(exc)})") from None
