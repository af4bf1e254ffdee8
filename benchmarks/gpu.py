"""GPU benchmark: SFT throughput, memory and MFU, and batched generation, on one CUDA device.

Why: the ``gpu`` profile (``profiles/gpu.yaml``) was sized by scaling CPU measurements, and no
number in ``BENCHMARKS.md`` comes from a GPU. This script measures the profile's SFT settings
(batch 32, ``max_length`` 96, LoRA r=16 on all 7 projections, no ``modules_to_save``, bf16)
with our own ``train_sft`` and with a bare TRL ``SFTTrainer`` (as ``benchmarks/run.py`` does on
CPU), for LoRA and a full fine-tune, and the stages' batched :func:`generate` (greedy, and
sampled with the preferences stage's k and temperature).

The model is SmolLM2-135M-Instruct's exact config and tokenizer with **random, seeded weights**:
the real weights (over 64 MiB) cannot travel to the lent device, and throughput, memory and
MFU do not depend on weight values (random weights also never stop at the end-of-turn token
early, so every generated sequence runs its full length). Losses are meaningless here.

Timing: each training run trains one epoch over ``--examples`` records; the first
``--warmup-steps`` optimizer steps (CUDA context, cuBLAS and allocator warm-up) are excluded
from the timed window, which runs from the end of the last warm-up step to the end of the last
step, with a device synchronisation at both ends. The whole call (load, tokenize, train, save)
is reported too. Our ``train_sft`` runs unchanged; its trainer is only handed to the timer
callback just before it trains (by wrapping ``resume_or_train``, see :func:`_instrumented_sft`).

    python -m benchmarks.gpu --model-dir .gpu/smollm2 --out OUT          # on the GPU
    python -m benchmarks.gpu --model-dir .gpu/smollm2 --out OUT --smoke  # CPU, tiny, a check

Writes ``OUT/gpu_bench.json`` (every number, versions, device) and ``OUT/gpu_bench.md`` (a
``BENCHMARKS.md`` section, ``<!-- bench:gpu -->`` first), and prints both.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback

from benchmarks.run import bare_sft_trainer, real_task_splits
from components.distributed import resolve_compute
from components.evaluation.generate import generate
from components.models.loading import load_tokenizer, param_count, save_model
from components.params import ComputeConfig, PeftConfig, SFTConfig
from components.peft.adapters import load_policy
from components.tracking import RecordingTracker
from components.training.sft import train_sft

ROOT = Path(__file__).resolve().parents[1]

# NVIDIA H200 (SXM) dense bf16 tensor-core peak, without 2:4 sparsity (the same as the H100 SXM).
H200_BF16_DENSE_TFLOPS = 989.0

MFU_FORMULA = (
    "model FLOPs per real token = 6 * N_trainable + 4 * N_frozen (forward 2N; backward 2N for the "
    "activation gradients of every weight, plus 2N for weight gradients of trained weights only): "
    "6N for a full fine-tune, ~4N for LoRA (the adapters' own 6 * N_lora included); attention-score "
    "FLOPs (<2% at 96 tokens) and recomputation under gradient checkpointing are not counted; "
    "MFU = real (non-pad) tokens/s * FLOPs per token / peak"
)


@dataclasses.dataclass(frozen=True)
class Settings:
    """What one invocation measures (``--smoke`` shrinks everything to a CPU check)."""

    device: str
    precision: str
    examples: int
    batch_size: int
    max_length: int
    warmup_steps: int
    gen_prompts: int
    gen_batch: int
    gen_new_tokens: int
    gen_k: int
    gen_temperature: float
    gen_repeats: int
    peak_tflops: float


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _reset_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_memory_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def _allocated_gib(device: str) -> float | None:
    """Memory still allocated (a run that leaks into the next one shows up here)."""
    return torch.cuda.memory_allocated() / 2**30 if device == "cuda" else None


def build_random_base(model_dir: Path, out: Path, seed: int = 0) -> int:
    """Save a policy dir at ``out``: ``model_dir``'s config + tokenizer, random seeded weights; N params."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(str(model_dir))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if (model_dir / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(model_dir))
    save_model(model, load_tokenizer(model_dir), out)
    return param_count(model)


