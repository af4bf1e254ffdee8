"""Shipped, verifier-graded tasks: what the pipeline teaches and how it is graded.

Four task families, each with an exact reference answer so a verifier can grade any
completion without a model: two-digit addition, reversing a word, upper-casing a word, and
looking up a capital in the shipped fact table (``data/tasks/facts.csv``, which the RAG
documents also describe). Everything is generated from a seed, so the same params give
byte-identical data.
"""

from __future__ import annotations

import csv
import random
import re
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from components.errors import DataError, MissingInputError

TASKS: tuple[str, ...] = ("add", "reverse", "upper", "capital")


@dataclass(frozen=True)
class Example:
    """One prompt with its reference answer; ``task`` names the family (``user`` for imported data)."""

    prompt: str
    answer: str
    task: str

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.answer}]


@dataclass(frozen=True)
class TaskWorld:
    """The vocabulary the tasks draw from: a word list and a country -> capital table."""

    words: tuple[str, ...]
    facts: tuple[tuple[str, str], ...]

    @classmethod
    def load(cls, facts_csv: Path | str, words_txt: Path | str | None = None) -> TaskWorld:
        facts_csv = Path(facts_csv)
        words_txt = Path(words_txt) if words_txt else facts_csv.with_name("words.txt")
        for path in (facts_csv, words_txt):
            if not path.is_file():
                raise MissingInputError(f"{path}: task data file not found")
        facts = []
        with facts_csv.open(newline="") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames != ["country", "capital"]:
                raise DataError(f"{facts_csv}:1: expected header 'country,capital', got {reader.fieldnames}")
            for line, row in enumerate(reader, start=2):
                country, capital = (row["country"] or "").strip(), (row["capital"] or "").strip()
                if not country or not capital:
                    raise DataError(f"{facts_csv}:{line}: empty country or capital")
                facts.append((country, capital))
        if not facts:
            raise DataError(f"{facts_csv}: no facts")
        words = tuple(w.strip() for w in words_txt.read_text().splitlines() if w.strip())
        if not words:
            raise DataError(f"{words_txt}: no words")
        return cls(words=words, facts=tuple(facts))


# How each task is asked. ``terse`` is the tiny model's own format (it learns it from scratch);
# ``instruct`` is how one asks a pretrained chat model, with the answer format spelled out, so
# that a real instruct model's zero-shot row measures the skill and not the phrasing.
PROMPTS: dict[str, dict[str, str]] = {
    "terse": {
        "add": "add {a} and {b}",
        "reverse": "reverse {word}",
        "upper": "uppercase {word}",
        "capital": "capital of {country}",
    },
    "instruct": {
        "add": "What is {a} + {b}? Answer with the number only.",
        "reverse": 'Spell the word "{word}" backwards. Answer with the reversed word only.',
        "upper": 'Write the word "{word}" in capital letters. Answer with that word only.',
        "capital": "What is the capital of {country}? Answer with the city name only.",
    },
}
PROMPT_STYLES: tuple[str, ...] = tuple(PROMPTS)


