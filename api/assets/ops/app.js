// orderflow ops dashboard. Polls the admin JSON API every 2 s with same-origin requests (the
// session cookie authenticates them; this script never sees the token). No framework: every
// value from the server is put into the page as text, never as HTML.
'use strict';

const REFRESH_MS = 2000;
const STUCK_AFTER = '30s';
const PIPELINE = ['PENDING', 'STOCK_RESERVED', 'COUPON_APPLIED', 'PAID', 'CONFIRMED',
  'CANCELLING', 'CANCELLED', 'COMPENSATION_FAILED'];
const TERMINAL = new Set(['CONFIRMED', 'CANCELLED']);
const CANCELLABLE = new Set(['PENDING', 'STOCK_RESERVED', 'COUPON_APPLIED', 'PAID']);
// Queues that have no orderflow consumer by design: an empty consumer count is not an alarm.
const NO_CONSUMER_EXPECTED = {
  'orderflow.deadline': 'holds deadlines until they expire',
  'data-platform.orders': 'read by the data platform',
};
// Why a published message may have no inbox record.
const UNHANDLED = {
  'order.deadline': 'expires into the recovery worker after ORDER_TIMEOUT (ignored once the order is terminal)',
  'order.cancelled': 'public event; no orderflow worker consumes it',
  'order.confirmed': 'public event; the sales projection has not recorded it yet',
  default: 'no worker recorded it: still queued, ignored as stale, or dead-lettered',
};
const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

const state = {
  previousDepth: new Map(), // queue name -> ready messages at the last refresh
  timelineId: null, // the order shown in the timeline, refreshed with the rest
  inspectedId: null, // the dead letter shown in the detail pane
  group: null, // the failure group whose letters the dead-letter table shows (null: all)
};

// --- Small helpers ---------------------------------------------------------------------------

const $ = (id) => document.getElementById(id);

/** Creates an element; `props` may hold className, text, title, dataset, hidden, type. */
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null) continue;
    if (key === 'text') node.textContent = value;
    else if (key === 'dataset') Object.assign(node.dataset, value);
    else if (key === 'onclick') node.addEventListener('click', value);
    else if (key in node) node[key] = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

async function api(method, path, payload) {
  const headers = { Accept: 'application/json' };
  if (payload !== undefined) headers['Content-Type'] = 'application/json';
  const res = await fetch(path, {
    method,
    credentials: 'same-origin',
    headers,
    body: payload === undefined ? undefined : JSON.stringify(payload),
  });
  if (res.status === 401) {
    // The session expired: the dashboard URL shows the login form again.
    window.location.assign('/ops');
    throw new Error('session expired');
  }
  const body = res.status === 204 ? null : await res.json().catch(() => null);
  if (!res.ok) {
    const why = body && body.detail ? body.detail : `HTTP ${res.status}`;
    const error = new Error(why);
    error.status = res.status;
    throw error;
  }
  return body;
}

const number = (n) => Number(n).toLocaleString('en-US');

function age(seconds) {
  if (seconds === null || seconds === undefined) return '–';
  if (seconds < 10) return `${seconds.toFixed(1)} s`;
  if (seconds < 60) return `${Math.floor(seconds)} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} m ${Math.floor(seconds % 60)} s`;
  return `${Math.floor(seconds / 3600)} h ${Math.floor((seconds % 3600) / 60)} m`;
}

const secondsSince = (iso) => Math.max(0, (Date.now() - Date.parse(iso)) / 1000);

function clock(iso) {
  if (!iso) return '–';
  const d = new Date(iso);
  const pad = (n, w = 2) => String(n).padStart(w, '0');
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}

function statusBadge(status) {
  return el('span', { className: `badge s-${status}`, text: status });
}

function orderLink(id) {
  return el('button', {
    type: 'button',
    className: 'link mono',
    title: `Show the timeline of ${id}`,
    text: id,
    onclick: () => showTimeline(id),
  });
}

function button(label, testid, onclick, className) {
  return el('button', { type: 'button', text: label, className, dataset: { testid }, onclick });
}

let flashTimer = null;
function flash(message, kind = 'ok') {
  const box = $('flash');
  box.textContent = message;
  box.className = `flash ${kind}`;
  box.hidden = false;
  clearTimeout(flashTimer);
  flashTimer = setTimeout(() => { box.hidden = true; }, 6000);
}

/** Runs an operator action, reports it, refreshes (the failure groups too). */
async function act(label, action) {
  groupsAt = 0;
  try {
    const message = await action();
    if (message) flash(message);
  } catch (err) {
    flash(`${label} failed: ${err.message}`, 'error');
  }
  await refresh();
}

