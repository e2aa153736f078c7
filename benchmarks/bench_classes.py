"""``whylook explain`` on a model with many classes, by stage.

MNIST and CIFAR-10 have 10 classes; a user's model may have 100. The stages that work on
class pairs (Step 6's learning order and uncertain prototypes, M(M-1)/2 pairs) and on
classes (one HDBSCAN and one ridge fit per class) grow with M while the passes do not.
This builds a synthetic M-class dataset (16x16 images, each class a fixed random pattern
of dots shifted by up to a pixel, under noise; 60 training and 10 test images a class),
trains ``smallcnn`` on it once (3 epochs, 12 checkpoints), and times a fresh ``explain``
of 2000 samples (``--samples``) stage by stage, ``--repeats`` times (medians).

    python benchmarks/bench_classes.py --classes 100 --threads 1 --repeats 3
    python benchmarks/bench_classes.py --classes 1000 --samples 8192 --repeats 1
    python benchmarks/bench_classes.py --classes 1000 --samples 4000 --repeats 1 --report
    python benchmarks/bench_classes.py --classes 1000 --samples 8192 --repeats 1 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from bench_analysis import machine_info, timed_explain, write_result
from threadpoolctl import threadpool_limits

import whylook
from whylook.run import RunFolder
from whylook.train import train


def dotted_classes(path: Path, m: int, size: int = 16, seed: int = 0) -> None:
    """Write an npz of ``m`` classes of dotted 16x16 patterns (see the module notes)."""
    rng = np.random.default_rng(seed)
    templates = rng.random((m, size, size)) < 0.25

    def split(per_class: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.repeat(np.arange(m), per_class)
        images = templates[labels] * 200.0 + rng.normal(0, 40, (labels.size, size, size))
        shifts = rng.integers(-1, 2, (labels.size, 2))
        for i, (dy, dx) in enumerate(shifts):
            images[i] = np.roll(images[i], (dy, dx), axis=(0, 1))
        return np.clip(images, 0, 255).astype(np.uint8), labels

    x_train, y_train = split(60)
    x_test, y_test = split(10)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)


def time_json(explanation: dict) -> dict:
    """Seconds (median of 3) and megabytes of the explanation's text, written both ways."""
    from whylook._io import json_text

    ways = {"indent=2": lambda: json.dumps(explanation, indent=2, sort_keys=True,
                                           allow_nan=False),
            "whylook": lambda: json_text(explanation)}
    out = {}
    for name, encode in ways.items():
        times = []
        for _ in range(3):
            start = time.perf_counter()
            text = encode()
            times.append(time.perf_counter() - start)
        out[name] = {"seconds": statistics.median(times), "megabytes": len(text) / 1e6}
        print(f"explanation.json, {name}: {out[name]['seconds']:.2f} s, "
              f"{out[name]['megabytes']:.0f} MB", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--samples", type=int, default=2000, help="explain's analysis set")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--report", action="store_true",
                        help="also time `whylook report` of the explained run (once)")
    parser.add_argument("--json", action="store_true",
                        help="also time the explanation's JSON text: json.dumps(indent=2), "
                             "as whylook wrote it before 2026-12-06, against whylook's layout")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not 0 < args.samples <= 60 * args.classes:
        parser.error(f"--samples must be 1 to {60 * args.classes} (60 training images a class)")
    torch.set_num_threads(args.threads)
    info = machine_info(args.threads, torch.device("cpu"))
    print(f"whylook from {Path(whylook.__file__).parent}", flush=True)
    with tempfile.TemporaryDirectory() as tmp, threadpool_limits(args.threads):
        data = Path(tmp) / "data.npz"
        dotted_classes(data, args.classes)
        start = time.perf_counter()
        run = train(f"npz:{data}", "smallcnn", epochs=3, checkpoints=12, out=Path(tmp) / "run",
                    progress=False)
        run = RunFolder.open(run.path)
        accuracy = run.manifest.get("measured", {}).get("final_test_accuracy")
        print(f"trained in {time.perf_counter() - start:.0f} s, test accuracy {accuracy}",
              flush=True)
        totals, stages = [], defaultdict(list)
        for repeat in range(args.repeats):
            total, by_stage = timed_explain(run, torch.device("cpu"), analysis_size=args.samples)
            totals.append(total)
            for name, seconds in by_stage.items():
                stages[name].append(seconds)
            print(f"explain {total:.2f} s (repeat {repeat + 1} of {args.repeats})", flush=True)
        explanation = json.loads((run.path / "analysis" / "explanation.json").read_text())
        encoding = time_json(explanation) if args.json else None
        page = None
        if args.report:
            from whylook.report import report

            start = time.perf_counter()
            index = report(run.path)
            page = {"seconds": time.perf_counter() - start, "bytes": index.stat().st_size,
                    "figures": len(list(index.parent.rglob("*.png")))}
            print(f"report {page['seconds']:.1f} s, index.html {page['bytes'] / 1e6:.1f} MB, "
                  f"{page['figures']} PNG files", flush=True)
    median = {name: statistics.median(v) for name, v in stages.items()}
    for name, seconds in sorted(median.items(), key=lambda kv: -kv[1]):
        print(f"  {name:40s} {seconds:6.2f} s")
    print(f"  {'total':40s} {statistics.median(totals):6.2f} s")
    result = {
        "machine": info,
        "classes": args.classes,
        "samples": args.samples,
        "total_seconds": totals,
        "stage_seconds": dict(stages),
        "uncertain_prototypes": len(explanation.get("uncertain_prototypes", [])),
        "pairs": len(explanation.get("learning_order", [])),
        "final_test_accuracy": accuracy,
        "report": page,
        "json": encoding,
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
