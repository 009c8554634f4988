// The demo storefront: plain JavaScript against the service's own JSON API.
// Every shown page is reported as impressions, every click and add-to-cart as an event;
// the page then asks again, so the effect of each event on the next results is visible.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  session: sessionStorage.getItem("instantrec-session") || newSessionId(),
  query: null,          // the last query searched (null = browsing the session's interest)
  previous: new Map(),  // item id -> rank in the previous page of the same query
  clicked: null,
  sent: 0,
  searches: 0,          // searches started; a response to an older one is stale
};
sessionStorage.setItem("instantrec-session", state.session);

function newSessionId() {
  const bytes = new Uint8Array(8);
  crypto.getRandomValues(bytes);
  return "web-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

async function api(path, body) {
  const init = body === undefined ? {} : {
    method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body),
  };
  const response = await fetch(path, init);
  const data = await response.json();
  if (!response.ok) {
    const err = data.error || {};
    throw new Error(`${err.type || response.status}: ${err.message || "request failed"}`);
  }
  return data;
}

function filters() {
  const out = {};
  const category = $("category").value;
  if (category) out.category = category;
  const min = $("min-price").value, max = $("max-price").value;
  if (min !== "") out.min_price = Number(min);
  if (max !== "") out.max_price = Number(max);
  if ($("in-stock").checked) out.in_stock = true;
  return Object.keys(out).length ? out : null;
}

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined && text !== null) node.textContent = text;
  return node;
}

function money(price) {
  return price === null ? "price n/a" : "$" + price.toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 2 });
}

async function search(query, { keepPrevious = false } = {}) {
  const body = { k: 10, session_id: state.session };
  if (query) body.query = query;
  const f = filters();
  if (f) body.filters = f;
  if (!keepPrevious || query !== state.query) state.previous = new Map();
  state.query = query || null;
  const mine = ++state.searches;
  let data;
  try {
    data = await api("/recommend", body);
  } catch (err) {
    if (mine !== state.searches) return;
    $("status").textContent = err.message;
    $("results").replaceChildren();
    return;
  }
  // two quick changes (a filter, then another) race: only the latest search is shown, and
  // only what was shown is recorded as impressions
  if (mine !== state.searches) return;
  render(data);
  await recordImpressions(data.results);
  await refreshSession();
}

function render(data) {
  $("status").textContent = `${data.results.length} results in ${data.took_ms.toFixed(1)} ms` +
    (state.query ? ` for "${state.query}"` : " from this session's interest");
  $("release").textContent = data.release_id;
  $("ranker").textContent = data.ranker_seq;
  $("shift-banner").hidden = !data.intent_shift;
  const list = $("results");
  list.replaceChildren();
  for (const r of data.results) {
    const li = el("li", "result");
    li.dataset.itemId = r.item_id;
    li.dataset.rank = r.rank;
    if (r.item_id === state.clicked) li.classList.add("clicked");
    const rank = el("div", "rank", r.rank);
    const before = state.previous.get(r.item_id);
    if (state.previous.size) {
      let move;
      if (before === undefined) move = el("span", "move new", "new");
      else if (before > r.rank) move = el("span", "move up", `▲${before - r.rank}`);
      else if (before < r.rank) move = el("span", "move down", `▼${r.rank - before}`);
      if (move) rank.append(move);
    }
    const body = el("div");
    body.append(el("div", "title", r.title));
    const meta = el("div", "meta");
    meta.append(el("span", "price", money(r.price)), " · ", el("span", "category", r.category || "uncategorised"));
    if (r.brand) meta.append(" · ", el("span", "brand", r.brand));
    meta.append(" · ", el("span", r.in_stock ? "stock in" : "stock out", r.in_stock ? "in stock" : "out of stock"));
    body.append(meta);
    const actions = el("div", "actions");
    actions.append(el("div", "score", `score ${r.score.toFixed(3)}`));
    const view = el("button", "click", "View");
    view.addEventListener("click", () => interact(r, "click"));
    const cart = el("button", "cart", "Add to cart");
    cart.addEventListener("click", () => interact(r, "add_to_cart"));
    actions.append(view, cart);
    const details = el("details");
    details.append(el("summary", null, "why this score"));
    const table = el("table");
    for (const [name, value] of Object.entries(r.signals)) {
      const row = el("tr");
      row.append(el("td", null, name), el("td", "v", value === null ? "-" : Number(value).toFixed(4)));
      table.append(row);
    }
    details.append(table);
    li.append(rank, body, actions, details);
    list.append(li);
  }
  state.previous = new Map(data.results.map((r) => [r.item_id, r.rank]));
}

async function send(events) {
  const data = await api("/events", events.length === 1 ? events[0] : { events });
  state.sent += data.recorded;
  $("events-sent").textContent = state.sent;
  $("last-event").textContent = events[events.length - 1].type;
  document.body.dataset.eventsSent = state.sent;
  return data;
}

async function recordImpressions(results) {
  if (!results.length) return;
  await send(results.map((r) => ({
    type: "impression", session_id: state.session, item_id: r.item_id, position: r.rank,
    ...(state.query ? { query: state.query } : {}),
  })));
}

async function interact(result, type) {
  state.clicked = result.item_id;
  try {
    await send([{
      type, session_id: state.session, item_id: result.item_id, position: result.rank,
      ...(state.query ? { query: state.query } : {}),
    }]);
  } catch (err) {
    $("status").textContent = err.message;
    return;
  }
  await search(state.query, { keepPrevious: true });
}

async function refreshSession() {
  const s = await api(`/sessions/${encodeURIComponent(state.session)}`);
  $("session-id").textContent = state.session;
  $("interest-strength").textContent = s.interest_strength.toFixed(2);
  $("last-shift").textContent = s.intent_shift_ts ? new Date(s.intent_shift_ts * 1000).toLocaleTimeString() : "none";
  const leaning = $("leaning");
  leaning.replaceChildren();
  const cats = Object.entries(s.categories);
  if (!cats.length) leaning.append(el("li", "muted", "no clicks yet"));
  for (const [name, share] of cats) leaning.append(el("li", null, `${name}: ${Math.round(share * 100)}%`));
  const list = $("interactions");
  list.replaceChildren();
  if (!s.interactions.length) list.append(el("li", "muted", "none"));
  for (const it of s.interactions) {
    list.append(el("li", null, `${it.title || it.item_id} (weight ${it.weight.toFixed(2)}, ${Math.round(it.age_s)} s ago)`));
  }
}

async function loadFacets() {
  try {
    const facets = await api("/facets");
    const select = $("category");
    for (const [name, count] of Object.entries(facets.categories)) {
      const option = el("option", null, `${name} (${count})`);
      option.value = name;
      select.append(option);
    }
  } catch (err) {
    $("status").textContent = err.message;
  }
}

$("search-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const q = $("q").value.trim();
  if (q) search(q);
});
for (const id of ["category", "min-price", "max-price", "in-stock"]) {
  $(id).addEventListener("change", () => { if (state.query) search(state.query); });
}
$("browse").addEventListener("click", () => search(null));
$("new-session").addEventListener("click", () => {
  state.session = newSessionId();
  sessionStorage.setItem("instantrec-session", state.session);
  state.previous = new Map();
  refreshSession();
});
$("session-id").textContent = state.session;
loadFacets().then(() => { document.body.dataset.ready = "1"; });
refreshSession().catch(() => {});
