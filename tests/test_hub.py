"""Uploading an export to the Hub: the repo id checked up front, every way the upload
cannot happen (offline, no token, no network, a rejected token, a refused repo) a one-line
error within seconds that leaves the export intact, and a real upload with
huggingface_hub against a small local server speaking the Hub's API (whoami, create
repo, validate the card's YAML, preupload, commit), which records what it received."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lowrank_runner.errors import ExportError, UsageError
from lowrank_runner.export.card import LOCATION
from lowrank_runner.export.hub import check_repo_id

GOOD_TOKEN = "hf_good_token"
REPO = "me/tiny-model"
# Each failure must come within seconds: a guard, well above what a fast failure takes.
GUARD_S = 30
STALL_S = 8


class FakeHub(BaseHTTPRequestHandler):
    """The endpoints huggingface_hub's whoami, create_repo and create_commit call."""

    received: dict = {}

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _authorized(self) -> bool:
        if self.headers.get("authorization") == f"Bearer {GOOD_TOKEN}":
            return True
        self._send(401, {"error": "Invalid credentials in Authorization header"})
        return False

    def do_GET(self):
        if self._authorized() and self.path == "/api/whoami-v2":
            self._send(200, {"type": "user", "name": "me"})
        elif self.path != "/api/whoami-v2":
            self._send(404, {"error": "not found"})

    def do_POST(self):
        body = self._body()
        if not self._authorized():
            return
        host = f"http://{self.headers['Host']}"
        if self.path == "/api/repos/create":
            payload = json.loads(body)
            self.received["create"] = payload
            if payload["name"] == "stalled":  # a Hub that accepts the request and never answers in time
                time.sleep(STALL_S)
            if payload["name"] == "forbidden":
                return self._send(403, {"error": "You don't have the rights to create a model under this namespace"})
            return self._send(200, {"url": f"{host}/{payload['organization']}/{payload['name']}", "name": payload["name"]})
        if self.path == "/api/validate-yaml":
            self.received["validated"] = json.loads(body)["content"]
            return self._send(200, {})
        if "/preupload/" in self.path:
            files = json.loads(body)["files"]
            return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                              for f in files]})
        if "/commit/" in self.path:
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            self.received["commit_path"] = self.path
            self.received["files"] = {v["value"]["path"]: base64.b64decode(v["value"]["content"])
                                      for v in lines if v["key"] == "file"}
            return self._send(200, {"commitUrl": f"{host}/{REPO}/commit/{'0' * 40}", "commitOid": "0" * 40,
                                    "pullRequestUrl": None})
        self._send(404, {"error": f"not found: {self.path}"})


