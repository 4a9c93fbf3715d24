// Recipients section: "/" jumps to the search box (unless typing somewhere already).
document.addEventListener("keydown", (event) => {
  const search = document.getElementById("recipient-q");
  if (!search || event.key !== "/" || event.ctrlKey || event.metaKey || event.altKey) return;
  const target = event.target;
  if (target instanceof HTMLElement && (target.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(target.tagName))) return;
  event.preventDefault();
  search.focus();
  search.select();
});
