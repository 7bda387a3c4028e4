// Unknown-field check for Kubernetes objects, as kubectl's strict field validation does it: walks
// an object along the types that kubernetes-models declares for it (its .d.ts files, generated
// from the Kubernetes OpenAPI document) and returns the path of every field the API does not
// have. The schema validators of kubernetes-models check types, not unknown fields.
import { readFileSync, existsSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const modules = join(dirname(fileURLToPath(import.meta.url)), "node_modules");
const cache = new Map();

// { props: Map(name -> type text), imports: Map(ident -> .d.ts path) } of the interface in file.
function load(file) {
  if (cache.has(file)) return cache.get(file);
  let info = null;
  if (existsSync(file)) {
    const src = readFileSync(file, "utf8").replace(/\/\*[\s\S]*?\*\//g, "");
    const imports = new Map();
    for (const m of src.matchAll(/import \{ (\w+) \} from "([^"]+)";/g)) {
      const spec = m[2].replace(/\.js$/, ""); // kubernetes-models 4 imports "./X", 5 "./X.js"
      const path = spec.startsWith(".") ? resolve(dirname(file), `${spec}.d.ts`) : join(modules, `${spec}.d.ts`);
      imports.set(m[1], path);
    }
    const body = src.match(/export interface \w+(?: extends \w+)? \{\n([\s\S]*?)\n\}/);
    if (body) {
      const props = new Map();
      const lines = body[1].split("\n");
      for (let i = 0; i < lines.length; i++) {
        const m = lines[i].match(/^ {4}"([^"]+)"\??: (.*)$/);
        if (!m) continue;
        let type = m[2];
        if (type === "{") { // a map: { [key: string]: T; }
          const v = lines[i + 1].match(/\[key: string\]: (.*);$/);
          type = `Map<${v ? v[1] : "any"}>`;
        }
        props.set(m[1], type.replace(/;$/, ""));
      }
      info = { props, imports };
    }
  }
  cache.set(file, info);
  return info;
}

function walk(value, file, path, out) {
  const info = load(file);
  if (info == null || value == null || typeof value !== "object" || Array.isArray(value)) return;
  for (const [k, v] of Object.entries(value)) {
    const here = `${path}.${k}`;
    if (!info.props.has(k)) { out.push(here); continue; }
    visitType(info.props.get(k), info, v, here, out);
  }
}

function visitType(type, info, v, path, out) {
  let m;
  if ((m = type.match(/^Array<(\w+)>$/))) {
    if (Array.isArray(v)) v.forEach((e, i) => visitType(m[1], info, e, `${path}[${i}]`, out));
  } else if ((m = type.match(/^Map<(\w+)>$/))) {
    if (v && typeof v === "object") for (const [k, e] of Object.entries(v)) visitType(m[1], info, e, `${path}.${k}`, out);
  } else if (info.imports.has(type)) {
    walk(v, info.imports.get(type), path, out);
  }
}

export function unknownFields(obj) {
  const [group, version] = obj.apiVersion.includes("/") ? obj.apiVersion.split("/") : [null, obj.apiVersion];
  const file = join(modules, "kubernetes-models", ...(group ? [group] : []), version, `${obj.kind}.d.ts`);
  if (!existsSync(file)) return [`(no type for ${obj.apiVersion} ${obj.kind})`];
  const out = [];
  walk(obj, file, "", out);
  return out;
}
