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
    path = _write(tmp_path, "sft:\n  epochs: 7\n  peft:\n    lora:\n      r: 4\n")
    params = load_params(path)
    assert params.sft.epochs == 7
    assert params.sft.peft.lora.r == 4
    # everything not mentioned keeps its default
    assert params.sft.learning_rate == SFTConfig().learning_rate
    assert params.sft.peft.lora.alpha == PeftConfig().lora.alpha
    assert params.sft.peft.method == "lora"
    assert params.align == AlignConfig()


def test_nested_sections_build_nested_dataclasses():
    params = parse_params({"align": {"peft": {"lora": {"r": 4}}, "dpo": {"beta": 0.5}}})
    assert isinstance(params.align.peft, PeftConfig)
    assert params.align.peft.lora.r == 4
    assert params.align.dpo.beta == 0.5


def test_align_needs_an_adapter_and_grpo_its_groups():
    with pytest.raises(
        ConfigError, match=r"^align\.peft\.method: align\.method grpo trains full \| lora \| dora \| qlora"
    ):
        parse_params({"align": {"peft": {"method": "prompt"}}})
    with pytest.raises(
        ConfigError, match=r"^align\.peft\.method: align\.method ppo trains lora \| dora \| qlora, got 'full'"
    ):
        parse_params({"align": {"method": "ppo", "peft": {"method": "full"}}})
    assert parse_params({"align": {"method": "dpo", "peft": {"method": "full"}}}).align.peft.method == "full"
    with pytest.raises(ConfigError, match=r"^align\.grpo\.num_generations: must be >= 2, got 1"):
        parse_params({"align": {"grpo": {"num_generations": 1}}})
    with pytest.raises(ConfigError, match=r"^align\.grpo\.loss_type: "):
        parse_params({"align": {"grpo": {"loss_type": "luspo"}}})
    with pytest.raises(ConfigError, match=r"^align\.ppo\.minibatch_size: must be <= batch_size"):
        parse_params({"align": {"ppo": {"batch_size": 4, "minibatch_size": 8}}})


def test_yaml_lists_become_tuples(tmp_path):
    path = _write(
        tmp_path, "ingest:\n  tasks: [add, upper]\nsft:\n  peft:\n    lora:\n      target_modules: [q_proj]\n"
    )
    params = load_params(path)
    assert params.ingest.tasks == ("add", "upper")
    assert isinstance(params.ingest.tasks, tuple)
    assert params.sft.peft.lora.target_modules == ("q_proj",)
    assert isinstance(params.sft.peft.lora.target_modules, tuple)
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
    # Plain ``yaml.safe_load`` reads ``1e-3`` (no dot) as a string; parse_params must not accept it
    # (read_params resolves it as a float, see test_exponent_floats_without_a_dot_load_as_floats).
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
    with pytest.raises(ConfigError, match=r"^sft\.peft\.method: .*'none'"):
        parse_params({"sft": {"peft": {"method": "none"}}})  # the old spelling of full


def test_tuple_field_rejects_a_scalar():
    # a bare string must not be silently split into characters
    with pytest.raises(ConfigError, match=r"^ingest\.tasks: expected a list, got str"):
        parse_params({"ingest": {"tasks": "add"}})


def test_tuple_item_of_wrong_type_names_index():
    with pytest.raises(ConfigError, match=r"^sft\.peft\.lora\.target_modules\[1\]: expected str, got int"):
        parse_params({"sft": {"peft": {"lora": {"target_modules": ["q_proj", 3]}}}})


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
        params.sft.peft.lora.r = 1  # type: ignore[misc]
    cfg = IngestConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1  # type: ignore[misc]


def test_configs_are_hashable_and_compare_by_value():
    assert parse_params({"sft": {"epochs": 2}}) == parse_params({"sft": {"epochs": 2}})
    assert parse_params({"sft": {"epochs": 2}}) != parse_params({"sft": {"epochs": 3}})
    assert hash(Params()) == hash(Params())


def test_to_dict_is_plain_yaml_and_round_trips():
    params = parse_params({"sft": {"epochs": 5, "peft": {"lora": {"target_modules": ["q_proj", "v_proj"]}}}})
    plain = to_dict(params)
    assert plain["sft"]["peft"]["lora"]["target_modules"] == ["q_proj", "v_proj"]  # tuples become lists
    text = yaml.safe_dump(plain)  # safe_dump refuses tuples and dataclasses, so this proves plainness
    assert parse_params(yaml.safe_load(text)) == params


