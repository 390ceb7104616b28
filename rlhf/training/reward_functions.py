"""Reward functions: what turns the reward model's scores into the reward RL optimises.

A reward function takes the batch's prompts, responses and the reward model's scores (plus its own keyword
parameters) and returns one number per item. A run chooses which registered functions to combine and with
which weights; the reward is the weighted sum of their values (no functions: the reward model's score as
it is). Built-ins cover the common cases; an operator registers more by import path (`module:function`)
where the scores are computed (the reward service's RLHF_REWARD_FUNCTIONS, or a RewardFunctionRegistry
in-process). A request only ever names registered functions: it never loads code.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rlhf.training.errors import TrainingError

# (prompts, responses, scores, **params) -> one value per item
RewardFn = Callable[..., Sequence[float]]
NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")  # fullmatch: "$" would allow a final "\n"
# Seconds one regex search may take (a pattern comes from a request: no catastrophic backtracking).
REGEX_TIMEOUT_SECONDS = 0.05
REQUIRED = object()  # a parameter's default when the caller must give it


class InvalidRewardFunction(TrainingError):
    """A requested function or parameter is not valid; `field` names it (e.g. functions[0].params.scale)."""

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.field = field
        self.description = description


class RewardFunctionFailed(TrainingError):
    """A reward function raised or returned something other than one finite number per item."""


@dataclasses.dataclass
class RewardFunctionSpec:
    """One term of a run's reward: a registered function's name, its weight in the sum, its parameters."""

    name: str
    weight: float = 1.0
    params: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, value: RewardFunctionSpec | Mapping[str, Any], field: str) -> RewardFunctionSpec:
        """A spec from itself or a dict ({"name", "weight"?, "params"?}, as configs and JSON carry it)."""
        if isinstance(value, RewardFunctionSpec):
            return value
        if not isinstance(value, Mapping):
            raise InvalidRewardFunction(field, "must be an object with name, weight and params")
        unknown = set(value) - {"name", "weight", "params"}
        if unknown:
            raise InvalidRewardFunction(f"{field}.{sorted(unknown)[0]}", "unknown key (name, weight, params)")
        params = value.get("params") or {}
        if not isinstance(params, Mapping):
            raise InvalidRewardFunction(f"{field}.params", "must be an object of parameter values")
        weight = value.get("weight", 1.0)
        return cls(str(value.get("name", "")), 1.0 if weight is None else weight, dict(params))


@dataclasses.dataclass(frozen=True)
class Param:
    """A built-in function's parameter: its JSON type, default (REQUIRED if none), bounds and meaning."""

    name: str
    type: str  # "number", "integer", "string", "boolean" or "string_list"
    default: Any
    description: str
    minimum: float | None = None
    choices: tuple[str, ...] = ()

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def coerce(self, value: Any, field: str) -> Any:
        """The value as the function takes it, or InvalidRewardFunction naming `field`."""
        if self.type in ("number", "integer"):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InvalidRewardFunction(field, f"must be a finite {self.type}")
            if self.type == "integer":
                if value != int(value):
                    raise InvalidRewardFunction(field, "must be an integer")
                value = int(value)
            if self.minimum is not None and value < self.minimum:
                raise InvalidRewardFunction(field, f"must be at least {self.minimum:g}")
            return value
        if self.type == "boolean":
            if not isinstance(value, bool):
                raise InvalidRewardFunction(field, "must be true or false")
            return value
        if self.type == "string":
            if not isinstance(value, str) or not value:
                raise InvalidRewardFunction(field, "must be a non-empty string")
            if self.choices and value not in self.choices:
                raise InvalidRewardFunction(field, f"must be one of {', '.join(self.choices)}")
            return value
        if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v for v in value):
            raise InvalidRewardFunction(field, "must be a non-empty list of non-empty strings")
        return list(value)


