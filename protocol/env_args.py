"""Command-line flags whose defaults come from PDSERVE_* environment variables (Helm sets those), so a
process's one config object is built from flags, environment and chart values in one place."""

import argparse
import os
from typing import Any


class EnvDefaultsParser(argparse.ArgumentParser):
    """--some-flag defaults to $PDSERVE_SOME_FLAG when set (converted by the flag's type, and held to the
    flag's choices as a command-line value is)."""

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        long = next((a for a in args if a.startswith("--")), None)
        if long is not None and kwargs.get("action") not in ("append", "store_true", "store_false"):
            value = os.environ.get("PDSERVE_" + long[2:].upper().replace("-", "_"))
            if value is not None:
                converted = kwargs.get("type", str)(value)
                choices = kwargs.get("choices")
                if choices is not None and converted not in choices:  # argparse checks only what is on the command line
                    self.error(f"PDSERVE_{long[2:].upper().replace('-', '_')}={value!r}: not one of "
                               f"{', '.join(map(str, choices))}")
                kwargs["default"] = converted
                kwargs.pop("required", None)
        return super().add_argument(*args, **kwargs)


def env_list(name: str) -> list[str]:
    """A comma-separated PDSERVE_* list (e.g. worker URLs), empty when unset."""
    value = os.environ.get("PDSERVE_" + name.upper())
    return [v for v in (value or "").split(",") if v]