def test_flatten_uses_dotted_keys_and_round_trips():
    params = parse_params({"align": {"dpo": {"beta": 0.25}}})
    flat = flatten(to_dict(params))
    assert flat["align.dpo.beta"] == 0.25
    assert flat["sft.peft.lora.r"] == params.sft.peft.lora.r
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


# --------------------------------------------------------------------------- ranges and cross-field rules


def _nested(dotted: str, value: Any) -> dict[str, Any]:
    return _unflatten({dotted: value})


# (dotted key to set, value, the key the problem names, the problem); each alone in an otherwise
# default params file, so each row proves one rule.
NONSENSE = [
    # the values from the issue
    ("sft.learning_rate", -1, "sft.learning_rate", r"must be >= 0, got -1\.0"),
    ("preferences.k", 0, "preferences.k", r"must be >= 1, got 0"),
    ("evaluate.n_prompts", 0, "evaluate.n_prompts", r"must be >= 1, got 0"),
    ("sft.batch_size", 0, "sft.batch_size", r"must be >= 1, got 0"),
    ("preferences.temperature", -1, "preferences.temperature", r"must be > 0, got -1\.0"),
    ("preferences.eval_fraction", 1.5, "preferences.eval_fraction", r"must be in \[0, 1\), got 1\.5"),
    ("base.num_heads", 3, "base.num_heads", r"must divide hidden_size \(128\), got 3"),
    (
        "rag_index.chunk_overlap_tokens",
        128,
        "rag_index.chunk_overlap_tokens",
        r"must be < chunk_tokens \(128\)",
    ),
    (
        "sft.lr_scheduler",
        "cosine_typo",
        "sft.lr_scheduler",
        r"expected one of \[.*'cosine'.*\], got 'cosine_typo'",
    ),
    ("ingest.n_eval_prompts", 0, "ingest.n_eval_prompts", r"must be >= 1, got 0"),
    # paths and tracking
    ("paths.sft_model", "", "paths.sft_model", r"must not be empty"),
    ("paths.aligned_model", "models/sft", "paths.aligned_model", r"must differ from paths\.sft_model"),
    ("tracking.tracking_uri", " ", "tracking.tracking_uri", r"must not be empty"),
    ("tracking.experiment", "", "tracking.experiment", r"must not be empty"),
    ("tracking.registered_model", "", "tracking.registered_model", r"must not be empty"),
    # base
    ("base.model", "", "base.model", r"must not be empty"),
    ("base.seed", -1, "base.seed", r"must be in \[0, 4294967295\], got -1"),
    ("base.vocab_size", 0, "base.vocab_size", r"must be >= 1"),
    ("base.hidden_size", 0, "base.hidden_size", r"must be >= 1"),
    ("base.intermediate_size", 0, "base.intermediate_size", r"must be >= 1"),
    ("base.num_layers", 0, "base.num_layers", r"must be >= 1"),
    ("base.num_heads", 0, "base.num_heads", r"must be >= 1, got 0"),  # not a ZeroDivisionError
    ("base.num_heads", 128, "base.num_heads", r"hidden_size / num_heads must be even .* got 1"),  # 128/128
    ("base.max_position_embeddings", 0, "base.max_position_embeddings", r"must be >= 1"),
    ("base.pretrain_epochs", 0, "base.pretrain_epochs", r"must be >= 1"),
    ("base.pretrain_learning_rate", -0.1, "base.pretrain_learning_rate", r"must be >= 0"),
    ("base.pretrain_batch_size", 0, "base.pretrain_batch_size", r"must be >= 1"),
    (
        "base.pretrain_block_size",
        256,
        "base.pretrain_block_size",
        r"must be <= max_position_embeddings \(128\)",
    ),
    # ingest
    ("ingest.facts", "", "ingest.facts", r"must not be empty"),
    ("ingest.tasks", [], "ingest.tasks", r"must not be empty"),
    (
        "ingest.tasks",
        ["add", "multiply"],
        "ingest.tasks[1]",
        r"expected one of \['add', .*\], got 'multiply'",
    ),
    ("ingest.seed", -3, "ingest.seed", r"must be in \[0, "),
    ("ingest.n_sft_train", 0, "ingest.n_sft_train", r"must be >= 1"),
    ("ingest.n_sft_eval", 0, "ingest.n_sft_eval", r"must be >= 1"),
    ("ingest.n_preference_prompts", -5, "ingest.n_preference_prompts", r"must be >= 1, got -5"),
    # sft and its peft sub-section (align.peft is the same class)
    ("sft.epochs", 0, "sft.epochs", r"must be >= 1"),
    ("sft.max_length", 0, "sft.max_length", r"must be >= 1"),
    ("sft.warmup_steps", -1, "sft.warmup_steps", r"must be >= 0, got -1"),
    ("sft.lr_scheduler", "cosine_with_min_lr", "sft.lr_scheduler", r"expected one of"),  # needs kwargs
    ("sft.seed", -1, "sft.seed", r"must be in \[0, "),
    ("sft.peft.lora.r", 0, "sft.peft.lora.r", r"must be >= 1, got 0"),
    ("sft.peft.lora.alpha", 0, "sft.peft.lora.alpha", r"must be >= 1, got 0"),
    ("sft.peft.lora.dropout", 1.0, "sft.peft.lora.dropout", r"must be in \[0, 1\), got 1\.0"),
    ("sft.peft.lora.dropout", -0.1, "sft.peft.lora.dropout", r"must be in \[0, 1\)"),
    ("sft.peft.lora.target_modules", [], "sft.peft.lora.target_modules", r"must not be empty"),
    ("sft.peft.lora.target_modules", ["q_proj", ""], "sft.peft.lora.target_modules[1]", r"must not be empty"),
    ("align.peft.modules_to_save", [" "], "align.peft.modules_to_save[0]", r"must not be empty"),
    ("align.peft.lora.r", -4, "align.peft.lora.r", r"must be >= 1, got -4"),
    ("reward_model.peft.lora.r", 0, "reward_model.peft.lora.r", r"must be >= 1, got 0"),
    ("sft.peft.prompt.num_virtual_tokens", 0, "sft.peft.prompt.num_virtual_tokens", r"must be >= 1, got 0"),
    ("sft.peft.prefix.num_virtual_tokens", 0, "sft.peft.prefix.num_virtual_tokens", r"must be >= 1"),
    ("sft.peft.adapter.bottleneck", 0, "sft.peft.adapter.bottleneck", r"must be >= 1, got 0"),
    ("sft.peft.tinytl.reduction", 0, "sft.peft.tinytl.reduction", r"must be >= 1, got 0"),
    ("sft.peft.qlora.quant_type", "int4", "sft.peft.qlora.quant_type", r"expected one of \['nf4', 'fp4'\]"),
    (
        "sft.peft.ia3.feedforward_modules",
        ["q_proj"],
        "sft.peft.ia3.feedforward_modules",
        r"must be a subset of target_modules",
    ),
    (
        "reward_model.peft.method",
        "prompt",
        "reward_model.peft.method",
        r"the reward model trains full \| lora",
    ),
    # preferences
    ("preferences.max_prompts", 0, "preferences.max_prompts", r"must be >= 1"),
    ("preferences.max_new_tokens", 0, "preferences.max_new_tokens", r"must be >= 1"),
    ("preferences.batch_size", 0, "preferences.batch_size", r"must be >= 1"),
    ("preferences.eval_fraction", -0.1, "preferences.eval_fraction", r"must be in \[0, 1\)"),
    ("preferences.eval_fraction", 1, "preferences.eval_fraction", r"must be in \[0, 1\), got 1\.0"),
    ("preferences.temperature", 0, "preferences.temperature", r"must be > 0, got 0\.0"),
    ("preferences.seed", -1, "preferences.seed", r"must be in \[0, "),
    # reward_model
    ("reward_model.learning_rate", -1e-3, "reward_model.learning_rate", r"must be >= 0"),
    ("reward_model.epochs", 0, "reward_model.epochs", r"must be >= 1"),
    ("reward_model.batch_size", 0, "reward_model.batch_size", r"must be >= 1"),
    ("reward_model.max_length", 0, "reward_model.max_length", r"must be >= 1"),
    ("reward_model.seed", 2**32, "reward_model.seed", r"must be in \[0, 4294967295\]"),
    # align
    ("align.seed", -1, "align.seed", r"must be in \[0, "),
    ("align.dpo.beta", 0, "align.dpo.beta", r"must be > 0, got 0\.0"),
    ("align.dpo.learning_rate", -5e-4, "align.dpo.learning_rate", r"must be >= 0"),
    ("align.dpo.epochs", 0, "align.dpo.epochs", r"must be >= 1"),
    ("align.dpo.batch_size", 0, "align.dpo.batch_size", r"must be >= 1"),
    ("align.dpo.max_length", 0, "align.dpo.max_length", r"must be >= 1"),
    ("align.dpo.loss_type", [], "align.dpo.loss_type", r"must not be empty"),
    ("align.dpo.loss_type", ["sigmoid", "rpo"], "align.dpo.loss_type[1]", r"expected one of \['sigmoid', "),
    (
        "align.dpo.loss_weights",
        [1.0],
        "align.dpo.loss_weights",
        r"needs one weight per loss_type entry \(2\), got 1",
    ),
    ("align.dpo.loss_weights", [1.0, -1.0], "align.dpo.loss_weights[1]", r"must be >= 0, got -1\.0"),
    ("align.dpo.loss_weights", [0, 0], "align.dpo.loss_weights", r"at least one weight must be > 0"),
    (
        "align.dpo.round_judge",
        "human",
        "align.dpo.round_judge",
        r"expected one of \['verifier', 'rm', 'both'\]",
    ),
    (
        "align.dpo.round_judge",
        "rm",
        "align.dpo.round_judge",
        r"grades the re-sampled pairs of rounds 2 and later; with rounds: 1 it",
    ),
    # compress and evaluate
    ("compress.n_fidelity_prompts", 0, "compress.n_fidelity_prompts", r"must be >= 1"),
    ("compress.method", "int3", "compress.method", r"expected one of \['int8_weight', "),
    ("compress.bitdelta.objective", "l1", "compress.bitdelta.objective", r"expected one of \['kl', 'mse'\]"),
    ("compress.bitdelta.steps", -1, "compress.bitdelta.steps", r"must be >= 0"),
    ("compress.bitdelta.n_calibration", 0, "compress.bitdelta.n_calibration", r"must be >= 1"),
    ("compress.prune.sparsity", 1.0, "compress.prune.sparsity", r"must be in \(0, 1\), got 1\.0"),
    ("compress.prune.n", 4, "compress.prune.n", r"must be < m \(4\)"),
    ("compress.prune.kind", "heads", "compress.prune.kind", r"expected one of \['magnitude', "),
    ("compress.distill.num_layers", 0, "compress.distill.num_layers", r"must be >= 1"),
    ("evaluate.max_new_tokens", 0, "evaluate.max_new_tokens", r"must be >= 1"),
    ("evaluate.batch_size", 0, "evaluate.batch_size", r"must be >= 1"),
    ("evaluate.sample_temperature", 0.0, "evaluate.sample_temperature", r"must be > 0"),
    ("evaluate.n_samples", 0, "evaluate.n_samples", r"must be >= 1"),
    ("evaluate.seed", -1, "evaluate.seed", r"must be in \[0, "),
    ("evaluate.promotion_alias", "", "evaluate.promotion_alias", r"must be letters, digits"),
    ("evaluate.promotion_alias", "my champ", "evaluate.promotion_alias", r"must be letters, digits"),
    ("evaluate.promotion_alias", "latest", "evaluate.promotion_alias", r"'latest' is reserved by MLflow"),
    ("evaluate.promotion_alias", "v3", "evaluate.promotion_alias", r"'v3' is reserved by MLflow"),
    (
        "evaluate.promotion_max_accuracy_drop",
        -0.01,
        "evaluate.promotion_max_accuracy_drop",
        r"must be in \[0, 1\]",
    ),
    (
        "evaluate.promotion_max_accuracy_drop",
        1.5,
        "evaluate.promotion_max_accuracy_drop",
        r"must be in \[0, 1\]",
    ),
    (
        "evaluate.promotion_max_compression_drop",
        -0.5,
        "evaluate.promotion_max_compression_drop",
        r"must be in \[0, 1\]",
    ),
    # rag_index
    ("rag_index.docs_dir", "", "rag_index.docs_dir", r"must not be empty"),
    ("rag_index.uri", "", "rag_index.uri", r"must not be empty"),
    ("rag_index.collection", "posttrain-docs", "rag_index.collection", r"must be a Milvus collection name"),
    ("rag_index.embedding_model", "", "rag_index.embedding_model", r"must not be empty"),
    ("rag_index.chunk_tokens", 7, "rag_index.chunk_tokens", r"must be in \[8, 2048\], got 7"),
    ("rag_index.chunk_tokens", 2049, "rag_index.chunk_tokens", r"must be in \[8, 2048\]"),
    ("rag_index.chunk_overlap_tokens", -1, "rag_index.chunk_overlap_tokens", r"must be >= 0, got -1"),
    (
        "rag_index.chunking",
        "paragraphs",
        "rag_index.chunking",
        r"expected one of .*'by_title'.*got 'paragraphs'",
    ),
    ("rag_index.window_sentences", -1, "rag_index.window_sentences", r"must be >= 0, got -1"),
    (
        "rag_index.near_duplicate_threshold",
        0,
        "rag_index.near_duplicate_threshold",
        r"must be in \(0, 1\], got 0",
    ),
    ("rag_index.near_duplicate_threshold", 1.5, "rag_index.near_duplicate_threshold", r"must be in \(0, 1\]"),
    ("rag_index.index_type", "IVF", "rag_index.index_type", r"expected one of .*'HNSW'.*got 'IVF'"),
    ("rag_index.flat_below", 0, "rag_index.flat_below", r"must be >= 1"),
    ("rag_index.top_k", 0, "rag_index.top_k", r"must be >= 1"),
    ("rag_index.candidates", 4, "rag_index.candidates", r"must be >= top_k \(5\), got 4"),
    ("rag_index.fusion", "max", "rag_index.fusion", r"expected one of .*'rrf'.*got 'max'"),
    ("rag_index.dense_weight", 1.5, "rag_index.dense_weight", r"must be in \[0, 1\]"),
    ("rag_index.expansion", "hyde", "rag_index.expansion", r"expected one of .*'prf'.*got 'hyde'"),
    ("rag_index.answer_mode", "abstractive", "rag_index.answer_mode", r"expected one of .*'extractive'"),
    ("rag_index.min_support", 2, "rag_index.min_support", r"must be in \[-1, 1\]"),
    ("rag_index.context_tokens", 0, "rag_index.context_tokens", r"must be >= 1"),
    ("rag_reranker.max_length", 8, "rag_reranker.max_length", r"must be in \[16, 512\]"),
    ("rag_reranker.eval_share", 1.5, "rag_reranker.eval_share", r"must be in \[0, 1"),
    ("paths.reranker", "", "paths.reranker", r"must not be empty"),
    ("rag_eval.questions", "", "rag_eval.questions", r"must not be empty"),
    # not finite
    ("sft.learning_rate", float("inf"), "sft.learning_rate", r"must be a finite number, got inf"),
    ("preferences.temperature", float("nan"), "preferences.temperature", r"must be a finite number, got nan"),
]


