"""Train the interest model on an event log, evaluate it against baselines and write the report.

    interest-stream train --dataset movielens-100k --data ../shared/data/ml-100k \
        --out artifacts/models/movielens-100k
    python -m models.train --dataset taobao --data ../shared/data/taobao-userbehavior-sample \
        --out artifacts/models/taobao
    python -m models.train --dataset csv --data events.csv --items items.csv --out artifacts/models/csv

Writes into --out: model.pt (checkpoint), report.json, report.md, learning_curves.png, users.png.
Deterministic for a given --seed (and thread count). Early stopping on validation cross-entropy; the test
split is only evaluated once, at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models.baselines import run_baselines
from models.checkpoint import save_checkpoint
from models.data import add_dataset_arguments, load_dataset
from models.errors import ConfigError
from models.features import N_TIME_FEATURES
from models.metrics import METRICS, evaluate
from models.model import PROB_EPS, InterestModel, ModelConfig
from models.sequences import SPLITS, UserSequences, build_sequences, split_bounds
from models.vocab import build_vocabulary


@dataclass
class TrainConfig:
    seed: int = 0
    epochs: int = 30  # upper bound (and the cosine schedule's length); early stopping may end sooner
    patience: int = 6  # epochs without validation improvement before stopping
    batch_users: int = 16  # users per gradient step (their train prefixes, padded)
    lr: float = 1e-2
    weight_decay: float = 1e-4  # AdamW
    grad_clip: float = 1.0
    top_k: int = 100  # category vocabulary cut: top-K by frequency plus "other"
    threads: int = 1  # torch intra-op threads (1: small ops gain little from 2, and it degrades badly on a busy box)
    eval_batch: int = 256  # users per evaluation forward
    shuffle_ties: bool = True  # augmentation: random order of a user's same-timestamp train events each epoch
    ema: float = 0.0  # > 0: evaluate and keep an exponential moving average of the weights (decay per step)
    aux_horizon: int = 1  # > 1: the training target mixes in the mean of the next aux_horizon train events
    aux_weight: float = 0.0  # weight of that multi-event target


MODEL_OPTIONS = ("hidden_size", "action_dim", "dropout", "n_memories", "head_hidden", "n_members")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataset_arguments(parser)
    parser.add_argument("--out", required=True, help="output folder for model.pt and the report")
    tc, mc = TrainConfig(), ModelConfig()
    opts = [(f.name, getattr(tc, f.name)) for f in fields(TrainConfig)]
    opts += [(n, getattr(mc, n)) for n in MODEL_OPTIONS]
    for name, default in opts:
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f"default {default}")
        else:
            parser.add_argument(flag, type=type(default), default=None, help=f"default {default}")
    parser.add_argument("--no-memory", action="store_true", help="plain LSTM head (ablation)")
    parser.add_argument("--no-drift", action="store_true", help="no time-gap drift of the state (ablation)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def configs_from_args(args: argparse.Namespace) -> tuple[TrainConfig, dict]:
    tc = TrainConfig(**{f.name: v for f in fields(TrainConfig) if (v := getattr(args, f.name, None)) is not None})
    mc = {n: v for n in MODEL_OPTIONS if (v := getattr(args, n, None)) is not None}
    if getattr(args, "no_memory", False):
        mc["memory"] = False
    if getattr(args, "no_drift", False):
        mc["state_drift"] = False
    if tc.epochs < 1 or tc.batch_users < 1 or tc.lr <= 0:
        raise ConfigError("--epochs and --batch-users must be >= 1 and --lr > 0")
    return tc, mc


def skipped_note(summary: dict) -> str | None:
    """One line naming the loader's non-zero skip counters (summary["skipped_*"]), or None when nothing was skipped."""
    counts = {k.removeprefix("skipped_"): v for k, v in summary.items() if k.startswith("skipped_") and v}
    if not counts:
        return None
    what = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in counts.items())
    return f"{summary.get('dataset', 'data')}: {sum(counts.values())} event rows skipped ({what}); see report.json"


# -- batching -------------------------------------------------------------------------------------------
def shuffle_ties(xu: np.ndarray, ts: np.ndarray, n: int, n_time: int, rng: np.random.Generator) -> np.ndarray:
    """Copy of xu[:n] with events of equal timestamp in random order (their file order is arbitrary).

    Category and action columns move with the event; the time columns stay by position (the first event
    of a tie group carries the gap, the others gap 0), so the result is a valid event sequence.
    """
    t = ts[:n]
    group = np.concatenate([[0], np.cumsum(t[1:] != t[:-1])])
    order = np.lexsort((rng.random(n), group))
    out = xu[:n].copy()
    out[:, :-n_time] = xu[order, :-n_time]
    return out


