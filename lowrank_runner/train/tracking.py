"""Experiment tracking (``output.trackers``) through Accelerate's trackers.

Accelerate does the work: ``Accelerator(log_with=NAMES, project_config=...)``,
``init_trackers(recipe name, init_kwargs=...)``, ``log(values, step=...)``,
``get_tracker(name)`` for files, ``end_training()``; it logs on the main process only.
This module decides what each tracker is given, and where it writes:

- ``tensorboard``: event files in ``RUN_DIR/tensorboard/<recipe name>/``;
- ``mlflow``: ``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else the SQLite store
  ``<output.dir>/mlflow.db`` (artifacts in ``<output.dir>/mlartifacts``); experiment = the
  recipe name (Accelerate's project name), run name = the run's slug;
- ``wandb``: project = the recipe name, group = the task, name = the slug, files in
  ``RUN_DIR/wandb``, offline unless ``mode`` or ``$WANDB_MODE`` says otherwise;
- ``trackio``: project = the recipe name, a local database in ``$TRACKIO_DIR``.

A resumed run continues its tracker runs (their ids in ``RUN_DIR/trackers.json``; TensorBoard
purges the steps after the checkpoint). A run that starts again from step 0 in its directory
(``--resume`` found no checkpoint) replaces the earlier attempt's: its TensorBoard event files
are removed, its MLflow run deleted (MLflow's delete: restorable until ``mlflow gc``), its
W&B offline files and its trackio run (local database) removed, so each tracker holds one
history of the run.

What is logged: the run's resolved config flattened (``method.r``) with ``recipe_hash`` and
``config_hash``; every ``metrics.jsonl`` line (``train/KEY`` at its step, ``eval/METRIC``);
at the end ``best/METRIC`` and ``test/METRIC``; the report's PNGs and report files as
artifacts (MLflow), run files (W&B) or images (TensorBoard).

The torch-free part (names, packages, where) serves ``lrr validate`` and ``lrr inspect``;
Accelerate and the tracker packages are imported only when a run starts.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path

from lowrank_runner.rundir.layout import METRICS_FILE, RECIPE_FILE, REPORT_FILE, REPORT_MD

TENSORBOARD_DIR = "tensorboard"
MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = "mlartifacts"
IDS_FILE = "trackers.json"  # in the run directory: the tracker runs' ids (--resume continues or replaces them)
REPORT_FILES = (REPORT_MD, REPORT_FILE, METRICS_FILE, RECIPE_FILE)
NESTED_CONFIG = ("wandb", "trackio")  # trackers that take a nested config; the others get it flat


# ------------------------------------------------------------------ the recipe's trackers (torch-free)


def entries(output: dict | None) -> list[dict]:
    """``output.trackers`` as ``[{name, **options}]`` (a bare name has no options)."""
    items = (output or {}).get("trackers") or []
    return [{"name": item} if isinstance(item, str) else dict(item) for item in items]


def mlflow_uri(entry: dict, output_dir: str | Path) -> str:
    """The MLflow store: the option, ``$MLFLOW_TRACKING_URI``, or SQLite in ``output.dir``."""
    return entry.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or _default_mlflow_uri(output_dir)


def artifact_root(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a local SQLite store
    (``mlartifacts/`` next to the ``.db``; MLflow's own default would be ``./mlruns`` in
    whatever directory ``lrr`` runs from); None for other stores (a file store keeps its
    own, a tracking server decides)."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///"):]).resolve().parent / MLFLOW_ARTIFACTS).as_uri()


def _default_mlflow_uri(output_dir: str | Path) -> str:
    return "sqlite:///" + (Path(output_dir).resolve() / MLFLOW_DB).as_posix()


def mlflow_experiment(recipe_name: str) -> str:
    """The recipe name (Accelerate's project name), unless ``$MLFLOW_EXPERIMENT_NAME`` is set."""
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or recipe_name


def wandb_mode(entry: dict) -> str:
    return entry.get("mode") or os.environ.get("WANDB_MODE") or "offline"


def where(entry: dict, recipe_name: str, output_dir: str | Path, run_dir: str | Path = "RUN_DIR",
          slug: str = "RUN") -> str:
    """One line saying where a tracker writes (``lrr inspect``, the report, the run's start)."""
    name = entry["name"]
    if name == "tensorboard":
        return f"event files in {Path(run_dir) / TENSORBOARD_DIR / recipe_name}"
    if name == "mlflow":
        return f"{mlflow_uri(entry, output_dir)}, experiment {mlflow_experiment(recipe_name)}, run {slug}"
    if name == "wandb":
        mode = wandb_mode(entry)
        then = "; upload with wandb sync" if mode == "offline" else ""
        return f"{mode}, project {recipe_name}, run {slug}, files in {Path(run_dir) / 'wandb'}{then}"
    store = os.environ.get("TRACKIO_DIR") or "~/.cache/huggingface/trackio"
    synced = f", synced to Space {entry['space_id']}" if entry.get("space_id") else ""
    return f"project {recipe_name}, run {slug}, local database in {store}{synced}"


def describe(output: dict | None, recipe_name: str, run_dir: str | Path = "RUN_DIR", slug: str = "RUN") -> list[dict]:
    """Each tracker with where it writes: ``[{name, writes}]``."""
    output_dir = (output or {}).get("dir", "runs")
    return [{"name": e["name"], "writes": where(e, recipe_name, output_dir, run_dir, slug)} for e in entries(output)]


def flatten(config: dict, prefix: str = "") -> dict:
    """A nested config as flat ``a.b.c`` parameters of types every tracker takes: lists
    as JSON, None as ``null``."""
    out: dict = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, path + "."))
        elif isinstance(value, (bool, int, float, str)):
            out[path] = value
        else:
            out[path] = json.dumps(value, default=str)
    return out


