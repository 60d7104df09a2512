// The gstream demo page: a live feed (SSE), a chat room (WebSocket) and live statistics (SSE).
"use strict";

const $ = (id) => document.getElementById(id);
const MAX_FEED = 50;
const MAX_CHAT = 200;

function setStatus(el, state, text) {
  el.dataset.state = state;
  el.className = "status " + state;
  el.textContent = text;
}

function fmtTime(ts) {
  const d = new Date(ts * 1000);
  return d.toLocaleTimeString([], { hour12: false });
}

// ---------------------------------------------------------------- feed (SSE)
// One EventSource carries two topics: the shared feed and this tab's private
// topic (tab/<32 hex>, drawn once per tab and kept in sessionStorage). Events
// are typed by topic; the id is the stream's cursor (every topic's position),
// which EventSource sends back as Last-Event-ID when it reconnects by itself.
// It gives up only when the server answers something other than 200
// text/event-stream (e.g. 503 while restarting); then we open a new one
// ourselves, resuming with ?last_event_id= (a fresh EventSource has no header).
const feed = { es: null, lastId: "", lastSeq: "", count: 0, reconnects: 0, retryMs: 1000,
               opened: false, tab: tabTopic() };

function tabTopic() {
  let id = sessionStorage.getItem("gstream-demo-tab") || "";
  if (!/^[0-9a-f]{32}$/.test(id)) {
    const bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);
    id = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
    sessionStorage.setItem("gstream-demo-tab", id);
  }
  return "tab/" + id;
}

function feedNote(text, cls) {
  const li = document.createElement("li");
  li.className = "note " + (cls || "");
  li.textContent = text;
  prependFeed(li);
}

function prependFeed(li) {
  const list = $("feed");
  list.prepend(li);
  while (list.children.length > MAX_FEED) list.lastChild.remove();
}

function feedEvent(e, cls) {
  feed.lastId = e.lastEventId;
  feed.count += 1;
  let msg;
  try { msg = JSON.parse(e.data); } catch (err) { msg = { text: e.data, ts: Date.now() / 1000 }; }
  const seq = String(msg.seq !== undefined ? msg.seq : feed.count);
  feed.lastSeq = seq;
  $("feed-last-id").textContent = seq;
  $("feed-count").textContent = feed.count;
  const li = document.createElement("li");
  li.className = "event " + cls;
  li.dataset.id = seq;
  const id = document.createElement("code");
  id.className = "id";
  id.textContent = "#" + seq;
  const time = document.createElement("span");
  time.className = "time";
  time.textContent = fmtTime(msg.ts);
  const text = document.createElement("span");
  text.className = "text";
  text.textContent = cls === "private" ? "(this tab only) " + msg.text : msg.text;
  li.append(id, time, text);
  prependFeed(li);
}

function openFeed() {
  $("feed-tab").textContent = feed.tab.slice(0, 12) + "…";
  let url = "/events?topic=feed&topic=" + encodeURIComponent(feed.tab);
  if (feed.lastId) url += "&last_event_id=" + encodeURIComponent(feed.lastId);
  const es = new EventSource(url);
  feed.es = es;
  es.onopen = () => {
    if (feed.opened) {
      feed.reconnects += 1;
      $("feed-reconnects").textContent = feed.reconnects;
      feedNote("reconnected — resumed after id #" + (feed.lastSeq || "(none)"), "ok");
    }
    feed.opened = true;
    feed.retryMs = 1000;
    setStatus($("feed-status"), "live", "live");
  };
  es.onerror = () => {
    if (es.readyState === EventSource.CLOSED) {
      setStatus($("feed-status"), "reconnecting", "reconnecting…");
      es.close();
      setTimeout(openFeed, feed.retryMs);
      feed.retryMs = Math.min(feed.retryMs * 2, 15000);
    } else {
      setStatus($("feed-status"), "reconnecting", "reconnecting…");
    }
  };
  es.addEventListener("feed", (e) => feedEvent(e, "shared"));
  es.addEventListener(feed.tab, (e) => feedEvent(e, "private"));
  es.addEventListener("gstream.missed", (e) => {
    let n = "?";
    try { n = JSON.parse(e.data).missed; } catch (err) { /* keep "?" */ }
    feedNote("this page fell behind: " + n + " events skipped", "warn");
  });
  es.addEventListener("gstream.reset", (e) => {
    feed.lastId = e.lastEventId;
    feedNote("could not resume (history expired); continuing from the latest event", "warn");
  });
  es.addEventListener("gstream.shutdown", () => {
    setStatus($("feed-status"), "reconnecting", "server restarting…");
    feedNote("server is shutting down; reconnecting", "warn");
  });
}

