"""`make bench`: every benchmark, then the summary lines, one per line, value after a space.

    python -m benchmarks [--smoke]
"""

from __future__ import annotations

import argparse

from benchmarks import batching, jobs, nsfw, priority, service
from benchmarks.peers import driver as peers
from benchmarks.report import print_summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and few runs")
    args = parser.parse_args(argv)
    figures = nsfw.run(3 if args.smoke else 30, args.smoke)
    figures.update(service.run(*((2, 2.0) if args.smoke else (service.RUNS, 20.0)), args.smoke))
    figures.update(batching.run(args.smoke))
    figures.update(jobs.run(*((2.0, 3) if args.smoke else (jobs.SECONDS, jobs.PAIRS)), args.smoke))
    figures.update(priority.run(args.smoke))
    # Last, and its figures after the fixed ones: one pair per peer and shape.
    peer_figures = peers.run(smoke=args.smoke)
    print()
    order = ["nsfw_speedup_vs_pipeline", "nsfw_p50_ms", "added_p50_ms_512x1024",
             "added_p50_ms_1024x2048", "gateway_overhead_p50_ms", "concurrency_ratio",
             "nsfw_floor_ratio", "batch_throughput_ratio_demo", "batch_throughput_ratio_sd",
             "priority_interactive_ratio", "priority_off_interactive_ratio",
             "jobs_submit_per_s", "jobs_overhead_p50_ms", "jobs_throughput_ratio"]
    print_summary({**{name: figures[name] for name in order}, **peer_figures})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