def numbers(values: dict, prefix: str) -> dict:
    """The numeric values, keys prefixed (``train/loss``); what else a line holds is left out."""
    return {f"{prefix}{k}": (int(v) if isinstance(v, bool) else v) for k, v in values.items()
            if isinstance(v, (int, float))}


# ------------------------------------------------------------------ during a run (Accelerate)


class Tracking:
    """The trackers of one run: what the Accelerator is built with, their start, the
    values of every step and evaluation, the results and files at the end, and the end
    (normal, or failed/interrupted). Everything is a no-op without ``output.trackers``."""

    def __init__(self, recipe, run, run_dir: Path):
        self.recipe, self.run, self.run_dir = recipe, run, Path(run_dir).resolve()  # absolute: stores outlive the cwd
        self.output = run.config.get("output") or {}
        self.entries = entries(self.output)
        self.accelerator = None

    @property
    def names(self) -> list[str]:
        return [e["name"] for e in self.entries]

    def accelerator_options(self) -> dict:
        """``log_with`` and the project configuration (TensorBoard's logging directory)."""
        if not self.entries:
            return {}
        from accelerate.utils import ProjectConfiguration

        return {"log_with": self.names, "project_config": ProjectConfiguration(
            project_dir=str(self.run_dir), logging_dir=str(self.run_dir / TENSORBOARD_DIR))}

    def describe(self) -> list[dict]:
        return describe(self.output, self.recipe.name, self.run_dir, self.run.slug)

    def start(self, accelerator, resumed_from: int | None = None) -> None:
        """One tracker run for this lrr run, its parameters stored (trackers start on the
        main process only: Accelerate's ``init_trackers``); ``resumed_from``: the
        checkpoint's step (its tracker runs continue), None: from step 0 (an earlier
        attempt's are replaced: :meth:`_replace_earlier_attempt`)."""
        self.accelerator = accelerator
        if not self.entries or not accelerator.is_main_process:
            return
        from lowrank_runner.errors import TrainingError

        try:
            self._prepare_stores()
            if resumed_from is None:
                self._replace_earlier_attempt()
            accelerator.init_trackers(self.recipe.name, init_kwargs=self._init_kwargs(resumed_from))
            self._record_ids()
            config = {**self.run.config, "recipe_hash": self.recipe.hash, "config_hash": self.run.config_hash,
                      "run": self.run.slug, "run_dir": str(self.run_dir)}
            for tracker in accelerator.trackers:
                tracker.store_init_configuration(config if tracker.name in NESTED_CONFIG else flatten(config))
        except Exception as exc:
            self.abort(interrupted=False)
            raise TrainingError(f"{self.recipe.source}: output.trackers: a tracker did not start ({type(exc).__name__}: "
                                f"{exc}); check its options (docs/recipes.md, output.trackers), or remove it") from None
        for item in self.describe():
            print(f"tracking: {item['name']}: {item['writes']}", file=sys.stderr, flush=True)

    def _init_kwargs(self, resumed_from: int | None) -> dict:
        """What each tracker's ``__init__`` gets (Accelerate passes ``init_kwargs[name]``)."""
        run, tags = self.run, {"lrr.recipe_hash": self.recipe.hash, "lrr.config_hash": self.run.config_hash,
                               "lrr.task": str(self.run.task), "lrr.seed": str(self.run.seed),
                               "lrr.run_dir": str(self.run_dir)}
        out: dict = {}
        ids = self._recorded_ids() if resumed_from is not None else {}
        for e in self.entries:
            if e["name"] == "tensorboard":
                out["tensorboard"] = {"purge_step": resumed_from + 1} if resumed_from else {}
            elif e["name"] == "mlflow":
                out["mlflow"] = {"run_name": run.slug, "tags": {**tags, **(e.get("tags") or {})},
                                 **({"run_id": ids["mlflow"]} if ids.get("mlflow") else {})}
            elif e["name"] == "wandb":
                out["wandb"] = {"name": run.slug, "group": e.get("group") or str(run.task), "dir": str(self.run_dir),
                                "mode": wandb_mode(e), "tags": e.get("tags"), "notes": e.get("notes"),
                                "settings": _quiet_wandb(),
                                **({"entity": e["entity"]} if e.get("entity") else {}),
                                **({"id": ids["wandb"], "resume": "allow"} if ids.get("wandb") else {})}
            elif e["name"] == "trackio":
                out["trackio"] = {"name": run.slug, "group": e.get("group") or str(run.task),
                                  **({"space_id": e["space_id"]} if e.get("space_id") else {}),
                                  **({"resume": "allow"} if resumed_from is not None else {})}  # by run name
        return out

    def _recorded_ids(self) -> dict:
        """The tracker run ids the interrupted run recorded (``trackers.json``), if any."""
        try:
            ids = json.loads((self.run_dir / IDS_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return ids if isinstance(ids, dict) else {}

    def _record_ids(self) -> None:
        """``trackers.json``: the MLflow and W&B run ids, which ``--resume`` continues, and
        trackio's, which a start from step 0 replaces (a resume continues it by name)."""
        ids = {}
        for tracker in self.accelerator.trackers:
            if tracker.name == "mlflow":
                ids["mlflow"] = tracker.tracker.info.run_id
            elif tracker.name in ("wandb", "trackio"):
                ids[tracker.name] = tracker.tracker.id
        if ids:
            (self.run_dir / IDS_FILE).write_text(json.dumps(ids, indent=2) + "\n", encoding="utf-8")

    def _replace_earlier_attempt(self) -> None:
        """A run that starts again from step 0 where an earlier attempt logged (``--resume``
        without a checkpoint; its ids in ``trackers.json``): that attempt's history goes,
        so each tracker keeps one run with one history, as ``metrics.jsonl`` does. A new
        run directory has nothing to replace."""
        ids = self._recorded_ids()
        events = self.run_dir / TENSORBOARD_DIR
        if "tensorboard" in self.names and events.is_dir():
            shutil.rmtree(events)
            _say(f"tensorboard: the earlier attempt's event files are removed ({events}): the run starts again "
                 "from step 0")
        replace = {"mlflow": self._delete_mlflow_run, "wandb": self._remove_wandb_run,
                   "trackio": self._delete_trackio_run}
        for entry in self.entries:
            run_id = ids.get(entry["name"])
            if entry["name"] in replace and isinstance(run_id, str) and run_id:
                replace[entry["name"]](entry, run_id)

    def _delete_mlflow_run(self, entry: dict, run_id: str) -> None:
        """The earlier attempt's MLflow run, deleted if it is this run's (its ``lrr.run_dir``
        tag): MLflow's delete, which ``mlflow gc`` makes final."""
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=mlflow_uri(entry, self.output.get("dir", "runs")))
        try:
            run = client.get_run(run_id)
        except MlflowException:
            return  # not in this store (another tracking_uri): nothing of it here
        if run.data.tags.get("lrr.run_dir") != str(self.run_dir) or run.info.lifecycle_stage == "deleted":
            return
        client.delete_run(run_id)
        _say(f"mlflow: the earlier attempt's run {run_id} ({run.info.status}) is deleted: the run starts again from "
             "step 0 (mlflow gc removes it for good; MlflowClient.restore_run brings it back)")

    def _remove_wandb_run(self, entry: dict, run_id: str) -> None:
        """The earlier attempt's W&B files in ``RUN_DIR/wandb``: an offline run's removed
        (``wandb sync`` would upload it beside the new one); an online one is in W&B."""
        if wandb_mode(entry) != "offline":
            _say(f"wandb: the earlier attempt's run {run_id} stays in W&B beside the new one: delete it there")
            return
        for path in (self.run_dir / "wandb").glob(f"offline-run-*-{run_id}"):
            shutil.rmtree(path)
            _say(f"wandb: the earlier attempt's offline run is removed ({path}): the run starts again from step 0")

    def _delete_trackio_run(self, entry: dict, run_id: str) -> None:
        """The earlier attempt's trackio run, deleted from the local database (by its id:
        other directories' runs of this recipe have the same name)."""
        if entry.get("space_id"):
            _say(f"trackio: the earlier attempt's run {run_id} stays in Space {entry['space_id']} beside the new one: "
                 "delete it there")
            return
        import trackio

        try:
            runs = list(trackio.Api().runs(self.recipe.name))
        except ValueError:
            return  # no such project in this store (another $TRACKIO_DIR): nothing of it here
        for run in runs:
            if run.id == run_id and run.delete():
                _say(f"trackio: the earlier attempt's run {run_id} is deleted: the run starts again from step 0")

    def _prepare_stores(self) -> None:
        """MLflow: the store and the recipe's experiment, created once (by whichever run of
        parallel runs comes first; Accelerate then finds it by name)."""
        entry = next((e for e in self.entries if e["name"] == "mlflow"), None)
        if entry is None:
            return
        output_dir = Path(self.output.get("dir", "runs"))
        uri = mlflow_uri(entry, output_dir)
        open_mlflow_experiment(uri, mlflow_experiment(self.recipe.name), artifact_root(uri))

    # ------------------------------------------------------------------ values

    def log_step(self, record: dict) -> None:
        """A ``metrics.jsonl`` training line: ``train/KEY`` at its step."""
        if self.entries:
            self.accelerator.log(numbers({k: v for k, v in record.items() if k != "step"}, "train/"),
                                 step=record["step"])

    def log_eval(self, step: int, scores: dict) -> None:
        """An evaluation: ``eval/METRIC`` at its step."""
        if self.entries:
            self.accelerator.log(numbers(scores, "eval/"), step=step)

    def log_results(self, best: dict, step: int, test: dict | None) -> None:
        """The selected checkpoint's metrics (``best/METRIC``, ``best/step``) and the test
        metrics (``test/METRIC``), at the last step."""
        if not self.entries:
            return
        values = {**numbers(best.get("eval") or {}, "best/"), **numbers(test or {}, "test/")}
        if best.get("step") is not None:
            values["best/step"] = best["step"]
        self.accelerator.log(values, step=step)

    # ------------------------------------------------------------------ files

    def log_files(self, step: int) -> None:
        """The report's plots (``*.png``) and report files, where the tracker takes files
        (main process, after the report is written)."""
        if not self.entries or not self.accelerator.is_main_process:
            return
        plots = sorted(self.run_dir.glob("*.png"))
        files = [self.run_dir / name for name in REPORT_FILES if (self.run_dir / name).is_file()]
        for name in self.names:
            tracker = self.accelerator.get_tracker(name)
            if name == "mlflow":
                for path in plots:
                    tracker.log_artifact(str(path), artifact_path="plots")
                for path in files:
                    tracker.log_artifact(str(path))
            elif name == "wandb":
                for path in plots + files:
                    tracker.run.save(str(path), base_path=str(self.run_dir), policy="now")
            elif name == "tensorboard" and plots:
                tracker.log_images({f"plots/{p.stem}": _image(p) for p in plots}, step=step, dataformats="NHWC")

    # ------------------------------------------------------------------ the end

    def abort(self, interrupted: bool) -> None:
        """End the tracker runs of a run that failed (or was interrupted) with that status,
        so the next run of this process starts its own (an MLflow run left active would
        not let it)."""
        accelerator = self.accelerator
        if accelerator is None or not accelerator.trackers:
            return
        for tracker in list(accelerator.trackers):
            try:
                if tracker.name == "mlflow":
                    import mlflow

                    mlflow.end_run("KILLED" if interrupted else "FAILED")
                elif tracker.name == "wandb":
                    tracker.run.finish(exit_code=130 if interrupted else 1)
                else:
                    tracker.finish()
            except Exception:  # noqa: BLE001: the run's own error is what is reported
                pass
        accelerator.trackers.clear()


def open_mlflow_experiment(uri: str, name: str, artifacts: str | None = None) -> None:
    """Point MLflow at the store ``uri`` and create the experiment ``name`` unless it exists;
    safe when parallel runs do it at once (the SQLite tables too)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    for noisy in ("mlflow", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    mlflow.set_tracking_uri(uri)
    with _store_lock(uri):
        if mlflow.get_experiment_by_name(name) is None:
            try:
                mlflow.create_experiment(name, artifact_location=artifacts)
            except MlflowException:
                if mlflow.get_experiment_by_name(name) is None:  # not another process's: a real error
                    raise


def _store_lock(uri: str):
    """A lock beside an SQLite store (``PATH.lock``): two processes creating its tables
    at once fail (``duplicate column``); other stores need none."""
    from contextlib import nullcontext

    from filelock import FileLock

    if not uri.startswith("sqlite:///"):
        return nullcontext()
    path = Path(uri[len("sqlite:///"):])
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path) + ".lock")


def _say(text: str) -> None:
    """A ``tracking:`` line on stderr (the main process's)."""
    print(f"tracking: {text}", file=sys.stderr, flush=True)


def _quiet_wandb():
    """W&B's settings: silent (the run's start says where it writes) unless ``$WANDB_SILENT`` is set."""
    import wandb

    return wandb.Settings(silent=os.environ.get("WANDB_SILENT", "true").lower() in ("1", "true", "yes"))


def _image(path: Path):
    """A PNG as a batch of one NHWC uint8 RGB image (TensorBoard's add_images)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))[None]
