"""The conditioning contract (tutorial §6 "条件生成"): what a model is conditioned on, and who makes it.

``cond`` is what a denoiser's third argument receives:

    None                                  unconditional
    a batch-first tensor                  class labels (N,) long
    a small mapping of batch-first ones   e.g. {"tokens": (N, L, D), "mask": (N, L)} for text

The helpers below slice, concatenate, expand and move any of these, so samplers, guidance, sharded sampling
and the training loop pass cond along without looking inside it.

A **conditioner** turns user input (a class name, later a prompt) into cond, and owns the two things
classifier-free guidance needs: the *null* condition, and the training-time *dropout* that replaces a
fraction of the conditions by it (Ho & Salimans 2022, Algorithm 1, p_uncond; DiT's ``token_drop``), so
one network learns both D(x, sigma, y) and D(x, sigma, null). The network turns cond into what its blocks
use (:meth:`difflab.nn.UNet.forward`: a class embedding added to the time embedding).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, Union

import torch

from difflab.errors import DifflabError

Cond = Union[torch.Tensor, Mapping[str, torch.Tensor], None]


def cond_map(fn: Callable[[torch.Tensor], torch.Tensor], cond: Cond) -> Cond:
    """Apply ``fn`` to every tensor of a cond (None stays None)."""
    if cond is None:
        return None
    if isinstance(cond, Mapping):
        return {k: fn(v) for k, v in cond.items()}
    return fn(cond)


def cond_len(cond: Cond) -> int | None:
    """The batch size of a cond (None for None)."""
    if cond is None:
        return None
    if isinstance(cond, Mapping):
        sizes = {len(v) for v in cond.values()}
        if len(sizes) != 1:
            raise DifflabError(f"the parts of a condition disagree on the batch size: {sorted(sizes)}")
        return sizes.pop()
    return len(cond)


def cond_slice(cond: Cond, start: int, stop: int) -> Cond:
    """Examples ``start:stop`` of a cond."""
    return cond_map(lambda v: v[start:stop], cond)


def cond_index(cond: Cond, index: torch.Tensor | slice) -> Cond:
    """The examples of a cond picked by an index tensor (or a slice)."""
    return cond_map(lambda v: v[index], cond)


def cond_to(cond: Cond, device: torch.device | str) -> Cond:
    return cond_map(lambda v: v.to(device), cond)


def cond_expand(cond: Cond, n: int) -> Cond:
    """A cond of batch size 1 (e.g. a null condition) repeated to batch size ``n`` (a view, no copy)."""
    return cond_map(lambda v: v.expand(n, *v.shape[1:]), cond)


def cond_repeat_interleave(cond: Cond, k: int) -> Cond:
    """Each example ``k`` times in a row: [a, b] -> [a, a, b, b] for k = 2."""
    return cond_map(lambda v: v.repeat_interleave(k, dim=0), cond)


def cond_cat(conds: list[Cond]) -> Cond:
    """Concatenate conds along the batch; all must be tensors, or mappings with the same keys."""
    first = conds[0]
    if first is None:
        return None
    if isinstance(first, Mapping):
        return {k: torch.cat([c[k] for c in conds]) for k in first}
    return torch.cat(list(conds))


# ---------------------------------------------------------------------------------------------------------
# Class labels


def parse_classes(spec: str | int | list | tuple, class_names: list[str]) -> list[int]:
    """Class indices from what a user typed: an index ("3"), a name ("sandal"), a comma list ("0,2,sandal")
    or "all". A name wins over an index (a folder class called "3" need not be index 3). One-line errors."""
    names = [c.lower() for c in class_names]
    items = spec if isinstance(spec, (list, tuple)) else [spec] if isinstance(spec, int) else str(spec).split(",")
    labels = []
    for item in (str(i).strip().lower() for i in items):
        if not item:
            raise DifflabError("an empty class name: give a class index, a name, a comma list or 'all'")
        if item == "all":
            labels.extend(range(len(names)))
        elif item in names:
            labels.append(names.index(item))
        elif item.isascii() and item.isdigit() and int(item) < len(names):
            labels.append(int(item))
        else:
            raise DifflabError(f"unknown class '{item}' (the model's classes: "
                               f"{', '.join(f'{i}={c}' for i, c in enumerate(class_names))})")
    return labels


class ClassConditioner:
    """Class labels as cond: a long tensor (N,) of indices 0..K-1; index K is the learned null class (an extra
    row of the U-Net's class embedding). ``dropout`` is the training-time p_uncond."""

    kind = "class"

    def __init__(self, class_names: list[str], dropout: float = 0.1):
        if not class_names:
            raise DifflabError("a class conditioner needs at least one class")
        if not 0.0 <= dropout < 1.0:
            raise DifflabError(f"--label-dropout must lie in [0, 1), got {dropout}")
        self.class_names, self.dropout = [str(c) for c in class_names], float(dropout)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def trained_null(self) -> bool:
        """Whether the null condition was trained (dropout > 0): only then is guidance meaningful."""
        return self.dropout > 0

    def null(self, n: int = 1, device: torch.device | str | None = None) -> torch.Tensor:
        """The null condition for ``n`` examples: the label K."""
        return torch.full((n,), self.num_classes, dtype=torch.long, device=device)

    def drop(self, cond: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Replace each label by the null label with probability ``dropout`` (one draw per example from
        ``generator``, even at dropout 0, so the random stream does not depend on the rate)."""
        drop = torch.rand(cond.shape[0], generator=generator, device=cond.device) < self.dropout
        return torch.where(drop, self.num_classes, cond)

    def parse(self, spec: str | int | list | tuple) -> torch.Tensor:
        """User input ("3", "sandal", "0,7", "all") -> labels (M,)."""
        return torch.tensor(parse_classes(spec, self.class_names), dtype=torch.long)

    def grid(self, n: int) -> tuple[torch.Tensor, int]:
        """Conds for a sample grid of about ``n`` images with one row per class, and the row length."""
        per_row = max(1, n // self.num_classes)
        return torch.arange(self.num_classes).repeat_interleave(per_row), per_row

    def balanced(self, n: int) -> torch.Tensor:
        """``n`` labels cycling through the classes (an evaluation set with every class equally often)."""
        return torch.arange(n) % self.num_classes

    def config(self) -> dict:
        return {"kind": self.kind, "class_names": self.class_names, "dropout": self.dropout}


def conditioner_from_config(config: dict | None) -> ClassConditioner | None:
    """Rebuild the conditioner a model config describes (None: unconditional)."""
    if config is None:
        return None
    if config.get("kind") == ClassConditioner.kind:
        return ClassConditioner(config["class_names"], config.get("dropout", 0.1))
    raise DifflabError(f"unknown conditioner kind {config.get('kind')!r} in the model config")
