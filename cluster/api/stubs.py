"""Python stubs for `moeserve.proto`, generated from the proto with grpc_tools on first import and cached, so
the stubs always match the proto in the package and nothing generated is committed.

    from moeserve.cluster.api.stubs import pb2, pb2_grpc

Generated code is executed, so it is cached only where no one else can write: a directory of this user's,
mode 0700 (`$MOESERVE_CACHE`, else `$XDG_CACHE_HOME/moeserve`, else `~/.cache/moeserve`). A cache directory that
another user owns or can write to is not used; the stubs are then generated into a fresh private temporary
directory instead.

`add_GenerationServicer_to_server` is the servicer function Ray Serve's gRPC proxy is given: the generated one,
except that a request whose bytes do not parse (truncated, invalid UTF-8 in a string field) reaches the handler
as an `UnreadableRequest`, which it answers INVALID_ARGUMENT, instead of failing inside gRPC as INTERNAL.
"""
import hashlib
import importlib.util
import os
import shutil
import stat
import sys
import tempfile
import warnings
from pathlib import Path

import grpc

PROTO = Path(__file__).with_name("moeserve.proto")
SERVICE = "moeserve.v1.Generation"


def cache_root() -> Path:
    if os.environ.get("MOESERVE_CACHE"):
        return Path(os.environ["MOESERVE_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "moeserve"


def is_private(path: Path) -> bool:
    """A real directory (not a link) that this user owns and nobody else may write to or list."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077


def private_dir(path: Path) -> Path:
    """`path`, created 0700 if missing; ValueError if it exists and is not private."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{path}: cannot create ({e})") from None
    if not is_private(path):
        raise ValueError(f"{path} is not a directory of this user's that only this user can write")
    return path


def _stub_dir() -> Path:
    digest = hashlib.sha256(PROTO.read_bytes()).hexdigest()[:16]
    try:
        root = private_dir(cache_root())
    except ValueError as e:
        warnings.warn(f"moeserve: not caching gRPC stubs: {e}; generating them into a private temporary directory")
        root = Path(tempfile.mkdtemp(prefix="moeserve-stubs-"))  # 0700, a name nobody could have guessed
    out = root / f"grpc-{digest}"
    if not (out / "moeserve_pb2_grpc.py").exists():
        _generate(out)
    return out


def _generate(out: Path) -> None:
    from grpc_tools import protoc
    import grpc_tools
    work = Path(tempfile.mkdtemp(dir=out.parent))  # generate aside, then move into place atomically
    include = Path(grpc_tools.__file__).parent / "_proto"
    code = protoc.main(["grpc_tools.protoc", f"-I{PROTO.parent}", f"-I{include}", f"--python_out={work}",
                        f"--grpc_python_out={work}", str(PROTO)])
    if code != 0:
        raise RuntimeError(f"protoc failed on {PROTO} (exit {code})")
    try:
        work.rename(out)
    except OSError:  # another process got there first
        shutil.rmtree(work, ignore_errors=True)


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_dir = _stub_dir()
# the generated grpc module imports `moeserve_pb2` by that name
pb2 = _load("moeserve_pb2", _dir / "moeserve_pb2.py")
pb2_grpc = _load("moeserve_pb2_grpc", _dir / "moeserve_pb2_grpc.py")
GenerationStub = pb2_grpc.GenerationStub


class UnreadableRequest:
    """A request whose bytes are not a GenerateRequest; `reason` says why."""

    def __init__(self, reason: str):
        self.reason = reason


def _tolerant(parse):
    def deserialize(data: bytes):
        try:
            return parse(data)
        except Exception as e:  # noqa: BLE001  (protobuf's DecodeError, and whatever else bad bytes raise)
            return UnreadableRequest(f"the request is not a valid GenerateRequest message ({e})")
    return deserialize


def add_GenerationServicer_to_server(servicer, server) -> None:  # noqa: N802  (gRPC's naming)
    read = _tolerant(pb2.GenerateRequest.FromString)
    handlers = {
        "Generate": grpc.unary_unary_rpc_method_handler(
            servicer.Generate, request_deserializer=read,
            response_serializer=pb2.GenerateResponse.SerializeToString),
        "GenerateStream": grpc.unary_stream_rpc_method_handler(
            servicer.GenerateStream, request_deserializer=read,
            response_serializer=pb2.GenerateChunk.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    if hasattr(server, "add_registered_method_handlers"):
        server.add_registered_method_handlers(SERVICE, handlers)
