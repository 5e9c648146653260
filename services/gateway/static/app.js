// fabric dashboard: vanilla ES2020, no dependencies (the page's CSP allows only this gateway's own files).
//
// Everything is read through the gateway's API with the caller's own scopes: the token, when
// there is one, is in an HttpOnly cookie that fetch() and EventSource send on their own.
// Live data comes from GET /api/events (Server-Sent Events: node heartbeats, task state
// changes, services up and down); the rest is polled (services and memory every 3 s, the
// topology every 5 s).  DOM is built with createElement/textContent only: no innerHTML.
'use strict';

(() => {
  // -- constants --------------------------------------------------------------------------
  const SAMPLES = 60;              // points in each sparkline
  const STALE_INTERVALS = 3;       // a node is stale after this many heartbeat intervals without one
  const SERVICES_EVERY_MS = 3000;
  const RATE_WINDOW_MS = 2000;     // the shortest window requests/s and errors/s are measured over
  const MEMORY_EVERY_MS = 3000;
  const TOPOLOGY_EVERY_MS = 5000;
  const NODES_EVERY_MS = 15000;    // re-read the registry now and then: nodes whose record expired go
  const MAX_TASK_ROWS = 200;
  const STATES = ['submitted', 'queued', 'waiting', 'running', 'succeeded', 'failed', 'cancelled', 'dead'];
  const TERMINAL = new Set(['succeeded', 'failed', 'cancelled', 'dead']);
  const SVGNS = 'http://www.w3.org/2000/svg';

  // -- small helpers ------------------------------------------------------------------------
  const tid = (id, root = document) => root.querySelector(`[data-testid="${id}"]`);

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    applyProps(node, props);
    for (const c of children) {
      if (c === null || c === undefined || c === false) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  function svgEl(tag, props, ...children) {
    const node = document.createElementNS(SVGNS, tag);
    applyProps(node, props);
    for (const c of children) {
      if (c === null || c === undefined || c === false) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  function applyProps(node, props) {
    if (!props) return;
    for (const [k, v] of Object.entries(props)) {
      if (v === null || v === undefined || v === false) continue;
      if (k === 'class') node.setAttribute('class', v);
      else if (k === 'text') node.textContent = v;
      else if (k === 'testid') node.setAttribute('data-testid', v);
      else if (k === 'data') for (const [dk, dv] of Object.entries(v)) node.dataset[dk] = dv;
      else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? '' : String(v));
    }
  }

  function setText(node, text) {
    const s = String(text);
    if (node.textContent !== s) node.textContent = s;
  }

  function setAttr(node, name, value) {
    const s = String(value);
    if (node.getAttribute(name) !== s) node.setAttribute(name, s);
  }

  const known = (v) => typeof v === 'number' && v >= 0 && Number.isFinite(v);

  function fmtBytes(n) {
    if (!known(n)) return '–';
    const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return `${n >= 100 || i === 0 ? n.toFixed(0) : n.toFixed(1)} ${units[i]}`;
  }

  function fmtRate(n) {
    if (!known(n)) return '–';
    const units = ['B/s', 'kB/s', 'MB/s', 'GB/s'];
    let i = 0;
    while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
    return `${n >= 100 || i === 0 ? n.toFixed(0) : n.toFixed(1)} ${units[i]}`;
  }

  const fmtPct = (v, digits = 0) => (known(v) ? `${v.toFixed(digits)}%` : '–');

  function fmtDuration(ms) {
    if (!Number.isFinite(ms) || ms < 0) return '–';
    if (ms < 1000) return `${Math.round(ms)} ms`;
    const s = ms / 1000;
    if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m}m ${String(Math.floor(s % 60)).padStart(2, '0')}s`;
    const h = Math.floor(m / 60);
    if (h < 48) return `${h}h ${String(m % 60).padStart(2, '0')}m`;
    return `${Math.floor(h / 24)}d ${h % 24}h`;
  }

  const fmtRatePerS = (v) => (v === null ? '–' : v === 0 ? '0' : v < 10 ? v.toFixed(2) : v.toFixed(1));

  // -- the API ---------------------------------------------------------------------------
  class ApiError extends Error {
    constructor(status, problem, fallback) {
      super((problem && problem.detail) || fallback || `HTTP ${status}`);
      this.status = status;
      this.problem = problem;
    }
  }

  async function api(path, { method = 'GET', body, as = 'json', headers = {} } = {}) {
    const init = { method, credentials: 'same-origin', headers: { Accept: 'application/json', ...headers } };
    if (body !== undefined) {
      init.body = JSON.stringify(body);
      init.headers['Content-Type'] = 'application/json';
    }
    let res;
    try {
      res = await fetch(path, init);
    } catch (err) {
      throw new ApiError(0, null, `the gateway does not answer (${err.message || err})`);
    }
    if (!res.ok) {
      let problem = null;
      try { problem = await res.json(); } catch (_) { /* not problem+json */ }
      throw new ApiError(res.status, problem, `${method} ${path}: HTTP ${res.status}`);
    }
    if (as === 'bytes') return new Uint8Array(await res.arrayBuffer());
    if (as === 'none' || res.status === 204) return null;
    return res.json();
  }

  // errors of the background readers, shown in one banner until that reader succeeds again
  const failing = new Map();
  function reportError(source, err) {
    if (err) failing.set(source, err.message || String(err)); else failing.delete(source);
    const banner = tid('banner');
    if (failing.size === 0) { banner.classList.add('hidden'); return; }
    banner.textContent = [...failing].map(([k, v]) => `${k}: ${v}`).join(' — ');
    banner.classList.remove('hidden');
  }

  // run fn now (or after the first period) and then ms after each run ends; returns "run it now", which
  // during a run asks for one more right after it (never two runs at once, never two timers)
  function every(ms, fn, now = true) {
    let timer = null;
    let running = false;
    let again = false;
    const run = async () => {
      clearTimeout(timer);
      timer = null;
      if (running) { again = true; return; }
      running = true;
      try {
        await fn();
      } finally {
        running = false;
        clearTimeout(timer);
        if (again) { again = false; timer = setTimeout(run, 0); } else timer = setTimeout(run, ms);
      }
    };
    if (now) run(); else timer = setTimeout(run, ms);
    return run;
  }

  // -- the caller ------------------------------------------------------------------------
  const me = { anonymous: true, scopes: [], user: null, name: 'anonymous', seesTasks: false, canSubmit: false };

  async function loadWhoami() {
    try {
      const who = await api('/api/whoami');
      Object.assign(me, who);
      const admin = who.scopes.includes('admin');
      me.seesTasks = admin || (!who.anonymous && who.user !== null);
      me.canSubmit = admin || who.scopes.includes('submit');
      reportError('whoami', null);
    } catch (err) {
      reportError('whoami', err);
    }
    renderWhoami();
    tid('gateway-info').textContent = me.node ? `gateway on ${me.node} · fabric ${me.version}` : '';
  }

  function renderWhoami() {
    const who = tid('whoami');
    who.replaceChildren();
    if (me.anonymous) {
      who.append('anonymous ', el('span', { class: 'faint', text: `(${me.scopes.join(', ') || 'no scopes'})` }));
      tid('token-form').classList.remove('hidden');
      tid('logout-button').classList.add('hidden');
    } else {
      who.append('signed in as ', el('b', { text: me.name }),
        el('span', { class: 'faint', text: ` (${me.user ? `user ${me.user}; ` : ''}${me.scopes.join(', ')})` }));
      who.title = 'the token is kept in an HttpOnly cookie for this gateway';
      tid('token-form').classList.add('hidden');
      tid('logout-button').classList.remove('hidden');
    }
  }

  function setupSession() {
    tid('token-form').addEventListener('submit', async (ev) => {
      ev.preventDefault();
      const input = tid('token-input');
      const token = input.value.trim();
      if (!token) return;
      try {  // try it first: a bad token shows its reason here rather than a bare 401 page
        await api('/api/whoami', { headers: { Authorization: `Bearer ${token}` } });
        reportError('sign in', null);
        window.location.assign(`/?token=${encodeURIComponent(token)}`);
      } catch (err) {
        reportError('sign in', err);
      }
    });
    tid('logout-button').addEventListener('click', async () => {
      try {
        await api('/api/logout', { method: 'POST', as: 'none' });
        window.location.assign('/');
      } catch (err) {
        reportError('sign out', err);
      }
    });
  }

  // -- live status and first data --------------------------------------------------------
  function setLive(state) {
    const node = tid('live-status');
    node.dataset.live = state;
    setText(node, state);
  }

  function markFirstData() {
    if (document.body.dataset.firstData === undefined) {
      document.body.dataset.firstData = String(performance.now());
    }
  }

  // -- nodes ------------------------------------------------------------------------------
  const nodes = new Map();  // name -> {rec, seenAt, time, cpu:[], mem:[], gpu: Map(index -> []), ui}

  function sparkline(kind, testid) {
    const svg = svgEl('svg', { class: `spark ${kind}`, viewBox: '0 0 120 36', preserveAspectRatio: 'none',
      'aria-hidden': 'true' });
    for (const y of [9, 18, 27]) svg.append(svgEl('line', { class: 'grid', x1: 0, x2: 120, y1: y, y2: y }));
    const area = svgEl('polygon', { class: 'area', points: '' });
    const line = svgEl('polyline', { class: 'line', points: '', testid });
    svg.append(area, line);
    return { svg, area, line };
  }

  function drawSpark(spark, values) {
    if (values.length === 0) return;
    const W = 120, H = 36;
    const step = W / (SAMPLES - 1);
    const pts = values.map((v, i) => {
      const x = (SAMPLES - values.length + i) * step;
      const y = H - 1 - (Math.min(100, Math.max(0, v)) / 100) * (H - 2);
      return `${x.toFixed(1)},${y.toFixed(1)}`;
    });
    if (pts.length === 1) pts.unshift(`${(W - step).toFixed(1)},${pts[0].split(',')[1]}`);
    const line = pts.join(' ');
    const first = pts[0].split(',')[0];
    setAttr(spark.line, 'points', line);
    setAttr(spark.area, 'points', `${first},${H} ${line} ${W},${H}`);
  }

  function gauge(label, kind, testid) {
    const value = el('span', { class: 'gauge-value', text: '–' });
    const sub = el('div', { class: 'gauge-sub', text: '' });
    const spark = sparkline(kind, testid);
    const box = el('div', { class: 'gauge', testid: `${kind}-gauge` },
      el('div', { class: 'gauge-head' }, el('span', { class: 'gauge-label', text: label }), value), sub, spark.svg);
    return { box, value, sub, spark };
  }

  function buildNodeCard(name) {
    const ui = {};
    ui.name = el('span', { class: 'node-name', text: name });
    ui.host = el('span', { class: 'node-host' });
    ui.badge = el('span', { class: 'badge up', testid: 'node-status', text: 'up' });
    ui.meta = el('div', { class: 'node-meta' });
    ui.cpu = gauge('CPU', 'cpu', 'cpu-graph');
    ui.cores = el('div', { class: 'cores', title: 'per core' });
    ui.cpu.box.append(ui.cores);
    ui.mem = gauge('Memory', 'mem', 'mem-graph');
    ui.facts = el('dl', { class: 'facts' });
    ui.gpus = el('div', { testid: 'gpu-list' });
    ui.cl = el('div', { testid: 'opencl-list' });
    ui.labels = el('div', { testid: 'node-labels' });
    ui.card = el('article', { class: 'node-card', testid: 'node-card', data: { node: name, stale: 'false' } },
      el('div', { class: 'node-title' }, ui.name, ui.host, ui.badge),
      ui.meta,
      el('div', { class: 'gauges' }, ui.cpu.box, ui.mem.box),
      ui.facts, ui.gpus, ui.cl, ui.labels);
    ui.gpuCards = new Map();
    return ui;
  }

  function placeNodeCard(card) {
    const list = tid('node-list');
    const name = card.dataset.node;
    const after = [...list.querySelectorAll('[data-testid="node-card"]')].find((c) => c.dataset.node > name);
    list.insertBefore(card, after || null);
    tid('nodes-empty').classList.add('hidden');
  }

  function onNode(rec, live) {
    if (!rec || !rec.node) return;
    let n = nodes.get(rec.node);
    if (!n) {
      n = { rec, seenAt: 0, time: -1, cpu: [], mem: [], gpu: new Map(), ui: buildNodeCard(rec.node) };
      nodes.set(rec.node, n);
      placeNodeCard(n.ui.card);
    }
    if (rec.time_ms < n.time) return;  // an older record than the one shown (a list read raced an event)
    const fresh = rec.time_ms > n.time;
    n.rec = rec;
    n.time = rec.time_ms;
    n.seenAt = performance.now() - (live ? 0 : (rec.age_s || 0) * 1000);
    if (fresh) {
      push(n.cpu, rec.cpu.percent);
      push(n.mem, rec.memory.percent);
      for (const g of rec.gpus || []) {
        if (!n.gpu.has(g.index)) n.gpu.set(g.index, []);
        push(n.gpu.get(g.index), known(g.utilization_gpu) ? g.utilization_gpu : 0);
      }
    }
    renderNode(n);
    markStale(n);
    markFirstData();
    renderSummary();
  }

  function push(arr, v) {
    arr.push(Number.isFinite(v) ? v : 0);
    if (arr.length > SAMPLES) arr.splice(0, arr.length - SAMPLES);
  }

  function renderNode(n) {
    const { rec, ui } = n;
    const h = rec.host || {};
    setText(ui.host, h.hostname && h.hostname !== rec.node ? h.hostname : '');
    ui.host.title = h.hostname || '';
    const meta = [`${h.architecture || '?'} / ${h.os || '?'}${h.os_release ? ` ${h.os_release}` : ''}`,
      `${h.cpu_model || 'CPU'} × ${h.cpu_cores || '?'}`, `${fmtBytes(h.ram_bytes)} RAM`];
    if (h.fabric_version) meta.push(`fabric ${h.fabric_version}`);
    const metaKey = meta.join('|');
    if (ui.meta.dataset.key !== metaKey) {
      ui.meta.dataset.key = metaKey;
      ui.meta.replaceChildren(...meta.map((m) => el('span', { text: m })));
    }
    // CPU
    const c = rec.cpu || {};
    setText(ui.cpu.value, fmtPct(c.percent));
    setText(ui.cpu.sub, `load ${[c.load_1, c.load_5, c.load_15].map((v) => (known(v) ? v.toFixed(2) : '–')).join(' ')}`
      + (known(c.freq_mhz) ? ` · ${(c.freq_mhz / 1000).toFixed(2)} GHz` : ''));
    drawSpark(ui.cpu.spark, n.cpu);
    const per = c.per_core || [];
    if (ui.cores.childElementCount !== per.length) {
      ui.cores.replaceChildren(...per.map(() => el('span', { class: 'core' }, el('i'))));
    }
    per.forEach((v, i) => { ui.cores.children[i].firstChild.style.width = `${Math.min(100, Math.max(0, v))}%`; });
    ui.cores.title = `per core: ${per.map((v) => `${Math.round(v)}%`).join(' ')}`;
    // memory
    const m = rec.memory || {};
    setText(ui.mem.value, fmtPct(m.percent));
    setText(ui.mem.sub, `${fmtBytes(m.used)} of ${fmtBytes(m.total)}`
      + (m.swap_total > 0 ? ` · swap ${fmtBytes(m.swap_used)}` : ''));
    drawSpark(ui.mem.spark, n.mem);
    renderFacts(n);
    renderGpus(n);
    renderOpenCL(n);
    renderLabels(n);
  }

  function renderFacts(n) {
    const { rec, ui } = n;
    const rows = [];
    for (const d of rec.disks || []) {
      rows.push(['disk', `${d.path}  ${fmtBytes(d.used)} of ${fmtBytes(d.total)} (${fmtPct(d.percent)})`]);
    }
    const net = rec.net || {};
    rows.push(['network', `↑ ${fmtRate(net.sent_per_s)}  ↓ ${fmtRate(net.recv_per_s)}`]);
    const res = Object.entries(rec.resources || {});
    if (res.length) rows.push(['resources', res.map(([k, v]) => `${k}=${v}`).join(', ')]);
    if (ui.facts.childElementCount !== rows.length * 2) {
      ui.facts.replaceChildren(...rows.flatMap(() => [el('dt'), el('dd')]));
    }
    rows.forEach(([k, v], i) => {
      setText(ui.facts.children[2 * i], k);
      setText(ui.facts.children[2 * i + 1], v);
      ui.facts.children[2 * i + 1].title = v;
    });
  }

  function renderGpus(n) {
    const { rec, ui } = n;
    const gpus = rec.gpus || [];
    if (!gpus.length) {
      const nv = rec.nvml || {};
      const text = nv.available ? 'no NVIDIA GPU' : `no NVIDIA GPU${nv.reason ? `: ${nv.reason}` : ''}`;
      if (ui.gpus.dataset.mode !== 'none' || ui.gpus.textContent !== text) {
        ui.gpus.dataset.mode = 'none';
        ui.gpuCards.clear();
        ui.gpus.replaceChildren(el('div', { class: 'faint', text, title: text }));
        ui.gpus.firstChild.classList.add('node-meta');
      }
      return;
    }
    if (ui.gpus.dataset.mode !== 'gpus') {
      ui.gpus.dataset.mode = 'gpus';
      ui.gpus.replaceChildren(el('div', { class: 'sub-title', text: 'GPUs' }));
      ui.gpuCards.clear();
    }
    const seen = new Set();
    for (const g of gpus) {
      seen.add(g.index);
      let card = ui.gpuCards.get(g.index);
      if (!card) {
        card = { name: el('span', { class: 'gpu-name' }), idx: el('span', { class: 'faint mono' }),
          figs: el('div', { class: 'gpu-figs' }), spark: sparkline('gpu', 'gpu-graph') };
        card.box = el('div', { class: 'gpu', testid: 'gpu', data: { gpu: String(g.index) } },
          el('div', { class: 'gpu-head' }, card.name, card.idx), card.figs, card.spark.svg);
        ui.gpuCards.set(g.index, card);
        ui.gpus.append(card.box);
      }
      setText(card.name, g.name || `GPU ${g.index}`);
      setText(card.idx, `#${g.index}${g.compute_capability ? ` · sm ${g.compute_capability}` : ''}`);
      const figs = [['util', fmtPct(g.utilization_gpu)],
        ['memory', known(g.memory_used) ? `${fmtBytes(g.memory_used)} / ${fmtBytes(g.memory_total)}`
          : fmtBytes(g.memory_total)],
        ['temp', known(g.temperature_c) ? `${Math.round(g.temperature_c)} °C` : '–'],
        ['power', known(g.power_w) ? `${g.power_w.toFixed(0)} W${known(g.power_limit_w)
          ? ` / ${g.power_limit_w.toFixed(0)} W` : ''}` : '–']];
      if ((g.processes || []).length) figs.push(['procs', String(g.processes.length)]);
      const key = figs.flat().join('|');
      if (card.figs.dataset.key !== key) {
        card.figs.dataset.key = key;
        card.figs.replaceChildren(...figs.map(([k, v]) => el('span', null, `${k} `, el('b', { text: v }))));
      }
      drawSpark(card.spark, n.gpu.get(g.index) || []);
    }
    for (const [idx, card] of ui.gpuCards) {
      if (!seen.has(idx)) { card.box.remove(); ui.gpuCards.delete(idx); }
    }
  }

  function renderOpenCL(n) {
    const { rec, ui } = n;
    const cl = rec.opencl || {};
    const devs = cl.devices || [];
    const key = JSON.stringify([cl.available, cl.reason, devs.map((d) => d.id + d.name)]);
    if (ui.cl.dataset.key === key) return;
    ui.cl.dataset.key = key;
    if (!devs.length) {
      const text = `no OpenCL device${cl.reason ? `: ${cl.reason}` : ''}`;
      ui.cl.replaceChildren(el('div', { class: 'node-meta faint', text, title: text }));
      return;
    }
    ui.cl.replaceChildren(el('div', { class: 'sub-title', text: 'OpenCL' }), el('ul', { class: 'cl-list' },
      ...devs.map((d) => el('li', { testid: 'opencl-device', title: `${d.id}: ${d.version || ''} ${d.driver_version || ''}` },
        el('span', { class: 'badge', text: d.type || '?' }),
        el('span', { class: 'cl-name', text: d.name || d.id }),
        el('span', { class: 'faint', text: [d.vendor, d.compute_units ? `${d.compute_units} CU` : '',
          d.global_memory ? fmtBytes(d.global_memory) : ''].filter(Boolean).join(' · ') })))));
  }

  function renderLabels(n) {
    const { rec, ui } = n;
    const labels = Object.entries(rec.labels || {});
    const key = JSON.stringify(labels);
    if (ui.labels.dataset.key === key) return;
    ui.labels.dataset.key = key;
    ui.labels.replaceChildren(...(labels.length ? [el('div', { class: 'chips' },
      ...labels.map(([k, v]) => el('span', { class: 'chip', text: `${k}=${v}` })))] : []));
  }

  function markStale(n) {
    const interval = Math.max(0.1, Number(n.rec.interval_s) || 1) * 1000;
    const quiet = performance.now() - n.seenAt;
    const stale = quiet > STALE_INTERVALS * interval;
    const was = n.ui.card.dataset.stale === 'true';
    if (stale === was && n.ui.badge.dataset.init) {
      if (stale) setText(n.ui.badge, `stale ${fmtDuration(quiet)}`);
      return;
    }
    n.ui.badge.dataset.init = '1';
    n.ui.card.dataset.stale = String(stale);
    n.ui.badge.className = `badge ${stale ? 'stale' : 'up'}`;
    setText(n.ui.badge, stale ? `stale ${fmtDuration(quiet)}` : 'up');
    n.ui.badge.title = stale ? 'no heartbeat for more than 3 intervals' : `heartbeat every ${n.rec.interval_s} s`;
  }

  async function loadNodes() {
    try {
      const { nodes: list } = await api('/api/nodes');
      const names = new Set(list.map((r) => r.node));
      for (const rec of list) onNode(rec, false);
      for (const [name, n] of nodes) {  // gone from the registry (its record expired): drop the card
        if (!names.has(name) && n.ui.card.dataset.stale === 'true') {
          n.ui.card.remove();
          nodes.delete(name);
        }
      }
      reportError('nodes', null);
    } catch (err) {
      reportError('nodes', err);
    }
    renderSummary();
  }

  // -- tasks ------------------------------------------------------------------------------
  const tasks = new Map();  // id -> {id, kind, state, priority, node, created, start, finished, t, ui}
  const watched = new Set(); // submitted here: show their output when they end
  let selectedTask = null;

  function priorityOptions() {
    const sel = tid('submit-priority');
    for (let p = 10; p >= 1; p--) {
      sel.append(el('option', { value: String(p), text: p === 10 ? '10 (most urgent)' : p === 1 ? '1 (least)' : String(p) }));
    }
    sel.value = '5';
  }

  function taskEntry(id) {
    let t = tasks.get(id);
    if (!t) {
      t = { id, kind: '', state: '', priority: null, node: '', created: 0, start: 0, finished: 0, t: -1,
        lastHeard: performance.now(), ui: null };
      tasks.set(id, t);
    }
    return t;
  }

  function applyRecord(rec) {
    const t = taskEntry(rec.id);
    t.kind = rec.kind;
    t.priority = rec.priority;
    t.created = rec.created_ms || t.created;
    const atts = rec.attempts || [];
    if (atts.length) {
      const last = atts[atts.length - 1];
      t.node = last.node || t.node;
      t.start = atts[0].start_ms || t.start;
    }
    t.finished = rec.finished_ms || t.finished;
    t.exitCode = rec.exit_code;
    t.error = rec.error;
    t.rec = rec;
    if (newer(t, rec.updated_ms || 0, rec.state)) setState(t, rec.state, rec.updated_ms || 0);
    renderTask(t);
  }

  // whether a state seen at *time* is newer than the row's: by time, and at the same time (or against a state
  // whose time is unknown: the submit reply's) by how far along it is, so the row never steps back
  const RANK = { submitted: 0, queued: 1, waiting: 1, running: 2, succeeded: 3, failed: 3, cancelled: 3, dead: 3 };
  const rank = (state) => (state in RANK ? RANK[state] : -1);
  function newer(t, time, state) {
    if (t.t === null || time === t.t) return rank(state) >= rank(t.state);
    return time > t.t;
  }

  function setState(t, state, time) {
    const before = t.state;
    t.state = state;
    t.t = time;
    t.lastHeard = performance.now();
    if (t.ui) setAttr(t.ui.row, 'data-state', state);
    if (before !== state && TERMINAL.has(state) && !TERMINAL.has(before) && watched.has(t.id)) {
      watched.delete(t.id);
      showOutput(t.id);
    }
  }

  function onTaskEvents(batch) {
    const unknown = new Set();
    for (const ev of batch.events || []) {
      const isNew = !tasks.has(ev.id) || !tasks.get(ev.id).kind;
      const t = taskEntry(ev.id);
      if (isNew) unknown.add(ev.id);
      if (!newer(t, ev.time_ms, ev.state)) continue;  // older than what the row shows
      if (ev.node) t.node = ev.node;
      if (ev.state === 'running' && !t.start) t.start = ev.time_ms;
      if (TERMINAL.has(ev.state)) t.finished = ev.time_ms;
      if (ev.state === 'submitted' && !t.created) t.created = ev.time_ms;
      if (!t.created) t.created = ev.time_ms;
      ensureRow(t);
      setState(t, ev.state, ev.time_ms);
      renderTask(t);
    }
    for (const id of unknown) fetchTask(id);
    renderTaskCounts();
  }

  async function fetchTask(id) {
    try {
      applyRecord(await api(`/api/tasks/${encodeURIComponent(id)}`));
      renderTaskCounts();
    } catch (err) {
      if (err.status !== 404) reportError(`task ${id}`, err); else reportError(`task ${id}`, null);
    }
  }

  async function loadTasks() {
    if (!me.seesTasks) return;
    try {
      const { tasks: list } = await api('/api/tasks?limit=100');
      for (const rec of list.slice().reverse()) applyRecord(rec);
      reportError('tasks', null);
    } catch (err) {
      if (err.status === 401 || err.status === 403) {
        me.seesTasks = false;
        renderTasksAccess(err.message);
      } else {
        reportError('tasks', err);
      }
    }
    renderTaskCounts();
  }

  function ensureRow(t) {
    if (t.ui) return;
    const ui = {};
    ui.id = el('td', { class: 'id', text: t.id, title: t.id });
    ui.kind = el('td');
    ui.stateBadge = el('span', { class: 'state' });
    ui.prio = el('td', { class: 'num' });
    ui.node = el('td');
    ui.age = el('td', { class: 'num' });
    ui.took = el('td', { class: 'num' });
    ui.cancel = el('button', { type: 'button', class: 'btn btn-ghost btn-small hidden', testid: 'task-cancel',
      text: 'cancel', title: 'cancel this task' });
    ui.cancel.addEventListener('click', (ev) => { ev.stopPropagation(); cancelTask(t.id); });
    ui.row = el('tr', { testid: 'task-row', 'data-task-id': t.id, 'data-state': t.state || 'submitted' },
      ui.id, ui.kind, el('td', null, ui.stateBadge), ui.prio, ui.node, ui.age, ui.took, el('td', null, ui.cancel));
    ui.row.addEventListener('click', () => onTaskClick(t.id));
    t.ui = ui;
    // newest first
    const body = tid('task-rows');
    const created = t.created || Date.now();
    const after = [...body.children].find((r) => (tasks.get(r.dataset.taskId)?.created || 0) < created);
    body.insertBefore(ui.row, after || null);
    tid('tasks-empty').classList.add('hidden');
    pruneRows();
  }

  function pruneRows() {
    const body = tid('task-rows');
    while (body.children.length > MAX_TASK_ROWS) {
      const rows = [...body.children].reverse();
      const victim = rows.find((r) => TERMINAL.has(r.dataset.state)) || rows[0];
      tasks.delete(victim.dataset.taskId);
      victim.remove();
    }
  }

  function renderTask(t) {
    ensureRow(t);
    const ui = t.ui;
    setText(ui.kind, t.kind || '…');
    ui.stateBadge.className = `state st-${t.state}`;
    setText(ui.stateBadge, t.state);
    setText(ui.prio, t.priority === null ? '' : t.priority);
    setText(ui.node, t.node || '–');
    const ended = TERMINAL.has(t.state);
    ui.row.classList.toggle('clickable', ended);
    ui.row.title = ended ? (t.state === 'succeeded' ? 'show its output' : 'show why it ended') : '';
    ui.cancel.classList.toggle('hidden', ended || !me.canSubmit);
    renderTaskTimes(t);
  }

  function renderTaskTimes(t) {
    const now = Date.now();
    setText(t.ui.age, t.created ? fmtDuration(now - t.created) : '–');
    let took = '–';
    if (TERMINAL.has(t.state) && t.finished) took = fmtDuration(t.finished - (t.start || t.created));
    else if (t.state === 'running' && t.start) took = fmtDuration(now - t.start);
    setText(t.ui.took, took);
  }

  function renderTaskCounts() {
    const byState = Object.fromEntries(STATES.map((s) => [s, 0]));
    const byPrio = new Map();
    for (const t of tasks.values()) {
      if (!t.state) continue;
      byState[t.state] = (byState[t.state] || 0) + 1;
      if (t.priority !== null) {
        const p = byPrio.get(t.priority) || { all: 0, active: 0 };
        p.all++;
        if (!TERMINAL.has(t.state)) p.active++;
        byPrio.set(t.priority, p);
      }
    }
    tid('task-state-counts').replaceChildren(...STATES.map((s) => el('span', {
      class: `count st-${s}${byState[s] ? '' : ' zero'}`, testid: 'task-count', data: { state: s },
    }, s, el('b', { text: byState[s] }))));
    const prios = [...byPrio].sort((a, b) => b[0] - a[0]);
    tid('task-priority-counts').replaceChildren(el('span', { class: 'prio-label', text: 'by priority' }),
      ...(prios.length ? prios.map(([p, c]) => el('span', {
        class: 'count', testid: 'priority-count', data: { priority: String(p) },
        title: `priority ${p}: ${c.all} listed, ${c.active} not ended`,
      }, `p${p}`, el('b', { text: c.active ? `${c.active}/${c.all}` : c.all })))
        : [el('span', { class: 'faint', text: '–' })]));
    tid('tasks-scope').textContent = me.seesTasks
      ? `${tasks.size} listed${me.scopes.includes('admin') ? ' (everyone\u2019s)' : me.user ? ` (user ${me.user})` : ''}`
      : '';
    renderSummary();
  }

  function renderTasksAccess(reason) {
    const note = tid('tasks-note');
    if (me.seesTasks) {
      note.classList.add('hidden');
      tid('tasks-body').classList.remove('hidden');
      const form = tid('submit-form');
      const ok = me.canSubmit;
      for (const c of form.querySelectorAll('input, select, button')) c.disabled = !ok;
      if (!ok) showFormMessage(`token ${me.name} lacks the submit scope: it reads tasks but cannot submit`, 'error');
      return;
    }
    tid('tasks-body').classList.add('hidden');
    note.replaceChildren(el('b', { text: 'Tasks need a token. ' }),
      reason || 'Sign in with a token above (fabric token create), or open the dashboard link that fabric up prints.');
    note.classList.remove('hidden');
  }

  function showFormMessage(text, kind) {
    const msg = tid('submit-message');
    msg.className = `form-msg${kind ? ` ${kind}` : ''}`;
    msg.textContent = text;
  }

  // argv: split on whitespace; '...' and "..." group words, a backslash escapes the next character
  function splitArgv(text) {
    const out = [];
    let cur = null;
    let quote = null;
    for (let i = 0; i < text.length; i++) {
      const ch = text[i];
      if (quote) {
        if (ch === quote) quote = null;
        else if (ch === '\\' && quote === '"' && i + 1 < text.length && '"\\$`'.includes(text[i + 1])) cur += text[++i];
        else cur += ch;
      } else if (ch === '"' || ch === "'") {
        quote = ch;
        cur = cur ?? '';
      } else if (ch === '\\' && i + 1 < text.length) {
        cur = (cur ?? '') + text[++i];
      } else if (/\s/.test(ch)) {
        if (cur !== null) { out.push(cur); cur = null; }
      } else {
        cur = (cur ?? '') + ch;
      }
    }
    if (quote) throw new Error(`unclosed ${quote} quote`);
    if (cur !== null) out.push(cur);
    return out;
  }

  function setupSubmit() {
    priorityOptions();
    tid('submit-form').addEventListener('submit', async (ev) => {
      ev.preventDefault();
      let argv;
      try {
        argv = splitArgv(tid('submit-argv').value);
      } catch (err) {
        showFormMessage(err.message, 'error');
        return;
      }
      if (!argv.length) { showFormMessage('type a command to run, e.g. echo hello', 'error'); return; }
      const priority = Number(tid('submit-priority').value) || 5;
      const button = tid('submit-button');
      button.disabled = true;
      showFormMessage('submitting…');
      try {
        const reply = await api('/api/submit', { method: 'POST', body: { kind: 'exec', exec: { argv }, priority } });
        const t = taskEntry(reply.id);
        watched.add(reply.id);
        if (!t.kind) { t.kind = 'exec'; t.priority = priority; }
        if (!t.created) t.created = Date.now();
        if (!t.state) setState(t, reply.state, null);  // events may have come first (and are newer)
        renderTask(t);
        t.ui.row.classList.add('fresh');
        renderTaskCounts();
        showFormMessage(`task ${reply.id} ${reply.existing ? 'already existed' : 'submitted'}: ${argv.join(' ')}`, 'ok');
        if (TERMINAL.has(t.state) && watched.has(t.id)) { watched.delete(t.id); showOutput(t.id); }
      } catch (err) {
        showFormMessage(err.message, 'error');
      } finally {
        button.disabled = !me.canSubmit;
      }
    });
    tid('task-output-close').addEventListener('click', () => {
      tid('task-output-box').classList.add('hidden');
      selectTask(null);
    });
  }

  function selectTask(id) {
    if (selectedTask && tasks.get(selectedTask)?.ui) tasks.get(selectedTask).ui.row.classList.remove('selected');
    selectedTask = id;
    if (id && tasks.get(id)?.ui) tasks.get(id).ui.row.classList.add('selected');
  }

  function onTaskClick(id) {
    const t = tasks.get(id);
    if (t && TERMINAL.has(t.state)) showOutput(id);
  }

  const decoder = new TextDecoder('utf-8');

  async function showOutput(id) {
    const t = tasks.get(id);
    if (!t) return;
    const box = tid('task-output-box');
    const title = tid('task-output-title');
    const pre = tid('task-output');
    selectTask(id);
    box.classList.remove('hidden', 'failed');
    box.dataset.taskId = id;
    title.textContent = `task ${id}: ${t.state}`;
    pre.textContent = '…';
    try {
      if (t.state === 'succeeded') {
        const bytes = await api(`/api/tasks/${encodeURIComponent(id)}/result`, { as: 'bytes' });
        if (box.dataset.taskId !== id) return;
        const text = decoder.decode(bytes);
        title.textContent = `task ${id}: succeeded · ${fmtBytes(bytes.length)} of output${
          t.kind === 'python' ? ' (a pickled value)' : ''}`;
        pre.textContent = text.length ? text : '(no output)';
      } else {
        const rec = await api(`/api/tasks/${encodeURIComponent(id)}`);
        applyRecord(rec);
        if (box.dataset.taskId !== id) return;
        box.classList.add('failed');
        const lines = [];
        if (rec.error) lines.push(`${rec.error.kind} (${rec.error.code}): ${rec.error.message}`);
        if (rec.exit_code !== null && rec.exit_code !== undefined) lines.push(`exit code ${rec.exit_code}`);
        for (const a of rec.attempts || []) {
          lines.push(`attempt ${a.number} on ${a.node || '?'}: ${a.outcome || '…'}${a.error ? ` — ${a.error}` : ''}`);
        }
        if (rec.error && rec.error.traceback) lines.push('', rec.error.traceback);
        pre.textContent = lines.join('\n') || rec.state;
      }
      pre.dataset.state = t.state;
    } catch (err) {
      box.classList.add('failed');
      pre.textContent = err.message;
    }
  }

  async function cancelTask(id) {
    try {
      applyRecord(await api(`/api/tasks/${encodeURIComponent(id)}`, { method: 'DELETE' }));
      renderTaskCounts();
      showFormMessage(`task ${id} cancelled`, 'ok');
    } catch (err) {
      showFormMessage(err.message, 'error');
    }
  }

  // tasks submitted here whose events stopped coming (the stream reconnecting): read their records
  function checkWatched() {
    const now = performance.now();
    for (const id of watched) {
      const t = tasks.get(id);
      if (t && !TERMINAL.has(t.state) && now - t.lastHeard > 4000) {
        t.lastHeard = now;
        fetchTask(id);
      }
    }
  }

  // -- services ---------------------------------------------------------------------------
  const svcPrev = new Map();  // instance id -> {req, err, at}
  let servicesCount = 0;

  async function loadServices() {
    let list;
    try {
      ({ services: list } = await api('/api/services'));
      reportError('services', null);
    } catch (err) {
      reportError('services', err);
      return;
    }
    const now = performance.now();
    const rows = [];
    const seen = new Set();
    for (const s of list) {
      seen.add(s.id);
      const req = s.endpoints.reduce((a, e) => a + (e.num_requests || 0), 0);
      const err = s.endpoints.reduce((a, e) => a + (e.num_errors || 0), 0);
      // rates over at least RATE_WINDOW_MS: a read soon after the last one (a services event asks for one)
      // keeps the last rates and their baseline rather than dividing a few requests by a few milliseconds
      const prev = svcPrev.get(s.id);
      let reqRate = prev ? prev.reqRate : null;
      let errRate = prev ? prev.errRate : null;
      if (!prev || now - prev.at >= RATE_WINDOW_MS) {
        if (prev) {
          const dt = (now - prev.at) / 1000;
          reqRate = req >= prev.req ? (req - prev.req) / dt : 0;  // a restarted instance starts from 0
          errRate = err >= prev.err ? (err - prev.err) / dt : 0;
        }
        svcPrev.set(s.id, { req, err, at: now, reqRate, errRate });
      }
      const started = Date.parse(s.started);
      const lastError = s.endpoints.map((e) => e.last_error).filter(Boolean).pop();
      const row = el('tr', { testid: 'service-row', data: { service: s.name, node: s.node, id: s.id },
        title: `${s.description || s.name} — id ${s.id}${lastError ? ` — last error: ${lastError}` : ''}` },
      el('td', null, el('b', { text: s.name })),
      el('td', { text: s.node || '–' }),
      el('td', { class: 'faint', text: s.version }),
      el('td', { class: 'num', text: Number.isFinite(started) ? fmtDuration(Date.now() - started) : '–' }),
      el('td', { class: `num${reqRate ? ' rate-hot' : ''}`, testid: 'service-req-rate', text: fmtRatePerS(reqRate) }),
      el('td', { class: `num${errRate ? ' err' : ''}`, testid: 'service-err-rate', text: fmtRatePerS(errRate) }),
      el('td', { class: 'num', text: req.toLocaleString() }),
      el('td', { class: `num${err ? ' err' : ''}`, text: err.toLocaleString() }));
      rows.push(row);
    }
    for (const id of svcPrev.keys()) if (!seen.has(id)) svcPrev.delete(id);
    tid('service-rows').replaceChildren(...rows);
    servicesCount = list.length;
    const nodesWith = new Set(list.map((s) => s.node)).size;
    tid('services-info').textContent = `${list.length} instances on ${nodesWith} node${nodesWith === 1 ? '' : 's'}`;
    renderSummary();
  }

  // -- remote memory ----------------------------------------------------------------------
  async function loadMemory() {
    let reply;
    try {
      reply = await api('/api/memory');
      reportError('memory', null);
    } catch (err) {
      reportError('memory', err);
      return;
    }
    const items = reply.nodes.map((m) => {
      const pct = m.capacity > 0 ? (100 * m.in_use) / m.capacity : 0;
      const fill = el('i');
      fill.style.width = `${Math.min(100, pct).toFixed(1)}%`;
      const bar = el('div', { class: `bar${pct > 90 ? ' bad' : pct > 70 ? ' warn' : ''}` }, fill);
      const fig = (k, v) => el('span', null, `${k} `, el('b', { text: v }));
      return el('div', { class: 'mem-node', testid: 'memory-node', data: { node: m.node } },
        el('div', { class: 'mem-head' }, el('b', { text: m.node }),
          el('span', { class: 'muted' }, `${fmtBytes(m.in_use)} of ${fmtBytes(m.capacity)} in use · ${pct.toFixed(1)}%`)),
        bar,
        el('div', { class: 'mem-figs' }, fig('blocks', m.blocks.toLocaleString()), fig('peak', fmtBytes(m.peak_in_use)),
          fig('mapped', fmtBytes(m.mapped)), fig('largest free', fmtBytes(m.largest_free)),
          fig('fragmentation', `${(100 * (m.fragmentation || 0)).toFixed(1)}%`)));
    });
    for (const name of reply.unreachable || []) {
      items.push(el('div', { class: 'mem-node unreachable', testid: 'memory-node', data: { node: name, unreachable: 'true' } },
        el('div', { class: 'mem-head' }, el('b', { text: name }), el('span', { text: 'allocator does not answer' }))));
    }
    if (!items.length) items.push(el('p', { class: 'muted empty', text: 'no allocator answers' }));
    tid('memory-list').replaceChildren(...items);
    const total = reply.nodes.reduce((a, m) => a + m.capacity, 0);
    const used = reply.nodes.reduce((a, m) => a + m.in_use, 0);
    tid('memory-info').textContent = reply.nodes.length ? `${fmtBytes(used)} of ${fmtBytes(total)} in use` : '';
  }

  // -- topology ---------------------------------------------------------------------------
  let topoKey = '';
  let clusterName = '';

  async function loadTopology() {
    let topo;
    try {
      topo = await api('/api/topology');
      reportError('topology', null);
    } catch (err) {
      reportError('topology', err);
      return;
    }
    clusterName = topo.cluster || '';
    const staleKey = [...nodes].map(([k, n]) => `${k}:${n.ui.card.dataset.stale}`).join(',');
    const key = JSON.stringify(topo) + staleKey;
    if (key === topoKey) return;
    topoKey = key;
    drawTopology(topo);
    renderSummary();
  }

  function drawTopology(topo) {
    const box = tid('topology');
    const BW = 186, GX = 70, GY = 36, PAD = 14, LINE = 15, HEAD = 56;
    // every server a route names: a node's own, or one no node of ours runs (drawn as a circle)
    const serverOf = new Map();  // nats_server -> item
    const items = topo.nodes.map((n) => ({ kind: 'node', n, h: HEAD + LINE * Math.max(1, n.services.length) + 8 }));
    for (const it of items) if (it.n.nats_server) serverOf.set(it.n.nats_server, it);
    for (const r of topo.routes) {
      for (const s of [r.a, r.b]) {
        if (!serverOf.has(s)) {
          const it = { kind: 'server', name: s, h: 70 };
          serverOf.set(s, it);
          items.push(it);
        }
      }
    }
    if (!items.length) {
      box.replaceChildren(el('p', { class: 'muted empty', text: 'no nodes' }));
      return;
    }
    // where each centre goes: no three in a line, so that no route runs under a third box
    const n = items.length;
    const maxH = Math.max(...items.map((it) => it.h));
    const sx = BW + GX, sy = maxH + GY;
    let centres;
    if (n <= 2) centres = items.map((_, i) => [i * sx, 0]);
    else if (n === 3) centres = [[sx / 2, 0], [0, sy], [sx, sy]];
    else if (n === 4) centres = [[0, 0], [sx, 0], [0, sy], [sx, sy]];
    else {  // an ellipse wide enough for neighbours not to overlap
      const rx = Math.max(sx, (sx * n) / (2 * Math.PI));
      const ry = Math.max(sy * 0.75, (sy * n) / (2.6 * Math.PI));
      centres = items.map((_, i) => {
        const a = -Math.PI / 2 + (2 * Math.PI * i) / n;
        return [rx * Math.cos(a), ry * Math.sin(a)];
      });
    }
    const minX = Math.min(...centres.map(([x], i) => x - (items[i].kind === 'server' ? 40 : BW / 2)));
    const minY = Math.min(...centres.map(([, y], i) => y - items[i].h / 2));
    items.forEach((it, i) => {
      it.cx = centres[i][0] - minX + PAD;
      it.cy = centres[i][1] - minY + PAD;
      it.x = it.cx - BW / 2;
      it.y = it.cy - it.h / 2;
    });
    const width = Math.max(...items.map((it) => it.cx + (it.kind === 'server' ? 40 : BW / 2))) + PAD;
    const height = Math.max(...items.map((it) => it.cy + it.h / 2)) + PAD;
    const svg = svgEl('svg', { viewBox: `0 0 ${width} ${height}`, role: 'img', testid: 'topology-svg',
      'aria-label': `topology: ${topo.nodes.length} nodes, ${topo.routes.length} routes` });
    svg.style.maxWidth = `${Math.round(width * 1.25)}px`;
    svg.style.margin = '0 auto';
    const lines = svgEl('g');
    const boxes = svgEl('g');
    svg.append(lines, boxes);
    for (const r of topo.routes) {
      const a = serverOf.get(r.a), b = serverOf.get(r.b);
      lines.append(svgEl('line', { class: 't-route', testid: 'topology-route', x1: a.cx, y1: a.cy, x2: b.cx, y2: b.cy,
        'data-a': r.a, 'data-b': r.b }, svgEl('title', null, `route ${r.a} ↔ ${r.b}`)));
    }
    // a node without a nats-server of its own is a client of one; when the fabric has a single server, that one
    const servers = [...serverOf.keys()];
    for (const it of items) {
      if (it.kind !== 'node' || it.n.nats_server || servers.length !== 1) continue;
      const s = serverOf.get(servers[0]);
      lines.append(svgEl('line', { class: 't-client', testid: 'topology-client', x1: it.cx, y1: it.cy, x2: s.cx, y2: s.cy },
        svgEl('title', null, `${it.n.node} is a client of ${servers[0]}`)));
      const mx = (it.cx + s.cx) / 2, my = (it.cy + s.cy) / 2;
      lines.append(svgEl('text', { class: 't-label', x: mx, y: my - 6, 'text-anchor': 'middle' }, 'client'));
    }
    for (const it of items) {
      if (it.kind === 'server') {
        const g = svgEl('g', { testid: 'topology-server', 'data-server': it.name });
        g.append(svgEl('circle', { class: 't-box server', cx: it.cx, cy: it.cy, r: 26 }),
          svgEl('text', { class: 't-sub', x: it.cx, y: it.cy + 4, 'text-anchor': 'middle' }, 'nats'),
          svgEl('text', { class: 't-name', x: it.cx, y: it.cy + 44, 'text-anchor': 'middle' }, it.name));
        boxes.append(g);
        continue;
      }
      const n = it.n;
      const live = nodes.get(n.node);
      const stale = live ? live.ui.card.dataset.stale === 'true' : true;
      const g = svgEl('g', { testid: 'topology-node', 'data-node': n.node });
      g.append(svgEl('title', null, [n.node, n.hostname && `host ${n.hostname}`, n.nats_server && `nats-server ${n.nats_server}`,
        n.gateway_url && `gateway ${n.gateway_url}`].filter(Boolean).join('\n')));
      g.append(svgEl('rect', { class: `t-box${n.nats_server ? ' server' : ''}${stale ? ' stale' : ''}`, x: it.x, y: it.y,
        width: BW, height: it.h, rx: 8 }));
      g.append(svgEl('circle', { class: `t-dot${stale ? ' stale' : ''}`, cx: it.x + 14, cy: it.y + 17, r: 4 }));
      g.append(svgEl('text', { class: 't-name', x: it.x + 24, y: it.y + 21 }, clip(n.node, 22)));
      const sub = n.nats_server ? `nats-server ${n.nats_server}` : 'a client of the cluster';
      g.append(svgEl('text', { class: 't-sub', x: it.x + 12, y: it.y + 38 }, clip(sub, 30)));
      g.append(svgEl('line', { class: 'grid', x1: it.x + 10, x2: it.x + BW - 10, y1: it.y + HEAD - 10, y2: it.y + HEAD - 10,
        stroke: '#27313d' }));
      n.services.forEach((s, i) => {
        g.append(svgEl('text', { class: 't-svc', x: it.x + 14, y: it.y + HEAD + 4 + i * LINE }, `▪ ${clip(s, 24)}`));
      });
      if (!n.services.length) g.append(svgEl('text', { class: 't-sub', x: it.x + 14, y: it.y + HEAD + 4 }, 'no services'));
      boxes.append(g);
    }
    box.replaceChildren(svg);
    const info = [topo.cluster ? `cluster ${topo.cluster}` : 'no cluster (one nats-server)',
      `${topo.routes.length} route${topo.routes.length === 1 ? '' : 's'}`];
    tid('topology-info').textContent = info.join(' · ');
  }

  const clip = (s, n) => (s.length > n ? `${s.slice(0, n - 1)}…` : s);

  // -- header summary ---------------------------------------------------------------------
  function renderSummary() {
    const total = nodes.size;
    const stale = [...nodes.values()].filter((n) => n.ui.card.dataset.stale === 'true').length;
    const running = [...tasks.values()].filter((t) => t.state === 'running').length;
    const waiting = [...tasks.values()].filter((t) => ['submitted', 'queued', 'waiting'].includes(t.state)).length;
    const parts = [[total, `node${total === 1 ? '' : 's'}${stale ? ` (${stale} stale)` : ''}`],
      [servicesCount, `service${servicesCount === 1 ? '' : 's'}`]];
    if (me.seesTasks) parts.push([running, 'running'], [waiting, 'waiting']);
    const key = JSON.stringify(parts);
    const sum = tid('summary');
    if (sum.dataset.key !== key) {
      sum.dataset.key = key;
      sum.replaceChildren(...parts.map(([n, label]) => el('span', null, el('b', { text: n }), ` ${label}`)));
    }
    tid('nodes-count').textContent = total ? `${total} node${total === 1 ? '' : 's'}${stale ? `, ${stale} stale` : ''}` : '';
    const sub = [clusterName && `cluster ${clusterName}`, me.node && `via ${me.node}`].filter(Boolean).join(' · ');
    setText(tid('cluster-info'), sub || '\u00a0');
  }

  // -- the event stream -------------------------------------------------------------------
  let source = null;
  let retryMs = 1000;
  let retryTimer = null;
  let everLive = false;

  function connect() {
    clearTimeout(retryTimer);
    if (source) source.close();
    const es = new EventSource('/api/events?topics=node,tasks,services');
    source = es;
    let first = true;
    const onFirst = () => {
      if (!first) return;
      first = false;
      retryMs = 1000;
      setLive('live');
      if (everLive) { loadNodes(); loadTasks(); }  // a reconnect: catch up on what was missed
      everLive = true;
    };
    es.addEventListener('node', (e) => { onFirst(); onNode(JSON.parse(e.data), true); });
    es.addEventListener('tasks', (e) => { onFirst(); onTaskEvents(JSON.parse(e.data)); });
    es.addEventListener('services', (e) => {
      onFirst();
      const d = JSON.parse(e.data);
      if (!d.initial || d.up.length) { refreshServices(); refreshTopology(); }
    });
    es.addEventListener('dropped', () => { es.close(); reconnectSoon(0); });
    es.addEventListener('error', () => {
      if (source !== es) return;
      es.close();
      reconnectSoon(retryMs);
      retryMs = Math.min(retryMs * 2, 20000);
    });
  }

  function reconnectSoon(ms) {
    setLive('reconnecting');
    clearTimeout(retryTimer);
    retryTimer = setTimeout(connect, ms);
  }

  // -- start ------------------------------------------------------------------------------
  let refreshServices = () => {};
  let refreshTopology = () => {};

  function tick() {
    for (const n of nodes.values()) markStale(n);
    for (const t of tasks.values()) if (t.ui) renderTaskTimes(t);
    checkWatched();
    renderSummary();
  }

  async function start() {
    setupSession();
    setupSubmit();
    connect();  // the stream and the first reads at once: the first data shows as soon as either answers
    loadNodes();
    await loadWhoami();
    renderTasksAccess();
    loadTasks();
    every(NODES_EVERY_MS, loadNodes, false);
    refreshServices = every(SERVICES_EVERY_MS, loadServices);
    every(MEMORY_EVERY_MS, loadMemory);
    refreshTopology = every(TOPOLOGY_EVERY_MS, loadTopology);
    setInterval(tick, 1000);
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
})();
