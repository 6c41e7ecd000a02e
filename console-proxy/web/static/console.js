// Console page logic (an ES module; the page's CSP allows no inline script).
//
// The page is opened as /console?token=T. It opens the WebSocket to
// /websockify?token=T itself, listens for its close event (the only place the
// proxy's close code and reason can be read: noVNC's "disconnect" event only
// says {clean}), and then hands the socket to stock noVNC.
//
// A token is single-use, so once a session has ended (or failed) the page
// says so and never tries to reconnect: a new session needs a new link.
//
// Tests read window.__console = { state, code, reason, name }, where state is
// 'connecting' | 'connected' | 'ended' (closed after noVNC's connect event) |
// 'failed' (closed before it).

const NOVNC_RFB = '/novnc/core/rfb.js';

const MAX_PASTE_CHARS = 4096;
// Pause after each typed character, so the guest's keyboard buffer keeps up.
const KEY_INTERVAL_MS = 15;
// When noVNC ends the session by itself it closes the socket; wait this long
// for the socket's close event (which carries the proxy's code, if the proxy
// sent one) before reporting.
const CLOSE_GRACE_MS = 2000;

const XK_RETURN = 0xff0d;
const XK_TAB = 0xff09;

// One sentence per close code the proxy sends.
const CLOSE_CODES = new Map([
  [4001, 'Console links work only once and for a short time. Open the console again from the management UI to get a new link.'],
  [4003, 'The console proxy does not accept connections from this page or from your network address.'],
  [4008, 'The console proxy closed this session because nobody used the keyboard or mouse for a while.'],
  [4010, "The console proxy could not reach the VM's VNC server. The VM may be stopped or its host unreachable."],
  [4011, "The VM's VNC server refused the console proxy's authentication."],
  [4012, "The console proxy and the VM's VNC server did not understand each other (RFB protocol error)."],
  [4029, 'The console proxy is too busy to take another session right now. This link was not used: reload this page in a few minutes to try again.'],
  [1001, 'The console proxy is shutting down.'],
  [1000, "The VM's VNC server closed the session."],
]);
const CONNECTION_LOST = 'The connection to the console proxy was lost.';
const VIEWER_STOPPED = 'The console viewer in this page could not continue the session.';
const HINT_ENDED = 'This session has ended. A console link works only once, so reloading ' +
  'this page will not reconnect: open the console again from the management UI ' +
  'to start a new session.';
const HINT_FAILED = 'Reloading this page will not help, because a console link works only ' +
  'once: open the console again from the management UI to get a new link.';

const $ = (id) => document.getElementById(id);
const ui = {
  root: $('console'),
  name: $('vm-name'),
  status: $('status'),
  cad: $('btn-cad'),
  paste: $('btn-paste'),
  fullscreen: $('btn-fullscreen'),
  pastePanel: $('paste-panel'),
  pasteText: $('paste-text'),
  pasteSend: $('paste-send'),
  pasteCancel: $('paste-cancel'),
  pasteProgress: $('paste-progress'),
  screen: $('screen'),
  notice: $('notice'),
  noticeTitle: $('notice-title'),
  noticeDetail: $('notice-detail'),
  noticeHint: $('notice-hint'),
};

const session = { state: 'connecting', code: null, reason: null, name: '' };
window.__console = session;

let rfb = null;
// Why noVNC ended the session by itself, when it did (it only logs details).
let viewerReason = null;
let finished = false;
// The paste-as-keys run in progress, if any: { cancelled }.
let typing = null;

function setStatus(text) {
  ui.status.textContent = text;
  ui.status.title = text;
}

function setState(state) {
  session.state = state;
  ui.root.dataset.state = state;
  const connected = state === 'connected';
  ui.cad.disabled = !connected;
  ui.paste.disabled = !connected;
  ui.fullscreen.disabled = !connected || !document.fullscreenEnabled;
  if (!connected) {
    closePastePanel();
  }
}

