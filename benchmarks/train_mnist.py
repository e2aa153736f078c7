"""Training benchmark on the full MNIST (60k/10k): smallcnn for 3 epochs, resnet50 timed.

smallcnn goes through ``whylook.train.train`` (the real code path, checkpoints and test
evaluation included) with the ``epoch`` schedule, so run.json holds the test accuracy
after every epoch and the training seconds of each epoch (evaluation excluded).

resnet50 is far too slow for a full epoch on a 2-core CPU, so by default it is timed over
a fixed number of optimizer steps (after warm-up steps) with the same batch construction,
and the epoch time is extrapolated and labelled so. ``--resnet-full`` trains one real
epoch through ``train`` instead (for a machine with a GPU).

Run from the project root:

    nice python benchmarks/train_mnist.py --data npz:../shared/data/mnist.npz
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from whylook.data import load_data, to_tensor
from whylook.models import build_model, resolve_device
from whylook.train import train


def bench_smallcnn(data: str, epochs: int, device: str, out: Path) -> dict:
    start = time.perf_counter()
    run = train(
        data,
        "smallcnn",
        epochs=epochs,
        checkpoints=epochs + 1,
        schedule="epoch",
        seed=0,
        device=device,
        out=out / "smallcnn",
        progress=False,
    )
    measured = run.manifest["measured"]
    return {
        "model": "smallcnn",
        "epochs": epochs,
        "test_accuracy_after_epoch": [c.test_accuracy for c in run.checkpoints[1:]],
        "seconds_per_epoch": measured["seconds_per_epoch"],
        "cpu_seconds_per_epoch": measured["cpu_seconds_per_epoch"],
        "checkpoint_seconds": measured["checkpoint_seconds"],
        "wall_seconds": round(time.perf_counter() - start, 1),
        "device": measured["device_name"],
    }


def bench_resnet50_steps(data: str, steps: int, warmup: int, batch_size: int, device: str) -> dict:
    source = load_data(data)
    dev = resolve_device(device)
    mean, std = source.channel_stats()
    torch.manual_seed(0)
    model = (
        build_model(
            "resnet50",
            num_classes=source.num_classes,
            in_channels=source.channels,
            image_size=source.image_size,
            mean=mean,
            std=std,
        )
        .to(dev)
        .train()
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    perm = torch.randperm(len(source.train), generator=torch.Generator().manual_seed(0)).numpy()
    labels = torch.from_numpy(source.train.labels.copy())
    times, cpu_times = [], []
    for i in range(warmup + steps):
        idx = perm[i * batch_size : (i + 1) * batch_size]
        t0, c0 = time.perf_counter(), time.process_time()
        x, y = to_tensor(source.train.images[idx]).to(dev), labels[idx].to(dev)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    per_step = sum(times) / len(times)
    steps_per_epoch = math.ceil(len(source.train) / batch_size)
    return {
        "model": "resnet50",
        "timed_steps": steps,
        "warmup_steps": warmup,
        "batch_size": batch_size,
        "seconds_per_step": round(per_step, 3),
        "cpu_seconds_per_step": round(sum(cpu_times) / len(cpu_times), 3),
        "steps_per_epoch": steps_per_epoch,
        "extrapolated_seconds_per_epoch": round(per_step * steps_per_epoch, 1),
        "device": str(dev),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="npz:../shared/data/mnist.npz")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resnet-steps", type=int, default=10)
    parser.add_argument("--resnet-warmup", type=int, default=2)
    parser.add_argument("--resnet-full", action="store_true", help="train one real epoch")
    parser.add_argument("--skip", choices=["smallcnn", "resnet50"], default=None)
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="raw results (default: benchmarks/results/train-mnist-DEVICE.json)",
    )
    args = parser.parse_args()

    results: dict = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "load_before": os.getloadavg(),  # the machine may be shared: wall times depend on it
    }
    with tempfile.TemporaryDirectory() as tmp:
        if args.skip != "smallcnn":
            results["smallcnn"] = bench_smallcnn(args.data, args.epochs, args.device, Path(tmp))
            print(json.dumps(results["smallcnn"]), flush=True)
        if args.skip != "resnet50":
            if args.resnet_full:
                run = train(
                    args.data,
                    "resnet50",
                    epochs=1,
                    checkpoints=2,
                    device=args.device,
                    out=Path(tmp) / "resnet50",
                    progress=False,
                )
                results["resnet50"] = {
                    "model": "resnet50",
                    "epochs": 1,
                    "test_accuracy": run.checkpoints[-1].test_accuracy,
                    "seconds_per_epoch": run.manifest["measured"]["seconds_per_epoch"],
                }
            else:
                results["resnet50"] = bench_resnet50_steps(
                    args.data, args.resnet_steps, args.resnet_warmup, 128, args.device
                )
            print(json.dumps(results["resnet50"]), flush=True)
    results["load_after"] = os.getloadavg()
    print(json.dumps({k: v for k, v in results.items() if not isinstance(v, dict)}))
    target = args.json or Path(__file__).parent / "results" / f"train-mnist-{args.device}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
