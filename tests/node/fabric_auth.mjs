// Connecting a nats.js program to a fabric with auth on (docs/protocol.md, "Connecting").
// Copy this file: it reads a fabric credentials file (alice.creds, written by `fabric user add`)
// and gives what the three rules for a client ask for:
//   1. authenticate with the nkey seed         -> options.authenticator
//   2. receive replies under _INBOX.<user>      -> options.inboxPrefix, and `inbox` for your own subjects
//   3. send requests in the user form           -> subject("fabric.mem.alloc") == "fabric.u.alice.mem.alloc"
// A user of role admin sends the plain subjects. Without a credentials file (FABRIC_CREDENTIALS unset
// or empty) it connects without auth, with plain subjects: a fabric started with `fabric up --no-auth`.
//
//   import { connect, createInbox } from "@nats-io/transport-node";
//   const fab = fabricConnectOptions("nats://10.0.0.5:4222");
//   const nc = await connect(fab.options);
//   await nc.request(fab.subject("fabric.mem.alloc"), ...);   // replies arrive under fab.inbox
//   const mine = createInbox(fab.inbox);                      // a stream_to / notify subject you may read
import { readFileSync } from "node:fs";
import { nkeyAuthenticator } from "@nats-io/transport-node";

const SEED_BEGIN = "-----BEGIN USER NKEY SEED-----";

// The fields of a credentials file: "user: alice", "role: client", and the seed (the line after SEED_BEGIN).
export function readCredentials(path) {
  const lines = readFileSync(path, "utf8").split(/\r?\n/);
  const fields = {};
  let seed = null;
  lines.forEach((line, i) => {
    if (line.trim() === SEED_BEGIN) seed = lines[i + 1]?.trim();
    const m = /^([a-z_]+):\s*(.*?)\s*$/.exec(line);
    if (m && !(m[1] in fields)) fields[m[1]] = m[2];
  });
  if (!seed || !fields.user) throw new Error(`${path} is not a fabric credentials file (no user or seed)`);
  const ca = /-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/.exec(lines.join("\n"));
  return { user: fields.user, role: fields.role || "client", seed, url: fields.url || null, ca: ca?.[0] ?? null };
}

// { options, user, role, subject, inbox }: `options` for connect(); `subject(s)` maps a plain
// "fabric.…" request subject to the one this user sends; `inbox` is the prefix of every subject
// this connection may subscribe to (pass it to createInbox). `path` defaults to $FABRIC_CREDENTIALS.
export function fabricConnectOptions(servers, path = process.env.FABRIC_CREDENTIALS) {
  if (!path) {
    // no auth: plain subjects, the default inbox
    return { options: { servers }, user: null, role: null, subject: (s) => s, inbox: "_INBOX" };
  }
  const c = readCredentials(path);
  const inbox = `_INBOX.${c.user}`; // the only inbox a client may subscribe to (admins: any; keep this one)
  const options = {
    servers: servers || c.url,
    authenticator: nkeyAuthenticator(new TextEncoder().encode(c.seed)),
    inboxPrefix: inbox, // request() replies arrive under it
  };
  if (c.ca) options.tls = { ca: c.ca }; // a fabric with TLS: trust its CA only
  const subject = (s) => {
    if (c.role === "admin") return s;
    if (!s.startsWith("fabric.")) throw new Error(`${s} is not a fabric subject`);
    return `fabric.u.${c.user}.${s.slice("fabric.".length)}`;
  };
  return { options, user: c.user, role: c.role, subject, inbox };
}
