// The appliance's HTTP API. URLs are relative so the page also works behind a
// reverse proxy that mounts it under a path prefix.

/** An HTTP failure; status 0 means the appliance could not be reached. */
export class ApiError extends Error {
  constructor(status, message, { type = '', code = '', retryAfter = null } = {}) {
    super(message);
    this.status = status;
    this.type = type;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

// ---------------------------------------------------------------- the token
// An appliance started with tokens asks for one on every call but /health. The URL it prints
// carries it after '#token=' (a fragment: never sent to a server, not in its logs); otherwise
// the page asks once. Kept for this tab only (sessionStorage), and taken out of the address bar.
const TOKEN_KEY = 'edge-llm-token';
const fromUrl = /^#token=(.+)$/.exec(location.hash)?.[1];
if (fromUrl) {
  try {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(fromUrl));
  } catch {
    // A mangled address (a cut-off %-escape): the page asks for the token instead.
  }
  history.replaceState(null, '', location.pathname + location.search);
}

export function token() {
  return sessionStorage.getItem(TOKEN_KEY) ?? '';
}

let asking = null; // one question at a time, however many calls were refused

function askForToken(wrong) {
  const question = wrong
    ? 'That token is not one this appliance knows. Its token:'
    : 'This appliance needs its token: the one in the address it printed ' +
      '(after #token=), or in its tokens file.';
  asking ??= Promise.resolve().then(() => {
    const given = window.prompt(question)?.trim();
    if (given) {
      sessionStorage.setItem(TOKEN_KEY, given);
      window.dispatchEvent(new Event('edge-llm-token')); // the socket tries again with it
    }
    asking = null;
    return Boolean(given);
  });
  return asking;
}

async function request(method, path, body, retried = false) {
  const init = { method, headers: { Accept: 'application/json' } };
  const sentWith = token();
  if (sentWith) init.headers.Authorization = `Bearer ${sentWith}`;
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(path, init);
  } catch {
    throw new ApiError(0, "Can't reach the appliance.", { type: 'network' });
  }
  if (res.status === 401 && !retried) {
    // Another call may have been given the token meanwhile: then just use it.
    if (token() !== sentWith || (await askForToken(Boolean(sentWith)))) {
      return request(method, path, body, true);
    }
    throw new ApiError(401, 'This appliance needs a token; reload the page to give it.', {
      type: 'auth',
    });
  }
  if (res.status === 204) return null;
  let data = null;
  try {
    data = await res.json();
  } catch {
    // Not JSON (a proxy's error page, say): the status alone must do.
  }
  if (!res.ok) {
    const err = data?.error ?? {};
    const retry = Number.parseFloat(res.headers.get('Retry-After') ?? '');
    throw new ApiError(res.status, err.message || `The server answered ${res.status}.`, {
      type: err.type,
      code: err.code,
      retryAfter: Number.isFinite(retry) ? retry : null,
    });
  }
  return data;
}

const session = (id) => `api/sessions/${encodeURIComponent(id)}`;

export const api = {
  info: () => request('GET', 'api/info'),
  listSessions: (pageToken = '') =>
    request('GET', `api/sessions?page_size=50${pageToken ? `&page_token=${encodeURIComponent(pageToken)}` : ''}`),
  getSession: (id) => request('GET', session(id)),
  createSession: (body) => request('POST', 'api/sessions', body),
  updateSession: (id, patch) => request('PATCH', session(id), patch),
  deleteSession: (id) => request('DELETE', session(id)),
};
