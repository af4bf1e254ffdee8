"""The typed shape of ``params.yaml``: one frozen dataclass per section.

These classes are deliberately import-light (no torch) so that the CLI, the flow and the
contract test can validate a params file in milliseconds. Defaults here equal the shipped
``params.yaml``; the contract test asserts both agree key for key.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, Literal

from components.config import ConfigError, NonEmpty, OneOf, Pattern, Range, collect, read_params

# Copies, not imports, of components.data.verifier.TASKS/PROMPT_STYLES and components.rag.chunking's
# MAX_CHUNK_TOKENS: every stage imports this module, and dvc.yaml lists each stage's imports as
# its deps (tests/unit/test_lineage.py). tests/unit/test_config.py asserts the copies stay equal.
TASKS: tuple[str, ...] = ("add", "reverse", "upper", "capital")
PROMPT_STYLES: tuple[str, ...] = ("terse", "instruct")
LOG_MODELS: tuple[str, ...] = ("none", "adapters", "all")  # tracking.log_models, smallest first
PROMPTINGS: tuple[str, ...] = ("zero_shot", "few_shot", "cot")  # components.evaluation.prompting
MAX_CHUNK_TOKENS = 2048

# Value types with their ranges; the loader (components.config.build) checks them and names the key.
Count = Annotated[int, Range(ge=1)]  # a size or a number of things that must be at least one
NonNegativeInt = Annotated[int, Range(ge=0)]
Seed = Annotated[int, Range(ge=0, le=2**32 - 1)]  # numpy's seed range (transformers.set_seed seeds numpy)
LearningRate = Annotated[float, Range(ge=0)]  # 0 is allowed: a stage that leaves the weights as they are
Positive = Annotated[float, Range(gt=0)]
Fraction = Annotated[float, Range(ge=0, lt=1)]
Generations = Annotated[int, Range(ge=2)]  # samples per prompt: a pair or a group baseline needs two
Text = Annotated[str, NonEmpty()]  # a path, URI or name that must not be blank

# transformers' SchedulerType values that need no ``lr_scheduler_kwargs`` (which sft does not expose):
# cosine_with_min_lr, cosine_warmup_with_min_lr and warmup_stable_decay fail without them.
LR_SCHEDULERS: tuple[str, ...] = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "greedy",
)
# The loss types TRL 1.16's DPOTrainer accepts (trl/trainer/dpo_config.py, ``loss_type``).
DPO_LOSS_TYPES: tuple[str, ...] = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)


@dataclass(frozen=True)
class PathsConfig:
    """Where stages write; ``dvc.yaml``'s ``outs`` use the same paths (contract-tested)."""

    base_model: Text = "models/base"
    processed: Text = "data/processed"
    sft_model: Text = "models/sft"
    preferences: Text = "data/preferences"
    reward_model: Text = "models/reward_model"
    aligned_model: Text = "models/aligned"
    compressed_model: Text = "models/compressed"
    evaluation: Text = "data/evaluation"
    rag: Text = "data/rag"
    reranker: Text = "models/reranker"
    multimodal: Text = "models/multimodal"
    metrics: Text = "metrics"
    plots: Text = "plots"

    def cross_check(self) -> Iterator[tuple[str, str]]:
        seen: dict[str, str] = {}
        for f in fields(self):
            path = Path(getattr(self, f.name)).as_posix()
            if path in seen:
                yield f.name, f"must differ from paths.{seen[path]} (both are {path!r})"
            seen.setdefault(path, f.name)


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow: an sqlite file and a repo-local artifact root by default, a server URI when outgrown."""

    tracking_uri: Text = "sqlite:///mlflow.db"
    artifact_root: Text = "mlartifacts"
    experiment: Text = "posttrain"
    registered_model: Text = "posttrain-policy"
    log_models: Annotated[str, OneOf(LOG_MODELS)] = "all"

    def logs_model(self, model_dir: Path | str) -> bool:
        """Whether a stage logs the model in ``model_dir`` under ``log_models``.

        ``all``: every model (base once per content hash, adapters, the reward model, every
        registered candidate); ``adapters``: only PEFT adapters (a directory with
        ``adapter_config.json``), and the registry gets a candidate only when the gate promotes
        it; ``none``: no model files and no registry.
        """
        if self.log_models == "all":
            return True
        return self.log_models == "adapters" and (Path(model_dir) / "adapter_config.json").is_file()


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
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~25% slower
    checkpoint_steps: NonNegativeInt = 100  # sft/reward_model/align: resume point every N steps; 0 = off

    def __post_init__(self) -> None:
        if self.processes < 1:
            raise ConfigError(f"compute.processes: expected an int >= 1, got {self.processes!r}")


@dataclass(frozen=True)
class BaseConfig:
    """``model: tiny`` builds a tokenizer and a small Llama locally; anything else is a Hub id or path."""

    model: Text = "tiny"
    corpus: Text = "data/corpus/pretrain.txt"
    seed: Seed = 0
    vocab_size: Count = 320
    hidden_size: Count = 128
    intermediate_size: Count = 384
    num_layers: Count = 4
    num_heads: Count = 4
    max_position_embeddings: Count = 128
    pretrain_epochs: Count = 2
    pretrain_learning_rate: LearningRate = 3e-3
    pretrain_batch_size: Count = 32
    pretrain_block_size: Count = 64

    def cross_check(self) -> Iterator[tuple[str, str]]:
        if self.model != "tiny":  # a Hub model or local path brings its own architecture
            return
        if self.hidden_size % self.num_heads:
            yield "num_heads", f"must divide hidden_size ({self.hidden_size}), got {self.num_heads}"
        elif (self.hidden_size // self.num_heads) % 2:
            head_dim = self.hidden_size // self.num_heads
            yield "num_heads", f"hidden_size / num_heads must be even for rotary embeddings, got {head_dim}"
        if self.pretrain_block_size > self.max_position_embeddings:
            yield (
                "pretrain_block_size",
                f"must be <= max_position_embeddings ({self.max_position_embeddings}), "
                f"got {self.pretrain_block_size}",
            )


@dataclass(frozen=True)
class IngestConfig:
    """Shipped verifier-graded tasks, or user JSONL (``sft_data``/``preference_data``; empty = shipped)."""

    sft_data: str = ""
    preference_data: str = ""
    facts: Text = "data/tasks/facts.csv"
    prompt_style: Annotated[str, OneOf(PROMPT_STYLES)] = "terse"
    tasks: Annotated[tuple[Annotated[str, OneOf(TASKS)], ...], NonEmpty()] = (
        "add",
        "reverse",
        "upper",
        "capital",
    )
    seed: Seed = 0
    n_sft_train: Count = 6000
    n_sft_eval: Count = 200
    n_preference_prompts: Count = 4800
    n_eval_prompts: Count = 200


LINEAR_MODULES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
LORA_FAMILY: tuple[str, ...] = ("lora", "dora", "qlora")  # the methods that share ``peft.lora``


@dataclass(frozen=True)
class LoraSettings:
    """LoRA / DoRA / QLoRA: ``h = xW + (alpha/r)·xAB`` with B = 0 at init (rsLoRA: alpha/sqrt(r))."""

    r: Count = 16
    alpha: Count = 32
    dropout: Fraction = 0.0
    rslora: bool = False
    target_modules: Annotated[tuple[Text, ...], NonEmpty()] = LINEAR_MODULES


@dataclass(frozen=True)
class QLoraSettings:
    """QLoRA's frozen base: bitsandbytes 4-bit (NF4 by default) with double quantization."""

    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True


