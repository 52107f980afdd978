"""The GLUE metric as a local `evaluate` module, for machines that cannot reach the Hugging Face hub.

    import evaluate
    metric = evaluate.load("examples/glue/glue_metric.py", "mrpc")   # same config names and keys as the hub's "glue"
    metric.compute(predictions=[1, 0, 1], references=[1, 1, 1])      # {'accuracy': 0.667, 'f1': 0.8}

Keys per task, as the hub's `evaluate.load("glue", task)` returns them: `cola` → matthews_correlation; `stsb` →
pearson, spearmanr; `mrpc`, `qqp` → accuracy, f1; every other task → accuracy. Computed with scikit-learn and scipy.
"""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import evaluate
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

TASKS = (
    "cola",
    "sst2",
    "mrpc",
    "qqp",
    "stsb",
    "mnli",
    "mnli_matched",
    "mnli_mismatched",
    "qnli",
    "rte",
    "wnli",
    "hans",
)


def glue_scores(task: str, predictions: Sequence[float], references: Sequence[float]) -> dict[str, float]:
    """The GLUE metric of `task` (keys as the hub's glue metric)."""
    if task == "cola":
        return {"matthews_correlation": float(matthews_corrcoef(references, predictions))}
    if task == "stsb":
        return {
            "pearson": float(pearsonr(predictions, references)[0]),
            "spearmanr": float(spearmanr(predictions, references)[0]),
        }
    if task in ("mrpc", "qqp"):
        return {
            "accuracy": float(accuracy_score(references, predictions)),
            "f1": float(f1_score(references, predictions)),
        }
    if task in TASKS:
        return {"accuracy": float(accuracy_score(references, predictions))}
    raise KeyError(f"Invalid GLUE task {task!r}. Must be one of {', '.join(TASKS)}.")


class Glue(evaluate.Metric):
    """`evaluate` wrapper around `glue_scores`; the config name is the task."""

    def _info(self) -> evaluate.MetricInfo:
        if self.config_name not in TASKS:
            raise KeyError(f"Invalid GLUE task {self.config_name!r}. Must be one of {', '.join(TASKS)}.")
        value = datasets.Value("float32" if self.config_name == "stsb" else "int64")
        return evaluate.MetricInfo(
            description="GLUE metric computed locally (scikit-learn, scipy); same keys as the hub's glue metric.",
            citation="Wang et al., GLUE: A Multi-Task Benchmark and Analysis Platform for NLU, ICLR 2019.",
            inputs_description="predictions and references: class ids (floats for stsb).",
            features=datasets.Features({"predictions": value, "references": value}),
        )

    def _compute(self, predictions: Sequence[float], references: Sequence[float]) -> dict[str, float]:
        return glue_scores(self.config_name, predictions, references)
