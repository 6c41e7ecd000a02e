// End-to-end check of the console page, used by the Rust end-to-end tests.
//
//   node e2e/check.mjs <pageURL> <screenshot.png> [--expect connected|failed|ended] [--timeout-ms N] [--type TEXT]
// With --type, once connected the page's canvas is clicked and TEXT typed, then Enter, as a user
// would (noVNC turns the browser's key events into RFB key events).
//
// Opens the page in headless Chromium, waits for window.__console.state to
// settle ('connected' and the noVNC canvas showing at least two colours, or
// 'failed'/'ended'), takes a screenshot and prints one line of JSON:
//   {"state", "code", "reason", "status", "name", "distinctColours", "canvas": {"w", "h"}}
// Exit code: 0 when the outcome matches --expect (default connected, which
// also needs distinctColours >= 2), 1 when it does not, 2 when the check
// itself failed (bad arguments, browser did not start, page did not load).
// The page's console errors, page errors and failed requests go to stderr.

import { chromium } from 'playwright-core';

const CHROMIUM = '/usr/bin/chromium';
const CHROMIUM_ARGS = [
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  // More flags from the environment, one per line (e.g. a host resolver rule for a test domain).
  ...(process.env.CHROMIUM_EXTRA_ARGS || '').split('\n').filter(Boolean),
];
const USAGE =
  'usage: node e2e/check.mjs <pageURL> <screenshot.png> [--expect connected|failed|ended] [--timeout-ms N] [--type TEXT]';
const POLL_MS = 200;

function parseArgs(argv) {
  const opts = { expect: 'connected', timeoutMs: 30000 };
  const positional = [];
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '--expect') {
      opts.expect = argv[++i];
      if (!['connected', 'failed', 'ended'].includes(opts.expect)) {
        throw new Error(`--expect must be connected, failed or ended, not ${opts.expect}`);
      }
    } else if (arg === '--type') {
      opts.type = argv[++i];
      if (typeof opts.type !== 'string') {
        throw new Error('--type needs the text to type');
      }
    } else if (arg === '--timeout-ms') {
      opts.timeoutMs = Number(argv[++i]);
      if (!Number.isInteger(opts.timeoutMs) || opts.timeoutMs <= 0) {
        throw new Error('--timeout-ms needs a positive whole number');
      }
    } else if (arg.startsWith('--')) {
      throw new Error(`unknown option ${arg}`);
    } else {
      positional.push(arg);
    }
  }
  if (positional.length !== 2) {
    throw new Error(USAGE);
  }
  [opts.url, opts.screenshot] = positional;
  return opts;
}

// Runs in the page: the page's state, plus how many distinct colours a
// sparse grid of samples over the whole noVNC canvas holds.
function probe() {
  const c = window.__console ?? {};
  const snapshot = {
    state: c.state ?? null,
    code: c.code ?? null,
    reason: c.reason ?? null,
    status: document.getElementById('status')?.textContent.trim() ?? null,
    name: c.name ?? null,
    distinctColours: 0,
    canvas: { w: 0, h: 0 },
  };
  const canvas = document.querySelector('#screen canvas');
  if (!canvas || canvas.width === 0 || canvas.height === 0) {
    return snapshot;
  }
  const { width: w, height: h } = canvas;
  const pixels = canvas.getContext('2d').getImageData(0, 0, w, h).data;
  const GRID = 64;
  const colours = new Set();
  for (let gy = 0; gy < GRID; gy++) {
    const y = Math.floor(((gy + 0.5) * h) / GRID);
    for (let gx = 0; gx < GRID; gx++) {
      const x = Math.floor(((gx + 0.5) * w) / GRID);
      const i = (y * w + x) * 4;
      colours.add((pixels[i] << 16) | (pixels[i + 1] << 8) | pixels[i + 2]);
    }
  }
  snapshot.distinctColours = colours.size;
  snapshot.canvas = { w, h };
  return snapshot;
}

// The outcome is known once the session failed or ended, or is connected
// and the screen shows something.
function settled(snapshot) {
  switch (snapshot.state) {
    case 'connected':
      return snapshot.distinctColours >= 2;
    case 'failed':
    case 'ended':
      return true;
    default:
      return false;
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function run(opts) {
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: CHROMIUM_ARGS,
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
    page.on('console', (msg) => {
      if (msg.type() === 'error') {
        process.stderr.write(`page console error: ${msg.text()}\n`);
      }
    });
    page.on('pageerror', (err) => process.stderr.write(`page error: ${err.message}\n`));
    page.on('requestfailed', (req) =>
      process.stderr.write(`request failed: ${req.url()}: ${req.failure()?.errorText}\n`));
    page.on('response', (res) => {
      if (res.status() >= 400) {
        process.stderr.write(`HTTP ${res.status()}: ${res.url()}\n`);
      }
    });

    const deadline = Date.now() + opts.timeoutMs;
    await page.goto(opts.url, { waitUntil: 'load', timeout: opts.timeoutMs });
    let snapshot = await page.evaluate(probe);
    while (!settled(snapshot)) {
      if (Date.now() >= deadline) {
        process.stderr.write(`timed out after ${opts.timeoutMs} ms waiting for the page to settle\n`);
        break;
      }
      await sleep(POLL_MS);
      snapshot = await page.evaluate(probe);
    }
    if (opts.type !== undefined && snapshot.state === 'connected') {
      const canvas = await page.$('canvas');
      if (canvas) {
        await canvas.click();
      }
      await page.keyboard.type(opts.type, { delay: 30 });
      await page.keyboard.press('Enter');
      await sleep(2000);
      snapshot = await page.evaluate(probe);
    }
    // --expect ended: once connected, wait for the session to end (the test ends it).
    while (opts.expect === 'ended' && snapshot.state === 'connected' && Date.now() < deadline) {
      await sleep(POLL_MS);
      snapshot = await page.evaluate(probe);
    }
    await page.screenshot({ path: opts.screenshot });
    return snapshot;
  } finally {
    await browser.close();
  }
}

let opts;
try {
  opts = parseArgs(process.argv.slice(2));
} catch (err) {
  process.stderr.write(`${err.message}\n`);
  process.exit(2);
}

try {
  const outcome = await run(opts);
  process.stdout.write(`${JSON.stringify(outcome)}\n`);
  const ok = opts.expect === 'connected'
    ? outcome.state === 'connected' && outcome.distinctColours >= 2
    : outcome.state === opts.expect;
  process.exitCode = ok ? 0 : 1;
} catch (err) {
  process.stderr.write(`check failed: ${err.stack ?? err}\n`);
  process.exitCode = 2;
}
