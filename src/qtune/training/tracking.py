"""Experiment tracking of training runs: the training loss and eval metrics, sent to the trackers
named in `report_to`.

    tensorboard  event files under OUTPUT/runs/ (a core dependency; `tensorboard --logdir`)
    wandb        Weights & Biases (qtune[wandb]); project from WANDB_PROJECT (default qtune),
                 run files under OUTPUT/wandb/; WANDB_MODE=offline runs without an account
    mlflow       MLflow (qtune[mlflow]); MLFLOW_TRACKING_URI if set, else a local file store under
                 OUTPUT/mlruns/ (`mlflow ui --backend-store-uri OUTPUT/mlruns`); experiment from
                 MLFLOW_EXPERIMENT_NAME (default qtune)
    swanlab      SwanLab (qtune[swanlab]); project from SWANLAB_PROJ_NAME (default qtune), run files
                 under OUTPUT/swanlog/; SWANLAB_MODE (default offline: saved locally, `swanlab sync`
                 uploads it later; online, or local for swanlab's own dashboard)
    none         no tracking

`check_trackers` validates the names before any work starts; `open_trackers` starts one run per
tracker and returns a `Trackers` whose `log(metrics, step)` sends keys such as "train/loss",
"train/lr" and "eval/ndcg@10" to all of them. On non-main ranks (`enabled=False`) it does nothing.
"""

from __future__ import annotations

import importlib.util
import json
import numbers
import os
import re
from pathlib import Path
from typing import Any, Iterable

from qtune.errors import QtuneError

TRACKERS = ("tensorboard", "wandb", "mlflow", "swanlab")
ALLOWED = (*TRACKERS, "none")
# tracker -> (importable package, qtune extra that installs it; None: a core dependency)
PACKAGES = {"tensorboard": ("tensorboard", None), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow"), "swanlab": ("swanlab", "swanlab")}
# what to try when a tracker's run cannot start
START_HINTS = {"wandb": "log in with `wandb login` (or WANDB_API_KEY), or set WANDB_MODE=offline",
               "mlflow": "check MLFLOW_TRACKING_URI",
               "swanlab": "log in with `swanlab login`, or set SWANLAB_MODE=offline",
               "tensorboard": "check that the output folder is writable"}


def check_trackers(names: Iterable[str] | str | None) -> list[str]:
    """The trackers to report to, de-duplicated in order ([] for none), or a QtuneError naming
    an unknown name, "none" mixed with others, or a tracker whose package is not installed.
    Comma-separated values ("wandb,mlflow") count as several names."""
    if names is None:
        return []
    if isinstance(names, str):
        names = [names]
    wanted: list[str] = []
    for raw in names:
        for part in str(raw).split(","):
            name = part.strip().lower()
            if not name:
                continue
            if name not in ALLOWED:
                raise QtuneError(f"--report-to: unknown tracker {part.strip()!r} (allowed: {', '.join(ALLOWED)})")
            if name not in wanted:
                wanted.append(name)
    if "none" in wanted:
        if len(wanted) > 1:
            raise QtuneError(f"--report-to: 'none' cannot be combined with other trackers (got {', '.join(wanted)})")
        return []
    for name in wanted:
        package, extra = PACKAGES[name]
        if not _importable(package):
            how = (f"pip install 'qtune[{extra}]'" if extra else
                   f"pip install {package} (a dependency of qtune; reinstall qtune)")
            raise QtuneError(f"--report-to {name} needs the {package} package: {how}")
    return wanted


def _importable(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


class Trackers:
    """The open runs of one training: `log(metrics, step)` sends the numeric values to every
    tracker, `close()` ends the runs (also as a context manager, marking the runs failed when the
    block raised). With no trackers (`enabled=False`, report_to none) every call does nothing."""

    def __init__(self, backends: list | None = None):
        self._backends = list(backends or [])

    @property
    def names(self) -> list[str]:
        return [backend.name for backend in self._backends]

    def __bool__(self) -> bool:
        return bool(self._backends)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self._backends:
            return
        # bools, strings, lists and None are left out (eval reports may carry some)
        values = {str(k): float(v) for k, v in metrics.items()
                  if isinstance(v, numbers.Real) and not isinstance(v, bool)}
        if not values:
            return
        for backend in self._backends:
            backend.log(values, int(step))

    def close(self, failed: bool = False) -> None:
        """End every run (once; later calls do nothing). Every tracker is closed even when one
        fails to; the first error is raised afterwards."""
        backends, self._backends = self._backends, []
        error = None
        for backend in backends:
            try:
                backend.close(failed)
            except Exception as e:  # noqa: BLE001 - close the others first
                error = error or e
        if error is not None:
            raise error

    def __enter__(self) -> "Trackers":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)


def open_trackers(names: Iterable[str] | str | None, output: Path, run_name: str, config: dict,
                  enabled: bool = True) -> Trackers:
    """Start a run in each of `names` (checked with `check_trackers`) for the training writing to
    `output`; `config` (the run's settings) is recorded where the tracker keeps parameters.
    `enabled=False` (non-main ranks) returns trackers that do nothing and touches nothing."""
    if not enabled:
        return Trackers()
    wanted = check_trackers(names)
    if not wanted:
        return Trackers()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    plain = _plain(config or {})
    opened: list = []
    try:
        for name in wanted:
            try:
                opened.append(_OPENERS[name](output, run_name, plain))
            except QtuneError:
                raise
            except Exception as e:
                raise QtuneError(f"--report-to {name}: the run could not start: {e} "
                                 f"({START_HINTS[name]})") from e
    except BaseException:
        try:
            Trackers(opened).close(failed=True)
        except Exception:  # noqa: BLE001 - the error that stopped the start is the one to see
            pass
        raise
    return Trackers(opened)


def _plain(config: dict) -> dict:
    """A JSON-safe copy of `config` (paths and other objects as strings)."""
    return json.loads(json.dumps(config, default=str))


class _TensorBoard:
    name = "tensorboard"

    def __init__(self, output: Path, run_name: str, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(output / "runs"))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def close(self, failed: bool) -> None:
        self.writer.close()


class _WandB:
    name = "wandb"

    def __init__(self, output: Path, run_name: str, config: dict):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "qtune", name=run_name, config=config,
                              dir=str(output))

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self, failed: bool) -> None:
        if failed:
            self.run.finish(exit_code=1)
        else:
            self.run.finish()


