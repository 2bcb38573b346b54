"""Bench (b)'s downloading side in the Python client (clients/python/fedtune_worker), in its own process.

Registers with the coordinator at argv[1], downloads global adapter version 0 argv[3] times over the
transport argv[2] ('bulk' or 'grpc') exactly as the Python worker fetches a task's global adapter
(checked, then unpacked into numpy arrays), and prints the milliseconds of each as one JSON line.

    PYTHONPATH=clients/python /usr/bin/python3 bench/transfer_client.py 127.0.0.1:PORT bulk 6
"""
import json
import sys
import time

from fedtune_worker.client import Worker
from fedtune_worker.gen import coordinator_pb2 as pb
from fedtune_worker.gen import coordinator_pb2_grpc as pb_grpc

address, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
w = Worker(address, "bench", f"py-reader-{mode}", "(none)", lambda g, s: (g, 1, {}), 0, bulk=mode == "bulk")
channel = w._channel()  # the channel the worker itself opens
stub = pb_grpc.CoordinatorStub(channel)
reg = w._register(stub, "")
if (mode == "bulk") != w._via().startswith("bulk "):
    raise SystemExit(f"transfer_client.py: asked for {mode}, got {w._via()}")
md = (("fedtune-worker-id", reg.worker_id), ("fedtune-session-key", reg.session_key))
ms = []
for _ in range(n):
    w._cache = None  # every download is fetched, not served from the version cache
    t0 = time.perf_counter()
    w._fetch(stub, reg, md, pb.AdapterRef(version=0))
    ms.append((time.perf_counter() - t0) * 1000)
channel.close()
print(json.dumps({"ms": ms}))
