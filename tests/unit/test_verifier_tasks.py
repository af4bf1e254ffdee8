"""Shipped verifier-graded tasks and the ingest splits built from them.

Reference answers are re-derived here from the prompt text (integer arithmetic, reversed
characters, the fact table read with :mod:`csv`), never copied from a run of the code.
"""

from __future__ import annotations

import csv
import json
import random
import re
from pathlib import Path

import pytest

from components.config import ConfigError
from components.data.verifier import (
    TASKS,
    TaskWorld,
    make_example,
    reward,
    sample_examples,
    verify,
    verify_lenient,
)
from components.errors import DataError, MissingInputError
from components.params import IngestConfig
from tasks.ingest import build_splits

ROOT = Path(__file__).resolve().parents[2]
FACTS = ROOT / "data" / "tasks" / "facts.csv"
WORDS = ROOT / "data" / "tasks" / "words.txt"
NON_CAPITAL = ("add", "reverse", "upper")


@pytest.fixture(scope="module")
def world() -> TaskWorld:
    return TaskWorld.load(FACTS)


@pytest.fixture(scope="module")
def capitals() -> dict[str, str]:
    with FACTS.open(newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["country", "capital"]
    return {country.strip(): capital.strip() for country, capital in rows[1:]}


def solve(prompt: str, capitals: dict[str, str]) -> tuple[str, str]:
    """(task, reference answer) worked out from the prompt text alone."""
    if m := re.fullmatch(r"add (\d+) and (\d+)", prompt):
        a, b = int(m.group(1)), int(m.group(2))
        assert 10 <= a <= 99 and 10 <= b <= 99, prompt
        return "add", str(a + b)
    if m := re.fullmatch(r"reverse ([a-z]+)", prompt):
        word = m.group(1)
        return "reverse", "".join(word[i] for i in range(len(word) - 1, -1, -1))
    if m := re.fullmatch(r"uppercase ([a-z]+)", prompt):
        word = m.group(1)
        return "upper", "".join(chr(ord(c) - 32) for c in word)
    if m := re.fullmatch(r"capital of (.+)", prompt):
        return "capital", capitals[m.group(1)]
    raise AssertionError(f"unrecognised prompt {prompt!r}")


# --------------------------------------------------------------------------- verify / reward


def test_verify_is_exact_match_after_trimming():
    assert verify("42", "42")
    assert verify("  42\n", "42")
    assert verify("OBKA", " OBKA ")
    assert not verify("43", "42")
    assert not verify("obka", "OBKA")  # case matters
    assert not verify("4 2", "42")
    assert not verify("", "42")
    assert not verify("42 and more", "42")


def test_reward_is_one_for_exact_answers():
    assert reward("42", "42") == 1.0
    assert reward(" 42 ", "42\n") == 1.0


@pytest.mark.parametrize(
    ("answer", "reference"), [("obak", "obka"), ("41", "42"), ("4", "42"), ("421", "42")]
)
def test_reward_gives_partial_credit_to_near_misses(answer, reference):
    assert 0.0 < reward(answer, reference) <= 0.5


@pytest.mark.parametrize(("answer", "reference"), [("", "42"), ("   ", "42"), ("zz", "42"), ("abc", "")])
def test_reward_is_zero_for_empty_or_unrelated_answers(answer, reference):
    assert reward(answer, reference) == 0.0


def test_reward_prefers_closer_answers():
    assert reward("obka", "obka") > reward("obkz", "obka") > reward("ozzz", "obka") > reward("zzzz", "obka")
    # a longer answer is penalised for the extra characters
    assert reward("obkaxxxx", "obka") < reward("obkz", "obka")


def test_reward_is_in_unit_interval_and_one_only_when_verified():
    rng = random.Random(0)
    alphabet = "ab1 "
    for _ in range(2000):
        a = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 5)))
        b = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 5)))
        r = reward(a, b)
        assert 0.0 <= r <= 1.0
        assert (r == 1.0) == verify(a, b)
        if r < 1.0:
            assert r <= 0.5


# --------------------------------------------------------------------------- verify_lenient

CAPS = ("Paris", "Rome", "New York", "York", "Rapeba", "Gubu")


