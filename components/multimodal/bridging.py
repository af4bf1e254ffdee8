"""What both bridges share: prompts with images in them, left-padded batches, the answer loss,
greedy answers, the training loop and saving only the trainable tensors.

A prompt is the user's text with ``<image>`` where each image sits, put through the LM's own
chat template, then split at the markers: a :class:`Row` holds the token ids *around* the
images, the images' visual features, and the answer's ids (the answer plus the template's end
marker, which is what the bridge learns to produce and where generation stops). Each bridge
turns rows into one sequence its own way (Flamingo keeps a marker token where the image was
and cross-attends; PaLM-E splices projected visual tokens in), left-pads a batch so every row
ends at the last position, and returns logits. The loss is cross-entropy on the answer tokens
only.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from components.errors import DataError, PosttrainError
from components.multimodal.shapes import IMAGE_MARKER


@dataclass
class Row:
    """One sequence: text ids around ``len(images)`` images, and the answer ids (grows while generating)."""

    pieces: list[list[int]]
    images: list[torch.Tensor]  # each (N, feature_dim): one image's visual features
    answer: list[int] = field(default_factory=list)


class Bridge(Protocol):
    lm: PreTrainedModel

    def length(self, row: Row) -> int: ...

    def forward_rows(self, rows: Sequence[Row]) -> torch.Tensor: ...


class BareLM(nn.Module):
    """The LM alone, reading only a row's text (images and their markers dropped): the blind baseline."""

    def __init__(self, lm: PreTrainedModel, pad_id: int) -> None:
        super().__init__()
        self.lm, self.pad_id = lm, pad_id

    def length(self, row: Row) -> int:
        return sum(len(p) for p in row.pieces)

    def forward_rows(self, rows: Sequence[Row]) -> torch.Tensor:
        ids, mask, positions = left_pad(
            [torch.tensor([t for p in r.pieces for t in p] + r.answer) for r in rows], self.pad_id
        )
        return self.lm(input_ids=ids, attention_mask=mask, position_ids=positions).logits


