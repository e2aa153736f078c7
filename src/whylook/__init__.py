"""whylook: why does your image classifier look there, and how did it learn to?

A reference implementation of I2X ("Why Does It Look There? Structured Explanations for
Image Classification", CVPR 2026): prototypes from the final model's features, Grad-CAM at
every training checkpoint, and a structured explanation of how each class was learned.

Example:
    >>> import whylook
    >>> run = whylook.train("mnist5k", "smallcnn", epochs=1, out="runs/a")  # doctest: +SKIP
    >>> print(whylook.explain(run).summary())  # doctest: +SKIP
    whylook explanation: 10 classes, K=32 prototypes at layer block3 (7x7), 12 checkpoints, ...
    ...
    written to runs/a/analysis
"""

__version__ = "0.1.0"

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from whylook.compare import compare
    from whylook.data import DataSource, Split, load_data
    from whylook.errors import WhylookError
    from whylook.explain import ExplainSettings, Explanation, explain, load_explanation
    from whylook.finetune import finetune
    from whylook.models import build_model
    from whylook.report import report
    from whylook.run import RunFolder, import_checkpoints
    from whylook.saliency import GradCAM, grad_cam
    from whylook.structure import StructureSettings
    from whylook.train import train

# Each public name and the module that defines it. They are imported on first use, so
# that `whylook --help` or a program using one stage does not pay for torch, scikit-learn,
# SciPy and matplotlib all at once.
_EXPORTS = {
    "DataSource": "data", "ExplainSettings": "explain", "Explanation": "explain",
    "GradCAM": "saliency", "RunFolder": "run", "Split": "data",
    "StructureSettings": "structure", "WhylookError": "errors", "build_model": "models",
    "compare": "compare", "explain": "explain", "finetune": "finetune",
    "grad_cam": "saliency", "import_checkpoints": "run", "load_data": "data",
    "load_explanation": "explain", "report": "report", "train": "train",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'whylook' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"whylook.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    # Tab completion offers the public names, not this module's own imports.
    return sorted({*_EXPORTS, "__version__"} | {n for n in globals() if n.startswith("__")})


class _Package(types.ModuleType):
    """The package: ``whylook.explain`` stays the function once its module is imported.

    Importing a submodule sets it as an attribute of the package, and five functions
    share their module's name (explain, train, report, compare, finetune); without this,
    ``whylook.explain`` would become the module as soon as anything imported it.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if (isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name
                and value.__name__ == f"whylook.{name}"):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = [
    "DataSource",
    "ExplainSettings",
    "Explanation",
    "GradCAM",
    "RunFolder",
    "Split",
    "StructureSettings",
    "WhylookError",
    "__version__",
    "build_model",
    "compare",
    "explain",
    "finetune",
    "grad_cam",
    "import_checkpoints",
    "load_data",
    "load_explanation",
    "report",
    "train",
]