@pytest.mark.parametrize(
    ("reply", "reference", "task", "prompt"),
    [
        ("109", "109", "add", "add 45 and 64"),
        ("The answer is 109.", "109", "add", "add 45 and 64"),
        ("45 + 64 = 109", "109", "add", "add 45 and 64"),  # the operands are echoes of the prompt
        ("Sure! Adding 45 and 64 gives 109. Anything else?", "109", "add", "add 45 and 64"),
        ("**109**", "109", "add", "add 45 and 64"),
        ("109.0", "109", "add", "add 45 and 64"),
        ("Sure! The capital of Ligete is Rapeba.", "Rapeba", "capital", "capital of Ligete"),
        ("rapeba", "Rapeba", "capital", "capital of Ligete"),
        ("It's New York.", "New York", "capital", "capital of X"),  # not also "York"
        ("The reverse of hello is olleh.", "olleh", "reverse", "reverse hello"),
        ('"olleh"', "olleh", "reverse", "reverse hello"),
        ("Olleh!", "olleh", "reverse", "reverse hello"),  # sentence case: the order is the skill
        ("The reverse of level is level.", "level", "reverse", "reverse level"),  # a palindrome
        ("The answer is qiq.", "qiq", "reverse", "reverse qiq"),
        ("Here it is: HELLO", "HELLO", "upper", "uppercase hello"),
        ("I think it is HELLO.", "HELLO", "upper", "uppercase hello"),  # "I" is one letter
        ("uppercase hello -> HELLO", "HELLO", "upper", "uppercase hello"),
    ],
)
def test_verify_lenient_accepts_the_answer_inside_a_verbose_reply(reply, reference, task, prompt):
    assert verify_lenient(reply, reference, task, prompt, CAPS)


@pytest.mark.parametrize(
    ("reply", "reference", "task", "prompt"),
    [
        # several candidates: listing answers must not game the metric
        ("109 or 110", "109", "add", "add 45 and 64"),
        ("108 109 110 111", "109", "add", "add 45 and 64"),
        ("The answer is 110, not 109.", "109", "add", "add 45 and 64"),
        ("Paris or Rome", "Paris", "capital", "capital of X"),
        ("Rapeba, Gubu", "Rapeba", "capital", "capital of Ligete"),
        ("olleh ollhe lleho", "olleh", "reverse", "reverse hello"),
        ("HELLO or HELO", "HELLO", "upper", "uppercase hello"),
        ("HELLO HELLLO", "HELLO", "upper", "uppercase hello"),
        # wrong, or only part of a token
        ("The answer is 110.", "109", "add", "add 45 and 64"),
        ("-109", "109", "add", "add 45 and 64"),
        ("1090", "109", "add", "add 45 and 64"),
        ("a109", "109", "add", "add 45 and 64"),
        ("Parisian", "Paris", "capital", "capital of X"),
        ("York", "New York", "capital", "capital of X"),
        ("ollehs", "olleh", "reverse", "reverse hello"),
        ("hello", "olleh", "reverse", "reverse hello"),  # the prompt's word, not reversed
        ("Hello", "HELLO", "upper", "uppercase hello"),  # case is the upper task's skill
        ("hello", "HELLO", "upper", "uppercase hello"),
        # only echoes the prompt
        ("add 45 and 64", "109", "add", "add 45 and 64"),
        ("uppercase hello", "HELLO", "upper", "uppercase hello"),
        ("", "109", "add", "add 45 and 64"),
        # working that names an intermediate number: stricter, by design
        ("100 + 9 = 109", "109", "add", "add 45 and 64"),
    ],
)
def test_verify_lenient_rejects_wrong_ambiguous_or_gamed_replies(reply, reference, task, prompt):
    assert not verify_lenient(reply, reference, task, prompt, CAPS)


def test_verify_lenient_is_exact_match_for_tasks_it_does_not_know():
    assert verify_lenient(" answer 1 ", "answer 1", "user", "question")
    assert not verify_lenient("The answer is answer 1", "answer 1", "user", "question")


def test_verify_lenient_never_rejects_an_exact_answer(world):
    rng = random.Random(11)
    capitals = [c for _, c in world.facts]
    for task in TASKS:
        for _ in range(200):
            ex = make_example(task, rng, world)
            assert verify_lenient(ex.answer, ex.answer, task, ex.prompt, capitals)
            assert verify_lenient(f"The answer is {ex.answer}.", ex.answer, task, ex.prompt, capitals)
            assert verify_lenient(f" {ex.answer}\n", ex.answer, task, ex.prompt, capitals)