class PromptFormat:
    """Questions with ``<image>`` markers -> :class:`Row`, through the LM's chat template."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.stop_ids = {
            i
            for i in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>"))
            if isinstance(i, int) and i >= 0 and i != tokenizer.unk_token_id
        }

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def texts(self, question: str, answer: str | None) -> tuple[str, str]:
        """(prompt text ending where the answer starts, the answer's text with its end marker)."""
        user = [{"role": "user", "content": question}]
        if getattr(self.tokenizer, "chat_template", None):
            prompt = self.tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
            if answer is None:
                return prompt, ""
            full = self.tokenizer.apply_chat_template(
                user + [{"role": "assistant", "content": answer}], tokenize=False
            )
            if full.startswith(prompt):
                return prompt, full[len(prompt) :]
        return f"{question}\n", (answer or "") + (self.tokenizer.eos_token or "")

    def row(self, question: str, images: list[torch.Tensor], answer: str | None = None) -> Row:
        markers = question.count(IMAGE_MARKER)
        if markers != len(images):
            raise DataError(
                f"the prompt has {markers} {IMAGE_MARKER} markers but {len(images)} images were given"
            )
        prompt, answer_text = self.texts(question, answer)
        pieces = [self._ids(p) for p in prompt.split(IMAGE_MARKER)]
        answer_ids = self._ids(answer_text) if answer is not None else []
        for k, token in enumerate(answer_ids):  # nothing after the end marker is learned
            if token in self.stop_ids:
                answer_ids = answer_ids[: k + 1]
                break
        return Row(pieces, images, answer_ids)


def check_fits(bridge: Bridge, row: Row, where: str = "the question") -> None:
    """A row longer than the LM's context is a clear error, not a silent truncation."""
    limit = getattr(bridge.lm.config, "max_position_embeddings", None)
    length = bridge.length(row) + max(len(row.answer), 1)
    if limit is not None and length > limit:
        raise DataError(
            f"{where} needs {length} tokens with its images, longer than the LM's context of {limit} tokens"
        )


def left_pad(
    seqs: Sequence[torch.Tensor], pad_value: float | int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack sequences (T_i, ...) right-aligned: (batch, attention_mask, position_ids)."""
    width = max(len(s) for s in seqs)
    shape = (len(seqs), width, *seqs[0].shape[1:])
    batch = torch.full(shape, pad_value, dtype=seqs[0].dtype)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        batch[i, width - len(s) :] = s
        mask[i, width - len(s) :] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return batch, mask, positions


def answer_loss(logits: torch.Tensor, rows: Sequence[Row]) -> torch.Tensor:
    """Mean cross-entropy of each row's answer tokens (the last ``len(answer)`` positions of its row)."""
    width = logits.shape[1]
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, row in enumerate(rows):
        labels[i, width - len(row.answer) :] = torch.tensor(row.answer)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


@torch.no_grad()
def greedy_answers(
    bridge: Bridge, rows: Sequence[Row], stop_ids: set[int], max_new_tokens: int = 8, batch_size: int = 32
) -> list[list[int]]:
    """Greedy answer ids for each row (the stop token excluded). No KV cache: answers are a few tokens."""
    answers: list[list[int]] = []
    for start in range(0, len(rows), batch_size):
        active = [replace(r, answer=[]) for r in rows[start : start + batch_size]]
        done = [False] * len(active)
        for _ in range(max_new_tokens):
            todo = [i for i, d in enumerate(done) if not d]
            if not todo:
                break
            logits = bridge.forward_rows([active[i] for i in todo])
            for i, token in zip(todo, logits[:, -1].argmax(-1).tolist(), strict=True):
                if token in stop_ids:
                    done[i] = True
                else:
                    active[i].answer.append(token)
        answers.extend(r.answer for r in active)
    return answers


def normalise_answer(text: str) -> str:
    return text.strip().strip(".!").strip().lower()


def accuracy(predicted: Sequence[str], expected: Sequence[str]) -> float:
    hits = [normalise_answer(p) == normalise_answer(e) for p, e in zip(predicted, expected, strict=True)]
    return sum(hits) / max(len(hits), 1)


def train_bridge(
    bridge: nn.Module,
    rows: Sequence[Row],
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    fast_names: tuple[str, ...] = (),
    fast_multiplier: float = 1.0,
    on_step: Callable[[int, float], dict[str, Any]] | None = None,
    log_every: int = 10,
    desc: str = "bridge",
) -> list[dict[str, Any]]:
    """AdamW on the bridge's trainable tensors (the frozen ones get no gradient), warmup then cosine.

    Returns the history: ``{"step", "loss"}`` every ``log_every`` steps, plus what ``on_step``
    adds (e.g. the Flamingo gate values).
    """
    from tqdm.auto import tqdm

    trainable = [p for p in bridge.parameters() if p.requires_grad]
    if not trainable:
        raise PosttrainError("the bridge has no trainable parameters")
    named = [(n, p) for n, p in bridge.named_parameters() if p.requires_grad]
    fast = [p for n, p in named if any(n.startswith(f) or n.rsplit(".", 1)[-1] == f for f in fast_names)]
    slow = [p for n, p in named if not any(n.startswith(f) or n.rsplit(".", 1)[-1] == f for f in fast_names)]
    groups = [{"params": slow, "lr": learning_rate}]
    if fast:
        groups.append({"params": fast, "lr": learning_rate * fast_multiplier})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    warmup = max(1, steps // 10)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    rng = random.Random(seed)
    history: list[dict[str, Any]] = []
    running = 0.0
    bridge.train()
    for step in (bar := tqdm(range(1, steps + 1), desc=desc, leave=False)):
        batch = rng.sample(list(rows), min(batch_size, len(rows)))
        loss = answer_loss(bridge.forward_rows(batch), batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        running += loss.item()
        if step % log_every == 0 or step == steps:
            entry = {
                "step": step,
                "loss": running / (log_every if step % log_every == 0 else step % log_every),
            }
            running = 0.0
            entry |= on_step(step, entry["loss"]) if on_step else {}
            history.append(entry)
            bar.set_postfix(loss=f"{entry['loss']:.3f}")
    bridge.eval()
    return history


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().clone() for n, p in module.named_parameters() if p.requires_grad}


def save_trainable(module: nn.Module, path: Path | str) -> None:
    """Only the bridge: the trainable tensors by name (the frozen LM and encoder live elsewhere)."""
    save_file(trainable_state(module), str(path))


def load_trainable(module: nn.Module, path: Path | str) -> None:
    """Load a :func:`save_trainable` file; every saved tensor must land on a trainable parameter."""
    state = load_file(str(path))
    names = {n for n, p in module.named_parameters() if p.requires_grad}
    if set(state) != names:
        extra, missing = sorted(set(state) - names), sorted(names - set(state))
        raise PosttrainError(
            f"{path}: bridge weights do not fit this bridge (unexpected {extra[:3]}, missing {missing[:3]})"
        )
    module.load_state_dict(state, strict=False)


def sinusoid(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Fixed sin/cos encodings of (possibly fractional) positions: (N,) -> (N, dim)."""
    half = dim // 2
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / max(half, 1))
    angles = positions.float()[:, None] * freq[None, :]
    out = torch.cat([angles.sin(), angles.cos()], dim=-1)
    return F.pad(out, (0, dim - out.shape[-1]))


def grid_positions(n: int, dim: int) -> torch.Tensor:
    """2-D sin/cos encodings for ``n`` features of a square map (row half, column half); 1-D otherwise."""
    side = math.isqrt(n)
    if side * side != n:
        return sinusoid(torch.arange(n), dim)
    rows, cols = torch.arange(n) // side, torch.arange(n) % side
    return torch.cat([sinusoid(rows, dim // 2), sinusoid(cols, dim - dim // 2)], dim=-1)
