"""The interest model: an LSTM over a user's events, a decayed category memory, a learned initial state.

    python -m models.model   # prints the parameter count of the default config on a dummy batch

State. h and c are (B, H) with H = hidden_size + n_memories * K / 2: the LSTM's (h, c), each followed by half of
the n category memories m_i (K each), exponentially decayed sums of the user's past category vectors with
decays from fast (half-life ~1 event) to slow (~64 events) at initialisation.
The stream worker treats h and c as opaque vectors; only this module knows the split.

One step (event features x, see export/features.py for the layout):
    drift:   the LSTM state is pulled toward the learned initial state by a gate on the time gap
    LSTM:    input = [category vector, action embedding, time features]; the cell math is written out so that
             training, the whole-sequence forward and the exported single step are the same code
    memory:  m_i = d_i * m_i + g_i(action) * y, decays d = sigmoid(w * time features + b), gains g = exp(.)
Head: p = w_0 softmax(W h_lstm + U [m_i / |m_i|]) + sum_i w_i m_i / |m_i|, mixture weights w = softmax(V h_lstm)
(a copy mechanism over the user's own history, which the decayed-histogram baseline shows is strong).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from export.features import N_TIME_FEATURES

PROB_EPS = 1e-9  # the metrics' clip; also keeps log(p) finite in the loss


@dataclass
class ModelConfig:
    n_categories: int = 19  # K output categories
    n_actions: int = 5  # A actions
    n_time_features: int = N_TIME_FEATURES  # log gap, first-event flag
    hidden_size: int = 96  # LSTM units (the exported state adds n_memories * K / 2 slots to h and to c)
    action_dim: int = 8  # action embedding size
    dropout: float = 0.1  # on the LSTM input and on the head input
    memory: bool = True  # the decayed category memories and the mixture head
    state_drift: bool = True  # pull the state toward the learned initial state by the time gap
    memory_logits: bool = True  # the softmax head also reads the normalised memories (a learned K x nK map)
    n_memories: int = 4  # decayed category memories (even: half ride in h, half in c)
    head_hidden: int = 0  # > 0: the memory-to-logits map is an MLP with this many units instead of linear

    @property
    def memory_slots(self) -> int:
        """State entries the memories take in h (and as many in c)."""
        return self.n_categories * self.n_memories // 2 if self.memory else 0

    @property
    def state_size(self) -> int:
        return self.hidden_size + self.memory_slots

    @property
    def n_features(self) -> int:
        return self.n_categories + self.n_actions + self.n_time_features

    def to_dict(self) -> dict:
        return asdict(self)


class LSTMCell(nn.Module):
    """The standard LSTM cell (gate order i, f, g, o), written out so that it exports as plain ops."""

    def __init__(self, n_in: int, n_hidden: int):
        super().__init__()
        self.proj = nn.Linear(n_in + n_hidden, 4 * n_hidden)
        with torch.no_grad():  # forget-gate bias 1: remember by default
            self.proj.bias[n_hidden : 2 * n_hidden].fill_(1.0)

    def forward(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        i, f, g, o = self.proj(torch.cat([x, h], dim=1)).chunk(4, dim=1)  # each (B, Hl)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, c


class InterestModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        k, a, t, hl = cfg.n_categories, cfg.n_actions, cfg.n_time_features, cfg.hidden_size
        self.action_emb = nn.Linear(a, cfg.action_dim, bias=False)  # one-hot @ W == embedding lookup
        self.cell = LSTMCell(k + cfg.action_dim + t, hl)
        self.h0 = nn.Parameter(torch.zeros(hl))  # learned initial state (cold start)
        self.c0 = nn.Parameter(torch.zeros(hl))
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(hl, k)
        if cfg.state_drift:
            self.drift = nn.Linear(t, hl)  # keep = sigmoid(drift(time)); 1 keeps the state, 0 resets it
            with torch.no_grad():
                self.drift.weight.zero_()
                self.drift.bias.fill_(4.0)
        if cfg.memory:
            n = cfg.n_memories
            if n < 2 or n % 2:
                raise ValueError(f"n_memories must be even and >= 2, got {n}")
            self.mem_decay = nn.Linear(t, n)  # per-memory decay d = sigmoid(.) from the time features
            self.mem_gain = nn.Linear(a, n, bias=False)  # per-action weight exp(.) of an event in each memory
            self.mix = nn.Linear(hl, 1 + n)  # mixture weights of (softmax head, memory 1..n)
            if cfg.memory_logits and cfg.head_hidden > 0:
                self.mem_head = nn.Sequential(
                    nn.Linear(n * k + hl, cfg.head_hidden), nn.GELU(), nn.Linear(cfg.head_hidden, k)
                )
                nn.init.zeros_(self.mem_head[2].weight)
            elif cfg.memory_logits:
                self.mem_head = nn.Linear(n * k, k, bias=False)
                nn.init.zeros_(self.mem_head.weight)
            with torch.no_grad():  # half-lives spread from 1 to 64 events
                half_life = 2.0 ** torch.linspace(0, 6, n)
                d = 0.5 ** (1 / half_life)
                self.mem_decay.weight.zero_()
                self.mem_decay.bias.copy_(torch.log(d / (1 - d)))
                self.mem_gain.weight.zero_()

    # -- state ---------------------------------------------------------------------------------------
    def initial_state(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> h, c (B, H): the learned LSTM state followed by empty memories."""
        z = self.h0.new_zeros(batch, self.cfg.memory_slots)
        h = torch.cat([self.h0.expand(batch, -1), z], dim=1)
        c = torch.cat([self.c0.expand(batch, -1), z], dim=1)
        return h, c

    def step(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One event for a batch of users: x (B, F), h, c (B, H) -> h_next, c_next (B, H)."""
        cfg = self.cfg
        k, a, hl = cfg.n_categories, cfg.n_actions, cfg.hidden_size
        y, act, t = x[:, :k], x[:, k : k + a], x[:, k + a :]  # (B,K) (B,A) (B,T)
        hs, cs = h[:, :hl], c[:, :hl]
        if cfg.state_drift:
            keep = torch.sigmoid(self.drift(t))  # (B, Hl)
            hs = self.h0 + keep * (hs - self.h0)
            cs = self.c0 + keep * (cs - self.c0)
        inp = self.drop(torch.cat([y, self.action_emb(act), t], dim=1))
        hs, cs = self.cell(inp, hs, cs)
        if not cfg.memory:
            return hs, cs
        n = cfg.n_memories
        mem = torch.cat([h[:, hl:], c[:, hl:]], dim=1).reshape(-1, n, k)  # (B, n, K)
        d = torch.sigmoid(self.mem_decay(t)).unsqueeze(-1)  # (B, n, 1)
        gain = torch.exp(self.mem_gain(act)).unsqueeze(-1)  # (B, n, 1)
        mem = d * mem + gain * y.unsqueeze(1)
        half = cfg.memory_slots
        mem = mem.reshape(-1, n * k)
        return torch.cat([hs, mem[:, :half]], dim=1), torch.cat([cs, mem[:, half:]], dim=1)

    def probs(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """State (N, H) -> next-event category distribution (N, K)."""
        hl, k = self.cfg.hidden_size, self.cfg.n_categories
        hs = self.drop(h[:, :hl])
        if not self.cfg.memory:
            return F.softmax(self.head(hs), dim=-1)
        n = self.cfg.n_memories
        mem = torch.cat([h[:, hl:], c[:, hl:]], dim=1).reshape(-1, n, k)  # (N, n, K)
        pm = (mem + 1e-6 / k) / (mem.sum(dim=2, keepdim=True) + 1e-6)  # normalised; uniform while empty
        logits = self.head(hs)
        if self.cfg.memory_logits:
            mem_in = pm.reshape(-1, n * k)
            if self.cfg.head_hidden > 0:
                mem_in = torch.cat([mem_in, hs], dim=1)
            logits = logits + self.mem_head(mem_in)
        w = F.softmax(self.mix(hs), dim=-1)  # (N, 1 + n)
        return w[:, :1] * F.softmax(logits, dim=-1) + (w[:, 1:].unsqueeze(-1) * pm).sum(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Sequences x (B, L, F) -> predictions (B, L + 1, K); [:, j] predicts event j from events < j."""
        b, length, _ = x.shape
        h, c = self.initial_state(b)
        hs, cs = [h], [c]
        for t in range(length):
            h, c = self.step(x[:, t], h, c)
            hs.append(h)
            cs.append(c)
        h_all = torch.stack(hs, dim=1).reshape(b * (length + 1), -1)  # (B*(L+1), H)
        c_all = torch.stack(cs, dim=1).reshape(b * (length + 1), -1)
        return self.probs(h_all, c_all).reshape(b, length + 1, -1)

    @torch.no_grad()
    def prior(self) -> torch.Tensor:
        """(K,) the cold-start distribution."""
        h, c = self.initial_state(1)
        return self.probs(h, c)[0]


class StepModel(nn.Module):
    """The exported graph: (features, h, c) -> (probs, h_next, c_next); stateless, any batch size."""

    def __init__(self, model: InterestModel):
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor, h: torch.Tensor, c: torch.Tensor):
        h_next, c_next = self.model.step(features, h, c)
        return self.model.probs(h_next, c_next), h_next, c_next


if __name__ == "__main__":
    m = InterestModel(ModelConfig())
    x = torch.zeros(2, 5, m.cfg.n_features)
    print(sum(p.numel() for p in m.parameters()), "parameters; output", tuple(m(x).shape))
