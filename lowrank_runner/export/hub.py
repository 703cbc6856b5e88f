"""Uploading a finished export to the Hugging Face Hub (``lrr export ... --push-to-hub
REPO_ID``, ``lrr push EXPORT_DIR REPO_ID``), with ``huggingface_hub``.

The repo id is checked before any export work (:func:`check_repo_id`). The upload
(:func:`push_export`) starts only after the export was verified and renamed into place,
and first makes sure, within seconds, that it can succeed: not offline (``HF_HUB_OFFLINE``),
a token (``HF_TOKEN`` or a saved ``hf auth login``), the endpoint (``HF_ENDPOINT``, default
huggingface.co) reachable and the token accepted (one ``whoami`` request with a short
connect timeout, no retries). Every failure is one :class:`~lowrank_runner.errors.ExportError`
line saying that the local export is intact and how to upload it again.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from lowrank_runner.errors import ExportError, RunFileError, UsageError
from lowrank_runner.export.card import CARD_FILE, LOCATION
from lowrank_runner.export.common import EXPORT_INFO
from lowrank_runner.rundir.files import read_json_file

CONNECT_TIMEOUT_S = 5
CHECK_TIMEOUT_S = 15
UPLOAD_TIMEOUT_S = 120  # the longest wait for the Hub's next bytes during an upload


def check_repo_id(repo_id: str, option: str = "--push-to-hub") -> str:
    """``repo_id`` as the Hub accepts it (``name`` or ``namespace/name``); a
    :class:`UsageError` naming ``option`` and the fix otherwise."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        if not isinstance(repo_id, str) or not repo_id.strip("/") or repo_id.count("/") > 1:
            raise HFValidationError("give NAME or NAMESPACE/NAME")
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        reason = str(exc).split("\n")[0].rstrip(".")
        raise UsageError(f"{option} {repo_id}: not a valid Hugging Face repo id ({reason}); give NAMESPACE/NAME, "
                         "e.g. your-user/my-model (letters, digits, '-', '_', '.'; at most 96 characters)") from None
    return repo_id