@dataclass(frozen=True)
class IA3Settings:
    """IA3: learned per-channel scales on keys, values and the MLP input (``feedforward_modules``)."""

    target_modules: Annotated[tuple[Text, ...], NonEmpty()] = ("k_proj", "v_proj", "down_proj")
    feedforward_modules: tuple[Text, ...] = ("down_proj",)

    def cross_check(self) -> Iterator[tuple[str, str]]:
        extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
        if extra:
            yield "feedforward_modules", f"must be a subset of target_modules, got extra {extra}"


@dataclass(frozen=True)
class PromptSettings:
    """Prompt tuning: ``num_virtual_tokens`` trained input embeddings (k·d parameters).

    ``init``: where the virtual tokens start: ``sample_vocab`` (rows of random vocabulary tokens),
    ``random`` (fresh random vectors) or ``text`` (the embeddings of ``init_text``, repeated)."""

    num_virtual_tokens: Count = 8
    init: Literal["sample_vocab", "random", "text"] = "sample_vocab"
    init_text: Text = "Answer the request."


@dataclass(frozen=True)
class PrefixSettings:
    """Prefix tuning: per-layer key/value prefixes (L·2·k·d parameters); ``projection_size`` > 0
    reparameterises them through a 2-layer MLP of that width, as in the paper."""

    num_virtual_tokens: Count = 8
    projection_size: NonNegativeInt = 0


@dataclass(frozen=True)
class BitFitSettings:
    """BitFit: only bias terms train; Llama has none, so zero biases are added to ``target_modules``."""

    target_modules: Annotated[tuple[Text, ...], NonEmpty()] = LINEAR_MODULES


