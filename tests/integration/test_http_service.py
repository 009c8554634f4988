"""The HTTP service on the real demo release: requests, feedback, errors, metrics, readiness,
and the process as an operator starts it (loopback, stopped by PID)."""

from __future__ import annotations

import json
import shutil
import time

import psutil
import pytest
from fastapi.testclient import TestClient

from pipelines.service import ServiceProcess
from serving.api import create_app
from serving.eventlog import iter_all
from serving.events import IdError
from tests.conftest import make_settings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def home(demo_home, tmp_path_factory):
    path = tmp_path_factory.mktemp("http") / "home"
    shutil.copytree(demo_home, path)
    return path


@pytest.fixture(scope="module")
def client(home):
    app = create_app(make_settings(home, http_max_body_bytes=4096, http_max_events=5))
    with TestClient(app) as client:
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, client.get("/readyz").json()
            time.sleep(0.1)
        yield client


def test_recommend_returns_results_with_their_signals(client):
    ready = client.get("/readyz").json()
    resp = client.post("/recommend", json={"query": "running shoes", "k": 3,
                                           "filters": {"max_price": 150, "in_stock": True}})
    assert resp.status_code == 200
    body = resp.json()
    assert body["release_id"] == ready["release_id"] and body["intent_shift"] is False
    assert len(body["results"]) == 3
    for r in body["results"]:
        assert r["price"] <= 150 and r["in_stock"] is True
        assert {"dense_cosine", "lexical", "logit"} <= set(r["signals"])
    assert [r["rank"] for r in body["results"]] == [1, 2, 3]


def test_a_click_moves_the_item_up_in_the_same_session(client, home):
    first = client.post("/recommend", json={"query": "headphones", "k": 10,
                                            "session_id": "http-s1"}).json()["results"]
    target = first[6]
    resp = client.post("/events", json={"events": [
        {"type": "impression", "session_id": "http-s1", "item_id": r["item_id"],
         "query": "headphones", "position": r["rank"], "event_id": f"http-i{r['rank']}"}
        for r in first[:6]]})
    assert resp.status_code == 413 and resp.json()["error"]["field"] == "events"  # limit is 5
    resp = client.post("/events", json={"events": [
        {"type": "impression", "session_id": "http-s1", "item_id": r["item_id"],
         "query": "headphones", "position": r["rank"], "event_id": f"http-i{r['rank']}"}
        for r in first[:4]]})
    assert resp.json() == {"recorded": 4, "duplicates": 0,
                           "event_ids": [f"http-i{i}" for i in range(1, 5)]}
    click = {"type": "click", "session_id": "http-s1", "item_id": target["item_id"],
             "query": "headphones", "position": 7, "event_id": "http-c1", "user_id": "alice"}
    assert client.post("/events", json=click).json()["recorded"] == 1
    assert client.post("/events", json=click).json() == {"recorded": 0, "duplicates": 1,
                                                         "event_ids": ["http-c1"]}
    after = client.post("/recommend", json={"query": "headphones", "k": 10,
                                            "session_id": "http-s1"}).json()["results"]
    ranks = {r["item_id"]: r["rank"] for r in after}
    assert ranks.get(target["item_id"], 99) < target["rank"]
    session = client.get("/sessions/http-s1").json()
    assert session["interactions"][0]["item_id"] == target["item_id"]
    assert session["interest_strength"] > 0
    # the events reached the durable log, the user id only as its keyed hash
    rec = client.app.state.service.recommender
    logged = [e.event for e in iter_all(rec.event_log) if e.event.session_id == "http-s1"]
    assert {e.event_id for e in logged} == {"http-i1", "http-i2", "http-i3", "http-i4",
                                            "http-c1"}
    assert all(e.user != "alice" for e in logged)
    assert "alice" not in (home / "events" / "events.db").read_bytes().decode(errors="replace")