def endpoint() -> str:
    """The Hub endpoint: ``HF_ENDPOINT`` as it is now (huggingface_hub reads it once, on import)."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _offline() -> bool:
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return bool(constants.HF_HUB_OFFLINE) or value in ("1", "ON", "YES", "TRUE")


class _Failure:
    """Builds the one-line failures of an upload of ``directory`` to ``repo_id``."""

    def __init__(self, directory: Path, repo_id: str):
        self.directory, self.repo_id = directory, repo_id

    def __call__(self, why: str) -> ExportError:
        return ExportError(f"upload to the Hub ({self.repo_id}) failed: {why}; the local export at {self.directory} "
                           f"is intact: upload it later with `lrr push {self.directory} {self.repo_id}`")


class _NotYet(_Failure):
    """The failures of the check made before an export starts (nothing exported yet)."""

    def __call__(self, why: str) -> ExportError:
        return ExportError(f"--push-to-hub {self.repo_id}: the upload cannot succeed: {why}; nothing was exported. "
                           f"Fix it, or export without --push-to-hub and upload later with `lrr push {self.directory} "
                           f"{self.repo_id}`")


def check_push(repo_id: str, out: Path, token: str | None = None) -> None:
    """Before an export with ``--push-to-hub``: the repo id, and what an upload needs that
    is known in seconds (online, a token, the endpoint reachable and accepting it), so a
    long merge is not spent on an upload that must fail."""
    check_repo_id(repo_id)
    fail = _NotYet(Path(out), repo_id)
    check_access(endpoint(), _checked_token(token, fail), fail)


def _checked_token(token: str | None, fail: _Failure) -> str:
    from huggingface_hub import get_token

    if _offline():
        raise fail("HF_HUB_OFFLINE is set (unset it to upload)")
    token = token or get_token()
    if not token:
        raise fail("no Hugging Face token: log in with `hf auth login` or set HF_TOKEN to a token with write access "
                   "(https://huggingface.co/settings/tokens)")
    return token


def check_access(url: str, token: str, fail: _Failure) -> str:
    """One ``whoami`` request to ``url`` (a short connect timeout, no retries): the
    endpoint is reachable and accepts the token. Returns the user name."""
    import httpx2
    from huggingface_hub.utils import build_hf_headers, get_session

    try:
        response = get_session().get(f"{url}/api/whoami-v2", headers=build_hf_headers(token=token),
                                     timeout=httpx2.Timeout(CHECK_TIMEOUT_S, connect=CONNECT_TIMEOUT_S))
    except (httpx2.HTTPError, OSError) as exc:
        raise fail(f"cannot reach {url} ({type(exc).__name__}: {exc or 'no answer'}); check the network "
                   "(or HF_ENDPOINT)") from None
    if response.status_code == 401:
        raise fail(f"{url} rejected the token (401 Unauthorized); log in again with `hf auth login --force` "
                   "or set HF_TOKEN to a valid token")
    if response.status_code != 200:
        raise fail(f"{url}/api/whoami-v2 answered {response.status_code} {response.reason_phrase}")
    try:
        return response.json().get("name") or "?"
    except ValueError:
        raise fail(f"{url} did not answer like a Hugging Face Hub (no JSON from /api/whoami-v2); check HF_ENDPOINT") from None


def _check_export_files(directory: Path) -> None:
    """What an upload reads of the export: its ``lrr_export.json`` (an object with the
    export's ``format``) and its model card (UTF-8 text); a damaged one is a
    :class:`~lowrank_runner.errors.RunFileError` naming it, before anything is uploaded."""
    fix = ("restore it from a copy, or export again from the run (lrr export RUN_DIR --merge|--adapter|--peft "
           "--out NEW_DIR)")
    path = directory / EXPORT_INFO
    info = read_json_file(path, "export's metadata", fix)
    if not isinstance(info, dict) or not isinstance(info.get("format"), str) or not info["format"]:
        raise RunFileError(f"{path}: not the metadata 'lrr export' writes (an object with the export's 'format'); "
                           f"the file is damaged: {fix}")
    card = directory / CARD_FILE
    try:
        if card.is_file():
            card.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RunFileError(f"{card}: not UTF-8 text (binary data at byte {exc.start}); the model card is damaged: "
                           f"{fix}") from None


def _operations(directory: Path, repo_id: str) -> list:
    """One commit's files: the export as it is, its model card naming the repo id where
    the local card names the export directory (the snippets then load from the Hub)."""
    from huggingface_hub import CommitOperationAdd

    ops = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        name = path.relative_to(directory).as_posix()
        content = path
        if name == CARD_FILE:
            content = path.read_text(encoding="utf-8").replace(LOCATION, repo_id).encode("utf-8")
        ops.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=content))
    return ops


def _first_line(exc: Exception) -> str:
    """An upload error in one line: the Hub's status and its own message when it sent one."""
    response, server = getattr(exc, "response", None), getattr(exc, "server_message", None)
    if response is not None and server:
        return f"{response.status_code} {response.reason_phrase}: {' '.join(str(server).split())}".rstrip(".")
    text = str(exc).strip().split("\n")[0] or type(exc).__name__
    return text.rstrip(".")


def push_export(directory, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Upload the finished export ``directory`` to the model repo ``repo_id`` (created if
    missing; ``private`` for a new one) in one commit. Returns the repo's URL. Fails fast
    with an :class:`ExportError` (the local export untouched) when offline, without a
    token, when the endpoint is unreachable, or when it rejects the token."""
    import httpx2
    from huggingface_hub import HfApi

    directory = Path(directory)
    check_repo_id(repo_id, "repo id")
    if not (directory / EXPORT_INFO).exists():
        raise UsageError(f"{directory}: not an export directory (no {EXPORT_INFO}); give a directory written by "
                         "`lrr export ... --out DIR`")
    _check_export_files(directory)
    fail = _Failure(directory, repo_id)
    token = _checked_token(token, fail)
    url = endpoint()
    check_access(url, token, fail)
    api = HfApi(endpoint=url, token=token)
    with _request_timeout():
        try:
            repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            api.create_commit(repo.repo_id, _operations(directory, repo.repo_id),
                              commit_message=f"Upload {directory.name} (lowrank-runner export)")
        except (httpx2.HTTPError, OSError, ValueError) as exc:
            raise fail(_first_line(exc)) from None
    return str(repo)


@contextmanager
def _request_timeout():
    """huggingface_hub's HTTP client waits forever by default: while uploading, every
    request gets a connect timeout and a timeout between bytes (a stalled server fails
    the upload instead of hanging it)."""
    import httpx2
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils._http import default_client_factory, hf_request_event_hook

    def bounded():
        return httpx2.Client(event_hooks={"request": [hf_request_event_hook]}, follow_redirects=True,
                             timeout=httpx2.Timeout(UPLOAD_TIMEOUT_S, connect=CONNECT_TIMEOUT_S))

    set_client_factory(bounded)
    try:
        yield
    finally:
        set_client_factory(default_client_factory)
