"""The ``whylook`` command line: a thin layer over the library API.

Every subcommand parses its options, calls one library function and prints a short
summary. Bad input surfaces as ``error: <one line>`` on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from whylook._text import DATA_SPECS
from whylook.errors import WhylookError

Handler = Callable[[argparse.Namespace], int]

_MODEL_HELP = ("smallcnn (default), resnet18, resnet50, inception_v3, or your own as "
               "package.module:factory")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors keep the CLI's contract: one ``error:`` line, exit 2.

    argparse's default prints the usage block first, so a bad option (``--k 1``) would
    look different from every other bad input.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {' '.join(message.split())}; see '{self.prog} --help'\n")


def _k_value(text: str) -> int | str:
    if text in {"auto", "default"}:
        return text
    try:
        value = int(text)
    except ValueError:
        msg = f"K must be a whole number or 'auto', not {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if value < 2:
        raise argparse.ArgumentTypeError(f"K must be at least 2, not {value}")
    return value


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model and save checkpoints into a run folder")
    p.add_argument("--data", default="mnist5k",
                   help=f"data spec: {DATA_SPECS}; default mnist5k (built in)")
    p.add_argument("--model", default="smallcnn", help=_MODEL_HELP)
    p.add_argument("--epochs", type=int, default=3, help="training epochs (default 3)")
    # At least run.MIN_CHECKPOINTS, written out: importing it would load torch for --help.
    p.add_argument("--checkpoints", type=int, default=12,
                   help="number of checkpoints, T+1: at least 3 (default 12)")
    p.add_argument(
        "--schedule", choices=["log", "linear", "epoch"], default="log",
        help="checkpoint spacing: log (dense early, where most is learned; default), linear, "
        "or one per epoch",
    )
    p.add_argument("--seed", type=int, default=0,
                   help="seed for the weight initialisation (default 0)")
    p.add_argument("--data-seed", type=int, default=None,
                   help="seed for the data order (default: --seed)")
    p.add_argument("--batch-size", type=int, default=128, help="training batch (default 128)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (model default)")
    p.add_argument("--layer", default=None, help="prototype layer to record as the default")
    _device_option(p)
    p.add_argument("--out", required=True, type=Path, help="run folder to create")
    p.set_defaults(handler=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from whylook.train import train

    run = train(
        args.data,
        args.model,
        epochs=args.epochs,
        checkpoints=args.checkpoints,
        schedule=args.schedule,
        seed=args.seed,
        data_seed=args.data_seed,
        batch_size=args.batch_size,
        lr=args.lr,
        layer=args.layer,
        device=args.device,
        out=args.out,
    )
    last = run.checkpoints[-1]
    print(
        f"trained {run.config['model']} on {run.config['data']}: {len(run.checkpoints)} "
        f"checkpoints, final test accuracy {100 * last.test_accuracy:.2f}% -> {run.path}"
    )
    return 0


def _add_import(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="bring checkpoints trained elsewhere into a run folder")
    p.add_argument("checkpoints", nargs="+", type=Path, help="checkpoint files in training order")
    p.add_argument("--data", default="mnist5k",
                   help=f"the data the checkpoints were trained on: {DATA_SPECS}; "
                   "default mnist5k (built in)")
    p.add_argument("--model", default="smallcnn",
                   help=_MODEL_HELP + "; it is fed float pixels in [0, 1], so any "
                   "normalisation of the inputs must be part of the model")
    p.add_argument(
        "--steps", default=None,
        help="comma-separated optimizer step of each checkpoint, increasing (default: 0, 1, 2, "
        "...); the report's time axes use them",
    )
    p.add_argument("--layer", default=None,
                   help="prototype layer to record as the default (default: the model's)")
    _device_option(p)
    p.add_argument("--out", required=True, type=Path, help="run folder to create")
    p.set_defaults(handler=_cmd_import)


def _cmd_import(args: argparse.Namespace) -> int:
    from whylook.run import import_checkpoints

    steps = None
    if args.steps:
        try:
            steps = [int(s) for s in args.steps.split(",")]
        except ValueError:
            raise WhylookError("--steps must be comma-separated whole numbers") from None
    run = import_checkpoints(
        args.checkpoints,
        data=args.data,
        model=args.model,
        steps=steps,
        layer=args.layer,
        device=args.device,
        out=args.out,
    )
    # A model that does well in its own evaluation but near chance here takes its inputs
    # otherwise than whylook gives them (e.g. normalised outside the model): seen here first.
    shown = ", ".join(f"{100 * c.test_accuracy:.1f}%" for c in run.checkpoints[:12])
    more = ", ..." if len(run.checkpoints) > 12 else ""
    print(f"imported {len(run.checkpoints)} checkpoints -> {run.path}\n"
          f"  test accuracy by checkpoint: {shown}{more} "
          f"(last {100 * run.checkpoints[-1].test_accuracy:.1f}%)")
    return 0


def _add_explain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explain", help="compute the structured explanation of a run")
    p.add_argument("run", type=Path, help="run folder (from whylook train or whylook import)")
    p.add_argument("--k", type=_k_value, default="default",
                   help="prototypes: a number >= 2, or 'auto' (the elbow of K-Means' inertia "
                   "over 8-128); default 32 for one-channel images, 128 for colour")
    p.add_argument("--layer", default=None,
                   help="prototype layer, a module name (default: the run's)")
    p.add_argument(
        "--analysis-size", type=int, default=None,
        help="samples analysed at every checkpoint (default: 2000, stratified by class)",
    )
    p.add_argument(
        "--prototype-size", type=int, default=None,
        help="samples whose final features find the prototypes (default: the analysis set; "
        "a larger set adds other training samples to it)",
    )
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the sample choice, K-Means and the bootstrap (default 0)")
    p.add_argument(
        "--min-swings",
        type=int,
        default=None,
        help="changes of side that make a prototype uncertain (default 2; 1 is looser)",
    )
    p.add_argument(
        "--support",
        default=None,
        help="which ridge fits a shared prototype's support is read from: global+class "
        "(default: the global and the class-conditional fit, the larger z against a "
        "corrected threshold), global (the paper's fit alone) or class",
    )
    p.add_argument(
        "--standard-errors", default=None,
        help="how the ridge coefficients' noise is measured: jackknife (default; exact, "
        "no seed) or bootstrap (100 resamples, as before 2026-12-05)",
    )
    p.add_argument(
        "--uncertain-null", type=int, default=None, metavar="DRAWS",
        help="measure what the uncertain rule flags with no link between attention and "
        "confidence: refit the ridge mapping this many times with each sample's confidence "
        "changes sign-flipped (chance) and as many with its attention changes given to "
        "another sample (the classes' average drift alone) (default 0: not measured; 20 "
        "is a good start, two ridge fits each)",
    )
    p.add_argument(
        "--batch-size", type=int, default=None,
        help="samples per Grad-CAM pass (default 256; lower it if memory runs out)",
    )
    p.add_argument(
        "--precision", default=None,
        help="float32 (default, exact) or bfloat16: the Grad-CAM passes in torch's mixed "
        "precision (the CAM and softmax in float32); 2-3x faster on CPUs with AMX (and on "
        "GPUs with bfloat16), no faster or slower on others",
    )
    _device_option(p)
    _trust_option(p)
    p.set_defaults(handler=_cmd_explain)


def _cmd_explain(args: argparse.Namespace) -> int:
    from whylook.explain import ExplainSettings, explain
    from whylook.structure import StructureSettings

    overrides: dict[str, Any] = {}
    if args.min_swings is not None:
        overrides["structure"] = StructureSettings(min_swings=args.min_swings)
    if args.support is not None:
        overrides["support"] = args.support
    if args.batch_size is not None:
        overrides["batch_size"] = args.batch_size
    if args.standard_errors is not None:
        overrides["standard_errors"] = args.standard_errors
    if args.uncertain_null is not None:
        overrides["uncertain_null"] = args.uncertain_null
    if args.precision is not None:
        overrides["precision"] = args.precision
    settings = ExplainSettings(**overrides) if overrides else None
    result = explain(
        args.run,
        k=args.k,
        layer=args.layer,
        analysis_size=args.analysis_size,
        prototype_size=args.prototype_size,
        seed=args.seed,
        device=args.device,
        settings=settings,
    )
    print(result.summary())
    return 0


def _add_finetune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="perturbation fine-tuning from the uncertain prototypes")
    p.add_argument("run", type=Path, help="an explained run folder")
    p.add_argument("--pair", default="auto",
                   help="class pair 'a,b' or 'auto' (default: of the pairs with uncertain "
                   "prototypes, the one the final model confuses most)")
    p.add_argument(
        "--strategies",
        default="full>full,curated>curated,curated>full,full,curated",
        help="comma-separated strategies, each of stages joined by '>' (A>B = one epoch on A, "
        "then one on B); a stage is full (the training split) or curated (without the "
        "samples that hold the pair's uncertain prototypes); default "
        "full>full,curated>curated,curated>full,full,curated",
    )
    p.add_argument("--seeds", type=int, default=5, help="number of seeds, 0..N-1 (default 5)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: the run's, for its optimizer; with another "
                   "optimizer, or for an imported run, which records none: 0.001 for adam, "
                   "0.01 for sgd)")
    p.add_argument("--optimizer", choices=["adam", "sgd"], default=None,
                   help="default: the run's (an imported run records none: adam)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="training batch (default: the run's; an imported run: 128)")
    _device_option(p)
    _trust_option(p)
    p.set_defaults(handler=_cmd_finetune)


def _cmd_finetune(args: argparse.Namespace) -> int:
    from whylook.finetune import finetune

    result = finetune(
        args.run,
        pair=args.pair,
        strategies=args.strategies.split(","),
        seeds=args.seeds,
        lr=args.lr,
        optimizer=args.optimizer,
        batch_size=args.batch_size,
        device=args.device,
    )
    print(result.table())
    return 0


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="compare the strategies of two runs")
    p.add_argument("run_a", type=Path, help="an explained run folder")
    p.add_argument("run_b", type=Path, help="another, on the same data and model")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="a .json file or a folder for compare.json (default: RUN_A/compare/<RUN_B>.json)",
    )
    _device_option(p)
    _trust_option(p)
    p.set_defaults(handler=_cmd_compare)


def _cmd_compare(args: argparse.Namespace) -> int:
    from whylook.compare import compare

    result = compare(args.run_a, args.run_b, out=args.out, device=args.device)
    print(result.summary())
    return 0


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write the HTML report of a run")
    # Optional for argparse only: `--classes a b RUN` takes RUN as a class name, and the
    # handler then says so instead of argparse's "run is required".
    p.add_argument("run", type=Path, nargs="?", help="an explained run folder")
    p.add_argument("--out", type=Path, default=None, help="folder (default: RUN/report)")
    p.add_argument("--classes", nargs="+", metavar="NAME", default=None,
                   help="classes to draw in full, or `all` (default: all up to 30; past "
                   "that, those in the most uncertain entries, then the least accurate); "
                   "the others get a table row")
    p.set_defaults(handler=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    from whylook.report import report

    if args.run is None:
        raise WhylookError(
            "name the run folder first: whylook report RUN --classes NAME ... (--classes "
            "takes every word after it as a class name)" if args.classes else
            "name the run folder: whylook report RUN")
    path = report(args.run, out=args.out, classes=args.classes)
    print(f"report: {path}")
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train + explain + report on the built-in mnist5k")
    p.add_argument("--out", type=Path, default=Path("whylook-demo"),
                   help="run folder (default: whylook-demo); a folder that already holds "
                   "a trained run is explained again without training")
    _device_option(p)
    p.set_defaults(handler=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from whylook.demo import demo

    demo(out=args.out, device=args.device)
    return 0


def _device_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto (default): CUDA when torch sees a GPU, else the CPU")


def _trust_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trust-model-code",
        action="append",
        default=[],
        metavar="MODULE",
        help="let a run folder whose model is MODULE:factory import MODULE (runs its code)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="whylook",
        description="Why does your classifier look there? Structured explanations from "
        "training checkpoints (I2X).",
        epilog="Progress bars show on a terminal and in notebooks; WHYLOOK_PROGRESS=1 shows "
        "them in logs too, WHYLOOK_PROGRESS=0 hides them. Decoded data sources are kept in "
        "~/.cache/whylook/data; WHYLOOK_CACHE=DIR keeps them in DIR/data, WHYLOOK_CACHE=off "
        "not at all.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_demo, _add_train, _add_import, _add_explain, _add_finetune,
                _add_compare, _add_report):
        add(sub)
    return parser


def _one_line_warning(message: Warning | str, category: type[Warning], *_: object,
                      **__: object) -> str:
    return f"warning: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    # Warnings (e.g. a precision this CPU runs slowly) as one line, like the errors; put
    # back afterwards for a caller that runs main() in its own process.
    previous = warnings.formatwarning
    warnings.formatwarning = _one_line_warning
    try:
        return _main(argv)
    finally:
        warnings.formatwarning = previous


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "trust_model_code", None):
        from whylook.models import trust_model_code

        trust_model_code(args.trust_model_code)
    from whylook._memory import small_pages

    try:
        with small_pages():  # the process is the command's (whylook/_memory.py says why)
            return args.handler(args)
    except WhylookError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"error: {_interrupted(args)}", file=sys.stderr)
        return 130


def _interrupted(args: argparse.Namespace) -> str:
    """What a Ctrl-C left: after train or import had finished their run folder, the folder
    is complete and a rerun with the same --out would refuse it."""
    out = getattr(args, "out", None)
    if args.command in ("train", "import") and out is not None:
        from whylook.run import INCOMPLETE_MARKER

        folder = Path(out)
        if (folder / "run.json").is_file() and not (folder / INCOMPLETE_MARKER).exists():
            return (f"interrupted after the run folder {folder} was complete; it is ready "
                    f"(whylook explain {folder})")
    return "interrupted; rerun the same command to resume"


def program() -> int:
    """The ``whylook`` program: :func:`main` in a process of its own, which it may tune
    (tests and callers of ``main`` keep their process as it is)."""
    from whylook._memory import keep_freed_memory

    keep_freed_memory()
    return main()


if __name__ == "__main__":
    raise SystemExit(program())
