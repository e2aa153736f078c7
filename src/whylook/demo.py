"""``whylook demo``: the whole job on the built-in ``mnist5k`` data in a few minutes.

Trains ``smallcnn`` with checkpoints, explains it, writes the HTML report and prints the
summary. Rerunning it reuses what is already complete in the output folder.
"""

from __future__ import annotations

from pathlib import Path

from whylook.explain import Explanation, explain
from whylook.run import RunFolder
from whylook.train import train

__all__ = ["demo"]

DEMO_EPOCHS = 3
DEMO_CHECKPOINTS = 12


def demo(out: str | Path = "whylook-demo", *, device: str = "auto",
         progress: bool | None = None) -> Explanation:
    """Train, explain and report on ``mnist5k``; print the summary and the report path.

    Example:
        >>> from whylook.demo import demo
        >>> demo("whylook-demo")  # doctest: +SKIP
    """
    out = Path(out)
    if (out / "run.json").is_file():
        run = RunFolder.open(out)
        print(f"reusing the trained run in {out}")
    else:
        print(f"training smallcnn on mnist5k ({DEMO_EPOCHS} epochs, {DEMO_CHECKPOINTS} "
              "checkpoints) ...")
        run = train("mnist5k", "smallcnn", epochs=DEMO_EPOCHS, checkpoints=DEMO_CHECKPOINTS,
                    device=device, out=out, progress=progress)
    print("explaining (prototypes, Grad-CAM at every checkpoint, patterns, mapping) ...")
    result = explain(run, device=device, progress=progress)
    print(result.summary())
    from whylook.report import report

    page = report(run.path)
    print(f"\nreport: {page}")
    return result