@pytest.fixture
def hub():
    FakeHub.received = {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", FakeHub.received
    server.shutdown()
    server.server_close()


@pytest.fixture
def export_dir(tmp_path):
    """A finished export as the upload sees one (files written by an export, a card)."""
    from lowrank_runner.export.card import write_model_card

    directory = tmp_path / "export"
    (directory / "sub").mkdir(parents=True)
    info = {"format": "merged-transformers", "source_run": str(tmp_path / "no-run"), "recipe_hash": "abc123",
            "config_hash": "abc123", "method": {"name": "lora", "r": 2}, "backbone": {"name": "models/bert"},
            "model_class": "AutoModelForSequenceClassification", "max_abs_logit_diff": 0.0}
    (directory / "lrr_export.json").write_text(json.dumps(info))
    (directory / "model.safetensors").write_bytes(b"\x00\x01weights")
    (directory / "sub" / "extra.txt").write_text("extra")
    write_model_card(directory, info)
    return directory


def snapshot(directory) -> dict:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def push(directory, tmp_path, repo=REPO, private=False, **env):
    """push_export in a fresh process (huggingface_hub reads its settings on import),
    with no saved login and only the given environment; (exit code, output)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    environment.update(HF_HOME=str(tmp_path / "hf-home"), **env)
    code = ("import sys\nfrom lowrank_runner.errors import LrrError\nfrom lowrank_runner.export.hub import push_export\n"
            f"try:\n    print(push_export({str(directory)!r}, {repo!r}, private={private}))\n"
            "except LrrError as e:\n    print(e)\n    sys.exit(e.exit_code)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment,
                          timeout=GUARD_S)
    return proc.returncode, proc.stdout + proc.stderr


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("repo_id", ["bad id", "a/b/c", "", "-start/name", "me/" + "x" * 97, "me/a--b"])
def test_a_bad_repo_id_is_refused_up_front(repo_id):
    with pytest.raises(UsageError, match=r"--push-to-hub .*not a valid Hugging Face repo id.*give NAMESPACE/NAME"):
        check_repo_id(repo_id)
    assert check_repo_id("me/my-model.v2_1") == "me/my-model.v2_1" and check_repo_id("model") == "model"


@pytest.mark.parametrize("case", ["offline", "no-token", "unreachable", "rejected-token", "forbidden-namespace"])
def test_an_upload_that_cannot_happen_fails_fast_and_keeps_the_export(case, hub, export_dir, tmp_path):
    url, received = hub
    env, repo, expected = {
        "offline": ({"HF_HUB_OFFLINE": "1", "HF_TOKEN": GOOD_TOKEN, "HF_ENDPOINT": url}, REPO, "HF_HUB_OFFLINE is set"),
        "no-token": ({"HF_ENDPOINT": url}, REPO, "no Hugging Face token: log in with `hf auth login` or set HF_TOKEN"),
        "unreachable": ({"HF_TOKEN": GOOD_TOKEN, "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}, REPO,
                        "cannot reach http://127.0.0.1:"),
        "rejected-token": ({"HF_TOKEN": "hf_wrong", "HF_ENDPOINT": url}, REPO, "rejected the token (401 Unauthorized)"),
        "forbidden-namespace": ({"HF_TOKEN": GOOD_TOKEN, "HF_ENDPOINT": url}, "me/forbidden",
                                "You don't have the rights to create a model under this namespace"),
    }[case]
    before = snapshot(export_dir)
    code, output = push(export_dir, tmp_path, repo=repo, **env)
    assert code == 1, output
    assert "Traceback" not in output and len(output.strip().splitlines()) == 1, output
    assert expected in output
    assert f"the local export at {export_dir} is intact: upload it later with `lrr push {export_dir} {repo}`" in output
    assert snapshot(export_dir) == before
    assert "files" not in received  # nothing was committed


def test_a_stalled_upload_times_out_instead_of_hanging(hub, export_dir, tmp_path, monkeypatch):
    import lowrank_runner.export.hub as hub_module

    url, _ = hub
    monkeypatch.setattr(hub_module, "UPLOAD_TIMEOUT_S", 1)
    monkeypatch.setenv("HF_TOKEN", GOOD_TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", url)
    started = time.monotonic()
    with pytest.raises(ExportError, match=r"upload to the Hub \(me/stalled\) failed: .*is intact"):
        hub_module.push_export(export_dir, "me/stalled")
    assert time.monotonic() - started < STALL_S  # the request timed out; it did not wait for the server


def test_lrr_export_push_checks_before_exporting(tmp_path):
    """Offline: --push-to-hub fails in seconds before the export starts (nothing written)."""
    code, output = lrr_process("export", tmp_path / "no-such-run", "--merge", "--out", tmp_path / "out",
                               "--push-to-hub", REPO, tmp_path=tmp_path, HF_HUB_OFFLINE="1", HF_TOKEN=GOOD_TOKEN)
    assert code == 1 and "HF_HUB_OFFLINE is set" in output and "nothing was exported" in output, output
    assert not (tmp_path / "out").exists()


def test_an_export_uploads_to_the_hub(hub, export_dir, tmp_path):
    url, received = hub
    before = snapshot(export_dir)
    code, output = push(export_dir, tmp_path, private=True, HF_TOKEN=GOOD_TOKEN, HF_ENDPOINT=url)
    assert code == 0, output
    assert output.strip().splitlines()[-1] == f"{url}/{REPO}"
    assert received["create"] == {"name": "tiny-model", "organization": "me", "visibility": "private", "type": "model"}
    assert received["commit_path"] == f"/api/models/{REPO}/commit/main"
    assert set(received["files"]) == set(before)  # every file, sub-folders included
    assert all(received["files"][name] == before[name] for name in before if name != "README.md")
    card = received["files"]["README.md"].decode()
    assert card == before["README.md"].decode().replace(LOCATION, REPO)  # the hub's card loads from the repo
    assert f'from_pretrained("{REPO}")' in card and received["validated"] == card
    assert snapshot(export_dir) == before  # the local card still names the local export


def lrr_process(*args, tmp_path, **env):
    """``lrr ARGS`` in a fresh process with no saved login and only the given HF_* settings."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    environment.update(HF_HOME=str(tmp_path / "hf-home"), **env)
    proc = subprocess.run([sys.executable, "-m", "lowrank_runner", *map(str, args)], capture_output=True, text=True,
                          env=environment, timeout=120)
    return proc.returncode, proc.stdout + proc.stderr


def test_a_bad_repo_id_stops_lrr_export_before_any_work(tmp_path):
    from typer.testing import CliRunner

    from lowrank_runner.cli import app

    result = CliRunner().invoke(app, ["export", str(tmp_path / "no-run"), "--merge", "--out", str(tmp_path / "out"),
                                      "--push-to-hub", "bad id"])
    assert result.exit_code == 2 and "--push-to-hub bad id: not a valid Hugging Face repo id" in result.output
    assert not (tmp_path / "out").exists()


def test_lrr_export_push_without_network_keeps_the_export_and_lrr_push_uploads_it(hub, tiny_recipe, tmp_path):
    """The issue's scenario. Without a network, --push-to-hub fails in seconds before any
    export work (nothing to undo); an upload refused after the export keeps the verified
    export in place, and `lrr push` uploads the same directory later."""
    from typer.testing import CliRunner

    from lowrank_runner.cli import app

    result = CliRunner().invoke(app, ["run", str(tiny_recipe()), "--output", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    out = tmp_path / "peft"
    code, output = lrr_process("export", tmp_path / "run", "--peft", "--out", out, "--push-to-hub", REPO,
                               tmp_path=tmp_path, HF_TOKEN=GOOD_TOKEN, HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}")
    assert code == 1, output
    assert f"error: --push-to-hub {REPO}: the upload cannot succeed: cannot reach" in output and "Traceback" not in output
    assert "nothing was exported" in output and not out.exists()
    url, received = hub
    code, output = lrr_process("export", tmp_path / "run", "--peft", "--out", out, "--push-to-hub", "me/forbidden",
                               tmp_path=tmp_path, HF_TOKEN=GOOD_TOKEN, HF_ENDPOINT=url)
    assert code == 1 and "upload to the Hub (me/forbidden) failed" in output, output
    assert f"upload it later with `lrr push {out} me/forbidden`" in output
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "lrr_export.json"} <= {
        p.name for p in out.iterdir()}
    code, output = lrr_process("push", out, REPO, "--private", tmp_path=tmp_path, HF_TOKEN=GOOD_TOKEN, HF_ENDPOINT=url)
    assert code == 0, output
    assert f"{url}/{REPO}" in output and received["create"]["visibility"] == "private"
    assert set(received["files"]) == {p.name for p in out.iterdir()}
    assert received["files"]["adapter_model.safetensors"] == (out / "adapter_model.safetensors").read_bytes()