// --- Overview: tiles, funnel, queues --------------------------------------------------------

function renderTiles(overview) {
  const inFlight = PIPELINE.filter((s) => !TERMINAL.has(s))
    .reduce((sum, s) => sum + (overview.funnel[s] || 0), 0);
  const lag = overview.outbox.oldestUnsentAgeSeconds;
  const tiles = [
    ['tile-inflight', 'inflight', number(inFlight), false],
    ['tile-stuck', 'stuck-count', number(overview.stuck), overview.stuck > 0],
    ['tile-outbox', 'outbox-unsent', number(overview.outbox.unsent), lag !== null && lag > 5],
    ['tile-dead', 'dead-count', number(overview.deadLetters.new), overview.deadLetters.new > 0],
    ['tile-parked', 'parked-count', number(overview.outbox.parked), overview.outbox.parked > 0],
  ];
  for (const [tile, testid, value, alert] of tiles) {
    $(tile).classList.toggle('alert', alert);
    $(tile).querySelector(`[data-testid="${testid}"]`).textContent = value;
  }
  document.querySelector('[data-testid="outbox-lag"]').textContent = lag === null ? 'none' : age(lag);
}

function renderFunnel(funnel) {
  const max = Math.max(1, ...PIPELINE.map((s) => funnel[s] || 0));
  const rows = PIPELINE.map((status) => {
    const count = funnel[status] || 0;
    const bar = el('span', { className: `bar s-${status}` });
    bar.style.width = count === 0 ? '0' : `max(3px, ${(100 * count) / max}%)`;
    return el('div', { className: 'funnel-row', dataset: { testid: `funnel-${status}`, count: String(count) } },
      el('span', { className: 'funnel-label', text: status }),
      el('span', { className: 'funnel-track' }, bar),
      el('span', { className: 'funnel-count num', text: number(count) }));
  });
  $('funnel').replaceChildren(...rows);
}

function renderQueues(queues, brokerError) {
  const error = $('broker-error');
  error.hidden = !brokerError;
  error.textContent = brokerError ? `Broker unreachable: ${brokerError}` : '';
  const rows = queues.map((q) => {
    const before = state.previousDepth.get(q.name);
    const delta = before === undefined ? null : q.messages - before;
    state.previousDepth.set(q.name, q.messages);
    const note = NO_CONSUMER_EXPECTED[q.name];
    const starving = q.consumers === 0 && q.messages > 0 && !note;
    const row = el('tr', { dataset: { testid: `queue-${q.name}`, queue: q.name, delta: String(delta ?? 0) } },
      el('td', {}, el('span', { className: 'mono', text: q.name }),
        note ? el('span', { className: 'muted small note', text: note }) : null),
      el('td', { className: 'num', text: number(q.messages) }),
      el('td', {
        className: `num delta${delta > 0 ? ' up' : delta < 0 ? ' down' : ''}`,
        text: delta === null ? '·' : delta > 0 ? `▲ +${number(delta)}` : delta < 0 ? `▼ ${number(delta)}` : '0',
        title: 'change since the last refresh',
      }),
      el('td', { className: `num${starving ? ' warn' : ''}`, text: number(q.consumers) }));
    row.classList.toggle('growing', delta > 0);
    return row;
  });
  $('queue-rows').replaceChildren(...rows);
}

// --- Stuck orders ---------------------------------------------------------------------------

function renderStuck(page) {
  const rows = page.items.map((o) => {
    const actions = el('td', { className: 'actions' });
    if (CANCELLABLE.has(o.status)) {
      actions.append(button('Cancel', `cancel-${o.orderId}`, () => cancelOrder(o.orderId), 'danger'));
    }
    if (o.status === 'COMPENSATION_FAILED') {
      actions.append(button('Retry', `retry-${o.orderId}`, () => retryOrder(o.orderId), 'primary'));
    }
    return el('tr', { dataset: { testid: `stuck-${o.orderId}`, orderId: o.orderId } },
      el('td', {}, orderLink(o.orderId)),
      el('td', {}, statusBadge(o.status)),
      el('td', { text: o.reason || '' }),
      el('td', { text: age(secondsSince(o.updatedAt)) }),
      el('td', { className: 'num', text: String(o.userId) }),
      el('td', { className: 'num', text: number(o.totalAmount) }),
      actions);
  });
  $('stuck-rows').replaceChildren(...rows);
  $('stuck-table').hidden = rows.length === 0;
  const more = page.total > page.items.length ? ` Showing the ${page.items.length} oldest of ${number(page.total)}.` : '';
  $('stuck-empty').textContent = page.total === 0 ? 'None.' : more;
  $('stuck-empty').hidden = page.total !== 0 && !more;
}

