"""Event-log loaders: MovieLens 100K, the Taobao UserBehavior sample and a generic CSV format.

    python -m models.data --dataset movielens-100k --data ../shared/data/ml-100k   # prints the data summary

Every loader returns a `Dataset`: all events sorted by time (ties keep file order), the raw item catalog
(item id -> category names/ids as strings) and a summary of counts. A malformed row raises `DataError`
naming the file and the 1-based line; nothing is skipped silently (events whose item has no catalog entry
are skipped and counted in `summary["skipped_unknown_item"]`).

Generic format (`csv`):
    events CSV, header containing user_id,item_id,ts[,action]; ts is epoch seconds or ISO 8601
    items CSV, header item_id,categories; categories separated by "|"
CSV files are read as UTF-8 (a leading byte-order mark, as Excel writes, is dropped); the line of a CSV error is
the file line where its record starts (a quoted field may span lines).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from models.errors import DataError

DATASETS = ("movielens-100k", "taobao", "csv")
# The real data sets, read-only, beside the repository (``../shared/data`` from its root): the default of every command
# and test that reads one, resolved from this file so the working directory does not matter.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ML100K = SHARED_DATA / "ml-100k"
TAOBAO_BEHAVIORS = ("pv", "cart", "fav", "buy")
# MovieLens 100K genre flags in u.item order (u.genre gives the same list; used when it is absent)
ML_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """``--dataset``, ``--data`` and ``--items``: the options that name an event log (every command that reads one)."""
    parser.add_argument("--dataset", choices=DATASETS, required=True)
    parser.add_argument("--data", required=True, help="events file or data folder (see models/data.py)")
    parser.add_argument("--items", help="items CSV (item_id,categories) for --dataset csv")


@dataclass(frozen=True, slots=True)
class Event:
    user_id: str  # as in the file
    item_id: str
    ts: float  # epoch seconds
    action: str  # ML-100K: the rating "1".."5"; Taobao: pv/cart/fav/buy; csv: the action column or ""
    line: int  # 1-based line number in the source events file


@dataclass
class Dataset:
    name: str  # "movielens-100k" | "taobao" | "csv"
    events: list[Event]  # all events, stable-sorted by ts (ties keep file order)
    catalog: dict[str, list[str]]  # item_id -> raw category names/ids
    summary: dict = field(default_factory=dict)

    def by_user(self) -> dict[str, list[Event]]:
        """Each user's events in (ts, file order); users in order of their first event."""
        users: dict[str, list[Event]] = {}
        for e in self.events:
            users.setdefault(e.user_id, []).append(e)
        return users


def _err(path: Path, line: int, msg: str) -> DataError:
    return DataError(f"{path}:{line}: {msg}")


def _records(reader) -> Iterator[tuple[int, list[str]]]:
    """(1-based file line where the record starts, row) for each record of a csv.reader."""
    start = reader.line_num + 1
    for row in reader:
        yield start, row
        start = reader.line_num + 1


def epoch_seconds(text: str) -> float:
    """The one reading of a timestamp string (data files and the worker's events alike): epoch seconds (int or
    float) or ISO 8601 (``Z`` or an offset; naive times are UTC, never the local zone). ValueError otherwise, or if
    it is not finite."""
    s = text.strip()
    try:
        ts = float(s)
    except ValueError:
        try:
            dt = datetime.fromisoformat(s)
        except ValueError:
            raise ValueError("want epoch seconds or ISO 8601") from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        ts = dt.timestamp()
    if not math.isfinite(ts):
        raise ValueError("not finite")
    return ts


def parse_ts(value: str, path: Path, line: int) -> float:
    """:func:`epoch_seconds`, with the file and line in the error."""
    try:
        return epoch_seconds(value)
    except ValueError as exc:
        raise _err(path, line, f"bad timestamp {value!r} ({exc})") from None