class StepTimer(TrainerCallback):
    """Times the optimizer steps after ``warmup_steps`` and counts their real tokens.

    Tokens are TRL's own count (``SFTTrainer._total_train_tokens``: the attention mask's sum,
    so pad tokens are left out; the sequence length in padding-free batches).
    """

    def __init__(self, warmup_steps: int, device: str) -> None:
        self.warmup_steps = warmup_steps
        self.device = device
        self.trainer: Any = None
        self.start: tuple[float, int, int] | None = None  # (perf_counter, step, tokens so far)
        self.end: tuple[float, int, int] | None = None

    def attach(self, trainer: Any) -> None:
        """Watch ``trainer``; drop its progress bar/printer (console noise only, same for every run)."""
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        self.trainer = trainer
        trainer.remove_callback(ProgressCallback)
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(self)

    def _mark(self, step: int) -> tuple[float, int, int]:
        _sync(self.device)
        return time.perf_counter(), step, int(getattr(self.trainer, "_total_train_tokens", 0))

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001 - HF signature
        if self.warmup_steps == 0:
            self.start = self._mark(0)

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001 - HF signature
        if state.global_step == self.warmup_steps:
            self.start = self._mark(state.global_step)
        if state.global_step == state.max_steps:
            self.end = self._mark(state.global_step)

    def result(self) -> dict[str, Any]:
        model = self.trainer.model
        out: dict[str, Any] = {
            "total_steps": int(self.trainer.state.global_step),
            "total_tokens": int(getattr(self.trainer, "_total_train_tokens", 0)),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "all_params": sum(p.numel() for p in model.parameters()),
            "gradient_checkpointing": bool(self.trainer.args.gradient_checkpointing),
        }
        if self.start is None or self.end is None or self.end[1] <= self.start[1]:
            return out | {"timed_steps": 0, "timed_seconds": None, "timed_tokens": 0}
        seconds = self.end[0] - self.start[0]
        steps, tokens = self.end[1] - self.start[1], self.end[2] - self.start[2]
        return out | {
            "timed_steps": steps,
            "timed_seconds": seconds,
            "timed_tokens": tokens,
            "ms_per_step": 1000 * seconds / steps,
            "tokens_per_s": tokens / seconds,
        }


@contextmanager
def _instrumented_sft(timer: StepTimer) -> Iterator[None]:
    """Run our ``train_sft`` unchanged, handing its trainer to ``timer`` just before it trains."""
    from components.training import sft as sft_module

    original = sft_module.resume_or_train

    def instrumented(trainer: Any) -> None:
        timer.attach(trainer)
        original(trainer)

    sft_module.resume_or_train = instrumented
    try:
        yield
    finally:
        sft_module.resume_or_train = original


def _finish(
    name: str, label: str, timer: StepTimer, wall: float, s: Settings, n_params: int, before: float | None
) -> dict[str, Any]:
    row: dict[str, Any] = {"name": name, "label": label, "wall_seconds": wall} | timer.result()
    row["peak_memory_gib"] = _peak_memory_gib(s.device)
    row["allocated_before_gib"] = before
    trainable = row["trainable_params"]
    # LoRA: the base's n_params are frozen, the adapters train; a full fine-tune trains all n_params
    flops_per_token = 6 * n_params if trainable >= n_params else 4 * n_params + 6 * trainable
    row["flops_per_token"] = flops_per_token
    rate = row.get("tokens_per_s")
    row["mfu"] = rate * flops_per_token / (s.peak_tflops * 1e12) if rate else None
    return row


