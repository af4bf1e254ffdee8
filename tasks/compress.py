"""Stage ``compress``: merge the aligned adapter into full-precision weights, then quantize.

Output layout (``paths.compressed_model``): ``merged/`` (the full-precision merged model in
transformers format, which ``tasks/promote.py`` registers in MLflow as
``tracking.registered_model``) and, beside it unless ``compress.quantization: none``,
``model.int8.safetensors`` + ``config.json`` + tokenizer (the quantized model). ``config.yaml``'s
``quantization`` says which method wrote it; ``load_compressed(dir)`` loads it accordingly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from components.artifacts import atomic_dir, describe_output
from components.compression.quantize import (
    dir_size,
    load_compressed,
    mean_token_kl,
    quantize_dynamic_int8,
    quantize_int8_weight,
    save_int8,
    save_int8_weight,
)
from components.config import to_dict
from components.data.jsonl import read_jsonl
from components.models.loading import load_tokenizer, require_dir, save_model
from components.params import Params
from components.peft.adapters import load_policy
from components.tracking import Tracker
from tasks.stage import stage_command


def run(params: Params, tracker: Tracker) -> dict[str, Any]:
    cfg = params.compress
    aligned = require_dir(params.paths.aligned_model, "aligned model")
    tokenizer = load_tokenizer(aligned)
    merged = load_policy(aligned)  # adapters merged in fp32, never into a quantized base
    prompts = read_jsonl(Path(params.paths.processed) / "eval_prompts.jsonl")[: cfg.n_fidelity_prompts]
    sequences = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["answer"]}],
            tokenize=True,
            return_dict=False,
        )
        for p in prompts
    ]
    out = Path(params.paths.compressed_model)
    with atomic_dir(out) as tmp:
        save_model(merged, tokenizer, tmp / "merged")
        if cfg.quantization == "int8_weight":
            save_int8_weight(quantize_int8_weight(merged), tmp)
        elif cfg.quantization == "dynamic_int8":
            save_int8(quantize_dynamic_int8(merged), tmp)
        if cfg.quantization != "none":
            merged.config.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
        # Reload from disk: fidelity is measured on what was saved. config.yaml (which names the
        # method for every later load) is written last, so the method is passed here.
        compressed = load_compressed(tmp, cfg.quantization)
        size_full = dir_size(tmp / "merged")
        size_compressed = dir_size(tmp) if cfg.quantization != "none" else size_full
        metrics = {
            "quantization": cfg.quantization,
            "size_bytes_full": size_full,
            "size_bytes_compressed": size_compressed,
            "compression_ratio": size_full / size_compressed,
            "fidelity_kl": mean_token_kl(merged, compressed, sequences),
            "n_fidelity_prompts": len(sequences),
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
