"""Stepping a batch: every user's events of the batch in order, the users together in a few calls of the Scan
sequence graph (:func:`step_groups` decides which users share a call; :class:`BatchStepper` runs them)."""

from __future__ import annotations

import numpy as np

from export.runtime import StepSession
from export.sequence import SequenceSession

# Cost model of one ORT call over a (users, T) block, measured with `python -m export.sequence --model ...` on the
# 2-core development machine (one intra-op thread): per time step ~13 us with model.seq.onnx (~28-30 us with the step
# graph wrapped), plus ~2.8 us per user-step, plus a fixed cost per call (Python, the thread's GIL hand-back while
# the event loop is busy).
STEP_S, WRAPPED_STEP_S, USER_STEP_S, CALL_S = 13e-6, 30e-6, 2.8e-6, 1e-3
BUCKETS_PER_OCTAVE = 4  # users of counts within 2**(1/4) of each other start in one bucket


def step_groups(counts: np.ndarray, step_s: float = STEP_S) -> list[np.ndarray]:
    """Split the users (``counts[u]`` events each in the batch, 0 = absent) into groups stepped by one call each.

    A call costs T * (step_s + USER_STEP_S * users) + CALL_S, T being its longest user's count: padding short users
    is cheap while a call's fixed costs are not, so users are bucketed by count in quarter octaves (1, 2, 3, 4, 5,
    6, 7-8, 9, 10-11, 12-13, 14-16, ...) and adjacent buckets are merged wherever one call is cheaper than two (an
    exact split over the buckets, by dynamic programming). ML-100K batches of the worker (a few users with bursts of
    dozens of events) end up in a few calls; a backfill block of 200,000 ML-100K events (users with 1 to ~700 events
    each) in 20, 92 % of their padded steps real events, where whole octaves gave 6 calls at 71 %.
    """
    present = np.flatnonzero(counts > 0)
    if not len(present):
        return []
    bucket = np.ceil(BUCKETS_PER_OCTAVE * np.log2(counts[present])).astype(np.int64)
    keys = np.unique(bucket)[::-1]  # longest first
    members = [present[bucket == k] for k in keys]
    t = [int(counts[m].max()) for m in members]
    n = [len(m) for m in members]
    # best[i]: cheapest cost of the first i buckets; cut[i]: where its last group starts
    best, cut = [0.0] + [np.inf] * len(keys), [0] * (len(keys) + 1)
    for i in range(1, len(keys) + 1):
        users = 0
        for j in range(i - 1, -1, -1):  # last group = buckets j..i-1, padded to t[j] (the longest)
            users += n[j]
            cost = best[j] + t[j] * (step_s + USER_STEP_S * users) + CALL_S
            if cost < best[i]:
                best[i], cut[i] = cost, j
    groups, i = [], len(keys)
    while i > 0:
        j = cut[i]
        groups.append(np.concatenate(members[j:i]))
        i = j
    return groups[::-1]


class BatchStepper:
    """Steps every user of a batch through its events of the batch: :func:`step_groups`, then one ORT call a group."""

    def __init__(self, session: StepSession, intra_op_threads: int | None = None) -> None:
        self.session = session
        self.sequence = SequenceSession(session, intra_op_threads)
        self.step_s = STEP_S if self.sequence.kind == "unpacked" else WRAPPED_STEP_S

    def __call__(
        self, feats: np.ndarray, H: np.ndarray, C: np.ndarray, P: np.ndarray, rounds: np.ndarray, slots: np.ndarray
    ) -> int:
        """Step every user through its events of the batch; H and C (one row per user) in place, P (per event) filled.

        Row i is user slots[i]'s event number rounds[i]. The users are split into a few groups (:func:`step_groups`);
        a group is one call of the sequence graph over a (users, T) block padded to its longest user, or, when all
        its users have one event, one call of the step graph itself. Returns the number of calls.
        """
        counts = np.bincount(slots, minlength=H.shape[0])
        pos = np.empty(H.shape[0], dtype=np.int64)
        run = self.sequence.session.run
        groups = step_groups(counts, self.step_s)
        for users in groups:
            t_max = int(counts[users].max())
            pos.fill(-1)
            pos[users] = np.arange(len(users))
            sel = np.flatnonzero(pos[slots] >= 0)  # this group's events, in batch order
            if t_max == 1:
                s = slots[sel]
                P[sel], H[s], C[s] = self.session.session.run(None, {"features": feats[sel], "h": H[s], "c": C[s]})
                continue
            gi, ti = pos[slots[sel]], rounds[sel]
            x = np.zeros((len(users), t_max, feats.shape[1]), dtype=np.float32)
            x[gi, ti] = feats[sel]
            mask = np.zeros((len(users), t_max, 1), dtype=bool)
            mask[gi, ti] = True
            p, h, c = run(None, {"seq_features": x, "seq_mask": mask, "h0": H[users], "c0": C[users]})
            H[users] = h
            C[users] = c
            P[sel] = p[gi, ti]
        return len(groups)
