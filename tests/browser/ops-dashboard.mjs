// Browser test of the ops dashboard: the real system (`target/debug/orderflow all`) on its own
// database and RabbitMQ vhost, a stock step made to fail so an order's stock.reserve is
// dead-lettered and the order cancelled, then headless Chromium (Debian's chromium, driven by
// playwright-core) logs in, sees the funnel and the dead letter, inspects and replays it, and
// finds the order's terminal state in its timeline; it also sees a growing queue highlighted,
// cancels a stuck order and replays a failure group from the dashboard. Screenshots go to
// ci-output/.
//
//   node tests/browser/ops-dashboard.mjs      (scripts/browser-test.sh installs what it needs)
//
// Needs PostgreSQL on 127.0.0.1:5432 (postgres, trust), RabbitMQ on 5672 with the management
// API on 15672 (guest/guest), psql, /usr/bin/chromium and a built binary. Prints one line per
// step and, last, `N passed, M failed`; exits non-zero on any failure. Everything it creates
// (process, database, vhost, browser profile) is removed at the end, also on failure.

import { execFile, spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

import { chromium } from 'playwright-core';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const BIN = process.env.ORDERFLOW_BIN || path.join(ROOT, 'target/debug/orderflow');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const OUT = path.join(ROOT, 'ci-output');
const PG_BASE = 'postgres://postgres@127.0.0.1:5432';
const MGMT = 'http://127.0.0.1:15672';
const MGMT_AUTH = `Basic ${Buffer.from('guest:guest').toString('base64')}`;
const OVERALL_TIMEOUT_MS = 5 * 60 * 1000;
const PRODUCT = 'Cursed lamp';

const run = promisify(execFile);
const suffix = crypto.randomBytes(6).toString('hex');
const db = `orderflow_browser_${suffix}`;
const vhost = `orderflow-browser-${suffix}`;
const jwtSecret = crypto.randomBytes(24).toString('hex');

// --- A tiny step runner -----------------------------------------------------------------------

const results = [];

async function step(name, fn) {
  const started = Date.now();
  try {
    await fn();
    results.push({ name, ok: true });
    console.log(`ok   ${name} (${Date.now() - started} ms)`);
  } catch (err) {
    results.push({ name, ok: false });
    console.log(`FAIL ${name}: ${err && err.stack ? err.stack : err}`);
    throw err;
  }
}

function assert(condition, message) {
  if (!condition) throw new Error(message);
}

async function eventually(what, check, timeoutMs = 60_000, everyMs = 250) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      const value = await check();
      if (value) return value;
    } catch (err) {
      last = err;
    }
    if (Date.now() > deadline) {
      throw new Error(`${what}: not within ${timeoutMs / 1000} s${last ? ` (last error: ${last.message})` : ''}`);
    }
    await new Promise((resolve) => setTimeout(resolve, everyMs));
  }
}

// --- The system under test --------------------------------------------------------------------

const system = { child: null, base: null, exited: null, log: path.join(OUT, 'browser-orderflow.log') };
const env = {
  ...process.env,
  DATABASE_URL: `${PG_BASE}/${db}`,
  AMQP_URL: `amqp://guest:guest@127.0.0.1:5672/${encodeURIComponent(vhost)}`,
  JWT_SECRET: jwtSecret,
  ORDER_TIMEOUT: '120s',
  TREND_SAMPLE_INTERVAL: '1s',
  RUST_LOG: process.env.RUST_LOG || 'info',
};

