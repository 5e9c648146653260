// A client written only from docs/protocol.md ("Tasks", "Conventions"): durable tasks over NATS with JSON.
// Usage: [FABRIC_CREDENTIALS=alice.creds] node tasks_client.mjs NATS_URL NODE
// Submits a NATIVE_EXEC task in UDCS's body shape, waits for it, watches fabric.task.events, lists tasks,
// and checks the documented errors (400, 422, 404: headers and JSON bodies).
// Prints one JSON line with what it observed; exits non-zero on any surprise.
import { connect } from "@nats-io/transport-node";
import os from "node:os";
import { fabricConnectOptions } from "./fabric_auth.mjs";

const [url, node] = process.argv.slice(2);
// with auth on: the credentials in $FABRIC_CREDENTIALS, requests in the user's form (fabric_auth.mjs)
const fab = fabricConnectOptions(url);
const nc = await connect(fab.options);
const enc = new TextEncoder();
const dec = new TextDecoder();

function check(cond, what) {
  if (!cond) {
    console.error("FAILED: " + what);
    process.exit(1);
  }
}

// One JSON request. "Test for the Nats-Service-Error-Code header first; a reply without it is a success."
// While no scheduler is active a request gets NATS's "no responders": retry it (the doc says so).
async function call(subject, body, timeout = 10000) {
  for (let attempt = 0; ; attempt++) {
    let msg;
    try {
      msg = await nc.request(fab.subject(subject), enc.encode(JSON.stringify(body)), { timeout });
    } catch (err) {
      const noResponders = String(err?.code) === "503" || /no responders/i.test(String(err?.message));
      if (noResponders && attempt < 100) {
        await new Promise((r) => setTimeout(r, 100));
        continue;
      }
      throw err;
    }
    const code = msg.headers?.get("Nats-Service-Error-Code");
    if (code) {
      return {
        error: {
          code: Number(code),
          text: msg.headers.get("Nats-Service-Error"),
          kind: msg.headers.get("Fabric-Error"),
          body: JSON.parse(dec.decode(msg.data)),
        },
      };
    }
    return JSON.parse(dec.decode(msg.data));
  }
}

// An error reply as the doc's "Errors" section describes it: the three headers, and the body
// {"error": {"code", "kind", "message"}} agreeing with them.
function checkError(reply, code, kind, what) {
  const e = reply.error;
  check(e, `${what}: expected ${code} ${kind}, got a success ${JSON.stringify(reply)}`);
  check(e.code === code && e.kind === kind, `${what}: headers ${JSON.stringify(e)}`);
  check(typeof e.text === "string" && e.text.length > 0, `${what}: Nats-Service-Error ${JSON.stringify(e)}`);
  const b = e.body?.error;
  check(b && b.code === code && b.kind === kind && typeof b.message === "string" && b.message.length > 0,
    `${what}: JSON error body ${JSON.stringify(e.body)}`);
  return { code: e.code, kind: e.kind, message: b.message };
}

const out = {};

// The node, as the registry has it (fabric.nodes.get): its architecture, and whether it has GPUs.
const rec = await call("fabric.nodes.get", { node });
check(!rec.error && rec.node === node, "fabric.nodes.get " + JSON.stringify(rec).slice(0, 500));
const arch = os.machine(); // "x86_64" / "aarch64", the names the doc's Resources table uses
check(rec.host.architecture === arch, `registry architecture ${rec.host.architecture} vs os.machine() ${arch}`);
const gpuLess = rec.gpus.length === 0;

// 1. watch every state change: subscribe before submitting (a live feed, not a log)
const events = [];
let eventWaiter = null;
const evSub = nc.subscribe("fabric.task.events");
(async () => {
  for await (const m of evSub) {
    const batch = JSON.parse(dec.decode(m.data));
    for (const ev of batch.events) {
      events.push(ev);
      eventWaiter?.();
    }
  }
})();
await nc.flush(); // the server has the subscription before the submit

// 2. submit in UDCS's body shape
const udcs = {
  type: "NATIVE_EXEC",
  priority: 7,
  requirements: { min_memory_gb: 0.001, gpu_required: false, architecture: arch },
  args: ["sh", "-c", "echo hello from $0"],
  callback_url: "http://client/webhook",
};
const sub = await call("fabric.task.submit", udcs);
check(!sub.error, "submit " + JSON.stringify(sub));
check(typeof sub.id === "string" && /^[A-Za-z0-9_-]{1,64}$/.test(sub.id), "submit id " + JSON.stringify(sub));
check(sub.existing === false, "submit existing " + JSON.stringify(sub));
const STATES = ["submitted", "queued", "waiting", "running", "succeeded", "failed", "cancelled", "dead"];
check(STATES.includes(sub.state), "submit state " + JSON.stringify(sub));
out.submit_state = sub.state;

// 3. wait until it has ended (wait answers after timeout_s too: ask again then)
let rec2;
for (let i = 0; i < 10; i++) {
  rec2 = await call("fabric.task.wait", { id: sub.id, timeout_s: 30 }, 40000);
  check(!rec2.error, "wait " + JSON.stringify(rec2));
  if (["succeeded", "failed", "cancelled", "dead"].includes(rec2.state)) break;
}
check(rec2.state === "succeeded", "task did not succeed " + JSON.stringify(rec2));
check(rec2.id === sub.id && rec2.kind === "exec" && rec2.exit_code === 0, "record " + JSON.stringify(rec2));
out.result = Buffer.from(rec2.result, "base64").toString();
check(out.result === "hello from sh\n", "result " + JSON.stringify(out.result));
check(rec2.priority === 7 && rec2.callback_url === "http://client/webhook", "as submitted " + JSON.stringify(rec2));
// "UDCS fields folded into resources": architecture -> arch, min_memory_gb -> mem (bytes)
check(rec2.resources && rec2.resources.arch === arch, "resources.arch " + JSON.stringify(rec2.resources));
check(Number.isInteger(rec2.resources.mem) && rec2.resources.mem > 0, "resources.mem " + JSON.stringify(rec2.resources));
out.mem = rec2.resources.mem;
check(rec2.attempts.length === 1 && rec2.attempts[0].node === node && rec2.attempts[0].outcome === "succeeded",
  "attempts " + JSON.stringify(rec2.attempts));
