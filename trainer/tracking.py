"""Experiment trackers (TensorBoard, MLflow, W&B): every published window's metrics, as TRL's `report_to`.

`TrainerSettings.report_to` names the trackers (empty: none, and nothing here
is imported). Each published version logs `trainer.metrics.tracked_values`:
the values the Prometheus gauges take for that window, under their /metrics
names (`odpo_trainer_loss`, `odpo_trainer_reward_margin`,
`odpo_trainer_logps_nats/chosen`, ...), with the version as the step. The
run's parameters are the training settings (`trainer.checkpoint.recipe_settings`).
- tensorboard: `torch.utils.tensorboard.SummaryWriter` writing to
  `<tracking_dir>/<tracking_run_name>/` (default `<cache_dir>/runs/`), needs
  the `tensorboard` package (`pip install 'odpo[tracking]'`); a restarted
  trainer on the same store writes on into the same run folder;
- mlflow: `mlflow.set_tracking_uri` (when `mlflow_tracking_uri` is set),
  `set_experiment(mlflow_experiment)`, `start_run(run_name=...)`,
  `log_params`, `log_metrics(..., step=version)`, `end_run`; one MLflow run
  per trainer process;
- wandb: `wandb.init(project=wandb_project, name=..., config=params)`,
  `wandb.log(..., step=version)`, `wandb.finish()`.

A tracker whose package is missing is a settings error at start (core/settings.py
checks `report_to`; `open_tracker` checks again with the import). Once running,
a tracker never stops or slows training: the calls run in a thread of their
own, fed through a bounded queue (a window that finds it full is not logged),
and a tracker that fails (a full disk, an MLflow server away) is logged once
at WARNING, counted in `odpo_trainer_tracking_errors_total{backend}`, and
tried again at the next window. Only the process that publishes versions
tracks (rank 0 under torchrun).
"""

from __future__ import annotations

import importlib
import logging
import queue
import re
import threading
from pathlib import Path
from typing import Any

from core.errors import UsageError
from core.settings import TrainerSettings
from trainer import metrics as M

log = logging.getLogger(__name__)

BACKENDS = ("tensorboard", "mlflow", "wandb")
QUEUE_WINDOWS = 256  # windows waiting for slow trackers; more are not logged
CLOSE_TIMEOUT_S = 30.0


