"""The ``interest-stream`` command: one entry point, a subcommand per job.

    interest-stream --help

Each subcommand lives in the module that owns the concept and exposes ``add_arguments(parser)`` and
``run(args) -> int`` (or the function named after a colon, ``module:function``, where one module has several);
modules are imported only when their subcommand runs, so ``lookup`` does not load torch, and
a subcommand that needs an extra the install lacks (``train`` needs torch) says which one in one line.
Errors meant for a user (``InterestStreamError``) print as one line and exit 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from models.errors import InterestStreamError

# a module a subcommand may miss in a slim install -> the extra that brings it
EXTRAS = {"torch": "train", "matplotlib": "train", "psutil": "bench"}

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("models.train", "train the interest LSTM on a real data set and evaluate it against baselines"),
    "export": ("export.onnx_export", "export a checkpoint to the single-step ONNX graph and check parity"),
    "worker": ("streams.runtime.worker", "run the Faust stream worker"),
    "replay": ("streams.tools.replay", "produce a data set (or synthetic load) into the input topic"),
    "lookup": ("streams.lookup", "print a user's interest distribution from Redis"),
    "verify": ("streams.tools.verify", "replay the log offline through the model and compare with Redis"),
    "backfill": ("streams.tools.backfill", "build a new model version's states from the retained log"),
    "promote": ("streams.tools.rollout:run_promote", "switch readers to a caught-up model version (or back)"),
    "status": ("streams.tools.rollout:run_status", "the model versions, the promoted one, each one's lag"),
    "retire": ("streams.tools.rollout:run_retire", "delete a version readers do not see: states, group, topic"),
    "dump": ("streams.tools.dump", "write the retained input log as the generic CSV, to retrain on"),
    "bench": ("streams.bench.run", "benchmark the worker against ceilings and a naive design"),
    "demo": ("streams.local.demo", "services, model, worker and replay on ML-100K, with live distributions"),
    "services": ("streams.local.cluster", "start/stop the local broker and Redis (or a Redis Cluster)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="interest-stream", description="Real-time user-interest distributions from click streams."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, description=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints help / usage error and exits
        return 2
    name = argv[0]
    target, help_text = COMMANDS[name]
    module_name, _, function = target.partition(":")
    sub = argparse.ArgumentParser(prog=f"interest-stream {name}", description=help_text)
    try:
        module = importlib.import_module(module_name)
        module.add_arguments(sub)
        args = sub.parse_args(argv[1:])
        return int(getattr(module, function or "run")(args) or 0)
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing not in EXTRAS:
            raise
        hint = f"pip install 'interest-stream[{EXTRAS[missing]}]'"
        print(f"interest-stream {name}: needs {missing}, which this install lacks: {hint}", file=sys.stderr)
        return 2
    except InterestStreamError as exc:
        print(f"interest-stream {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interest-stream {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
