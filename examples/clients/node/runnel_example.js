// A Runnel client in Node.js, from the gRPC API alone (no record-batch codec).
//
//   node runnel_example.js --broker HOST:PORT create-topic NAME [--partitions N]
//   node runnel_example.js --broker HOST:PORT produce TOPIC [--header K=V] < lines   (KEY<TAB>VALUE per line)
//   node runnel_example.js --broker HOST:PORT consume TOPIC [--max N]
//   node runnel_example.js --broker HOST:PORT group GROUP TOPIC [--max N]
//   node runnel_example.js --broker HOST:PORT tail TOPIC
//
// Against brokers that require authentication, add --user USER --password PASSWORD
// [--scram-mechanism SCRAM-SHA-512]; over TLS, --tls-ca [--tls-cert --tls-key].
//
// Run ./setup.sh first (npm packages); the stubs are built from proto/ at start.
'use strict';

const crypto = require('crypto');
const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_DIR = path.join(__dirname, '..', '..', '..', 'proto', 'grpc', 'proto');
const definition = protoLoader.loadSync('runnel/v1/runnel.proto', {
  includeDirs: [PROTO_DIR],
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
});
const v1 = grpc.loadPackageDefinition(definition).runnel.v1;

const FETCH_BYTES = 1 << 20;

class RunnelError extends Error {
  constructor(code, message) {
    super(`${code}: ${message}`);
    this.code = code;
  }
}

// A unary call as a promise; a failure becomes RunnelError with the broker's error code.
function call(stub, method, request) {
  return new Promise((resolve, reject) => {
    stub[method](request, (err, response) => {
      if (!err) return resolve(response);
      const code = (err.metadata && err.metadata.get('runnel-error-code')[0]) || grpc.status[err.code];
      reject(new RunnelError(code, err.details));
    });
  });
}

// Throws the per-partition or per-record error of a response, if any.
function check(error) {
  if (error && error.code && error.code !== 'NONE') throw new RunnelError(error.code, error.message);
}

class Runnel {
  // tls: { ca, cert, key } file paths to connect over TLS (cert and key for mutual TLS).
  constructor(address, tls = null) {
    this.address = address;
    this.stubs = new Map();
    this.interceptors = [];
    this.credentials = tls && tls.ca
      ? grpc.credentials.createSsl(
        fs.readFileSync(tls.ca),
        tls.key ? fs.readFileSync(tls.key) : null,
        tls.cert ? fs.readFileSync(tls.cert) : null,
      )
      : grpc.credentials.createInsecure();
  }

  stub(service, address = this.address) {
    const key = `${service}@${address}`;
    if (!this.stubs.has(key)) {
      this.stubs.set(key, new v1[service](address, this.credentials, { interceptors: this.interceptors }));
    }
    return this.stubs.get(key);
  }

  // SCRAM (RFC 5802) over the Security service: the session token then goes with every
  // call (it is valid on every broker, for an hour by default), and the client logs in
  // again at half its lifetime. The password never leaves this process: only a proof
  // derived from it does.
  async login(user, password, mechanism = 'SCRAM-SHA-256') {
    const digest = mechanism.toUpperCase().endsWith('512') ? 'sha512' : 'sha256';
    const hmac = (key, data) => crypto.createHmac(digest, key).update(data).digest();
    const nonce = crypto.randomBytes(18).toString('base64');
    const firstBare = `n=${user},r=${nonce}`;
    // A stub of its own, without the token: logging in needs none.
    const security = new v1.Security(this.address, this.credentials);
    const started = await call(security, 'AuthenticateStart', {
      mechanism: digest === 'sha512' ? 'SCRAM_SHA_512' : 'SCRAM_SHA_256',
      client_first: `n,,${firstBare}`,
    });
    const attributes = Object.fromEntries(started.server_first.split(',').map((p) => [p[0], p.slice(2)]));
    if (!attributes.r.startsWith(nonce)) throw new RunnelError('AUTHENTICATION_FAILED', "the broker's nonce does not extend ours");
    const salted = crypto.pbkdf2Sync(password, Buffer.from(attributes.s, 'base64'), Number(attributes.i),
      digest === 'sha512' ? 64 : 32, digest);
    const clientKey = hmac(salted, 'Client Key');
    const storedKey = crypto.createHash(digest).update(clientKey).digest();
    const withoutProof = `c=biws,r=${attributes.r}`;
    const authMessage = `${firstBare},${started.server_first},${withoutProof}`;
    const signature = hmac(storedKey, authMessage);
    const proof = Buffer.from(clientKey.map((b, i) => b ^ signature[i]));
    const finished = await call(security, 'AuthenticateFinish', {
      handshake_id: started.handshake_id,
      client_final: `${withoutProof},p=${proof.toString('base64')}`,
    });
    const expected = hmac(hmac(salted, 'Server Key'), authMessage).toString('base64');
    if (finished.server_final !== `v=${expected}`) {
      throw new RunnelError('AUTHENTICATION_FAILED', "the broker does not know this user's credential");
    }
    security.close();
    this.token = finished.token;
    if (this.interceptors.length === 0) {
      this.interceptors = [(options, nextCall) => new grpc.InterceptingCall(nextCall(options), {
        start: (metadata, listener, next) => {
          metadata.set('authorization', `Bearer ${this.token}`);
          next(metadata, listener);
        },
      })];
      this.stubs.clear();
    }
    this.renewIn(Number(finished.expires_in_ms) / 2, user, password, mechanism);
  }

