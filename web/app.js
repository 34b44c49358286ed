// The static site's page: loads the int8 ONNX model into onnxruntime-web (WebAssembly) and tokenizer.json into
// tokenizers.js, then generates as smallgpt's engine does (model/generation/engine.py): the prompt runs once, each
// step runs one token over the past keys and values, a full window slides to its last `keep` tokens, a sequence stops
// at <|endoftext|>. Everything it loads comes from this folder. window.smallgpt is what the tests and bench/web.py call.
import * as ort from "./vendor/ort.wasm.min.mjs";
import { Tokenizer } from "./vendor/tokenizers.min.mjs";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const GREEDY_BELOW = 1e-5; // as model/generation/sampling.py
// The smallest WebAssembly module that uses a SIMD instruction (wasm-feature-detect's probe).
const SIMD_PROBE = new Uint8Array([0, 97, 115, 109, 1, 0, 0, 0, 1, 5, 1, 96, 0, 1, 123, 3, 2, 1, 0, 10, 10, 1, 8, 0,
  65, 0, 253, 15, 253, 98, 11]);

let config, tokenizer, session;
let stopRequested = false;

function problem(sentence) {
  $("problem").textContent = sentence;
  $("problem").hidden = false;
  $("loading").hidden = true;
}

async function fetchWithProgress(url, onProgress) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  const total = Number(response.headers.get("content-length")) || 0;
  const reader = response.body.getReader();
  const chunks = [];
  let received = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    chunks.push(value);
    received += value.length;
    if (total) onProgress(received / total);
  }
  const bytes = new Uint8Array(received);
  let at = 0;
  for (const c of chunks) { bytes.set(c, at); at += c.length; }
  return bytes;
}

async function load() {
  if (typeof WebAssembly !== "object" || !WebAssembly.validate(SIMD_PROBE)) {
    throw new Error("This browser cannot run WebAssembly with SIMD, which the model needs: open the page in a current " +
      "Chrome, Edge, Firefox or Safari (16.4 or later).");
  }
  config = await (await fetch("smallgpt.json")).json();
  const [tokJson, tokConfig] = await Promise.all([
    fetch("tokenizer.json").then((r) => r.json()), fetch("tokenizer_config.json").then((r) => r.json())]);
  tokenizer = new Tokenizer(tokJson, { ...tokConfig, eos_token: null, bos_token: null, unk_token: null });
  const file = params.get("model") === "fp32" ? "onnx/model.onnx" : "onnx/model_quantized.onnx";
  $("status").textContent = `Loading the model (${(config.files[file] / 1e6).toFixed(1)} MB)…`;
  const bytes = await fetchWithProgress(file, (f) => { $("progress").value = 0.9 * f; });
  $("status").textContent = "Starting the WebAssembly runtime…";
  // Absolute: onnxruntime-web resolves wasmPaths against its own module's URL. Several threads need a cross-origin
  // isolated page (SharedArrayBuffer); a static Space is shown in a cross-origin iframe, so one thread is the rule.
  ort.env.wasm.wasmPaths = new URL("vendor/", location.href).href;
  ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;
  session = await ort.InferenceSession.create(bytes, { executionProviders: ["wasm"], graphOptimizationLevel: "all" });
  $("progress").value = 1;
  $("loading").hidden = true;
  $("title").textContent = config.title;
  document.title = config.title;
  $("model-card").textContent = config.card;
  $("engine-info").textContent = `${file}, ${ort.env.wasm.numThreads} WebAssembly thread(s).`;
  $("generate").disabled = false;
}

// ---- the model: one call, shaped as the exported graph wants ----

function emptyPast(rows) {
  const hd = config.n_embd / config.n_head;
  const past = {};
  for (let i = 0; i < config.n_layer; i++) {
    for (const kv of ["key", "value"]) {
      past[`past_key_values.${i}.${kv}`] = new ort.Tensor("float32", new Float32Array(0), [rows, config.n_head, 0, hd]);
    }
  }
  return past;
}

// ids: rows of equal length T at positions start..start+T-1 over past; returns {logits (rows*T*V), past (the presents)}.
async function forward(ids, start, past) {
  const rows = ids.length, T = ids[0].length;
  const flat = new BigInt64Array(rows * T), pos = new BigInt64Array(rows * T);
  ids.forEach((row, r) => row.forEach((t, j) => { flat[r * T + j] = BigInt(t); pos[r * T + j] = BigInt(start + j); }));
  const feeds = { input_ids: new ort.Tensor("int64", flat, [rows, T]), position_ids: new ort.Tensor("int64", pos, [rows, T]), ...past };
  const out = await session.run(feeds);
  const next = {};
  for (const name of Object.keys(past)) next[name] = out[name.replace("past_key_values", "present")];
  return { logits: out.logits.data, past: next };
}