@dataclasses.dataclass(frozen=True)
class RewardFunction:
    """A registered function. `params` lists a built-in's parameters; an operator's function is checked
    against its signature (keyword parameters after prompts, responses, scores)."""

    name: str
    fn: RewardFn
    description: str
    builtin: bool
    source: str
    params: tuple[Param, ...] = ()
    # Checks a built-in's parameters together, after each was coerced (e.g. a regex compiles).
    check: Callable[[dict[str, Any], str], None] | None = None

    def validate(self, params: Mapping[str, Any], field: str) -> dict[str, Any]:
        """`params` checked and completed with defaults; InvalidRewardFunction names the bad one."""
        if self.builtin:
            known = {p.name: p for p in self.params}
            for key in params:
                if key not in known:
                    raise InvalidRewardFunction(
                        f"{field}.{key}", f"unknown parameter of {self.name} ({', '.join(known) or 'it takes none'})"
                    )
            out = {}
            for p in self.params:
                if p.name in params:
                    out[p.name] = p.coerce(params[p.name], f"{field}.{p.name}")
                elif p.required:
                    raise InvalidRewardFunction(f"{field}.{p.name}", f"is required by {self.name}")
                else:
                    out[p.name] = p.default
            if self.check:
                self.check(out, field)
            return out
        return signature_params(self, params, field)

    def describe_params(self) -> list[dict[str, Any]]:
        """Each parameter as {name, type, required, default, description} (ListRewardFunctions)."""
        if self.builtin:
            return [
                {
                    "name": p.name,
                    "type": p.type,
                    "required": p.required,
                    "default": None if p.required else p.default,
                    "description": p.description,
                }
                for p in self.params
            ]
        return [
            {
                "name": name,
                "type": type_name(parameter.default),
                "required": parameter.default is inspect.Parameter.empty,
                "default": None if parameter.default is inspect.Parameter.empty else parameter.default,
                "description": "",
            }
            for name, parameter in keyword_parameters(self.fn).items()
        ]


