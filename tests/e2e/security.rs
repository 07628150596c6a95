//! Authentication and authorization: a broker that requires SCRAM refuses anonymous
//! calls and wrong passwords with one answer; users and ACLs are managed with the CLI;
//! a user without WRITE cannot produce, with READ on a topic but not the group cannot
//! consume in the group; a DENY beats an ALLOW; listings show only what the principal
//! may describe; a password change and a deletion end sessions; the open listener
//! serves anonymous callers with no rights; and every RPC of the API is refused to an
//! authenticated user without ACLs, with the right `*_AUTHORIZATION_FAILED` code.

use std::path::Path;
use std::process::Output;

use runnel_client::v1::{self, ErrorCode};
use runnel_client::{Credentials, Mechanism, Password};

use crate::cluster::free_port;
use crate::support::{Dev, runnel_at};

const SECRET: &str = "0123456789abcdef0123456789abcdef";

/// A broker requiring authentication, with authorization on, `User:admin` a super user,
/// and an open (anonymous) listener on `open_port`; killed when dropped.
fn secure_broker(dir: &Path, open_port: u16) -> (Dev, String) {
    secure_broker_with(dir, open_port, "")
}

/// [`secure_broker`] with more `[auth]` settings (lines of TOML).
fn secure_broker_with(dir: &Path, open_port: u16, auth: &str) -> (Dev, String) {
    let secret = dir.join("cluster.secret");
    std::fs::write(&secret, SECRET).expect("write");
    let config = dir.join("runnel.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\nlisten = \"127.0.0.1:0\"\nmetrics_listen = \"off\"\n[auth]\nrequire_authentication = true\nauthorization = true\nsuper_users = [\"User:admin\"]\ncluster_secret_file = {:?}\nopen_listen = \"127.0.0.1:{open_port}\"\n{auth}",
            dir.join("data").display().to_string(),
            secret.display().to_string(),
        ),
    )
    .expect("write");
    let dev = Dev::spawn(&["broker", "start", "--config", &config.display().to_string()]);
    (dev, secret.display().to_string())
}

/// `runnel --cluster-secret-file SECRET args`: the operator acting as the cluster.
fn as_cluster(addr: &str, secret: &str, args: &[&str]) -> Output {
    runnel_at(
        addr,
        &[&["--cluster-secret-file", secret], args].concat(),
        "",
    )
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).to_string()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).to_string()
}

/// `runnel --user USER --password PASSWORD args`.
fn as_user(addr: &str, user: &str, password: &str, args: &[&str], stdin: &str) -> Output {
    let all: Vec<&str> = ["--user", user, "--password", password]
        .iter()
        .chain(args)
        .copied()
        .collect();
    runnel_at(addr, &all, stdin)
}

fn ok(output: Output) -> String {
    assert!(output.status.success(), "{}", stderr(&output));
    stdout(&output)
}

fn refused(output: Output, wanted: &str) -> String {
    assert!(
        !output.status.success(),
        "expected a refusal: {}",
        stdout(&output)
    );
    let err = stderr(&output);
    assert!(err.contains(wanted), "wanted {wanted:?} in: {err}");
    err
}

