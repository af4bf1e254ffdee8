"""``posttrain``: run, inspect and schedule the post-training DAG, and query its RAG index."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from components.errors import PosttrainError

DESCRIPTION = """\
posttrain takes a base language model through post-training and builds the retrieval index
it answers from, as one versioned DAG:

  base -> ingest -> sft -> preferences -> reward_model -> align -> compress -> evaluate
  rag_index (parse docs -> chunk -> embed -> Milvus, dense + BM25)

Every stage is a `dvc.yaml` stage (`python -m tasks.<stage>`) whose settings live in one
section of `params.yaml`. DVC decides which stages are stale, Prefect runs them (retries,
schedules, UI), MLflow records params, metrics, plots and models (one parent run per
`posttrain run`, one nested run per stage that actually ran).

Run it from the project root. Outputs: models/ (weights), data/processed, data/preferences,
data/rag (Milvus Lite), metrics/<stage>.json, plots/, mlflow.db + mlartifacts/ (`make ui`).
"""

EPILOG = """\
examples:
  posttrain run                          # everything stale, in DAG order
  posttrain run --stages sft evaluate    # just these (upstream must be up to date)
  posttrain run --force --stages align   # re-run even if DVC says it is up to date
  posttrain run --profile smollm2-135m   # the real bundled model (2 CPU cores, ~35 min)
  posttrain profile tiny                 # back to the tiny defaults (params.yaml edited in place)
  posttrain status                       # what a run would execute, and why
  posttrain validate                     # check params.yaml against the typed configs
  posttrain promote                      # champion/challenger gate (after a plain dvc repro)
  posttrain models                       # registered versions, aliases, held-out metrics
  posttrain runs -n 2                    # the last two pipeline runs side by side
  posttrain plots                        # loss curves + evaluation, one offline HTML page
  posttrain metrics evaluate             # the evaluation as a model x metric table
  posttrain serve --cron "0 3 * * *"     # nightly re-run as a Prefect deployment
  posttrain serve --flow rag-refresh --interval 900 --name docs   # re-index changed docs every 15 min
  posttrain deploy --pool p --interval 3600  # same, run by `prefect worker start --pool p`
  posttrain rag ingest docs/ report.pdf  # add documents to the index
  posttrain rag query "capital of Fosaduia" --mode hybrid --json
  posttrain rag ask "When is the lantern festival in Rapeba?"  # a cited answer, guarded
  posttrain rag eval data/rag_eval/questions.jsonl  # recall/MRR/nDCG per retrieval mode
  posttrain deltas ask --delta a=runs/a --delta b=runs/b "What is 2 + 3?"  # fine-tunes on one base
  posttrain deltas serve --delta a=runs/a --delta b=runs/b  # the same over HTTP (127.0.0.1:8600)
  posttrain adapters ask --base models/base --adapter a=runs/a --adapter b=runs/b "add 2 and 3"
  posttrain compare peft                 # PEFT methods: trainable share, memory, time, size, accuracy
