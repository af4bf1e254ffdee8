"""Serve many Bit-Delta fine-tunes from one base model held in memory once.

Why: a Bit-Delta (:mod:`components.compression.bitdelta`) stores a fine-tune as one sign bit per
weight of its delta plus one fp32 scale per matrix, so next to its base it costs about 1/32 of
an fp32 matrix. Materialising every fine-tune costs ``N x base``; keeping the base once and the
fine-tunes as packed deltas costs ``base + N x packed delta``, the serving story of Liu et al.
2024 ("BitDelta: Your Fine-Tune May Only Be Worth One Bit"). :class:`DeltaServer` does that.

How: the base is loaded once. Every ``nn.Linear``/``nn.Embedding`` that some delta changes is
replaced by a *switchable* module that holds the base's own weight ``Parameter`` (not a copy, so
the base's ``state_dict`` and :func:`~components.compression.bitdelta.base_weights_hash` stay
the same) and, as a plain attribute, the *active* delta's packed signs and scale. Its forward is
``y = x·W_baseᵀ + α·(x·Sᵀ) (+ the fine-tune's bias)`` with ``S`` unpacked from the bits for that
call only (an embedding unpacks just the rows it looks up), so no ±1 matrix and no merged
weight outlives a forward pass. A tied LM head reads the embedding's delta. Tensors a delta
stores densely (norm weights that the fine-tune moved) are copied into the base on
:meth:`DeltaServer.select` and the base's values copied back when another delta, or the bare
base (``"base"``/``None``), is selected, so nothing leaks from one delta into the next.

Unpacking per forward trades speed for memory: unpacking SmolLM2-135M's 135M signs takes a few
seconds on one CPU thread (its tied 49152 x 576 head alone about 0.6 s), for every generated
token. ``cache_active=True`` unpacks the *active* delta once per ``select`` instead (one extra
fp32 copy of the delta'd matrices, for one delta at a time).

Rows of different deltas never share a forward pass here: the active delta is module state
(the switchable layers and the swapped dense tensors), so a mixed list of requests is served
group by group (:meth:`DeltaServer.ask_many`). That is unlike PEFT LoRA's ``adapter_names``,
whose per-row low-rank terms ride along one shared batch. A Bit-Delta batch could share the base
matmul and add per-row sign matmuls (what the paper's kernel does), but each delta touches every
full weight matrix and may carry its own norm weights, so this pure-PyTorch server doesn't try.

One lock serialises selection and generation, so the server can be shared by threads (the HTTP
server of :func:`build_http_server` handles each request in its own thread).
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
import socket
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from safetensors import safe_open
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from components.compression.bitdelta import BITDELTA_FILE, FORMAT, base_weights_hash, unpack_signs
from components.errors import MissingInputError, PosttrainError

BASE = "base"  # the name that selects the bare base model (so is None)
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
BITDELTA_BASE_FILE = "bitdelta.json"  # written by the compress stage: {"base_model": path}


class DeltaServingError(PosttrainError, ValueError):
    """A delta that can't be served as asked: another base, a bad file, a clash between deltas.

    A ``ValueError`` for library callers, a ``PosttrainError`` so the CLI prints it as one line
    and exits 2.
    """


class UnknownNameError(DeltaServingError):
    """A request names a model (delta, adapter) the server does not hold: HTTP 404."""


class UnknownDeltaError(UnknownNameError):
    """A request names a delta the server does not hold; the message lists the ones it does."""


# ----------------------------------------------------------------- what is held per delta


@dataclass(frozen=True)
class LayerDelta:
    """One delta'd matrix exactly as the file stores it: packed sign bits, scale, fine-tune bias.

    ``signs`` is uint8, ``ceil(rows * cols / 8)`` bytes (bit order of
    :func:`~components.compression.bitdelta.pack_signs`), ``alpha`` fp32 of shape ``[1]``.
    """

    signs: torch.Tensor
    alpha: torch.Tensor
    bias: torch.Tensor | None
    shape: tuple[int, int]

    def sign_matrix(self, dtype: torch.dtype) -> torch.Tensor:
        """The whole ±1 matrix ``S`` (transient: built for one forward pass or one cache)."""
        return unpack_signs(self.signs, self.shape, dtype)

    def sign_rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``S[ids]`` unpacked straight from the bits, so an embedding lookup never unpacks the
        whole vocabulary: shape ``ids.shape + (cols,)``."""
        width = self.shape[1]
        index = ids.unsqueeze(-1) * width + torch.arange(width, device=ids.device)
        packed = self.signs[index // 8].to(torch.int32)
        bits = (packed >> (index % 8).to(torch.int32)) & 1
        return bits.to(dtype) * 2 - 1

    def tensors(self) -> dict[str, torch.Tensor]:
        held = {"signs": self.signs, "alpha": self.alpha}
        if self.bias is not None:
            held["bias"] = self.bias
        return held


@dataclass(frozen=True)
class Delta:
    """A loaded Bit-Delta: per module its :class:`LayerDelta`, the tied heads, the dense tensors."""

    name: str
    path: Path  # the bitdelta.safetensors file
    layers: Mapping[str, LayerDelta]  # module name -> packed delta
    tied: Mapping[str, str]  # head module -> the module whose delta it reads (the embedding)
    dense: Mapping[str, torch.Tensor]  # state_dict name -> the fine-tune's value (fp32)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor this delta keeps in memory, under the name it has in the file."""
        for module_name, layer in self.layers.items():
            for kind, tensor in layer.tensors().items():
                yield f"{module_name}.{kind}", tensor
        yield from self.dense.items()

    def nbytes(self) -> dict[str, int]:
        """Bytes held, split by kind (signs, scales, biases, dense) with their sum in ``bytes``."""
        layers = list(self.layers.values())
        sizes = {
            "sign_bytes": sum(_nbytes(layer.signs) for layer in layers),
            "scale_bytes": sum(_nbytes(layer.alpha) for layer in layers),
            "bias_bytes": sum(_nbytes(layer.bias) for layer in layers if layer.bias is not None),
            "dense_bytes": sum(_nbytes(t) for t in self.dense.values()),
        }
        return {"bytes": sum(sizes.values()), **sizes, "matrices": len(layers)}


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


# ----------------------------------------------------------------- switchable layers


class _Switchable(nn.Module):
    """What every switchable layer shares: the active delta and, optionally, its unpacked ``S``.

    Both are plain attributes, not buffers, so they never enter ``state_dict()``, and ``.to()``
    doesn't move them: place the base on its device before building a :class:`DeltaServer`.
    """

    delta: LayerDelta | None
    cache: torch.Tensor | None

    def __init__(self, source: str) -> None:
        super().__init__()
        self.source = source  # the module name whose delta this layer applies
        self.delta = None
        self.cache = None

    def _signs(self, dtype: torch.dtype) -> torch.Tensor:
        assert self.delta is not None
        return self.cache.to(dtype) if self.cache is not None else self.delta.sign_matrix(dtype)

    def extra_repr(self) -> str:
        return f"source={self.source}, active={self.delta is not None}"


class SwitchableLinear(_Switchable):
    """A base ``nn.Linear`` plus the active delta: ``x·Wᵀ + α·(x·Sᵀ) + b_fine``, or plain ``x·Wᵀ + b``.

    Two matmuls, as :class:`~components.compression.bitdelta.BitDeltaLinear` does, so a served
    delta computes what :func:`~components.compression.bitdelta.load_bitdelta`'s model does;
    with no delta active it is exactly the base layer.
    """

    def __init__(self, base: nn.Linear, source: str) -> None:
        super().__init__(source)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = self.delta
        if delta is None:
            return F.linear(x, self.weight, self.bias)
        out = F.linear(x, self.weight) + delta.alpha.to(x.dtype) * F.linear(x, self._signs(x.dtype))
        # The file's bias is the fine-tune's (a delta'd layer always carries its own, or none).
        return out + delta.bias.to(x.dtype) if delta.bias is not None else out


class SwitchableTiedHead(SwitchableLinear):
    """An LM head whose weight is the embedding's: it applies the embedding's active delta.

    ``F.linear(x, W + α·S)`` in one matmul, as
    :class:`~components.compression.bitdelta.TiedBitDeltaHead` computes it.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = self.delta
        if delta is None:
            return F.linear(x, self.weight, self.bias)
        weight = self.weight + delta.alpha.to(self.weight.dtype) * self._signs(self.weight.dtype)
        return F.linear(x, weight.to(x.dtype), self.bias)


class SwitchableEmbedding(_Switchable):
    """A base ``nn.Embedding`` plus the active delta: ``W[ids] + α·S[ids]``, only the rows looked up."""

    def __init__(self, base: nn.Embedding, source: str) -> None:
        super().__init__(source)
        if base.max_norm is not None:
            raise DeltaServingError(f"{source}: Bit-Delta does not support nn.Embedding with max_norm")
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.padding_idx = base.padding_idx
        self.weight = base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = F.embedding(ids, self.weight, self.padding_idx)
        delta = self.delta
        if delta is None:
            return out
        rows = self.cache[ids].to(out.dtype) if self.cache is not None else delta.sign_rows(ids, out.dtype)
        return out + delta.alpha.to(out.dtype) * rows


# ----------------------------------------------------------------- reading deltas


def bitdelta_file(path: Path | str) -> Path:
    """The ``bitdelta.safetensors`` of a compress output directory (or the file itself)."""
    path = Path(path)
    return path / BITDELTA_FILE if path.is_dir() else path


def _not_a_bitdelta_output(name: str, path: Path) -> DeltaServingError:
    """The error for a directory without a Bit-Delta, saying what it holds instead when it can."""
    hint = "compress with compress.method: bitdelta"
    config = path / "config.yaml"
    if config.is_file():
        try:
            method = (yaml.safe_load(config.read_text()) or {}).get("method")
        except (yaml.YAMLError, AttributeError):
            method = None
        if method:
            hint = f"its config.yaml says method {method!r}; {hint}"
    return DeltaServingError(f"delta {name!r}: {path} is not a Bit-Delta output (no {BITDELTA_FILE}; {hint})")


def _recorded_base(path: Path) -> str:
    """`` (built on BASE)`` from the compress stage's ``bitdelta.json`` beside the file, if any."""
    record = path.parent / BITDELTA_BASE_FILE
    try:
        return f" (built on {json.loads(record.read_text())['base_model']})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def check_delta_path(name: str, path: Path | str) -> Path:
    """The Bit-Delta file of delta ``name``, or the error saying why ``path`` has none (cheap:
    run before loading any model, so a typo fails in milliseconds)."""
    if name == BASE or not NAME_PATTERN.fullmatch(name):
        raise DeltaServingError(
            f"delta name {name!r}: use letters, digits, '.', '_' or '-' (and not {BASE!r}, "
            "which names the bare base model)"
        )
    where = Path(path)
    if not where.exists():
        raise DeltaServingError(f"delta {name!r}: {where} does not exist")
    file = bitdelta_file(where)
    if not file.is_file():
        raise _not_a_bitdelta_output(name, where)
    return file


@torch.no_grad()
def read_delta(name: str, path: Path | str, base: nn.Module, base_hash: str | None = None) -> Delta:
    """Load the Bit-Delta at ``path`` for serving on ``base``: packed, checked, on the base's device.

    Raises :class:`DeltaServingError` (naming the delta) when ``path`` holds no Bit-Delta, when
    it was made for another base (sha256 of the base's weights), or when its tensors don't fit
    ``base``'s modules. ``base`` is only read.
    """
    file = check_delta_path(name, path)
    with safe_open(str(file), "pt") as fh:
        metadata = fh.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise DeltaServingError(
                f"delta {name!r}: {file} has format {metadata.get('format')!r}, not {FORMAT!r}"
            )
        expected, got = metadata.get("base_sha256", ""), base_hash or base_weights_hash(base)
        if expected != got:
            raise DeltaServingError(
                f"delta {name!r} ({file}) was made for another base model: it needs the base whose "
                f"weights hash to sha256 {expected[:12]}…{_recorded_base(file)}, the served base "
                f"hashes to {got[:12]}…"
            )
        tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    modules = dict(base.named_modules())
    layers: dict[str, LayerDelta] = {}
    for module_name, shape in json.loads(metadata.get("shapes", "{}")).items():
        layers[module_name] = _layer_delta(name, file, module_name, tuple(shape), modules, tensors)
    tied: dict[str, str] = {}
    for alias, owner in json.loads(metadata.get("tied", "{}")).items():
        alias_weight = getattr(modules.get(alias), "weight", None)
        if owner not in layers or alias_weight is None or alias_weight is not modules[owner].weight:
            raise DeltaServingError(
                f"delta {name!r}: {file} ties {alias} to {owner}, but the base does not share that weight"
            )
        tied[alias] = owner
    state = base.state_dict(keep_vars=True)
    dense: dict[str, torch.Tensor] = {}
    for tensor_name, value in tensors.items():
        target = state.get(tensor_name)
        if target is None or target.shape != value.shape:
            raise DeltaServingError(
                f"delta {name!r}: {file} holds {tensor_name} {tuple(value.shape)}, which the base "
                f"{'has as ' + str(tuple(target.shape)) if target is not None else 'does not have'}"
            )
        dense[tensor_name] = value.to(target.device, torch.float32)
    return Delta(name, file, MappingProxyType(layers), MappingProxyType(tied), MappingProxyType(dense))


def _layer_delta(
    name: str,
    file: Path,
    module_name: str,
    shape: tuple[int, ...],
    modules: Mapping[str, nn.Module],
    tensors: dict[str, torch.Tensor],
) -> LayerDelta:
    """Pop ``<module>.signs/.alpha/.bias`` out of ``tensors`` and check them against the base."""
    module = modules.get(module_name)
    if type(module) not in (nn.Linear, nn.Embedding):
        raise DeltaServingError(
            f"delta {name!r}: {file} has a delta for {module_name}, which in the base is "
            f"{type(module).__name__ if module is not None else 'missing'}, not a Linear or Embedding"
        )
    if tuple(module.weight.shape) != shape or len(shape) != 2:
        raise DeltaServingError(
            f"delta {name!r}: {module_name} has shape {list(shape)}, the base {list(module.weight.shape)}"
        )
    try:
        signs, alpha = tensors.pop(f"{module_name}.signs"), tensors.pop(f"{module_name}.alpha")
    except KeyError as missing:
        raise DeltaServingError(f"delta {name!r}: {file} lacks {missing.args[0]}") from None
    bias = tensors.pop(f"{module_name}.bias", None)
    if signs.dtype != torch.uint8 or signs.numel() != math.ceil(math.prod(shape) / 8) or alpha.numel() != 1:
        raise DeltaServingError(
            f"delta {name!r}: {module_name}'s signs or alpha don't fit shape {list(shape)}"
        )
    device = module.weight.device
    return LayerDelta(
        signs=signs.to(device).reshape(-1),
        alpha=alpha.to(device, torch.float32).reshape(1),
        bias=None if bias is None else bias.to(device, torch.float32),
        shape=(shape[0], shape[1]),
    )


# ----------------------------------------------------------------- tokenizer


def _has_tokenizer(directory: Path) -> bool:
    return (directory / "tokenizer_config.json").is_file()


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """What must match for two fine-tunes to share a tokenizer: vocabulary, special tokens, chat
    template and (fast tokenizers) the normaliser, pre-tokeniser, model and decoder."""
    parts: dict[str, Any] = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": tokenizer.special_tokens_map,
        "chat_template": tokenizer.chat_template,
    }
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        parts["backend"] = {k: v for k, v in spec.items() if k not in ("padding", "truncation")}
    return json.dumps(parts, sort_keys=True, default=str)


