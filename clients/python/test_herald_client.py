"""The Python client against a real Herald server (HERALD_URL, HERALD_TOKEN: the admin token),
with a receiver of its own on loopback that checks Herald's signatures with the helpers.
Run by engine/tests/it/clients.rs, which starts the server."""

import base64
import hashlib
import hmac
import http.server
import json
import os
import threading
import time
import unittest

from herald_client import HeraldClient, HeraldError, verify_hmac, verify_standard


class Receiver(http.server.BaseHTTPRequestHandler):
    got = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        Receiver.got.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
        self.send_response(500 if self.path.startswith("/fail") else 200)
        self.end_headers()

    def log_message(self, *args):
        pass


def until(what, check, seconds=20):
    deadline = time.time() + seconds
    while time.time() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class LiveServer(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.herald = HeraldClient(os.environ["HERALD_URL"], os.environ["HERALD_TOKEN"])
        cls.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
        threading.Thread(target=cls.server.serve_forever, daemon=True).start()
        cls.hooks = f"http://127.0.0.1:{cls.server.server_address[1]}"

    @classmethod
    def tearDownClass(cls):
        cls.server.shutdown()

    def test_a_tenant_subscribes_and_every_webhook_verifies(self):
        herald = self.herald
        tenant = herald.create_tenant("Python Co")
        key = herald.issue_key(tenant["id"])
        self.assertTrue(key["key"].startswith("hk."))
        hmac_sub = herald.create_subscription({
            "url": self.hooks + "/hmac", "tenant": tenant["id"], "secret": "py-secret",
            "signature": {"scheme": "hmac", "header": "x-hook-signature", "encoding": "base64"},
        })
        standard_sub = herald.create_subscription({"url": self.hooks + "/standard", "tenant": tenant["id"]})
        accepted = herald.publish({"id": "py-1", "type": "order.created", "tenant": tenant["id"], "data": {"n": 1}})
        self.assertEqual(accepted, {"id": "py-1", "deliveries": 2})

        def both():
            by_path = {p: (h, b) for p, h, b in Receiver.got}
            return by_path if {"/hmac", "/standard"} <= by_path.keys() else None
        by_path = until("both webhooks", both)
        headers, body = by_path["/hmac"]
        self.assertTrue(verify_hmac("py-secret", body, headers["x-hook-signature"]), "base64 is the default")
        self.assertTrue(verify_hmac("py-secret", body, headers["x-hook-signature"], "base64"))
        self.assertFalse(verify_hmac("py-secret", body.replace(b'"n":1', b'"n":2'), headers["x-hook-signature"], "base64"))
        self.assertFalse(verify_hmac("py-secret", body, "é", "base64"), "any header value is an answer, not an error")
        headers, body = by_path["/standard"]
        secret = standard_sub["secret"]
        args = (headers["webhook-id"], headers["webhook-timestamp"], body, headers["webhook-signature"])
        self.assertTrue(verify_standard(secret, *args))
        self.assertFalse(verify_standard(secret, "py-2", *args[1:]))
        self.assertFalse(verify_standard(secret, args[0], None, body, args[3]), "no timestamp: not verified, no error")
        # A secret Herald never issues (an unset variable: "whsec_", "", the views' mask)
        # verifies nothing: anyone can sign with an empty key.
        ts = headers["webhook-timestamp"]
        empty = "v1," + base64.b64encode(hmac.new(b"", f"py-1.{ts}.".encode() + body, hashlib.sha256).digest()).decode()
        for unset in ["whsec_", "whsec_********", "whsec_c2hvcnQ="]:
            self.assertFalse(verify_standard(unset, "py-1", ts, body, empty), unset)
        forged = base64.b64encode(hmac.new(b"", body, hashlib.sha256).digest()).decode()
        self.assertFalse(verify_hmac("", body, forged), "an empty hmac secret")

        # The history, through the tenant's own key: its subscriptions only, the attempt on record.
        own = HeraldClient(herald.base, key["key"])
        self.assertEqual({s["id"] for s in own.subscriptions()["items"]}, {hmac_sub["id"], standard_sub["id"]})
        self.assertEqual({s["id"] for s in own.subscriptions(transport="webhook", enabled=True)["items"]},
                         {hmac_sub["id"], standard_sub["id"]})
        self.assertEqual(own.subscriptions(enabled=False)["items"], [])
        attempts = until("the attempts on record", lambda: own.attempts(event="py-1")["items"] if len(own.attempts(event="py-1")["items"]) == 2 else None)
        self.assertEqual({a["outcome"] for a in attempts}, {"delivered"})
        self.assertEqual(own.event("py-1")["deliveries"][0]["state"], "delivered")

    def test_refusals_name_the_field(self):
        with self.assertRaises(HeraldError) as refused:
            self.herald.create_subscription({"url": "not a url"})
        self.assertEqual((refused.exception.status, refused.exception.field), (400, "url"))
        with self.assertRaises(HeraldError) as ajar:
            self.herald.subscriptions(breaker="ajar")
        self.assertEqual((ajar.exception.status, ajar.exception.field), (400, "breaker"))
        with self.assertRaises(HeraldError) as missing:
            self.herald.subscription("sub_nope")
        self.assertEqual((missing.exception.status, missing.exception.code), (404, "NOT_FOUND"))
        with self.assertRaises(HeraldError) as away:
            HeraldClient("http://127.0.0.1:9", "x", timeout=2).tenants()
        self.assertEqual(away.exception.status, 0)

    def test_every_tenant_is_listed_past_the_server_s_page(self):
        made = [self.herald.create_tenant(f"Many Co {n}")["id"] for n in range(60)]
        listed = [t["id"] for t in self.herald.tenants()]
        self.assertEqual([t for t in made if t not in listed], [])

    def test_a_replay_of_chosen_ids_replays_those_only(self):
        herald = self.herald
        sub = herald.create_subscription({"url": self.hooks + "/fail", "retry": {"policy": "fixed", "interval": "10ms", "max_attempts": 1}})
        for i in range(3):
            herald.publish({"id": f"py-dl-{i}", "type": "T", "data": i})
        entries = until("three dead letters", lambda: (lambda items: items if len(items) == 3 else None)(
            herald.dead_letters(subscription=sub["id"])["items"]))
        pages, cursor = [], None
        while True:
            page = herald.dead_letters(subscription=sub["id"], limit=2, cursor=cursor)
            pages.append(page["items"])
            cursor = page["next"]
            if cursor is None:
                break
        self.assertEqual(sorted(e["id"] for p in pages for e in p), sorted(e["id"] for e in entries), "paged through")
        first = entries[0]["id"]
        report = herald.replay(ids=[first], subscription=sub["id"])
        self.assertEqual(report["replayed"], [first], "the ids chosen, not the whole subscription")

    def test_the_event_type_catalogue(self):
        herald = self.herald
        herald.create_event_type({"name": "py.created", "schema": {"type": "object", "required": ["id"]}, "validate": True})
        self.assertIn("py.created", [t["name"] for t in herald.event_types()])
        with self.assertRaises(HeraldError) as refused:
            herald.publish({"type": "py.created", "data": {}})
        self.assertEqual(refused.exception.field, "data")
        herald.delete_event_type("py.created")


class NotHerald(unittest.TestCase):
    """What the client does with servers that are not Herald, or do not answer."""

    def test_a_redirect_is_refused_not_followed(self):
        seen = []

        class Redirects(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                seen.append((self.command, self.path, self.headers.get("authorization")))
                self.send_response(301)
                self.send_header("location", "/elsewhere/v1/events")
                self.send_header("content-length", "0")
                self.end_headers()

            do_GET = do_POST

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirects)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            client = HeraldClient(f"http://127.0.0.1:{server.server_address[1]}", "hk.secret", timeout=5)
            with self.assertRaises(HeraldError) as refused:
                client.publish({"type": "T", "data": {}})
            self.assertEqual((refused.exception.status, refused.exception.code), (301, "REDIRECTED"))
            self.assertEqual(seen, [("POST", "/v1/events", "Bearer hk.secret")], "not followed")
        finally:
            server.shutdown()

    def test_no_answer_is_a_herald_error_saying_it_may_have_been_done(self):
        import socket
        listener = socket.create_server(("127.0.0.1", 0))
        accepted = []
        threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True).start()
        try:
            client = HeraldClient(f"http://127.0.0.1:{listener.getsockname()[1]}", "x", timeout=1)
            with self.assertRaises(HeraldError) as silent:
                client.publish({"type": "T", "data": {}})
            self.assertEqual((silent.exception.status, silent.exception.code), (0, "NO_ANSWER"))
        finally:
            listener.close()

    def test_an_error_naming_the_events_ids_and_a_wait_keeps_them(self):
        # A publish the log refused part-way names its events' ids (generated ones too) to
        # send them again under, and a throttled one the seconds to wait: the error kept only
        # the message, so a producer that gave no ids could only send them again under new
        # ones, delivered twice. The stand-in answers as Herald documents.
        class Refuses(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("content-length", 0)))
                error = {"code": "UNAVAILABLE", "message": "the log refused the write", "ids": ["evt_1", "evt_2"],
                         "retry_after": 2}
                body = json.dumps({"error": error}).encode()
                self.send_response(503)
                self.send_header("content-type", "application/json")
                self.send_header("retry-after", "2")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuses)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            client = HeraldClient(f"http://127.0.0.1:{server.server_address[1]}", "hk.secret", timeout=5)
            with self.assertRaises(HeraldError) as refused:
                client.publish_batch([{"type": "T", "data": {}}, {"type": "T", "data": {}}])
            self.assertEqual(refused.exception.ids, ["evt_1", "evt_2"])
            self.assertEqual(refused.exception.retry_after, 2)
            self.assertIn("evt_1", str(refused.exception))
        finally:
            server.shutdown()


if __name__ == "__main__":
    unittest.main()
