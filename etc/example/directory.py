"""
A small brig-like user directory: the local component behind each example
backend.  It answers the federated RPCs that fedserver forwards to it:

    POST /federation/get-user-by-handle   {"handle": "bob"}
    POST /federation/search-users         {"term": "bo"}

Usage: python directory.py --port PORT --domain DOMAIN --user HANDLE=NAME ...
"""

import argparse
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def make_handler(domain, users):
    class Directory(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except ValueError:
                return self.answer(400, {"label": "bad-json", "message": "body is not JSON"})
            origin = self.headers.get("Wire-Origin-Domain", "?")
            request_id = self.headers.get("Request-Id", "?")
            print(f"[{domain} directory] {self.path} from {origin} (request {request_id})", flush=True)
            if self.path == "/federation/get-user-by-handle":
                handle = body.get("handle")
                if handle not in users:
                    return self.answer(404, {"label": "not-found", "message": f"no user @{handle}"})
                return self.answer(200, self.profile(handle))
            if self.path == "/federation/search-users":
                term = str(body.get("term", ""))
                found = [self.profile(h) for h in sorted(users) if term in h]
                return self.answer(200, {"documents": found})
            return self.answer(404, {"label": "no-endpoint", "message": self.path})

        def profile(self, handle):
            return {"handle": handle, "name": users[handle], "qualified_id": f"{handle}@{domain}"}

        def answer(self, code, document):
            data = json.dumps(document).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    return Directory


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--domain", required=True)
    parser.add_argument("--user", action="append", default=[], metavar="HANDLE=NAME")
    args = parser.parse_args()
    users = dict(u.split("=", 1) for u in args.user)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(args.domain, users))
    print(f"[{args.domain} directory] listening on 127.0.0.1:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
