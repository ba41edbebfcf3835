// The relay's web page: a live service map and flow table over /v1/observe (Hubble's JSON,
// one object a line), narrowed by the same filters `plexus observe` takes.
"use strict";

// plexus observe's filter flags (bpf.flows.FIELDS; --node-name is the `node` filter)
const FIELDS = ["pod", "namespace", "label", "identity", "cluster", "ip", "port",
  "from-pod", "from-namespace", "from-label", "from-identity", "from-cluster", "from-ip", "from-port",
  "to-pod", "to-namespace", "to-label", "to-identity", "to-cluster", "to-ip", "to-port",
  "protocol", "verdict", "drop-reason", "type", "node", "service"];
const FLAG_FIELDS = Object.fromEntries(FIELDS.map(f => [f === "node" ? "node-name" : f, f]));
const MAX_ROWS = 300;
const SVG = "http://www.w3.org/2000/svg";

const state = {
  nodes: new Map(),     // map node id -> {id, cluster, namespace, name}
  edges: new Map(),     // "src>dst>verdict" -> {src, dst, verdict, count}
  pending: [],          // flows not drawn yet
  shown: 0,
  abort: null,
  drawQueued: false,
};

// ---- filters ------------------------------------------------------------------------------
function parseFilters(text) {
  const tokens = text.trim() ? text.trim().split(/\s+/) : [];
  const grouped = new Map();
  let negate = false;
  for (let i = 0; i < tokens.length; i++) {
    let tok = tokens[i];
    if (tok === "--not") { negate = true; continue; }
    if (!tok.startsWith("--")) throw new Error(`expected a filter flag, not "${tok}"`);
    let value;
    const eq = tok.indexOf("=");
    if (eq > 0) { value = tok.slice(eq + 1); tok = tok.slice(0, eq); }
    const field = FLAG_FIELDS[tok.slice(2)];
    if (!field) throw new Error(`no filter ${tok} (known: ${Object.keys(FLAG_FIELDS).map(f => "--" + f).join(" ")})`);
    if (value === undefined) {
      value = tokens[++i];
      if (value === undefined) throw new Error(`${tok} needs a value`);
    }
    const key = field + "|" + negate;
    if (!grouped.has(key)) grouped.set(key, [field, [], negate]);
    grouped.get(key)[1].push(value);
    negate = false;
  }
  if (negate) throw new Error("--not must come before a filter");
  return [...grouped.values()];
}

// ---- the stream ---------------------------------------------------------------------------
async function follow() {
  if (state.abort) state.abort.abort();
  const abort = new AbortController();
  state.abort = abort;
  const errorBox = document.getElementById("filter-error");
  errorBox.textContent = "";
  let filters;
  try {
    filters = parseFilters(document.getElementById("filter").value);
  } catch (e) {
    errorBox.textContent = e.message;
    return;
  }
  reset();
  const params = new URLSearchParams({follow: "1", last: "1000"});
  if (filters.length) params.set("filters", JSON.stringify(filters));
  let resp;
  try {
    resp = await fetch("v1/observe?" + params, {signal: abort.signal});
  } catch (e) {
    if (!abort.signal.aborted) { errorBox.textContent = "relay unreachable: " + e.message; retry(abort); }
    return;
  }
  if (!resp.ok) {
    const body = await resp.json().catch(() => ({error: resp.statusText}));
    errorBox.textContent = body.error || resp.statusText;
    return;
  }
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  try {
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buf += decoder.decode(value, {stream: true});
      let nl;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        if (line.trim()) receive(JSON.parse(line));
      }
    }
  } catch (e) {
    if (abort.signal.aborted) return;
  }
  retry(abort);
}

function retry(abort) {
  setTimeout(() => { if (state.abort === abort) follow(); }, 2000);
}

function reset() {
  state.nodes.clear();
  state.edges.clear();
  state.pending = [];
  state.shown = 0;
  document.getElementById("flows").replaceChildren();
  draw();
}

function receive(doc) {
  state.pending.push(doc);
  if (!state.drawQueued) {
    state.drawQueued = true;
    requestAnimationFrame(() => { state.drawQueued = false; flush(); });
  }
}

// ---- what a flow's ends are on the map ----------------------------------------------------
function labelValue(labels, key) {
  for (const l of labels || []) {
    const kv = l.includes(":") && l.indexOf(":") < l.indexOf("=") ? l.slice(l.indexOf(":") + 1) : l;
    if (kv.startsWith(key + "=")) return kv.slice(key.length + 1);
  }
  return "";
}

function mapNode(end, ip) {
  const id = end.identity ? String(end.identity) : ip;
  if (!state.nodes.has(id)) {
    const labels = end.labels || [];
    const reserved = labels.find(l => l.startsWith("reserved:"));
    const name = labelValue(labels, "app") || end.pod_name || (reserved ? reserved.slice(9) : "") || ip;
    state.nodes.set(id, {id, cluster: end.cluster_name || "", namespace: end.namespace || "", name,
                         identity: end.identity || 0});
  }
  return id;
}