@pytest.mark.parametrize(
    ("dotted", "value", "key", "problem"), NONSENSE, ids=[f"{row[0]}={row[1]!r}" for row in NONSENSE]
)
def test_nonsense_value_is_rejected_naming_the_dotted_key(dotted, value, key, problem):
    with pytest.raises(ConfigError) as exc:
        parse_params(_nested(dotted, value))
    assert len(exc.value.problems) == 1, exc.value.problems
    assert re.match(rf"{re.escape(key)}: {problem}", str(exc.value)), str(exc.value)


def test_every_field_has_a_rule_or_is_a_bool_or_literal():
    # field by field: each leaf carries a constraint (on itself or on its list items), is a Literal or
    # a bool, or is listed here with its reason; a new field without a rule fails this test
    import typing

    from components.config import Constraint

    exempt = {
        "ingest.sft_data": "optional path, '' = the shipped tasks",
        "ingest.preference_data": "optional path, '' = the shipped tasks",
        "multimodal.train_data": "optional path, '' = the generated shapes task (needs eval_data)",
        "multimodal.eval_data": "optional path, '' = the generated shapes task (needs train_data)",
        "compute.processes": "ComputeConfig.__post_init__ (>= 1), see test_bad_compute_values_name_the_key",
    }

    def constrained(tp: Any) -> bool:
        if typing.get_origin(tp) is typing.Annotated:
            return any(isinstance(x, Constraint) for x in typing.get_args(tp)[1:])
        if typing.get_origin(tp) is tuple:
            return constrained(typing.get_args(tp)[0])
        return tp is bool or typing.get_origin(tp) is Literal

    def unchecked(cls: type, prefix: str) -> list[str]:
        out = []
        for name, tp in typing.get_type_hints(cls, include_extras=True).items():
            key = f"{prefix}.{name}"
            if dataclasses.is_dataclass(tp):
                out += unchecked(tp, key)
            elif not constrained(tp) and key not in exempt:
                out.append(key)
        return out

    missing = [k for f in dataclasses.fields(Params) for k in unchecked(f.default_factory, f.name)]  # type: ignore[arg-type]
    assert not missing, missing


