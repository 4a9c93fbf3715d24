// The widget demo's bootstrap (a static file: the page's CSP allows no inline script).
// It mounts the widget with the token the server put on #whistle-bell, renews the token
// through the console when it expires, and sends test notifications without a reload.
(function () {
  "use strict";

  const mount = document.getElementById("whistle-bell");
  if (!mount || !window.Whistle) {
    return;
  }
  const csrf = document.querySelector('meta[name="csrf-token"]').content;

  function renewToken() {
    return fetch(mount.dataset.tokenUrl, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRFToken": csrf },
      body: JSON.stringify({ recipient: mount.dataset.recipient }),
    })
      .then((response) => (response.ok ? response.json() : null))
      .then((body) => (body && body.token) || null);
  }

  window.whistleDemo = window.Whistle.init({
    token: mount.dataset.token,
    target: mount,
    onTokenExpired: renewToken,
  });

  const form = document.getElementById("demo-send");
  const status = document.getElementById("demo-send-status");
  if (!form || !status) {
    return;
  }
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    status.textContent = "Sending\u2026";
    fetch(form.action, {
      method: "POST",
      credentials: "same-origin",
      headers: { Accept: "application/json", "X-CSRFToken": csrf },
      body: new FormData(form),
    })
      .then((response) => response.json().then((body) => ({ ok: response.ok, body: body })))
      .then(({ ok, body }) => {
        status.textContent = ok
          ? "Queued. Watch the bell: it arrives as soon as a worker delivers it."
          : "Nothing was sent: " + (body.error || "unknown error");
      })
      .catch(() => {
        status.textContent = "Nothing was sent: the server could not be reached.";
      });
  });
})();
