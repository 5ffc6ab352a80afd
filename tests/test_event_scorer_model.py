"""EventScorerModel: numpy evaluation matches scikit-learn, the file round-trips, every bad file is one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from copilot.errors import UsageError
from engines.event_scorer_model import CLASSES, FORMAT, EventScorerModel

NAMES = [f"f{i}" for i in range(6)]


def _data(n: int = 600, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three separable-ish classes from six features, with NaNs sprinkled in."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, len(NAMES)))
    score = np.stack([X[:, 0] + 0.5 * X[:, 1], X[:, 2] - X[:, 3], 0.3 * X[:, 4]], axis=1)
    y = np.argmax(score + rng.normal(scale=0.5, size=score.shape), axis=1)
    X[rng.random(X.shape) < 0.1] = np.nan
    return X, y


def _fit(X: np.ndarray, y: np.ndarray) -> Any:
    ensemble = pytest.importorskip("sklearn.ensemble")
    return ensemble.HistGradientBoostingClassifier(max_iter=30, max_depth=4, random_state=0).fit(X, y)


@pytest.fixture(scope="module")
def fitted() -> tuple[Any, np.ndarray]:
    X, y = _data()
    return _fit(X, y), X


@pytest.fixture
def saved(fitted: tuple[Any, np.ndarray], tmp_path: Path) -> Path:
    clf, _ = fitted
    path = tmp_path / "scorer.npz"
    EventScorerModel.from_sklearn(clf, NAMES, signal_version=3).save(path)
    return path


def _one_line(exc: pytest.ExceptionInfo[UsageError], path: Path) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith(str(path))
    return msg


def test_raw_and_proba_match_sklearn(fitted: tuple[Any, np.ndarray]) -> None:
    clf, X = fitted
    X_new, _ = _data(n=300, seed=1)
    X_all = np.vstack([X, X_new, np.full((1, len(NAMES)), np.nan)])
    assert np.isnan(X_all).any()
    model = EventScorerModel.from_sklearn(clf, NAMES, signal_version=3)
    assert model.n_trees == 30 * 3 and model.depth <= 4
    np.testing.assert_allclose(model.raw(X_all), clf.decision_function(X_all), rtol=0, atol=1e-9)
    proba = model.predict_proba(X_all)
    np.testing.assert_allclose(proba, clf.predict_proba(X_all), rtol=0, atol=1e-9)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-12)
    # The model really discriminates: not just the baseline.
    assert proba.max(axis=1).mean() > 0.6
    one = model.predict_proba(X_all[5])
    assert one.shape == (1, 3)
    np.testing.assert_allclose(one[0], proba[5], atol=1e-12)


def test_save_load_round_trip(fitted: tuple[Any, np.ndarray], tmp_path: Path) -> None:
    clf, X = fitted
    card = {"games": ["Breakout"], "seeds": [0, 1], "f1": 0.8}
    model = EventScorerModel.from_sklearn(
        clf, NAMES, signal_version=3, temperature=1.7, thresholds={"death": 0.4, "reward": 0.6}, card=card
    )
    path = tmp_path / "model.npz"
    model.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["model.npz"]  # no temporary left behind
    loaded = EventScorerModel.load(path, signal_version=3, available=set(NAMES) | {"extra"})
    np.testing.assert_array_equal(loaded.predict_proba(X), model.predict_proba(X))
    assert loaded.feature_names == NAMES
    assert loaded.temperature == 1.7
    assert loaded.thresholds == {"death": 0.4, "reward": 0.6}
    assert loaded.card == card
    assert loaded.signal_version == 3
    assert loaded.depth == model.depth
    # Saving again over the file replaces it.
    EventScorerModel.from_sklearn(clf, NAMES, signal_version=4).save(path)
    assert EventScorerModel.load(path).signal_version == 4


def test_temperature_flattens(fitted: tuple[Any, np.ndarray]) -> None:
    clf, X = fitted
    sharp = EventScorerModel.from_sklearn(clf, NAMES, signal_version=3).predict_proba(X)
    flat = EventScorerModel.from_sklearn(clf, NAMES, signal_version=3, temperature=3.0).predict_proba(X)
    assert np.all(flat.max(axis=1) < sharp.max(axis=1))
    np.testing.assert_array_equal(flat.argmax(axis=1), sharp.argmax(axis=1))
    np.testing.assert_allclose(flat.sum(axis=1), 1.0, atol=1e-12)


def test_vector_orders_by_name_and_refuses_missing(fitted: tuple[Any, np.ndarray]) -> None:
    clf, _ = fitted
    model = EventScorerModel.from_sklearn(clf, NAMES, signal_version=3)
    named = {name: float(i) * 10 for i, name in reversed(list(enumerate(NAMES)))}
    named["unused"] = -1.0
    np.testing.assert_array_equal(model.vector(named), [0.0, 10.0, 20.0, 30.0, 40.0, 50.0])
    with pytest.raises(UsageError) as exc:
        model.vector({"f0": 1.0})
    msg = str(exc.value)
    assert "\n" not in msg
    assert "f1, f2, f3, f4, f5" in msg and "f0" not in msg
    with pytest.raises(UsageError) as exc:
        model.vector({})
    assert "\n" not in str(exc.value) and "f0, f1, f2, f3, f4 +1 more" in str(exc.value)


def test_load_refuses_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.npz"
    with pytest.raises(UsageError) as exc:
        EventScorerModel.load(path)
    assert "not found" in _one_line(exc, path)


def test_load_refuses_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.npz"
    path.write_text("this is not a model\nsecond line\n")
    with pytest.raises(UsageError) as exc:
        EventScorerModel.load(path)
    assert "not an event scorer model" in _one_line(exc, path)


def _rewrite_meta(path: Path, **changes: Any) -> None:
    with np.load(path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    meta = json.loads(str(arrays["meta"][()]))
    meta.update(changes)
    arrays["meta"] = np.array(json.dumps(meta))
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)


def test_load_refuses_wrong_format(saved: Path) -> None:
    _rewrite_meta(saved, format="something-else")
    with pytest.raises(UsageError) as exc:
        EventScorerModel.load(saved)
    msg = _one_line(exc, saved)
    assert "something-else" in msg and FORMAT in msg


def test_load_refuses_newer_format_version(saved: Path) -> None:
    _rewrite_meta(saved, format_version=99)
    with pytest.raises(UsageError) as exc:
        EventScorerModel.load(saved)
    assert "format version 99 is newer" in _one_line(exc, saved)


def test_load_refuses_other_signal_version(saved: Path) -> None:
    assert EventScorerModel.load(saved, signal_version=3).signal_version == 3
    with pytest.raises(UsageError) as exc:
        EventScorerModel.load(saved, signal_version=4)
    msg = _one_line(exc, saved)
    assert "signal version 3; this build computes version 4" in msg
    assert "gamecopilot train scorer" in msg


def test_load_refuses_missing_arrays(saved: Path) -> None:
    with np.load(saved, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files if name not in ("value", "roots")}
    with open(saved, "wb") as f:
        np.savez_compressed(f, **arrays)
    with pytest.raises(UsageError) as exc:
        EventScorerModel.load(saved)
    msg = _one_line(exc, saved)
    assert "value" in msg and "roots" in msg


def test_load_refuses_unavailable_features(saved: Path) -> None:
    with pytest.raises(UsageError) as exc:
        EventScorerModel.load(saved, available={"f0", "f2"})
    msg = _one_line(exc, saved)
    assert "f1, f3, f4, f5" in msg and "f0" not in msg


def test_load_refuses_broken_trees(saved: Path) -> None:
    with np.load(saved, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    arrays["left"] = arrays["left"] + 10**6
    with open(saved, "wb") as f:
        np.savez_compressed(f, **arrays)
    with pytest.raises(UsageError) as exc:
        EventScorerModel.load(saved)
    assert "out of range" in _one_line(exc, saved)


def test_from_sklearn_refuses_other_classes() -> None:
    X, y = _data(n=300)
    with pytest.raises(ValueError, match=r"classes are \[1, 2, 3\]"):
        EventScorerModel.from_sklearn(_fit(X, y + 1), NAMES, signal_version=3)
    binary = _fit(X, np.minimum(y, 1))
    with pytest.raises(ValueError, match=r"classes are \[0, 1\]"):
        EventScorerModel.from_sklearn(binary, NAMES, signal_version=3)


def test_from_sklearn_refuses_wrong_feature_count(fitted: tuple[Any, np.ndarray]) -> None:
    clf, _ = fitted
    with pytest.raises(ValueError, match="5 feature names"):
        EventScorerModel.from_sklearn(clf, NAMES[:5], signal_version=3)


def test_classes_order() -> None:
    assert CLASSES == ("death", "reward", "none")
