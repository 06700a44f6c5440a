from pathlib import Path

import pytest

from models.data import load_dataset
from models.errors import DataError
from models.vocab import OTHER, build_vocabulary
from tests.model_fixtures import ML100K, TAOBAO, write_csv_dataset

needs_data = pytest.mark.skipif(not ML100K.is_dir(), reason="real data not found")
needs_taobao = pytest.mark.skipif(not TAOBAO.is_dir(), reason="Taobao sample not found")


@pytest.fixture(scope="module")
def ml():
    return load_dataset("movielens-100k", ML100K)


@needs_data
def test_movielens_counts_match_readme(ml):
    s = ml.summary
    assert (s["events"], s["users"], s["items"], s["categories"]) == (100_000, 943, 1_682, 19)
    assert s["first_time"].startswith("1997-09-20") and s["last_time"].startswith("1998-04-22")
    assert set(s["actions"]) == {"1", "2", "3", "4", "5"}
    assert len(ml.catalog["1"]) == 3 and set(ml.catalog["1"]) == {"Animation", "Children's", "Comedy"}


@needs_data
def test_movielens_events_sorted_stably_with_lines(ml):
    ts = [e.ts for e in ml.events]
    assert ts == sorted(ts)
    for a, b in zip(ml.events, ml.events[1:], strict=False):
        if a.ts == b.ts:
            assert a.line < b.line
    first = next(e for e in ml.events if e.line == 1)
    assert (first.user_id, first.item_id, first.action, first.ts) == ("196", "242", "3", 881250949.0)
    users = ml.by_user()
    assert len(users) == 943 and sum(map(len, users.values())) == 100_000
    assert all(u[i].ts <= u[i + 1].ts for u in users.values() for i in range(len(u) - 1))


@needs_taobao
def test_taobao_counts_match_readme():
    ds = load_dataset("taobao", TAOBAO)
    s = ds.summary
    assert (s["events"], s["users"], s["items"], s["categories"]) == (84_475, 815, 55_368, 2_914)
    assert set(s["actions"]) == {"pv", "cart", "fav", "buy"}
    v = build_vocabulary(ds, top_k=50)
    assert len(v.categories) == 51 and v.categories[-1] == OTHER
    assert len(v.category_index) == 2_914  # every raw category maps somewhere
    assert sum(i == 50 for i in v.category_index.values()) == 2_914 - 50


def test_csv_loader_iso_and_epoch(tmp_path: Path):
    epath, ipath = write_csv_dataset(tmp_path, users=4, events=5)
    ds = load_dataset("csv", epath, ipath)
    assert ds.summary["events"] == 20 and ds.summary["users"] == 4
    assert all(isinstance(e.ts, float) for e in ds.events)
    u0 = ds.by_user()["u0"]  # ISO times
    u1 = ds.by_user()["u1"]  # epoch times
    assert u0[0].ts > 1.5e9 and u1[0].ts > 1.5e9
    assert {e.action for e in ds.events} <= {"view", "buy"}


def test_csv_without_action_and_unknown_item(tmp_path: Path):
    (tmp_path / "items.csv").write_text("item_id,categories\na,x|y\nb,z\n")
    (tmp_path / "events.csv").write_text("ts,user_id,item_id\n2024-01-01T00:00:00+01:00,u,a\n5,u,b\n6,u,nope\n")
    ds = load_dataset("csv", tmp_path / "events.csv", tmp_path / "items.csv")
    assert [e.item_id for e in ds.events] == ["b", "a"]  # 5 s < 2023-12-31T23:00Z
    assert ds.events[1].ts == 1704063600.0 and ds.events[0].action == ""
    assert ds.summary["skipped_unknown_item"] == 1
    assert ds.catalog["a"] == ["x", "y"]
    v = build_vocabulary(ds)
    assert v.actions == ["event"] and v.default_action == "event"


def test_vocabulary_cut_counts_only_train_prefixes(tmp_path: Path):
    # 10 events per user: the first 8 (the train prefix) each of another category, the last two (validation and
    # test) both "late", the most frequent category overall: the cut must not keep it.
    items = "abcdefgh"
    (tmp_path / "items.csv").write_text("item_id,categories\n" + "".join(f"{i},{i}\n" for i in items) + "z,late\n")
    rows = ["user_id,item_id,ts"]
    for u in range(3):
        rows += [f"u{u},{item},{t}" for t, item in enumerate([*items, "z", "z"])]
    (tmp_path / "events.csv").write_text("\n".join(rows) + "\n")
    ds = load_dataset("csv", tmp_path / "events.csv", tmp_path / "items.csv")
    v = build_vocabulary(ds, top_k=2)
    assert v.categories == ["a", "b", OTHER]
    assert v.category_index["late"] == 2


