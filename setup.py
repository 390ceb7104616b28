"""Build hook: the gRPC code generated from protos/ (rlhf/<service>/v1/, git-ignored) is part of every build, so
a plain `pip install .` of a clean clone gives a working client. Everything else is in pyproject.toml.

build_py (wheels, `pip install .`, and editable installs alike) runs scripts/gen_protos.py with grpcio-tools
from [build-system] requires when the generated code is missing or older than its .proto, then adds the
generated packages to the build. Up-to-date code (the Dockerfile and `make install` generate it first) is
used as it is, so the protobuf runtime it was generated for stays the one installed beside it.
"""

from __future__ import annotations

import importlib.util
import pathlib

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = pathlib.Path(__file__).resolve().parent
PROTOS = ROOT / "protos"
GENERATOR = ROOT / "scripts" / "gen_protos.py"


def _outputs(proto: pathlib.Path) -> list[pathlib.Path]:
    stem = ROOT / proto.relative_to(PROTOS).with_suffix("")
    return [stem.with_name(stem.name + "_pb2.py"), stem.with_name(stem.name + "_pb2_grpc.py")]


def _stale(protos: list[pathlib.Path]) -> bool:
    newest_source = max(p.stat().st_mtime for p in [*protos, GENERATOR])
    outputs = [out for proto in protos for out in _outputs(proto)]
    return not all(out.exists() and out.stat().st_mtime >= newest_source for out in outputs)


def generate_protos() -> list[str]:
    """Generate the gRPC code if it is missing or stale; the names of the generated packages."""
    protos = sorted(PROTOS.rglob("*.proto"))
    if _stale(protos):
        try:
            spec = importlib.util.spec_from_file_location("gen_protos", GENERATOR)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        except ImportError as error:
            raise SystemExit(
                f"building rlhf-platform needs grpcio-tools to generate the gRPC code from protos/ ({error}); "
                "pip installs it for the build unless --no-build-isolation is given: then install grpcio-tools "
                "first, or run `python scripts/gen_protos.py` before building"
            ) from error
        if module.main() != 0:
            raise SystemExit("protoc failed on protos/: see the messages above")
    packages = set()
    for proto in protos:
        folder = proto.relative_to(PROTOS).parent
        while folder.parts[1:]:  # rlhf/feedback/v1 -> rlhf.feedback.v1, rlhf.feedback (rlhf itself is found)
            packages.add(".".join(folder.parts))
            folder = folder.parent
    return sorted(packages)


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        for package in generate_protos():
            if package not in self.packages:
                self.packages.append(package)
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
