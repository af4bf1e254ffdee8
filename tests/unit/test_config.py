"""Strict params loading: typed, frozen configs; every error names the dotted key or the file."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

from components.config import ConfigError, build, flatten, read_params, to_dict
from components.params import (
    SECTIONS,
    AlignConfig,
    IngestConfig,
    Params,
    PeftConfig,
    SFTConfig,
    load_params,
    parse_params,
)


def _write(tmp_path: Path, text: str, name: str = "params.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dotted, value in flat.items():
        *parents, leaf = dotted.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


# --------------------------------------------------------------------------- happy paths


def test_empty_mapping_gives_all_defaults():
    assert parse_params({}) == Params()


def test_empty_file_gives_all_defaults(tmp_path):
    assert load_params(_write(tmp_path, "# nothing but a comment\n")) == Params()


def test_null_section_gives_that_section_defaults():
    assert parse_params({"sft": None}).sft == SFTConfig()


def test_partial_section_overrides_only_given_keys(tmp_path):
    path = _write(tmp_path, "sft:\n  epochs: 7\n  peft:\n    r: 4\n")
    params = load_params(path)
    assert params.sft.epochs == 7
    assert params.sft.peft.r == 4
    # everything not mentioned keeps its default
    assert params.sft.learning_rate == SFTConfig().learning_rate
    assert params.sft.peft.alpha == PeftConfig().alpha
    assert params.align == AlignConfig()


def test_nested_sections_build_nested_dataclasses():
    params = parse_params({"align": {"peft": {"method": "none"}, "dpo": {"beta": 0.5}}})
    assert isinstance(params.align.peft, PeftConfig)
    assert params.align.peft.method == "none"
    assert params.align.dpo.beta == 0.5


def test_yaml_lists_become_tuples(tmp_path):
    path = _write(tmp_path, "ingest:\n  tasks: [add, upper]\nsft:\n  peft:\n    target_modules: [q_proj]\n")
    params = load_params(path)
    assert params.ingest.tasks == ("add", "upper")
    assert isinstance(params.ingest.tasks, tuple)
    assert params.sft.peft.target_modules == ("q_proj",)
    assert isinstance(params.sft.peft.target_modules, tuple)
    # tuples of floats coerce their items as well
    weights = parse_params({"align": {"dpo": {"loss_weights": [1, 0.5]}}}).align.dpo.loss_weights
    assert weights == (1.0, 0.5)
    assert all(type(w) is float for w in weights)


def test_int_is_accepted_where_float_expected():
    params = parse_params({"sft": {"learning_rate": 1}})
    assert params.sft.learning_rate == 1.0
    assert type(params.sft.learning_rate) is float


def test_literal_accepts_each_allowed_value():
    for mode in ("dense", "sparse", "hybrid"):
        assert parse_params({"rag_index": {"mode": mode}}).rag_index.mode == mode


# --------------------------------------------------------------------------- bad keys


def test_unknown_nested_key_names_dotted_key(tmp_path):
    path = _write(tmp_path, "sft:\n  peft:\n    rr: 8\n")
    with pytest.raises(ConfigError) as exc:
        load_params(path)
    assert str(exc.value).startswith("sft.peft.rr:")
    assert "unknown key" in str(exc.value)
    allowed = str(exc.value).split("allowed:")[1].strip(" )").split(", ")
    assert set(allowed) == {f.name for f in dataclasses.fields(PeftConfig)}


def test_unknown_top_level_key_in_section():
    with pytest.raises(ConfigError, match=r"^ingest\.n_sft_trian: unknown key"):
        parse_params({"ingest": {"n_sft_trian": 5}})


def test_unknown_section_is_rejected_and_named():
    with pytest.raises(ConfigError) as exc:
        parse_params({"sfft": {"epochs": 1}})
    message = str(exc.value)
    assert message.startswith("sfft:")
    assert "unknown section" in message
    for section in SECTIONS:
        assert section in message


# --------------------------------------------------------------------------- bad types


def test_wrong_type_names_key_and_types(tmp_path):
    path = _write(tmp_path, "sft:\n  epochs: three\n")
    with pytest.raises(ConfigError) as exc:
        load_params(path)
    assert "sft.epochs: expected int, got str" in str(exc.value)
    assert "three" in str(exc.value)


def test_nested_wrong_type_names_full_dotted_key():
    with pytest.raises(ConfigError, match=r"^align\.dpo\.epochs: expected int, got float"):
        parse_params({"align": {"dpo": {"epochs": 2.5}}})


@pytest.mark.parametrize("value", [True, False])
def test_bool_is_not_accepted_as_int(value):
    with pytest.raises(ConfigError, match=r"^sft\.epochs: expected int, got bool"):
        parse_params({"sft": {"epochs": value}})


def test_bool_is_not_accepted_as_float():
    with pytest.raises(ConfigError, match=r"^sft\.learning_rate: expected float, got bool"):
        parse_params({"sft": {"learning_rate": True}})


def test_string_is_not_accepted_as_float():
    # PyYAML reads ``1e-3`` (no dot) as a string; that must fail loudly, not become a default.
    with pytest.raises(ConfigError, match=r"^sft\.learning_rate: expected float, got str"):
        parse_params(yaml.safe_load("sft:\n  learning_rate: 1e-3\n"))


def test_int_is_not_accepted_as_bool():
    with pytest.raises(ConfigError, match=r"^preferences\.reference_as_chosen: expected bool, got int"):
        parse_params({"preferences": {"reference_as_chosen": 1}})


def test_number_is_not_accepted_as_str():
    with pytest.raises(ConfigError, match=r"^sft\.lr_scheduler: expected str, got int"):
        parse_params({"sft": {"lr_scheduler": 3}})


def test_literal_rejects_other_values():
    with pytest.raises(ConfigError) as exc:
        parse_params({"align": {"method": "ppo_typo"}})
    message = str(exc.value)
    assert message.startswith("align.method:")
    assert "ppo_typo" in message
    assert "dpo" in message  # the allowed values are listed


def test_nested_literal_rejects_other_values():
    with pytest.raises(ConfigError, match=r"^sft\.peft\.method: .*'qlora'"):
        parse_params({"sft": {"peft": {"method": "qlora"}}})


def test_tuple_field_rejects_a_scalar():
    # a bare string must not be silently split into characters
    with pytest.raises(ConfigError, match=r"^ingest\.tasks: expected a list, got str"):
        parse_params({"ingest": {"tasks": "add"}})


def test_tuple_item_of_wrong_type_names_index():
    with pytest.raises(ConfigError, match=r"^sft\.peft\.target_modules\[1\]: expected str, got int"):
        parse_params({"sft": {"peft": {"target_modules": ["q_proj", 3]}}})


def test_nested_dataclass_rejects_non_mapping():
    with pytest.raises(ConfigError, match=r"^sft\.peft: expected a mapping"):
        parse_params({"sft": {"peft": "lora"}})


@pytest.mark.parametrize(
    "value", [3, "abc", ["epochs"], False, []], ids=["int", "str", "list", "false", "empty"]
)
def test_section_that_is_not_a_mapping_is_a_config_error(value):
    with pytest.raises(ConfigError, match=r"^sft\b"):
        parse_params({"sft": value})


# --------------------------------------------------------------------------- build() on annotations the
# shipped configs do not use yet (Optional, Any): the loader must still be strict about them.


@dataclass(frozen=True)
class _Extra:
    maybe: int | None = None
    anything: Any = None
    kind: Literal["a", "b"] = "a"


def test_optional_accepts_none_and_the_type_but_nothing_else():
    assert build(_Extra, {"maybe": None}, "x").maybe is None
    assert build(_Extra, {"maybe": 4}, "x").maybe == 4
    with pytest.raises(ConfigError, match=r"^x\.maybe: expected int, got str"):
        build(_Extra, {"maybe": "4"}, "x")


def test_any_accepts_anything():
    assert build(_Extra, {"anything": {"k": [1]}}, "x").anything == {"k": [1]}


# --------------------------------------------------------------------------- files


def test_missing_file_names_path(tmp_path):
    path = tmp_path / "nope" / "params.yaml"
    with pytest.raises(ConfigError) as exc:
        load_params(path)
    assert str(path) in str(exc.value)
    assert "not found" in str(exc.value)


def test_invalid_yaml_names_path(tmp_path):
    path = _write(tmp_path, "sft:\n  epochs: [1, 2\n  peft: {\n")
    with pytest.raises(ConfigError) as exc:
        load_params(path)
    assert re.match(rf"{re.escape(str(path))}:\d+: not valid YAML", str(exc.value))


def test_top_level_list_names_path(tmp_path):
    path = _write(tmp_path, "- sft\n- base\n")
    with pytest.raises(ConfigError) as exc:
        read_params(path)
    assert str(exc.value).startswith(f"{path}:")
    assert "mapping" in str(exc.value)


def test_config_error_is_a_posttrain_error():
    from components.errors import PosttrainError

    assert issubclass(ConfigError, PosttrainError)  # the CLI prints these as one line


# --------------------------------------------------------------------------- frozen + round trips


def test_configs_are_frozen():
    params = Params()
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.sft = SFTConfig(epochs=9)  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.sft.epochs = 9  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.sft.peft.r = 1  # type: ignore[misc]
    cfg = IngestConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1  # type: ignore[misc]


def test_configs_are_hashable_and_compare_by_value():
    assert parse_params({"sft": {"epochs": 2}}) == parse_params({"sft": {"epochs": 2}})
    assert parse_params({"sft": {"epochs": 2}}) != parse_params({"sft": {"epochs": 3}})
    assert hash(Params()) == hash(Params())


def test_to_dict_is_plain_yaml_and_round_trips():
    params = parse_params({"sft": {"epochs": 5, "peft": {"target_modules": ["q_proj", "v_proj"]}}})
    plain = to_dict(params)
    assert plain["sft"]["peft"]["target_modules"] == ["q_proj", "v_proj"]  # tuples become lists
    text = yaml.safe_dump(plain)  # safe_dump refuses tuples and dataclasses, so this proves plainness
    assert parse_params(yaml.safe_load(text)) == params


def test_flatten_uses_dotted_keys_and_round_trips():
    params = parse_params({"align": {"dpo": {"beta": 0.25}}})
    flat = flatten(to_dict(params))
    assert flat["align.dpo.beta"] == 0.25
    assert flat["sft.peft.r"] == params.sft.peft.r
    assert flat["ingest.tasks"] == list(params.ingest.tasks)  # lists are leaves, not expanded
    assert all(not isinstance(v, dict) for v in flat.values())
    assert parse_params(_unflatten(flat)) == params


def test_flatten_small_mapping():
    assert flatten({"a": {"b": 1, "c": {"d": [2]}}, "e": 3}) == {"a.b": 1, "a.c.d": [2], "e": 3}
    assert flatten({"a": {"b": 1}}, "p.") == {"p.a.b": 1}


# --------------------------------------------------------------------------- compute


def _compute(**kwargs: Any):
    return parse_params({"compute": kwargs}).compute


def test_compute_defaults_resolve_to_cpu_fp32_without_cuda():
    from components.distributed import resolve_compute

    assert resolve_compute(Params().compute, cuda_available=False) == ("cpu", "fp32")


def test_trainer_args_make_precision_explicit_on_cpu():
    # TRL's SFT/DPO/Reward configs default to bf16=True: left out, CPU training would be bf16 autocast
    from pathlib import Path

    from components.training.callbacks import trainer_args

    args = trainer_args(
        Path("w"), seed=0, learning_rate=1e-3, epochs=1, batch_size=2, n_examples=4, has_eval=False
    )
    assert (args["use_cpu"], args["bf16"], args["fp16"]) == (True, False, False)


def test_compute_auto_on_this_machine_follows_torch():
    import torch

    from components.distributed import resolve_compute

    device, precision = resolve_compute(Params().compute)
    if torch.cuda.is_available():
        assert device == "cuda"
        assert precision == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    else:
        assert (device, precision) == ("cpu", "fp32")


@pytest.mark.parametrize(
    ("settings", "cuda", "bf16", "expected"),
    [
        ({}, True, True, ("cuda", "bf16")),
        ({}, True, False, ("cuda", "fp32")),
        ({"device": "cpu"}, True, True, ("cpu", "fp32")),  # auto precision on CPU
        ({"precision": "fp32"}, False, None, ("cpu", "fp32")),
        ({"device": "cuda", "precision": "fp16"}, True, True, ("cuda", "fp16")),
        ({"device": "cuda", "precision": "fp32"}, True, True, ("cuda", "fp32")),
        ({"precision": "bf16"}, False, None, ("cpu", "bf16")),  # CPU autocast; weights stay fp32
    ],
)
def test_compute_resolution(settings, cuda, bf16, expected):
    from components.distributed import resolve_compute

    assert resolve_compute(_compute(**settings), cuda_available=cuda, bf16_supported=bf16) == expected


@pytest.mark.parametrize(
    ("settings", "cuda", "bf16", "pattern"),
    [
        ({"device": "cuda"}, False, None, r"^compute\.device: 'cuda'.*is_available"),
        ({"precision": "fp16"}, False, None, r"^compute\.precision: 'fp16'.*cuda"),
        ({"device": "cpu", "precision": "fp16"}, True, True, r"^compute\.precision: 'fp16'"),
        ({"device": "cuda", "precision": "bf16"}, True, False, r"^compute\.precision: 'bf16'.*bf16"),
    ],
)
def test_impossible_compute_combinations_name_the_key(settings, cuda, bf16, pattern):
    from components.distributed import resolve_compute

    with pytest.raises(ConfigError, match=pattern):
        resolve_compute(_compute(**settings), cuda_available=cuda, bf16_supported=bf16)


@pytest.mark.parametrize(
    ("section", "pattern"),
    [
        ({"device": "gpu"}, r"^compute\.device: expected one of \['auto', 'cpu', 'cuda'\], got 'gpu'"),
        ({"precision": "fp8"}, r"^compute\.precision: expected one of .*'fp8'"),
        ({"processes": 0}, r"^compute\.processes: expected an int >= 1, got 0"),
        ({"processes": "2"}, r"^compute\.processes: expected int, got str"),
        ({"nodes": 2}, r"^compute\.nodes: unknown key"),
    ],
)
def test_bad_compute_values_name_the_key(section, pattern):
    with pytest.raises(ConfigError, match=pattern):
        parse_params({"compute": section})
