"""Generate the ``histoloop.v1`` Python stubs from ``protos/`` (run by ``make protos``).

Usage: ``python tools/gen_protos.py [OUT_DIR]`` — OUT_DIR defaults to ``services/common``,
where the stubs land as the package ``histoloop.v1``. The staleness test runs this into a
temporary folder and compares the result with the stubs in the tree.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

REPO = Path(__file__).resolve().parents[1]
PROTOS = REPO / "protos"


def generate(out_dir: Path) -> list[Path]:
    """Run protoc on every ``protos/histoloop/v1/*.proto``; return the files written."""
    sources = sorted(
        str(p.relative_to(PROTOS)) for p in (PROTOS / "histoloop" / "v1").glob("*.proto")
    )
    include = str(Path(protoc.__file__).parent / "_proto")
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--pyi_out={out_dir}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted((out_dir / "histoloop" / "v1").glob("*_pb2*.py*"))


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "services" / "common"
    written = generate(target)
    sys.stderr.write(f"generated {len(written)} files under {target}\n")
