"use strict";
// The app shell's service worker: the page, its script, style, manifest and icons are cached at install and served
// from the cache when the network fails (network first, so that an update shows at once when online). API calls
// always go to the network; a photo shared to the app while offline gets a page that says so.
const VERSION = "__SHELL_VERSION__";  // the server puts a hash of the shell files here: a change installs a new cache
const CACHE = "caption-shell-" + VERSION;
const SHELL = ["./", "app.js", "app.css", "manifest.webmanifest", "icons/icon-192.png", "icons/icon-512.png",
               "icons/maskable-512.png"];
const NETWORK_TIMEOUT_MS = 5000;
const scoped = (path) => new URL(path, self.registration.scope).href;

self.addEventListener("install", (event) => {
  event.waitUntil(caches.open(CACHE).then((cache) => cache.addAll(SHELL)).then(() => self.skipWaiting()));
});

self.addEventListener("activate", (event) => {
  event.waitUntil(caches.keys()
    .then((keys) => Promise.all(keys.filter((key) => key.startsWith("caption-shell-") && key !== CACHE)
                                    .map((key) => caches.delete(key))))
    .then(() => self.clients.claim()));
});

self.addEventListener("fetch", (event) => {
  const request = event.request;
  const url = request.url.split("#")[0];
  if (request.method === "POST" && url === scoped("share")) {
    event.respondWith(fetch(request).catch(() => offlineSharePage()));
    return;
  }
  const shellUrls = SHELL.map(scoped);
  const page = request.mode === "navigate" && (url === scoped("./") || url === scoped("index.html"));
  if (request.method === "GET" && (page || shellUrls.includes(url))) {
    event.respondWith(networkFirst(request, page ? scoped("./") : url));
  }
});

async function networkFirst(request, key) {
  const cache = await caches.open(CACHE);
  try {
    const response = await fetchWithin(request, NETWORK_TIMEOUT_MS);
    if (response.ok) await cache.put(key, response.clone());
    return response;
  } catch (err) {
    const cached = await cache.match(key);
    if (cached) return cached;
    throw err;
  }
}

function fetchWithin(request, ms) {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), ms);
  return fetch(request, {signal: controller.signal}).finally(() => clearTimeout(timer));
}

function offlineSharePage() {
  const html = "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" " +
    "content=\"width=device-width, initial-scale=1\"><title>Offline</title><link rel=\"stylesheet\" href=\"app.css\">" +
    "</head><body><main><h1>Offline</h1><p id=\"offline-share\">The photo could not be captioned: the server " +
    "cannot be reached. Share it again when you are back online.</p><p><a class=\"button\" href=\"./\">Open the " +
    "app</a></p></main></body></html>";
  return new Response(html, {status: 503, headers: {"Content-Type": "text/html; charset=utf-8"}});
}
