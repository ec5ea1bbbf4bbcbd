"""A client of Herald's HTTP API (engine/openapi/herald.json), and the checks a webhook
receiver makes of Herald's signatures. Standard library only: drop the file into a project,
or install the directory (pyproject.toml).

    from herald_client import HeraldClient, verify_hmac
    herald = HeraldClient("http://127.0.0.1:8080", token)
    herald.publish({"type": "order.created", "data": {"id": 1001}})

Every refusal raises HeraldError with the status, the error code and the field the API named.
"""

import base64
import hashlib
import hmac
import http.client
import json
import socket
import time
import urllib.error
import urllib.parse
import urllib.request

__all__ = ["HeraldClient", "HeraldError", "verify_hmac", "verify_standard"]


class HeraldError(Exception):
    """The API refused a request, or the server could not be reached (status 0)."""

    def __init__(self, status, code, message, field=None, ids=None, retry_after=None):
        said = f"{status}: {field + ': ' if field else ''}{message}"
        if ids:
            said += f"; the events' ids, to send them again under: {', '.join(ids)}"
        super().__init__(said)
        self.status, self.code, self.message, self.field = status, code, message, field
        # A publish's event ids (generated ones too) when some of its deliveries may be written
        # despite the error: send the events again under these, so none is delivered twice.
        self.ids = list(ids or [])
        # Seconds to wait before sending it again, when the server said (429, 503).
        self.retry_after = retry_after


def _segment(value):
    return urllib.parse.quote(str(value), safe="")


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Herald never redirects: a 3xx comes from something in front of it, and following it
    would turn a POST into a GET (answered 200 with nothing done) and send the token to the
    address it names."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


def _query(**params):
    kept = {k: v for k, v in params.items() if v is not None}
    return "?" + urllib.parse.urlencode(kept) if kept else ""


