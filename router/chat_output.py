"""One choice's text read as its OutputPlan says (router/structured.py): content, reasoning and tool calls,
as OpenAI chat deltas. A streamed choice sends the deltas as they come; a whole one is the same deltas
assembled (`assemble`), so the two always agree."""

import json
from typing import Any

from router.reasoning import get_reasoning_parser
from router.structured import OutputPlan
from router.tool_parsers import get_parser, new_call_id


class ChoiceReader:
    def __init__(self, plan: OutputPlan):
        self.plan = plan
        self.calls = 0  # tool calls sent
        self._reasoning = get_reasoning_parser(plan.reasoning_parser).streamer() if plan.reasoning_parser else None
        self._tools = get_parser(plan.tool_parser).streamer() if plan.tool_mode == "auto" else None
        self._held: list[str] = []  # required: the JSON list of calls, read whole at the end

    def feed(self, text: str) -> list[dict[str, Any]]:
        mode = self.plan.tool_mode
        if mode == "named":  # the text is the function's arguments
            out = []
            if not self.calls:
                self.calls = 1
                out.append(_call(0, new_call_id(), self.plan.function, ""))
            if text:
                out.append({"tool_calls": [{"index": 0, "function": {"arguments": text}}]})
            return out
        if mode == "required":
            self._held.append(text)
            return []
        if not text:
            return []
        return self._through_tools(self._reasoning.feed(text) if self._reasoning else [{"content": text}])

    def finish(self) -> list[dict[str, Any]]:
        """What was held back, once the choice has ended."""
        if self.plan.tool_mode == "required":
            text = "".join(self._held)
            try:
                calls = json.loads(text)
                out = [_call(i, new_call_id(), c["name"], json.dumps(c["parameters"], ensure_ascii=False))
                       for i, c in enumerate(calls)]
            except (ValueError, TypeError, KeyError, RecursionError):  # cut off (length): what there is, as content
                return [{"content": text}] if text else []
            self.calls = len(out)
            return out
        out = self._through_tools(self._reasoning.finish()) if self._reasoning else []
        if self._tools is not None:
            out += self._first_call_only(self._tools.finish())
            self.calls = min(self._tools.calls, 1) if self.plan.single_call else self._tools.calls
        return out

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if self.calls and reason == "stop" else reason

    def _through_tools(self, deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self._tools is None:
            return deltas
        out = []
        for d in deltas:
            if "content" in d:
                out += self._first_call_only(self._tools.feed(d["content"]))
            else:
                out.append(d)
        self.calls = min(self._tools.calls, 1) if self.plan.single_call else self._tools.calls
        return out

    def _first_call_only(self, deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Without parallel_tool_calls the model may still write several: the client gets the first."""
        if not self.plan.single_call:
            return deltas
        return [d for d in deltas if not any(c["index"] > 0 for c in d.get("tool_calls", ()))]


def _call(index: int, call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"tool_calls": [{"index": index, "id": call_id, "type": "function",
                            "function": {"name": name, "arguments": arguments}}]}


def assemble(deltas: list[dict[str, Any]]) -> dict[str, Any]:
    """The assistant message the deltas make up."""
    content, reasoning, calls = [], [], {}
    for d in deltas:
        if d.get("content"):
            content.append(d["content"])
        if d.get("reasoning_content"):
            reasoning.append(d["reasoning_content"])
        for c in d.get("tool_calls", ()):
            call = calls.setdefault(c["index"], {"id": None, "type": "function",
                                                 "function": {"name": None, "arguments": ""}})
            if "id" in c:
                call["id"] = c["id"]
            fn = c.get("function", {})
            if fn.get("name"):
                call["function"]["name"] = fn["name"]
            call["function"]["arguments"] += fn.get("arguments", "")
    message: dict[str, Any] = {"role": "assistant", "content": "".join(content) if content else None}
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    return message