function cancelOrder(id) {
  if (!window.confirm(`Cancel order ${id}?\nIt moves to CANCELLING and gives back whatever it holds.`)) return;
  act('Cancel', async () => {
    const done = await api('POST', `/api/admin/orders/${id}/cancel`);
    // An order that held nothing yet is cancelled at once.
    return done.status === 'CANCELLED' ? `Order ${id} is cancelled.` : `Order ${id} is cancelling.`;
  });
}

function retryOrder(id) {
  act('Retry', async () => {
    await api('POST', `/api/admin/orders/${id}/retry`);
    return `Order ${id} is back in CANCELLING; its compensation is sent again.`;
  });
}

// --- Dead letters ---------------------------------------------------------------------------

function renderDeadLetters(page) {
  const rows = page.items.map((d) => el('tr', { dataset: { testid: `dead-letter-${d.id}`, id: String(d.id) } },
    el('td', { className: 'num', text: String(d.id) }),
    el('td', { className: 'mono', text: d.messageType || '?' }),
    el('td', { className: 'mono', text: d.sourceQueue || '?' }),
    el('td', { text: `${d.reason || '?'}${d.deathCount > 1 ? ` ×${d.deathCount}` : ''}` }),
    el('td', {}, d.orderId ? orderLink(d.orderId) : el('span', { className: 'muted', text: 'none' })),
    el('td', { text: `${age(secondsSince(d.deadAt || d.recordedAt))} ago` }),
    el('td', { className: 'actions' },
      button('Inspect', `inspect-${d.id}`, () => inspect(d.id)),
      button('Replay', `replay-${d.id}`, () => replay(d.id), 'primary'),
      button('Discard', `discard-${d.id}`, () => discard(d.id), 'danger'))));
  $('dead-rows').replaceChildren(...rows);
  $('dead-table').hidden = rows.length === 0;
  $('dead-empty').hidden = page.total !== 0;
  if (page.total > page.items.length) {
    $('dead-empty').hidden = false;
    $('dead-empty').textContent = `Showing the ${page.items.length} newest of ${number(page.total)}.`;
  } else {
    $('dead-empty').textContent = 'None.';
  }
}

function pretty(text) {
  try {
    return JSON.stringify(JSON.parse(text), null, 2);
  } catch {
    return text;
  }
}

function renderDeadLetterDetail(d) {
  state.inspectedId = d.id;
  $('dead-detail-title').textContent = `Dead letter #${d.id} · ${d.status}`;
  const meta = [
    ['Message', d.messageId], ['Type', d.messageType], ['Order', d.orderId],
    ['Published to', `${d.exchange || '?'} / ${d.routingKey || '?'}`], ['Died in', d.sourceQueue],
    ['Reason', `${d.reason || '?'} (${d.deathCount} death${d.deathCount === 1 ? '' : 's'})`],
    ['Died at', d.deadAt ? new Date(d.deadAt).toLocaleString() : '?'],
    ['Resolved', d.resolvedAt ? `${d.status} at ${new Date(d.resolvedAt).toLocaleString()}` : 'no'],
  ];
  $('dead-detail-meta').replaceChildren(...meta.flatMap(([k, v]) => [el('dt', { text: k }), el('dd', { text: v || '–' })]));
  $('dead-detail-headers').textContent = JSON.stringify(d.headers, null, 2);
  $('dead-detail-body').textContent = pretty(d.body);
  $('dead-detail').hidden = false;
}

async function inspect(id) {
  try {
    renderDeadLetterDetail(await api('GET', `/api/admin/dead-letters/${id}`));
    $('dead-detail').scrollIntoView({ block: 'nearest', behavior: 'smooth' });
  } catch (err) {
    flash(`Inspect failed: ${err.message}`, 'error');
  }
}

function replay(id) {
  act('Replay', async () => {
    const letter = await api('POST', `/api/admin/dead-letters/${id}/replay`);
    if (state.inspectedId === id) renderDeadLetterDetail(letter);
    return `Dead letter #${id} replayed: ${letter.messageType} is published again to ${letter.routingKey}.`;
  });
}

function discard(id) {
  if (!window.confirm(`Discard dead letter #${id}? It is kept for the record but never replayed.`)) return;
  act('Discard', async () => {
    await api('DELETE', `/api/admin/dead-letters/${id}`);
    if (state.inspectedId === id) $('dead-detail').hidden = true;
    return `Dead letter #${id} discarded.`;
  });
}

// --- Failure groups and bulk actions ---------------------------------------------------------

