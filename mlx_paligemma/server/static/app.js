// The page: pick or drop an image, run a task against this server's API, stream the answer,
// and draw boxes and masks over the image. Plain JavaScript, no build step, nothing fetched
// from elsewhere. State for tests and scripts: body[data-state] (idle, running, done, error),
// window.paligemma (the last answer's objects), #objects li[data-box] (one per object).

"use strict";

// the palette of the command line's drawings (mlx_paligemma/detection.py), one colour per label
const PALETTE = [[230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48], [145, 30, 180], [70, 240, 240],
  [240, 50, 230], [210, 245, 60], [0, 128, 128], [170, 110, 40], [128, 0, 0], [0, 0, 128]];
const ARGUMENT = {
  caption: null, describe: null, ocr: null,
  answer: "question, e.g. what is on the table?",
  detect: "things, e.g. cat ; dog",
  segment: "things, e.g. cat ; dog",
  prompt: "any prompt, e.g. caption es",
};

const $ = (id) => document.getElementById(id);
const page = { image: null, dataUrl: null, controller: null };
window.paligemma = { objects: [], text: "", error: null };

function setState(state, status) {
  document.body.dataset.state = state;
  if (status !== undefined) $("status").textContent = status;
  const running = state === "running";
  $("run").disabled = running;
  $("stop").disabled = !running;
}

function colourOf(label, colours) {
  if (!colours.has(label)) colours.set(label, PALETTE[colours.size % PALETTE.length]);
  return colours.get(label);
}

// --- the image -------------------------------------------------------------------------------

function showImage(file) {
  if (!file || !file.type.startsWith("image/")) {
    setState("error", "that is not an image file");
    return;
  }
  const reader = new FileReader();
  reader.onload = () => {
    const img = new Image();
    img.onload = () => {
      page.image = img;
      page.dataUrl = reader.result;
      window.paligemma.objects = [];
      $("objects").replaceChildren();
      draw([]);
      $("drop-text").hidden = true;
      $("canvas").hidden = false;
      setState("idle", `${img.naturalWidth} x ${img.naturalHeight} px`);
    };
    img.onerror = () => setState("error", "the browser cannot read this image");
    img.src = reader.result;
  };
  reader.readAsDataURL(file);
}

// the canvas holds the image at its own size (CSS scales it to fit), so boxes in image pixels
// are canvas pixels
function draw(objects) {
  const canvas = $("canvas"), img = page.image;
  if (!img) return;
  canvas.width = img.naturalWidth;
  canvas.height = img.naturalHeight;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0);
  const line = Math.max(2, Math.round(Math.min(canvas.width, canvas.height) / 200));
  const masks = objects.filter((o) => o.mask);
  if (masks.length) {
    const layer = document.createElement("canvas");
    layer.width = canvas.width;
    layer.height = canvas.height;
    const lctx = layer.getContext("2d");
    const pixels = lctx.createImageData(canvas.width, canvas.height);
    for (const o of masks) paintMask(pixels, o.mask, o.colour);
    lctx.putImageData(pixels, 0, 0);
    ctx.globalAlpha = 0.45;
    ctx.drawImage(layer, 0, 0);
    ctx.globalAlpha = 1;
  }
  ctx.font = `${Math.max(12, line * 6)}px system-ui, sans-serif`;
  ctx.textBaseline = "top";
  for (const o of objects) {
    const [x0, y0, x1, y1] = o.box;
    const rgb = `rgb(${o.colour.join(",")})`;
    ctx.strokeStyle = rgb;
    ctx.lineWidth = line;
    // a box of no width or height (a random model gives those) is still drawn, a few pixels wide
    const w = Math.max(x1 - x0, 2 * line), h = Math.max(y1 - y0, 2 * line);
    ctx.strokeRect(x0 + line / 2, y0 + line / 2, w - line, h - line);
    if (o.label) {
      const tw = ctx.measureText(o.label).width + 2 * line;
      const th = Math.max(12, line * 6) + line;
      const ty = y0 >= th ? y0 - th : y0;
      ctx.fillStyle = rgb;
      ctx.fillRect(x0, ty, tw, th);
      ctx.fillStyle = "#fff";
      ctx.fillText(o.label, x0 + line, ty + line / 2);
    }
  }
}

