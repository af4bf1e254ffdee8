"""Pinned figures of the tiny test config (``tests/conftest.py``), checked by ``test_stages.py``.

Every stage is seeded and runs on CPU (fp32) with 2 threads, so these are reproducible bit for
bit on one machine: separate processes and the pytest run gave identical metrics, to the last
float bit. (The TRL trainers used to run with bf16 autocast on CPU, TRL's default; since
``compute.precision: auto`` resolves to fp32 on CPU they run in fp32, and these are the fp32
figures.) Floats are
compared with ``rel=REL``; counts, sizes and strings exactly. Any silent change to a trainer,
a default, the data generator or a library version shows up here as a failing figure.

To update after an intended change: run ``pytest tests/integration/test_stages.py``; each
failing check prints the stage's full metrics, which can be pasted over the old dict.
"""

from __future__ import annotations

REL = 1e-4  # relative tolerance for every float below

BASE = {
    "n_parameters": 39840,
    "vocab_size": 300,
    "pretrain_first_loss": 5.694896697998047,
    "pretrain_final_loss": 4.662711143493652,
}

INGEST = {
    "n_sft_train": 160,
    "n_sft_eval": 16,
    "n_preference_prompts": 48,
    "n_eval_prompts": 16,
    "sft_train_tasks": {"add": 40, "capital": 40, "reverse": 40, "upper": 40},
}

SFT = {
    "n_train": 160,
    "n_eval": 16,
    "first_loss": 5.005208492279053,
    "final_loss": 3.9157674312591553,
    "eval_loss": 3.9806838035583496,
    "peft_method": "lora",
    "eval_accuracy": 0.0,  # the tiny test policy answers no held-out prompt yet
    "eval_reward": 0.0,
    "n_eval_prompts": 16,
}

# The tiny SFT policy never samples a right answer, so every pair has the reference as chosen.
PREFERENCES = {
    "n_prompts": 48,
    "n_pairs": 48,
    "n_pairs_sampled": 0,
    "n_pairs_reference": 48,
    "n_prompts_all_correct": 0,
    "n_prompts_all_wrong": 48,
    "sample_accuracy": 0.0,
    "n_train": 41,
    "n_eval": 7,
    "n_user_pairs": 0,
}

REWARD_MODEL = {
    "n_train": 41,
    "n_eval": 7,
    "pairwise_accuracy": 7 / 7,
    "train_pairwise_accuracy": 39 / 41,
    "peft_method": "full",
    "eval_accuracy": 7 / 7,
}

ALIGN = {
    "method": "dpo",
    "peft_method": "lora",
    "eval_accuracy": 0.0,  # = accuracy_end
    "reward": "verifier",
    "n_train": 41,
    "n_eval": 7,
    "loss": 4.423243045806885,
    "eval_loss": 4.74657678604126,
    "eval_rewards_accuracies": 1.0,
    "eval_rewards_margins": 0.023252638056874275,
    "entropy": 4.7255988121032715,
    # the held-out report (components/training/report.py); the tiny test policy scores ~0 either way
    "n_report_prompts": 8.0,
    "reward_mean_start": 0.0091656454248366,
    "reward_mean_end": 0.0091656454248366,
    "accuracy_start": 0.0,
    "accuracy_end": 0.0,
    "kl_to_ref": -0.0012250542640686035,  # a Monte-Carlo estimate: ~0 for an adapter this small
}

COMPRESS = {
    "method": "int8_weight",
    "n_fidelity_prompts": 8,
    "accuracy_merged": 0.0,
    "accuracy_compressed": 0.0,
    "accuracy_delta": 0.0,
    "size_bytes_full": 161496,
    "size_bytes_compressed": 76168,
    "compression_ratio": 161496 / 76168,
}
# fidelity_kl is float32 rounding noise at this size (5.7e-07 on one CPU, 6.1e-07 on another):
# bounded in the test instead of pinned.
COMPRESS_MAX_FIDELITY_KL = 1e-5