#[test]
fn users_and_acls_decide_who_may_produce_consume_and_list() {
    let dir = tempfile::tempdir().expect("tempdir");
    let open_port = free_port();
    let (broker, secret) = secure_broker(dir.path(), open_port);
    let addr = broker.addr.clone();
    let cluster = |args: &[&str]| as_cluster(&addr, &secret, args);

    // Anonymous callers are refused on the main listener, with what to give.
    refused(
        runnel_at(&addr, &["topic", "list"], ""),
        "this listener requires authentication",
    );
    // The operator on the broker's host creates the first users with the cluster secret.
    for (user, password) in [
        ("admin", "admin-pw"),
        ("alice", "alice-pw"),
        ("bob", "bob-pw"),
    ] {
        ok(cluster(&[
            "user",
            "create",
            user,
            "--new-password",
            password,
        ]));
    }
    let users = ok(cluster(&["user", "list"]));
    assert!(users.contains("alice\tSCRAM-SHA-256"), "{users}");
    refused(
        cluster(&["user", "create", "alice", "--new-password", "x"]),
        "already exists",
    );
    // A wrong password and an unknown user get the same answer.
    let wrong = refused(
        as_user(&addr, "alice", "nope", &["topic", "list"], ""),
        "unknown user or wrong password",
    );
    let unknown = refused(
        as_user(&addr, "mallory", "nope", &["topic", "list"], ""),
        "unknown user or wrong password",
    );
    assert_eq!(
        wrong.replace("alice", "USER"),
        unknown.replace("mallory", "USER")
    );
    // SCRAM-SHA-512 works as well.
    let me = ok(as_user(
        &addr,
        "alice",
        "alice-pw",
        &["--scram-mechanism", "SCRAM-SHA-512", "user", "whoami"],
        "",
    ));
    assert_eq!(me.trim(), "User:alice (authenticated by scram)");

    let admin = |args: &[&str], stdin: &str| as_user(&addr, "admin", "admin-pw", args, stdin);
    let alice = |args: &[&str], stdin: &str| as_user(&addr, "alice", "alice-pw", args, stdin);
    let bob = |args: &[&str], stdin: &str| as_user(&addr, "bob", "bob-pw", args, stdin);
    ok(admin(&["topic", "create", "orders"], ""));
    ok(admin(&["topic", "create", "secret"], ""));

    // No right on the topic: not even its metadata; the refusal names the principal,
    // the operation and the topic, and the command that would allow it.
    refused(
        alice(&["produce", "orders"], "one\n"),
        "User:alice may not DESCRIBE topic \"orders\": no ACL allows it; an administrator can allow it with `runnel acl add --allow User:alice --operation describe --topic orders`",
    );
    // DESCRIBE but no WRITE: no produce.
    ok(admin(
        &acl_add("--allow", "User:alice", "describe", &["--topic", "orders"]),
        "",
    ));
    refused(
        alice(&["produce", "orders"], "one\n"),
        "User:alice may not WRITE topic \"orders\": no ACL allows it",
    );
    // Only a super user manages ACLs.
    refused(
        alice(
            &acl_add("--allow", "User:alice", "write", &["--topic", "orders"]),
            "",
        ),
        "User:alice may not ALTER the cluster",
    );
    ok(admin(
        &acl_add("--allow", "User:alice", "write", &["--topic", "orders"]),
        "",
    ));
    ok(alice(&["produce", "orders"], "one\ntwo\n"));
    // Alice lists the topic she may describe, not the other one.
    let listed = ok(alice(&["topic", "list"], ""));
    assert!(
        listed.contains("orders") && !listed.contains("secret"),
        "{listed}"
    );

    // READ on the topic but not on the group: no consuming in the group.
    ok(admin(
        &acl_add("--allow", "User:bob", "read", &["--topic", "orders"]),
        "",
    ));
    let consume = [
        "consume",
        "orders",
        "--group",
        "billing",
        "--from-beginning",
        "--max-messages",
        "2",
    ];
    refused(
        bob(&consume, ""),
        "User:bob may not DESCRIBE group \"billing\"",
    );
    // A prefixed group ACL covers it.
    ok(admin(
        &acl_add(
            "--allow",
            "User:bob",
            "read",
            &["--group", "bill", "--prefixed"],
        ),
        "",
    ));
    assert_eq!(ok(bob(&consume, "")), "one\ntwo\n");
    // Without a group, READ on the topic is enough.
    assert_eq!(
        ok(bob(
            &[
                "consume",
                "orders",
                "--from-beginning",
                "--max-messages",
                "2"
            ],
            ""
        )),
        "one\ntwo\n"
    );

    // A DENY beats the ALLOW, also for everyone (User:*).
    ok(admin(
        &acl_add("--deny", "User:*", "read", &["--topic", "orders"]),
        "",
    ));
    refused(
        bob(
            &[
                "consume",
                "orders",
                "--from-beginning",
                "--max-messages",
                "1",
            ],
            "",
        ),
        "User:bob may not READ topic \"orders\": an ACL denies it",
    );
    let acls = ok(admin(&["acl", "list", "--topic", "orders"], ""));
    assert_eq!(acls.lines().count(), 4, "{acls}");
    assert!(
        acls.contains("User:*\tdeny\tread\ttopic:orders\tliteral"),
        "{acls}"
    );
    let removed = ok(admin(&["acl", "remove", "--principal", "User:*"], ""));
    assert!(removed.contains("1 ACL(s) removed"), "{removed}");
    refused(admin(&["acl", "remove"], ""), "--all");
    assert_eq!(
        ok(bob(
            &[
                "consume",
                "orders",
                "--from-beginning",
                "--max-messages",
                "1"
            ],
            ""
        )),
        "one\n"
    );

    // A new password ends the old one; a deleted user is refused.
    ok(admin(
        &[
            "user",
            "set-password",
            "alice",
            "--new-password",
            "alice-pw2",
        ],
        "",
    ));
    refused(
        alice(&["topic", "list"], ""),
        "unknown user or wrong password",
    );
    ok(as_user(&addr, "alice", "alice-pw2", &["topic", "list"], ""));
    ok(admin(&["user", "delete", "bob"], ""));
    refused(
        bob(&["topic", "list"], ""),
        "unknown user or wrong password",
    );
    refused(
        admin(&["user", "delete", "bob"], ""),
        "unknown user \"bob\"",
    );

    // The open listener needs no authentication; its callers are anonymous, with no
    // rights unless an ACL grants them.
    let open = format!("127.0.0.1:{open_port}");
    let me = ok(runnel_at(&open, &["user", "whoami"], ""));
    assert_eq!(me.trim(), "User:ANONYMOUS (authenticated by none)");
    let listed = ok(runnel_at(&open, &["topic", "list"], ""));
    assert!(!listed.contains("orders"), "{listed}");
    refused(
        runnel_at(&open, &["topic", "create", "anon"], ""),
        "User:ANONYMOUS may not CREATE topic \"anon\"",
    );
    // Credentials are honoured on the open listener too.
    let me = ok(as_user(&open, "admin", "admin-pw", &["user", "whoami"], ""));
    assert_eq!(me.trim(), "User:admin (authenticated by scram, super user)");
}

fn runtime() -> tokio::runtime::Runtime {
    crate::runtime()
}

