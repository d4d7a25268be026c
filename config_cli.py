"""Config resolution for a dataclass of settings: CLI flag > shell environment > .env file >
the dataclass default. Generic plumbing: it knows nothing of GRPO.

Every field `some_name` is the flag `--some-name` and the variable `<PREFIX>SOME_NAME`. Values are
parsed by the field's annotation (bool, int, float, str, `X | None`, `tuple[int, ...]` as a
comma-separated list); a value that does not parse is a ConfigError naming the field and where the
value came from.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import types
import typing

from dotenv import find_dotenv, load_dotenv

from errors import ConfigError


class OneLineParser(argparse.ArgumentParser):
    """argparse that raises ConfigError (one line) instead of printing usage and exiting."""

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(message)


def parse_value(cls: type, name: str, raw: str, source: str = "") -> object:
    """Parse `raw` as the type of field `name` of dataclass `cls`."""
    typ = typing.get_type_hints(cls)[name]
    union = typing.get_origin(typ) in (typing.Union, types.UnionType)
    args = typing.get_args(typ) if union else ()
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), typ) if args else typ
    text = raw.strip()
    if optional and text.lower() in ("", "none", "null"):
        return None
    try:
        if typing.get_origin(base) is tuple:  # tuple[int, ...]: "1, 2,4" -> (1, 2, 4)
            item = typing.get_args(base)[0]
            return tuple(item(x) for x in text.split(",") if x.strip())
        if base is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off", ""):
                return False
            raise ValueError
        if base is int:
            return int(text)
        if base is float:
            value = float(text)
            if not math.isfinite(value):
                raise ValueError
            return value
        return raw
    except ValueError:
        where = f" (from {source})" if source else ""
        kind = "comma-separated ints" if typing.get_origin(base) is tuple else base.__name__
        raise ConfigError(f"{name}: cannot parse {raw!r} as {kind}{where}") from None


def build_parser(
    cls: type, prog: str, description: str, env_prefix: str, aliases: dict[str, str] | None = None
) -> argparse.ArgumentParser:
    """One flag per field; `aliases` maps an extra flag (e.g. "--split") to a field name."""
    aliases = aliases or {}
    types = typing.get_type_hints(cls)
    p = OneLineParser(
        prog=prog, description=description, allow_abbrev=False, argument_default=argparse.SUPPRESS
    )
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        env = env_prefix + f.name.upper()
        if types[f.name] is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=f"env {env}")
        else:
            names = [flag, *(a for a, field in aliases.items() if field == f.name)]
            p.add_argument(
                *names, dest=f.name, metavar="V", help=f"env {env}, default {f.default!r}"
            )
    return p


def layered_values(
    parser: argparse.ArgumentParser, cls: type, argv: list[str] | None, env_prefix: str
) -> dict[str, object]:
    """The fields set explicitly, by .env, the shell environment or the CLI (defaults left out,
    so presets can fill what the user did not set)."""
    # override=False: a variable already set in the shell wins over the .env file.
    load_dotenv(find_dotenv(usecwd=True), override=False)
    values: dict[str, object] = {}
    for f in dataclasses.fields(cls):
        env = env_prefix + f.name.upper()
        if env in os.environ:
            values[f.name] = parse_value(cls, f.name, os.environ[env], env)
    cli = vars(parser.parse_args(sys.argv[1:] if argv is None else argv))
    for name, raw in cli.items():
        flag = "--" + name.replace("_", "-")
        values[name] = raw if isinstance(raw, bool) else parse_value(cls, name, raw, flag)
    return values


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def print_config(cfg) -> None:
    """Every field once, at start (the same dict is saved as resolved_config.json)."""
    print("resolved config:")
    for k, v in dataclasses.asdict(cfg).items():
        print(f"  {k:28s} {v!r}")