@pytest.mark.parametrize(
    ("events", "where", "what"),
    [
        ("user_id,item_id,ts\nu,a,1\nu,a,yesterday\n", ":3:", "bad timestamp"),
        ("user_id,item_id,ts\nu,a,1\nu,a\n", ":3:", "expected 3 fields"),
        ("user,item_id,ts\nu,a,1\n", ":1:", "user_id"),
        ("user_id,item_id,ts\n,a,1\n", ":2:", "empty"),
        ("user_id,item_id,ts\nu,a,nan\n", ":2:", "not finite"),
    ],
)
def test_malformed_csv_names_file_and_line(tmp_path: Path, events: str, where: str, what: str):
    (tmp_path / "items.csv").write_text("item_id,categories\na,x\n")
    (tmp_path / "events.csv").write_text(events)
    with pytest.raises(DataError) as e:
        load_dataset("csv", tmp_path / "events.csv", tmp_path / "items.csv")
    assert f"events.csv{where}" in str(e.value) and what in str(e.value)


def test_malformed_items_and_real_formats(tmp_path: Path):
    (tmp_path / "items.csv").write_text("item_id,categories\na,x\nb,\n")
    (tmp_path / "events.csv").write_text("user_id,item_id,ts\nu,a,1\n")
    with pytest.raises(DataError, match=r"items\.csv:3: item 'b' has no categories"):
        load_dataset("csv", tmp_path / "events.csv", tmp_path / "items.csv")
    with pytest.raises(DataError, match="needs an items file"):
        load_dataset("csv", tmp_path / "events.csv")
    tb = tmp_path / "UserBehavior.csv"
    tb.write_text("1,2,3,pv,1511544070\n1,2,3,click,1511544071\n")
    with pytest.raises(DataError, match=r"UserBehavior\.csv:2: bad behavior 'click'"):
        load_dataset("taobao", tb)
    with pytest.raises(DataError, match="not found"):
        load_dataset("taobao", tmp_path / "missing.csv")
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("netflix", tmp_path)


@needs_data
def test_movielens_bad_rating(tmp_path: Path):
    (tmp_path / "u.item").write_bytes((ML100K / "u.item").read_bytes())
    (tmp_path / "u.data").write_text("1\t1\t5\t881250949\n1\t2\t6\t881250950\n")
    with pytest.raises(DataError, match=r"u\.data:2: bad rating '6'"):
        load_dataset("movielens-100k", tmp_path)


def _ml_folder(folder: Path, genre: str) -> Path:
    """A two-genre ML-100K folder: u.genre as given, one item, one rating."""
    (folder / "u.genre").write_text(genre)
    (folder / "u.item").write_text("1|Toy Story|01-Jan-1995||http://x|0|1\n")
    (folder / "u.data").write_text("1\t1\t5\t881250949\n")
    return folder


def test_movielens_genre_file(tmp_path: Path):
    ds = load_dataset("movielens-100k", _ml_folder(tmp_path, "Drama|1\nunknown|0\n\n"))
    assert ds.catalog["1"] == ["Drama"]
    for bad, line in (("unknown|0\nDrama\n", 2), ("unknown|zero\nDrama|1\n", 1), ("\na|0|1\n", 2)):
        with pytest.raises(DataError, match=rf"u\.genre:{line}: expected genre\|index"):
            load_dataset("movielens-100k", _ml_folder(tmp_path, bad))
    with pytest.raises(DataError, match=r"u\.genre: no genres"):
        load_dataset("movielens-100k", _ml_folder(tmp_path, "\n"))


def test_csv_error_lines_are_file_lines_after_a_multiline_field(tmp_path: Path):
    (tmp_path / "items.csv").write_text('item_id,categories\na,x\n"b\nc",y\nd\n')
    (tmp_path / "events.csv").write_text('user_id,item_id,ts,action\nu,a,1,"two\nlines"\nu,a,2,ok\nu,a,never,ok\n')
    with pytest.raises(DataError, match=r"items\.csv:5: expected 2 fields, got 1"):
        load_dataset("csv", tmp_path / "events.csv", tmp_path / "items.csv")
    (tmp_path / "items.csv").write_text("item_id,categories\na,x\n")
    with pytest.raises(DataError, match=r"events\.csv:5: bad timestamp 'never'"):
        load_dataset("csv", tmp_path / "events.csv", tmp_path / "items.csv")
    (tmp_path / "events.csv").write_text('user_id,item_id,ts,action\nu,a,1,"two\nlines"\n\nu,a,2,ok\n')
    ds = load_dataset("csv", tmp_path / "events.csv", tmp_path / "items.csv")
    assert [e.line for e in ds.events] == [2, 5]  # the line where each record starts
    tb = tmp_path / "UserBehavior.csv"
    tb.write_text('1,2,"3\n3",pv,1511544070\n1,2,3,click,1511544071\n')
    with pytest.raises(DataError, match=r"UserBehavior\.csv:3: bad behavior 'click'"):
        load_dataset("taobao", tb)


def test_csv_with_utf8_byte_order_mark(tmp_path: Path):
    (tmp_path / "items.csv").write_text("item_id,categories\na,x\n", encoding="utf-8-sig")
    (tmp_path / "events.csv").write_text("user_id,item_id,ts\nu,a,1\n", encoding="utf-8-sig")
    ds = load_dataset("csv", tmp_path / "events.csv", tmp_path / "items.csv")
    assert ds.summary["events"] == 1 and ds.catalog == {"a": ["x"]}
    tb = tmp_path / "UserBehavior.csv"
    tb.write_text("1,2,3,pv,1511544070\n", encoding="utf-8-sig")
    assert load_dataset("taobao", tb).events[0].user_id == "1"
