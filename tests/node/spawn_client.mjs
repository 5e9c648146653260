// A client written only from docs/protocol.md: remote processes over NATS with JSON.
// Usage: [FABRIC_CREDENTIALS=alice.creds] node spawn_client.mjs NATS_URL NODE
// Prints one JSON line with what it observed; exits non-zero on any surprise.
import { connect, createInbox } from "@nats-io/transport-node";
import { fabricConnectOptions } from "./fabric_auth.mjs";

const [url, node] = process.argv.slice(2);
// with auth on: the credentials in $FABRIC_CREDENTIALS, requests in the user's form (fabric_auth.mjs)
const fab = fabricConnectOptions(url);
const nc = await connect(fab.options);
const enc = new TextEncoder();
const dec = new TextDecoder();
const b64 = (s) => Buffer.from(s, "base64").toString();

async function call(subject, body, timeout = 10000) {
  const msg = await nc.request(fab.subject(subject), enc.encode(JSON.stringify(body)), { timeout });
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

// 1. stream the output: subscribe to our own subject (in our inbox) first, then spawn with stream_to
const inbox = createInbox(fab.inbox);
const sub = nc.subscribe(inbox);
const got = { stdout: "", stderr: "", seqs: [], exit: null };
const done = (async () => {
  for await (const m of sub) {
    const stream = m.headers.get("Fabric-Stream");
    got.seqs.push(Number(m.headers.get("Fabric-Seq")));
    if (stream === "exit") {
      got.exit = JSON.parse(dec.decode(m.data));
      break;
    }
    got[stream] += dec.decode(m.data);
  }
})();
const sp = await call(`fabric.proc.${node}.spawn`, {
  argv: ["sh", "-c", "echo hello from a remote process; echo oops >&2; exit 5"],
  stream_to: inbox,
});
check(typeof sp.id === "string" && sp.id.startsWith(node + ":") && sp.pid > 0, "spawn reply " + JSON.stringify(sp));
check(sp.subject === `fabric.proc.${node}.out.${sp.id.split(":")[1]}`, "stream subject " + sp.subject);
await done;
out.stdout = got.stdout;
check(got.stdout === "hello from a remote process\n" && got.stderr === "oops\n", "streamed output " + JSON.stringify(got));
check(got.exit.exit_code === 5 && got.exit.reason === "exited" && got.exit.id === sp.id, "exit " + JSON.stringify(got.exit));
check(got.seqs.every((s, i) => s === i + 1), "sequence numbers " + got.seqs);

// 2. wait by id (the node comes from the id), and the tails in the exit
const w = await call(`fabric.proc.${sp.id.split(":")[0]}.wait`, { id: sp.id, timeout_s: 5 });
check(w.state === "exited" && w.exit.exit_code === 5 && b64(w.exit.stderr) === "oops\n", "wait " + JSON.stringify(w));

// 3. one round trip: spawn on any node and wait for the exit in the reply
const run = await call("fabric.proc.spawn", { argv: ["cat"], stdin: Buffer.from("piped in").toString("base64"), wait_s: 10 });
out.run = b64(run.exit.stdout);
check(run.exit && run.exit.exit_code === 0 && out.run === "piped in", "run " + JSON.stringify(run));

// 4. kill a long process with a signal name; limits with a wall timeout
const sleeper = await call(`fabric.proc.${node}.spawn`, { argv: ["sleep", "30"] });
const k = await call(`fabric.proc.${node}.kill`, { id: sleeper.id, signal: "TERM" });
check(k.delivered === true, "kill " + JSON.stringify(k));
const ks = await call(`fabric.proc.${node}.wait`, { id: sleeper.id, timeout_s: 5 });
check(ks.exit.signal === 15 && ks.exit.reason === "killed", "killed " + JSON.stringify(ks));
const timed = await call(`fabric.proc.${node}.spawn`, { argv: ["sleep", "30"], limits: { wall_s: 0.3 }, wait_s: 10 });
check(timed.enforced.includes("limits.wall_s") && timed.exit.reason === "timeout", "wall_s " + JSON.stringify(timed));

// 5. errors are typed and the spawner keeps serving
const missing = await call(`fabric.proc.${node}.spawn`, { argv: ["no-such-program-xyz"] });
out.missing = missing.error;
check(missing.error && missing.error.code === 404 && missing.error.kind === "executable_not_found", "missing " + JSON.stringify(missing));
const neg = await call(`fabric.proc.${node}.spawn`, { argv: ["true"], limits: { cpu_s: -1 } });
out.negative = neg.error;
check(neg.error && neg.error.code === 400, "negative limit " + JSON.stringify(neg));
const unknown = await call(`fabric.proc.${node}.status`, { id: `${node}:nope-1` });
check(unknown.error && unknown.error.code === 404 && unknown.error.kind === "unknown_process", "unknown " + JSON.stringify(unknown));

// 6. output that is over before the spawn reply arrives (echo): the two ways protocol.md calls safe
//    get every byte and the exit, every time; subscribing after the reply would miss them
const ROUNDS = 20;
function collector(sub, idOf) {
  // per process id: stdout text and the exit; resolves waiters when a process's exit arrives
  const seen = new Map();
  const waiters = new Map();
  const entry = (id) => {
    if (!seen.has(id)) seen.set(id, { stdout: "", exit: null, seqs: [] });
    return seen.get(id);
  };
  (async () => {
    for await (const m of sub) {
      const id = idOf(m);
      const e = entry(id);
      e.seqs.push(Number(m.headers.get("Fabric-Seq")));
      const stream = m.headers.get("Fabric-Stream");
      if (stream === "exit") {
        e.exit = JSON.parse(dec.decode(m.data));
        waiters.get(id)?.();
      } else if (stream === "stdout") {
        e.stdout += dec.decode(m.data);
      }
    }
  })();
  return (id) => new Promise((resolve, reject) => {
    const e = entry(id);
    if (e.exit) return resolve(e);
    const timer = setTimeout(() => reject(new Error("no exit message for " + id + ": " + JSON.stringify(e))), 10000);
    waiters.set(id, () => { clearTimeout(timer); resolve(e); });
  });
}
function checkEcho(e, id, how) {
  check(e.stdout === "hi\n", `${how}: stdout of ${id} ${JSON.stringify(e)}`);
  check(e.exit && e.exit.exit_code === 0 && e.exit.id === id, `${how}: exit of ${id} ${JSON.stringify(e)}`);
  check(e.seqs.every((s, i) => s === i + 1), `${how}: sequence numbers of ${id} ${e.seqs}`);
}
out.immediate = { stream_to: 0, wildcard: 0 };
// 6a. stream_to: our own subject, subscribed before the spawn (same connection: the server has it first)
for (let i = 0; i < ROUNDS; i++) {
  const subject = createInbox(fab.inbox);
  const s = nc.subscribe(subject);
  const exitOf = collector(s, (m) => m.headers.get("Fabric-Proc"));
  const r = await call(`fabric.proc.${node}.spawn`, { argv: ["echo", "hi"], stream_to: subject, announce: false });
  check(typeof r.id === "string", "spawn " + JSON.stringify(r));
  checkEcho(await exitOf(r.id), r.id, "stream_to");
  s.unsubscribe();
  out.immediate.stream_to++;
}
// 6b. the node's wildcard, subscribed before spawning; a process's messages are told apart by the
//     subject's last token (the local part of its id), and may come before its spawn reply
const all = nc.subscribe(`fabric.proc.${node}.out.>`);
const exitByLocal = collector(all, (m) => m.subject.split(".").pop());
for (let i = 0; i < ROUNDS; i++) {
  const r = await call(`fabric.proc.${node}.spawn`, { argv: ["echo", "hi"] });
  const local = r.id.split(":")[1];
  check(r.subject === `fabric.proc.${node}.out.${local}`, "subject " + JSON.stringify(r));
  checkEcho(await exitByLocal(local), r.id, "wildcard");
  out.immediate.wildcard++;
}
all.unsubscribe();

out.node = node;
out.ok = true;
console.log(JSON.stringify(out));
await nc.close();