function renderGroups(page) {
  const rows = page.items.map((g) => el('tr', { dataset: { testid: `group-${g.id}`, group: g.id, count: String(g.count) } },
    el('td', { className: 'num', text: number(g.count) }),
    el('td', { className: 'num', text: number(g.orders) }),
    el('td', { className: 'mono', text: g.messageType || '?' }),
    el('td', { className: 'mono', text: g.queue || '?' }),
    el('td', { text: g.reason || '?' }),
    el('td', { className: 'mono small error-kind', text: g.errorKind || '–', title: g.sample && g.sample.error ? g.sample.error : '' }),
    el('td', { text: `${age(secondsSince(g.lastSeen))} ago` }),
    g.source === 'PARKED'
      ? el('td', { className: 'actions' },
        button('Retry group', `group-retry-${g.id}`, () => bulkOnGroup(g, 'RETRY_PARKED'), 'primary'),
        button('Discard group', `group-discard-${g.id}`, () => bulkOnGroup(g, 'DISCARD_PARKED'), 'danger'))
      : el('td', { className: 'actions' },
        button('Letters', `group-letters-${g.id}`, () => showGroup(g)),
        button('Replay group', `group-replay-${g.id}`, () => bulkOnGroup(g, 'REPLAY_DEAD_LETTERS'), 'primary'),
        button('Discard group', `group-discard-${g.id}`, () => bulkOnGroup(g, 'DISCARD_DEAD_LETTERS'), 'danger'))));
  $('group-rows').replaceChildren(...rows);
  $('groups-table').hidden = rows.length === 0;
  $('groups-empty').hidden = rows.length !== 0;
}

// Grouping every new dead letter is the dashboard's dearest read (a third of a second at
// 100,000 letters), so it is asked every GROUPS_EVERY_MS, and at once after an action.
const GROUPS_EVERY_MS = 10000;
let groupsAt = 0;

function loadGroups() {
  if (Date.now() - groupsAt < GROUPS_EVERY_MS) return Promise.resolve();
  groupsAt = Date.now();
  return api('GET', '/api/admin/failure-groups?size=20').then(renderGroups)
    .catch((err) => { groupsAt = 0; throw err; });
}

function showGroup(g) {
  state.group = g.id;
  $('dead-scope').textContent = `new, newest first · group ${g.messageType || '?'} from ${g.queue || '?'} (${g.reason || '?'})`;
  $('dead-scope-clear').hidden = false;
  refresh().then(() => $('dead-title').scrollIntoView({ behavior: 'smooth' }));
}

/** Cancel every order stuck in a cancellable status, or retry every parked compensation. */
async function bulkOnOrders(action) {
  const filter = action === 'CANCEL_ORDERS' ? { olderThan: STUCK_AFTER } : {};
  let dry;
  try {
    dry = await api('POST', '/api/admin/bulk-actions', { action, filter, dryRun: true });
  } catch (err) {
    flash(`Dry run failed: ${err.message}`, 'error');
    return;
  }
  if (dry.matching === 0) {
    flash(action === 'CANCEL_ORDERS' ? 'No order is stuck.' : 'No order is parked.');
    return;
  }
  const what = action === 'CANCEL_ORDERS'
    ? `Cancel ${number(dry.matching)} order(s) unchanged for ${STUCK_AFTER} or more? Each gives back what it holds.`
    : `Retry the compensations of ${number(dry.matching)} COMPENSATION_FAILED order(s)?`;
  if (!window.confirm(what)) return;
  act('Bulk action', async () => {
    // The orders shown, not those that got stuck while the operator read the dialog.
    const confirmed = { updatedBefore: dry.filter.updatedBefore };
    const started = await api('POST', '/api/admin/bulk-actions', { action, filter: confirmed, expectedMatching: dry.matching });
    return `Bulk action #${started.id} started: ${started.action} on ${number(started.total)} order(s).`;
  });
}

