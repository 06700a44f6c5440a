"""The interest model: an LSTM over a user's events, a decayed category memory, a learned initial state.

    python -m models.model   # prints the parameter count of the default config on a dummy batch

Ensemble. The model is n_members independently initialised members run side by side as one module: every
weight has a leading member axis (MLinear, a batched matmul), so M members cost about the ops of one, and the
prediction is the members' mean distribution. Each member is trained on its own loss (independent members).

State. h and c are (B, H) with H = n_members * (hidden_size + n_memories * K / 2): per member, the LSTM's (h, c),
each followed by half of the n category memories m_i (K each), exponentially decayed sums of the user's past
category vectors with decays from fast (half-life ~1 event) to slow (~64 events) at initialisation.
The stream worker treats h and c as opaque vectors; only this module knows the split.

One step (event features x, see models/features.py for the layout):
    drift:   the LSTM state is pulled toward the learned initial state by a gate on the time gap
    LSTM:    input = [category vector, action embedding, time features]; the cell math is written out so that
             training, the whole-sequence forward and the exported single step are the same code
    memory:  m_i = d_i * m_i + g_i(action) * y, decays d = sigmoid(w * time features + b), gains g = exp(.)
Head: p = w_0 softmax(W h_lstm + U [m_i / |m_i|]) + sum_i w_i m_i / |m_i|, mixture weights w = softmax(V h_lstm)
(a copy mechanism over the user's own history, which the decayed-histogram baseline shows is strong);
the output is the mean of the members' p.

One module (~450 lines), as nanoGPT's ``model.py``: the config, every layer and the loss, importing only torch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.features import N_TIME_FEATURES

PROB_EPS = 1e-9  # the metrics' clip; also keeps log(p) finite in the loss


@dataclass
class ModelConfig:
    n_categories: int = 19  # K output categories
    n_actions: int = 5  # A actions
    n_time_features: int = N_TIME_FEATURES  # log gap, first-event flag
    hidden_size: int = 96  # LSTM units per member (the state adds n_memories * K / 2 slots per member to h and c)
    action_dim: int = 8  # action embedding size
    dropout: float = 0.1  # on the LSTM input and on the head input
    memory: bool = True  # the decayed category memories and the mixture head
    state_drift: bool = True  # pull the state toward the learned initial state by the time gap
    memory_logits: bool = True  # the softmax head also reads the normalised memories (a learned K x nK map)
    n_memories: int = 4  # decayed category memories (even: half ride in h, half in c)
    head_hidden: int = 0  # > 0: the memory-to-logits map is an MLP with this many units instead of linear
    n_members: int = 1  # ensemble members (independently initialised and trained), run as one batched module

    @property
    def memory_slots(self) -> int:
        """State entries one member's memories take in h (and as many in c)."""
        return self.n_categories * self.n_memories // 2 if self.memory else 0

    @property
    def member_state_size(self) -> int:
        return self.hidden_size + self.memory_slots

    @property
    def state_size(self) -> int:
        return self.n_members * self.member_state_size

    @property
    def n_features(self) -> int:
        return self.n_categories + self.n_actions + self.n_time_features

    def to_dict(self) -> dict:
        return asdict(self)


