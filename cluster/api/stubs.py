"""Python stubs for `moeserve.proto`, generated from the proto with grpc_tools on first import and cached, so
the stubs always match the proto in the package and nothing generated is committed.

    from moeserve.cluster.api.stubs import pb2, pb2_grpc
"""
import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

PROTO = Path(__file__).with_name("moeserve.proto")


def _cache_dir() -> Path:
    digest = hashlib.sha256(PROTO.read_bytes()).hexdigest()[:16]
    base = Path(os.environ.get("MOESERVE_CACHE", Path(tempfile.gettempdir()) / f"moeserve-{os.getuid()}"))
    return base / "grpc" / digest


def _generate(out: Path) -> None:
    from grpc_tools import protoc
    import grpc_tools
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out.parent))  # generate aside, then move into place atomically
    include = Path(grpc_tools.__file__).parent / "_proto"
    code = protoc.main(["grpc_tools.protoc", f"-I{PROTO.parent}", f"-I{include}", f"--python_out={work}",
                        f"--grpc_python_out={work}", str(PROTO)])
    if code != 0:
        raise RuntimeError(f"protoc failed on {PROTO} (exit {code})")
    try:
        work.rename(out)
    except OSError:  # another process got there first
        pass


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_dir = _cache_dir()
if not (_dir / "moeserve_pb2_grpc.py").exists():
    _generate(_dir)
# the generated grpc module imports `moeserve_pb2` by that name
pb2 = _load("moeserve_pb2", _dir / "moeserve_pb2.py")
pb2_grpc = _load("moeserve_pb2_grpc", _dir / "moeserve_pb2_grpc.py")
add_GenerationServicer_to_server = pb2_grpc.add_GenerationServicer_to_server
GenerationStub = pb2_grpc.GenerationStub