def test_learning_rate_zero_stays_valid():
    # a test elsewhere sets align.dpo.learning_rate 0 so that the candidate equals SFT
    params = parse_params({"align": {"dpo": {"learning_rate": 0}}, "sft": {"learning_rate": 0.0}})
    assert params.align.dpo.learning_rate == 0.0
    assert params.sft.learning_rate == 0.0


@pytest.mark.parametrize(
    ("dotted", "value"),
    [
        ("preferences.eval_fraction", 0.0),  # no held-out pairs
        ("sft.warmup_steps", 0),
        ("sft.peft.lora.dropout", 0.5),
        ("sft.peft.method", "tinytl"),
        ("align.peft.method", "qlora"),
        ("reward_model.peft.method", "lora"),
        ("rag_index.chunk_overlap_tokens", 0),
        ("rag_index.chunk_overlap_tokens", 127),  # chunk_tokens is 128
        ("rag_index.chunk_tokens", 2048),
        ("rag_index.chunk_tokens", 17),  # the default overlap is 16
        ("rag_index.window_sentences", 0),  # a bare sentence, no neighbours
        ("rag_index.near_duplicate_threshold", 1.0),  # only exact duplicates
        ("rag_index.candidates", 5),  # == top_k: rerank nothing more than what is returned
        ("rag_index.min_support", -1.0),  # never refuse
        ("evaluate.promotion_max_accuracy_drop", 0),
        ("evaluate.promotion_alias", "best-v2"),
        ("base.seed", 2**32 - 1),
        ("sft.lr_scheduler", "reduce_lr_on_plateau"),
        ("align.dpo.loss_type", ["sigmoid"]),  # with loss_weights below
        ("preferences.k", 1),  # the reference answer is the chosen side when every sample fails
    ],
)
def test_edge_values_that_make_sense_are_accepted(dotted, value):
    data = _nested(dotted, value)
    if dotted == "align.dpo.loss_type":
        data["align"]["dpo"]["loss_weights"] = [1.0]
    parse_params(data)


