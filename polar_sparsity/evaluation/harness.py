"""lm-eval adapter: the patched model object through lm-eval's Python API.

The only module that imports lm-eval (it is slow to import and not needed on the GPU paths). The
model is wrapped as-is in ``HFLM`` (``pretrained=<model object>``), so the masking hooks installed on
it are active for every request lm-eval makes.
"""

from __future__ import annotations

import difflib
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

from polar_sparsity.resources import asset_path

log = logging.getLogger(__name__)

# lm-eval warnings that are expected here and say nothing to the user: our tasks take no --metadata,
# and passing a model object (not a name) is the point of this adapter.
_EXPECTED_WARNINGS = (
    "Custom kwargs can be passed",
    "model kwarg is not of type `str`",
    "Passed an already-initialized model",
)


class _DropExpected(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in _EXPECTED_WARNINGS)


def _quiet_lm_eval() -> None:
    for name in ("lm_eval.api.task", "lm_eval.models.huggingface"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropExpected) for f in logger.filters):
            logger.addFilter(_DropExpected())


def local_tasks_dir() -> str:
    """The offline task suite shipped in the package."""
    return asset_path("tasks")


@dataclass
class TaskSet:
    """Validated task names and the lm-eval TaskManager that resolves them."""

    names: list[str]
    manager: Any  # lm_eval.tasks.TaskManager


def resolve_tasks(names: list[str]) -> TaskSet:
    """Check every task name against lm-eval's index (ours first) and fail with close matches.

    Only the local suite is indexed when it covers every name: indexing lm-eval's ~15k built-in
    tasks takes seconds and is not needed then.
    """
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=local_tasks_dir(), include_defaults=False)
    if not set(names) <= set(manager.all_tasks):
        manager = TaskManager(include_path=local_tasks_dir())
    known = set(manager.all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        hints = {n: difflib.get_close_matches(n, known, n=5, cutoff=0.6) for n in unknown}
        detail = "; ".join(f"{n!r} (close: {', '.join(h) if h else 'none'})" for n, h in hints.items())
        raise ValueError(
            f"unknown lm-eval task(s): {detail}. Local tasks: {sorted(local_task_names(manager))}; "
            f"`lm-eval ls tasks` lists lm-eval's own."
        )
    return TaskSet(list(names), manager)


def local_task_names(manager: Any) -> list[str]:
    root = local_tasks_dir()
    index = manager.task_index.items()
    # Index entries are dicts in older 0.4 releases and ``Entry`` objects in newer ones.
    paths = {
        name: info.get("yaml_path") if isinstance(info, dict) else info.yaml_path for name, info in index
    }
    return [name for name, path in paths.items() if str(path or "").startswith(root)]


def run_harness(
    model: PreTrainedModel,
    tokenizer: Tokenizer,
    tasks: TaskSet,
    *,
    num_fewshot: int | None,
    limit: float | None,
    batch_size: int,
    bootstrap_iters: int,
    seed: int,
) -> dict[str, Any]:
    """Evaluate the (possibly patched) model; returns {"metrics": {task: {metric: value}}, ...}."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    _quiet_lm_eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))
    output = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks.names,
        num_fewshot=num_fewshot,
        limit=int(limit) if limit is not None and limit >= 1 else limit,
        task_manager=tasks.manager,
        bootstrap_iters=bootstrap_iters,
        log_samples=False,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    if output is None:  # only non-zero ranks of a distributed run return None
        raise RuntimeError("lm-eval returned no results")
    return {
        "metrics": flatten_metrics(output["results"]),
        "groups": flatten_metrics(output.get("groups", {})),
        "n_samples": _plain(output.get("n-samples", {})),
        "n_shot": _plain(output.get("n-shot", {})),
        "versions": _plain(output.get("versions", {})),
        "higher_is_better": _plain(output.get("higher_is_better", {})),
    }


def flatten_metrics(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """``{"acc,none": x, "acc_stderr,none": s}`` -> ``{"acc": x, "acc_stderr": s}`` per task.

    A filter other than ``none`` stays in the name (``exact_match,strict-match`` ->
    ``exact_match/strict-match``). Non-numeric entries (aliases, "N/A" stderrs) are dropped.
    """
    flat: dict[str, dict[str, float]] = {}
    for task, metrics in results.items():
        row: dict[str, float] = {}
        for key, value in metrics.items():
            if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, _, filt = key.partition(",")
            name = metric if filt == "none" else f"{metric}/{filt}"
            row[name] = float(value)
        flat[task] = row
    return flat


def _plain(value: Any) -> Any:
    """JSON-safe copy of lm-eval's bookkeeping (numbers, strings, lists, dicts)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return str(value)