// COCO's compressed RLE (pycocotools' rleFrString), column-major runs of 0s then 1s
function rleCounts(s) {
  const counts = [];
  let p = 0;
  while (p < s.length) {
    let x = 0, k = 0, more = true;
    while (more) {
      const c = s.charCodeAt(p) - 48;
      x |= (c & 0x1f) << (5 * k);
      more = (c & 0x20) !== 0;
      p++;
      k++;
      if (!more && (c & 0x10)) x |= -1 << (5 * k);
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    counts.push(x);
  }
  return counts;
}

function paintMask(pixels, rle, colour) {
  const [h, w] = rle.size;
  if (w !== pixels.width || h !== pixels.height) return;
  let i = 0, on = false;
  for (const run of rleCounts(rle.counts)) {
    if (on) {
      for (let j = i; j < i + run; j++) {
        const x = Math.floor(j / h), y = j % h, at = 4 * (y * w + x);
        pixels.data[at] = colour[0];
        pixels.data[at + 1] = colour[1];
        pixels.data[at + 2] = colour[2];
        pixels.data[at + 3] = 255;
      }
    }
    i += run;
    on = !on;
  }
}

function listObjects(objects) {
  const items = objects.map((o) => {
    const li = document.createElement("li");
    li.textContent = (o.label || "(no label)") + (o.mask ? ` (${o.area} px)` : "");
    li.style.background = `rgb(${o.colour.join(",")})`;
    li.dataset.box = o.box.map((v) => v.toFixed(1)).join(",");
    li.dataset.colour = o.colour.join(",");
    return li;
  });
  $("objects").replaceChildren(...items);
}

// --- the requests ----------------------------------------------------------------------------

function settings() {
  const number = (id) => Number($(id).value);
  return { max_tokens: number("max-tokens"), temperature: number("temperature"), top_p: number("top-p"),
           seed: number("seed") };
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function prompt(task) {
  const arg = $("argument").value.trim(), lang = $("lang").value.trim() || "en";
  if (task === "caption" || task === "describe") return `${task} ${lang}`;
  if (task === "ocr") return "ocr";
  if (task === "answer") return `answer ${lang} ${arg}`;
  return arg;
}

async function failure(response) {
  try {
    const body = await response.json();
    return `${response.status}: ${body.error.message}`;
  } catch (e) {
    return `${response.status} ${response.statusText}`;
  }
}

async function chat(task, signal) {
  const body = { model: "paligemma", stream: true, stream_options: { include_usage: true }, ...settings(),
                 messages: [{ role: "user", content: [{ type: "text", text: prompt(task) },
                                                      { type: "image_url", image_url: { url: page.dataUrl } }] }] };
  const response = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
  if (!response.ok) throw new Error(await failure(response));
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buffer = "", usage = null, finish = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return { usage, finish };
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          if (choice.delta && choice.delta.content) {
            window.paligemma.text += choice.delta.content;
            $("answer").textContent = window.paligemma.text;
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    }
  }
  return { usage, finish };
}

async function objects(task, signal) {
  const body = { image: page.dataUrl, objects: $("argument").value, ...settings() };
  const response = await fetch(`/v1/${task}`, { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
  if (!response.ok) throw new Error(await failure(response));
  const out = await response.json();
  const colours = new Map();
  const found = [
    ...(out.segments || []).map((s) => ({ label: s.label, box: s.box, mask: s.mask, area: s.area })),
    ...(out.detections || []).map((d) => ({ label: d.label, box: d.box })),
  ];
  for (const o of found) o.colour = colourOf(o.label, colours);
  window.paligemma.text = out.text;
  window.paligemma.objects = found;
  $("answer").textContent = out.text;
  listObjects(found);
  draw(found);
  return { usage: out.usage, finish: out.finish_reason, count: found.length };
}

async function run(event) {
  event.preventDefault();
  if (!page.image) {
    setState("error", "pick an image first");
    return;
  }
  const task = $("task").value;
  page.controller = new AbortController();
  window.paligemma = { objects: [], text: "", error: null };
  $("answer").textContent = "";
  $("objects").replaceChildren();
  draw([]);
  setState("running", "running...");
  const start = performance.now();
  try {
    const out = (task === "detect" || task === "segment")
      ? await objects(task, page.controller.signal)
      : await chat(task, page.controller.signal);
    const seconds = (performance.now() - start) / 1000;
    const tokens = out.usage ? out.usage.completion_tokens : 0;
    const found = out.count !== undefined ? `, ${out.count} object${out.count === 1 ? "" : "s"}` : "";
    setState("done", `${tokens} tokens in ${seconds.toFixed(1)} s${found} (finish: ${out.finish})`);
  } catch (e) {
    const stopped = e.name === "AbortError";
    window.paligemma.error = stopped ? null : String(e.message || e);
    setState(stopped ? "done" : "error", stopped ? "stopped" : e.message || String(e));
  } finally {
    page.controller = null;
  }
}

function taskChanged() {
  const hint = ARGUMENT[$("task").value];
  $("argument-label").hidden = hint === null;
  $("argument").placeholder = hint || "";
}

async function connect() {
  try {
    const health = await (await fetch("/health")).json();
    $("model").textContent = `${health.model} on ${health.backend} (${health.dtype})`;
    $("demo-note").hidden = !health.demo;
  } catch (e) {
    $("model").textContent = "the server does not answer";
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => showImage(e.target.files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    showImage(e.dataTransfer.files[0]);
  });
  $("task").addEventListener("change", taskChanged);
  $("form").addEventListener("submit", run);
  $("stop").addEventListener("click", () => page.controller && page.controller.abort());
  taskChanged();
  connect();
});