def test_a_peft_knob_in_the_wrong_block_is_told_where_it_belongs():
    with pytest.raises(
        ConfigError, match=r"^sft\.peft\.r: unknown key here; this knob belongs in sft\.peft\.lora\.r$"
    ):
        parse_params({"sft": {"peft": {"r": 8}}})  # the old flat layout
    with pytest.raises(ConfigError, match=r"^align\.peft\.prompt\.r: .* belongs in align\.peft\.lora\.r$"):
        parse_params({"align": {"peft": {"prompt": {"r": 8}}}})
    with pytest.raises(ConfigError, match=r"sft\.peft\.prefix\.num_virtual_tokens or sft\.peft\.prompt\."):
        parse_params({"sft": {"peft": {"lora": {"num_virtual_tokens": 8}}}})


def test_a_nested_default_that_differs_from_its_class_survives_a_partial_override():
    # reward_model.peft defaults to a full fine-tune; giving only a lora knob must not switch it to lora
    params = parse_params({"reward_model": {"peft": {"lora": {"r": 4}}}})
    assert params.reward_model.peft.method == "full" and params.reward_model.peft.lora.r == 4
    assert params.sft.peft.method == "lora"


def test_one_sample_per_prompt_needs_the_reference_as_chosen():
    with pytest.raises(ConfigError, match=r"^preferences\.k: must be >= 2 when reference_as_chosen is false"):
        parse_params({"preferences": {"k": 1, "reference_as_chosen": False}})


