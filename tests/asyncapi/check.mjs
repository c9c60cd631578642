// Checks orderflow's AsyncAPI document with the official parser (@asyncapi/parser, pinned in
// package-lock.json) and, when given, validates messages captured from a real pipeline run
// against it.
//
//   node tests/asyncapi/check.mjs DOCUMENT [MESSAGES]
//
// DOCUMENT: the AsyncAPI document (docs/asyncapi.json, or what GET /asyncapi.json served).
// MESSAGES: a JSON array written by tests/asyncapi.rs, one entry per captured message:
//   {"channel": "<channel id>", "properties": {...}, "headers": {...}, "body": "<text>"}
// with the AMQP properties named as in the document's `x-amqp-properties` schema.
//
// Fails (exit 1) on any parser error, on any warning not listed in ALLOWED_WARNINGS, and on
// any message that does not match the document: its payload (objects closed: a renamed or
// undocumented field fails), its headers, its AMQP properties, and the links the document
// states between them (message_id = id, type = messageType = routing key's message,
// correlation_id = the body's order at the message's correlationId location, content_type
// = the message's contentType). The last line is `asyncapi: N passed, M failed`.

import { readFileSync } from 'node:fs';
import { Parser, DiagnosticSeverity } from '@asyncapi/parser';
import Ajv from 'ajv';
import addFormats from 'ajv-formats';

// Warnings that do not point at a real problem, each with the reason.
const ALLOWED_WARNINGS = {};

const [documentPath, messagesPath] = process.argv.slice(2);
if (!documentPath) {
  console.error('usage: node tests/asyncapi/check.mjs DOCUMENT [MESSAGES]');
  process.exit(2);
}

let passed = 0;
let failed = 0;
const fail = (what) => {
  failed += 1;
  console.error(`FAIL ${what}`);
};

const text = readFileSync(documentPath, 'utf8');
const { document, diagnostics } = await new Parser().parse(text);
for (const d of diagnostics) {
  const where = d.path.join('.');
  const line = `${DiagnosticSeverity[d.severity] ?? d.severity} ${d.code} at ${where || '/'}: ${d.message}`;
  if (d.severity === DiagnosticSeverity.Error) {
    fail(`parser: ${line}`);
  } else if (d.severity === DiagnosticSeverity.Warning && !ALLOWED_WARNINGS[d.code]) {
    fail(`parser: ${line}`);
  } else {
    console.log(`note: parser: ${line}`);
  }
}
if (!document) {
  fail(`parser: ${documentPath} is not a valid AsyncAPI document`);
} else if (failed === 0) {
  passed += 1;
  const channels = document.channels().length;
  const operations = document.operations().length;
  const messages = document.components().messages().length;
  console.log(
    `ok ${documentPath}: AsyncAPI ${document.version()}, ${channels} channels, ${operations} operations, ${messages} messages`,
  );
}

if (document && messagesPath) {
  checkMessages(document.json(), JSON.parse(readFileSync(messagesPath, 'utf8')));
}

console.log(`asyncapi: ${passed} passed, ${failed} failed`);
process.exit(failed === 0 ? 0 : 1);

// --- Captured messages ---------------------------------------------------------------------------

function checkMessages(doc, captured) {
  // The parser's document, with every $ref resolved; copied, since closing mutates schemas.
  const resolved = JSON.parse(JSON.stringify(doc));
  const ajv = new Ajv({ allErrors: true, strict: true, strictTypes: false });
  addFormats(ajv);
  // Added by the parser to every schema it resolved.
  ajv.addKeyword('x-parser-schema-id');
  const validators = new Map();
  const validator = (key, schema, closed) => {
    if (!validators.has(key)) {
      validators.set(key, ajv.compile(closed ? close(structuredClone(schema)) : schema));
    }
    return validators.get(key);
  };
  const errors = (validate) =>
    (validate.errors ?? []).map((e) => `${e.instancePath || '/'} ${e.message} ${JSON.stringify(e.params)}`).join('; ');

  for (const [i, m] of captured.entries()) {
    const what = `message ${i} on ${m.channel} (type ${m.properties?.type ?? '?'}, id ${m.properties?.message_id ?? '?'})`;
    const channel = resolved.channels?.[m.channel];
    if (!channel) {
      fail(`${what}: the document has no channel ${m.channel}`);
      continue;
    }
    const candidates = Object.entries(channel.messages ?? {});
    const found =
      candidates.find(([, msg]) => msg.bindings?.amqp?.messageType === m.properties?.type) ??
      (candidates.length === 1 ? candidates[0] : undefined);
    if (!found) {
      fail(`${what}: type ${m.properties?.type} is not a message of channel ${m.channel}`);
      continue;
    }
    const [messageId, message] = found;
    const problems = [];

    let body;
    const contentType = message.contentType ?? resolved.defaultContentType;
    // JSON, and the JSON-based media types (`application/cloudevents+json`: RFC 6839 suffix).
    if (contentType === 'application/json' || /^application\/[a-z0-9.+-]*\+json$/.test(contentType)) {
      try {
        body = JSON.parse(m.body);
      } catch (e) {
        problems.push(`body is not JSON: ${e.message}`);
      }
    } else {
      body = m.body;
    }
    if (body !== undefined && message.payload) {
      const v = validator(`${messageId}/payload`, message.payload, true);
      if (!v(body)) problems.push(`payload: ${errors(v)}`);
    }
    if (message.headers) {
      const v = validator(`${messageId}/headers`, message.headers, false);
      if (!v(m.headers ?? {})) problems.push(`headers: ${errors(v)}`);
    }
    const propertiesSchema = message['x-amqp-properties'];
    if (propertiesSchema) {
      const v = validator(`${messageId}/properties`, propertiesSchema, true);
      const p = m.properties ?? {};
      if (!v(p)) problems.push(`AMQP properties: ${errors(v)}`);
      const expectedType = message.bindings?.amqp?.messageType;
      if (p.type !== expectedType) problems.push(`property type ${p.type} is not ${expectedType}`);
      if (body && typeof body === 'object') {
        if (p.message_id !== body.id) problems.push(`message_id ${p.message_id} is not the body's id ${body.id}`);
        if (body.type !== p.type) problems.push(`body type ${body.type} is not the property type ${p.type}`);
        // The message's correlationId location names the body field the order travels in
        // (`$message.payload#/orderId`, or `#/subject` for a CloudEvent).
        const pointer = (message.correlationId?.location ?? '$message.payload#/orderId').split('#/')[1];
        const order = pointer.split('/').reduce((v, k) => (v == null ? v : v[k]), body);
        if (p.correlation_id !== order) {
          problems.push(`correlation_id ${p.correlation_id} is not the body's ${pointer} ${order}`);
        }
        if (p.content_type !== contentType) {
          problems.push(`content_type ${p.content_type} is not the message's ${contentType}`);
        }
      }
    }
    if (problems.length) {
      fail(`${what} does not match ${messageId}:\n  ${problems.join('\n  ')}`);
    } else {
      passed += 1;
    }
  }
  console.log(`checked ${captured.length} captured messages against the document`);
}

// Closes every object schema that lists its properties (and says nothing of others), so that a
// field the document does not name (a renamed one, say) fails instead of passing unnoticed.
function close(schema) {
  if (Array.isArray(schema)) {
    schema.forEach(close);
  } else if (schema && typeof schema === 'object') {
    if (schema.properties && schema.additionalProperties === undefined) {
      schema.additionalProperties = false;
    }
    for (const value of Object.values(schema)) close(value);
  }
  return schema;
}