$("publish-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const input = $("publish-text");
  const text = input.value.trim();
  if (!text) return;
  fetch("/publish", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ text }),
  }).then((r) => { if (r.ok) input.value = ""; });
});

$("publish-tab").addEventListener("click", () => {
  const input = $("publish-text");
  const text = input.value.trim();
  if (!text) return;
  fetch("/publish?topic=" + encodeURIComponent(feed.tab), {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ text }),
  }).then((r) => { if (r.ok) input.value = ""; });
});

// ------------------------------------------------------------ chat (WebSocket)
const chat = { ws: null, delay: 500, refs: new Set(), me: "", nextRef: 1 };

// Presence: who is in the room. The server sends a "sync" (the list at
// version v) and then join/leave/update events; events that arrive before
// the sync are kept and applied if newer than it (docs/presence.md).
function clientId() {
  let id = "";
  try { id = sessionStorage.getItem("gstream-demo-client") || ""; } catch (err) { /* private mode */ }
  if (!/^[A-Za-z0-9_-]{1,32}$/.test(id)) {
    id = "c" + Math.random().toString(36).slice(2, 12);
    try { sessionStorage.setItem("gstream-demo-client", id); } catch (err) { /* ignore */ }
  }
  return id;
}
chat.me = clientId();
const presence = { members: new Map(), v: -1, early: [] };

function presenceApply(msg) {
  if (msg.v <= presence.v) return;  // already in the list
  if (msg.event === "leave") presence.members.delete(msg.member);
  else presence.members.set(msg.member, msg.meta || {});
  presence.v = msg.v;
}

function presenceShow() {
  const box = $("chat-presence");
  const items = [...presence.members.entries()].sort((a, b) => a[0].localeCompare(b[0]));
  box.replaceChildren(...items.map(([member, meta]) => {
    const s = span("who-here" + (member === chat.me ? " me" : ""),
      (meta && meta.name) || "guest-" + member.slice(-4));
    s.dataset.member = member;
    return s;
  }));
  $("chat-present-count").textContent = presence.members.size;
}

function onPresence(msg) {
  if (msg.event === "sync") {
    presence.members = new Map(msg.members.map((m) => [m.member, m.meta || {}]));
    presence.v = msg.v;
    presence.early.forEach(presenceApply);
    presence.early = [];
  } else if (presence.v < 0) {
    if (presence.early.length < 1000) presence.early.push(msg);
    return;
  } else {
    presenceApply(msg);
  }
  presenceShow();
}

function chatLine(cls, parts) {
  const log = $("chat-log");
  const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
  const div = document.createElement("div");
  div.className = "msg " + cls;
  div.append(...parts);
  log.append(div);
  while (log.children.length > MAX_CHAT) log.firstChild.remove();
  if (atBottom) log.scrollTop = log.scrollHeight;
}

function span(cls, text) {
  const s = document.createElement("span");
  s.className = cls;
  s.textContent = text;
  return s;
}

