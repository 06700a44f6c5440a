"""Hostile input: the event decoder never crashes, bad events are dead-lettered with a reason, bad models refused.

* a hypothesis property test of ``EventDecoder.decode`` on arbitrary bytes and on JSON built to look like events;
* a corpus of > 10,000 bad events (invalid UTF-8, bad JSON, wrong types, sizes beyond the limits, non-finite and
  far-future times, unknown items/categories/actions, user ids made for Redis key injection) interleaved with real
  ML-100K events through a real worker: every bad one reaches the DLQ with ``dlq.reason``, the worker stays up, the
  oracle passes for the good ones and Redis holds no key derived from an unsafe id;
* wrong, corrupt or mismatched model files: the worker exits non-zero with one clear line, never a traceback.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from streams.core.events import ALLOWED_FIELDS, Click, EventDecoder, Limits, Rejected
from tests.harness import (
    applied_events,
    consume_all,
    ml_events,
    model_names,
    produce,
    redis_target,
    start_worker,
    user_keys,
    wait_for,
)

SAFE_ID = re.compile(r"^[A-Za-z0-9._@-]{1,128}$")
REASONS = {
    "empty",
    "oversized",
    "bad_json",
    "not_object",
    "unknown_field",
    "missing_field",
    "bad_user_id",
    "bad_ts",
    "future_ts",
    "bad_categories",
    "bad_category",
    "unknown_category",
    "bad_item_id",
    "unknown_item",
    "bad_action",
    "unknown_action",
    "bad_event_id",
}

# --- property test: a small stand-in vocabulary, so it runs without a model ----------------------------------------

CATS = {"Drama": 0, "Comedy": 1, "Action": 2, "7": 3}
CATALOG = {"1": (0,), "2": (1, 2), "42": (3,)}
ACTIONS = {"click": 1, "buy": 2, "5": 3}


def action_index(action: str | None) -> int:
    if not action:
        return 0
    return ACTIONS[action]


NOW = 1_700_000_000.0
DECODER = EventDecoder(CATALOG, CATS, action_index, Limits(), now=lambda: NOW)

json_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(["1", "2", "42", "Drama", "Comedy", "click", "buy", "NaN", "Infinity", "2024-01-01T00:00:00Z"]),
)
json_value = st.recursive(
    json_scalar, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
)
user_ids = st.one_of(
    st.text(max_size=140),
    st.text(alphabet="abcXYZ019._@-*: {}\n\r\t\x00\x7f", min_size=1, max_size=20),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from(["196", "u1", "a.b@c-d_e", "x" * 128, "x" * 129, "", " ", "*", "a:b", "{u}", "u\n"]),
)
timestamps = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.text(max_size=70),
    st.sampled_from(["2024-01-01T00:00:00Z", "0001-01-01T00:00:00+05:00", "9999-12-31T23:59:59-05:00", "nan"]),
    st.just(NOW),
)
eventish = st.fixed_dictionaries(
    {"user_id": user_ids, "ts": timestamps},
    optional={
        "item_id": st.one_of(st.sampled_from(["1", "2", "42", "999"]), json_value),
        "category": st.one_of(st.sampled_from([*CATS, "Nope"]), json_value),
        "categories": st.one_of(st.lists(st.sampled_from([*CATS, "Nope"]), max_size=40), json_value),
        "action": st.one_of(st.sampled_from(["click", "buy", "5", "dance", ""]), json_value),
        "event_id": json_value,
        "surprise": json_value,
    },
)


def event_bytes(obj: dict) -> bytes:
    try:
        return orjson.dumps(obj)
    except (orjson.JSONEncodeError, TypeError):  # e.g. an int beyond 64 bits: send its text form
        return repr(obj).encode()


def check_decode(raw: bytes | None) -> None:
    try:
        click = DECODER.decode(raw)
    except Rejected as rej:
        assert rej.reason in REASONS, rej.reason
        assert rej.detail and "\n" not in rej.detail and "\r" not in rej.detail, repr(rej.detail)
        return
    assert isinstance(click, Click)
    assert SAFE_ID.match(click.user_id), repr(click.user_id)
    assert math.isfinite(click.ts) and 0 <= click.ts <= NOW + Limits().max_future_s
    assert click.categories and all(0 <= c < len(CATS) for c in click.categories)
    assert len(click.fingerprint) == 8
    obj = orjson.loads(raw)
    assert isinstance(obj, dict) and obj.keys() <= ALLOWED_FIELDS


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=5000), st.none()))
@example(b"\xff\xfe")
@example(b'{"user_id": "u1", "item_id": "1", "ts": 1e400}')
@example(b'{"user_id": "u1", "item_id": "1", "ts": NaN}')
@example(b'{"user_id": "u1", "item_id": "1", "ts": 99999999999999999999999999}')
@example(b"[" * 3000)
def test_decode_any_bytes_never_raises_anything_but_rejected(raw):
    check_decode(raw)


@settings(max_examples=1200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(eventish)
@example({"user_id": "u1", "item_id": "1", "ts": NOW})
@example({"user_id": "u1", "item_id": "1", "ts": "0001-01-01T00:00:00+05:00"})
@example({"user_id": "u1", "item_id": "1", "ts": "9999-12-31T23:59:59-05:00"})
@example({"user_id": "u1\n", "item_id": "1", "ts": NOW})
@example({"user_id": "x" * 10_000, "item_id": "1", "ts": NOW})
@example({"user_id": "u1", "categories": ["Drama"] * 33, "ts": NOW})
@example({"user_id": "u1", "item_id": "1", "ts": NOW, "event_id": "e" * 257})
def test_decode_eventish_json(obj):
    check_decode(event_bytes(obj))


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.text(max_size=10), json_value, max_size=8))
def test_decode_arbitrary_objects(obj):
    check_decode(event_bytes(obj))


# --- integration: > 10,000 bad events through a real worker -----------------------------------------------------------

UNSAFE_IDS = [
    "u 1",
    " u1",
    "u1 ",
    "u\t1",
    "u\n1",
    "u1\n",
    "\nu1",
    "u\r\n1",
    "u\x00",
    "\x00",
    "u\x1b[31m",
    "u\x7f",
    "*",
    "u*",
    "interest:*",
    "a:b",
    ":",
    "{u1}",
    "{}",
    "u{1}",
    "../../etc/passwd",
    "u/1",
    "u\\1",
    "u%2A",
    "u$1",
    "u'1",
    'u"1',
    "u;FLUSHALL",
    "ü",
    "u\u2028",
    "😀",
    "",
]


def bad_corpus(good: list[dict], cats: list[str], future: float) -> list[bytes]:
    """> 10,000 distinct bad events built from real ones (each variant numbered so all differ)."""
    out: list[bytes] = []

    def ev(i: int, **changes: object) -> dict:
        e = dict(good[i % len(good)])
        e["event_id"] = f"bad-{i}"
        for k, v in changes.items():
            if v is ...:
                e.pop(k, None)
            else:
                e[k] = v
        return e

    i = 0
    while len(out) < 10_400:
        i += 1
        g = ev(i)
        raw = orjson.dumps(g)
        kind = i % 40
        if kind == 0:  # invalid UTF-8 inside an otherwise fine event
            out.append(raw.replace(b'"event_id":"', b'"event_id":"\xff\xfe', 1))
        elif kind == 1:
            out.append(bytes([0x80 + i % 64]) * (1 + i % 50) + str(i).encode())
        elif kind == 2:  # truncated JSON
            out.append(b'{"event_id":"bad-%d",' % i + raw[1 : max(2, (i * 7) % (len(raw) - 1))])
        elif kind == 3:
            out.append(b"{not json " + str(i).encode())
        elif kind == 4:  # JSON, not an object
            out.append([b"[1, %d]", b"%d", b'"str%d"', b"[null, %d]", b"[true, %d]", b"%d.5"][i % 6] % i)
        elif kind == 5:
            out.append(orjson.dumps(ev(i, user_id=...)))
        elif kind == 6:
            out.append(orjson.dumps(ev(i, ts=...)))
        elif kind == 7:
            out.append(orjson.dumps(ev(i, item_id=...)))
        elif kind == 8:  # extra fields
            out.append(orjson.dumps(ev(i, **{["surprise", "userId", "__proto__", "", "user_id "][i % 5]: i})))
        elif kind == 9:  # wrong types
            out.append(orjson.dumps(ev(i, user_id=[[1], {"a": 1}, 1.5, True, None][i % 5])))
        elif kind == 10:
            out.append(orjson.dumps(ev(i, ts=[True, [1], {"t": 1}, None, ""][i % 5])))
        elif kind == 11:
            out.append(orjson.dumps(ev(i, item_id=[1.5, [1], {"i": 1}, True, ""][i % 5])))
        elif kind == 12:
            out.append(orjson.dumps(ev(i, item_id=..., categories=["Drama", {"c": 1}, 7.5, "x" * 300, 3][i % 5])))
        elif kind == 13:
            out.append(orjson.dumps(ev(i, action=[["a"], {"a": 1}, 1.5, True, "a" * 65][i % 5])))
        elif kind == 14:
            out.append(
                orjson.dumps(ev(i, event_id=[[f"a{i}"], {"a": i}, i + 0.5, [False, i], "e" * 257 + str(i)][i % 5]))
            )
        elif kind == 15:  # huge strings: over max_event_bytes, or ids over their limits
            out.append(orjson.dumps(ev(i, item_id="x" * (4100 + i % 100))))
        elif kind == 16:
            out.append(orjson.dumps(ev(i, user_id="u" * 10_240)))
        elif kind == 17:
            out.append(orjson.dumps(ev(i, user_id="u" * (129 + i % 2000))))
        elif kind == 18:
            out.append(orjson.dumps(ev(i, item_id="9" * (257 + i % 500))))
        elif kind == 19:  # huge arrays: beyond max_categories, or beyond the byte limit
            out.append(orjson.dumps(ev(i, item_id=..., categories=[cats[j % len(cats)] for j in range(33 + i % 60)])))
        elif kind == 20:
            out.append(orjson.dumps(ev(i, item_id=..., categories=[cats[0]] * (1000 + i % 500))))
        elif kind == 21:
            out.append(orjson.dumps(ev(i, item_id=..., categories=[])))
        elif kind == 22:  # non-finite, negative, far-future times
            out.append(orjson.dumps(ev(i, ts=["NaN", "nan", "Infinity", "-Infinity", "inf"][i % 5])))
        elif kind == 23:
            out.append(raw.replace(b'"ts":', b'"ts":' + [b"NaN", b"Infinity", b"-Infinity", b"1e400"][i % 4] + b",_:"))
        elif kind == 24:
            out.append(orjson.dumps(ev(i, ts=-(1 + i))))
        elif kind == 25:
            out.append(orjson.dumps(ev(i, ts=future + i)))
        elif kind == 26:
            out.append(orjson.dumps(ev(i, ts=[4e12, 1e18, "3000-01-01T00:00:00Z", 9.9e15, 2**62][i % 5])))
        elif kind == 27:
            out.append(orjson.dumps(ev(i, ts=["yesterday", "2024-13-45", "x" * 65, "12:00", "0x10"][i % 5])))
        elif kind == 28:  # unknown items, categories, actions
            out.append(orjson.dumps(ev(i, item_id=f"no-such-item-{i}")))
        elif kind == 29:
            out.append(orjson.dumps(ev(i, item_id=..., category=f"NoSuchGenre{i}")))
        elif kind == 30:
            out.append(orjson.dumps(ev(i, item_id=..., categories=[cats[0], f"NoSuchGenre{i}"])))
        elif kind == 31:
            out.append(orjson.dumps(ev(i, action=f"dance{i}")))
        elif 32 <= kind <= 39:  # user ids made for key injection / key explosion
            uid = UNSAFE_IDS[(i // 40 * 8 + kind - 32) % len(UNSAFE_IDS)]
            out.append(orjson.dumps(ev(i, user_id=uid + (str(i) if i % 3 and uid else ""))))
    return out


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["single", "cluster"])
def test_ten_thousand_bad_events_dead_lettered_good_ones_applied(
    mode, request, names, kafka_bootstrap, trained_model, data_dir, settings_for, tmp_path
):
    from export.runtime import StepSession
    from streams.core.processor import decoder_for
    from streams.tools.verify import verify_events

    redis_url, rclient, redis_env, overrides = redis_target(request, mode)
    settings = settings_for(**overrides)
    session = StepSession(trained_model, device="cpu")
    decoder = decoder_for(session, settings, session.load_catalog())
    good = ml_events(data_dir, 4000)
    bad = bad_corpus(good, list(session.meta.category_index), time.time() + 10 * 86_400)
    assert len(bad) >= 10_000 and len(set(bad)) == len(bad)
    expected: Counter = Counter()
    for raw in bad:  # the corpus really is all bad, and we know why
        with pytest.raises(Rejected) as rej:
            decoder.decode(raw)
        expected[rej.value.reason] += 1
    assert len(expected) >= 14, expected

    # interleave: ~2.6 bad events per good one; bad ones keyed by their (unsafe) user id when they have one
    stream: list[dict | bytes] = []
    per = len(bad) / len(good)
    b = 0
    for k, e in enumerate(good):
        stream.append(e)
        while b < (k + 1) * per and b < len(bad):
            stream.append(bad[b])
            b += 1
    stream += bad[b:]

    def key(ev: dict | bytes) -> bytes | None:
        if isinstance(ev, dict):
            return str(ev["user_id"]).encode()
        try:
            uid = orjson.loads(ev).get("user_id")
        except (orjson.JSONDecodeError, AttributeError):
            return None if len(ev) % 2 else b"u1"
        return str(uid).encode("utf-8", "replace")[:1000] if uid is not None else None

    t0 = time.monotonic()
    worker = start_worker(names, kafka_bootstrap, redis_url, trained_model, tmp_path, **redis_env)
    try:
        produce(kafka_bootstrap, names.input_topic, stream, key=key)
        wait_for(lambda: applied_events(rclient, names.redis_prefix) == len(good), 180, "good events applied")
        dlq = consume_all(kafka_bootstrap, names.dlq_topic, len(bad), timeout=180)
        assert worker.alive()
        counted = ("interest_dead_letters_total", "interest_events_applied_total")
        wait_for(lambda: sum(worker.metric(m) for m in counted) >= len(bad) + len(good), 10, "events counted")
        dead = worker.metric("interest_dead_letters_total")
        applied = worker.metric("interest_events_applied_total")
    finally:
        code = worker.stop()
    assert code == 0, worker.output()[-3000:]
    assert "Traceback" not in worker.output()
    assert len(dlq) == len(bad) and dead == len(bad) and applied == len(good)
    got: Counter = Counter()
    for r in dlq:
        headers = dict(r.headers)
        assert headers.get("dlq.reason"), r.headers
        assert headers.get("dlq.source", b"").startswith(names.input_topic.encode())
        got[headers["dlq.reason"].decode()] += 1
    assert got == expected
    assert Counter(r.value for r in dlq) == Counter(bad), "the DLQ must hold the original bytes"

    # no key derived from an unsafe id: every user key is <prefix><tag>:<safe id>, and only good users have one
    prefix = names.redis_prefix + model_names(names, trained_model).tag + ":"
    keys = [k.decode("utf-8", "replace") for k in user_keys(rclient, names.redis_prefix)]
    bad_keys = [k for k in keys if not k.startswith(prefix) or not SAFE_ID.match(k[len(prefix) :])]
    assert not bad_keys, bad_keys[:5]
    assert set(keys) == {prefix + e["user_id"] for e in good}
    report = verify_events(stream, session, settings, rclient)
    assert report.ok and report.max_dp <= 1e-5, report.summary()
    assert report.rejected == len(bad) and report.events == len(good)
    print(
        f"\nHOSTILE {len(bad)} bad events ({len(expected)} reasons) + {len(good)} good: all dead-lettered, "
        f"max |dp| {report.max_dp:.2e}, {time.monotonic() - t0:.1f}s; reasons {dict(sorted(got.items()))}"
    )


# --- bad models: refused at start with one clear line -----------------------------------------------------------------


def foreign_onnx(path: Path) -> Path:
    """A valid ONNX graph that is not an interest-stream model (Identity, no metadata)."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "foreign", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def relabelled(trained_model: Path, path: Path, **meta: str) -> Path:
    """The real model with some metadata values replaced."""
    import onnx

    model = onnx.load(str(trained_model))
    for p in model.metadata_props:
        if p.key in meta:
            p.value = meta[p.key]
    onnx.save(model, str(path))
    return path


