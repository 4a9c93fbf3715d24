// Campaigns: show the composer's audience and timing fields that match the chosen option,
// and ask before destructive form submits (data-confirm). No inline script: the CSP forbids it.
(function () {
  "use strict";

  function sync(root) {
    root.querySelectorAll("[data-toggle]").forEach(function (group) {
      var name = group.getAttribute("data-toggle");
      var checked = group.querySelector('input[name="' + name + '"]:checked');
      var value = checked ? name + ":" + checked.value : "";
      group.querySelectorAll("[data-show]").forEach(function (section) {
        var wanted = section.getAttribute("data-show").split(" ");
        section.hidden = wanted.indexOf(value) === -1;
      });
    });
  }

  document.addEventListener("DOMContentLoaded", function () { sync(document); });
  document.addEventListener("change", function (event) {
    if (event.target.matches && event.target.matches("[data-toggle] input[type=radio]")) {
      sync(document);
    }
  });
  document.addEventListener("htmx:afterSwap", function () { sync(document); });
  document.addEventListener("submit", function (event) {
    var button = event.submitter;
    var message = button && button.getAttribute("data-confirm");
    if (message && !window.confirm(message)) {
      event.preventDefault();
    }
  });
})();