def test_exo_pair_is_rejected_because_label_smoothing_is_not_exposed():
    with pytest.raises(ConfigError, match=r"^align\.dpo\.loss_type: 'exo_pair' needs label_smoothing"):
        parse_params({"align": {"dpo": {"loss_type": ["exo_pair"], "loss_weights": [1.0]}}})


def test_architecture_rules_apply_only_to_the_tiny_model():
    # a Hub model brings its own config; these keys are then unused and must not block it
    params = parse_params({"base": {"model": "gpt2", "num_heads": 3, "pretrain_block_size": 1024}})
    assert params.base.model == "gpt2"


def test_cross_field_rule_checks_a_default_against_a_given_value():
    with pytest.raises(
        ConfigError, match=r"^rag_index\.chunk_overlap_tokens: must be < chunk_tokens \(16\), got 16$"
    ):
        parse_params({"rag_index": {"chunk_tokens": 16}})  # default overlap is 16
    with pytest.raises(ConfigError, match=r"^rag_index\.candidates: must be >= top_k \(60\), got 30$"):
        parse_params({"rag_index": {"top_k": 60}})  # default candidates is 30


def test_every_problem_is_reported_at_once_in_file_order(tmp_path):
    text = (
        "sft:\n  learning_rate: -1\n  batch_size: 0\n  lr_scheduler: bogus\n  epochs: three\n"
        "preferences:\n  k: 0\n  temperature: -1\n  eval_fraction: 1.5\n"
        "evaluate:\n  n_prompts: 0\n  nprompts: 3\n"
        "base:\n  num_heads: 3\n"
        "rag_index:\n  chunk_overlap_tokens: 600\n"
        "ingest:\n  n_eval_prompts: 0\n"
        "sfft: {}\n"
    )
    with pytest.raises(ConfigError) as exc:
        load_params(_write(tmp_path, text))
    keys = [problem.split(":")[0] for problem in exc.value.problems]
    assert keys == [
        "sfft",  # unknown sections first
        "base.num_heads",
        "ingest.n_eval_prompts",  # then the sections in params order, keys in file order
        "sft.learning_rate",
        "sft.batch_size",
        "sft.lr_scheduler",
        "sft.epochs",
        "preferences.k",
        "preferences.temperature",
        "preferences.eval_fraction",
        "evaluate.n_prompts",
        "evaluate.nprompts",
        "rag_index.chunk_overlap_tokens",
    ]
    assert str(exc.value).splitlines() == list(exc.value.problems)  # one line each
    assert "sft.epochs: expected int, got str 'three'" in exc.value.problems


