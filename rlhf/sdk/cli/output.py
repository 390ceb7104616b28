"""How the command line prints: human tables (rich) by default, machine JSON with --json; notes on stderr.

Results go to stdout, everything else (progress, notes, errors) to stderr, so `--json` output pipes cleanly.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from google.protobuf.message import Message
from rich import box
from rich.console import Console
from rich.table import Table

from rlhf.sdk.protojson import message_to_dict


def _console(stream) -> Console:
    # Piped output keeps whole rows (no wrapping at 80 columns), so scripts can split lines.
    terminal = stream.isatty()
    return Console(file=stream, width=None if terminal else 100_000, soft_wrap=not terminal, highlight=False)


def stdout() -> Console:
    return _console(sys.stdout)


def stderr() -> Console:
    return _console(sys.stderr)


def note(text: str) -> None:
    """A line for the person at the terminal (stderr: not part of the result)."""
    stderr().print(text, markup=False)


def as_dict(value: Message | dict[str, Any]) -> dict[str, Any]:
    return message_to_dict(value) if isinstance(value, Message) else value


def print_json(value: Any) -> None:
    """Messages (also inside lists and dicts) through message_to_dict: every field, int64 as numbers."""
    print(json.dumps(_plain(value), indent=2))


def _plain(value: Any) -> Any:
    if isinstance(value, Message):
        return message_to_dict(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def flatten(value: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dicts as dotted keys (metrics.reward_mean), in order."""
    rows: list[tuple[str, Any]] = []
    for key, item in value.items():
        name = f"{prefix}{key}"
        if isinstance(item, dict) and item:
            rows.extend(flatten(item, f"{name}."))
        else:
            rows.append((name, item))
    return rows


def show_object(value: Message | dict[str, Any], as_json: bool, title: str = "") -> None:
    """One object: a two-column field/value table, or its JSON."""
    data = as_dict(value)
    if as_json:
        print_json(data)
        return
    table = Table(title=title or None, show_header=False, box=None, pad_edge=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for key, item in flatten(data):
        table.add_row(key, format_value(item))
    _print_table(table)


def show_table(
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    as_json: bool,
    objects: list[Any],
    empty: str = "",
) -> None:
    """A list: a table of `rows` under `columns`, or (--json) the JSON array of `objects`. `empty` is said
    on stderr when there are no rows (the table keeps its header, so scripts still see the columns)."""
    if as_json:
        print_json(list(objects))
        return
    console = stdout()
    table = Table(box=box.SIMPLE_HEAD if console.is_terminal else None, pad_edge=False, header_style="bold")
    for column in columns:
        table.add_column(column, no_wrap=not console.is_terminal)
    count = 0
    for row in rows:
        table.add_row(*(format_value(item) for item in row))
        count += 1
    _print_table(table)
    if not count and empty:
        note(empty)


def _print_table(table: Table) -> None:
    console = stdout()
    if console.is_terminal:
        console.print(table)
        return
    # Piped: no cell padding at line ends, so scripts split and compare lines as they are.
    with console.capture() as captured:
        console.print(table)
    sys.stdout.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))


def format_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if value and (abs(value) < 1e-3 or abs(value) >= 1e6) else f"{value:.3f}"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(format_value(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k} {format_value(v)}" for k, v in value.items())
    return str(value)


def timestamp(message: Any, field: str) -> str:
    """A Timestamp field as 'YYYY-MM-DD HH:MM:SS' (UTC), or '' when unset."""
    if not message.HasField(field):
        return ""
    return f"{getattr(message, field).ToDatetime(tzinfo=dt.timezone.utc):%Y-%m-%d %H:%M:%S}"


def short(text: str, width: int = 48) -> str:
    """One line of at most `width` characters (tables of long prompts stay readable)."""
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"
