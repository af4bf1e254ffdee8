"""Stage ``multimodal``: teach the SFT policy to answer questions about images through a bridge.

The vision encoder (ImageNet MobileNetV2) and the LM (``paths.sft_model``, merged) stay frozen;
only the bridges learn: Flamingo's Perceiver resampler and tanh-gated cross-attention blocks,
and/or PaLM-E's projector (plus LoRA when ``palme.lm: lora``). Visual features are computed once
(the encoder is frozen, so this equals running it every step) and both bridges train on the same
rows: single-image questions, a share with solved image examples before the query
(``interleaved_share``), and optionally captions (``caption_share``).

``metrics/multimodal.json``: per bridge ``accuracy`` (greedy exact match on held-out images),
``accuracy_by_kind``, ``few_shot_accuracy`` (``few_shot`` solved examples, then the query image),
``trainable_params``/``trainable_share``, ``train_seconds`` and (Flamingo) the final
``gate_values``; beside them ``text_only_accuracy`` (the LM answering from the question alone),
``blind_accuracy`` (each question's most common training answer: the best any image-blind
answerer can do) and ``init_max_abs_logit_diff`` (Flamingo at init vs the bare LM, same tokens
and images: 0 when the gates start closed). ``plots/multimodal_gates.png`` draws the gates.
"""

from __future__ import annotations

import copy
import csv
import os
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from components.artifacts import atomic_dir, describe_output, write_text_atomic
from components.charts import loss_chart
from components.config import to_dict
from components.data.jsonl import write_jsonl
from components.errors import DataError
from components.models.loading import load_tokenizer, require_dir
from components.multimodal import saved, shapes, vision
from components.multimodal.bridging import (
    BareLM,
    PromptFormat,
    Row,
    accuracy,
    check_fits,
    greedy_answers,
    normalise_answer,
    train_bridge,
)
from components.params import MultimodalConfig, Params
from components.peft.adapters import load_policy, record_base
from components.peft.methods import param_counts
from components.tracking import Tracker
from tasks.stage import stage_command

STAGE = "multimodal"
CAPTION_QUESTION = "describe the picture."


def load_task(cfg: MultimodalConfig, data_dir: Path) -> tuple[list[shapes.Example], list[shapes.Example]]:
    """(train, eval): the user's JSONL files, or the shapes task drawn into ``data_dir``."""
    if cfg.train_data:
        return shapes.load_examples(cfg.train_data), shapes.load_examples(cfg.eval_data)
    train = shapes.generate(data_dir, "train", cfg.n_train, cfg.seed, cfg.image_size, cfg.max_objects)
    test = shapes.generate(data_dir, "eval", cfg.n_eval, cfg.seed, cfg.image_size, cfg.max_objects)
    write_jsonl(data_dir / "train.jsonl", shapes.as_records(train))
    write_jsonl(data_dir / "eval.jsonl", shapes.as_records(test))
    return [replace(e, image=str(data_dir / e.image)) for e in train], [
        replace(e, image=str(data_dir / e.image)) for e in test
    ]


def features_of(encoder: vision.MobileNetV2, examples: list[shapes.Example], size: int) -> torch.Tensor:
    from tqdm.auto import tqdm

    pixels = [shapes.load_image(e.image, size) for e in tqdm(examples, desc="images", leave=False)]
    return vision.encode(encoder, pixels)


def solved(example: shapes.Example) -> str:
    return f"{shapes.IMAGE_MARKER} {example.question} {example.answer}"


def interleaved_row(
    fmt: PromptFormat,
    bridge: Any,
    query: int,
    shots: list[int],
    examples: list[shapes.Example],
    features: torch.Tensor,
    answer: bool,
) -> tuple[Row, int]:
    """The query after solved examples (the most that fit the LM's context); (row, shots used)."""
    q = examples[query]
    for k in range(len(shots), -1, -1):
        used = shots[len(shots) - k :]
        text = "\n".join([solved(examples[i]) for i in used] + [f"{shapes.IMAGE_MARKER} {q.question}"])
        row = fmt.row(text, [features[i] for i in used + [query]], q.answer if answer else None)
        try:
            check_fits(bridge, row)
            return row, k
        except DataError:  # too long for the LM's context: drop the oldest solved example
            continue
    raise AssertionError("unreachable: a single-image row was checked before")


def same_kind(examples: list[shapes.Example], index: int, k: int, rng: random.Random) -> list[int]:
    pool = [i for i, e in enumerate(examples) if e.kind == examples[index].kind and i != index]
    return rng.sample(pool, min(k, len(pool)))


