// The stn demo page: plain JavaScript, no framework, no build step, nothing fetched but this server's API.
// Each image is one POST /v1/rectify (format=json); the card shows the upload with the sampled region
// (the output's border through input_px_from_output_px; for TPS the warped control grid), the result,
// and the numbers. Errors are the problem+json `detail`; a 503 with Retry-After is retried after it.
'use strict';
(() => {
  const KEY_STORE = 'stn.apiKey';          // sessionStorage: kept in this tab only
  const MAX_RETRIES = 10;                  // 503 + Retry-After: at most this many retries per request
  const MAX_RETRY_WAIT_S = 30;             // and at most this long a wait each
  const PARALLEL = 3;                      // images in flight at once (the server batches them)
  const BOX = 380;                         // px: the longer side of each picture on screen
  const $ = (sel, root = document) => root.querySelector(sel);
  const models = new Map();                // name -> /v1/models entry
  let limits = null;                       // /v1/models `limits`: what one upload may be
  const FIT_MARGIN = 0.98;                 // a photo over the pixel limit is downscaled to this share of it
  const FIT_QUALITY = 0.92;                // as a JPEG of this quality

  class ApiError extends Error {
    constructor(status, detail) { super(detail); this.status = status; this.detail = detail; }
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  function retryAfterSeconds(value) {      // RFC 9110: delay-seconds or an HTTP-date
    if (value === null) return null;
    let s = /^\s*\d+\s*$/.test(value) ? Number(value) : (Date.parse(value) - Date.now()) / 1000;
    if (!Number.isFinite(s)) return null;
    return Math.min(MAX_RETRY_WAIT_S, Math.max(0, s));
  }

  async function problemDetail(response) { // the sentence a problem+json error carries
    const text = await response.text();
    try {
      const body = JSON.parse(text);
      if (body && typeof body.detail === 'string' && body.detail) return body.detail;
      if (body && body.title) return body.title;
    } catch (e) { /* not JSON: fall through */ }
    return text.trim().slice(0, 300) || `HTTP ${response.status} ${response.statusText}`;
  }

  // fetch with the API key; problem+json errors become ApiError(detail); 503 + Retry-After is retried.
  async function api(path, options = {}, onRetry = null) {
    for (let attempt = 0; ; attempt++) {
      const headers = new Headers(options.headers || {});
      const key = sessionStorage.getItem(KEY_STORE);
      if (key) headers.set('X-API-Key', key);
      let response;
      try {
        response = await fetch(path, { ...options, headers });
      } catch (e) {
        throw new ApiError(0, `the server could not be reached (${e.message})`);
      }
      if (response.ok) return response;
      const wait = retryAfterSeconds(response.headers.get('Retry-After'));
      const detail = await problemDetail(response);
      if (response.status === 503 && wait !== null && attempt < MAX_RETRIES) {
        if (onRetry) onRetry(detail, wait, attempt + 1);
        await sleep(wait * 1000);
        continue;
      }
      throw new ApiError(response.status, detail);
    }
  }

  function notice(text) {
    const el = $('#notice');
    el.textContent = text || '';
    el.hidden = !text;
  }

  // ---- models ------------------------------------------------------------------------------------
  function describe(m) {
    if (m.description) return m.description;
    const size = (hw) => `${hw[1]}×${hw[0]}`;
    const parts = [`${m.model_name || m.name} ${m.version ? 'v' + m.version : ''}: ${/^[aeiou]/.test(m.transform) ? 'an' : 'a'} ${m.transform} transformer`
      + (m.transform === 'tps' && m.tps_grid ? ` (${m.tps_grid[0]}×${m.tps_grid[1]} control grid)` : '')];
    parts.push(`localiser sees ${size(m.loc_size)}`, `default output ${size(m.output_size)}`);
    if (m.dataset) parts.push(`trained on ${m.dataset}`);
    const metrics = Object.entries(m.metrics || {})
      .filter(([k, v]) => typeof v === 'number' && /error|accuracy|corner/i.test(k)).slice(0, 4)
      .map(([k, v]) => `${k.replace(/_/g, ' ')} ${Number(v.toPrecision(4))}`);
    if (metrics.length) parts.push(metrics.join(', '));
    return parts.join('; ') + '.';
  }

  function showModel() {
    const m = models.get($('#model').value);
    $('#model-description').textContent = m ? describe(m) : '';
    $('#width').placeholder = m ? m.output_size[1] : 'width';
    $('#height').placeholder = m ? m.output_size[0] : 'height';
  }

  async function loadModels() {
    const select = $('#model');
    $('#key-form').classList.remove('needs-key');
    try {
      const body = await (await api('v1/models', {}, (detail, wait) => notice(`${detail} (retrying in ${wait} s)`))).json();
      limits = body.limits || null;
      models.clear();
      select.replaceChildren();
      for (const m of body.models) {
        models.set(m.name, m);
        select.append(new Option(`${m.name} (${m.transform})${m.default ? ', default' : ''}`, m.name, m.default, m.default));
      }
      for (const f of body.failed || []) {
        const o = new Option(`${f.name}: failed to load`, f.name);
        o.disabled = true;
        o.title = f.reason;
        select.append(o);
      }
      select.disabled = models.size === 0;
      notice(models.size ? '' : 'No model is loaded on this server (see /readyz).');
      document.body.dataset.models = 'loaded';
    } catch (e) {
      select.replaceChildren(new Option('(no models)', ''));
      select.disabled = true;
      if (e.status === 401) {
        $('#key-form').classList.add('needs-key');
        notice(`${e.detail}. Type the key in the API key field above.`);
      } else {
        notice(`Could not list the models: ${e.detail}`);
      }
      document.body.dataset.models = 'error';
    }
    showModel();
  }

  // ---- geometry ------------------------------------------------------------------------------------
  // Output pixel (x, y) -> input pixel, through a 3x3 matrix (homogeneous divide).
  function mapPoint(m, x, y) {
    const z = m[2][0] * x + m[2][1] * y + m[2][2];
    return [(m[0][0] * x + m[0][1] * y + m[0][2]) / z, (m[1][0] * x + m[1][1] * y + m[1][2]) / z];
  }

  // The outer corners of the output's pixel grid (top-left, top-right, bottom-right, bottom-left).
  const outputCorners = (w, h) => [[-0.5, -0.5], [w - 0.5, -0.5], [w - 0.5, h - 0.5], [-0.5, h - 0.5]];

  function tpsGrid(result, model) {       // [rows, cols] of the TPS control grid
    if (model && model.tps_grid) return model.tps_grid;
    const pts = result.target_points_px;
    let cols = 1;
    while (cols < pts.length && pts[cols][1] === pts[0][1]) cols++;
    return [pts.length / cols, cols];
  }

  const SVG = 'http://www.w3.org/2000/svg';
  function svgEl(name, attrs) {
    const el = document.createElementNS(SVG, name);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
    return el;
  }
  const pointsAttr = (pts) => pts.map((p) => `${p[0]},${p[1]}`).join(' ');

  // Draw the sampled region on the overlay, in input pixel coordinates (pixel centres at integers).
  function drawRegion(svg, result, model) {
    const W = result.input_width, H = result.input_height;
    svg.setAttribute('viewBox', `-0.5 -0.5 ${W} ${H}`);
    svg.replaceChildren();
    let corners;
    if (result.input_px_from_output_px) {
      corners = outputCorners(result.width, result.height).map(([x, y]) => mapPoint(result.input_px_from_output_px, x, y));
    } else {                              // TPS: the control grid's outer points are the output's corners
      const [rows, cols] = tpsGrid(result, model);
      const src = result.source_points_px;
      const at = (r, c) => src[r * cols + c];
      for (let r = 0; r < rows; r++) {
        svg.append(svgEl('polyline', { class: 'grid', points: pointsAttr([...Array(cols).keys()].map((c) => at(r, c))) }));
      }
      for (let c = 0; c < cols; c++) {
        svg.append(svgEl('polyline', { class: 'grid', points: pointsAttr([...Array(rows).keys()].map((r) => at(r, c))) }));
      }
      corners = [at(0, 0), at(0, cols - 1), at(rows - 1, cols - 1), at(rows - 1, 0)];
    }
    padStage(svg.parentElement, corners.concat(result.source_points_px || []), W, H);
    svg.append(svgEl('polygon', { class: 'region', points: pointsAttr(corners), 'data-corners': JSON.stringify(corners) }));
    svg.append(svgEl('circle', { class: 'corner', cx: corners[0][0], cy: corners[0][1], r: Math.max(W, H) / 80 }));
  }

  // Room around the picture for the parts of the region outside the image (up to MAX_PAD px a side).
  const MAX_PAD = 90;
  function padStage(stage, points, W, H) {
    const scale = parseFloat(stage.querySelector('img').style.width) / W;
    const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
    const pad = (v) => `${Math.round(Math.min(MAX_PAD, Math.max(0, v * scale)) + 6)}px`;  // + room for the corner mark
    stage.style.margin = [pad(-0.5 - Math.min(...ys)), pad(Math.max(...xs) - (W - 0.5)),
      pad(Math.max(...ys) - (H - 0.5)), pad(-0.5 - Math.min(...xs))].join(' ');
  }

  // ---- cards -------------------------------------------------------------------------------------
  function fitOnScreen(img, w, h) {
    const scale = Math.min(BOX / w, BOX / h);
    img.style.width = `${w * scale}px`;
    img.style.height = `${h * scale}px`;
    img.classList.toggle('pixelated', scale > 2);
  }

  function setState(card, state, text) {
    card.dataset.state = state;
    $('.status', card).textContent = text;
  }

  function showError(card, detail) {
    const el = $('.error', card);
    el.textContent = detail;
    el.hidden = false;
    $('.views', card).hidden = true;
    setState(card, 'error', 'failed');
  }

  function newCard(file) {
    const card = $('#card').content.firstElementChild.cloneNode(true);
    card.dataset.filename = file.name;
    $('.name', card).textContent = file.name;
    const img = $('.upload', card);
    img.src = URL.createObjectURL(file);
    img.addEventListener('load', () => {
      if (!img.style.width) fitOnScreen(img, img.naturalWidth, img.naturalHeight);
    }, { once: true });
    $('.copy', card).addEventListener('click', () => copyNumbers(card));
    return card;
  }

  function numbersText(result) {          // the transform as JSON, one matrix row per line
    const keys = ['theta', 'input_px_from_output_px', 'output_px_from_input_px', 'control_points',
      'source_points_px', 'target_points_px'].filter((k) => k in result);
    const entries = keys.map((k) => `  ${JSON.stringify(k)}: [\n${result[k].map((row) => '    ' + JSON.stringify(row)).join(',\n')}\n  ]`);
    return `{\n${entries.join(',\n')}\n}\n`;
  }

  async function copyNumbers(card) {
    const pre = $('.matrices', card);
    const button = $('.copy', card);
    try {
      await navigator.clipboard.writeText(pre.textContent);
    } catch (e) {                         // no clipboard API (e.g. a plain-http host): select and copy
      const range = document.createRange();
      range.selectNodeContents(pre);
      getSelection().removeAllRanges();
      getSelection().addRange(range);
      document.execCommand('copy');
    }
    button.textContent = 'copied';
    setTimeout(() => { button.textContent = 'copy'; }, 1500);
  }

  function base64Blob(b64, type) {
    const bytes = Uint8Array.from(atob(b64), (ch) => ch.charCodeAt(0));
    return new Blob([bytes], { type });
  }

  function showResult(card, body, model) {
    const result = body.results[0];
    card.dataset.model = body.model;
    const W = result.input_width, H = result.input_height;
    const upload = $('.upload', card);
    fitOnScreen(upload, W, H);
    drawRegion($('.overlay', card), result, model);
    $('.input-caption', card).textContent = `uploaded ${W}×${H}, with the region the transformer sampled`;
    const checkOrientation = () => {
      if (upload.naturalWidth && (upload.naturalWidth !== W || upload.naturalHeight !== H)) {
        $('.input-caption', card).textContent += ` (the browser shows it as ${upload.naturalWidth}×${upload.naturalHeight}: `
          + 'its EXIF orientation was read differently, so the region may not line up)';
      }
    };
    if (upload.complete) checkOrientation(); else upload.addEventListener('load', checkOrientation, { once: true });

    const url = URL.createObjectURL(base64Blob(result.image, 'image/png'));
    const out = $('.result', card);
    fitOnScreen(out, result.width, result.height);
    out.src = url;
    $('.output-caption', card).textContent = `rectified ${result.width}×${result.height} (${body.model})`;
    const link = $('.download', card);
    link.href = url;
    link.download = `${result.filename.replace(/\.[^./]*$/, '') || 'image'}-rectified.png`;
    link.textContent = 'download PNG';
    link.hidden = false;
    $('.matrices', card).textContent = numbersText(result);
    $('.numbers', card).hidden = false;
  }

  // A photo over the server's pixel or byte limit (phone cameras write 48 MP and more) is downscaled here,
  // upright (its EXIF orientation applied), as a JPEG, rather than sent to be refused with 413. The card then
  // shows what was sent. Anything the browser cannot decode goes as it is: the server says what it is.
  async function fitToLimits(file, card) {
    if (!limits) return file;
    let bitmap;
    try {
      bitmap = await createImageBitmap(file, { imageOrientation: 'from-image' });
    } catch (e) {
      return file;
    }
    const W = bitmap.width, H = bitmap.height;
    try {
      if (W * H <= limits.max_image_pixels && file.size <= limits.max_upload_bytes) return file;
      setState(card, 'pending', 'downscaling…');
      let scale = Math.min(1, Math.sqrt(FIT_MARGIN * limits.max_image_pixels / (W * H)));
      for (let attempt = 0; attempt < 6; attempt++, scale *= 0.8) {  // smaller until the JPEG fits the bytes too
        const w = Math.max(1, Math.floor(W * scale)), h = Math.max(1, Math.floor(H * scale));
        const canvas = document.createElement('canvas');
        canvas.width = w;
        canvas.height = h;
        const ctx = canvas.getContext('2d');
        ctx.fillStyle = '#fff';             // transparency on white, as the server composites it
        ctx.fillRect(0, 0, w, h);
        ctx.drawImage(bitmap, 0, 0, w, h);
        const blob = await new Promise((resolve) => canvas.toBlob(resolve, 'image/jpeg', FIT_QUALITY));
        canvas.width = canvas.height = 0;   // its pixels are not needed any more
        if (blob && blob.size <= limits.max_upload_bytes) {
          card.dataset.downscaled = `${W}x${H}`;
          $('.upload', card).src = URL.createObjectURL(blob);  // the overlay is drawn on what was sent
          card.fitNote = ` (downscaled here from ${W}×${H}: the server takes at most `
            + `${limits.max_image_pixels.toLocaleString('en')} pixels and ${limits.max_upload_bytes.toLocaleString('en')} bytes)`;
          return new File([blob], file.name, { type: 'image/jpeg' });
        }
      }
      return file;                          // it does not fit: the server's 413 says why
    } finally {
      bitmap.close();
    }
  }

  async function rectifyOne(file, card) {
    const name = $('#model').value;
    const params = new URLSearchParams({ format: 'json' });
    if (name) params.set('model', name);
    const w = $('#width').value.trim(), h = $('#height').value.trim();
    if (w || h) params.set('size', `${w}x${h}`);  // the server checks it and says what is wrong
    const sent = await fitToLimits(file, card);
    const form = new FormData();
    form.append('file', sent, file.name);
    setState(card, 'pending', 'rectifying…');
    try {
      const response = await api(`v1/rectify?${params}`, { method: 'POST', body: form }, (detail, wait, n) => {
        setState(card, 'retrying', `server busy: ${detail} (retry ${n} in ${wait} s)`);
      });
      const body = await response.json();
      showResult(card, body, models.get(body.model));
      if (card.fitNote) $('.input-caption', card).textContent += card.fitNote;
      setState(card, 'done', `done (${body.model})`);
    } catch (e) {
      showError(card, e instanceof ApiError ? e.detail : `the page failed: ${e.message}`);
    }
  }

  async function processFiles(files) {
    const jobs = [...files].map((file) => ({ file, card: newCard(file) }));
    if (!jobs.length) return;
    const fragment = document.createDocumentFragment();
    jobs.forEach((j) => fragment.append(j.card));
    $('#results').prepend(fragment);
    let next = 0;
    const worker = async () => {
      while (next < jobs.length) {
        const job = jobs[next++];
        await rectifyOne(job.file, job.card);
      }
    };
    await Promise.all(Array.from({ length: Math.min(PARALLEL, jobs.length) }, worker));
  }

  // ---- wiring ------------------------------------------------------------------------------------
  async function offerSample() {
    try {
      const r = await fetch('sample.jpg', { method: 'HEAD' });
      $('#sample').hidden = !r.ok;
    } catch (e) {
      $('#sample').hidden = true;
    }
  }

  async function useSample() {
    try {
      const r = await fetch('sample.jpg');
      if (!r.ok) throw new ApiError(r.status, await problemDetail(r));
      await processFiles([new File([await r.blob()], 'sample.jpg', { type: 'image/jpeg' })]);
    } catch (e) {
      notice(`The sample photo could not be loaded: ${e.detail || e.message}`);
    }
  }

  function init() {
    const keyInput = $('#api-key');
    keyInput.value = sessionStorage.getItem(KEY_STORE) || '';
    $('#key-form').addEventListener('submit', (ev) => {
      ev.preventDefault();
      const key = keyInput.value.trim();
      if (key) sessionStorage.setItem(KEY_STORE, key); else sessionStorage.removeItem(KEY_STORE);
      loadModels();
    });
    $('#model').addEventListener('change', showModel);
    $('#files').addEventListener('change', (ev) => {
      processFiles(ev.target.files);
      ev.target.value = '';               // choosing the same file again works
    });
    $('#sample').addEventListener('click', useSample);
    const drop = $('#drop');
    document.addEventListener('dragover', (ev) => { ev.preventDefault(); drop.classList.add('over'); });
    document.addEventListener('dragleave', (ev) => { if (!ev.relatedTarget) drop.classList.remove('over'); });
    document.addEventListener('drop', (ev) => {
      ev.preventDefault();
      drop.classList.remove('over');
      processFiles(ev.dataTransfer ? ev.dataTransfer.files : []);  // the server says what it cannot read
    });
    offerSample();
    loadModels();
  }

  init();
})();
