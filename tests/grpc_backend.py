"""A gRPC server process for fault tests: ``python -m tests.grpc_backend --name N --proto DIR``,
serving ``meshtest.Greeter`` (``PROTO``, compiled into DIR by ``compile_proto``) on a free
loopback port. Prints ``listening on PORT``. ``Hello`` answers with its name; SIGKILL it to
see what a dead endpoint costs its callers.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
from grpc_tools import protoc

PROTO = """
syntax = "proto3";
package meshtest;
service Greeter {
  rpc Hello (Ask) returns (Answer);
  rpc Count (Ask) returns (stream Answer);
  rpc Gather (stream Ask) returns (Answer);
  rpc Chat (stream Ask) returns (stream Answer);
}
message Ask { string name = 1; int32 n = 2; }
message Answer { string text = 1; string server = 2; }
"""


def compile_proto(out: Path) -> None:
    """``meshtest_pb2`` and ``meshtest_pb2_grpc`` into ``out``."""
    (out / "meshtest.proto").write_text(PROTO)
    argv = ["protoc", f"-I{out}", f"--python_out={out}", f"--grpc_python_out={out}"]
    if protoc.main([*argv, "meshtest.proto"]) != 0:
        raise RuntimeError("protoc failed")


def load(out: Path) -> tuple[ModuleType, ModuleType]:
    """The messages and stubs compiled into ``out``."""
    sys.path.insert(0, str(out))
    return importlib.import_module("meshtest_pb2"), importlib.import_module("meshtest_pb2_grpc")


async def serve(name: str, out: Path) -> None:
    msgs, stubs = load(out)

    class Greeter(stubs.GreeterServicer):  # type: ignore[name-defined,misc]
        async def Hello(self, ask: Any, context: grpc.aio.ServicerContext) -> Any:
            return msgs.Answer(text=f"hello {ask.name}", server=name)

    server = grpc.aio.server()
    stubs.add_GreeterServicer_to_server(Greeter(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"listening on {port}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--proto", required=True, type=Path)
    args = parser.parse_args()
    asyncio.run(serve(args.name, args.proto))


if __name__ == "__main__":
    main()
