"""Direct Preference Optimisation with TRL's ``DPOTrainer``.

The policy is the merged SFT model with a fresh LoRA adapter; with an adapter and no explicit
``ref_model``, TRL uses the adapter-disabled model as the reference, i.e. exactly the SFT
policy, without a second copy in memory. ``loss_type: [sigmoid, sft]`` adds an NLL term on the
chosen answers, which keeps a tiny policy from lowering chosen log-probs along with rejected
ones (measured on the tiny chain: plain sigmoid at lr 1e-3 fell below SFT).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset
from peft import PeftModel
from transformers import PreTrainedTokenizerBase
from trl import DPOConfig as TRLDPOConfig
from trl import DPOTrainer

from components.data.preferences import build_pairs, judged_pairs, trl_columns
from components.errors import DataError
from components.evaluation.generate import generate
from components.params import AlignConfig, ComputeConfig, DPOConfig
from components.peft.adapters import load_policy, load_trainable
from components.tracking import Tracker
from components.training.callbacks import TrackerCallback, trainer_args
from components.training.checkpoints import resume_or_train
from components.training.rewards import RewardFunction


def on_policy_pairs(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[dict[str, str]],
    dpo: DPOConfig,
    seed: int,
    judge: RewardFunction | None = None,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Fresh pairs sampled from the current policy and graded by ``align.dpo.round_judge``.

    The verifier (``judge`` None or of kind ``verifier``) pairs a right answer with the most
    frequent wrong one; the reward model (``rm``, or ``both``) pairs the best-scored answer with
    the worst, drops ties and repeats, and reports its agreement with the verifier. Only the
    policy's own answers: the reference answer never stands in, which is what makes a round
    on-policy.
    """
    samples = generate(
        model,
        tokenizer,
        [r["prompt"] for r in prompts],
        max_new_tokens=dpo.round_max_new_tokens,
        temperature=dpo.round_temperature,
        num_return_sequences=dpo.round_samples,
        seed=seed,
    )
    if judge is None or judge.kind == "verifier":
        return build_pairs(prompts, samples, reference_as_chosen=False)
    flat = judge(
        [rec for rec, outs in zip(prompts, samples, strict=True) for _ in outs],
        [text for outs in samples for text in outs],
    )
    scores, start = [], 0
    for outs in samples:
        scores.append(flat[start : start + len(outs)])
        start += len(outs)
    return judged_pairs(prompts, samples, scores)


def train_dpo(
    cfg: AlignConfig,
    policy_dir: Path,
    tokenizer: PreTrainedTokenizerBase,
    train_pairs: Sequence[dict[str, Any]],
    eval_pairs: Sequence[dict[str, Any]],
    tracker: Tracker,
    work_dir: Path,
    compute: ComputeConfig | None = None,
    prompts: Sequence[dict[str, str]] = (),
    judge: RewardFunction | None = None,
) -> tuple[PeftModel, list[dict[str, float]]]:
    """Align the policy at ``policy_dir`` on preference pairs; (adapter model, history).

    ``align.dpo.rounds > 1`` is iterated on-policy DPO: after each round the current policy
    samples ``round_samples`` answers for each of ``prompts`` (the first ``round_prompts``),
    ``judge`` grades them (the verifier when None; see :func:`on_policy_pairs`), and the next
    round trains the same adapter on those fresh pairs. The reference stays the SFT policy (the
    adapter disabled in round 1, a frozen copy of it in later rounds: given an adapter that
    already trained and no ``ref_model``, TRL would take a copy of that adapter as the reference,
    i.e. the previous round's policy, and in round 3 fail to add its "ref" adapter a second time).
    A round that finds no pair (with the verifier: the policy is all right or all wrong on every
    prompt) ends the loop early.
    """
    if not train_pairs:
        raise DataError("DPO needs at least one preference pair (preferences stage produced none)")
    dpo = cfg.dpo
    policy = load_trainable(
        policy_dir, cfg.peft, "align.peft", compute=compute, seed=cfg.seed, scratch=work_dir.parent
    )
    model: Any = policy.model
    peft_config = policy.peft_config
    # a frozen SFT copy: from the start for a full fine-tune, from round 2 on for an adapter
    reference = load_policy(policy_dir) if cfg.peft.method == "full" else None
    history: list[dict[str, float]] = []
    pairs: Sequence[dict[str, Any]] = train_pairs
    offset = 0
    for round_no in range(1, dpo.rounds + 1):
        if round_no > 1:
            pairs, stats = on_policy_pairs(
                model, tokenizer, prompts[: dpo.round_prompts], dpo, cfg.seed + round_no, judge
            )
            tracker.log_metrics({f"align/round_{k}": float(v) for k, v in stats.items()}, step=offset)
            history.append(
                {"step": float(offset), "round": float(round_no)}
                | {f"round_{k}": float(v) for k, v in stats.items()}
            )
            if not pairs:
                break
            if reference is None:
                reference = load_policy(policy_dir).to(model.device)
        common = trainer_args(
            work_dir / f"round-{round_no}",
            seed=cfg.seed + round_no - 1,
            learning_rate=dpo.learning_rate,
            epochs=dpo.epochs,
            batch_size=dpo.batch_size,
            n_examples=len(pairs),
            has_eval=bool(eval_pairs),
            compute=compute,
            resumable=True,
        )
        common |= policy.optimizer_args()
        args = TRLDPOConfig(
            **common,
            beta=dpo.beta,
            max_length=dpo.max_length,
            loss_type=list(dpo.loss_type),
            loss_weights=list(dpo.loss_weights),
        )
        callback = TrackerCallback(tracker, prefix="align/", step_offset=offset)
        trainer = DPOTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(trl_columns(pairs)),
            eval_dataset=Dataset.from_list(trl_columns(eval_pairs)) if eval_pairs else None,
            processing_class=tokenizer,
            peft_config=peft_config if round_no == 1 else None,  # later rounds continue the adapter
            # a full fine-tune's reference is the SFT policy itself (without it TRL would re-load
            # config._name_or_path, which for a merged adapter chain is the base model); later
            # rounds too (see the docstring)
            ref_model=reference,
            callbacks=[callback],
        )
        policy.settle(trainer)
        resume_or_train(trainer)
        model = trainer.model
        history += callback.history
        offset += trainer.state.global_step
    return model, history
