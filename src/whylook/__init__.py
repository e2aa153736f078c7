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

# The functions below share their modules' names; importing them here, before anything
# else imports the modules, keeps ``whylook.explain`` etc. bound to the functions.
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
