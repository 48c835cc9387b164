(() => {
'use strict';

const POLL_MS = 1000;
const SAMPLES = 60;
const EVENTS_KEPT = 100;
const BACKLOG = 50;
const TIMEOUT_MS = 5000;
// The server sends a keep-alive comment every 15 s: three missed means the
// connection is dead even when TCP has not noticed.
const IDLE_MS = 45000;
const TOKEN_KEY = 'hivemind.token';

const $ = (sel, root = document) => root.querySelector(sel);
const esc = (v) => String(v ?? '').replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Every write is skipped when nothing changed: the page refreshes each
// second, and untouched nodes keep their selection, focus and hover.
function text(node, v) {
  v = v == null ? '' : String(v);
  if (node.textContent !== v) node.textContent = v;
}
function html(node, v) {
  if (node.html !== v) node.innerHTML = node.html = v;
}
function attr(node, name, v) {
  if (v == null) node.removeAttribute(name);
  else if (node.getAttribute(name) !== String(v)) node.setAttribute(name, v);
}
function show(node, on) {
  if (node.hidden === on) node.hidden = !on;
}
// A static skeleton; its [data-k] parts are kept in node.r for updates.
function make(tag, cls, inner) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  node.innerHTML = inner;
  node.r = {};
  for (const part of node.querySelectorAll('[data-k]')) node.r[part.dataset.k] = part;
  return node;
}
// Keyed reconciliation: the element of a key is kept across refreshes (so
// inputs and buttons survive), new keys are created, gone ones removed.
function sync(box, items, keyOf, create, update) {
  const old = box.keyed || new Map();
  const next = new Map();
  items.forEach((item, i) => {
    const key = keyOf(item);
    const node = old.get(key) || create(item);
    next.set(key, node);
    update(node, item);
    if (box.children[i] !== node) box.insertBefore(node, box.children[i] || null);
  });
  for (const [key, node] of old) if (!next.has(key)) node.remove();
  box.keyed = next;
}

const TONES = {
  ok: 'alive healthy running up loaded on serving',
  warn: 'suspect loading paused checking drained',
  bad: 'down failed rejected off unhealthy',
};
const tone = (word) => Object.keys(TONES).find((t) => TONES[t].split(' ').includes(word)) || 'muted';
const badge = (word, title, t = tone(word)) =>
  `<span class="badge ${t}"${title ? ` title="${esc(title)}"` : ''}>${esc(word)}</span>`;

const nf = new Intl.NumberFormat();
const int = (n) => (n == null ? '—' : nf.format(n));
const rate = (v) => (v == null ? '—' : v >= 100 ? int(Math.round(v)) : v.toFixed(v >= 10 ? 1 : 2));
function ms(v) {
  if (v == null) return '—';
  if (v < 100) return `${v.toFixed(v < 10 ? 2 : 1)} ms`;
  return v < 10000 ? `${Math.round(v)} ms` : `${(v / 1000).toFixed(1)} s`;
}
function bytes(n) {
  let i = 0;
  while (n >= 1024 && i < 4) { n /= 1024; i++; }
  return `${i ? n.toFixed(n < 10 ? 1 : 0) : n} ${['B', 'KiB', 'MiB', 'GiB', 'TiB'][i]}`;
}
function duration(v) {
  const s = Math.floor(v / 1000);
  const m = Math.floor(s / 60);
  const hr = Math.floor(m / 60);
  if (s < 60) return `${s}s`;
  return m < 60 ? `${m}m ${s % 60}s` : `${hr}h ${m % 60}m`;
}
const ago = (t) => (t ? `${duration(Math.max(0, Date.now() - t))} ago` : '');
const pad = (n, w = 2) => String(n).padStart(w, '0');
function clock(t) {
  const d = new Date(t);
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}
// A timestamp: local clock time, full date on hover.
const when = (t) => (Number.isFinite(t) && t > 0 && t < 8.64e15 ? `<time class="mono" title="${new Date(t).toISOString()}">${clock(t)}</time>` : '');
const cut = (s, n) => (s && s.length > n ? `${s.slice(0, n - 1)}…` : s || '');

// Right-aligned so the newest sample is always at the right edge; a null
// sample (nothing to average) breaks the line instead of faking a zero.
function spark(values, label, fmt) {
  const W = 120, H = 28;
  const max = Math.max(0, ...values.filter((v) => v != null));
  const offset = SAMPLES - values.length;
  let line = '', area = '', run = [];
  const flush = () => {
    if (run.length === 1) run.push(run[0]);
    if (run.length) {
      line += `M${run.join('L')}`;
      area += `M${run[0][0]},${H}L${run.join('L')}L${run[run.length - 1][0]},${H}Z`;
    }
    run = [];
  };
  values.forEach((v, i) => {
    if (v == null) return flush();
    run.push([+((offset + i) * W / (SAMPLES - 1)).toFixed(1), +(H - 2 - (v / (max || 1)) * (H - 4)).toFixed(1)]);
  });
  flush();
  const title = `${label}: now ${fmt(values[values.length - 1])}, max ${fmt(max)} over ${values.length} s`;
  return `<svg class="spark" viewBox="0 0 ${W} ${H}" preserveAspectRatio="none" role="img">` +
    `<title>${esc(title)}</title><path class="area" d="${area}"/><path class="line" d="${line}"/></svg>`;
}
function push(series, v) {
  series.push(v);
  if (series.length > SAMPLES) series.shift();
}


const model = {};
const roleCalls = new Map(); // role → {calls, t, series}
const sessionSeries = new Map(); // bridge → current sessions
const latency = [];
let lastLog = null;
// Bumped at every sign-in and sign-out so an old session's loops stop.
let session = 0;
let token = null;
let ready = false;
const seen = new Set();
const actedAt = new Map(); // bridge → when its last action returned
let lastBridges = new Map();

class AuthError extends Error {}
const auth = (accept) => ({ Authorization: `Bearer ${token}`, Accept: accept });

async function failure(res) {
  try {
    const body = await res.json();
    if (body?.error) return body.error;
  } catch { /* not JSON */ }
  return `${res.status} ${res.statusText || 'error'}`;
}

async function api(path, options = {}) {
  const ctl = new AbortController();
  const timer = setTimeout(() => ctl.abort(), TIMEOUT_MS);
  const headers = auth('application/json');
  if (options.body) headers['Content-Type'] = 'application/json';
  try {
    const res = await fetch(path, { ...options, headers, cache: 'no-store', signal: ctl.signal });
    if (res.status === 401) {
      const message = await failure(res);
      signOut(message);
      throw new AuthError(message);
    }
    if (!res.ok) throw new Error(await failure(res));
    return await res.json();
  } catch (e) {
    throw e.name === 'AbortError' ? new Error(`no answer in ${TIMEOUT_MS / 1000} s`) : e;
  } finally {
    clearTimeout(timer);
  }
}


function readToken() {
  const match = /(?:^#|&)token=([^&]*)/.exec(location.hash);
  let fromUrl = null;
  if (match) {
    try { fromUrl = decodeURIComponent(match[1]); } catch { fromUrl = match[1]; }
    // Out of the address bar, history and bookmarks.
    history.replaceState(history.state, '', location.pathname + location.search);
    store(fromUrl);
  }
  try { return sessionStorage.getItem(TOKEN_KEY) || fromUrl; } catch { return fromUrl; }
}
function store(value) {
  try {
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    else sessionStorage.removeItem(TOKEN_KEY);
  } catch { /* storage disabled: the token lives in memory only */ }
}

function signOut(message) {
  session++;
  token = null;
  store(null);
  stopStream();
  document.body.dataset.auth = 'required';
  show($('#signin'), true);
  text($('#signin-error'), message);
  html($('#poll-state'), badge('signed out'));
  html($('#stream-state'), '');
  $('#token').focus();
}

function start(value) {
  token = value;
  session++;
  delete document.body.dataset.auth;
  show($('#signin'), false);
  poll(session);
}


const ENDPOINTS = ['status', 'roles', 'nodes', 'bridges'];

async function poll(gen) {
  while (gen === session) {
    const began = performance.now();
    const results = await Promise.allSettled(ENDPOINTS.map((name) => api(`/v1/${name}`)));
    if (gen !== session) return;
    const errors = [];
    results.forEach((result, i) => {
      const name = ENDPOINTS[i];
      if (result.status === 'fulfilled') {
        model[name] = result.value;
        seen.add(name);
        sample[name](performance.now(), began);
      } else {
        errors.push(`/v1/${name}: ${result.reason.message}`);
      }
    });
    if (model.status) ensureStream(gen);
    text($('#stale'), errors.length ? `Not up to date: ${errors.join('; ')}` : '');
    show($('#stale'), errors.length > 0);
    html($('#poll-state'), errors.length === ENDPOINTS.length ? badge('API unreachable', errors[0], 'bad')
      : errors.length ? badge('partial', errors.join('\n'), 'warn') : badge('live', 'refreshed every second', 'ok'));
    render();
    if (!ready && ENDPOINTS.every((name) => seen.has(name))) {
      ready = true;
      document.body.dataset.ready = '1';
      performance.mark('hivemind-first-render');
    }
    await sleep(Math.max(100, POLL_MS - (performance.now() - began)));
  }
}

const sample = {
  status() {
    const log = model.status.log;
    const cur = { writes: log?.writes, sum: log?.write_seconds_sum };
    if (lastLog) {
      const writes = cur.writes - lastLog.writes;
      const sum = cur.sum - lastLog.sum;
      push(latency, writes > 0 && sum >= 0 ? (sum / writes) * 1000 : null);
    }
    lastLog = cur;
  },
  roles(now) {
    const names = new Set();
    for (const role of model.roles) {
      names.add(role.name);
      let s = roleCalls.get(role.name);
      if (!s) roleCalls.set(role.name, (s = { series: [] }));
      const calls = role.stats?.calls;
      if (s.t) {
        // A smaller count is a new instance's counter, not negative traffic.
        push(s.series, calls == null || s.calls == null ? null : calls < s.calls ? 0 : (calls - s.calls) / ((now - s.t) / 1000));
      }
      s.calls = calls;
      s.t = now;
    }
    for (const name of roleCalls.keys()) if (!names.has(name)) roleCalls.delete(name);
  },
  nodes() {},
  bridges(now, began) {
    // A poll that began before an action returned carries the old state.
    model.bridges = model.bridges.map((b) => ((actedAt.get(b.name) || 0) > began && lastBridges.get(b.name)) || b);
    lastBridges = new Map(model.bridges.map((b) => [b.name, b]));
    for (const b of model.bridges) {
      if (!sessionSeries.has(b.name)) sessionSeries.set(b.name, []);
      push(sessionSeries.get(b.name), b.sessions?.current ?? null);
    }
  },
};


function render() {
  if (model.status) header();
  if (model.nodes) nodes();
  if (model.roles) roles();
  if (model.bridges) bridges();
  if (model.status) logPanel();
}

function nameOf(id) {
  const member = model.status?.cluster?.members?.find((m) => m.id === id);
  const node = model.nodes?.nodes?.find((n) => n.id === id);
  return member?.name || node?.name || null;
}

function header() {
  const { node, cluster = {}, uptime_ms: uptime, version } = model.status;
  text($('#node-name'), node?.name);
  attr($('#node-name'), 'title', node && `${node.id} · API ${node.address} · v${version}`);
  text($('#mode'), cluster.mode);
  const leader = cluster.leader;
  text($('#leader'), leader ? `${nameOf(leader) || leader}${leader === node?.id ? ' (this node)' : ''}` : 'none');
  attr($('#leader'), 'title', leader || 'no leader known');
  text($('#epoch'), cluster.epoch);
  text($('#term'), cluster.term);
  text($('#uptime'), duration(uptime || 0));
  const degraded = !!cluster.problem || (cluster.health && cluster.health !== 'healthy');
  html($('#cluster-health'), badge(degraded ? cluster.health || 'degraded' : 'healthy', null, degraded ? 'bad' : 'ok'));
  const missing = cluster.missing_voters || [];
  let problem = degraded ? `Cluster ${cluster.health || 'degraded'}: ${cluster.problem || 'no reason given'}` : '';
  if (degraded && missing.length && !problem.includes('unreachable')) problem += ` (unreachable voters: ${missing.join(', ')})`;
  text($('#problem'), problem);
  show($('#problem'), degraded);
  document.title = `${degraded ? 'DEGRADED · ' : ''}${node?.name || ''} — Hivemind`;
}

function nodes() {
  const list = model.nodes.nodes || [];
  const cluster = model.status?.cluster || {};
  const members = new Map((cluster.members || []).map((m) => [m.id, m]));
  sync($('#nodes'), list, (n) => n.id || n.name, () => document.createElement('tr'), (row, n) => {
    const m = members.get(n.id);
    const healthy = n.healthy === true;
    attr(row, 'data-node', n.name || n.id);
    attr(row, 'data-health', healthy ? 'healthy' : 'unhealthy');
    attr(row, 'class', n.self ? 'self' : null);
    const word = healthy ? 'healthy' : !n.admitted ? 'not admitted' : n.health === 'alive' ? 'unhealthy' : n.health;
    const roles = n.roles?.length ? n.roles.map((r) => `<span class="chip">${esc(r.name)} <span class="muted">${esc(r.version)}</span></span>`).join('') : '<span class="muted">none</span>';
    html(row, [
      `<strong>${esc(n.name || '(unnamed)')}</strong>${n.self ? '<span class="tag">this node</span>' : ''}` +
        `${n.id === cluster.leader ? '<span class="tag leader">★ leader</span>' : ''}<div class="muted mono small">${esc(n.id)}</div>`,
      badge(word, null, healthy ? 'ok' : n.health === 'left' ? 'muted' : 'bad'),
      esc(n.health) + (n.admitted ? '' : ' · not admitted'),
      badge(n.gossip || 'unheard'),
      m ? badge(m.role + (m.reachable ? '' : ' · unreachable'), null, m.reachable ? 'ok' : 'bad') : badge(n.voter ? 'voter' : 'not a member'),
      m ? int(m.joined_epoch) : '—',
      `<div class="chips">${roles}</div>`,
      esc(n.api || '—'),
    ].map((cell, i) => `<td data-label="${NODE_COLUMNS[i]}"${i === 7 ? ' class="mono small"' : ''}>${cell}</td>`).join(''));
  });
  const g = model.status?.gossip;
  text($('#nodes-summary'), `${list.filter((n) => n.healthy).length} of ${list.length} healthy` +
    (g ? ` · gossip ${g.alive} alive, ${g.suspect} suspect, ${g.down} down, ${int(g.packets_rejected)} packets rejected` : ''));
}
const NODE_COLUMNS = ['Node', 'Health', 'Log', 'Gossip', 'Raft', 'Joined epoch', 'Roles', 'API'];

function roles() {
  sync($('#roles'), model.roles, (r) => r.name, () => make('article', 'card role',
    '<div data-k="live"></div><details class="history"><summary data-k="sum"></summary><ol class="list small" data-k="history"></ol></details>'),
  (card, role) => {
    attr(card, 'data-role', role.name);
    attr(card, 'data-state', role.state);
    const series = roleCalls.get(role.name)?.series || [];
    const s = role.stats;
    html(card.r.live,
      `<div class="card-head"><h3>${esc(role.name)}</h3>${badge(role.state, role.mode !== 'active' ? `operator mode: ${role.mode}` : null)}` +
      `<span class="muted mono small">${role.version ? `v${esc(role.version)} · ${esc(role.digest?.slice(0, 12))}` : 'not loaded'}</span></div>` +
      `<div class="metric"><div class="big">${rate(series[series.length - 1])}<span class="unit"> calls/s</span></div>${spark(series, 'calls/s', rate)}</div>` +
      `<div class="muted small">${s ? `${int(s.calls)} calls · ${int(s.traps)} traps · ${int(s.overloads)} overloads · workers ${int(s.busy_workers)}/${int(s.workers)} busy · queue ${int(s.queued)}/${int(s.queue)}` +
        (s.recycled ? ` · ${int(s.recycled)} recycled` : '') +
        (s.kept_replies ? ` · ${int(s.kept_replies)} answered from kept replies` : '') : 'no counters: not loaded'}</div>` +
      (role.loading ? `<div class="note warn">Loading ${esc(role.loading.digest.slice(0, 12))} for ${ms(role.loading.elapsed_ms)}</div>` : '') +
      (role.last_error ? `<div class="note bad">Last error: ${esc(role.last_error)}</div>` : ''));
    const history = (role.history || []).slice(-5).reverse();
    text(card.r.sum, history.length ? `Reloads (${role.history.length}) · last ${history[0].outcome} ${ago(history[0].at_ms)}` : 'No reloads yet');
    html(card.r.history, history.map((x) => `<li>${when(x.at_ms)} ${badge(x.outcome)} ${esc(x.version ? `v${x.version}` : x.digest.slice(0, 12))}` +
      `<span class="muted"> · ${ms(x.load_ms)}${x.cache_hit ? ' (cached)' : ''}</span>${x.error ? `<div class="err">${esc(x.error)}</div>` : ''}</li>`).join(''));
  });
  show($('#roles-empty'), !model.roles.length);
  const counts = {};
  for (const role of model.roles) counts[role.state] = (counts[role.state] || 0) + 1;
  text($('#roles-summary'), Object.entries(counts).map(([state, n]) => `${n} ${state}`).join(' · '));
}

const BACKEND_COLUMNS = ['Backend', 'Verdict', 'Seen by node', 'Here', 'Sessions now / total', 'Bytes', 'Actions'];
const BRIDGE_HTML = `<div class="card-head" data-k="head"></div><dl class="facts-grid">
<dt>Active</dt><dd><strong class="active-backend" data-k="active"></strong> <span class="muted" data-k="why"></span></dd>
<dt>Routing</dt><dd><strong data-k="on"></strong>: <span class="routing-reason" data-k="reason"></span></dd>
<dt>Pinned</dt><dd data-k="pinned"></dd>
<dt>Sessions</dt><dd class="metric" data-k="sessions"></dd></dl>
<div class="scroll"><table class="table"><thead><tr>${BACKEND_COLUMNS.map((c) => `<th>${c}</th>`).join('')}</tr></thead><tbody data-k="rows"></tbody></table></div>
<div class="controls"><input class="reason" type="text" placeholder="reason (required)" aria-label="Reason for the action">
<button type="button" class="danger" data-action="disable">Disable routing</button><button type="button" data-action="enable">Enable routing</button>
<button type="button" data-action="unpin">Unpin</button></div>
<div class="action-result small muted" role="status" data-k="result"></div><div class="action-error" role="alert" data-k="error"></div>`;

function backendRow(b) {
  const row = document.createElement('tr');
  row.innerHTML = BACKEND_COLUMNS.map((c) => `<td data-label="${c}"></td>`).join('');
  const name = esc(b.name);
  row.lastChild.className = 'actions';
  row.lastChild.innerHTML = ['Pin', 'Drain', 'Undrain'].map((a) => `<button type="button" data-action="${a.toLowerCase()}" data-backend="${name}">${a}</button>`).join('');
  return row;
}

function backendCells(b, bridge) {
  const h = b.health || {};
  const s = b.sessions;
  const local = b.local;
  const here = !local || local.healthy == null ? 'checking' : local.healthy ? 'up' : 'down';
  const seen = (b.seen_by || []).map((r) => `<li${r.counted ? '' : ' class="uncounted"'} title="${esc(`${r.detail}${r.counted ? '' : ' (not counted: the log does not hold this node alive)'} · seq ${r.seq}`)}">` +
    `${badge(r.healthy ? 'up' : 'down')} ${esc(r.node_name || r.node.slice(0, 8))}${r.healthy ? '' : ` <span class="muted small">${esc(cut(r.detail, 60))}</span>`}</li>`).join('');
  return [
    `<strong>${esc(b.name)}</strong>${b.active ? '<span class="tag ok">active</span>' : ''}` +
      `${bridge.pinned?.backend === b.name ? '<span class="tag">pinned</span>' : ''}` +
      `${b.drained ? `<span class="tag warn" title="${esc(b.drained.reason)}">drained</span>` : ''}` +
      `<div class="muted mono small">${esc(b.address)}</div><div class="muted small">check: ${esc(b.check)}</div>`,
    `${badge(h.verdict || 'unknown')}<div class="muted small">${int(h.up || 0)} up · ${int(h.down || 0)} down</div>`,
    `<ul class="seen">${seen || '<li class="muted">no reports yet</li>'}</ul>`,
    badge(here, local?.detail),
    s ? `${int(s.current)} / ${int(s.total)}` + (s.severed || s.connect_failures ? `<div class="muted small">${int(s.severed)} severed · ${int(s.connect_failures)} connect failures</div>` : '') : '—',
    s ? `→ ${bytes(s.bytes_to_backend)} ← ${bytes(s.bytes_to_client)}` : '—',
  ];
}

function bridges() {
  sync($('#bridges'), model.bridges, (b) => b.name, () => make('article', 'card bridge', BRIDGE_HTML), (card, b) => {
    const r = card.r;
    const on = b.routing?.enabled !== false;
    const active = b.active;
    attr(card, 'data-bridge', b.name);
    attr(card, 'data-routing', on ? 'on' : 'off');
    html(r.head, `<h3>${esc(b.name)}</h3><span class="muted mono small">listens ${esc(b.listen)}</span>` +
      badge(on ? 'routing on' : 'routing off', null, on ? 'ok' : 'bad') +
      badge(b.serving ? 'serving' : 'not serving', `this node: ${b.serving_reason}`, b.serving ? 'ok' : 'warn') +
      (b.serving ? '' : `<span class="muted">${esc(b.serving_reason)}</span>`) +
      (b.isolated ? badge('isolated', `cut off from the quorum; when_isolated = ${b.when_isolated}`, 'bad') : ''));
    text(r.active, active?.backend || 'none');
    text(r.why, active ? `— ${active.reason}${active.since_ms ? ` (${ago(active.since_ms)}, seq ${active.seq})` : ''}` : '— not decided yet');
    text(r.on, on ? 'on' : 'off');
    text(r.reason, b.routing?.reason);
    text(r.pinned, b.pinned ? `${b.pinned.backend} — ${b.pinned.reason}` : 'no');
    const more = [b.sessions?.refused && `${int(b.sessions.refused)} refused`, b.backend_changes && `${int(b.backend_changes)} backend changes`].filter(Boolean);
    html(r.sessions, `<span><strong>${int(b.sessions?.current)} now</strong> <span class="muted">${more.map((m) => `· ${m}`).join(' ')}</span></span>` +
      spark(sessionSeries.get(b.name) || [], 'current sessions', int));
    sync(r.rows, b.backends || [], (x) => x.name, backendRow, (row, x) => {
      attr(row, 'class', x.active ? 'active' : null);
      backendCells(x, b).forEach((cell, i) => html(row.children[i], cell));
    });
  });
  show($('#bridges-empty'), !model.bridges.length);
}

const ACTIONS = {
  disable: () => ({ enabled: false }),
  enable: () => ({ enabled: true }),
  pin: (backend) => ({ pin: backend }),
  unpin: () => ({ pin: null }),
  drain: (backend) => ({ drain: backend }),
  undrain: (backend) => ({ undrain: backend }),
};

async function act(event) {
  const button = event.target.closest('button[data-action]');
  const card = button?.closest('[data-bridge]');
  // One action at a time per bridge: a double click must not commit twice.
  if (!card || card.busy || !ACTIONS[button.dataset.action]) return;
  const { action, backend } = button.dataset;
  const name = card.dataset.bridge;
  const what = backend ? `${action} ${backend}` : action;
  const r = card.r;
  card.busy = true;
  attr(card, 'aria-busy', 'true');
  text(r.error, '');
  text(r.result, `${what}: sending…`);
  try {
    const body = JSON.stringify({ ...ACTIONS[action](backend), reason: $('.reason', card).value });
    const status = await api(`/v1/bridges/${encodeURIComponent(name)}`, { method: 'PATCH', body });
    actedAt.set(name, performance.now());
    text(r.result, `${what}: committed at ${new Date().toLocaleTimeString()}`);
    if (status?.name && model.bridges) {
      model.bridges = model.bridges.map((b) => (b.name === status.name ? status : b));
      lastBridges.set(status.name, status);
      bridges();
    }
  } catch (e) {
    if (e instanceof AuthError) return;
    text(r.result, '');
    text(r.error, `${what} failed: ${e.message}`);
  } finally {
    card.busy = false;
    attr(card, 'aria-busy', null);
  }
}

function logPanel() {
  const { last_seq: seq, cluster = {}, log } = model.status;
  const fact = (k, v) => (v == null ? '' : `<dt>${k}</dt><dd>${esc(typeof v === 'number' ? int(v) : v)}</dd>`);
  html($('#log-facts'), fact('Last seq', seq) + fact('Commit index', log?.commit_index) +
    fact('Applied index', log?.applied_index ?? cluster.last_applied) + fact('Last index', log?.last_index) +
    fact('Snapshot', cluster.snapshot ?? 'none') + fact('Writes here', log?.writes ?? 'not reported') +
    fact('Mean write', log?.writes > 0 ? ms((log.write_seconds_sum / log.writes) * 1000) : '—'));
  const recent = latency.filter((v) => v != null);
  text($('#lat-now'), log?.writes == null ? 'not reported' : recent.length ? ms(recent[recent.length - 1]) : 'no writes');
  html($('#lat-spark'), spark(latency, 'mean write latency', ms));
}


// fetch, not EventSource: EventSource cannot send the bearer token.
const tail = { last: null, pending: [], scheduled: false };
let streamCtl = null;
let streamGen = -1;

function ensureStream(gen) {
  if (streamGen === gen) return;
  streamGen = gen;
  if (tail.last == null) tail.last = Math.max(0, (model.status.last_seq || 0) - BACKLOG);
  follow(gen);
}

function stopStream() {
  streamGen = -1;
  streamCtl?.abort();
}

function parser(onFrame) {
  let buffer = '', data = [], id = null, kind = '', skipLf = false;
  return (chunk) => {
    // A CRLF split across two chunks is one line end, not two.
    if (skipLf && chunk[0] === '\n') chunk = chunk.slice(1);
    skipLf = chunk.endsWith('\r');
    const lines = (buffer + chunk).split(/\r\n|\r|\n/);
    buffer = lines.pop();
    for (const line of lines) {
      if (!line) {
        if (data.length) onFrame({ id, kind, data: data.join('\n') });
        data = [];
        kind = '';
      } else if (line[0] !== ':') {
        const colon = line.indexOf(':');
        const field = colon < 0 ? line : line.slice(0, colon);
        const value = colon < 0 ? '' : line.slice(colon + (line[colon + 1] === ' ' ? 2 : 1));
        if (field === 'data') data.push(value);
        else if (field === 'event') kind = value;
        else if (field === 'id') id = value;
      }
    }
  };
}

function onFrame(frame) {
  let event = null;
  try { event = JSON.parse(frame.data); } catch { /* shown raw below */ }
  if (!event || typeof event !== 'object') event = { kind: frame.kind, key: '', payload: frame.data };
  event.seq = Number(event.seq ?? frame.id);
  if (!(event.seq > tail.last)) return;
  tail.last = event.seq;
  tail.pending.push(event);
  if (!tail.scheduled) {
    tail.scheduled = true;
    // The backlog arrives as a burst: one DOM update per burst.
    setTimeout(flushEvents, 30);
  }
}

async function follow(gen) {
  let delay = 1000;
  const state = (word, title, t) => html($('#stream-state'), badge(word, title, t));
  while (gen === streamGen && gen === session) {
    const ctl = (streamCtl = new AbortController());
    let idle;
    const arm = () => { clearTimeout(idle); idle = setTimeout(() => ctl.abort(), IDLE_MS); };
    try {
      state('events: connecting', null, 'warn');
      arm();
      const res = await fetch(`/v1/events/stream?since=${tail.last}`, {
        headers: auth('text/event-stream'), cache: 'no-store', signal: ctl.signal,
      });
      if (res.status === 401) return signOut(await failure(res));
      if (!res.ok || !res.body) throw new Error(await failure(res));
      delay = 1000;
      state('events live', `following from seq ${tail.last}`, 'ok');
      const reader = res.body.getReader();
      const decoder = new TextDecoder();
      const parse = parser(onFrame);
      for (;;) {
        const { value, done } = await reader.read();
        if (done) throw new Error('the server closed the stream');
        arm();
        parse(decoder.decode(value, { stream: true }));
      }
    } catch (e) {
      if (gen !== streamGen || gen !== session) return;
      state(`events: retry in ${delay / 1000} s`, e.name === 'AbortError' ? 'no data for a while' : e.message, 'bad');
      await sleep(delay);
      delay = Math.min(delay * 2, 30000);
    } finally {
      clearTimeout(idle);
    }
  }
}

function flushEvents() {
  tail.scheduled = false;
  const list = $('#events');
  const batch = tail.pending.splice(0).slice(-EVENTS_KEPT);
  for (const e of batch) {
    const payload = typeof e.payload === 'string' ? e.payload : JSON.stringify(e.payload ?? '');
    const source = nameOf(e.source) || (e.source || '').slice(0, 8);
    const t = /fail|error|reject|trap/.test(e.kind) ? 'bad' : /left|drain|routing|pin/.test(e.kind) ? 'warn' : 'muted';
    const item = make('li', null, `${when(e.timestamp_ms) || '<span></span>'}<span class="mono seq">#${e.seq}</span>` +
      `<span class="kind badge ${t}">${esc(e.kind)}</span><span class="key mono">${esc(e.key)}</span>` +
      `<span class="muted source" title="${esc(e.source)}">${esc(source)}</span>` +
      `<span class="payload mono muted" title="${esc(cut(payload, 2000))}">${esc(cut(payload, 200))}</span>`);
    item.dataset.seq = e.seq;
    list.prepend(item);
  }
  while (list.children.length > EVENTS_KEPT) list.lastElementChild.remove();
  show($('#events-empty'), !list.children.length);
}


function init() {
  $('#signin-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const value = $('#token').value.trim();
    if (!value) return text($('#signin-error'), 'Enter the token.');
    store(value);
    $('#token').value = '';
    start(value);
  });
  $('#sign-out').addEventListener('click', () => signOut('Signed out.'));
  $('#bridges').addEventListener('click', act);
  // A page kept in the back/forward cache would keep its event stream
  // open, and browsers give a host six connections: a few such pages
  // would stall the next one. Stop when hidden away, resume when shown.
  addEventListener('pagehide', () => {
    session++;
    stopStream();
  });
  addEventListener('pageshow', (e) => {
    if (e.persisted && token) start(token);
  });
  const saved = readToken();
  if (saved) start(saved);
  else signOut('');
}

if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', init);
else init();
})();
