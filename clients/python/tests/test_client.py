"""The Python worker against an in-process coordinator written here from docs/protocol.md.

Run: PYTHONPATH=clients/python python3 -m unittest discover -s clients/python/tests
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import threading
import time
import unittest
from concurrent import futures
from typing import Any, Callable, Dict, List, Optional

import grpc
import numpy as np

import fedtune_worker
from fedtune_worker import demo, streams
from fedtune_worker.client import FatalWorkerError, Worker
from fedtune_worker.gen import coordinator_pb2 as pb
from fedtune_worker.gen import coordinator_pb2_grpc as pb_grpc
from fedtune_worker.gen import tensors_pb2

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
MODEL = os.path.join(ROOT, "test", "fixtures", "fingerprint", "llama-mixed")
with open(os.path.join(ROOT, "test", "fixtures", "fingerprint", "expected.json")) as f:
    FINGERPRINT = json.load(f)["llama-mixed"]["fingerprint"]

CHUNK = 64
MAX_CHUNK = 128
HEARTBEAT_MS = 100


def adapter() -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": rng.standard_normal((2, 16)).astype(np.float32),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": rng.standard_normal((16, 2)).astype(np.float32),
        "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight": rng.standard_normal((2, 16)).astype(np.float32),
        "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight": rng.standard_normal((8, 2)).astype(np.float32),
    }


def packed(a: Dict[str, np.ndarray]) -> bytes:
    return b"".join(np.ascontiguousarray(v, dtype="<f4").tobytes() for v in a.values())


def manifest(a: Dict[str, np.ndarray]) -> tensors_pb2.TensorManifest:
    return tensors_pb2.TensorManifest(tensors=[tensors_pb2.TensorSpec(name=k, dtype=tensors_pb2.DTYPE_F32, shape=list(v.shape)) for k, v in a.items()])


def train_task(task_id: str, round_: int = 1, version: int = 3, data: Optional[bytes] = None) -> pb.Task:
    data = packed(adapter()) if data is None else data
    t = pb.Task(task_id=task_id, round=round_, deadline_unix_ms=int(time.time() * 1000) + 60_000)
    getattr(t, "global").CopyFrom(pb.AdapterRef(version=version, total_bytes=len(data), sha256=hashlib.sha256(data).digest()))
    t.train.CopyFrom(pb.TrainTask(spec=pb.TrainingSpec(steps=2, batch_size=4, lr=1e-3, seed=5, lora=pb.LoraSpec(r=2, alpha=4)), upload_kind=pb.UPDATE_KIND_ADAPTER_WEIGHTS))
    return t


class FakeBulk:
    """The coordinator's bulk tensor channel (docs/protocol.md), written here: serves adapter() and records uploads.

    mode: "good"; "bad-digest" (a download's digest is wrong); "refuse" (an upload is refused with
    FAILED_PRECONDITION right after its request); "data-loss-once" (the first upload is answered DATA_LOSS).
    """

    def __init__(self, mode: str = "good"):
        self.mode = mode
        self.fake: Optional["FakeCoordinator"] = None
        self.downloads: List[pb.DownloadRequest] = []
        self.uploads: List[tuple] = []  # (UploadHeader, body, digest)
        self.refused = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.sock.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _read(conn: socket.socket, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            b = conn.recv(n - len(out))
            if not b:
                raise ConnectionError("closed")
            out += b
        return bytes(out)

    @staticmethod
    def _frame(msg: pb.BulkResponse) -> bytes:
        body = msg.SerializeToString()
        return struct.pack("<I", len(body)) + body

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                assert self._read(conn, 4) == b"FTB1"
                (n,) = struct.unpack("<I", self._read(conn, 4))
                req = pb.BulkRequest.FromString(self._read(conn, n))
                fake = self.fake
                if fake is None or req.worker_id != f"w{len(fake.registrations)}" or req.session_key != "ab" * 8:
                    conn.sendall(self._frame(pb.BulkResponse(code=grpc.StatusCode.UNAUTHENTICATED.value[0], message="unknown session")))
                    return
                if req.WhichOneof("op") == "download":
                    self.downloads.append(req.download)
                    a = adapter()
                    data = packed(a)
                    digest = hashlib.sha256(data + (b"x" if self.mode == "bad-digest" else b"")).digest()
                    conn.sendall(self._frame(pb.BulkResponse(header=tensors_pb2.StreamHeader(total_bytes=len(data), tensors=manifest(a)))) + data + digest)
                    return
                h = req.upload
                if self.mode == "refuse" or (self.mode == "data-loss-once" and self.refused == 0):
                    self.refused += 1
                    code = grpc.StatusCode.FAILED_PRECONDITION if self.mode == "refuse" else grpc.StatusCode.DATA_LOSS
                    conn.sendall(self._frame(pb.BulkResponse(code=code.value[0], message=f"task {h.task_id}: refused by the test")))
                    while conn.recv(1 << 16):  # it stops reading what the client still sends, as the coordinator does
                        pass
                    return
                body = self._read(conn, h.stream.total_bytes)
                digest = self._read(conn, 32)
                if digest != hashlib.sha256(body).digest():
                    conn.sendall(self._frame(pb.BulkResponse(code=grpc.StatusCode.DATA_LOSS.value[0], message="SHA-256 mismatch")))
                    return
                self.uploads.append((h, body, digest))
                fake.record_upload(h.task_id, [])
                conn.sendall(self._frame(pb.BulkResponse(ack=pb.UploadAck(task_id=h.task_id, bytes=len(body)))))
            except (ConnectionError, OSError):
                pass


class FakeCoordinator(pb_grpc.CoordinatorServicer):
    """Sends `script` down the session one item at a time (a Task waits until it is answered), then RunFinished."""

    def __init__(self, script: List[Any], protocol_version: int = 1, fingerprint: str = FINGERPRINT, download: str = "good", sessions_to_drop: int = 0, linger_s: float = 0.0, finished: Optional[List[str]] = None, bulk_port: int = 0):
        self.script = script
        self.bulk_port = bulk_port
        self.protocol_version = protocol_version
        self.fingerprint = fingerprint
        self.download = download
        self.sessions_to_drop = sessions_to_drop
        self.linger_s = linger_s
        self.finished = list(finished or [])
        self.registrations: List[pb.RegisterRequest] = []
        self.received: List[tuple] = []  # (time, WorkerMessage)
        self.upload_done_at: Dict[str, float] = {}
        self.uploads: Dict[str, List[pb.UploadMessage]] = {}
        self.downloads: List[pb.DownloadRequest] = []
        self.settled = threading.Condition()
        self.accepted_at: List[float] = []

    # -- helpers
    def record_upload(self, task_id: str, msgs: List[pb.UploadMessage]) -> None:
        self.uploads[task_id] = msgs
        self.upload_done_at[task_id] = time.monotonic()
        self._settle()

    def _settle(self) -> None:
        with self.settled:
            self.settled.notify_all()

    def answered(self, task_id: str) -> bool:
        if task_id in self.uploads:
            return True
        for _, m in self.received:
            k = m.WhichOneof("body")
            if k == "task_failed" and m.task_failed.task_id == task_id or k == "eval_result" and m.eval_result.task_id == task_id:
                return True
        return False

    def idle_after(self, task_id: str) -> bool:
        """An IDLE heartbeat came after the task's answer: every message the worker queued before it
        (the session stream is in order) has arrived, the status heartbeats of the task's phases included;
        an upload goes on another call and may overtake them."""
        times = [self.upload_done_at[task_id]] if task_id in self.upload_done_at else []
        for t, m in self.received:
            k = m.WhichOneof("body")
            if k == "task_failed" and m.task_failed.task_id == task_id or k == "eval_result" and m.eval_result.task_id == task_id:
                times.append(t)
        return bool(times) and any(m.WhichOneof("body") == "heartbeat" and m.heartbeat.status == pb.WORKER_STATUS_IDLE and t >= min(times) for t, m in self.received)

    def messages(self, kind: str) -> List[Any]:
        return [getattr(m, kind) for _, m in self.received if m.WhichOneof("body") == kind]

    # -- the service
    def GetRunInfo(self, request, context):
        if request.join_token != "tok":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "join token rejected")
        return pb.RunInfo(run_id="run-1", run_name="fake", mode="federated", model_fingerprint=self.fingerprint, protocol_version=self.protocol_version)

    def Register(self, request, context):
        self.registrations.append(request)
        return pb.RegisterResponse(worker_id=f"w{len(self.registrations)}", session_key="ab" * 8, run_id="run-1", heartbeat_interval_ms=HEARTBEAT_MS, chunk_bytes=CHUNK, max_chunk_bytes=MAX_CHUNK, bulk_port=self.bulk_port)

    def _check_md(self, context) -> None:
        md = dict(context.invocation_metadata())
        if md.get("fedtune-worker-id") != f"w{len(self.registrations)}" or md.get("fedtune-session-key") != "ab" * 8:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad session metadata")

    def Session(self, request_iterator, context):
        self._check_md(context)

        def read() -> None:
            try:
                for m in request_iterator:
                    self.received.append((time.monotonic(), m))
                    self._settle()
            except grpc.RpcError:
                pass

        threading.Thread(target=read, daemon=True).start()
        self.accepted_at.append(time.monotonic())
        yield pb.CoordinatorMessage(accepted=pb.SessionAccepted(worker_id=f"w{len(self.registrations)}", heartbeat_interval_ms=HEARTBEAT_MS))
        if self.sessions_to_drop > 0:
            self.sessions_to_drop -= 1
            return  # the stream ends without RunFinished: the worker must register again
        for item in self.script:
            if isinstance(item, (int, float)):
                time.sleep(item)
                continue
            yield item
            if item.WhichOneof("body") == "task":
                with self.settled:
                    self.settled.wait_for(lambda: self.answered(item.task.task_id), timeout=15)
                    self.settled.wait_for(lambda: self.idle_after(item.task.task_id), timeout=5)
        time.sleep(self.linger_s)
        state = self.finished.pop(0) if self.finished else "completed"
        yield pb.CoordinatorMessage(finished=pb.RunFinished(state=state, message="done"))

    def Download(self, request, context):
        self._check_md(context)
        self.downloads.append(request)
        a = adapter()
        data = packed(a)
        yield pb.DownloadMessage(header=tensors_pb2.StreamHeader(total_bytes=len(data), chunk_bytes=CHUNK, tensors=manifest(a)))
        if self.download == "too-big":
            yield pb.DownloadMessage(chunk=tensors_pb2.Chunk(offset=0, data=data[: MAX_CHUNK + 1]))
            return
        for off in range(0, len(data), CHUNK):
            if self.download == "bad-offset" and off == CHUNK:
                off += 4
            yield pb.DownloadMessage(chunk=tensors_pb2.Chunk(offset=off, data=data[off : off + CHUNK]))
        digest = hashlib.sha256(data).digest()
        if self.download == "bad-digest":
            digest = hashlib.sha256(data + b"x").digest()
        yield pb.DownloadMessage(trailer=tensors_pb2.StreamTrailer(total_bytes=len(data), sha256=digest))

    def Upload(self, request_iterator, context):
        self._check_md(context)
        msgs = list(request_iterator)
        task_id = msgs[0].header.task_id
        self.record_upload(task_id, msgs)
        return pb.UploadAck(task_id=task_id, bytes=sum(len(m.chunk.data) for m in msgs if m.WhichOneof("body") == "chunk"))


class Harness:
    def __init__(self, fake: FakeCoordinator):
        self.fake = fake
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        pb_grpc.add_CoordinatorServicer_to_server(fake, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def run(self, train: Callable = None, evaluate: Callable = None, num_train: int = 7, num_eval: int = 0, timeout: float = 30.0) -> Dict[str, Any]:
        w = Worker(f"127.0.0.1:{self.port}", "tok", "site-a", MODEL, train or demo.demo_train(num_train), num_train, evaluate=evaluate, num_eval_examples=num_eval, give_up_after_s=5)
        box: Dict[str, Any] = {}

        def go() -> None:
            try:
                box["result"] = w.run()
            except BaseException as e:  # noqa: BLE001 - handed to the test
                box["error"] = e

        t = threading.Thread(target=go, daemon=True)
        t.start()
        t.join(timeout)
        self.server.stop(0)
        if t.is_alive():
            raise AssertionError("the worker did not finish")
        if "error" in box:
            raise box["error"]
        return box["result"]


def failures(fake: FakeCoordinator) -> Dict[str, pb.TaskFailed]:
    return {f.task_id: f for f in fake.messages("task_failed")}


class VersionAndModelTest(unittest.TestCase):
    def test_another_protocol_version_is_refused_before_register(self):
        fake = FakeCoordinator([], protocol_version=2)
        with self.assertRaises(FatalWorkerError) as cm:
            Harness(fake).run()
        self.assertIn("coordinator speaks fedtune protocol version 2, this worker (fedtune-python/0.1.0) speaks version 1", str(cm.exception))
        self.assertEqual(fake.registrations, [])

    def test_another_base_model_is_refused_before_register(self):
        fake = FakeCoordinator([], fingerprint="ab" * 32)
        with self.assertRaises(FatalWorkerError) as cm:
            Harness(fake).run()
        self.assertIn(f"base model fingerprint mismatch: {MODEL} is {FINGERPRINT}, run 'fake' expects {'ab' * 32}", str(cm.exception))
        self.assertEqual(fake.registrations, [])

    def test_register_carries_fingerprint_counts_and_version(self):
        fake = FakeCoordinator([])
        r = Harness(fake).run(num_train=7, evaluate=demo.demo_evaluate(3), num_eval=3)
        self.assertEqual(r["state"], "completed")
        (req,) = fake.registrations
        c = req.capabilities
        self.assertEqual((req.join_token, req.site), ("tok", "site-a"))
        self.assertEqual((c.model_fingerprint, c.num_train_examples, c.num_eval_examples, c.protocol_version, c.client), (FINGERPRINT, 7, 3, 1, "fedtune-python/0.1.0"))


class SessionTest(unittest.TestCase):
    def test_coordinator_speaks_first_then_heartbeats_at_the_given_interval(self):
        fake = FakeCoordinator([1.0])
        Harness(fake).run()
        # Nothing came up the session before SessionAccepted went down.
        self.assertLess(fake.accepted_at[0], fake.received[0][0])
        self.assertEqual(fake.received[0][1].WhichOneof("body"), "heartbeat")
        beats = [t for t, m in fake.received if m.WhichOneof("body") == "heartbeat"]
        self.assertGreaterEqual(len(beats), 7, "about one heartbeat per 100 ms over 1 s")
        gaps = np.diff(beats)
        self.assertLess(float(np.median(gaps)), 0.2)
        self.assertGreater(float(np.median(gaps)), 0.05)
        self.assertTrue(all(m.heartbeat.status == pb.WORKER_STATUS_IDLE for _, m in fake.received if m.WhichOneof("body") == "heartbeat"))

    def test_unknown_and_step_tasks_are_answered_unsupported(self):
        step = pb.Task(task_id="t-step", round=1)
        step.step.CopyFrom(pb.StepTask(step=0))
        fake = FakeCoordinator([pb.CoordinatorMessage(task=pb.Task(task_id="t-none", round=1)), pb.CoordinatorMessage(task=step)])
        Harness(fake).run()
        f = failures(fake)
        self.assertTrue(f["t-none"].unsupported)
        self.assertIn("task kind (unknown to this client) is not supported by fedtune-python/0.1.0", f["t-none"].message)
        self.assertTrue(f["t-step"].unsupported)
        self.assertIn("task kind step is not supported", f["t-step"].message)
        self.assertEqual(fake.uploads, {})

    def test_a_session_that_ends_without_run_finished_registers_again(self):
        fake = FakeCoordinator([], sessions_to_drop=1)
        r = Harness(fake).run()
        self.assertEqual(r["state"], "completed")
        self.assertEqual([x.previous_worker_id for x in fake.registrations], ["", "w1"])

    def test_run_finished_stopped_means_reconnect_failed_means_exit(self):
        fake = FakeCoordinator([], finished=["stopped", "failed"])
        r = Harness(fake).run()
        self.assertEqual(r["state"], "failed")
        self.assertEqual(len(fake.registrations), 2)


class TrainTest(unittest.TestCase):
    def test_update_goes_up_in_chunks_of_chunk_bytes_with_the_digest_of_the_raw_stream(self):
        fake = FakeCoordinator([pb.CoordinatorMessage(task=train_task("t1", round_=2, version=3))])
        r = Harness(fake).run(num_train=7)
        self.assertEqual(r["tasks_done"], 1)
        self.assertEqual(fake.downloads[0].adapter_version, 3)
        msgs = fake.uploads["t1"]
        h = msgs[0].header
        self.assertEqual((h.task_id, h.round, h.kind, h.base_version, h.num_examples), ("t1", 2, pb.UPDATE_KIND_ADAPTER_WEIGHTS, 3, 7))
        self.assertEqual(dict(h.metrics), {"train_loss": 1 / 3, "examples": 7.0})
        a = adapter()
        self.assertEqual([(t.name, t.dtype, list(t.shape)) for t in h.stream.tensors.tensors], [(k, tensors_pb2.DTYPE_F32, list(v.shape)) for k, v in a.items()])
        chunks = [m.chunk for m in msgs[1:-1]]
        trailer = msgs[-1].trailer
        data = b"".join(c.data for c in chunks)
        self.assertEqual(h.stream.chunk_bytes, CHUNK)
        self.assertEqual(h.stream.total_bytes, len(data))
        self.assertEqual([c.offset for c in chunks], list(range(0, len(data), CHUNK)))
        self.assertTrue(all(len(c.data) == CHUNK for c in chunks[:-1]))
        self.assertTrue(0 < len(chunks[-1].data) <= CHUNK)
        self.assertGreater(len(chunks), 2)
        self.assertEqual((trailer.total_bytes, trailer.sha256), (len(data), hashlib.sha256(data).digest()))
        want = demo.demo_update(a, 2)
        self.assertEqual(data, packed(want))
        self.assertTrue(fake.messages("progress"))
        statuses = [m.heartbeat.status for _, m in fake.received if m.WhichOneof("body") == "heartbeat"]
        for s in (pb.WORKER_STATUS_FETCHING, pb.WORKER_STATUS_TRAINING, pb.WORKER_STATUS_UPLOADING):
            self.assertIn(s, statuses)

    def test_what_train_returns_is_checked_before_upload(self):
        a = list(adapter())

        def bad(kind: str):
            def train(g, spec):
                if kind == "zero":
                    return g, 0, {}
                if kind == "too-many":
                    return g, 8, {}
                if kind == "nan-metric":
                    return g, 1, {"train_loss": float("nan")}
                if kind == "missing":
                    return {k: v for k, v in g.items() if k != a[1]}, 1, {}
                if kind == "shape":
                    return {**g, a[0]: np.zeros((3, 3), np.float32)}, 1, {}
                if kind == "inf":
                    return {**g, a[2]: np.full(g[a[2]].shape, np.inf, np.float32)}, 1, {}
                raise RuntimeError("out of memory on device 0")

            return train

        cases = {
            "zero": "num_examples = 0: it must be an integer from 1 to the 7 training examples",
            "too-many": "num_examples = 8",
            "nan-metric": "metric train_loss = nan (metrics must be finite numbers)",
            "missing": f"update lacks tensor {a[1]}",
            "shape": f"update tensor {a[0]} has shape [3, 3], the global adapter's is [2, 16]",
            "inf": f"update tensor {a[2]} has a non-finite value (inf) at element 0",
            "raises": "out of memory on device 0",
        }
        for kind, message in cases.items():
            with self.subTest(kind):
                fake = FakeCoordinator([pb.CoordinatorMessage(task=train_task("t"))])
                Harness(fake).run(train=bad(kind))
                self.assertIn(message, failures(fake)["t"].message)
                self.assertFalse(failures(fake)["t"].unsupported)
                self.assertEqual(fake.uploads, {})

    def test_download_is_checked_offsets_size_and_digest(self):
        for mode, message in (("bad-offset", f"chunk at offset {CHUNK + 4}, expected offset {CHUNK}"), ("bad-digest", "SHA-256 mismatch"), ("too-big", f"exceeds the limit of {MAX_CHUNK} bytes")):
            with self.subTest(mode):
                fake = FakeCoordinator([pb.CoordinatorMessage(task=train_task("t"))], download=mode)
                Harness(fake).run()
                self.assertIn(message, failures(fake)["t"].message)
                self.assertEqual(fake.uploads, {})
        # The digest in the task's AdapterRef must match too.
        wrong = train_task("t", data=packed(adapter()) + b"")
        getattr(wrong, "global").sha256 = hashlib.sha256(b"another adapter").digest()
        fake = FakeCoordinator([pb.CoordinatorMessage(task=wrong)])
        Harness(fake).run()
        self.assertIn("differs from the task's", failures(fake)["t"].message)

    def test_a_cancelled_task_is_not_uploaded(self):
        started = threading.Event()

        def slow(g, spec):
            started.set()
            deadline = time.monotonic() + 10
            while not fedtune_worker.cancelled() and time.monotonic() < deadline:
                time.sleep(0.01)
            return g, 1, {}

        fake = FakeCoordinator([pb.CoordinatorMessage(task=train_task("t")), 0.3, pb.CoordinatorMessage(cancel=pb.CancelTask(task_id="t", reason="deadline passed")), 0.5])
        # The fake waits for the task's answer before the cancel: run the cancel from the script order by not waiting.
        fake.answered = lambda task_id, _orig=fake.answered: True if task_id == "t" and started.wait(5) else _orig(task_id)  # type: ignore[method-assign]
        Harness(fake).run(train=slow)
        with fake.settled:
            fake.settled.wait_for(lambda: "t" in failures(fake), timeout=5)
        self.assertEqual(failures(fake)["t"].message, "cancelled by the coordinator: deadline passed")
        self.assertEqual(fake.uploads, {})


def closed_port() -> int:
    s = socket.create_server(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class BulkTest(unittest.TestCase):
    def _run(self, mode: str, round_: int = 2):
        bulk = FakeBulk(mode)
        fake = FakeCoordinator([pb.CoordinatorMessage(task=train_task("t", round_=round_, version=3))], bulk_port=bulk.port)
        bulk.fake = fake
        try:
            r = Harness(fake).run(num_train=7)
        finally:
            bulk.close()
        return r, fake, bulk

    def test_transfers_go_over_the_bulk_channel_when_the_coordinator_offers_it(self):
        with self.assertLogs("fedtune_worker", "INFO") as logs:
            r, fake, bulk = self._run("good")
        self.assertEqual(r["tasks_done"], 1)
        self.assertEqual((fake.downloads, fake.uploads["t"]), ([], []))  # nothing over the gRPC streams
        self.assertEqual([d.adapter_version for d in bulk.downloads], [3])
        [(h, body, digest)] = bulk.uploads
        self.assertEqual((h.task_id, h.round, h.kind, h.base_version, h.num_examples), ("t", 2, pb.UPDATE_KIND_ADAPTER_WEIGHTS, 3, 7))
        self.assertEqual(h.stream.total_bytes, len(body))
        self.assertEqual(body, packed(demo.demo_update(adapter(), 2)))  # the update of the global the bulk channel served
        self.assertEqual(digest, hashlib.sha256(body).digest())
        text = "\n".join(logs.output)
        self.assertIn(f"downloaded ({len(body)} bytes, bulk 127.0.0.1:{bulk.port})", text)
        self.assertIn(f"update uploaded ({len(body)} bytes, 7 examples) over bulk 127.0.0.1:{bulk.port}", text)

    def test_a_download_whose_digest_does_not_match_is_not_used(self):
        _, fake, bulk = self._run("bad-digest")
        self.assertIn("SHA-256 mismatch", failures(fake)["t"].message)
        self.assertEqual((bulk.uploads, fake.uploads), ([], {}))

    def test_a_refusal_fails_the_task_with_the_coordinators_reason(self):
        _, fake, bulk = self._run("refuse")
        self.assertEqual(bulk.refused, 1)  # FAILED_PRECONDITION: not retried
        self.assertIn("upload refused: task t: refused by the test", failures(fake)["t"].message)

    def test_data_loss_is_retried_once(self):
        r, _, bulk = self._run("data-loss-once")
        self.assertEqual((bulk.refused, len(bulk.uploads), r["tasks_done"]), (1, 1, 1))

    def test_an_unreachable_bulk_port_means_one_warning_and_the_grpc_streams(self):
        fake = FakeCoordinator([pb.CoordinatorMessage(task=train_task("t1")), pb.CoordinatorMessage(task=train_task("t2", version=4))], bulk_port=closed_port())
        with self.assertLogs("fedtune_worker", "WARNING") as logs:
            r = Harness(fake).run(num_train=7)
        self.assertEqual(r["tasks_done"], 2)
        self.assertEqual([d.adapter_version for d in fake.downloads], [3, 4])
        self.assertEqual(sorted(fake.uploads), ["t1", "t2"])
        self.assertGreater(len(fake.uploads["t1"]), 2)  # header, chunks, trailer
        self.assertEqual(sum("bulk tensor channel" in line and "unreachable" in line for line in logs.output), 1)


class EvalTest(unittest.TestCase):
    def test_eval_task_answers_eval_result(self):
        t = train_task("e")
        t.ClearField("train")
        t.eval.CopyFrom(pb.EvalTask(spec=pb.TrainingSpec(batch_size=2)))
        fake = FakeCoordinator([pb.CoordinatorMessage(task=t)])
        Harness(fake).run(evaluate=lambda g, spec: {"eval_loss": 0.25, "eval_tokens": 40, "eval_examples": 3, "eval_accuracy": 0.5}, num_eval=3)
        (r,) = fake.messages("eval_result")
        self.assertEqual((r.task_id, r.has_eval_data, r.eval_loss, r.eval_tokens, r.eval_examples, r.eval_accuracy), ("e", True, 0.25, 40, 3, 0.5))
        self.assertTrue(r.HasField("eval_accuracy"))
        fake = FakeCoordinator([pb.CoordinatorMessage(task=t)])
        Harness(fake).run()
        (r,) = fake.messages("eval_result")
        self.assertFalse(r.has_eval_data)


class StreamsTest(unittest.TestCase):
    def test_chunks_are_full_but_the_last(self):
        data = bytes(range(256)) * 3
        cs = list(streams.chunks(data, 100))
        self.assertEqual([o for o, _ in cs], list(range(0, 768, 100)))
        self.assertEqual([len(c) for _, c in cs], [100] * 7 + [68])
        self.assertEqual(b"".join(c for _, c in cs), data)

    def test_unpack_converts_f16_and_f64(self):
        m = [("a", tensors_pb2.DTYPE_F16, (2,)), ("b", tensors_pb2.DTYPE_F64, (1,)), ("c", tensors_pb2.DTYPE_BF16, (1,))]
        raw = np.array([1.5, -2.0], "<f2").tobytes() + np.array([0.1], "<f8").tobytes() + np.array([0x3FC0], "<u2").tobytes()
        out = streams.unpack(m, raw)
        self.assertEqual(out["a"].tolist(), [1.5, -2.0])
        self.assertEqual(out["b"].dtype, np.float32)
        self.assertEqual(float(out["b"][0]), float(np.float32(0.1)))
        self.assertEqual(float(out["c"][0]), 1.5)
        with self.assertRaises(streams.StreamError):
            streams.unpack(m, raw[:-1])


if __name__ == "__main__":
    unittest.main()
