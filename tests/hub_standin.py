"""A local stand-in for the few Hugging Face hub HTTP routes an upload uses (create a repo, ask how to upload each
file, commit), so pushing is tested for real over HTTP without the network. Every file is taken as a regular
(base64) upload; a token other than the accepted one is refused with 401, as the hub does."""

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml

GOOD_TOKEN = "hf_standin_write_token"


class HubStandIn:
    def __init__(self):
        self.repos: dict[str, dict] = {}  # repo id -> {"private": bool, "files": {path: bytes}}
        self.requests: list[tuple[str, str]] = []
        self.cards: list[dict] = []  # model card metadata the stand-in validated
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                hub.requests.append(("GET", self.path))
                self._reply(404, {"error": f"not in the stand-in: {self.path}"})

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hub.requests.append(("POST", self.path))
                if self.headers.get("Authorization") != f"Bearer {GOOD_TOKEN}":
                    return self._reply(401, {"error": "Invalid username or password."})
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts == ["api", "validate-yaml"]:  # the hub checks a model card's metadata before a commit
                    content = json.loads(body)["content"]
                    try:
                        meta = yaml.safe_load(content.split("---\n")[1]) if content.startswith("---\n") else None
                        assert isinstance(meta, dict)
                    except Exception as e:  # noqa: BLE001
                        return self._reply(400, {"error": f"Invalid metadata in README.md: {e}"})
                    hub.cards.append(meta)
                    return self._reply(200, {"errors": [], "warnings": []})
                if parts[:3] == ["api", "repos", "create"]:
                    req = json.loads(body)
                    repo = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
                    private = req.get("private", req.get("visibility") == "private")
                    hub.repos.setdefault(repo, {"private": private, "files": {}})
                    return self._reply(200, {"url": f"{hub.url}/{repo}", "name": repo})
                if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "preupload":
                    files = json.loads(body)["files"]
                    return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                       for f in files]})
                if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "commit":
                    repo = f"{parts[2]}/{parts[3]}"
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            hub.repos[repo]["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    return self._reply(200, {"commitUrl": f"{hub.url}/{repo}/commit/{'0' * 40}", "commitOid": "0" * 40,
                                             "success": True})
                return self._reply(404, {"error": f"not in the stand-in: {self.path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