check(rec2.created_ms <= rec2.finished_ms && rec2.error == null, "times/error " + JSON.stringify(rec2));
const got = await call("fabric.task.get", { id: sub.id });
check(got.state === "succeeded" && got.result === rec2.result, "get " + JSON.stringify(got));

// 4. the events feed: every change of this task, in order, ending in succeeded
const mine = () => events.filter((e) => e.id === sub.id);
while (!mine().some((e) => e.state === "succeeded")) {
  await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("no succeeded event: " + JSON.stringify(mine()))), 30000);
    eventWaiter = () => { clearTimeout(timer); resolve(); };
  });
}
eventWaiter = null;
const seen = mine();
out.events = seen.map((e) => `${e.prev}>${e.state}`);
// the doc's States diagram and table
const ALLOWED = {
  "": ["submitted"], // "a task's first event is submitted with prev \"\""
  submitted: ["queued", "waiting", "running", "failed", "cancelled"],
  waiting: ["queued", "running", "failed", "cancelled"],
  queued: ["running", "cancelled"],
  running: ["succeeded", "failed", "queued", "dead", "cancelled"],
};
let prev = "";
for (const e of seen) {
  check(e.prev === prev, `event prev ${JSON.stringify(e)} after ${prev}: ${JSON.stringify(out.events)}`);
  check((ALLOWED[prev] ?? []).includes(e.state), `transition ${prev} -> ${e.state}: ${JSON.stringify(out.events)}`);
  check(typeof e.time_ms === "number" && e.time_ms > 0, "event time_ms " + JSON.stringify(e));
  prev = e.state;
}
check(prev === "succeeded", "last event " + JSON.stringify(out.events));
check(seen.some((e) => e.state === "running" && e.node === node), "a running event on the node " + JSON.stringify(seen));
for (let i = 1; i < seen.length; i++) check(seen[i - 1].time_ms <= seen[i].time_ms, "event times " + JSON.stringify(seen));

// 4b. Node's own name for the architecture (process.arch: "x64", "arm64") selects the same nodes
const alias = await call("fabric.task.submit", { type: "native_exec", args: ["true"],
  requirements: { architecture: process.arch } });
check(!alias.error, `architecture ${process.arch}: ` + JSON.stringify(alias));
const aliasDone = await call("fabric.task.wait", { id: alias.id, timeout_s: 60 }, 70000);
check(aliasDone.state === "succeeded" && aliasDone.attempts[0].node === node, "alias task " + JSON.stringify(aliasDone));
out.alias = process.arch;

// 5. fabric.task.list, JSON: newest first; a state filter
const all = await call("fabric.task.list", { state: "", limit: 100 });
check(!all.error && Array.isArray(all.tasks), "list " + JSON.stringify(all).slice(0, 500));
check(all.tasks.some((t) => t.id === sub.id && t.state === "succeeded"), "our task in the list");
check(all.tasks[0].id === alias.id, "newest first: the last submitted leads " + JSON.stringify(all.tasks.map((t) => t.id)));
for (let i = 1; i < all.tasks.length; i++) {
  check(all.tasks[i - 1].created_ms >= all.tasks[i].created_ms, "list newest first");
}
const ok = await call("fabric.task.list", { state: "succeeded", limit: 5 });
check(!ok.error && ok.tasks.length >= 1 && ok.tasks.length <= 5 && ok.tasks.every((t) => t.state === "succeeded"),
  "list state filter " + JSON.stringify(ok).slice(0, 500));
out.listed = all.tasks.length;

// 6. the documented errors
out.errors = {};
out.errors.bad_type = checkError(await call("fabric.task.submit", { ...udcs, type: "NO_SUCH_TYPE" }),
  400, "bad_request", "unknown type");
const p11 = checkError(await call("fabric.task.submit", { ...udcs, priority: 11 }), 400, "bad_request", "priority 11");
check(p11.message.includes("priority"), "the message names the field: " + p11.message);
out.errors.priority = p11;
const gpu = await call("fabric.task.submit", { ...udcs, requirements: { ...udcs.requirements, gpu_required: true } });
if (gpuLess) {
  out.errors.gpu = checkError(gpu, 422, "infeasible", "gpu_required on a GPU-less node");
  check(out.errors.gpu.message.includes(node), "422 names the node: " + out.errors.gpu.message);
} else {
  // a node with GPUs could run it: accepted, then cancelled
  check(!gpu.error && typeof gpu.id === "string", "gpu_required on a GPU node " + JSON.stringify(gpu));
  await call("fabric.task.cancel", { id: gpu.id });
  out.errors.gpu = { skipped_node_has_gpus: rec.gpus.length };
}
out.errors.get_unknown = checkError(await call("fabric.task.get", { id: "no-such-task-0123" }), 404, "not_found",
  "get of an unknown id");

// the scheduler keeps serving
const again = await call("fabric.task.get", { id: sub.id });
check(again.state === "succeeded", "get after the errors " + JSON.stringify(again));

out.gpu_less = gpuLess;
out.node = node;
out.ok = true;
console.log(JSON.stringify(out));
await nc.close();
process.exit(0);