@dataclass(frozen=True)
class AdapterSettings:
    """Houlsby bottleneck adapters ``y + up(act(down(y)))`` after the attention and/or MLP output."""

    bottleneck: Count = 16
    placement: Literal["both", "attention", "mlp"] = "both"
    activation: Literal["gelu", "relu", "silu"] = "gelu"


@dataclass(frozen=True)
class TinyTLSettings:
    """TinyTL: biases plus lite residual branches ``up(act(down(pool(x))))`` beside ``target_modules``.

    The branch sees the input average-pooled by ``reduction`` (the paper's reduced-resolution
    residual), so backward keeps that small copy instead of the full activation."""

    bottleneck: Count = 8
    reduction: Count = 4
    target_modules: Annotated[tuple[Text, ...], NonEmpty()] = ("gate_proj", "up_proj", "down_proj")


PEFT_GROUPS: dict[str, type] = {
    "lora": LoraSettings, "qlora": QLoraSettings, "ia3": IA3Settings, "prompt": PromptSettings,
    "prefix": PrefixSettings, "bitfit": BitFitSettings, "adapter": AdapterSettings, "tinytl": TinyTLSettings,
}  # fmt: skip


def _knob_homes(relative: str = "", exclude: str = "") -> dict[str, tuple[str, ...]]:
    """knob name -> the sub-blocks of ``peft`` that hold it (``relative`` prefixes each: ``../``)."""
    homes: dict[str, set[str]] = {}
    for group, cls in PEFT_GROUPS.items():
        for f in fields(cls):
            homes.setdefault(f.name, set()).add(group)
    own = {f.name for f in fields(PEFT_GROUPS[exclude])} if exclude else set()
    return {n: tuple(relative + g for g in sorted(gs)) for n, gs in homes.items() if n not in own}


for _group, _cls in PEFT_GROUPS.items():  # a knob under the wrong sub-block is told where it goes
    _cls.MISPLACED_KEYS = _knob_homes("../", exclude=_group)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class PeftConfig:
    """How a stage trains: ``method: full`` (every weight) or one parameter-efficient method.

    Each method reads its own sub-block (lora, dora and qlora share ``lora``; qlora adds ``qlora``).
    ``modules_to_save`` trains whole modules beside the method (any method but full): the
    chat-template tokens never occur in a from-scratch base's pretraining text, so the tiny
    model's embedding and head rows must move, which no low-rank or bias update can do.
    """

    method: Literal[
        "full", "lora", "dora", "qlora", "ia3", "prefix", "prompt", "bitfit", "adapter", "tinytl"
    ] = "lora"  # fmt: skip
    modules_to_save: tuple[Text, ...] = ("embed_tokens", "lm_head")
    lora: LoraSettings = field(default_factory=LoraSettings)
    qlora: QLoraSettings = field(default_factory=QLoraSettings)
    ia3: IA3Settings = field(default_factory=IA3Settings)
    prompt: PromptSettings = field(default_factory=PromptSettings)
    prefix: PrefixSettings = field(default_factory=PrefixSettings)
    bitfit: BitFitSettings = field(default_factory=BitFitSettings)
    adapter: AdapterSettings = field(default_factory=AdapterSettings)
    tinytl: TinyTLSettings = field(default_factory=TinyTLSettings)

    # For the loader: a knob written directly under ``peft`` gets told which sub-block it belongs to.
    MISPLACED_KEYS = _knob_homes()


@dataclass(frozen=True)
class SFTConfig:
    """TRL ``SFTTrainer`` on chat ``messages`` with assistant-only loss."""

    learning_rate: LearningRate = 3e-3
    epochs: Count = 10
    batch_size: Count = 32
    max_length: Count = 64
    warmup_steps: NonNegativeInt = 20
    lr_scheduler: Annotated[str, OneOf(LR_SCHEDULERS)] = "cosine"
    padding_free: bool = False  # TRL padding-free batches: no pad tokens, the same loss
    seed: Seed = 0
    # metrics/sft.json's eval_accuracy/eval_reward: greedy answers to the first n held-out eval prompts
    n_eval_prompts: Count = 64
    eval_max_new_tokens: Count = 12
    peft: PeftConfig = field(default_factory=PeftConfig)


@dataclass(frozen=True)
class PreferencesConfig:
    """Sample ``k`` completions per prompt from the SFT policy, grade them, keep (right, wrong) pairs."""

    k: Count = 8
    temperature: Positive = 1.3
    max_prompts: Count = 1000
    max_new_tokens: Count = 12
    batch_size: Count = 64
    reference_as_chosen: bool = True
    eval_fraction: Fraction = 0.15
    seed: Seed = 0

    def cross_check(self) -> Iterator[tuple[str, str]]:
        if not self.reference_as_chosen and self.k < 2:
            yield (
                "k",
                f"must be >= 2 when reference_as_chosen is false (a pair needs two samples), got {self.k}",
            )


