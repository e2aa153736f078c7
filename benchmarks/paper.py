"""The paper's experiments with whylook: one setting per row of the paper's table.

Each setting runs the whole chain on real data and writes its rows:

1. train run A (weight seed 0, data-order seed 0) with checkpoints,
2. explain A (prototypes, Grad-CAM at every checkpoint, structure, learning order),
3. fine-tune A from its final checkpoint with every strategy, over 5 seeds,
4. train run B: the same, with data-order seed 1 (only the data order differs), explain B,
5. compare A and B,

then writes ``benchmarks/results/<setting>-<scale>.json`` (all numbers) and ``.md`` (the
section for ``benchmarks/RESULTS.md``, next to the paper's figures). Every stage resumes:
a trained run, an explanation, fine-tuning seeds and the comparison are reused when
present, so a killed benchmark continues where it stopped.

Settings (``--list``): ``mnist-smallcnn`` (CPU-sized, full MNIST), and the paper's three
rows ``mnist-resnet50``, ``cifar10-resnet50``, ``mnist-inceptionv3``. ``--scale cpu`` runs a
reduced, stated scale that fits this project's 2-core CPU; ``--scale gpu`` the full data
(see ``benchmarks/gpu_paper.sh``).

Usage::

    python benchmarks/paper.py mnist-smallcnn
    python benchmarks/paper.py mnist-resnet50 --scale cpu
    python benchmarks/paper.py cifar10-resnet50 --scale gpu --device cuda
    python benchmarks/paper.py --list
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# The real data lives beside a developer checkout; elsewhere (a GPU machine) point these
# variables at copies.
MNIST = "npz:" + os.environ.get(
    "WHYLOOK_MNIST_NPZ", str(ROOT.parent / "shared" / "data" / "mnist.npz")
)
CIFAR = "folder:" + os.environ.get(
    "WHYLOOK_CIFAR_ZIP", str(ROOT.parent / "shared" / "data" / "cifar10-jpg.zip")
)


@dataclass(frozen=True)
class Scale:
    """How much of everything one run of a setting uses."""

    limit_per_class: int | None  # None: the whole train and test splits
    epochs: int
    checkpoints: int
    analysis_size: int
    seeds: int = 5
    batch_size: int = 128
    k: int | str = "default"
    note: str = ""


@dataclass(frozen=True)
class Setting:
    name: str
    data: str
    model: str
    paper_title: str
    paper_pair: tuple[str, str]
    # strategy -> (accuracy %, its std or None, confusions, their std or None)
    paper: dict[str, tuple[float, float | None, float, float | None]]
    scales: dict[str, Scale] = field(default_factory=dict)


_MNIST_R50 = {
    "full>full": (98.46, 0.31, 9.60, 2.87),
    "curated>curated": (98.31, 0.63, 9.00, 4.90),
    "curated>full": (98.64, 0.12, 8.40, 1.85),
}

SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        Setting(
            "mnist-smallcnn",
            MNIST,
            "smallcnn",
            "MNIST / ResNet-50 (the paper has no smallcnn row; same data)",
            ("2", "7"),
            _MNIST_R50,
            {
                "cpu": Scale(
                    None,
                    epochs=2,
                    checkpoints=12,
                    analysis_size=2000,
                    note="full MNIST (60k train / 10k test)",
                ),
                "gpu": Scale(
                    None,
                    epochs=2,
                    checkpoints=12,
                    analysis_size=2000,
                    note="full MNIST (60k train / 10k test)",
                ),
            },
        ),
        Setting(
            "mnist-resnet50",
            MNIST,
            "resnet50",
            "MNIST / ResNet-50",
            ("2", "7"),
            _MNIST_R50,
            {
                # ResNet-50 trains at ~6 images/s on this CPU: 400 images at batch 128 gave 8
                # steps and a chance-level model, so small batches buy optimizer steps.
                # 6 checkpoints gave 5 transitions, too few for a swing to be told from
                # noise (no uncertain prototype, so no curated set): 12 give 11.
                "cpu": Scale(
                    30,
                    epochs=3,
                    checkpoints=12,
                    analysis_size=300,
                    seeds=3,
                    batch_size=16,
                    note="reduced: 30 images per class (300 train / 300 test), 3 epochs at "
                    "batch 16, 3 fine-tuning seeds",
                ),
                "gpu": Scale(
                    None,
                    epochs=2,
                    checkpoints=12,
                    analysis_size=2000,
                    batch_size=256,
                    note="full MNIST (60k train / 10k test), 2 epochs, batch 256",
                ),
            },
        ),
        Setting(
            "cifar10-resnet50",
            CIFAR,
            "resnet50",
            "CIFAR-10 / ResNet-50",
            ("cat", "dog"),
            {"full>full": (81.43, 2.79, 261.2, None), "curated>full": (84.02, 2.70, 238.6, None)},
            {
                "cpu": Scale(
                    60,
                    epochs=3,
                    checkpoints=8,
                    analysis_size=400,
                    note="reduced: 60 images per class (600 train / 600 test), 3 epochs",
                ),
                "gpu": Scale(
                    None,
                    epochs=4,
                    checkpoints=12,
                    analysis_size=2000,
                    batch_size=256,
                    note="full CIFAR-10 (50k train / 10k test), 4 epochs, batch 256",
                ),
            },
        ),
        Setting(
            "mnist-inceptionv3",
            MNIST,
            "inception_v3",
            "MNIST / InceptionV3",
            ("4", "9"),
            {"full>full": (99.13, 0.29, 12.6, None), "curated>full": (99.11, 0.27, 10.8, None)},
            {
                "cpu": Scale(
                    20,
                    epochs=2,
                    checkpoints=6,
                    analysis_size=200,
                    seeds=3,
                    note="reduced: 20 images per class (200 train / 200 test), "
                    "2 epochs, 3 seeds (InceptionV3 runs at 299 px)",
                ),
                "gpu": Scale(
                    None,
                    epochs=1,
                    checkpoints=10,
                    analysis_size=1000,
                    note="full MNIST (60k train / 10k test), 1 epoch (InceptionV3 at 299 px)",
                ),
            },
        ),
    )
}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _run(
    setting: Setting,
    scale: Scale,
    folder: Path,
    data_seed: int,
    device: str,
    timings: dict[str, float],
) -> Any:
    """Train (or reuse) and explain (or reuse) one run."""
    from whylook.data import load_data
    from whylook.explain import explain, load_explanation
    from whylook.run import RunFolder
    from whylook.train import train

    tag = f"seed{data_seed}"
    if (folder / "run.json").is_file():
        run = RunFolder.open(folder)
        _log(f"{tag}: reusing trained run {folder}")
    else:
        _log(f"{tag}: training {setting.model} ({scale.epochs} epochs) -> {folder}")
        t0 = time.perf_counter()
        source = load_data(setting.data, limit_per_class=scale.limit_per_class)
        run = train(
            source,
            setting.model,
            epochs=scale.epochs,
            checkpoints=scale.checkpoints,
            seed=0,
            data_seed=data_seed,
            batch_size=scale.batch_size,
            device=device,
            out=folder,
        )
        timings[f"train_{tag}"] = round(time.perf_counter() - t0, 1)
    if (folder / "analysis" / "explanation.json").is_file():
        exp = load_explanation(folder)
        _log(f"{tag}: reusing explanation")
    else:
        _log(f"{tag}: explaining ({scale.analysis_size} samples)")
        t0 = time.perf_counter()
        exp = explain(run, k=scale.k, analysis_size=scale.analysis_size, seed=0, device=device)
        timings[f"explain_{tag}"] = round(time.perf_counter() - t0, 1)
    return run, exp


def run_setting(
    name: str,
    scale_name: str,
    *,
    device: str = "auto",
    seeds: int | None = None,
    runs: Path = ROOT / "runs" / "paper",
    pair: str = "auto",
    min_swings: int | None = None,
) -> dict[str, Any]:
    """Run one setting end to end and write its results; returns them.

    The results are written after the fine-tuning and again at the end, so a run cut
    short by a time limit still leaves its fine-tuning table behind.
    """
    from whylook.compare import compare
    from whylook.errors import WhylookError
    from whylook.explain import load_explanation
    from whylook.finetune import finetune
    from whylook.models import resolve_device

    setting = SETTINGS[name]
    scale = setting.scales[scale_name]
    n_seeds = seeds or scale.seeds
    base = runs / f"{name}-{scale_name}"
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    run_a, exp_a = _run(setting, scale, base / "seed0", 0, device, timings)
    print(exp_a.summary(), flush=True)
    chosen = ",".join(setting.paper_pair) if pair == "paper" else pair
    _log(f"fine-tuning: pair {chosen}, {n_seeds} seeds")
    # A looser uncertain rule is a variant: run A explained again with it, in its own folder
    # (checkpoints hard-linked), fine-tuned there; everything else comes from run A.
    ft_run, ft_exp = run_a, exp_a
    if min_swings is not None:
        ft_run = _reexplained(run_a, scale, base / f"seed0-min-swings-{min_swings}", device,
                              seed=0, min_swings=min_swings)
        ft_exp = load_explanation(ft_run.path)
        print(ft_exp.summary(), flush=True)
    t0 = time.perf_counter()
    ft: Any = None
    try:
        ft = finetune(ft_run, pair=chosen, seeds=n_seeds, device=device)
    except WhylookError as exc:
        # A refusal is a result too (e.g. no uncertain prototypes: no curated set); the
        # learning order and the seed comparison do not depend on it.
        _log(f"fine-tuning refused: {exc}")
        ft_json: dict[str, Any] = {"error": str(exc), "pair": None}
    else:
        if not ft.settings["computed_now"].startswith("0 of"):  # else all from the cache
            timings["finetune"] = round(time.perf_counter() - t0, 1)
        print(ft.table(), flush=True)
        ft_json = ft.to_json()
    result: dict[str, Any] = {
        "setting": name,
        "scale": scale_name,
        "scale_settings": asdict(scale),
        "seeds": n_seeds,
        "data": setting.data.replace(str(ROOT.parent), ".."),
        "model": setting.model,
        "device": str(resolve_device(device)),
        "final_test_accuracy": {"a": run_a.checkpoints[-1].test_accuracy, "b": None},
        "train_seconds_per_epoch": run_a.manifest.get("measured", {}).get("seconds_per_epoch"),
        "explanation": {
            "k": exp_a.k,
            "layer": exp_a.data["layer"],
            "grid": exp_a.data["grid"],
            "uncertain": [
                {"id": u["id"], "classes": u["classes"], "swings": u["swings"]}
                for u in ft_exp.data["uncertain_prototypes"]
            ],
            "learning_order_correlation": {
                "a": exp_a.data["learning_order_correlation"],
                "b": None,
            },
            "learning_order_first": [p["pair"] for p in exp_a.data["learning_order"][:5]],
            "learning_order_last": [p["pair"] for p in exp_a.data["learning_order"][-5:]],
        },
        "finetune": ft_json,
        "compare": None,
        "paper": {
            "title": setting.paper_title,
            "pair": list(setting.paper_pair),
            "rows": {k: list(v) for k, v in setting.paper.items()},
        },
        "timings_seconds": timings,
    }
    # Another pair is a variant of the setting: its own results files, same runs.
    variant = "" if pair == "auto" or ft is None else "-pair-" + "-".join(ft.pair)
    if min_swings is not None:
        variant += f"-min-swings-{min_swings}"
        result["min_swings"] = min_swings
    stem = RESULTS / f"{name}-{scale_name}{variant}"
    if stem.with_suffix(".json").is_file():
        # Stages reused from an earlier call keep the times that call measured.
        earlier = json.loads(stem.with_suffix(".json").read_text()).get("timings_seconds", {})
        timings.update({k: v for k, v in earlier.items() if k not in timings})
        if ft is None:
            timings.pop("finetune", None)  # refused now: an earlier call's time says nothing
    _write(stem, result)

    run_b, exp_b = _run(setting, scale, base / "seed1", 1, device, timings)
    t0 = time.perf_counter()
    cmp = compare(run_a, run_b, device=device)
    timings["compare"] = round(time.perf_counter() - t0, 1)
    print(cmp.summary(), flush=True)
    # The noise floor of the comparison: the same run, explained again with another analysis
    # seed (other analysis rows, another K-Means start). What A vs. B adds beyond this is
    # the difference in strategy.
    t0 = time.perf_counter()
    again = _reexplained(run_a, scale, base / "seed0-analysis-seed1", device)
    floor = compare(run_a, again, out=base / "noise-floor.json", device=device)
    timings["noise_floor"] = round(time.perf_counter() - t0, 1)
    print(floor.summary(), flush=True)
    timings["last_call_total"] = round(time.perf_counter() - t_all, 1)
    result["final_test_accuracy"]["b"] = run_b.checkpoints[-1].test_accuracy
    result["explanation"]["learning_order_correlation"]["b"] = exp_b.data[
        "learning_order_correlation"
    ]
    result["compare"] = _slim(cmp.data)
    result["noise_floor"] = _slim(floor.data)
    _write(stem, result)
    return result


def _slim(data: dict[str, Any]) -> dict[str, Any]:
    """A comparison without its confusion matrices and with 10 matches (the whole of it
    lives beside the runs)."""
    slim = json.loads(json.dumps(data))
    slim["confusion"] = {k: v for k, v in slim["confusion"].items() if k not in {"a", "b"}}
    slim["matching"]["pairs"] = slim["matching"]["pairs"][:10]
    return slim


def _reexplained(run: Any, scale: Scale, folder: Path, device: str, *, seed: int = 1,
                 min_swings: int | None = None) -> Any:
    """A copy of ``run`` (checkpoints hard-linked) explained with analysis seed ``seed``
    (and, if given, the uncertain rule's ``min_swings``)."""
    from whylook.explain import ExplainSettings, explain
    from whylook.run import RunFolder
    from whylook.structure import StructureSettings

    if not (folder / "analysis" / "explanation.json").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(run.path / "checkpoints", folder / "checkpoints", copy_function=os.link)
        shutil.copy2(run.path / "run.json", folder / "run.json")
        settings = None
        if min_swings is not None:
            settings = ExplainSettings(structure=StructureSettings(min_swings=min_swings))
        explain(folder, k=scale.k, analysis_size=scale.analysis_size, seed=seed,
                device=device, settings=settings)
    return RunFolder.open(folder)


def _write(stem: Path, result: dict[str, Any]) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    stem.with_suffix(".md").write_text(markdown(result) + "\n")
    _log(f"wrote {stem}.json and .md")


def _pm(mean: float | None, std: float | None, digits: int = 2) -> str:
    if mean is None:
        return "—"
    return f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def _num(x: float | None, fmt: str = "+.3f") -> str:
    return "n/a" if x is None else format(x, fmt)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _pairs(pairs: list[list[str]]) -> str:
    return ", ".join("/".join(p) for p in pairs)


def markdown(r: dict[str, Any]) -> str:
    """The RESULTS.md section of one setting, from its results JSON."""
    ft, cmp, paper = r["finetune"], r["compare"], r["paper"]
    pa, pb = paper["pair"]
    sc = r["scale_settings"]
    lines = [
        f"### {r['setting']} ({r['scale']} scale)",
        "",
        f"{sc['note']}; {r['model']}, {sc['epochs']} epoch(s), {sc['checkpoints']} "
        f"checkpoints, K = {r['explanation']['k']} at `{r['explanation']['layer']}` "
        f"({r['explanation']['grid'][0]}×{r['explanation']['grid'][1]}), analysis set "
        f"{sc['analysis_size']}, {r['seeds']} fine-tuning seeds, device {r['device']}. "
        f"Final test accuracy of run A {_pct(r['final_test_accuracy']['a'])}, run B "
        f"{_pct(r['final_test_accuracy']['b'])}.",
        "",
    ]
    if r.get("min_swings") is not None:
        lines += [
            f"**Variant:** the fine-tuning below reads run A's uncertain prototypes with a "
            f"looser rule, {r['min_swings']} change(s) of side instead of whylook's 2 "
            f"(`StructureSettings(min_swings={r['min_swings']})`); the learning order and "
            f"the seed comparison are the default explanation's.",
            "",
        ]
    if "error" in ft:
        lines.append(f"Fine-tuning: refused, so no table: {ft['error']}")
    else:
        a, b = ft["pair"]
        lines += [
            f"Pair: {ft['pair_reason']}. {ft['curated']['description']}.",
            "",
            f"| strategy | whylook accuracy (%) | whylook {a}↔{b} confusions | paper "
            f"accuracy (%) | paper {pa}↔{pb} confusions |",
            "|---|---|---|---|---|",
            f"| θ_T (no fine-tuning) | {100 * ft['start']['test_accuracy']:.2f} | "
            f"{ft['start']['confusions']} | — | — |",
        ]
    for row in ft.get("strategies", []):
        p = paper["rows"].get(row["name"])
        lines.append(
            f"| {row['strategy']} | {_pm(row['accuracy_mean'], row['accuracy_std'])} | "
            f"{_pm(row['confusions_mean'], row['confusions_std'])} | "
            f"{_pm(p[0], p[1]) if p else '—'} | {_pm(p[2], p[3]) if p else '—'} |"
        )
    paired = ft.get("paired_vs_full_full", {}).get("curated>full")
    if paired:
        c, acc = paired["confusions"], paired["accuracy"]
        lines += [
            "",
            f"curated→full − full→full, paired by seed: confusions "
            f"{_pm(c['mean'], c['std'])} (t-test p = {_num(c['p_value'], '.3g')}), "
            f"accuracy {_pm(acc['mean'], acc['std'])} points (p = "
            f"{_num(acc['p_value'], '.3g')}).",
        ]
    lo = r["explanation"]["learning_order_correlation"]
    lo_b = lo["b"] or {"spearman": None, "p_value": None}
    lines += [
        "",
        f"Learning order (Spearman of pair distinctness vs. separation checkpoint; negative = "
        f"more distinct pairs separated first): run A ρ = {_num(lo['a']['spearman'])} "
        f"(p = {_num(lo['a']['p_value'], '.3g')}, {lo['a']['n_pairs']} pairs), run B ρ = "
        f"{_num(lo_b['spearman'])} (p = {_num(lo_b['p_value'], '.3g')}). First "
        f"separated in A: {_pairs(r['explanation']['learning_order_first'])}; last: "
        f"{_pairs(r['explanation']['learning_order_last'])}.",
        "",
    ]
    if cmp is None:
        lines.append("Seed comparison: not run yet (run B or the comparison did not finish).")
    else:
        m = cmp["matching"]
        lines.append(
            f"Seed comparison (A vs. B, data order only): {m['n_matched']} of {m['k_a']} "
            f"prototypes matched (IoU ≥ {m['min_iou']}, mean IoU {m['mean_iou']:.2f}); "
            f"β-trajectory correlation of matched prototypes {_num(cmp['beta']['mean'])} "
            f"(arbitrary pairs {_num(cmp['beta']['baseline_mean'])}); strategy difference "
            f"{_num(cmp['strategy_difference']['value'], '.3f')} (random matching "
            f"{_num(cmp['strategy_difference']['random_matching'], '.3f')}); shared-prototype "
            f"Jaccard {_num(cmp['shared_prototypes']['mean_jaccard'], '.2f')}; test-error "
            f"difference (off-diagonal L1) {cmp['confusion']['l1']:.2f} with per-pair Spearman "
            f"{_num(cmp['confusion']['pair_spearman'])}; learning-order agreement ρ = "
            f"{_num(cmp['learning_order']['spearman'])}."
        )
    nf = r.get("noise_floor")
    if nf is not None:
        lines += [
            "",
            f"Noise floor (run A against itself, explained again with analysis seed 1): "
            f"{nf['matching']['n_matched']} of {nf['matching']['k_a']} matched (mean IoU "
            f"{nf['matching']['mean_iou']:.2f}); β-trajectory correlation "
            f"{_num(nf['beta']['mean'])}; strategy difference "
            f"{_num(nf['strategy_difference']['value'], '.3f')}; shared-prototype Jaccard "
            f"{_num(nf['shared_prototypes']['mean_jaccard'], '.2f')}; learning-order agreement "
            f"ρ = {_num(nf['learning_order']['spearman'])}.",
        ]
    timings = ", ".join(f"{k} {v}" for k, v in r["timings_seconds"].items())
    lines += ["", f"Wall time of each stage, where it ran (s): {timings}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("setting", nargs="?", choices=sorted(SETTINGS))
    p.add_argument("--scale", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seeds", type=int, default=None, help="fine-tuning seeds (default 5)")
    p.add_argument("--pair", default="auto", help="'auto', 'paper' or 'a,b'")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "paper")
    p.add_argument(
        "--min-swings",
        type=int,
        default=None,
        help="variant: fine-tune from uncertain prototypes read with this many swings",
    )
    p.add_argument("--list", action="store_true", help="list the settings and scales")
    p.add_argument(
        "--markdown",
        type=Path,
        default=None,
        help="only re-render the .md of an existing results .json",
    )
    args = p.parse_args(argv)
    if args.list:
        for s in SETTINGS.values():
            for k, sc in s.scales.items():
                print(f"{s.name:20} {k:4} {s.model:13} {sc.note}")
        return 0
    if args.markdown:
        r = json.loads(args.markdown.read_text())
        args.markdown.with_suffix(".md").write_text(markdown(r) + "\n")
        return 0
    if not args.setting:
        p.error("name a setting (see --list)")
    from whylook.errors import WhylookError

    try:
        run_setting(
            args.setting,
            args.scale,
            device=args.device,
            seeds=args.seeds,
            runs=args.runs,
            pair=args.pair,
            min_swings=args.min_swings,
        )
    except WhylookError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