  // Logs in again after `ms` (a second after a failed attempt), without keeping the
  // process alive for it.
  renewIn(ms, user, password, mechanism) {
    clearTimeout(this.renewal);
    this.renewal = setTimeout(() => {
      this.login(user, password, mechanism).catch((err) => {
        console.error(`renewing the session failed: ${err.message}`);
        this.renewIn(1000, user, password, mechanism);
      });
    }, ms);
    this.renewal.unref();
  }

  async createTopic(name, partitions) {
    const request = { name };
    if (partitions !== undefined) request.partitions = partitions;
    return (await call(this.stub('Admin'), 'CreateTopic', request)).topic;
  }

  // [[partition, leader address], ...]
  async partitions(topic) {
    const meta = await call(this.stub('Admin'), 'Metadata', { topics: [topic] });
    const brokers = new Map(meta.brokers.map((b) => [b.id, b.address]));
    const found = meta.topics.find((t) => t.name === topic);
    if (!found) throw new RunnelError('UNKNOWN_TOPIC', `no topic ${topic}`);
    check(found.error);
    return found.partitions.map((p) => [p.partition, brokers.get(p.leader) || this.address]);
  }

  // records: [{key, value, headers: {k: v}}]; the broker picks each keyed record's
  // partition with murmur2. Returns [[partition, offset], ...].
  async produce(topic, records) {
    const messages = records.map((r) => {
      const message = {
        value: Buffer.from(r.value),
        headers: Object.entries(r.headers || {}).map(([key, value]) => ({ key, value: Buffer.from(value) })),
      };
      if (r.key !== null && r.key !== undefined) message.key = Buffer.from(r.key);
      return message;
    });
    const response = await call(this.stub('Producer'), 'Produce', { topic, records: messages, acks: 'ACKS_ALL' });
    check(response.error);
    const placed = response.records.map((r) => [r.partition, Number(r.offset)]);
    // Records placed on partitions the asked broker does not lead come back NOT_LEADER:
    // they go to their leaders.
    const retry = new Map();
    response.records.forEach((r, i) => {
      if (!r.error || r.error.code === 'NONE') return;
      if (r.error.code !== 'NOT_LEADER') check(r.error);
      if (!retry.has(r.partition)) retry.set(r.partition, []);
      retry.get(r.partition).push(i);
    });
    if (retry.size > 0) {
      const leaders = new Map(await this.partitions(topic));
      for (const [partition, indexes] of retry) {
        const answer = await call(this.stub('Producer', leaders.get(partition)), 'Produce', {
          topic,
          acks: 'ACKS_ALL',
          partitions: [{ partition, messages: indexes.map((i) => messages[i]) }],
        });
        check(answer.error);
        check(answer.partitions[0].error);
        indexes.forEach((i, n) => { placed[i] = [partition, Number(answer.partitions[0].base_offset) + n]; });
      }
    }
    return placed;
  }

