"""`pdserve keys create|list|revoke` and `pdserve usage`: the admin API of a running router, from a shell.

    pdserve keys create --name team-a --rpm 600 --tpm 200000
    pdserve keys list
    pdserve keys revoke KEY_ID
    pdserve usage [--key KEY_ID] [--hours 24]

The router's URL and admin token come from --router/--admin-token or $PDSERVE_ROUTER_URL/$PDSERVE_ADMIN_TOKEN.
"""

import argparse
import json
import os

import httpx


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--router", default=os.environ.get("PDSERVE_ROUTER_URL", "http://127.0.0.1:8000"))
    p.add_argument("--admin-token", default=os.environ.get("PDSERVE_ADMIN_TOKEN"))


def _call(a: argparse.Namespace, method: str, path: str, **kw) -> int:
    if not a.admin_token:
        print("pdserve: the admin API needs a token: --admin-token or $PDSERVE_ADMIN_TOKEN")
        return 2
    try:
        r = httpx.request(method, a.router.rstrip("/") + path, headers={"authorization": f"Bearer {a.admin_token}"},
                          timeout=30, **kw)
    except httpx.HTTPError as e:
        print(f"pdserve: cannot reach the router at {a.router}: {e}")
        return 1
    body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {"text": r.text}
    print(json.dumps(body, indent=2))
    return 0 if r.is_success else 1


def add_commands(sub) -> None:
    keys = sub.add_parser("keys", help="create, list and revoke API keys (admin API)")
    ks = keys.add_subparsers(dest="keys_command", required=True)
    c = ks.add_parser("create", help="a new key; it is printed once")
    c.add_argument("--name", required=True)
    c.add_argument("--models", default="*", help="comma-separated models the key may use (default: all)")
    c.add_argument("--rpm", type=int, default=None, help="requests per minute")
    c.add_argument("--tpm", type=int, default=None, help="tokens per minute (prompt + max output)")
    c.add_argument("--max-concurrent", type=int, default=None)
    c.add_argument("--priority", type=int, default=0,
                   help="its requests' scheduling priority: lower values go first (a batch key: e.g. 10)")
    _common(c)
    c.set_defaults(run=lambda a: _call(a, "POST", "/admin/keys", json={
        "name": a.name, "models": a.models.split(","), "rpm": a.rpm, "tpm": a.tpm, "max_concurrent": a.max_concurrent,
        "priority": a.priority}))
    ls = ks.add_parser("list", help="every key (never the keys themselves)")
    _common(ls)
    ls.set_defaults(run=lambda a: _call(a, "GET", "/admin/keys"))
    rv = ks.add_parser("revoke", help="revoke a key by its id (takes effect within a second)")
    rv.add_argument("key_id")
    _common(rv)
    rv.set_defaults(run=lambda a: _call(a, "DELETE", f"/admin/keys/{a.key_id}"))
    u = sub.add_parser("usage", help="requests and tokens per key, model and hour (admin API)")
    u.add_argument("--key", default=None, help="one key id (default: all)")
    u.add_argument("--hours", type=int, default=24)
    _common(u)
    u.set_defaults(run=lambda a: _call(a, "GET", "/admin/usage", params={"hours": a.hours,
                                                                           **({"key_id": a.key} if a.key else {})}))