def test_a_single_problem_is_a_single_line():
    with pytest.raises(ConfigError) as exc:
        parse_params({"sft": {"epochs": 0}})
    assert str(exc.value) == "sft.epochs: must be >= 1, got 0"
    assert exc.value.problems == ("sft.epochs: must be >= 1, got 0",)


def test_build_collects_problems_of_a_plain_dataclass():
    with pytest.raises(ConfigError) as exc:
        build(_Extra, {"maybe": "4", "kind": "c", "extra": 1}, "x")
    assert [p.split(":")[0] for p in exc.value.problems] == ["x.maybe", "x.kind", "x.extra"]


def test_config_error_still_takes_one_message():
    err = ConfigError("a.b: broken")
    assert str(err) == "a.b: broken"
    assert err.problems == ("a.b: broken",)


# --------------------------------------------------------------------------- YAML 1.2 floats


def test_exponent_floats_without_a_dot_load_as_floats(tmp_path):
    text = (
        "sft:\n  learning_rate: 3e-3\n"
        "reward_model:\n  learning_rate: 1E-4\n"
        "base:\n  pretrain_learning_rate: 5.0e-4\n"  # YAML 1.1 wants a signed exponent: 5.0e+4 / 5.0e-4
        "align:\n  dpo:\n    beta: 1e0\n    loss_weights: [1e0, 5e-1]\n"
        "evaluate:\n  sample_temperature: +7e-1\n"
    )
    params = load_params(_write(tmp_path, text))
    assert params.sft.learning_rate == 3e-3 and type(params.sft.learning_rate) is float
    assert params.reward_model.learning_rate == 1e-4
    assert params.base.pretrain_learning_rate == 5e-4
    assert params.align.dpo.beta == 1.0
    assert params.align.dpo.loss_weights == (1.0, 0.5)
    assert params.evaluate.sample_temperature == 0.7


