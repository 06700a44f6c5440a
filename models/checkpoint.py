"""Checkpoints: a plain dict of tensors and plain types (state_dict, configs, vocabularies, data summary).

    python -m models.checkpoint artifacts/models/movielens-100k/model.pt   # prints version, config, metrics

Saved with torch.save and loaded with weights_only=True: no pickled objects.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

from models.errors import ModelError
from models.model import InterestModel, ModelConfig
from models.vocab import Vocabulary

FORMAT = "interest-stream-checkpoint"
FORMAT_VERSION = 1


def model_version(dataset: str, model: InterestModel) -> str:
    """'<dataset>-<first 8 hex of sha256(config + weights)>'."""
    h = hashlib.sha256(json.dumps(model.cfg.to_dict(), sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return f"{dataset}-{h.hexdigest()[:8]}"


def save_checkpoint(path: str | Path, model: InterestModel, vocab: Vocabulary, extra: dict) -> dict:
    """extra: dataset, summary, catalog, train_config, metrics... (plain types only)."""
    ckpt = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "version": model_version(extra["dataset"], model),
        "config": model.cfg.to_dict(),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "vocab": vocab.to_dict(),
        **extra,
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return ckpt


def _single_to_members(state: dict) -> dict:
    """A state_dict of the one-model layout (nn.Linear weights (out, in)) -> the member layout (1, in, out)."""
    out = {}
    for k, v in state.items():
        if k in ("h0", "c0") or k.endswith(".bias"):
            out[k] = v.reshape(1, 1, -1)
        elif k.endswith(".weight"):
            out[k] = v.t().unsqueeze(0)
        else:
            out[k] = v
    return out


def load_checkpoint(path: str | Path) -> tuple[InterestModel, dict]:
    """-> (model in eval mode, the checkpoint dict); ModelError on a missing, corrupt or foreign file."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{p}: checkpoint not found")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt files
        raise ModelError(
            f"{p}: not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ModelError(f"{p}: not an interest-stream checkpoint")
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise ModelError(f"{p}: checkpoint format {ckpt.get('format_version')} unsupported (want {FORMAT_VERSION})")
    try:
        if "n_members" not in ckpt["config"]:  # written before ensembles: nn.Linear layout, one member
            ckpt["state_dict"] = _single_to_members(ckpt["state_dict"])
        model = InterestModel(ModelConfig(**ckpt["config"]))
        model.load_state_dict(ckpt["state_dict"])
    except ValueError as e:  # the model constructor rejects the config
        raise ModelError(f"{p}: invalid model config in checkpoint ({str(e).splitlines()[0][:200]})") from None
    except (KeyError, TypeError, RuntimeError) as e:
        raise ModelError(f"{p}: checkpoint does not match the model code ({str(e).splitlines()[0][:200]})") from None
    model.eval()
    return model, ckpt


if __name__ == "__main__":
    m, ck = load_checkpoint(sys.argv[1])
    print(ck["version"], json.dumps(ck["config"]))
    print(json.dumps(ck.get("metrics", {}), indent=2))