class _Backend:
    name = ""

    def open(self, run_name: str, params: dict[str, Any]) -> None:
        raise NotImplementedError

    def log(self, step: int, values: dict[str, float]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _TensorBoard(_Backend):
    name = "tensorboard"

    def __init__(self, log_dir: Path):
        self.log_dir, self.writer = Path(log_dir), None

    def open(self, run_name: str, params: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        self.writer.add_text("odpo/training_settings", _markdown_table(params))

    def log(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class _MLflow(_Backend):
    """MLflow's fluent API; every call runs in the tracking thread, so its active run is that thread's."""

    name = "mlflow"

    def __init__(self, tracking_uri: str, experiment: str):
        self.tracking_uri, self.experiment, self.mlflow = tracking_uri, experiment, None

    def open(self, run_name: str, params: dict[str, Any]) -> None:
        import mlflow

        if self.tracking_uri:
            mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_experiment(self.experiment)
        mlflow.start_run(run_name=run_name)
        self.mlflow = mlflow
        mlflow.log_params({k: _param(v) for k, v in params.items()})

    def log(self, step: int, values: dict[str, float]) -> None:
        self.mlflow.log_metrics(values, step=step)

    def close(self) -> None:
        if self.mlflow is not None:
            self.mlflow.end_run()


class _WandB(_Backend):
    name = "wandb"

    def __init__(self, project: str, folder: Path):
        self.project, self.folder, self.run = project, Path(folder), None

    def open(self, run_name: str, params: dict[str, Any]) -> None:
        import wandb

        self.folder.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=self.project, name=run_name, config=params, dir=str(self.folder))

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


class Tracker:
    """The trackers of `report_to`, called from a thread of their own; `log_window` never blocks or raises."""

    def __init__(self, backends: list[_Backend], run_name: str, params: dict[str, Any]):
        self.backends, self.run_name, self.params = backends, run_name, params
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_WINDOWS)
        self._warned: set[str] = set()
        self._dropped = 0
        self._thread: threading.Thread | None = None
        if backends:
            self._thread = threading.Thread(target=self._work, name="odpo-trainer-tracking", daemon=True)
            self._thread.start()

    @property
    def active(self) -> bool:
        return bool(self.backends)

    def log_window(self, version: int, values: dict[str, float]) -> None:
        """Hand the metrics of the window that made `version` to the trackers (step = version)."""
        if self._thread is None:
            return
        try:
            self._queue.put_nowait((version, dict(values)))
        except queue.Full:
            self._dropped += 1
            if self._dropped == 1:
                log.warning("experiment trackers fall behind (%d windows waiting): windows are not logged to them "
                            "until they catch up", QUEUE_WINDOWS)

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Log what is queued, close every tracker (flush), within `timeout_s`."""
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("experiment trackers did not finish within %.0fs; leaving them", timeout_s)
        self._thread = None

    def _work(self) -> None:
        opened = [b for b in self.backends if self._call(b, "open", b.open, self.run_name, self.params)]
        while (item := self._queue.get()) is not None:
            step, values = item
            for b in opened:
                self._call(b, "log", b.log, step, values)
        for b in opened:
            self._call(b, "close", b.close)

    def _call(self, backend: _Backend, what: str, fn, *args) -> bool:
        try:
            fn(*args)
            return True
        except Exception as exc:  # noqa: BLE001 -- a tracker must never stop training
            M.TRACKING_ERRORS.labels(backend.name).inc()
            if backend.name not in self._warned:
                self._warned.add(backend.name)
                log.warning("experiment tracker %s failed to %s (%s: %s); training goes on%s", backend.name, what,
                            type(exc).__name__, exc, ", without it" if what == "open" else
                            " (later failures are counted in odpo_trainer_tracking_errors_total)")
            else:
                log.debug("experiment tracker %s failed to %s: %s", backend.name, what, exc)
            return False


def default_run_name(store: Path) -> str:
    """The store folder's parent and name (`odpo-adapters`, `20250101-120000-store`)."""
    parts = Path(store).expanduser().absolute().parts[-2:]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(p.strip("/.") or "root" for p in parts)) or "odpo"


def open_tracker(settings: TrainerSettings, store: Path, cache_dir: Path,
                 params: dict[str, Any] | None = None) -> Tracker:
    """The trackers `settings.report_to` asks for (none: an inactive Tracker); a missing package is a UsageError."""
    run_name = settings.tracking_run_name or default_run_name(store)
    backends: list[_Backend] = []
    for name in dict.fromkeys(settings.report_to):
        module = "torch.utils.tensorboard" if name == "tensorboard" else name
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise UsageError(f"report_to {name} needs `pip install {name}` ({exc})") from None
        if name == "tensorboard":
            root = Path(settings.tracking_dir or Path(cache_dir) / "runs").expanduser()
            backends.append(_TensorBoard(root / run_name))
        elif name == "mlflow":
            backends.append(_MLflow(settings.mlflow_tracking_uri, settings.mlflow_experiment))
        else:
            backends.append(_WandB(settings.wandb_project, Path(cache_dir).expanduser() / "wandb"))
    if backends:
        log.info("reporting every published window to %s (run %s)", ", ".join(b.name for b in backends), run_name)
    return Tracker(backends, run_name, dict(params or {}))


def _param(value: Any) -> Any:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value


def _markdown_table(params: dict[str, Any]) -> str:
    rows = "\n".join(f"| {k} | {_param(v)} |" for k, v in sorted(params.items()))
    return "| setting | value |\n|---|---|\n" + rows
