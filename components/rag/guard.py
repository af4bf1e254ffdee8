"""Prompt-injection defence for retrieved text: documents are data, never instructions.

A RAG answer quotes or paraphrases whatever the index holds, and anyone who can put a file in
the index can write "ignore previous instructions and ..." into it. This module finds such text
before it reaches an answer or a generator prompt:

- :func:`find_instructions` flags sentences that address an AI assistant (override, role change,
  prompt extraction, answer hijacking, chat-template control tokens). The patterns name the
  assistant or its instructions explicitly, so ordinary technical prose ("the instructions
  below install the library", "ignore this warning on Linux") is left alone.
- :func:`redact_instructions` removes the flagged sentences and keeps the rest verbatim.
- :func:`strip_hidden_html` removes what a browser would not show a reader (comments, scripts,
  ``display:none`` and friends) before an HTML file is partitioned, since hidden text is the
  usual carrier of an injection a human reviewer never sees.

Everything here is regular expressions and lxml: no network, no model, deterministic.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

MAX_FINDING_CHARS = 300

# -- sentence splitting ------------------------------------------------------------------------
# Shared with components.rag.answer (which re-exports split_sentences): the guard redacts by
# sentence, so it owns the splitter and answer.py depends on guard, not the other way round.

# A period/!/? run (with closing quotes or brackets) followed by whitespace and something that
# can start a sentence. Decimals, versions and file names (3.11, setup.py) have no whitespace
# after the dot, so they never match. The lookbehind and possessive quantifiers keep a long run
# of punctuation linear.
_SENTENCE_END = re.compile(r"""(?<![.!?])[.!?]++["'”’)\]]*+(?=\s+[A-Z0-9"'“‘(\[`])""")
# Paragraph breaks, and newlines before a list item or a markdown heading.
_LINE_BREAK = re.compile(r"\n[ \t]*\n|\n(?=[ \t]*(?:[-*+•▪‣]|\d{1,3}[.)]|#{1,6})[ \t])")
# A whole list-item line: it ends at its newline even when the next line is plain text.
_LIST_LINE = re.compile(r"^[ \t]*(?:[-*+•▪‣]|\d{1,3}[.)])[ \t]+.*$", re.MULTILINE)
_WORD_BEFORE = re.compile(r"[A-Za-z][A-Za-z.]*$")
_INITIALISM = re.compile(r"^(?:[A-Za-z]\.)+[A-Za-z]$")  # e.g, i.e, U.S, a.m
ABBREVIATIONS = frozenset(
    {
        "e.g", "i.e", "etc", "vs", "cf", "al", "approx", "dr", "mr", "mrs", "ms", "prof", "sr", "jr",
        "st", "fig", "figs", "eq", "eqs", "vol", "sec", "ch", "pp", "ref", "refs", "resp", "inc",
        "ltd", "corp", "dept", "min", "max", "avg", "incl", "ca", "viz", "ed", "eds", "nr",
    }
)  # fmt: skip


def _is_abbreviation(text: str, dot: int) -> bool:
    """Whether the period at ``dot`` ends an abbreviation or an initial rather than a sentence."""
    if text[dot] != "." or text[dot : dot + 2] == "..":
        return False
    match = _WORD_BEFORE.search(text, max(0, dot - 40), dot)
    if match is None:
        return False
    start = match.start()
    if start > 0 and text[start - 1].isalnum():  # the tail of "setup.py" or "x2.", not a word
        return False
    word = match.group()
    return word.lower() in ABBREVIATIONS or len(word) == 1 or bool(_INITIALISM.match(word))


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` offsets of each sentence in ``text``, stripped of surrounding whitespace."""
    cuts = {0, len(text)}
    cuts.update(m.end() for m in _LINE_BREAK.finditer(text))
    cuts.update(m.end() for m in _LIST_LINE.finditer(text))
    cuts.update(m.end() for m in _SENTENCE_END.finditer(text) if not _is_abbreviation(text, m.start()))
    bounds = sorted(cuts)
    spans = []
    for start, end in zip(bounds, bounds[1:], strict=False):
        while start < end and text[start].isspace():
            start += 1
        while end > start and text[end - 1].isspace():
            end -= 1
        if start < end:
            spans.append((start, end))
    return spans


def split_sentences(text: str) -> list[str]:
    """Sentences of English technical prose, stripped, empties dropped (regex only, no NLTK).

    Splits on ``.``/``!``/``?`` followed by whitespace and a capital, digit, quote or bracket,
    on blank lines, and before list items and headings. Does not split after common
    abbreviations (e.g., i.e., etc., Dr., vs., Fig.), initials, or inside decimals, versions
    and file names (3.11, setup.py).
    """
    return [text[start:end] for start, end in sentence_spans(text)]


# -- findings ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """One piece of text the guard removed: what kind, the text itself (clipped), and why."""

    kind: str  # "instruction" | "hidden_html" | "html_comment" | "script"
    text: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _clip(text: str) -> str:
    """Whitespace-collapsed, at most :data:`MAX_FINDING_CHARS` characters."""
    collapsed = " ".join(text.split())
    if len(collapsed) <= MAX_FINDING_CHARS:
        return collapsed
    return collapsed[: MAX_FINDING_CHARS - 1] + "…"


# -- instruction patterns ----------------------------------------------------------------------
# Each pattern names the assistant, its instructions or its prompt, or sits in imperative
# position (sentence start, "you must ..."), so that technical prose about instructions, rules,
# prompts and systems is not flagged. All are case-insensitive; ^ is a sentence or line start.

# Where an imperative aimed at the reader starts: the sentence start (after please/now/...), or
# after "you must/should/will ..." or "I want you to".
_LEAD = (
    r"(?:^[\W_]*(?:(?:please|now|and|then|also|so|from\s+now\s+on)\b[\W_]*)*"
    r"|\byou\s+(?:must|should|will|shall|need\s+to|have\s+to|are\s+to|are\s+going\s+to)\s+(?:now\s+)?"
    r"|\bi\s+want\s+you\s+to\s+)"
)
_AI = (
    r"(?:ai|assistant|chatbot|bot|model|llm|language\s+model|gpt|chatgpt|claude|dan|persona|"
    r"character|agent|hacker|jailbreak\w*)"
)
_INSTRUCTIONS = (
    r"(?:instructions?|prompts?|rules|directions|directives?|guidelines|commands|messages|context|"
    r"constraints|guardrails|programming|training)"
)
_EARLIER = r"(?:previous|prior|above|earlier|preceding|foregoing|former|original|initial|system|existing)"

_PATTERNS: tuple[tuple[str, str], ...] = (
    (
        rf"\b(?:ignore|disregard|forget|override|bypass)\s+(?:(?:all|any|every|each|the|"
        rf"your|my|these|those|of)\s+){{0,3}}{_EARLIER}\s+(?:\w+\s+)?{_INSTRUCTIONS}",
        "tells the assistant to ignore its earlier instructions",
    ),
    (
        rf"\b(?:ignore|disregard|forget)\s+(?:all\s+(?:of\s+)?)?(?:your|all)\s+{_INSTRUCTIONS}\b",
        "tells the assistant to ignore its instructions",
    ),
    (
        r"\b(?:ignore|disregard|forget)\s+(?:all\s+(?:of\s+)?)?(?:everything\s+)?(?:the\s+)?"
        r"(?:above|foregoing)\s*,?\s*(?:and|then|:)",
        "tells the assistant to disregard the text above",
    ),
    (
        r"\bforget\s+(?:about\s+)?(?:everything(?=\s*(?:[.,;:!]|$|(?:you|above|before|prior|previous|said|"
        r"that|i|we|and|so\s+far|up\s+to)\b))|all\s+(?:of\s+)?(?:that|this|the\s+above)|"
        r"(?:all\s+)?your\s+(?:instructions|rules|training|guidelines|prompt|system\s+prompt|"
        r"previous|programming))\b",
        "tells the assistant to forget its instructions",
    ),
    (
        rf"\byou\s+are\s+now\s+(?:(?:a|an|the|my|in)\s+(?:[\w-]+\s+){{0,3}}?(?:{_AI}|"
        rf"(?:developer|dan|jailbreak|jailbroken|god|unrestricted|unfiltered|admin|debug)\s+mode)\b|"
        r"(?:no\s+longer\s+(?:bound|restricted|limited|an?\s+(?:ai|assistant|language\s+model)|"
        r"required\s+to\s+follow))|free\s+(?:from|of)\s+(?:all\s+|any\s+|your\s+)?(?:rules|restrictions|"
        r"guidelines|constraints)|unrestricted|unfiltered|jailbroken|dan\b)",
        "tries to give the assistant a new role",
    ),
    (
        r"\bfrom\s+now\s+on\s*,?\s*you\s+(?:will|must|shall|should|are\s+to|can\s+only)\s+(?:only\s+|always\s+)?"
        r"(?:answer|respond|reply|act|behave|say|speak|pretend|roleplay|ignore|refuse|obey|follow)\b",
        "tries to change how the assistant behaves from now on",
    ),
    (
        rf"{_LEAD}(?:act|behave|roleplay|role-play)\s+as\b",
        "asks the assistant to act as someone else",
    ),
    (
        rf"(?:{_LEAD}|\byou\s+)pretend\s+(?:to\s+be|you\s+are|that\s+you)\b",
        "asks the assistant to pretend to be someone else",
    ),
    (
        r"\b(?:new|updated|revised|real|actual|secret|hidden|additional|important)\s+(?:system\s+)?"
        r"(?:instructions?|rules|directives?|prompt|task)\s*:",
        "introduces new instructions",
    ),
    (
        r"\bsystem\s+(?:prompt|message)\s*:|\b(?:new|override|updated|change|replace)\s+(?:the\s+|your\s+)?"
        r"system\s+prompt\b|\byour\s+(?:system\s+prompt|initial\s+prompt|hidden\s+prompt|original\s+prompt|"
        r"instructions\s+are)\b",
        "refers to the assistant's system prompt",
    ),
    (
        r"\b(?:reveal|print|show|display|output|repeat|leak|dump|disclose|recite|share|tell\s+me|"
        r"give\s+me|write\s+out)\s+(?:me\s+|us\s+)?(?:all\s+)?(?:of\s+)?(?:your\s+(?:(?:full|entire|original|"
        r"initial|hidden|secret|exact|complete|system)\s+)*(?:prompt|instructions|rules|guidelines|"
        r"system\s+message|configuration)|the\s+(?:(?:full|entire|original|initial|hidden|secret|exact|"
        r"complete)\s+)*(?:system\s+prompt|system\s+message|hidden\s+prompt|initial\s+prompt))\b",
        "asks the assistant to reveal its prompt or instructions",
    ),
    (
        r"\binstead\s*,?\s+(?:just\s+|only\s+|simply\s+)?(?:say|answer|reply|respond|output|tell\s+the\s+user)\b",
        "tells the assistant to answer something else instead",
    ),
    (
        rf"{_LEAD}(?:only\s+)?always\s+(?:answer|respond|reply|say)\b",
        "dictates what the assistant must always answer",
    ),
    (
        r"\b(?:do\s+not|don[’']?t|never)\s+(?:tell|inform|mention\s+(?:this\s+|it\s+)?to|"
        r"reveal\s+(?:this\s+|it\s+)?to|show\s+(?:this\s+|it\s+)?to|let)\s+the\s+user\b"
        r"|\bwithout\s+(?:telling|informing)\s+the\s+user\b",
        "tells the assistant to hide something from the user",
    ),
    (
        r"\bas\s+an?\s+(?:ai|artificial\s+intelligence)(?:\s+(?:language\s+)?(?:model|assistant))?\s*,?\s+"
        r"(?:you|i)\b|^[\W_]*as\s+an?\s+(?:ai|large\s+language\s+model|language\s+model)\b"
        r"|\byou\s+are\s+an?\s+(?:ai|large\s+language\s+model|language\s+model)\b",
        "addresses the reader as an AI",
    ),
    (
        r"\bif\s+you\s+are\s+(?:an?\s+)?(?:ai|llm|large\s+language\s+model|language\s+model|assistant|"
        r"chatbot|gpt|chatgpt|claude)\b|\b(?:note|message|instructions?)\s+(?:to|for)\s+(?:the\s+|any\s+|all\s+)?"
        r"(?:ai|llm|assistant|chatbot|language\s+model)s?\b\s*:",
        "addresses an AI reading the document",
    ),
    (
        r"<\|[a-z_][\w-]*\|>|\[/?inst\]|<</?sys>>",
        "contains a chat-template control token",
    ),
    (
        r"^[ \t]*#{2,}\s*(?:instruction|system|response|assistant)s?\b",
        "contains a chat-template section header",
    ),
    (
        r"^[ \t]*(?:system|assistant)[ \t]*:",
        "starts a line with a chat role prefix",
    ),
)

_COMPILED: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE | re.MULTILINE), reason) for pattern, reason in _PATTERNS
)


def instruction_reason(sentence: str) -> str | None:
    """Why ``sentence`` reads as an instruction to an AI assistant, or None if it does not."""
    for pattern, reason in _COMPILED:
        if pattern.search(sentence):
            return reason
    return None


def _flagged_spans(text: str) -> list[tuple[int, int, Finding]]:
    flagged = []
    for start, end in sentence_spans(text):
        reason = instruction_reason(text[start:end])
        if reason is not None:
            flagged.append((start, end, Finding("instruction", _clip(text[start:end]), reason)))
    return flagged


def find_instructions(text: str) -> list[Finding]:
    """One :class:`Finding` (kind ``instruction``) per sentence that addresses an AI assistant."""
    return [finding for _, _, finding in _flagged_spans(text)]


def redact_instructions(text: str) -> tuple[str, list[Finding]]:
    """``text`` without its flagged sentences (everything else verbatim), and the findings.

    The spaces or tabs after a removed sentence go with it, so "A. Bad. C." becomes "A. C.";
    newlines stay, so paragraphs and list structure are kept.
    """
    flagged = _flagged_spans(text)
    if not flagged:
        return text, []
    pieces, cursor = [], 0
    for start, end, _ in flagged:
        pieces.append(text[cursor:start])
        while end < len(text) and text[end] in " \t":
            end += 1
        cursor = end
    pieces.append(text[cursor:])
    return "".join(pieces), [finding for _, _, finding in flagged]


# -- hidden HTML -------------------------------------------------------------------------------

_SCRIPT_TAGS = ("script", "noscript", "template", "style")
_ZERO_LENGTH = re.compile(r"^[+-]?0*(?:\.0*)?(?:px|em|rem|pt|pc|%|vh|vw|vmin|vmax|ex|ch|cm|mm|in)?$")
_XML_DECLARATION = re.compile(r"^\s*<\?xml[^>]*\?>", re.IGNORECASE)


def _style_hides(style: str) -> str | None:
    """The declaration that hides an element (``display:none``, ...), or None."""
    for declaration in style.split(";"):
        prop, sep, value = declaration.partition(":")
        if not sep:
            continue
        prop = prop.strip().lower()
        value = value.lower().replace("!important", "").strip()
        if (
            (prop == "display" and value == "none")
            or (prop == "visibility" and value in ("hidden", "collapse"))
            or (prop in ("font-size", "opacity") and _ZERO_LENGTH.match(value))
        ):
            return f"{prop}:{value}"
    return None


def _hidden_reason(element: Any) -> str | None:
    """Why a reader would not see ``element``, or None if it is visible (as far as inline HTML says)."""
    if element.get("hidden") is not None:
        return "element has the hidden attribute"
    if (element.get("aria-hidden") or "").strip().lower() == "true":
        return 'element has aria-hidden="true"'
    declaration = _style_hides(element.get("style") or "")
    if declaration is not None:
        return f"element is hidden by inline style {declaration}"
    return None


def _remove(element: Any) -> None:
    """Drop ``element`` but keep its tail text; a hidden <html>/<head>/<body> is emptied instead."""
    if element.getparent() is None or element.tag in ("head", "body"):
        element.text = None
        for child in list(element):
            element.remove(child)
    else:
        element.drop_tree()


def _parse_html(html: str) -> Any | None:
    import lxml.etree
    import lxml.html

    # lxml refuses a str with an encoding declaration; the declaration is meaningless in a str.
    source = _XML_DECLARATION.sub("", html, count=1)
    try:
        return lxml.html.document_fromstring(source)
    except (lxml.etree.ParserError, lxml.etree.XMLSyntaxError, ValueError):
        return None


def _strip_comments(root: Any, findings: list[Finding]) -> None:
    import lxml.etree

    outside = [*root.itersiblings(preceding=True), *root.itersiblings()]  # before/after <html>
    for comment in [c for c in outside if c.tag is lxml.etree.Comment] + list(root.iter(lxml.etree.Comment)):
        text = _clip(comment.text or "")
        if text:
            findings.append(Finding("html_comment", text, "HTML comment (not shown to readers)"))
        if comment.getparent() is not None:
            _remove(comment)


def _strip_scripts(root: Any, findings: list[Finding]) -> None:
    for element in list(root.iter(*_SCRIPT_TAGS)):
        text = _clip(element.text_content())
        if text and element.tag != "style":
            findings.append(Finding("script", text, f"<{element.tag}> content (not shown to readers)"))
        _remove(element)


def _strip_hidden_elements(root: Any, findings: list[Finding]) -> None:
    hidden: list[tuple[Any, str]] = []
    covered: set[Any] = set()  # an element inside a hidden one goes with it, reported once
    for element in root.iter():
        if not isinstance(element.tag, str) or any(a in covered for a in element.iterancestors()):
            continue
        reason = _hidden_reason(element)
        if reason is not None:
            hidden.append((element, reason))
            covered.add(element)
    for element, reason in hidden:
        text = _clip(element.text_content())
        if text:
            findings.append(Finding("hidden_html", text, reason))
        _remove(element)


def strip_hidden_html(html: str) -> tuple[str, list[Finding]]:
    """Raw HTML without the parts a reader never sees, and what was removed.

    Removes comments (``html_comment``), ``<script>``/``<noscript>``/``<template>`` (``script``)
    and ``<style>`` (silently), and elements hidden by the ``hidden`` attribute,
    ``aria-hidden="true"`` or an inline ``display:none``, ``visibility:hidden``, ``font-size:0``
    or ``opacity:0`` (``hidden_html``). A removed element's tail text is kept. Only findings
    with text are reported. Returns serialized HTML with its doctype, head and body, for
    unstructured's HTML partitioner; input lxml cannot parse at all comes back unchanged.
    """
    import lxml.html

    root = _parse_html(html)
    if root is None:
        return html, []
    findings: list[Finding] = []
    _strip_comments(root, findings)
    _strip_scripts(root, findings)
    _strip_hidden_elements(root, findings)
    doctype = root.getroottree().docinfo.doctype or None
    return lxml.html.tostring(root, encoding="unicode", doctype=doctype), findings
