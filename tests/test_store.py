import sqlite3

import numpy as np
import pytest

from headmaster import HeadmasterError
from headmaster.store import Store


def _columns(conn, table):
    return [(r[1], r[2], r[3], r[5]) for r in conn.execute(f"PRAGMA table_info({table})")]


def test_seed_schema_exactly(tmp_path):
    Store(tmp_path / "headmaster.db").close()
    conn = sqlite3.connect(tmp_path / "headmaster.db")
    assert _columns(conn, "models") == [("id", "INTEGER", 0, 1), ("name", "TEXT", 1, 0), ("path", "TEXT", 1, 0),
                                        ("embed_dim", "INTEGER", 1, 0), ("active", "INTEGER", 1, 0)]
    assert _columns(conn, "embeddings") == [("hash", "TEXT", 1, 1), ("model_id", "INTEGER", 1, 2),
                                            ("vector", "BLOB", 1, 0)]
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_exactly_one_active_and_remove_deletes_embeddings(tmp_path):
    store = Store(tmp_path / "h.db")
    a = store.add_model("a", "org/a", 4)
    b = store.add_model("b", "org/b", 4)
    assert a.active and not b.active  # the first model is activated
    store.activate_model("b")
    assert [m.name for m in store.models() if m.active] == ["b"]
    store.put_vectors(a.id, [("h1", np.ones(4)), ("h2", np.zeros(4))])
    store.put_vectors(b.id, [("h1", np.ones(4))])
    assert store.remove_model("a") == 2
    assert store.embedding_count() == 1
    with pytest.raises(HeadmasterError, match="unknown model 'a'"):
        store.activate_model("a")
    with pytest.raises(HeadmasterError, match="already registered"):
        store.add_model("b", "x", 3)


def test_vectors_round_trip_float32(tmp_path):
    store = Store(tmp_path / "h.db")
    m = store.add_model("a", "org/a", 3)
    store.put_vectors(m.id, [("h", np.array([1.5, -2.0, 3.25]))])
    v = store.vectors(m.id, ["h", "missing"])
    assert list(v) == ["h"] and v["h"].dtype == np.float32 and v["h"].tolist() == [1.5, -2.0, 3.25]
    raw = sqlite3.connect(tmp_path / "h.db").execute("SELECT vector FROM embeddings").fetchone()[0]
    assert len(raw) == 12


def test_no_active_model_message(tmp_path):
    with pytest.raises(HeadmasterError, match="no model registered"):
        Store(tmp_path / "h.db").active_model()


def test_file_signatures_tell_which_contents_have_a_vector(tmp_path):
    from headmaster.store import FileRecord

    store = Store(tmp_path / "h.db")
    a = store.add_model("a", "org/a", 2)
    b = store.add_model("b", "org/b", 2)
    store.put_file_records([FileRecord("/x/1.jpg", 10, 100, 7, "h1"), FileRecord("/x/2.jpg", 20, 200, 8, "h2")])
    store.put_vectors(a.id, [("h1", np.ones(2))])
    store.put_vectors(b.id, [("h2", np.ones(2))], flipped=True)
    keys = ["/x/1.jpg", "/x/2.jpg", "/x/unknown.jpg"]
    assert store.file_signatures(keys) == {"/x/1.jpg": (10, 100, 7, "h1", 0), "/x/2.jpg": (20, 200, 8, "h2", 0)}
    assert {k: v[4] for k, v in store.file_signatures(keys, a.id).items()} == {"/x/1.jpg": 1, "/x/2.jpg": 0}
    assert {k: v[4] for k, v in store.file_signatures(keys, b.id).items()} == {"/x/1.jpg": 0, "/x/2.jpg": 0}
    assert {k: v[4] for k, v in store.file_signatures(keys, b.id, flipped=True).items()} == \
        {"/x/1.jpg": 0, "/x/2.jpg": 1}
