"""A model's chat template, rendered as transformers renders it (sandboxed jinja2, trim_blocks, lstrip_blocks),
and, where the template only copies a message's content into its output, from a cached skeleton.

Rendering a template runs the jinja2 program each time: 12 us for one user message on the CI machine, but
~200 us when the CPU has been idle for 20 ms (a router at a modest request rate: everything after a pause runs
5-10x slower, docs/architecture.md "Router hot path"), the largest single cold cost before tokenizing. Most
templates decide their output from the roles and the number of messages and paste each content in as it is
(ChatML: `'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'`). For those, the
output of a conversation's shape (its messages without their contents, add_generation_prompt) is rendered
once, with a marker in place of each content, and later conversations of that shape are the skeleton's text
with their contents joined in: one dict lookup and a join.

A shape gets a skeleton only when its probe render shows that the template did nothing with a content but
output it whole. The probe renders through a second compiled copy of the template with a marker in place of
each content: a str whose every method and operator, but concatenation and str(), aborts the probe (a test
`if '</think>' in content`, `content | trim`, `content.split(...)`, a comparison, len(), iteration, slicing,
hashing). Concatenation (`+`, `~`, the `join` filter, str.join) yields another marker, so a filter applied to
the result aborts too; `%` with a marker aborts. A transformation that copies the text in C without calling
its methods (`tojson`, escaping, urlencode) changes the marker, which starts and ends with whitespace and
holds a tag, escapes and NULs: the probe checks that each marker came through byte for byte and that no
trace of one (a NUL, the tag in any case) is left elsewhere. Templates using filters that parse a text in C
(int, float, wordcount, filesizeformat) or the clock (strftime_now) never get skeletons. Anything else
(contents that are not str, fields that cannot be a dict key, tools) is rendered by jinja2 as always.
"""

import json
import re
from collections import OrderedDict
from collections.abc import Callable, Collection
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

SKELETONS = 4096  # shapes whose skeleton (or whose not having one) is remembered, LRU
# Filters that read a text in C, bypassing the marker's methods: a template using one never gets skeletons.
_C_READING_FILTERS = frozenset({"int", "float", "wordcount", "filesizeformat"})
_SAFE = frozenset({"__new__", "__init__", "__getattribute__", "__str__", "__add__", "__radd__", "__class__",
                   "__init_subclass__", "__subclasshook__", "__setattr__", "__delattr__", "__dir__", "__reduce__",
                   "__reduce_ex__", "__getnewargs__", "__sizeof__", "__getstate__"})


class ChatTemplateError(ValueError):
    """The messages could not be rendered with the model's chat template."""


class _Looked(Exception):
    """A probe render looked at a content (the template depends on it): this shape gets no skeleton."""


_TAG = "pdsKeL"  # in every marker: found anywhere else in a probe's output, a marker was transformed


def _marker(i: int) -> str:
    return f" \n\t<&'\"\\\x00{_TAG}{i}é\x00\n "


_MARKER = re.compile(re.escape(" \n\t<&'\"\\\x00" + _TAG) + "(\\d+)" + re.escape("é\x00\n "))


def _trip(*_: Any, **__: Any) -> Any:
    raise _Looked


class _Probe(str):
    """A content in a probe render. Concatenation keeps the taint; anything else that reads it aborts."""

    def __str__(self) -> str:
        return self

    def __add__(self, other: Any) -> "_Probe":
        return _Probe(str.__add__(self, other))

    def __radd__(self, other: Any) -> "_Probe":
        if not isinstance(other, str):
            return NotImplemented
        return _Probe(str.__add__(other, self))


for _name in dir(str):
    if _name not in _SAFE and callable(getattr(str, _name)):
        setattr(_Probe, _name, _trip)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _never_cached(env: jinja2.Environment, source: str) -> bool:
    ast = env.parse(source)
    if any(f.name in _C_READING_FILTERS for f in ast.find_all(jinja2.nodes.Filter)):
        return True
    return any(n.name == "strftime_now" for n in ast.find_all(jinja2.nodes.Name))


