"""A Runnel client in Python, from the gRPC stubs alone (no record-batch codec).

    python runnel_example.py --broker HOST:PORT create-topic NAME [--partitions N]
    python runnel_example.py --broker HOST:PORT produce TOPIC < lines       (KEY<TAB>VALUE per line)
    python runnel_example.py --broker HOST:PORT consume TOPIC [--max N]
    python runnel_example.py --broker HOST:PORT group GROUP TOPIC [--max N]
    python runnel_example.py --broker HOST:PORT tail TOPIC
    python runnel_example.py --broker HOST:PORT bench-produce TOPIC --records N
    python runnel_example.py --broker HOST:PORT bench-consume TOPIC

Against brokers that require authentication, add --user USER --password PASSWORD
[--scram-mechanism SCRAM-SHA-512] (SCRAM with the Security service, then the session
token on every call); over TLS, --tls-ca [--tls-cert --tls-key].

Run ./setup.sh first: it makes .venv and generates the stubs into gen/.
"""

import argparse
import base64
import collections
import hashlib
import hmac
import os
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "gen"))

import grpc  # noqa: E402
from runnel.v1 import runnel_pb2 as pb  # noqa: E402
from runnel.v1 import runnel_pb2_grpc as rpc  # noqa: E402

ERROR_KEY = "runnel-error-code"
FETCH_BYTES = 1 << 20
RETRIABLE = {
    "NOT_LEADER",
    "LEADER_NOT_AVAILABLE",
    "REQUEST_TIMED_OUT",
    "NOT_ENOUGH_REPLICAS",
    "CONTROLLER_NOT_AVAILABLE",
    "NOT_COORDINATOR",
    "COORDINATOR_NOT_AVAILABLE",
    "COORDINATOR_LOAD_IN_PROGRESS",
}


class RunnelError(Exception):
    """A failed call: the broker's error code name and its message."""

    def __init__(self, code, message):
        super().__init__(f"{code}: {message}")
        self.code = code


def call(method, request):
    """Calls a unary RPC; a failure becomes RunnelError with the broker's error code."""
    try:
        return method(request)
    except grpc.RpcError as err:
        code = dict(err.trailing_metadata() or ()).get(ERROR_KEY, err.code().name)
        raise RunnelError(code, err.details()) from None


def check(error):
    """Raises the per-partition or per-record error of a response, if any."""
    if error is not None and error.code != pb.NONE:
        raise RunnelError(pb.ErrorCode.Name(error.code), error.message)


def read_file(path):
    with open(path, "rb") as f:
        return f.read()


def scram_login(channel, user, password, mechanism):
    """Authenticates with SCRAM (RFC 5802) over the Security service; returns the session
    token and how many milliseconds it stays valid. The password never leaves this
    process: only a proof derived from it does."""
    digest = "sha512" if mechanism.upper().endswith("512") else "sha256"
    nonce = base64.b64encode(os.urandom(18)).decode()
    first_bare = f"n={user},r={nonce}"
    security = rpc.SecurityStub(channel)
    started = call(
        security.AuthenticateStart,
        pb.AuthenticateStartRequest(
            mechanism=pb.SCRAM_SHA_512 if digest == "sha512" else pb.SCRAM_SHA_256,
            client_first="n,," + first_bare,
        ),
    )
    attributes = dict(part.split("=", 1) for part in started.server_first.split(","))
    server_nonce = attributes["r"]
    if not server_nonce.startswith(nonce):
        raise RunnelError("AUTHENTICATION_FAILED", "the broker's nonce does not extend ours")
    salted = hashlib.pbkdf2_hmac(digest, password.encode(), base64.b64decode(attributes["s"]), int(attributes["i"]))
    client_key = hmac.new(salted, b"Client Key", digest).digest()
    stored_key = hashlib.new(digest, client_key).digest()
    without_proof = f"c=biws,r={server_nonce}"
    auth_message = f"{first_bare},{started.server_first},{without_proof}".encode()
    signature = hmac.new(stored_key, auth_message, digest).digest()
    proof = bytes(a ^ b for a, b in zip(client_key, signature))
    finished = call(
        security.AuthenticateFinish,
        pb.AuthenticateFinishRequest(
            handshake_id=started.handshake_id,
            client_final=f"{without_proof},p={base64.b64encode(proof).decode()}",
        ),
    )
    server_key = hmac.new(salted, b"Server Key", digest).digest()
    expected = base64.b64encode(hmac.new(server_key, auth_message, digest).digest()).decode()
    if finished.server_final != "v=" + expected:
        raise RunnelError("AUTHENTICATION_FAILED", "the broker does not know this user's credential")
    return finished.token, finished.expires_in_ms


