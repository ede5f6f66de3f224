// Prints the SDK's size: source, minified (terser), and minified + gzip.
import { readFileSync } from "node:fs";
import { gzipSync } from "node:zlib";
import { minify } from "terser";

const source = readFileSync(new URL("../pushgate.js", import.meta.url), "utf8");
const { code } = await minify(source, { module: true, compress: { passes: 2 }, mangle: true });
const kb = (n) => (n / 1024).toFixed(1) + " KiB";
console.log(`pushgate.js: ${kb(Buffer.byteLength(source))} source, ${kb(Buffer.byteLength(code))} minified, ${kb(gzipSync(code).length)} minified + gzip`);
