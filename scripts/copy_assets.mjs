// Copy vendored browser assets from node_modules/ into static/vendor/ (both git-ignored),
// so no third-party JS is committed. Run by `make install` after `npm ci`.
import { copyFileSync, mkdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const assets = {
  "node_modules/htmx.org/dist/htmx.min.js": "static/vendor/htmx.min.js",
  "node_modules/swagger-ui-dist/swagger-ui-bundle.js": "static/vendor/swagger-ui/swagger-ui-bundle.js",
  "node_modules/swagger-ui-dist/swagger-ui.css": "static/vendor/swagger-ui/swagger-ui.css",
};

for (const [from, to] of Object.entries(assets)) {
  mkdirSync(dirname(join(root, to)), { recursive: true });
  copyFileSync(join(root, from), join(root, to)); // throws (exit 1) if the source is missing
  console.log(`copied ${from} -> ${to}`);
}