  async fetch(topic, partition, offset, leader, waitMs = 500) {
    const response = await call(this.stub('Consumer', leader), 'Fetch', {
      partitions: [{ topic, partition, offset: String(offset) }],
      max_wait_ms: waitMs,
      // Stored bytes per response (at least one batch comes back): the messages stay
      // within gRPC's default 4 MiB receive limit.
      max_bytes: FETCH_BYTES,
      format: 'RECORD_FORMAT_MESSAGES',
    });
    const fetched = response.partitions[0];
    check(fetched.error);
    return fetched.messages;
  }

  async earliest(topic, partition, leader) {
    const response = await call(this.stub('Consumer', leader), 'ListOffsets', {
      queries: [{ topic, partition, earliest: true }],
    });
    check(response.answers[0].error);
    return Number(response.answers[0].offset);
  }

  async coordinator(group) {
    const found = await call(this.stub('Groups'), 'FindCoordinator', { group_id: group });
    return this.stub('Groups', found.address || this.address);
  }
}

const text = (bytes) => (bytes ? Buffer.from(bytes).toString() : '');

function show(message) {
  const headers = message.headers.map((h) => `${h.key}=${text(h.value)}`).join(',');
  const key = message.key === null || message.key === undefined ? '-' : text(message.key);
  process.stdout.write(`${message.offset}\t${key}\t${text(message.value)}\t${headers}\n`);
}

// Reads every partition from its start; stops after max records or 2 s of silence.
async function consume(client, topic, max) {
  const positions = new Map();
  for (const [partition, leader] of await client.partitions(topic)) {
    positions.set(partition, [await client.earliest(topic, partition, leader), leader]);
  }
  let seen = 0;
  let quietSince = Date.now();
  while (seen < max && Date.now() - quietSince < 2000) {
    for (const [partition, [offset, leader]] of positions) {
      let next = offset;
      for (const message of await client.fetch(topic, partition, offset, leader, 100)) {
        show(message);
        seen += 1;
        next = Number(message.offset) + 1;
        quietSince = Date.now();
      }
      positions.set(partition, [next, leader]);
    }
  }
}

// Joins the group, reads the partitions it is given from the committed offsets, commits
// after each batch, and leaves: heartbeat with an empty member id to join; each answer
// carries the member epoch and the partitions owned from now on; -1 leaves.
async function groupMember(client, group, topic, max) {
  const groups = await client.coordinator(group);
  const leaders = new Map(await client.partitions(topic));
  let memberId = '';
  let epoch = 0;
  let owned = [];
  let positions = new Map();
  let seen = 0;
  let lastHeartbeat = 0;
  let interval = 1000;
  let quietSince = Date.now();
  while (seen < max && Date.now() - quietSince < 3000) {
    if (Date.now() - lastHeartbeat >= interval) {
      const answer = await call(groups, 'Heartbeat', {
        group_id: group,
        member_id: memberId,
        member_epoch: epoch,
        client_id: 'node-example',
        topics: [topic],
        session_timeout_ms: 10000,
        owned: [{ topic, partitions: owned }],
      });
      memberId = answer.member_id;
      epoch = answer.member_epoch;
      interval = Math.max(answer.heartbeat_interval_ms, 100);
      lastHeartbeat = Date.now();
      owned = answer.assignment.filter((a) => a.topic === topic).flatMap((a) => a.partitions).sort();
      positions = new Map([...positions].filter(([p]) => owned.includes(p)));
      const missing = owned.filter((p) => !positions.has(p));
      if (missing.length > 0) {
        const committed = await call(groups, 'FetchOffsets', { group_id: group, topics: [topic] });
        const known = new Map(committed.offsets.filter((c) => c.topic === topic).map((c) => [c.partition, Number(c.offset)]));
        for (const p of missing) {
          positions.set(p, known.has(p) ? known.get(p) : await client.earliest(topic, p, leaders.get(p)));
        }
      }
    }
    for (const [partition, offset] of positions) {
      const messages = await client.fetch(topic, partition, offset, leaders.get(partition), 100);
      if (messages.length === 0) continue;
      messages.forEach(show);
      seen += messages.length;
      const next = Number(messages[messages.length - 1].offset) + 1;
      positions.set(partition, next);
      quietSince = Date.now();
      await call(groups, 'CommitOffsets', {
        group_id: group,
        member_id: memberId,
        member_epoch: epoch,
        offsets: [{ topic, partition, offset: String(next) }],
      });
    }
  }
  if (memberId) {
    await call(groups, 'Heartbeat', { group_id: group, member_id: memberId, member_epoch: -1 });
  }
}