function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.on('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

async function mgmt(method, apiPath, body) {
  const res = await fetch(`${MGMT}${apiPath}`, {
    method,
    headers: { authorization: MGMT_AUTH, 'content-type': 'application/json' },
    body: body ? JSON.stringify(body) : undefined,
  });
  if (!res.ok && !(method === 'DELETE' && res.status === 404)) {
    throw new Error(`RabbitMQ management ${method} ${apiPath}: ${res.status} ${await res.text()}`);
  }
}

/** Runs `sql`; returns what it printed (unaligned, tuples only). */
async function psql(url, sql) {
  const { stdout } = await run('psql', [url, '-v', 'ON_ERROR_STOP=1', '-q', '-A', '-t', '-c', sql]);
  return stdout;
}

async function api(method, apiPath, { token, body, headers = {} } = {}) {
  const res = await fetch(`${system.base}${apiPath}`, {
    method,
    headers: {
      ...(token ? { authorization: `Bearer ${token}` } : {}),
      ...(body ? { 'content-type': 'application/json' } : {}),
      ...headers,
    },
    body: body ? JSON.stringify(body) : undefined,
  });
  const text = await res.text();
  let json = null;
  try {
    json = JSON.parse(text);
  } catch {
    // not JSON
  }
  return { status: res.status, json, text };
}

async function token(args) {
  const { stdout } = await run(BIN, ['token', ...args], { env });
  return stdout.trim();
}

async function startSystem() {
  assert(fs.existsSync(BIN), `${BIN} is missing: cargo build --bin orderflow`);
  await mgmt('PUT', `/api/vhosts/${encodeURIComponent(vhost)}`);
  await mgmt('PUT', `/api/permissions/${encodeURIComponent(vhost)}/guest`, {
    configure: '.*',
    write: '.*',
    read: '.*',
  });
  const port = await freePort();
  system.base = `http://127.0.0.1:${port}`;
  const log = fs.openSync(system.log, 'w');
  system.child = spawn(BIN, ['all'], {
    env: { ...env, HTTP_ADDR: `127.0.0.1:${port}` },
    stdio: ['ignore', log, log],
  });
  system.exited = new Promise((resolve) => system.child.on('exit', (code, signal) => resolve({ code, signal })));
  fs.closeSync(log);
  await eventually('the API answers /readyz', async () => {
    if (system.child.exitCode !== null) {
      throw new Error(`orderflow exited with ${system.child.exitCode}; see ${system.log}`);
    }
    return (await api('GET', '/readyz')).status === 200;
  });
}

async function stopSystem() {
  const { child } = system;
  if (!child || child.exitCode !== null || child.signalCode !== null) return;
  child.kill('SIGTERM');
  const stopped = await Promise.race([
    system.exited,
    new Promise((resolve) => setTimeout(() => resolve(null), 40_000)),
  ]);
  if (!stopped) {
    console.log('orderflow did not stop within 40 s of SIGTERM; killing it');
    child.kill('SIGKILL');
    await system.exited;
  }
}

const breakStock = `
  CREATE FUNCTION break_stock() RETURNS trigger LANGUAGE plpgsql AS $$
  BEGIN
    IF NEW.name = '${PRODUCT}' AND NEW.stock < OLD.stock THEN RAISE EXCEPTION 'injected failure'; END IF;
    RETURN NEW;
  END $$;
  CREATE TRIGGER break_stock BEFORE UPDATE ON products FOR EACH ROW EXECUTE FUNCTION break_stock();`;
const healStock = 'DROP TRIGGER IF EXISTS break_stock ON products; DROP FUNCTION IF EXISTS break_stock();';

// --- Cleanup, also on failure or interruption --------------------------------------------------

let browser = null;
let profileDir = null;
let cleanedUp = false;

async function cleanup() {
  if (cleanedUp) return;
  cleanedUp = true;
  const attempt = async (what, fn) => {
    try {
      await fn();
    } catch (err) {
      console.log(`cleanup: ${what} failed: ${err.message}`);
    }
  };
  await attempt('closing the browser', async () => browser && (await browser.close()));
  await attempt('removing the browser profile', async () => profileDir && fs.rmSync(profileDir, { recursive: true, force: true }));
  await attempt('stopping orderflow', stopSystem);
  await attempt('deleting the vhost', () => mgmt('DELETE', `/api/vhosts/${encodeURIComponent(vhost)}`));
  await attempt('dropping the database', () => psql(`${PG_BASE}/postgres`, `DROP DATABASE IF EXISTS "${db}" WITH (FORCE)`));
}

for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, async () => {
    console.log(`interrupted (${signal}); cleaning up`);
    await cleanup();
    process.exit(130);
  });
}

// --- The scenario -----------------------------------------------------------------------------