/// The error code of a refused call.
fn code<T>(result: Result<tonic::Response<T>, tonic::Status>) -> Option<ErrorCode> {
    match result {
        Ok(_) => None,
        Err(status) => runnel_proto_code(&status),
    }
}

fn runnel_proto_code(status: &tonic::Status) -> Option<ErrorCode> {
    status
        .metadata()
        .get("runnel-error-code")
        .and_then(|v| v.to_str().ok())
        .and_then(ErrorCode::from_str_name)
}

#[test]
fn every_rpc_refuses_a_user_without_acls() {
    use v1::admin_client::AdminClient;
    use v1::connectors_client::ConnectorsClient;
    use v1::consumer_client::ConsumerClient;
    use v1::groups_client::GroupsClient;
    use v1::producer_client::ProducerClient;
    use v1::quorum_client::QuorumClient;
    use v1::replication_client::ReplicationClient;
    use v1::security_client::SecurityClient;
    use v1::transactions_client::TransactionsClient;
    use v1::transforms_client::TransformsClient;

    let dir = tempfile::tempdir().expect("tempdir");
    let (broker, secret) = secure_broker(dir.path(), free_port());
    let addr = broker.addr.clone();
    ok(as_cluster(
        &addr,
        &secret,
        &["user", "create", "mallory", "--new-password", "pw"],
    ));
    ok(as_cluster(&addr, &secret, &["topic", "create", "t"]));

    runtime().block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect");
        let conn = runnel_client::Conn::new(
            channel,
            Some(Credentials::scram(Password {
                user: "mallory".into(),
                password: "pw".into(),
                mechanism: Mechanism::Sha256,
            })),
        );
        let me = SecurityClient::new(conn.clone())
            .who_am_i(v1::WhoAmIRequest {})
            .await
            .expect("whoami")
            .into_inner();
        assert_eq!(me.principal, "User:mallory");

        use ErrorCode::{
            ClusterAuthorizationFailed as Cluster, ConnectorAuthorizationFailed as Connector,
            GroupAuthorizationFailed as Group, TopicAuthorizationFailed as Topic,
            TransactionalIdAuthorizationFailed as Txn, TransformAuthorizationFailed as Transform,
        };
        let fetch = v1::FetchRequest {
            partitions: vec![v1::FetchPartition {
                topic: "t".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let tx = || "tx".to_string();
        let t = || "t".to_string();
        let g = || "g".to_string();
        let tf = || v1::TransformName { name: "tf".into() };
        let cn = || v1::ConnectorName { name: "cn".into() };
        let mut table: Vec<(&str, Option<ErrorCode>, Option<ErrorCode>)> = Vec::new();
        macro_rules! expect {
            ($name:expr, $wanted:expr, $call:expr) => {
                table.push(($name, Some($wanted), code($call.await)));
            };
        }
        let mut producer = ProducerClient::new(conn.clone());
        expect!("Produce", Topic, producer.produce(v1::ProduceRequest { topic: t(), ..Default::default() }));
        expect!("InitProducerId", Txn, producer.init_producer_id(v1::InitProducerIdRequest { transactional_id: tx(), transaction_timeout_ms: 1000 }));
        let streamed = producer
            .produce_stream(tokio_stream::iter(vec![v1::ProduceRequest { topic: t(), request_id: 7, ..Default::default() }]))
            .await
            .expect("a produce stream opens")
            .into_inner()
            .message()
            .await
            .expect("an answer")
            .expect("an answer");
        table.push(("ProduceStream", Some(Topic), streamed.error.and_then(|e| ErrorCode::try_from(e.code).ok())));
        let mut consumer = ConsumerClient::new(conn.clone());
        expect!("Fetch", Topic, consumer.fetch(fetch.clone()));
        expect!("FetchStream", Topic, consumer.fetch_stream(fetch.clone()));
        expect!("ListOffsets", Topic, consumer.list_offsets(v1::ListOffsetsRequest { queries: vec![v1::OffsetQuery { topic: t(), ..Default::default() }] }));
        let mut groups = GroupsClient::new(conn.clone());
        expect!("Heartbeat", Group, groups.heartbeat(v1::HeartbeatRequest { group_id: g(), topics: vec![t()], ..Default::default() }));
        expect!("FindCoordinator", Group, groups.find_coordinator(v1::FindCoordinatorRequest { group_id: g() }));
        expect!("CommitOffsets", Group, groups.commit_offsets(v1::CommitOffsetsRequest { group_id: g(), ..Default::default() }));
        expect!("FetchOffsets", Group, groups.fetch_offsets(v1::FetchOffsetsRequest { group_id: g(), topics: vec![] }));
        expect!("DescribeGroup", Group, groups.describe_group(v1::DescribeGroupRequest { group_id: g() }));
        expect!("ResetOffsets", Group, groups.reset_offsets(v1::ResetOffsetsRequest { group_id: g(), topic: t(), ..Default::default() }));
        expect!("DeleteGroup", Group, groups.delete_group(v1::DeleteGroupRequest { group_id: g() }));
        let mut txns = TransactionsClient::new(conn.clone());
        expect!("Transactions.FindCoordinator", Txn, txns.find_coordinator(v1::FindTransactionCoordinatorRequest { transactional_id: tx() }));
        expect!("EndTransaction", Txn, txns.end_transaction(v1::EndTransactionRequest { transactional_id: tx(), ..Default::default() }));
        expect!("AddPartitions", Txn, txns.add_partitions(v1::AddPartitionsToTransactionRequest { transactional_id: tx(), ..Default::default() }));
        expect!("DescribeTransaction", Txn, txns.describe_transaction(v1::DescribeTransactionRequest { transactional_id: tx() }));
        expect!("AbortTransaction", Txn, txns.abort_transaction(v1::AbortTransactionRequest { transactional_id: tx() }));
        expect!("AbortPartitionTransaction", Topic, txns.abort_partition_transaction(v1::AbortPartitionTransactionRequest { topic: t(), ..Default::default() }));
        let mut admin = AdminClient::new(conn.clone());
        expect!("CreateTopic", Topic, admin.create_topic(v1::CreateTopicRequest { name: "u".into(), ..Default::default() }));
        expect!("DeleteTopic", Topic, admin.delete_topic(v1::DeleteTopicRequest { name: t() }));
        expect!("DescribeTopic", Topic, admin.describe_topic(v1::DescribeTopicRequest { name: t() }));
        expect!("AlterTopicConfig", Topic, admin.alter_topic_config(v1::AlterTopicConfigRequest { name: t(), ..Default::default() }));
        expect!("Admin.AddPartitions", Topic, admin.add_partitions(v1::AddPartitionsRequest { name: t(), total: 2 }));
        expect!("DeleteRecords", Topic, admin.delete_records(v1::DeleteRecordsRequest { topic: t(), ..Default::default() }));
        expect!("ElectLeaders", Cluster, admin.elect_leaders(v1::ElectLeadersRequest { topics: vec![t()] }));
        expect!("ReassignPartitions", Cluster, admin.reassign_partitions(v1::ReassignPartitionsRequest::default()));
        let mut transforms = TransformsClient::new(conn.clone());
        expect!("Deploy", Transform, transforms.deploy(v1::DeployTransformRequest { spec: Some(v1::TransformSpec { name: "tf".into(), input_topic: t(), ..Default::default() }), ..Default::default() }));
        expect!("DescribeTransform", Transform, transforms.describe_transform(tf()));
        expect!("Transforms.Pause", Transform, transforms.pause(tf()));
        expect!("Transforms.Resume", Transform, transforms.resume(tf()));
        expect!("Transforms.Remove", Transform, transforms.remove(v1::RemoveTransformRequest { name: "tf".into(), ..Default::default() }));
        expect!("Logs", Transform, transforms.logs(v1::TransformLogsRequest { name: "tf".into(), ..Default::default() }));
        expect!("QueryState", Transform, transforms.query_state(v1::StateQuery { name: "tf".into(), ..Default::default() }));
        let mut connectors = ConnectorsClient::new(conn.clone());
        expect!("Connectors.Create", Connector, connectors.create(v1::CreateConnectorRequest {
            file_name: "c.yaml".into(),
            yaml: "name: cn\nkind: sink\nconnector: file-sink\ntopic: t\nconfig:\n  path: /tmp/cn.log\n".into(),
            ..Default::default()
        }));
        expect!("Connectors.Status", Connector, connectors.status(cn()));
        expect!("Connectors.Pause", Connector, connectors.pause(cn()));
        expect!("Connectors.Resume", Connector, connectors.resume(cn()));
        expect!("Connectors.Restart", Connector, connectors.restart(cn()));
        expect!("Connectors.Delete", Connector, connectors.delete(cn()));
        let mut security = SecurityClient::new(conn.clone());
        expect!("UpsertUser", Cluster, security.upsert_user(v1::UpsertUserRequest { name: "x".into(), ..Default::default() }));
        expect!("DeleteUser", Cluster, security.delete_user(v1::DeleteUserRequest { name: "x".into() }));
        expect!("ListUsers", Cluster, security.list_users(v1::ListUsersRequest {}));
        expect!("CreateAcls", Cluster, security.create_acls(v1::CreateAclsRequest::default()));
        expect!("DeleteAcls", Cluster, security.delete_acls(v1::AclFilter::default()));
        expect!("ListAcls", Cluster, security.list_acls(v1::AclFilter::default()));
        expect!("Quorum.Propose", Cluster, QuorumClient::new(conn.clone()).propose(v1::ProposeRequest::default()));
        expect!("Replication.WriteTxnMarker", Cluster, ReplicationClient::new(conn.clone()).write_txn_marker(v1::WriteTxnMarkerRequest::default()));

        let wrong: Vec<String> = table
            .iter()
            .filter(|(_, wanted, got)| wanted != got)
            .map(|(name, wanted, got)| format!("{name}: wanted {wanted:?}, got {got:?}"))
            .collect();
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
        assert!(table.len() >= 45, "{} calls checked", table.len());

        // Listings answer, with only what the caller may describe.
        let topics = admin.list_topics(v1::ListTopicsRequest::default()).await.expect("list").into_inner();
        assert!(topics.topics.is_empty(), "{topics:?}");
        let metadata = admin.metadata(v1::MetadataRequest { topics: vec![t()] }).await.expect("metadata").into_inner();
        assert_eq!(
            metadata.topics[0].error.as_ref().map(|e| e.code),
            Some(Topic as i32),
            "{metadata:?}"
        );
        assert!(groups.list_groups(v1::ListGroupsRequest {}).await.is_ok());
        assert!(txns.list_transactions(v1::ListTransactionsRequest::default()).await.is_ok());
        assert!(admin.cluster_info(v1::ClusterInfoRequest {}).await.is_ok());

        // One ALLOW later, the same produce passes.
        let granted = as_cluster(
            &addr,
            &secret,
            &acl_add("--allow", "User:mallory", "write", &["--topic", "t"]),
        );
        assert!(granted.status.success(), "{}", stderr(&granted));
        let answer = producer
            .produce(v1::ProduceRequest {
                topic: t(),
                records: vec![v1::Record { value: Some(b"v".to_vec().into()), ..Default::default() }],
                ..Default::default()
            })
            .await
            .expect("produce is allowed now")
            .into_inner();
        assert!(answer.error.is_none(), "{answer:?}");
    });
}

/// Writes the file of a file-sink connector `name` copying topic `in` to `path` (whose
/// directory it may write), acting as `principal` if given; returns the file.
fn file_sink(dir: &Path, name: &str, principal: Option<&str>, path: &Path) -> std::path::PathBuf {
    let out = path.parent().expect("a directory").display();
    let principal = principal.map_or(String::new(), |p| format!("principal: {p}\n"));
    let file = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &file,
        format!(
            "name: {name}\nkind: sink\nconnector: file-sink\ntopic: in\n{principal}config:\n  path: {path}\ncapabilities:\n  dirs:\n    - {{ path: {out}, mode: read-write }}\n",
            path = path.display()
        ),
    )
    .expect("write");
    file
}

