"""The Hugging Face Hub, asked only when it can answer.

A model, tokenizer or dataset named by its hub id (``owner/name``) loads from the Hub, or from the local cache
when the Hub cannot be reached. Whether it can is known once per process, in at most ``PROBE_TIMEOUT`` seconds:
an offline variable (``HF_HUB_OFFLINE=1``; ``TRANSFORMERS_OFFLINE`` for models, ``HF_DATASETS_OFFLINE`` for
datasets) says so, else one HEAD request to the endpoint (``HF_ENDPOINT``, through the proxies huggingface_hub
uses) finds out. Without this, huggingface_hub retries a missing network for about 50 s before transformers
gives up with a traceback; with it, a source that is neither reachable nor cached fails at once, naming the id
and how to point at a local copy.
"""

from __future__ import annotations

import os
from functools import lru_cache

PROBE_TIMEOUT = 5.0
OFFLINE_VARS = {"model": ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"),
                "dataset": ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
TRUE = ("1", "ON", "YES", "TRUE")


def offline_by_choice(kind: str = "model") -> str | None:
    """The offline variable that is set ('HF_HUB_OFFLINE=1'), or None."""
    for var in OFFLINE_VARS[kind]:
        if os.environ.get(var, "").upper() in TRUE:
            return f"{var}={os.environ[var]}"
    return None


@lru_cache(maxsize=None)
def _probe() -> str | None:
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=PROBE_TIMEOUT)  # any answer, even an error status, will do
    except Exception as e:  # noqa: BLE001  whatever stops the request: DNS, refused, timeout, proxy, TLS
        return f"{constants.ENDPOINT} cannot be reached: {type(e).__name__}: {e}"
    return None


def unreachable(kind: str = "model") -> str | None:
    """Why the Hub cannot be asked ('HF_HUB_OFFLINE=1', 'https://huggingface.co cannot be reached: ...'), or None
    when it can. ``kind``: model (a model or tokenizer) or dataset, for the offline variables that apply."""
    return offline_by_choice(kind) or _probe()


def cached(repo: str, filenames: tuple[str, ...], revision: str | None = None) -> bool:
    """Whether any of ``filenames`` of model repo ``repo`` (at ``revision``) is in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return any(isinstance(try_to_load_from_cache(repo, f, revision=revision), str) for f in filenames)
    except ValueError:  # not a valid repo id ('a b', 'a/b/c'): nothing of it can be cached
        return False


def cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE
