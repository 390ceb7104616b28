"""Whether a requested base model can be loaded, checked before a job starts and without loading it.

Both training services ask: a name that is neither the tiny model, a complete local folder nor a hub id
whose config answers is FAILED_PRECONDITION at once, saying what to do, instead of a job that fails after
it has started. Only the config is read (rlhf.training.modelshape.describe_model), in a thread, within a
deadline; a hub id that answered once is remembered.
"""

from __future__ import annotations

import asyncio
import pathlib

from rlhf.runtime.errors import FailedPrecondition
from rlhf.training.errors import ModelLoadError
from rlhf.training.modeling import TINY_MODEL
from rlhf.training.modelshape import ModelShape, describe_model


class ModelChecker:
    def __init__(self, data_dir: pathlib.Path, timeout_seconds: float) -> None:
        self.data_dir = data_dir
        self.timeout_seconds = timeout_seconds
        self._hub_shapes: dict[str, ModelShape] = {}

    async def shape(self, name: str, field: str) -> ModelShape:
        """The model's shape, or FAILED_PRECONDITION naming `field` and what to do."""
        if name in self._hub_shapes:
            return self._hub_shapes[name]
        try:
            shape = await asyncio.wait_for(asyncio.to_thread(describe_model, name, self.data_dir), self.timeout_seconds)
        except ModelLoadError as error:
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
