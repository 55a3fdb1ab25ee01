// headmaster review page: keyboard labelling, undo, live status. No dependencies, no build step.
"use strict";
(() => {
  const body = document.body;
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const head = body.dataset.head;
  const view = body.dataset.view;
  const library = body.dataset.library;  // the library queue's library (its name), else undefined
  const grid = document.getElementById("grid");
  const toastBox = document.getElementById("toast");
  const REFILL_BELOW = 30;  // fetch more cards when fewer are left
  const POLL_MS = 3000;
  let chain = Promise.resolve();  // actions go to the server one after another, in order
  let toastTimer = 0;
  let refilling = false;
  const handled = new Set();  // ids labelled on this page (never shown again, even if a refill races)

  function toast(text, error) {
    toastBox.textContent = text;
    toastBox.className = "toast show" + (error ? " error" : "");
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { toastBox.className = "toast"; }, error ? 5000 : 1800);
  }

  async function post(url, data) {
    const r = await fetch(url, {method: "POST", headers: {"content-type": "application/json", "x-csrf-token": csrf},
                                body: JSON.stringify(data || {}), credentials: "same-origin"});
    const out = await r.json().catch(() => ({error: r.statusText}));
    if (!r.ok) throw new Error(out.error || r.statusText);
    return out;
  }

  // -- the review grid ------------------------------------------------------------------
  const cards = () => grid ? Array.from(grid.querySelectorAll(".card:not(.leaving)")) : [];
  const focused = () => grid && grid.querySelector(".card.focus");

  function focus(card, scroll = true) {
    const old = focused();
    if (old) old.classList.remove("focus");
    if (!card) return;
    card.classList.add("focus");
    if (scroll) card.scrollIntoView({block: "nearest"});
  }

  function counts() {
    const left = document.getElementById("left");
    const n = cards().length;
    if (left) left.textContent = n;
    const empty = document.getElementById("empty");
    if (empty) empty.hidden = n > 0 || !!document.getElementById("error");  // an error says why the list is empty
  }

  function columns() {
    const all = cards();
    if (all.length < 2) return 1;
    const top = all[0].offsetTop;
    const i = all.findIndex(c => c.offsetTop !== top);
    return i < 0 ? all.length : i;
  }

  function move(step) {
    const all = cards();
    if (!all.length) return;
    const i = Math.max(0, all.indexOf(focused()));
    focus(all[Math.min(all.length - 1, Math.max(0, i + step))]);
  }

  function take(card, text) {
    // the card leaves at once; the server works through the chain behind it
    const all = cards();
    const next = all[all.indexOf(card) + 1] || all[all.indexOf(card) - 1];
    handled.add(card.dataset.id);
    card.classList.add("leaving");
    card.classList.remove("focus");
    setTimeout(() => card.remove(), 150);
    focus(next);
    toast(text);
    counts();
    if (view !== "suspects" && cards().length < REFILL_BELOW) refill();  // suspects: the worst 20 are the list
  }

  function act(card, url, data, text, then) {
    if (!card) return;
    performance.mark("hm-action");  // timings for DevTools and bench/review_page.py
    take(card, text);
    chain = chain.then(() => post(url, data)).then(out => {
      performance.mark("hm-action-done");
      if (then) then(out);
    }).catch(err => {
      toast(err.message, true);
      handled.delete(card.dataset.id);
      card.classList.remove("leaving");
      grid.prepend(card);
      focus(card);
      counts();
    });
  }

  function label(card, bucket) {
    if (!card || !bucket) return;
    act(card, "/api/label", {head, id: card.dataset.id, bucket}, `${bucket} ← ${card.querySelector(".name").textContent}`);
  }

  function skip(card) {
    if (!card) return;
    act(card, "/api/skip", {head, id: card.dataset.id}, `skipped ${card.querySelector(".name").textContent}`);
  }

  function newBucket(card, name) {
    if (!card || !name.trim()) return;
    act(card, "/api/new-bucket", {head, id: card.dataset.id, name}, `${name.trim()} (new) ← ${card.querySelector(".name").textContent}`,
        out => { addBucket(out.action.bucket); toast(out.action.note); });
  }

  function startNewBucket(card) {
    // n: type the new bucket's name into the focused card's field; Enter makes it, Escape goes back
    const input = card && card.querySelector(".new-bucket input[name=name]");
    if (input) input.focus();
  }

  function addBucket(name) {
    // a bucket made on this page: a key in the legend and a button on every card, as the server renders them
    const legend = document.getElementById("legend");
    if (legend.querySelector(`[data-bucket="${CSS.escape(name)}"]`)) return;
    const key = "123456789".split("").find(k => !names[k]);
    if (key) {
      names[key] = name;
      const hint = document.createElement("span");
      hint.className = "key-hint";
      hint.dataset.key = key;
      hint.dataset.bucket = name;
      hint.innerHTML = "<kbd></kbd>";
      hint.firstChild.textContent = key;
      hint.append(name);
      const last = Array.from(legend.querySelectorAll("[data-key]")).pop();
      if (last) last.after(hint); else legend.prepend(hint);
    }
    grid.querySelectorAll("form.choices").forEach(form => {
      const button = document.createElement("button");
      button.type = "submit";
      button.name = "bucket";
      button.value = name;
      button.dataset.bucket = name;
      button.tabIndex = -1;
      if (key) { const k = document.createElement("kbd"); k.textContent = key; button.append(k); }
      button.append(name);
      const after = Array.from(form.querySelectorAll("button[data-bucket]")).pop();
      if (after) after.after(button); else form.prepend(button);
    });
  }

  function removeBucket(name) {
    for (const k of Object.keys(names)) if (names[k] === name) delete names[k];
    document.querySelectorAll(`#legend [data-bucket="${CSS.escape(name)}"], form.choices button[data-bucket="${CSS.escape(name)}"]`)
      .forEach(el => el.remove());
  }

  function exclude(card) {
    if (!card || view !== "suspects") return;
    act(card, "/api/exclude", {head, id: card.dataset.id}, `excluded ${card.querySelector(".name").textContent}`);
  }

  function undo() {
    chain = chain.then(() => post("/api/undo")).then(out => {
      if (!out.action) { toast("Nothing to undo"); return; }
      const a = out.action;
      handled.delete(a.id);
      if (a.created) removeBucket(a.bucket);
      const old = grid.querySelector(`.card[data-id="${a.id}"]`);
      if (old) old.remove();
      if (out.card && a.head === head) {
        const t = document.createElement("template");
        t.innerHTML = out.card.trim();
        const card = t.content.firstElementChild;
        const page = {example: "suspects", library: "library"}[card.dataset.where] || "queue";
        if (page === view) {
          grid.prepend(card);
          focus(card);
        }
      }
      counts();
      toast(a.kind === "copy" ? `undone: ${a.name} is no longer an example of ${a.bucket}`
                              : `undone: ${a.name} is back in ${a.source.split("/").slice(-2, -1)[0]}`);
    }).catch(err => toast(err.message, true));
  }

  async function refill() {
    if (refilling || !grid) return;
    refilling = true;
    try {
      const from = library === undefined ? "" : `&library=${encodeURIComponent(library)}`;
      const r = await fetch(`/heads/${encodeURIComponent(head)}/cards?view=${view}${from}&limit=120`, {credentials: "same-origin"});
      if (!r.ok) return;
      const t = document.createElement("template");
      t.innerHTML = await r.text();
      const shown = new Set(Array.from(grid.querySelectorAll(".card")).map(c => c.dataset.id));
      for (const card of Array.from(t.content.querySelectorAll(".card"))) {
        if (!shown.has(card.dataset.id) && !handled.has(card.dataset.id)) grid.append(card);
      }
      if (!focused()) focus(cards()[0]);
      counts();
    } finally {
      refilling = false;
    }
  }

  const names = {};  // key -> bucket, from the legend (it lists every bucket even when the grid is empty)
  if (grid) {
    document.querySelectorAll("#legend [data-key]").forEach(h => { names[h.dataset.key] = h.dataset.bucket; });
    focus(cards()[0], false);
    counts();

    document.addEventListener("keydown", e => {
      if (e.target.matches(".new-bucket input") && e.key === "Escape") {
        e.target.value = "";
        e.target.blur();
        return;
      }
      if (e.ctrlKey || e.metaKey || e.altKey || e.target.matches("input, textarea, select")) return;
      const k = e.key;
      if (names[k]) label(focused(), names[k]);
      else if (k === "u" || k === "U") undo();
      else if (k === "x" || k === "X") exclude(focused());
      else if (k === "s" || k === "S") skip(focused());
      else if (k === "n" || k === "N") startNewBucket(focused());
      else if (k === "ArrowRight" || k === "l") move(1);
      else if (k === "ArrowLeft" || k === "h") move(-1);
      else if (k === "ArrowDown" || k === "j") move(columns());
      else if (k === "ArrowUp" || k === "k") move(-columns());
      else return;
      e.preventDefault();
    });

    const undoButton = document.getElementById("undo");
    if (undoButton) undoButton.addEventListener("click", undo);

    // the cards' plain forms work without this script; with it, they post JSON and the page stays
    grid.addEventListener("submit", e => {
      const card = e.target.closest(".card");
      if (!card) return;
      e.preventDefault();
      const button = e.submitter;
      if (e.target.matches(".new-bucket")) newBucket(card, e.target.querySelector("input[name=name]").value);
      else if (button && button.dataset.bucket) label(card, button.dataset.bucket);
      else if (button && button.dataset.exclude) exclude(card);
      else if (button && button.dataset.skip) skip(card);
    });

    grid.addEventListener("click", e => {
      const card = e.target.closest(".card");
      if (card && !e.target.closest("a, button, input")) focus(card);
    });
    grid.addEventListener("focusin", e => {
      const card = e.target.closest(".card");
      if (card && e.target.matches("input")) focus(card, false);
    });
  }

  // -- details: compute the evaluation figures --------------------------------------------
  const evaluate = document.getElementById("evaluate");
  if (evaluate) {
    evaluate.addEventListener("click", async () => {
      evaluate.disabled = true;
      evaluate.textContent = "Computing…";
      try {
        await post(`/heads/${encodeURIComponent(head)}/evaluate`);
        await swapMain();
      } catch (err) {
        toast(err.message, true);
        evaluate.disabled = false;
        evaluate.textContent = "Compute now";
      }
    });
  }

  // -- live status ------------------------------------------------------------------------
  async function swapMain() {
    // the overview and details pages are re-rendered by the server and swapped in place
    const r = await fetch(location.pathname, {credentials: "same-origin"});
    if (!r.ok) return;
    const doc = new DOMParser().parseFromString(await r.text(), "text/html");
    const fresh = doc.getElementById("main");
    if (fresh) document.getElementById("main").replaceWith(fresh);
  }

  let lastSeen = null;
  let lastUncertain = null;
  async function poll() {
    try {
      const r = await fetch("/index.json", {credentials: "same-origin"});
      if (!r.ok) return;
      const s = await r.json();
      const activity = document.querySelector('[data-live="activity"]');
      if (activity) activity.textContent = s.activity || "";
      const h = head && s.heads[head];
      if (h) {
        const set = (key, value) => document.querySelectorAll(`[data-live="${key}"]`).forEach(el => { el.textContent = value; });
        if (h.retrains !== undefined) set("retrains", h.retrains);
        set("last_trained", (h.last_trained || "never").slice(0, 16).replace("T", " "));
        const pending = document.querySelector('[data-live="pending"]');
        if (pending) pending.hidden = !(h.pending_retrain || h.training);
        if (view === "queue" && lastUncertain !== null && h.uncertain > lastUncertain) refill();  // hmd sorted more
        lastUncertain = h.uncertain;
      }
      const key = JSON.stringify(s.heads);
      if (body.dataset.page === "overview" && lastSeen !== null && key !== lastSeen) await swapMain();
      lastSeen = key;
    } catch (err) { /* the server restarts: try again next time */ }
  }
  poll();
  setInterval(poll, POLL_MS);
})();
