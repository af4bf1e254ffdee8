"""Many adapters on one base: load the base once, answer each request with the adapter it names.

The lecture's operational side of PEFT: one frozen base in memory and several small task
adapters beside it (PEFT's multi-adapter ``PeftModel``: ``load_adapter`` per adapter). A batch
may mix adapters:

- LoRA-family adapters (lora, qlora; not DoRA) share one forward pass: PEFT's
  ``adapter_names=[...]`` routes each row through its own LoRA matrices (and ``"__base__"``
  through none), so a mixed batch costs one pass, not one per adapter;
- prompt-tuned adapters (all of them ``prompt``) share one pass too: each row gets its own
  adapter's virtual-token embeddings in front of its text (the lecture's mixed-task batching);
- any other kind PEFT can hold (DoRA, IA3, prefix tuning) is answered one adapter group at a
  time with ``set_adapter``.

**Routing.** A request that names no adapter goes to the one whose examples it is most like:
a nearest-centroid classifier over the base model's own mean-pooled last hidden states
(no second model to ship). :meth:`AdapterServer.fit_router` takes a few example prompts per
adapter; :meth:`AdapterServer.router_accuracy` measures it on held-out labelled prompts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from components.compression.delta_serving import UnknownNameError
from components.errors import PosttrainError
from components.evaluation.generate import chat_prompt_ids, left_pad
from components.models.loading import load_tokenizer, require_dir
from components.peft.adapters import (
    ADAPTER_CONFIG,
    adapter_method,
    check_base,
    load_policy,
    weights_fingerprint,
)

BASE = "base"
PEFT_BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch
MIXED_BATCH_METHODS = ("lora",)  # adapter_method() reports qlora adapters as lora: both LoRA


class UnknownAdapterError(UnknownNameError):
    """A request named an adapter the server does not hold."""


class AdapterServer:
    """``base_dir`` loaded once (adapter chains merged in fp32) and ``adapters`` {name: dir} over it."""

    request_key = "adapter"  # the HTTP protocol's name field (components.compression.delta_serving)

    def __init__(self, base_dir: Path | str, adapters: Mapping[str, Path | str]) -> None:
        from peft import PeftModel

        if not adapters:
            raise PosttrainError("give at least one adapter (NAME=DIR)")
        self.base_path = require_dir(base_dir, "base model")
        self.paths = {name: require_dir(path, f"adapter {name!r}") for name, path in adapters.items()}
        if BASE in self.paths:
            raise PosttrainError(f"{BASE!r} names the bare base model; call the adapter something else")
        base_hash = weights_fingerprint(self.base_path)  # once, however many adapters
        for name, path in self.paths.items():
            if not (path / ADAPTER_CONFIG).is_file():
                raise PosttrainError(
                    f"adapter {name!r}: {path} is not a PEFT adapter (no {ADAPTER_CONFIG}); serve "
                    "lora, dora, qlora, ia3, prefix or prompt adapters trained over the same base"
                )
            check_base(path, self.base_path, base_hash)  # trained over these very weights
        self.methods = {name: adapter_method(path) for name, path in self.paths.items()}
        kinds = {m if m in ("prefix", "prompt") else "weights" for m in self.methods.values()}
        if len(kinds) > 1:
            raise PosttrainError(
                f"adapters {self.methods} mix prompt/prefix tuning with weight adapters, which PEFT "
                "cannot hold on one base; serve them from separate servers"
            )
        base = load_policy(self.base_path)
        names = list(self.paths)
        model = PeftModel.from_pretrained(base, str(self.paths[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(str(self.paths[name]), adapter_name=name)
        model.eval()
        self.model = model
        self.tokenizer: PreTrainedTokenizerBase = load_tokenizer(self.paths[names[0]])
        self.prompt_tuned = all(m == "prompt" for m in self.methods.values())
        self.mixed = self.prompt_tuned or all(m in MIXED_BATCH_METHODS for m in self.methods.values())
        self.centroids: torch.Tensor | None = None
        self.centroid_names: list[str] = []

    @property
    def names(self) -> list[str]:
        return list(self.paths)

    def resolve(self, name: str | None) -> str | None:
        """``None`` for the bare base (``None``/``"base"``), else a held adapter's name."""
        if name is None or name == BASE:
            return None
        if name not in self.paths:
            raise UnknownAdapterError(f"unknown adapter {name!r} (known: {', '.join([BASE, *self.paths])})")
        return name

    # -- generation

    @torch.no_grad()
    def _generate_rows(
        self, prompts: Sequence[str], names: Sequence[str | None], max_new_tokens: int
    ) -> list[str]:
        """Greedy answers; ``names[i]`` is row i's adapter (None: the base). One pass when mixable."""
        ids, mask = left_pad(chat_prompt_ids(self.tokenizer, list(prompts)), self.tokenizer.pad_token_id)
        options: dict[str, Any] = {
            "input_ids": ids,
            "attention_mask": mask,
            "max_new_tokens": max_new_tokens,
            "do_sample": False,
            "temperature": None,
            "top_p": None,
            "top_k": None,
            "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": self.tokenizer.eos_token_id,
        }
        if self.prompt_tuned:
            out = self._generate_prompt_tuned(options, names)
            texts = self.tokenizer.batch_decode(out, skip_special_tokens=True)  # new tokens only
            return [t.strip() for t in texts]
        if self.mixed:
            options["adapter_names"] = [n if n is not None else PEFT_BASE for n in names]
            out = self.model.generate(**options)
        else:
            (name,) = set(names)
            if name is None:
                with self.model.disable_adapter():
                    out = self.model.generate(**options)
            else:
                self.model.set_adapter(name)
                out = self.model.generate(**options)
        texts = self.tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
        return [t.strip() for t in texts]

    def _generate_prompt_tuned(self, options: dict[str, Any], names: Sequence[str | None]) -> torch.Tensor:
        """The lecture's mixed-task batching: each row gets its own adapter's virtual tokens in front.

        The backbone is shared and frozen, so rows of different prompt-tuned tasks run in one
        forward pass; a base row gets masked zero rows instead (left padding, in effect).
        """
        base = self.model.get_base_model()
        ids, mask = options.pop("input_ids"), options.pop("attention_mask")
        prompts = {n: self.model.get_prompt_embedding_to_save(n) for n in self.paths}
        k, dim = next(iter(prompts.values())).shape
        virtual = torch.stack([prompts[n] if n is not None else torch.zeros(k, dim) for n in names])
        virtual_mask = torch.tensor([[1 if n is not None else 0] * k for n in names], dtype=mask.dtype)
        embeds = torch.cat([virtual.to(base.dtype), base.get_input_embeddings()(ids)], dim=1)
        return base.generate(
            inputs_embeds=embeds, attention_mask=torch.cat([virtual_mask, mask], dim=1), **options
        )

    def ask_many(
        self, requests: Sequence[tuple[str | None, str]], max_new_tokens: int = 32
    ) -> list[tuple[str, str]]:
        """Answers to ``[(adapter or None, prompt), ...]`` in order, as ``(adapter used, answer)``.

        A request with no adapter is routed when the router is fitted, else served by the base.
        LoRA adapters answer the whole list in one mixed batch; others one group at a time.
        """
        names = [self.resolve(n) if n not in (None, "") else None for n, _ in requests]
        prompts = [p for _, p in requests]
        unnamed = [i for i, (n, _) in enumerate(requests) if n in (None, "")]
        if unnamed and self.centroids is not None:
            for i, routed in zip(unnamed, self.route([prompts[i] for i in unnamed]), strict=True):
                names[i] = routed
        if self.mixed:
            answers = self._generate_rows(prompts, names, max_new_tokens)
        else:
            answers = [""] * len(prompts)
            for key in dict.fromkeys(names):
                rows = [i for i, n in enumerate(names) if n == key]
                for i, text in zip(
                    rows,
                    self._generate_rows([prompts[i] for i in rows], [key] * len(rows), max_new_tokens),
                    strict=True,
                ):
                    answers[i] = text
        return [(n or BASE, a) for n, a in zip(names, answers, strict=True)]

    def ask(self, prompt: str, adapter: str | None = None, max_new_tokens: int = 32) -> str:
        return self.ask_many([(adapter, prompt)], max_new_tokens)[0][1]

    def answer(self, prompt: str, adapter: str | None = None, max_new_tokens: int = 32) -> tuple[str, str]:
        """(the adapter that answered, possibly routed; its answer): what the HTTP server sends."""
        return self.ask_many([(adapter, prompt)], max_new_tokens)[0]

    # -- routing

    @torch.no_grad()
    def embed(self, prompts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """Unit-norm mean-pooled last hidden states of the bare base model (the router's features)."""
        rows = []
        for start in range(0, len(prompts), batch_size):
            ids, mask = left_pad(
                chat_prompt_ids(self.tokenizer, list(prompts[start : start + batch_size])),
                self.tokenizer.pad_token_id,
            )
            with self.model.disable_adapter():
                hidden = self.model(
                    input_ids=ids, attention_mask=mask, output_hidden_states=True
                ).hidden_states[-1]
            pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            rows.append(nn.functional.normalize(pooled.float(), dim=-1))
        return torch.cat(rows)

    def fit_router(self, examples: Mapping[str, Sequence[str]]) -> None:
        """Nearest-centroid routing from a few example prompts per adapter."""
        for name, prompts in examples.items():
            self.resolve(name)
            if not prompts:
                raise PosttrainError(f"routing examples for {name!r}: none given")
        self.centroid_names = list(examples)
        self.centroids = nn.functional.normalize(
            torch.stack([self.embed(list(examples[n])).mean(0) for n in self.centroid_names]), dim=-1
        )

    def route(self, prompts: Sequence[str]) -> list[str]:
        """The adapter each prompt is routed to (the most similar centroid)."""
        if self.centroids is None:
            raise PosttrainError("no router: fit_router() with example prompts per adapter first")
        best = (self.embed(prompts) @ self.centroids.T).argmax(dim=1)
        return [self.centroid_names[i] for i in best.tolist()]

    def router_accuracy(self, labelled: Sequence[tuple[str, str]]) -> float:
        """Share of ``(prompt, right adapter)`` pairs routed to the right adapter."""
        if not labelled:
            return float("nan")
        routed = self.route([p for p, _ in labelled])
        return sum(r == want for r, (_, want) in zip(routed, labelled, strict=True)) / len(labelled)

    def memory_report(self) -> dict[str, Any]:
        """Bytes held: the base once and each adapter's own tensors."""
        per_adapter = {name: 0 for name in self.paths}
        base = 0
        for pname, param in self.model.named_parameters():
            size = param.numel() * param.element_size()
            owner = next((n for n in self.paths if f".{n}." in pname or pname.endswith(f".{n}")), None)
            if owner is None:
                base += size
            else:
                per_adapter[owner] += size
        return {
            "base_bytes": base,
            "adapters": per_adapter,
            "total_bytes": base + sum(per_adapter.values()),
            "as_full_models_bytes": base * len(self.paths),
        }


def read_routing_examples(spec: str) -> tuple[str, list[str]]:
    """``NAME=FILE.jsonl`` -> (NAME, prompts): each line has a ``prompt`` or chat ``messages``."""
    from components.data.jsonl import read_jsonl

    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise PosttrainError(f"--examples {spec!r}: expected NAME=FILE.jsonl")
    prompts = []
    for i, record in enumerate(read_jsonl(path), 1):
        if isinstance(record.get("prompt"), str):
            prompts.append(record["prompt"])
        elif isinstance(record.get("messages"), list):
            users = [m.get("content") for m in record["messages"] if m.get("role") == "user"]
            if not users:
                raise PosttrainError(f"{path}:{i}: messages have no user turn")
            prompts.append(users[0])
        else:
            raise PosttrainError(
                f"{path}:{i}: expected a 'prompt' string or chat 'messages'; got {json.dumps(record)[:80]}"
            )
    return name, prompts
