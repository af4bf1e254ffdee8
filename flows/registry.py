"""``posttrain models``: the registered policy versions as a user wants to compare them."""

from __future__ import annotations

from typing import Any

from components.params import TrackingConfig

COLUMNS = ("accuracy", "sampled_accuracy", "reward_mean")


def list_versions(cfg: TrackingConfig) -> list[dict[str, Any]]:
    """Every version of the registered policy, oldest first, with its aliases and posttrain tags."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from tasks.tracking import configure

    configure(cfg)
    client = MlflowClient()
    try:
        versions = client.search_model_versions(f"name='{cfg.registered_model}'")
        aliases = client.get_registered_model(cfg.registered_model).aliases  # {alias: version}
    except MlflowException:
        return []
    return [
        {
            "version": str(v.version),
            "aliases": sorted(a for a, version in aliases.items() if str(version) == str(v.version)),
            "run_id": v.run_id,
            "tags": dict(v.tags),
        }
        for v in sorted(versions, key=lambda v: int(v.version))
    ]


def format_versions(versions: list[dict[str, Any]], alias: str) -> str:
    """A plain table: version, aliases, gate verdict, candidate metrics (sft's in brackets), commit."""
    if not versions:
        return "no registered versions yet (run `posttrain run`)"
    head = f"{'version':>7}  {'aliases':<12} {'promoted':<9}" + "".join(f" {c:>17}" for c in COLUMNS)
    lines = [head + "  commit    reason"]
    for v in versions:
        tags = v["tags"]
        cells = ""
        for c in COLUMNS:
            mine, sft = tags.get(f"posttrain.metric.{c}"), tags.get(f"posttrain.sft.{c}")
            cell = f"{float(mine):.3f}" if mine else "-"
            cell += f" ({float(sft):.3f})" if sft else ""
            cells += f" {cell:>17}"
        aliases = ",".join(f"@{a}" for a in v["aliases"]) or "-"
        lines.append(
            f"{v['version']:>7}  {aliases:<12} {tags.get('posttrain.promoted', '-'):<9}{cells}"
            f"  {tags.get('posttrain.git_commit', '-')[:8]:<8}  {tags.get('posttrain.gate_reason', '')}"
        )
    lines.append(f"(metric columns: candidate (sft) on the held-out suite; @{alias} is the serving alias)")
    return "\n".join(lines)
