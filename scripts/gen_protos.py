"""Generate Python code for the contracts in protos/ into the rlhf package (rlhf/<service>/v1/)."""

from __future__ import annotations

import os
import pathlib
import sys

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"


def main() -> int:
    well_known = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{well_known}",
        f"--python_out={ROOT}",
        f"--pyi_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        *files,
    ]
    code = protoc.main(args)
    if code != 0:
        print("protoc failed", file=sys.stderr)
        return code
    # Generated folders become regular packages so tools and packaging find them.
    for proto in files:
        folder = (ROOT / proto).parent
        while folder != ROOT / "rlhf" and folder != ROOT:
            (folder / "__init__.py").touch()
            folder = folder.parent
    print(f"generated {len(files)} contracts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
