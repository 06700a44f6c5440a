"""``python -m streams.bench``: the hidden subcommands the bench starts in processes of their own, else the bench."""

import sys

from streams.bench.peers import floor_consumer, noop_worker, quix_noop

if len(sys.argv) > 1 and sys.argv[1] == "noop-worker":
    sys.exit(noop_worker(sys.argv[2:]))
if len(sys.argv) > 1 and sys.argv[1] == "quix-noop":
    sys.exit(quix_noop(sys.argv[2:]))
if len(sys.argv) > 1 and sys.argv[1] == "floor-consumer":
    sys.exit(floor_consumer(sys.argv[2:]))
if len(sys.argv) > 1 and sys.argv[1] == "producers":
    from streams.bench.producers import producers

    sys.exit(producers(sys.argv[2:]))
if len(sys.argv) > 1 and sys.argv[1] == "ab":
    from streams.bench.ab import ab

    sys.exit(ab(sys.argv[2:]))
from streams.cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
