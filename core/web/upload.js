// Core's upload page: login, upload parameters, then the file straight to the storage VM.
// The state is mirrored in window.uploadState for scripts that drive the page.
"use strict";
(function () {
  const api = "/client/api";
  const state = (window.uploadState = { phase: "login", bytes: 0, total: 0, error: null, id: null });
  let session = null;
  const $ = (id) => document.getElementById(id);
  const show = (text) => { $("status").textContent = text; };
  const fail = (text) => { state.phase = "failed"; state.error = text; show("Failed: " + text); };

  async function call(command, params, method) {
    const body = new URLSearchParams({ command, response: "json", ...params });
    if (session) body.set("sessionkey", session);
    const r = method === "POST"
      ? await fetch(api, { method: "POST", body, credentials: "same-origin" })
      : await fetch(api + "?" + body, { credentials: "same-origin" });
    const json = await r.json();
    const key = Object.keys(json)[0];
    if (!r.ok || key === "errorresponse") {
      const e = json[key] || {};
      throw new Error(e.errortext || ("HTTP " + r.status));
    }
    return json[key];
  }

  $("login").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const f = new FormData(ev.target);
    try {
      const r = await call("login", { username: f.get("username"), password: f.get("password"), domain: f.get("domain") || "/" }, "POST");
      session = r.sessionkey;
      const zones = (await call("listZones", {})).zone || [];
      const sel = document.querySelector("#upload [name=zoneid]");
      sel.replaceChildren(...zones.map((z) => new Option(z.name, z.id)));
      $("login").classList.add("hidden");
      $("upload").classList.remove("hidden");
      state.phase = "ready";
      show("Logged in as " + r.username + ".");
    } catch (e) { fail(e.message); }
  });

  const fmt = (n) => n >= 1 << 30 ? (n / (1 << 30)).toFixed(2) + " GiB" : (n / (1 << 20)).toFixed(1) + " MiB";

  function progress(sent, total, started) {
    state.bytes = sent; state.total = total;
    const secs = (performance.now() - started) / 1000;
    const speed = secs > 0 ? sent / secs : 0;
    const eta = speed > 0 ? Math.round((total - sent) / speed) : 0;
    $("bar").value = total ? (sent * 100) / total : 0;
    show(`${fmt(sent)} of ${fmt(total)} · ${fmt(speed)}/s · ETA ${eta} s`);
  }

  async function waitReady(kind, id) {
    state.phase = "installing";
    for (;;) {
      const list = kind === "iso"
        ? await call("listIsos", { id, isofilter: "self" })
        : await call("listTemplates", { id, templatefilter: "self" });
      const t = (list.template || list.iso || [])[0];
      if (t && t.isready) { state.phase = "ready-installed"; show(`Ready: ${t.name} (${t.id}).`); return; }
      if (t && /ERROR|ABANDONED/.test((t.downloaddetails || [{}])[0].downloadState || "")) { fail(t.status); return; }
      if (t) show("Storage VM: " + t.status);
      await new Promise((r) => setTimeout(r, 1000));
    }
  }

  $("upload").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const f = new FormData(ev.target);
    const file = f.get("file");
    const kind = f.get("kind");
    const params = { name: f.get("name"), displaytext: f.get("name"), zoneid: f.get("zoneid") };
    if (kind === "template") { params.format = f.get("format"); params.hypervisor = "KVM"; }
    if (f.get("checksum")) params.checksum = f.get("checksum");
    let up;
    try {
      const r = await call(kind === "iso" ? "getUploadParamsForIso" : "getUploadParamsForTemplate", params);
      up = r.getuploadparams;
    } catch (e) { fail(e.message); return; }
    state.id = up.id; state.phase = "uploading";
    $("bar").classList.remove("hidden");
    const headers = { "X-signature": up.signature, "X-metadata": up.metadata, "X-expires": up.expires };
    const started = performance.now();
    // ?chunk=BYTES sends the file in PATCHes of that size; ?pause=MS waits before each one (a
    // slow link, for drills).
    const query = new URLSearchParams(location.search);
    const chunk = Number(query.get("chunk") || 0);
    const pause = Number(query.get("pause") || 0);
    if (f.get("resumable") && window.tus) {
      const upload = new tus.Upload(file, {
        endpoint: up.postURL,
        headers,
        chunkSize: chunk > 0 ? chunk : Infinity,
        retryDelays: [500, 1000, 2000, 3000, 5000, 5000, 10000, 10000, 10000, 15000, 20000],
        storeFingerprintForResuming: false,
        metadata: { filename: file.name },
        onBeforeRequest: (req) => pause > 0 && req.getMethod() === "PATCH"
          ? new Promise((r) => setTimeout(r, pause)) : undefined,
        onProgress: (sent, total) => progress(sent, total, started),
        onError: (e) => fail(String(e && e.message ? e.message : e)),
        onSuccess: () => waitReady(kind, up.id).catch((e) => fail(e.message)),
      });
      upload.start();
    } else {
      // CloudStack's one-shot POST, as the Mold UI sends it.
      const form = new FormData();
      form.append("files[]", file);
      const xhr = new XMLHttpRequest();
      xhr.open("POST", up.postURL);
      for (const [k, v] of Object.entries(headers)) xhr.setRequestHeader(k, v);
      xhr.upload.onprogress = (e) => progress(e.loaded, e.total, started);
      xhr.onload = () => xhr.status < 300 ? waitReady(kind, up.id).catch((e) => fail(e.message)) : fail(xhr.responseText);
      xhr.onerror = () => fail("the storage VM could not be reached");
      xhr.send(form);
    }
  });
})();
