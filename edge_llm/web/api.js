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

async function request(method, path, body) {
  const init = { method, headers: { Accept: 'application/json' } };
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