class MLinear(nn.Module):
    """M independent linear maps as one batched matmul: x (B, in) or (M, B, in) -> (M, B, out).

    Each member is initialised like nn.Linear (uniform +-1/sqrt(in) for weight and bias).
    """

    def __init__(self, m: int, n_in: int, n_out: int, bias: bool = True):
        super().__init__()
        bound = 1 / math.sqrt(n_in)
        self.weight = nn.Parameter(torch.empty(m, n_in, n_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(m, 1, n_out).uniform_(-bound, bound)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.weight)  # (B, in) broadcasts against (M, in, out)
        return y if self.bias is None else y + self.bias


class LSTMCell(nn.Module):
    """M standard LSTM cells (gate order i, f, g, o), written out so that they export as plain ops."""

    def __init__(self, m: int, n_in: int, n_hidden: int):
        super().__init__()
        self.proj = MLinear(m, n_in + n_hidden, 4 * n_hidden)
        with torch.no_grad():  # forget-gate bias 1: remember by default
            self.proj.bias[..., n_hidden : 2 * n_hidden].fill_(1.0)

    def forward(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        i, f, g, o = self.proj(torch.cat([x, h], dim=-1)).chunk(4, dim=-1)  # each (M, B, Hl)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, c


class InterestModel(nn.Module):
    """Internally every tensor has a leading member axis: LSTM state (M, B, Hl), memories (M, B, n, K)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        k, a, t, hl, m = cfg.n_categories, cfg.n_actions, cfg.n_time_features, cfg.hidden_size, cfg.n_members
        if m < 1:
            raise ValueError(f"n_members must be >= 1, got {m}")
        self.action_emb = MLinear(m, a, cfg.action_dim, bias=False)  # one-hot @ W == embedding lookup
        self.cell = LSTMCell(m, k + cfg.action_dim + t, hl)
        self.h0 = nn.Parameter(torch.zeros(m, 1, hl))  # learned initial state (cold start)
        self.c0 = nn.Parameter(torch.zeros(m, 1, hl))
        self.drop = nn.Dropout(cfg.dropout)
        self.head = MLinear(m, hl, k)
        if cfg.state_drift:
            self.drift = MLinear(m, t, hl)  # keep = sigmoid(drift(time)); 1 keeps the state, 0 resets it
            with torch.no_grad():
                self.drift.weight.zero_()
                self.drift.bias.fill_(4.0)
        if cfg.memory:
            n = cfg.n_memories
            if n < 2 or n % 2:
                raise ValueError(f"n_memories must be even and >= 2, got {n}")
            self.mem_decay = MLinear(m, t, n)  # per-memory decay d = sigmoid(.) from the time features
            self.mem_gain = MLinear(m, a, n, bias=False)  # per-action weight exp(.) of an event in each memory
            self.mix = MLinear(m, hl, 1 + n)  # mixture weights of (softmax head, memory 1..n)
            if cfg.memory_logits and cfg.head_hidden > 0:
                self.mem_head = nn.Sequential(
                    MLinear(m, n * k + hl, cfg.head_hidden), nn.GELU(), MLinear(m, cfg.head_hidden, k)
                )
                nn.init.zeros_(self.mem_head[2].weight)
            elif cfg.memory_logits:
                self.mem_head = MLinear(m, n * k, k, bias=False)
                nn.init.zeros_(self.mem_head.weight)
            with torch.no_grad():  # half-lives spread from 1 to 64 events
                half_life = 2.0 ** torch.linspace(0, 6, n)
                d = 0.5 ** (1 / half_life)
                self.mem_decay.weight.zero_()
                self.mem_decay.bias.copy_(torch.log(d / (1 - d)).expand_as(self.mem_decay.bias))
                self.mem_gain.weight.zero_()

    # -- state layout: (B, H) <-> per member parts ---------------------------------------------------
    def _split(self, h: torch.Tensor, c: torch.Tensor):
        """h, c (B, H) -> hs, cs (M, B, Hl), mem (M, B, n, K) or None."""
        cfg = self.cfg
        hl = cfg.hidden_size
        h = h.reshape(h.shape[0], cfg.n_members, cfg.member_state_size).transpose(0, 1)  # (M, B, Hm)
        c = c.reshape(c.shape[0], cfg.n_members, cfg.member_state_size).transpose(0, 1)
        if not cfg.memory:
            return h, c, None
        mem = torch.cat([h[..., hl:], c[..., hl:]], dim=-1)
        return h[..., :hl], c[..., :hl], mem.reshape(mem.shape[0], mem.shape[1], cfg.n_memories, cfg.n_categories)

    def _join(self, hs: torch.Tensor, cs: torch.Tensor, mem: torch.Tensor | None):
        """The inverse of _split -> h, c (B, H)."""
        if mem is not None:
            half = self.cfg.memory_slots
            mem = mem.reshape(mem.shape[0], mem.shape[1], -1)
            hs = torch.cat([hs, mem[..., :half]], dim=-1)
            cs = torch.cat([cs, mem[..., half:]], dim=-1)
        b = hs.shape[1]
        return hs.transpose(0, 1).reshape(b, -1), cs.transpose(0, 1).reshape(b, -1)

    def _initial_parts(self, batch: int):
        cfg = self.cfg
        hs = self.h0.expand(-1, batch, -1)
        cs = self.c0.expand(-1, batch, -1)
        mem = self.h0.new_zeros(cfg.n_members, batch, cfg.n_memories, cfg.n_categories) if cfg.memory else None
        return hs, cs, mem

    def initial_state(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> h, c (B, H): per member the learned LSTM state followed by empty memories."""
        return self._join(*self._initial_parts(batch))

    # -- one event -----------------------------------------------------------------------------------
    def _step(self, x: torch.Tensor, hs: torch.Tensor, cs: torch.Tensor, mem: torch.Tensor | None):
        """x (B, F); hs, cs (M, B, Hl); mem (M, B, n, K) -> the next (hs, cs, mem)."""
        cfg = self.cfg
        k, a = cfg.n_categories, cfg.n_actions
        y, act, t = x[:, :k], x[:, k : k + a], x[:, k + a :]  # (B,K) (B,A) (B,T)
        if cfg.state_drift:
            keep = torch.sigmoid(self.drift(t))  # (M, B, Hl)
            hs = self.h0 + keep * (hs - self.h0)
            cs = self.c0 + keep * (cs - self.c0)
        ae = self.action_emb(act)  # (M, B, E)
        m = ae.shape[0]
        inp = self.drop(torch.cat([y.expand(m, -1, -1), ae, t.expand(m, -1, -1)], dim=-1))
        hs, cs = self.cell(inp, hs, cs)
        if mem is None:
            return hs, cs, None
        d = torch.sigmoid(self.mem_decay(t)).unsqueeze(-1)  # (M, B, n, 1)
        gain = torch.exp(self.mem_gain(act)).unsqueeze(-1)  # (M, B, n, 1)
        mem = d * mem + gain * y.unsqueeze(1)
        return hs, cs, mem

    def step(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One event for a batch of users: x (B, F), h, c (B, H) -> h_next, c_next (B, H)."""
        return self._join(*self._step(x, *self._split(h, c)))

    # -- head ----------------------------------------------------------------------------------------
    def _member_probs(self, hs: torch.Tensor, mem: torch.Tensor | None) -> torch.Tensor:
        """hs (M, N, Hl), mem (M, N, n, K) -> each member's distribution (M, N, K)."""
        k = self.cfg.n_categories
        hs = self.drop(hs)
        if mem is None:
            return F.softmax(self.head(hs), dim=-1)
        pm = (mem + 1e-6 / k) / (mem.sum(dim=-1, keepdim=True) + 1e-6)  # normalised; uniform while empty
        logits = self.head(hs)
        if self.cfg.memory_logits:
            mem_in = pm.reshape(pm.shape[0], pm.shape[1], -1)
            if self.cfg.head_hidden > 0:
                mem_in = torch.cat([mem_in, hs], dim=-1)
            logits = logits + self.mem_head(mem_in)
        w = F.softmax(self.mix(hs), dim=-1)  # (M, N, 1 + n)
        return w[..., :1] * F.softmax(logits, dim=-1) + (w[..., 1:].unsqueeze(-1) * pm).sum(dim=-2)

    def probs(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """State (N, H) -> next-event category distribution (N, K), the members' mean."""
        hs, _, mem = self._split(h, c)
        return self._member_probs(hs, mem).mean(dim=0)

    def forward_members(self, x: torch.Tensor) -> torch.Tensor:
        """Sequences x (B, L, F) -> each member's predictions (M, B, L + 1, K); [:, :, j] predicts event j."""
        b, length, _ = x.shape
        hs, cs, mem = self._initial_parts(b)
        all_h, all_m = [hs], [mem]
        for t in range(length):
            hs, cs, mem = self._step(x[:, t], hs, cs, mem)
            all_h.append(hs)
            all_m.append(mem)
        m = hs.shape[0]
        h_all = torch.stack(all_h, dim=2).reshape(m, b * (length + 1), -1)  # (M, B*(L+1), Hl)
        m_all = None
        if mem is not None:
            m_all = torch.stack(all_m, dim=2).reshape(m, b * (length + 1), self.cfg.n_memories, -1)
        return self._member_probs(h_all, m_all).reshape(m, b, length + 1, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Sequences x (B, L, F) -> predictions (B, L + 1, K); [:, j] predicts event j from events < j."""
        return self.forward_members(x).mean(dim=0)

    @torch.no_grad()
    def prior(self) -> torch.Tensor:
        """(K,) the cold-start distribution."""
        h, c = self.initial_state(1)
        return self.probs(h, c)[0]


class StepModel(nn.Module):
    """The exported graph: (features, h, c) -> (probs, h_next, c_next); stateless, any batch size.

    The same math as InterestModel.step + probs (eval mode), rearranged for a cheap single step: everything
    computed from the event features alone (the LSTM's input gates with the action embedding folded in,
    the drift gate, the memory decays and gains) is one matmul over all members, with weights built here; then
    each member runs as plain 2-D ops on its slice of h and c (no batched matmuls or transposes, which cost
    more than they save in ONNX Runtime at small batches). The export's parity check holds it to the sequence
    forward. Configurations without memories use the plain step.
    """

    def __init__(self, model: InterestModel):
        super().__init__()
        self.model = model
        cfg = model.cfg
        self.fused = cfg.memory
        if not self.fused:
            return
        k, a, t, hl, n, m = (
            cfg.n_categories,
            cfg.n_actions,
            cfg.n_time_features,
            cfg.hidden_size,
            cfg.n_memories,
            cfg.n_members,
        )
        with torch.no_grad():
            w = model.cell.proj.weight  # (M, K + E + T + Hl, 4 Hl): rows y, action embedding, time, h
            e = cfg.action_dim
            w_y, w_e, w_t, w_h = w[:, :k], w[:, k : k + e], w[:, k + e : k + e + t], w[:, k + e + t :]
            zeros = w.new_zeros
            cols = [torch.cat([w_y, model.action_emb.weight @ w_e, w_t], dim=1)]  # (M, F, 4 Hl)
            bias = [model.cell.proj.bias]
            if cfg.state_drift:
                cols.append(torch.cat([zeros(m, k + a, hl), model.drift.weight], dim=1))
                bias.append(model.drift.bias)
            cols.append(torch.cat([zeros(m, k + a, n), model.mem_decay.weight], dim=1))
            bias.append(model.mem_decay.bias)
            cols.append(torch.cat([zeros(m, k, n), model.mem_gain.weight, zeros(m, t, n)], dim=1))
            bias.append(zeros(m, 1, n))
            wx = torch.cat(cols, dim=2)  # (M, F, Z): per member [gates, drift, decay, gain]
            self.z = wx.shape[2]
            self.register_buffer("wx", wx.transpose(0, 1).reshape(wx.shape[1], m * self.z).contiguous())
            self.register_buffer("bx", torch.cat(bias, dim=2).reshape(m * self.z).contiguous())
            self.register_buffer("wh", w_h.contiguous())  # (M, Hl, 4 Hl)
            self.register_buffer("w_out", torch.cat([model.head.weight, model.mix.weight], dim=2).contiguous())
            self.register_buffer("b_out", torch.cat([model.head.bias, model.mix.bias], dim=2).contiguous())

    def _mem_logits(self, i: int, mem_in: torch.Tensor, hs: torch.Tensor) -> torch.Tensor:
        """Member i's memory-to-logits map: mem_in (..., n*K), hs (..., Hl) -> (..., K)."""
        mh = self.model.mem_head
        if self.model.cfg.head_hidden > 0:
            z = torch.cat([mem_in, hs], dim=-1) @ mh[0].weight[i] + mh[0].bias[i]
            return F.gelu(z) @ mh[2].weight[i] + mh[2].bias[i]
        return mem_in @ mh.weight[i]

    def _cell(self, i: int, gx: torch.Tensor, keep: torch.Tensor | None, hs: torch.Tensor, cs: torch.Tensor):
        """Member i's drift and LSTM cell: gx (..., 4Hl) the event's input gates, keep (..., Hl) the drift gate (None
        without drift), hs, cs (..., Hl) -> the next hs, cs."""
        mdl = self.model
        if keep is not None:
            hs = mdl.h0[i] + keep * (hs - mdl.h0[i])
            cs = mdl.c0[i] + keep * (cs - mdl.c0[i])
        gi, gf, gg, go = torch.split(gx + hs @ self.wh[i], mdl.cfg.hidden_size, dim=-1)
        cs = torch.sigmoid(gf) * cs + torch.sigmoid(gi) * torch.tanh(gg)
        return torch.sigmoid(go) * torch.tanh(cs), cs

    def _head(self, i: int, hs: torch.Tensor, mem: torch.Tensor) -> torch.Tensor:
        """Member i's distribution from its LSTM state hs (..., Hl) and memories mem (..., n, K) -> (..., K)."""
        k = self.model.cfg.n_categories
        pm = (mem + 1e-6 / k) / (mem.sum(dim=-1, keepdim=True) + 1e-6)
        out = hs @ self.w_out[i] + self.b_out[i]  # (..., K + 1 + n): logits, mixture logits
        logits = out[..., :k]
        if self.model.cfg.memory_logits:
            logits = logits + self._mem_logits(i, pm.flatten(-2), hs)
        w = F.softmax(out[..., k:], dim=-1)
        return w[..., :1] * F.softmax(logits, dim=-1) + (w[..., 1:].unsqueeze(-1) * pm).sum(dim=-2)

    def forward(self, features: torch.Tensor, h: torch.Tensor, c: torch.Tensor):
        mdl = self.model
        if not self.fused:
            hs, cs, mem = mdl._step(features, *mdl._split(h, c))
            h_next, c_next = mdl._join(hs, cs, mem)
            return mdl._member_probs(hs, mem).mean(dim=0), h_next, c_next
        cfg = mdl.cfg
        k, hl, n, m, zm = cfg.n_categories, cfg.hidden_size, cfg.n_memories, cfg.n_members, self.z
        hm, half = cfg.member_state_size, cfg.memory_slots
        z = torch.matmul(features, self.wx) + self.bx  # (B, M * Z)
        y = features[:, :k].unsqueeze(1)  # (B, 1, K)
        probs, h_next, c_next = [], [], []
        for i in range(m):
            zi = z[:, i * zm : (i + 1) * zm]
            hs, cs = h[:, i * hm : i * hm + hl], c[:, i * hm : i * hm + hl]
            o, keep = 4 * hl, None
            if cfg.state_drift:
                keep = torch.sigmoid(zi[:, o : o + hl])
                o += hl
            hs, cs = self._cell(i, zi[:, : 4 * hl], keep, hs, cs)
            d = torch.sigmoid(zi[:, o : o + n]).unsqueeze(-1)  # (B, n, 1)
            gain = torch.exp(zi[:, o + n : o + 2 * n]).unsqueeze(-1)
            mem = torch.cat([h[:, i * hm + hl : (i + 1) * hm], c[:, i * hm + hl : (i + 1) * hm]], dim=1)
            mem = d * mem.reshape(-1, n, k) + gain * y  # (B, n, K)
            flat = mem.reshape(-1, n * k)
            h_next += [hs, flat[:, :half]]
            c_next += [cs, flat[:, half:]]
            probs.append(self._head(i, hs, mem))
        p = probs[0] if m == 1 else torch.stack(probs).mean(dim=0)
        return p, torch.cat(h_next, dim=1), torch.cat(c_next, dim=1)


# -- the sequence graph's three parts (export/sequence.py joins them around an ONNX Scan) -----------------------------
# StepModel's math for a (B, T) block of events, split so that the Scan's loop carries only what the recurrence needs:
#   SeqPrepare   features (B, T, F), h, c (B, H) -> per-event inputs of the loop, and the state unpacked
#   SeqStep      one loop step on the unpacked state (hs, cs (B, M*Hl), mem (B, M*n*K)), masked positions keep it
#   SeqHead      all positions' (hs, mem) -> probs (B, T, K); the final unpacked state -> h, c (B, H)
# Everything that depends on the event alone (the input gates, the drift gate, the memory decays and gains) runs
# once over the block before the loop, and the head once over the block after it; the loop body is the LSTM cell,
# the drift and the memory update (23 nodes instead of the step graph's 69). SeqStep and SeqHead call StepModel's own
# cell and head (_cell, _head), so the results are the step graph's, bit for bit.
SEQ_LOOP_INPUTS = ("gx", "keep", "d", "gy")  # per-event loop inputs (keep only with state_drift)
SEQ_STATE = ("hs", "cs", "mem")  # the loop's carried state


class _SeqPart(nn.Module):
    """A part of the sequence graph: it runs on StepModel's fused weights and shares its cell and head."""

    def __init__(self, step: StepModel):
        super().__init__()
        self.step = step


class SeqPrepare(_SeqPart):
    def forward(self, features: torch.Tensor, h: torch.Tensor, c: torch.Tensor):
        """features (B, T, F), h, c (B, H) -> gx (B, T, M*4Hl), [keep (B, T, M*Hl)], d, gy (B, T, M*n*K),
        hs, cs (B, M*Hl), mem (B, M*n*K)."""
        st, cfg = self.step, self.step.model.cfg
        k, hl, n, zm, hm = cfg.n_categories, cfg.hidden_size, cfg.n_memories, st.z, cfg.member_state_size
        z = torch.matmul(features, st.wx) + st.bx  # (B, T, M * Z)
        y = features[..., :k].unsqueeze(-2)  # (B, T, 1, K)
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in SEQ_LOOP_INPUTS + SEQ_STATE}
        for i in range(cfg.n_members):
            zi = z[..., i * zm : (i + 1) * zm]
            parts["gx"].append(zi[..., : 4 * hl])
            o = 4 * hl
            if cfg.state_drift:
                parts["keep"].append(torch.sigmoid(zi[..., o : o + hl]))
                o += hl
            d = torch.sigmoid(zi[..., o : o + n]).unsqueeze(-1)  # (B, T, n, 1)
            gain = torch.exp(zi[..., o + n : o + 2 * n]).unsqueeze(-1)
            parts["d"].append(d.expand(*d.shape[:-1], k).flatten(-2))  # (B, T, n*K)
            parts["gy"].append((gain * y).flatten(-2))
            parts["hs"].append(h[:, i * hm : i * hm + hl])
            parts["cs"].append(c[:, i * hm : i * hm + hl])
            parts["mem"].append(torch.cat([h[:, i * hm + hl : (i + 1) * hm], c[:, i * hm + hl : (i + 1) * hm]], dim=1))
        return tuple(v[0] if len(v) == 1 else torch.cat(v, dim=-1) for v in parts.values() if v)


class SeqStep(_SeqPart):
    def forward(self, hs, cs, mem, gx, *rest):
        """hs, cs (B, M*Hl), mem (B, M*n*K), gx, [keep], d, gy (one event's loop inputs), mask (B, 1) bool
        -> hs, cs, mem after the event (unchanged where mask is False)."""
        st, cfg = self.step, self.step.model.cfg
        hl, m = cfg.hidden_size, cfg.n_members
        keep, d, gy, mask = rest if cfg.state_drift else (None, *rest)
        h_new, c_new = [], []
        for i in range(m):
            one = slice(None) if m == 1 else slice(i * hl, (i + 1) * hl)
            g = gx[:, i * 4 * hl : (i + 1) * 4 * hl] if m > 1 else gx
            hi, ci = st._cell(i, g, None if keep is None else keep[:, one], hs[:, one], cs[:, one])
            h_new.append(hi)
            c_new.append(ci)
        h2 = h_new[0] if m == 1 else torch.cat(h_new, dim=1)
        c2 = c_new[0] if m == 1 else torch.cat(c_new, dim=1)
        return torch.where(mask, h2, hs), torch.where(mask, c2, cs), torch.where(mask, d * mem + gy, mem)


class SeqHead(_SeqPart):
    def forward(self, hs_all, mem_all, hs, cs, mem):
        """hs_all (B, T, M*Hl), mem_all (B, T, M*n*K): the state after each event; hs, cs, mem: the final state
        -> probs (B, T, K), h, c (B, H)."""
        st, cfg = self.step, self.step.model.cfg
        k, hl, n, half = cfg.n_categories, cfg.hidden_size, cfg.n_memories, cfg.memory_slots
        nk = n * k
        probs, h_out, c_out = [], [], []
        for i in range(cfg.n_members):
            mi = mem_all[..., i * nk : (i + 1) * nk].unflatten(-1, (n, k))  # (B, T, n, K)
            probs.append(st._head(i, hs_all[..., i * hl : (i + 1) * hl], mi))
            mf = mem[:, i * nk : (i + 1) * nk]
            h_out += [hs[:, i * hl : (i + 1) * hl], mf[:, :half]]
            c_out += [cs[:, i * hl : (i + 1) * hl], mf[:, half:]]
        p = probs[0] if len(probs) == 1 else torch.stack(probs).mean(dim=0)
        return p, torch.cat(h_out, dim=1), torch.cat(c_out, dim=1)


if __name__ == "__main__":
    m = InterestModel(ModelConfig())
    x = torch.zeros(2, 5, m.cfg.n_features)
    print(sum(p.numel() for p in m.parameters()), "parameters; output", tuple(m(x).shape))
