"""Asking the Hugging Face hub only when it answers: a quick probe before any hub call.

Without a network, huggingface_hub retries for a minute or more before it fails. Before
peftgen asks the hub for anything (a config, a tokenizer, a dataset) it opens one TCP
connection to the hub (or to the configured proxy) and waits at most
``PROBE_TIMEOUT_S``; when that fails, the caller answers at once with how to work
offline. When the probe succeeds, the hub calls run with short timeouts
(``quick_timeouts``). Standard library only: the analytic path stays torch-free.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from urllib.parse import urlsplit

PROBE_TIMEOUT_S = 2.0
"""How long the probe waits for the hub to accept a connection (DNS included)."""
HUB_TIMEOUTS_S = {"HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DOWNLOAD_TIMEOUT": "10"}
"""huggingface_hub's timeouts while peftgen asks it something, unless the user set them."""


TRANSFORMERS_OFFLINE_FLAGS = ("TRANSFORMERS_OFFLINE",)
"""transformers' own offline switch, next to huggingface_hub's (configs, tokenizers)."""
DATASETS_OFFLINE_FLAGS = ("HF_DATASETS_OFFLINE",)
"""datasets' own offline switch (hub datasets)."""


def hub_offline(library_flags: tuple[str, ...] = ()) -> bool:
    """The user said the hub is off limits: ``HF_HUB_OFFLINE``, or the reading library's
    own switch (``library_flags``), set to a true value as huggingface_hub reads one."""
    return any(
        os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
        for name in ("HF_HUB_OFFLINE", *library_flags)
    )


def _endpoint() -> tuple[str, int]:
    """Host and port the hub is reached through: a proxy when one is set, else HF_ENDPOINT."""
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        proxy = os.environ.get(name, "").strip()
        if proxy:
            parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
            if parts.hostname:
                return parts.hostname, parts.port or 8080
    parts = urlsplit(os.environ.get("HF_ENDPOINT", "").strip() or "https://huggingface.co")
    default_port = 80 if parts.scheme == "http" else 443
    return parts.hostname or "huggingface.co", parts.port or default_port


def _connect(host: str, port: int, timeout_s: float) -> None:
    """Open and close one TCP connection (raises OSError when it cannot)."""
    with socket.create_connection((host, port), timeout=timeout_s):
        pass


@cache
def hub_unreachable(timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the hub cannot be reached (in words), or None when it accepts a connection
    within ``timeout_s``. Asked once per process: every later hub call shares the answer."""
    host, port = _endpoint()
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            _connect(host, port, timeout_s)
        except OSError as error:
            outcome.append(error.strerror or str(error) or type(error).__name__)
        else:
            outcome.append(None)

    # A thread bounds the wait: name resolution ignores the socket timeout.
    thread = threading.Thread(target=probe, name="peftgen-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not outcome:
        return f"no answer from {host} within {timeout_s:g} s"
    reason = outcome[0]
    return None if reason is None else f"cannot connect to {host}: {reason}"


@contextmanager
def quick_timeouts() -> Iterator[None]:
    """Short huggingface_hub timeouts for the calls inside (those the user set are kept).

    huggingface_hub reads them into ``huggingface_hub.constants`` when it is imported, and
    its downloads read that module at call time: the environment covers an import inside
    the block, the module's attributes one that happened before."""
    added = [name for name in HUB_TIMEOUTS_S if name not in os.environ]
    constants = sys.modules.get("huggingface_hub.constants")
    previous = {name: getattr(constants, name, None) for name in added}
    for name in added:
        os.environ[name] = HUB_TIMEOUTS_S[name]
        if constants is not None:
            setattr(constants, name, int(HUB_TIMEOUTS_S[name]))
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)
            if constants is not None and previous[name] is not None:
                setattr(constants, name, previous[name])
