"""The search page served at `/`: plain HTML, CSS and JavaScript, nothing fetched from elsewhere.

A text box (or an image file) posts to `/search`; results show as thumbnails with caption and
score. `/?q=...` runs that query on load, so a link (or a headless browser) lands on results.
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mmssl search</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 0; background: #f6f6f4; color: #222; }
  header { background: #24323f; color: #fff; padding: 14px 24px; }
  header h1 { font-size: 20px; margin: 0 0 10px 0; font-weight: 600; }
  form { display: flex; gap: 8px; flex-wrap: wrap; align-items: center; }
  input[type=text] { flex: 1 1 320px; font-size: 16px; padding: 8px 10px; border: 0; border-radius: 4px; }
  select, button { font-size: 15px; padding: 7px 12px; border-radius: 4px; border: 0; }
  button { background: #f0a030; color: #222; cursor: pointer; }
  label.file { font-size: 14px; }
  #status { padding: 10px 24px; font-size: 14px; color: #555; min-height: 18px; }
  #status.error { color: #b00020; }
  #results { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr));
             gap: 14px; padding: 0 24px 24px 24px; }
  .result { background: #fff; border-radius: 6px; box-shadow: 0 1px 3px rgba(0,0,0,.15); overflow: hidden; }
  .result img { width: 100%; aspect-ratio: 1 / 1; object-fit: cover; display: block; background: #ddd;
                image-rendering: pixelated; }
  .result .noimg { width: 100%; aspect-ratio: 1 / 1; background: #ddd; display: flex;
                   align-items: center; justify-content: center; color: #888; font-size: 13px; }
  .result .caption { font-size: 13px; padding: 6px 8px 2px 8px; }
  .result .meta { font-size: 12px; color: #777; padding: 0 8px 8px 8px; }
</style>
</head>
<body>
<header>
  <h1>mmssl search</h1>
  <form id="search-form">
    <input type="text" id="query" name="q" placeholder="describe an image, e.g. a red circle" autofocus>
    <select id="k" title="results">
      <option>10</option><option selected>20</option><option>50</option><option>100</option>
    </select>
    <button type="submit">Search</button>
    <label class="file">or search by image: <input type="file" id="image" accept="image/*"></label>
  </form>
</header>
<div id="status"></div>
<div id="results"></div>
<script>
"use strict";
const statusBox = document.getElementById("status");
const resultsBox = document.getElementById("results");

function showStatus(message, isError) {
  statusBox.textContent = message;
  statusBox.className = isError ? "error" : "";
}

function render(results) {
  resultsBox.replaceChildren();
  for (const hit of results) {
    const card = document.createElement("div");
    card.className = "result";
    if (hit.image_url) {
      const img = document.createElement("img");
      img.src = hit.image_url;
      img.alt = hit.caption;
      img.loading = "lazy";
      card.appendChild(img);
    } else {
      const none = document.createElement("div");
      none.className = "noimg";
      none.textContent = "no image";
      card.appendChild(none);
    }
    const caption = document.createElement("div");
    caption.className = "caption";
    caption.textContent = hit.caption || "(no caption)";
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.textContent = "#" + hit.rank + "  score " + hit.score.toFixed(3) + "  key " + hit.key;
    card.append(caption, meta);
    resultsBox.appendChild(card);
  }
}

async function search(body, label) {
  showStatus("searching " + label + " ...", false);
  try {
    const response = await fetch("/search", {
      method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
    const data = await response.json();
    if (!response.ok) { showStatus("error: " + data.error, true); resultsBox.replaceChildren(); return; }
    render(data.results);
    showStatus(data.results.length + " results for " + label + " in " + data.took_ms.toFixed(1) + " ms", false);
  } catch (err) {
    showStatus("error: " + err, true);
  }
}

function k() { return parseInt(document.getElementById("k").value, 10); }

document.getElementById("search-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = document.getElementById("query").value.trim();
  if (!text) { showStatus("type something to search for", true); return; }
  history.replaceState(null, "", "?q=" + encodeURIComponent(text));
  search({text: text, k: k()}, JSON.stringify(text));
});

document.getElementById("image").addEventListener("change", (event) => {
  const file = event.target.files[0];
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => search({image: reader.result.split(",", 2)[1], k: k()}, file.name);
  reader.readAsDataURL(file);
});

const initial = new URLSearchParams(location.search).get("q");
if (initial && initial.trim()) {
  document.getElementById("query").value = initial;
  search({text: initial.trim(), k: k()}, JSON.stringify(initial.trim()));
}
</script>
</body>
</html>
"""
