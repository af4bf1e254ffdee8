"""Champion/challenger: register this lineage's candidate, and move the alias only when it earns it.

Not a DVC stage, on purpose: the champion lives in the MLflow registry, outside the lineage, so
a stage whose output depended on it could never be reproduced from ``dvc.lock``. Instead this
step runs after every ``posttrain run`` (and as ``posttrain promote`` after a plain ``dvc
repro``) and makes the registry match the lineage, whatever DVC did: ran, skipped, or restored
``evaluate`` from its run cache.

1. The candidate is identified by content: the hash of ``paths.compressed_model`` that the
   ``evaluate`` output recorded in its manifest (a stale evaluation is refused).
2. A candidate is registered once: the version tagged with that hash is reused, otherwise the
   merged policy is logged in a new run and the version is found by that run's id, never as
   "the newest". Under ``tracking.log_models: adapters`` only a candidate that passes the gate
   is registered (real models: one full copy per champion, not one per run). Versions carry
   the ``dvc.lock`` hash, the git commit, the suite fingerprint and the key held-out metrics
   as tags.
3. The champion's scores come from its tags when the suite is unchanged; otherwise the
   champion is re-scored from the registry on today's suite.
4. :func:`components.evaluation.gate.promotion_decision` decides; only a pass moves the alias.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from components.artifacts import hash_path
from components.data.jsonl import read_jsonl
from components.errors import MissingInputError, PosttrainError
from components.evaluation.gate import GATE_METRICS, promotion_decision
from components.params import Params, load_params

TAG = "posttrain."
CANDIDATE_TAG = TAG + "candidate_sha256"
SUITE_TAG = TAG + "suite_sha256"


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise MissingInputError(f"{path}: {what} not found (run the pipeline first: `posttrain run`)")
    return json.loads(path.read_text())


def evaluated_candidate(params: Params) -> tuple[str, dict[str, Any]]:
    """(candidate hash, evaluate's metrics), refusing an evaluation of a different candidate."""
    evaluation = Path(params.paths.evaluation)
    results = _read_json(evaluation / "metrics.json", "evaluation")
    recorded = _read_json(evaluation / "manifest.json", "evaluation manifest")["inputs"].get("compressed")
    current = (
        hash_path(params.paths.compressed_model) if Path(params.paths.compressed_model).exists() else None
    )
    if recorded is None or recorded != current:
        raise PosttrainError(
            f"{evaluation}: evaluates a different candidate than {params.paths.compressed_model} "
            "(run `posttrain run` so evaluate is up to date)"
        )
    return recorded, results


def metric_tags(prefix: str, metrics: dict[str, Any]) -> dict[str, str]:
    return {
        f"{TAG}{prefix}{k}": repr(float(metrics[k])) for k in (*GATE_METRICS, "perplexity") if k in metrics
    }


def tagged_metrics(tags: dict[str, str], prefix: str) -> dict[str, float] | None:
    found = {k: float(tags[f"{TAG}{prefix}{k}"]) for k in GATE_METRICS if f"{TAG}{prefix}{k}" in tags}
    return found if len(found) == len(GATE_METRICS) else None


def _versions(client: Any, name: str) -> list[Any]:
    from mlflow.exceptions import MlflowException

    try:
        return list(client.search_model_versions(f"name='{name}'"))
    except MlflowException:
        return []


def registered_candidate(client: Any, name: str, key: str) -> Any | None:
    """The registry version already holding the candidate with content hash ``key``, if any."""
    return next((v for v in _versions(client, name) if v.tags.get(CANDIDATE_TAG) == key), None)


def register_candidate(params: Params, client: Any, key: str, results: dict[str, Any], tracker: Any) -> Any:
    """Log the merged candidate in this run and register it; the version is found by this run's id."""
    import mlflow

    from tasks.tracking import lineage_tags

    name = params.tracking.registered_model
    merged = Path(params.paths.compressed_model) / "merged"
    tracker.log_model(merged, name="policy", registered_name=name)
    run_id = mlflow.active_run().info.run_id
    mine = list(client.search_model_versions(f"name='{name}' and run_id='{run_id}'"))
    if len(mine) != 1:
        raise PosttrainError(f"registry: expected one version of {name} from run {run_id}, found {len(mine)}")
    version = mine[0]
    tags = {
        CANDIDATE_TAG: key,
        SUITE_TAG: results["suite_sha256"],
        **lineage_tags(),
        **metric_tags("metric.", results[results["candidate"]]),
        **metric_tags("sft.", results["sft"]),
    }
    for k, v in tags.items():
        client.set_model_version_tag(name, version.version, k, v)
    return client.get_model_version(name, version.version)


def rescore(params: Params, version: Any) -> dict[str, Any]:
    """Score a registered version on today's suite (its registered, full-precision weights)."""
    import mlflow

    from components.evaluation.suite import evaluate_policy

    cfg = params.evaluate
    parts = mlflow.transformers.load_model(
        f"models:/{params.tracking.registered_model}/{version.version}", return_type="components"
    )
    records = read_jsonl(Path(params.paths.processed) / "eval_prompts.jsonl")[: cfg.n_prompts]
    metrics, _ = evaluate_policy(parts["model"].float().eval(), parts["tokenizer"], records, cfg)
    return metrics


def promote(params: Params, tracker: Any) -> dict[str, Any]:
    """Compare the candidate with SFT and the champion; register it and move the alias on a pass.

    Under ``tracking.log_models: all`` every candidate is registered (a failed one too, tagged
    ``promoted=false``); under ``adapters`` only one that passes, so the registry holds one full
    model per champion rather than one per run.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    cfg, name = params.evaluate, params.tracking.registered_model
    key, results = evaluated_candidate(params)
    client = MlflowClient()
    version = registered_candidate(client, name, key)
    if version is None and params.tracking.log_models == "all":
        version = register_candidate(params, client, key, results, tracker)
    try:
        champion = client.get_model_version_by_alias(name, cfg.promotion_alias)
    except MlflowException:
        champion = None
    candidate_metrics = results[results["candidate"]]
    champion_metrics, source = None, "none"
    if champion is not None and version is not None and champion.version == version.version:
        promote_it, reason, source = (
            True,
            f"version {version.version} already holds @{cfg.promotion_alias}",
            "self",
        )
    else:
        if champion is not None:
            stored = tagged_metrics(champion.tags, "metric.")
            if champion.tags.get(SUITE_TAG) == results["suite_sha256"] and stored is not None:
                champion_metrics, source = stored, "stored"
            else:
                champion_metrics, source = rescore(params, champion), "rescored"
        promote_it, reason = promotion_decision(
            cfg.promotion_metric,
            candidate_metrics,
            results["sft"],
            champion_metrics,
            cfg.promotion_max_accuracy_drop,
            aligned=results["aligned"],
            max_compression_drop=cfg.promotion_max_compression_drop,
        )
        if promote_it and version is None:  # log_models: adapters registers winners only
            version = register_candidate(params, client, key, results, tracker)
        if version is not None:
            if promote_it:
                client.set_registered_model_alias(name, cfg.promotion_alias, version.version)
            client.set_model_version_tag(name, version.version, TAG + "promoted", str(promote_it).lower())
            client.set_model_version_tag(name, version.version, TAG + "gate_reason", reason)
    decision = {
        "candidate_sha256": key,
        "promoted": promote_it,
        "reason": reason,
        "version": None if version is None else str(version.version),
        "run_id": None if version is None else version.run_id,
        "champion_before": None if champion is None else str(champion.version),
        "champion_metrics_source": source,
        "metric": cfg.promotion_metric,
        "candidate": {k: candidate_metrics[k] for k in GATE_METRICS},
        "sft": {k: results["sft"][k] for k in GATE_METRICS},
        "aligned": {k: results["aligned"][k] for k in GATE_METRICS},
        "champion": champion_metrics,
    }
    tracker.set_tags({TAG + "promoted": str(promote_it).lower(), TAG + "gate_reason": reason})
    if champion_metrics is not None:
        tracker.log_metrics({f"champion.{k}": v for k, v in champion_metrics.items() if k in GATE_METRICS})
    return decision


LAST_PROMOTION = Path(".dvc/tmp/posttrain-last-promotion.json")  # what the last gate decided on


def _promotion_key(params: Params, candidate: str) -> dict[str, Any]:
    """Everything a gate decision depends on besides the registry itself."""
    cfg, tracking = params.evaluate, params.tracking
    return {
        "candidate": candidate,
        "tracking_uri": tracking.tracking_uri,
        "registered_model": tracking.registered_model,
        "log_models": tracking.log_models,
        "alias": cfg.promotion_alias,
        "metric": cfg.promotion_metric,
        "max_drop": cfg.promotion_max_accuracy_drop,
        "max_compression_drop": cfg.promotion_max_compression_drop,
    }


def promotion_is_current(params: Params) -> bool:
    """Whether the last ``promote`` in this checkout decided on this very candidate and gate.

    Lets a no-op ``posttrain run`` skip the gate (and MLflow's start-up) when nothing changed;
    reads the candidate hash evaluate recorded, no model is hashed.
    """
    manifest = Path(params.paths.evaluation) / "manifest.json"
    if not LAST_PROMOTION.is_file() or not manifest.is_file():
        return False
    candidate = json.loads(manifest.read_text())["inputs"].get("compressed")
    return json.loads(LAST_PROMOTION.read_text()) == _promotion_key(params, candidate)


def main() -> None:
    """``python -m tasks.promote``: one MLflow run (nested under the flow's), one line of outcome."""
    from tasks.tracking import stage_run

    try:
        params = load_params("params.yaml")
        if params.tracking.log_models == "none":
            print("posttrain promote: skipped (tracking.log_models is none: nothing is registered)")
            return
        with stage_run("promote", params.tracking) as tracker:
            decision = promote(params, tracker)
        if LAST_PROMOTION.parent.is_dir():
            key = _promotion_key(params, decision["candidate_sha256"])  # already hashed by promote()
            LAST_PROMOTION.write_text(json.dumps(key, sort_keys=True) + "\n")
    except PosttrainError as exc:
        print(f"posttrain promote: error: {exc}", file=sys.stderr)
        sys.exit(2)
    verdict = "promoted" if decision["promoted"] else "not promoted"
    alias = params.evaluate.promotion_alias
    version = decision["version"]
    what = "the candidate (not registered)" if version is None else f"version {version}"
    print(f"posttrain promote: {what} {verdict} to @{alias}: {decision['reason']}")
    print(json.dumps(decision, sort_keys=True))


if __name__ == "__main__":
    main()