// Like `tail -f`: a streaming fetch from the end of every partition, until Ctrl-C.
async function tail(client, topic) {
  const consumer = client.stub('Consumer');
  const partitions = [];
  for (const [partition] of await client.partitions(topic)) {
    const answer = await call(consumer, 'ListOffsets', { queries: [{ topic, partition, latest: true }] });
    partitions.push({ topic, partition, offset: answer.answers[0].offset });
  }
  const stream = consumer.FetchStream({
    partitions, max_wait_ms: 500, max_bytes: FETCH_BYTES, format: 'RECORD_FORMAT_MESSAGES',
  });
  stream.on('data', (response) => {
    for (const fetched of response.partitions) {
      check(fetched.error);
      fetched.messages.forEach(show);
    }
  });
  await new Promise((resolve, reject) => {
    stream.on('end', resolve);
    stream.on('error', reject);
    process.on('SIGINT', () => { stream.cancel(); resolve(); });
    process.on('SIGTERM', () => { stream.cancel(); resolve(); });
  }).catch((err) => { if (err.code !== grpc.status.CANCELLED) throw err; });
}

function readStdin() {
  return new Promise((resolve) => {
    let data = '';
    process.stdin.setEncoding('utf8');
    process.stdin.on('data', (chunk) => { data += chunk; });
    process.stdin.on('end', () => resolve(data));
  });
}

async function main() {
  const args = process.argv.slice(2);
  let broker = '127.0.0.1:7070';
  const options = {};
  const positional = [];
  const headers = {};
  const tls = {};
  const login = { user: process.env.RUNNEL_USER, password: process.env.RUNNEL_PASSWORD || '', mechanism: 'SCRAM-SHA-256' };
  for (let i = 0; i < args.length; i += 1) {
    if (args[i] === '--broker') broker = args[++i];
    else if (args[i] === '--user') login.user = args[++i];
    else if (args[i] === '--password') login.password = args[++i];
    else if (args[i] === '--scram-mechanism') login.mechanism = args[++i];
    else if (args[i] === '--tls-ca') tls.ca = args[++i];
    else if (args[i] === '--tls-cert') tls.cert = args[++i];
    else if (args[i] === '--tls-key') tls.key = args[++i];
    else if (args[i] === '--header') {
      const [k, ...v] = args[++i].split('=');
      headers[k] = v.join('=');
    } else if (args[i].startsWith('--')) options[args[i].slice(2)] = Number(args[++i]);
    else positional.push(args[i]);
  }
  const client = new Runnel(broker, tls);
  if (login.user) await client.login(login.user, login.password, login.mechanism);
  const [command, ...rest] = positional;
  const max = options.max || Number.MAX_SAFE_INTEGER;
  switch (command) {
    case 'create-topic': {
      const topic = await client.createTopic(rest[0], options.partitions);
      console.log(`created ${topic.name} with ${topic.partitions.length} partitions`);
      break;
    }
    case 'produce': {
      const lines = (await readStdin()).split('\n').filter((l) => l.length > 0);
      const records = lines.map((line) => {
        const tab = line.indexOf('\t');
        return tab < 0
          ? { key: null, value: line, headers }
          : { key: line.slice(0, tab), value: line.slice(tab + 1), headers };
      });
      for (const [partition, offset] of await client.produce(rest[0], records)) {
        console.log(`${partition}\t${offset}`);
      }
      break;
    }
    case 'consume': await consume(client, rest[0], max); break;
    case 'group': await groupMember(client, rest[0], rest[1], max); break;
    case 'tail': await tail(client, rest[0]); break;
    default:
      console.error('usage: node runnel_example.js --broker HOST:PORT create-topic|produce|consume|group|tail ...');
      process.exit(2);
  }
  process.exit(0);
}

main().catch((err) => {
  console.error(`error: ${err.message}`);
  process.exit(1);
});
