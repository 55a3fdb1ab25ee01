import numpy as np
import pytest
import torch

from headmaster.heads import HeadMLP, class_weights, load_head, save_checkpoint, stratified_split, train_head
from headmaster.heads.base import best_f1_threshold

SEED_KEYS_BINARY = {"type", "input_dim", "model", "model_state_dict", "threshold", "classes", "sources", "metadata"}


def _blobs(n_per_class, n_classes, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim)) * 3
    x = np.concatenate([centres[c] + rng.normal(size=(n_per_class, dim)) for c in range(n_classes)])
    y = np.repeat(np.arange(n_classes), n_per_class)
    return x.astype(np.float32), y


def test_binary_checkpoint_layout_and_weights_only(tmp_path):
    x, y = _blobs(30, 2)
    sources = {"negative": ["h/negative/a.jpg"], "positive": ["h/positive/b.jpg"]}
    out = train_head("h", ["negative", "positive"], x, y, sources, "clip-b")
    ck = out.checkpoint
    assert set(ck) >= SEED_KEYS_BINARY and ck["type"] == "binary" and ck["input_dim"] == 16
    assert set(ck["metadata"]) == {"head", "created_at", "metrics"}
    assert set(ck["metadata"]["metrics"]) == {"accuracy", "precision", "recall", "f1"}
    assert ck["metadata"]["metrics"]["accuracy"] > 0.9
    assert list(ck["model_state_dict"]) == ["input_mean", *[f"net.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")]]
    path = tmp_path / "out" / "h.pt"
    save_checkpoint(ck, path)
    assert [p.name for p in path.parent.iterdir()] == ["h.pt"]  # no temp file left behind
    raw = torch.load(path, weights_only=True)
    assert raw["classes"] == ["negative", "positive"] and raw["sources"] == sources
    head = load_head(path)
    probs = head.predict_proba(x)
    assert ((probs[:, 1] >= head.threshold).astype(int) == y).mean() > 0.9


def test_multiclass_metrics_and_uncertain_rule():
    x, y = _blobs(25, 4, seed=1)
    classes = ["a", "b", "c", "d"]
    ck = train_head("w", classes, x, y, {c: [] for c in classes}, "m").checkpoint
    assert ck["type"] == "multiclass" and "threshold" not in ck
    assert set(ck["metadata"]["metrics"]["per_class"]) == set(classes)
    from headmaster.heads import TrainedHead
    head = TrainedHead(ck, HeadMLP(16, 4))
    decisions = head.decide(np.array([[0.4, 0.3, 0.2, 0.1], [0.1, 0.7, 0.1, 0.1]]))
    assert decisions[0][0] == "uncertain" and decisions[1] == ("b", pytest.approx(0.7))


def test_binary_uncertain_band():
    from headmaster.heads import TrainedHead
    head = TrainedHead({"type": "binary", "classes": ["neg", "pos"], "threshold": 0.4, "input_dim": 2},
                       HeadMLP(2, 1))
    labels = [d[0] for d in head.decide(np.array([[0.1, 0.9], [0.55, 0.45], [0.75, 0.25], [0.69, 0.31]]))]
    assert labels == ["pos", "uncertain", "neg", "uncertain"]


def test_threshold_override_is_kept():
    x, y = _blobs(20, 2, seed=2)
    from headmaster.heads import TrainConfig
    ck = train_head("h", ["n", "p"], x, y, {}, "m", TrainConfig(threshold=0.77)).checkpoint
    assert ck["threshold"] == 0.77


def test_split_is_stratified_and_seeded():
    y = np.array([0] * 50 + [1] * 10)
    tr, va = stratified_split(y, 0.2, seed=3)
    assert sorted(np.bincount(y[va]).tolist()) == [2, 10]
    assert set(tr) | set(va) == set(range(60)) and not set(tr) & set(va)
    assert (stratified_split(y, 0.2, seed=3)[1] == va).all()
    assert not (stratified_split(y, 0.2, seed=4)[1] == va).all()


def test_class_weights_inverse_frequency():
    w = class_weights(np.array([0] * 30 + [1] * 10), 2)
    assert w[1] / w[0] == pytest.approx(3.0)


def test_best_f1_threshold_finds_gap():
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    t = best_f1_threshold(y, p)
    assert 0.3 < t <= 0.7
