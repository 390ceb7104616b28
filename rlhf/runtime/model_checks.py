"""Whether a requested base model can be loaded, checked before a job starts and without loading it.

Both training services ask: a name that is neither the tiny model, a complete local folder nor a hub id
whose config answers is FAILED_PRECONDITION at once, saying what to do, instead of a job that fails after
it has started. Only the config is read (rlhf.training.modelshape.describe_model), in a thread, within a
deadline; a hub id that answered once is remembered.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import pathlib
import re

from rlhf.runtime.config import ServerConfig, env_flag, env_str
from rlhf.runtime.errors import FailedPrecondition
from rlhf.training.errors import ModelLoadError
from rlhf.training.modeling import TINY_MODEL
from rlhf.training.modelshape import ModelShape, describe_model

# A hub id: "name" or "org/name" (no "..", no leading "/", ".", "~").
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")
# The artifact root's folders of versions, each holding one folder per agent.
ARTIFACT_KINDS = ("policies", "reward_models")


@dataclasses.dataclass(frozen=True)
class ModelAccess:
    """Which base models a request may name (README "Security"). Restricted: the tiny model, folders under
    `roots`, the agent's own versions under the artifact root, and hub ids only when `hub` is on; anything
    else is "not allowed", and an allowed folder that holds no model "not found" (the answer tells nothing
    more of the server's disk). Unrestricted (a single user's machine: no tokens, no RLHF_MODEL_ROOTS): any
    local folder or hub id, with the library's own explanation when it does not load."""

    restricted: bool = False
    # Folders anyone's requests may use models from (RLHF_MODEL_ROOTS, os.pathsep-separated; always
    # data_dir/models too).
    roots: tuple[pathlib.Path, ...] = ()
    # The artifact root: an agent's own versions under it (policies/<agent>/..., reward_models/<agent>/...).
    artifact_root: pathlib.Path | None = None
    # Hub ids allowed (RLHF_MODEL_HUB=1; default on only when unrestricted).
    hub: bool = True

    @classmethod
    def of(cls, server: ServerConfig) -> ModelAccess:
        configured = [p for p in env_str("RLHF_MODEL_ROOTS", "").split(os.pathsep) if p.strip()]
        restricted = bool(configured or server.security.tokens_file)
        roots = tuple(pathlib.Path(os.path.realpath(p)) for p in [server.data_dir / "models", *configured])
        return cls(restricted, roots, server.artifact_root, env_flag("RLHF_MODEL_HUB", not restricted))

    def _own_artifacts(self, agent_id: str) -> list[pathlib.Path]:
        if self.artifact_root is None or not agent_id:
            return []
        root = pathlib.Path(os.path.realpath(self.artifact_root))
        return [root / kind / agent_id for kind in ARTIFACT_KINDS]

    def check(self, name: str, agent_id: str, field: str) -> None:
        """Refuse a name this request may not use: FAILED_PRECONDITION saying "not allowed", nothing more."""
        if not self.restricted or not name or name == TINY_MODEL:
            return
        refused = FailedPrecondition(
            f"{field}: model '{name}' is not allowed on this server (use '{TINY_MODEL}', a folder under the "
            f"server's model roots, or one of the agent's own versions)",
            subject=name,
            kind="MODEL",
        )
        if name.startswith(("/", ".", "~")):
            folder = pathlib.Path(os.path.realpath(os.path.expanduser(name)))
            if not any(folder.is_relative_to(root) for root in [*self.roots, *self._own_artifacts(agent_id)]):
                raise refused
            return
        # A hub id; from_pretrained would also take a folder of that relative name, so none may exist.
        if not (self.hub and _HUB_ID.fullmatch(name) and ".." not in name and not os.path.lexists(name)):
            raise refused


class ModelChecker:
    def __init__(self, data_dir: pathlib.Path, timeout_seconds: float, access: ModelAccess | None = None) -> None:
        self.data_dir = data_dir
        self.timeout_seconds = timeout_seconds
        self.access = access or ModelAccess()
        self._hub_shapes: dict[str, ModelShape] = {}

    async def shape(self, name: str, field: str, agent_id: str = "") -> ModelShape:
        """The model's shape, or FAILED_PRECONDITION naming `field` and what to do. `agent_id`: whose request
        (its own versions are allowed when access is restricted)."""
        self.access.check(name, agent_id, field)
        if name in self._hub_shapes:
            return self._hub_shapes[name]
        try:
            shape = await asyncio.wait_for(asyncio.to_thread(describe_model, name, self.data_dir), self.timeout_seconds)
        except ModelLoadError as error:
            if self.access.restricted:  # an allowed name that does not load: no more than that
                raise FailedPrecondition(f"{field}: model '{name}' not found", subject=name, kind="MODEL") from error
            raise FailedPrecondition(f"{field}: {error.message}", subject=name, kind="MODEL") from error
        except asyncio.TimeoutError as error:
            raise FailedPrecondition(
                f"{field}: could not check model '{name}' within {self.timeout_seconds:g} s: it is not a local "
                f"folder and the model hub did not answer. Pass a local model folder or '{TINY_MODEL}'.",
                subject=name,
                kind="MODEL",
            ) from error
        if name and name != TINY_MODEL and not pathlib.Path(name).expanduser().is_dir():
            self._hub_shapes[name] = shape  # a hub id that answered once: no second look-up
        return shape
