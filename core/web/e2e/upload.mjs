// Browser uploads for the Rust end-to-end tests, in headless Chromium.
//
//   node e2e/upload.mjs mold <pageURL> <file> <paramsJSON>
//     On a page of another origin, posts <file> as the Mold UI does: one XHR with
//     multipart/form-data (field files[]) and the X-signature / X-metadata / X-expires headers
//     from getUploadParamsForTemplate (paramsJSON: {postURL, signature, metadata, expires}).
//     Prints {"status", "text"}.
//   node e2e/upload.mjs page <coreURL> <user> <password> <file> <name> [--query Q] [--timeout-ms N]
//     Drives core's upload page (/client/upload?Q): login, the form, a tus upload. Prints one
//     JSON line of window.uploadState every 200 ms; exit 0 once the template is ready.
// Exit code 2: the check itself failed (bad arguments, browser did not start).

import { chromium } from 'playwright-core';

const CHROMIUM_ARGS = [
  '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
  // More flags from the environment, one per line (e.g. a host resolver rule for a test domain).
  ...(process.env.CHROMIUM_EXTRA_ARGS || '').split('\n').filter(Boolean),
];

async function browser() {
  return chromium.launch({ executablePath: '/usr/bin/chromium', headless: true, args: CHROMIUM_ARGS });
}

async function mold([pageURL, file, paramsJSON]) {
  const params = JSON.parse(paramsJSON);
  const b = await browser();
  try {
    const page = await b.newPage();
    page.on('pageerror', (e) => console.error('page error:', e.message));
    await page.goto(pageURL);
    await page.setInputFiles('#f', file);
    const result = await page.evaluate((p) => new Promise((resolve) => {
      const form = new FormData();
      form.append('files[]', document.getElementById('f').files[0]);
      const xhr = new XMLHttpRequest();
      xhr.open('POST', p.postURL);
      xhr.setRequestHeader('x-signature', p.signature);
      xhr.setRequestHeader('x-expires', p.expires);
      xhr.setRequestHeader('x-metadata', p.metadata);
      xhr.timeout = 24 * 60 * 60 * 1000;
      xhr.onload = () => resolve({ status: xhr.status, text: xhr.responseText, origin: location.origin });
      xhr.onerror = () => resolve({ status: 0, text: 'network error', origin: location.origin });
      xhr.send(form);
    }), params);
    console.log(JSON.stringify(result));
    return result.status >= 200 && result.status < 300 ? 0 : 1;
  } finally {
    await b.close();
  }
}

async function drive([coreURL, user, password, file, name, ...rest]) {
  let query = '';
  let timeoutMs = 180000;
  for (let i = 0; i < rest.length; i++) {
    if (rest[i] === '--query') query = rest[++i];
    else if (rest[i] === '--timeout-ms') timeoutMs = Number(rest[++i]);
    else throw new Error(`unknown option ${rest[i]}`);
  }
  const b = await browser();
  try {
    const page = await b.newPage();
    page.on('pageerror', (e) => console.error('page error:', e.message));
    page.on('console', (m) => { if (m.type() === 'error') console.error('console:', m.text()); });
    await page.goto(`${coreURL}/client/upload${query ? '?' + query : ''}`);
    await page.fill('#login [name=username]', user);
    await page.fill('#login [name=password]', password);
    await page.click('#login button');
    await page.waitForSelector('#upload:not(.hidden)', { timeout: 20000 });
    await page.fill('#upload [name=name]', name);
    await page.setInputFiles('#upload [name=file]', file);
    await page.click('#upload button');
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const s = await page.evaluate(() => ({ ...window.uploadState, tus: !!window.tus, status: document.getElementById('status').textContent }));
      console.log(JSON.stringify(s));
      if (s.phase === 'ready-installed') return 0;
      if (s.phase === 'failed') return 1;
      if (Date.now() > deadline) { console.error('timed out'); return 1; }
      await new Promise((r) => setTimeout(r, 200));
    }
  } finally {
    await b.close();
  }
}

const [mode, ...args] = process.argv.slice(2);
try {
  const code = mode === 'mold' ? await mold(args) : mode === 'page' ? await drive(args) : (() => { throw new Error('mode: mold | page'); })();
  process.exit(code);
} catch (e) {
  console.error(String(e && e.stack ? e.stack : e));
  process.exit(2);
}