def _finish(name: str, events: list[Event], catalog: dict[str, list[str]], extra: dict) -> Dataset:
    events.sort(key=lambda e: e.ts)  # stable: ties keep file order
    if not events:
        raise DataError(f"{name}: no events loaded")
    cats = {c for e in events for c in catalog[e.item_id]}
    summary = {
        "dataset": name,
        "events": len(events),
        "users": len({e.user_id for e in events}),
        "items": len({e.item_id for e in events}),
        "categories": len(cats),
        "catalog_items": len(catalog),
        "catalog_categories": len({c for cs in catalog.values() for c in cs}),
        "actions": dict(sorted(Counter(e.action for e in events).items())),
        "first_ts": events[0].ts,
        "last_ts": events[-1].ts,
        "first_time": datetime.fromtimestamp(events[0].ts, UTC).isoformat(),
        "last_time": datetime.fromtimestamp(events[-1].ts, UTC).isoformat(),
        **extra,
    }
    return Dataset(name=name, events=events, catalog=catalog, summary=summary)


def read_genres(path: Path) -> list[str]:
    """u.genre (name|index lines) -> the genre names in index order."""
    rows: list[tuple[int, str]] = []
    for ln, row in enumerate(path.read_text(encoding="latin-1").splitlines(), 1):
        if not row.strip():
            continue
        parts = row.split("|")
        if len(parts) != 2 or not parts[0].strip() or not parts[1].strip().isdecimal():
            raise _err(path, ln, f"expected genre|index, got {row[:80]!r}")
        rows.append((int(parts[1]), parts[0]))
    if not rows:
        raise DataError(f"{path}: no genres")
    return [g for _, g in sorted(rows, key=lambda r: r[0])]


def load_movielens(data: str | Path) -> Dataset:
    """`data` is the ml-100k folder or its u.data file (u.item and u.genre are read beside it)."""
    p = Path(data)
    udata = p / "u.data" if p.is_dir() else p
    uitem, ugenre = udata.with_name("u.item"), udata.with_name("u.genre")
    for f in (udata, uitem):
        if not f.is_file():
            raise DataError(f"{f}: file not found")
    genres = read_genres(ugenre) if ugenre.is_file() else list(ML_GENRES)
    catalog: dict[str, list[str]] = {}
    with uitem.open(encoding="latin-1") as f:
        for ln, row in enumerate(f, 1):
            if not row.strip():
                continue
            parts = row.rstrip("\n").split("|")
            flags = parts[-len(genres) :]
            if len(parts) < 5 + len(genres) or any(x not in ("0", "1") for x in flags):
                raise _err(uitem, ln, f"expected item|title|date|video|url|{len(genres)} genre flags 0/1")
            catalog[parts[0]] = [g for g, x in zip(genres, flags, strict=True) if x == "1"]
    events: list[Event] = []
    skipped = 0
    with udata.open(encoding="latin-1") as f:
        for ln, row in enumerate(f, 1):
            if not row.strip():
                continue
            parts = row.split()
            if len(parts) != 4:
                raise _err(udata, ln, f"expected 4 tab-separated fields user item rating ts, got {len(parts)}")
            user, item, rating, ts = parts
            if rating not in ("1", "2", "3", "4", "5"):
                raise _err(udata, ln, f"bad rating {rating!r} (want 1..5)")
            if not catalog.get(item):
                skipped += 1
                continue
            events.append(Event(user, item, parse_ts(ts, udata, ln), rating, ln))
    return _finish("movielens-100k", events, catalog, {"skipped_unknown_item": skipped})