class Session:
    """A SCRAM login that renews itself: once half of its token's lifetime has passed,
    the next call logs in again, so a client that runs for hours keeps working."""

    def __init__(self, open_channel, user, password, mechanism):
        def login():
            with open_channel() as channel:
                return scram_login(channel, user, password, mechanism)

        self.login = login
        self.lock = threading.Lock()
        self.token, self.renew_at = None, 0.0
        self.header()

    def header(self):
        with self.lock:
            if self.token is None or time.monotonic() >= self.renew_at:
                token, expires_in_ms = self.login()
                self.token = token
                self.renew_at = time.monotonic() + expires_in_ms / 2000.0
            return ("authorization", "Bearer " + self.token)


class _CallDetails(
    collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
    grpc.ClientCallDetails,
):
    pass


class TokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer TOKEN` to every call of a channel, from a Session."""

    def __init__(self, session):
        self.session = session

    def _with_token(self, details):
        metadata = list(details.metadata or []) + [self.session.header()]
        return _CallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready, details.compression
        )

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._with_token(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._with_token(details), requests)


class Runnel:
    def __init__(self, broker, tls_ca=None, tls_cert=None, tls_key=None, login=None):
        self.address = broker
        # Over TLS: trust the CA that signed the brokers' certificates, and present a
        # client certificate when the brokers require mutual TLS.
        self.credentials = None
        if tls_ca is not None:
            self.credentials = grpc.ssl_channel_credentials(
                root_certificates=read_file(tls_ca),
                private_key=read_file(tls_key) if tls_key else None,
                certificate_chain=read_file(tls_cert) if tls_cert else None,
            )
        # With a login, one SCRAM exchange gives a token every broker of the cluster
        # takes (valid for an hour by default); the session logs in again before it ends.
        self.session = None
        if login is not None:
            user, password, mechanism = login
            self.session = Session(lambda: self.raw_channel(broker), user, password, mechanism)
        self.channel = self.open_channel(broker)
        self.admin = rpc.AdminStub(self.channel)
        self.producer = rpc.ProducerStub(self.channel)
        self.consumer = rpc.ConsumerStub(self.channel)
        self.groups = rpc.GroupsStub(self.channel)
        self.leaders = {}

    def create_topic(self, name, partitions=None):
        request = pb.CreateTopicRequest(name=name)
        if partitions is not None:
            request.partitions = partitions
        return call(self.admin.CreateTopic, request).topic

    def partitions(self, topic):
        """(partition, leader address) of every partition of the topic."""
        meta = call(self.admin.Metadata, pb.MetadataRequest(topics=[topic]))
        brokers = {b.id: b.address for b in meta.brokers}
        for t in meta.topics:
            if t.name == topic:
                check(t.error if t.HasField("error") else None)
                return [(p.partition, brokers.get(p.leader, self.address)) for p in t.partitions]
        raise RunnelError("UNKNOWN_TOPIC", f"no topic {topic!r}")

    def raw_channel(self, address):
        """A channel without the session's token (logging in needs none)."""
        if self.credentials is None:
            return grpc.insecure_channel(address)
        return grpc.secure_channel(address, self.credentials)

    def open_channel(self, address):
        channel = self.raw_channel(address)
        if self.session is not None:
            channel = grpc.intercept_channel(channel, TokenInterceptor(self.session))
        return channel

    def stub_for(self, address, kind):
        key = (address, kind)
        if key not in self.leaders:
            channel = self.channel if address == self.address else self.open_channel(address)
            self.leaders[key] = kind(channel)
        return self.leaders[key]

    def produce(self, topic, records):
        """Sends (key, value, headers) tuples; the broker picks each keyed record's
        partition with murmur2, as Kafka's clients do. Returns [(partition, offset)]."""
        messages = [
            pb.Record(
                key=None if key is None else key.encode(),
                value=value.encode(),
                headers=[pb.Header(key=k, value=v.encode()) for k, v in headers.items()],
            )
            for key, value, headers in records
        ]
        request = pb.ProduceRequest(topic=topic, records=messages, acks=pb.ACKS_ALL)
        response = call(self.producer.Produce, request)
        check(response.error if response.HasField("error") else None)
        placed = [(r.partition, r.offset) for r in response.records]
        # On a cluster the broker asked may not lead every partition it placed records
        # on: those come back NOT_LEADER with their partition, and go to its leader.
        retry = {}
        for i, result in enumerate(response.records):
            if not result.HasField("error") or result.error.code == pb.NONE:
                continue
            if result.error.code != pb.NOT_LEADER:
                check(result.error)
            retry.setdefault(result.partition, []).append(i)
        if retry:
            leaders = dict(self.partitions(topic))
            for partition, indexes in retry.items():
                producer = self.stub_for(leaders[partition], rpc.ProducerStub)
                batch = pb.PartitionRecords(
                    partition=partition, messages=[messages[i] for i in indexes]
                )
                answer = call(
                    producer.Produce,
                    pb.ProduceRequest(topic=topic, partitions=[batch], acks=pb.ACKS_ALL),
                )
                check(answer.error if answer.HasField("error") else None)
                written = answer.partitions[0]
                check(written.error if written.HasField("error") else None)
                for n, i in enumerate(indexes):
                    placed[i] = (partition, written.base_offset + n)
        return placed

    def fetch(self, topic, partition, offset, leader, wait_ms=500):
        """Records of one partition from `offset` on, as messages."""
        consumer = self.stub_for(leader, rpc.ConsumerStub)
        request = pb.FetchRequest(
            partitions=[pb.FetchPartition(topic=topic, partition=partition, offset=offset)],
            max_wait_ms=wait_ms,
            # Stored bytes per response (at least one batch comes back): the messages
            # stay within gRPC's default 4 MiB receive limit.
            max_bytes=FETCH_BYTES,
            format=pb.RECORD_FORMAT_MESSAGES,
        )
        fetched = call(consumer.Fetch, request).partitions[0]
        check(fetched.error if fetched.HasField("error") else None)
        return fetched.messages, fetched.high_watermark

    def earliest(self, topic, partition, leader):
        consumer = self.stub_for(leader, rpc.ConsumerStub)
        query = pb.OffsetQuery(topic=topic, partition=partition, earliest=True)
        answer = call(consumer.ListOffsets, pb.ListOffsetsRequest(queries=[query])).answers[0]
        check(answer.error if answer.HasField("error") else None)
        return answer.offset

    def coordinator(self, group):
        found = call(self.groups.FindCoordinator, pb.FindCoordinatorRequest(group_id=group))
        return self.stub_for(found.address or self.address, rpc.GroupsStub)


def text(data):
    return "" if data is None else data.decode()


def show(message):
    headers = ",".join(f"{h.key}={text(h.value)}" for h in message.headers)
    key = text(message.key) if message.HasField("key") else "-"
    print(f"{message.offset}\t{key}\t{text(message.value)}\t{headers}", flush=True)


def consume(client, topic, max_records, idle_s=2.0):
    """Reads every partition from its start; stops after max_records or idle_s of
    silence."""
    positions = {
        p: (client.earliest(topic, p, leader), leader) for p, leader in client.partitions(topic)
    }
    seen = 0
    quiet_since = time.monotonic()
    while seen < max_records and time.monotonic() - quiet_since < idle_s:
        for partition, (offset, leader) in list(positions.items()):
            messages, _ = client.fetch(topic, partition, offset, leader, wait_ms=100)
            for message in messages:
                show(message)
                seen += 1
                offset = message.offset + 1
                quiet_since = time.monotonic()
            positions[partition] = (offset, leader)
    return seen


def group_member(client, group, topic, max_records, idle_s=3.0):
    """Joins `group`, reads the partitions it is given from the committed offsets,
    commits after each batch, and leaves. The flow is the Groups service's: heartbeat
    with an empty member id to join; each answer carries the member's epoch and the
    partitions it owns from now on; report them as `owned`; -1 as the epoch leaves."""
    groups = client.coordinator(group)
    leaders = dict(client.partitions(topic))
    member_id, epoch, owned = "", 0, []
    seen = 0
    last_heartbeat = 0.0
    interval = 1.0
    quiet_since = time.monotonic()
    positions = {}
    while seen < max_records and time.monotonic() - quiet_since < idle_s:
        if time.monotonic() - last_heartbeat >= interval:
            answer = call(
                groups.Heartbeat,
                pb.HeartbeatRequest(
                    group_id=group,
                    member_id=member_id,
                    member_epoch=epoch,
                    client_id="python-example",
                    topics=[topic],
                    session_timeout_ms=10000,
                    owned=[pb.TopicPartitions(topic=topic, partitions=owned)],
                ),
            )
            member_id, epoch = answer.member_id, answer.member_epoch
            interval = max(answer.heartbeat_interval_ms, 100) / 1000
            last_heartbeat = time.monotonic()
            owned = sorted(p for a in answer.assignment if a.topic == topic for p in a.partitions)
            # Revoked partitions are simply no longer read; their progress was committed.
            positions = {p: positions[p] for p in owned if p in positions}
            missing = [p for p in owned if p not in positions]
            if missing:
                committed = call(
                    groups.FetchOffsets, pb.FetchOffsetsRequest(group_id=group, topics=[topic])
                )
                known = {c.partition: c.offset for c in committed.offsets if c.topic == topic}
                for p in missing:
                    positions[p] = known.get(p, client.earliest(topic, p, leaders[p]))
        for partition in list(positions):
            messages, _ = client.fetch(topic, partition, positions[partition], leaders[partition], wait_ms=100)
            if not messages:
                continue
            for message in messages:
                show(message)
                seen += 1
            positions[partition] = messages[-1].offset + 1
            quiet_since = time.monotonic()
            call(
                groups.CommitOffsets,
                pb.CommitOffsetsRequest(
                    group_id=group,
                    member_id=member_id,
                    member_epoch=epoch,
                    offsets=[pb.OffsetCommit(topic=topic, partition=partition, offset=positions[partition])],
                ),
            )
    if member_id:
        call(
            groups.Heartbeat,
            pb.HeartbeatRequest(group_id=group, member_id=member_id, member_epoch=-1),
        )
    return seen


def tail(client, topic):
    """Like `tail -f`: prints records produced from now on until interrupted."""
    stub = client.consumer
    ends = {}
    for partition, leader in client.partitions(topic):
        query = pb.OffsetQuery(topic=topic, partition=partition, latest=True)
        ends[partition] = call(stub.ListOffsets, pb.ListOffsetsRequest(queries=[query])).answers[0].offset
    request = pb.FetchRequest(
        partitions=[pb.FetchPartition(topic=topic, partition=p, offset=o) for p, o in ends.items()],
        max_wait_ms=500,
        max_bytes=FETCH_BYTES,
        format=pb.RECORD_FORMAT_MESSAGES,
    )
    # A streaming fetch: the broker sends records as they arrive and moves on by itself.
    try:
        for response in stub.FetchStream(request):
            for fetched in response.partitions:
                check(fetched.error if fetched.HasField("error") else None)
                for message in fetched.messages:
                    show(message)
    except KeyboardInterrupt:
        pass


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", default="127.0.0.1:7070")
    parser.add_argument("--tls-ca", help="connect over TLS, trusting this CA (PEM)")
    parser.add_argument("--tls-cert", help="client certificate (PEM), for mutual TLS")
    parser.add_argument("--tls-key", help="key of --tls-cert (PEM)")
    parser.add_argument("--user", default=os.environ.get("RUNNEL_USER"), help="SCRAM user (brokers that require authentication)")
    parser.add_argument("--password", default=os.environ.get("RUNNEL_PASSWORD"))
    parser.add_argument("--scram-mechanism", default="SCRAM-SHA-256", help="SCRAM-SHA-256 or SCRAM-SHA-512")
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create-topic")
    create.add_argument("name")
    create.add_argument("--partitions", type=int)
    produce = sub.add_parser("produce")
    produce.add_argument("topic")
    produce.add_argument("--header", action="append", default=[], help="KEY=VALUE on every record")
    read = sub.add_parser("consume")
    read.add_argument("topic")
    read.add_argument("--max", type=int, default=1 << 62)
    member = sub.add_parser("group")
    member.add_argument("group")
    member.add_argument("topic")
    member.add_argument("--max", type=int, default=1 << 62)
    follow = sub.add_parser("tail")
    follow.add_argument("topic")
    bench_read = sub.add_parser("bench-consume")
    bench_read.add_argument("topic")
    bench = sub.add_parser("bench-produce")
    bench.add_argument("topic")
    bench.add_argument("--records", type=int, default=100000)
    bench.add_argument("--batch", type=int, default=1000)
    args = parser.parse_args()
    login = (args.user, args.password or "", args.scram_mechanism) if args.user else None
    try:
        client = Runnel(args.broker, args.tls_ca, args.tls_cert, args.tls_key, login)
        if args.command == "create-topic":
            topic = client.create_topic(args.name, args.partitions)
            print(f"created {topic.name} with {len(topic.partitions)} partitions")
        elif args.command == "produce":
            headers = dict(h.split("=", 1) for h in args.header)
            records = []
            for line in sys.stdin.read().splitlines():
                key, _, value = line.partition("\t") if "\t" in line else (None, "", line)
                records.append((key, value, headers))
            for partition, offset in client.produce(args.topic, records):
                print(f"{partition}\t{offset}")
        elif args.command == "consume":
            consume(client, args.topic, args.max)
        elif args.command == "group":
            group_member(client, args.group, args.topic, args.max)
        elif args.command == "tail":
            tail(client, args.topic)
        elif args.command == "bench-consume":
            start = time.monotonic()
            count = 0
            for partition, leader in client.partitions(args.topic):
                offset = client.earliest(args.topic, partition, leader)
                while True:
                    messages, end = client.fetch(args.topic, partition, offset, leader, wait_ms=0)
                    count += len(messages)
                    if messages:
                        offset = messages[-1].offset + 1
                    if offset >= end:
                        break
            elapsed = time.monotonic() - start
            print(f"{count} records in {elapsed:.2f} s: {count / elapsed:,.0f} records/s")
        elif args.command == "bench-produce":
            value = "x" * 100
            start = time.monotonic()
            sent = 0
            while sent < args.records:
                count = min(args.batch, args.records - sent)
                client.produce(args.topic, [(str(sent + i), value, {}) for i in range(count)])
                sent += count
            elapsed = time.monotonic() - start
            print(f"{sent} records in {elapsed:.2f} s: {sent / elapsed:,.0f} records/s")
    except RunnelError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