# ----------------------------------------------------------------- the server


class DeltaServer:
    """One base model, many Bit-Delta fine-tunes of it, any of them answering on request.

    ``base``: the base model's directory (loaded with
    :func:`~components.models.loading.load_causal_lm`) or the model itself, which the server
    takes over (its layers are swapped for switchable ones; with ``"base"`` selected it computes
    exactly what it did before). ``deltas``: ``{name: compress output dir or bitdelta file}``; every
    file must have been made from this base (sha256 check). ``tokenizer``: for :meth:`generate`;
    by default the one saved beside the deltas (they must all match), else the base's.
    ``cache_active``: keep the active delta's ±1 matrices unpacked (faster, more memory).
    """

    def __init__(
        self,
        base: PreTrainedModel | Path | str,
        deltas: Mapping[str, Path | str],
        *,
        tokenizer: PreTrainedTokenizerBase | None = None,
        cache_active: bool = False,
    ) -> None:
        self._lock = threading.RLock()
        for name, path in deltas.items():  # before the base loads
            check_delta_path(name, path)
        self.base_path = Path(base) if isinstance(base, (str, Path)) else None
        self.model = _load_base(base) if self.base_path is not None else base
        self.model.requires_grad_(False)
        self.model.eval()
        self.cache_active = cache_active
        self.base_hash = base_weights_hash(self.model)
        loaded: dict[str, Delta] = {}
        for name, path in deltas.items():
            loaded[name] = read_delta(name, path, self.model, self.base_hash)
        self._deltas = loaded
        self._layers = self._install_switchables()
        self._state = self.model.state_dict(keep_vars=True)
        dense_names = sorted({n for delta in loaded.values() for n in delta.dense})
        # The base's own values of every tensor some delta swaps, put back on select.
        self._base_dense = {n: self._state[n].detach().clone() for n in dense_names}
        self._active: str | None = None
        self._tokenizer = tokenizer if tokenizer is not None else self._find_tokenizer()

    # -- setup

    def _install_switchables(self) -> dict[str, _Switchable]:
        """Swap every module some delta changes for a switchable one reading the base weight."""
        sources: dict[str, str] = {}  # module -> the delta entry it applies
        for delta in self._deltas.values():
            for module_name in delta.layers:
                sources[module_name] = module_name
            for alias, owner in delta.tied.items():
                sources[alias] = owner
        for delta in self._deltas.values():  # one delta's tied head is another's own matrix?
            for module_name in delta.layers:
                if sources[module_name] != module_name:
                    raise DeltaServingError(
                        f"delta {delta.name!r} has its own delta for {module_name}, which another "
                        f"delta ties to {sources[module_name]}: the deltas disagree on weight tying"
                    )
        layers: dict[str, _Switchable] = {}
        for module_name, source in sources.items():
            module = self.model.get_submodule(module_name)
            if source != module_name:
                layer: _Switchable = SwitchableTiedHead(module, source)
            elif isinstance(module, nn.Embedding):
                layer = SwitchableEmbedding(module, source)
            else:
                layer = SwitchableLinear(module, source)
            parent, _, attr = module_name.rpartition(".")
            setattr(self.model.get_submodule(parent) if parent else self.model, attr, layer)
            layers[module_name] = layer
        return layers

    def _find_tokenizer(self) -> PreTrainedTokenizerBase | None:
        """The tokenizer beside the deltas (checked to be one and the same), else the base's."""
        from components.models.loading import load_tokenizer

        found: tuple[str, Path, str] | None = None
        tokenizer = None
        for name, delta in self._deltas.items():
            directory = delta.path.parent
            if not _has_tokenizer(directory):
                continue
            candidate = load_tokenizer(directory)
            fingerprint = tokenizer_fingerprint(candidate)
            if found is None:
                found, tokenizer = (name, directory, fingerprint), candidate
            elif fingerprint != found[2]:
                raise DeltaServingError(
                    f"deltas {found[0]!r} ({found[1]}) and {name!r} ({directory}) were saved with "
                    "different tokenizers: fine-tunes served on one base must share one tokenizer"
                )
        if tokenizer is None and self.base_path is not None and _has_tokenizer(self.base_path):
            tokenizer = load_tokenizer(self.base_path)
        return tokenizer

    # -- selection

    @property
    def names(self) -> list[str]:
        """The deltas' names, in the order they were given (``"base"`` is always there too)."""
        return list(self._deltas)

    @property
    def deltas(self) -> Mapping[str, Delta]:
        return MappingProxyType(self._deltas)

    @property
    def active(self) -> str:
        """The selected delta's name, or ``"base"``."""
        return self._active or BASE

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase | None:
        return self._tokenizer

    def resolve(self, name: str | None) -> str | None:
        """``None`` for the bare base (``None`` or ``"base"``), else the name of a held delta."""
        if name is None or name == BASE:
            return None
        if name not in self._deltas:
            known = ", ".join([BASE, *self._deltas])
            raise UnknownDeltaError(f"unknown delta {name!r} (known: {known})")
        return name

    @torch.no_grad()
    def select(self, name: str | None) -> None:
        """Make delta ``name`` (or the bare base: ``None``/``"base"``) the one the model computes.

        Points every switchable layer at that delta's packed tensors (or at nothing), and copies
        its dense tensors into the base, putting back the base's values of those it doesn't
        have. Cheap unless ``cache_active`` (then the delta's sign matrices are unpacked here).
        """
        key = self.resolve(name)
        with self._lock:
            if key == self._active:
                return
            delta = self._deltas[key] if key is not None else None
            unpacked: dict[str, torch.Tensor] = {}
            for layer in self._layers.values():
                layer.delta = delta.layers.get(layer.source) if delta is not None else None
                layer.cache = None
                if self.cache_active and layer.delta is not None:
                    if layer.source not in unpacked:  # a tied head shares its embedding's
                        unpacked[layer.source] = layer.delta.sign_matrix(layer.weight.dtype)
                    layer.cache = unpacked[layer.source]
            for tensor_name, base_value in self._base_dense.items():
                value = delta.dense.get(tensor_name, base_value) if delta is not None else base_value
                self._state[tensor_name].copy_(value)
            self._active = key

    @contextmanager
    def using(self, name: str | None) -> Iterator[nn.Module]:
        """``with server.using("a") as model:`` delta ``a`` (lock held), the previous one after."""
        with self._lock:
            previous = self._active
            self.select(name)
            try:
                yield self.model
            finally:
                self.select(previous)

    # -- generation

    def generate(
        self,
        prompts: Sequence[Any],
        delta: str | None = None,
        *,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        seed: int = 0,
        batch_size: int = 16,
    ) -> list[str]:
        """One completion per prompt (a user turn, or a list of chat turns) from delta ``delta``.

        Greedy unless ``temperature > 0``; batched, via
        :func:`components.evaluation.generate.generate`. Selects ``delta`` and leaves it
        selected (the next request for it needs no switch).
        """
        from components.evaluation.generate import generate

        if self._tokenizer is None:
            raise PosttrainError(
                "no tokenizer: none was saved beside the deltas or the base model (pass tokenizer=)"
            )
        self.resolve(delta)  # an unknown name fails before the lock is taken
        with self._lock:
            self.select(delta)
            outputs = generate(
                self.model,
                self._tokenizer,
                list(prompts),
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                seed=seed,
                batch_size=batch_size,
            )
        return [completions[0] for completions in outputs]

    def ask(self, prompt: Any, delta: str | None = None, **options: Any) -> str:
        """The answer of delta ``delta`` (``None``/``"base"``: the base) to one prompt."""
        return self.generate([prompt], delta, **options)[0]

    def answer(self, prompt: Any, delta: str | None = None, **options: Any) -> tuple[str, str]:
        """(the delta that answered, its answer): the HTTP server's call, shared with adapter servers."""
        return delta or BASE, self.ask(prompt, delta, **options)

    def ask_many(self, requests: Sequence[tuple[str | None, Any]], **options: Any) -> list[str]:
        """Answers to ``[(delta, prompt), ...]``, in the order given, served one delta at a time.

        Rows for different deltas can't share a forward pass here (see the module docstring), so
        the requests are grouped by delta, each group is one batched :meth:`generate`, and the
        active delta's group goes first to save a switch. Every name is checked before any work.
        """
        keys = [self.resolve(name) for name, _ in requests]
        groups: dict[str | None, list[int]] = {}
        for row, key in enumerate(keys):
            groups.setdefault(key, []).append(row)
        order = sorted(groups, key=lambda key: key != self._active)  # stable: otherwise as given
        answers: list[str] = [""] * len(requests)
        for key in order:
            rows = groups[key]
            answers_of_group = self.generate([requests[r][1] for r in rows], key, **options)
            for row, answer in zip(rows, answers_of_group, strict=True):
                answers[row] = answer
        return answers

    # -- memory

    def memory_report(self) -> dict[str, Any]:
        """Bytes held: the base once, each delta's packed tensors, against N materialised models.

        ``base_bytes``: the base model's parameters and buffers (a tied tensor once);
        ``dense_backup_bytes``: the base's own values of the tensors deltas swap;
        ``deltas``: per delta its bytes (signs, scales, biases, dense) and how many matrices;
        ``active_cache_bytes``: unpacked signs of the active delta (``cache_active`` only);
        ``total_bytes``: all of these; ``materialized_bytes``: ``n_deltas x base_bytes``, what
        the same fine-tunes cost as full models; ``saving``: that over ``total_bytes``.
        Transient unpacking during a forward pass (one layer's ±1 matrix) is not counted.
        """
        base_bytes = _unique_bytes([*self.model.parameters(), *self.model.buffers()])
        backup = sum(_nbytes(t) for t in self._base_dense.values())
        per_delta = {name: delta.nbytes() for name, delta in self._deltas.items()}
        deltas_bytes = sum(sizes["bytes"] for sizes in per_delta.values())
        caches = [layer.cache for layer in self._layers.values() if layer.cache is not None]
        cache_bytes = _unique_bytes(caches)
        total = base_bytes + backup + deltas_bytes + cache_bytes
        materialized = len(self._deltas) * base_bytes
        return {
            "base_bytes": base_bytes,
            "dense_backup_bytes": backup,
            "deltas": per_delta,
            "deltas_bytes": deltas_bytes,
            "active_cache_bytes": cache_bytes,
            "total_bytes": total,
            "n_deltas": len(self._deltas),
            "materialized_bytes": materialized,
            "saving": materialized / total if total else 0.0,
        }