def load_taobao(data: str | Path) -> Dataset:
    """`data` is UserBehavior.csv (no header: user_id,item_id,category_id,behavior,ts) or its folder."""
    p = Path(data)
    path = p / "UserBehavior.csv" if p.is_dir() else p
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    catalog: dict[str, list[str]] = {}
    events: list[Event] = []
    with path.open(newline="", encoding="utf-8-sig") as f:
        for ln, row in _records(csv.reader(f)):
            if not row:
                continue
            if len(row) != 5:
                raise _err(path, ln, f"expected 5 fields user_id,item_id,category_id,behavior,ts, got {len(row)}")
            user, item, cat, behavior, ts = (x.strip() for x in row)
            if not user or not item or not cat:
                raise _err(path, ln, "empty user_id, item_id or category_id")
            if behavior not in TAOBAO_BEHAVIORS:
                raise _err(path, ln, f"bad behavior {behavior!r} (want one of {', '.join(TAOBAO_BEHAVIORS)})")
            cats = catalog.setdefault(item, [])
            if cat not in cats:
                cats.append(cat)
            events.append(Event(user, item, parse_ts(ts, path, ln), behavior, ln))
    return _finish("taobao", events, catalog, {"skipped_unknown_item": 0})


def _read_header(path: Path, reader, required: tuple[str, ...]) -> list[str]:
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise _err(path, 1, "empty file (want a header line)") from None
    missing = [c for c in required if c not in header]
    if missing:
        raise _err(path, 1, f"header lacks column(s) {', '.join(missing)} (header: {','.join(header)})")
    return header


def load_csv(data: str | Path, items: str | Path | None) -> Dataset:
    """Generic format: events CSV (user_id,item_id,ts[,action]) + items CSV (item_id,categories)."""
    epath = Path(data)
    if items is None:
        raise DataError("csv dataset needs an items file (--items PATH with header item_id,categories)")
    ipath = Path(items)
    for f in (epath, ipath):
        if not f.is_file():
            raise DataError(f"{f}: file not found")
    catalog: dict[str, list[str]] = {}
    with ipath.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = _read_header(ipath, reader, ("item_id", "categories"))
        ii, ci = header.index("item_id"), header.index("categories")
        for ln, row in _records(reader):
            if not row:
                continue
            if len(row) != len(header):
                raise _err(ipath, ln, f"expected {len(header)} fields, got {len(row)}")
            item = row[ii].strip()
            cats = [c.strip() for c in row[ci].split("|") if c.strip()]
            if not item:
                raise _err(ipath, ln, "empty item_id")
            if not cats:
                raise _err(ipath, ln, f"item {item!r} has no categories")
            if item in catalog:
                raise _err(ipath, ln, f"duplicate item_id {item!r}")
            catalog[item] = list(dict.fromkeys(cats))
    events: list[Event] = []
    skipped = 0
    with epath.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = _read_header(epath, reader, ("user_id", "item_id", "ts"))
        ui, ii, ti = header.index("user_id"), header.index("item_id"), header.index("ts")
        ai = header.index("action") if "action" in header else None
        for ln, row in _records(reader):
            if not row:
                continue
            if len(row) != len(header):
                raise _err(epath, ln, f"expected {len(header)} fields, got {len(row)}")
            user, item = row[ui].strip(), row[ii].strip()
            if not user or not item:
                raise _err(epath, ln, "empty user_id or item_id")
            ts = parse_ts(row[ti], epath, ln)
            if item not in catalog:
                skipped += 1
                continue
            action = row[ai].strip() if ai is not None else ""
            events.append(Event(user, item, ts, action, ln))
    return _finish("csv", events, catalog, {"skipped_unknown_item": skipped})


def load_dataset(name: str, data: str | Path, items: str | Path | None = None) -> Dataset:
    """Load one of DATASETS; see the module docstring for what `data` and `items` are."""
    if name == "movielens-100k":
        return load_movielens(data)
    if name == "taobao":
        return load_taobao(data)
    if name == "csv":
        return load_csv(data, items)
    raise DataError(f"unknown dataset {name!r} (want one of {', '.join(DATASETS)})")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="print the summary of a data set")
    add_dataset_arguments(ap)
    a = ap.parse_args()
    print(json.dumps(load_dataset(a.dataset, a.data, a.items).summary, indent=2))
