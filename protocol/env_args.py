"""Command-line flags whose defaults come from PDSERVE_* environment variables (Helm sets those), so a
process's one config object is built from flags, environment and chart values in one place."""

import argparse
import os
from typing import Any


class EnvDefaultsParser(argparse.ArgumentParser):
    """--some-flag defaults to $PDSERVE_SOME_FLAG when set (converted by the flag's type)."""

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        long = next((a for a in args if a.startswith("--")), None)
        if long is not None and kwargs.get("action") not in ("append", "store_true", "store_false"):
            value = os.environ.get("PDSERVE_" + long[2:].upper().replace("-", "_"))
            if value is not None:
                kwargs["default"] = kwargs.get("type", str)(value)
                kwargs.pop("required", None)
        return super().add_argument(*args, **kwargs)


def env_list(name: str) -> list[str]:
    """A comma-separated PDSERVE_* list (e.g. worker URLs), empty when unset."""
    value = os.environ.get("PDSERVE_" + name.upper())
    return [v for v in (value or "").split(",") if v]
