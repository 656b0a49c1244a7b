"""A small HTTP server on 127.0.0.1 that answers like a broken or hostile Label Studio.

Only for behaviour that a real server cannot be made to show (an inflated `total`, HTML
with status 200, nonsense timestamps). Routes map a path to a function of the query
parameters that returns (status, content type, body); every request is counted.
"""

from __future__ import annotations

import http.server
import json
import threading
from collections import Counter
from urllib.parse import parse_qs, urlparse

JSON = "application/json"


class HostileServer:
    def __init__(self, routes: dict):
        self.routes = {"/api/version": lambda q: (200, JSON, {"release": "1.23.2"}),
                       "/api/current-user/whoami": lambda q: (200, JSON, {"id": 1}),
                       "/api/users": lambda q: (200, JSON, [{"id": 1, "email": "a@b.c"}]),
                       **routes}
        self.requests: Counter = Counter()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the stdlib's name
                url = urlparse(self.path)
                server.requests[url.path] += 1
                route = server.routes.get(url.path)
                status, kind, body = route(parse_qs(url.query)) if route else (404, JSON, {})
                data = body if isinstance(body, bytes) else (
                    body.encode() if isinstance(body, str) else json.dumps(body).encode())
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client hung up mid-answer, as some tests make it: no traceback

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"

    def __enter__(self) -> "HostileServer":
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
