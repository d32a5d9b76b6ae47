"""The HTTP front of `scarlet serve`: request limits checked before Triton sees a byte.

Triton 2.51's HTTP frontend allocates an input's declared size (shape x dtype) while parsing a JSON request,
before any check against the model's config: one request declaring `[1000000,3,224,224]` with one value makes
it allocate 600 GB and abort (`std::bad_alloc`), taking the server down. Its gRPC frontend and HTTP binary
tensors check the batch size and byte size first. So the public HTTP port is this guard; Triton's own HTTP
port listens on a loopback port of its own, and the guard forwards only requests that pass:

- a body of at most `max_body` bytes (Content-Length required; gzip/deflate bodies are inflated to that bound);
- every input's shape made of non-negative integers, and its JSON `data` holding exactly as many values as
  the shape declares, or its `binary_data_size` exactly the shape's bytes: no declared size exceeds what the
  request carries, so no request can make Triton allocate more than a constant times its body.

Refusals are JSON `{"error": ...}` with status 400/411/413, as Triton answers.
"""
from __future__ import annotations

import http.client
import json
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# A batch of 32 FP32 3x224x224 images is 19 MB as binary tensor data; JSON of the same is ~3x. 64 MiB holds
# the first and a JSON batch of 8; clients with more send binary data (tritonclient's default) or use gRPC.
MAX_BODY = 64 << 20
# Bytes of request bodies held at once, all connections together: the guard's memory bound.
MAX_BODIES_BYTES = 512 << 20
_DTYPE_BYTES = {"BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "BF16": 2, "UINT32": 4,
                "INT32": 4, "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8}
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection",
               "content-length", "content-encoding"}


class Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _count_values(data: Any) -> int:
    """Leaf values of a (nested) JSON list, without recursion (a deeply nested list must not overflow the stack)."""
    n, stack = 0, [data]
    while stack:
        v = stack.pop()
        if isinstance(v, list):
            stack.extend(v)
        else:
            n += 1
    return n


def check_infer_header(header: Any, binary_bytes: int) -> None:
    """Refuse (Refused(400)) an inference request whose inputs declare more than the request carries."""
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise Refused(400, "an inference request is a JSON object with an `inputs` list")
    for inp in header["inputs"]:
        if not isinstance(inp, dict):
            raise Refused(400, "each input is a JSON object with name, shape, datatype and data")
        name, shape, dtype = inp.get("name"), inp.get("shape"), inp.get("datatype")
        if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 1 << 62 for d in shape):
            raise Refused(400, f"input {name!r}: shape must be a list of non-negative integers, got {shape!r}")
        elements = 1
        for d in shape:
            elements *= d
        params = inp.get("parameters") if isinstance(inp.get("parameters"), dict) else {}
        if "shared_memory_region" in params:
            continue  # Triton checks the region's registered size; nothing is allocated from the declaration
        if "binary_data_size" in params:
            size = params["binary_data_size"]
            if type(size) is not int or not 0 <= size <= binary_bytes:
                raise Refused(400, f"input {name!r}: binary_data_size {size!r} is not within the "
                                   f"{binary_bytes} bytes of binary data the request carries")
            if dtype in _DTYPE_BYTES and elements * _DTYPE_BYTES[dtype] != size:
                raise Refused(400, f"input {name!r}: shape {shape} of {dtype} is {elements * _DTYPE_BYTES[dtype]} "
                                   f"bytes but binary_data_size is {size}")
            continue
        carried = _count_values(inp.get("data", []))
        if carried != elements:
            raise Refused(400, f"input {name!r}: shape {shape} declares {elements} values but `data` holds {carried}")