def test_negative_exponent_float_is_a_float_then_range_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"^sft\.learning_rate: must be >= 0, got -200000\.0"):
        load_params(_write(tmp_path, "sft:\n  learning_rate: -2e5\n"))


def test_read_params_resolves_only_plain_exponent_scalars(tmp_path):
    path = _write(tmp_path, "a: 3e-3\nb: '3e-3'\nc: 1e\nd: 12\ne: 0.5\nf: e5\ng: 1_000\nh: .inf\n")
    data = read_params(path)
    assert data == {
        "a": 0.003,
        "b": "3e-3",
        "c": "1e",
        "d": 12,
        "e": 0.5,
        "f": "e5",
        "g": 1000,
        "h": float("inf"),
    }
    assert type(data["d"]) is int
    # the global SafeLoader is untouched: yaml.safe_load elsewhere keeps PyYAML's behaviour
    assert yaml.safe_load("a: 3e-3") == {"a": "3e-3"}


def test_quoted_exponent_stays_a_string_and_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"^sft\.learning_rate: expected float, got str '3e-3'"):
        load_params(_write(tmp_path, "sft:\n  learning_rate: '3e-3'\n"))


# --------------------------------------------------------------------------- shipped and test params


def test_shipped_params_pass_every_rule():
    root = Path(__file__).resolve().parents[2]
    assert load_params(root / "params.yaml") == Params()


def test_tiny_test_params_pass_every_rule():
    from tests.conftest import tiny_params

    params = parse_params(tiny_params())
    assert params.base.hidden_size % params.base.num_heads == 0


def test_lr_schedulers_are_the_transformers_ones_that_need_no_kwargs():
    import torch
    from transformers import get_scheduler
    from transformers.trainer_utils import SchedulerType

    from components.params import LR_SCHEDULERS

    known = {s.value for s in SchedulerType}
    assert set(LR_SCHEDULERS) <= known
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    for name in LR_SCHEDULERS:  # each works with what sft passes (warmup and total steps only)
        get_scheduler(name, optimizer, num_warmup_steps=1, num_training_steps=4)
    for name in sorted(known - set(LR_SCHEDULERS)):  # each left out really needs lr_scheduler_kwargs
        with pytest.raises((ValueError, TypeError)):
            get_scheduler(name, optimizer, num_warmup_steps=1, num_training_steps=4)


def test_dpo_loss_types_are_the_ones_trl_documents():
    from trl import DPOConfig

    from components.params import DPO_LOSS_TYPES

    help_text = {f.name: f for f in dataclasses.fields(DPOConfig)}["loss_type"].metadata["help"]
    assert list(DPO_LOSS_TYPES) == re.findall(r"`'(\w+)'`", help_text)


def test_ingest_tasks_are_the_verifier_tasks():
    from components import params
    from components.data.verifier import PROMPT_STYLES, TASKS
    from components.evaluation.prompting import PROMPTINGS
    from components.rag.chunking import MAX_CHUNK_TOKENS
    from components.training.rewards import REWARDS

    assert params.TASKS == TASKS  # a copy (see components/params.py for why it is not imported)
    assert params.PROMPT_STYLES == PROMPT_STYLES
    assert params.PROMPTINGS == PROMPTINGS
    assert params.ALIGN_REWARDS == REWARDS
    assert params.MAX_CHUNK_TOKENS == MAX_CHUNK_TOKENS
    assert not hasattr(params, "MAX_CHUNK_CHARACTERS")  # the character budget is gone from params
    assert set(IngestConfig().tasks) <= set(TASKS)
    for task in TASKS:
        assert parse_params({"ingest": {"tasks": [task]}}).ingest.tasks == (task,)