function describe(end, ip, port) {
  const who = end.pod_name ? `${end.cluster_name ? end.cluster_name + "/" : ""}${end.namespace}/${end.pod_name}` : ip;
  return port ? `${who}:${port}` : who;
}

function flush() {
  const docs = state.pending;
  state.pending = [];
  const tbody = document.getElementById("flows");
  const frag = document.createDocumentFragment();
  for (const doc of docs) {
    if (doc.lost_events) {
      const tr = document.createElement("tr");
      tr.className = "lost";
      const td = document.createElement("td");
      td.colSpan = 7;
      td.textContent = `${doc.lost_events.num_events_lost} events lost (${doc.lost_events.source}) on ${doc.node_name}`;
      tr.append(td);
      frag.prepend(tr);
      continue;
    }
    const f = doc.flow;
    const l4 = f.l4 ? Object.entries(f.l4)[0] : null;
    const proto = l4 ? l4[0] : "";
    const ports = l4 ? l4[1] : {};
    const src = mapNode(f.source || {}, f.IP.source);
    const dst = mapNode(f.destination || {}, f.IP.destination);
    const key = `${src}>${dst}>${f.verdict}`;
    const edge = state.edges.get(key) || {src, dst, verdict: f.verdict, count: 0};
    edge.count++;
    state.edges.set(key, edge);

    const tr = document.createElement("tr");
    tr.className = `flow verdict-${f.verdict}`;
    tr.dataset.verdict = f.verdict;
    tr.dataset.node = f.node_name;
    tr.dataset.time = f.time;
    tr.dataset.source = describe(f.source || {}, f.IP.source, 0);
    const eg = f.egress_gateway;
    const kind = eg ? "egress-gateway" : (f.event_type || {}).type === 4 ? "translation" : "policy-verdict";
    const cells = [f.time.slice(11, 23), f.node_name,
      describe(f.source || {}, f.IP.source, ports.source_port),
      describe(f.destination || {}, f.IP.destination, ports.destination_port) +
        (f.destination_service ? ` (svc ${f.destination_service.namespace}/${f.destination_service.name})` : "") +
        (eg ? ` (as ${eg.egress_ip}:${eg.egress_port} by ${eg.policy || "?"})` : ""),
      `${ports.destination_port || ""}/${proto}`,
      f.verdict + (f.drop_reason_desc ? ` ${f.drop_reason_desc}` : ""), kind];
    cells.forEach((text, i) => {
      const td = document.createElement("td");
      td.textContent = text;
      if (i === 5) td.className = "verdict";
      tr.append(td);
    });
    frag.prepend(tr);
    state.shown++;
  }
  tbody.prepend(frag);
  while (tbody.rows.length > MAX_ROWS) tbody.deleteRow(tbody.rows.length - 1);
  document.getElementById("count").textContent = `${state.shown} shown, newest first`;
  draw();
}

// ---- the map ------------------------------------------------------------------------------
function el(name, attrs, parent) {
  const e = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (parent) parent.append(e);
  return e;
}