def evaluate(
    bridge: Any, fmt: PromptFormat, rows: list[Row], expected: list[str], max_new_tokens: int
) -> tuple[float, list[str]]:
    ids = greedy_answers(bridge, rows, fmt.stop_ids, max_new_tokens=max_new_tokens)
    predicted = [fmt.tokenizer.decode(a, skip_special_tokens=True) for a in ids]
    return accuracy(predicted, expected), predicted


def by_kind(predicted: list[str], examples: list[shapes.Example]) -> dict[str, float]:
    groups: dict[str, list[bool]] = {}
    for p, e in zip(predicted, examples, strict=True):
        groups.setdefault(e.kind, []).append(normalise_answer(p) == normalise_answer(e.answer))
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}


def frozen_fingerprint(module: torch.nn.Module) -> float:
    """A cheap checksum of the frozen tensors (sum of |w| in float64): it moves if any frozen weight does."""
    return float(sum(p.detach().double().abs().sum() for p in module.parameters() if not p.requires_grad))


def run_bridge(
    method: str,
    cfg: MultimodalConfig,
    lm: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    shape: dict[str, Any],
    data: dict[str, Any],
    out: Path,
) -> dict[str, Any]:
    """Build over ``lm`` (which it freezes and hooks into: pass a copy), train, evaluate and save
    one bridge; its metrics (and, in ``data["histories"]``, its training history)."""
    fmt = PromptFormat(tokenizer)
    bridge = saved.build_bridge(method, lm, tokenizer, shape)
    train, test, ftrain, ftest = data["train"], data["test"], data["ftrain"], data["ftest"]
    rng = random.Random(cfg.seed)
    rows = []
    for i, e in enumerate(train):
        if rng.random() < cfg.interleaved_share and cfg.few_shot:
            rows.append(
                interleaved_row(
                    fmt,
                    bridge,
                    i,
                    same_kind(train, i, rng.randint(1, cfg.few_shot), rng),
                    train,
                    ftrain,
                    True,
                )[0]
            )
        else:
            rows.append(fmt.row(f"{shapes.IMAGE_MARKER} {e.question}", [ftrain[i]], e.answer))
            check_fits(bridge, rows[-1], f"{e.image}: {e.question!r}")
        if e.caption and rng.random() < cfg.caption_share:
            rows.append(fmt.row(f"{shapes.IMAGE_MARKER} {CAPTION_QUESTION}", [ftrain[i]], e.caption))
    test_rows = [fmt.row(f"{shapes.IMAGE_MARKER} {e.question}", [ftest[i]]) for i, e in enumerate(test)]
    for row, e in zip(test_rows, test, strict=True):
        check_fits(bridge, replace(row, answer=[0] * cfg.max_new_tokens), f"{e.image}: {e.question!r}")
    metrics: dict[str, Any] = {}
    if method == "flamingo":  # gates closed: the same tokens and images give the bare LM's logits
        probe = test_rows[:8]
        with torch.no_grad():
            gated = bridge.forward_rows(probe)
            bare = bridge.forward_rows([replace(r, images=[]) for r in probe])
        metrics["init_max_abs_logit_diff"] = float((gated - bare).abs().max())
    frozen_before = frozen_fingerprint(bridge)
    trainable, total = param_counts(bridge)
    # not training.cost.Stopwatch: importing it would add the verifier and generation to this stage's deps
    start = time.perf_counter()
    history = train_bridge(
        bridge,
        rows,
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        seed=cfg.seed,
        fast_names=("attn_gate", "ff_gate"),
        fast_multiplier=cfg.flamingo.gate_lr_multiplier,
        on_step=(lambda step, loss: bridge.gates()) if method == "flamingo" else None,
        desc=method,
    )
    seconds = time.perf_counter() - start
    acc, predicted = evaluate(bridge, fmt, test_rows, [e.answer for e in test], cfg.max_new_tokens)
    shots_rng = random.Random(cfg.seed + 1)
    few = [
        interleaved_row(fmt, bridge, i, same_kind(test, i, cfg.few_shot, shots_rng), test, ftest, False)
        for i in range(len(test))
    ]
    few_acc, _ = evaluate(bridge, fmt, [r for r, _ in few], [e.answer for e in test], cfg.max_new_tokens)
    metrics |= {
        "accuracy": acc,
        "accuracy_by_kind": by_kind(predicted, test),
        "few_shot_accuracy": few_acc,
        "few_shot_mean_shots": sum(k for _, k in few) / len(few),
        "trainable_params": trainable,
        "trainable_share": trainable / total,
        "train_seconds": round(seconds, 1),
        "final_loss": history[-1]["loss"],
        "frozen_unchanged": frozen_fingerprint(bridge) == frozen_before,
    }
    if method == "flamingo":
        metrics["gate_values"] = bridge.gates()
    saved.save_bridge(bridge, out, method)
    answers = [  # image paths relative to the output (it is renamed into place)
        {**e.record(), "image": os.path.relpath(e.image, out), "predicted": p}
        for e, p in zip(test, predicted, strict=True)
    ]
    write_jsonl(out / method / "eval_answers.jsonl", answers)  # every held-out answer, for a look
    data.setdefault("histories", {})[method] = history
    return metrics


