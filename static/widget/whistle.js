/*
 * Whistle in-app inbox widget: a bell with an unread badge and a dropdown feed.
 *
 * Embed with one script tag (the server is the script's own origin):
 *   <script src="https://whistle.example/static/widget/whistle.js"
 *           data-token="<recipient JWT>" async></script>
 * optional: data-target="#css-selector" (where the bell goes), data-link-target="_self".
 * Or from your own code, when your app fetches the token itself:
 *   const inbox = Whistle.init({token, target, onTokenExpired: async () => freshToken});
 *   inbox.setToken(t); inbox.open(); inbox.close(); inbox.destroy();
 *
 * Live updates come over the /ws WebSocket (protocol: README, "In-app realtime protocol");
 * when the socket cannot connect the widget reads and acts through the HTTP feed
 * (/api/v1/inbox) and keeps trying the socket with exponential backoff and jitter, resuming
 * from the last sequence number it saw. Everything renders inside a shadow root, built
 * with DOM calls: notification text is only ever set as textContent, and action links are
 * http(s) only. Plain ES2019, no framework, no build step.
 */
(function (global) {
  "use strict";

  if (global.Whistle && global.Whistle.version) {
    return; // loaded twice: keep the first copy (and its instances)
  }

  const SCRIPT = document.currentScript;
  const PAGE_SIZE = 20;
  const BACKOFF_BASE_MS = 1000;
  const BACKOFF_CAP_MS = 30000;
  // After this many socket attempts in a row that never got ready, use the HTTP feed.
  const HTTP_AFTER_FAILURES = 2;
  const POLL_MS = 30000;
  const ACK_TIMEOUT_MS = 10000;
  const MAX_SEEN_IDS = 100;
  const CLOSE_AUTH = 4001;
  const CLOSE_ORIGIN = 4003;
  const CLOSE_TOO_MANY_SOCKETS = 4009;
  const SVG_NS = "http://www.w3.org/2000/svg";
  const BELL_PATH =
    "M12 22a2.5 2.5 0 0 0 2.45-2h-4.9A2.5 2.5 0 0 0 12 22zm7-6V11a7 7 0 0 0-5.5-6.84V3.5a1.5 " +
    "1.5 0 0 0-3 0v.66A7 7 0 0 0 5 11v5l-2 2v1h18v-1l-2-2z";

  // --- small helpers --------------------------------------------------------------------

  /** The Whistle server a script URL belongs to: its origin, plus any path prefix. */
  function baseUrlFrom(src) {
    const url = new URL(src, document.baseURI);
    const match = url.pathname.match(/^(.*)\/static\/widget\/[^/]+\.js$/);
    return url.origin + (match ? match[1] : "");
  }

  /** An absolute http(s) URL, or null: nothing else becomes a link. */
  function safeHttpUrl(value) {
    if (typeof value !== "string" || !value) {
      return null;
    }
    try {
      const url = new URL(value);
      return url.protocol === "https:" || url.protocol === "http:" ? url.href : null;
    } catch (error) {
      return null;
    }
  }

  /** Create an element; attributes via setAttribute, text via textContent only. */
  function h(tag, attributes, children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes || {})) {
      if (value === false || value === null || value === undefined) {
        continue;
      }
      node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children || []) {
      node.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
    }
    return node;
  }

  function bellIcon() {
    const svg = document.createElementNS(SVG_NS, "svg");
    svg.setAttribute("viewBox", "0 0 24 24");
    svg.setAttribute("width", "22");
    svg.setAttribute("height", "22");
    svg.setAttribute("aria-hidden", "true");
    svg.setAttribute("focusable", "false");
    const path = document.createElementNS(SVG_NS, "path");
    path.setAttribute("d", BELL_PATH);
    path.setAttribute("fill", "currentColor");
    svg.appendChild(path);
    return svg;
  }

  /** When a JWT expires (ms since the epoch), or null; the claims are read, not checked. */
  function tokenExpiry(token) {
    try {
      const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      const claims = JSON.parse(atob(part + "===".slice((part.length + 3) % 4)));
      return typeof claims.exp === "number" ? claims.exp * 1000 : null;
    } catch (error) {
      return null;
    }
  }

  function time(value) {
    const parsed = typeof value === "string" ? Date.parse(value) : NaN;
    return Number.isNaN(parsed) ? null : parsed;
  }

  const RELATIVE =
    typeof Intl !== "undefined" && Intl.RelativeTimeFormat
      ? new Intl.RelativeTimeFormat(undefined, { numeric: "auto" })
      : null;

  /** "5 minutes ago", "yesterday"... */
  function relativeTime(timestamp, now) {
    const seconds = Math.round((timestamp - now) / 1000);
    const steps = [
      [60, "second"],
      [60, "minute"],
      [24, "hour"],
      [7, "day"],
      [4.35, "week"],
      [12, "month"],
      [Infinity, "year"],
    ];
    let amount = seconds;
    for (const [size, unit] of steps) {
      if (Math.abs(amount) < size) {
        if (unit === "second" && Math.abs(amount) < 45) {
          return RELATIVE ? RELATIVE.format(0, "second") : "just now";
        }
        const rounded = Math.round(amount);
        if (RELATIVE) {
          return RELATIVE.format(rounded, unit);
        }
        const n = Math.abs(rounded);
        return n + " " + unit + (n === 1 ? "" : "s") + " ago";
      }
      amount /= size;
    }
    return new Date(timestamp).toLocaleDateString();
  }

  function byNewest(a, b) {
    const at = time(a.created_at) || 0;
    const bt = time(b.created_at) || 0;
    return bt - at || b.id - a.id;
  }

  let instances = 0;

  // --- the widget -----------------------------------------------------------------------

  class Inbox {
    constructor(options) {
      if (!options || typeof options.token !== "string" || !options.token) {
        throw new TypeError("Whistle.init needs {token: '<recipient token>'}");
      }
      this.token = options.token;
      this.baseUrl = String(options.baseUrl || (SCRIPT && SCRIPT.src && baseUrlFrom(SCRIPT.src)) || "")
        .replace(/\/+$/, "");
      if (!this.baseUrl) {
        throw new TypeError("Whistle.init needs {baseUrl} when the script URL is unknown");
      }
      this.onTokenExpired = typeof options.onTokenExpired === "function" ? options.onTokenExpired : null;
      this.linkTarget = options.linkTarget === "_self" ? "_self" : "_blank";
      this.items = new Map(); // delivery id -> item
      this.rows = new Map(); // delivery id -> <li>
      this.unread = 0;
      this.lastSeq = null; // highest seq seen; sent as last_seq on reconnect
      this.readySeq = null;
      this.nextCursor = null;
      this.pages = 0; // feed pages shown
      this.feedLoaded = false;
      this.preferencesUrl = null;
      this.socket = null;
      this.live = false; // authenticated socket
      this.resuming = false;
      this.resumeAsked = false;
      this.attempt = 0;
      this.failures = 0;
      this.stopped = false;
      this.expired = false;
      this.pending = new Map(); // ref -> {type, fields, resolve, timer}
      this.refs = 0;
      this.timers = {};
      this.id = ++instances;
      this._mount(options.target);
      this._listen();
      this._scheduleRenewal();
      this._connect();
    }

    // --- public API ---

    /** Use a new recipient token (after yours was refreshed); reconnects if needed. */
    setToken(token) {
      if (typeof token !== "string" || !token) {
        throw new TypeError("setToken needs a token string");
      }
      this.token = token;
      this._scheduleRenewal();
      if (this.live) {
        this._send({ type: "auth", token: token, ref: String(++this.refs) }); // extends the socket
      }
      if (this.expired && !this.stopped) {
        this.expired = false;
        this._setStatus("");
        this.attempt = 0;
        this._connect();
      }
    }

    open() {
      if (!this.panel.hidden) {
        return;
      }
      // Open towards the middle of the window, whichever side of it the bell sits on.
      const rect = this.host.getBoundingClientRect();
      const viewport = document.documentElement.clientWidth || global.innerWidth;
      this.panel.classList.toggle("align-left", rect.left + rect.width / 2 < viewport / 2);
      this.panel.hidden = false;
      this.bell.setAttribute("aria-expanded", "true");
      this.host.classList.add("whistle-open");
      this._render();
      this.panel.focus();
      if (!this.feedLoaded) {
        this._loadFeed(true); // not read yet, or the last try failed
      }
      this._markVisibleSeen();
    }

    close(restoreFocus) {
      if (this.panel.hidden) {
        return;
      }
      this.panel.hidden = true;
      this.bell.setAttribute("aria-expanded", "false");
      this.host.classList.remove("whistle-open");
      if (restoreFocus !== false) {
        this.bell.focus();
      }
    }

    toggle() {
      if (this.panel.hidden) {
        this.open();
      } else {
        this.close();
      }
    }

    /** Remove the widget, close the socket and stop every timer. */
    destroy() {
      this.stopped = true;
      this._clearTimers();
      this._stopPolling();
      if (this.socket) {
        this.socket.close(1000, "destroyed");
        this.socket = null;
      }
      document.removeEventListener("click", this._onDocumentClick, true);
      document.removeEventListener("keydown", this._onDocumentKeydown);
      global.removeEventListener("online", this._onOnline);
      document.removeEventListener("visibilitychange", this._onVisible);
      this.host.remove();
      const index = global.Whistle.instances.indexOf(this);
      if (index !== -1) {
        global.Whistle.instances.splice(index, 1);
      }
    }

    get unreadCount() {
      return this.unread;
    }

    // --- DOM ---

    _mount(target) {
      let container = null;
      if (typeof target === "string") {
        container = document.querySelector(target);
        if (!container) {
          throw new Error("Whistle: no element matches " + target);
        }
      } else if (target && target.nodeType === 1) {
        container = target;
      }
      this.host = document.createElement("whistle-inbox");
      if (!container) {
        this.host.classList.add("whistle-floating");
        container = document.body;
      }
      container.appendChild(this.host);
      const root = this.host.attachShadow({ mode: "open" });
      this.root = root;

      const panelId = "whistle-panel-" + this.id;
      this.bell = h("button", {
        type: "button",
        class: "bell",
        "aria-haspopup": "dialog",
        "aria-expanded": "false",
        "aria-controls": panelId,
        "aria-label": "Notifications",
      });
      this.bell.appendChild(bellIcon());
      this.badge = h("span", { class: "badge", "aria-hidden": "true", hidden: true });
      this.bell.appendChild(this.badge);
      this.announcer = h("div", { class: "visually-hidden", "aria-live": "polite", role: "status" });
      this.markAll = h("button", { type: "button", class: "mark-all" }, ["Mark all read"]);
      this.status = h("p", { class: "status", hidden: true });
      this.list = h("ul", { class: "feed", "aria-label": "Notifications" });
      this.empty = h("p", { class: "empty", hidden: true }, ["You're all caught up."]);
      this.more = h("button", { type: "button", class: "more", hidden: true }, ["Show older"]);
      this.prefs = h("a", { class: "prefs", target: "_blank", rel: "noopener noreferrer", hidden: true }, [
        "Notification preferences",
      ]);
      this.panel = h(
        "section",
        {
          id: panelId,
          class: "panel",
          role: "dialog",
          "aria-label": "Notifications",
          tabindex: "-1",
          hidden: true,
        },
        [
          h("header", {}, [h("h2", {}, ["Notifications"]), this.markAll]),
          this.status,
          this.list,
          this.empty,
          this.more,
          h("footer", {}, [this.prefs]),
        ]
      );
      const wrapper = h("div", { class: "whistle", hidden: true }, [this.bell, this.announcer, this.panel]);
      // Shown once its styles are in, so the page never sees an unstyled flash.
      const styles = h("link", { rel: "stylesheet", href: this.baseUrl + "/static/widget/whistle.css" });
      const reveal = () => {
        wrapper.hidden = false;
      };
      styles.addEventListener("load", reveal);
      styles.addEventListener("error", reveal);
      this.timers.reveal = setTimeout(reveal, 3000);
      root.appendChild(styles);
      root.appendChild(wrapper);
      this._render();
    }

    _listen() {
      this.bell.addEventListener("click", () => this.toggle());
      this.markAll.addEventListener("click", () => this._markAllRead());
      this.more.addEventListener("click", () => this._loadFeed(false));
      this.root.addEventListener("keydown", (event) => this._onKeydown(event));
      this.list.addEventListener("click", (event) => this._onListClick(event));
      this._onDocumentKeydown = (event) => {
        // Escape also closes when focus is elsewhere on the page (the panel is a popover).
        if (event.key === "Escape" && !this.panel.hidden && !event.composedPath().includes(this.host)) {
          this.close(false);
        }
      };
      this._onDocumentClick = (event) => {
        const path = event.composedPath ? event.composedPath() : [];
        if (!this.panel.hidden && !path.includes(this.host)) {
          this.close(false);
        }
      };
      this._onOnline = () => this._reconnectNow();
      this._onVisible = () => {
        if (document.visibilityState === "visible") {
          this._reconnectNow();
          if (!this.panel.hidden) {
            this._markVisibleSeen();
          }
        }
      };
      document.addEventListener("click", this._onDocumentClick, true);
      document.addEventListener("keydown", this._onDocumentKeydown);
      global.addEventListener("online", this._onOnline);
      document.addEventListener("visibilitychange", this._onVisible);
      this.timers.clock = setInterval(() => this._refreshTimes(), 60000);
    }

    _onKeydown(event) {
      if (event.key === "Escape" && !this.panel.hidden) {
        event.preventDefault();
        event.stopPropagation();
        this.close(true);
        return;
      }
      if (event.key !== "ArrowDown" && event.key !== "ArrowUp") {
        return;
      }
      if (this.panel.hidden) {
        return;
      }
      const controls = Array.from(this.list.querySelectorAll(".item-main"));
      if (!controls.length) {
        return;
      }
      event.preventDefault();
      const index = controls.indexOf(this.root.activeElement);
      let next;
      if (index === -1) {
        next = event.key === "ArrowDown" ? 0 : controls.length - 1;
      } else {
        next = (index + (event.key === "ArrowDown" ? 1 : -1) + controls.length) % controls.length;
      }
      controls[next].focus();
    }

    _onListClick(event) {
      const control = event.target.closest("button, a");
      if (!control || !this.list.contains(control)) {
        return;
      }
      const row = control.closest("li");
      const id = row ? Number(row.dataset.id) : NaN;
      const item = this.items.get(id);
      if (!item) {
        return;
      }
      if (control.classList.contains("archive")) {
        this._archive(item, row);
        return;
      }
      if (!control.classList.contains("item-main")) {
        return;
      }
      const read = this._markRead(item);
      if (control.tagName === "A") {
        const clicked = this._act("clicked", { id: item.id });
        if (this.linkTarget === "_self") {
          // Leave the page once the click is recorded (or after a short wait).
          event.preventDefault();
          const href = control.href;
          const wait = new Promise((resolve) => setTimeout(resolve, 500));
          Promise.race([Promise.all([read, clicked]), wait]).then(() => global.location.assign(href));
        }
      }
    }

    _setStatus(text) {
      this.status.textContent = text;
      this.status.hidden = !text;
    }

    _announce(text) {
      this.announcer.textContent = "";
      this.timers.announce = setTimeout(() => {
        this.announcer.textContent = text;
      }, 100);
    }

    _render() {
      const items = Array.from(this.items.values()).sort(byNewest);
      const now = Date.now();
      const keep = new Set();
      const focused = this.root.activeElement; // moving a row in the DOM blurs it
      items.forEach((item, index) => {
        keep.add(item.id);
        let row = this.rows.get(item.id);
        if (!row) {
          row = this._row(item);
          this.rows.set(item.id, row);
        }
        this._fill(row, item, now);
        if (this.list.children[index] !== row) {
          this.list.insertBefore(row, this.list.children[index] || null);
        }
      });
      for (const [id, row] of this.rows) {
        if (!keep.has(id)) {
          const hadFocus = row.contains(this.root.activeElement);
          row.remove();
          this.rows.delete(id);
          if (hadFocus && !this.panel.hidden) {
            this.panel.focus(); // never drop the keyboard on the page's body
          }
        }
      }
      if (focused && focused.isConnected && this.root.activeElement !== focused) {
        focused.focus();
      }
      this.empty.hidden = items.length > 0 || !this.feedLoaded;
      this.more.hidden = !this.nextCursor;
      this.markAll.disabled = this.unread === 0 && !items.some((item) => !item.read_at);
      this._renderBadge();
      if (this.preferencesUrl) {
        this.prefs.href = this.preferencesUrl;
        this.prefs.hidden = false;
      }
    }

    _renderBadge() {
      const count = Math.max(0, this.unread | 0);
      this.badge.textContent = count > 99 ? "99+" : String(count);
      this.badge.hidden = count === 0;
      this.bell.setAttribute(
        "aria-label",
        count ? "Notifications, " + count + " unread" : "Notifications"
      );
    }

    _row(item) {
      const row = h("li", { class: "item", "data-id": item.id });
      row.appendChild(h("span", { class: "dot", "aria-hidden": "true" }));
      row.appendChild(h("div", { class: "content" }));
      const archive = h("button", { type: "button", class: "archive" }, [
        h("span", { "aria-hidden": "true" }, ["\u00d7"]),
        h("span", { class: "visually-hidden" }, ["Archive"]),
      ]);
      row.appendChild(archive);
      return row;
    }

    _fill(row, item, now) {
      const url = safeHttpUrl(item.action_url);
      const unread = !item.read_at;
      row.classList.toggle("unread", unread);
      const content = row.querySelector(".content");
      let main = content.querySelector(".item-main");
      const wantTag = url ? "A" : "BUTTON";
      if (!main || main.tagName !== wantTag) {
        const hadFocus = main && this.root.activeElement === main;
        main = url
          ? h("a", { class: "item-main", rel: "noopener noreferrer" })
          : h("button", { type: "button", class: "item-main" });
        content.textContent = "";
        content.appendChild(main);
        content.appendChild(h("p", { class: "body" }));
        content.appendChild(h("time", { class: "when" }));
        if (hadFocus) {
          main.focus();
        }
      }
      if (url) {
        main.href = url;
        main.target = this.linkTarget;
      }
      main.textContent = "";
      if (unread) {
        main.appendChild(h("span", { class: "visually-hidden" }, ["Unread: "]));
      }
      main.appendChild(document.createTextNode(item.title || "Notification"));
      const body = content.querySelector(".body");
      body.textContent = item.body || "";
      body.hidden = !item.body;
      const when = content.querySelector(".when");
      const created = time(item.created_at);
      if (created !== null) {
        when.dateTime = new Date(created).toISOString();
        when.title = new Date(created).toLocaleString();
        when.textContent = relativeTime(created, now);
      }
      const archive = row.querySelector(".archive .visually-hidden");
      archive.textContent = "Archive: " + (item.title || "notification");
    }

    _refreshTimes() {
      if (!this.panel.hidden) {
        this._render();
      }
    }

    // --- state ---

    /** Add or update an item from a frame or the feed; returns true when it is new. */
    _upsert(data) {
      const id = Number(data.id);
      if (!Number.isSafeInteger(id) || id <= 0) {
        return false;
      }
      const known = this.items.get(id);
      if (data.archived_at) {
        this.items.delete(id);
        return false;
      }
      const item = Object.assign(known || {}, data, { id: id });
      this.items.set(id, item);
      return !known;
    }

    _bumpSeq(seq) {
      if (typeof seq === "number" && (this.lastSeq === null || seq > this.lastSeq)) {
        this.lastSeq = seq;
      }
    }

    _setUnread(count) {
      if (typeof count === "number" && count >= 0) {
        this.unread = count;
        this._renderBadge();
        this.markAll.disabled = count === 0 && !Array.from(this.items.values()).some((i) => !i.read_at);
      }
    }

    _markVisibleSeen() {
      if (this.panel.hidden || document.visibilityState === "hidden") {
        return;
      }
      const now = new Date().toISOString();
      const ids = [];
      for (const item of this.items.values()) {
        if (!item.seen_at) {
          item.seen_at = now;
          ids.push(item.id);
        }
      }
      for (let i = 0; i < ids.length; i += MAX_SEEN_IDS) {
        this._act("seen", { ids: ids.slice(i, i + MAX_SEEN_IDS) });
      }
    }

    _markRead(item) {
      if (item.read_at) {
        return Promise.resolve();
      }
      const now = new Date().toISOString();
      item.read_at = now;
      item.seen_at = item.seen_at || now;
      this.unread = Math.max(0, this.unread - 1);
      this._render();
      return this._act("read", { id: item.id });
    }

    _markAllRead() {
      const now = new Date().toISOString();
      for (const item of this.items.values()) {
        item.read_at = item.read_at || now;
        item.seen_at = item.seen_at || now;
      }
      this.unread = 0;
      this._render();
      this._announce("All notifications marked as read.");
      return this._act("read_all", {});
    }

    _archive(item, row) {
      // Keep the keyboard where it was: on the next item, else the previous, else the panel.
      const rows = Array.from(this.list.children);
      const index = rows.indexOf(row);
      const neighbour = rows[index + 1] || rows[index - 1];
      this.items.delete(item.id);
      if (!item.read_at) {
        this.unread = Math.max(0, this.unread - 1);
      }
      this._render();
      const focusable = neighbour && neighbour.querySelector(".item-main");
      if (focusable) {
        focusable.focus();
      } else {
        this.panel.focus();
      }
      this._announce("Notification archived.");
      return this._act("archive", { id: item.id });
    }

    // --- actions: over the socket when it is up, else over HTTP ---

    _act(type, fields) {
      if (this.live && this.socket && this.socket.readyState === 1) {
        const ref = String(++this.refs);
        return new Promise((resolve) => {
          const timer = setTimeout(() => {
            // No answer: the socket is probably gone; HTTP makes sure it happens.
            if (this.pending.delete(ref)) {
              this._http(type, fields).then(resolve, resolve);
            }
          }, ACK_TIMEOUT_MS);
          this.pending.set(ref, { type: type, fields: fields, resolve: resolve, timer: timer });
          this._send(Object.assign({ type: type, ref: ref }, fields));
        });
      }
      return this._http(type, fields).catch(() => undefined);
    }

    _http(type, fields) {
      let request;
      if (type === "seen") {
        request = this._request("POST", "/api/v1/inbox/seen", { ids: fields.ids });
      } else if (type === "read_all") {
        request = this._request("POST", "/api/v1/inbox/read-all", {});
      } else {
        request = this._request("POST", "/api/v1/inbox/" + encodeURIComponent(fields.id) + "/" + type, {});
      }
      return request.then((body) => {
        if (this.live) {
          return undefined; // the socket sends the new count
        }
        if (body && typeof body.unread_count === "number") {
          this._setUnread(body.unread_count);
          return undefined;
        }
        return this._refreshUnread();
      });
    }

    _refreshUnread() {
      return this._request("GET", "/api/v1/inbox/unread-count").then((body) => {
        if (body && typeof body.count === "number") {
          this._setUnread(body.count);
        }
      });
    }

    /** A JSON request to the feed API with the recipient token; one retry after renewal. */
    _request(method, path, body, retried) {
      const headers = { Accept: "application/json", Authorization: "Bearer " + this.token };
      const init = { method: method, headers: headers, mode: "cors", credentials: "omit" };
      if (body !== undefined) {
        headers["Content-Type"] = "application/json";
        init.body = JSON.stringify(body);
      }
      return fetch(this.baseUrl + path, init).then((response) => {
        if (response.status === 401 && !retried) {
          return this._renewToken().then((renewed) => {
            if (!renewed) {
              throw new Error("The recipient token expired.");
            }
            return this._request(method, path, body, true);
          });
        }
        if (!response.ok) {
          throw new Error("Whistle: " + method + " " + path + " answered " + response.status);
        }
        return response.status === 204 ? null : response.json();
      });
    }

    /** Read the first page (``reset``) or the next one of the HTTP feed. */
    _loadFeed(reset) {
      if (this.loading) {
        this.reloadQueued = this.reloadQueued || reset; // read the first page again after this
        return this.loading;
      }
      const params = new URLSearchParams({ limit: String(PAGE_SIZE), status: "all", archived: "false" });
      if (!reset && this.nextCursor) {
        params.set("cursor", this.nextCursor);
      }
      const wasLoaded = this.feedLoaded;
      this.loading = this._request("GET", "/api/v1/inbox?" + params.toString())
        .then((page) => {
          const items = Array.isArray(page.items) ? page.items : [];
          const fresh = [];
          if (reset && wasLoaded && !this.live) {
            // Polling: nothing tells us about archives elsewhere but their absence.
            this._dropMissing(items, !page.next_cursor);
          }
          for (const item of items) {
            if (this._upsert(item) && wasLoaded && reset && !item.read_at) {
              fresh.push(item);
            }
          }
          if (!reset) {
            this.pages += 1;
            this.nextCursor = page.next_cursor || null;
          } else if (this.pages <= 1) {
            // Re-reading the first page keeps the cursor of older pages already shown.
            this.pages = 1;
            this.nextCursor = page.next_cursor || null;
          }
          this.feedLoaded = true;
          // A count older than frames already received (a notification that arrived while
          // this page was in flight) would undo them; the socket keeps the count then.
          const current = this.lastSeq === null || typeof page.seq !== "number" || page.seq >= this.lastSeq;
          if (typeof page.unread_count === "number" && (current || !this.live)) {
            this.unread = page.unread_count;
          }
          if (typeof page.preferences_url === "string") {
            this.preferencesUrl = safeHttpUrl(page.preferences_url);
          }
          this._bumpSeq(page.seq);
          this._render();
          if (fresh.length) {
            this._announce(this._arrivalText(fresh));
          }
          this._markVisibleSeen();
        })
        .catch((error) => {
          if (!this.items.size) {
            this._setStatus(this.expired ? this.status.textContent : "Notifications could not be loaded.");
          }
          if (global.console) {
            global.console.warn(error);
          }
        })
        .then(() => {
          this.loading = null;
          if (this.reloadQueued) {
            this.reloadQueued = false;
            return this._loadFeed(true);
          }
          return undefined;
        });
      return this.loading;
    }

    /** After re-reading the first page: drop items that vanished from its range (archived). */
    _dropMissing(items, complete) {
      const ids = new Set(items.map((item) => Number(item.id)));
      const times = items.map((item) => time(item.created_at) || 0);
      const oldest = complete ? -Infinity : Math.min(Infinity, ...times);
      const newest = complete ? Infinity : Math.max(-Infinity, ...times);
      for (const [id, item] of this.items) {
        const created = time(item.created_at) || 0;
        if (!ids.has(id) && created >= oldest && created <= newest) {
          this.items.delete(id);
        }
      }
    }

    _arrivalText(items) {
      if (items.length === 1) {
        return "New notification: " + (items[0].title || "");
      }
      return items.length + " new notifications.";
    }

    // --- the socket ---

    _socketUrl() {
      return this.baseUrl.replace(/^http/, "ws") + "/ws";
    }

    _connect() {
      if (this.stopped || this.expired) {
        return;
      }
      clearTimeout(this.timers.reconnect);
      if (typeof global.WebSocket !== "function") {
        this._startPolling();
        return;
      }
      let socket;
      try {
        socket = new global.WebSocket(this._socketUrl());
      } catch (error) {
        this._socketFailed();
        return;
      }
      this.socket = socket;
      let ready = false;
      socket.addEventListener("open", () => {
        const auth = { type: "auth", token: this.token };
        this.resumeAsked = this.lastSeq !== null;
        if (this.resumeAsked) {
          auth.last_seq = this.lastSeq;
        }
        socket.send(JSON.stringify(auth));
      });
      socket.addEventListener("message", (event) => {
        if (this.socket !== socket) {
          return;
        }
        let frame;
        try {
          frame = JSON.parse(event.data);
        } catch (error) {
          return;
        }
        if (!frame || typeof frame !== "object") {
          return;
        }
        if (frame.type === "ready") {
          ready = true;
        }
        this._onFrame(frame);
      });
      socket.addEventListener("close", (event) => {
        if (this.socket !== socket) {
          return;
        }
        this.socket = null;
        this.live = false;
        this._flushPending();
        if (this.stopped) {
          return;
        }
        if (event.code === CLOSE_AUTH) {
          this._renewToken().then((renewed) => {
            if (renewed) {
              this.attempt = 0;
              this._connect();
            }
          });
          return;
        }
        if (event.code === CLOSE_ORIGIN) {
          this._setStatus("Live updates are not allowed on this site.");
          this._startPolling();
          return;
        }
        if (event.code === CLOSE_TOO_MANY_SOCKETS) {
          // Too many tabs open: this one reads the feed instead, and tries again later.
          this._startPolling();
        }
        if (!ready) {
          this._socketFailed();
        } else {
          this._scheduleReconnect();
        }
      });
    }

    _socketFailed() {
      this.failures += 1;
      if (this.failures >= HTTP_AFTER_FAILURES) {
        this._startPolling();
      }
      this._scheduleReconnect();
    }

    _scheduleReconnect() {
      if (this.stopped || this.expired) {
        return;
      }
      // Exponential backoff with full jitter, so a server restart is not a thundering herd.
      const ceiling = Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * Math.pow(2, this.attempt));
      const delay = Math.max(250, Math.random() * ceiling);
      this.attempt += 1;
      if (this.feedLoaded || this.failures) {
        this._setStatus("Reconnecting\u2026");
      }
      clearTimeout(this.timers.reconnect);
      this.timers.reconnect = setTimeout(() => this._connect(), delay);
    }

    _reconnectNow() {
      if (!this.socket && !this.stopped && !this.expired) {
        this.attempt = 0;
        this._connect();
      }
    }

    _send(frame) {
      if (this.socket && this.socket.readyState === 1) {
        this.socket.send(JSON.stringify(frame));
      }
    }

    /** Actions the socket never acknowledged go over HTTP instead. */
    _flushPending() {
      const pending = Array.from(this.pending.values());
      this.pending.clear();
      for (const action of pending) {
        clearTimeout(action.timer);
        this._http(action.type, action.fields).then(action.resolve, action.resolve);
      }
    }

    _onFrame(frame) {
      switch (frame.type) {
        case "ready":
          this.live = true;
          this.attempt = 0;
          this.failures = 0;
          this._stopPolling();
          this._setStatus("");
          this.readySeq = typeof frame.seq === "number" ? frame.seq : null;
          if (typeof frame.preferences_url === "string") {
            this.preferencesUrl = safeHttpUrl(frame.preferences_url);
          }
          this._setUnread(frame.unread_count);
          // After a resume the missed items follow, then an unread_count; they are not news.
          this.resuming = Boolean(this.resumeAsked);
          if (!this.resumeAsked) {
            this._bumpSeq(this.readySeq);
          }
          if (!this.resumeAsked || !this.feedLoaded) {
            // The socket only sends what is new (or missed): the feed has the rest.
            this._loadFeed(true);
          }
          this._render();
          break;
        case "notification": {
          const isNew = this._upsert(frame);
          this._bumpSeq(frame.seq);
          if (isNew && !frame.read_at && !this.resuming) {
            this.unread += 1; // the server's unread_count follows and wins
            this._announce(this._arrivalText([frame]));
          }
          this._render();
          const row = this.rows.get(Number(frame.id));
          if (isNew && row) {
            // Highlighted once, when first shown (now, or when the panel next opens).
            row.classList.add("fresh");
            row.addEventListener("animationend", () => row.classList.remove("fresh"), { once: true });
          }
          if (isNew) {
            this._markVisibleSeen();
          }
          break;
        }
        case "updated": {
          this._bumpSeq(frame.seq);
          const item = this.items.get(Number(frame.id));
          if (item) {
            const state = {};
            for (const key of ["seen_at", "read_at", "archived_at", "clicked_at"]) {
              if (key in frame) {
                state[key] = frame[key];
              }
            }
            this._upsert(Object.assign({ id: item.id }, state));
            this._render();
          }
          break;
        }
        case "unread_count":
          this.resuming = false;
          this._setUnread(frame.count);
          break;
        case "reset":
          // Too much was missed to replay: start again from the feed.
          this.resuming = false;
          this.lastSeq = this.readySeq;
          this.items.clear();
          this.pages = 0;
          this._loadFeed(true);
          break;
        case "ping":
          this._send({ type: "pong" });
          break;
        case "ack":
        case "error": {
          const action = this.pending.get(String(frame.ref));
          if (!action) {
            break;
          }
          this.pending.delete(String(frame.ref));
          clearTimeout(action.timer);
          if (frame.type === "error" && frame.code === "not_found" && action.fields.id) {
            this.items.delete(Number(action.fields.id)); // gone: archived or never ours
            this._render();
          }
          action.resolve();
          break;
        }
        default:
          break; // newer server, older widget: ignore what it does not know
      }
    }

    /** Renew the token a minute before it expires, so an open socket never drops for it. */
    _scheduleRenewal() {
      clearTimeout(this.timers.renew);
      const expiry = this.onTokenExpired ? tokenExpiry(this.token) : null;
      if (expiry === null) {
        return;
      }
      const delay = Math.min(Math.max(expiry - Date.now() - 60000, 5000), 2147483647);
      this.timers.renew = setTimeout(() => {
        Promise.resolve()
          .then(() => this.onTokenExpired())
          .then((token) => {
            if (typeof token === "string" && token && token !== this.token && !this.stopped) {
              this.setToken(token);
            }
          })
          .catch(() => undefined); // the socket's 4001 close asks again
      }, delay);
    }

    /** Ask the page for a new token; true when it gave one. */
    _renewToken() {
      if (this.renewing) {
        return this.renewing;
      }
      const ask = this.onTokenExpired
        ? Promise.resolve()
            .then(() => this.onTokenExpired())
            .catch(() => null)
        : Promise.resolve(null);
      this.renewing = ask.then((token) => {
        this.renewing = null;
        if (typeof token === "string" && token && token !== this.token) {
          this.token = token;
          this.expired = false;
          this._scheduleRenewal();
          return true;
        }
        this.expired = true;
        this._stopPolling();
        clearTimeout(this.timers.reconnect);
        this._setStatus("Your session expired. Reload the page to see new notifications.");
        return false;
      });
      return this.renewing;
    }

    // --- HTTP polling while the socket is down ---

    _startPolling() {
      if (this.timers.poll || this.stopped || this.expired) {
        return;
      }
      const poll = () => {
        this._loadFeed(true).then(() => {
          if (this.timers.poll) {
            this.timers.poll = setTimeout(poll, POLL_MS);
          }
        });
      };
      this.timers.poll = setTimeout(poll, 0);
    }

    _stopPolling() {
      clearTimeout(this.timers.poll);
      this.timers.poll = null;
    }

    _clearTimers() {
      clearTimeout(this.timers.reconnect);
      clearTimeout(this.timers.renew);
      clearTimeout(this.timers.reveal);
      clearTimeout(this.timers.announce);
      clearInterval(this.timers.clock);
      for (const action of this.pending.values()) {
        clearTimeout(action.timer);
      }
      this.pending.clear();
    }
  }

  const Whistle = {
    version: "1",
    /** Every widget on the page, in the order they were mounted. */
    instances: [],
    /** Mount a widget; returns its controller (setToken, open, close, destroy). */
    init(options) {
      const inbox = new Inbox(options || {});
      Whistle.instances.push(inbox);
      return inbox;
    },
  };
  global.Whistle = Whistle;

  // The one-script-tag embed: <script src=".../whistle.js" data-token="..." async>.
  if (SCRIPT && SCRIPT.dataset && SCRIPT.dataset.token) {
    const options = {
      token: SCRIPT.dataset.token,
      target: SCRIPT.dataset.target || null,
      linkTarget: SCRIPT.dataset.linkTarget,
    };
    const start = () => Whistle.init(options);
    if (document.readyState === "loading") {
      document.addEventListener("DOMContentLoaded", start);
    } else {
      start();
    }
  }
})(window);
