// A second server stack for llm-probe's tests: Node.js's `http` module (libuv writes chunked
// responses with writev), serving OpenAI-style SSE and Ollama-style NDJSON with delays the test
// controls, so the probe's timings can be checked against known values.
//
// usage: node mock_llm.js PORT
// Request body fields (all optional): model, stream, max_tokens (content events), ttft_ms, gap_ms,
// role_chunk (send a role-only chunk at once), usage (send a usage-only final chunk),
// batch (content events per write), fail: "503" | "stream_error" | "reset", fail_after (events).
'use strict';
const http = require('http');

const port = parseInt(process.argv[2] || '8080', 10);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function chunk(model, delta, extra) {
  return JSON.stringify(Object.assign({
    id: 'cmpl-mock', object: 'chat.completion.chunk', model,
    choices: delta === null ? [] : [{ index: 0, delta, finish_reason: null }],
  }, extra || {}));
}

async function chat(req, res, p) {
  const model = p.model || 'mock';
  const n = p.max_tokens === undefined ? 8 : p.max_tokens;
  const ttft = p.ttft_ms || 0;
  const gap = p.gap_ms || 0;
  const batch = p.batch || 1;
  if (p.fail === '503') {
    await sleep(ttft);
    res.writeHead(503, { 'Content-Type': 'application/json' });
    res.end(JSON.stringify({ error: { message: 'overloaded', type: 'server_error' } }));
    return;
  }
  if (!p.stream) {
    await sleep(ttft);
    const body = JSON.stringify({
      id: 'cmpl-mock', object: 'chat.completion', model,
      choices: [{ index: 0, message: { role: 'assistant', content: 'tok '.repeat(n) }, finish_reason: 'length' }],
      usage: { prompt_tokens: 7, completion_tokens: n, total_tokens: 7 + n },
    });
    res.writeHead(200, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(body) });
    res.end(body);
    return;
  }
  res.writeHead(200, { 'Content-Type': 'text/event-stream', 'Cache-Control': 'no-cache' });
  if (p.role_chunk !== false) res.write(`data: ${chunk(model, { role: 'assistant' })}\n\n`);
  await sleep(ttft);
  let sent = 0;
  while (sent < n) {
    if (sent > 0) await sleep(gap);
    if (p.fail === 'reset' && sent >= (p.fail_after || 0)) { req.socket.destroy(); return; }
    if (p.fail === 'stream_error' && sent >= (p.fail_after || 0)) {
      res.write(`data: ${JSON.stringify({ error: { message: 'engine died', code: 500 } })}\n\n`);
      res.end();
      return;
    }
    let out = '';
    for (let i = 0; i < batch && sent < n; i++, sent++) out += `data: ${chunk(model, { content: 'tok' + sent + 'x'.repeat(p.pad || 0) })}\n\n`;
    if (sent % 4 === 0) out += ': keep-alive\n\n';
    res.write(out);
  }
  if (p.usage) res.write(`data: ${chunk(model, null, { usage: { prompt_tokens: 7, completion_tokens: n, total_tokens: 7 + n } })}\n\n`);
  res.write('data: [DONE]\n\n');
  res.end();
}

async function ollama(req, res, p) {
  const model = p.model || 'mock';
  const n = p.max_tokens === undefined ? 8 : p.max_tokens;
  res.writeHead(200, { 'Content-Type': 'application/x-ndjson' });
  await sleep(p.ttft_ms || 0);
  for (let i = 0; i < n; i++) {
    if (i > 0) await sleep(p.gap_ms || 0);
    res.write(JSON.stringify({ model, response: 'tok' + i, done: false }) + '\n');
  }
  res.end(JSON.stringify({ model, response: '', done: true, eval_count: n, prompt_eval_count: 5 }) + '\n');
}

const server = http.createServer((req, res) => {
  let body = '';
  req.on('data', (d) => { body += d; });
  req.on('end', () => {
    if (req.url === '/health') { res.writeHead(200, { 'Content-Type': 'text/plain' }); res.end('ok\n'); return; }
    if (req.url === '/metrics') { res.writeHead(200, { 'Content-Type': 'text/plain' }); res.end('engine_up 1\n'); return; }
    let p = {};
    try { p = body ? JSON.parse(body) : {}; } catch (e) { res.writeHead(400); res.end('bad json\n'); return; }
    const handler = req.url.startsWith('/api/generate') || req.url.startsWith('/api/chat') ? ollama
      : req.url.startsWith('/v1/') ? chat : null;
    if (!handler) { res.writeHead(404); res.end('not found\n'); return; }
    handler(req, res, p).catch((e) => { console.error(e); res.destroy(); });
  });
});
server.keepAliveTimeout = 60000;
server.listen(port, '127.0.0.1', () => console.log(`mock_llm listening on ${port}`));
