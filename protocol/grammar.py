"""Grammars for structured outputs, in the form llguidance builds its matchers from.

A request's grammar is (kind, source): "json_object" (any JSON object; source unused), "json_schema" (a JSON
Schema, as JSON text), "regex", "choice" (a JSON list of strings: the output is one of them) or "grammar" (a
Lark or GBNF grammar). The router checks it here (`problem`: torch-free, no tokenizer, cached) and refuses
one llguidance cannot build with a 400 before the request is admitted; the engine builds each request's
matcher from `to_llguidance` (engine/guided.py).

JSON is generated in one style, `{"key": value, "key": value}` (json.dumps' separators, no other
whitespace): with whitespace free between tokens a small model may emit it without end, and a fixed style
lets the grammar end at the closing brace, so the request stops there without sampling an end-of-text.
"""

import functools
import json

import llguidance

KINDS = ("json_object", "json_schema", "regex", "choice", "grammar")
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def to_llguidance(kind: str, source: str) -> str:
    """llguidance's grammar for (kind, source); ValueError when it cannot be built."""
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}', JSON_STYLE)
    if kind == "json_schema":
        return llguidance.LLMatcher.grammar_from_json_schema(source, JSON_STYLE)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(source)
    if kind == "choice":
        choices = json.loads(source)
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
            raise ValueError("choice must be a non-empty list of non-empty strings")
        return llguidance.grammar_from("choice", source)
    if kind == "grammar":
        return llguidance.grammar_from("grammar", source)
    raise ValueError(f"unknown grammar kind {kind!r}; one of {', '.join(KINDS)}")


@functools.lru_cache(maxsize=1024)
def problem(kind: str, source: str) -> str | None:
    """Why llguidance cannot build this grammar, or None when it can (cached by grammar)."""
    try:
        message = llguidance.LLMatcher.validate_grammar(to_llguidance(kind, source))
    except (ValueError, TypeError) as e:  # malformed JSON, a refused choice list, an unknown kind
        return str(e)
    return message or None