// The prompt's keys and values (one row) repeated for n rows: its sequences share it, as the engine's rows do.
function repeatRows(past, n) {
  if (n === 1) return past;
  const out = {};
  for (const [name, t] of Object.entries(past)) {
    const data = new Float32Array(t.data.length * n);
    for (let r = 0; r < n; r++) data.set(t.data, r * t.data.length);
    out[name] = new ort.Tensor("float32", data, [n, ...t.dims.slice(1)]);
  }
  return out;
}

// ---- sampling (model/generation/sampling.py's order: temperature, top-k, top-p, then a seeded draw) ----

function randomSource(seed) {
  let s = seed === null || seed < 0 ? crypto.getRandomValues(new Uint32Array(1))[0] : Number(BigInt.asUintN(32, BigInt(seed)));
  return () => { // mulberry32
    s = (s + 0x6d2b79f5) | 0;
    let t = Math.imul(s ^ (s >>> 15), 1 | s);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function argmax(logits, offset, n) {
  let best = 0, value = -Infinity;
  for (let i = 0; i < n; i++) if (logits[offset + i] > value) { value = logits[offset + i]; best = i; }
  return best;
}

// The ids of the k largest logits, largest first (k candidates kept sorted as we go).
function topK(logits, offset, n, k) {
  const ids = [];
  for (let i = 0; i < n; i++) {
    const v = logits[offset + i];
    if (ids.length === k && v <= logits[offset + ids[k - 1]]) continue;
    let j = ids.length === k ? k - 1 : ids.length;
    while (j > 0 && logits[offset + ids[j - 1]] < v) { ids[j] = ids[j - 1]; j--; }
    ids[j] = i;
  }
  return ids;
}

function pick(logits, offset, n, s, random) {
  if (s.temperature < GREEDY_BELOW) return argmax(logits, offset, n);
  const k = s.topK > 0 && s.topK < n ? s.topK : n;
  const ids = k < n || s.topP < 1 ? topK(logits, offset, n, k) : [...Array(n).keys()];
  const scaled = ids.map((i) => logits[offset + i] / s.temperature);
  const top = Math.max(...scaled);
  let probs = scaled.map((x) => Math.exp(x - top));
  let sum = probs.reduce((a, b) => a + b, 0);
  probs = probs.map((p) => p / sum);
  if (s.topP < 1) { // the smallest prefix whose probability reaches top-p (ids are sorted here)
    let before = 0;
    probs = probs.map((p) => { const keep = before < s.topP; before += p; return keep ? p : 0; });
    sum = probs.reduce((a, b) => a + b, 0);
    probs = probs.map((p) => p / sum);
  }
  let u = random(), i = 0;
  for (; i < probs.length - 1; i++) { u -= probs[i]; if (u < 0) break; }
  return ids[i];
}

// ---- the engine ----

function promptIds(prompt) {
  const ids = tokenizer.encode(prompt, { add_special_tokens: false }).ids;
  return (ids.length ? ids : [config.eot]).slice(-config.block_size); // empty: start from <|endoftext|>
}

const yieldToPage = () => new Promise((resolve) => { const c = new MessageChannel(); c.port1.onmessage = resolve; c.port2.postMessage(0); });

// Token ids of n sequences after prompt ids; onStep(tokens) after every step. Stops after maxNew steps, when every
// sequence has ended at <|endoftext|>, or at Stop.
async function generateIds(ids, n, s, onStep = () => {}) {
  const random = randomSource(s.seed), V = config.vocab_size, nVocab = config.n_vocab;
  const rows = Array.from({ length: n }, () => []);
  const ended = new Array(n).fill(false);
  let out = await forward([ids], 0, emptyPast(1));
  let past = repeatRows(out.past, n);
  let pos = ids.length;
  let lastRow = (r) => (ids.length - 1) * V; // where each row's logits start in out.logits
  stopRequested = false;
  for (let step = 0; step < s.maxNew && !stopRequested; step++) {
    const tokens = rows.map((row, r) => pick(out.logits, lastRow(r), nVocab, s, random));
    tokens.forEach((t, r) => { rows[r].push(t); if (t === config.eot) ended[r] = true; });
    onStep(tokens);
    if (ended.every(Boolean) || step === s.maxNew - 1) break;
    if (pos < config.block_size) { // one token for every row, over the cache
      out = await forward(tokens.map((t) => [t]), pos, past);
      past = out.past;
      pos += 1;
      lastRow = (r) => r * V;
    } else { // the window is full: its last keep tokens (the newest one included) run again from position 0
      const windows = rows.map((row) => [...ids, ...row].slice(-config.keep));
      out = await forward(windows, 0, emptyPast(n));
      past = out.past;
      pos = config.keep;
      lastRow = (r) => (r * config.keep + config.keep - 1) * V;
    }
    if (step % 4 === 3) await yieldToPage();
  }
  return rows;
}

// Total nats of predicting each window's tokens after the first from those before (windows of at most block_size + 1).
async function score(windows) {
  let nats = 0;
  const V = config.vocab_size;
  for (const w of windows) {
    const { logits } = await forward([w.slice(0, -1)], 0, emptyPast(1));
    for (let j = 0; j < w.length - 1; j++) {
      const o = j * V;
      let top = -Infinity;
      for (let i = 0; i < V; i++) top = Math.max(top, logits[o + i]);
      let sum = 0;
      for (let i = 0; i < V; i++) sum += Math.exp(logits[o + i] - top);
      nats += Math.log(sum) + top - logits[o + w[j + 1]];
    }
  }
  return nats;
}

// The k most likely next tokens after prompt (temperature 1): [{token, p}].
async function nextTokens(prompt, k = 10) {
  const ids = promptIds(prompt);
  const { logits } = await forward([ids], 0, emptyPast(1));
  const o = (ids.length - 1) * config.vocab_size, n = config.n_vocab;
  const best = topK(logits, o, n, k);
  let top = -Infinity, sum = 0;
  for (let i = 0; i < n; i++) top = Math.max(top, logits[o + i]);
  for (let i = 0; i < n; i++) sum += Math.exp(logits[o + i] - top);
  return best.map((i) => ({ token: tokenizer.decode([i]), p: Math.exp(logits[o + i] - top) / sum }));
}

// ---- the page ----

function settings() {
  const num = (id) => Number($(id).value);
  const seed = Number.isFinite(num("seed")) ? Math.trunc(num("seed")) : -1;
  return { maxNew: num("max-new"), temperature: num("temperature"), topK: num("top-k"), topP: num("top-p"), seed };
}

function showText(ids) {
  // the ids up to <|endoftext|>; a character whose bytes are not all here yet (U+FFFD at the end) waits
  const end = ids.indexOf(config.eot);
  return tokenizer.decode(end < 0 ? ids : ids.slice(0, end), { skip_special_tokens: false }).replace(/\uFFFD+$/, "");
}

let chartRequest = 0;
async function drawChart() {
  if (!$("under-the-hood").open || !session) return;
  const mine = ++chartRequest;
  const bars = await nextTokens($("prompt").value);
  if (mine !== chartRequest) return; // a newer prompt's bars are on their way
  $("next-token-chart").replaceChildren(...bars.map(({ token, p }, i) => {
    const row = document.createElement("div");
    row.className = "bar";
    row.innerHTML = `<span class="token"></span><span><span class="fill"></span></span><span class="p"></span>`;
    row.querySelector(".token").textContent = `${i + 1}. ${JSON.stringify(token)}`;
    row.querySelector(".fill").style.width = `${(100 * p / bars[0].p).toFixed(1)}%`;
    row.querySelector(".fill").style.display = "block";
    row.querySelector(".p").textContent = p.toFixed(3);
    return row;
  }));
}

async function onGenerate(event) {
  event?.preventDefault();
  const s = settings(), n = Number($("num-seq").value), prompt = $("prompt").value;
  const boxes = Array.from({ length: n }, (_, i) => {
    const box = document.createElement("textarea");
    box.id = `seq-${i + 1}`;
    box.readOnly = true;
    box.setAttribute("aria-label", `Sequence ${i + 1}`);
    return box;
  });
  $("sequences").replaceChildren(...boxes);
  $("generate").disabled = true;
  $("stop").disabled = false;
  const made = boxes.map(() => []);
  const started = performance.now();
  try {
    await generateIds(promptIds(prompt), n, s, (tokens) => {
      if (window.smallgpt.firstTokenAt === null) window.smallgpt.firstTokenAt = performance.now();
      tokens.forEach((t, r) => { made[r].push(t); boxes[r].value = prompt + showText(made[r]); });
    });
    window.smallgpt.lastRun = { ids: made, ms: performance.now() - started };
  } catch (e) {
    problem(`Generation failed: ${e.message}. Reload the page to try again.`);
  } finally {
    $("generate").disabled = false;
    $("stop").disabled = true;
  }
}

window.smallgpt = {
  ready: null, firstTokenAt: null, lastRun: null,
  encode: (text) => tokenizer.encode(text, { add_special_tokens: false }).ids,
  promptIds, nextTokens, score,
  generate: (prompt, { maxNew = 200, n = 1, temperature = 0, topK = 0, topP = 1, seed = -1 } = {}) =>
    generateIds(promptIds(prompt), n, { maxNew, temperature, topK, topP, seed }),
  config: () => config,
};

for (const input of document.querySelectorAll(".settings input[type=range]")) {
  input.addEventListener("input", () => { document.querySelector(`output[for=${input.id}]`).textContent = input.value; });
}
for (const example of document.querySelectorAll(".example")) {
  example.addEventListener("click", () => { $("prompt").value = example.textContent; drawChart(); });
}
$("controls").addEventListener("submit", onGenerate);
$("stop").addEventListener("click", () => { stopRequested = true; });
$("prompt").addEventListener("input", drawChart);
$("under-the-hood").addEventListener("toggle", drawChart);

window.smallgpt.ready = load().then(() => {
  if (params.has("autorun")) onGenerate();
  return true;
}, (e) => {
  problem(e.message.endsWith(".") ? e.message : `The model could not be loaded (${e.message}); reload the page.`);
  return false;
});