async function scenario() {
  fs.mkdirSync(OUT, { recursive: true });
  const ctx = {};

  await step('start orderflow on its own database and vhost', startSystem);

  await step('an order whose stock step keeps failing is dead-lettered and cancelled', async () => {
    ctx.admin = await token(['--user', '1', '--admin']);
    ctx.user = await token(['--user', '42']);
    const product = await api('POST', '/api/admin/products', {
      token: ctx.admin,
      body: { name: PRODUCT, price: 1000, stock: 5 },
    });
    assert(product.status === 201, `create product: ${product.status} ${product.text}`);
    const charge = await api('POST', '/api/balance/charge', { token: ctx.user, body: { amount: 5000 } });
    assert(charge.status === 200, `charge: ${charge.status} ${charge.text}`);
    await psql(env.DATABASE_URL, breakStock);
    const order = await api('POST', '/api/orders', {
      token: ctx.user,
      body: { items: [{ productId: product.json.id, quantity: 1 }] },
      headers: { 'idempotency-key': crypto.randomUUID() },
    });
    assert(order.status === 202, `place order: ${order.status} ${order.text}`);
    ctx.orderId = order.json.orderId;
    const cancelled = await eventually('the order is cancelled', async () => {
      const { json } = await api('GET', `/api/orders/${ctx.orderId}`, { token: ctx.user });
      return json && json.status === 'CANCELLED' && json;
    }, 90_000);
    assert(cancelled.reason === 'PROCESSING_FAILED', `reason ${cancelled.reason}`);
    const letter = await eventually('the dead letter is recorded', async () => {
      const { json } = await api('GET', '/api/admin/dead-letters', { token: ctx.admin });
      return json.items.find((d) => d.orderId === ctx.orderId);
    });
    assert(letter.messageType === 'stock.reserve', `dead letter type ${letter.messageType}`);
    ctx.letterId = letter.id;
  });

  let page;
  const pageErrors = [];
  await step('headless Chromium opens /ops and gets the login form', async () => {
    profileDir = fs.mkdtempSync(path.join(os.tmpdir(), 'orderflow-chromium-'));
    browser = await chromium.launchPersistentContext(profileDir, {
      executablePath: CHROMIUM,
      headless: true,
      args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
        '--disable-background-networking', '--disable-component-update', '--disable-sync'],
      viewport: { width: 1360, height: 900 },
    });
    page = browser.pages()[0] || (await browser.newPage());
    page.setDefaultTimeout(15_000);
    page.on('dialog', (dialog) => dialog.accept());
    page.on('pageerror', (err) => pageErrors.push(err.message));
    // Refused logins answer 401/403 on purpose; what matters is script errors and server errors.
    page.on('console', (msg) => {
      if (msg.type() === 'error' && !msg.text().startsWith('Failed to load resource')) pageErrors.push(msg.text());
    });
    page.on('response', (res) => res.status() >= 500 && pageErrors.push(`${res.status()} from ${res.url()}`));
    await page.goto(`${system.base}/ops`);
    await page.getByTestId('login-form').waitFor();
    await page.screenshot({ path: path.join(OUT, 'ops-login.png') });
  });

  await step('a user token is refused with a message', async () => {
    await page.getByTestId('login-token').fill(ctx.user);
    await page.getByTestId('login-submit').click();
    const error = page.getByTestId('login-error');
    await error.waitFor();
    assert((await error.textContent()).includes('not an admin token'), await error.textContent());
  });

  await step('an admin logs in through the form (HttpOnly cookie)', async () => {
    await page.getByTestId('login-token').fill(ctx.admin);
    await page.getByTestId('login-submit').click();
    await page.getByTestId('funnel').waitFor();
    const cookie = (await browser.cookies()).find((c) => c.name === 'orderflow_admin');
    assert(cookie && cookie.httpOnly && cookie.sameSite === 'Strict', `cookie ${JSON.stringify(cookie)}`);
    assert(await page.evaluate(() => !document.cookie.includes('orderflow_admin')), 'the script can read the token');
  });

  await step('the funnel shows the cancelled order', async () => {
    await page.locator('[data-testid="funnel-CANCELLED"][data-count="1"]').waitFor();
    await page.locator('[data-testid="funnel-PENDING"][data-count="0"]').waitFor();
  });

  await step('the queues panel lists every queue with its consumers', async () => {
    const stock = page.getByTestId('queue-orderflow.stock');
    await stock.waitFor();
    const cells = await stock.locator('td').allTextContents();
    assert(Number(cells[3]) >= 1, `orderflow.stock consumers: ${cells}`);
    assert((await page.locator('#queue-rows tr').count()) === 8, 'eight queues');
  });

  const row = page.getByTestId(`dead-letter-${ctx.letterId}`);
  await step('the dead letter is in the NEW list', async () => {
    await row.waitFor();
    const text = await row.textContent();
    assert(text.includes('stock.reserve') && text.includes('orderflow.stock'), text);
  });

  await step('inspect shows its headers and body', async () => {
    await page.getByTestId(`inspect-${ctx.letterId}`).click();
    await page.getByTestId('dead-letter-detail').waitFor();
    const headers = await page.getByTestId('dead-letter-headers').textContent();
    const body = await page.getByTestId('dead-letter-body').textContent();
    assert(headers.includes('x-death'), `headers: ${headers}`);
    assert(body.includes(ctx.orderId) && body.includes('"type": "stock.reserve"'), `body: ${body}`);
    await page.screenshot({ path: path.join(OUT, 'ops-dead-letter.png'), fullPage: true });
  });

  await step('the failure is fixed (trigger dropped)', () => psql(env.DATABASE_URL, healStock));

  await step('replay takes the dead letter off the NEW list', async () => {
    await page.getByTestId(`replay-${ctx.letterId}`).click();
    await row.waitFor({ state: 'detached' });
    const flash = await page.getByTestId('flash').textContent();
    assert(flash.includes('replayed'), `flash: ${flash}`);
    const { json } = await api('GET', `/api/admin/dead-letters/${ctx.letterId}`, { token: ctx.admin });
    assert(json.status === 'REPLAYED', `status ${json.status}`);
    await page.locator('[data-testid="dead-count"]', { hasText: /^0$/ }).waitFor();
  });

  await step('the order timeline shows a terminal state', async () => {
    await page.getByTestId('timeline-search').fill(ctx.orderId);
    await page.getByTestId('timeline-go').click();
    await page.locator('[data-testid="timeline-status"][data-status="CANCELLED"]').waitFor();
    const entries = page.getByTestId('timeline-entries');
    await entries.locator('[data-kind="dead-letter"]').first().waitFor();
    // The order held nothing when its message was dead-lettered: cancelled in one transaction.
    await entries.locator('[data-kind="message"][data-type="order.cancelled"]').waitFor();
    // The replayed stock.reserve is published again and refused by the state guard.
    await eventually('the replay is published', async () => {
      const { json } = await api('GET', `/api/admin/orders/${ctx.orderId}/timeline`, { token: ctx.admin });
      return json.messages.some((m) => m.replay && m.sentAt);
    }, 30_000);
    const statuses = await entries.locator('[data-kind="status"]').evaluateAll((els) => els.map((e) => e.dataset.status));
    assert(JSON.stringify(statuses) === JSON.stringify(['PENDING', 'CANCELLING', 'CANCELLED']), `statuses ${statuses}`);
    const { json } = await api('GET', `/api/orders/${ctx.orderId}`, { token: ctx.user });
    assert(json.status === 'CANCELLED', `order is ${json.status}`);
  });

  await step('a growing queue is highlighted with its delta', async () => {
    // Each accepted order parks a deadline message in orderflow.deadline (no consumer).
    const product = await api('POST', '/api/admin/products', {
      token: ctx.admin,
      body: { name: 'Plain lamp', price: 1000, stock: 10 },
    });
    for (let i = 0; i < 2; i += 1) {
      const order = await api('POST', '/api/orders', {
        token: ctx.user,
        body: { items: [{ productId: product.json.id, quantity: 1 }] },
        headers: { 'idempotency-key': crypto.randomUUID() },
      });
      assert(order.status === 202, `place order: ${order.status} ${order.text}`);
    }
    const growing = page.locator('[data-testid="queue-orderflow.deadline"].growing');
    await growing.waitFor();
    const delta = await growing.locator('td.delta').textContent();
    assert(/^▲ \+[12]$/.test(delta), `delta ${delta}`);
    await page.locator('section', { has: page.getByTestId('queues') })
      .screenshot({ path: path.join(OUT, 'ops-growing-queue.png') });
  });

  await step('a stuck order is listed and cancelled from the dashboard', async () => {
    // An order whose first message was lost: PENDING, unchanged for two minutes.
    const id = crypto.randomUUID();
    await psql(env.DATABASE_URL, `
      INSERT INTO orders (id, user_id, status, total_amount, deadline_at, created_at, updated_at)
      VALUES ('${id}', 42, 'PENDING', 1000, now() + interval '1 hour', now() - interval '2 minutes', now() - interval '2 minutes');
      INSERT INTO order_status_history (order_id, to_status, at) VALUES ('${id}', 'PENDING', now() - interval '2 minutes');`);
    const stuck = page.getByTestId(`stuck-${id}`);
    await stuck.waitFor();
    assert((await stuck.textContent()).includes('PENDING'), await stuck.textContent());
    await page.locator('[data-testid="stuck-count"]', { hasText: /^1$/ }).waitFor();
    await page.getByTestId(`cancel-${id}`).click(); // the confirm dialog is accepted
    await stuck.waitFor({ state: 'detached' });
    const order = await eventually('the stuck order is cancelled', async () => {
      const { json } = await api('GET', `/api/orders/${id}`, { token: ctx.user });
      return json && json.status === 'CANCELLED' && json;
    }, 30_000);
    assert(order.reason === 'ADMIN_CANCELLED', `reason ${order.reason}`);
  });

  await step('a message the broker refuses is parked, shown and discarded from the dashboard', async () => {
    // A row for an exchange that does not exist: the relay tries it on its own schedule and
    // parks it after its attempts; the rest of the outbox keeps flowing meanwhile.
    await psql(env.DATABASE_URL, `
      INSERT INTO outbox (message_id, exchange, routing_key, message_type, body)
      VALUES (gen_random_uuid(), 'orderflow.missing', 'stock.reserve', 'stock.reserve', '{}');`);
    const id = (await psql(env.DATABASE_URL, `SELECT max(id) FROM outbox WHERE exchange = 'orderflow.missing'`)).trim();
    const row = page.getByTestId(`parked-${id}`);
    await row.waitFor({ timeout: 60_000 });
    assert((await row.textContent()).includes('NOT_FOUND'), await row.textContent());
    await page.locator('[data-testid="parked-count"]', { hasText: /^1$/ }).waitFor();
    await page.getByTestId(`discard-parked-${id}`).click(); // the confirm dialog is accepted
    await row.waitFor({ state: 'detached' });
    await page.locator('[data-testid="parked-count"]', { hasText: /^0$/ }).waitFor();
  });

  await step('the last hour charts show the orders placed', async () => {
    // Three orders accepted (the dead-lettered one and the two plain lamps), two confirmed, two
    // cancelled (the dead-lettered one and the stuck one); the stuck one was accepted back-dated,
    // before the API's first sample, so it is not counted as accepted.
    const legend = (key) => page.getByTestId(`trend-${key}`);
    for (const [key, total] of [['accepted', 3], ['confirmed', 2], ['cancelled', 2]]) {
      await page.locator(`[data-testid="trend-${key}"][data-total="${total}"]`).waitFor({ timeout: 30_000 });
      const points = Number(await legend(key).getAttribute('data-points'));
      assert(points >= 2, `trend-${key}: ${points} points`);
    }
    const chart = page.getByTestId('trend-chart-orders');
    const d = await chart.locator('path[data-series="accepted"]').getAttribute('d');
    assert(/^M[\d.]+,[\d.]+( L[\d.]+,[\d.]+)+/.test(d), `accepted line ${d}`);
    assert(Number(await legend('e2e-p99').getAttribute('data-points')) >= 1, 'e2e p99 has no point');
    const p50 = await legend('e2e-p50').locator('strong').textContent();
    assert(/ms$|^–$/.test(p50), `e2e p50 ${p50}`);
    assert(Number(await legend('dead-letters').getAttribute('data-total')) >= 1, 'the dead letter is not counted');
    assert(Number(await legend('queue-depth').getAttribute('data-points')) >= 1, 'no queue depth');
    for (const id of ['orders', 'e2e', 'steps', 'dead-letters', 'queue-depth']) {
      await page.getByTestId(`trend-chart-${id}`).waitFor();
    }
    await page.getByTestId('trends').screenshot({ path: path.join(OUT, 'ops-trends.png') });
  });

  await step('a failure group is replayed from the dashboard', async () => {
    // A second cause: reservations of one product fail, so two orders' stock.reserve die.
    await psql(env.DATABASE_URL, `
      CREATE FUNCTION break_brittle() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN
        IF NEW.name = 'Brittle lamp' AND NEW.stock < OLD.stock THEN RAISE EXCEPTION 'product % is out of order', NEW.id; END IF;
        RETURN NEW;
      END $$;
      CREATE TRIGGER break_brittle BEFORE UPDATE ON products FOR EACH ROW EXECUTE FUNCTION break_brittle();`);
    const product = await api('POST', '/api/admin/products', {
      token: ctx.admin,
      body: { name: 'Brittle lamp', price: 100, stock: 10 },
    });
    for (let i = 0; i < 2; i += 1) {
      const order = await api('POST', '/api/orders', {
        token: ctx.user,
        body: { items: [{ productId: product.json.id, quantity: 1 }] },
        headers: { 'idempotency-key': crypto.randomUUID() },
      });
      assert(order.status === 202, `place order: ${order.status} ${order.text}`);
    }
    const group = await eventually('the two letters form one group', async () => {
      const { json } = await api('GET', '/api/admin/failure-groups', { token: ctx.admin });
      return json.items.find((g) => g.count === 2 && (g.errorKind || '').includes('product # is out of order'));
    }, 90_000);
    const row = page.getByTestId(`group-${group.id}`);
    await row.waitFor({ timeout: 30_000 }); // the dashboard asks for groups every 10 s
    const text = await row.textContent();
    assert(text.includes('stock.reserve') && text.includes('delivery_limit'), text);
    await page.getByTestId(`group-letters-${group.id}`).click();
    await page.locator('#dead-rows tr').nth(1).waitFor();
    assert((await page.locator('#dead-rows tr').count()) === 2, 'the group shows its two letters');
    await page.locator('section', { has: page.getByTestId('failure-groups') })
      .screenshot({ path: path.join(OUT, 'ops-failure-group.png') });
    await psql(env.DATABASE_URL, 'DROP TRIGGER break_brittle ON products; DROP FUNCTION break_brittle();');
    await page.getByTestId(`group-replay-${group.id}`).click(); // the dry run's confirm is accepted
    const flash = await page.locator('[data-testid="flash"]', { hasText: 'Bulk action' }).textContent();
    assert(flash.includes('replay 2 dead letter'), `flash: ${flash}`);
    const done = page.locator('#bulk-rows tr[data-state="DONE"][data-done="2"][data-total="2"]');
    await done.waitFor({ timeout: 30_000 });
    await row.waitFor({ state: 'detached', timeout: 30_000 });
    const { json } = await api('GET', `/api/admin/dead-letters?group=${group.id}&status=REPLAYED`, { token: ctx.admin });
    assert(json.total === 2 && json.items.every((d) => d.bulkActionId && d.resolvedBy.includes('bulk action')), JSON.stringify(json));
    await page.getByTestId('dead-scope-clear').click();
    await page.locator('section', { has: page.getByTestId('failure-groups') })
      .screenshot({ path: path.join(OUT, 'ops-failure-group-replayed.png') });
  });

  await step('screenshot of the dashboard', async () => {
    await page.getByTestId('timeline-search').fill(ctx.orderId);
    await page.getByTestId('timeline-go').click();
    await page.waitForTimeout(2_500); // one more refresh, so every panel is current
    await page.screenshot({ path: path.join(OUT, 'ops-dashboard.png'), fullPage: true });
  });

  await step('the page logged no script errors', async () => {
    assert(pageErrors.length === 0, pageErrors.join('\n'));
  });

  await step('log out returns to the login form', async () => {
    await page.getByTestId('logout').click();
    await page.getByTestId('login-form').waitFor();
    assert(!(await browser.cookies()).some((c) => c.name === 'orderflow_admin'), 'the cookie is gone');
  });
}

const timer = setTimeout(() => {
  console.log(`FAIL the browser test did not finish within ${OVERALL_TIMEOUT_MS / 1000} s`);
  results.push({ name: 'overall timeout', ok: false });
  cleanup().finally(() => {
    console.log(`${results.filter((r) => r.ok).length} passed, ${results.filter((r) => !r.ok).length} failed`);
    process.exit(1);
  });
}, OVERALL_TIMEOUT_MS);

try {
  await scenario();
} catch {
  const page = browser && browser.pages()[0];
  if (page) {
    await page.screenshot({ path: path.join(OUT, 'ops-dashboard-failure.png'), fullPage: true }).catch(() => {});
    console.log(`screenshot of the failure: ${path.join(OUT, 'ops-dashboard-failure.png')}; orderflow's log: ${system.log}`);
  }
} finally {
  clearTimeout(timer);
  await cleanup();
}

const passed = results.filter((r) => r.ok).length;
const failed = results.filter((r) => !r.ok).length;
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed === 0 && passed > 0 ? 0 : 1);