def keyword_parameters(fn: RewardFn) -> dict[str, inspect.Parameter]:
    """An operator function's own parameters: those after (prompts, responses, scores), **kwargs aside."""
    listed = list(inspect.signature(fn).parameters.values())[3:]
    return {p.name: p for p in listed if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def type_name(default: Any) -> str:
    if isinstance(default, bool):
        return "boolean"
    if isinstance(default, int):
        return "integer"
    if isinstance(default, float):
        return "number"
    if isinstance(default, str):
        return "string"
    return "any"


def signature_params(function: RewardFunction, params: Mapping[str, Any], field: str) -> dict[str, Any]:
    """An operator function's parameters checked against its signature: known names, required ones given,
    the type of a default kept (an integral number is accepted for an int default)."""
    declared = keyword_parameters(function.fn)
    takes_any = any(p.kind == p.VAR_KEYWORD for p in inspect.signature(function.fn).parameters.values())
    out = dict(params)
    for key, value in params.items():
        if key not in declared:
            if takes_any:
                continue
            raise InvalidRewardFunction(
                f"{field}.{key}", f"unknown parameter of {function.name} ({', '.join(declared) or 'it takes none'})"
            )
        kind = type_name(declared[key].default)
        if kind == "string":
            if not isinstance(value, str):
                raise InvalidRewardFunction(f"{field}.{key}", "must be a string")
        elif kind != "any":
            out[key] = Param(key, kind, None, "").coerce(value, f"{field}.{key}")
    for key, parameter in declared.items():
        if parameter.default is inspect.Parameter.empty and key not in params:
            raise InvalidRewardFunction(f"{field}.{key}", f"is required by {function.name}")
    return out


# --- built-ins ---------------------------------------------------------------------------------------
def reward_model(prompts: list[str], responses: list[str], scores: list[float]) -> list[float]:
    return list(scores)


def scale_shift(
    prompts: list[str], responses: list[str], scores: list[float], scale: float, shift: float
) -> list[float]:
    return [scale * s + shift for s in scores]


def length_penalty(
    prompts: list[str], responses: list[str], scores: list[float], max_length: int, per_unit: float, unit: str
) -> list[float]:
    def length(text: str) -> int:
        return len(text.split()) if unit == "words" else len(text)

    return [-per_unit * max(0, length(r) - max_length) for r in responses]


def regex_match(
    prompts: list[str],
    responses: list[str],
    scores: list[float],
    pattern: str,
    value: float,
    otherwise: float,
    ignore_case: bool,
) -> list[float]:
    import regex

    compiled = regex.compile(pattern, regex.IGNORECASE if ignore_case else 0)
    out = []
    for response in responses:
        try:
            found = compiled.search(response, timeout=REGEX_TIMEOUT_SECONDS) is not None
        except TimeoutError as error:
            raise RewardFunctionFailed(
                f"regex pattern {pattern!r} took over {REGEX_TIMEOUT_SECONDS}s on one response; simplify it"
            ) from error
        out.append(value if found else otherwise)
    return out


def keywords(
    prompts: list[str], responses: list[str], scores: list[float], words: list[str], value: float, ignore_case: bool
) -> list[float]:
    def norm(text: str) -> str:
        return text.lower() if ignore_case else text

    wanted = [norm(w) for w in words]
    return [value * sum(1 for w in wanted if w in norm(r)) for r in responses]


def check_regex(params: dict[str, Any], field: str) -> None:
    import regex

    if len(params["pattern"]) > 1000:
        raise InvalidRewardFunction(f"{field}.pattern", "must be at most 1000 characters")
    try:
        regex.compile(params["pattern"])
    except regex.error as error:
        raise InvalidRewardFunction(f"{field}.pattern", f"is not a valid regular expression ({error})") from error


BUILTINS = (
    RewardFunction("reward_model", reward_model, "The reward model's score, unchanged.", True, "builtin"),
    RewardFunction(
        "scale_shift",
        scale_shift,
        "scale * score + shift on the reward model's score (the seed's `rewards * 2.0 - 1.0`: scale 2, shift -1).",
        True,
        "builtin",
        (
            Param("scale", "number", 1.0, "Factor on the reward model's score."),
            Param("shift", "number", 0.0, "Added after scaling."),
        ),
    ),
    RewardFunction(
        "length_penalty",
        length_penalty,
        "-per_unit x (length - max_length) for responses longer than max_length, else 0.",
        True,
        "builtin",
        (
            Param("max_length", "integer", REQUIRED, "Longest response with no penalty.", minimum=0),
            Param("per_unit", "number", 0.01, "Penalty per word (or character) beyond max_length.", minimum=0),
            Param("unit", "string", "words", "What length counts.", choices=("words", "characters")),
        ),
    ),
    RewardFunction(
        "regex",
        regex_match,
        "value when the response matches pattern (anywhere), else otherwise.",
        True,
        "builtin",
        (
            Param("pattern", "string", REQUIRED, "A regular expression (Python syntax), at most 1000 characters."),
            Param("value", "number", 1.0, "Reward of a matching response."),
            Param("otherwise", "number", 0.0, "Reward of a response that does not match."),
            Param("ignore_case", "boolean", False, "Match regardless of case."),
        ),
        check_regex,
    ),
    RewardFunction(
        "keywords",
        keywords,
        "value for each of words the response contains.",
        True,
        "builtin",
        (
            Param("words", "string_list", REQUIRED, "Words or phrases to look for."),
            Param("value", "number", 1.0, "Reward per word found (negative to penalise)."),
            Param("ignore_case", "boolean", True, "Match regardless of case."),
        ),
    ),
)


# --- registry and combination ------------------------------------------------------------------------
def import_function(path: str) -> RewardFn:
    """The callable at `module:function` (dots after the colon walk attributes)."""
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"reward function path {path!r} must look like 'package.module:function'")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"reward function {path!r}: cannot import {module_name} ({error})") from error
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"reward function {path!r}: {module_name} has no attribute {attribute}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"reward function {path!r} is not callable")
    positional = [
        p
        for p in inspect.signature(target).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if len(positional) < 3:
        raise ValueError(f"reward function {path!r} must take (prompts, responses, scores, **params)")
    return target


def parse_registrations(text: str) -> dict[str, str]:
    """`name=module:function,name2=module:function` (RLHF_REWARD_FUNCTIONS) as {name: path}."""
    out: dict[str, str] = {}
    for entry in filter(None, (e.strip() for e in text.replace("\n", ",").split(","))):
        name, sep, path = entry.partition("=")
        if not sep:
            raise ValueError(f"reward function entry {entry!r} must look like name=package.module:function")
        out[name.strip()] = path.strip()
    return out


class RewardFunctionRegistry:
    """The functions a run may name: the built-ins and those registered here (never by a request)."""

    def __init__(self) -> None:
        self.functions: dict[str, RewardFunction] = {f.name: f for f in BUILTINS}

    @classmethod
    def of(cls, registrations: Mapping[str, str | RewardFn]) -> RewardFunctionRegistry:
        """Built-ins plus {name: "module:function" or a callable}; a bad entry is a ValueError saying which."""
        registry = cls()
        for name, target in registrations.items():
            registry.register(name, target)
        return registry

    def register(self, name: str, target: str | RewardFn, description: str = "") -> RewardFunction:
        if not NAME.fullmatch(name):
            raise ValueError(f"reward function name {name!r} must be lowercase letters, digits and _ (start a-z)")
        if name in self.functions and self.functions[name].builtin:
            raise ValueError(f"reward function name {name!r} is a built-in's; choose another")
        fn = import_function(target) if isinstance(target, str) else target
        source = target if isinstance(target, str) else f"{fn.__module__}:{getattr(fn, '__qualname__', fn)}"
        doc = description or (inspect.getdoc(fn) or "").split("\n")[0]
        function = RewardFunction(name, fn, doc, False, source)
        self.functions[name] = function
        return function

    def listed(self) -> list[RewardFunction]:
        return sorted(self.functions.values(), key=lambda f: (not f.builtin, f.name))

    def combination(self, specs: Sequence[RewardFunctionSpec | Mapping[str, Any]], field: str) -> RewardCombination:
        """The validated weighted sum `specs` asks for; InvalidRewardFunction names `field[i]...` at fault."""
        terms = []
        for index, raw in enumerate(specs):
            where = f"{field}[{index}]"
            spec = RewardFunctionSpec.of(raw, where)
            function = self.functions.get(spec.name)
            if function is None:
                known = ", ".join(f.name for f in self.listed())
                raise InvalidRewardFunction(f"{where}.name", f"no reward function {spec.name!r} (registered: {known})")
            weight = spec.weight
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise InvalidRewardFunction(f"{where}.weight", "must be a finite number")
            terms.append((function, float(weight), function.validate(spec.params, f"{where}.params")))
        return RewardCombination(terms)


class RewardCombination:
    """sum(weight x function(prompts, responses, scores, **params)); empty: the scores unchanged."""

    def __init__(self, terms: list[tuple[RewardFunction, float, dict[str, Any]]]) -> None:
        self.terms = terms

    def __bool__(self) -> bool:
        return bool(self.terms)

    def __call__(self, prompts: list[str], responses: list[str], scores: list[float]) -> list[float]:
        if not self.terms:
            return list(scores)
        total = [0.0] * len(scores)
        for function, weight, params in self.terms:
            try:
                values = list(function.fn(list(prompts), list(responses), list(scores), **params))
            except RewardFunctionFailed:
                raise
            except Exception as error:  # an operator's code: say whose, never a trace to the caller
                raise RewardFunctionFailed(
                    f"reward function {function.name} ({function.source}) raised {type(error).__name__}: {error}"
                ) from error
            if len(values) != len(scores):
                raise RewardFunctionFailed(
                    f"reward function {function.name} returned {len(values)} values for {len(scores)} items"
                )
            for i, value in enumerate(values):
                number = as_number(value)
                if number is None:
                    raise RewardFunctionFailed(f"reward function {function.name} returned {value!r} for item {i}")
                total[i] += weight * number
        return total


def as_number(value: Any) -> float | None:
    """A finite float from a returned value (numpy and 0-d tensors included), else None."""
    if isinstance(value, (bool, str, bytes)):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
