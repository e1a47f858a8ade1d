"""Where a run stands in Hydra: its job dir, the sweep dir of a multirun, the job and group names.

The one place that reads ``HydraConfig``; outside a Hydra run (tests, scripts) every answer is None.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def hydra_config() -> Any:
    """The running job's Hydra config, or None outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def sweep_dir() -> Path | None:
    """The multirun's sweep dir, or None in a single run (or outside Hydra)."""
    from hydra.types import RunMode

    hydra_cfg = hydra_config()
    if hydra_cfg is None or hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return Path(hydra_cfg.sweep.dir)


def job_output_dir() -> Path | None:
    """The job's output dir (Hydra's ``runtime.output_dir``), or None outside Hydra."""
    hydra_cfg = hydra_config()
    return Path(hydra_cfg.runtime.output_dir) if hydra_cfg is not None else None


def job_name() -> str | None:
    """The job's overrides as one name (``layer=3,router=mha``), or None outside Hydra."""
    hydra_cfg = hydra_config()
    return hydra_cfg.job.override_dirname if hydra_cfg is not None else None


def run_group() -> str:
    """One name per launch: the sweep dir's name in a multirun (groups its jobs), else the run dir's."""
    hydra_cfg = hydra_config()
    if hydra_cfg is None:
        raise ValueError("run_group needs a running Hydra job (resolve it inside an entry point)")
    return (sweep_dir() or Path(hydra_cfg.run.dir)).name
