"""A fedtune worker: one site's side of a federated run, written from docs/protocol.md.

    GetRunInfo (check protocol_version, fingerprint) -> Register -> Session:
    heartbeats up every heartbeat_interval_ms, tasks down, one at a time:
    Download the task's global adapter (cached by version, rank and digest) ->
    train(global, spec) -> Upload the update. Transfers go over the
    coordinator's bulk tensor channel (bulk.py) when it offers one
    (RegisterResponse.bulk_port), else over the gRPC streams in chunks of
    chunk_bytes; a bulk channel that cannot be reached at all gets one warning
    and the gRPC streams from then on.
    Eval tasks go to evaluate(global, spec); step tasks and kinds this client
    does not know are answered with TaskFailed{unsupported}. When the
    connection breaks the worker registers again with exponential backoff.

Only the update, the example count and aggregate metrics leave the site.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import queue
import random
import ssl
import threading
import time
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import grpc
import numpy as np

from . import encoding, streams
from .bulk import BulkClient, BulkTransportError
from .fingerprint import ModelError
from .fingerprint import fingerprint as model_fingerprint
from .gen import coordinator_pb2 as pb
from .gen import coordinator_pb2_grpc as pb_grpc
from .gen import tensors_pb2

from ._version import CLIENT_NAME, PROTOCOL_VERSION

WORKER_ID_HEADER = "fedtune-worker-id"
SESSION_KEY_HEADER = "fedtune-session-key"

Tensors = Dict[str, np.ndarray]
TrainFn = Callable[[Tensors, Dict[str, Any]], Tuple[Tensors, int, Dict[str, float]]]
EvalFn = Callable[[Tensors, Dict[str, Any]], Optional[Dict[str, float]]]

log = logging.getLogger("fedtune_worker")

# Errors retrying does not fix: a bad token, another base model or protocol, a malformed request.
_FATAL = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED}


class FatalWorkerError(RuntimeError):
    """The worker cannot take part in this run (the message says why and what to do)."""


class TaskCancelled(RuntimeError):
    pass


# ----------------------------------------------------------------------------- inside train()

_task = threading.local()


def progress(step: int, total_steps: int, loss: float = 0.0, examples: int = 0, tokens_per_sec: float = 0.0) -> None:
    """Report training progress of the current task (call from inside train(); at most every 250 ms is sent)."""
    ctx = getattr(_task, "ctx", None)
    if ctx is not None:
        ctx.progress(step, total_steps, loss, examples, tokens_per_sec)


def cancelled() -> bool:
    """True once the coordinator cancelled the current task (deadline passed, round retried): stop early."""
    ctx = getattr(_task, "ctx", None)
    return ctx is not None and ctx.cancel.is_set()


class _TaskContext:
    def __init__(self, task_id: str, send: Callable[[pb.WorkerMessage], None]):
        self.task_id = task_id
        self.send = send
        self.cancel = threading.Event()
        self.reason = ""
        self.last = 0.0

    def progress(self, step: int, total: int, loss: float, examples: int, tps: float) -> None:
        now = time.monotonic()
        if now - self.last < 0.25 and step != total:
            return
        self.last = now
        loss = float(loss) if math.isfinite(float(loss)) else 0.0
        self.send(pb.WorkerMessage(progress=pb.TaskProgress(task_id=self.task_id, step=int(step), total_steps=int(total), loss=loss, tokens_per_sec=float(tps), examples=int(examples))))


# ----------------------------------------------------------------------------- helpers


def spec_dict(task: pb.Task, s: pb.TrainingSpec) -> Dict[str, Any]:
    """A task's TrainingSpec as a plain dict, plus the task's identity."""
    return {
        "task_id": task.task_id,
        "round": task.round,
        "deadline_unix_ms": task.deadline_unix_ms,
        "base_version": getattr(task, "global").version,
        "lora": {
            "r": s.lora.r,
            "alpha": s.lora.alpha,
            "dropout": s.lora.dropout,
            "target_modules": list(s.lora.target_modules),
            # PEFT's LoRA variants, under PEFT's names. A train() that does not implement one that is set
            # must raise naming it (lora.use_dora, ...), never train plain LoRA in its place.
            "use_rslora": s.lora.use_rslora,
            "use_dora": s.lora.use_dora,
            "rank_pattern": {e.key: int(e.value) for e in s.lora.rank_pattern},  # in order: the first matching key wins
            "alpha_pattern": {e.key: e.value for e in s.lora.alpha_pattern},
            "layers_to_transform": list(s.lora.layers_to_transform) or None,
            "layers_pattern": list(s.lora.layers_pattern) or None,
        },
        "lora_plus_ratio": s.lora_plus_ratio if s.lora_plus_ratio > 0 else 1.0,
        "steps": s.steps if s.HasField("steps") else None,
        "epochs": s.epochs if s.HasField("epochs") else None,
        "batch_size": s.batch_size,
        "grad_accumulation": max(1, s.grad_accumulation),
        "lr": s.lr,
        "schedule": s.schedule,
        "warmup_steps": s.warmup_steps,
        # training.schedule_scope 'run': this task is round schedule_round (1-based) of a schedule spanning
        # schedule_rounds rounds of its steps (local step s is schedule step (schedule_round - 1) * steps + s
        # of schedule_rounds * steps); 0: the schedule spans this task alone.
        "schedule_round": s.schedule_round,
        "schedule_rounds": s.schedule_rounds,
        # training.optimizer_scope 'run': keep this site's optimizer state (moments, step count) from its
        # previous train task of the run and continue from it; a train() that cannot must raise naming it.
        "keep_optimizer_state": s.keep_optimizer_state,
        "weight_decay": s.weight_decay,
        "max_grad_norm": s.max_grad_norm,
        "max_seq_len": s.max_seq_len,
        "template": s.template,
        "seed": s.seed,
        "prox_mu": s.prox_mu,
        "freeze_lora_a": s.freeze_lora_a,
    }


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _details(err: grpc.RpcError) -> str:
    d = err.details() if hasattr(err, "details") else None
    return d or str(err)


# ----------------------------------------------------------------------------- the worker


class Worker:
    """One site of a federated run. `run()` returns when the run finishes; raises FatalWorkerError when it cannot take part."""

    def __init__(
        self,
        coordinator: str,
        token: str,
        site: str,
        model_dir: str,
        train: TrainFn,
        num_train_examples: int,
        evaluate: Optional[EvalFn] = None,
        num_eval_examples: int = 0,
        credentials: Optional[grpc.ChannelCredentials] = None,
        server_name: Optional[str] = None,
        device: str = "cpu",
        backend: str = "python",
        give_up_after_s: float = 600.0,
        context: Optional[Dict[str, Any]] = None,
        bulk: bool = True,
        bulk_tls: Optional[ssl.SSLContext] = None,
    ):
        if not site.strip():
            raise ValueError("site: must not be empty (pass --name SITE)")
        if num_train_examples < 0 or num_eval_examples < 0:
            raise ValueError("example counts must be non-negative")
        self.coordinator = coordinator
        self.token = token
        self.site = site
        self.model_dir = model_dir
        self.train = train
        self.evaluate = evaluate
        self.num_train = int(num_train_examples)
        self.num_eval = int(num_eval_examples) if evaluate is not None else 0
        self.credentials = credentials
        self.server_name = server_name
        self.device = device
        self.backend = backend
        self.give_up_after_s = give_up_after_s
        self.tasks_done = 0
        self.context = dict(context or {})
        self._fingerprint: Optional[str] = None
        self._cache: Optional[Tuple[Tuple[int, int, bytes], streams.Manifest, Tensors]] = None
        # The bulk channel: off with bulk=False; under TLS it needs the SSL context of the gRPC channel's certificates.
        self.use_bulk = bulk
        self.bulk_tls = bulk_tls
        self._bulk: Optional[BulkClient] = None
        self._warned_bulk = False
        # int8_delta with error feedback: (run id, residual per tensor) of the last accepted update, in memory.
        self._feedback: Optional[Tuple[str, Dict[str, np.ndarray]]] = None

    # ------------------------------------------------------------------ connection

    def _channel(self) -> grpc.Channel:
        opts = [("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000)]
        if self.credentials is None:
            return grpc.insecure_channel(self.coordinator, options=opts)
        if self.server_name:
            opts.append(("grpc.ssl_target_name_override", self.server_name))
        return grpc.secure_channel(self.coordinator, self.credentials, options=opts)

    def run(self) -> Dict[str, Any]:
        delay, previous_id, down_since = 0.5, "", None
        while True:
            channel = self._channel()
            try:
                stub = pb_grpc.CoordinatorStub(channel)
                info = stub.GetRunInfo(pb.RunInfoRequest(join_token=self.token), timeout=30)
                self._check_run(info)
                reg = self._register(stub, previous_id)
                previous_id, delay, down_since = reg.worker_id, 0.5, None
                end = self._session(stub, reg)
                if end is not None and end.state != "stopped":
                    log.info("run %s%s; worker exiting", end.state, f": {end.message}" if end.message else "")
                    return {"state": end.state, "message": end.message, "tasks_done": self.tasks_done}
                # No RunFinished (connection lost, dropped for silence), or `stopped`: the coordinator was
                # stopped and may be resumed. Either way the run is not over: register again.
                err: Exception = ConnectionError("session closed by the coordinator" if end is None else f"coordinator stopped the run for now{f' ({end.message})' if end.message else ''}")
            except grpc.RpcError as e:
                if e.code() in _FATAL:
                    raise FatalWorkerError(_details(e)) from None
                err = e
            finally:
                channel.close()
            down_since = down_since or time.monotonic()
            if time.monotonic() - down_since > self.give_up_after_s:
                raise ConnectionError(f"coordinator {self.coordinator} unreachable for {round(self.give_up_after_s)} s, giving up (last error: {_details(err) if isinstance(err, grpc.RpcError) else err})")
            wait = delay * (0.75 + random.random() * 0.5)
            log.warning("connection to the coordinator lost or refused (%s); retrying in %.1f s", _details(err) if isinstance(err, grpc.RpcError) else err, wait)
            time.sleep(wait)
            delay = min(10.0, delay * 2)

    def _check_run(self, info: pb.RunInfo) -> None:
        if info.protocol_version != PROTOCOL_VERSION:
            raise FatalWorkerError(
                f"coordinator speaks fedtune protocol version {info.protocol_version or '0 (unset)'}, this worker ({CLIENT_NAME}) speaks version {PROTOCOL_VERSION}: "
                "use a worker built for the coordinator's version"
            )
        if info.mode != "federated":
            log.warning("run %s is in %s mode: this worker answers its step tasks with TaskFailed{unsupported}", info.run_name, info.mode)
        if self._fingerprint is None:
            log.info("fingerprinting base model %s", self.model_dir)
            try:
                self._fingerprint = model_fingerprint(self.model_dir)
            except (ModelError, OSError) as e:
                raise FatalWorkerError(f"cannot fingerprint the base model --model {self.model_dir}: {e}") from None
        if info.model_fingerprint and info.model_fingerprint != self._fingerprint:
            raise FatalWorkerError(
                f"base model fingerprint mismatch: {self.model_dir} is {self._fingerprint}, run {info.run_name!r} expects {info.model_fingerprint}; "
                "load the same base model (same config and weights) the coordinator uses"
            )

    def _register(self, stub: pb_grpc.CoordinatorStub, previous_id: str) -> pb.RegisterResponse:
        caps = pb.Capabilities(
            device=self.device,
            memory_bytes=_memory_bytes(),
            backends=[self.backend],
            model_fingerprint=self._fingerprint or "",
            num_train_examples=self.num_train,
            num_eval_examples=self.num_eval,
            client=CLIENT_NAME,
            protocol_version=PROTOCOL_VERSION,
        )
        reg = stub.Register(pb.RegisterRequest(join_token=self.token, site=self.site, capabilities=caps, previous_worker_id=previous_id), timeout=30)
        log.info("registered as %s (run %s, heartbeat %d ms, chunks %d bytes)", reg.worker_id, reg.run_id, reg.heartbeat_interval_ms, reg.chunk_bytes)
        self._bulk = self._bulk_for(reg)
        return reg

    def _bulk_for(self, reg: pb.RegisterResponse) -> Optional[BulkClient]:
        """The session's bulk channel client, or None (transfers over gRPC)."""
        if not self.use_bulk or reg.bulk_port <= 0:
            return None
        if self.credentials is not None and self.bulk_tls is None:
            self._warn_bulk("the gRPC channel uses TLS and no bulk_tls SSL context was given")
            return None
        host, sep, _ = self.coordinator.rpartition(":")
        if not sep or not host:
            self._warn_bulk(f"the coordinator address {self.coordinator!r} is not HOST:PORT")
            return None
        return BulkClient(host.strip("[]"), reg.bulk_port, reg.worker_id, reg.session_key, tls=self.bulk_tls, server_name=self.server_name)

    def _warn_bulk(self, why: str) -> None:
        if not self._warned_bulk:
            self._warned_bulk = True
            log.warning("bulk tensor channel not used: %s; transfers use the gRPC streams", why)

    def _via(self) -> str:
        return f"bulk {self._bulk.endpoint}" if self._bulk is not None else "grpc"

    # ------------------------------------------------------------------ session

    def _session(self, stub: pb_grpc.CoordinatorStub, reg: pb.RegisterResponse) -> Optional[pb.RunFinished]:
        """One session; the RunFinished that ended it, or None when the connection broke."""
        md = ((WORKER_ID_HEADER, reg.worker_id), (SESSION_KEY_HEADER, reg.session_key))
        outbox: "queue.Queue[Optional[pb.WorkerMessage]]" = queue.Queue()
        stopped = threading.Event()

        def requests() -> Iterator[pb.WorkerMessage]:
            while True:
                m = outbox.get()
                if m is None or stopped.is_set():
                    return
                yield m

        def send(m: pb.WorkerMessage) -> None:
            if not stopped.is_set():
                outbox.put(m)

        status = {"status": pb.WORKER_STATUS_IDLE, "task_id": ""}
        interval = [max(0.05, (reg.heartbeat_interval_ms or 2000) / 1000)]

        def beat() -> None:
            send(pb.WorkerMessage(heartbeat=pb.Heartbeat(status=status["status"], task_id=status["task_id"], memory_used_bytes=_rss_bytes())))

        def set_status(s: int, task_id: str) -> None:
            status["status"], status["task_id"] = s, task_id
            beat()

        def heartbeats() -> None:
            while not stopped.wait(interval[0]):
                beat()

        tasks: "queue.Queue[Optional[pb.Task]]" = queue.Queue()
        contexts: Dict[str, _TaskContext] = {}

        def work() -> None:
            while True:
                t = tasks.get()
                if t is None or stopped.is_set():
                    return
                ctx = contexts.get(t.task_id) or _TaskContext(t.task_id, send)
                if ctx.cancel.is_set():
                    contexts.pop(t.task_id, None)
                    continue
                try:
                    self._handle(stub, reg, md, t, ctx, send, set_status)
                    self.tasks_done += 1
                except Exception as e:  # a failed task is reported, the session goes on
                    msg = f"cancelled by the coordinator: {ctx.reason or 'no reason given'}" if ctx.cancel.is_set() else (_details(e) if isinstance(e, grpc.RpcError) else str(e)) or type(e).__name__
                    if not stopped.is_set():
                        log.warning("task %s failed: %s", t.task_id, msg)
                        send(pb.WorkerMessage(task_failed=pb.TaskFailed(task_id=t.task_id, message=msg, unsupported=False)))
                finally:
                    contexts.pop(t.task_id, None)
                    set_status(pb.WORKER_STATUS_IDLE, "")

        call = stub.Session(requests(), metadata=md)
        beating = threading.Thread(target=heartbeats, name="fedtune-heartbeat", daemon=True)
        worker = threading.Thread(target=work, name="fedtune-task", daemon=True)
        worker.start()
        try:
            for msg in call:
                kind = msg.WhichOneof("body")
                if kind == "accepted":
                    if msg.accepted.heartbeat_interval_ms:
                        interval[0] = max(0.05, msg.accepted.heartbeat_interval_ms / 1000)
                    log.info("session open; waiting for tasks")
                    beat()
                    if beating.ident is None:  # the coordinator speaks first; heartbeats start with its answer
                        beating.start()
                elif kind == "task":
                    contexts[msg.task.task_id] = _TaskContext(msg.task.task_id, send)
                    tasks.put(msg.task)
                elif kind == "cancel":
                    ctx = contexts.get(msg.cancel.task_id)
                    if ctx is not None:  # a task this worker still has queued or running
                        ctx.reason = msg.cancel.reason
                        ctx.cancel.set()
                        log.warning("task %s cancelled: %s", msg.cancel.task_id, msg.cancel.reason)
                elif kind == "finished":
                    return msg.finished
                # None: a message kind this client does not know (a newer coordinator): ignored.
            return None
        except grpc.RpcError as e:
            if e.code() in _FATAL:
                raise
            log.warning("session lost: %s", _details(e))
            return None
        finally:
            stopped.set()
            for ctx in list(contexts.values()):
                ctx.cancel.set()
            outbox.put(None)
            tasks.put(None)
            worker.join(timeout=5)  # a task that just uploaded finishes its bookkeeping; a running train() was told to stop
            call.cancel()

    # ------------------------------------------------------------------ tasks

    def _handle(self, stub, reg, md, task: pb.Task, ctx: _TaskContext, send, set_status) -> None:
        kind = task.WhichOneof("kind")
        if kind not in ("train", "eval"):
            send(pb.WorkerMessage(task_failed=pb.TaskFailed(task_id=task.task_id, message=f"task kind {kind or '(unknown to this client)'} is not supported by {CLIENT_NAME}", unsupported=True)))
            return
        if kind == "train" and task.train.spec.HasField("dp_sgd"):
            # Never train without the privacy the run asked for.
            send(pb.WorkerMessage(task_failed=pb.TaskFailed(task_id=task.task_id, message=f"privacy.dp_sgd is set, but {CLIENT_NAME} does not implement DP-SGD (per-example clipping and noise); use the fedtune worker's onnx trainer or remove privacy.dp_sgd", unsupported=False)))
            return
        set_status(pb.WORKER_STATUS_FETCHING, task.task_id)
        manifest, global_ = self._fetch(stub, reg, md, getattr(task, "global"))
        if ctx.cancel.is_set():
            raise TaskCancelled()
        spec = {**self.context, **spec_dict(task, getattr(task, kind).spec)}
        copy = {k: v.copy() for k, v in global_.items()}

        if kind == "eval":
            set_status(pb.WORKER_STATUS_EVALUATING, task.task_id)
            r = self.evaluate(copy, spec) if self.evaluate is not None else None
            res = pb.EvalResult(task_id=task.task_id, has_eval_data=r is not None)
            if r is not None:
                for k in ("eval_loss", "eval_accuracy"):
                    if k in r and not math.isfinite(float(r[k])):
                        raise ValueError(f"evaluate() returned {k} = {r[k]} (a finite number is required)")
                res.eval_loss = float(r.get("eval_loss", 0.0))
                res.eval_tokens = int(r.get("eval_tokens", 0))
                res.eval_examples = int(r.get("eval_examples", self.num_eval))
                if r.get("eval_accuracy") is not None:
                    res.eval_accuracy = float(r["eval_accuracy"])
            send(pb.WorkerMessage(eval_result=res))
            return

        set_status(pb.WORKER_STATUS_TRAINING, task.task_id)
        _task.ctx = ctx
        try:
            update, num_examples, metrics = self.train(copy, spec)
        finally:
            _task.ctx = None
        if ctx.cancel.is_set():
            raise TaskCancelled()
        if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer)) or not 1 <= num_examples <= self.num_train:
            raise ValueError(f"train() returned num_examples = {num_examples!r}: it must be an integer from 1 to the {self.num_train} training examples this worker registered")
        clean: Dict[str, float] = {}
        for k, v in (metrics or {}).items():
            f = float(v)
            if not math.isfinite(f):
                raise ValueError(f"train() returned metric {k} = {v} (metrics must be finite numbers)")
            clean[str(k)] = f
        body = streams.pack_update(manifest, update)
        # round.update_encoding: compressed as the task asks (int8_delta against the global it started from).
        enc, block_size, feedback = encoding.choose(task.train.encoding if task.train.HasField("encoding") else None)
        sent, kept = manifest, None
        if enc != pb.UPDATE_ENCODING_FLOAT32:
            residual = self._feedback[1] if feedback and self._feedback is not None and self._feedback[0] == reg.run_id else None
            sent, body, kept = encoding.encode(manifest, streams.unpack(manifest, body), enc, block_size, start=global_, residual=residual, error_feedback=feedback)
        set_status(pb.WORKER_STATUS_UPLOADING, task.task_id)
        up = (stub, reg, md, task, int(num_examples), clean, sent, body, enc, block_size)
        try:
            ack, via = self._upload(*up)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.DATA_LOSS:
                raise RuntimeError(f"upload refused: {_details(e)}") from None
            ack, via = self._upload(*up)  # one retry for corruption in transit
        if kept is not None:  # the residual counts only once the coordinator accepted the update it belongs to
            self._feedback = (reg.run_id, kept)
        log.info("round %d: update uploaded (%d bytes, %d examples) over %s as %s", task.round, ack.bytes, num_examples, via, encoding.NAMES[enc])

    def _fetch(self, stub, reg, md, ref: pb.AdapterRef) -> Tuple[streams.Manifest, Tensors]:
        key = (ref.version, ref.rank, bytes(ref.sha256))
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1], self._cache[2]
        what = f"global adapter v{ref.version}" + (f" rank {ref.rank}" if ref.rank else "")
        req = pb.DownloadRequest(adapter_version=ref.version, adapter_rank=ref.rank)
        via = self._via()
        fetched = None
        if self._bulk is not None:
            try:
                # The header is checked before anything is allocated for the bytes.
                header, data, digest = self._bulk.download(req, what, ref.total_bytes, check=lambda h: self._tensor_header(h, what))
                fetched = (self._tensor_header(header, what), data, digest)
            except BulkTransportError as e:
                if not e.before_connect:
                    raise
                self._bulk_unreachable(e)
        if fetched is None:
            via = "grpc"
            fetched = self._grpc_download(stub, reg, md, req, what)
        manifest, data, digest = fetched
        if ref.total_bytes and len(data) != ref.total_bytes:
            raise streams.StreamError(f"{what}: {len(data)} bytes arrived, the task announced {ref.total_bytes}")
        if ref.sha256 and digest != ref.sha256:
            raise streams.StreamError(f"{what}: digest {digest.hex()} differs from the task's {ref.sha256.hex()}")
        tensors = streams.unpack(manifest, data)
        self._cache = (key, manifest, tensors)
        log.info("%s downloaded (%d bytes, %s)", what, len(data), via)
        return manifest, tensors

    def _bulk_unreachable(self, e: BulkTransportError) -> None:
        log.warning("bulk tensor channel %s unreachable (%s); transfers use the gRPC streams", self._bulk.endpoint if self._bulk else "?", e.details())
        self._bulk = None

    @staticmethod
    def _tensor_header(h: "tensors_pb2.StreamHeader", what: str) -> streams.Manifest:
        """The manifest of a download's stream header, which must describe exactly its bytes."""
        if h.WhichOneof("content") != "tensors":
            raise streams.StreamError(f"{what}: the stream header does not describe tensors")
        manifest = streams.manifest_of(h.tensors)
        if streams.manifest_bytes(manifest) != h.total_bytes:
            raise streams.StreamError(f"{what}: header announces {h.total_bytes} bytes, its manifest needs {streams.manifest_bytes(manifest)}")
        return manifest

    def _grpc_download(self, stub, reg, md, req: pb.DownloadRequest, what: str) -> Tuple[streams.Manifest, bytes, bytes]:
        asm: Optional[streams.Assembler] = None
        manifest: streams.Manifest = []
        for msg in stub.Download(req, metadata=md):
            kind = msg.WhichOneof("body")
            if kind == "header":
                manifest = self._tensor_header(msg.header, what)
                asm = streams.Assembler(msg.header.total_bytes, reg.max_chunk_bytes, what)
            elif kind == "chunk":
                if asm is None:
                    raise streams.StreamError(f"{what}: chunk before the header")
                asm.push(msg.chunk.offset, msg.chunk.data)
            elif kind == "trailer":
                if asm is None:
                    raise streams.StreamError(f"{what}: trailer before the header")
                digest = msg.trailer.sha256
                return manifest, asm.finish(msg.trailer.total_bytes, digest), digest
        raise streams.StreamError(f"download of {what} ended before its trailer")

    def _upload(
        self, stub, reg, md, task: pb.Task, num_examples: int, metrics: Dict[str, float], manifest: streams.Manifest, body: bytes, enc: int, block_size: int
    ) -> Tuple[pb.UploadAck, str]:
        """The coordinator's ack and the transport the upload went over. ``manifest`` describes ``body`` as sent (the encoding's dtypes)."""
        chunk_bytes = reg.chunk_bytes or (1 << 20)
        if reg.max_chunk_bytes:
            chunk_bytes = min(chunk_bytes, reg.max_chunk_bytes)
        header = pb.UploadHeader(
            task_id=task.task_id,
            round=task.round,
            kind=task.train.upload_kind or pb.UPDATE_KIND_ADAPTER_WEIGHTS,
            base_version=getattr(task, "global").version,
            num_examples=num_examples,
            metrics=metrics,
            stream=tensors_pb2.StreamHeader(total_bytes=len(body), chunk_bytes=chunk_bytes, tensors=streams.wire_manifest(manifest, tensors_pb2.DTYPE_F32 if enc == pb.UPDATE_ENCODING_FLOAT32 else None)),
        )
        if enc != pb.UPDATE_ENCODING_FLOAT32:
            header.encoding = enc
            if enc == pb.UPDATE_ENCODING_INT8_DELTA:
                header.block_size = block_size
        if self._bulk is not None:
            via = self._via()
            try:
                return self._bulk.upload(header, body, f"round {task.round} update"), via
            except BulkTransportError as e:
                if not e.before_connect:
                    raise
                self._bulk_unreachable(e)

        def messages() -> Iterator[pb.UploadMessage]:
            yield pb.UploadMessage(header=header)
            for off, data in streams.chunks(body, chunk_bytes):
                yield pb.UploadMessage(chunk=tensors_pb2.Chunk(offset=off, data=data))
            yield pb.UploadMessage(trailer=tensors_pb2.StreamTrailer(total_bytes=len(body), sha256=hashlib.sha256(body).digest()))

        return stub.Upload(messages(), metadata=md), "grpc"
