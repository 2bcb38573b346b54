"""The worker's side of fedtune's bulk tensor channel (docs/protocol.md, "Bulk tensor channel").

One TCP connection (TLS when the gRPC channel has it, with the same certificates) per download or
upload to ``RegisterResponse.bulk_port`` on the coordinator's host, authenticated by the session::

    client:   "FTB1"  frame(BulkRequest{worker_id, session_key, download | upload})
    download  server: frame(BulkResponse{header})  total_bytes raw bytes  32-byte SHA-256
    upload    client: total_bytes raw bytes  32-byte SHA-256
              server: frame(BulkResponse{ack})
    refusal   server: frame(BulkResponse{code, message}), then it closes

A frame is a 4-byte little-endian length and that many bytes of the protobuf message. A download is
read straight into one buffer and hashed as it arrives; nothing of it is returned before its digest
checks. Refusals carry gRPC status codes and are raised as ``BulkStatusError``, a ``grpc.RpcError``
with ``code()`` and ``details()``, so callers treat them as they treat the gRPC calls' errors.
"""

import hashlib
import queue
import socket
import ssl
import struct
import threading
from typing import Any, Callable, Optional, Tuple

import grpc

from .gen import coordinator_pb2 as pb
from .gen import tensors_pb2

MAGIC = b"FTB1"
DIGEST_BYTES = 32
# A response frame larger than this is not a fedtune coordinator's (its frames are headers and acks).
MAX_FRAME_BYTES = 16 << 20
_READ = 4 << 20
_STATUS = {s.value[0]: s for s in grpc.StatusCode}


class BulkStatusError(grpc.RpcError):
    """A refusal from the coordinator: a gRPC status code and its reason."""

    def __init__(self, code: int, details: str):
        super().__init__(f"{_STATUS.get(code, grpc.StatusCode.UNKNOWN).name}: {details}")
        self._code = _STATUS.get(code, grpc.StatusCode.UNKNOWN)
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class BulkTransportError(grpc.RpcError):
    """The channel could not be reached or broke below the protocol: UNAVAILABLE, as a broken gRPC stream.

    ``before_connect`` is True when nothing reached the coordinator, so the transfer may go over gRPC instead.
    """

    def __init__(self, message: str, before_connect: bool):
        super().__init__(message)
        self.before_connect = before_connect
        self._details = message

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return self._details


def _frame(msg: "pb.BulkRequest") -> bytes:
    body = msg.SerializeToString()
    return MAGIC + struct.pack("<I", len(body)) + body