@dataclass(frozen=True)
class RewardModelConfig:
    """TRL ``RewardTrainer`` (Bradley-Terry) initialised from the SFT weights."""

    learning_rate: LearningRate = 1e-3
    epochs: Count = 5
    batch_size: Count = 16
    max_length: Count = 64
    seed: Seed = 0
    peft: PeftConfig = field(default_factory=lambda: PeftConfig(method="full"))

    def cross_check(self) -> Iterator[tuple[str, str]]:
        if self.peft.method not in ("full", *LORA_FAMILY):
            yield (
                "peft.method",
                f"the reward model trains full | lora | dora | qlora, got {self.peft.method!r}",
            )


# The reward online methods maximise, and the judge of DPO's on-policy rounds
# (components/training/rewards.py, copied like TASKS above).
ALIGN_REWARDS: tuple[str, ...] = ("verifier", "rm", "both")


@dataclass(frozen=True)
class DPOConfig:
    """TRL ``DPOTrainer``; ``loss_type: [sigmoid, sft]`` adds an NLL term on chosen (the RPO recipe)."""

    beta: Positive = 0.1
    learning_rate: LearningRate = 5e-4
    epochs: Count = 2
    batch_size: Count = 16
    max_length: Count = 64
    loss_type: Annotated[tuple[Annotated[str, OneOf(DPO_LOSS_TYPES)], ...], NonEmpty()] = ("sigmoid", "sft")
    loss_weights: tuple[Annotated[float, Range(ge=0)], ...] = (1.0, 1.0)
    # rounds > 1: iterated on-policy DPO (each later round re-samples and re-grades pairs)
    rounds: Count = 1
    round_prompts: Count = 500
    round_samples: Generations = 8
    round_temperature: Positive = 1.3
    round_max_new_tokens: Count = 12
    # who grades a later round's samples: the verifier (right vs wrong) or the reward model as a
    # judge (best vs worst score; ``both`` = verifier + align.rm_weight x rm)
    round_judge: Annotated[str, OneOf(ALIGN_REWARDS)] = "verifier"

    def cross_check(self) -> Iterator[tuple[str, str]]:
        if self.round_judge != "verifier" and self.rounds < 2:
            yield (
                "round_judge",
                f"grades the re-sampled pairs of rounds 2 and later; with rounds: {self.rounds} it would "
                "never be used (set align.dpo.rounds >= 2, or leave round_judge: verifier)",
            )
        if len(self.loss_weights) != len(self.loss_type):
            yield (
                "loss_weights",
                f"needs one weight per loss_type entry ({len(self.loss_type)}), got {len(self.loss_weights)}",
            )
        elif not any(self.loss_weights):
            yield "loss_weights", f"at least one weight must be > 0, got {list(self.loss_weights)}"
        if "exo_pair" in self.loss_type:  # TRL raises unless label_smoothing > 0, which is not exposed here
            yield "loss_type", "'exo_pair' needs label_smoothing > 0, which align.dpo does not set"


# GRPOTrainer's loss_type values that need no setting align.grpo does not expose ('luspo' and
# 'vespo' need importance_sampling_level='sequence').
GRPO_LOSS_TYPES: tuple[str, ...] = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo")


@dataclass(frozen=True)
class GRPOSettings:
    """TRL ``GRPOTrainer``: ``num_generations`` samples per prompt, the group mean as baseline.

    ``prompts_per_step * num_generations`` completions per optimizer step; ``beta`` weighs
    KL(policy || SFT) in the loss (0 skips the reference forward pass). ``steps_per_generation``
    samples the completions of that many steps in one batch; the steps after the first are
    slightly off-policy and weighted by the clipped importance ratio (``epsilon``).
    """

    learning_rate: LearningRate = 2e-4
    steps: Count = 1550
    prompts_per_step: Count = 8
    num_generations: Generations = 8
    steps_per_generation: Count = 1
    max_new_tokens: Count = 12
    temperature: Positive = 1.0
    beta: Annotated[float, Range(ge=0)] = 0.0
    loss_type: Annotated[str, OneOf(GRPO_LOSS_TYPES)] = "dapo"
    scale_rewards: Literal["group", "batch", "none"] = "batch"
    epsilon: Annotated[float, Range(gt=0, lt=1)] = 0.2