/** A dry run first: the operator confirms what the action would do, then it starts. */
async function bulkOnGroup(g, action) {
  const filter = { group: g.id };
  let dry;
  try {
    dry = await api('POST', '/api/admin/bulk-actions', { action, filter, dryRun: true });
  } catch (err) {
    flash(`Dry run failed: ${err.message}`, 'error');
    return;
  }
  const { verb, noun, what } = {
    REPLAY_DEAD_LETTERS: { verb: 'Replay', noun: 'dead letter(s)', what: 'Each is published again once; parked compensations are resumed.' },
    DISCARD_DEAD_LETTERS: { verb: 'Discard', noun: 'dead letter(s)', what: 'They are kept for the record and never published.' },
    RETRY_PARKED: { verb: 'Retry', noun: 'parked message(s)', what: 'Each goes back to the relay with its attempts reset.' },
    DISCARD_PARKED: { verb: 'Discard', noun: 'parked message(s)', what: 'They are kept for the record and never published.' },
  }[action];
  const refused = dry.notReplayable ? `\n${number(dry.notReplayable)} cannot be replayed and stay new: ${dry.notReplayableReason}` : '';
  if (!window.confirm(`${verb} ${number(dry.matching)} ${noun} of ${number(dry.orders)} order(s)?\n${what}${refused}`)) return;
  act(verb, async () => {
    // The letters shown, not those that joined the group while the operator read the dialog
    // (a dead-letter dry run names the last one; parked rows have no such cut-off).
    const confirmed = dry.filter.throughId === undefined ? filter : { ...filter, throughId: dry.filter.throughId };
    const started = await api('POST', '/api/admin/bulk-actions', { action, filter: confirmed, expectedMatching: dry.matching });
    return `Bulk action #${started.id} started: ${verb.toLowerCase()} ${number(started.total)} ${noun}.`;
  });
}

const running = new Set(); // bulk actions seen RUNNING at the last refresh

function renderBulkActions(page) {
  // An action just ended: its groups have changed, so they are asked again at once.
  if (page.items.some((a) => a.state !== 'RUNNING' && running.has(a.id))) groupsAt = 0;
  running.clear();
  page.items.filter((a) => a.state === 'RUNNING').forEach((a) => running.add(a.id));
  const rows = page.items.map((a) => {
    const pct = a.total === 0 ? 100 : Math.min(100, Math.round((100 * (a.done + a.skipped)) / a.total));
    const bar = el('span', { className: 'bar s-CONFIRMED' });
    bar.style.width = `${pct}%`;
    const actions = el('td', { className: 'actions' });
    if (a.state === 'RUNNING') {
      actions.append(button('Cancel', `bulk-cancel-${a.id}`, () => cancelBulk(a.id), 'danger'));
    }
    return el('tr', { dataset: { testid: `bulk-${a.id}`, state: a.state, done: String(a.done), total: String(a.total) } },
      el('td', { className: 'num', text: String(a.id) }),
      el('td', { className: 'mono', text: a.action }),
      el('td', {}, el('span', { className: `badge b-${a.state}`, text: a.state })),
      el('td', { className: 'progress', title: [a.lastError, a.lastSkip].filter(Boolean).join(' · ') },
        el('span', { className: 'funnel-track' }, bar),
        el('span', { className: 'small', text: ` ${number(a.done)} of ${number(a.total)}${a.skipped ? `, ${number(a.skipped)} skipped` : ''}` })),
      el('td', { className: 'small', text: a.requestedBy }),
      el('td', { text: `${age(secondsSince(a.startedAt))} ago` }),
      actions);
  });
  $('bulk-rows').replaceChildren(...rows);
  $('bulk-table').hidden = rows.length === 0;
  $('bulk-empty').hidden = rows.length !== 0;
}

function cancelBulk(id) {
  act('Cancel', async () => {
    await api('POST', `/api/admin/bulk-actions/${id}/cancel`);
    return `Bulk action #${id} cancelled; what it did stays done.`;
  });
}

// --- Parked outbox rows ----------------------------------------------------------------------

function renderParked(page) {
  const rows = page.items.map((p) => el('tr', { dataset: { testid: `parked-${p.id}`, id: String(p.id) } },
    el('td', { className: 'num', text: String(p.id) }),
    el('td', { className: 'mono', text: p.messageType }),
    el('td', { className: 'mono', text: `${p.exchange || '(default)'} / ${p.routingKey}` }),
    el('td', { className: 'num', text: number(p.orderIds.length) }),
    el('td', { text: `${p.lastError || '?'} (×${p.attempts})` }),
    el('td', { text: p.parkedAt ? `${age(secondsSince(p.parkedAt))} ago` : '–' }),
    el('td', { className: 'actions' },
      button('Retry', `retry-parked-${p.id}`, () => retryParked(p.id), 'primary'),
      button('Discard', `discard-parked-${p.id}`, () => discardParked(p.id), 'danger'))));
  $('parked-rows').replaceChildren(...rows);
  $('parked-table').hidden = rows.length === 0;
  $('parked-empty').hidden = rows.length !== 0;
}

function retryParked(id) {
  act('Retry', async () => {
    const row = await api('POST', `/api/admin/outbox/${id}/retry`);
    return `Outbox message #${id} (${row.messageType}) goes back to the relay.`;
  });
}

function discardParked(id) {
  if (!window.confirm(`Discard outbox message #${id}? It is never published; its orders are cancelled at their deadline.`)) return;
  act('Discard', async () => {
    await api('DELETE', `/api/admin/outbox/${id}`);
    return `Outbox message #${id} discarded.`;
  });
}

