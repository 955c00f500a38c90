"""The server's `GET /` page: one self-contained HTML file (no CDN; works offline) to try a model.

The form is generated in the browser from the bundle's input features (a text area per text, number and
category fields, a file picker per image). The answer shows each category output's label and its class
probabilities as a bar chart, and a person can send the right label to `POST /feedback`. A URL query
fills the form (`/?text=hello`, keys are the inputs' column names), `&submit=1` sends it on load and
`&feedback=LABEL` then sends that label as feedback (links to share, and the browser test; only where
the server has no API key, so that a link cannot post feedback with a key the tab has saved).

A language model gets its own page (`render_lm_page`): a prompt, max new tokens and temperature, and
the continuation appearing as POST /generate streams it (server-sent events read from `fetch`); then
Good / Bad buttons and a box for a better completion post to /feedback (`?prompt=…&submit=1` and
`&rating=` or `&completion=` drive it from the URL, with the same API-key rule).
"""

from __future__ import annotations

import html
import json
from typing import Any

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__ · largo</title>
<style>
 body{font:15px/1.45 system-ui,sans-serif;max-width:46rem;margin:2rem auto;padding:0 1rem;color:#222}
 h1{font-size:1.3rem} label{display:block;margin:.7rem 0 .2rem;font-weight:600}
 textarea,input[type=text],input[type=number],input[type=password],select{width:100%;box-sizing:border-box;
  padding:.45rem;font:inherit;border:1px solid #bbb;border-radius:4px}
 textarea{min-height:6rem} button{margin-top:.9rem;padding:.5rem 1.1rem;font:inherit;cursor:pointer}
 .type{color:#888;font-weight:400;font-size:.85em} #error{color:#b00020;white-space:pre-wrap}
 .out{margin-top:1.4rem;padding:1rem;border:1px solid #ddd;border-radius:6px}
 .big{font-size:1.5rem;font-weight:700} .row{display:flex;align-items:center;gap:.5rem;margin:.2rem 0}
 .name{width:9rem;overflow:hidden;text-overflow:ellipsis;white-space:nowrap;text-align:right}
 .track{flex:1;background:#eee;border-radius:3px;height:1.1rem}
 .bar{background:#3b7ddd;height:100%;border-radius:3px} .pct{width:4rem;font-variant-numeric:tabular-nums}
 .fb{margin-top:.8rem;display:flex;gap:.5rem;align-items:center} .fb select{width:auto}
 .fb button{margin:0} small{color:#777}
</style></head><body>
<h1>__TITLE__</h1>
<form id="form"><div id="fields"></div><div id="keybox" hidden><label for="apikey">API key</label>
<input id="apikey" type="password" autocomplete="off"></div>
<button type="submit" id="send">Predict</button></form>
<div id="error" role="alert"></div><div id="result" data-state="empty"></div>
<script id="spec" type="application/json">__SPEC__</script>
<script>
"use strict";
const spec = JSON.parse(document.getElementById("spec").textContent);
const $ = (tag, props = {}, ...kids) => { const e = Object.assign(document.createElement(tag), props);
  kids.forEach(k => e.append(k)); return e; };
const fields = document.getElementById("fields"), result = document.getElementById("result");
const errorBox = document.getElementById("error"), keyInput = document.getElementById("apikey");
if (spec.auth) { document.getElementById("keybox").hidden = false;
  keyInput.value = sessionStorage.getItem("largo-key") || ""; }
spec.inputs.forEach((f, i) => {
  const id = "in" + i;
  const kind = $("span", {className: "type", textContent: f.type});
  fields.append($("label", {htmlFor: id}, f.source + " ", kind));
  let el;
  if (f.type === "text") el = $("textarea", {id});
  else if (f.type === "image") el = $("input", {id, type: "file", accept: "image/*"});
  else if (f.type === "number") el = $("input", {id, type: "number", step: "any"});
  else el = $("input", {id, type: "text"});
  el.dataset.source = f.source; el.dataset.type = f.type; fields.append(el);
});
const readImage = file => new Promise((ok, fail) => { const r = new FileReader();
  r.onload = () => ok(String(r.result).split(",")[1]); r.onerror = fail; r.readAsDataURL(file); });
async function record() {
  const rec = {};
  for (const el of fields.querySelectorAll("[data-source]")) {
    const t = el.dataset.type, v = el.value;
    if (t === "image") rec[el.dataset.source] = el.files[0] ? await readImage(el.files[0]) : null;
    else if (t === "number") rec[el.dataset.source] = v === "" ? null : Number(v);
    else if (t === "category") rec[el.dataset.source] = v === "" ? null : v;
    else rec[el.dataset.source] = v;
  }
  return rec;
}
function headers() { const h = {"Content-Type": "application/json"};
  if (spec.auth && keyInput.value) { h.Authorization = "Bearer " + keyInput.value;
    sessionStorage.setItem("largo-key", keyInput.value); }
  return h; }
async function call(path, body) {
  const r = await fetch(path, {method: "POST", headers: headers(), body: JSON.stringify(body)});
  const data = await r.json().catch(() => ({detail: r.statusText}));
  if (!r.ok) { let d = data.detail;
    if (Array.isArray(d)) d = d.map(e => (e.loc || []).join(".") + ": " + e.msg).join("\\n");
    throw new Error(r.status + " " + (typeof d === "string" ? d : JSON.stringify(d))
      + (data.error_id ? " (error id " + data.error_id + ")" : "")); }
  return data;
}
function bars(probs) {
  const box = $("div");
  Object.entries(probs).sort((a, b) => b[1] - a[1]).forEach(([name, p]) => {
    const pct = (100 * p).toFixed(1) + "%";
    box.append($("div", {className: "row"}, $("span", {className: "name", textContent: name, title: name}),
      $("div", {className: "track"}, $("div", {className: "bar", style: "width:" + pct})),
      $("span", {className: "pct", textContent: pct})));
  });
  return box;
}
function feedback(pred, out) {
  const sel = $("select", {id: "truth-" + out.name});
  out.labels.forEach(l =>
    sel.append($("option", {value: l, textContent: l, selected: l === pred[out.name]})));
  const note = $("small"), btn = $("button", {type: "button", textContent: "This is the right label"});
  btn.onclick = async () => { try {
      await call("feedback", {prediction_id: pred.id, output: out.name, label: sel.value});
      note.textContent = "Saved: " + sel.value; note.dataset.saved = sel.value;
    } catch (e) { note.textContent = e.message; } };
  return $("div", {className: "fb"}, sel, btn, note);
}
function show(pred) {
  result.replaceChildren(); result.className = "out";
  for (const out of spec.outputs) {
    const value = pred[out.name];
    result.append($("div", {}, out.name + ": ", $("span", {className: "big", id: "label-" + out.name,
      textContent: typeof value === "number" ? value.toPrecision(5) : value})));
    if (out.labels) { result.append(bars(pred[out.name + "_probabilities"] || {}), feedback(pred, out)); }
  }
  (pred.warnings || []).forEach(w => result.append($("p", {}, $("small", {textContent: w}))));
  result.append($("small", {textContent: "prediction id " + pred.id}));
  result.dataset.state = "done"; result.dataset.label = pred[spec.outputs[0].name];
}
async function submit(ev) {
  if (ev) ev.preventDefault();
  errorBox.textContent = ""; result.dataset.state = "waiting";
  try { show(await call("predict", await record())); }
  catch (e) { errorBox.textContent = e.message; result.dataset.state = "error"; return; }
  const truth = query.get("feedback"), out = spec.outputs.find(o => o.labels);
  if (truth && out && !spec.auth) { document.getElementById("truth-" + out.name).value = truth;
    document.querySelector(".fb button").click(); }
}
const query = new URLSearchParams(location.search);
document.getElementById("form").addEventListener("submit", submit);
for (const el of fields.querySelectorAll("[data-source]"))
  if (el.dataset.type !== "image" && query.has(el.dataset.source)) el.value = query.get(el.dataset.source);
if (query.has("submit")) submit();
</script></body></html>
"""


def render_page(title: str, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]], auth: bool) -> str:
    """The page for a model with these inputs ({name, source, type}) and outputs ({name, type, labels?})."""
    spec = {"inputs": inputs, "outputs": outputs, "auth": auth}
    # inside <script> only "</" could end the element early; \\u003c keeps the JSON valid and inert
    spec_json = json.dumps(spec, ensure_ascii=False).replace("<", "\\u003c")
    return _PAGE.replace("__TITLE__", html.escape(title)).replace("__SPEC__", spec_json)


_LM_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__ · largo</title>
<style>
 body{font:15px/1.45 system-ui,sans-serif;max-width:46rem;margin:2rem auto;padding:0 1rem;color:#222}
 h1{font-size:1.3rem} label{display:block;margin:.7rem 0 .2rem;font-weight:600}
 textarea,input{width:100%;box-sizing:border-box;padding:.45rem;font:inherit;border:1px solid #bbb;
  border-radius:4px} textarea{min-height:6rem} .pair{display:flex;gap:1rem} .pair>div{flex:1}
 button{margin-top:.9rem;padding:.5rem 1.1rem;font:inherit;cursor:pointer}
 #error{color:#b00020;white-space:pre-wrap}
 #out{margin-top:1.4rem;padding:1rem;border:1px solid #ddd;border-radius:6px;white-space:pre-wrap;
  min-height:3rem}
 #out b{font-weight:400;color:#777} small{color:#777}
 #rate button{margin-right:.5rem} #saved{color:#176c2e;margin-left:.5rem}
</style></head><body>
<h1>__TITLE__</h1>
<form id="form"><label for="prompt">Prompt</label><textarea id="prompt"></textarea>
<div class="pair"><div><label for="max">Max new tokens</label>
<input id="max" type="number" min="0" value="100"></div>
<div><label for="temp">Temperature</label><input id="temp" type="number" min="0" step="0.1" value="__TEMP__">
</div>
</div><div id="keybox" hidden><label for="apikey">API key</label>
<input id="apikey" type="password" autocomplete="off"></div>
<button type="submit" id="send">Generate</button></form>
<div id="error" role="alert"></div><div id="out" data-state="empty"></div><small id="stats"></small>
<form id="rate" hidden><label for="completion">Was it good? Or write what it should have said:</label>
<textarea id="completion" placeholder="a better continuation of the prompt (optional)"></textarea>
<button type="button" id="good">Good</button><button type="button" id="bad">Bad</button>
<button type="submit" id="correct">Send correction</button><span id="saved"></span></form>
<script id="spec" type="application/json">__SPEC__</script>
<script>
"use strict";
const spec = JSON.parse(document.getElementById("spec").textContent);
const $ = id => document.getElementById(id), out = $("out"), errorBox = $("error");
$("max").max = spec.limit;
if (spec.auth) { $("keybox").hidden = false; $("apikey").value = sessionStorage.getItem("largo-key") || ""; }
let lastId = null;
function headers(extra) { const h = {"Content-Type": "application/json", ...extra};
  if (spec.auth && $("apikey").value) { h.Authorization = "Bearer " + $("apikey").value;
    sessionStorage.setItem("largo-key", $("apikey").value); }
  return h; }
async function feedback(fb) {
  errorBox.textContent = ""; $("saved").textContent = "";
  try {
    const r = await fetch("feedback", {method: "POST", headers: headers({}),
      body: JSON.stringify({prediction_id: lastId, ...fb})});
    const data = await r.json().catch(() => ({detail: r.statusText}));
    if (!r.ok) throw new Error(message(r, data));
    $("saved").textContent = "Saved: " + (fb.completion !== undefined ? "correction" : fb.rating);
  } catch (e) { errorBox.textContent = e.message; }
}
function message(r, data) { let d = data.detail;
  if (Array.isArray(d)) d = d.map(e => (e.loc || []).join(".") + ": " + e.msg).join("\\n");
  return r.status + " " + (typeof d === "string" ? d : JSON.stringify(d)); }
function finished(data) {  // the "done" event's summary, or the whole JSON answer
  out.dataset.state = "done"; lastId = data.id; $("rate").hidden = false;
  const end = spec.task === "seq2seq" ? "first " : "last ";  // a source keeps its start, a prompt its end
  const cut = data.prompt_truncated ? " (the prompt kept its " + end + data.prompt_tokens + ")" : "";
  $("stats").textContent = data.tokens + " tokens, " + data.finish_reason + ", seed " + data.seed + cut;
}
async function generate(ev) {
  ev.preventDefault(); errorBox.textContent = ""; $("stats").textContent = "";
  const stream = query.get("stream") !== "0";  // ?stream=0: one JSON answer (a headless test waits for it)
  const h = headers(stream ? {Accept: "text/event-stream"} : {});
  $("rate").hidden = true; $("saved").textContent = ""; $("completion").value = ""; lastId = null;
  const body = {prompt: $("prompt").value, max_new_tokens: Number($("max").value),
    temperature: Number($("temp").value), stream};
  out.replaceChildren(Object.assign(document.createElement("b"), {textContent: body.prompt}));
  out.dataset.state = "waiting"; $("send").disabled = true;
  try {
    const r = await fetch("generate", {method: "POST", headers: h, body: JSON.stringify(body)});
    if (!r.ok) throw new Error(message(r, await r.json().catch(() => ({detail: r.statusText}))));
    if (!stream) { const data = await r.json(); out.append(data.text); finished(data); return; }
    const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += value;
      let cut;
      while ((cut = buffer.indexOf("\\n\\n")) >= 0) {
        const block = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
        const kind = (block.match(/^event: (.*)$/m) || [])[1], line = (block.match(/^data: (.*)$/m) || [])[1];
        if (!line) continue;
        const data = JSON.parse(line);
        if (kind === "token") { out.append(data.text); out.dataset.state = "streaming"; }
        else if (kind === "done") finished(data);
        else if (kind === "error") throw new Error(data.detail);
      }
    }
  } catch (e) { errorBox.textContent = e.message; out.dataset.state = "error"; }
  finally { $("send").disabled = false; }
}
$("form").addEventListener("submit", generate);
$("good").addEventListener("click", () => feedback({rating: "good"}));
$("bad").addEventListener("click", () => feedback({rating: "bad"}));
$("rate").addEventListener("submit", ev => { ev.preventDefault();
  if ($("completion").value) feedback({completion: $("completion").value}); });
// ?prompt=...&submit=1 generates at once; &rating=good|bad or &completion=... then sends that feedback,
// but only on a server without an API key: a link must not post feedback with a key the tab has saved
const query = new URLSearchParams(location.search);
if (query.has("prompt")) $("prompt").value = query.get("prompt");
if (query.has("max_new_tokens")) $("max").value = query.get("max_new_tokens");
if (query.has("submit")) generate(new Event("submit")).then(() => {
  if (!lastId || spec.auth) return;
  if (query.has("completion")) return feedback({completion: query.get("completion")});
  if (query.has("rating")) return feedback({rating: query.get("rating")}); });
</script></body></html>
"""


def render_lm_page(
    title: str, context: int, limit: int, auth: bool, temperature: float = 0.8, task: str = "lm"
) -> str:
    """The page for a language model (or a seq2seq model): type a prompt, watch the output stream in."""
    spec = {"context": context, "limit": limit, "auth": auth, "task": task}
    spec_json = json.dumps(spec, ensure_ascii=False).replace("<", "\\u003c")
    page = _LM_PAGE.replace("__TITLE__", html.escape(title)).replace("__SPEC__", spec_json)
    return page.replace("__TEMP__", f"{temperature:g}")
