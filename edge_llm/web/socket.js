// The chat WebSocket (api/chat on this page's host, ws or wss to match).
// It reconnects by itself with backoff and reports its state so the page can
// show it; turn-taking (one request at a time per socket) is app.js's job.

import { token } from './api.js';

const BACKOFF_S = [1, 2, 4, 8, 15];

// A browser's WebSocket cannot send an Authorization header: the token goes as a subprotocol
// beside ours, base64url-encoded (any token is then a valid protocol name), as Kubernetes does.
function protocols() {
  const t = token();
  if (!t) return undefined;
  const bytes = new TextEncoder().encode(t);
  const b64 = btoa(String.fromCharCode(...bytes)).replace(/\+/g, '-').replace(/\//g, '_');
  return ['edge-llm', `bearer.${b64.replace(/=+$/, '')}`];
}

export class ChatSocket {
  /**
   * @param {(frame: object) => void} onFrame  each JSON frame from the server
   * @param {(state: {state: 'connecting'|'open'|'closed', retryIn?: number, code?: number}) => void} onState
   */
  constructor(onFrame, onState) {
    this.onFrame = onFrame;
    this.onState = onState;
    this.ws = null;
    this.failures = 0;
    this.timer = 0;
    this.url = new URL('api/chat', document.baseURI);
    this.url.protocol = this.url.protocol === 'https:' ? 'wss:' : 'ws:';
    // Come back at once when the network or the tab does.
    window.addEventListener('online', () => this.reconnectNow());
    window.addEventListener('edge-llm-token', () => this.reconnectNow());
    document.addEventListener('visibilitychange', () => {
      if (document.visibilityState === 'visible') this.reconnectNow();
    });
  }

  get isOpen() {
    return this.ws?.readyState === WebSocket.OPEN;
  }

  connect() {
    clearTimeout(this.timer);
    this.onState({ state: 'connecting' });
    const ws = new WebSocket(this.url, protocols());
    this.ws = ws;
    ws.addEventListener('open', () => {
      this.failures = 0;
      this.onState({ state: 'open' });
    });
    ws.addEventListener('message', (event) => {
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch {
        return; // not ours to interpret
      }
      if (frame && typeof frame.type === 'string') this.onFrame(frame);
    });
    ws.addEventListener('close', (event) => {
      if (this.ws !== ws) return; // an old socket we replaced
      this.ws = null;
      const retryIn = BACKOFF_S[Math.min(this.failures, BACKOFF_S.length - 1)];
      this.failures += 1;
      this.timer = setTimeout(() => this.connect(), retryIn * 1000);
      this.onState({ state: 'closed', retryIn, code: event.code });
    });
  }

  /** Skip the backoff wait (a Retry button, the tab coming back). */
  reconnectNow() {
    if (this.ws) return; // open or already trying
    this.failures = 0;
    this.connect();
  }

  /** Drop the connection (the server cancels what it was running) and reconnect. */
  reset() {
    this.ws?.close(4000, 'reset by the page');
  }

  /** Send a JSON frame; false when the socket is not open. */
  send(frame) {
    if (!this.isOpen) return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  }
}
