// Runs one scenario against a gateway and prints its result as one JSON line (tests/e2e/test_clients.py).
//   node check.js answer QUESTION     unary Generate and GenerateStream of the finance template
//   node check.js quota               CountTokens until the tenant's rate refuses one
//   node check.js deadline MS         a generation given MS milliseconds
// The gateway, key and CA: NLPMESH_ADDR, NLPMESH_API_KEY, NLPMESH_CA.
'use strict';

const gateway = require('./gateway');

const MAX_NEW_TOKENS = 24;

function financeRequest(question, maxNewTokens) {
  // google.protobuf.Value's fields in camelCase: protobufjs brings its own definition of struct.proto, keepCase or not.
  return { template: { id: 'finance_question', variables: { fields: { question: { stringValue: question } } } },
    sampling: { max_new_tokens: maxNewTokens }, cache_mode: 'CACHE_MODE_BYPASS' };
}

async function answer(client, question) {
  const request = financeRequest(question, MAX_NEW_TOKENS);
  const unary = await gateway.generate(client, request, { requestId: 'node-unary-1' });
  const streamed = await gateway.stream(client, request);
  const pick = (r) => ({ text: r.text, model: r.model, finish_reason: r.finish_reason, cache_hit: r.cache_hit,
    completion_tokens: r.usage.completion_tokens, request_id: r.request_id, server_timing: r.server_timing,
    hops: r.timings.map((t) => t.hop) });
  return { unary: pick(unary), stream: { ...pick(streamed), delta_chunks: streamed.delta_chunks } };
}

async function quota(client) {
  const request = { chat: { messages: [{ role: 'user', content: 'How many tokens?' }] } };
  const answered = [];
  for (let attempt = 0; attempt < 20; attempt += 1) {
    try {
      answered.push((await gateway.countTokens(client, request, { timeoutMs: 10000 })).prompt_tokens);
    } catch (error) {
      const described = gateway.describeError(error);
      if (described.code === 'RESOURCE_EXHAUSTED') return { answered, refused: described };
      throw error;
    }
  }
  return { answered, refused: null };
}

async function deadline(client, timeoutMs) {
  const started = Date.now();
  try {
    const reply = await gateway.generate(client, { chat: { messages: [{ role: 'user', content:
      'Write a long essay on the history of bond markets.' }] }, sampling: { max_new_tokens: 512 },
      cache_mode: 'CACHE_MODE_BYPASS' }, { timeoutMs });
    return { answered: reply.text.length, elapsed_ms: Date.now() - started };
  } catch (error) {
    return { refused: gateway.describeError(error), elapsed_ms: Date.now() - started };
  }
}

async function main() {
  const [scenario, argument] = process.argv.slice(2);
  const client = gateway.connect();
  const run = { answer: () => answer(client, argument), quota: () => quota(client),
    deadline: () => deadline(client, Number(argument)) }[scenario];
  if (!run) throw new Error(`unknown scenario ${scenario}: answer, quota or deadline`);
  try {
    process.stdout.write(`${JSON.stringify(await run())}\n`);
  } finally {
    client.stub.close();
  }
}

main().catch((error) => {
  const described = error.code !== undefined ? gateway.describeError(error) : { message: String(error) };
  process.stderr.write(`${JSON.stringify({ error: described })}\n`);
  process.exit(1);
});