@dataclass(frozen=True)
class RLOOSettings:
    """TRL ``RLOOTrainer``: leave-one-out baseline over ``num_generations`` samples; KL in the reward.

    ``steps_per_generation`` as in :class:`GRPOSettings`.
    """

    learning_rate: LearningRate = 2e-4
    steps: Count = 600
    prompts_per_step: Count = 8
    num_generations: Generations = 8
    steps_per_generation: Count = 1
    max_new_tokens: Count = 12
    temperature: Positive = 1.0
    beta: Annotated[float, Range(ge=0)] = 0.02


@dataclass(frozen=True)
class PPOConfig:
    """Our PPO (components/training/ppo.py): rollouts, GAE, clipped policy and value losses, adaptive KL.

    ``target_kl`` is the per-sequence KL(policy || SFT) the controller steers ``init_kl_coef``
    toward over ``kl_horizon`` samples; 0 keeps the coefficient fixed.
    """

    learning_rate: LearningRate = 5e-5
    value_learning_rate: LearningRate = 1e-2
    steps: Count = 150
    batch_size: Count = 64
    minibatch_size: Count = 32
    ppo_epochs: Count = 2
    max_new_tokens: Count = 12
    temperature: Positive = 1.0
    init_kl_coef: Annotated[float, Range(ge=0)] = 0.1
    target_kl: Annotated[float, Range(ge=0)] = 0.1
    kl_horizon: Count = 1000
    gamma: Annotated[float, Range(ge=0, le=1)] = 1.0
    lam: Annotated[float, Range(ge=0, le=1)] = 0.95
    clip_range: Annotated[float, Range(gt=0, lt=1)] = 0.2
    clip_range_value: Positive = 0.2
    vf_coef: Annotated[float, Range(ge=0)] = 0.5
    max_grad_norm: Positive = 1.0
    missing_eos_penalty: Annotated[float, Range(ge=0)] = 1.0

    def cross_check(self) -> Iterator[tuple[str, str]]:
        if self.minibatch_size > self.batch_size:
            yield "minibatch_size", f"must be <= batch_size ({self.batch_size}), got {self.minibatch_size}"


