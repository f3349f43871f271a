"""The conditioning contract (tutorial §6 "条件生成"): what a model is conditioned on, and who makes it.

``cond`` is what a denoiser's third argument receives:

    None                                  unconditional
    a batch-first tensor                  class labels (N,) long
    a small mapping of batch-first ones   e.g. {"tokens": (N, L, D), "mask": (N, L)} for text

The helpers below slice, concatenate, expand and move any of these, so samplers, guidance, sharded sampling
and the training loop pass cond along without looking inside it.

A **conditioner** turns user input (a class name: :class:`ClassConditioner`; a prompt: :class:`TextConditioner`)
into cond, and owns the two things classifier-free guidance needs: the *null* condition (the null class, the empty
prompt), and the training-time *dropout* that replaces a fraction of the conditions by it (Ho & Salimans 2022,
Algorithm 1, p_uncond; DiT's ``token_drop``), so one network learns both D(x, sigma, y) and D(x, sigma, null). The
network turns cond into what its blocks use (:meth:`difflab.nn.UNet.forward`: a class embedding added to the time
embedding; token vectors that its cross-attention reads).
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping
from typing import Callable, Union

import torch
from tqdm.auto import tqdm

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
        if any(not isinstance(c, Mapping) or set(c) != set(first) for c in conds):
            raise DifflabError(f"conditions of different kinds cannot be batched together (keys {sorted(first)} vs "
                               f"{[sorted(c) if isinstance(c, Mapping) else type(c).__name__ for c in conds]})")
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


# ---------------------------------------------------------------------------------------------------------
# Prompts (tutorial §6; Rombach et al. 2022 §3.3; Saharia et al. 2022): a text encoder turns each prompt into L token
# vectors and a mask of the real (unpadded) ones; the U-Net's cross-attention reads them. Every prompt is padded to
# the encoder's fixed length L, so the conds of any prompts (and the empty prompt) concatenate.


def check_prompts(prompts) -> list[str]:
    """A list of prompt strings (one-line error otherwise); "" is the empty prompt, the null condition."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise DifflabError("prompts must be a non-empty list of strings")
    return prompts


