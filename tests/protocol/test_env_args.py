"""Flags whose defaults come from PDSERVE_* variables: converted by the flag's type and held to its choices."""

import pytest

from protocol.env_args import EnvDefaultsParser


def _parser() -> EnvDefaultsParser:
    ap = EnvDefaultsParser(prog="t")
    ap.add_argument("--transport", default="host", choices=["host", "nixl"])
    ap.add_argument("--port", type=int, default=1)
    return ap


def test_an_environment_default_is_converted_and_used(monkeypatch):
    monkeypatch.setenv("PDSERVE_TRANSPORT", "nixl")
    monkeypatch.setenv("PDSERVE_PORT", "8100")
    a = _parser().parse_args([])
    assert (a.transport, a.port) == ("nixl", 8100)


def test_an_environment_default_outside_the_choices_is_refused(monkeypatch, capsys):
    monkeypatch.setenv("PDSERVE_TRANSPORT", "nccl")
    with pytest.raises(SystemExit):
        _parser()
    assert "PDSERVE_TRANSPORT='nccl': not one of host, nixl" in capsys.readouterr().err