// --- Order timeline -------------------------------------------------------------------------

/** Statuses, message hops and dead letters, merged in the order they happened. A hop is placed
 * where a worker handled it (just before the status that worker set), else where the relay
 * published it; a dead letter where the recovery worker recorded it (the broker's own death
 * time has whole seconds only). */
function timelineEntries(t) {
  const entries = [];
  t.history.forEach((h, i) => entries.push({ at: h.at, seq: i, kind: 'status', h }));
  t.messages.forEach((m, i) => {
    const at = m.handledBy.length ? m.handledBy[0].processedAt : m.sentAt || m.createdAt;
    entries.push({ at, seq: i, kind: 'message', m });
  });
  t.deadLetters.forEach((d, i) => entries.push({ at: d.recordedAt, seq: i, kind: 'dead', d }));
  const rank = { message: 0, dead: 1, status: 2 };
  return entries.sort((a, b) => Date.parse(a.at) - Date.parse(b.at) || rank[a.kind] - rank[b.kind] || a.seq - b.seq);
}

function renderEntry(entry, start) {
  const since = (iso) => `+${number(Math.max(0, Date.parse(iso) - start))} ms`;
  const when = (iso) => el('time', { dateTime: iso, title: new Date(iso).toString(), text: `${clock(iso)} (${since(iso)})` });
  if (entry.kind === 'status') {
    const { h } = entry;
    return el('li', { className: `entry status s-${h.status}`, dataset: { kind: 'status', status: h.status } },
      el('div', { className: 'entry-head' }, statusBadge(h.status),
        h.reason ? el('span', { className: 'reason', text: h.reason }) : null, when(h.at)),
      h.from ? el('div', { className: 'muted small', text: `from ${h.from}` }) : null);
  }
  if (entry.kind === 'dead') {
    const { d } = entry;
    return el('li', { className: 'entry dead', dataset: { kind: 'dead-letter' } },
      el('div', { className: 'entry-head' }, el('span', { className: 'tag dead', text: 'dead letter' }),
        el('span', { className: 'mono', text: d.messageType || '?' }), when(d.recordedAt)),
      el('div', { className: 'muted small',
        text: `#${d.id} from ${d.sourceQueue || '?'}: ${d.reason || '?'}, ${d.deathCount} death(s) · ${d.status}` }));
  }
  const { m } = entry;
  const handled = m.handledBy.length
    ? m.handledBy.map((h) => `handled by ${h.consumer} at ${clock(h.processedAt)} (${since(h.processedAt)})`).join(' · ')
    : !m.sentAt ? 'not published yet' : UNHANDLED[m.messageType] || UNHANDLED.default;
  return el('li', { className: `entry hop${m.compensation ? ' compensation' : ''}`, dataset: { kind: 'message', type: m.messageType } },
    el('div', { className: 'entry-head' },
      el('span', { className: 'arrow', text: '→' }),
      el('span', { className: 'mono', text: m.messageType }),
      m.compensation ? el('span', { className: 'tag comp', text: 'compensation' }) : null,
      m.replay ? el('span', { className: 'tag replay', text: 'replay' }) : null,
      m.sentAt ? when(m.sentAt) : null),
    el('div', { className: 'muted small', text: handled }));
}

function renderTimeline(t) {
  const o = t.order;
  $('timeline-order-id').textContent = o.orderId;
  const badge = $('timeline-status');
  badge.textContent = o.status + (o.reason ? ` · ${o.reason}` : '');
  badge.className = `badge s-${o.status}`;
  badge.dataset.status = o.status;
  const holds = [o.stockHeld && 'stock', o.couponHeld && 'coupon', o.paidAmount > 0 && `${number(o.paidAmount)} paid`]
    .filter(Boolean).join(', ') || 'nothing';
  $('timeline-summary').textContent =
    `user ${o.userId} · total ${number(o.totalAmount)} · discount ${number(o.discountAmount)} · holds ${holds} · ` +
    `${o.items.length} line(s) · created ${new Date(o.createdAt).toLocaleString()}`;
  const start = Date.parse(o.createdAt);
  $('timeline-entries').replaceChildren(...timelineEntries(t).map((e) => renderEntry(e, start)));
  $('timeline').hidden = false;
}

async function loadTimeline() {
  if (!state.timelineId) return;
  try {
    renderTimeline(await api('GET', `/api/admin/orders/${state.timelineId}/timeline`));
  } catch (err) {
    $('timeline').hidden = true;
    const id = state.timelineId;
    state.timelineId = null;
    flash(err.status === 404 ? `No order ${id}.` : `Timeline failed: ${err.message}`, 'error');
  }
}