def read_prompts(path: str) -> list[str]:
    """One prompt per non-empty line of a UTF-8 text file (one-line errors)."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark (Windows editors) is not a prompt
            prompts = [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError:
        raise DifflabError(f"the prompts file '{path}' is not UTF-8 text") from None
    except OSError as e:
        raise DifflabError(f"cannot read the prompts file '{path}': {e.strerror}") from None
    if not prompts:
        raise DifflabError(f"the prompts file '{path}' holds no prompts (one per line)")
    return prompts


class TextConditioner:
    """Prompts as cond: ``{"tokens": (N, L, D) float, "mask": (N, L) bool}`` from a text encoder
    (:mod:`difflab.nn.text`). The null condition is the empty prompt "" (what classifier-free guidance subtracts;
    a negative prompt takes its place); ``dropout`` is the training-time fraction of captions replaced by it.

    A frozen encoder (the pretrained MiniLM, any Hugging Face encoder) lives here and is never trained: training
    encodes every caption once (:func:`text_cache`). A from-scratch encoder is part of the U-Net, which learns it;
    training then feeds token ids (``{"ids", "mask"}``) that the U-Net encodes, and sampling encodes each prompt
    once with the network's own (EMA) encoder. Either way a prompt is encoded once per sampling call, and its
    tokens are reused at every sampler step and in both halves of guidance."""

    kind = "text"

    def __init__(self, encoder, dropout: float = 0.1, prompts: list[str] | None = None):
        if not 0.0 <= dropout < 1.0:
            raise DifflabError(f"--caption-dropout must lie in [0, 1), got {dropout}")
        self.encoder, self.dropout = encoder, float(dropout)
        self.prompts = list(prompts or [])  # the fixed prompts of training-time sample grids
        self._null: dict = {}  # device -> the empty prompt's cond (a frozen encoder) or token ids (a trained one)

    @property
    def trained_null(self) -> bool:
        return self.dropout > 0

    @property
    def in_unet(self) -> bool:
        """Whether the encoder is the U-Net's own, trained with it (its weights are in the checkpoint)."""
        return bool(self.encoder.trainable)

    def encode(self, prompts, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Prompts -> ``{"tokens": (N, L, D) float32, "mask": (N, L) bool}`` (no gradients)."""
        was_training = self.encoder.training
        self.encoder.eval()
        try:
            out = self.encoder.encode(check_prompts(prompts), device=device)
        finally:
            self.encoder.train(was_training)
        return {"tokens": out.tokens.float(), "mask": out.mask.bool()}

    def parse(self, prompts) -> dict[str, torch.Tensor]:
        """User input (a prompt or a list of them) -> cond, on the encoder's device."""
        return self.encode(prompts)

    def null(self, n: int = 1, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """The empty prompt's cond for ``n`` examples (encoded once for a frozen encoder)."""
        key = str(device)
        null = self._null.get(key)
        if null is None:
            null = self.encode([""], device=device)
            if not self.in_unet:  # a trained encoder changes as it learns: encode it afresh each time
                self._null[key] = null
        return cond_expand(null, n)

    def drop(self, cond: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Replace each example's prompt by the empty prompt with probability ``dropout`` (one draw per example,
        even at 0). Works on token vectors (a frozen encoder) and on token ids (a from-scratch one)."""
        first = next(iter(cond.values()))
        drop = torch.rand(first.shape[0], generator=generator, device=first.device) < self.dropout
        if "ids" in cond:  # the ids of "" never change, though the encoder learns: tokenized once per device
            key = f"ids:{first.device}"
            if key not in self._null:
                self._null[key] = {k: v.to(first.device) for k, v in self.encoder.tokenize([""]).items()}
            empty = self._null[key]
        else:
            empty = self.null(1, first.device)
        return {k: torch.where(drop.view(-1, *[1] * (v.ndim - 1)), empty[k].to(v.dtype), v) for k, v in cond.items()}

    def grid(self, n: int) -> tuple[list[str], int]:
        """The prompts of a sample grid of about ``n`` images, one row per fixed prompt, and the row length."""
        if not self.prompts:
            raise DifflabError("this text model records no sample prompts: give prompts to sample")
        per_row = max(1, n // len(self.prompts))
        return [p for p in self.prompts for _ in range(per_row)], per_row

    def to(self, device) -> TextConditioner:
        if not self.in_unet:
            self.encoder.to(device)
        self._null = {}
        return self

    def config(self) -> dict:
        encoder = {"kind": "unet"} if self.in_unet else {**self.encoder.config(), "identity": self.encoder.identity()}
        return {"kind": self.kind, "encoder": encoder, "dropout": self.dropout, "prompts": self.prompts}


def conditioner_from_config(config: dict | None, net=None) -> ClassConditioner | TextConditioner | None:
    """Rebuild the conditioner a model config describes (None: unconditional). A text model's frozen encoder is
    loaded from where its config says (a packaged model, a folder, a hub id); a from-scratch one is ``net``'s."""
    if config is None:
        return None
    kind = config.get("kind")
    if kind == ClassConditioner.kind:
        return ClassConditioner(config["class_names"], config.get("dropout", 0.1))
    if kind == TextConditioner.kind:
        spec = dict(config["encoder"])
        if spec.get("kind") == "unet":
            if net is None or getattr(net, "text_encoder", None) is None:
                raise DifflabError("the model config names a text encoder inside the U-Net, but the U-Net has none")
            encoder = net.text_encoder
        else:
            from difflab.nn.text import text_encoder_from_config

            recorded = spec.pop("identity", None)
            encoder = text_encoder_from_config(spec)
            if recorded is not None and encoder.identity() != recorded:
                warnings.warn(f"the text encoder {spec.get('source')} differs from the one this model was trained "
                              "with (its weights or settings changed): prompts may be followed less well",
                              stacklevel=2)
        return TextConditioner(encoder, config.get("dropout", 0.1), config.get("prompts"))
    raise DifflabError(f"unknown conditioner kind {kind!r} in the model config")


def text_cache(encoder, texts: list[str], *, device: torch.device | str, progress: bool = False,
               batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Every text of ``texts`` encoded once by a frozen encoder: ``{"tokens": (U, L, D), "mask": (U, L)}`` on
    ``device``. Kept on disk under ``$DIFFLAB_CACHE/text``, keyed by the encoder's identity and the texts, so a
    second run (or a resumed one) reads instead of encoding; float32, identical to encoding on the fly."""
    from safetensors.torch import load_file

    from difflab.data.download import cache_dir, save_cache_tensors

    digest = hashlib.sha256("\n".join([encoder.identity(), *texts]).encode()).hexdigest()[:20]
    path = cache_dir() / "text" / f"{digest}.safetensors"
    if path.is_file():
        try:
            cached = load_file(str(path))
            if cached["tokens"].shape[0] == len(texts):
                return {"tokens": cached["tokens"].to(device), "mask": cached["mask"].bool().to(device)}
        except Exception:  # a damaged cache file is rebuilt
            pass
    parts = []
    with tqdm(total=len(texts), desc="encoding captions", unit="text", disable=not progress) as bar:
        for start in range(0, len(texts), batch_size):
            parts.append(encoder.encode(texts[start:start + batch_size], device=device))
            bar.update(len(parts[-1].tokens))
    tokens = torch.cat([p.tokens.float() for p in parts])
    mask = torch.cat([p.mask.bool() for p in parts])
    try:
        save_cache_tensors(path, {"tokens": tokens.cpu(), "mask": mask.cpu().to(torch.uint8)})
    except OSError as e:  # a read-only cache costs time, not the run
        warnings.warn(f"could not write the caption cache {path}: {e.strerror}", stacklevel=2)
    return {"tokens": tokens, "mask": mask}