# MLflow names may hold letters, digits, underscores, dashes, periods, spaces and slashes (and
# colons, except on Windows); they must stay the same path once normalised ("a//b", "./a" fail).
_MLFLOW_BAD = re.compile(r"[^\w./\- ]")


def mlflow_name(name: str, limit: int = 250) -> str:
    """`name` as a valid MLflow metric or parameter name: "@" becomes "_at_" ("eval/ndcg@10" ->
    "eval/ndcg_at_10"), other characters MLflow refuses become "_", empty, "." and ".." path
    parts are dropped, and it is cut to `limit` characters."""
    name = _MLFLOW_BAD.sub("_", name.replace("@", "_at_"))
    name = "/".join(part for part in name.split("/") if part not in ("", ".", ".."))
    return name[:limit].rstrip("/") or "_"


def _flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


class _MLflow:
    name = "mlflow"

    def __init__(self, output: Path, run_name: str, config: dict):
        import mlflow

        try:
            from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH as key_limit
            from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH as value_limit
        except ImportError:
            key_limit, value_limit = 250, 6000
        self.key_limit = key_limit
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # MLflow 3.7+ refuses the file store unless asked for it; sqlite needs the full mlflow
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (output / "mlruns").resolve().as_uri()
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or "qtune")
        self.mlflow = mlflow
        # inside a caller's own run: a child of it
        self.run = mlflow.start_run(run_name=run_name, nested=mlflow.active_run() is not None)
        params: dict[str, str] = {}
        for key, value in _flatten(config).items():
            key = mlflow_name(key, key_limit)
            text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
            params.setdefault(key, text[:value_limit])
        items = list(params.items())
        for start in range(0, len(items), 100):  # at most 100 params per request
            mlflow.log_params(dict(items[start:start + 100]))

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics({mlflow_name(k, self.key_limit): v for k, v in metrics.items()}, step=step)

    def close(self, failed: bool) -> None:
        active = self.mlflow.active_run()
        if active is not None and active.info.run_id == self.run.info.run_id:
            self.mlflow.end_run(status="FAILED" if failed else "FINISHED")
        else:
            self.mlflow.MlflowClient().set_terminated(self.run.info.run_id, "FAILED" if failed else "FINISHED")


class _SwanLab:
    name = "swanlab"

    def __init__(self, output: Path, run_name: str, config: dict):
        import swanlab

        self.swanlab = swanlab
        # SWANLAB_PROJ_NAME: swanlab's own variable in every version (0.8+ parses SWANLAB_PROJECT
        # as its whole project settings, so that name is not used here)
        project = os.environ.get("SWANLAB_PROJ_NAME") or "qtune"
        swanlab.init(project=project, experiment_name=run_name, config=config, logdir=str(output / "swanlog"),
                     mode=os.environ.get("SWANLAB_MODE") or "offline")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.swanlab.log(metrics, step=step)

    def close(self, failed: bool) -> None:
        self.swanlab.finish()


_OPENERS = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow, "swanlab": _SwanLab}
