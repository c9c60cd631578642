// Test-only OpenID provider for orderflow's integration tests.
//
// What it is: the `oauth2-mock-server` npm package (axa-group, pinned in
// package.json) serving the standard endpoints, wrapped in a plain
// `http.createServer` that adds test-only `/control/*` endpoints so a test can
// mint arbitrary tokens, rotate/drop signing keys, take discovery/JWKS down and
// count how often orderflow fetches them. NEVER use this outside tests: anyone
// who can reach it can mint tokens.
//
// How orderflow's tests use it: `npm ci --prefix tests/oidc` once, then spawn
// `node tests/oidc/provider.mjs` (env PORT, default 0 = any free port), read
// the single stdout line `ready http://127.0.0.1:<port>` (that URL is the
// issuer, no trailing slash; nothing else is ever written to stdout, logs go to
// stderr), talk HTTP to it, and send SIGTERM (or SIGINT) to stop it (exit 0).
//
// Standard endpoints (served by the package, unchanged):
//   GET  /.well-known/openid-configuration   discovery; `issuer` is the URL above,
//                                            `jwks_uri` is <issuer>/jwks
//   GET  /jwks                               public keys: {"keys":[{kty,kid,alg,...}]}
//   POST /token                              form-encoded; grant_type=client_credentials
//        accepts any client_id/client_secret; `aud` and `scope` form parameters
//        become the `aud` / `scope` claims (repeat `aud` for an array). The
//        package adds iss, iat, nbf (now-10), exp (now+3600). Signed with the
//        current RS256 key. Then the claims set by /control/next-token-claims
//        are merged in (they win). (/authorize, /userinfo, /revoke,
//        /introspect, /endsession are the package's too, unused by orderflow.)
//   Default JWKS/discovery headers are the package's: no Cache-Control (a weak
//   ETag is sent, so If-None-Match gets a 304), plus CORS `*`.
//
// Control endpoints (JSON in, JSON out; errors are {"error": "..."} with 4xx):
//   POST /control/token  {"alg":"RS256"|"ES256"|..., "kid"?, "claims"?, "header"?, "expiresIn"?}
//        -> {"token": "<compact JWS>", "kid": "<kid of the signing key>"}
//        Signs with key `kid`, or by default the current key for `alg`
//        (alg defaults to RS256). The payload is exactly `claims` plus, only if
//        absent, iss (issuer), iat (now), exp (now + expiresIn, default 300).
//        A claim whose value is null is left out (e.g. {"exp": null} = no exp).
//        `header` fields are merged into the JOSE header (e.g. a different
//        `kid` or `typ`); `alg` always comes from the key and cannot be set.
//   POST /control/next-token-claims  {claims...}  -> {"ok": true, "claims": {...}}
//        Claims merged into every token /token issues from now on, until the
//        next call replaces them ({} clears). null deletes a claim (e.g. nbf).
//   POST /control/rotate   {"alg": "RS256"}  -> {"kid": "<new kid>"}
//        New key of that alg becomes the current one; older keys stay published.
//   POST /control/drop     {"kid": "..."}    -> {"ok": true}
//        Key removed from the JWKS and forgotten (cannot sign any more). If it
//        was current, the newest remaining key of that alg becomes current.
//   POST /control/down, POST /control/up     -> {"ok": true}
//        While down, GET/HEAD discovery and JWKS answer 503; everything else works.
//   POST /control/cache-control {"value": "max-age=60"} -> {"ok": true, "value": ...}
//        JWKS responses carry that Cache-Control header; {"value": null} = none again.
//   GET  /control/stats    -> {"jwksFetches": n, "discoveryFetches": n}
//        GETs of /jwks and of the discovery document (503 answers included)
//        since start or the last POST /control/stats/reset (-> {"ok": true}).
//   GET  /control/public-key[?kid=...]  -> {"pem": "<SPKI PEM>", "jwk": {...}}
//        A published public key (default: current RS256), e.g. for an HS256
//        algorithm-confusion token that uses the PEM bytes as HMAC secret.
//   GET  /control/keys     -> {"current": {"RS256": kid, ...}, "kids": [...]}