def test_verify_lenient_rejects_another_examples_answer(world):
    rng = random.Random(12)
    capitals = [c for _, c in world.facts]
    for task in TASKS:
        for _ in range(200):
            ex, other = make_example(task, rng, world), make_example(task, rng, world)
            if other.answer.lower() == ex.answer.lower():
                continue
            assert not verify_lenient(other.answer, ex.answer, task, ex.prompt, capitals)
            both = f"{ex.answer} or {other.answer}"
            # a rival of the same kind spoils it, unless it echoes the prompt (an operand) or, for
            # reverse, is not an anagram of the word (the documented blind spots)
            echo = other.answer.lower() in ex.prompt.lower().split()
            if not echo and (task != "reverse" or sorted(other.answer) == sorted(ex.answer)):
                assert not verify_lenient(both, ex.answer, task, ex.prompt, capitals), both


# --------------------------------------------------------------------------- make_example


@pytest.mark.parametrize("task", TASKS)
def test_make_example_answers_are_correct(task, world, capitals):
    rng = random.Random(123)
    for _ in range(200):
        ex = make_example(task, rng, world)
        assert ex.task == task
        assert solve(ex.prompt, capitals) == (task, ex.answer)
        assert verify(ex.answer, ex.answer) and reward(ex.answer, ex.answer) == 1.0


@pytest.mark.parametrize("task", ["reverse", "upper"])
def test_word_tasks_draw_from_the_word_list(task, world):
    words = {w.strip() for w in WORDS.read_text().splitlines() if w.strip()}
    rng = random.Random(5)
    for _ in range(100):
        ex = make_example(task, rng, world)
        assert ex.prompt.split(" ", 1)[1] in words


def test_make_example_messages_are_a_chat_pair(world):
    ex = make_example("add", random.Random(0), world)
    assert ex.messages() == [
        {"role": "user", "content": ex.prompt},
        {"role": "assistant", "content": ex.answer},
    ]


def test_make_example_rejects_unknown_task(world):
    with pytest.raises(ValueError, match="unknown task 'divide'"):
        make_example("divide", random.Random(0), world)


# --------------------------------------------------------------------------- sample_examples


def test_sample_examples_is_deterministic_by_seed(world):
    a = sample_examples(60, TASKS, world, seed=7)
    assert a == sample_examples(60, TASKS, world, seed=7)
    assert a != sample_examples(60, TASKS, world, seed=8)


def test_sample_examples_cycles_through_tasks_in_order(world):
    tasks = ("upper", "add", "capital")
    out = sample_examples(30, tasks, world, seed=0)
    assert len(out) == 30
    assert [ex.task for ex in out] == [tasks[i % 3] for i in range(30)]


def test_sample_examples_never_returns_excluded_non_capital_prompts(world):
    held_out = {ex.prompt for ex in sample_examples(200, TASKS, world, seed=1)}
    # the exclusion has work to do: without it the same draw would repeat held-out prompts
    unfiltered = sample_examples(400, TASKS, world, seed=2)
    assert any(ex.prompt in held_out and ex.task != "capital" for ex in unfiltered)
    out = sample_examples(400, TASKS, world, seed=2, exclude=held_out)
    assert len(out) == 400
    leaked = [ex.prompt for ex in out if ex.prompt in held_out and ex.task in NON_CAPITAL]
    assert leaked == []


def test_capital_prompts_may_recur_across_splits(world):
    every_capital_prompt = {f"capital of {country}" for country, _ in world.facts}
    out = sample_examples(10, ["capital"], world, seed=0, exclude=every_capital_prompt)
    assert len(out) == 10 and all(ex.prompt in every_capital_prompt for ex in out)


def test_sample_examples_fails_when_exclusion_cannot_be_met():
    tiny = TaskWorld(words=("abc",), facts=(("Land", "Town"),))
    with pytest.raises(DataError, match="outside the held-out set"):
        sample_examples(2, ["reverse"], tiny, seed=0, exclude={"reverse abc"})


# --------------------------------------------------------------------------- TaskWorld.load


def test_world_loads_facts_and_words(world, capitals):
    assert dict(world.facts) == capitals
    assert list(world.words) == [w.strip() for w in WORDS.read_text().splitlines() if w.strip()]


def _world_files(tmp_path: Path, facts: str, words: str = "alpha\n\nbeta\n") -> Path:
    (tmp_path / "words.txt").write_text(words)
    path = tmp_path / "facts.csv"
    path.write_text(facts)
    return path


def test_world_load_custom_files_skips_blank_words(tmp_path):
    world = TaskWorld.load(_world_files(tmp_path, "country,capital\nLand, Town \n"))
    assert world.facts == (("Land", "Town"),)
    assert world.words == ("alpha", "beta")


