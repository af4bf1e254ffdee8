"""The typed shape of ``params.yaml``: one frozen dataclass per section.

These classes are deliberately import-light (no torch) so that the CLI, the flow and the
contract test can validate a params file in milliseconds. Defaults here equal the shipped
``params.yaml``; the contract test asserts both agree key for key.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from components.config import ConfigError, build, read_params


@dataclass(frozen=True)
class PathsConfig:
    """Where stages write; ``dvc.yaml``'s ``outs`` use the same paths (contract-tested)."""

    base_model: str = "models/base"
    processed: str = "data/processed"
    sft_model: str = "models/sft"
    preferences: str = "data/preferences"
    reward_model: str = "models/reward_model"
    aligned_model: str = "models/aligned"
    compressed_model: str = "models/compressed"
    evaluation: str = "data/evaluation"
    rag: str = "data/rag"
    metrics: str = "metrics"
    plots: str = "plots"


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow: an sqlite file and a repo-local artifact root by default, a server URI when outgrown."""

    tracking_uri: str = "sqlite:///mlflow.db"
    artifact_root: str = "mlartifacts"
    experiment: str = "posttrain"
    registered_model: str = "posttrain-policy"
    log_models: bool = True


@dataclass(frozen=True)
class ComputeConfig:
    """Where training stages run: ``auto`` picks CUDA when present; ``processes > 1`` runs DDP.

    ``precision: auto`` is bf16 on a CUDA device that supports it, else fp32; on CPU each
    trainer keeps its own default (fp32 for pretraining, TRL's bf16 autocast for SFT, the reward
    model and DPO: the outputs of earlier releases). :func:`components.distributed.resolve_compute`
    resolves and checks both. With ``processes > 1`` a training stage re-executes itself under
    ``accelerate launch`` (gloo on CPU, nccl on CUDA). Stages that do not train ignore this section.
    """

    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    processes: int = 1

    def __post_init__(self) -> None:
        if self.processes < 1:
            raise ConfigError(f"compute.processes: expected an int >= 1, got {self.processes!r}")


@dataclass(frozen=True)
class BaseConfig:
    """``model: tiny`` builds a tokenizer and a small Llama locally; anything else is a Hub id or path."""

    model: str = "tiny"
    corpus: str = "data/corpus/pretrain.txt"
    seed: int = 0
    vocab_size: int = 320
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    max_position_embeddings: int = 128
    pretrain_epochs: int = 2
    pretrain_learning_rate: float = 3e-3
    pretrain_batch_size: int = 32
    pretrain_block_size: int = 64


@dataclass(frozen=True)
class IngestConfig:
    """Shipped verifier-graded tasks, or user JSONL (``sft_data``/``preference_data``; empty = shipped)."""

    sft_data: str = ""
    preference_data: str = ""
    facts: str = "data/tasks/facts.csv"
    tasks: tuple[str, ...] = ("add", "reverse", "upper", "capital")
    seed: int = 0
    n_sft_train: int = 6000
    n_sft_eval: int = 200
    n_preference_prompts: int = 1000
    n_eval_prompts: int = 200


@dataclass(frozen=True)
class PeftConfig:
    """PEFT adapter settings. ``method: none`` means a full fine-tune.

    ``modules_to_save`` trains the embeddings and LM head in full: the chat-template tokens
    never occur in pretraining text, so their rows must move, which a low-rank update of the
    attention/MLP weights cannot do.
    """

    method: Literal["lora", "none"] = "lora"
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    modules_to_save: tuple[str, ...] = ("embed_tokens", "lm_head")


@dataclass(frozen=True)
class SFTConfig:
    """TRL ``SFTTrainer`` on chat ``messages`` with assistant-only loss."""

    learning_rate: float = 3e-3
    epochs: int = 4
    batch_size: int = 32
    max_length: int = 64
    warmup_steps: int = 20
    lr_scheduler: str = "cosine"
    seed: int = 0
    peft: PeftConfig = field(default_factory=PeftConfig)


@dataclass(frozen=True)
class PreferencesConfig:
    """Sample ``k`` completions per prompt from the SFT policy, grade them, keep (right, wrong) pairs."""

    k: int = 8
    temperature: float = 1.3
    max_prompts: int = 1000
    max_new_tokens: int = 12
    batch_size: int = 64
    reference_as_chosen: bool = True
    eval_fraction: float = 0.15
    seed: int = 0


@dataclass(frozen=True)
class RewardModelConfig:
    """TRL ``RewardTrainer`` (Bradley-Terry) initialised from the SFT weights."""

    learning_rate: float = 1e-3
    epochs: int = 5
    batch_size: int = 16
    max_length: int = 64
    seed: int = 0


@dataclass(frozen=True)
class DPOConfig:
    """TRL ``DPOTrainer``; ``loss_type: [sigmoid, sft]`` adds an NLL term on chosen (the RPO recipe)."""

    beta: float = 0.1
    learning_rate: float = 5e-4
    epochs: int = 2
    batch_size: int = 16
    max_length: int = 64
    loss_type: tuple[str, ...] = ("sigmoid", "sft")
    loss_weights: tuple[float, ...] = (1.0, 1.0)


@dataclass(frozen=True)
class AlignConfig:
    """``method`` picks the algorithm module; each method has its own sub-section."""

    method: Literal["dpo"] = "dpo"
    seed: int = 0
    peft: PeftConfig = field(default_factory=PeftConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)


@dataclass(frozen=True)
class CompressConfig:
    """Merge the adapter into full-precision weights, then quantize (``none`` keeps the merge only)."""

    quantization: Literal["dynamic_int8", "none"] = "dynamic_int8"
    n_fidelity_prompts: int = 100


@dataclass(frozen=True)
class EvaluateConfig:
    """One held-out suite for every model; the gate compares the candidate with SFT and the champion.

    ``promotion_max_accuracy_drop`` is the largest drop of ``promotion_metric`` below the current
    champion that still promotes; the candidate may never score below SFT.
    """

    n_prompts: int = 200
    max_new_tokens: int = 12
    batch_size: int = 64
    sample_temperature: float = 1.0
    n_samples: int = 8
    seed: int = 0
    promotion_alias: str = "champion"
    promotion_metric: Literal["accuracy", "sampled_accuracy", "reward_mean"] = "accuracy"
    promotion_max_accuracy_drop: float = 0.02


@dataclass(frozen=True)
class RagIndexConfig:
    """Milvus collection with a dense (MiniLM) and a BM25 sparse field; ``uri`` may be a server URL."""

    docs_dir: str = "data/docs"
    uri: str = "data/rag/milvus.db"
    collection: str = "posttrain_docs"
    embedding_model: str = "minilm"
    chunk_max_characters: int = 500
    chunk_overlap: int = 50
    top_k: int = 5
    mode: Literal["dense", "sparse", "hybrid"] = "hybrid"


@dataclass(frozen=True)
class Params:
    """The whole params file."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    base: BaseConfig = field(default_factory=BaseConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    preferences: PreferencesConfig = field(default_factory=PreferencesConfig)
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    rag_index: RagIndexConfig = field(default_factory=RagIndexConfig)


SECTIONS: tuple[str, ...] = tuple(f.name for f in fields(Params))


def parse_params(data: dict[str, Any]) -> Params:
    """Validate a params mapping; errors name the dotted key (``sft.peft.r``)."""
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section (allowed: {', '.join(SECTIONS)})")
    classes = {f.name: f.default_factory for f in fields(Params)}
    for name in SECTIONS:
        if data.get(name) is not None and not isinstance(data[name], dict):
            raise ConfigError(f"{name}: expected a mapping of keys, got {type(data[name]).__name__}")
    return Params(**{name: build(classes[name], data.get(name), name) for name in SECTIONS})  # type: ignore[arg-type]


def load_params(path: Path | str = "params.yaml") -> Params:
    """Read and validate ``params.yaml``."""
    return parse_params(read_params(path))