def test_intent_shift_is_reported(client):
    first = client.post("/recommend", json={"query": "running shoes",
                                            "session_id": "http-shift"}).json()["results"]
    for i, r in enumerate(first[:3]):
        client.post("/events", json={"type": "click", "session_id": "http-shift",
                                     "item_id": r["item_id"], "position": r["rank"],
                                     "event_id": f"shift-{i}"})
    body = client.post("/recommend", json={"query": "cast iron skillet",
                                           "session_id": "http-shift"}).json()
    assert body["intent_shift"] is True
    assert client.get("/sessions/http-shift").json()["intent_shift_ts"] is not None


@pytest.mark.parametrize("method,path,body,status,kind,field", [
    ("post", "/recommend", {"query": "drill", "k": 0}, 422, "InvalidRequest", "k"),
    ("post", "/recommend", {"query": "drill", "filters": {"max_price": "cheap"}}, 422,
     "InvalidRequest", "filters.max_price"),
    ("post", "/recommend", {"query": "drill", "filters": {"colour": "red"}}, 422,
     "InvalidRequest", "filters.colour"),
    ("post", "/recommend", {"query": "drill", "filters": {"min_price": 50, "max_price": 10}},
     422, "FilterError", "filters.min_price"),
    ("post", "/recommend", {"query": "drill\ud800"}, 422, "QueryError", "query"),
    ("post", "/recommend", {"query": "   "}, 422, "QueryError", "query"),
    ("post", "/recommend", {"query": "x" * 300}, 422, "QueryError", "query"),
    ("post", "/recommend", {"session_id": "nobody"}, 422, "QueryError", "query"),
    ("post", "/recommend", {"query": "drill", "session_id": ""}, 422, "InvalidRequest",
     "session_id"),
    ("post", "/recommend", {"query": "drill", "session_id": "x" * 129}, 422, "InvalidRequest",
     "session_id"),
    ("post", "/recommend", {"query": "drill", "session_id": "s\n1"}, 422, "IdError",
     "session_id"),
    ("get", "/sessions/s%0A1", None, 422, "IdError", "session_id"),
    ("post", "/recommend", {"query": "drill\u200dbit"}, 422, "QueryError", "query"),
    ("post", "/events", {"type": "like", "session_id": "s", "item_id": "SKU-10001"}, 422,
     "InvalidRequest", "type"),
    ("post", "/events", {"events": [{"type": "click", "session_id": "s", "item_id": "i",
                                     "position": 0}]}, 422, "InvalidRequest",
     "events[0].position"),
    ("post", "/events", {"type": "click", "session_id": "s", "item_id": "i",
                         "ts": time.time() + 86400}, 422, "EventError", "ts"),
    ("post", "/events", {"type": "click", "session_id": "s", "item_id": "i",
                         "query": "a\ud800"}, 422, "EventError", "query"),
    ("post", "/events", [1, 2], 422, "InvalidRequest", None),
    ("get", "/items/NO-SUCH-ITEM", None, 404, "NotFound", "item_id"),
    ("get", "/no/such/path", None, 404, "NotFound", None),
    ("delete", "/recommend", None, 405, "MethodNotAllowed", None),
])
def test_bad_input_is_a_4xx_naming_the_field(client, method, path, body, status, kind, field):
    # sent as JSON text with \u escapes, as a client would send a lone surrogate
    resp = client.request(method.upper(), path, **(
        {"content": json.dumps(body), "headers": {"content-type": "application/json"}}
        if body is not None else {}))
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert (error["type"], error["field"]) == (kind, field), error
    assert error["message"]