function showTimeline(id) {
  $('timeline-id').value = id;
  state.timelineId = id;
  loadTimeline().then(() => $('timeline-title').scrollIntoView({ behavior: 'smooth' }));
}

// --- Trends: the last hour as small inline SVG charts ---------------------------------------

const SVG_NS = 'http://www.w3.org/2000/svg';
const TREND_W = 320;
const TREND_H = 84;
const perSecond = (n) => (n === null || n === undefined ? '–' : `${n.toFixed(2)}/s`);
const millis = (n) => (n === null || n === undefined ? '–' : `${number(n)} ms`);
const latency = (key, field) => (s) => (s[key] ? s[key][field] : null);
const step = (key) => (s) => (s.steps[key] ? s.steps[key].p99Ms : null);
// Each chart: a title and its series (data-testid `trend-<key>`, the value a sample plots or
// null for no point, how the latest value reads, and the count it adds to the hour's total).
const TREND_CHARTS = [
  { id: 'orders', title: 'Orders per second', series: [
    { key: 'accepted', label: 'accepted', value: (s) => s.acceptedPerSecond, show: perSecond, count: (s) => s.accepted },
    { key: 'confirmed', label: 'confirmed', value: (s) => s.confirmedPerSecond, show: perSecond, count: (s) => s.confirmed },
    { key: 'cancelled', label: 'cancelled', value: (s) => s.cancelledPerSecond, show: perSecond, count: (s) => s.cancelled },
  ] },
  { id: 'e2e', title: 'End-to-end latency', series: [
    { key: 'e2e-p50', label: 'p50', value: latency('e2e', 'p50Ms'), show: millis },
    { key: 'e2e-p99', label: 'p99', value: latency('e2e', 'p99Ms'), show: millis },
  ] },
  { id: 'steps', title: 'Step latency p99', series: [
    { key: 'step-stock', label: 'stock', value: step('stockReserved'), show: millis },
    { key: 'step-coupon', label: 'coupon', value: step('couponApplied'), show: millis },
    { key: 'step-payment', label: 'payment', value: step('paid'), show: millis },
    { key: 'step-confirm', label: 'confirm', value: step('confirmed'), show: millis },
  ] },
  { id: 'dead-letters', title: 'Dead letters per minute', series: [
    { key: 'dead-letters', label: 'recorded', value: (s) => s.deadLettersPerMinute,
      show: (n) => (n === null ? '–' : `${n.toFixed(1)}/min`), count: (s) => s.deadLetters },
  ] },
  { id: 'queue-depth', title: 'Queue depth (ready, all queues)', series: [
    { key: 'queue-depth', label: 'ready', value: (s) => s.queueDepth, show: (n) => (n === null ? '–' : number(n)) },
  ] },
];

function svg(tag, attrs = {}) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  return node;
}

/** One chart: a line per series over [from, to], each sample plotted at its window's end. */
function trendChart(chart, samples, from, to) {
  const values = chart.series.map((series) => samples.map((s) => {
    const v = series.value(s);
    return v === null || v === undefined ? null : Number(v);
  }));
  const max = Math.max(1e-9, ...values.flat().filter((v) => v !== null));
  const span = Math.max(1, to - from);
  const x = (s) => ((Date.parse(s.end) - from) / span) * TREND_W;
  const y = (v) => TREND_H - 2 - (v / max) * (TREND_H - 14);
  const plot = svg('svg', { viewBox: `0 0 ${TREND_W} ${TREND_H}`, class: 'trend-plot', role: 'img',
    'aria-label': chart.title });
  plot.append(svg('line', { x1: 0, y1: TREND_H - 2, x2: TREND_W, y2: TREND_H - 2, class: 'axis' }));
  const top = svg('text', { x: 2, y: 10, class: 'axis-label' });
  top.textContent = chart.series[0].show(max);
  plot.append(top);
  const legend = el('ul', { className: 'trend-legend' });
  chart.series.forEach((series, i) => {
    let d = '';
    let points = 0;
    let pen = 'M';
    const dots = [];
    samples.forEach((s, j) => {
      const v = values[i][j];
      if (v === null) { pen = 'M'; return; }
      d += `${pen}${x(s).toFixed(1)},${y(v).toFixed(1)} `;
      // A point with no neighbour (latencies exist only where orders confirmed) is a dot.
      if (pen === 'M' && (j + 1 >= samples.length || values[i][j + 1] === null)) {
        dots.push(svg('circle', { cx: x(s).toFixed(1), cy: y(v).toFixed(1), r: 2, class: `dot c${i}` }));
      }
      pen = 'L';
      points += 1;
    });
    plot.append(svg('path', { d: d.trim() || 'M0,0', class: `line c${i}`, 'data-series': series.key }), ...dots);
    // The newest value the series has (a latency is missing where no order confirmed).
    const latest = values[i].filter((v) => v !== null).pop() ?? null;
    const total = series.count ? samples.reduce((sum, s) => sum + (series.count(s) || 0), 0) : null;
    legend.append(el('li', {
      className: `c${i}`,
      dataset: { testid: `trend-${series.key}`, points: String(points), latest: latest === null ? '' : String(latest),
        ...(total === null ? {} : { total: String(total) }) },
    }, el('span', { className: 'swatch' }), `${series.label} `,
    el('strong', { text: series.show(latest) }),
    total === null ? null : el('span', { className: 'muted', text: ` · ${number(total)} in view` })));
  });
  return el('figure', { className: 'trend', dataset: { testid: `trend-chart-${chart.id}` } },
    el('figcaption', { text: chart.title }), plot, legend);
}