def _unique_bytes(tensors: Sequence[torch.Tensor]) -> int:
    """Bytes of ``tensors``, each storage once (a tied weight is one tensor under two names)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for tensor in tensors:
        key = (tensor.data_ptr(), _nbytes(tensor))
        if key not in seen:
            seen.add(key)
            total += _nbytes(tensor)
    return total


def _load_base(path: Path) -> PreTrainedModel:
    """``load_causal_lm`` with one-line errors for a missing or non-model directory."""
    from components.models.loading import load_causal_lm

    if not path.exists():
        raise MissingInputError(f"{path}: base model not found")
    if not (path / "config.json").is_file():
        raise DeltaServingError(f"{path}: not a model directory (no config.json), so not a base model")
    try:
        return load_causal_lm(path)
    except OSError as exc:  # e.g. a compress output: config.json but no weights
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DeltaServingError(f"{path}: can't load the base model: {first_line}") from None


# ----------------------------------------------------------------- HTTP


MAX_BODY_BYTES = 1 << 20


def check_loopback(host: str) -> None:
    """Refuse to bind anything but a loopback address: the server has no authentication."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        try:
            address = ipaddress.ip_address(socket.gethostbyname(host))
        except OSError:
            raise DeltaServingError(f"host {host!r}: can't resolve it") from None
    if not address.is_loopback:
        raise DeltaServingError(
            f"host {host!r}: the delta server has no authentication, so it binds loopback "
            "addresses only (127.0.0.1, localhost); put a proxy in front for remote clients"
        )


