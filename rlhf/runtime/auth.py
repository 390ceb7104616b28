"""Who may call what: bearer tokens, roles, and the one table of per-RPC rules (README "Security").

Tokens are configured by RLHF_AUTH_TOKENS_FILE, a JSON list of {"sha256": "<hex digest of the token>",
"role": "admin" | "agent", "agents": [...]}: the server keeps only digests, compares them in constant time
(hmac.compare_digest) and never logs a token. Without the file every call is allowed, as before.

Roles: an admin may call everything; an agent token may submit and read its own agents' feedback, generate for
them and read their deployments, models and jobs. Training, deployment, deletion of a whole agent, export,
scoring and listing across agents need an admin. The health service stays open; reflection is open when it is
switched on (RLHF_REFLECTION). A call without a valid token is UNAUTHENTICATED; a valid agent token outside
its agents is PERMISSION_DENIED. An agent token sees server paths (model folders, paths in job errors)
relative to the artifact root, as the seed shows them (policies/<agent>/v3/policy). Servicers know nothing
of this: `RULES` says, for each RPC, which role it needs, where the agent id is, in the request or (for
lookups by id, such as GetGeneration) in the answer, and which paths of the answer to show relative.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import pathlib
import re
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import grpc

from rlhf.runtime.decoding import Undecodable

ADMIN = "admin"
AGENT = "agent"
OPEN = "open"
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
_BEARER = re.compile(r"bearer\s+(\S+)\s*", re.IGNORECASE)


class TokensFileError(ValueError):
    """RLHF_AUTH_TOKENS_FILE is unreadable or malformed; the message says where (never a token)."""


@dataclasses.dataclass(frozen=True)
class Caller:
    """Who a valid token belongs to."""

    role: str
    # The agents an agent token acts for (empty for admins, who act for all).
    agents: frozenset[str] = frozenset()

    def may_act_for(self, agent_id: str) -> bool:
        return self.role == ADMIN or agent_id in self.agents


def digest(token: str) -> str:
    """The hex SHA-256 digest of a token, as the tokens file stores it."""
    return hashlib.sha256(token.encode()).hexdigest()


class TokenStore:
    """The accepted tokens, by digest."""

    def __init__(self, entries: list[tuple[bytes, Caller]]) -> None:
        self._entries = entries

    @classmethod
    def load(cls, path: str) -> TokenStore:
        where = f"RLHF_AUTH_TOKENS_FILE={path}"
        try:
            data = json.loads(pathlib.Path(path).expanduser().read_text())
        except OSError as error:
            raise TokensFileError(f"{where}: cannot read it ({error.strerror})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise TokensFileError(f"{where}: not valid JSON ({error})") from None
        if not isinstance(data, list):
            raise TokensFileError(f'{where}: must be a JSON list of {{"sha256", "role", "agents"}} objects')
        entries = []
        for index, item in enumerate(data):
            at = f"{where}: entry {index}"
            if not isinstance(item, dict):
                raise TokensFileError(f"{at} is not an object")
            sha = str(item.get("sha256", "")).lower()
            if not _HEX_DIGEST.fullmatch(sha):
                raise TokensFileError(f"{at}: sha256 must be the 64 hex digits of the token's SHA-256 digest")
            role = item.get("role")
            if role not in (ADMIN, AGENT):
                raise TokensFileError(f"{at}: role must be 'admin' or 'agent'")
            agents = item.get("agents", [])
            if not isinstance(agents, list) or not all(isinstance(a, str) and a for a in agents):
                raise TokensFileError(f"{at}: agents must be a list of agent ids")
            if role == AGENT and not agents:
                raise TokensFileError(f"{at}: an agent token needs at least one agent in agents")
            entries.append((bytes.fromhex(sha), Caller(role, frozenset(agents) if role == AGENT else frozenset())))
        return cls(entries)

    def authenticate(self, token: str) -> Caller | None:
        """The caller a token belongs to, or None. Every entry is compared, in constant time each."""
        presented = hashlib.sha256(token.encode()).digest()
        found = None
        for stored, caller in self._entries:
            if hmac.compare_digest(stored, presented) and found is None:
                found = caller
        return found


# -- the rules -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rule:
    """What one RPC needs. role OPEN: anyone; ADMIN: admins only; AGENT: admins, or an agent token whose agents
    include every agent id `request_agents` finds in the request (each item of a request stream) and
    `answer_agents` finds in the answer (each message of an answer stream)."""

    role: str
    request_agents: Callable[[Any], Iterable[str]] | None = None
    answer_agents: Callable[[Any], Iterable[str]] | None = None
    # Rewrites the server paths of a copy of the answer for an agent token: `shown(path)` or `shown_text`.
    answer_paths: Callable[[Any, Paths], None] | None = None


@dataclasses.dataclass(frozen=True)
class Paths:
    """How an agent token sees server paths: relative to the artifact root (policies/<agent>/v3/policy),
    as the seed shows them; anything else by its last component only."""

    artifact_root: str

    def shown(self, path: str) -> str:
        if not path:
            return path
        root = self.artifact_root.rstrip("/") + "/"
        return path[len(root) :] if path.startswith(root) else path.rstrip("/").rsplit("/", 1)[-1]

    def shown_text(self, text: str) -> str:
        """A message (a job's error) with the artifact root's prefix taken off every path in it."""
        return text.replace(self.artifact_root.rstrip("/") + "/", "")


def _policy_paths(policy: Any, paths: Paths) -> None:
    policy.model_path = paths.shown(policy.model_path)
    policy.reward_model_path = paths.shown(policy.reward_model_path)
    policy.artifact_path = paths.shown(policy.artifact_path)


def _model_paths(model: Any, paths: Paths) -> None:
    model.model_path = paths.shown(model.model_path)


def _job_paths(answer: Any, paths: Paths) -> None:
    answer.job.error = paths.shown_text(answer.job.error)


def _field(path: str) -> Callable[[Any], list[str]]:
    """The agent id at a dotted field path ("job.agent_id")."""
    names = path.split(".")

    def get(message: Any) -> list[str]:
        for name in names:
            message = getattr(message, name)
        return [message]

    return get


def _stream_feedback(request: Any) -> list[str]:
    """A StreamFeedbackRequest's items: `feedback` (when set, or when `items` is empty), then `items`."""
    agents = [request.feedback.agent_id] if request.HasField("feedback") or not request.items else []
    return agents + [item.agent_id for item in request.items]


def _delete_feedback(request: Any) -> list[str]:
    # Deleting a whole agent is an admin's (an agent token may delete its own rows by id).
    return [request.agent_id] if not request.all else [""]


_AGENT_ID = _field("agent_id")
_JOB = _field("job.agent_id")
_FB, _RW, _POL, _INF = (f"/rlhf.{s}.v1.{s.capitalize()}Service/" for s in ("feedback", "reward", "policy", "inference"))

RULES: dict[str, Rule] = {
    _FB + "SubmitFeedback": Rule(AGENT, _AGENT_ID),
    _FB + "StreamFeedback": Rule(AGENT, _stream_feedback),
    _FB + "ListFeedback": Rule(AGENT, _AGENT_ID),
    _FB + "GetFeedbackStats": Rule(AGENT, _AGENT_ID),
    _FB + "ExportFeedback": Rule(ADMIN),
    _FB + "DeleteFeedback": Rule(AGENT, _delete_feedback),
    _INF + "Generate": Rule(AGENT, _AGENT_ID),
    _INF + "GenerateStream": Rule(AGENT, _AGENT_ID),
    _INF + "GetDeployment": Rule(AGENT, _AGENT_ID),
    _INF + "SetDeployment": Rule(ADMIN),
    _INF + "GetGeneration": Rule(AGENT, answer_agents=_field("generation.agent_id")),
    _RW + "CreateTrainingJob": Rule(ADMIN),
    _RW + "CancelTrainingJob": Rule(ADMIN),
    _RW + "ScoreBatch": Rule(ADMIN),
    _RW + "ListRewardFunctions": Rule(AGENT),
    _RW + "ListRewardModels": Rule(
        AGENT, _AGENT_ID, answer_paths=lambda a, p: [_model_paths(m, p) for m in a.reward_models]
    ),
    _RW + "GetRewardModel": Rule(AGENT, _AGENT_ID, answer_paths=lambda a, p: _model_paths(a.reward_model, p)),
    _POL + "TrainPolicy": Rule(ADMIN),
    _POL + "ResumeTrainingJob": Rule(ADMIN),
    _POL + "CancelTrainingJob": Rule(ADMIN),
    _POL + "ListPolicies": Rule(AGENT, _AGENT_ID, answer_paths=lambda a, p: [_policy_paths(x, p) for x in a.policies]),
    _POL + "GetPolicy": Rule(AGENT, _AGENT_ID, answer_paths=lambda a, p: _policy_paths(a.policy, p)),
}
for _service in (_RW, _POL):
    # Listing without an agent filter ("" is nobody's agent) is an admin's.
    RULES[_service + "ListTrainingJobs"] = Rule(AGENT, _AGENT_ID)
    RULES[_service + "GetTrainingJob"] = Rule(AGENT, answer_agents=_JOB, answer_paths=_job_paths)
    RULES[_service + "WatchTrainingJob"] = Rule(AGENT, answer_agents=_JOB, answer_paths=_job_paths)
_OPEN_SERVICES = ("/grpc.health.v1.Health/",)
_REFLECTION = ("/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/")
# An RPC missing from RULES (one added later) is an admin's until a rule says otherwise.
_DEFAULT = Rule(ADMIN)


def rule_for(method: str) -> Rule:
    if method.startswith(_OPEN_SERVICES) or method.startswith(_REFLECTION):
        return Rule(OPEN)
    return RULES.get(method, _DEFAULT)


# -- the interceptor -------------------------------------------------------------------------------------


def _token(metadata: Iterable[tuple[str, Any]] | None) -> str:
    for key, value in metadata or ():
        if key == "authorization":
            match = _BEARER.fullmatch(value if isinstance(value, str) else "")
            return match.group(1) if match else ""
    return ""


def _outside(caller: Caller, agents: Iterable[str]) -> str | None:
    """The first agent id the caller may not act for, or None."""
    for agent_id in agents:
        if not caller.may_act_for(agent_id):
            return agent_id
    return None


_UNAUTHENTICATED = (
    "this server requires a bearer token: set RLHF_TOKEN (or --token) to a token listed in the server's "
    "RLHF_AUTH_TOKENS_FILE"
)


def _denied(agent_id: str | None) -> str:
    if agent_id is None:
        return "this call needs an admin token"
    if not agent_id:  # ListTrainingJobs without a filter, DeleteFeedback of a whole agent
        return (
            "an agent token must name one of its agents here (doing it for all or across agents needs an admin token)"
        )
    return f"this token may not act for agent '{agent_id}'"


def _refusing(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind that refuses every call with `code`."""

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(code, message)
        yield  # an async generator, as grpc.aio expects of a streaming handler

    make = {
        "unary_unary": (grpc.unary_unary_rpc_method_handler, unary),
        "unary_stream": (grpc.unary_stream_rpc_method_handler, stream),
        "stream_unary": (grpc.stream_unary_rpc_method_handler, unary),
        "stream_stream": (grpc.stream_stream_rpc_method_handler, stream),
    }
    kind = _kind(handler)
    factory, behavior = make[kind]
    return factory(behavior, handler.request_deserializer, handler.response_serializer)


def _kind(handler: grpc.RpcMethodHandler) -> str:
    for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
        if getattr(handler, kind):
            return kind
    raise ValueError("handler without a behavior")


def _shown(answer: Any, rule: Rule, paths: Paths) -> Any:
    """A copy of `answer` with its server paths as an agent token sees them (the servicer's may be cached)."""
    if rule.answer_paths is None:
        return answer
    copy = type(answer)()
    copy.CopyFrom(answer)
    rule.answer_paths(copy, paths)
    return copy


def _scoped(handler: grpc.RpcMethodHandler, caller: Caller, rule: Rule, paths: Paths) -> grpc.RpcMethodHandler:
    """`handler`, checking the agent ids of its requests and answers against the caller's agents."""
    kind = _kind(handler)
    behavior = getattr(handler, kind)

    async def check(agents: Callable[[Any], Iterable[str]] | None, message: Any, context: Any) -> None:
        if agents is None or isinstance(message, Undecodable):  # undecodable: the inner handler refuses it
            return
        outside = _outside(caller, agents(message))
        if outside is not None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, _denied(outside))

    async def checked_requests(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        async for request in requests:
            await check(rule.request_agents, request, context)
            yield request

    if kind in ("unary_unary", "stream_unary"):

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if kind == "unary_unary":
                await check(rule.request_agents, request, context)
            else:
                request = checked_requests(request, context)
            answer = await behavior(request, context)
            await check(rule.answer_agents, answer, context)
            return _shown(answer, rule, paths)

        new_behavior: Callable = unary
    else:

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if kind == "unary_stream":
                await check(rule.request_agents, request, context)
            else:
                request = checked_requests(request, context)
            async for answer in behavior(request, context):
                await check(rule.answer_agents, answer, context)
                yield _shown(answer, rule, paths)

        new_behavior = stream
    factory = getattr(grpc, f"{kind}_rpc_method_handler")
    return factory(new_behavior, handler.request_deserializer, handler.response_serializer)


class Authorization(grpc.aio.ServerInterceptor):
    """Server interceptor: authenticates the bearer token and applies `RULES` (see module doc)."""

    def __init__(self, store: TokenStore, artifact_root: str = "") -> None:
        self._store = store
        self._paths = Paths(artifact_root)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        rule = rule_for(handler_call_details.method)
        if rule.role == OPEN:
            return handler
        caller = self._store.authenticate(_token(handler_call_details.invocation_metadata))
        if caller is None:
            return _refusing(handler, grpc.StatusCode.UNAUTHENTICATED, _UNAUTHENTICATED)
        if caller.role == ADMIN:
            return handler
        if rule.role == ADMIN:
            return _refusing(handler, grpc.StatusCode.PERMISSION_DENIED, _denied(None))
        return _scoped(handler, caller, rule, self._paths)