// Ends the page's session for good; the first call wins.
function finish(code, reason) {
  if (finished) {
    return;
  }
  finished = true;

  let sentence;
  let why = reason;
  if (CLOSE_CODES.has(code)) {
    sentence = CLOSE_CODES.get(code);
  } else if (viewerReason) {
    sentence = VIEWER_STOPPED;
    why = viewerReason;
  } else if (code === null || code === 1006) {
    sentence = CONNECTION_LOST;
  } else {
    sentence = `The connection closed unexpectedly (code ${code}).`;
  }

  const state = session.state === 'connected' ? 'ended' : 'failed';
  session.code = code;
  session.reason = why;
  setState(state);

  const title = state === 'ended' ? 'Session ended' : 'Console unavailable';
  // The token-refused sentence already says how to get a new link; a busy proxy left the link
  // unused, so reloading does help then.
  const hint = state === 'ended' ? HINT_ENDED : code === 4001 || code === 4029 ? '' : HINT_FAILED;
  // Skip the proxy's reason when the sentence for its code already says the same.
  const redundant = why && sentence.toLowerCase().includes(why.toLowerCase().replace(/\.$/, ''));
  if (why && !redundant) {
    setStatus(`${title}: ${why} — ${sentence}`);
    showNotice(title, `${capitalise(why.replace(/\.$/, ''))}. ${sentence}`, hint);
  } else {
    setStatus(`${title} — ${sentence}`);
    showNotice(title, sentence, hint);
  }
}

// Fails before any socket was opened, so the token is still unused.
function failEarly(reason, detail, hint) {
  finished = true;
  session.reason = reason;
  setState('failed');
  setStatus(`Console unavailable: ${reason} — ${hint}`);
  showNotice('Console unavailable', detail, hint);
}

function showNotice(title, detail, hint) {
  ui.noticeTitle.textContent = title;
  ui.noticeDetail.textContent = detail;
  ui.noticeHint.textContent = hint;
  ui.noticeHint.hidden = !hint;
  ui.notice.hidden = false;
}

function capitalise(text) {
  return text.charAt(0).toUpperCase() + text.slice(1);
}

// ---- Paste as keys ---------------------------------------------------------

// The keysym for one character: Latin-1 keysyms equal the code point, other
// Unicode characters use 0x01000000 + code point. Returns null for control
// characters that have no key.
function keysymFor(ch) {
  const cp = ch.codePointAt(0);
  if (ch === '\n') {
    return XK_RETURN;
  }
  if (ch === '\t') {
    return XK_TAB;
  }
  if ((cp >= 0x20 && cp <= 0x7e) || (cp >= 0xa0 && cp <= 0xff)) {
    return cp;
  }
  if (cp > 0xff) {
    return 0x01000000 + cp;
  }
  return null;
}

// Physical key codes for keys that are the same on every layout; noVNC then
// sends a QEMU extended key event with the scancode where the server allows.
const KEY_CODES = new Map([[XK_RETURN, 'Enter'], [XK_TAB, 'Tab']]);

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function typeText(text) {
  // Iterate by code point, so characters outside the BMP stay whole.
  const chars = Array.from(text.replace(/\r\n?/g, '\n')).slice(0, MAX_PASTE_CHARS);
  const run = { cancelled: false };
  typing = run;
  ui.pasteSend.disabled = true;
  ui.pasteText.disabled = true;
  for (let i = 0; i < chars.length; i++) {
    if (run.cancelled) {
      break;
    }
    const keysym = keysymFor(chars[i]);
    if (keysym !== null) {
      rfb.sendKey(keysym, KEY_CODES.get(keysym));
    }
    ui.pasteProgress.textContent = `Typing ${i + 1} of ${chars.length}…`;
    await sleep(KEY_INTERVAL_MS);
  }
  // Cancelled runs (the panel closed, or the session ended) leave the panel
  // to whoever closed it.
  if (run.cancelled) {
    return;
  }
  typing = null;
  ui.pasteText.value = '';
  closePastePanel();
  rfb.focus();
}

function openPastePanel() {
  ui.pastePanel.hidden = false;
  ui.paste.setAttribute('aria-expanded', 'true');
  ui.pasteText.focus();
}

function closePastePanel() {
  if (typing) {
    typing.cancelled = true;
    typing = null;
  }
  ui.pastePanel.hidden = true;
  ui.paste.setAttribute('aria-expanded', 'false');
  ui.pasteSend.disabled = false;
  ui.pasteText.disabled = false;
  ui.pasteProgress.textContent = '';
}

// ---- Toolbar ---------------------------------------------------------------

ui.cad.addEventListener('click', () => {
  rfb.sendCtrlAltDel();
  rfb.focus();
});

ui.paste.addEventListener('click', () => {
  if (ui.pastePanel.hidden) {
    openPastePanel();
  } else {
    closePastePanel();
    rfb.focus();
  }
});

