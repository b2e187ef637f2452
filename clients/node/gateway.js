// A Node.js caller of the nlpmesh gateway, from protos/ alone: TLS with the mesh's CA, the API key as
// `authorization: Bearer`, a deadline on every call, `x-request-id`, streaming deltas, the `server-timing`
// trailer, and the google.rpc details of `grpc-status-details-bin` (RetryInfo, ErrorInfo) decoded.
// An example for callers in other languages (docs/clients.md); tests/e2e/test_clients.py runs it.
'use strict';

const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const PROTOS = process.env.NLPMESH_PROTOS || path.join(__dirname, '..', '..', 'protos');
const LOADER_OPTIONS = { keepCase: true, longs: String, enums: String, defaults: true, oneofs: true };

const gatewayPackage = grpc.loadPackageDefinition(
  protoLoader.loadSync('nlpmesh/gateway/v1/gateway.proto', { ...LOADER_OPTIONS, includeDirs: [PROTOS] }));
const Gateway = gatewayPackage.nlpmesh.gateway.v1.Gateway;

const rpcTypes = new protobuf.Root().loadSync(path.join(__dirname, 'google_rpc.proto'), { keepCase: true });
rpcTypes.resolveAll();
const Status = rpcTypes.lookupType('google.rpc.Status');

// Every call's deadline unless the call gives one.
const DEFAULT_TIMEOUT_MS = 60000;

function connect({ address = process.env.NLPMESH_ADDR || '127.0.0.1:50051', apiKey = process.env.NLPMESH_API_KEY,
  caFile = process.env.NLPMESH_CA, plaintext = false } = {}) {
  const credentials = plaintext ? grpc.credentials.createInsecure()
    : grpc.credentials.createSsl(caFile ? fs.readFileSync(caFile) : null);
  return { stub: new Gateway(address, credentials), apiKey };
}

function callMetadata(client, requestId) {
  const metadata = new grpc.Metadata();
  metadata.set('x-request-id', requestId || crypto.randomUUID());
  if (client.apiKey) metadata.set('authorization', `Bearer ${client.apiKey}`);
  return metadata;
}

function deadline(timeoutMs) {
  return { deadline: new Date(Date.now() + (timeoutMs || DEFAULT_TIMEOUT_MS)) };
}

// `template;dur=0.41;desc="budget 100", cache;dur=0.62` -> { template: 0.41, cache: 0.62 }
function parseServerTiming(value) {
  const timings = {};
  for (const entry of (value || '').split(',')) {
    const [name, ...params] = entry.split(';').map((part) => part.trim());
    const dur = params.find((param) => param.startsWith('dur='));
    if (name && dur) timings[name] = Number(dur.slice(4));
  }
  return timings;
}

function durationSeconds(duration) {
  return Number(duration.seconds || 0) + (duration.nanos || 0) / 1e9;
}

// A failed call as plain data: its code's name, message, and what its google.rpc details say.
function describeError(error) {
  const described = { code: grpc.status[error.code], message: error.details, hop: null, retry_after_s: null,
    quota_violations: [] };
  const [details] = error.metadata ? error.metadata.get('grpc-status-details-bin') : [];
  if (!details) return described;
  for (const any of Status.decode(details).details) {
    const typeName = any.type_url.slice(any.type_url.lastIndexOf('/') + 1);
    const type = rpcTypes.lookup(typeName);
    if (!type) continue;
    const detail = type.decode(any.value);
    if (typeName === 'google.rpc.RetryInfo') described.retry_after_s = durationSeconds(detail.retry_delay);
    if (typeName === 'google.rpc.ErrorInfo') described.hop = detail.metadata.hop || null;
    if (typeName === 'google.rpc.QuotaFailure') described.quota_violations = detail.violations.map((v) => v.subject);
  }
  return described;
}

function generate(client, request, { timeoutMs, requestId } = {}) {
  return new Promise((resolve, reject) => {
    let echoedId = null;
    let serverTiming = {};
    const call = client.stub.Generate(request, callMetadata(client, requestId), deadline(timeoutMs),
      (error, response) => (error ? reject(error) : setImmediate(() => resolve({ ...response, request_id: echoedId,
        server_timing: serverTiming }))));
    call.on('metadata', (metadata) => { [echoedId] = metadata.get('x-request-id'); });
    call.on('status', (status) => { serverTiming = parseServerTiming(status.metadata.get('server-timing')[0]); });
  });
}

// Resolves to the whole answer: the deltas joined, the last chunk's fields, and how many chunks had text.
function stream(client, request, { timeoutMs, requestId, onDelta } = {}) {
  return new Promise((resolve, reject) => {
    const call = client.stub.GenerateStream(request, callMetadata(client, requestId), deadline(timeoutMs));
    const deltas = [];
    let last = null;
    let echoedId = null;
    call.on('metadata', (metadata) => { [echoedId] = metadata.get('x-request-id'); });
    call.on('data', (chunk) => {
      if (chunk.delta) {
        deltas.push(chunk.delta);
        if (onDelta) onDelta(chunk.delta);
      }
      if (chunk.done) last = chunk;
    });
    call.on('error', reject);
    call.on('status', (status) => {
      if (status.code !== grpc.status.OK) return; // 'error' has it
      resolve({ ...last, text: deltas.join(''), delta_chunks: deltas.length, request_id: echoedId,
        server_timing: parseServerTiming(status.metadata.get('server-timing')[0]) });
    });
  });
}

function countTokens(client, request, { timeoutMs, requestId } = {}) {
  return new Promise((resolve, reject) => {
    client.stub.CountTokens(request, callMetadata(client, requestId), deadline(timeoutMs),
      (error, response) => (error ? reject(error) : resolve(response)));
  });
}

module.exports = { connect, generate, stream, countTokens, describeError, parseServerTiming };