function draw() {
  const svg = document.getElementById("map");
  svg.replaceChildren();
  const groups = new Map();
  for (const n of state.nodes.values()) {
    const g = n.cluster || n.namespace ? `${n.cluster || "?"} / ${n.namespace || "-"}` : "outside the mesh";
    if (!groups.has(g)) groups.set(g, {title: g, cluster: n.cluster, namespace: n.namespace, nodes: []});
    groups.get(g).nodes.push(n);
  }
  const ordered = [...groups.values()].sort((a, b) => a.title.localeCompare(b.title));
  const cols = Math.max(1, Math.ceil(Math.sqrt(ordered.length)));
  const W = 210, NODE_H = 26, GAP = 12, PAD = 28, COL_GAP = 90, ROW_GAP = 40;
  const pos = new Map();
  const rowHeights = [];
  ordered.forEach((g, i) => {
    g.nodes.sort((a, b) => a.name.localeCompare(b.name));
    const h = PAD + g.nodes.length * (NODE_H + GAP) + 4;
    const r = Math.floor(i / cols);
    rowHeights[r] = Math.max(rowHeights[r] || 0, h);
  });
  const defs = el("defs", {}, svg);
  for (const v of ["FORWARDED", "DROPPED", "TRANSLATED"]) {
    const m = el("marker", {id: `arrow-${v}`, viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7,
                            markerHeight: 7, orient: "auto-start-reverse"}, defs);
    el("path", {d: "M0,0 L10,5 L0,10 z", class: `arrowhead ${v}`}, m);
  }
  const layer = el("g", {}, svg);
  const edgeLayer = el("g", {}, svg);
  ordered.forEach((g, i) => {
    const c = i % cols, r = Math.floor(i / cols);
    const x = 10 + c * (W + COL_GAP);
    const y = 10 + rowHeights.slice(0, r).reduce((a, b) => a + b + ROW_GAP, 0);
    const box = el("g", {class: "group", "data-cluster": g.cluster || "", "data-namespace": g.namespace || ""}, layer);
    el("rect", {x, y, width: W, height: rowHeights[r]}, box);
    el("text", {x: x + 10, y: y + 17, class: "title"}, box).textContent = g.title;
    g.nodes.forEach((n, j) => {
      const ny = y + PAD + j * (NODE_H + GAP);
      const node = el("g", {class: "node", "data-name": n.name, "data-identity": n.identity,
                            "data-cluster": n.cluster, "data-namespace": n.namespace}, box);
      el("rect", {x: x + 12, y: ny, width: W - 24, height: NODE_H}, node);
      el("text", {x: x + 20, y: ny + 17}, node).textContent =
        n.identity ? `${n.name}  (${n.identity})` : n.name;
      pos.set(n.id, {x: x + 12, y: ny + NODE_H / 2, w: W - 24});
    });
  });
  const totalW = 20 + cols * W + (cols - 1) * COL_GAP;
  const totalH = 20 + rowHeights.reduce((a, b) => a + b + ROW_GAP, 0);
  svg.setAttribute("viewBox", `0 0 ${Math.max(totalW, 400)} ${Math.max(totalH, 200)}`);
  const offset = {FORWARDED: -6, DROPPED: 6, TRANSLATED: 0};
  for (const e of state.edges.values()) {
    const a = pos.get(e.src), b = pos.get(e.dst);
    if (!a || !b) continue;
    const dy = offset[e.verdict] || 0;
    const forward = b.x >= a.x;
    const x1 = forward ? a.x + a.w : a.x, x2 = forward ? b.x : b.x + b.w;
    const y1 = a.y + dy, y2 = b.y + dy;
    const bend = a.x === b.x ? 60 : Math.max(40, Math.abs(x2 - x1) / 2);
    const c1 = a.x === b.x ? x1 + bend : x1 + (forward ? bend : -bend);
    const c2 = a.x === b.x ? x2 + bend : x2 - (forward ? bend : -bend);
    const path = el("path", {d: `M${x1},${y1} C${c1},${y1} ${c2},${y2} ${x2},${y2}`,
                             class: `edge ${e.verdict}`, "data-verdict": e.verdict,
                             "data-src": e.src, "data-dst": e.dst, "marker-end": `url(#arrow-${e.verdict})`},
                        edgeLayer);
    el("title", {}, path).textContent = `${e.count} ${e.verdict.toLowerCase()}; click to filter`;
    path.addEventListener("click", () => filterEdge(e));
    // the count near where the edge leaves its source, one line per verdict
    const lx = a.x === b.x ? x1 + 14 : x1 + (forward ? 16 : -16);
    const ly = y1 + {FORWARDED: -8, DROPPED: 16, TRANSLATED: 4}[e.verdict];
    el("text", {x: lx, y: ly, class: `count ${e.verdict}`, "text-anchor": forward ? "start" : "end"}, edgeLayer)
      .textContent = String(e.count);
  }
}

function endFilter(side, id) {
  const n = state.nodes.get(id);
  if (n && n.identity) return `--${side}-identity ${n.identity}`;
  return `--${side}-ip ${id}`;
}

function filterEdge(e) {
  document.getElementById("filter").value =
    `${endFilter("from", e.src)} ${endFilter("to", e.dst)} --verdict ${e.verdict}`;
  follow();
}

// ---- relay status -------------------------------------------------------------------------
async function status() {
  const box = document.getElementById("status");
  try {
    const st = await (await fetch("v1/relay/status")).json();
    const down = st.nodes.filter(n => n.state !== "connected").map(n => n.name);
    box.innerHTML = "";
    box.append(`relay of ${st.cluster}: ${st.connected}/${st.nodes.length} nodes connected · ` +
               `${st.flowsPerSecond} flows/s · ${st.lost} lost`);
    box.dataset.connected = st.connected;
    box.dataset.nodes = st.nodes.length;
    if (down.length) {
      const s = document.createElement("span");
      s.className = "down";
      s.textContent = ` · down: ${down.join(", ")}`;
      box.append(s);
    }
  } catch (e) {
    box.textContent = "relay unreachable";
  }
}

document.getElementById("filter-form").addEventListener("submit", ev => { ev.preventDefault(); follow(); });
document.getElementById("clear").addEventListener("click", () => {
  document.getElementById("filter").value = "";
  follow();
});
status();
setInterval(status, 2000);
follow();
