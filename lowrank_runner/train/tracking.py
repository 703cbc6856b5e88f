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

Before anything of an ``lrr run`` is written (:func:`check_endpoints`, once per command,
in the ``--parallel`` driver too), every server a tracker would reach at its start is asked
once, with a short timeout (:data:`CHECK_TIMEOUT`, ``$LRR_TRACKER_TIMEOUT``): an MLflow
tracking server (``http(s)://`` URI), W&B's server in online mode, the Hugging Face Hub for a
trackio ``space_id`` (``$TRACKIO_SERVER_URL``: that server). One that refuses, does not answer
or answers with a server error is a :class:`TrackerError` naming the recipe key, the URI, the
cause and the fix, instead of minutes of retries (MLflow, W&B) or a hang (trackio). An MLflow
tracking server also gets bounded retries for the whole run (:data:`MLFLOW_HTTP_DEFAULTS`,
unless the environment sets them). ``--resume`` refuses a damaged ``trackers.json``
(:func:`check_recorded_ids`) rather than fork the tracker runs' histories.

The torch-free part (names, packages, where, the checks) serves ``lrr validate``, ``lrr
inspect`` and the start of ``lrr run``; Accelerate and the tracker packages are imported only
when a run starts.
"""

from __future__ import annotations

import configparser
import http.client
import json
import logging
import os
import shutil
import socket
import ssl
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from lowrank_runner.errors import LrrError, TrainingError
from lowrank_runner.rundir.files import write_json
from lowrank_runner.rundir.layout import METRICS_FILE, RECIPE_FILE, REPORT_FILE, REPORT_MD

TENSORBOARD_DIR = "tensorboard"
MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = "mlartifacts"
IDS_FILE = "trackers.json"  # in the run directory: the tracker runs' ids (--resume continues or replaces them)
REPORT_FILES = (REPORT_MD, REPORT_FILE, METRICS_FILE, RECIPE_FILE)
NESTED_CONFIG = ("wandb", "trackio")  # trackers that take a nested config; the others get it flat
ID_TRACKERS = ("mlflow", "wandb", "trackio")  # the trackers whose run ids trackers.json keeps

CHECK_TIMEOUT = 5.0  # seconds: how long the check before a run waits for a tracker's server
CHECK_TIMEOUT_ENV = "LRR_TRACKER_TIMEOUT"  # overrides it (seconds)
# An MLflow tracking server, for the whole run (unless the environment sets them): each request
# waits 20 s, and is retried 3 times (backoff 2, 4, 8 s), so a server that stops answering
# fails the run in about 15 s (refused) to 100 s (silent), not MLflow's ~4 to 20 minutes
# (7 retries, 120 s each).
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "20", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3"}
MLFLOW_PROBE = "/api/2.0/mlflow/experiments/search?max_results=1"  # a read every MLflow server answers (GET)
DEFAULT_WANDB_URL = "https://api.wandb.ai"
DEFAULT_HF_ENDPOINT = "https://huggingface.co"


class TrackerError(LrrError):
    """A tracker that cannot work: its server does not answer (before the run starts), or
    the tracker run ids that ``--resume`` continues are damaged."""


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


# ------------------------------------------------------------------ before a run: the servers trackers reach


@dataclass(frozen=True)
class Endpoint:
    """A server a tracker reaches as it starts: what to ask (``url``), and what to say
    when it does not answer (``where``: the recipe key and its line; ``what``: the server,
    with the URI and where it comes from; ``fix``)."""

    tracker: str
    url: str
    where: str
    what: str
    fix: str


def endpoints(recipe) -> list[Endpoint]:
    """The servers the recipe's trackers reach as they start (each once): an MLflow
    tracking server (an ``http(s)://`` URI: the option or ``$MLFLOW_TRACKING_URI``), W&B's
    server (online mode), the Hugging Face Hub (trackio ``space_id``) or a trackio server
    (``$TRACKIO_SERVER_URL``). Local stores (SQLite, files, W&B offline, trackio's local
    database, TensorBoard) reach none."""
    found: dict[tuple[str, str], Endpoint] = {}
    for run in recipe.runs:
        output = run.config.get("output") or {}
        for index, entry in enumerate(entries(output)):
            endpoint = _endpoint(entry, f"output.trackers.{index}", run, recipe.source, output.get("dir", "runs"))
            if endpoint is not None:
                found.setdefault((endpoint.tracker, endpoint.url), endpoint)
    return list(found.values())


def _endpoint(entry: dict, key: str, run, source: str, output_dir) -> Endpoint | None:
    def at(option: str | None) -> str:
        path = f"{key}.{option}" if option and option in entry else key
        return f"{run.location_of(path) or source}: {path}"

    name = entry["name"]
    if name == "mlflow":
        uri = mlflow_uri(entry, output_dir)
        if not _is_http(uri):
            return None
        local = f"the local SQLite store {_default_mlflow_uri(output_dir)}"
        if entry.get("tracking_uri"):
            return Endpoint(name, uri.rstrip("/") + MLFLOW_PROBE, at("tracking_uri"),
                            f"the MLflow tracking server {_shown(uri)}",
                            f"Start the server, fix tracking_uri, or remove tracking_uri to use {local} (or remove "
                            "the tracker)")
        return Endpoint(name, uri.rstrip("/") + MLFLOW_PROBE, f"{at(None)} (mlflow)",
                        f"the MLflow tracking server {_shown(uri)} (from $MLFLOW_TRACKING_URI)",
                        f"Start the server, fix MLFLOW_TRACKING_URI, or unset it to use {local} (or remove the "
                        "tracker)")
    if name == "wandb":
        mode = wandb_mode(entry)
        if mode in ("offline", "dryrun", "disabled"):
            return None
        url, said = _wandb_url()
        where = at("mode") if entry.get("mode") else f"{at(None)} (wandb, mode {mode} from $WANDB_MODE)"
        return Endpoint(name, url, where, f"W&B's server {_shown(url)} ({said})",
                        "Check the network or the server, or log offline (mode: offline; upload later with wandb "
                        "sync), or remove the tracker")
    if name == "trackio":
        space = entry.get("space_id") or os.environ.get("TRACKIO_SPACE_ID")
        if space:
            hub = (os.environ.get("HF_ENDPOINT") or DEFAULT_HF_ENDPOINT).rstrip("/")
            where = at("space_id") if entry.get("space_id") else f"{at(None)} (trackio, Space from $TRACKIO_SPACE_ID)"
            return Endpoint(name, f"{hub}/api/spaces/{space}", where,
                            f"the Hugging Face Hub {_shown(hub)} (trackio's Space {space})",
                            "Check the network (or $HF_ENDPOINT), or drop space_id (trackio then logs to its local "
                            "database only), or remove the tracker")
        server = os.environ.get("TRACKIO_SERVER_URL")
        if server and _is_http(server):
            return Endpoint(name, server, f"{at(None)} (trackio)",
                            f"the trackio server {_shown(server)} (from $TRACKIO_SERVER_URL)",
                            "Start the server, fix TRACKIO_SERVER_URL, or unset it (trackio then logs to its local "
                            "database), or remove the tracker")
    return None


def check_endpoints(recipe, probe: bool = True) -> None:
    """Before anything of ``lrr run`` is written: every server a tracker reaches as it
    starts (:func:`endpoints`) is asked once, all at once, within :func:`check_timeout`
    seconds; one that refuses the connection, does not answer in time or answers with a
    server error (an MLflow server: also 404, nothing there) is a :class:`TrackerError`
    (nothing was written). Any other answer (200, 401, a TLS certificate MLflow may
    accept...) passes: the tracker's own client says what is wrong. With an MLflow tracking
    server, :data:`MLFLOW_HTTP_DEFAULTS` bound MLflow's requests for the whole run (and the
    runs' child processes), unless the environment sets them. ``probe=False`` (a
    ``--parallel`` child, whose driver checked): the defaults only."""
    found = endpoints(recipe)
    if any(e.tracker == "mlflow" for e in found):
        for name, value in MLFLOW_HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
    if not probe or not found:
        return
    timeout = check_timeout()
    causes: dict[int, str | None] = {}

    def ask(index: int, endpoint: Endpoint) -> None:
        causes[index] = probe_url(endpoint.url, timeout, mlflow=endpoint.tracker == "mlflow")

    threads = [threading.Thread(target=ask, args=(i, e), name=f"lrr-tracker-check-{i}", daemon=True)
               for i, e in enumerate(found)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout + 0.5  # DNS has no timeout of its own
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    for index, endpoint in enumerate(found):
        cause = causes.get(index, _no_answer(timeout))  # still waiting (DNS): its daemon thread is left behind
        if cause is not None:
            raise TrackerError(f"{endpoint.where}: {endpoint.what} {cause}; nothing was started. {endpoint.fix}")


def check_timeout() -> float:
    """:data:`CHECK_TIMEOUT`, or ``$LRR_TRACKER_TIMEOUT`` (seconds)."""
    text = os.environ.get(CHECK_TIMEOUT_ENV)
    if not text:
        return CHECK_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise TrackerError(f"${CHECK_TIMEOUT_ENV}={text}: not a number of seconds above 0; e.g. "
                           f"{CHECK_TIMEOUT_ENV}={CHECK_TIMEOUT:g}, or unset it")
    return value


def probe_url(url: str, timeout: float, mlflow: bool = False) -> str | None:
    """One GET of ``url`` (credentials and proxies as the environment says; no retry):
    None when the server answers, else what went wrong, to follow "the server..."."""
    request = urllib.request.Request(_without_userinfo(url), headers={"User-Agent": "lowrank-runner tracker check"})
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=_mlflow_tls() if mlflow else None) as response:
            status, reason = response.status, response.reason
    except urllib.error.HTTPError as exc:
        status, reason = exc.code, exc.reason
    except urllib.error.URLError as exc:
        return _failure(exc.reason, timeout)
    except http.client.HTTPException as exc:  # not HTTP: a garbled answer, a bad URL
        return f"did not answer with HTTP ({type(exc).__name__}: {exc})"
    except (OSError, ValueError) as exc:  # a timeout while waiting for the answer, a reset
        return _failure(exc, timeout)
    if status >= 500 or (mlflow and status == 404):
        path = urllib.parse.urlsplit(url).path
        what = f" for GET {path}: not an MLflow tracking server there" if status == 404 else ""
        return f"answered HTTP {status} {reason}{what}"
    return None


def _failure(reason, timeout: float) -> str | None:
    """What a failed connection says (None: TLS, which means something answered)."""
    if isinstance(reason, ssl.SSLError):
        return None  # the server answers; MLflow's client has its own certificates (REQUESTS_CA_BUNDLE, ...)
    if isinstance(reason, ConnectionRefusedError):
        return "refused the connection (is it running, on this host and port?)"
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return _no_answer(timeout)
    if isinstance(reason, socket.gaierror):
        return f"is not reachable: its host name does not resolve ({reason.strerror or reason})"
    if isinstance(reason, OSError):
        return f"is not reachable ({reason.strerror or reason})"
    return f"is not reachable ({reason})"


def _no_answer(timeout: float) -> str:
    return f"did not answer within {timeout:g} s (${CHECK_TIMEOUT_ENV} sets how long lrr waits)"


def _mlflow_tls():
    """The TLS settings MLflow's client takes from the environment (an untrusted or
    self-signed certificate, a client certificate); None: Python's defaults."""
    insecure = os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() in ("1", "true")
    server_cert, client_cert = (os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH"),
                                os.environ.get("MLFLOW_TRACKING_CLIENT_CERT_PATH"))
    if not (insecure or server_cert or client_cert):
        return None
    context = ssl.create_default_context(cafile=server_cert or None)
    if insecure:
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    if client_cert:
        try:
            context.load_cert_chain(client_cert)
        except (OSError, ssl.SSLError):
            pass  # MLflow's client says what is wrong with it
    return context