#[test]
fn a_transform_acts_as_its_principal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (broker, secret) = secure_broker(dir.path(), free_port());
    let addr = broker.addr.clone();
    for user in ["admin", "etl", "alice"] {
        ok(as_cluster(
            &addr,
            &secret,
            &["user", "create", user, "--new-password", "pw"],
        ));
    }
    let admin = |args: &[&str], stdin: &str| as_user(&addr, "admin", "pw", args, stdin);
    let allow = |principal: &str, rights: &[(&str, &str, &str)]| {
        for (operation, kind, name) in rights {
            ok(admin(
                &acl_add("--allow", principal, operation, &[kind, name]),
                "",
            ));
        }
    };
    ok(admin(&["topic", "create", "in"], ""));
    ok(admin(&["topic", "create", "out"], ""));
    let wasm = crate::transforms::components()
        .join("identity.wasm")
        .display()
        .to_string();
    let deploy = [
        "transform",
        "deploy",
        "--name",
        "copy",
        "--input",
        "in",
        "--output",
        "out",
        "--wasm",
        &wasm,
        "--principal",
        "User:etl",
    ];
    // The principal cannot read the input yet: refused at deploy, with the reason.
    refused(admin(&deploy, ""), "User:etl may not READ topic \"in\"");
    // Acting as someone else is an administrator's act.
    ok(admin(
        &acl_add("--allow", "User:alice", "create", &["--transform", "copy"]),
        "",
    ));
    refused(
        as_user(&addr, "alice", "pw", &deploy, ""),
        "User:alice may not ALTER the cluster",
    );
    allow(
        "User:etl",
        &[
            ("read", "--topic", "in"),
            ("write", "--topic", "out"),
            ("read", "--group", "transform-copy"),
        ],
    );
    ok(admin(&deploy, ""));
    let described = ok(admin(&["transform", "describe", "copy"], ""));
    assert!(described.contains("Principal:   User:etl"), "{described}");
    ok(admin(&["produce", "in"], "a\nb\n"));
    let copied = ok(admin(
        &[
            "consume",
            "out",
            "--from-beginning",
            "--max-messages",
            "2",
            "--timeout-ms",
            "30000",
        ],
        "",
    ));
    assert_eq!(copied, "a\nb\n");

    // Without WRITE on its output, the transform stops with the reason.
    ok(admin(
        &["acl", "remove", "--principal", "User:etl", "--topic", "out"],
        "",
    ));
    ok(admin(&["produce", "in"], "c\n"));
    crate::support::wait_until(
        "the transform reports the refusal",
        std::time::Duration::from_secs(30),
        || {
            let logs = stdout(&admin(&["transform", "logs", "copy"], ""));
            let described = stdout(&admin(&["transform", "describe", "copy"], ""));
            logs.contains("User:etl may not WRITE topic \"out\"")
                || described.contains("User:etl may not WRITE topic \"out\"")
        },
    );
    let copied = ok(admin(
        &["consume", "out", "--from-beginning", "--timeout-ms", "1000"],
        "",
    ));
    assert_eq!(copied, "a\nb\n", "nothing written without the right");

    // A hosted connector acts as the principal its file names, checked the same way.
    let out_dir = dir.path().join("sink-out");
    std::fs::create_dir_all(&out_dir).expect("mkdir");
    let file = file_sink(
        dir.path(),
        "archive",
        Some("User:etl"),
        &out_dir.join("copy.log"),
    );
    let create = ["connector", "create", &file.display().to_string()];
    refused(
        admin(&create, ""),
        "User:etl may not READ group \"connect-archive\"",
    );
    ok(admin(
        &acl_add(
            "--allow",
            "User:etl",
            "read",
            &["--group", "connect-archive"],
        ),
        "",
    ));
    ok(admin(&create, ""));
    crate::support::wait_until(
        "the sink to copy the input",
        std::time::Duration::from_secs(30),
        || std::fs::read_to_string(out_dir.join("copy.log")).is_ok_and(|t| t.lines().count() == 3),
    );

    // Without a principal, a deployment acts as whoever deployed it: it needs the
    // deployer's rights to everything it will use, and has no more.
    let mine = [
        "transform",
        "deploy",
        "--name",
        "mine",
        "--input",
        "in",
        "--output",
        "out",
        "--wasm",
        &wasm,
    ];
    allow(
        "User:alice",
        &[
            ("create", "--transform", "mine"),
            ("read", "--topic", "in"),
            ("write", "--topic", "out"),
        ],
    );
    refused(
        as_user(&addr, "alice", "pw", &mine, ""),
        "User:alice may not READ group \"transform-mine\"",
    );
    ok(admin(
        &acl_add(
            "--allow",
            "User:alice",
            "read",
            &["--group", "transform-mine"],
        ),
        "",
    ));
    ok(as_user(&addr, "alice", "pw", &mine, ""));
    let described = ok(admin(&["transform", "describe", "mine"], ""));
    assert!(described.contains("Principal:   User:alice"), "{described}");
    crate::support::wait_until(
        "alice's transform to copy the input",
        std::time::Duration::from_secs(30),
        || {
            let copied = stdout(&admin(
                &["consume", "out", "--from-beginning", "--timeout-ms", "1000"],
                "",
            ));
            copied.lines().count() == 5
        },
    );
    // The same for a connector whose file names no principal.
    let file = file_sink(dir.path(), "alices", None, &out_dir.join("alices.log"));
    ok(admin(
        &acl_add(
            "--allow",
            "User:alice",
            "create",
            &["--connector", "alices"],
        ),
        "",
    ));
    let create = ["connector", "create", &file.display().to_string()];
    refused(
        as_user(&addr, "alice", "pw", &create, ""),
        "User:alice may not READ group \"connect-alices\"",
    );
    ok(admin(
        &acl_add(
            "--allow",
            "User:alice",
            "read",
            &["--group", "connect-alices"],
        ),
        "",
    ));
    ok(as_user(&addr, "alice", "pw", &create, ""));
    crate::support::wait_until(
        "alice's sink to copy the input",
        std::time::Duration::from_secs(30),
        || {
            std::fs::read_to_string(out_dir.join("alices.log"))
                .is_ok_and(|t| t.lines().count() == 3)
        },
    );
}

