// Segments: small page behaviour around htmx (no framework; the server renders the builder).
(function () {
  "use strict";

  // Validation answers (422) and refusals (409) carry the form with its messages: show them.
  document.addEventListener("htmx:beforeSwap", function (event) {
    var status = event.detail.xhr.status;
    if (status === 422 || status === 409) {
      event.detail.shouldSwap = true;
      event.detail.isError = false;
    }
  });

  // After a condition or group is added or removed, move focus to it (or to its group).
  function focusRequested() {
    var builder = document.getElementById("segment-builder");
    if (!builder || !builder.dataset.focus) return;
    var node = document.getElementById("node-" + builder.dataset.focus);
    delete builder.dataset.focus;
    var control = node && node.querySelector("select, input:not([type=hidden]), button");
    if (control) control.focus();
  }
  document.addEventListener("htmx:afterSettle", focusRequested);
  document.addEventListener("DOMContentLoaded", focusRequested);

  // Forms that destroy something ask first.
  document.addEventListener("submit", function (event) {
    var form = event.target;
    var question = form.getAttribute && form.getAttribute("data-confirm");
    if (question && !window.confirm(question)) event.preventDefault();
  });
})();
