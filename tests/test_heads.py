import numpy as np
import pytest
import torch

from headmaster.heads import HeadMLP, class_weights, load_head, save_checkpoint, stratified_split, train_head
from headmaster.heads.base import best_f1_threshold, binary_metrics

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


def test_best_f1_threshold_leaves_both_buckets_reachable():
    """Imbalanced scores whose F1 is best at 0.96 (hat against everything else): a score within 0.1 of the
    threshold is uncertain, so 0.96 would sort nothing into positive. The sweep stops at 0.89."""
    from headmaster.heads import HeadRules, decidable_thresholds

    y = np.array([0] * 40 + [1] * 4)
    p = np.array([0.01] * 34 + [0.3, 0.6, 0.88, 0.93, 0.94, 0.95] + [0.97, 0.99, 1.0, 1.0])
    t = best_f1_threshold(y, p)
    assert binary_metrics(y, p, 0.96)["f1"] == 1.0  # the unconstrained sweep's pick
    assert decidable_thresholds() == (0.11, 0.89) and t == 0.89
    rules = HeadRules({"type": "binary", "classes": ["negative", "positive"], "threshold": t})
    assert [b for b, _ in rules.decide(np.stack([1 - p, p], axis=1))].count("positive") == 2  # 0.99 and up
    rules = HeadRules({"type": "binary", "classes": ["negative", "positive"], "threshold": 0.96})
    assert "positive" not in [b for b, _ in rules.decide(np.stack([1 - p, p], axis=1))]  # the trap avoided


def test_best_f1_threshold_finds_gap():
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    t = best_f1_threshold(y, p)
    assert 0.3 < t <= 0.7


def test_a_threshold_past_the_band_is_warned_about():
    from headmaster.heads.training import threshold_trap

    binary = {"type": "binary", "classes": ["negative", "positive"]}
    assert threshold_trap({**binary, "threshold": 0.5}) is None
    assert threshold_trap({"type": "multiclass", "classes": ["a", "b", "c"], "threshold": None}) is None
    high = threshold_trap({**binary, "threshold": 0.95})
    assert high == ("threshold 0.95 with the uncertain band of ±0.1 leaves nothing for 'positive' (a score would have "
                    "to be above 1.05): use a threshold from 0.11 to 0.89")
    assert "nothing for 'negative'" in threshold_trap({**binary, "threshold": 0.05})
    assert threshold_trap({**binary, "threshold": 0.95, "margin": 0.02}) is None  # a narrower band (--max-error)