def test_a_flood_from_one_session_is_refused_without_starving_another(home):
    # 1 request a second per session or user (bursts of 2), so that how fast this machine
    # answers cannot change which requests get through
    app = create_app(make_settings(home, http_rate_recommend=1.0, http_rate_events=1.0))
    with TestClient(app) as client:
        while client.get("/readyz").status_code != 200:
            time.sleep(0.1)
        bot = {"query": "headphones", "k": 5, "session_id": "flood-bot"}
        human = {"query": "headphones", "k": 5, "session_id": "flood-human"}
        statuses: dict[str, list[int]] = {"bot": [], "human": []}
        start = time.monotonic()
        for i in range(100):  # 100x the allowed pace, from one session
            statuses["bot"].append(client.post("/recommend", json=bot).status_code)
            if i % 50 == 0:
                statuses["human"].append(client.post("/recommend", json=human).status_code)
        allowed = 2 + (time.monotonic() - start) * 1.0 + 1  # burst + refill (+1 rounding)
        assert statuses["bot"][:2] == [200, 200]
        assert statuses["bot"].count(200) <= allowed and statuses["bot"].count(429) >= 90
        assert statuses["human"] == [200, 200]  # the other session is served throughout
        resp = client.post("/recommend", json=bot)
        assert resp.status_code == 429 and resp.json()["error"]["field"] == "session_id"
        assert "retry in" in resp.json()["error"]["message"]
        flood = {"events": [{"type": "impression", "session_id": f"flood-{i}",
                             "item_id": "SKU-10001", "user_id": "flooder"}]}
        codes = [client.post("/events", json={"events": [
            {**flood["events"][0], "session_id": f"flood-{i}"}]}).status_code for i in range(50)]
        assert codes[:2] == [200, 200] and codes.count(429) >= 45  # by user, across sessions
        metrics = client.get("/metrics").text
        assert 'instantrec_http_errors_total{kind="RateLimited"}' in metrics


def test_malformed_and_oversized_bodies(client):
    for path in ("/recommend", "/events"):
        resp = client.post(path, content=b"{nope", headers={"content-type": "application/json"})
        assert resp.status_code == 422 and resp.json()["error"]["field"] == "body"
        resp = client.post(path, content=b"{" + b" " * 5000 + b"}",
                           headers={"content-type": "application/json"})
        assert resp.status_code == 413 and resp.json()["error"]["type"] == "BodyTooLarge"


def test_items_facets_and_health(client):
    facets = client.get("/facets").json()
    assert facets["categories"] and facets["price"]["min"] <= facets["price"]["max"]
    some = client.post("/recommend", json={"query": "skillet", "k": 1}).json()["results"][0]
    item = client.get(f"/items/{some['item_id']}").json()
    assert {k: item[k] for k in ("title", "category", "price")} == {
        k: some[k] for k in ("title", "category", "price")}
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/openapi.json").json()["paths"].keys() >= {"/recommend", "/events"}
    docs = client.get("/docs").text
    assert "/static-offline-docs/swagger-ui-bundle.js" in docs  # no CDN
    assert client.get("/static-offline-docs/swagger-ui-bundle.js").status_code == 200
    page = client.get("/").text
    assert 'id="q"' in page and client.get("/static/app.js").status_code == 200


def test_metrics_in_prometheus_text_format(client):
    from prometheus_client.parser import text_string_to_metric_families

    client.post("/recommend", json={"query": "drill", "k": 0})
    text = client.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = {(s.labels["endpoint"], s.labels["status"]): s.value
                for s in families["instantrec_http_requests"].samples
                if s.name.endswith("_total")}
    assert requests[("/recommend", "200")] >= 1 and requests[("/recommend", "422")] >= 1
    assert requests.get(("/items/{item_id}", "200"), 0) >= 1  # the template, not each id
    latency = families["instantrec_http_request_duration_seconds"]
    assert any(s.name.endswith("_bucket") and s.labels["endpoint"] == "/recommend"
               for s in latency.samples)
    errors = {s.labels["kind"]: s.value for s in families["instantrec_http_errors"].samples
              if s.name.endswith("_total")}
    assert errors["InvalidRequest"] >= 1
    ready = client.get("/readyz").json()
    info = families["instantrec_release_info"].samples[0]
    assert info.labels["release_id"] == ready["release_id"]
    assert families["instantrec_release_age_seconds"].samples[0].value >= 0
    assert families["instantrec_event_log_lag_events"].samples[0].value >= 0
    assert "instantrec_ranker_checkpoint_seq" in families