def _has_probe(x: Any) -> bool:
    if isinstance(x, _Probe):
        return True
    if isinstance(x, (list, tuple)):
        return any(map(_has_probe, x))
    return isinstance(x, dict) and any(map(_has_probe, x.values()))


def _taint_join(join: Any) -> Any:
    """A join (of `~`, or the `join` filter) that yields a marker where it joined one."""
    def joined(*args: Any, **kwargs: Any) -> Any:
        args = tuple(list(a) if not isinstance(a, (str, dict)) and hasattr(a, "__iter__") else a for a in args)
        out = join(*args, **kwargs)
        return _Probe(out) if isinstance(out, str) and (_has_probe(args) or _has_probe(kwargs)) else out

    joined.__dict__.update(join.__dict__)  # jinja2's pass_eval_context mark
    return joined


class _ProbeEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"%"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if _has_probe(left) or _has_probe(right):
            raise _Looked
        return super().call_binop(context, operator, left, right)

    def call(self, context: Any, obj: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(getattr(obj, "__self__", None), str) and (_has_probe(args) or _has_probe(kwargs)):
            if getattr(obj, "__name__", "") != "join":  # 'x'.startswith(content), 'x'.replace(content, ...)
                raise _Looked
            return _Probe(super().call(context, obj, *args, **kwargs))
        return super().call(context, obj, *args, **kwargs)


def _environment(probe: bool) -> jinja2.Environment:
    env = (_ProbeEnvironment if probe else ImmutableSandboxedEnvironment)(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    if probe:
        env.filters["join"] = _taint_join(env.filters["join"])
    return env


class ChatTemplate:
    def __init__(self, source: str, bos_token: str, eos_token: str, skeletons: int = SKELETONS):
        env = _environment(probe=False)
        self.source = source
        self.template = env.from_string(source)
        self.bos_token, self.eos_token = bos_token, eos_token
        self.max_skeletons = 0 if _never_cached(env, source) else skeletons
        self._probe_template = None
        if self.max_skeletons:
            self._probe_template = _environment(probe=True).from_string(source)
            module = self._probe_template.root_render_func.__globals__  # the compiled template's `~`
            module["str_join"], module["markup_join"] = _taint_join(module["str_join"]), _taint_join(module["markup_join"])
        # shape -> the skeleton's pieces (text, or the index of the message whose content goes there), or None
        # where the shape's probe showed the template depends on a content
        self._skeletons: OrderedDict[tuple, tuple[str | int, ...] | None] = OrderedDict()
        # shape -> its skeleton with each text piece cut at special tokens (render_parts), or None
        self._cut: dict[tuple, tuple | None] = {}
        self._firsts = ""

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
               tools: list[dict[str, Any]] | None = None) -> str:
        if tools is None and self.max_skeletons:
            shape = _shape(messages, add_generation_prompt)
            pieces = None if shape is None else self._pieces(shape, messages, add_generation_prompt)
            if pieces is not None:
                return "".join([p if p.__class__ is str else messages[p]["content"] for p in pieces])
        return self._render(messages, add_generation_prompt, tools)

    def _pieces(self, shape: tuple, messages: list[dict[str, Any]],
                add_generation_prompt: bool) -> tuple[str | int, ...] | None:
        """The shape's skeleton, probed if new; None where it has none."""
        try:
            pieces = self._skeletons[shape]
        except KeyError:
            return self._probe(messages, add_generation_prompt, shape)
        except TypeError:  # a field that cannot be part of a key (a list of tool calls)
            return None
        self._skeletons.move_to_end(shape)
        return pieces

    def render_parts(self, messages: list[dict[str, Any]], split: Callable[[str], list[str | int]],
                     specials: Collection[str]) -> list[str | int] | None:
        """split(render(messages)) (a tokenizer's cut at its special tokens, `specials`) from the skeleton, its
        text pieces cut once: the contents are neither joined into a text nor searched by the regex, only for
        the first characters of the specials. None where that could differ (a content holding such a
        character, a piece of text ending in the start of a special or starting with the end of one) or the
        shape has no skeleton."""
        shape = _shape(messages, True) if self.max_skeletons else None
        if shape is None:
            return None
        try:
            cut = self._cut[shape]
        except KeyError:
            cut = self._cut_skeleton(shape, self._pieces(shape, messages, True), split, specials)
        except TypeError:  # a field that cannot be part of a key
            return None
        if cut is None:
            return None
        firsts = self._firsts
        out: list[str | int] = []
        for piece in cut:
            if piece.__class__ is int:
                content = messages[piece]["content"]
                for c in firsts:
                    if c in content:
                        return None
                if not content:
                    continue
                if out and out[-1].__class__ is str:
                    out[-1] += content
                else:
                    out.append(content)
                continue
            for x in piece:
                if x.__class__ is str and out and out[-1].__class__ is str:
                    out[-1] += x
                else:
                    out.append(x)
        return out

    def _cut_skeleton(self, shape: tuple, pieces: tuple[str | int, ...] | None,
                      split: Callable[[str], list[str | int]], specials: Collection[str]) -> tuple | None:
        cut = None
        if pieces is not None and all(not (p.__class__ is str and _may_straddle(p, specials)) for p in pieces):
            cut = tuple(p if p.__class__ is int else tuple(split(p)) for p in pieces)
        self._firsts = "".join(sorted({t[0] for t in specials if t}))
        self._cut[shape] = cut  # a shape's skeleton never changes: kept even once the skeleton is evicted
        if len(self._cut) > self.max_skeletons:
            self._cut.pop(next(iter(self._cut)))
        return cut

    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool,
                tools: list[dict[str, Any]] | None, template: jinja2.Template | None = None) -> str:
        try:
            return (template or self.template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        tools=tools, bos_token=self.bos_token, eos_token=self.eos_token)
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"chat template failed: {e}") from e

    def _probe(self, messages: list[dict[str, Any]], add_generation_prompt: bool,
               shape: tuple) -> tuple[str | int, ...] | None:
        """This shape's skeleton, remembered; None (also remembered) where the template depends on a content or
        the probe failed otherwise (e.g. raise_exception on this shape: jinja2 renders it, and raises, for real)."""
        probes = [{**m, "content": _Probe(_marker(i))} for i, m in enumerate(messages)]
        try:
            text = str.__str__(self._render(probes, add_generation_prompt, None, self._probe_template))
        except Exception:  # noqa: BLE001 - _Looked, or any error the real render will report
            pieces = None
        else:
            pieces = _skeleton(text, len(messages))
        self._skeletons[shape] = pieces
        if len(self._skeletons) > self.max_skeletons:
            self._skeletons.popitem(last=False)
        return pieces


