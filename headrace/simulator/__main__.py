"""python -m headrace.simulator [--port 9100] [--rpm 60] [--limiter rolling] [--faults 500,529,hang] ...

Flags override --config-json, which overrides SimConfig's defaults.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import ValidationError

from headrace.simulator.config import SimConfig
from headrace.simulator.server import serve


def _help(field: str) -> str:
    return SimConfig.model_fields[field].description or field


def _optional_int(raw: str) -> int | None:
    return None if raw.lower() in ("none", "unlimited", "") else int(raw)


def _optional_float(raw: str) -> float | None:
    return None if raw.lower() in ("none", "") else float(raw)


def _fault_list(raw: str) -> list[str]:
    return [item.strip() for item in raw.split(",") if item.strip()]


def _bool(raw: str) -> bool:
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {raw!r}")


_FIELD_TYPES: dict[str, Callable[[str], Any]] = {
    "latency_ms": float,
    "latency_jitter_ms": float,
    "first_chunk_share": float,
    "seed": int,
    "rpm": _optional_int,
    "tpm": _optional_int,
    "anthropic_rpm": _optional_int,
    "itpm": _optional_int,
    "otpm": _optional_int,
    "otpm_counts": str,
    "limiter": str,
    "window_s": float,
    "sub_window_s": _optional_float,
    "fault_rate": float,
    "faults": _fault_list,
    "hang_s": float,
    "min_output_tokens": int,
    "max_output_tokens": int,
    "require_api_key": _bool,
    "anthropic_cache_min_tokens": int,
    "openai_cache_min_tokens": int,
    "prompt_cache_entries": int,
}

_SWITCHES = ("echo_in_errors",)  # flags without a value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m headrace.simulator", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9100, help="port to bind (default 9100)")
    parser.add_argument("--config-json", help="a whole or partial SimConfig as JSON")
    for field, parse in _FIELD_TYPES.items():
        flag = "--" + field.replace("_", "-")
        # SUPPRESS keeps absent flags out of the namespace, so "--rpm none" can clear a JSON limit.
        parser.add_argument(flag, dest=field, type=parse, default=argparse.SUPPRESS, help=_help(field))
    parser.add_argument(
        "--no-require-api-key",
        dest="require_api_key",
        action="store_false",
        default=argparse.SUPPRESS,
        help="accept calls without a key",
    )
    parser.add_argument(
        "--echo-in-errors",
        dest="echo_in_errors",
        action="store_true",
        default=argparse.SUPPRESS,
        help=_help("echo_in_errors"),
    )
    return parser


def config_from_args(args: argparse.Namespace) -> SimConfig:
    values: dict[str, Any] = json.loads(args.config_json) if args.config_json else {}
    values.update(
        {field: value for field, value in vars(args).items() if field in _FIELD_TYPES or field in _SWITCHES}
    )
    return SimConfig.model_validate(values)


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except (ValidationError, ValueError) as error:
        parser.error(str(error))
    serve(config, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