def test_world_load_bad_header_names_file_and_line_1(tmp_path):
    path = _world_files(tmp_path, "nation,city\nLand,Town\n")
    with pytest.raises(DataError) as exc:
        TaskWorld.load(path)
    assert str(exc.value).startswith(f"{path}:1:")
    assert "country,capital" in str(exc.value)


def test_world_load_empty_cell_names_file_and_line(tmp_path):
    path = _world_files(tmp_path, "country,capital\nLand,Town\nNowhere,\n")
    with pytest.raises(DataError) as exc:
        TaskWorld.load(path)
    assert str(exc.value).startswith(f"{path}:3:")


def test_world_load_short_row_names_file_and_line(tmp_path):
    path = _world_files(tmp_path, "country,capital\nLand,Town\nA,B\nNowhere\n")
    with pytest.raises(DataError, match=re.escape(f"{path}:4:")):
        TaskWorld.load(path)


def test_world_load_whitespace_only_cell_is_empty(tmp_path):
    path = _world_files(tmp_path, "country,capital\nLand,Town\nNowhere,  \n")
    with pytest.raises(DataError, match=re.escape(f"{path}:3:")):
        TaskWorld.load(path)


def test_world_load_empty_word_list_names_file(tmp_path):
    path = _world_files(tmp_path, "country,capital\nLand,Town\n", words="\n\n")
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "words.txt"))):
        TaskWorld.load(path)


def test_world_load_missing_files(tmp_path):
    with pytest.raises(MissingInputError, match=re.escape(str(tmp_path / "facts.csv"))):
        TaskWorld.load(tmp_path / "facts.csv")
    (tmp_path / "facts.csv").write_text("country,capital\nLand,Town\n")
    with pytest.raises(MissingInputError, match="words.txt"):
        TaskWorld.load(tmp_path / "facts.csv")


# --------------------------------------------------------------------------- ingest.build_splits


def _cfg(**overrides) -> IngestConfig:
    base = dict(facts=str(FACTS), n_sft_train=240, n_sft_eval=40, n_preference_prompts=80, n_eval_prompts=80)
    return IngestConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def splits() -> dict:
    return build_splits(_cfg())


def _sft_prompts(records: list[dict]) -> list[tuple[str, str]]:
    return [(r["task"], next(m["content"] for m in r["messages"] if m["role"] == "user")) for r in records]


def test_build_splits_sizes_and_keys(splits):
    cfg = _cfg()
    assert set(splits) == {"sft_train", "sft_eval", "preference_prompts", "eval_prompts"}
    assert len(splits["sft_train"]) == cfg.n_sft_train
    assert len(splits["sft_eval"]) == cfg.n_sft_eval
    assert len(splits["preference_prompts"]) == cfg.n_preference_prompts
    assert len(splits["eval_prompts"]) == cfg.n_eval_prompts


