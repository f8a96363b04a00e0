"""berthd over its unix socket with Python grpcio and its default options (tests/interop.rs).

    python client.py PROTO_DIR SOCKET IMAGE PULL_SECRET

Calls grpc.health.v1.Health/Check (by method path, raw bytes), berth.v1.Agent/ListContainers
and the server-streaming berth.v1.Agent/PullImage (stubs generated from PROTO_DIR with
grpcio-tools) on unix://SOCKET, and prints one JSON object with what came back.
"""

import importlib.resources
import json
import sys
import tempfile

import grpc
from grpc_tools import protoc


def generate_stubs(proto_dir, out_dir):
    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    status = protoc.main([
        "protoc", f"-I{proto_dir}", f"-I{well_known}",
        f"--python_out={out_dir}", f"--grpc_python_out={out_dir}",
        "berth/v1/agent.proto", "berth/v1/secrets.proto",
    ])
    if status != 0:
        raise SystemExit(f"protoc failed with {status}")
    sys.path.insert(0, out_dir)


def main():
    proto_dir, socket, image, pull_secret = sys.argv[1:5]
    with tempfile.TemporaryDirectory() as out_dir:
        generate_stubs(proto_dir, out_dir)
        from berth.v1 import agent_pb2, agent_pb2_grpc

        result = {"grpcio": grpc.__version__}
        with grpc.insecure_channel(f"unix://{socket}") as channel:
            # HealthCheckRequest{service: ""} is empty; the answer is field 1 (varint).
            check = channel.unary_unary("/grpc.health.v1.Health/Check")
            answer = check(b"", timeout=30)
            result["health"] = answer[1] if answer[:1] == b"\x08" else 0

            agent = agent_pb2_grpc.AgentStub(channel)
            listed = agent.ListContainers(agent_pb2.ListContainersRequest(project="default"), timeout=30)
            result["containers"] = len(listed.containers)

            events = []
            pull = agent_pb2.PullImageRequest(project="default", image=image, pull_secret=pull_secret)
            for event in agent.PullImage(pull, timeout=120):
                kind = event.WhichOneof("event")
                events.append(kind)
                if kind == "done":
                    result["digest"] = event.done.digest
            result["pull"] = events
        print(json.dumps(result))


if __name__ == "__main__":
    main()
