"""The `rlhf` command line: serve the stack, run the demo, and talk to the services.

Client commands import only grpc, protobuf, rich and the generated code; torch, transformers and the
database stack load only in the commands that run services (serve, demo).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

# gRPC's own log lines (a failed TLS handshake logs one at INFO) would come before our one line of error:
# errors only, unless the user asks for more. Set before gRPC loads.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from rlhf.sdk.cli.common import HelpFormatter, apply_security_flags  # noqa: E402
from rlhf.sdk.cli.errors import CliError, exit_on_interrupt  # noqa: E402

EXAMPLES = """\
start the stack in one terminal, then use it from another:
  rlhf serve all
  rlhf feedback submit my_agent --prompt "Hi?" --response "Hello!" --score 0.8
  rlhf feedback import my_agent ratings.jsonl
  rlhf train my_agent            # needs at least 10 feedback items
  rlhf policies list my_agent
  rlhf deploy my_agent v1=1
  rlhf generate my_agent "What did you see today?" --stream
`rlhf COMMAND --help` shows each command's flags and their defaults; --json prints JSON for scripts."""


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("rlhf-platform")
    except Exception:  # noqa: BLE001 - not installed as a distribution (a source checkout on sys.path)
        from rlhf import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    from rlhf.sdk.cli import feedback, serving, stack, training

    parser = argparse.ArgumentParser(
        prog="rlhf",
        description="RLHF platform: serve the stack and use it.",
        epilog=EXAMPLES,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    stack.register(sub)
    feedback.register(sub)
    training.register(sub)
    serving.register(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Parse, run, and turn every error into one line on stderr and an exit code (errors.py lists them)."""
    args = build_parser().parse_args(argv)
    # serve and demo stop their services on Ctrl-C (KeyboardInterrupt unwinds them); a client command ends at once
    interrupts = contextlib.nullcontext() if args.command in ("serve", "demo") else exit_on_interrupt()
    try:
        with interrupts:
            apply_security_flags(args)
            code = args.func(args)
            sys.stdout.flush()
    except CliError as error:
        sys.stdout.flush()
        print(f"rlhf: error: {error}", file=sys.stderr)
        code = error.code
    except ModuleNotFoundError as error:
        # A client-only install (no server extra) running a command that needs it: say what to install.
        from rlhf.sdk.extras import missing_extra_message

        message = missing_extra_message(args.command, error)
        if message is None:
            raise
        print(f"rlhf: error: {message}", file=sys.stderr)
        code = 2
    except BrokenPipeError:
        # The reader went away (`rlhf ... | head`): stop quietly, as other Unix tools do on SIGPIPE.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = 141
    except KeyboardInterrupt:
        print("rlhf: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
