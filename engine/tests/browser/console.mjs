// Drives Debian's chromium through Herald's console and tenant portal as an operator and a
// tenant would. Started by engine/tests/it/console.rs, which runs Herald and the receivers and
// passes what they are in the environment. Exits non-zero, saying which step failed, on any
// failure; saves a screenshot of each main screen in $SHOTS.
import { chromium } from "playwright-core";
import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set`);
  return v;
};
const BASE = env("HERALD_URL");
const ADMIN = env("HERALD_ADMIN_TOKEN");
const OK_URL = env("OK_URL");
const FAIL_URL = env("FAIL_URL");
const OTHER_SUB = env("OTHER_SUB");
const OTHER_EVENT = env("OTHER_EVENT");
const SHOTS = env("SHOTS");
mkdirSync(SHOTS, { recursive: true });

const WAIT = 20_000;
let step = "start";
const say = (s) => { step = s; console.log("· " + s); };

/** Calls `check` until it returns something truthy, reloading `page` between tries. */
async function until(what, page, check, ms = WAIT) {
  const deadline = Date.now() + ms;
  for (;;) {
    const got = await check().catch(() => null);
    if (got) return got;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await page.reload();
    await page.locator("main h1").waitFor({ timeout: WAIT });
  }
}

const shot = (page, name) => page.screenshot({ path: `${SHOTS}/${name}.png`, fullPage: true });

async function publish(key, event) {
  const res = await fetch(`${BASE}/v1/events`, {
    method: "POST",
    headers: { authorization: `Bearer ${key}`, "content-type": "application/json" },
    body: JSON.stringify(event),
  });
  assert.equal(res.status, 202, await res.text());
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
});
const problems = [];
function watch(page) {
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("console", (m) => {
    // 4xx answers are expected (not-found and validation checks); anything else, such as a
    // Content-Security-Policy refusal, is a defect.
    if (m.type() === "error" && !m.text().startsWith("Failed to load resource")) problems.push(m.text());
  });
}

try {
  const ctx = await browser.newContext({ viewport: { width: 1280, height: 860 } });
  const page = await ctx.newPage();
  watch(page);

  say("log in with the admin token, from the keyboard");
  await page.goto(`${BASE}/console`);
  await page.getByLabel("Admin token or tenant API key").fill("not-the-token");
  await page.keyboard.press("Enter");
  await page.getByRole("alert").filter({ hasText: "not accepted" }).waitFor({ timeout: WAIT });
  await page.getByLabel("Admin token or tenant API key").fill(ADMIN);
  await page.keyboard.press("Enter");
  await page.getByRole("heading", { name: "Overview" }).waitFor({ timeout: WAIT });
  assert.ok(!page.url().includes(ADMIN), "the token is not in the URL");
  await page.locator('[data-metric="rate"] .value').waitFor({ timeout: WAIT });
  await page.locator('[data-metric="dead"] .value').waitFor({ timeout: WAIT });

  say("create a tenant through the form and issue it a key");
  await page.getByRole("link", { name: "Tenants" }).click();
  await page.getByLabel("New tenant's name").fill("Acme Logistics");
  await page.getByRole("button", { name: "Create tenant" }).click();
  const row = page.locator("tr[data-tenant]", { hasText: "Acme Logistics" });
  await row.waitFor({ timeout: WAIT });
  const tenant = await row.getAttribute("data-tenant");
  await row.getByRole("button", { name: "Issue key" }).click();
  const key = (await page.locator("[data-secret]").textContent()).trim();
  assert.match(key, /^hk\./, "the new key is shown once");
  await row.locator("li").first().waitFor({ timeout: WAIT });
  await shot(page, "tenants");

  say("a subscription with a bad URL is refused, the field named under it");
  await page.goto(`${BASE}/console#/subscriptions/new`);
  await page.getByLabel("Tenant", { exact: true }).fill(tenant);
  await page.getByLabel("URL", { exact: true }).fill("not a url");
  await page.getByRole("button", { name: "Create subscription" }).click();
  const urlError = page.locator("#s-url-error");
  await urlError.filter({ hasText: "url" }).waitFor({ timeout: WAIT });
  await shot(page, "subscription-form");

  say("create a working and a failing subscription through the form");
  await page.getByLabel("URL", { exact: true }).fill(OK_URL);
  await page.getByLabel(/Event types/).fill("order.created");
  await page.getByRole("button", { name: "Create subscription" }).click();
  await page.locator("[data-secret]").waitFor({ timeout: WAIT });
  const okSub = (await page.locator("main h1").textContent()).trim();
  assert.match(okSub, /^sub_/);
  await page.goto(`${BASE}/console#/subscriptions/new`);
  await page.getByLabel("Tenant", { exact: true }).fill(tenant);
  await page.getByLabel("URL", { exact: true }).fill(FAIL_URL);
  await page.getByLabel(/More settings as JSON/).fill(JSON.stringify({ retry: { policy: "fixed", interval: "100ms", max_attempts: 2 } }));
  await page.getByRole("button", { name: "Create subscription" }).click();
  await page.locator("[data-secret]").waitFor({ timeout: WAIT });
  const failSub = (await page.locator("main h1").textContent()).trim();
  assert.match(failSub, /^sub_/);
  assert.notEqual(okSub, failSub);

  say("edit a subscription: only what changed is sent, its secret header kept");
  const created = await fetch(`${BASE}/v1/subscriptions`, {
    method: "POST",
    headers: { authorization: `Bearer ${ADMIN}`, "content-type": "application/json" },
    body: JSON.stringify({ url: `${OK_URL}?edited`, tenant, events: ["other.type"], headers: { "x-api-key": "s3cret-value" } }),
  }).then((r) => r.json());
  await page.goto(`${BASE}/console#/subscriptions/${created.id}/edit`);
  await page.getByLabel("Rate limit (/s)").fill("50");
  await page.getByRole("button", { name: "Save changes" }).click();
  await page.getByRole("heading", { name: created.id, exact: true }).waitFor({ timeout: WAIT });
  const edited = await fetch(`${BASE}/v1/subscriptions/${created.id}`, { headers: { authorization: `Bearer ${ADMIN}` } }).then((r) => r.json());
  assert.equal(edited.rate_limit, 50);
  assert.deepEqual(edited.events, ["other.type"]);
  const test = await fetch(`${BASE}/v1/subscriptions/${created.id}/test`, { method: "POST", headers: { authorization: `Bearer ${ADMIN}` } }).then((r) => r.json());
  assert.equal(test.delivered, true, JSON.stringify(test));

  say("the subscriptions list asks the server for the disabled ones");
  const disabled = await fetch(`${BASE}/v1/subscriptions/${created.id}`, {
    method: "PATCH",
    headers: { authorization: `Bearer ${ADMIN}`, "content-type": "application/json" },
    body: JSON.stringify({ enabled: false }),
  });
  assert.equal(disabled.status, 200, await disabled.text());
  await page.goto(`${BASE}/console#/subscriptions`);
  await page.locator(`tr[data-subscription="${okSub}"]`).waitFor({ timeout: WAIT });
  const asked = page.waitForRequest((r) => r.url().includes("/v1/subscriptions?") && r.url().includes("enabled=false"));
  await page.locator("#f-enabled").selectOption("false");
  await asked;
  await page.locator(`tr[data-subscription="${okSub}"]`).waitFor({ state: "detached", timeout: WAIT });
  assert.deepEqual(await page.locator("tr[data-subscription]").evaluateAll((rows) => rows.map((r) => r.dataset.subscription)), [created.id]);
  await page.goto(`${BASE}/console#/subscriptions?breaker=open`);
  await until("the breaker filter taken from the link", page, async () => (await page.locator("#f-breaker").inputValue()) === "open");

  await fetch(`${BASE}/v1/subscriptions/${created.id}`, { method: "DELETE", headers: { authorization: `Bearer ${ADMIN}` } });

  say("the subscriptions list filters by tenant");
  await page.goto(`${BASE}/console#/subscriptions?tenant=${tenant}`);
  await page.locator(`tr[data-subscription="${failSub}"]`).waitFor({ timeout: WAIT });
  assert.equal(await page.locator("tr[data-subscription]").count(), 2, "only Acme's two");
  await shot(page, "subscriptions");

  say("publish an event for the tenant (the platform's admin token) and watch its attempts appear");
  await publish(ADMIN, { id: "order-1001", tenant, type: "order.created", data: { order: 1001, total: "42.00" } });
  await page.goto(`${BASE}/console#/events/order-1001?tenant=${tenant}`);
  await until("order-1001 delivered to the working subscription and dead-lettered at the failing one", page, async () => {
    const ok = await page.locator(`tr[data-delivery="${okSub}"][data-state="delivered"]`).count();
    const dead = await page.locator(`tr[data-delivery="${failSub}"][data-state="dead_lettered"]`).count();
    return ok === 1 && dead === 1;
  });
  await until("the attempts on record", page, async () =>
    (await page.locator('tr[data-outcome="delivered"]').count()) === 1 &&
    (await page.locator('tr[data-outcome="failed"]').count()) === 2);
  const failed = page.locator('tr[data-outcome="failed"]').first();
  assert.match(await failed.textContent(), /500/, "the receiver's status is shown");
  await failed.getByText("Response").click();
  await failed.locator("[data-response-body]").waitFor({ timeout: WAIT });
  await shot(page, "event");

  say("the failing subscription's dead letter, replayed from the console");
  await page.goto(`${BASE}/console#/dlq?subscription=${failSub}`);
  const letter = page.locator("tr[data-dead-letter]", { hasText: "order-1001" });
  await letter.waitFor({ timeout: WAIT });
  await shot(page, "dead-letters");
  await letter.getByRole("checkbox").check();
  await page.getByRole("button", { name: "Replay selected" }).click();
  await page.locator("[data-replay-report]", { hasText: "Replayed 1" }).waitFor({ timeout: WAIT });
  await page.goto(`${BASE}/console#/events/order-1001?tenant=${tenant}`);
  await until("the replayed delivery's new attempts", page, async () =>
    (await page.locator('tr[data-outcome="failed"]').count()) > 2);

  say("the failing subscription's health and a test event");
  await page.goto(`${BASE}/console#/subscriptions/${failSub}`);
  await page.locator("#success-ratio", { hasText: "%" }).waitFor({ timeout: WAIT });
  assert.match(await page.locator("#success-ratio").textContent(), /^0 %/);
  await page.getByRole("button", { name: "Send test event" }).click();
  await page.locator("[data-test-result]", { hasText: "500" }).waitFor({ timeout: WAIT });
  await shot(page, "subscription");

  say("an edge device: created, its token shown once, not connected");
  await page.goto(`${BASE}/console#/edge`);
  await page.getByLabel("Device name").fill("Warehouse gateway");
  await page.getByLabel("Tenant").fill(tenant);
  await page.getByRole("button", { name: "Create device" }).click();
  assert.match((await page.locator("[data-secret]").textContent()).trim(), /^he\./);
  await page.locator("tr[data-device]", { hasText: "not connected" }).waitFor({ timeout: WAIT });
  await shot(page, "edge-devices");

  say("the event-type catalogue: a bad example is named, a good type is listed and deprecated");
  await page.goto(`${BASE}/console#/event-types`);
  await page.getByLabel("Name").fill("container.status.updated");
  await page.getByLabel("Description").fill("A container moved to another status.");
  await page.getByLabel("JSON Schema of data").fill('{"type":"object","required":["containerId"],"properties":{"containerId":{"type":"string"}}}');
  await page.getByLabel("Example data").fill('{"containerId": 42}');
  await page.getByRole("button", { name: "Add event type" }).click();
  await page.getByRole("alert").filter({ hasText: /^example\.containerId: / }).waitFor({ timeout: WAIT });
  await page.getByLabel("Example data").fill('{"containerId": "MSKU-1"}');
  await page.getByRole("button", { name: "Add event type" }).click();
  const typeRow = page.locator('tr[data-event-type="container.status.updated"]');
  await typeRow.waitFor({ timeout: WAIT });
  await typeRow.getByRole("button", { name: "Deprecate" }).click();
  await typeRow.getByText("deprecated", { exact: true }).waitFor({ timeout: WAIT });
  await shot(page, "event-types");

  say("the overview after traffic");
  await page.goto(`${BASE}/console#/overview`);
  await page.locator('[data-metric="dead"] .value').filter({ hasText: /^[1-9]/ }).waitFor({ timeout: WAIT });
  // A rate needs two scrapes (3 s apart); the success ratio counts what the receivers answered.
  await page.locator('[data-metric="rate"] .value').filter({ hasText: /^\d/ }).waitFor({ timeout: WAIT });
  assert.match(await page.locator('[data-metric="success"] .value').textContent(), /^\d/);
  await shot(page, "overview");

  say("mint a portal link for the tenant");
  await page.goto(`${BASE}/console#/tenants`);
  await row.getByRole("button", { name: "Portal link", exact: true }).click();
  const portalUrl = (await page.locator("[data-portal-url]").textContent()).trim();
  assert.match(portalUrl, /\/portal#token=hp\./);
  assert.ok(!portalUrl.includes(key) && !portalUrl.includes(ADMIN), "the link carries no API key");

  say("a console link carrying a token does not sign the visitor in with it");
  // Only a portal link signs in from its address: a console link with someone's key in it
  // would put the visitor in that key's tenant (a login forgery).
  const lctx = await browser.newContext({ viewport: { width: 1280, height: 860 } });
  const lured = await lctx.newPage();
  watch(lured);
  await lured.goto(`${BASE}/console#/subscriptions&token=${encodeURIComponent(key)}`);
  await lured.locator("#token").waitFor({ timeout: WAIT });
  assert.equal(await lured.evaluate(() => sessionStorage.getItem("herald.token")), null, "not signed in");
  assert.ok(!lured.url().includes("token="), "the token left the address bar");
  await lctx.close();

  say("a portal address carrying an API key or the admin token does not sign in with it");
  // Only a portal link (hp.) signs in from the address; and the portal is no operator's page.
  const pctx = await browser.newContext({ viewport: { width: 1280, height: 860 } });
  const addressed = await pctx.newPage();
  watch(addressed);
  for (const token of [key, ADMIN]) {
    await addressed.goto(`${BASE}/portal#token=${encodeURIComponent(token)}`);
    await addressed.locator("#token").waitFor({ timeout: WAIT });
    assert.equal(await addressed.evaluate(() => sessionStorage.getItem("herald.token")), null, "not signed in");
  }
  await addressed.locator("#token").fill(ADMIN);
  await addressed.getByRole("button", { name: "Sign in" }).click();
  await addressed.getByText("The portal is for tenants").waitFor({ timeout: WAIT });
  assert.equal(await addressed.getByRole("link", { name: "Tenants" }).count(), 0, "no operator screens on the portal");
  await pctx.close();

  say("the portal shows the tenant its own data only");
  const tctx = await browser.newContext({ viewport: { width: 1280, height: 860 } });
  const portal = await tctx.newPage();
  watch(portal);
  await portal.goto(portalUrl);
  await portal.getByRole("heading", { name: "Subscriptions" }).waitFor({ timeout: WAIT });
  assert.ok(!portal.url().includes("token="), "the token left the address bar");
  const linkedTenant = decodeURIComponent(portalUrl.split("#token=")[1]).split(".")[1];
  assert.equal(await portal.locator("header [data-tenant]").textContent(), linkedTenant, "whose portal it is");
  await portal.locator(`tr[data-subscription="${okSub}"]`).waitFor({ timeout: WAIT });
  assert.equal(await portal.locator(`tr[data-subscription="${OTHER_SUB}"]`).count(), 0);
  assert.equal(await portal.locator("tr[data-subscription]").count(), 2);
  assert.equal(await portal.getByRole("link", { name: "Tenants" }).count(), 0, "no operator screens");
  assert.equal(await portal.getByRole("link", { name: "Overview" }).count(), 0, "no operator screens");
  await shot(portal, "portal-subscriptions");
  await portal.goto(`${BASE}/portal#/events`);
  await portal.locator('tr[data-event="order-1001"]').waitFor({ timeout: WAIT });
  assert.equal(await portal.locator(`tr[data-event="${OTHER_EVENT}"]`).count(), 0);

  say("the portal's events page goes on past its first page");
  const batch = Array.from({ length: 55 }, (_, i) => ({ id: `bulk-${i}`, tenant, type: "container.status.updated", data: { n: i } }));
  const res = await fetch(`${BASE}/v1/events/batch`, {
    method: "POST",
    headers: { authorization: `Bearer ${ADMIN}`, "content-type": "application/json" },
    body: JSON.stringify(batch),
  });
  assert.equal(res.status, 202, await res.text());
  // Indexed (the index may trail a burst by a moment) before the page is opened.
  for (let deadline = Date.now() + WAIT; ; ) {
    const page = await (await fetch(`${BASE}/v1/events?limit=100`, { headers: { authorization: `Bearer ${key}` } })).json();
    if (page.items.filter((e) => e.id.startsWith("bulk-")).length === 55) break;
    assert.ok(Date.now() < deadline, "the 55 events indexed");
    await new Promise((r) => setTimeout(r, 100));
  }
  await portal.goto(`${BASE}/portal#/subscriptions`); // from another page: a new list
  await portal.goto(`${BASE}/portal#/events`);
  await portal.locator('tr[data-event^="bulk-"]').first().waitFor({ timeout: WAIT });
  assert.equal(await portal.locator("tr[data-event]").count(), 50, "a page of 50");
  await portal.getByRole("button", { name: "Load more" }).click();
  await portal.locator('tr[data-event="order-1001"]').waitFor({ timeout: WAIT });
  assert.ok((await portal.locator("tr[data-event]").count()) > 50, "the next page follows the first");

  say("the portal lists the event types, read only");
  await portal.goto(`${BASE}/portal#/event-types`);
  await portal.locator('tr[data-event-type="container.status.updated"]').waitFor({ timeout: WAIT });
  assert.equal(await portal.getByRole("button", { name: "Add event type" }).count(), 0, "tenants cannot change the catalogue");
  assert.equal(await portal.getByRole("button", { name: "Remove" }).count(), 0);

  say("another tenant's subscription and event answer not found in the portal");
  await portal.goto(`${BASE}/portal#/subscriptions/${OTHER_SUB}`);
  await portal.getByRole("alert").filter({ hasText: /not found/i }).waitFor({ timeout: WAIT });
  await portal.goto(`${BASE}/portal#/events/${OTHER_EVENT}`);
  await portal.getByRole("heading", { name: "Event not found" }).waitFor({ timeout: WAIT });
  await portal.goto(`${BASE}/portal#/dlq`);
  await portal.locator("tr[data-dead-letter]").first().waitFor({ timeout: WAIT }).catch(() => {});
  const dlqText = await portal.locator("main").textContent();
  assert.ok(!dlqText.includes(OTHER_SUB), "no other tenant's dead letters");

  say("the portal's token cannot call admin endpoints");
  const adminCall = await portal.evaluate(async () => {
    const token = sessionStorage.getItem("herald.token");
    const res = await fetch("/v1/tenants", { headers: { authorization: `Bearer ${token}` } });
    return { status: res.status, token };
  });
  assert.equal(adminCall.status, 403);
  assert.match(adminCall.token, /^hp\./);

  say("a tenant key signs in to the portal too");
  const kctx = await browser.newContext();
  const keyed = await kctx.newPage();
  watch(keyed);
  await keyed.goto(`${BASE}/portal`);
  await keyed.getByLabel("API key").fill(key);
  await keyed.keyboard.press("Enter");
  await keyed.locator(`tr[data-subscription="${okSub}"]`).waitFor({ timeout: WAIT });
  assert.equal(await keyed.locator(`tr[data-subscription="${OTHER_SUB}"]`).count(), 0);
  await kctx.close();

  say("on a narrow screen nothing spills sideways");
  // (The same tab: session storage, where the portal keeps its token, is per tab.)
  const narrow = portal;
  await narrow.setViewportSize({ width: 390, height: 844 });
  await narrow.goto(`${BASE}/portal#/subscriptions`);
  await narrow.locator(`tr[data-subscription="${okSub}"]`).waitFor({ timeout: WAIT });
  const spill = await narrow.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  assert.ok(spill <= 1, `the page is ${spill}px wider than the screen`);
  await shot(narrow, "portal-narrow");

  // Checks that go on after a failure, so one run names every one that fails.
  const missed = [];
  const check = async (what, fn) => {
    say(what);
    try { await fn(); } catch (e) { missed.push(`${what}: ${e.message}`); }
  };

  await check("a page other than the first keeps the filter it was loaded with", async () => {
    await portal.goto(`${BASE}/portal#/subscriptions`);
    await portal.goto(`${BASE}/portal#/events`);
    await portal.locator("tr[data-event]").nth(49).waitFor({ timeout: WAIT });
    // Typed, not submitted: "Load more" goes on with the list shown.
    await portal.getByLabel("Type").fill("order.created");
    await portal.getByRole("button", { name: "Load more" }).click();
    await portal.locator('tr[data-event="bulk-0"]').waitFor({ timeout: 5_000 });
  });

  await check("a reload while Herald answers 503 keeps the portal's session", async () => {
    const tenantList = (u) => u.pathname === "/v1/tenants";
    await portal.route(tenantList, (r) => r.fulfill({ status: 503, contentType: "application/json",
      body: JSON.stringify({ error: { code: "UNAVAILABLE", message: "busy for a moment" } }) }));
    await portal.reload();
    await portal.getByRole("alert").filter({ hasText: "busy for a moment" }).waitFor({ timeout: WAIT });
    assert.match(await portal.evaluate(() => sessionStorage.getItem("herald.token")) || "", /^hp\./, "the token kept");
    await portal.unroute(tenantList);
    await portal.getByRole("button", { name: "Try again" }).click();
    await portal.getByRole("heading", { name: "Events", exact: true }).waitFor({ timeout: WAIT });
  });

  await check("a screen that answers late does not replace the one navigated to since", async () => {
    const slow = `**/v1/subscriptions/${okSub}`;
    await page.route(slow, async (r) => { await new Promise((t) => setTimeout(t, 1500)); await r.continue(); });
    await page.goto(`${BASE}/console#/events`);
    await page.getByRole("heading", { name: "Events", exact: true }).waitFor({ timeout: WAIT });
    const answered = page.waitForResponse((r) => r.url().endsWith(`/v1/subscriptions/${okSub}`));
    await page.evaluate((id) => { location.hash = `#/subscriptions/${id}`; }, okSub);
    await page.getByRole("link", { name: "Tenants" }).click();
    await page.getByRole("heading", { name: "Tenants", exact: true }).waitFor({ timeout: WAIT });
    await answered;
    // The late screen would draw right after its answer: give it a moment to (not) do so.
    const replaced = await page.waitForFunction(() => document.querySelector("main h1")?.textContent !== "Tenants", null,
      { timeout: 1_000 }).then(() => true, () => false);
    await page.unroute(slow);
    assert.ok(!replaced, `the screen became ${await page.locator("main h1").textContent()}`);
  });

  await check("a request of a page left that fails without an answer is not drawn over the page navigated to", async () => {
    const broken = `**/v1/subscriptions/${okSub}`;
    let release;
    const held = new Promise((r) => { release = r; });
    await page.route(broken, async (r) => { await held; await r.abort("connectionreset"); });
    await page.goto(`${BASE}/console#/events`);
    await page.getByRole("heading", { name: "Events", exact: true }).waitFor({ timeout: WAIT });
    await page.evaluate((id) => { location.hash = `#/subscriptions/${id}`; }, okSub);
    await page.getByRole("link", { name: "Tenants" }).click();
    await page.getByRole("heading", { name: "Tenants", exact: true }).waitFor({ timeout: WAIT });
    release();
    const replaced = await page.waitForFunction(() => document.querySelector("main h1")?.textContent !== "Tenants", null,
      { timeout: 1_000 }).then(() => true, () => false);
    await page.unroute(broken);
    assert.ok(!replaced, `the screen became ${await page.locator("main h1").textContent()}`);
  });

  await check("a subscription created while the user moves on still shows its secret", async () => {
    let release;
    const held = new Promise((r) => { release = r; });
    await page.route("**/v1/subscriptions", async (r) => {
      if (r.request().method() === "POST") await held;
      await r.continue();
    });
    await page.goto(`${BASE}/console#/subscriptions/new`);
    await page.getByLabel("Tenant", { exact: true }).fill(tenant);
    await page.getByLabel("URL", { exact: true }).fill(`${OK_URL}?moved-on`);
    await page.getByRole("button", { name: "Create subscription" }).click();
    await page.getByRole("link", { name: "Events" }).click();
    await page.getByRole("heading", { name: "Events", exact: true }).waitFor({ timeout: WAIT });
    release();
    await page.locator("[data-secret]").waitFor({ timeout: 5_000 });
    const made = (await page.locator("main h1").textContent()).trim();
    await page.unroute("**/v1/subscriptions");
    await fetch(`${BASE}/v1/subscriptions/${made}`, { method: "DELETE", headers: { authorization: `Bearer ${ADMIN}` } });
  });

  await check("the overview says when /metrics cannot be read instead of showing zeros", async () => {
    await page.route("**/metrics", (r) => r.fulfill({ status: 403, contentType: "text/html", body: "<h1>Forbidden</h1>" }));
    await page.goto(`${BASE}/console#/overview`);
    await page.getByText(/Could not read \/metrics/).waitFor({ timeout: 5_000 });
    await page.unroute("**/metrics");
  });

  await check("signing in polls /metrics once every 3 s, not twice", async () => {
    const sctx = await browser.newContext({ viewport: { width: 1280, height: 860 } });
    const fresh = await sctx.newPage();
    watch(fresh);
    const scrapes = [];
    fresh.on("request", (r) => { if (new URL(r.url()).pathname === "/metrics") scrapes.push(Date.now()); });
    await fresh.goto(`${BASE}/console`);
    await fresh.getByLabel("Admin token or tenant API key").fill(ADMIN);
    await fresh.keyboard.press("Enter");
    await fresh.getByRole("heading", { name: "Overview" }).waitFor({ timeout: WAIT });
    for (const deadline = Date.now() + WAIT; scrapes.length < 3; ) {
      assert.ok(Date.now() < deadline, "three scrapes");
      await fresh.waitForRequest((r) => new URL(r.url()).pathname === "/metrics", { timeout: WAIT });
    }
    await sctx.close();
    assert.ok(scrapes[2] - scrapes[0] > 4_500, `three scrapes in ${scrapes[2] - scrapes[0]} ms`);
  });

  await check("an edit that does not touch the event types keeps a type with a comma in it", async () => {
    const made = await fetch(`${BASE}/v1/subscriptions`, {
      method: "POST",
      headers: { authorization: `Bearer ${ADMIN}`, "content-type": "application/json" },
      body: JSON.stringify({ url: `${OK_URL}?comma`, tenant, events: ["size,colour"] }),
    }).then((r) => r.json());
    await page.goto(`${BASE}/console#/subscriptions/${made.id}/edit`);
    await page.getByLabel("Rate limit (/s)").fill("7");
    await page.getByRole("button", { name: "Save changes" }).click();
    await page.getByRole("heading", { name: made.id, exact: true }).waitFor({ timeout: WAIT });
    const after = await fetch(`${BASE}/v1/subscriptions/${made.id}`, { headers: { authorization: `Bearer ${ADMIN}` } }).then((r) => r.json());
    await fetch(`${BASE}/v1/subscriptions/${made.id}`, { method: "DELETE", headers: { authorization: `Bearer ${ADMIN}` } });
    assert.equal(after.rate_limit, 7);
    assert.deepEqual(after.events, ["size,colour"]);
  });
  await check("a new subscription's secret stays through the next action, its warnings shown, a refused copy said", async () => {
    await page.goto(`${BASE}/console#/subscriptions/new`);
    await page.getByLabel("Tenant", { exact: true }).fill(tenant);
    await page.getByLabel("URL", { exact: true }).fill(`${OK_URL}?kept`);
    await page.getByLabel(/Event types/).fill("no.such.type");
    await page.getByRole("button", { name: "Create subscription" }).click();
    await page.locator("[data-secret]").waitFor({ timeout: WAIT });
    const made = (await page.locator("main h1").textContent()).trim();
    try {
      await page.locator("[data-warning]", { hasText: "no.such.type" }).waitFor({ timeout: 5_000 });
      await page.getByRole("button", { name: "Send test event" }).click();
      await page.locator("[data-test-result]").waitFor({ timeout: WAIT });
      assert.ok(await page.locator("[data-secret]").isVisible(), "the secret is still shown after the test event");
      // Asked first: a disabled subscription's deliveries are dead-lettered (and a portal,
      // which other sites may frame, must not disable one on a single click).
      let asked = "";
      const answer = (d) => { asked = d.message(); d.accept(); };
      page.on("dialog", answer);
      try {
        await page.getByRole("button", { name: "Disable" }).click();
        await page.getByRole("button", { name: "Enable" }).waitFor({ timeout: WAIT });
      } finally {
        page.off("dialog", answer);
      }
      assert.match(asked, /dead-letter/, `asked: ${asked}`);
      assert.ok(await page.locator("[data-secret]").isVisible(), "the secret is still shown after disabling");
      await page.evaluate(() => Object.defineProperty(navigator, "clipboard", {
        configurable: true, value: { writeText: () => Promise.reject(new Error("refused")) } }));
      await page.getByRole("button", { name: "Copy" }).click();
      await page.getByText(/Could not copy here/).waitFor({ timeout: 5_000 });
    } finally {
      await fetch(`${BASE}/v1/subscriptions/${made}`, { method: "DELETE", headers: { authorization: `Bearer ${ADMIN}` } });
    }
  });

  await check("a tenant's new key stays shown when a portal link is minted next", async () => {
    await page.goto(`${BASE}/console#/tenants`);
    const row = page.locator(`tr[data-tenant="${tenant}"]`);
    await row.getByRole("button", { name: "Issue key" }).click();
    await page.locator("[data-secret]").waitFor({ timeout: WAIT });
    await row.getByRole("button", { name: "Portal link", exact: true }).click();
    await page.locator("[data-portal-url]").waitFor({ timeout: WAIT });
    assert.match((await page.locator("[data-secret]").textContent()).trim(), /^hk\./, "the key is still shown");
  });

  await check("a subscription's attempts go on past the newest hundred", async () => {
    const admin = { authorization: `Bearer ${ADMIN}`, "content-type": "application/json" };
    const made = await fetch(`${BASE}/v1/subscriptions`, {
      method: "POST", headers: admin, body: JSON.stringify({ url: `${OK_URL}?paged`, tenant, events: ["paged.type"] }),
    }).then((r) => r.json());
    try {
      const batch = Array.from({ length: 101 }, (_, i) => ({ id: `paged-${i}`, tenant, type: "paged.type", data: { n: i } }));
      const res = await fetch(`${BASE}/v1/events/batch`, { method: "POST", headers: admin, body: JSON.stringify(batch) });
      assert.equal(res.status, 202, await res.text());
      for (let deadline = Date.now() + WAIT; ; ) {
        const first = await (await fetch(`${BASE}/v1/attempts?subscription=${made.id}&limit=100`, { headers: admin })).json();
        const rest = first.next
          ? await (await fetch(`${BASE}/v1/attempts?subscription=${made.id}&limit=100&cursor=${encodeURIComponent(first.next)}`, { headers: admin })).json()
          : { items: [] };
        if (first.items.length + rest.items.length === 101) break;
        assert.ok(Date.now() < deadline, "the 101 attempts on record");
        await new Promise((r) => setTimeout(r, 100));
      }
      await page.goto(`${BASE}/console#/subscriptions/${made.id}`);
      await page.locator("tr[data-attempt]").nth(99).waitFor({ timeout: WAIT });
      assert.equal(await page.locator("tr[data-attempt]").count(), 100, "a page of 100");
      // A response opened before "Load more" stays open (the rows were drawn anew, closed).
      await page.locator("tr[data-attempt]").first().locator("summary").click();
      await page.getByRole("button", { name: "Load more" }).click();
      await page.locator("tr[data-attempt]").nth(100).waitFor({ timeout: 5_000 });
      assert.ok(await page.locator("tr[data-attempt]").first().locator("details").evaluate((d) => d.open),
        "the response opened before “Load more” is still open");
    } finally {
      await fetch(`${BASE}/v1/subscriptions/${made.id}`, { method: "DELETE", headers: admin });
    }
  });

  await check("a portal whose storage is refused (embedded, third-party storage blocked) still signs in from its link", async () => {
    const link = await fetch(`${BASE}/v1/tenants/${tenant}/portal`, {
      method: "POST", headers: { authorization: `Bearer ${ADMIN}`, "content-type": "application/json" }, body: "{}",
    }).then((r) => r.json());
    const sctx = await browser.newContext({ viewport: { width: 1280, height: 860 } });
    await sctx.addInitScript(() => Object.defineProperty(window, "sessionStorage", {
      get() { throw new DOMException("The operation is insecure.", "SecurityError"); } }));
    try {
      const framed = await sctx.newPage();
      watch(framed);
      await framed.goto(link.url);
      await framed.getByRole("heading", { name: "Subscriptions", exact: true }).waitFor({ timeout: WAIT });
      const damaged = await sctx.newPage();
      watch(damaged);
      await damaged.goto(`${BASE}/portal#token=%E0`);
      await damaged.getByLabel("API key").waitFor({ timeout: WAIT });
    } finally {
      await sctx.close();
    }
  });
  await check("an ordered subscription's key held after a dead letter is listed on its page and skipped there", async () => {
    const admin = { authorization: `Bearer ${ADMIN}`, "content-type": "application/json" };
    const made = await fetch(`${BASE}/v1/subscriptions`, {
      method: "POST", headers: admin, body: JSON.stringify({
        url: `${FAIL_URL}?ordered`, tenant, events: ["ordered.type"],
        ordering: { key: "/data/key", on_dead_letter: "block" },
        retry: { policy: "fixed", interval: "100ms", max_attempts: 1 },
      }),
    }).then((r) => r.json());
    try {
      const batch = [0, 1].map((n) => ({ id: `ordered-${n}`, tenant, type: "ordered.type", data: { key: "k1", n } }));
      const res = await fetch(`${BASE}/v1/events/batch`, { method: "POST", headers: admin, body: JSON.stringify(batch) });
      assert.equal(res.status, 202, await res.text());
      await page.goto(`${BASE}/console#/subscriptions/${made.id}`);
      await until("key k1 held up", page, async () => (await page.locator('tr[data-blocked-key="k1"]').count()) === 1);
      assert.match(await page.locator("main").textContent(), /per key/);
      let asked = "";
      page.once("dialog", (d) => { asked = d.message(); d.accept(); });
      await page.locator('tr[data-blocked-key="k1"]').getByRole("button", { name: "Skip head" }).click();
      await page.locator("[data-skip-result]").waitFor({ timeout: WAIT });
      // The key is the publisher's text: quoted, so a key with line breaks cannot write the question.
      assert.match(asked, /key "k1"\?/, asked);
      await page.goto(`${BASE}/console#/subscriptions/${made.id}/edit`);
      assert.match(await page.getByLabel(/More settings as JSON/).inputValue(), /"on_dead_letter": "block"/, "the edit form shows the ordering");
    } finally {
      await fetch(`${BASE}/v1/subscriptions/${made.id}`, { method: "DELETE", headers: admin });
    }
  });

  await check("an hmac rotation says the new secret signs at once", async () => {
    const admin = { authorization: `Bearer ${ADMIN}`, "content-type": "application/json" };
    const made = await fetch(`${BASE}/v1/subscriptions`, {
      method: "POST", headers: admin, body: JSON.stringify({
        url: `${OK_URL}?hmac`, tenant, signature: { scheme: "hmac", header: "x-hook-signature" },
      }),
    }).then((r) => r.json());
    try {
      await page.goto(`${BASE}/console#/subscriptions/${made.id}`);
      let asked = "";
      page.once("dialog", (d) => { asked = d.message(); d.accept(); });
      await page.getByRole("button", { name: "Rotate secret" }).click();
      await page.locator("[data-secret]").waitFor({ timeout: WAIT });
      assert.match(asked, /signs at once/, "the confirmation promises no overlap");
      await page.locator("[data-warning]", { hasText: "no overlap" }).waitFor({ timeout: 5_000 });
    } finally {
      await fetch(`${BASE}/v1/subscriptions/${made.id}`, { method: "DELETE", headers: admin });
    }
  });

  await check("the default tenant is on the tenants page", async () => {
    await page.goto(`${BASE}/console#/tenants`);
    await page.locator('tr[data-tenant="default"]').waitFor({ timeout: WAIT });
  });

  await check("the admin's events list says whose list is empty", async () => {
    await page.goto(`${BASE}/console#/events`);
    await page.getByText(/No events of tenant “default” on record: name another tenant above/).waitFor({ timeout: WAIT });
  });

  await check("dead letters ticked before “Load more” are replayed with those ticked after", async () => {
    const at = new Date().toISOString();
    const entry = (id) => ({ id, event_id: `ev-${id}`, subscription: failSub, tenant, event: "order.created", attempts: 2,
      first_attempt_at: at, last_attempt_at: at, last_status: 500, last_error: "HTTP 500" });
    let sent = null;
    const list = (url) => url.pathname === "/v1/dlq";
    const replayed = (url) => url.pathname === "/v1/dlq/replay";
    await page.route(list, (r) => r.fulfill({ status: 200, contentType: "application/json", body: JSON.stringify(
      new URL(r.request().url()).searchParams.get("cursor") ? { items: [entry("dlq_b")], next: null } : { items: [entry("dlq_a")], next: "more" }) }));
    await page.route(replayed, (r) => {
      sent = r.request().postDataJSON();
      return r.fulfill({ status: 200, contentType: "application/json", body: JSON.stringify({ replayed: sent.ids, skipped: [] }) });
    });
    try {
      await page.goto(`${BASE}/console#/dlq`);
      await page.locator('tr[data-dead-letter="dlq_a"]').getByRole("checkbox").check();
      await page.getByRole("button", { name: "Load more" }).click();
      await page.locator('tr[data-dead-letter="dlq_b"]').getByRole("checkbox").check();
      assert.ok(await page.locator('tr[data-dead-letter="dlq_a"]').getByRole("checkbox").isChecked(), "the first tick is kept");
      await page.getByRole("button", { name: "Replay selected" }).click();
      await page.locator("[data-replay-report]").waitFor({ timeout: WAIT });
      assert.deepEqual([...sent.ids].sort(), ["dlq_a", "dlq_b"]);
    } finally {
      await page.unroute(list);
      await page.unroute(replayed);
    }
  });

  await check("an address that cannot be decoded shows a screen", async () => {
    await page.goto(`${BASE}/console#/events/%E0`);
    await page.getByRole("heading", { name: "Event not found" }).waitFor({ timeout: WAIT });
  });

  await check("the overview shows no negative rate when another process answers /metrics", async () => {
    let n = 0;
    const scrape = (r) => r.fulfill({ status: 200, contentType: "text/plain",
      body: `# TYPE herald_deliveries_total counter\nherald_deliveries_total{outcome="delivered"} ${n++ % 2 ? 10 : 1000}\n` });
    await page.route("**/metrics", scrape);
    try {
      await page.goto(`${BASE}/console#/overview`);
      await page.getByText(/rates start again/).waitFor({ timeout: 10_000 });
      assert.doesNotMatch(await page.locator('[data-metric="rate"] .value').textContent(), /^-/);
    } finally {
      await page.unroute("**/metrics", scrape);
    }
  });

  await check("a resend says it is queued and reads the deliveries anew", async () => {
    await page.goto(`${BASE}/console#/events/order-1001?tenant=${tenant}`);
    const reread = page.waitForResponse((r) => new URL(r.url()).pathname === "/v1/events/order-1001" && r.request().method() === "GET");
    await page.locator(`tr[data-delivery="${okSub}"]`).getByRole("button", { name: "Resend" }).click();
    await page.locator("[data-resend-result]", { hasText: "Queued again for 1" }).waitFor({ timeout: WAIT });
    await reread;
  });

  await check("a resend that queues nothing says so", async () => {
    const admin = { authorization: `Bearer ${ADMIN}`, "content-type": "application/json" };
    const other = await fetch(`${BASE}/v1/subscriptions/${OTHER_SUB}`, { headers: admin }).then((r) => r.json());
    const enabled = (on) => fetch(`${BASE}/v1/subscriptions/${OTHER_SUB}`, { method: "PATCH", headers: admin, body: JSON.stringify({ enabled: on }) });
    assert.equal((await enabled(false)).status, 200);
    try {
      await page.goto(`${BASE}/console#/events/${OTHER_EVENT}?tenant=${other.tenant}`);
      await page.getByRole("button", { name: "Resend to every subscription" }).click();
      await page.locator("[data-resend-result]", { hasText: "Nothing was queued" }).waitFor({ timeout: WAIT });
      assert.equal(await page.locator(".alert.ok").count(), 0, "not said as a success");
    } finally {
      await enabled(true);
    }
  });

  await check("a header added in the settings box beside a hidden one is saved, and one taken out is removed", async () => {
    const admin = { authorization: `Bearer ${ADMIN}`, "content-type": "application/json" };
    const made = await fetch(`${BASE}/v1/subscriptions`, {
      method: "POST", headers: admin,
      body: JSON.stringify({ url: `${OK_URL}?headers`, tenant, headers: { "x-api-key": "s3cret-value", "x-old": "1" } }),
    }).then((r) => r.json());
    try {
      await page.goto(`${BASE}/console#/subscriptions/${made.id}/edit`);
      const box = page.getByLabel(/More settings as JSON/);
      const shown = JSON.parse(await box.inputValue());
      assert.equal(shown.headers["x-api-key"], "********", "the secret header is hidden");
      shown.headers["x-new"] = "v";
      delete shown.headers["x-old"];
      await box.fill(JSON.stringify(shown, null, 2));
      await page.getByRole("button", { name: "Save changes" }).click();
      await page.getByRole("heading", { name: made.id, exact: true }).waitFor({ timeout: WAIT });
      const got = await fetch(`${BASE}/v1/subscriptions/${made.id}`, { headers: admin }).then((r) => r.json());
      assert.deepEqual(Object.keys(got.headers).sort(), ["x-api-key", "x-new"], JSON.stringify(got.headers));
      const test = await fetch(`${BASE}/v1/subscriptions/${made.id}/test`, { method: "POST", headers: admin }).then((r) => r.json());
      assert.equal(test.delivered, true, JSON.stringify(test));
    } finally {
      await fetch(`${BASE}/v1/subscriptions/${made.id}`, { method: "DELETE", headers: admin });
    }
  });

  await check("a portal link is minted for the lifetime chosen, and can be copied", async () => {
    await page.goto(`${BASE}/console#/tenants`);
    const tenantRow = page.locator(`tr[data-tenant="${tenant}"]`);
    await tenantRow.getByLabel(/Lifetime of .* portal links/).selectOption("1d");
    // A key issued meanwhile redraws the list: the choice stays.
    await tenantRow.getByRole("button", { name: "Issue key" }).click();
    await page.locator("[data-secret]").waitFor({ timeout: WAIT });
    const minted = page.waitForRequest((r) => r.url().endsWith(`/v1/tenants/${tenant}/portal`) && r.method() === "POST");
    await tenantRow.getByRole("button", { name: "Portal link", exact: true }).click();
    assert.deepEqual((await minted).postDataJSON(), { ttl: "1d" });
    await page.locator("[data-portal-url]").waitFor({ timeout: WAIT });
    await page.getByRole("status").filter({ has: page.locator("[data-portal-url]") }).getByRole("button", { name: "Copy" }).click();
    await page.getByText(/Copied\.|Could not copy here/).waitFor({ timeout: WAIT });
  });

  await check("the tenants page is read a page at a time and filtered by name; signing in reads one tenant", async () => {
    const asked = [];
    const seen = (r) => { const u = new URL(r.url()); if (u.pathname === "/v1/tenants" && r.method() === "GET") asked.push(u.search); };
    page.on("request", seen);
    try {
      await page.goto(`${BASE}/console#/tenants`);
      await page.reload();
      await page.locator("tr[data-tenant]", { hasText: "Acme Logistics" }).waitFor({ timeout: WAIT });
      assert.ok(asked.length && asked.every((q) => new URLSearchParams(q).get("limit")), `every read of the list paged: ${asked}`);
      await page.getByLabel("Find tenants by name").fill("acme log");
      await page.getByRole("button", { name: "Find" }).click();
      await page.locator('tr[data-tenant="default"]').waitFor({ state: "detached", timeout: WAIT });
      assert.equal(await page.locator("tr[data-tenant]").count(), 1, "only Acme Logistics");
    } finally {
      page.off("request", seen);
    }
  });

  await check("a save refused because the session ended keeps what was typed, and saves once signed in again", async () => {
    let refusedOnce = false;
    const ended = (r) => {
      if (r.request().method() !== "PATCH" || refusedOnce) return r.continue();
      refusedOnce = true;
      return r.fulfill({ status: 401, contentType: "application/json",
        body: JSON.stringify({ error: { code: "UNAUTHORIZED", message: "missing or invalid token" } }) });
    };
    const path = `**/v1/subscriptions/${okSub}`;
    await page.route(path, ended);
    try {
      await page.goto(`${BASE}/console#/subscriptions/${okSub}/edit`);
      await page.getByLabel("Timeout").fill("7s");
      await page.getByRole("button", { name: "Save changes" }).click();
      const again = page.getByRole("dialog");
      await again.getByText("no longer accepted").waitFor({ timeout: WAIT });
      assert.equal(await page.getByLabel("Timeout").inputValue(), "7s", "what was typed is kept");
      await again.getByLabel("Admin token or tenant API key").fill(ADMIN);
      await again.getByRole("button", { name: "Sign in" }).click();
      await again.waitFor({ state: "detached", timeout: WAIT });
      await page.getByRole("button", { name: "Save changes" }).click();
      await page.getByRole("heading", { name: okSub, exact: true }).waitFor({ timeout: WAIT });
      const admin = { authorization: `Bearer ${ADMIN}` };
      const got = await fetch(`${BASE}/v1/subscriptions/${okSub}`, { headers: admin }).then((r) => r.json());
      assert.equal(got.timeout, "7s", JSON.stringify(got));
    } finally {
      await page.unroute(path, ended);
    }
  });

  await check("a second portal link opened where the portal shows signs in as its own tenant", async () => {
    const admin = { authorization: `Bearer ${ADMIN}`, "content-type": "application/json" };
    const other = await fetch(`${BASE}/v1/subscriptions/${OTHER_SUB}`, { headers: admin }).then((r) => r.json());
    const minted = await fetch(`${BASE}/v1/tenants/${other.tenant}/portal`, { method: "POST", headers: admin, body: "{}" }).then((r) => r.json());
    const sctx = await browser.newContext({ viewport: { width: 1280, height: 860 } });
    try {
      const tab = await sctx.newPage();
      watch(tab);
      await tab.goto(portalUrl);
      await tab.locator(`tr[data-subscription="${okSub}"]`).waitFor({ timeout: WAIT });
      // The same page, another fragment: no reload, only a hashchange.
      await tab.goto(minted.url);
      await tab.locator(`tr[data-subscription="${OTHER_SUB}"]`).waitFor({ timeout: WAIT });
      assert.equal(await tab.locator("header [data-tenant]").textContent(), other.tenant, "whose portal it is now");
      assert.equal(await tab.locator(`tr[data-subscription="${okSub}"]`).count(), 0, "none of the first tenant's");
      assert.equal(await tab.evaluate(() => sessionStorage.getItem("herald.token")), minted.token);
      assert.ok(!tab.url().includes("token="), "the token left the address bar");
    } finally {
      await sctx.close();
    }
  });

  await check("a recover that stopped part-way goes on from exactly where it stopped, and says why it stopped", async () => {
    const path = `**/v1/subscriptions/${okSub}/recover`;
    const asked = [];
    const answers = [
      { queued: 10000, continue_from: "2026-12-07T10:00:00.123Z", history_lag: 0,
        stopped: { error: { code: "QUOTA_EXCEEDED", message: "the tenant's fan-out quota is full" } } },
      { queued: 5, continue_from: null, history_lag: 0 },
    ];
    await page.route(path, (r) => {
      asked.push(r.request().postDataJSON());
      r.fulfill({ status: 200, contentType: "application/json", body: JSON.stringify(answers[asked.length - 1]) });
    });
    try {
      await page.goto(`${BASE}/console#/subscriptions/${okSub}`);
      await page.getByLabel("Recover since").fill("2026-12-07T09:00");
      await page.getByLabel(/every event/).check();
      await page.getByRole("button", { name: "Recover", exact: true }).click();
      await page.getByText("the tenant's fan-out quota is full").waitFor({ timeout: WAIT });
      await page.getByRole("button", { name: /^Continue from/ }).click();
      await page.getByText("5 event(s) queued again").waitFor({ timeout: WAIT });
      assert.equal(asked.length, 2);
      assert.deepEqual(asked[1], { since: "2026-12-07T10:00:00.123Z", all: true }, "where it stopped, to the millisecond");
      assert.equal(await page.getByRole("button", { name: /^Continue from/ }).count(), 0, "nothing left to go on with");
    } finally {
      await page.unroute(path);
    }
  });

  await check("a double click resends once", async () => {
    // (A subscription's form clicked twice is refused by the API: a tenant's URL is taken once.)
    const path = "**/v1/events/order-1001/resend";
    let asked = 0;
    // Answered a moment later, as by a busy Herald: the second click lands meanwhile.
    const slow = async (r) => { asked++; await new Promise((t) => setTimeout(t, 300)); await r.continue(); };
    await page.route(path, slow);
    try {
      await page.goto(`${BASE}/console#/events/order-1001?tenant=${tenant}`);
      await page.getByRole("button", { name: "Resend to every subscription" }).waitFor({ timeout: WAIT });
      await page.evaluate(() => {
        const button = [...document.querySelectorAll("button")].find((b) => b.textContent === "Resend to every subscription");
        button.click();
        button.click();
      });
      await page.locator("[data-resend-result]").waitFor({ timeout: WAIT });
      assert.equal(asked, 1, "one resend asked for");
    } finally {
      await page.unroute(path, slow);
    }
  });

  await check("a filter that fails says so, and the list of the filter before is not left under it", async () => {
    await page.goto(`${BASE}/console#/events?tenant=${tenant}`);
    await page.locator("tr[data-event]").first().waitFor({ timeout: WAIT });
    const refused = (r) => new URL(r.request().url()).searchParams.get("type") === "order.created"
      ? r.fulfill({ status: 503, contentType: "application/json", body: JSON.stringify({ error: { code: "UNAVAILABLE", message: "the index is busy" } }) })
      : r.continue();
    await page.route("**/v1/events?*", refused);
    try {
      await page.getByLabel("Type").fill("order.created");
      await page.getByRole("button", { name: "Filter" }).click();
      await page.getByRole("alert").filter({ hasText: "the index is busy" }).waitFor({ timeout: WAIT });
      assert.equal(await page.locator("tr[data-event]").count(), 0, "the unfiltered list is gone");
    } finally {
      await page.unroute("**/v1/events?*", refused);
    }
  });

  await check("a large event's data is drawn when opened, the first part at first", async () => {
    const blob = "x".repeat(900_000);
    await publish(ADMIN, { id: "large-1", tenant, type: "order.created", data: { blob } });
    await page.goto(`${BASE}/console#/events/large-1?tenant=${tenant}`);
    await until("the large event on record", page, () => page.getByRole("heading", { name: "large-1" }).count());
    assert.ok((await page.locator("main").textContent()).length < 100_000, "not drawn before it is opened");
    await page.getByText("Data", { exact: true }).click();
    const pre = page.locator("[data-event-data]");
    await pre.waitFor({ timeout: WAIT });
    assert.ok((await pre.textContent()).length < 300_000, "the first part only");
    await page.getByRole("button", { name: /^Show all/ }).click();
    await page.waitForFunction(() => document.querySelector("[data-event-data]").textContent.length > 900_000, null, { timeout: WAIT });
  });

  await check("a page asked for before signing out is not drawn after it", async () => {
    const slow = `**/v1/subscriptions/${okSub}`;
    await page.route(slow, async (r) => { await new Promise((t) => setTimeout(t, 1500)); await r.continue(); });
    try {
      await page.goto(`${BASE}/console#/events`);
      await page.getByRole("heading", { name: "Events", exact: true }).waitFor({ timeout: WAIT });
      const answered = page.waitForResponse((r) => r.url().endsWith(`/v1/subscriptions/${okSub}`));
      await page.evaluate((id) => { location.hash = `#/subscriptions/${id}`; }, okSub);
      await page.getByRole("button", { name: "Sign out" }).click();
      await page.getByLabel("Admin token or tenant API key").waitFor({ timeout: WAIT });
      await answered;
      const drawn = await page.waitForFunction(() => !document.getElementById("token"), null, { timeout: 1_000 }).then(() => true, () => false);
      assert.ok(!drawn, `the page became ${await page.locator("main h1").textContent()}`);
    } finally {
      await page.unroute(slow);
      // Signed in again for the checks after this one.
      await page.goto(`${BASE}/console#/overview`);
      await page.getByLabel("Admin token or tenant API key").fill(ADMIN);
      await page.keyboard.press("Enter");
      await page.getByRole("heading", { name: "Overview" }).waitFor({ timeout: WAIT });
    }
  });

  // Filters the events by a type nobody sends and, before that list is in, by the bulk
  // events' type: the list shown must be the second's.
  const filterTwice = async () => {
    await page.getByLabel("Type").fill("no.such.type");
    await page.getByRole("button", { name: "Filter" }).click();
    await page.getByLabel("Type").fill("container.status.updated");
    await page.getByRole("button", { name: "Filter" }).click();
    await page.locator('tr[data-event^="bulk-"]').first().waitFor({ timeout: WAIT });
  };

  await check("a filter asked for while the list loads replaces it", async () => {
    await page.goto(`${BASE}/console#/events?tenant=${tenant}`);
    await page.locator("tr[data-event]").first().waitFor({ timeout: WAIT });
    const slow = async (r) => { await new Promise((t) => setTimeout(t, 400)); await r.continue(); };
    await page.route("**/v1/events?*", slow);
    try {
      await filterTwice();
    } finally {
      await page.unroute("**/v1/events?*", slow);
    }
  });

  await check("a filter left for a newer one that fails later does not paint its error over the newer list", async () => {
    await page.goto(`${BASE}/console#/events?tenant=${tenant}`);
    await page.locator("tr[data-event]").first().waitFor({ timeout: WAIT });
    const late = async (r) => {
      if (new URL(r.request().url()).searchParams.get("type") !== "no.such.type") return r.continue();
      await new Promise((t) => setTimeout(t, 800));
      await r.fulfill({ status: 503, contentType: "application/json", body: JSON.stringify({ error: { code: "UNAVAILABLE", message: "late and failed" } }) });
    };
    await page.route("**/v1/events?*", late);
    try {
      await filterTwice();
      const painted = await page.getByText("late and failed").waitFor({ timeout: 1_500 }).then(() => true, () => false);
      assert.ok(!painted, "the older filter's failure was drawn over the newer list");
    } finally {
      await page.unroute("**/v1/events?*", late);
    }
  });

  await check("the sign-in asked for over a portal page gives way to a new link, and to another tenant's sign-in", async () => {
    const admin = { authorization: `Bearer ${ADMIN}`, "content-type": "application/json" };
    const other = await fetch(`${BASE}/v1/subscriptions/${OTHER_SUB}`, { headers: admin }).then((r) => r.json());
    const mint = () => fetch(`${BASE}/v1/tenants/${other.tenant}/portal`, { method: "POST", headers: admin, body: "{}" }).then((r) => r.json());
    const ended = (r) => r.request().method() === "PATCH"
      ? r.fulfill({ status: 401, contentType: "application/json", body: JSON.stringify({ error: { code: "UNAUTHORIZED", message: "expired" } }) })
      : r.continue();
    const sctx = await browser.newContext({ viewport: { width: 1280, height: 860 } });
    try {
      const tab = await sctx.newPage();
      watch(tab);
      const signInAsked = async () => {
        await tab.goto(portalUrl);
        await tab.locator(`tr[data-subscription="${okSub}"]`).waitFor({ timeout: WAIT });
        await tab.route(`**/v1/subscriptions/${okSub}`, ended);
        await tab.goto(`${BASE}/portal#/subscriptions/${okSub}/edit`);
        await tab.getByLabel("Timeout").fill("9s");
        await tab.getByRole("button", { name: "Save changes" }).click();
        await tab.getByRole("dialog").waitFor({ timeout: WAIT });
        await tab.unroute(`**/v1/subscriptions/${okSub}`, ended);
      };
      // A new link opened by the embedding app while the sign-in shows.
      await signInAsked();
      await tab.goto((await mint()).url);
      await tab.locator(`tr[data-subscription="${OTHER_SUB}"]`).waitFor({ timeout: WAIT });
      assert.equal(await tab.getByRole("dialog").count(), 0, "the sign-in is gone");
      // Another tenant's link pasted into the sign-in: that tenant's page, not the first's.
      await signInAsked();
      await tab.getByRole("dialog").getByLabel("API key").fill((await mint()).url);
      await tab.getByRole("dialog").getByRole("button", { name: "Sign in" }).click();
      await tab.getByRole("dialog").waitFor({ state: "detached", timeout: WAIT });
      await tab.locator(`header [data-tenant="${other.tenant}"]`).waitFor({ timeout: WAIT });
      await tab.getByRole("alert").filter({ hasText: /not found/i }).waitFor({ timeout: WAIT });
    } finally {
      await sctx.close();
    }
  });

  await check("a tenant reached by “Load more” keeps its place when it is given a key", async () => {
    const admin = { authorization: `Bearer ${ADMIN}`, "content-type": "application/json" };
    for (let i = 0; i <= 100; i++) {
      const res = await fetch(`${BASE}/v1/tenants`, { method: "POST", headers: admin, body: JSON.stringify({ name: `Filler ${i}` }) });
      assert.equal(res.status, 201);
    }
    await page.goto(`${BASE}/console#/tenants`);
    await page.locator("tr[data-tenant]").nth(99).waitFor({ timeout: WAIT });
    await page.getByRole("button", { name: "Load more" }).click();
    const last = page.locator("tr[data-tenant]", { hasText: "Filler 100" });
    await last.waitFor({ timeout: WAIT });
    await last.getByRole("button", { name: "Issue key" }).click();
    await page.locator("[data-secret]").waitFor({ timeout: WAIT });
    await last.locator("li").first().waitFor({ timeout: WAIT });
    assert.ok((await page.locator("tr[data-tenant]").count()) > 100, "the pages loaded stay");
  });

  await check("revoking a tenant's portal links from the tenants page signs its portal out", async () => {
    await portal.goto(`${BASE}/portal#/subscriptions`);
    await portal.getByRole("heading", { name: "Subscriptions", exact: true }).waitFor({ timeout: WAIT });
    await page.goto(`${BASE}/console#/tenants`);
    let asked = "";
    page.once("dialog", (d) => { asked = d.message(); d.accept(); });
    await page.locator(`tr[data-tenant="${tenant}"]`).getByRole("button", { name: "Revoke portal links" }).click();
    await page.locator("[data-portal-revoked]").waitFor({ timeout: WAIT });
    assert.match(asked, /"Acme Logistics"/, asked);
    await portal.reload();
    await portal.getByLabel("API key").waitFor({ timeout: WAIT });
    // Told where a new link comes from, not only asked for a key it never had.
    await portal.getByRole("alert").filter({ hasText: "expired or was revoked" }).waitFor({ timeout: WAIT });
  });

  assert.deepEqual(missed, [], "every check passed");

  say("sign out forgets the token");
  await page.getByRole("button", { name: "Sign out" }).click();
  await page.getByLabel("Admin token or tenant API key").waitFor({ timeout: WAIT });
  assert.equal(await page.evaluate(() => sessionStorage.getItem("herald.token")), null);

  assert.deepEqual(problems, [], "no script errors or policy refusals in the pages");
  console.log("console and portal: every step passed");
} catch (e) {
  console.error(`FAILED at step "${step}": ${e.stack || e}`);
  if (problems.length) console.error("page problems:\n" + problems.join("\n"));
  process.exitCode = 1;
} finally {
  await browser.close();
}