def test_not_ready_until_a_release_is_published(demo_home, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with TestClient(create_app(make_settings(empty))) as client:
        assert client.get("/healthz").status_code == 200
        resp = client.get("/readyz")
        assert resp.status_code == 503 and resp.json()["error"]["type"] == "NotReady"
        assert client.post("/recommend", json={"query": "drill"}).status_code == 503
        shutil.copytree(demo_home / "releases", empty / "releases")
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert client.post("/recommend", json={"query": "drill"}).status_code == 200


def test_serve_binds_loopback_and_stops_by_pid(home, tmp_path):
    with ServiceProcess(home, tmp_path / "serve.log") as server:
        status, body = server.get("/readyz")
        assert status == 200 and body["items"] > 0
        listening = [c.laddr for c in psutil.Process(server.pid).net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN]
        assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening
        pid = server.pid
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_emoji_queries_are_answered(client):
    for query in ("\U0001F469\u200d\U0001F469\u200d\U0001F467 gift",
                  "\U0001F3F3\ufe0f\u200d\U0001F308 flag", "1\ufe0f\u20e3 headphones",
                  "\U0001F44D\U0001F3FD mug"):
        resp = client.post("/recommend", json={"query": query, "k": 3})
        assert resp.status_code == 200, resp.text
        assert len(resp.json()["results"]) == 3


def test_recommend_refuses_the_ids_events_refuse(client):
    # the Python API, where no request schema caps the length first: a 10 MB session id
    rec = client.app.state.service.recommender
    for bad in ("x" * 10_000_000, "x" * 129, "s\n1", ""):
        with pytest.raises(IdError) as caught:
            rec.recommend("drill", session_id=bad)
        assert caught.value.field == "session_id"
        resp = client.post("/events", json={"type": "click", "session_id": bad,
                                            "item_id": "SKU-10001"})
        assert resp.status_code in (413, 422), resp.text   # 413: over this app's 4 KiB body
        if resp.status_code == 422:
            assert resp.json()["error"]["field"] == "session_id"
    assert rec.counters["rejected_IdError"] >= 4


def test_an_event_id_resent_with_another_payload_is_a_conflict(client):
    rec = client.app.state.service.recommender
    event = {"type": "click", "session_id": "conflict-s", "item_id": "SKU-10001",
             "query": "headphones", "position": 2, "event_id": "conflict-1", "ts": time.time()}
    assert client.post("/events", json=event).json()["recorded"] == 1
    assert client.post("/events", json=event).json()["duplicates"] == 1  # a retry
    stored = [e.event for e in iter_all(rec.event_log) if e.event.event_id == "conflict-1"]
    for patch in ({"item_id": "SKU-10002"}, {"type": "purchase"}, {"session_id": "other"},
                  {"query": "drill"}, {"position": 3}, {"ts": event["ts"] - 1}):
        resp = client.post("/events", json={**event, **patch})
        assert resp.status_code == 409, (patch, resp.text)
        error = resp.json()["error"]
        assert (error["type"], error["field"]) == ("EventConflictError", "event_id")
        assert "event id 'conflict-1' was already recorded with a different payload" in (
            error["message"])
    # in a batch: the event is named, and nothing of the batch is stored
    before = rec.event_log.last_offset()
    resp = client.post("/events", json={"events": [
        {**event, "event_id": "conflict-new"}, {**event, "position": 5}]})
    assert resp.status_code == 409 and resp.json()["error"]["field"] == "events[1].event_id"
    resp = client.post("/events", json={"events": [
        {**event, "event_id": "conflict-2"}, {**event, "event_id": "conflict-2", "position": 9}]})
    assert resp.status_code == 409 and resp.json()["error"]["field"] == "events[1].event_id"
    assert rec.event_log.last_offset() == before
    # nothing was overwritten
    assert [e.event for e in iter_all(rec.event_log)
            if e.event.event_id.startswith("conflict-")] == stored
    assert rec.counters["events_conflict"] == 8
    metrics = client.get("/metrics").text
    assert 'instantrec_http_errors_total{kind="EventConflictError"} 8.0' in metrics
