// A client written only from docs/protocol.md: remote memory over NATS with JSON.
// Usage: [FABRIC_CREDENTIALS=alice.creds] node mem_client.mjs NATS_URL
// Prints one JSON line with what it observed; exits non-zero on any surprise.
import { connect } from "@nats-io/transport-node";
import { fabricConnectOptions } from "./fabric_auth.mjs";

const url = process.argv[2];
// with auth on: the credentials in $FABRIC_CREDENTIALS, requests in the user's form (fabric_auth.mjs)
const fab = fabricConnectOptions(url);
const nc = await connect(fab.options);
const enc = new TextEncoder();
const dec = new TextDecoder();

async function call(subject, body) {
  const msg = await nc.request(fab.subject(subject), enc.encode(JSON.stringify(body)), { timeout: 5000 });
  const code = msg.headers?.get("Nats-Service-Error-Code");
  if (code) {
    return { error: { code: Number(code), text: msg.headers.get("Nats-Service-Error"), kind: msg.headers.get("Fabric-Error") } };
  }
  return JSON.parse(dec.decode(msg.data));
}

function check(cond, what) {
  if (!cond) {
    console.error("FAILED: " + what);
    process.exit(1);
  }
}

const out = {};
// 1. alloc on any node: the reply names the node; every later subject comes from the handle
const a = await call("fabric.mem.alloc", { size: 64 });
check(typeof a.handle === "string" && a.size === 64, "alloc reply " + JSON.stringify(a));
const node = a.handle.split(":")[1];
check(node === a.node, "handle names the node");
const subj = (verb) => `fabric.mem.${node}.${verb}`;

// 2. write (bytes are base64 in JSON) and read back
const text = "hello from node.js";
const w = await call(subj("write"), { handle: a.handle, offset: 4, data: Buffer.from(text).toString("base64") });
check(w.written === text.length, "write reply " + JSON.stringify(w));
const r = await call(subj("read"), { handle: a.handle, offset: 4, length: text.length });
out.read = Buffer.from(r.data, "base64").toString();
check(out.read === text, "read back " + out.read);

// 3. free, then the error case: a second free is a double free (409)
const f = await call(subj("free"), { handle: a.handle });
check(f.freed === 64, "free reply " + JSON.stringify(f));
const again = await call(subj("free"), { handle: a.handle });
out.double_free = again.error;
check(again.error && again.error.code === 409 && again.error.kind === "double_free", "double free " + JSON.stringify(again));

// 4. malformed input is a 400, not a crash
const bad = await call("fabric.mem.alloc", { size: -1 });
out.bad_request = bad.error;
check(bad.error && bad.error.code === 400, "bad size " + JSON.stringify(bad));

out.node = node;
out.ok = true;
console.log(JSON.stringify(out));
await nc.close();