def _wandb_url() -> tuple[str, str]:
    """W&B's server and where that comes from: ``$WANDB_BASE_URL``, the ``base_url`` of
    W&B's settings file (``wandb login --host``), else W&B's default."""
    if os.environ.get("WANDB_BASE_URL"):
        return os.environ["WANDB_BASE_URL"].rstrip("/"), "from $WANDB_BASE_URL"
    config_dir = Path(os.environ.get("WANDB_CONFIG_DIR") or Path("~", ".config", "wandb")).expanduser()
    settings = configparser.ConfigParser()
    try:
        settings.read(config_dir / "settings", encoding="utf-8")
        url = settings.get("default", "base_url", fallback=None)
    except (configparser.Error, UnicodeDecodeError):
        url = None
    if url:
        return url.rstrip("/"), f"from {config_dir / 'settings'}"
    try:
        import wandb

        return str(wandb.Settings().base_url).rstrip("/"), "W&B's default"
    except Exception:  # noqa: BLE001: an older wandb
        return DEFAULT_WANDB_URL, "W&B's default"


def _is_http(uri: str) -> bool:
    return urllib.parse.urlsplit(uri).scheme.lower() in ("http", "https")


def _without_userinfo(url: str) -> str:
    """``url`` without ``user:password@`` (the check needs no login: 401 is an answer)."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _shown(url: str) -> str:
    """``url`` as said in a message: no password, no query (a trackio write token)."""
    parts = urllib.parse.urlsplit(_without_userinfo(url))
    return urllib.parse.urlunsplit(parts._replace(query="", fragment=""))


# ------------------------------------------------------------------ trackers.json (--resume)


def recorded_ids(run_dir: str | Path) -> dict:
    """The tracker run ids in ``RUN_DIR/trackers.json`` (``{"mlflow": ID, "wandb": ID,
    "trackio": ID}``); {} without the file; a :class:`TrackerError` naming the file when it
    is damaged: resuming without the ids would start new tracker runs beside the earlier
    ones (two histories of one run), so that is the user's choice, not lrr's."""
    path = Path(run_dir) / IDS_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        problem = f"unreadable: {getattr(exc, 'strerror', None) or exc}"
    else:
        try:
            ids = json.loads(text)
        except ValueError as exc:
            problem = f"not JSON: {exc}" if text.strip() else "empty"
        else:
            if isinstance(ids, dict) and all(isinstance(v, str) and v for v in ids.values()):
                return ids
            problem = f"not a mapping of tracker names to run ids: {text.strip()[:80]}"
    raise TrackerError(f"{path} is damaged ({problem}); it holds the tracker run ids that --resume continues. "
                       f"Restore it ({{\"mlflow\": \"RUN_ID\", \"wandb\": \"ID\", \"trackio\": \"ID\"}}), or delete it "
                       f"to start new tracker runs for this run (the earlier ones stay in the trackers beside them)")


def check_recorded_ids(recipe, dirs: dict, points: dict) -> None:
    """``--resume``: the ``trackers.json`` of every run that trains again (all but the
    completed ones, ``points``: :func:`~lowrank_runner.train.run_dirs.resume_points`),
    checked before any of them trains (:func:`recorded_ids`)."""
    for run in recipe.runs:
        if isinstance(points.get(run.index), tuple):
            continue  # completed: nothing of it starts again
        if any(e["name"] in ID_TRACKERS for e in entries(run.config.get("output"))):
            recorded_ids(dirs[run.index])


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
        ids = self._recorded_ids()  # a damaged file: refused (TrackerError), nothing started
        try:
            self._prepare_stores()
            if resumed_from is None:
                self._replace_earlier_attempt(ids)
            accelerator.init_trackers(self.recipe.name, init_kwargs=self._init_kwargs(resumed_from, ids))
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

    def _init_kwargs(self, resumed_from: int | None, ids: dict) -> dict:
        """What each tracker's ``__init__`` gets (Accelerate passes ``init_kwargs[name]``);
        ``ids``: the recorded tracker run ids, which a resumed run continues."""
        run, tags = self.run, {"lrr.recipe_hash": self.recipe.hash, "lrr.config_hash": self.run.config_hash,
                               "lrr.task": str(self.run.task), "lrr.seed": str(self.run.seed),
                               "lrr.run_dir": str(self.run_dir)}
        out: dict = {}
        ids = ids if resumed_from is not None else {}
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
        """The tracker run ids an earlier attempt recorded (``trackers.json``), if any; a
        damaged file is a :class:`TrackerError` (:func:`recorded_ids`). Without trackers
        that keep ids (TensorBoard alone), none are read."""
        if not any(name in ID_TRACKERS for name in self.names):
            return {}
        return recorded_ids(self.run_dir)

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
            write_json(self.run_dir / IDS_FILE, ids)  # whole or not at all: a half-written file would be damaged

    def _replace_earlier_attempt(self, ids: dict | None = None) -> None:
        """A run that starts again from step 0 where an earlier attempt logged (``--resume``
        without a checkpoint; its ids in ``trackers.json``, ``ids`` if read already): that
        attempt's history goes, so each tracker keeps one run with one history, as
        ``metrics.jsonl`` does. A new run directory has nothing to replace."""
        ids = self._recorded_ids() if ids is None else ids
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
