"""Run the router: python -m router.main --decode http://127.0.0.1:8101 --prefill http://127.0.0.1:8102"""

import argparse
import logging

import uvicorn

from router.app import create_app
from router.config import RouterConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prefill", action="append", default=[], help="prefill worker URL (repeat)")
    ap.add_argument("--decode", action="append", default=[], help="decode worker URL (repeat)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--policy", default="cache_aware")
    ap.add_argument("--local-prefill-tokens", type=int, default=64)
    ap.add_argument("--redis-url", default=None, help="share routing state with other routers through Redis")
    ap.add_argument("--redis-namespace", default="pdserve")
    ap.add_argument("--log-level", default="warning")
    a = ap.parse_args()
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = RouterConfig(prefill_urls=a.prefill, decode_urls=a.decode, host=a.host, port=a.port, policy=a.policy,
                          local_prefill_tokens=a.local_prefill_tokens, redis_url=a.redis_url,
                          redis_namespace=a.redis_namespace)
    uvicorn.run(create_app(config), host=a.host, port=a.port, log_level=a.log_level)


if __name__ == "__main__":
    main()