# evaluate: only the per-model suite numbers and the RM/KL figures. The promotion/gate fields
# are being redesigned and are deliberately not pinned. The tiny policy gets nothing right, so
# lenient accuracy is 0 too (verify_lenient's own cases are in tests/unit/test_verifier_tasks.py).
_ZERO_BY_TASK = {"add": 0.0, "capital": 0.0, "reverse": 0.0, "upper": 0.0}
_ZERO_ACCURACY = {
    "accuracy": 0.0,
    "sampled_accuracy": 0.0,
    "accuracy_by_task": _ZERO_BY_TASK,
    "lenient_accuracy": 0.0,
    "lenient_accuracy_by_task": _ZERO_BY_TASK,
}
EVALUATE = {
    "base": {**_ZERO_ACCURACY, "reward_mean": 0.007161458333333333, "perplexity": 153.10934498023775},
    "sft": {**_ZERO_ACCURACY, "reward_mean": 0.004836309523809524, "perplexity": 58.79142896629611},
    "aligned": {**_ZERO_ACCURACY, "reward_mean": 0.004836309523809524, "perplexity": 57.57520480396085},
    "compressed": {**_ZERO_ACCURACY, "reward_mean": 0.004836309523809524, "perplexity": 57.59839502717108},
    "kl_aligned_vs_sft": 0.0006479880226006408,
    "reward_model_pairwise_accuracy": 7 / 7,
}

# rag_index: the tiny params chunk by_title at 80 tokens (16 overlap); a fresh build adds every chunk.
RAG_INDEX = {
    "n_documents": 8,
    "n_chunks": 63,
    "n_unchanged": 0,
    "chunks_added": 63,
    "chunks_updated": 0,
    "chunks_removed": 0,
    "n_pruned_files": 0,
    "n_duplicates": 0,
    "n_quarantined": 0,
    "n_skipped": 0,
    "cleaning": {"boilerplate": 0, "empty": 0, "headers_footers": 0},
    "skipped": [],
    "duplicates": [],
    "quarantined": [],
}

# ---------------------------------------------------------------------------- output file sets
# The exact relative paths of the files in each stage's output directory (directories implied).

_SELF_DESCRIPTION = {"config.yaml", "manifest.json", "metrics.json"}
_HF_TOKENIZER = {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
_ADAPTER = {"adapter_config.json", "adapter_model.safetensors", "README.md", "base_model.json"}
# What a training stage measures about its cost (components/training/cost.py): present, not pinned.
COST_KEYS = frozenset(
    {
        "trainable_params",
        "total_params",
        "trainable_share",
        "peak_memory_bytes",
        "train_seconds",
        "adapter_bytes",
    }
)

# models/compressed: expected to change shape soon (registration moved out of compress); update here.
COMPRESSED_FILES = frozenset(
    _SELF_DESCRIPTION
    | _HF_TOKENIZER
    | {"config.json", "model.int8.safetensors"}
    | {
        "merged/config.json",
        "merged/generation_config.json",
        "merged/model.safetensors",
        "merged/tokenizer.json",
        "merged/tokenizer_config.json",
        "merged/chat_template.jinja",
    }
)

OUTPUT_FILES = {
    "models/base": frozenset(
        _SELF_DESCRIPTION | _HF_TOKENIZER | {"config.json", "generation_config.json", "model.safetensors"}
    ),
    "data/processed": frozenset(
        _SELF_DESCRIPTION
        | {"sft_train.jsonl", "sft_eval.jsonl", "preference_prompts.jsonl", "eval_prompts.jsonl"}
    ),
    "models/sft": frozenset(_SELF_DESCRIPTION | _HF_TOKENIZER | _ADAPTER),
    "data/preferences": frozenset(_SELF_DESCRIPTION | {"train.jsonl", "eval.jsonl"}),
    "models/reward_model": frozenset(
        _SELF_DESCRIPTION | _HF_TOKENIZER | {"config.json", "model.safetensors"}
    ),
    "models/aligned": frozenset(_SELF_DESCRIPTION | _HF_TOKENIZER | _ADAPTER),
    "models/compressed": COMPRESSED_FILES,
    "data/evaluation": frozenset(_SELF_DESCRIPTION | {"answers.json"}),
}

# data/rag: the top-level entries only; milvus.db is Milvus Lite's own directory (LOCK, WAL,
# parquet segments), whose inner layout belongs to the library, not to this pipeline.
RAG_ENTRIES = frozenset(_SELF_DESCRIPTION | {"skipped.json", "milvus.db"})