@pytest.mark.integration
def test_worker_refuses_bad_models_and_catalogs_with_one_clear_line(
    names, kafka_bootstrap, redis_url, trained_model, tmp_path
):
    import shutil

    d = tmp_path
    real = trained_model.read_bytes()
    (d / "empty.onnx").write_bytes(b"")
    (d / "truncated.onnx").write_bytes(real[: len(real) // 2])
    (d / "garbage.onnx").write_bytes(bytes(range(256)) * 40)
    (d / "a-directory.onnx").mkdir()
    foreign_onnx(d / "foreign.onnx")
    relabelled(trained_model, d / "oldformat.onnx", **{"interest_stream.format_version": '"0"'})
    relabelled(trained_model, d / "badmeta.onnx", **{"interest_stream.h0": "[1, 2"})
    # a model whose catalog is another model's (checksum differs)
    other = d / "other"
    other.mkdir()
    shutil.copy(trained_model, other / "model.onnx")
    (other / "catalog.csv").write_text("item_id,categories\n1,Drama\n")
    # catalogs (INTEREST_CATALOG_PATH) that do not match the model's vocabulary
    (d / "vocab.csv").write_text("item_id,categories\n1,Drama\n2,Underwater Basket Weaving\n")
    (d / "header.csv").write_text("item,cats\n1,Drama\n")
    cases = [
        (d / "missing.onnx", {}, "not found"),
        (d / "empty.onnx", {}, "not a loadable ONNX model"),
        (d / "truncated.onnx", {}, "not a loadable ONNX model"),
        (d / "garbage.onnx", {}, "not a loadable ONNX model"),
        (d / "a-directory.onnx", {}, "not found"),
        (d / "foreign.onnx", {}, "not an interest-stream model"),
        (d / "oldformat.onnx", {}, "not supported"),
        (d / "badmeta.onnx", {}, "not valid JSON"),
        (other / "model.onnx", {}, "sha256 differs"),
        (trained_model, {"INTEREST_CATALOG_PATH": str(d / "vocab.csv")}, "Underwater Basket Weaving"),
        (trained_model, {"INTEREST_CATALOG_PATH": str(d / "header.csv")}, "header must be item_id,categories"),
        (trained_model, {"INTEREST_CATALOG_PATH": str(d / "nope.csv")}, "catalog not found"),
    ]
    assert_refused(names, kafka_bootstrap, redis_url, d, cases)


def assert_refused(names, kafka_bootstrap, redis_url, log_dir: Path, cases: list) -> None:
    """Start a worker per (model, env, expected text) at once; each must exit 2 with one error line, no traceback."""
    workers = [
        start_worker(names, kafka_bootstrap, redis_url, model, log_dir / f"log{i}", ready=False, **env)
        for i, (model, env, _) in enumerate(cases)
    ]
    failures = []
    for (model, env, want), w in zip(cases, workers, strict=True):
        code = w.proc.wait(timeout=120)
        out = w.output()
        errors = [ln for ln in out.splitlines() if ln.startswith("interest-stream worker: error:")]
        if code != 2 or "Traceback" in out or len(errors) != 1 or want not in errors[0]:
            failures.append(f"{model.name} {env}: exit {code}, wanted {want!r}; output tail:\n{out[-1500:]}")
    assert not failures, "\n\n".join(failures)


@pytest.mark.integration
def test_worker_refuses_a_catalog_that_is_not_utf8(names, kafka_bootstrap, redis_url, trained_model, tmp_path):
    (tmp_path / "latin1.csv").write_bytes("item_id,categories\n1,Dr\xe4ma\n".encode("latin-1"))
    env = {"INTEREST_CATALOG_PATH": str(tmp_path / "latin1.csv")}
    assert_refused(names, kafka_bootstrap, redis_url, tmp_path, [(trained_model, env, "latin1.csv")])
