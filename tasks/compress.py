"""Stage ``compress``: merge the aligned adapter into full-precision weights, then compress the merge.

Output layout (``paths.compressed_model``): ``merged/`` (the full-precision merged model in
transformers format, which ``tasks/promote.py`` registers in MLflow as
``tracking.registered_model``) and, beside it unless ``compress.method: none``, the compressed
model: ``config.json`` + tokenizer + the method's weights file (``model.int8.safetensors``,
``model.int4.safetensors`` or ``bitdelta.safetensors`` + ``bitdelta.json``, which names the base
the delta belongs to). ``config.yaml``'s ``method`` says which method wrote it;
``components.compression.methods.load_compressed(dir)`` loads it accordingly.

Every method is measured against the merged model on the same held-out prompts
(``metrics/compress.json``): size (``compression_ratio``; for ``bitdelta`` the delta file alone,
since the base is shared by every fine-tune of it), ``fidelity_kl`` (mean token KL on reference
answers), ``accuracy_delta`` (greedy exact-match accuracy, compressed minus merged) and
``speed_ratio`` (greedy generation tokens/s, compressed over merged, measured side by side).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from components.artifacts import atomic_dir, describe_output, write_text_atomic
from components.compression.methods import BITDELTA_BASE_FILE, load_compressed
from components.compression.quantize import (
    mean_token_kl,
    quantize_int4_weight,
    quantize_int8_dynamic,
    quantize_int8_weight,
    save_int8,
    save_weight_only,
)
from components.config import to_dict
from components.data.jsonl import read_jsonl
from components.data.verifier import verify
from components.evaluation.generate import generate
from components.models.loading import dir_size, load_tokenizer, param_count, require_dir, save_model
from components.params import BitDeltaConfig, DistillConfig, Params, PruneConfig
from components.peft.adapters import load_policy
from components.tracking import Tracker
from tasks.stage import stage_command


def conversation_ids(
    tokenizer: PreTrainedTokenizerBase, conversations: Sequence[list[dict]]
) -> list[list[int]]:
    return [list(tokenizer.apply_chat_template(c, tokenize=True, return_dict=False)) for c in conversations]


def greedy_accuracy_and_speed(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[dict[str, str]],
    max_new_tokens: int,
) -> tuple[float, float]:
    """(exact-match accuracy, generated tokens per second) of greedy answers to ``prompts``.

    One untimed warm-up call first, so neither side of a comparison pays the first-call costs.
    """
    generate(model, tokenizer, [prompts[0]["prompt"]], max_new_tokens=max_new_tokens)
    start = time.perf_counter()
    outputs = generate(model, tokenizer, [p["prompt"] for p in prompts], max_new_tokens=max_new_tokens)
    seconds = time.perf_counter() - start
    tokens = sum(len(tokenizer(o[0], add_special_tokens=False)["input_ids"]) + 1 for o in outputs)
    accuracy = sum(verify(o[0], p["answer"]) for o, p in zip(outputs, prompts, strict=True)) / len(prompts)
    return accuracy, tokens / seconds


def bitdelta(
    merged: nn.Module, base_dir: Path, calibration: list[list[int]], cfg: BitDeltaConfig, out: Path
) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """Build, distil and save the Bit-Delta of ``merged`` over the base; (metrics, distillation history)."""
    from components.compression import bitdelta as bd

    base = load_policy(base_dir)  # models/sft is an adapter chain: merged in fp32
    student = bd.build_bitdelta_model(base, merged)
    kl_before = bd.mean_kl(merged, student, calibration[: min(len(calibration), 32)])
    history = bd.distill_scales(
        student,
        merged,
        calibration,
        objective=cfg.objective,
        steps=cfg.steps,
        learning_rate=cfg.learning_rate,
        batch_size=cfg.batch_size,
        progress=True,
    )
    kl_after = bd.mean_kl(merged, student, calibration[: min(len(calibration), 32)])
    bd.save_bitdelta(student, out, bd.base_weights_hash(base))
    write_text_atomic(out / BITDELTA_BASE_FILE, json.dumps({"base_model": base_dir.as_posix()}) + "\n")
    fp16_bytes, packed_bytes = bd.delta_bytes(student)
    metrics = {
        "delta_compression_vs_fp16": fp16_bytes / packed_bytes,
        "delta_bytes_fp16": fp16_bytes,
        "delta_bytes_packed": packed_bytes,
        "kl_before_distill": kl_before,
        "kl_after_distill": kl_after,
        "n_calibration": len(calibration),
    }
    return metrics, history


def prune(
    merged: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    sequences: list[list[int]],
    cfg: PruneConfig,
    out: Path,
) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """Prune a copy of ``merged`` as ``cfg.kind`` says, recover, save; (metrics, recovery history)."""
    import copy

    from components.compression import prune as pr

    model = copy.deepcopy(merged).requires_grad_(True)  # the loaded policy comes frozen
    if cfg.kind == "mlp_channels":
        pr.prune_mlp_channels(model, cfg.keep_ratio)
        masks: dict = {}
    elif cfg.kind == "n_m":
        masks = pr.n_m_prune(model, cfg.n, cfg.m)
    else:
        masks = pr.magnitude_prune(model, cfg.sparsity)
    history = pr.recovery_finetune(
        model, masks, sequences, cfg.recovery_steps, cfg.recovery_learning_rate, cfg.batch_size, progress=True
    )
    model.eval()
    if cfg.kind == "mlp_channels":
        save_model(model, tokenizer, out)  # physically smaller: an ordinary checkpoint
    else:
        pr.save_sparse(model, out)
    report = pr.sparsity_report(model)
    metrics = {
        "prune_kind": cfg.kind,
        "sparsity": report["sparsity"],
        "params_total": report["total_params"],
        "params_merged": param_count(merged),
        "recovery_loss_start": history[0]["loss"] if history else None,
        "recovery_loss_end": history[-1]["loss"] if history else None,
    }
    return metrics, history


def distill(
    merged: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[list[dict]],
    cfg: DistillConfig,
    out: Path,
) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """Distil ``merged`` into a smaller student started from its layers, save it; (metrics, history)."""
    from components.compression import distill as ds
    from components.training.sft import completion_example, stop_token_ids

    stop_ids = stop_token_ids(tokenizer, merged)
    examples = [completion_example(tokenizer, c, stop_ids) for c in conversations]
    config = ds.student_config(merged.config, cfg.num_layers, cfg.intermediate_size or None)
    student, layers = ds.init_student(merged, config)
    history = ds.distill(
        student,
        merged,
        [e["input_ids"] for e in examples],
        [e["completion_mask"] for e in examples],  # CE on the replies only; KD on every token
        steps=cfg.steps,
        learning_rate=cfg.learning_rate,
        batch_size=cfg.batch_size,
        temperature=cfg.temperature,
        alpha_ce=cfg.alpha_ce,
        progress=True,
    )
    student.eval()
    save_model(student, tokenizer, out)
    metrics = {
        "student_layers": config.num_hidden_layers,
        "student_intermediate_size": config.intermediate_size,
        "teacher_layers_used": layers,
        "params_student": param_count(student),
        "params_teacher": param_count(merged),
        "distill_loss_start": history[0]["loss"] if history else None,
        "distill_loss_end": history[-1]["loss"] if history else None,
    }
    return metrics, history


def run(params: Params, tracker: Tracker) -> dict[str, Any]:
    cfg = params.compress
    processed = Path(params.paths.processed)
    aligned = require_dir(params.paths.aligned_model, "aligned model")
    tokenizer = load_tokenizer(aligned)
    merged = load_policy(aligned)  # adapters merged in fp32, never into a quantized base
    prompts = read_jsonl(processed / "eval_prompts.jsonl")[: cfg.n_fidelity_prompts]
    sequences = conversation_ids(
        tokenizer,
        [
            [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["answer"]}]
            for p in prompts
        ],
    )
    max_new_tokens = params.evaluate.max_new_tokens
    train = read_jsonl(processed / "sft_train.jsonl")  # calibration / recovery text, disjoint from eval
    out = Path(params.paths.compressed_model)
    extra: dict[str, Any] = {}
    history: list[dict[str, float]] = []
    with atomic_dir(out) as tmp:
        save_model(merged, tokenizer, tmp / "merged")
        if cfg.method in ("int8_weight", "int4_weight"):
            quantize = quantize_int8_weight if cfg.method == "int8_weight" else quantize_int4_weight
            save_weight_only(quantize(merged), tmp, cfg.method)
        elif cfg.method == "int8_dynamic":
            save_int8(quantize_int8_dynamic(merged), tmp)
        elif cfg.method == "bitdelta":
            base_path = params.paths.sft_model if cfg.bitdelta.base == "sft" else params.paths.base_model
            base_dir = require_dir(base_path, f"Bit-Delta base ({cfg.bitdelta.base})")
            calibration_records = train[: cfg.bitdelta.n_calibration]
            calibration = conversation_ids(tokenizer, [r["messages"] for r in calibration_records])
            extra, history = bitdelta(merged, base_dir, calibration, cfg.bitdelta, tmp)
        elif cfg.method == "prune":
            sequences_train = conversation_ids(
                tokenizer, [r["messages"] for r in train[: cfg.prune.n_sequences]]
            )
            extra, history = prune(merged, tokenizer, sequences_train, cfg.prune, tmp)
        elif cfg.method == "distill":
            conversations = [r["messages"] for r in train[: cfg.distill.n_sequences]]
            extra, history = distill(merged, tokenizer, conversations, cfg.distill, tmp)
        elif cfg.method in ("nf4", "llm_int8"):
            from components.compression.bnb import quantize_bnb, quantized_weight_bytes, save_bnb

            save_bnb(quantize_bnb(tmp / "merged", cfg.method), tmp)
            quantized, fp16 = quantized_weight_bytes(tmp)
            extra = {"quantized_weight_bytes_ratio": quantized / fp16}
        # the methods that train log one loss curve: scales/student distillation, or pruning recovery
        loss_name = "compress/recovery_loss" if cfg.method == "prune" else "compress/distill_loss"
        for row in history:
            tracker.log_metrics({loss_name: row["loss"]}, step=int(row["step"]))
        if cfg.method not in ("none", "prune", "distill", "nf4", "llm_int8"):  # those save their own config
            merged.config.save_pretrained(str(tmp))
        if cfg.method != "none":
            tokenizer.save_pretrained(str(tmp))
        # Reload from disk: fidelity is measured on what was saved. config.yaml (which names the
        # method for every later load) is written last, so the method is passed here.
        compressed = load_compressed(tmp, cfg.method)
        size_full = dir_size(tmp / "merged")
        size_compressed = dir_size(tmp) if cfg.method != "none" else size_full
        merged_accuracy, merged_speed = greedy_accuracy_and_speed(merged, tokenizer, prompts, max_new_tokens)
        accuracy, speed = greedy_accuracy_and_speed(compressed, tokenizer, prompts, max_new_tokens)
        metrics = {
            "method": cfg.method,
            "size_bytes_full": size_full,
            "size_bytes_compressed": size_compressed,
            "compression_ratio": size_full / size_compressed,
            "fidelity_kl": mean_token_kl(merged, compressed, sequences),
            "accuracy_merged": merged_accuracy,
            "accuracy_compressed": accuracy,
            "accuracy_delta": accuracy - merged_accuracy,
            "speed_ratio": speed / merged_speed,
            "n_fidelity_prompts": len(sequences),
            **extra,
        }
        describe_output(
            tmp,
            stage="compress",
            config=to_dict(cfg),
            seed=None,
            metrics=metrics,
            inputs={"aligned_model": aligned},
        )
    return metrics


main = stage_command("compress", run)

if __name__ == "__main__":
    main()