def run_ours(
    name: str, label: str, cfg: SFTConfig, base_dir: Path, records: Sequence[dict[str, Any]], s: Settings,
    n_params: int,
) -> dict[str, Any]:  # fmt: skip
    """Our ``train_sft`` (load, tokenize, train, save), at ``s.device``/``s.precision``."""
    compute = ComputeConfig(device=cast(Any, s.device), precision=cast(Any, s.precision), checkpoint_steps=0)
    timer = StepTimer(s.warmup_steps, s.device)
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp, _instrumented_sft(timer):
        _reset_memory(s.device)
        before = _allocated_gib(s.device)
        start = time.perf_counter()
        history, _ = train_sft(
            cfg, base_dir, records, [], Path(tmp) / "out", RecordingTracker(), Path(tmp) / "work", compute
        )
        _sync(s.device)
        wall = time.perf_counter() - start
    row = _finish(name, label, timer, wall, s, n_params, before)
    losses = [h["loss"] for h in history if "loss" in h]
    row["last_loss"] = losses[-1] if losses else None
    return row


def run_bare(
    name: str, label: str, cfg: SFTConfig, base_dir: Path, records: Sequence[dict[str, Any]], s: Settings,
    n_params: int, gradient_checkpointing: bool | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The bare TRL ``SFTTrainer`` script of ``benchmarks/run.py`` on the same data and settings.

    ``gradient_checkpointing``: None keeps TRL's default (on).
    """
    timer = StepTimer(s.warmup_steps, s.device)
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        _reset_memory(s.device)
        before = _allocated_gib(s.device)
        start = time.perf_counter()
        trainer = bare_sft_trainer(
            cfg, base_dir, records, Path(tmp), use_cpu=s.device == "cpu", bf16=s.precision == "bf16",
            gradient_checkpointing=gradient_checkpointing,
        )  # fmt: skip
        timer.attach(trainer)
        trainer.train()
        trainer.save_model(str(Path(tmp) / "out"))
        _sync(s.device)
        wall = time.perf_counter() - start
    row = _finish(name, label, timer, wall, s, n_params, before)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    row["last_loss"] = losses[-1] if losses else None
    del trainer
    return row


class _Counting:
    """The model as :func:`generate` sees it, counting each row's new tokens up to its first eos.

    ``move``: move ``generate``'s batches, which it builds on the CPU, to the model's device
    first (``generate`` never moves them: the stages generate on the CPU; transformers 5.23
    accepts CPU inputs for a CUDA model and moves them before each forward pass).
    """

    def __init__(self, model: PreTrainedModel, eos_id: int, move: bool) -> None:
        self.model = model
        self.eos_id = eos_id
        self.move = move
        self.new_tokens = 0
        self.sequences = 0

    def eval(self) -> _Counting:
        self.model.eval()
        return self

    def generate(
        self, *, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        if self.move:
            input_ids, attention_mask = input_ids.to(self.model.device), attention_mask.to(self.model.device)
        out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        new = out[:, input_ids.shape[1] :]
        is_eos = new == self.eos_id
        first = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1) + 1, new.shape[1])
        self.new_tokens += int(first.sum())
        self.sequences += new.shape[0]
        return out


def bench_generation(base_dir: Path, prompts: Sequence[str], s: Settings) -> tuple[list[dict[str, Any]], str]:
    """Our :func:`generate` at the stages' batch sizes; (rows, whether it runs on the device as is)."""
    tokenizer: PreTrainedTokenizerBase = load_tokenizer(base_dir)
    model = load_policy(base_dir).to(s.device)
    try:  # the stages' own call, unchanged, with the model on the device
        generate(model, tokenizer, list(prompts[:1]), max_new_tokens=2)
        as_is = "runs"
    except Exception as exc:  # noqa: BLE001 - reported; the moved-input rows still measure it
        as_is = f"fails ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
    modes = [("greedy", 0.0, 1), ("sampled", s.gen_temperature, s.gen_k)]
    variants = [(torch.float32, False), (torch.float32, True), (torch.bfloat16, True)]
    rows = []
    for dtype, move in variants:
        if not move and as_is != "runs":
            continue
        model = model.to(dtype)
        counter = _Counting(model, int(tokenizer.eos_token_id), move)
        for mode, temperature, k in modes:

            def call(counter: _Counting = counter, temperature: float = temperature, k: int = k) -> None:
                counter.new_tokens = counter.sequences = 0
                generate(
                    cast(PreTrainedModel, counter), tokenizer, prompts, max_new_tokens=s.gen_new_tokens,
                    temperature=temperature, num_return_sequences=k, batch_size=s.gen_batch,
                )  # fmt: skip
                _sync(s.device)

            call()  # warm-up (kernels, allocator)
            _reset_memory(s.device)
            times = []
            for _ in range(s.gen_repeats):
                start = time.perf_counter()
                call()
                times.append(time.perf_counter() - start)
            seconds = statistics.median(times)
            rows.append(
                {
                    "mode": mode,
                    "weights": str(dtype).removeprefix("torch."),
                    "inputs": "moved to the device" if move else "as generate() builds them (CPU)",
                    "prompts": len(prompts),
                    "batch_size": s.gen_batch,
                    "samples_per_prompt": k,
                    "temperature": temperature,
                    "max_new_tokens": s.gen_new_tokens,
                    "sequences": counter.sequences,
                    "new_tokens": counter.new_tokens,
                    "seconds_median": seconds,
                    "seconds_all": times,
                    "new_tokens_per_s": counter.new_tokens / seconds,
                    "peak_memory_gib": _peak_memory_gib(s.device),
                }
            )
    del model
    return rows, as_is


def environment(s: Settings) -> dict[str, Any]:
    versions = {}
    for dist in (
        "torch",
        "transformers",
        "trl",
        "peft",
        "accelerate",
        "datasets",
        "tokenizers",
        "safetensors",
    ):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    env: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "versions": versions,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": s.device,
    }
    if s.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env |= {
            "device_name": torch.cuda.get_device_name(0),
            "device_capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
            "device_memory_gib": props.total_memory / 2**30,
            "cudnn": torch.backends.cudnn.version(),
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        }
    else:
        env["device_name"] = f"CPU ({platform.processor() or platform.machine()})"
    return env