#[test]
fn a_connector_keeps_acting_as_its_creator_after_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (broker, secret) = secure_broker(dir.path(), free_port());
    for user in ["admin", "alice"] {
        ok(as_cluster(
            &broker.addr,
            &secret,
            &["user", "create", user, "--new-password", "pw"],
        ));
    }
    let admin = |addr: &str, args: &[&str], stdin: &str| as_user(addr, "admin", "pw", args, stdin);
    ok(admin(&broker.addr, &["topic", "create", "in"], ""));
    for (operation, kind, name) in [
        ("create", "--connector", "alices"),
        ("read", "--topic", "in"),
        ("read", "--group", "connect-alices"),
    ] {
        ok(admin(
            &broker.addr,
            &acl_add("--allow", "User:alice", operation, &[kind, name]),
            "",
        ));
    }
    let out_dir = dir.path().join("sink-out");
    std::fs::create_dir_all(&out_dir).expect("mkdir");
    let copy = out_dir.join("alices.log");
    let file = file_sink(dir.path(), "alices", None, &copy);
    ok(as_user(
        &broker.addr,
        "alice",
        "pw",
        &["connector", "create", &file.display().to_string()],
        "",
    ));
    ok(admin(&broker.addr, &["produce", "in"], "a\n"));
    let lines = || std::fs::read_to_string(&copy).map_or(0, |t| t.lines().count());
    crate::support::wait_until(
        "the sink to copy the first line",
        std::time::Duration::from_secs(30),
        || lines() == 1,
    );
    // After a restart the stored connector still acts as alice: once her right to read
    // the topic goes, it is refused (its status log says why) instead of copying on.
    drop(broker);
    let (broker, _) = secure_broker(dir.path(), free_port());
    ok(admin(
        &broker.addr,
        &[
            "acl",
            "remove",
            "--principal",
            "User:alice",
            "--topic",
            "in",
        ],
        "",
    ));
    ok(admin(&broker.addr, &["produce", "in"], "b\n"));
    crate::support::wait_until(
        "the connector to report the refusal",
        std::time::Duration::from_secs(30),
        || {
            let status = stdout(&admin(&broker.addr, &["connector", "status", "alices"], ""));
            status.contains("State:      Retrying")
                && status.contains("User:alice may not DESCRIBE topic \"in\"")
        },
    );
    let status = stdout(&admin(&broker.addr, &["connector", "status", "alices"], ""));
    assert_eq!(lines(), 1, "nothing copied without the right: {status}");
}

