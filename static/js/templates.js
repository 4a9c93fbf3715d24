// The template editor: channel tabs, the live SMS counter, picking a preview recipient,
// the layout's colour picker. Loaded as a static file (the console's CSP allows no inline
// script); everything is delegated from the document so htmx-swapped content just works.
(function () {
  "use strict";

  // --- SMS segments: the same rules as whistle_web/message_templates/sms.py -------------
  var GSM_BASIC =
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?" +
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà";
  var GSM_EXTENDED = "^{}\\[~]|€\f";

  function smsCount(text) {
    var chars = Array.from(text);
    var gsm = chars.every(function (c) {
      return GSM_BASIC.indexOf(c) >= 0 || GSM_EXTENDED.indexOf(c) >= 0;
    });
    var units = chars.map(function (c) {
      if (gsm) return GSM_EXTENDED.indexOf(c) >= 0 ? 2 : 1;
      return c.codePointAt(0) > 0xffff ? 2 : 1;
    });
    var single = gsm ? 160 : 70;
    var multi = gsm ? 153 : 67;
    var total = units.reduce(function (a, b) { return a + b; }, 0);
    var segments = 0;
    if (total > 0 && total <= single) segments = 1;
    else if (total > single) {
      segments = 1;
      var used = 0;
      units.forEach(function (size) {
        if (used + size > multi) { segments += 1; used = 0; }
        used += size;
      });
    }
    return {
      encoding: gsm ? "GSM-7" : "UCS-2",
      characters: chars.length,
      units: total,
      segments: segments,
      perSegment: segments <= 1 ? single : multi,
    };
  }
  window.whistleSmsCount = smsCount;

  function showSmsCount(textarea) {
    var out = document.querySelector("[data-sms-count]");
    if (!out) return;
    var c = smsCount(textarea.value);
    out.textContent =
      c.characters + " characters · " + c.units + (c.encoding === "GSM-7" ? " septets" : " UCS-2 units") +
      " · " + c.segments + " segment" + (c.segments === 1 ? "" : "s") +
      " (" + c.encoding + ", " + c.perSegment + " per segment)";
  }

  // --- channel tabs (WAI-ARIA tabs: arrows, Home, End) --------------------------------
  function selectTab(tab, focus) {
    var list = tab.closest("[data-tabs]");
    var tabs = Array.from(list.querySelectorAll("[role=tab]"));
    tabs.forEach(function (t) {
      var on = t === tab;
      t.setAttribute("aria-selected", on ? "true" : "false");
      t.tabIndex = on ? 0 : -1;
      var panel = document.getElementById(t.getAttribute("aria-controls"));
      if (panel) panel.hidden = !on;
    });
    var editor = list.closest(".tpl-editor");
    if (editor) editor.setAttribute("data-active", tab.getAttribute("data-channel"));
    if (focus) tab.focus();
  }

  function initTabs() {
    document.querySelectorAll("[data-tabs]").forEach(function (list) {
      var tabs = Array.from(list.querySelectorAll("[role=tab]"));
      // Open the first channel with an error, else the first one with content.
      var pick = tabs.find(function (t) {
        var panel = document.getElementById(t.getAttribute("aria-controls"));
        return panel && panel.querySelector(".field-error p");
      });
      if (!pick) {
        pick = tabs.find(function (t) {
          var panel = document.getElementById(t.getAttribute("aria-controls"));
          return panel && Array.from(panel.querySelectorAll("input, textarea")).some(function (f) {
            return f.value.trim() !== "";
          });
        });
      }
      selectTab(pick || tabs[0], false);
    });
  }

  document.addEventListener("click", function (event) {
    var tab = event.target.closest("[data-tabs] [role=tab]");
    if (tab) { selectTab(tab, true); return; }
    var pick = event.target.closest("[data-pick-recipient]");
    if (pick) { chooseRecipient(pick.getAttribute("data-pick-recipient")); return; }
    if (event.target.closest("[data-recipient-clear]")) chooseRecipient("");
  });

  document.addEventListener("keydown", function (event) {
    // Ctrl+S / Cmd+S saves the draft (the form's own submit button: nothing if read-only).
    if ((event.ctrlKey || event.metaKey) && event.key.toLowerCase() === "s") {
      var editor = document.querySelector("form.tpl-editor, form#layout-form");
      var save = editor && editor.querySelector(".tpl-buttons button.primary[type=submit]");
      if (save) { event.preventDefault(); editor.requestSubmit(save); }
      return;
    }
    var tab = event.target.closest && event.target.closest("[data-tabs] [role=tab]");
    if (!tab) return;
    var tabs = Array.from(tab.closest("[data-tabs]").querySelectorAll("[role=tab]"));
    var i = tabs.indexOf(tab);
    var next = null;
    if (event.key === "ArrowRight") next = tabs[(i + 1) % tabs.length];
    else if (event.key === "ArrowLeft") next = tabs[(i - 1 + tabs.length) % tabs.length];
    else if (event.key === "Home") next = tabs[0];
    else if (event.key === "End") next = tabs[tabs.length - 1];
    if (next) { event.preventDefault(); selectTab(next, true); }
  });

  // --- preview recipient ---------------------------------------------------------------
  function chooseRecipient(externalId) {
    var input = document.querySelector("[data-recipient-value]");
    if (!input) return;
    input.value = externalId;
    var search = document.querySelector("[data-recipient-search]");
    if (search) search.value = externalId;
    var results = document.getElementById("recipient-results");
    if (results) results.textContent = "";
    // The editor form re-renders the preview on "change".
    input.dispatchEvent(new Event("change", { bubbles: true }));
  }

  // --- input handlers ------------------------------------------------------------------
  document.addEventListener("input", function (event) {
    var target = event.target;
    if (target.matches("[data-sms-source]")) showSmsCount(target);
    if (target.matches("[data-colour-picker]")) {
      var text = document.querySelector("[data-colour-text]");
      if (text) {
        text.value = target.value;
        text.dispatchEvent(new Event("change", { bubbles: true }));
      }
    }
    if (target.matches("[data-colour-text]") && /^#[0-9a-fA-F]{6}$/.test(target.value)) {
      var picker = document.querySelector("[data-colour-picker]");
      if (picker) picker.value = target.value.toLowerCase();
    }
  });

  // Typing in the recipient search only searches: it must not re-render the preview.
  ["keyup", "change"].forEach(function (type) {
    document.addEventListener(type, function (event) {
      if (event.target.matches && event.target.matches("[data-recipient-search]")) {
        event.stopPropagation();
      }
    }, true);
  });

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", initTabs);
  else initTabs();
})();
