"""HTTP servers on 127.0.0.1 for tests: fake metadata services and fault proxies."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler that logs nothing and replies with a text body."""

    def log_message(self, *args):
        pass

    def _reply(self, status: int, body: str = "") -> None:
        data = body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class LoopbackServer:
    """A threaded HTTP server on a free port of 127.0.0.1, run while in a ``with`` block.

    Subclasses build their handler class and pass it to ``__init__``; ``endpoint`` is the
    server's base URL.
    """

    def __init__(self, handler_class: type[BaseHTTPRequestHandler]):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler_class)
        # A request still open at shutdown must not keep the test process alive.
        self.httpd.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