#[test]
fn a_three_broker_cluster_with_auth_replicates_and_fails_over() {
    use crate::cluster::{Cluster, partition_rows};
    use crate::support::wait_until;
    use std::time::Duration;

    let dir = tempfile::tempdir().expect("tempdir");
    let secret = dir.path().join("cluster.secret");
    std::fs::write(&secret, SECRET).expect("write");
    let secret = secret.display().to_string();
    let config = dir.path().join("auth.toml");
    // data_dir is given to each node by flag.
    std::fs::write(
        &config,
        format!(
            "data_dir = \"unused\"\n[auth]\nrequire_authentication = true\nauthorization = true\nsuper_users = [\"User:admin\"]\ncluster_secret_file = {secret:?}\n"
        ),
    )
    .expect("write");
    let mut cluster =
        Cluster::start_with(dir.path(), 3, &["--config", &config.display().to_string()]);
    let addrs: Vec<String> = (1..=3).map(|id| cluster.node(id).addr.clone()).collect();
    let addr = |id: u32| addrs[id as usize - 1].clone();
    let cluster_at = |id: u32, args: &[&str]| as_cluster(&addr(id), &secret, args);
    // The brokers authenticate each other with the secret: they register, and the
    // controller quorum answers.
    wait_until("the brokers to register", Duration::from_secs(30), || {
        stdout(&cluster_at(1, &["cluster", "info"]))
            .matches("(alive)")
            .count()
            == 3
    });
    ok(cluster_at(
        2,
        &["user", "create", "admin", "--new-password", "pw"],
    ));
    ok(cluster_at(
        3,
        &["user", "create", "writer", "--new-password", "pw"],
    ));
    let admin = |id: u32, args: &[&str]| as_user(&addr(id), "admin", "pw", args, "");
    ok(admin(
        1,
        &[
            "topic",
            "create",
            "ledger",
            "--replication-factor",
            "3",
            "--config",
            "min.insync.replicas=2",
        ],
    ));
    ok(admin(
        3,
        &acl_add("--allow", "User:writer", "write", &["--topic", "ledger"]),
    ));
    // Users and ACLs are cluster metadata: every broker knows them.
    let first: String = (0..100).map(|i| format!("entry-{i}\n")).collect();
    ok(as_user(
        &addr(2),
        "writer",
        "pw",
        &["produce", "ledger", "--acks", "all"],
        &first,
    ));
    let rows = |id: u32| partition_rows(&ok(admin(id, &["topic", "describe", "ledger"])));
    wait_until(
        "all three replicas in sync",
        Duration::from_secs(30),
        || {
            rows(3)
                .first()
                .is_some_and(|r| r.isr == [1, 2, 3] && r.high_watermark == 100)
        },
    );
    // The leader dies; another replica takes over; the writer's session token from
    // another broker still works there.
    let leader = rows(1).first().map(|r| r.leader).expect("a leader");
    cluster.kill9(leader);
    let survivor = (1..=3).find(|id| *id != leader).expect("a survivor");
    wait_until("a new leader", Duration::from_secs(30), || {
        rows(survivor)
            .first()
            .is_some_and(|r| r.leader != leader && r.leader != 0)
    });
    ok(as_user(
        &addr(survivor),
        "writer",
        "pw",
        &["produce", "ledger", "--acks", "all"],
        "last\n",
    ));
    let consumed = ok(admin(
        survivor,
        &[
            "consume",
            "ledger",
            "--from-beginning",
            "--max-messages",
            "101",
        ],
    ));
    assert_eq!(consumed, format!("{first}last\n"));
}

