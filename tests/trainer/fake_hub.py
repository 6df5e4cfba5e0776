"""A local stand-in for the Hugging Face Hub's write API, enough for HfApi.create_repo + upload_folder: repo
creation, preupload (every file "regular": sent inline in the commit) and the NDJSON commit, which it unpacks
into a directory per repo. Used because no real hub can serve in a test (no network); it checks the requests
huggingface_hub really sends (auth header, paths, file contents)."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class FakeHub:
    def __init__(self, root: Path, token: str):
        self.root, self.token = root, token
        self.requests: list[tuple[str, str]] = []
        self.repos: dict[str, dict] = {}
        self.validated: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _reply(self, code: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                hub.requests.append(("POST", self.path))
                if self.headers.get("Authorization") != f"Bearer {hub.token}":
                    return self._reply(401, {"error": "Invalid credentials"})
                if self.path == "/api/repos/create":
                    payload = json.loads(body)
                    repo = f"{payload['organization']}/{payload['name']}" if payload.get("organization") \
                        else payload["name"]
                    hub.repos.setdefault(repo, {"private": payload.get("private", payload.get("visibility") == "private"),
                                                "payload": payload})
                    return self._reply(200, {"url": f"{hub.endpoint}/{repo}", "name": repo})
                if self.path == "/api/validate-yaml":  # the hub checks a README's metadata before the commit
                    import yaml
                    content = json.loads(body)["content"]
                    hub.validated.append(content)
                    try:
                        meta = yaml.safe_load(content.split("---")[1]) if content.startswith("---") else None
                    except (yaml.YAMLError, IndexError) as exc:
                        return self._reply(400, {"errors": [{"message": str(exc)}]})
                    if not isinstance(meta, dict):
                        return self._reply(400, {"errors": [{"message": "no metadata"}]})
                    return self._reply(200, {"warnings": []})
                parts = self.path.split("?")[0].strip("/").split("/")
                if len(parts) >= 6 and parts[:2] == ["api", "models"] and parts[4] == "preupload":
                    files = json.loads(body)["files"]
                    return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                        "shouldIgnore": False} for f in files]})
                if len(parts) >= 6 and parts[:2] == ["api", "models"] and parts[4] == "commit":
                    repo = f"{parts[2]}/{parts[3]}"
                    target = hub.root / repo
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item.get("key") == "file":
                            path = target / item["value"]["path"]
                            path.parent.mkdir(parents=True, exist_ok=True)
                            path.write_bytes(base64.b64decode(item["value"]["content"]))
                    oid = hashlib.sha1(body).hexdigest()
                    return self._reply(200, {"success": True, "commitOid": oid,
                                             "commitUrl": f"{hub.endpoint}/{repo}/commit/{oid}"})
                return self._reply(404, {"error": f"fake hub: no route {self.path}"})

            def do_GET(self):
                hub.requests.append(("GET", self.path))
                return self._reply(404, {"error": f"fake hub: no route {self.path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