def _f(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(result: dict[str, Any]) -> str:
    env, s, sft, gen = result["environment"], result["settings"], result["sft"], result["generation"]
    bare = {r["name"].removeprefix("bare_"): r for r in sft if r["name"] in ("bare_lora", "bare_full")}
    smoke = " **SMOKE RUN (CPU, tiny sizes): not a measurement**" if result["smoke"] else ""
    precision_note = "bf16 autocast, fp32 master weights" if s["precision"] == "bf16" else "no autocast"
    full_length = sum(g["sequences"] * g["max_new_tokens"] for g in gen)
    new_tokens = sum(g["new_tokens"] for g in gen)
    lines = [
        "<!-- bench:gpu -->",
        f"### GPU: SmolLM2-135M-Instruct (random weights) on one {env['device_name']}, "
        f"{s['precision']}{smoke}",
        "",
        f"Measured by `python -m benchmarks.gpu` on {env['device_name']}"
        + (f" ({env['device_memory_gib']:.0f} GiB)" if "device_memory_gib" in env else "")
        + f", torch {env['torch']} (CUDA {env['cuda']}), transformers {env['versions']['transformers']}, "
        f"TRL {env['versions']['trl']}, PEFT {env['versions']['peft']}, Python {env['python']}; "
        f"{env['date']}. The model is SmolLM2-135M-Instruct's exact config and tokenizer "
        f"({result['model']['n_params'] / 1e6:.1f}M parameters, tied embeddings) with random seeded "
        "weights (the real ones cannot travel to the lent GPU): throughput, memory and MFU do not "
        "depend on weight values; the losses are meaningless.",
        "",
        f"#### SFT: {s['examples']} task examples (real task world, instruct prompts), 1 epoch, batch "
        f"{s['batch_size']}, max_length {s['max_length']}, LoRA r=16 on all 7 projections without "
        "`modules_to_save` (the gpu profile's settings), and a full fine-tune",
        "",
        "| run | trainable params | whole call s (load, tokenize, train, save) | timed steps | ms/step "
        "| real tokens/s | peak GiB (allocated) | MFU | ratio to bare TRL |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sft:
        kind = "lora" if "lora" in r["name"] else "full"
        ratio = "1.00x"
        if r["name"] not in ("bare_lora", "bare_full") and kind in bare and r.get("tokens_per_s"):
            other = bare[kind].get("tokens_per_s")
            ratio = f"{r['tokens_per_s'] / other:.2f}x" if other else "-"
        lines.append(
            f"| {r['label']} | {r['trainable_params'] / 1e6:.2f}M | {r['wall_seconds']:.1f} | "
            f"{r['timed_steps']} of {r['total_steps']} | {_f(r.get('ms_per_step'), '.1f')} | "
            f"{_f(r.get('tokens_per_s'), ',.0f')} | {_f(r['peak_memory_gib'], '.2f')} | "
            f"{_f(None if r['mfu'] is None else 100 * r['mfu'], '.2f')}% | {ratio} |"
        )
    lines += [
        "",
        f"Timed window: steps {s['warmup_steps'] + 1} to the last (the first {s['warmup_steps']} are "
        "warm-up), synchronised at both ends; real tokens = TRL's attention-mask count (pad tokens "
        f"excluded). MFU: {result['mfu_formula']}, over the {s['peak_tflops']:.0f} TFLOP/s dense bf16 "
        "peak of an H200 (SXM). Our `train_sft` runs without gradient checkpointing "
        "(`compute.gradient_checkpointing: false`, the default); the bare TRL script keeps TRL's "
        "default (on), as in the CPU benchmark, and once more with it off (the like-for-like row). "
        f"All load fp32 weights and train with precision {s['precision']} ({precision_note}). "
        f"QLoRA: {result['qlora']}.",
        "",
        f"#### Generation: our `generate()`, {s['gen_prompts']} preference prompts, batch {s['gen_batch']}, "
        f"{s['gen_new_tokens']} new tokens",
        "",
        "| mode | weights | input batches | sequences | new tokens | seconds (median of "
        f"{s['gen_repeats']}) | new tokens/s | peak GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for g in gen:
        mode = (
            g["mode"]
            if g["mode"] == "greedy"
            else f"sampled, k={g['samples_per_prompt']}, T={g['temperature']}"
        )
        lines.append(
            f"| {mode} | {g['weights']} | {g['inputs']} | {g['sequences']} | {g['new_tokens']} | "
            f"{g['seconds_median']:.3f} | "
            f"{g['new_tokens_per_s']:,.0f} | {_f(g['peak_memory_gib'], '.2f')} |"
        )
    lines += [
        "",
        f"`generate()` called as the stages call it, with the model moved to {s['device']}: "
        f"{result['generate_as_is']} (the stages themselves load the policy on the CPU). It builds its "
        "left-padded batches on the CPU; the moved rows put them on the device first (a wrapper around "
        "`model.generate`, nothing else changed). float32 is what the preferences and evaluate stages "
        "load (`load_policy`); bfloat16 rows show what casting the policy would give. "
        "New tokens are counted up to each sequence's first end-of-turn token: "
        f"{new_tokens} of a possible {full_length} (random weights rarely stop early).",
        "",
    ]
    return "\n".join(lines)


def settings(args: argparse.Namespace) -> Settings:
    if args.smoke:
        return Settings(
            device="cpu", precision="fp32", examples=16, batch_size=8, max_length=96, warmup_steps=1,
            gen_prompts=2, gen_batch=2, gen_new_tokens=4, gen_k=2, gen_temperature=1.0, gen_repeats=1,
            peak_tflops=args.peak_tflops,
        )  # fmt: skip
    device, precision = resolve_compute(ComputeConfig(device="cuda", precision="bf16"))
    return Settings(
        device=device, precision=precision, examples=args.examples, batch_size=32, max_length=96,
        warmup_steps=args.warmup_steps, gen_prompts=args.gen_prompts, gen_batch=128, gen_new_tokens=16,
        gen_k=8, gen_temperature=1.0, gen_repeats=3, peak_tflops=args.peak_tflops,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model-dir", type=Path, required=True, help="config + tokenizer (no weights needed)"
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--smoke", action="store_true", help="CPU, 16 examples, 2 steps: a check, not a benchmark"
    )
    parser.add_argument(
        "--examples", type=int, default=2048, help="SFT examples: 1 epoch = examples/32 steps"
    )
    parser.add_argument("--warmup-steps", type=int, default=5, help="steps left out of the timed window")
    parser.add_argument("--gen-prompts", type=int, default=128)
    parser.add_argument("--peak-tflops", type=float, default=H200_BF16_DENSE_TFLOPS)
    parser.add_argument("--only", choices=["sft", "generation"], nargs="+", default=["sft", "generation"])
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    from datasets import disable_progress_bars
    from transformers.utils import logging as hf_logging

    disable_progress_bars()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    s = settings(args)
    args.out.mkdir(parents=True, exist_ok=True)
    splits = real_task_splits(s.examples, n_preference_prompts=max(s.gen_prompts, 1))
    records, prompts = (
        splits["sft_train"],
        [r["prompt"] for r in splits["preference_prompts"]][: s.gen_prompts],
    )
    lora = SFTConfig(  # the gpu profile's sft section, 1 epoch
        learning_rate=3e-4, epochs=1, batch_size=s.batch_size, max_length=s.max_length, warmup_steps=20,
        peft=PeftConfig(modules_to_save=()),
    )  # fmt: skip
    full = dataclasses.replace(lora, peft=PeftConfig(method="full", modules_to_save=()))
    qlora = dataclasses.replace(lora, peft=PeftConfig(method="qlora", modules_to_save=()))
    bnb = (
        "bitsandbytes installed" if importlib.util.find_spec("bitsandbytes") else "bitsandbytes not installed"
    )
    result: dict[str, Any] = {
        "smoke": args.smoke,
        "settings": dataclasses.asdict(s),
        "environment": environment(s),
        "mfu_formula": MFU_FORMULA,
        "qlora": f"sft.peft.method: qlora (NF4 + double quantization, bf16 compute); {bnb}",
        "sft": [],
        "generation": [],
        "generate_as_is": "not run",
    }
    with tempfile.TemporaryDirectory(prefix="gpu-bench-base-") as tmp:
        base_dir = Path(tmp) / "base"
        n_params = build_random_base(args.model_dir, base_dir)
        result["model"] = {
            "config_from": str(args.model_dir),
            "n_params": n_params,
            "weights": "random, seed 0",
        }
        runs = [
            ("ours_lora", "ours: `train_sft`, LoRA", run_ours, lora),
            ("bare_lora", "bare TRL `SFTTrainer`, LoRA", run_bare, lora),
            ("ours_full", "ours: `train_sft`, full fine-tune", run_ours, full),
            ("bare_full", "bare TRL `SFTTrainer`, full fine-tune", run_bare, full),
            ("ours_qlora", "ours: `train_sft`, QLoRA (4-bit NF4 base)", run_ours, qlora),
        ]
        if "sft" in args.only:
            for name, label, fn, cfg in runs:
                print(f"gpu bench: {name} ...", file=sys.stderr, flush=True)
                result["sft"].append(fn(name, label, cfg, base_dir, records, s, n_params))
            # the wrapper's own cost: bare TRL with gradient checkpointing off, as ours runs
            name, label = "bare_lora_nogc", "bare TRL `SFTTrainer`, LoRA, gradient checkpointing off"
            print(f"gpu bench: {name} ...", file=sys.stderr, flush=True)
            result["sft"].append(run_bare(name, label, lora, base_dir, records, s, n_params, False))
        if "generation" in args.only:
            print("gpu bench: generation ...", file=sys.stderr, flush=True)
            result["generation"], result["generate_as_is"] = bench_generation(base_dir, prompts, s)
    md = markdown(result)
    (args.out / "gpu_bench.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (args.out / "gpu_bench.md").write_text(md + "\n")
    print(json.dumps(result, indent=2, default=str))
    print(md)


if __name__ == "__main__":
    main()