#[test]
fn a_client_certificate_authenticates_under_mutual_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = crate::tls::Pki::new(dir.path(), "auth");
    let ca = dir.path().join("auth-ca.pem").display().to_string();
    let (cert, key) = pki.issue("broker");
    let metrics_port = free_port();
    let config = dir.path().join("runnel.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\nlisten = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:{metrics_port}\"\n[tls]\ncert_file = {:?}\nkey_file = {:?}\nca_file = {ca:?}\nclient_auth = true\n[auth]\nrequire_authentication = true\nauthorization = true\nsuper_users = [\"User:admin\"]\n",
            dir.path().join("data").display().to_string(),
            cert.display().to_string(),
            key.display().to_string(),
        ),
    )
    .expect("write");
    let broker = Dev::spawn(&["broker", "start", "--config", &config.display().to_string()]);
    let as_cert = |name: &str, args: &[&str], stdin: &str| {
        let (cert, key) = pki.issue(name);
        let (cert, key) = (cert.display().to_string(), key.display().to_string());
        let tls = [
            "--tls-ca",
            ca.as_str(),
            "--tls-cert",
            cert.as_str(),
            "--tls-key",
            key.as_str(),
        ];
        runnel_at(&broker.addr, &[&tls[..], args].concat(), stdin)
    };
    // The certificate's common name is the principal; a super user by name.
    let me = ok(as_cert("admin", &["user", "whoami"], ""));
    assert_eq!(
        me.trim(),
        "User:admin (authenticated by certificate, super user)"
    );
    let me = ok(as_cert("carol", &["user", "whoami"], ""));
    assert_eq!(me.trim(), "User:carol (authenticated by certificate)");
    ok(as_cert("admin", &["topic", "create", "audit"], ""));
    refused(
        as_cert("carol", &["produce", "audit"], "x\n"),
        "User:carol may not DESCRIBE topic \"audit\"",
    );
    ok(as_cert(
        "admin",
        &acl_add(
            "--allow",
            "User:carol",
            "write,describe",
            &["--topic", "audit"],
        ),
        "",
    ));
    ok(as_cert("carol", &["produce", "audit"], "x\n"));

    // The metrics endpoint is HTTPS with the same certificates: a scraper with a client
    // certificate reads it; one without, or in plaintext, does not.
    let (scraper_cert, scraper_key) = pki.issue("prometheus");
    let scrape = |url: &str, with_cert: bool| {
        let script = format!(
            "import ssl, urllib.request\nctx = ssl.create_default_context(cafile={ca:?})\n{}print(urllib.request.urlopen({url:?}, context=ctx, timeout=10).read().decode())\n",
            if with_cert {
                format!(
                    "ctx.load_cert_chain({:?}, {:?})\n",
                    scraper_cert.display().to_string(),
                    scraper_key.display().to_string()
                )
            } else {
                String::new()
            }
        );
        std::process::Command::new("python3")
            .args(["-c", &script])
            .output()
            .expect("python3 runs")
    };
    let https = format!("https://127.0.0.1:{metrics_port}/metrics");
    let scraped = scrape(&https, true);
    assert!(scraped.status.success(), "{}", stderr(&scraped));
    assert!(
        stdout(&scraped).contains("runnel_grpc_requests_total{service=\"runnel.v1.Producer\""),
        "{}",
        stdout(&scraped)
    );
    assert!(!scrape(&https, false).status.success());
    assert!(
        !scrape(&format!("http://127.0.0.1:{metrics_port}/metrics"), true)
            .status
            .success()
    );
}

