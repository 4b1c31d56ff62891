"""The one-page UI served at ``/``: plain HTML and JavaScript, no build step, nothing loaded from elsewhere.

It submits ``POST /v1/images/generations`` with ``"wait": false``, follows ``/v1/jobs/{id}/events`` (read with
``fetch`` rather than ``EventSource``, so the optional API key travels in the ``Authorization`` header) for the
progress bar and the previews, then shows the image from ``GET /v1/jobs/{id}``. ``document.body.dataset.state``
says where it is (idle, running, done, error): the headless-browser test waits on it.
"""

INDEX_HTML = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>dreamfuse</title>
<style>
  body { font: 15px/1.4 system-ui, sans-serif; margin: 0; background: #f4f4f6; color: #222; }
  main { max-width: 980px; margin: 0 auto; padding: 16px; display: flex; gap: 20px; flex-wrap: wrap; }
  form { flex: 1 1 320px; display: grid; grid-template-columns: auto 1fr; gap: 8px 10px; align-content: start; }
  form textarea { grid-column: 1 / 3; min-height: 70px; font: inherit; }
  form label { align-self: center; }
  form input { font: inherit; padding: 3px 5px; }
  .buttons { grid-column: 1 / 3; display: flex; gap: 8px; }
  button { font: inherit; padding: 6px 14px; }
  section { flex: 1 1 420px; }
  progress { width: 100%; height: 14px; }
  #status { min-height: 1.4em; color: #555; }
  #status.error { color: #b00020; }
  .images { display: flex; gap: 12px; align-items: flex-start; flex-wrap: wrap; }
  figure { margin: 0; }
  figcaption { font-size: 12px; color: #666; }
  img { display: block; image-rendering: pixelated; background: #ddd; max-width: 100%; }
  #preview { opacity: 0.85; }
</style>
</head>
<body data-state="idle">
<main>
  <form id="form" autocomplete="off">
    <textarea id="prompt" placeholder="a photo of a cat" required>a photo of a cat</textarea>
    <label for="negative">negative</label><input id="negative" placeholder="(none)">
    <label for="width">width</label><input id="width" type="number" min="8" step="8" placeholder="model's">
    <label for="height">height</label><input id="height" type="number" min="8" step="8" placeholder="model's">
    <label for="steps">steps</label><input id="steps" type="number" min="1" value="20">
    <label for="guidance">guidance</label><input id="guidance" type="number" min="0" step="0.5" value="7.5">
    <label for="seed">seed</label><input id="seed" type="number" min="0" placeholder="random">
    <label for="apikey">API key</label><input id="apikey" type="password" placeholder="(if the server needs one)">
    <div class="buttons"><button id="go" type="submit">Generate</button>
      <button id="cancel" type="button" disabled>Cancel</button></div>
  </form>
  <section>
    <progress id="progress" max="1" value="0"></progress>
    <div id="status">ready</div>
    <div class="images">
      <figure id="preview-box" hidden><img id="preview" alt="preview"><figcaption>preview</figcaption></figure>
      <figure id="result-box" hidden><img id="result" alt="result"><figcaption id="caption"></figcaption></figure>
    </div>
  </section>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let current = null;  // {id, abort}

function setState(state, text, isError) {
  document.body.dataset.state = state;
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = $("apikey").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function errorText(body, status) {
  if (body && body.error && body.error.message) return body.error.message;  // the OpenAI routes' error object
  if (body && Array.isArray(body.detail)) {
    return body.detail.map((d) => (d.loc || []).slice(1).join(".") + ": " + d.msg).join("; ");
  }
  if (body && body.detail) return typeof body.detail === "string" ? body.detail : (body.detail.error || status);
  return "HTTP " + status;
}

function number(id) {
  const v = $(id).value.trim();
  return v === "" ? undefined : Number(v);
}

async function readEvents(id, signal, onEvent) {
  const res = await fetch("/v1/jobs/" + id + "/events", {headers: headers(false), signal});
  if (!res.ok) throw new Error(errorText(await res.json().catch(() => null), res.status));
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5)).join("\n");
      if (data && onEvent(JSON.parse(data)) === false) return;
    }
  }
}

async function generate(ev) {
  ev.preventDefault();
  if (current) return;
  const body = {prompt: $("prompt").value, steps: number("steps"), guidance_scale: number("guidance"),
                width: number("width"), height: number("height"), seed: number("seed"), wait: false};
  const negative = $("negative").value;
  if (negative) body.negative_prompt = negative;
  const abort = new AbortController();
  $("go").disabled = true;
  $("cancel").disabled = false;
  $("progress").value = 0;
  $("preview-box").hidden = true;
  setState("running", "submitting...");
  try {
    const res = await fetch("/v1/images/generations", {method: "POST", headers: headers(true),
                                                       body: JSON.stringify(body), signal: abort.signal});
    const job = await res.json().catch(() => null);
    if (res.status !== 202) throw new Error(errorText(job, res.status));
    current = {id: job.id, abort};
    let end = null;
    await readEvents(job.id, abort.signal, (e) => {
      if (e.type === "queued") setState("running", "queued (position " + e.position + ")");
      else if (e.type === "started") setState("running", "started");
      else if (e.type === "step") {
        $("progress").max = e.steps;
        $("progress").value = e.step;
        setState("running", "step " + e.step + " of " + e.steps);
      } else if (e.type === "preview") {
        $("preview").src = "data:image/png;base64," + e.png_b64;
        $("preview-box").hidden = false;
      } else { end = e; return false; }
    });
    if (!end) throw new Error("the event stream ended early");
    if (end.type !== "done") throw new Error(end.type + ": " + (end.reason || ""));
    const done = await fetch("/v1/jobs/" + job.id, {headers: headers(false)});
    const info = await done.json();
    if (!done.ok) throw new Error(errorText(info, done.status));
    const img = $("result");
    await new Promise((resolve, reject) => {
      img.onload = resolve;
      img.onerror = () => reject(new Error("the image did not load"));
      img.src = "data:image/png;base64," + info.data[0].b64_json;
    });
    $("result-box").hidden = false;
    $("preview-box").hidden = true;
    $("progress").value = $("progress").max;
    $("caption").textContent = img.naturalWidth + "x" + img.naturalHeight + ", seed " + info.data[0].seed;
    setState("done", "done: seed " + info.data[0].seed);
  } catch (err) {
    if (abort.signal.aborted) setState("idle", "cancelled");
    else setState("error", String(err.message || err), true);
  } finally {
    current = null;
    $("go").disabled = false;
    $("cancel").disabled = true;
  }
}

async function cancel() {
  if (!current) return;
  const {id, abort} = current;
  await fetch("/v1/jobs/" + id, {method: "DELETE", headers: headers(false)}).catch(() => null);
  abort.abort();
}

$("form").addEventListener("submit", generate);
$("cancel").addEventListener("click", cancel);
</script>
</body>
</html>
"""
