"""`rlhf feedback submit | stats | list | delete | import`."""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import pathlib
import sys
from collections.abc import Iterator
from typing import Any

from rlhf.sdk.cli import output
from rlhf.sdk.cli.common import add_parser, client_parser, subcommands
from rlhf.sdk.cli.errors import CliError, connected

KINDS = {"rating": 1, "comparison": 2}  # FeedbackKind numbers (no pb import at parse time)


def cmd_submit(args: argparse.Namespace) -> int:
    from rlhf.sdk.clients import FeedbackClient

    rating = args.score is not None
    if rating and (args.chosen or args.rejected):
        args.parser.error("give either --score (a rating) or --chosen and --rejected (a comparison), not both")
    if rating and not args.response:
        args.parser.error("a rating needs --response (the answer that --score rates)")
    if not rating and not (args.chosen and args.rejected):
        args.parser.error(
            "give --response with --score (a rating in [0, 1]), or --chosen and --rejected (a comparison)"
        )
    if not rating and args.response:
        args.parser.error("--response goes with --score; a comparison takes --chosen and --rejected")
    fields: dict[str, Any] = {"prompt": args.prompt, "run_id": args.run_id, "notes": args.notes}
    if args.request_id:
        fields["request_id"] = args.request_id
    if rating:
        fields.update(response=args.response, score=args.score)
    else:
        fields.update(chosen=args.chosen, rejected=args.rejected)
        if args.margin is not None:
            fields["margin"] = args.margin
    with connected(FeedbackClient(args.feedback_addr)) as client:
        answer = client.submit(args.agent_id, retries=0, **fields)  # a refused connection is said at once
    if args.json:
        output.print_json(answer)
    else:
        kind = f"rating {answer.score:.3f}" if answer.HasField("score") else "comparison"
        again = " (a duplicate of an earlier submission with this request id)" if answer.duplicate else ""
        output.stdout().print(f"stored {kind} as feedback {answer.id} for {answer.agent_id}{again}", markup=False)
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from rlhf.sdk.clients import FeedbackClient

    with connected(FeedbackClient(args.feedback_addr)) as client:
        answer = client.stats(args.agent_id, group_by_policy_version=args.by_version)
    if args.json:
        output.print_json(answer)
        return 0
    columns = ["policy version", "feedback", "ratings", "comparisons", "score mean", "score std", "min", "max"]

    def row(name: str, s: Any) -> list[Any]:
        return [
            name,
            s.feedback_count,
            s.rating_count,
            s.comparison_count,
            s.score_mean,
            s.score_std,
            s.score_min,
            s.score_max,
        ]

    rows = [row("all", answer.stats)] + [row(v.policy_version or "(none)", v.stats) for v in answer.by_policy_version]
    output.show_table(
        columns if args.by_version else columns[1:], [r if args.by_version else r[1:] for r in rows], False, []
    )
    if not answer.stats.feedback_count:
        output.note(f"{args.agent_id} has no feedback yet (training needs at least 10 items)")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from rlhf.feedback.v1 import feedback_service_pb2 as fb
    from rlhf.sdk.clients import FeedbackClient

    filters: dict[str, Any] = {"kind": KINDS.get(args.kind, 0)}
    if args.policy_version:
        filters["policy_version"] = args.policy_version
    if args.run_id:
        filters["run_id"] = args.run_id
    rows: list[Any] = []
    token = ""
    with connected(FeedbackClient(args.feedback_addr)) as client:
        while len(rows) < args.limit:
            page, token = client.list_feedback(
                args.agent_id, page_size=min(1000, args.limit - len(rows)), page_token=token, **filters
            )
            rows.extend(page)
            if not token:
                break
    output.show_table(
        ["id", "kind", "score", "prompt", "response / chosen > rejected", "version", "created"],
        (
            [
                f.id,
                "rating" if f.kind == fb.FEEDBACK_KIND_RATING else "comparison",
                f.score if f.HasField("score") else None,
                output.short(f.prompt, 40),
                output.short(f.response if f.kind == fb.FEEDBACK_KIND_RATING else f"{f.chosen} > {f.rejected}", 60),
                f.policy_version,
                output.timestamp(f, "created_at"),
            ]
            for f in rows
        ),
        args.json,
        rows,
        empty=f"no feedback for {args.agent_id}",
    )
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    from rlhf.sdk.clients import FeedbackClient

    if bool(args.ids) == args.all:
        args.parser.error("give feedback ids to delete, or --all for every row of the agent (not both)")
    with connected(FeedbackClient(args.feedback_addr)) as client:
        deleted = client.delete_feedback(args.agent_id, ids=args.ids, all=args.all)
    if args.json:
        output.print_json({"deleted_count": deleted})
    else:
        output.stdout().print(f"deleted {deleted} feedback rows of {args.agent_id}", markup=False)
    return 0