@dataclass(frozen=True)
class AlignConfig:
    """``method`` picks the algorithm; each method has its own sub-section, read only by it.

    ``reward`` is what the online methods (grpo, rloo, ppo) maximise and what ``metrics/align.json``
    reports before and after training on held-out prompts: ``verifier``, ``rm`` (the trained
    reward model) or ``both`` (verifier + ``rm_weight`` x rm).
    """

    method: Literal["dpo", "grpo", "rloo", "ppo"] = "grpo"
    reward: Annotated[str, OneOf(ALIGN_REWARDS)] = "verifier"
    rm_weight: Annotated[float, Range(ge=0)] = 1.0
    # the verifier's near-miss credit (position-matched characters); false = 1 for exact, else 0
    partial_credit: bool = False
    seed: Seed = 0
    n_report_prompts: Count = 64
    peft: PeftConfig = field(default_factory=PeftConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    grpo: GRPOSettings = field(default_factory=GRPOSettings)
    rloo: RLOOSettings = field(default_factory=RLOOSettings)
    ppo: PPOConfig = field(default_factory=PPOConfig)

    def cross_check(self) -> Iterator[tuple[str, str]]:
        # The KL reference and the held-out report's start are SFT: the adapter disabled, or (full)
        # a frozen copy of it; our PPO's reference is always the disabled adapter.
        allowed = LORA_FAMILY if self.method == "ppo" else ("full", *LORA_FAMILY)
        if self.peft.method not in allowed:
            yield (
                "peft.method",
                f"align.method {self.method} trains {' | '.join(allowed)}, got {self.peft.method!r}",
            )


@dataclass(frozen=True)
class BitDeltaConfig:
    """Bit-Delta's scale distillation: only the per-matrix scales train, on SFT-train calibration text.

    ``base``: what the delta is taken against: ``sft`` (default: the aligned model is a light
    fine-tune of the SFT policy, which every alignment variant shares) or ``base``
    (``paths.base_model``: on the tiny model SFT retrains whole embeddings, far more than one
    bit per weight can carry). ``objective``: ``kl`` = KL(fine-tune || bit-delta) of next-token
    distributions (the lecture's); ``mse`` = squared error of the logits (what the BitDelta
    reference code uses). ``steps: 0`` keeps the closed-form scales (mean |delta|).
    """

    base: Literal["sft", "base"] = "sft"
    objective: Literal["kl", "mse"] = "kl"
    steps: Annotated[int, Range(ge=0)] = 100
    learning_rate: LearningRate = 1e-3
    batch_size: Count = 8
    n_calibration: Count = 128


@dataclass(frozen=True)
class PruneConfig:
    """``compress.method: prune``: zero or remove low-magnitude weights, then an optional recovery.

    ``kind``: ``magnitude`` (unstructured, ``sparsity`` of every linear weight), ``n_m`` (keep
    ``n`` of every ``m`` consecutive input weights, 2:4 by default) or ``mlp_channels``
    (structured: keep ``keep_ratio`` of each MLP's channels and physically remove the rest, so
    the saved model is smaller and faster). ``recovery_steps`` fine-tunes on SFT-train
    conversations afterwards, pruned weights held at zero (0 = none).
    """

    kind: Literal["magnitude", "n_m", "mlp_channels"] = "magnitude"
    sparsity: Annotated[float, Range(gt=0, lt=1)] = 0.5
    n: Count = 2
    m: Count = 4
    keep_ratio: Annotated[float, Range(gt=0, le=1)] = 0.75
    recovery_steps: Annotated[int, Range(ge=0)] = 50
    recovery_learning_rate: LearningRate = 1e-4
    batch_size: Count = 8
    n_sequences: Count = 512

    def cross_check(self) -> Iterator[tuple[str, str]]:
        if self.n >= self.m:
            yield "n", f"must be < m ({self.m}): keep n of every m weights"


@dataclass(frozen=True)
class DistillConfig:
    """``compress.method: distill``: a smaller student trained to match the aligned model (teacher).

    The student has ``num_layers`` decoder layers (taken evenly from the teacher's) and an MLP of
    ``intermediate_size`` channels (0 = the teacher's), initialised from the teacher where shapes
    allow; loss = ``T² · KL(teacher_T || student_T)`` + ``alpha_ce`` x cross-entropy on the
    assistant tokens of ``n_sequences`` SFT-train conversations.
    """

    num_layers: Count = 2
    intermediate_size: Annotated[int, Range(ge=0)] = 0
    steps: Annotated[int, Range(ge=0)] = 300
    learning_rate: LearningRate = 1e-3
    batch_size: Count = 16
    temperature: Positive = 2.0
    alpha_ce: Annotated[float, Range(ge=0)] = 0.5
    n_sequences: Count = 2000


@dataclass(frozen=True)
class CompressConfig:
    """Merge the adapter into full-precision weights, then compress it with ``method``.

    ``int8_weight`` | ``int4_weight`` (weight-only, robust to activation outliers) | ``int8_dynamic``
    (activations too) | ``nf4`` / ``llm_int8`` (bitsandbytes: 4-bit NormalFloat with double
    quantization, LLM.int8 with outlier columns) | ``bitdelta`` (1 bit per weight of the delta to
    ``paths.base_model`` plus a distilled scale per matrix) | ``prune`` | ``distill`` (a smaller
    student) | ``none`` (the merge only). ``n_fidelity_prompts`` held-out prompts measure KL,
    accuracy and generation speed against the merged model.
    """

    method: Literal[
        "int8_weight",
        "int4_weight",
        "int8_dynamic",
        "nf4",
        "llm_int8",
        "bitdelta",
        "prune",
        "distill",
        "none",
    ] = "int8_weight"
    n_fidelity_prompts: Count = 100
    bitdelta: BitDeltaConfig = field(default_factory=BitDeltaConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


@dataclass(frozen=True)
class EvaluateConfig:
    """One held-out suite for every model; the gate compares the candidate with SFT and the champion.

    ``promotion_max_accuracy_drop`` is the largest drop of ``promotion_metric`` below the current
    champion that still promotes. The aligned model may never score below SFT, and the deployed
    (compressed) candidate may score at most ``promotion_max_compression_drop`` below the aligned
    model it was made from (components/evaluation/gate.py says why).
    """

    n_prompts: Count = 200
    max_new_tokens: Count = 12
    batch_size: Count = 64
    sample_temperature: Positive = 1.0
    n_samples: Count = 8
    seed: Seed = 0
    promotion_alias: Annotated[str, Pattern(r"[\w-]+", "letters, digits, _ or - (an MLflow alias)")] = (
        "champion"
    )
    promotion_metric: Literal["accuracy", "sampled_accuracy", "reward_mean"] = "accuracy"
    promotion_max_accuracy_drop: Annotated[float, Range(ge=0, le=1)] = 0.02
    promotion_max_compression_drop: Annotated[float, Range(ge=0, le=1)] = 0.03
    # prompting baselines on base and sft (components/evaluation/prompting.py); [] skips them
    prompting: tuple[Annotated[str, OneOf(PROMPTINGS)], ...] = ("zero_shot", "few_shot", "cot")
    few_shot_k: Count = 3
    cot_max_new_tokens: Count = 48

    def cross_check(self) -> Iterator[tuple[str, str]]:
        alias = self.promotion_alias
        if alias.lower() == "latest" or (alias[0] in "vV" and alias[1:].isdigit()):
            yield "promotion_alias", f"{alias!r} is reserved by MLflow ('latest' and version names like v1)"


@dataclass(frozen=True)
class RagIndexConfig:
    """The document index (build keys) and how ``posttrain rag`` queries it (query-time keys).

    Build keys are the ``rag_index`` stage's params; the query-time ones (``top_k`` onwards)
    are read by ``posttrain rag query/ask/eval`` and the ``rag_eval`` stage, so changing them
    never re-indexes.
    """

    docs_dir: Text = "data/docs"
    uri: Text = "data/rag/milvus.db"
    collection: Annotated[
        str,
        Pattern(
            r"[A-Za-z_][A-Za-z0-9_]{0,254}",
            "a Milvus collection name (a letter or _, then letters, digits, _)",
        ),
    ] = "posttrain_docs"
    embedding_model: Text = "minilm"
    chunking: Literal["by_title", "fixed", "sentence_window"] = "by_title"
    chunk_tokens: Annotated[int, Range(ge=8, le=MAX_CHUNK_TOKENS)] = 128  # embedding-model tokens
    chunk_overlap_tokens: NonNegativeInt = 16  # fixed, and by_title pieces cut at chunk_tokens
    window_sentences: NonNegativeInt = 2  # sentence_window: neighbours each side returned
    # chunks at least this similar (MinHash Jaccard over word 5-grams) to an earlier one are dropped
    near_duplicate_threshold: Annotated[float, Range(gt=0, le=1)] = 0.9
    index_type: Literal["auto", "HNSW", "FLAT"] = "auto"  # auto: FLAT below flat_below chunks
    flat_below: Count = 20_000
    # unstructured's `languages` (ISO 639-3): named = no per-document detection; ["auto"] = detect
    languages: Annotated[tuple[Annotated[str, NonEmpty()], ...], NonEmpty()] = ("eng",)
    # -- query time ------------------------------------------------------------------------
    top_k: Count = 5
    mode: Literal["dense", "sparse", "hybrid"] = "hybrid"
    fusion: Literal["rrf", "weighted"] = "rrf"
    rrf_k: Count = 10  # small k: the top of each list counts most (measured best on real manuals, README)
    dense_weight: Annotated[float, Range(ge=0, le=1)] = 0.5  # weighted fusion; sparse gets 1 - this
    # prf: pseudo-relevance feedback (no generator needed); multi_query: `generator` rewrites the
    # question expansion_queries ways and writes one hypothetical answer (HyDE), each is searched
    # and the lists are fused (RRF); none
    expansion: Literal["none", "prf", "multi_query"] = "prf"
    expansion_queries: Annotated[int, Range(ge=1, le=8)] = 3
    # rerank candidates by default? Off: the self-trained cross-encoder ranks below plain hybrid
    # on the real manuals, and query_likelihood (which beats it there, README) costs seconds per
    # question on a CPU; --rerank turns reranking on per query.
    rerank: bool = False
    # trained (the rag_reranker stage's cross-encoder) | query_likelihood (log P(question |
    # passage) under ql_model, no training) | none | a CrossEncoder directory
    reranker: Text = "trained"
    ql_model: Text = "smollm2-135m-instruct"  # a bundled causal LM or a local directory
    candidates: Count = 30  # retrieved cheaply, then reranked down to top_k
    answer_mode: Literal["extractive", "generative"] = "extractive"
    generator: Text = "champion"  # champion (registry alias) | smollm2 | a local causal-LM dir
    min_support: Annotated[float, Range(ge=-1, le=1)] = 0.35  # best sentence cosine below: "I don't know"
    context_tokens: Count = 768  # the generator's evidence budget

    def cross_check(self) -> Iterator[tuple[str, str]]:
        if self.chunk_overlap_tokens >= self.chunk_tokens:
            yield (
                "chunk_overlap_tokens",
                f"must be < chunk_tokens ({self.chunk_tokens}), got {self.chunk_overlap_tokens}",
            )
        if self.candidates < self.top_k:
            yield "candidates", f"must be >= top_k ({self.top_k}), got {self.candidates}"


@dataclass(frozen=True)
class RagRerankerConfig:
    """Fine-tune the bundled MiniLM as a cross-encoder on (query, passage) pairs from the index."""

    enabled: bool = True
    base: Text = "minilm"
    queries_per_passage: Count = 2  # section title and/or a held-out sentence (inverse cloze)
    negatives: Count = 3  # BM25 neighbours that are not the passage
    max_passages: Count = 400  # sampled from the index, so a large corpus does not blow the budget
    epochs: Count = 1
    batch_size: Count = 16
    learning_rate: LearningRate = 1e-4  # 2e-5 barely moves the fresh head in one epoch
    max_length: Annotated[int, Range(ge=16, le=512)] = 256
    eval_share: Fraction = 0.2
    seed: Seed = 0


@dataclass(frozen=True)
class RagEvalConfig:
    """Retrieval and answer quality of the index on a question set (``posttrain rag eval``)."""

    questions: Text = "data/rag_eval/questions.jsonl"


@dataclass(frozen=True)
class FlamingoSettings:
    """Perceiver resampler + tanh-gated cross-attention blocks (components/multimodal/flamingo.py)."""

    num_latents: Count = 16  # visual tokens per image, whatever the feature count
    depth: Count = 1  # resampler layers
    dim: Count = 128  # resampler width (the cross-attention reads it into the LM's width)
    heads: Count = 4  # divides both dim and the LM's hidden size
    every: Count = 1  # a gated block before every k-th decoder layer
    ff_mult: Count = 2
    # the gates start at 0 and learn with learning_rate x this: at the base rate they stay near 0
    gate_lr_multiplier: Positive = 10.0


@dataclass(frozen=True)
class PalmeSettings:
    """Projected visual soft tokens spliced into the LM's input (components/multimodal/palme.py)."""

    projector: Literal["linear", "mlp"] = "mlp"
    hidden: Count = 512  # the mlp projector's hidden width
    grid: Count = 3  # each feature map is pooled to grid x grid soft tokens
    lm: Literal["frozen", "lora"] = "lora"  # lora: LoRA on every Linear (base weights frozen)
    lora_r: Count = 8
    lora_alpha: Count = 16


@dataclass(frozen=True)
class MultimodalConfig:
    """Image question answering over the SFT policy: Flamingo and/or PaLM-E bridges, frozen encoder and LM."""

    enabled: bool = True
    method: Literal["flamingo", "palme", "both"] = "both"
    # JSONL lines {"image", "question", "answer"}; empty = the generated shapes task
    train_data: str = ""
    eval_data: str = ""
    seed: Seed = 0
    n_train: Count = 1200
    n_eval: Count = 200
    image_size: Annotated[int, Range(ge=32, le=512)] = 160  # encoder input; 224 gives 7x7 features, 160 5x5
    max_objects: Annotated[int, Range(ge=1, le=9)] = 4
    steps: Count = 300
    batch_size: Count = 16
    learning_rate: Positive = 2e-3
    caption_share: Fraction = 0.0  # extra caption rows ("describe the picture.") per training row
    interleaved_share: Fraction = 0.2  # training rows that carry solved image examples first
    few_shot: NonNegativeInt = 2  # solved examples before the query in the interleaved evaluation
    max_new_tokens: Count = 8
    flamingo: FlamingoSettings = field(default_factory=FlamingoSettings)
    palme: PalmeSettings = field(default_factory=PalmeSettings)

    def cross_check(self) -> Iterator[tuple[str, str]]:
        if bool(self.train_data) != bool(self.eval_data):
            yield "train_data", "set both train_data and eval_data (or neither: the generated shapes task)"


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
    rag_reranker: RagRerankerConfig = field(default_factory=RagRerankerConfig)
    rag_eval: RagEvalConfig = field(default_factory=RagEvalConfig)
    multimodal: MultimodalConfig = field(default_factory=MultimodalConfig)


SECTIONS: tuple[str, ...] = tuple(f.name for f in fields(Params))


def parse_params(data: dict[str, Any]) -> Params:
    """Validate a params mapping; errors name the dotted key (``sft.peft.r``).

    Every problem is found first; one :class:`ConfigError` then lists them all, one line each.
    """
    problems = [
        f"{name}: unknown section (allowed: {', '.join(SECTIONS)})" for name in data if name not in SECTIONS
    ]
    sections: dict[str, Any] = {}
    for f in fields(Params):
        value = data.get(f.name)
        if value is not None and not isinstance(value, dict):
            problems.append(f"{f.name}: expected a mapping of keys, got {type(value).__name__}")
            continue
        sections[f.name] = collect(f.default_factory, value, f.name, problems)  # type: ignore[misc, arg-type]
    if problems:
        raise ConfigError(*problems)
    return Params(**sections)


def load_params(path: Path | str = "params.yaml") -> Params:
    """Read and validate ``params.yaml``."""
    return parse_params(read_params(path))