def train_batches(seqs: UserSequences, batch_users: int, rng: np.random.Generator, ties: bool = False):
    """Yield (x (B, L, F), y (B, L+1, K), mask (B, L+1)) over users' train prefixes.

    A user with n events contributes targets j = 0 .. floor(0.8 n) - 1: j >= 1 are the protocol's train
    targets, j = 0 (predicted from the initial state) trains the cold-start prior.
    """
    lens = np.array([split_bounds(len(x))[0] for x in seqs.x])  # number of targets per user
    users = np.flatnonzero(lens >= 1)
    users = users[np.argsort(lens[users] + rng.random(len(users)), kind="stable")]
    batches = [users[i : i + batch_users] for i in range(0, len(users), batch_users)]
    for bi in rng.permutation(len(batches)):
        idx = batches[bi]
        n_t = lens[idx]
        length = int(n_t.max()) - 1  # inputs: events 0 .. n_t - 2
        x = np.zeros((len(idx), max(length, 0), seqs.x[0].shape[1]), np.float32)
        y = np.zeros((len(idx), length + 1, seqs.k), np.float32)
        mask = np.zeros((len(idx), length + 1), np.float32)
        for r, (u, t) in enumerate(zip(idx, n_t, strict=True)):
            xu = shuffle_ties(seqs.x[u], seqs.ts[u], t, N_TIME_FEATURES, rng) if ties else seqs.x[u][:t]
            x[r, : t - 1] = xu[: t - 1]
            y[r, :t] = xu[:t, : seqs.k]
            mask[r, :t] = 1.0
        yield torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(mask)


@torch.no_grad()
def predict(model: InterestModel, seqs: UserSequences, batch: int = 256) -> list[np.ndarray]:
    """Per user (n, K): row j is the prediction for event j from events 0..j-1 (row 0 = prior)."""
    model.eval()
    order = np.argsort([-len(x) for x in seqs.x], kind="stable")
    out: list[np.ndarray | None] = [None] * len(seqs.x)
    for i in range(0, len(order), batch):
        idx = order[i : i + batch]
        length = len(seqs.x[idx[0]]) - 1
        x = np.zeros((len(idx), length, seqs.x[0].shape[1]), np.float32)
        for r, u in enumerate(idx):
            n = len(seqs.x[u])
            x[r, : n - 1] = seqs.x[u][: n - 1]
        p = model(torch.from_numpy(x)).numpy()
        for r, u in enumerate(idx):
            out[u] = p[r, : len(seqs.x[u])]
    return out  # type: ignore[return-value]