class _ByteBudget:
    """A semaphore counted in bytes: a request reserves its body's size before reading it."""

    def __init__(self, total: int) -> None:
        self.total, self.used = total, 0
        self._cond = threading.Condition()

    def reserve(self, n: int) -> "_Reservation":
        with self._cond:
            self._cond.wait_for(lambda: self.used + n <= self.total)
            self.used += n
        return _Reservation(self, n)

    def release(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()


class _Reservation:
    def __init__(self, budget: _ByteBudget, n: int) -> None:
        self.budget, self.n = budget, n

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        self.budget.release(self.n)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as clients of Triton expect
    server: "_GuardServer"

    def log_message(self, *args: Any) -> None:  # Triton logs requests itself; stderr is the user's terminal
        pass

    def _refuse(self, status: int, message: str, close: bool = False) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def _length(self) -> int:
        if self.headers.get("Transfer-Encoding", "").lower() not in ("", "identity"):
            raise Refused(411, "send the request with a Content-Length, not chunked")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise Refused(400, "Content-Length is not an integer") from None
        if not 0 <= length <= self.server.max_body:
            raise Refused(413, f"request body of {length} bytes exceeds the {self.server.max_body} byte limit; "
                               "send binary tensor data or use gRPC")
        return length

    def _body(self, length: int) -> bytes:
        body = self.rfile.read(length)
        encoding = self.headers.get("Content-Encoding", "").lower()
        if encoding in ("gzip", "deflate"):
            inflate = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
            try:
                body = inflate.decompress(body, self.server.max_body + 1)
            except zlib.error as e:
                raise Refused(400, f"the {encoding} body does not inflate: {e}") from None
            if len(body) > self.server.max_body:
                raise Refused(413, f"the {encoding} body inflates beyond the {self.server.max_body} byte limit")
        elif encoding not in ("", "identity"):
            raise Refused(400, f"Content-Encoding {encoding} is not supported; send gzip, deflate or none")
        return body

    def _check(self, body: bytes) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if self.command != "POST" or not path.endswith("/infer"):
            return
        header_len = self.headers.get("Inference-Header-Content-Length")
        try:
            n = len(body) if header_len is None else int(header_len)
        except ValueError:
            raise Refused(400, "Inference-Header-Content-Length is not an integer") from None
        if not 0 <= n <= len(body):
            raise Refused(400, f"Inference-Header-Content-Length {n} is outside the {len(body)} byte body")
        try:
            header = json.loads(body[:n])
        except (ValueError, RecursionError) as e:
            raise Refused(400, f"the request header is not JSON: {e}") from None
        check_infer_header(header, len(body) - n)

    def _forward(self) -> None:
        try:
            length = self._length()
        except Refused as e:
            self._refuse(e.status, str(e), close=True)
            return
        # A compressed body may inflate up to max_body: reserve that much for it.
        compressed = self.headers.get("Content-Encoding", "").lower() not in ("", "identity")
        with self.server.bodies.reserve(self.server.max_body if compressed else length):
            try:
                body = self._body(length)
                self._check(body)
            except Refused as e:
                # The unread rest of a refused body would be taken for the next request: close the connection.
                self._refuse(e.status, str(e), close=True)
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP and k.lower() != "host"}
            headers["Content-Length"] = str(len(body))
            try:
                resp = self._upstream_request(body, headers)
            except OSError as e:
                self._refuse(502, f"Triton is not answering: {e}", close=True)
                return
        data = resp.read()
        self.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in _HOP_BY_HOP:
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _upstream_request(self, body: bytes, headers: dict[str, str]) -> http.client.HTTPResponse:
        # One upstream connection per client connection (this handler), reopened once if Triton closed it.
        for attempt in (0, 1):
            conn = getattr(self, "_conn", None)
            if conn is None:
                conn = self._conn = http.client.HTTPConnection(*self.server.upstream, timeout=300)
            try:
                conn.request(self.command, self.path, body=body if body or self.command == "POST" else None,
                             headers=headers)
                return conn.getresponse()
            except (http.client.HTTPException, ConnectionError):
                conn.close()
                self._conn = None
                if attempt:
                    raise OSError("the connection to Triton closed") from None
        raise AssertionError("unreachable")

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _forward

    def finish(self) -> None:
        conn = getattr(self, "_conn", None)
        if conn is not None:
            conn.close()
        super().finish()


class _GuardServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, listen: tuple[str, int], upstream: tuple[str, int], max_body: int) -> None:
        super().__init__(listen, _Handler)
        self.upstream = upstream
        self.max_body = max_body
        self.bodies = _ByteBudget(max(MAX_BODIES_BYTES, max_body))


class HttpGuard:
    """Listen on `listen`, forward checked requests to Triton's HTTP port `upstream`, in a background thread."""

    def __init__(self, listen: tuple[str, int], upstream: tuple[str, int], max_body: int = MAX_BODY) -> None:
        self._server = _GuardServer(listen, upstream, max_body)
        self._thread = threading.Thread(target=self._server.serve_forever, name="scarlet-http-guard", daemon=True)

    def start(self) -> "HttpGuard":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
