// The dispatcher's status page: reads status.json every second and redraws the two tables.
// Every value goes in as text (textContent), never as markup: call ids and URIs come from SIP.
"use strict";

const REFRESH_MS = 1000;

function element(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function cell(text, className) { return element("td", text, className); }

function numberText(value) {
  return typeof value === "number" ? value.toLocaleString("en-US") : "\u2013";
}

function scaled(value, units, step) {
  if (typeof value !== "number") return "\u2013";
  let index = 0;
  while (Math.abs(value) >= step && index < units.length - 1) { value /= step; index += 1; }
  return (index ? value.toFixed(1) : String(Math.round(value))) + " " + units[index];
}

const bitRate = (bps) => scaled(bps, ["bit/s", "kbit/s", "Mbit/s", "Gbit/s"], 1000);
const byteSize = (bytes) => scaled(bytes, ["B", "kB", "MB", "GB", "TB"], 1000);

function duration(seconds) {
  if (typeof seconds !== "number") return "\u2013";
  const total = Math.floor(seconds);
  const h = Math.floor(total / 3600), m = Math.floor(total / 60) % 60, s = total % 60;
  const two = (n) => String(n).padStart(2, "0");
  return (h ? h + ":" + two(m) : String(m)) + ":" + two(s);
}

function pair(caller, callee, format) {
  return format(caller) + " / " + format(callee);
}

function relayRow(relay) {
  const row = element("tr");
  row.dataset.relay = relay.ip;
  const streams = Object.entries(relay.stream_count || {}).map(([type, n]) => type + " " + n).join(", ");
  const ports = relay.port_pairs || {};
  const used = typeof ports.used === "number" && typeof ports.free === "number"
    ? ports.used + " of " + (ports.used + ports.free) : "\u2013";
  let forwarding = relay.forwarding || "\u2013";
  if (typeof relay.kernel_entries === "number") forwarding += " (" + relay.kernel_entries + " kernel entries)";
  row.append(cell(relay.ip),
             cell(relay.state, "state state-" + relay.state.replace(/ /g, "-")),
             cell(numberText(relay.session_count), "number sessions"),
             cell(streams || "\u2013"),
             cell(bitRate(relay.bps_relayed), "number traffic"),
             cell(used, "number ports"),
             cell(forwarding),
             cell(relay.version || "\u2013"),
             cell(duration(relay.uptime), "number"));
  return row;
}

function sessionRows(session) {
  const streams = session.streams.length ? session.streams : [{}];
  return streams.map((stream, index) => {
    const row = element("tr");
    row.dataset.callId = session.call_id;
    if (index === 0) {
      const span = String(streams.length);
      const first = [cell(session.call_id, "call-id"), cell(session.from_uri), cell(session.to_uri),
                     cell(session.relay),
                     cell(session.start_time === null ? "not answered" : duration(session.duration),
                          "number duration")];
      first.forEach((td) => { td.rowSpan = span; row.append(td); });
    }
    row.append(cell(stream.media_type || "\u2013", "media-type"),
               cell(stream.status || "\u2013", "stream-status"),
               cell(pair(stream.caller_codec, stream.callee_codec, (c) => c || "\u2013"), "codecs"),
               cell(pair(stream.caller_packets, stream.callee_packets, numberText), "number packets"),
               cell(pair(stream.caller_bytes, stream.callee_bytes, byteSize), "number bytes"));
    return row;
  });
}

function fill(tableId, rows, columns, emptyText) {
  const body = document.querySelector("#" + tableId + " tbody");
  if (!rows.length) {
    const row = element("tr");
    const td = cell(emptyText, "empty");
    td.colSpan = columns;
    row.append(td);
    rows = [row];
  }
  body.replaceChildren(...rows);
}

function show(status) {
  document.getElementById("version").textContent = status.version;
  fill("relays", status.relays.map(relayRow), 9, "No relay is connected.");
  fill("sessions", status.sessions.flatMap(sessionRows), 10, "No session.");
  const count = document.getElementById("session-count");
  count.textContent = status.session_total > status.sessions.length
    ? "(" + status.sessions.length + " of " + status.session_total + ")" : "(" + status.session_total + ")";
  const updated = document.getElementById("updated");
  updated.textContent = "Updated " + new Date(status.time * 1000).toLocaleTimeString();
  updated.classList.remove("stale");
}

async function refresh() {
  try {
    const response = await fetch("status.json", {cache: "no-store"});
    if (!response.ok) throw new Error("HTTP " + response.status);
    show(await response.json());
  } catch (error) {
    const updated = document.getElementById("updated");
    updated.textContent = "No answer from the dispatcher (" + error.message + "): retrying";
    updated.classList.add("stale");
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

refresh();