class HeraldClient:
    """One Herald server and one token (the admin token, or a tenant's API key).

    `timeout` is for each answer: longer than the server's own limit on a request
    (`api.request_timeout`, 60 s), so that the server, not the client, ends a slow one and
    says what became of it. A request that got no answer raises HeraldError with status 0 and
    code NO_ANSWER: it may or may not have been done (publish again with the same event ids,
    which Herald accepts once)."""

    def __init__(self, base_url, token, timeout=120):
        self.base = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def call(self, method, path, body=None):
        """Any call; returns the decoded JSON answer (None when empty)."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("authorization", f"Bearer {self.token}")
        if data is not None:
            request.add_header("content-type", "application/json")
        try:
            with _OPENER.open(request, timeout=self.timeout) as response:
                text = response.read()
                return json.loads(text) if text else None
        except urllib.error.HTTPError as e:
            if 300 <= e.code < 400:
                where = e.headers.get("location", "elsewhere")
                raise HeraldError(e.code, "REDIRECTED", f"{self.base} answered {e.code} to {where}; "
                                  "Herald does not redirect: use the address it serves on") from None
            text = e.read()
            try:
                error = json.loads(text).get("error", {})
            except ValueError:
                error = {"message": text.decode(errors="replace")}
            raise HeraldError(e.code, error.get("code", ""), error.get("message", ""), error.get("field"),
                              error.get("ids"), error.get("retry_after")) from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, (socket.timeout, TimeoutError)):
                raise HeraldError(0, "NO_ANSWER", f"{self.base} did not answer in {self.timeout} s: "
                                  "the request may or may not have been done") from None
            raise HeraldError(0, "UNREACHABLE", f"cannot reach {self.base}: {e.reason}") from None
        except (TimeoutError, socket.timeout, ConnectionError, http.client.HTTPException) as e:
            # Sent, and then no whole answer: whether it was done is not known.
            raise HeraldError(0, "NO_ANSWER", f"{self.base} gave no answer ({e!r}): "
                              "the request may or may not have been done") from None

    # events and their history
    def publish(self, event):
        """Publishes one event ({"type", "data", "id"?, "tenant"?, ...}); returns {"id", "deliveries"}."""
        return self.call("POST", "/v1/events", event)

    def publish_batch(self, events):
        """Publishes up to 1000 events atomically."""
        return self.call("POST", "/v1/events/batch", events)

    def event(self, event_id, tenant=None):
        return self.call("GET", f"/v1/events/{_segment(event_id)}" + _query(tenant=tenant))

    def events(self, type=None, tenant=None, limit=None, cursor=None):
        """A page of events, newest first: go on with cursor=page["next"] until it is None."""
        return self.call("GET", "/v1/events" + _query(type=type, tenant=tenant, limit=limit, cursor=cursor))

    def attempts(self, event=None, subscription=None, outcome=None, tenant=None, limit=None, cursor=None):
        query = _query(event=event, subscription=subscription, outcome=outcome, tenant=tenant, limit=limit, cursor=cursor)
        return self.call("GET", "/v1/attempts" + query)

    def resend(self, event_id, body=None):
        return self.call("POST", f"/v1/events/{_segment(event_id)}/resend", body or {})

    # subscriptions
    def create_subscription(self, spec):
        """Creates a subscription; the answer shows its secret, this once."""
        return self.call("POST", "/v1/subscriptions", spec)

    def subscriptions(self, tenant=None, cursor=None, limit=None, transport=None, enabled=None, breaker=None):
        """A page of subscriptions, filtered by the server: transport ("webhook", "amqp", "edge"),
        enabled (True/False), breaker ("closed", "open", "half_open"). A filtered page may be
        short, even empty, and still have a "next": go on until "next" is None."""
        enabled = None if enabled is None else ("true" if enabled else "false")
        return self.call("GET", "/v1/subscriptions" + _query(tenant=tenant, cursor=cursor, limit=limit,
                                                             transport=transport, enabled=enabled, breaker=breaker))

    def subscription(self, subscription_id):
        return self.call("GET", f"/v1/subscriptions/{_segment(subscription_id)}")

    def patch_subscription(self, subscription_id, patch):
        """A JSON Merge Patch: None clears a field."""
        return self.call("PATCH", f"/v1/subscriptions/{_segment(subscription_id)}", patch)

    def delete_subscription(self, subscription_id):
        self.call("DELETE", f"/v1/subscriptions/{_segment(subscription_id)}")

    def rotate_secret(self, subscription_id, secret=None):
        body = {} if secret is None else {"secret": secret}
        return self.call("POST", f"/v1/subscriptions/{_segment(subscription_id)}/rotate-secret", body)

    def test_subscription(self, subscription_id):
        return self.call("POST", f"/v1/subscriptions/{_segment(subscription_id)}/test", {})

    # tenants and keys (admin)
    def create_tenant(self, name):
        return self.call("POST", "/v1/tenants", {"name": name})

    def tenants(self):
        """Every tenant, with its keys' ids (the server's pages read one after another)."""
        tenants, cursor = [], None
        while True:
            page = self.call("GET", "/v1/tenants" + _query(limit=500, cursor=cursor))
            tenants += page["items"]
            cursor = page.get("next")
            if not cursor:
                return tenants

    def issue_key(self, tenant_id):
        """Returns {"id", "key"}; the key is shown this once."""
        return self.call("POST", f"/v1/tenants/{_segment(tenant_id)}/keys", {})

    def revoke_key(self, tenant_id, key_id):
        self.call("DELETE", f"/v1/tenants/{_segment(tenant_id)}/keys/{_segment(key_id)}")

    def portal_link(self, tenant_id, ttl=None):
        return self.call("POST", f"/v1/tenants/{_segment(tenant_id)}/portal", {} if ttl is None else {"ttl": ttl})

    # dead letters
    def dead_letters(self, subscription=None, tenant=None, limit=None, cursor=None):
        """A page of dead letters. A page may be short, even empty, and still have a "next"
        (each page looks at a bounded stretch of the topic): go on with cursor=page["next"]
        until it is None."""
        return self.call("GET", "/v1/dlq" + _query(subscription=subscription, tenant=tenant, limit=limit, cursor=cursor))

    def replay(self, ids=None, subscription=None):
        """Replays the dead letters `ids` (of `subscription`, when given too), or every one of
        `subscription` when no ids are given."""
        body = {}
        if ids is not None:
            body["ids"] = list(ids)
        if subscription is not None:
            body["subscription"] = subscription
        return self.call("POST", "/v1/dlq/replay", body)

    # edge devices
    def create_edge_device(self, name, tenant=None):
        return self.call("POST", "/v1/edge-devices", {"name": name, "tenant": tenant})

    def edge_devices(self):
        return self.call("GET", "/v1/edge-devices")["items"]

    def delete_edge_device(self, device_id):
        self.call("DELETE", f"/v1/edge-devices/{_segment(device_id)}")

    # the event-type catalogue
    def create_event_type(self, definition):
        return self.call("POST", "/v1/event-types", definition)

    def event_types(self):
        return self.call("GET", "/v1/event-types")["items"]

    def event_type(self, name):
        return self.call("GET", f"/v1/event-types/{_segment(name)}")

    def patch_event_type(self, name, patch):
        return self.call("PATCH", f"/v1/event-types/{_segment(name)}", patch)

    def delete_event_type(self, name):
        self.call("DELETE", f"/v1/event-types/{_segment(name)}")


def verify_hmac(secret, body, signature, encoding="base64"):
    """The `hmac` scheme (PackNet, OpenTrack, Punt Uit, the Automation API): HMAC-SHA256 of the
    body bytes exactly as received, base64 (the subscription's default `encoding`) or hex,
    compared in constant time. An empty secret (an unset variable) verifies nothing: anyone
    can sign with it, and Herald never issues one."""
    if isinstance(body, str):
        body = body.encode()
    if not secret:
        return False
    digest = hmac.new(secret.encode(), body, hashlib.sha256).digest()
    expected = digest.hex() if encoding == "hex" else base64.b64encode(digest).decode()
    # As bytes: compare_digest refuses non-ASCII text, and a header may carry anything.
    return hmac.compare_digest(expected.encode(), (signature or "").strip().encode())


def verify_standard(secret, msg_id, timestamp, body, signatures, tolerance=300, now=None):
    """The `standard` scheme (Standard Webhooks): any `v1,<base64>` in `webhook-signature` over
    `id.timestamp.body`, with the timestamp within `tolerance` seconds of now."""
    if isinstance(body, str):
        body = body.encode()
    if not secret.startswith("whsec_"):
        return False
    try:
        # Strictly: a lax decode dropped what is not base64, so the views' mask
        # ("whsec_********") came out as an empty key, with which anyone can sign.
        key = base64.b64decode(secret[len("whsec_"):], validate=True)
        ts = int(timestamp)
    except (ValueError, TypeError):
        # A missing or malformed header is a webhook that does not verify, not an error.
        return False
    if len(key) < 16:
        # Shorter than any key Herald issues (an unset variable's "whsec_" is empty).
        return False
    if abs((now if now is not None else time.time()) - ts) > tolerance:
        return False
    signed = f"{msg_id}.{ts}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    given = [s[3:].encode() for s in (signatures or "").split() if s.startswith("v1,")]
    return any(hmac.compare_digest(expected.encode(), s) for s in given)
