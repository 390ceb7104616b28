"""Training jobs as resources, shared by the reward and policy services.

A job is a row in the service's own database and a worker process (`python -m <worker_module>`) that
reads `spec.json` from the job folder and appends JSON events to `events.jsonl` (rlhf.runtime.worker). The
manager tails those events, persists progress, feeds watchers, and on the worker's exit decides the final
state. Training never runs on the server's event loop, a cancel is a SIGTERM (the worker stops within a
step and keeps a checkpoint), a crash can't take the server down, and a restarted server marks jobs that
were running as INTERRUPTED.

Replicas: several servers of one service may share the database (and the artifact volume, where job folders
live). Each job has an owner, the replica that runs its worker (ServerConfig.replica_id), and a lease that the
owner's heartbeat renews every third of ServerConfig.job_lease_seconds. A starting replica marks INTERRUPTED only
its own jobs and those whose lease expired; the heartbeat of every replica does the same for expired leases (an
owner that died). Only the owner writes a job's progress and end, and only while the row is still active and its
own (a replica that lost its lease stops its worker rather than overwrite what another decided). Get, list and
watch read the database, so they work on any replica; a cancel of another replica's job is recorded in the row
(cancel_requested_at), and the owner's heartbeat stops the worker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import logging
import os
import pathlib
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from sqlalchemy import (
    Column,
    DateTime,
    Engine,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from rlhf.runtime import requestids, validation
from rlhf.runtime.environment import prepare_environment
from rlhf.runtime.errors import FailedPrecondition, NotFound, Unavailable

log = logging.getLogger(__name__)

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED, INTERRUPTED = (
    "QUEUED",
    "RUNNING",
    "SUCCEEDED",
    "FAILED",
    "CANCELLED",
    "INTERRUPTED",
)
ACTIVE = (QUEUED, RUNNING)
# What a user can do about a job that stopped before its end, where the service resumes jobs (checkpoints stay
# in the job's folder), and where it does not.
RESUMABLE = "resume it with ResumeTrainingJob (it continues from its last checkpoint), or start a new job"
NOT_RESUMABLE = "start a new job"
TERMINAL = (SUCCEEDED, FAILED, CANCELLED, INTERRUPTED)
# Why a job that was running when its server stopped (and started again) is INTERRUPTED.
STOPPED = "the server stopped while this job ran; {advice}"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def jobs_table(metadata: MetaData) -> Table:
    table = Table(
        "jobs",
        metadata,
        Column("job_id", String(64), primary_key=True),
        Column("agent_id", String(64), nullable=False, index=True),
        Column("state", String(16), nullable=False, index=True),
        Column("spec", Text, nullable=False),  # JSON: the resolved request
        Column("progress", Text, nullable=False, default="{}"),
        Column("result", Text, nullable=False, default="{}"),
        Column("error", Text, nullable=False, default=""),
        Column("version", String(32), nullable=False, default=""),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("started_at", DateTime(timezone=True)),
        Column("finished_at", DateTime(timezone=True)),
        Column("seq", Integer, nullable=False, default=0),  # creation order for listing
        # The replica running the job (ServerConfig.replica_id); empty in rows from before replicas existed.
        Column("owner", String(128)),
        # Until when the owner's heartbeat vouches for an active job; past it any replica marks it INTERRUPTED.
        Column("lease_expires_at", DateTime(timezone=True)),
        # A cancel asked of a replica that does not run the job; the owner's heartbeat acts on it.
        Column("cancel_requested_at", DateTime(timezone=True)),
    )
    # The database itself keeps one active job per agent and unique creation numbers, so concurrent creates
    # (threads, or several server replicas over one database) cannot both win; JobStore retries or refuses.
    Index(f"uq_{table.name}_seq", table.c.seq, unique=True)
    active = table.c.state.in_(ACTIVE)
    Index(f"uq_{table.name}_active_agent", table.c.agent_id, unique=True, sqlite_where=active, postgresql_where=active)
    return table


_CREATE_ATTEMPTS = 20  # a create loses a race for the next sequence number only to another create


@dataclasses.dataclass
class Job:
    job_id: str
    agent_id: str
    state: str
    spec: dict[str, Any]
    progress: dict[str, Any]
    result: dict[str, Any]
    error: str
    version: str
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    seq: int
    owner: str = ""
    lease_expires_at: dt.datetime | None = None
    cancel_requested_at: dt.datetime | None = None

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    # SQLite returns naive datetimes; everything here is UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=dt.timezone.utc)
    return value


class JobStore:
    """Persistence of jobs in one table of the owning service's database (blocking calls)."""

    def __init__(self, engine: Engine, table: Table) -> None:
        self.engine = engine
        self.table = table

    def _job(self, row: Any) -> Job:
        return Job(
            job_id=row.job_id,
            agent_id=row.agent_id,
            state=row.state,
            spec=json.loads(row.spec),
            progress=json.loads(row.progress or "{}"),
            result=json.loads(row.result or "{}"),
            error=row.error or "",
            version=row.version or "",
            created_at=_aware(row.created_at),
            started_at=_aware(row.started_at),
            finished_at=_aware(row.finished_at),
            seq=row.seq,
            owner=row.owner or "",
            lease_expires_at=_aware(row.lease_expires_at),
            cancel_requested_at=_aware(row.cancel_requested_at),
        )

    def _refuse_if_busy(self, conn: Any, agent_id: str) -> None:
        """One active job per agent: checked inside the caller's transaction."""
        t = self.table
        active = conn.execute(select(t.c.job_id).where(t.c.agent_id == agent_id, t.c.state.in_(ACTIVE))).first()
        if active:
            raise FailedPrecondition(
                f"agent '{agent_id}' already has an active training job {active.job_id}; "
                f"wait for it or cancel it first",
                subject=active.job_id,
            )

    def create(self, agent_id: str, spec: dict[str, Any], owner: str = "", lease_seconds: float = 30.0) -> Job:
        """Insert a QUEUED job owned by `owner` (its lease `lease_seconds` from now) unless the agent has an
        active one. The check runs in the same transaction, and
        the database's unique indexes settle races: a lost race for the agent's active slot is refused, one
        for the next sequence number is retried."""
        t = self.table
        for _ in range(_CREATE_ATTEMPTS):
            values = dict(
                job_id=uuid.uuid4().hex,
                agent_id=agent_id,
                state=QUEUED,
                spec=json.dumps(spec),
                progress="{}",
                result="{}",
                error="",
                version="",
                created_at=utcnow(),
                owner=owner,
                lease_expires_at=utcnow() + dt.timedelta(seconds=lease_seconds),
            )
            try:
                with self.engine.begin() as conn:
                    self._refuse_if_busy(conn, agent_id)
                    last = conn.execute(select(func.max(t.c.seq))).scalar() or 0
                    conn.execute(t.insert().values(**values, seq=last + 1))
            except IntegrityError:
                with self.engine.connect() as conn:
                    self._refuse_if_busy(conn, agent_id)  # another create took the agent's slot
                continue  # another create took the sequence number
            return self.get(values["job_id"])
        raise Unavailable("too many training jobs are being created at once; retry")

    def requeue(self, job_id: str, owner: str = "", lease_seconds: float = 30.0) -> Job:
        """An ended (not succeeded) job back to QUEUED, owned by `owner`, unless its agent has another active job."""
        t = self.table
        try:
            with self.engine.begin() as conn:
                row = conn.execute(select(t).where(t.c.job_id == job_id)).first()
                if row is None:
                    raise NotFound(f"training job '{job_id}' not found")
                if row.state not in (FAILED, CANCELLED, INTERRUPTED):
                    raise FailedPrecondition(
                        f"job {job_id} is {row.state}; only FAILED, CANCELLED or INTERRUPTED jobs can be resumed",
                        subject=job_id,
                    )
                self._refuse_if_busy(conn, row.agent_id)
                conn.execute(
                    update(t)
                    .where(t.c.job_id == job_id)
                    .values(
                        state=QUEUED,
                        error="",
                        progress="{}",
                        finished_at=None,
                        started_at=None,
                        owner=owner,
                        lease_expires_at=utcnow() + dt.timedelta(seconds=lease_seconds),
                        cancel_requested_at=None,
                    )
                )
        except IntegrityError:  # a concurrent create or resume took the agent's active slot
            with self.engine.connect() as conn:
                self._refuse_if_busy(conn, row.agent_id)
            raise
        return self.get(job_id)

    def get(self, job_id: str) -> Job:
        with self.engine.connect() as conn:
            row = conn.execute(select(self.table).where(self.table.c.job_id == job_id)).first()
        if row is None:
            raise NotFound(f"training job '{job_id}' not found")
        return self._job(row)

    def list(self, agent_id: str = "", state: str = "", before_seq: int = 0, limit: int = 50) -> list[Job]:
        t = self.table
        query = select(t).order_by(t.c.seq.desc()).limit(limit)
        if agent_id:
            query = query.where(t.c.agent_id == agent_id)
        if state:
            query = query.where(t.c.state == state)
        if before_seq:
            query = query.where(t.c.seq < before_seq)
        with self.engine.connect() as conn:
            return [self._job(row) for row in conn.execute(query)]

    def update(self, job_id: str, **fields: Any) -> None:
        for key in ("spec", "progress", "result"):
            if key in fields:
                fields[key] = json.dumps(fields[key])
        with self.engine.begin() as conn:
            conn.execute(update(self.table).where(self.table.c.job_id == job_id).values(**fields))

    def update_owned(self, job_id: str, owner: str, **fields: Any) -> bool:
        """`update`, only while the job is active and `owner`'s; False when it no longer is (another replica
        marked it INTERRUPTED after its lease expired, or a user's resume elsewhere took it)."""
        for key in ("spec", "progress", "result"):
            if key in fields:
                fields[key] = json.dumps(fields[key])
        t = self.table
        with self.engine.begin() as conn:
            result = conn.execute(
                update(t).where(t.c.job_id == job_id, t.c.owner == owner, t.c.state.in_(ACTIVE)).values(**fields)
            )
            return result.rowcount == 1

    def request_cancel(self, job_id: str) -> bool:
        """Record a cancel for the owner's heartbeat; False if the job is no longer active."""
        t = self.table
        with self.engine.begin() as conn:
            result = conn.execute(
                update(t).where(t.c.job_id == job_id, t.c.state.in_(ACTIVE)).values(cancel_requested_at=utcnow())
            )
            return result.rowcount == 1

    def renew(self, owner: str, lease_seconds: float) -> dict[str, bool]:
        """The heartbeat: extend the leases of `owner`'s active jobs; {job_id: a cancel was requested} of them."""
        t = self.table
        mine = (t.c.owner == owner, t.c.state.in_(ACTIVE))
        with self.engine.begin() as conn:
            conn.execute(update(t).where(*mine).values(lease_expires_at=utcnow() + dt.timedelta(seconds=lease_seconds)))
            rows = conn.execute(select(t.c.job_id, t.c.cancel_requested_at).where(*mine))
            return {row.job_id: row.cancel_requested_at is not None for row in rows}

    def interrupt_own(self, owner: str, reason: str) -> int:
        """A replica starting again: the jobs it left active can no longer be running."""
        t = self.table
        with self.engine.begin() as conn:
            result = conn.execute(
                update(t)
                .where(t.c.state.in_(ACTIVE), t.c.owner == owner)
                .values(state=INTERRUPTED, error=reason, finished_at=utcnow())
            )
            return result.rowcount

    def interrupt_expired(self, owner: str, reason: str, unowned_reason: str) -> int:
        """Active jobs of other owners whose lease expired: their replica died. They end INTERRUPTED with `reason`
        ("{owner}" filled in), or CANCELLED when a cancel was asked meanwhile. Active jobs without an owner (left
        by a version before replicas) end INTERRUPTED with `unowned_reason`."""
        t = self.table
        now = utcnow()
        expired = and_(
            t.c.state.in_(ACTIVE),
            or_(t.c.owner.is_(None), t.c.owner != owner),
            or_(t.c.lease_expires_at.is_(None), t.c.lease_expires_at < now),
        )
        count = 0
        with self.engine.begin() as conn:
            for row in conn.execute(select(t.c.job_id, t.c.owner, t.c.cancel_requested_at).where(expired)).all():
                values = (
                    dict(state=CANCELLED, error="cancelled by request")
                    if row.cancel_requested_at is not None
                    else dict(state=INTERRUPTED, error=reason.format(owner=row.owner) if row.owner else unowned_reason)
                )
                # The same condition again: a heartbeat that renewed the lease meanwhile wins.
                count += conn.execute(
                    update(t).where(expired, t.c.job_id == row.job_id).values(**values, finished_at=now)
                ).rowcount
        return count