class DeltaHTTPServer(ThreadingHTTPServer):
    """The ThreadingHTTPServer of :func:`build_http_server`, carrying the backend and limits."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        backend: DeltaServer,
        default_max_new_tokens: int,
        max_new_tokens_limit: int,
        log: bool,
    ) -> None:
        self.backend = backend
        self.default_max_new_tokens = default_max_new_tokens
        self.max_new_tokens_limit = max_new_tokens_limit
        self.log = log
        super().__init__(address, _DeltaRequestHandler)


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _DeltaRequestHandler(BaseHTTPRequestHandler):
    """``POST /generate`` and ``GET /health``; every error is ``{"error": "one line"}``."""

    server: DeltaHTTPServer
    server_version = "posttrain-deltas"

    def do_GET(self) -> None:
        if self.path.split("?")[0] != "/health":
            return self._send(404, {"error": f"no route GET {self.path} (GET /health, POST /generate)"})
        backend = self.server.backend
        return self._send(200, {f"{self._key}s": backend.names, "memory": backend.memory_report()})

    @property
    def _key(self) -> str:
        """The request's name field: "delta" here, the backend's own elsewhere ("adapter")."""
        return getattr(self.server.backend, "request_key", "delta")

    def do_POST(self) -> None:
        if self.path.split("?")[0] != "/generate":
            return self._send(404, {"error": f"no route POST {self.path} (GET /health, POST /generate)"})
        try:
            delta, prompt, max_new_tokens = self._parse_generate()
            used, output = self.server.backend.answer(prompt, delta, max_new_tokens=max_new_tokens)
        except _BadRequest as exc:
            return self._send(exc.status, {"error": str(exc)})
        except UnknownNameError as exc:
            return self._send(404, {"error": str(exc)})
        except Exception as exc:  # a failed generation answers 500 and the server keeps serving
            return self._send(500, {"error": f"generation failed: {type(exc).__name__}: {exc}"})
        return self._send(200, {self._key: used, "output": output})

    def _parse_generate(self) -> tuple[str | None, str, int]:
        """(delta, prompt, max_new_tokens) of a ``/generate`` body, or a 4xx ``_BadRequest``."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise _BadRequest(400, "Content-Length is not a number") from None
        if length > MAX_BODY_BYTES:
            raise _BadRequest(413, f"body over {MAX_BODY_BYTES} bytes")
        try:
            body = json.loads(self.rfile.read(length) or b"null")
        except (ValueError, UnicodeDecodeError):
            raise _BadRequest(400, "body is not JSON") from None
        if not isinstance(body, dict):
            raise _BadRequest(400, 'body must be a JSON object: {"delta": NAME, "prompt": TEXT}')
        delta, prompt = body.get("delta"), body.get("prompt")
        if delta is not None and not isinstance(delta, str):
            raise _BadRequest(400, '"delta" must be a string (or null/"base" for the base model)')
        self.server.backend.resolve(delta)  # unknown names: 404 listing the known ones
        if not isinstance(prompt, str) or not prompt.strip():
            raise _BadRequest(400, '"prompt" must be a non-empty string')
        limit = self.server.max_new_tokens_limit
        max_new_tokens = body.get("max_new_tokens", self.server.default_max_new_tokens)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise _BadRequest(400, '"max_new_tokens" must be an integer')
        if not 1 <= max_new_tokens <= limit:
            raise _BadRequest(400, f'"max_new_tokens" must be between 1 and {limit}, got {max_new_tokens}')
        return delta, prompt, max_new_tokens

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.log:
            sys.stderr.write(f"{self.address_string()} {format % args}\n")


def build_http_server(
    backend: DeltaServer,
    host: str = "127.0.0.1",
    port: int = 8600,
    *,
    default_max_new_tokens: int = 32,
    max_new_tokens_limit: int = 512,
    log: bool = True,
) -> DeltaHTTPServer:
    """A bound (not yet serving) HTTP server for ``backend``; call ``serve_forever()`` on it.

    ``POST /generate`` with ``{"delta": NAME, "prompt": TEXT, "max_new_tokens": N}`` answers
    ``{"delta": NAME, "output": TEXT}``; ``GET /health`` answers ``{"deltas": [...], "memory":
    memory_report()}``. Errors are ``{"error": MESSAGE}`` with 400 (bad body), 404 (unknown
    delta or route), 413 or 500. Loopback hosts only; ``port=0`` picks a free port
    (``server.server_address[1]``). A port in use raises :class:`PosttrainError`.
    """
    check_loopback(host)
    try:
        return DeltaHTTPServer((host, port), backend, default_max_new_tokens, max_new_tokens_limit, log)
    except OSError as exc:
        raise PosttrainError(
            f"can't listen on {host}:{port}: {exc.strerror or exc} (try another port)"
        ) from None