import http from 'node:http';
import { createPublicKey, randomBytes } from 'node:crypto';
import { JWKStore, OAuth2Issuer, OAuth2Service } from 'oauth2-mock-server';

const HOST = '127.0.0.1';

const keys = new Map(); // kid -> private JWK (insertion order = age)
let keysGenerated = 0;
const current = {}; // alg -> kid of the current key for that alg
let nextTokenClaims = {};
let down = false;
let jwksCacheControl = null;
const stats = { jwksFetches: 0, discoveryFetches: 0 };

// The package's issuer, with two changes: its key store can be replaced (the
// package's JWKStore has no "remove"), and tokens built without an explicit kid
// (the /token endpoint) use the current RS256 key instead of round-robin.
class TestIssuer extends OAuth2Issuer {
  store = new JWKStore();
  get keys() {
    return this.store;
  }
  buildToken(opts = {}) {
    return super.buildToken({ ...opts, kid: opts.kid ?? current.RS256 });
  }
}

const issuer = new TestIssuer(false); // false: issuer URL never gets a trailing slash
const service = new OAuth2Service(issuer);
service.on('beforeTokenSigning', (token) => mergeClaims(token.payload, nextTokenClaims));

function mergeClaims(target, claims) {
  for (const [name, value] of Object.entries(claims)) {
    if (value === null) delete target[name];
    else target[name] = value;
  }
  return target;
}

async function generateKey(alg) {
  const kid = `${alg.toLowerCase()}-${++keysGenerated}-${randomBytes(4).toString('hex')}`;
  let jwk;
  try {
    jwk = await issuer.keys.generate(alg, { kid });
  } catch (e) {
    throw httpError(400, `cannot generate a ${alg} key: ${e.message}`);
  }
  keys.set(kid, jwk);
  current[alg] = kid;
  return kid;
}

async function dropKey(kid) {
  const jwk = keys.get(kid);
  if (!jwk) throw httpError(404, `unknown kid ${kid}`);
  keys.delete(kid);
  const store = new JWKStore();
  for (const k of keys.values()) await store.add(k);
  issuer.store = store;
  if (current[jwk.alg] === kid) {
    const newest = [...keys.values()].filter((k) => k.alg === jwk.alg).pop();
    if (newest) current[jwk.alg] = newest.kid;
    else delete current[jwk.alg];
  }
}

async function mintToken({ alg, kid, claims = {}, header = {}, expiresIn = 300 }) {
  if (!isObject(claims) || !isObject(header)) throw httpError(400, 'claims and header must be JSON objects');
  if ('alg' in header) throw httpError(400, 'header.alg cannot be set: it is the signing key\'s alg');
  if (typeof expiresIn !== 'number') throw httpError(400, 'expiresIn must be a number of seconds');
  if (kid === undefined) {
    alg ??= 'RS256';
    kid = current[alg];
    if (!kid) throw httpError(400, `no ${alg} key; POST /control/rotate {"alg":"${alg}"} first`);
  }
  const jwk = keys.get(kid);
  if (!jwk) throw httpError(404, `unknown kid ${kid}`);
  if (alg !== undefined && jwk.alg !== alg) throw httpError(400, `key ${kid} is ${jwk.alg}, not ${alg}`);
  const token = await issuer.buildToken({
    kid,
    scopesOrTransform: (hdr, payload) => {
      const now = payload.iat; // the package's "now"; drop its defaults (nbf etc.)
      for (const name of Object.keys(payload)) delete payload[name];
      const defaults = { iss: issuer.url, iat: now, exp: now + expiresIn };
      mergeClaims(payload, { ...defaults, ...claims });
      Object.assign(hdr, header);
    },
  });
  return { token, kid };
}