class BulkClient:
    """Transfers over the bulk channel of one session."""

    def __init__(
        self,
        host: str,
        port: int,
        worker_id: str,
        session_key: str,
        tls: Optional[ssl.SSLContext] = None,
        server_name: Optional[str] = None,
        connect_timeout_s: float = 10.0,
        idle_timeout_s: float = 60.0,
    ):
        self.host, self.port = host, port
        self._auth = (worker_id, session_key)
        self._tls = tls
        self._server_name = server_name
        self._connect_timeout = connect_timeout_s
        self._idle_timeout = idle_timeout_s

    @property
    def endpoint(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def _open(self) -> socket.socket:
        try:
            raw = socket.create_connection((self.host, self.port), timeout=self._connect_timeout)
        except OSError as e:
            raise BulkTransportError(f"bulk channel {self.endpoint}: {e}", True) from None
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = self._tls.wrap_socket(raw, server_hostname=self._server_name or self.host) if self._tls is not None else raw
        except (OSError, ssl.SSLError) as e:
            raw.close()
            raise BulkTransportError(f"bulk channel {self.endpoint}: TLS: {e}", True) from None
        sock.settimeout(self._idle_timeout)
        return sock

    def _recv_exact(self, sock: socket.socket, view: memoryview, what: str) -> None:
        got = 0
        while got < len(view):
            try:
                n = sock.recv_into(view[got:], min(_READ, len(view) - got))
            except socket.timeout:
                raise BulkTransportError(f"{what}: nothing arrived for {self._idle_timeout:g} s", False) from None
            except OSError as e:
                raise BulkTransportError(f"{what}: {e}", False) from None
            if n == 0:
                raise BulkTransportError(f"{what}: connection closed after {got} of {len(view)} bytes", False)
            got += n

    def _response(self, sock: socket.socket, what: str) -> "pb.BulkResponse":
        head = bytearray(4)
        self._recv_exact(sock, memoryview(head), what)
        (n,) = struct.unpack("<I", head)
        if n > MAX_FRAME_BYTES:
            raise BulkTransportError(f"{what}: response frame of {n} bytes is not a fedtune coordinator's", False)
        body = bytearray(n)
        self._recv_exact(sock, memoryview(body), what)
        msg = pb.BulkResponse.FromString(bytes(body))
        if msg.code != 0:
            raise BulkStatusError(msg.code, msg.message)
        return msg

    def _request(self, **op) -> bytes:
        return _frame(pb.BulkRequest(worker_id=self._auth[0], session_key=self._auth[1], **op))

    def download(
        self,
        req: "pb.DownloadRequest",
        what: str,
        expect_bytes: int = 0,
        check: Optional[Callable[["tensors_pb2.StreamHeader"], Any]] = None,
    ) -> Tuple["tensors_pb2.StreamHeader", bytearray, bytes]:
        """The stream header, the bytes (checked against their SHA-256) and the digest.

        Before anything is allocated for the bytes, a header announcing other than ``expect_bytes``
        (when > 0) is refused, and ``check(header)`` may raise.
        """
        sock = self._open()
        try:
            try:
                sock.sendall(self._request(download=req))
            except OSError as e:
                raise BulkTransportError(f"bulk download of {what}: {e}", False) from None
            msg = self._response(sock, f"bulk download of {what}")
            if msg.WhichOneof("body") != "header":
                raise BulkTransportError(f"bulk download of {what}: the answer carries no stream header", False)
            header = msg.header
            if expect_bytes and header.total_bytes != expect_bytes:
                raise BulkStatusError(grpc.StatusCode.DATA_LOSS.value[0], f"{what}: the stream announces {header.total_bytes} bytes, the task {expect_bytes}")
            if check is not None:
                check(header)
            data = bytearray(header.total_bytes)
            view = memoryview(data)
            h = hashlib.sha256()
            # hashlib lets go of the GIL while it hashes a large buffer, as recv_into does while it waits:
            # a second thread hashes each part while the next one arrives.
            parts: "queue.Queue[Optional[memoryview]]" = queue.Queue()

            def hash_parts() -> None:
                while True:
                    part = parts.get()
                    if part is None:
                        return
                    h.update(part)

            hasher = threading.Thread(target=hash_parts, name="fedtune-bulk-sha256", daemon=True)
            hasher.start()
            try:
                got = 0
                while got < len(data):
                    part = view[got : min(len(data), got + _READ)]
                    self._recv_exact(sock, part, f"bulk download of {what}")
                    parts.put(part)
                    got += len(part)
            finally:
                parts.put(None)
                hasher.join()
            digest = bytearray(DIGEST_BYTES)
            self._recv_exact(sock, memoryview(digest), f"bulk download of {what}")
            computed = h.digest()
            if bytes(digest) != computed:
                raise BulkStatusError(grpc.StatusCode.DATA_LOSS.value[0], f"{what}: SHA-256 mismatch (sent {bytes(digest).hex()}, computed {computed.hex()})")
            return header, data, computed
        finally:
            sock.close()

    def upload(self, header: "pb.UploadHeader", body: bytes, what: str) -> "pb.UploadAck":
        """Sends the upload (its header's stream describes ``body``); returns the coordinator's ack once it accepted it."""
        if header.stream.total_bytes != len(body):
            raise ValueError(f"bulk upload of {what}: header announces {header.stream.total_bytes} bytes, the body has {len(body)}")
        sock = self._open()
        try:
            sent_all = True
            try:
                sock.sendall(self._request(upload=header))
                view = memoryview(body)
                for off in range(0, len(view), _READ):
                    sock.sendall(view[off : off + _READ])
                sock.sendall(hashlib.sha256(body).digest())
            except OSError:
                # A refusal arrives while the body is still going out: the coordinator answers, then stops reading.
                sent_all = False
            try:
                msg = self._response(sock, f"bulk upload of {what}")
            except BulkTransportError as e:
                if not sent_all:
                    raise BulkTransportError(f"bulk upload of {what}: the connection broke while sending ({e.details()})", False) from None
                raise
            if msg.WhichOneof("body") != "ack":
                raise BulkTransportError(f"bulk upload of {what}: the answer carries no ack", False)
            return msg.ack
        finally:
            sock.close()
