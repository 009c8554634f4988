"""Injection payloads in every text a client controls: none reaches a query language (filters
are array masks over the release's columns, serving never opens the warehouse), none causes
a server error, none changes the release or what it answers."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import time
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient

from serving.api import create_app
from tests.conftest import make_settings

pytestmark = pytest.mark.integration

PAYLOADS = [
    "' OR '1'='1", "'; DROP TABLE items; --", "\" OR \"\"=\"", "1; SELECT * FROM events",
    "' UNION SELECT user, query FROM events --", "admin'--", "') OR ('a'='a", "%27%20OR%201=1",
    "1' AND sleep(5)--", "'; ATTACH DATABASE '/tmp/x.db' AS x; --", "COPY items TO '/tmp/x'",
    "$(rm -rf /)", "`id`", "; cat /etc/passwd", "| nc 127.0.0.1 9", "&& shutdown -h now",
    "../../../../etc/passwd", "..\\\\..\\\\windows\\\\win.ini", "/dev/zero", "file:///etc/shadow",
    "{{7*7}}", "${7*7}", "#{7*7}", "<%= 7*7 %>", "{{config.items()}}", "${jndi:ldap://x/a}",
    "<script>alert(1)</script>", "\"><img src=x onerror=alert(1)>", "javascript:alert(1)",
    "<svg/onload=alert(1)>", "';alert(String.fromCharCode(88,83,83))//", "\\u0000", "%00",
    "\\x00\\x01", "A" * 255, "\U0001F4A3" * 50, "\u202e\u0633\u0644\u0627\u0645", "NaN",
    "Infinity", "-1e309", "null", "[]", "{}", "__proto__", "constructor.prototype",
    "*", "%", "_", "\\\\", "\\\"", "\r\nSet-Cookie: x=1", "HTTP/1.1 200 OK", "' || pg_sleep(5) --",
]


def _digest(path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def test_injection_payloads_change_nothing_and_never_fail_the_server(demo_home, tmp_path):
    assert len(PAYLOADS) >= 50
    home = tmp_path / "home"
    shutil.copytree(demo_home, home)
    before = {name: _digest(home / name) for name in ("releases",)}
    warehouse = (home / "warehouse.duckdb").read_bytes()
    app = create_app(make_settings(home, http_rate_recommend=1e6, http_rate_events=1e6))
    with TestClient(app) as client:
        while client.get("/readyz").status_code != 200:
            time.sleep(0.1)
        control = client.post("/recommend", json={"query": "cordless drill"}).json()["results"]
        statuses: dict[int, int] = {}
        for i, payload in enumerate(PAYLOADS):
            requests = [
                ("POST", "/recommend", {"query": payload}),
                ("POST", "/recommend", {"query": "drill", "filters": {"category": payload}}),
                ("POST", "/recommend", {"query": "drill", "session_id": payload}),
                ("POST", "/events", {"type": "click", "session_id": payload, "item_id": payload,
                                     "query": payload, "user_id": payload,
                                     "event_id": f"inj-{i}"}),
                ("GET", f"/items/{quote(payload, safe='')}", None),
                ("GET", f"/sessions/{quote(payload, safe='')}", None),
            ]
            for method, path, body in requests:
                resp = client.request(method, path, json=body) if body is not None else \
                    client.request(method, path)
                statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
                assert resp.status_code < 500, (path, payload, resp.text)
                assert resp.headers["content-type"].startswith("application/json")
                assert "set-cookie" not in resp.headers
        # a filter on a category that does not exist matches nothing, whatever its text
        for payload in PAYLOADS[:10]:
            assert client.post("/recommend", json={
                "query": "drill", "filters": {"category": payload}}).json()["results"] == []
        assert client.post("/recommend", json={"query": "cordless drill"}).json()[
            "results"] == control
    assert {name: _digest(home / name) for name in ("releases",)} == before
    assert (home / "warehouse.duckdb").read_bytes() == warehouse
    assert set(statuses) <= {200, 404, 422}


def test_serving_never_opens_the_warehouse():
    code = ("import sys, serving.recommender, serving.api, serving.retrieval; "
            "assert 'duckdb' not in sys.modules, 'serving imported duckdb'")
    subprocess.run([sys.executable, "-c", code], check=True)
