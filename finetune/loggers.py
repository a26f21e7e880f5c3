"""Where metrics go: always the run's metrics.jsonl (RunDir.log_metrics); optionally wandb
(offline mode works with no account and no network) and TensorBoard, both under the run
directory. Only the main process logs.

Numbers are logged as `<phase>-stage_<S>/<metric>` against a step that counts optimizer steps
over the whole run, so the units of a two-phase, two-stage run line up one after another.
"""
from __future__ import annotations

from pathlib import Path

from .errors import UserError


def _require(module: str, key: str, extra: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{key}: the {module} package is not installed; pip install -e '.[{extra}]'"
                        f" or turn {key} off") from None


class MetricSinks:
    def __init__(self, spec, run_dir: Path, config: dict, enabled: bool = True):
        self.sinks = []
        self.step = 0
        if not enabled:
            return
        if spec.wandb.enabled:
            wandb = _require("wandb", "logging.wandb", "wandb")
            (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
            self.wandb_run = wandb.init(project=spec.wandb.project, entity=spec.wandb.entity,
                                        mode=spec.wandb.mode, dir=str(run_dir), config=config,
                                        name=run_dir.name, reinit="finish_previous")
            self.sinks.append(lambda metrics, step: self.wandb_run.log(metrics, step=step))
        if spec.tensorboard:
            _require("tensorboard", "logging.tensorboard", "tensorboard")
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
            self.sinks.append(lambda metrics, step: [self.writer.add_scalar(k, v, step)
                                                     for k, v in metrics.items()])

    def log(self, entry: dict, global_step: int) -> None:
        if not self.sinks:
            return
        unit = entry.get("unit", "run")
        numbers = {f"{unit}/{k}": float(v) for k, v in entry.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        for sink in self.sinks:
            sink(numbers, global_step)

    def close(self) -> None:
        if hasattr(self, "wandb_run"):
            self.wandb_run.finish()
        if hasattr(self, "writer"):
            self.writer.close()