ui.pasteSend.addEventListener('click', () => {
  if (!typing && ui.pasteText.value) {
    typeText(ui.pasteText.value);
  }
});

ui.pasteCancel.addEventListener('click', () => {
  closePastePanel();
  rfb.focus();
});

ui.fullscreen.addEventListener('click', () => {
  if (document.fullscreenElement) {
    document.exitFullscreen();
  } else {
    ui.root.requestFullscreen().catch((err) => {
      console.warn('fullscreen refused:', err);
    });
  }
});

document.addEventListener('fullscreenchange', () => {
  const on = document.fullscreenElement !== null;
  ui.fullscreen.textContent = on ? 'Exit fullscreen' : 'Fullscreen';
  ui.fullscreen.setAttribute('aria-pressed', String(on));
});

// Leaving the page ends the session, and the link cannot be used again.
window.addEventListener('beforeunload', (event) => {
  if (session.state === 'connected') {
    event.preventDefault();
  }
});

// ---- Connection ------------------------------------------------------------

async function start() {
  const token = new URLSearchParams(window.location.search).get('token');
  if (!token) {
    failEarly('no console token in the page address',
      'This page was opened without a console token.',
      'Open the console from the management UI: it gives you a link with a token.');
    return;
  }

  // Load noVNC before opening the socket, so a missing viewer does not use up
  // the single-use token.
  let RFB;
  try {
    ({ default: RFB } = await import(NOVNC_RFB));
  } catch (err) {
    console.error('loading noVNC failed:', err);
    failEarly('the console viewer (noVNC) could not be loaded',
      'The console viewer could not be loaded from the console proxy.',
      'The console link has not been used yet, so reloading this page may help. ' +
      'If it keeps failing, the console proxy is missing its viewer files.');
    return;
  }

  const scheme = window.location.protocol === 'https:' ? 'wss:' : 'ws:';
  const url = `${scheme}//${window.location.host}/websockify?token=${encodeURIComponent(token)}`;
  setStatus('Connecting to the console proxy…');

  const ws = new WebSocket(url);
  ws.binaryType = 'arraybuffer';
  // Listeners added now run before the onopen/onclose handlers noVNC installs
  // when it attaches, so the close code is recorded before noVNC reacts.
  ws.addEventListener('open', () => {
    if (session.state === 'connecting') {
      setStatus("Connecting to the VM's console…");
    }
  });
  ws.addEventListener('close', (event) => finish(event.code, event.reason));

  try {
    rfb = new RFB(ui.screen, ws, { shared: true });
  } catch (err) {
    console.error('starting noVNC failed:', err);
    viewerReason = 'the console viewer could not start';
    ws.close();
    finish(null, '');
    return;
  }
  rfb.scaleViewport = true;
  // Letterbox bands around the scaled screen in the page's background colour.
  rfb.background = getComputedStyle(document.body).backgroundColor;

  rfb.addEventListener('desktopname', (event) => {
    const name = event.detail.name;
    session.name = name;
    ui.name.textContent = name || 'Console';
    document.title = name || 'Console';
    if (session.state === 'connected') {
      setStatus(name ? `Connected to ${name}` : 'Connected');
    }
  });

  rfb.addEventListener('connect', () => {
    if (finished) {
      return;
    }
    setState('connected');
    setStatus(session.name ? `Connected to ${session.name}` : 'Connected');
    rfb.focus();
  });

  // The proxy authenticates to the VNC server itself, so the browser should
  // never be asked for credentials; if it is, give up rather than hang.
  rfb.addEventListener('credentialsrequired', () => {
    viewerReason = 'the VNC server asked the browser for a password';
    rfb.disconnect();
  });

  rfb.addEventListener('securityfailure', (event) => {
    const detail = event.detail.reason ? `: ${event.detail.reason}` : '';
    viewerReason = `VNC security negotiation failed${detail}`;
  });

  rfb.addEventListener('disconnect', (event) => {
    if (finished) {
      return;
    }
    // The socket is still open, so noVNC ended the session itself (it only
    // logs why). Its close event follows once the closing handshake is done.
    viewerReason ??= event.detail.clean
      ? 'the console viewer closed the connection'
      : 'the console viewer could not understand the data it received';
    setTimeout(() => finish(null, ''), CLOSE_GRACE_MS);
  });
}

start();
