"""``whylook report RUN``: the whole report and each kind of figure in it.

In one process: ``whylook.report.report`` of a run folder, once to warm up (imports, font
cache) and then ``--repeats`` times, with every figure function of
``whylook.report.figures`` wrapped in a timer. Per kind: how many figures one report
draws, seconds per figure and in all (medians over the repeats), beside the report's
total. ``--fresh N`` also times N ``whylook report RUN`` commands one after another, each
a fresh Python process (imports included, as a user runs it): their wall time's median
and range.

The in-process reports are written to a temporary folder (``report(RUN, out=...)``),
never into RUN; the ``--fresh`` commands write ``RUN/report`` as ``whylook report`` does,
so point them at a copy of a run you want left as it is. Like the other benchmarks, it
times the checkout's ``src`` (``bench_analysis`` puts it first on the path); a copy of
``benchmarks/`` beside an older ``src`` times that one, for a before/after.

    python benchmarks/bench_report.py /tmp/rep/whylook-demo --repeats 5 --fresh 5
    python benchmarks/bench_report.py RUN --repeats 3 --out benchmarks/results/report.json
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from bench_analysis import machine_info, write_result

import whylook
from whylook.report import figures, report

_CLI = "import sys; from whylook.cli import main; sys.exit(main(sys.argv[1:]))"


def timed_figures(log: dict[str, list[float]]) -> Callable[[], None]:
    """Wrap each figure function of ``whylook.report.figures`` so that every call appends
    its seconds to ``log[name]``; returns the function that puts the originals back."""
    originals = {name: getattr(figures, name) for name in figures.__all__
                 if getattr(figures, name).__annotations__.get("return") == "bytes"}

    def timer(name: str, draw: Callable[..., bytes]) -> Callable[..., bytes]:
        @functools.wraps(draw)
        def timed(*args: Any, **kwargs: Any) -> bytes:
            start = time.perf_counter()
            try:
                return draw(*args, **kwargs)
            finally:
                log[name].append(time.perf_counter() - start)
        return timed

    def restore() -> None:
        for name, draw in originals.items():
            setattr(figures, name, draw)

    for name, draw in originals.items():
        setattr(figures, name, timer(name, draw))
    return restore


def in_process(run: Path, repeats: int) -> dict[str, Any]:
    """The report's seconds and each figure kind's count and seconds, ``repeats`` times."""
    totals: list[float] = []
    kinds: dict[str, list[tuple[int, float]]] = defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp:
        report(run, out=Path(tmp) / "warm-up")
        for _ in range(repeats):
            log: dict[str, list[float]] = defaultdict(list)
            restore = timed_figures(log)
            try:
                start = time.perf_counter()
                index = report(run, out=Path(tmp) / "report")
                totals.append(time.perf_counter() - start)
            finally:
                restore()
            for name, seconds in log.items():
                kinds[name].append((len(seconds), sum(seconds)))
        pngs = sorted(index.parent.rglob("*.png"))
        page = {"bytes": index.stat().st_size, "png_files": len(pngs),
                "png_bytes": sum(p.stat().st_size for p in pngs)}
    by_kind = {}
    for name, runs in kinds.items():
        count = runs[0][0]
        total = statistics.median(s for _, s in runs)
        by_kind[name] = {"figures": count, "seconds": total, "per_figure": total / count,
                         "seconds_each_repeat": [s for _, s in runs]}
    return {"seconds": statistics.median(totals), "seconds_each_repeat": totals,
            "figure_kinds": by_kind, "page": page}


def fresh(run: Path, n: int) -> dict[str, Any]:
    """Wall seconds of ``n`` ``whylook report RUN`` commands, each its own process (of the
    whylook this process imported: its ``src`` goes first on their path)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(whylook.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    walls = []
    for _ in range(n):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", _CLI, "report", str(run)], check=True,
                       stdout=subprocess.DEVNULL, env=env)
        walls.append(time.perf_counter() - start)
    return {"median": statistics.median(walls), "min": min(walls), "max": max(walls),
            "each": walls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run folder with analysis/ (whylook explain)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fresh", type=int, default=0, metavar="N",
                        help="also time N `whylook report RUN` commands in fresh processes "
                        "(they write RUN/report)")
    parser.add_argument("--out", type=Path, help="write the result as JSON")
    args = parser.parse_args()
    info = machine_info(torch.get_num_threads(), torch.device("cpu"))  # left as they are
    print(f"whylook from {Path(whylook.__file__).parent}", flush=True)
    result: dict[str, Any] = {"machine": info, "run": str(args.run.resolve()),
                              "in_process": in_process(args.run, args.repeats)}
    rows = result["in_process"]["figure_kinds"]
    drawn = sum(r["seconds"] for r in rows.values())
    print(f"{'figure kind':22s} {'figures':>7s} {'s/figure':>9s} {'seconds':>8s}")
    for name, r in sorted(rows.items(), key=lambda kv: -kv[1]["seconds"]):
        print(f"{name:22s} {r['figures']:7d} {r['per_figure']:9.3f} {r['seconds']:8.2f}")
    print(f"{'all figures':22s} {sum(r['figures'] for r in rows.values()):7d} {'':9s} "
          f"{drawn:8.2f}")
    page = result["in_process"]["page"]
    print(f"report in process (median of {args.repeats}, imports warm): "
          f"{result['in_process']['seconds']:.2f} s; index.html {page['bytes'] / 1e6:.2f} MB, "
          f"{page['png_files']} PNG files ({page['png_bytes'] / 1e6:.2f} MB)")
    if args.fresh:
        result["fresh"] = fresh(args.run, args.fresh)
        f = result["fresh"]
        print(f"whylook report, {args.fresh} fresh process(es): median {f['median']:.2f} s wall "
              f"(min {f['min']:.2f}, max {f['max']:.2f})")
    write_result(args.out, result)


if __name__ == "__main__":
    main()
