// Settings pages: copy a shown-once secret to the clipboard.
document.addEventListener("click", (event) => {
  const button = event.target.closest("button.copy[data-copy]");
  if (!button) return;
  const field = document.querySelector(button.dataset.copy);
  if (!field) return;
  const done = () => {
    button.textContent = "Copied";
    setTimeout(() => { button.textContent = "Copy"; }, 2000);
  };
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(field.value).then(done, () => { field.select(); });
  } else {
    field.select();
    try { document.execCommand("copy"); done(); } catch (_) { /* the text stays selected */ }
  }
});

// Answers that carry the form or fragment with its messages (422 invalid, 409 refused, 403
// not allowed for this role) are swapped in like successes so the message shows in place.
document.addEventListener("htmx:beforeSwap", (event) => {
  const status = event.detail.xhr.status;
  if (status === 422 || status === 409 || status === 403) {
    event.detail.shouldSwap = true;
    event.detail.isError = false;
  }
});