# --- import ----------------------------------------------------------------------------------------------

# Columns of an import file (CSV header or JSONL keys); camelCase (the seed's JSON) is accepted too.
TEXT_FIELDS = ("prompt", "response", "chosen", "rejected", "run_id", "notes", "generation_id", "policy_version")
NUMBER_FIELDS = ("score", "margin")
ALIASES = {
    "runId": "run_id",
    "generationId": "generation_id",
    "policyVersion": "policy_version",
    "requestId": "request_id",
}


class BadRow(ValueError):
    """A row of the file that cannot become a feedback item (client-side rejection)."""


def _rows(file: pathlib.Path | None, kind: str) -> Iterator[tuple[int, dict[str, Any] | BadRow]]:
    """(line number, row or BadRow) for each record, read as it is streamed (never the whole file at once)."""
    handle = sys.stdin if file is None else open(file, newline="", encoding="utf-8")  # noqa: SIM115
    try:
        if kind == "csv":
            reader = csv.DictReader(handle)
            for row in reader:
                yield reader.line_num, {k: v for k, v in row.items() if k is not None and v not in (None, "")}
        else:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    yield number, BadRow(f"not valid JSON ({error.msg})")
                    continue
                yield number, record if isinstance(record, dict) else BadRow("not a JSON object")
    finally:
        if file is not None:
            handle.close()


def _request(agent_id: str, row: dict[str, Any]):
    """A row as a SubmitFeedbackRequest; a request id derived from the row when it has none, so importing
    the same file twice stores nothing twice (the second time every row is a duplicate)."""
    from rlhf.feedback.v1 import feedback_service_pb2 as fb

    row = {ALIASES.get(k, k): v for k, v in row.items()}
    fields: dict[str, Any] = {}
    for name in TEXT_FIELDS:
        if name in row:
            fields[name] = str(row[name])
    for name in NUMBER_FIELDS:
        if name in row and row[name] not in ("", None):
            try:
                fields[name] = float(row[name])
            except (TypeError, ValueError):
                raise BadRow(f"{name}: not a number ({row[name]!r})") from None
    metadata = row.get("metadata") or {}
    if isinstance(metadata, str):
        try:
            metadata = json.loads(metadata)
        except json.JSONDecodeError:
            raise BadRow("metadata: not a JSON object") from None
    if not isinstance(metadata, dict):
        raise BadRow("metadata: not a JSON object")
    unknown = sorted(set(row) - set(TEXT_FIELDS) - set(NUMBER_FIELDS) - {"metadata", "request_id", "agent_id"})
    if unknown:
        raise BadRow(f"unknown column {', '.join(unknown)}")
    if row.get("agent_id") not in (None, "", agent_id):
        raise BadRow(f"agent_id: the row is for {row['agent_id']!r}, the import for {agent_id!r}")
    request_id = str(row.get("request_id") or "")
    if not request_id:
        digest = hashlib.sha256(json.dumps([agent_id, fields, metadata], sort_keys=True).encode()).hexdigest()
        request_id = f"import-{digest[:40]}"
    return fb.SubmitFeedbackRequest(
        agent_id=agent_id, request_id=request_id, metadata={str(k): str(v) for k, v in metadata.items()}, **fields
    )