function openChat() {
  const scheme = location.protocol === "https:" ? "wss://" : "ws://";
  const name = $("chat-name").value.trim();
  const ws = new WebSocket(scheme + location.host + "/chat?presence=1&client=" +
    encodeURIComponent(chat.me) + (name ? "&name=" + encodeURIComponent(name) : ""));
  presence.v = -1;  // a new connection gets a new sync
  presence.early = [];
  chat.ws = ws;
  ws.onopen = () => {
    chat.delay = 500;
    setStatus($("chat-status"), "live", "connected");
    $("chat-send").disabled = false;
  };
  ws.onmessage = (e) => {
    let msg;
    try { msg = JSON.parse(e.data); } catch (err) { return; }
    if (msg.type === "presence") { onPresence(msg); return; }
    if (msg.type !== "chat") return;
    const mine = msg.ref !== undefined && chat.refs.delete(String(msg.ref));
    const who = msg.name || "guest-" + msg.from;
    chatLine(mine || msg.from === chat.me ? "mine" : "theirs",
      [span("who", who), span("text", msg.text), span("time", fmtTime(msg.ts))]);
  };
  ws.onclose = (e) => {
    $("chat-send").disabled = true;
    setStatus($("chat-status"), "reconnecting", "reconnecting…");
    if (e.code === 1001) chatLine("system", [span("text", "server is restarting; reconnecting")]);
    else if (e.code === 1009) chatLine("system", [span("text", "message too long (4 KiB at most)")]);
    else if (e.code === 1008) chatLine("system", [span("text", "slow down: too many messages")]);
    setTimeout(openChat, chat.delay);
    chat.delay = Math.min(chat.delay * 2, 15000);
  };
}

const nameInput = $("chat-name");
try { nameInput.value = localStorage.getItem("gstream-demo-name") || ""; } catch (err) { /* private mode */ }
nameInput.addEventListener("change", () => {
  try { localStorage.setItem("gstream-demo-name", nameInput.value.trim()); } catch (err) { /* ignore */ }
});

$("chat-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const input = $("chat-input");
  const text = input.value.trim();
  if (!text || !chat.ws || chat.ws.readyState !== WebSocket.OPEN) return;
  const ref = "r" + chat.nextRef++;
  chat.refs.add(ref);
  const msg = { text, ref };
  const name = nameInput.value.trim();
  if (name) msg.name = name;
  chat.ws.send(JSON.stringify(msg));
  input.value = "";
});

// --------------------------------------------------------- statistics (SSE)
const spark = [];

function fmtUptime(s) {
  s = Math.floor(s);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  return (h ? h + "h " : "") + (h || m ? m + "m " : "") + sec + "s";
}

function showStats(st) {
  $("stat-connections").textContent = st.connections;
  $("stat-sse").textContent = st.sse_subscribers;
  $("stat-ws").textContent = st.ws_members;
  $("stat-eps").textContent = st.events_per_second;
  $("stat-dps").textContent = st.deliveries_per_second ?? "–";
  $("stat-dropped").textContent = st.dropped;
  $("stat-published").textContent = st.published;
  $("stat-uptime").textContent = fmtUptime(st.uptime);
  spark.push(st.deliveries_per_second || 0);
  while (spark.length > 60) spark.shift();
  const max = Math.max(1, ...spark);
  const step = 300 / 59;
  const start = 300 - (spark.length - 1) * step;  // newest on the right, like a live chart
  $("spark-line").setAttribute("points",
    spark.map((v, i) => (start + i * step).toFixed(1) + "," + (38 - (v / max) * 34).toFixed(1)).join(" "));
}

function openStats() {
  const es = new EventSource("/stats/stream");
  es.onopen = () => setStatus($("stats-status"), "live", "live");
  es.onerror = () => {
    setStatus($("stats-status"), "reconnecting", "reconnecting…");
    if (es.readyState === EventSource.CLOSED) { es.close(); setTimeout(openStats, 2000); }
  };
  es.addEventListener("stats", (e) => {
    try { showStats(JSON.parse(e.data)); } catch (err) { /* ignore a bad frame */ }
  });
  // Show something at once rather than after the first second.
  fetch("/stats").then((r) => r.json()).then(showStats).catch(() => {});
}

openFeed();
openChat();
openStats();
