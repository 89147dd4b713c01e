"""Is the Hugging Face Hub reachable? Asked once per process, answered in about two seconds.

Without this, a machine with no network spends 30-90 s in the Hub clients' retries (printing retry
lines) before any message. `hub_reachable()` opens one TCP connection to the Hub endpoint (or the
HTTPS proxy) with a short timeout and caches the answer; HF_HUB_OFFLINE / HF_DATASETS_OFFLINE answer
it without any connection. When the Hub is unreachable, `use_cache_only()` switches huggingface_hub,
transformers and datasets to their offline mode, so what is already cached still loads and what is
not fails at once (and the callers say so in one line).
"""
from __future__ import annotations

import functools
import os
import socket
import sys
import threading
from urllib.parse import urlsplit

TIMEOUT_S = 2.0
_TRUE = ("1", "ON", "YES", "TRUE")


def offline_requested() -> bool:
    """The user asked for offline mode (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE)."""
    return any(os.environ.get(k, "").upper() in _TRUE for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _endpoint() -> tuple[str, int]:
    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    proxy_var = ("HTTPS_PROXY", "https_proxy") if url.scheme != "http" else ("HTTP_PROXY", "http_proxy")
    proxy = next((os.environ[k] for k in (*proxy_var, "ALL_PROXY", "all_proxy") if os.environ.get(k)), None)
    no_proxy = os.environ.get("NO_PROXY") or os.environ.get("no_proxy") or ""
    bypass = any(host == h.strip() or host.endswith("." + h.strip().lstrip(".")) for h in no_proxy.split(",") if h.strip())
    if proxy and not bypass:
        p = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        return p.hostname or host, p.port or 8080
    return host, port


@functools.lru_cache(maxsize=1)
def hub_reachable() -> bool:
    """One TCP connect (DNS included) within TIMEOUT_S; False when offline mode is requested."""
    if offline_requested():
        return False
    host, port = _endpoint()
    result: list[bool] = []

    def probe() -> None:           # in a thread: socket timeouts do not cover the DNS lookup
        try:
            socket.create_connection((host, port), timeout=TIMEOUT_S).close()
            result.append(True)
        except OSError:
            result.append(False)

    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(TIMEOUT_S + 0.5)
    return bool(result and result[0])


_SWITCHED_BY_US = False


def use_cache_only() -> None:
    """Switch the Hub libraries of this process to offline mode (cached files only, no retries)."""
    global _SWITCHED_BY_US
    _SWITCHED_BY_US = _SWITCHED_BY_US or not offline_requested()
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    from huggingface_hub import constants      # read at call time by huggingface_hub and transformers

    constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:                  # imported before: its config was read already
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True


def hub_or_cache() -> bool:
    """True when the Hub can be used; otherwise switch to cache-only mode and return False."""
    if hub_reachable():
        return True
    use_cache_only()
    return False


def why_offline() -> str:
    """'HF_HUB_OFFLINE is set' or 'the Hugging Face Hub is unreachable', for messages."""
    if offline_requested() and not _SWITCHED_BY_US:
        return "offline mode is set (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE)"
    return "the Hugging Face Hub is unreachable (no network)"


def dataset_maybe_cached(repo: str) -> bool:
    """False only when neither the Hub cache nor the datasets cache has anything of dataset `repo`
    (two folder checks, no import of `datasets`); True means 'perhaps', and loading decides."""
    from pathlib import Path

    from huggingface_hub import constants

    datasets_cache = os.environ.get("HF_DATASETS_CACHE") or os.path.join(constants.HF_HOME, "datasets")
    org, _, name = repo.rpartition("/")
    hub_dir = f"datasets--{org}--{name}" if org else f"datasets--{name}"
    ds_dir = f"{org}___{name}" if org else name
    return (Path(constants.HF_HUB_CACHE) / hub_dir).exists() or (Path(datasets_cache) / ds_dir).exists()