function publicKey(kid = current.RS256) {
  const jwk = issuer.keys.toJSON().find((k) => k.kid === kid);
  if (!jwk) throw httpError(404, `unknown kid ${kid}`);
  const pem = createPublicKey({ key: jwk, format: 'jwk' }).export({ type: 'spki', format: 'pem' });
  return { pem, jwk };
}

const control = {
  'POST /control/token': (body) => mintToken(body),
  'POST /control/next-token-claims': (body) => {
    nextTokenClaims = body;
    return { ok: true, claims: nextTokenClaims };
  },
  'POST /control/rotate': async (body) => {
    if (typeof body.alg !== 'string') throw httpError(400, 'alg (string) is required');
    return { kid: await generateKey(body.alg) };
  },
  'POST /control/drop': async (body) => {
    await dropKey(body.kid);
    return { ok: true };
  },
  'POST /control/down': () => ((down = true), { ok: true }),
  'POST /control/up': () => ((down = false), { ok: true }),
  'POST /control/cache-control': (body) => {
    if (body.value !== null && typeof body.value !== 'string') throw httpError(400, 'value must be a string or null');
    jwksCacheControl = body.value;
    return { ok: true, value: jwksCacheControl };
  },
  'GET /control/stats': () => ({ ...stats }),
  'POST /control/stats/reset': () => {
    stats.jwksFetches = stats.discoveryFetches = 0;
    return { ok: true };
  },
  'GET /control/public-key': (_body, url) => publicKey(url.searchParams.get('kid') ?? undefined),
  'GET /control/keys': () => ({ current: { ...current }, kids: [...keys.keys()] }),
};

function httpError(status, message) {
  return Object.assign(new Error(message), { status });
}

function isObject(v) {
  return v !== null && typeof v === 'object' && !Array.isArray(v);
}

function sendJson(res, status, body) {
  res.writeHead(status, { 'Content-Type': 'application/json', 'Cache-Control': 'no-store' });
  res.end(JSON.stringify(body));
}

async function readJsonBody(req) {
  let text = '';
  for await (const chunk of req) text += chunk;
  if (text.trim() === '') return {};
  let body;
  try {
    body = JSON.parse(text);
  } catch {
    throw httpError(400, 'body is not valid JSON');
  }
  if (!isObject(body)) throw httpError(400, 'body must be a JSON object');
  return body;
}

async function handleControl(req, res, path, url) {
  const handler = control[`${req.method} ${path}`];
  if (!handler) return sendJson(res, 404, { error: `no control endpoint ${req.method} ${path}` });
  try {
    const body = req.method === 'POST' ? await readJsonBody(req) : {};
    sendJson(res, 200, await handler(body, url));
  } catch (e) {
    if (!e.status) console.error('control endpoint failed:', e);
    sendJson(res, e.status ?? 500, { error: e.message });
  }
}

const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://placeholder');
  const path = url.pathname.length > 1 ? url.pathname.replace(/\/+$/, '') : url.pathname;
  if (path.startsWith('/control/')) return void handleControl(req, res, path, url);

  const kind = { '/jwks': 'jwks', '/.well-known/openid-configuration': 'discovery' }[path];
  if (kind && (req.method === 'GET' || req.method === 'HEAD')) {
    if (req.method === 'GET') stats[`${kind}Fetches`] += 1;
    if (down) return sendJson(res, 503, { error: 'temporarily_unavailable' });
    if (kind === 'jwks' && jwksCacheControl !== null) res.setHeader('Cache-Control', jwksCacheControl);
  }
  service.requestHandler(req, res);
});

function shutdown() {
  server.close(() => process.exit(0));
  server.closeAllConnections();
  setTimeout(() => process.exit(0), 1000).unref();
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);

await generateKey('RS256');
await generateKey('ES256');

server.on('error', (e) => {
  console.error('oidc test provider:', e.message);
  process.exit(1);
});
server.listen(Number(process.env.PORT ?? 0), HOST, () => {
  issuer.url = `http://${HOST}:${server.address().port}`;
  process.stdout.write(`ready ${issuer.url}\n`);
});
