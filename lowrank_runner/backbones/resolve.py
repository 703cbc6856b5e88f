"""Where a backbone is (``backbone.name``: a hub id, a local directory, ``pkg:``), and
its files read as untrusted input: ``config.json`` and ``tokenizer_config.json`` parsed
here (JSON errors with line and column), an ``auto_map`` (custom code) refused unless the
recipe sets ``backbone.trust_remote_code: true``, a hub that cannot be reached said in
seconds with the ``hf download`` to run instead."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lowrank_runner.errors import BackboneError, BackboneUnavailable
from lowrank_runner.hub import hub_unreachable
from lowrank_runner.resources import expand_user, is_pkg_path, resolve_pkg_path

TRUST_KEY = "backbone.trust_remote_code"
CONFIG_FILE = "config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


@dataclass(frozen=True)
class BackboneRef:
    name: str  # as written in the recipe
    location: str  # local directory or hub id, as passed to from_pretrained
    local: bool
    revision: str | None = None
    trust_remote_code: bool = False  # backbone.trust_remote_code: run the directory's own Python code

    def describe(self) -> str:
        return self.location if self.local else f"{self.location}@{self.revision or 'main'} (hub)"


def resolve(backbone: dict, need_config: bool = True) -> BackboneRef:
    """Where ``backbone.name`` points. ``need_config=False``: a tokenizer-only directory."""
    name = backbone["name"]
    trust = bool(backbone.get("trust_remote_code", False))
    if is_pkg_path(name):
        try:
            path = resolve_pkg_path(name)
        except ValueError as exc:
            raise BackboneError(f"backbone.name {name}: {exc}") from None
        return _local_ref(name, path, trust, need_config)
    local = expand_user(name)
    if local.exists() or not _is_hub_id(name):
        return _local_ref(name, local, trust, need_config)
    ref = BackboneRef(name, name, False, backbone.get("revision"), trust)
    _ensure_hub_reachable(ref)
    return ref


def _is_hub_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _local_ref(name: str, path: Path, trust: bool, need_config: bool) -> BackboneRef:
    if not path.exists():
        raise BackboneError(f"backbone.name {name}: no such directory (nor a Hugging Face hub id such as "
                            "microsoft/deberta-v3-base); point it at a model directory holding config.json")
    if not path.is_dir():
        raise BackboneError(f"backbone.name {name}: {path} is a file, not a directory; point it at the directory "
                            "holding config.json, the weights and the tokenizer")
    if need_config and not (path / CONFIG_FILE).is_file():
        what = "is empty" if not any(path.iterdir()) else "holds no config.json"
        raise BackboneError(f"backbone.name {name}: the directory {what}; point it at a model directory "
                            "(config.json, model.safetensors, tokenizer files)")
    return BackboneRef(name, str(path), True, None, trust)


def _hub_help(ref: BackboneRef, why: str) -> str:
    return (
        f"backbone '{ref.name}' is not a local directory and the Hugging Face hub cannot be used ({why}). "
        f"Download it where there is a network (e.g. `hf download {ref.name} --local-dir models/{ref.name.split('/')[-1]}`) "
        f"and point the recipe at that directory: --set backbone.name=models/{ref.name.split('/')[-1]}"
    )


def _in_cache(ref: BackboneRef) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(ref.location, "config.json", revision=ref.revision)
    return isinstance(found, str)


def _ensure_hub_reachable(ref: BackboneRef, timeout: float = 3.0) -> None:
    """Fail in seconds (not after minutes of retries) when the hub cannot be reached."""
    if _in_cache(ref):
        return
    why = hub_unreachable(timeout)
    if why is not None:
        if why.startswith("HF_HUB_OFFLINE"):
            why += " and the model is not in the local cache"
        raise BackboneUnavailable(_hub_help(ref, why))


# --- reading the directory's JSON files ourselves (no code, positions in messages) -----------

def backbone_file(ref: BackboneRef, filename: str) -> Path | None:
    """The backbone's ``filename`` on disk (a hub file from the cache or the hub), None if absent."""
    if ref.local:
        path = Path(ref.location) / filename
        return path if path.is_file() else None
    from transformers.utils import cached_file

    try:
        found = cached_file(ref.location, filename, revision=ref.revision,
                            _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False)
    except OSError as exc:
        raise BackboneError(f"backbone '{ref.name}': cannot fetch {filename} from {ref.describe()}: {one_line(exc)}") from None
    return Path(found) if found else None


def shown_path(ref: BackboneRef, path: Path) -> str:
    return str(path) if ref.local else f"{ref.describe()}: {path.name}"


def read_json(path: Path, where: str | None = None) -> dict:
    """A JSON object from ``path``; a clear error with line and column otherwise."""
    where = where or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise BackboneError(f"{where}: not UTF-8 text (is it a JSON file?); restore it from the model's source") from None
    except OSError as exc:
        raise BackboneError(f"{where}: cannot read ({exc.strerror or exc})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BackboneError(f"{where}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg}); "
                            "fix the file or restore it from the model's source") from None
    if not isinstance(data, dict):
        raise BackboneError(f"{where}: expected a JSON object ({{...}}), found a {type(data).__name__}")
    return data


def read_config_dict(ref: BackboneRef) -> dict:
    """``config.json`` as a dict, checked: no custom code unless trusted, a known ``model_type``."""
    path = backbone_file(ref, CONFIG_FILE)
    if path is None:
        raise BackboneError(f"backbone '{ref.name}': {ref.describe()} has no {CONFIG_FILE}"
                            f"{'' if ref.local else ' (or it could not be downloaded)'}")
    where = shown_path(ref, path)
    data = read_json(path, where)
    refuse_custom_code(ref, data, where)
    model_type = data.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise BackboneError(f"{where}: no model_type (e.g. \"model_type\": \"bert\"); transformers needs it to "
                            "know the architecture: restore config.json from the model's source")
    if not (ref.trust_remote_code and "auto_map" in data) and not _known_model_type(model_type):
        import transformers

        raise BackboneError(f"{where}: model_type '{model_type}' is not an architecture transformers "
                            f"{transformers.__version__} knows; upgrade transformers or fix config.json")
    return data


def _known_model_type(model_type: str) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return model_type in CONFIG_MAPPING_NAMES


def refuse_custom_code(ref: BackboneRef, data: dict, where: str) -> None:
    """``auto_map`` names Python files of the model directory that transformers would
    import: refused unless the recipe sets backbone.trust_remote_code: true."""
    auto_map = data.get("auto_map")
    if not auto_map or ref.trust_remote_code:
        return
    modules = sorted({name.rsplit(".", 1)[0].split("--")[-1] + ".py" for name in _strings(auto_map)})
    model_type = data.get("model_type")
    builtin = (f", or delete auto_map from {Path(where).name} to use transformers' own '{model_type}' code"
               if isinstance(model_type, str) and _known_model_type(model_type) else "")
    raise BackboneError(
        f"{where}: auto_map asks to run Python code from the model ({', '.join(modules) or 'custom code'}); lrr runs no "
        f"code from model files unless the recipe sets {TRUST_KEY}: true (read that code first){builtin}"
    )


def _strings(value) -> list[str]:
    """Every string in a nested JSON value (auto_map: a mapping, or lists of class paths)."""
    if isinstance(value, str):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    return [s for item in items for s in _strings(item)]


def one_line(exc: BaseException, limit: int = 400) -> str:
    """An exception's message on one line, at most ``limit`` characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + " ..."