class LeaseLost(Exception):
    """The job is no longer this replica's to write (another replica ended it, or took it by a resume)."""


# Called with the finished job and its worker's result; registers the output and returns its version.
OnSuccess = Callable[[Job, dict[str, Any]], Awaitable[str]]


class JobManager:
    """Launches and supervises worker processes for jobs; one instance per service."""

    def __init__(
        self,
        store: JobStore,
        work_root: pathlib.Path,
        worker_module: str,
        on_success: OnSuccess,
        worker_env: dict[str, str] | None = None,
        poll_seconds: float = 0.2,
        cancel_grace_seconds: float = 30.0,
        resumable: bool = False,
        owner: str = "embedded",
        lease_seconds: float = 30.0,
        watch_poll_seconds: float = 1.0,
    ) -> None:
        """`resumable`: the service offers ResumeTrainingJob, so a stopped job's error says to use it. `owner`:
        this replica's id (ServerConfig.resolved_replica_id); `lease_seconds`: ServerConfig.job_lease_seconds;
        `watch_poll_seconds`: how often a watch of another replica's job reads the database."""
        if lease_seconds <= 0:
            raise ValueError(f"the job lease must be positive seconds, got {lease_seconds}")
        self.store = store
        self.work_root = work_root
        self.worker_module = worker_module
        self.on_success = on_success
        self.worker_env = worker_env or {}
        self.poll_seconds = poll_seconds
        self.cancel_grace_seconds = cancel_grace_seconds
        self.advice = RESUMABLE if resumable else NOT_RESUMABLE
        self._processes: dict[str, asyncio.subprocess.Process] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._cancel_requested: set[str] = set()
        self._changed: dict[str, asyncio.Condition] = {}
        self._closing = False
        self.owner = owner
        self.lease_seconds = lease_seconds
        self.watch_poll_seconds = watch_poll_seconds
        self._heartbeat: asyncio.Task | None = None

    async def recover(self) -> None:
        """On start: end the jobs this replica left active before, and those of replicas whose lease expired;
        then keep this replica's leases alive (the heartbeat)."""
        own = await asyncio.to_thread(self.store.interrupt_own, self.owner, STOPPED.format(advice=self.advice))
        if own:
            log.warning("marked %d job(s) left running by this server before its restart as INTERRUPTED", own)
        await self._interrupt_expired()
        if self._heartbeat is None:
            self._heartbeat = asyncio.create_task(self._beat())

    async def _interrupt_expired(self) -> None:
        reason = (
            f"the server running this job (replica {{owner}}) stopped while this job ran: its lease of "
            f"{self.lease_seconds:g} s expired; {self.advice}"
        )
        unowned = STOPPED.format(advice=self.advice)
        count = await asyncio.to_thread(self.store.interrupt_expired, self.owner, reason, unowned)
        if count:
            log.warning("ended %d job(s) of replicas whose lease expired", count)

    async def _beat(self) -> None:
        """Every third of the lease: renew this replica's leases, act on cancels asked elsewhere, and end the jobs
        of replicas whose lease expired."""
        interval = self.lease_seconds / 3
        while not self._closing:
            try:
                jobs = await asyncio.to_thread(self.store.renew, self.owner, self.lease_seconds)
                for job_id, cancel in jobs.items():
                    if cancel and job_id not in self._cancel_requested and job_id in self._tasks:
                        log.info("job %s: cancel requested through another replica", job_id)
                        self._stop_for_cancel(job_id)
                await self._interrupt_expired()
            except Exception:  # noqa: BLE001 - a database hiccup must not end the heartbeat
                log.exception("job heartbeat failed; retrying")
            await asyncio.sleep(interval)

    def job_dir(self, job_id: str) -> pathlib.Path:
        return self.work_root / job_id

    async def submit(self, agent_id: str, spec: dict[str, Any]) -> Job:
        job = await asyncio.to_thread(self.store.create, agent_id, spec, self.owner, self.lease_seconds)
        folder = self.job_dir(job.job_id)
        folder.mkdir(parents=True, exist_ok=True)
        # The worker's calls carry the id of the request that created the job (rlhf.runtime.requestids).
        ids = {"job_id": job.job_id, "agent_id": agent_id, "request_id": requestids.current()}
        (folder / "spec.json").write_text(json.dumps({**ids, **spec}, indent=2))
        self._tasks[job.job_id] = asyncio.create_task(self._supervise(job.job_id))
        log.info("job %s queued for agent %s", job.job_id, agent_id)
        return job

    async def resume(self, job_id: str) -> Job:
        """Run an ended job's worker again in the same folder; the worker continues from its checkpoint."""
        job = await asyncio.to_thread(self.store.requeue, job_id, self.owner, self.lease_seconds)
        events = self.job_dir(job_id) / "events.jsonl"
        # The earlier run's events (its error, its progress) are history, not news about this run.
        already_read = events.stat().st_size if events.exists() else 0
        self._tasks[job_id] = asyncio.create_task(self._supervise(job_id, already_read))
        log.info("job %s queued again (resume) for agent %s", job_id, job.agent_id)
        return job

    async def get(self, job_id: str) -> Job:
        validation.job_id(job_id)
        return await asyncio.to_thread(self.store.get, job_id)

    async def list(self, **kwargs: Any) -> list[Job]:
        return await asyncio.to_thread(self.store.list, **kwargs)

    async def page(self, agent_id: str, state: str, page_size: int, page_token: str) -> tuple[list[Job], str]:
        """Newest first; the token is the creation sequence of the page's last job."""
        if agent_id:
            validation.agent_id(agent_id)
        size = validation.page_size(page_size)
        jobs = await self.list(
            agent_id=agent_id, state=state, before_seq=validation.page_token(page_token, "jobs"), limit=size + 1
        )
        return jobs[:size], (validation.next_page_token(jobs[size - 1].seq, "jobs") if len(jobs) > size else "")

    async def cancel(self, job_id: str) -> Job:
        job = await self.get(job_id)
        if job.terminal:
            raise FailedPrecondition(f"job {job_id} already ended ({job.state})", subject=job_id)
        if job_id in self._tasks:
            self._stop_for_cancel(job_id)
        elif not await asyncio.to_thread(self.store.request_cancel, job_id):
            job = await self.get(job_id)  # it ended meanwhile
            raise FailedPrecondition(f"job {job_id} already ended ({job.state})", subject=job_id)
        else:
            log.info("job %s: cancel recorded for its replica %s", job_id, job.owner)
        return await self.get(job_id)

    def _stop_for_cancel(self, job_id: str) -> None:
        """A cancel of a job this replica runs: SIGTERM to its worker (or to it once it starts)."""
        self._cancel_requested.add(job_id)
        process = self._processes.get(job_id)
        if process and process.returncode is None:
            _signal_group(process, signal.SIGTERM)
            log.info("job %s: cancel requested, SIGTERM sent to worker %d", job_id, process.pid)

    async def watch(self, job_id: str) -> AsyncIterator[Job]:
        """Yield the job now and after each change, until it ends. A job this replica runs wakes the watch
        as it changes; another replica's job is read from the database every watch_poll_seconds."""
        job = await self.get(job_id)
        yield job
        condition = self._condition(job_id)
        while not job.terminal:
            if job_id in self._tasks:
                async with condition:
                    try:
                        await asyncio.wait_for(condition.wait(), timeout=5.0)
                    except asyncio.TimeoutError:
                        pass  # re-read anyway
            else:
                await asyncio.sleep(self.watch_poll_seconds)
            latest = await self.get(job_id)
            # A renewed lease alone is no news to a watcher.
            if dataclasses.replace(latest, lease_expires_at=job.lease_expires_at) != job:
                job = latest
                yield job

    async def wait(self, job_id: str) -> Job:
        """The job once it has ended."""
        states = [job async for job in self.watch(job_id)]
        return states[-1]  # watch always yields the current state first, so there is one

    async def close(self) -> None:
        """Server shutdown: stop workers; their jobs end INTERRUPTED (checkpoints stay on disk)."""
        self._closing = True
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        for process in self._processes.values():
            if process.returncode is None:
                _signal_group(process, signal.SIGTERM)
        if self._tasks:
            await asyncio.wait(list(self._tasks.values()), timeout=self.cancel_grace_seconds)

    def _condition(self, job_id: str) -> asyncio.Condition:
        return self._changed.setdefault(job_id, asyncio.Condition())

    async def _notify(self, job_id: str) -> None:
        condition = self._condition(job_id)
        async with condition:
            condition.notify_all()

    async def _update(self, job_id: str, **fields: Any) -> None:
        """Write what this replica's worker did; LeaseLost if the job is no longer this replica's to write."""
        owned = await asyncio.to_thread(self.store.update_owned, job_id, self.owner, **fields)
        await self._notify(job_id)
        if not owned:
            raise LeaseLost(job_id)

    async def _supervise(self, job_id: str, events_offset: int = 0) -> None:
        folder = self.job_dir(job_id)
        events_path = folder / "events.jsonl"
        log_path = folder / "worker.log"
        state: dict[str, Any] = {"result": None, "error": ""}
        try:
            env = {**os.environ, **self.worker_env, "PYTHONUNBUFFERED": "1"}
            prepare_environment(env)
            with open(log_path, "ab") as log_file:
                process = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    self.worker_module,
                    "--job-dir",
                    str(folder),
                    stdout=log_file,
                    stderr=asyncio.subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            self._processes[job_id] = process
            if job_id in self._cancel_requested:  # cancelled while the worker was starting
                _signal_group(process, signal.SIGTERM)
            await self._update(job_id, state=RUNNING, started_at=utcnow())
            log.info("job %s running in worker pid %d", job_id, process.pid)
            offset = events_offset
            while True:
                exited = process.returncode is not None
                offset = await self._read_events(job_id, events_path, offset, state)
                if exited:
                    break
                try:
                    await asyncio.wait_for(process.wait(), timeout=self.poll_seconds)
                except asyncio.TimeoutError:
                    pass
            await self._finish(job_id, process.returncode, state, log_path)
        except LeaseLost:
            # Another replica ended the job (its lease had expired): stop the worker, leave the row alone.
            log.warning("job %s: no longer this replica's (lease lost); stopping its worker", job_id)
            process = self._processes.get(job_id)
            if process is not None and process.returncode is None:
                _signal_group(process, signal.SIGTERM)
        except Exception as error:  # noqa: BLE001 - a supervisor bug must still end the job truthfully
            log.exception("job %s: supervisor failed", job_id)
            try:
                await self._update(job_id, state=FAILED, error=f"supervisor error: {error}", finished_at=utcnow())
            except LeaseLost:
                pass
        finally:
            self._processes.pop(job_id, None)
            self._tasks.pop(job_id, None)

    async def _read_events(self, job_id: str, path: pathlib.Path, offset: int, state: dict[str, Any]) -> int:
        if not path.exists():
            return offset
        with open(path, "rb") as handle:
            handle.seek(offset)
            chunk = handle.read()
        complete = chunk.rfind(b"\n") + 1  # leave a half-written last line for the next read
        if not complete:
            return offset
        progress = None
        for line in chunk[:complete].splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            kind = event.get("type")
            if kind == "progress":
                progress = event.get("progress", {})
            elif kind == "result":
                state["result"] = event.get("result", {})
            elif kind == "error":
                state["error"] = event.get("message", "")
        if progress is not None:
            await self._update(job_id, progress=progress)
        return offset + complete

    async def _finish(self, job_id: str, returncode: int, state: dict[str, Any], log_path: pathlib.Path) -> None:
        now = utcnow()
        cancelled = job_id in self._cancel_requested
        self._cancel_requested.discard(job_id)
        # A worker that delivered its result finished before the cancel could stop it (e.g. it was saving):
        # the trained model is registered rather than thrown away.
        if cancelled and not (returncode == 0 and state["result"] is not None):
            await self._update(job_id, state=CANCELLED, error="cancelled by request", finished_at=now)
            log.info("job %s cancelled", job_id)
            return
        if returncode == 0 and state["result"] is not None:
            job = await self.get(job_id)
            try:
                version = await self.on_success(job, state["result"])
            except Exception as error:  # noqa: BLE001
                log.exception("job %s: registering the result failed", job_id)
                await self._update(
                    job_id, state=FAILED, error=f"could not register the result: {error}", finished_at=now
                )
                return
            # The worker's last progress said "saving"; a finished job is past every phase.
            progress = {**job.progress, "phase": "done", "message": "", "eta_seconds": 0.0}
            await self._update(
                job_id, state=SUCCEEDED, version=version, result=state["result"], progress=progress, finished_at=now
            )
            log.info("job %s succeeded: version %s", job_id, version)
            return
        if self._closing:
            await self._update(
                job_id,
                state=INTERRUPTED,
                finished_at=now,
                error=f"the server shut down while this job ran; {self.advice}",
            )
            return
        reason = state["error"] or _exit_reason(returncode, log_path, self.advice)
        await self._update(job_id, state=FAILED, error=reason, finished_at=now)
        log.warning("job %s failed: %s", job_id, reason.splitlines()[-1] if reason else returncode)


def _signal_group(process: asyncio.subprocess.Process, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)  # the worker's own session: reaches torchrun's children too
    except ProcessLookupError:
        pass


def _exit_reason(returncode: int, log_path: pathlib.Path, advice: str) -> str:
    """Why a worker that reported no error ended: the signal that killed it, or its exit code and last lines."""
    if returncode < 0:  # asyncio's convention: -N is death by signal N
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "unknown signal"
        hint = " (out of memory, or killed by an operator)" if -returncode == signal.SIGKILL else ""
        return f"worker killed by signal {-returncode} ({name}){hint}; {advice}"
    tail = _tail(log_path)
    return f"worker exited with code {returncode}" + (f"; its log ends:\n{tail}" if tail else "")


def _tail(path: pathlib.Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])
