"""JSON Schemas of the shapes applications ask for (nested objects, arrays, enums, required fields, numbers
with ranges, patterns, optional fields): bench.structured builds them; tests/engine/test_guided.py and
tests/pdserve_cli/test_application_api.py check every answer against them. Strings, arrays and integers are
bounded, so a small model's answer ends (unbounded, the demo model writes digits until max_tokens)."""

S = {"type": "string", "maxLength": 24}


def _obj(properties: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": properties, "required": list(properties) if required is None else required,
            "additionalProperties": False}


SCHEMAS: list[dict] = [
    _obj({"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
    _obj({"city": S, "country": S, "population": {"type": "integer", "minimum": 0, "maximum": 10**9}}),
    _obj({"answer": {"type": "string", "enum": ["yes", "no", "maybe"]}}),
    _obj({"score": {"type": "number", "minimum": 0, "maximum": 10}, "reason": S}),
    _obj({"tags": {"type": "array", "items": S, "minItems": 1, "maxItems": 3}}),
    _obj({"person": _obj({"first": S, "last": S}), "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"}}),
    _obj({"items": {"type": "array", "maxItems": 3, "items": _obj({"sku": S, "qty": {"type": "integer", "minimum": 1,
                                                                                     "maximum": 99}})}}),
    _obj({"ok": {"type": "boolean"}, "count": {"type": "integer", "minimum": -5, "maximum": 5}}),
    _obj({"title": S, "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
          "genre": {"enum": ["drama", "comedy", "action", "documentary"]}}),
    _obj({"lat": {"type": "number", "minimum": -90, "maximum": 90}, "lon": {"type": "number", "minimum": -180,
                                                                            "maximum": 180}}),
    _obj({"colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3}}),
    _obj({"user": _obj({"id": {"type": "integer", "minimum": 1, "maximum": 9999}, "roles": {"type": "array", "maxItems": 2,
                                                                             "items": {"enum": ["admin", "dev"]}}})}),
    _obj({"name": S, "nickname": S}, required=["name"]),
    _obj({"date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"}, "event": S}),
    _obj({"matrix": {"type": "array", "maxItems": 2, "items": {"type": "array", "maxItems": 2,
                                                               "items": {"type": "integer", "minimum": 0, "maximum": 9}}}}),
    _obj({"status": {"const": "done"}, "steps": {"type": "integer", "minimum": 1, "maximum": 10}}),
    _obj({"price": {"type": "number", "exclusiveMinimum": 0, "maximum": 1000}, "currency": {"enum": ["USD", "EUR"]}}),
    _obj({"a": _obj({"b": _obj({"c": {"type": "integer", "minimum": 0, "maximum": 3}})})}),
    _obj({"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 100}, {"type": "null"}]}}),
    _obj({"words": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,6}$"}, "minItems": 2,
                    "maxItems": 4}}),
    {"type": "array", "items": _obj({"k": {"type": "integer", "minimum": 0, "maximum": 9}}), "minItems": 1,
     "maxItems": 2},
    _obj({"level": {"type": "integer", "enum": [1, 2, 3]}, "label": S}),
]