function renderTrends(t) {
  const samples = t.samples;
  const last = samples.length ? Date.parse(samples[samples.length - 1].end) : Date.now();
  const from = samples.length ? Math.max(Date.parse(samples[0].start), last - t.windowSeconds * 1000) : last;
  $('trends-note').textContent = samples.length
    ? `since ${clock(new Date(from).toISOString()).slice(0, 5)}, a sample every ${t.intervalMs / 1000} s`
    : `no sample yet (one every ${t.intervalMs / 1000} s)`;
  $('trend-charts').replaceChildren(...TREND_CHARTS.map((c) => trendChart(c, samples, from, last)));
}

let trendsDue = 0;
/** The trends change once per sample: fetched on the refresh after the next one is due. */
async function loadTrends() {
  if (Date.now() < trendsDue) return;
  const t = await api('GET', '/api/admin/trends');
  trendsDue = Date.now() + Math.max(0, t.intervalMs - REFRESH_MS / 2);
  renderTrends(t);
}

// --- Refresh loop ---------------------------------------------------------------------------

let refreshing = null;

/** One refresh of every panel; concurrent callers share it. */
function refresh() {
  if (!refreshing) {
    refreshing = refreshAll().finally(() => { refreshing = null; });
  }
  return refreshing;
}

async function refreshAll() {
  const results = await Promise.allSettled([
    api('GET', `/api/admin/overview?stuckAfter=${STUCK_AFTER}`).then((o) => {
      renderTiles(o);
      renderFunnel(o.funnel);
      renderQueues(o.queues, o.brokerError);
    }),
    api('GET', `/api/admin/orders?stuck=true&olderThan=${STUCK_AFTER}&size=20`).then(renderStuck),
    api('GET', `/api/admin/dead-letters?status=NEW&size=20${state.group ? `&group=${state.group}` : ''}`).then(renderDeadLetters),
    loadGroups(),
    api('GET', '/api/admin/bulk-actions?size=5').then(renderBulkActions),
    api('GET', '/api/admin/outbox/parked?size=20').then(renderParked),
    loadTimeline(),
    loadTrends(),
  ]);
  const failed = results.find((r) => r.status === 'rejected');
  const indicator = $('refresh-state');
  indicator.classList.toggle('error', Boolean(failed));
  indicator.textContent = failed
    ? `refresh failed: ${failed.reason.message}`
    : `live · updated ${new Date().toLocaleTimeString()}`;
}

async function loop() {
  if (!document.hidden) await refresh();
  setTimeout(loop, REFRESH_MS);
}

document.addEventListener('DOMContentLoaded', () => {
  $('timeline-form').addEventListener('submit', (event) => {
    event.preventDefault();
    const id = $('timeline-id').value.trim();
    if (!UUID_RE.test(id)) {
      flash('An order id is a UUID, e.g. 0190c1c5-8f3e-7a12-9b34-56789abcdef0.', 'error');
      return;
    }
    showTimeline(id);
  });
  $('bulk-cancel-stuck').addEventListener('click', () => bulkOnOrders('CANCEL_ORDERS'));
  $('bulk-retry-parked').addEventListener('click', () => bulkOnOrders('RETRY_COMPENSATIONS'));
  $('dead-scope-clear').addEventListener('click', () => {
    state.group = null;
    $('dead-scope').textContent = 'new, newest first';
    $('dead-scope-clear').hidden = true;
    refresh();
  });
  $('dead-detail-close').addEventListener('click', () => {
    $('dead-detail').hidden = true;
    state.inspectedId = null;
  });
  loop();
});