#[test]
fn the_example_clients_authenticate_with_scram() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (broker, secret) = secure_broker(dir.path(), free_port());
    let addr = broker.addr.clone();
    ok(as_cluster(
        &addr,
        &secret,
        &["user", "create", "app", "--new-password", "app-pw"],
    ));
    for (example, topic) in [
        (crate::clients::Example::python(), "from-python"),
        (crate::clients::Example::node(), "from-node"),
    ] {
        ok(as_cluster(
            &addr,
            &secret,
            &acl_add("--allow", "User:app", "all", &["--topic", topic]),
        ));
        for mechanism in ["SCRAM-SHA-256", "SCRAM-SHA-512"] {
            let login = [
                "--user",
                "app",
                "--password",
                "app-pw",
                "--scram-mechanism",
                mechanism,
            ];
            if mechanism == "SCRAM-SHA-256" {
                example.ok(&addr, &[&login[..], &["create-topic", topic]].concat(), "");
            }
            example.ok(&addr, &[&login[..], &["produce", topic]].concat(), "a\nb\n");
        }
        let read = as_user(
            &addr,
            "app",
            "app-pw",
            &["consume", topic, "--from-beginning", "--max-messages", "4"],
            "",
        );
        assert_eq!(stdout(&read), "a\nb\na\nb\n", "{topic}");
        // A wrong password, and no login at all, are refused with the broker's words.
        let wrong = example.run(
            &addr,
            &["--user", "app", "--password", "nope", "create-topic", "x"],
            "",
        );
        assert!(!wrong.status.success(), "{topic}");
        assert!(
            stderr(&wrong).contains("authentication failed: unknown user or wrong password"),
            "{topic}: {}",
            stderr(&wrong)
        );
        let anonymous = example.run(&addr, &["create-topic", "x"], "");
        assert!(
            stderr(&anonymous).contains("AUTHENTICATION_REQUIRED"),
            "{topic}: {}",
            stderr(&anonymous)
        );
    }
}

#[test]
fn the_example_clients_log_in_again_before_their_session_ends() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Sessions of one second: the shortest a broker allows.
    let (broker, secret) =
        secure_broker_with(dir.path(), free_port(), "session_lifetime_ms = 1000\n");
    let addr = broker.addr.clone();
    for args in [
        &["user", "create", "app", "--new-password", "app-pw"][..],
        &acl_add("--allow", "User:app", "all", &["--topic", "renewed"]),
        &["topic", "create", "renewed"],
    ] {
        ok(as_cluster(&addr, &secret, args));
    }
    ok(as_user(
        &addr,
        "app",
        "app-pw",
        &["produce", "renewed"],
        "hello\n",
    ));
    let login = ["--user", "app", "--password", "app-pw"];
    for example in [
        crate::clients::Example::python(),
        crate::clients::Example::node(),
    ] {
        // `consume` reads the record, then polls until two seconds pass without one: its
        // calls go on well past the second its first token lasts.
        let read = example.ok(&addr, &[&login[..], &["consume", "renewed"]].concat(), "");
        assert!(read.contains("hello"), "{read}");
    }
}

/// The arguments of `acl add PERMISSION PRINCIPAL --operation OPERATIONS RESOURCE...`
/// (`--allow` or `--deny`; the resource as flags: `--topic T`, `--group G --prefixed`).
fn acl_add<'a>(
    permission: &'a str,
    principal: &'a str,
    operations: &'a str,
    resource: &[&'a str],
) -> Vec<&'a str> {
    [
        &[
            "acl",
            "add",
            permission,
            principal,
            "--operation",
            operations,
        ][..],
        resource,
    ]
    .concat()
}