def make_example(task: str, rng: random.Random, world: TaskWorld, style: str = "terse") -> Example:
    """Draw one example of ``task``, asked in prompt ``style`` (a key of :data:`PROMPTS`)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    template = PROMPTS[style][task]
    if task == "add":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return Example(template.format(a=a, b=b), str(a + b), task)
    if task == "capital":
        country, capital = rng.choice(world.facts)
        return Example(template.format(country=country), capital, task)
    word = rng.choice(world.words)
    return Example(template.format(word=word), word[::-1] if task == "reverse" else word.upper(), task)


def sample_examples(
    n: int,
    tasks: Sequence[str],
    world: TaskWorld,
    seed: int,
    exclude: set[str] | None = None,
    style: str = "terse",
) -> list[Example]:
    """``n`` examples cycling through ``tasks``; prompts in ``exclude`` are skipped (held-out splits)."""
    rng = random.Random(seed)
    exclude = exclude or set()
    out: list[Example] = []
    attempts = 0
    while len(out) < n:
        ex = make_example(tasks[len(out) % len(tasks)], rng, world, style)
        attempts += 1
        # Repeats are allowed within a split. Capitals are a closed-book lookup over a fixed
        # 40-row table that the policy is meant to memorise, so only they may recur across splits.
        if ex.prompt in exclude and ex.task != "capital":
            if attempts > 100 * max(n, 1):
                raise DataError(f"cannot draw {n} examples of {list(tasks)} outside the held-out set")
            continue
        out.append(ex)
    return out


def verify(answer: str, reference: str) -> bool:
    """Exact match after trimming whitespace: the verifier every stage shares."""
    return answer.strip() == reference.strip()


# --------------------------------------------------------------------------- lenient grading
# Real chat models wrap the answer in prose ("Sure! 45 + 64 = 109."). ``verify_lenient`` accepts
# such a reply when it names the reference as a whole token and names no RIVAL: another answer
# of the task's kind that is not an echo of the prompt (a candidate counts as an echo as often as
# the prompt contains it, so "45 + 64 = 109" names one answer, 109). The kinds:
#
#   add      kind = numbers (an integral "109.0" reads as 109; the prompt's operands are discounted)
#   upper    kind = all-capitals words of two or more letters, compared case-sensitively
#   reverse  kind = words that are a permutation of the reference's letters (so the prompt's own
#            word is one, and discounted), compared case-insensitively
#   capital  kind = the names in ``capitals`` (the evaluation suite passes every capital among its
#            references) plus the reference, matched as whole words, case-insensitively
#
# So a reply that lists several candidates ("109 or 110", "OLLEH OLLHE", "Paris, maybe Rome") fails,
# as does one whose working shows an intermediate number ("100 + 9 = 109": stricter by design,
# never looser). Known blind spots, none of which lets a list of guesses in: echoes are never
# rivals (an operand, never the right sum, may appear beside the answer); a reference that is
# itself in the prompt (a palindrome for reverse) passes whenever it appears; a non-anagram
# misspelling beside the right reversal is not a rival. Tasks without a known kind (imported
# ``user`` data) fall back to exact match, and an exact match always passes, so lenient accuracy
# is never below exact accuracy.

_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?!\w)")
_WORD = re.compile(r"[^\W\d_]+")


def _number(text: str) -> str:
    value = float(text)
    return str(int(value)) if value.is_integer() else text


def _candidates(text: str, task: str, reference: str, capitals: Collection[str]) -> list[str]:
    """Every answer of ``task``'s kind that ``text`` names, normalised, in order of appearance."""
    if task == "add":
        return [_number(m) for m in _NUMBER.findall(text)]
    if task == "upper":
        return [w for w in _WORD.findall(text) if w.isupper() and (len(w) >= 2 or w == reference)]
    if task == "reverse":
        letters = sorted(reference.lower())
        return [w.lower() for w in _WORD.findall(text) if sorted(w.lower()) == letters]
    if task == "capital":
        names = sorted({c.strip() for c in capitals if c.strip()} | {reference}, key=lambda c: (-len(c), c))
        # one alternation, longest name first: "New York" is one capital, not also "York"
        pattern = r"(?<!\w)(?:" + "|".join(map(re.escape, names)) + r")(?!\w)"
        return [m.lower() for m in re.findall(pattern, text, flags=re.IGNORECASE)]
    raise ValueError(f"no lenient grading for task {task!r}")


def verify_lenient(
    answer: str, reference: str, task: str, prompt: str = "", capitals: Collection[str] = ()
) -> bool:
    """True when ``answer`` is exact, or names the reference as its one answer (rules above)."""
    if verify(answer, reference):
        return True
    if task not in TASKS:
        return False
    reference = reference.strip()
    want = _candidates(reference, task, reference, capitals)
    if len(want) != 1:  # a reference that is not itself one answer of its kind: exact only
        return False
    named = Counter(_candidates(answer, task, reference, capitals))
    echoed = Counter(_candidates(prompt, task, reference, capitals))
    rivals = [c for c, n in named.items() if c != want[0] and n > echoed[c]]
    return named[want[0]] > 0 and not rivals


def reward(answer: str, reference: str) -> float:
    """Graded reward in [0, 1]: 1 for an exact answer, else half the share of position-matched characters.

    Partial credit gives RL and preference ranking a signal on near misses ("obka" vs "obak").
    """
    answer, reference = answer.strip(), reference.strip()
    if answer == reference:
        return 1.0
    if not reference:
        return 0.0
    matches = sum(a == b for a, b in zip(answer, reference, strict=False))
    return 0.5 * matches / max(len(reference), len(answer))


def pretraining_corpus(world: TaskWorld, n_lines: int, seed: int) -> list[str]:
    """Plain prose that teaches the task *content* (sums, spellings, capitals) without the chat format."""
    rng = random.Random(seed)
    lines = []
    for i in range(n_lines):
        kind = i % 4
        if kind == 0:
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            lines.append(f"{a} plus {b} makes {a + b}.")
        elif kind == 1:
            w = rng.choice(world.words)
            lines.append(f"The word {w} spelled backwards is {w[::-1]}.")
        elif kind == 2:
            w = rng.choice(world.words)
            lines.append(f"The word {w} in capitals is {w.upper()}.")
        else:
            country, capital = rng.choice(world.facts)
            lines.append(f"The capital of {country} is {capital}.")
    return lines


if __name__ == "__main__":  # regenerate the shipped pretraining corpus
    import sys

    root = Path(__file__).resolve().parents[2]
    world = TaskWorld.load(root / "data/tasks/facts.csv")
    text = "\n".join(pretraining_corpus(world, int(sys.argv[1]) if len(sys.argv) > 1 else 20000, seed=1234))
    (root / "data/corpus/pretrain.txt").write_text(text + "\n")