def cmd_import(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from rlhf.sdk.clients import FeedbackClient

    file = None if args.file == "-" else pathlib.Path(args.file)
    if file is not None and not file.is_file():
        raise CliError(f"file {args.file} not found")
    kind = args.format or ("csv" if file is not None and file.suffix.lower() == ".csv" else "jsonl")
    total = None
    if file is not None:  # a cheap first pass for the progress bar's total (records, not bytes)
        with open(file, newline="", encoding="utf-8") as handle:
            total = sum(1 for _ in csv.DictReader(handle)) if kind == "csv" else sum(1 for ln in handle if ln.strip())
    counts = {"accepted": 0, "duplicate": 0, "rejected": 0}
    rejections: list[tuple[int, str]] = []  # (line number, reason)
    lines: list[int] = []  # line number of each streamed item, by stream index

    def reject(line: int, reason: str) -> None:
        counts["rejected"] += 1
        rejections.append((line, reason))

    def requests() -> Iterator[Any]:
        for line, row in _rows(file, kind):
            try:
                if isinstance(row, BadRow):
                    raise row
                request = _request(args.agent_id, row)
            except BadRow as error:
                reject(line, str(error))
                progress.advance(task)
                continue
            lines.append(line)
            yield request

    with (
        Progress(
            TextColumn("importing"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[summary]}"),
            console=output.stderr(),
            disable=args.json,
        ) as progress,
        connected(FeedbackClient(args.feedback_addr)) as client,
    ):
        task = progress.add_task("import", total=total, summary="")
        for ack in client.stream(requests(), timeout=args.timeout):
            if ack.accepted:
                counts["duplicate" if ack.duplicate else "accepted"] += 1
            else:
                named = ack.reason.startswith(ack.field)  # the service's reasons usually name the field
                reject(lines[ack.index], ack.reason if named or not ack.field else f"{ack.field}: {ack.reason}")
            progress.update(task, advance=1, summary=_summary(counts))
    rejections.sort()
    if args.json:
        output.print_json({**counts, "rejections": [{"line": n, "reason": r} for n, r in rejections]})
    else:
        read = sum(counts.values())
        rows = "1 row" if read == 1 else f"{read} rows"
        output.stdout().print(f"imported {rows} into {args.agent_id}: {_summary(counts)}", markup=False)
        for line, reason in rejections[:10]:
            output.note(f"  rejected line {line}: {reason}")
        if len(rejections) > 10:
            output.note(f"  ... and {len(rejections) - 10} more rejected rows")
    return 1 if counts["rejected"] else 0


def _summary(counts: dict[str, int]) -> str:
    return f"{counts['accepted']} accepted, {counts['duplicate']} duplicate, {counts['rejected']} rejected"


def register(sub: Any) -> None:
    feedback = subcommands(add_parser(sub, "feedback", "submit, inspect, import and delete feedback"), "actions")

    submit = client_parser(
        feedback,
        "submit",
        "submit one rating (--response, --score) or comparison (--chosen, --rejected)",
        cmd_submit,
        ["feedback"],
    )
    submit.add_argument("agent_id", help="the agent the feedback is about")
    submit.add_argument("--prompt", required=True, help="what the agent was asked")
    submit.add_argument("--response", help="a rating: the agent's answer")
    submit.add_argument("--score", type=float, help="a rating: the answer's score in [0, 1]")
    submit.add_argument("--chosen", help="a comparison: the better answer")
    submit.add_argument("--rejected", help="a comparison: the worse answer")
    submit.add_argument("--margin", type=float, help="a comparison: how much better (optional)")
    submit.add_argument("--run-id", default="", help="the agent run this came from")
    submit.add_argument("--notes", default="", help="free text kept with the item")
    submit.add_argument("--request-id", default="", help="idempotency key: a retry with it stores nothing twice")

    stats = client_parser(feedback, "stats", "an agent's feedback counts and scores", cmd_stats, ["feedback"])
    stats.add_argument("agent_id", help="the agent")
    stats.add_argument("--by-version", action="store_true", help="also per policy version (the A/B readout)")

    listing = client_parser(feedback, "list", "an agent's feedback rows, newest first", cmd_list, ["feedback"])
    listing.add_argument("agent_id", help="the agent")
    listing.add_argument("--limit", type=int, default=20, help="at most this many rows")
    listing.add_argument("--kind", choices=sorted(KINDS), help="only ratings or only comparisons (default: both)")
    listing.add_argument("--policy-version", help="only feedback on answers of this policy version")
    listing.add_argument("--run-id", help="only feedback of this run")

    delete = client_parser(
        feedback, "delete", "delete feedback rows by id, or all of an agent's", cmd_delete, ["feedback"]
    )
    delete.add_argument("agent_id", help="the agent")
    delete.add_argument("ids", nargs="*", help="ids of the rows to delete (see feedback list)")
    delete.add_argument("--all", action="store_true", help="delete every feedback row of the agent")

    importing = client_parser(
        feedback,
        "import",
        "stream a JSONL or CSV file of ratings and comparisons into the feedback service",
        cmd_import,
        ["feedback"],
        description=(
            "Stream a file of feedback into the feedback service (StreamFeedback), with progress and a\n"
            "summary of accepted, duplicate and rejected rows. Columns (CSV header or JSONL keys): prompt,\n"
            "and response + score (a rating) or chosen + rejected [+ margin] (a comparison); optional run_id,\n"
            "notes, generation_id, policy_version, metadata (a JSON object), request_id. Rows without a\n"
            "request_id get one derived from their content, so importing a file twice stores nothing twice.\n"
            "Exits 1 when any row was rejected.\n\n"
            'example JSONL line: {"prompt": "Hi?", "response": "Hello!", "score": 0.8, "run_id": "r1"}'
        ),
    )
    importing.add_argument("agent_id", help="the agent the feedback is about")
    importing.add_argument("file", help="a .jsonl or .csv file, or - for standard input")
    importing.add_argument(
        "--format", choices=["jsonl", "csv"], help="the file's format (default: from its suffix, .csv or else jsonl)"
    )
    importing.add_argument("--timeout", type=float, default=3600.0, help="seconds the whole stream may take")
