"use strict";
// The captioning page: pick or take a photo, post it to v1/caption, show the captions. Installable (manifest.webmanifest)
// with an offline app shell (sw.js); relative URLs only, so that it works behind a proxy under any path.
const $ = (id) => document.getElementById(id);
let previewUrl = null;

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "muted";
}

function setOffline(offline) {
  document.body.dataset.offline = offline ? "true" : "false";
}

function detailText(body, status) {
  if (body && typeof body.detail === "string") return body.detail;
  if (body && Array.isArray(body.detail)) return body.detail.map((d) => d.msg || JSON.stringify(d)).join("; ");
  return "request failed with status " + status;
}

function showCaptions(items) {
  const list = $("captions");
  list.replaceChildren();
  for (const item of items) {
    const li = document.createElement("li");
    const text = document.createElement("span");
    text.className = "text";
    text.textContent = item.generated_text;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = item.score === null ? "" : "score " + item.score.toFixed(3);
    li.append(text, score);
    list.append(li);
  }
}

function captionQuery() {
  const beams = Math.max(1, parseInt($("beams").value, 10) || 1);
  const count = Math.min(beams, Math.max(1, parseInt($("count").value, 10) || 1));
  return new URLSearchParams({num_beams: beams, num_return_sequences: count,
                              max_new_tokens: Math.max(1, parseInt($("maxlen").value, 10) || 20)});
}

async function caption(file) {
  const params = captionQuery();
  setStatus("Captioning\u2026", false);
  $("captions").replaceChildren();
  const type = file.type && file.type.startsWith("image/") ? file.type : "application/octet-stream";
  for (let attempt = 0; attempt < 3; attempt++) {
    let response;
    try {
      response = await fetch("v1/caption?" + params, {method: "POST", body: file, headers: {"Content-Type": type}});
    } catch (err) {
      setOffline(true);
      setStatus("Cannot reach the server (offline?): " + err.message, true);
      document.body.dataset.state = "failed";
      return;
    }
    setOffline(false);
    const body = await response.json().catch(() => null);
    if (response.status === 503 && attempt < 2) {  // queue full: wait as the server asks, then retry
      const wait = parseInt(response.headers.get("Retry-After") || "1", 10);
      setStatus("Server busy, retrying in " + wait + " s\u2026", false);
      await new Promise((resolve) => setTimeout(resolve, 1000 * wait));
      continue;
    }
    if (!response.ok) {
      setStatus(detailText(body, response.status), true);
      document.body.dataset.state = "failed";
      return;
    }
    showCaptions(body);
    setStatus(body.length === 1 ? "Caption:" : body.length + " captions, best first:", false);
    document.body.dataset.state = "captioned";
    return;
  }
}

function onPicked(input) {
  const file = input.files[0];
  if (!file) return;
  document.body.dataset.state = "busy";
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = URL.createObjectURL(file);
  $("preview").src = previewUrl;
  $("preview").style.display = "block";
  caption(file);
}

async function checkServer() {
  let response, body;
  try {
    response = await fetch("ready", {cache: "no-store"});
    body = await response.json();
  } catch (err) {
    setOffline(true);
    $("model").textContent = "Offline: the server cannot be reached.";
    return;
  }
  setOffline(false);
  if (!response.ok) { $("model").textContent = "Model not ready: " + detailText(body, response.status); return; }
  const m = body.model || {};
  $("model").textContent = "Model: " + (m.name || m.backend || "captioner") + " on " + (m.device || "?");
  const d = body.defaults || {};
  const limits = body.limits || {};
  if (limits.max_beam_size) { $("beams").max = limits.max_beam_size; $("count").max = limits.max_beam_size; }
  if (limits.max_len_limit) $("maxlen").max = limits.max_len_limit;
  if (d.max_len) $("maxlen").value = d.max_len;
}

document.addEventListener("DOMContentLoaded", () => {
  for (const id of ["file", "gallery"]) $(id).addEventListener("change", () => onPicked($(id)));
  window.addEventListener("online", checkServer);
  window.addEventListener("offline", () => setOffline(true));
  document.body.dataset.sw = "serviceWorker" in navigator ? "registering" : "unsupported";
  if ("serviceWorker" in navigator) {  // only in a secure context: HTTPS, or plain HTTP on localhost
    navigator.serviceWorker.register("sw.js")
      .then(() => navigator.serviceWorker.ready)
      .then(() => { document.body.dataset.sw = "ready"; })
      .catch((err) => { document.body.dataset.sw = "failed: " + err.message; });
  }
  checkServer();
});
