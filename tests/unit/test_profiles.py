"""Params profiles: applied in place with comments kept, validated first, undone by ``tiny``."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from components.config import ConfigError, flatten, read_params
from components.params import parse_params
from flows.profiles import apply_profile, get_profile, matching_profiles, shipped_profiles

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(ROOT / "profiles", tmp_path / "profiles")
    return tmp_path


def test_every_shipped_profile_applies_to_valid_params(project: Path) -> None:
    names = set(shipped_profiles(project))
    assert {"tiny", "smollm2-135m", "gpu"} <= names
    for name in names - {"tiny"}:
        params = read_params(project / "params.yaml")
        for key, value in get_profile(name, project).values.items():
            node = params
            *parents, leaf = key.split(".")
            for part in parents:
                node = node[part]
            assert leaf in node, f"profiles/{name}.yaml: {key} is not a params.yaml key"
            node[leaf] = value
        parse_params(params)  # raises on an invalid value


def test_apply_changes_exactly_the_profile_keys_and_keeps_comments(project: Path) -> None:
    path = project / "params.yaml"
    before_text = path.read_text()
    before = flatten(read_params(path))
    changes = apply_profile("smollm2-135m", path, project)
    after = flatten(read_params(path))
    profile = get_profile("smollm2-135m", project).values
    assert set(changes) == {k for k, v in profile.items() if before[k] != v}
    assert after["base.model"] == "smollm2-135m-instruct"
    assert after["sft.peft.modules_to_save"] == [] and after["tracking.log_models"] == "adapters"
    assert {k for k in after if after[k] != before[k]} == set(changes)
    comments = [ln for ln in before_text.splitlines() if ln.lstrip().startswith("#")]
    assert comments and all(c in path.read_text() for c in comments)
    assert matching_profiles(path, project) == ["smollm2-135m"]
    assert apply_profile("smollm2-135m", path, project) == {}  # idempotent


def test_tiny_undoes_a_profile_byte_for_byte(project: Path) -> None:
    path = project / "params.yaml"
    original = path.read_text()
    apply_profile("smollm2-135m", path, project)
    assert path.read_text() != original
    apply_profile("tiny", path, project)
    assert path.read_text() == original
    assert "tiny" in matching_profiles(path, project)


def test_a_bad_profile_names_its_file_and_key_and_changes_nothing(project: Path) -> None:
    (project / "profiles/broken.yaml").write_text("# broken\nsft:\n  learning_rate: -1\n  epoch: 2\n")
    original = (project / "params.yaml").read_text()
    with pytest.raises(ConfigError) as err:
        apply_profile("broken", project / "params.yaml", project)
    assert any(p.startswith("profiles/broken.yaml: sft.learning_rate:") for p in err.value.problems)
    assert any("sft.epoch" in p for p in err.value.problems)
    assert (project / "params.yaml").read_text() == original


def test_an_unknown_profile_lists_the_shipped_ones(project: Path) -> None:
    with pytest.raises(ConfigError, match=r"--profile: unknown profile 'smollm3'.*smollm2-135m"):
        apply_profile("smollm3", project / "params.yaml", project)


def test_profile_yaml_errors_name_file_and_line(project: Path) -> None:
    (project / "profiles/typo.yaml").write_text("sft:\n  learning_rate: [1\n")
    with pytest.raises(ConfigError, match=r"profiles/typo.yaml:\d+: not valid YAML"):
        shipped_profiles(project)


def test_real_model_profile_drops_modules_to_save_and_uses_lora_rates() -> None:
    values = get_profile("smollm2-135m", ROOT).values
    assert values["sft.peft.modules_to_save"] == [] and values["align.peft.modules_to_save"] == []
    assert 1e-5 <= values["sft.learning_rate"] <= 1e-3
    assert yaml.safe_load((ROOT / "profiles/smollm2-135m.yaml").read_text())["base"]["model"] == (
        "smollm2-135m-instruct"
    )