"""


def cmd_run(args: argparse.Namespace) -> int:
    from components.errors import PosttrainError as UserError
    from components.params import load_params
    from flows.dag import changed_stages, load_stages, topological_order

    if args.profile:
        from flows.profiles import apply_profile, format_changes

        print(format_changes(args.profile, apply_profile(args.profile)))
    params = load_params("params.yaml")  # a bad key fails here in one line, before Prefect starts
    _sync_model_dep(params.base.model)
    order = topological_order(load_stages("."))
    unknown = sorted(set(args.stages or ()) - set(order))
    if unknown:  # before Prefect's temporary server starts (seconds)
        raise UserError(f"unknown stage {unknown[0]!r} (stages: {', '.join(order)})")
    selected = [s for s in order if not args.stages or s in args.stages]
    if not args.force and not changed_stages(Path("."), selected):  # ask DVC before starting Prefect
        print(f"0 stage(s) executed, {len(selected)} up to date (nothing changed: Prefect not started)")
        from tasks.promote import promotion_is_current

        gate = "evaluate" in selected and params.tracking.log_models != "none"
        if gate and not promotion_is_current(params):
            return cmd_promote(args)  # the registry follows the lineage (e.g. after a plain dvc repro)
        return 0

    from flows.post_training import post_training

    outcomes = post_training(repo_dir=".", stages=args.stages, force=args.force, track=not args.no_track)
    stages = {s: o for s, o in outcomes.items() if s != "promote"}
    ran = [s for s, o in stages.items() if o != "skipped"]
    print(f"{len(ran)} stage(s) executed, {len(stages) - len(ran)} up to date")
    return 0


def _sync_model_dep(model: str) -> None:
    from flows.model_dep import sync_model_dep

    if message := sync_model_dep(model):
        print(message)


def cmd_status(args: argparse.Namespace) -> int:
    from components.params import load_params
    from flows.dag import changed_stages, descendants, load_stages, topological_order

    _sync_model_dep(load_params("params.yaml").base.model)

    stages = load_stages(".")
    changed = changed_stages(Path("."))
    downstream = descendants(stages, set(changed))
    width = max(len(s) for s in stages)
    for stage in topological_order(stages):
        if stage in changed:
            reasons = changed[stage]
            detail = "; ".join(_describe(r) for r in reasons) if isinstance(reasons, list) else str(reasons)
            print(f"{stage:<{width}}  stale     {detail}")
        elif stage in downstream:
            print(f"{stage:<{width}}  stale     an upstream stage will change")
        else:
            print(f"{stage:<{width}}  up to date")
    return 0


def _describe(reason: object) -> str:
    if isinstance(reason, dict):
        return ", ".join(
            f"{kind}: {', '.join(f'{k} {v}' for k, v in what.items()) if isinstance(what, dict) else what}"
            for kind, what in reason.items()
        )
    return str(reason)


def cmd_profile(args: argparse.Namespace) -> int:
    from flows.profiles import apply_profile, format_changes, matching_profiles, shipped_profiles

    if args.name:
        print(format_changes(args.name, apply_profile(args.name)))
        return 0
    active = set(matching_profiles())
    profiles = shipped_profiles()
    width = max(len(n) for n in profiles)
    for name, prof in sorted(profiles.items()):
        mark = "*" if name in active else " "
        print(f"{mark} {name:<{width}}  {len(prof.values):>3} keys  {prof.summary}")
    print("(* = params.yaml holds every value of that profile)")
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    from flows.dag import load_stages, topological_order
    from flows.metrics_view import render

    print(render("metrics", args.stages or (), order=topological_order(load_stages("."))), end="")
    return 0


def cmd_label(args: argparse.Namespace) -> int:
    from flows.label import label

    try:
        counts = label(args.candidates, args.out, seed=args.seed)
    except (KeyboardInterrupt, EOFError):  # every choice made so far is already on disk
        print("\nstopped; every choice so far is saved (run `posttrain label` again to resume)")
        return 130
    print(
        f"\n{counts['labelled']} labelled ({counts['agree_with_verifier']} agree with the verifier), "
        f"{counts['skipped']} skipped, {counts['remaining']} left; pairs in {args.out} "
        "(set ingest.preference_data to train on them)"
    )
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from flows.compare import chart, exp_show, render, rows_from_exp_show

    rows = rows_from_exp_show(exp_show("."), args.view)
    if not rows:
        print(
            f"posttrain compare: no result with metrics/{args.view}.json yet (run the pipeline first)",
            file=sys.stderr,
        )
        return 1
    print(render(rows, markdown=args.markdown, view=args.view), end="")
    png = args.png or ("plots/compare.png" if args.view == "align" else f"plots/compare_{args.view}.png")
    print(f"chart: {chart(rows, png, args.view)}")
    return 0


def cmd_plots(args: argparse.Namespace) -> int:
    from flows.offline_plots import show

    print(f"{show('.', args.out)} (offline: vega is inlined, nothing is fetched)")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from components.config import ConfigError
    from components.params import load_params

    try:
        load_params(args.params)
    except ConfigError as exc:  # every problem at once, one line each
        for problem in exc.problems:
            print(f"posttrain validate: error: {problem}", file=sys.stderr)
        return 2
    print(f"{args.params}: ok")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    import subprocess

    return subprocess.run([sys.executable, "-m", "tasks.promote"]).returncode


def cmd_models(args: argparse.Namespace) -> int:
    from components.params import load_params
    from flows.registry import format_versions, list_versions

    params = load_params(args.params)
    print(format_versions(list_versions(params.tracking), params.evaluate.promotion_alias))
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from components.params import load_params
    from flows.run_summary import format_runs, recent_runs

    print(format_runs(recent_runs(load_params(args.params).tracking, args.last)))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from flows.deploy import serve  # imports Prefect only once the server URL is known

    serve(
        cron=args.cron,
        interval=args.interval,
        name=args.name,
        repo_dir=str(Path(".").resolve()),
        stages=args.stages,
        flow_name=args.flow,
    )
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from flows.deploy import deploy

    deployment_id = deploy(
        pool=args.pool,
        cron=args.cron,
        interval=args.interval,
        name=args.name,
        repo_dir=str(Path(".").resolve()),
        stages=args.stages,
        flow_name=args.flow,
    )
    print(f"deployment {args.flow}/{args.name} ({deployment_id}) in work pool {args.pool!r}")
    print(f"run its flow runs with: prefect worker start --pool {args.pool}")
    return 0


def _add_schedule_args(p: argparse.ArgumentParser) -> None:
    when = p.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", metavar="EXPR", help='cron expression, e.g. "0 3 * * *" (03:00 daily)')
    when.add_argument("--interval", type=float, metavar="SECONDS", help="run every SECONDS seconds")
    p.add_argument("--name", default="posttrain-scheduled", help="deployment name")
    p.add_argument(
        "--stages", nargs="+", metavar="STAGE", help="the scheduled runs run only these stages (default: all)"
    )
    p.add_argument(
        "--flow",
        choices=("post-training", "rag-refresh"),
        default="post-training",
        help="post-training (the whole DAG, default) or rag-refresh (re-index changed documents only: "
        "schedule it more often than training)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="posttrain",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run the post-training flow (stale stages only)",
        description="Run the DAG through Prefect: each stale stage runs `dvc repro --single-item <stage>` "
        "in a nested MLflow run under one parent run; up-to-date stages are reported as skipped.",
    )
    run.add_argument("--stages", nargs="+", metavar="STAGE", help="only these stages (in DAG order)")
    run.add_argument("--force", action="store_true", help="re-run the selected stages even if up to date")
    run.add_argument(
        "--no-track", action="store_true", help="no parent MLflow run (stages still log their own)"
    )
    run.add_argument(
        "--profile",
        metavar="NAME",
        help="first write profile NAME into params.yaml (see `posttrain profile`), then run",
    )
    run.set_defaults(func=cmd_run)

    profile = sub.add_parser(
        "profile",
        help="list the params profiles, or apply one to params.yaml",
        description="A profile (profiles/NAME.yaml) holds the params that differ for another model or "
        "machine: smollm2-135m runs the bundled SmolLM2-135M-Instruct on 2 CPU cores, gpu sizes it "
        "for one CUDA GPU, and the built-in tiny puts every key the profiles touch back to the "
        "defaults. Applying one edits params.yaml in place (comments kept), so dvc.lock records what "
        "ran and only the stages whose keys changed re-run. With no NAME: list them, marking the "
        "ones params.yaml already holds.",
    )
    profile.add_argument("name", nargs="?", metavar="NAME", help="profile to apply")
    profile.set_defaults(func=cmd_profile)

    status = sub.add_parser(
        "status",
        help="show which stages are stale and why",
        description="Compare the workspace with dvc.lock: a stage is stale when its deps, params or outputs "
        "changed, or when a stage upstream of it is stale.",
    )
    status.set_defaults(func=cmd_status)

    metrics = sub.add_parser(
        "metrics",
        help="every stage's metrics as narrow tables (the evaluation as model x metric)",
        description="Read metrics/<stage>.json (what `dvc metrics show` reads) and print one table per "
        "stage: the evaluation as a model-by-metric table with per-task accuracy, the other stages as "
        "dotted key/value lists. `dvc metrics diff` still compares against the last commit.",
    )
    metrics.add_argument("stages", nargs="*", metavar="STAGE", help="only these stages")
    metrics.set_defaults(func=cmd_metrics)

    label_cmd = sub.add_parser(
        "label",
        help="label preference pairs yourself in the terminal (resumable; Ctrl-C loses nothing)",
        description="Show a prompt and two candidate answers in random order; type 1 or 2 for the "
        "better one, s to skip, q to stop. Each choice is appended to the labels file at once "
        "(fsynced), and a second run resumes where the first stopped. The labels file is in the "
        "import format: set ingest.preference_data to it to train on your pairs.",
    )
    label_cmd.add_argument(
        "--candidates",
        default="data/preferences/train.jsonl",
        help="preference pairs to judge (default: data/preferences/train.jsonl)",
    )
    label_cmd.add_argument(
        "--out", default="data/labels/human.jsonl", help="labels file (default: data/labels/human.jsonl)"
    )
    label_cmd.add_argument("--seed", type=int, default=0, help="order and A/B shuffling seed")
    label_cmd.set_defaults(func=cmd_label)

    compare = sub.add_parser(
        "compare",
        help="alignment, compression or PEFT methods side by side: a table and a PNG over `dvc exp show`",
        description="One row per distinct result among the workspace, the last commit and its DVC "
        "experiments. `compare align` (the default; e.g. after `dvc exp run -S align.method=grpo`): "
        "the method and reward, the aligned model's greedy and sampled accuracy and mean reward on "
        "the held-out suite next to SFT's, align's held-out reward before and after, KL to SFT, wall "
        "time and peak memory (metrics/align.json and metrics/evaluate.json of the same lineage). "
        "`compare compress` (e.g. after `dvc exp run -S compress.method=bitdelta`): size ratio, "
        "fidelity KL, accuracy delta and generation speed ratio against the merged model, the "
        "candidate's held-out accuracy, and a PNG of size ratio against accuracy. `compare peft` (e.g. "
        "after `dvc exp run sft -S sft.peft.method=dora`): trainable parameters (count and share), "
        "peak memory, train time, adapter size, and the SFT policy's held-out loss, accuracy and "
        "reward (metrics/sft.json), with a PNG of trainable share against accuracy.",
    )
    compare.add_argument(
        "view",
        nargs="?",
        choices=("align", "compress", "peft"),
        default="align",
        help="which methods (default: align)",
    )
    compare.add_argument(
        "--png", default=None, help="chart path (default: plots/compare.png, plots/compare_<view>.png)"
    )
    compare.add_argument("--markdown", action="store_true", help="print a Markdown table (for a README)")
    compare.set_defaults(func=cmd_compare)

    plots = sub.add_parser(
        "plots",
        help="render every stage's plots into one offline HTML page (dvc plots show)",
        description="Run `dvc plots show` with the repo's offline template (.dvc/plots.html: vega, "
        "vega-lite and vega-embed inlined, written by `make setup` or here if missing), so the page "
        "renders with no network. The loss curves and the evaluation table are also PNG files in "
        "plots/ and in each stage's MLflow run.",
    )
    plots.add_argument("-o", "--out", default="dvc_plots", help="output folder (default: dvc_plots)")
    plots.set_defaults(func=cmd_plots)

    validate = sub.add_parser("validate", help="check params.yaml against the typed stage configs")
    validate.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    validate.set_defaults(func=cmd_validate)

    promote = sub.add_parser(
        "promote",
        help="register the evaluated candidate and apply the champion/challenger gate",
        description="Register the candidate that `evaluate` scored (once per content hash, tagged with the "
        "dvc.lock hash, git commit and held-out metrics), then move the `evaluate.promotion_alias` alias "
        "(default `champion`) to it only if, on `evaluate.promotion_metric`, the aligned model is not "
        "below SFT, the candidate is within `evaluate.promotion_max_compression_drop` of the aligned model "
        "it was compressed from, and within `evaluate.promotion_max_accuracy_drop` of the current champion. "
        "`posttrain run` does this after every run; run it yourself after a plain `dvc repro`.",
    )
    promote.set_defaults(func=cmd_promote)

    models = sub.add_parser(
        "models",
        help="list registered policy versions, their aliases and held-out metrics",
        description="Every version of `tracking.registered_model` in the MLflow registry: aliases, the "
        "gate's verdict and reason, the key held-out metrics and the lineage tags.",
    )
    models.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    models.set_defaults(func=cmd_models)

    runs = sub.add_parser(
        "runs",
        help="the last pipeline runs side by side: params that differ, headline metrics",
        description="Read the parent `post-training` runs from MLflow (newest first) and print them as "
        "columns: start time, status, commit, every param that differs between them, then the "
        "evaluation table, reward model, compression, RAG and gate metrics. The same params and metrics "
        "are on the parent runs in the MLflow UI (select two runs, Compare).",
    )
    runs.add_argument("-n", "--last", type=int, default=3, metavar="N", help="how many runs (default 3)")
    runs.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    runs.set_defaults(func=cmd_runs)

    serve = sub.add_parser(
        "serve",
        help="run the flow on a cron or interval schedule, from this process",
        description="Create a Prefect deployment of the post-training flow with a schedule (exactly one of "
        "--cron and --interval) and run its scheduled flow runs from this process until Ctrl-C. Scheduling "
        "needs a Prefect server (the ephemeral API cannot schedule): if PREFECT_API_URL is set, that server "
        "is used (and shows the runs in its UI); otherwise `prefect server start` is started on 127.0.0.1 at "
        "a free port for the life of this command and stopped on exit. At most one scheduled run executes "
        "at a time (deployment concurrency limit 1).",
    )
    _add_schedule_args(serve)
    serve.set_defaults(func=cmd_serve)

    deploy = sub.add_parser(
        "deploy",
        help="register a scheduled deployment in a process work pool (run it with a Prefect worker)",
        description="Register the post-training flow (code from this checkout, runs in the current "
        "directory) as a deployment in the `process` work pool --pool on the Prefect server at "
        "PREFECT_API_URL (required), creating the pool if missing. Then run "
        "`prefect worker start --pool NAME` to execute its scheduled runs. Concurrency limit 1.",
    )
    deploy.add_argument("--pool", required=True, metavar="NAME", help="process work pool name")
    _add_schedule_args(deploy)
    deploy.set_defaults(func=cmd_deploy)

    from flows.rag_cli import add_rag_parser

    add_rag_parser(sub)

    from flows.adapters_cli import add_adapters_parser
    from flows.deltas_cli import add_deltas_parser
    from flows.mm_cli import add_mm_parser

    add_deltas_parser(sub)
    add_adapters_parser(sub)
    add_mm_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    command = "posttrain"
    try:
        args = build_parser().parse_args(argv)
        command = f"posttrain {args.command}"
        code = args.func(args)
        sys.stdout.flush()
    except PosttrainError as exc:
        for line in str(exc).splitlines() or [""]:  # a params file with several problems: one line each
            print(f"{command}: error: {line}", file=sys.stderr)
        code = 2
    except BrokenPipeError:  # `posttrain status | head -2`: the reader left; so do we, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    sys.exit(code)


if __name__ == "__main__":
    main()
