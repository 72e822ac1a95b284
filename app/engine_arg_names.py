"""The names a model's `engine_args` may use (vLLM's engine and OpenAI-server arguments), for the build-time check.

Reading them imports vLLM's server (about 12 s of a core on a 2-core machine), on the path of every `serve run` and
`serve deploy` before any replica starts. So they are kept in vLLM's cache folder (`VLLM_CACHE_ROOT`, else
`~/.cache/vllm`), one file per installed vLLM distribution and version: only the first build after an install reads
them from vLLM.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Callable, Mapping

from app.backend import installed_vllm

CACHE_FOLDER = "llm-serve-app"


def known_engine_arg_names(read: Callable[[], set[str]] | None = None,
                           environ: Mapping[str, str] = os.environ) -> frozenset[str]:
    """The names, from the cache file where it holds them, else from vLLM (`read`), then kept there."""
    path = cache_file(environ)
    if path is not None:
        try:
            return frozenset(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            pass  # not there yet, or unreadable: read them from vLLM
    names = frozenset((read or _from_vllm)())
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f"{path.name}.{os.getpid()}")  # whole files only: builds may run at once
            partial.write_text(json.dumps(sorted(names)))
            partial.replace(path)
        except OSError:
            pass  # a read-only cache: the next build reads them from vLLM again
    return names


def cache_file(environ: Mapping[str, str] = os.environ) -> pathlib.Path | None:
    """Where the names of the installed vLLM are kept (None: no vLLM installed)."""
    found = installed_vllm()
    if found is None:
        return None
    dist, version = found
    return vllm_cache_root(environ) / CACHE_FOLDER / f"engine-arg-names-{dist}-{version}.json"


def vllm_cache_root(environ: Mapping[str, str] = os.environ) -> pathlib.Path:
    """vLLM's cache folder, as vLLM itself finds it (without importing vLLM)."""
    if environ.get("VLLM_CACHE_ROOT"):
        return pathlib.Path(environ["VLLM_CACHE_ROOT"]).expanduser()
    return pathlib.Path(environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "vllm"


def _from_vllm() -> set[str]:
    from app.vllm_api import known_argument_names

    return known_argument_names()
