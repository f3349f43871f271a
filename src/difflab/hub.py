"""Hugging Face Hub ids: when a name means a Hub repository, and fetching only the files a loader reads.

A name is a Hub id only when it looks like ``owner/name``, is no local path, and its first part is no local folder
either, nor ``runs`` (difflab's own run folder: ``runs/digits`` in a fresh directory is a run not trained yet, never
a download). Everything is fetched into the Hugging Face cache with ``huggingface_hub``; any failure (offline, an
unknown or private repository) is one line.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from difflab.errors import DifflabError

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name
LOCAL_ROOTS = ("runs",)                            # first parts that always mean a local folder


def is_hub_id(name: str | Path) -> bool:
    """Whether ``name`` names a Hub repository rather than a local path (module doc)."""
    text = str(name)
    first = text.split("/")[0]
    return (bool(HUB_ID.fullmatch(text)) and not Path(text).exists() and first not in LOCAL_ROOTS
            and not Path(first).exists())


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def download(repo: str, *, allow: list[str] | Callable[[list[str]], list[str]], what: str) -> Path:
    """The local snapshot of ``repo`` with only the files ``allow`` names: a list of glob patterns, or a function of
    the repository's file list that returns them (to look before fetching gigabytes). ``what`` names what was
    expected there, for the error message."""
    try:
        import huggingface_hub
    except ImportError:
        raise DifflabError(f"no local folder '{repo}', and huggingface_hub is not installed to download it as a Hub "
                           "id: pip install 'difflab[diffusers]'") from None
    try:
        patterns = allow if isinstance(allow, list) else allow(huggingface_hub.list_repo_files(repo))
        return Path(huggingface_hub.snapshot_download(repo, allow_patterns=patterns))
    except DifflabError:
        raise
    except Exception as error:  # network, authentication, offline mode, unknown repository: all one line
        raise DifflabError(f"no local folder '{repo}', and downloading it from the Hugging Face Hub failed "
                           f"({_first_line(error)}): download {what} and pass its folder") from None