def _shape(messages: list[dict[str, Any]], add_generation_prompt: bool) -> tuple | None:
    """What a template may look at besides the contents: each message's other fields, in order. None where a
    content is not a str."""
    shape: list = [add_generation_prompt]
    for m in messages:
        if m.get("content").__class__ is not str:
            return None
        shape.append(tuple([kv for kv in m.items() if kv[0] != "content"]))
    return tuple(shape)


def _may_straddle(text: str, specials: Collection[str]) -> bool:
    """Whether a special token could begin at the end of `text` and run on into what follows, or end at its
    start having begun before it."""
    for t in specials:
        for k in range(1, len(t)):
            if text.endswith(t[:k]) or text.startswith(t[-k:]):
                return True
    return False


def _skeleton(text: str, n: int) -> tuple[str | int, ...] | None:
    """The probe's output as text pieces and message indices; None unless every marker came through whole."""
    pieces: list[str | int] = []
    pos = 0
    for m in _MARKER.finditer(text):
        i = int(m.group(1))
        if i >= n:
            return None
        if m.start() > pos:
            pieces.append(text[pos : m.start()])
        pieces.append(i)
        pos = m.end()
    if pos < len(text):
        pieces.append(text[pos:])
    tag = _TAG.lower()
    if any("\x00" in p or tag in p.lower() for p in pieces if isinstance(p, str)):  # a marker changed, output
        return None
    return tuple(pieces)