def test_build_splits_answers_are_correct(splits, capitals):
    for rec in splits["eval_prompts"] + splits["preference_prompts"]:
        assert solve(rec["prompt"], capitals) == (rec["task"], rec["answer"])
    for rec in splits["sft_train"] + splits["sft_eval"]:
        user, assistant = rec["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        assert solve(user["content"], capitals) == (rec["task"], assistant["content"])


def test_build_splits_covers_every_configured_task(splits):
    for name in ("sft_train", "sft_eval", "preference_prompts", "eval_prompts"):
        assert {r["task"] for r in splits[name]} == set(TASKS), name


def test_eval_prompts_never_leak_into_training_splits(splits):
    held_out = {r["prompt"] for r in splits["eval_prompts"] if r["task"] in NON_CAPITAL}
    train_prompts = {p for t, p in _sft_prompts(splits["sft_train"]) if t in NON_CAPITAL}
    pref_prompts = {r["prompt"] for r in splits["preference_prompts"] if r["task"] in NON_CAPITAL}
    sft_eval_prompts = {p for t, p in _sft_prompts(splits["sft_eval"]) if t in NON_CAPITAL}
    assert held_out and train_prompts and pref_prompts
    assert held_out.isdisjoint(train_prompts)
    assert held_out.isdisjoint(pref_prompts)
    assert held_out.isdisjoint(sft_eval_prompts)
    # the SFT eval split is held out from SFT training and preference prompts too
    assert sft_eval_prompts.isdisjoint(train_prompts)
    assert sft_eval_prompts.isdisjoint(pref_prompts)


def test_build_splits_is_deterministic(splits):
    again = build_splits(_cfg())
    assert json.dumps(again, sort_keys=True) == json.dumps(splits, sort_keys=True)
    other = build_splits(_cfg(seed=1))
    assert other["eval_prompts"] != splits["eval_prompts"]
    assert other["sft_train"] != splits["sft_train"]


def test_build_splits_respects_task_subset():
    out = build_splits(_cfg(tasks=("reverse", "add"), n_sft_train=20, n_eval_prompts=10))
    for records in out.values():
        assert {r["task"] for r in records} == {"reverse", "add"}


def test_build_splits_unknown_task_names_the_param_key():
    with pytest.raises(ConfigError) as exc:
        build_splits(_cfg(tasks=("add", "multiply")))
    assert str(exc.value).startswith("ingest.tasks:")
    assert "'multiply'" in str(exc.value)


def test_build_splits_empty_task_list_names_the_param_key():
    with pytest.raises(ConfigError, match=r"^ingest\.tasks"):
        build_splits(_cfg(tasks=()))


def test_build_splits_missing_facts_file(tmp_path):
    with pytest.raises(MissingInputError, match=re.escape(str(tmp_path / "facts.csv"))):
        build_splits(_cfg(facts=str(tmp_path / "facts.csv")))


def test_build_splits_malformed_user_sft_data_names_file_and_line(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text('{"prompt": "p", "completion": "c"}\n\n{"prompt": "p", "completion": "c"\n')
    with pytest.raises(DataError) as exc:
        build_splits(_cfg(sft_data=str(path)))
    assert f"{path}:3:" in str(exc.value)


def test_build_splits_invalid_user_sft_record_names_file_and_line(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text('{"prompt": "p", "completion": "c"}\n{"messages": [{"role": "user", "content": "q"}]}\n')
    with pytest.raises(DataError, match="^" + re.escape(f"{path}:2: ")):
        build_splits(_cfg(sft_data=str(path)))


def test_build_splits_uses_user_sft_data(tmp_path):
    records = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(30)]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = build_splits(_cfg(sft_data=str(path)))
    train, held = out["sft_train"], out["sft_eval"]
    assert train and held
    prompts = sorted(p for _, p in _sft_prompts(train + held))
    assert prompts == sorted(r["prompt"] for r in records)  # every record used exactly once
    assert {p for _, p in _sft_prompts(train)}.isdisjoint({p for _, p in _sft_prompts(held)})
    assert {r["task"] for r in train + held} == {"user"}
    # the verifier-graded eval prompts still come from the shipped tasks
    assert {r["task"] for r in out["eval_prompts"]} == set(TASKS)
    assert build_splits(_cfg(sft_data=str(path))) == out  # deterministic shuffle


def test_build_splits_user_preference_data(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps({"prompt": "q", "chosen": "good", "rejected": "bad"}) + "\n")
    out = build_splits(_cfg(preference_data=str(path)))
    assert [r["chosen"][0]["content"] for r in out["user_preferences"]] == ["good"]
    bad = tmp_path / "bad_prefs.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "chosen": "same", "rejected": "same"}) + "\n")
    with pytest.raises(DataError, match="^" + re.escape(f"{bad}:1: ")):
        build_splits(_cfg(preference_data=str(bad)))


# --------------------------------------------------------------------------- prompt styles
@pytest.mark.parametrize("task", TASKS)
def test_instruct_prompts_ask_the_same_question_with_the_same_answer(task, world):
    terse = make_example(task, random.Random(3), world, "terse")
    instruct = make_example(task, random.Random(3), world, "instruct")
    assert instruct.answer == terse.answer and instruct.task == task
    assert instruct.prompt != terse.prompt and instruct.prompt.endswith("only.")
    # the instruct prompt still carries the operand(s) the terse one names
    operands = terse.prompt.split(" ", 2)[-1] if task != "add" else terse.prompt[4:]
    for part in operands.replace(" and ", " ").replace("of ", "").split():
        assert part in instruct.prompt


def test_real_task_world_is_real_capitals_and_common_words():
    real = TaskWorld.load(ROOT / "data/tasks/real/facts.csv")
    assert ("France", "Paris") in real.facts and len(real.facts) == 40
    assert len(real.words) == 800 and {"ability", "account"} <= set(real.words)
    assert all(w.isalpha() and w.islower() and w != w[::-1] for w in real.words)
