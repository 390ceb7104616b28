"""What every command's parser shares: help with defaults, service address flags, --json, config files."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
from collections.abc import Callable
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from rlhf.runtime.config import service_address
from rlhf.sdk.cli.errors import CliError

Command = Callable[[argparse.Namespace], int]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every flag's help shows its default; descriptions keep their line breaks (examples)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        # An on/off flag (default off) or an unset option says nothing more; a help text that already
        # names its default ("default: ...") is not told twice.
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_parser(parent: Any, name: str, help_text: str, description: str = "") -> argparse.ArgumentParser:
    return parent.add_parser(name, help=help_text, description=description or help_text, formatter_class=HelpFormatter)


def subcommands(parser: argparse.ArgumentParser, title: str) -> Any:
    return parser.add_subparsers(dest="action", required=True, metavar="ACTION", title=title)


def client_parser(
    parent: Any, name: str, help_text: str, func: Command, services: list[str], description: str = ""
) -> argparse.ArgumentParser:
    """A command that talks to `services`: an address flag for each (default from RLHF_<SERVICE>_ADDR) and
    --json."""
    parser = add_parser(parent, name, help_text, description)
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")
    for service in services:
        parser.add_argument(
            f"--{service}-addr",
            default=service_address(service),
            metavar="HOST:PORT",
            help=f"{service} service address (env RLHF_{service.upper()}_ADDR)",
        )
    security = parser.add_argument_group("security (off unless set; README: Security)")
    security.add_argument("--token", help="bearer token sent on every call (env RLHF_TOKEN)")
    security.add_argument("--tls-ca", metavar="PEM", help="use TLS, trusting this CA (env RLHF_TLS_CA_FILE)")
    security.add_argument("--tls-cert", metavar="PEM", help="client certificate for TLS (env RLHF_TLS_CERT_FILE)")
    security.add_argument("--tls-key", metavar="PEM", help="its private key (env RLHF_TLS_KEY_FILE)")
    parser.set_defaults(func=func, parser=parser)
    return parser


# The security flags and the environment variables every client reads (rlhf.runtime.config.SecurityConfig).
_SECURITY_FLAGS = {
    "token": "RLHF_TOKEN",
    "tls_ca": "RLHF_TLS_CA_FILE",
    "tls_cert": "RLHF_TLS_CERT_FILE",
    "tls_key": "RLHF_TLS_KEY_FILE",
}


def apply_security_flags(args: argparse.Namespace) -> None:
    """Security flags given on the command line win over the environment for this process's clients; a TLS
    file that cannot be read is a CliError naming it."""
    from rlhf.runtime.config import SecurityConfig
    from rlhf.runtime.tls import TlsConfigError, channel_credentials

    for flag, variable in _SECURITY_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            os.environ[variable] = value
    try:
        channel_credentials(SecurityConfig())
    except TlsConfigError as error:
        raise CliError(str(error)) from None


def read_config(path: str, message: Message) -> Message:
    """Fill `message` from a JSON file (proto field names, snake_case or camelCase); every problem is a
    CliError naming the file."""
    file = pathlib.Path(path)
    try:
        text = file.read_text()
    except FileNotFoundError:
        raise CliError(f"config file {path} not found") from None
    except OSError as error:
        raise CliError(f"cannot read config file {path}: {error.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise CliError(f"config file {path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise CliError(f"config file {path} must hold a JSON object of {message.DESCRIPTOR.name} fields")
    known = {f.name for f in message.DESCRIPTOR.fields} | {f.json_name for f in message.DESCRIPTOR.fields}
    unknown = sorted(set(data) - known)
    if unknown:
        raise CliError(
            f"config file {path}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
            f"(a {message.DESCRIPTOR.name} has: {', '.join(f.name for f in message.DESCRIPTOR.fields)})"
        )
    try:
        json_format.ParseDict(data, message)
    except json_format.ParseError as error:
        raise CliError(f"config file {path}: {error}") from None
    return message