def text_only_accuracy(
    lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, test: list[shapes.Example], max_new_tokens: int
) -> float:
    """The SFT policy answering each question with no image at all."""
    fmt = PromptFormat(tokenizer)
    bare = BareLM(lm, tokenizer.pad_token_id)
    return evaluate(
        bare, fmt, [fmt.row(e.question, []) for e in test], [e.answer for e in test], max_new_tokens
    )[0]


def write_gate_plots(plots_dir: Path, history: list[dict[str, Any]], tracker: Tracker) -> None:
    columns = [k for k in history[0] if k not in ("step", "loss")] if history else []
    path = plots_dir / "multimodal_gates.csv"
    plots_dir.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["step", *columns])
        writer.writerows([row["step"], *(round(row[c], 6) for c in columns)] for row in history)
    png = loss_chart(
        plots_dir / "multimodal_gates.png",
        history,
        columns,
        title="Flamingo gates: tanh(alpha)",
        ylabel="tanh(alpha)",
    )
    tracker.log_artifact(png, artifact_path="plots")


def write_loss_csv(plots_dir: Path, histories: dict[str, list[dict[str, Any]]]) -> None:
    """``plots/multimodal_loss.csv``: step, bridge, loss (``dvc plots`` draws one line per bridge)."""
    rows = "".join(f"{h['step']},{m},{h['loss']:.6f}\n" for m, hist in histories.items() for h in hist)
    write_text_atomic(plots_dir / "multimodal_loss.csv", "step,bridge,loss\n" + rows)


def run(params: Params, tracker: Tracker) -> dict[str, Any]:
    cfg = params.multimodal
    plots = Path(params.paths.plots)
    if not cfg.enabled:
        with atomic_dir(params.paths.multimodal) as tmp:
            describe_output(tmp, stage=STAGE, config=to_dict(cfg), seed=cfg.seed, inputs={})
        write_gate_plots(plots, [], tracker)
        write_loss_csv(plots, {})
        return {"enabled": False}
    sft = require_dir(params.paths.sft_model, "SFT model")
    methods = ["flamingo", "palme"] if cfg.method == "both" else [cfg.method]
    shapes_cfg = saved.shapes_from(cfg)
    with atomic_dir(params.paths.multimodal) as tmp:
        train, test = load_task(cfg, tmp / "data")
        state = vision.pretrained_state_dict()
        saved.save_encoder(state, tmp)
        encoder = vision.frozen_encoder(state)
        data: dict[str, Any] = {"train": train, "test": test}
        data["ftrain"] = features_of(encoder, train, cfg.image_size)
        data["ftest"] = features_of(encoder, test, cfg.image_size)
        tokenizer, lm = load_tokenizer(sft), load_policy(sft)  # loaded (merged) once; each bridge gets a copy
        metrics: dict[str, Any] = {
            "n_train": len(train),
            "n_eval": len(test),
            "visual_tokens_per_image": int(data["ftest"].shape[1]),
            "text_only_accuracy": text_only_accuracy(lm, tokenizer, test, cfg.max_new_tokens),
            "blind_accuracy": shapes.majority_accuracy(train, test),
        }
        for method in methods:
            result = run_bridge(method, cfg, copy.deepcopy(lm), tokenizer, shapes_cfg[method], data, tmp)
            if "init_max_abs_logit_diff" in result:
                metrics["init_max_abs_logit_diff"] = result.pop("init_max_abs_logit_diff")
            metrics[method] = result
        saved.save_config(
            tmp,
            {"lm": sft.as_posix(), "methods": methods, "image_size": cfg.image_size, "shapes": shapes_cfg},
        )
        record_base(tmp, sft)
        reproducible = {  # train_seconds is measured, not reproducible: kept out of the output's bytes
            k: {m: v for m, v in val.items() if m != "train_seconds"} if isinstance(val, dict) else val
            for k, val in metrics.items()
        }
        inputs = {"sft_model": sft}
        describe_output(
            tmp, stage=STAGE, config=to_dict(cfg), seed=cfg.seed, inputs=inputs, metrics=reproducible
        )
    write_gate_plots(plots, data.get("histories", {}).get("flamingo", []), tracker)
    write_loss_csv(plots, data.get("histories", {}))
    return metrics


main = stage_command(STAGE, run)

if __name__ == "__main__":
    main()
