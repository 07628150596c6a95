//! The cost of one ACL check, as every request pays it: the decision over the ACLs of the
//! resource type, with few and with many ACLs (one principal's literal and prefixed
//! grants among those of many others).

use criterion::{Criterion, criterion_group, criterion_main};
use runnel_controller::security::{
    AclIndex, AclRecord, Operation, Pattern, Permission, ResourceKind, Verdict,
};

fn acls(principals: usize) -> Vec<AclRecord> {
    let mut acls = Vec::new();
    for p in 0..principals {
        for (name, pattern) in [("orders", Pattern::Literal), ("logs-", Pattern::Prefixed)] {
            acls.push(AclRecord {
                principal: format!("User:user{p}"),
                resource: ResourceKind::Topic,
                name: name.to_string(),
                pattern,
                operation: Operation::Read,
                permission: Permission::Allow,
            });
        }
        acls.push(AclRecord {
            principal: format!("User:user{p}"),
            resource: ResourceKind::Group,
            name: format!("group{p}"),
            pattern: Pattern::Literal,
            operation: Operation::Read,
            permission: Permission::Allow,
        });
    }
    acls
}

fn bench(c: &mut Criterion) {
    for principals in [3usize, 300] {
        let index = AclIndex::new(&acls(principals));
        let total = principals * 3;
        c.bench_function(&format!("acl check, {total} ACLs, allowed"), |b| {
            b.iter(|| {
                let verdict = index.decide(
                    std::hint::black_box("User:user1"),
                    Operation::Read,
                    ResourceKind::Topic,
                    std::hint::black_box("logs-app"),
                );
                assert_eq!(verdict, Verdict::Allow);
            })
        });
        c.bench_function(&format!("acl check, {total} ACLs, no ACL"), |b| {
            b.iter(|| {
                index.decide(
                    std::hint::black_box("User:stranger"),
                    Operation::Write,
                    ResourceKind::Topic,
                    std::hint::black_box("orders"),
                )
            })
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
