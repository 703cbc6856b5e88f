"""The Hugging Face Hub, as lrr uses it: whether it can be reached now, said in seconds
(before a library spends minutes retrying), for backbones and hub datasets alike."""

from __future__ import annotations

import socket
from urllib.parse import urlparse


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be used now (offline mode, or its endpoint does not
    answer within ``timeout`` seconds), or None."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"{host} unreachable: {exc}"