def masked_ce(p: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """p (..., B, L+1, K) (leading axes: ensemble members), y (B, L+1, K), mask (B, L+1) -> mean ce."""
    ce = -(y * torch.log(p.clamp_min(PROB_EPS))).sum(-1)  # (..., B, L+1)
    return (ce * mask).sum() / (mask.sum() * (ce.numel() // mask.numel()))


def training_target(y: torch.Tensor, mask: torch.Tensor, tc: TrainConfig) -> torch.Tensor:
    """The target the loss sees: y, optionally mixed with the mean of the next aux_horizon train events
    (within each user's train prefix: mask; ML-100K's same-second events come in arbitrary order)."""
    if tc.aux_horizon > 1 and tc.aux_weight > 0:
        cs = torch.cat([torch.zeros_like(y[:, :1]), torch.cumsum(y * mask.unsqueeze(-1), dim=1)], dim=1)
        n = mask.sum(dim=1, keepdim=True)  # (B, 1) targets per row
        j = torch.arange(y.shape[1]).unsqueeze(0)  # (1, L+1)
        end = torch.minimum(j + tc.aux_horizon, n.long()).clamp_min(j + 1)  # (B, L+1)
        win = torch.gather(cs, 1, end.unsqueeze(-1).expand_as(y)) - cs[:, :-1]
        y = (1 - tc.aux_weight) * y + tc.aux_weight * win / (end - j).unsqueeze(-1)
    return y


def fit(model: InterestModel, seqs: UserSequences, tc: TrainConfig, progress: bool = True) -> tuple[list[dict], int]:
    """Train with AdamW and early stopping on validation ce; restores the best epoch's weights."""
    rng = np.random.default_rng(tc.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=tc.epochs, eta_min=tc.lr / 20)
    history: list[dict] = []
    best = (math.inf, 0, {k: v.clone() for k, v in model.state_dict().items()})
    params = list(model.parameters())
    ema = [p.detach().clone() for p in params] if tc.ema > 0 else None
    bar = tqdm(range(1, tc.epochs + 1), desc="train", unit="epoch", disable=not progress)
    for epoch in bar:
        model.train()
        t0, tot, n = time.perf_counter(), 0.0, 0.0
        for x, y, mask in train_batches(seqs, tc.batch_users, rng, tc.shuffle_ties):
            # each ensemble member on its own loss (independent members; the mean of their losses)
            loss = masked_ce(model.forward_members(x), training_target(y, mask, tc), mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            opt.step()
            if ema is not None:
                with torch.no_grad():
                    torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - tc.ema)
            tot += loss.item() * float(mask.sum())
            n += float(mask.sum())
        sched.step()
        if ema is not None:  # evaluate (and keep) the averaged weights; training goes on from the raw ones
            raw = [p.detach().clone() for p in params]
            with torch.no_grad():
                torch._foreach_copy_([p.data for p in params], ema)
        val = evaluate(*seqs.gather(predict(model, seqs, tc.eval_batch), "val"))
        row = {"epoch": epoch, "train_loss": tot / n, "val_ce": val["ce"], "val_top3_mass": val["top3_mass"]}
        history.append({**row, "seconds": time.perf_counter() - t0})
        bar.set_postfix(loss=f"{tot / n:.4f}", val_ce=f"{val['ce']:.4f}", top3=f"{val['top3_mass']:.4f}")
        if val["ce"] < best[0] - 1e-5:
            best = (val["ce"], epoch, {k: v.clone() for k, v in model.state_dict().items()})
        if ema is not None:
            with torch.no_grad():
                torch._foreach_copy_([p.data for p in params], raw)
        if epoch - best[1] >= tc.patience:
            break
    model.load_state_dict(best[2])
    model.eval()
    return history, best[1]


# -- report ---------------------------------------------------------------------------------------------
def write_plots(
    out: Path,
    history: list[dict],
    seqs: UserSequences,
    preds: list[np.ndarray],
    cats: list[str],
    dec_val_ce: float,
) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(ep, [h["train_loss"] for h in history], label="train loss (ce)")
    ax.plot(ep, [h["val_ce"] for h in history], label="validation ce")
    ax.axhline(dec_val_ce, ls="--", c="grey", label="decayed histogram (val)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy (nats)")
    ax.legend()
    ax.set_title("learning curves")
    fig.tight_layout()
    fig.savefig(out / "learning_curves.png", dpi=100)
    plt.close(fig)

    test = seqs.targets("test")
    users = sorted(range(len(test)), key=lambda u: -len(test[u]))[:4]
    k = min(len(cats), 20)
    fig, axes = plt.subplots(len(users), 1, figsize=(9, 2.4 * len(users)), squeeze=False)
    for ax, u in zip(axes[:, 0], users, strict=True):
        p = preds[u][test[u]].mean(axis=0)
        y = seqs.y(u)[test[u]].mean(axis=0)
        top = np.argsort(-(p + y), kind="stable")[:k]
        pos = np.arange(len(top))
        ax.bar(pos - 0.2, p[top], 0.4, label="predicted (mean over test targets)")
        ax.bar(pos + 0.2, y[top], 0.4, label="actual (test events)")
        ax.set_xticks(pos, [cats[i][:12] for i in top], rotation=45, ha="right", fontsize=7)
        ax.set_title(f"user {seqs.users[u]} ({len(test[u])} test events)", fontsize=9)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "users.png", dpi=100)
    plt.close(fig)
    return ["learning_curves.png", "users.png"]


def write_markdown(out: Path, report: dict) -> None:
    lines = [
        f"# Interest model report: {report['dataset']['dataset']}",
        "",
        f"model version `{report['version']}`, best epoch {report['best_epoch']} of {len(report['history'])},"
        " "
        f"training {report['train_seconds']:.0f} s",
        "",
    ]
    for split in ("test", "val"):
        lines += [
            f"## {split} ({report['targets'][split]} targets)",
            "",
            "| model | " + " | ".join(METRICS) + " |",
            "|---" * (len(METRICS) + 1) + "|",
        ]
        for name, m in report[split].items():
            lines.append(f"| {name} | " + " | ".join(f"{m[k]:.4f}" for k in METRICS) + " |")
        lines.append("")
    lines += [
        "## Baseline parameters (tuned on validation)",
        "",
        "```",
        json.dumps(report["baselines"]),
        "```",
        "",
        "## Configuration",
        "",
        "```",
        json.dumps({"model": report["model_config"], "train": report["train_config"]}, indent=1),
        "```",
        "",
        "![](learning_curves.png)",
        "",
        "![](users.png)",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def train(
    dataset: str,
    data: str | Path,
    out: str | Path,
    items: str | Path | None = None,
    tc: TrainConfig | None = None,
    model_overrides: dict | None = None,
    progress: bool = True,
) -> dict:
    """Load, train, evaluate, write model.pt + report.json/.md + plots into `out`; -> the report dict."""
    tc = tc or TrainConfig()
    t_start = time.perf_counter()
    torch.manual_seed(tc.seed)
    torch.set_num_threads(tc.threads)
    ds = load_dataset(dataset, data, items)
    if note := skipped_note(ds.summary):
        print(note, file=sys.stderr)
    vocab = build_vocabulary(ds, tc.top_k)
    seqs = build_sequences(ds, vocab)
    targets = {s: int(sum(len(t) for t in seqs.targets(s))) for s in SPLITS}
    if targets["train"] == 0 or targets["val"] == 0:
        raise ConfigError(f"{dataset}: too few events per user for the 80/10/10 protocol (targets: {targets})")
    cfg = ModelConfig(n_categories=seqs.k, n_actions=seqs.n_actions, **(model_overrides or {}))
    model = InterestModel(cfg)
    history, best_epoch = fit(model, seqs, tc, progress)
    train_seconds = time.perf_counter() - t_start

    preds = {"lstm": predict(model, seqs, tc.eval_batch)}
    # real sequences for the export's parity check: up to 512 users' first 64 raw events
    parity_users = [[[e.item_id, e.action, e.ts] for e in evs[:64]] for evs in ds.by_user().values() if len(evs) >= 64]
    base_preds, base_params = run_baselines(seqs)
    preds.update(base_preds)
    report: dict = {
        "dataset": {**ds.summary, "top_k": tc.top_k, "n_output_categories": seqs.k},
        "targets": targets,
    }
    for split in ("test", "val"):
        report[split] = {name: evaluate(*seqs.gather(p, split)) for name, p in preds.items()}
    report.update(
        {
            "baselines": base_params,
            "model_config": cfg.to_dict(),
            "train_config": asdict(tc),
            "best_epoch": best_epoch,
            "history": history,
            "train_seconds": train_seconds,
            "prior": [float(v) for v in model.prior()],
            "categories": vocab.categories,
        }
    )
    lstm, dec = report["test"]["lstm"], report["test"]["decayed_histogram"]
    report["beats_decayed_histogram"] = lstm["ce"] < dec["ce"] and lstm["top3_mass"] > dec["top3_mass"]

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = save_checkpoint(
        out / "model.pt",
        model,
        vocab,
        {
            "dataset": dataset,
            "summary": ds.summary,
            "catalog": ds.catalog,
            "train_config": asdict(tc),
            "metrics": {"test": report["test"]["lstm"], "val": report["val"]["lstm"]},
            "parity_users": parity_users[:512],
        },
    )
    report["version"] = ckpt["version"]
    report["plots"] = write_plots(
        out, history, seqs, preds["lstm"], vocab.categories, report["val"]["decayed_histogram"]["ce"]
    )
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(out, report)
    return report


def run(args: argparse.Namespace) -> int:
    tc, mc = configs_from_args(args)
    report = train(args.dataset, args.data, args.out, args.items, tc, mc, progress=not args.quiet)
    for name, m in report["test"].items():
        print(f"test {name:18s} " + "  ".join(f"{k}={m[k]:.4f}" for k in METRICS))
    secs = report["train_seconds"]
    print(f"model {report['version']} -> {Path(args.out) / 'model.pt'} (training {secs:.0f} s)")
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m models.train", description=__doc__.splitlines()[0])
    add_arguments(ap)
    raise SystemExit(run(ap.parse_args()))
