"""The backfill's users in memory: each event applied under the worker's dedup rules as it is read, then stepped
with the worker's own stepper in blocks of CHUNK_EVENTS events (all of a block's users at once, a few ORT calls of
the sequence graph), and every user written once at the end with the worker's fields. A block is stepped in a thread
while the next one is read (ORT releases the GIL): reading and stepping use two cores."""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import orjson

from streams.core.state import UserState, UserWrite, encode_state
from streams.core.stepping import BatchStepper
from streams.settings import Settings

CHUNK_EVENTS = 200_000  # events stepped per block
INITIAL_USERS = 1024  # rows of the state arrays at first (they double as users come)


class Builder:
    """Every user's state in memory, stepped block by block with the worker's own stepper."""

    def __init__(self, session, settings: Settings) -> None:
        meta = session.meta
        self.session = session
        self.encoder = session.encoder
        self.stepper = BatchStepper(session, settings.ort_threads or None)
        self.window = 8 * settings.dedup_window
        self.k = len(meta.categories)
        self.h0 = np.asarray(meta.h0, dtype=np.float32)
        self.c0 = np.asarray(meta.c0, dtype=np.float32)
        self.slot: dict[str, int] = {}
        self.users: list[str] = []
        self.states: list[UserState] = []
        cap = INITIAL_USERS
        self.H = np.empty((cap, meta.hidden_size), dtype=np.float32)
        self.C = np.empty((cap, meta.hidden_size), dtype=np.float32)
        self.P = np.empty((cap, self.k), dtype=np.float32)
        # the block being gathered: per event its user slot, categories, action, gap
        self.b_slot: list[int] = []
        self.b_cats: list[tuple[int, ...]] = []
        self.b_action: list[int] = []
        self.b_gap: list[float] = []
        self.step_seconds = 0.0  # time the stepping thread was busy (overlapped with reading)
        self.wait_seconds = 0.0  # time the reader waited for it
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="backfill-step")
        self._stepping: Future | None = None

    def state(self, user: str) -> tuple[int, UserState]:
        s = self.slot.get(user)
        if s is None:
            s = self.slot[user] = len(self.users)
            self.users.append(user)
            self.states.append(UserState(h=self.h0, c=self.c0))
            if s >= len(self.H):  # grow the state arrays, once the block being stepped is done with them
                self.wait()
                for name in ("H", "C", "P"):
                    old = getattr(self, name)
                    new = np.empty((2 * len(old), old.shape[1]), dtype=np.float32)
                    new[: len(old)] = old
                    setattr(self, name, new)
            self.H[s], self.C[s] = self.h0, self.c0
        return s, self.states[s]

    def add(self, click, tp: str, offset: int) -> bool:
        """Apply one validated event under the worker's dedup rules; False when it is a duplicate."""
        s, st = self.state(click.user_id)
        if offset <= st.positions.get(tp, -1) or st.seen(click.fingerprint):
            return False
        self.b_gap.append(click.ts - st.last_ts)  # nan for a user's first event
        st.positions[tp] = offset
        st.last_ts = click.ts
        st.events += 1
        st.recent = (st.recent + click.fingerprint)[-self.window :]
        self.b_slot.append(s)
        self.b_cats.append(click.categories)
        self.b_action.append(click.action)
        if len(self.b_slot) >= CHUNK_EVENTS:
            self.submit()
        return True

    def wait(self) -> None:
        """Until the block being stepped is done (its error, if any, raised here)."""
        if self._stepping is not None:
            t0 = time.perf_counter()
            self._stepping.result()
            self._stepping = None
            self.wait_seconds += time.perf_counter() - t0

    def submit(self) -> None:
        """Hand the gathered block to the stepping thread (after the previous one: it holds the same users)."""
        self.wait()
        if not self.b_slot:
            return
        block = (self.b_slot, self.b_cats, self.b_action, self.b_gap)
        self.b_slot, self.b_cats, self.b_action, self.b_gap = [], [], [], []
        users = len(self.users)
        # views: the stepper writes the new states in place; the arrays only grow after wait()
        self._stepping = self._thread.submit(self._step, block, self.H[:users], self.C[:users], self.P)

    def step(self) -> None:
        """Step whatever is gathered and wait for it: every state is then up to date."""
        self.submit()
        self.wait()

    def _step(self, block: tuple, H: np.ndarray, C: np.ndarray, P_last: np.ndarray) -> None:
        """Step one block: each user's events in order, users grouped by count into a few ORT calls."""
        b_slot, b_cats, b_action, b_gap = block
        n = len(b_slot)
        t0 = time.perf_counter()
        slots = np.asarray(b_slot, dtype=np.int64)
        feats = self.encoder.encode(b_cats, np.asarray(b_action), np.asarray(b_gap))
        # round of each event = how many earlier events of its user the block holds (a stable sort by user)
        order = np.argsort(slots, kind="stable")
        sorted_slots = slots[order]
        starts = np.flatnonzero(np.r_[True, sorted_slots[1:] != sorted_slots[:-1]])
        run_start = np.repeat(starts, np.diff(np.r_[starts, n]))
        rounds = np.empty(n, dtype=np.int64)
        rounds[order] = np.arange(n) - run_start
        P = np.empty((n, self.k), dtype=np.float32)
        self.stepper(feats, H, C, P, rounds, slots)
        last_rows = order[np.r_[starts[1:], n] - 1]  # each user's last event in the block
        P_last[sorted_slots[starts]] = P[last_rows]
        self.step_seconds += time.perf_counter() - t0

    def writes(self, version: str, key, top_n: int, names: list[str]) -> tuple[list[UserWrite], dict]:
        """One write per user: the worker's fields (probs and top of the user's last event, state, pos, recent)."""
        self.step()
        now = repr(time.time())
        users = len(self.users)
        P = self.P[:users]
        blob = orjson.dumps(P, option=orjson.OPT_SERIALIZE_NUMPY)
        probs_json = [b"[" + row + b"]" for row in blob[2:-2].split(b"],[")] if users else []
        top_n = min(top_n, self.k)
        top_idx = np.argsort(-P, axis=1, kind="stable")[:, :top_n]
        top_p = np.round(np.take_along_axis(P, top_idx, axis=1).astype(np.float64), 6).tolist()
        out, states = [], {}
        for s, u in enumerate(self.users):
            st = self.states[s]
            st.h, st.c = self.H[s].copy(), self.C[s].copy()
            fields = encode_state(st)
            fields["probs"] = probs_json[s]
            fields["top"] = orjson.dumps(
                [{"category": names[k], "p": p} for k, p in zip(top_idx[s].tolist(), top_p[s], strict=True)]
            )
            fields["model_version"] = version
            fields["updated_at"] = now
            out.append(UserWrite(key(u), fields, st.events))
            states[u] = st
        return out, states
