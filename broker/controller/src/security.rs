//! Users and ACLs as the cluster metadata holds them, and the ACL rules (Kafka's).
//!
//! **Invariants:**
//! - A user's record holds only salted, iterated SCRAM keys, never a password.
//! - Deny wins: a request that any DENY ACL matches is refused whatever allows it.
//! - No ACL means no: a resource no ALLOW ACL matches is refused (super users aside,
//!   which the broker decides, not the metadata).
//! - ALLOW of READ, WRITE, DELETE or ALTER implies DESCRIBE; ALLOW of ALTER_CONFIGS
//!   implies DESCRIBE_CONFIGS (as in Kafka). A DENY denies only what it names (or ALL).

use std::collections::BTreeMap;

use runnel_proto::v1;
use serde::{Deserialize, Serialize};

/// One mechanism's stored SCRAM keys of a user.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CredentialRecord {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: Vec<u8>,
    pub server_key: Vec<u8>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct UserRecord {
    /// By mechanism name (`SCRAM-SHA-256`, `SCRAM-SHA-512`).
    pub credentials: BTreeMap<String, CredentialRecord>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ResourceKind {
    Topic,
    Group,
    Cluster,
    TransactionalId,
    Transform,
    Connector,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Pattern {
    Literal,
    Prefixed,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Operation {
    All,
    Read,
    Write,
    Create,
    Delete,
    Alter,
    Describe,
    DescribeConfigs,
    AlterConfigs,
    ClusterAction,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Permission {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AclRecord {
    pub principal: String,
    pub resource: ResourceKind,
    pub name: String,
    pub pattern: Pattern,
    pub operation: Operation,
    pub permission: Permission,
}

/// Matches ACLs; `None` fields match anything.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AclFilter {
    pub principal: Option<String>,
    pub resource: Option<ResourceKind>,
    pub name: Option<String>,
    pub pattern: Option<Pattern>,
    pub operation: Option<Operation>,
    pub permission: Option<Permission>,
}

impl AclFilter {
    pub fn matches(&self, acl: &AclRecord) -> bool {
        self.principal.as_ref().is_none_or(|p| *p == acl.principal)
            && self.resource.is_none_or(|r| r == acl.resource)
            && self.name.as_ref().is_none_or(|n| *n == acl.name)
            && self.pattern.is_none_or(|p| p == acl.pattern)
            && self.operation.is_none_or(|o| o == acl.operation)
            && self.permission.is_none_or(|p| p == acl.permission)
    }
}

impl AclRecord {
    /// Whether this ACL is about `principal` doing `operation` on the named resource.
    pub fn applies(&self, principal: &str, operation: Operation, name: &str) -> bool {
        (self.principal == principal || self.principal == "User:*")
            && match self.pattern {
                Pattern::Literal => self.name == name || self.name == "*",
                Pattern::Prefixed => name.starts_with(&self.name),
            }
            && (self.operation == operation
                || self.operation == Operation::All
                || (self.permission == Permission::Allow && implies(self.operation, operation)))
    }
}

/// Whether allowing `granted` allows `wanted` too.
fn implies(granted: Operation, wanted: Operation) -> bool {
    match wanted {
        Operation::Describe => matches!(
            granted,
            Operation::Read | Operation::Write | Operation::Delete | Operation::Alter
        ),
        Operation::DescribeConfigs => granted == Operation::AlterConfigs,
        _ => false,
    }
}

/// The ACLs by resource type and principal, for the checks of every request: a check
/// looks only at the caller's own ACLs and those for everyone (`User:*`).
#[derive(Debug, Default)]
pub struct AclIndex {
    by_owner: std::collections::HashMap<String, BTreeMap<ResourceKind, Vec<AclRecord>>>,
}

/// What the ACLs say of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    NoAcl,
    Deny,
}

impl AclIndex {
    pub fn new(acls: &[AclRecord]) -> Self {
        let mut by_owner: std::collections::HashMap<
            String,
            BTreeMap<ResourceKind, Vec<AclRecord>>,
        > = std::collections::HashMap::new();
        for acl in acls {
            by_owner
                .entry(acl.principal.clone())
                .or_default()
                .entry(acl.resource)
                .or_default()
                .push(acl.clone());
        }
        AclIndex { by_owner }
    }

    pub fn decide(
        &self,
        principal: &str,
        operation: Operation,
        resource: ResourceKind,
        name: &str,
    ) -> Verdict {
        let mut verdict = Verdict::NoAcl;
        for owner in [principal, "User:*"] {
            let Some(acls) = self.by_owner.get(owner).and_then(|k| k.get(&resource)) else {
                continue;
            };
            for acl in acls {
                if acl.applies(principal, operation, name) {
                    match acl.permission {
                        Permission::Deny => return Verdict::Deny,
                        Permission::Allow => verdict = Verdict::Allow,
                    }
                }
            }
        }
        verdict
    }
}

impl ResourceKind {
    pub fn from_proto(value: v1::ResourceType) -> Option<Self> {
        Some(match value {
            v1::ResourceType::ResourceAny => return None,
            v1::ResourceType::Topic => ResourceKind::Topic,
            v1::ResourceType::Group => ResourceKind::Group,
            v1::ResourceType::Cluster => ResourceKind::Cluster,
            v1::ResourceType::TransactionalId => ResourceKind::TransactionalId,
            v1::ResourceType::Transform => ResourceKind::Transform,
            v1::ResourceType::Connector => ResourceKind::Connector,
        })
    }

    pub fn to_proto(self) -> v1::ResourceType {
        match self {
            ResourceKind::Topic => v1::ResourceType::Topic,
            ResourceKind::Group => v1::ResourceType::Group,
            ResourceKind::Cluster => v1::ResourceType::Cluster,
            ResourceKind::TransactionalId => v1::ResourceType::TransactionalId,
            ResourceKind::Transform => v1::ResourceType::Transform,
            ResourceKind::Connector => v1::ResourceType::Connector,
        }
    }
}

impl Pattern {
    pub fn from_proto(value: v1::PatternType) -> Option<Self> {
        match value {
            v1::PatternType::PatternAny => None,
            v1::PatternType::Literal => Some(Pattern::Literal),
            v1::PatternType::Prefixed => Some(Pattern::Prefixed),
        }
    }

    pub fn to_proto(self) -> v1::PatternType {
        match self {
            Pattern::Literal => v1::PatternType::Literal,
            Pattern::Prefixed => v1::PatternType::Prefixed,
        }
    }
}

impl Operation {
    pub fn from_proto(value: v1::AclOperation) -> Option<Self> {
        Some(match value {
            v1::AclOperation::OperationAny => return None,
            v1::AclOperation::All => Operation::All,
            v1::AclOperation::Read => Operation::Read,
            v1::AclOperation::Write => Operation::Write,
            v1::AclOperation::Create => Operation::Create,
            v1::AclOperation::Delete => Operation::Delete,
            v1::AclOperation::Alter => Operation::Alter,
            v1::AclOperation::Describe => Operation::Describe,
            v1::AclOperation::DescribeConfigs => Operation::DescribeConfigs,
            v1::AclOperation::AlterConfigs => Operation::AlterConfigs,
            v1::AclOperation::ClusterAction => Operation::ClusterAction,
        })
    }

    pub fn to_proto(self) -> v1::AclOperation {
        match self {
            Operation::All => v1::AclOperation::All,
            Operation::Read => v1::AclOperation::Read,
            Operation::Write => v1::AclOperation::Write,
            Operation::Create => v1::AclOperation::Create,
            Operation::Delete => v1::AclOperation::Delete,
            Operation::Alter => v1::AclOperation::Alter,
            Operation::Describe => v1::AclOperation::Describe,
            Operation::DescribeConfigs => v1::AclOperation::DescribeConfigs,
            Operation::AlterConfigs => v1::AclOperation::AlterConfigs,
            Operation::ClusterAction => v1::AclOperation::ClusterAction,
        }
    }
}

impl Permission {
    pub fn from_proto(value: v1::AclPermission) -> Option<Self> {
        match value {
            v1::AclPermission::PermissionAny => None,
            v1::AclPermission::Allow => Some(Permission::Allow),
            v1::AclPermission::Deny => Some(Permission::Deny),
        }
    }

    pub fn to_proto(self) -> v1::AclPermission {
        match self {
            Permission::Allow => v1::AclPermission::Allow,
            Permission::Deny => v1::AclPermission::Deny,
        }
    }
}

impl AclRecord {
    /// Reads an ACL of a request, with every field required.
    ///
    /// # Errors
    /// A field missing or invalid, named.
    pub fn from_proto(acl: &v1::Acl) -> Result<Self, String> {
        let principal = acl.principal.trim();
        match principal.split_once(':') {
            Some(("User", name)) if !name.is_empty() => {}
            _ => {
                return Err(format!(
                    "principal {principal:?} is not of the form User:NAME (or User:* for everyone)"
                ));
            }
        }
        let resource = ResourceKind::from_proto(acl.resource_type())
            .ok_or("an ACL needs a resource type (topic, group, cluster, transactional-id, transform or connector)")?;
        let pattern = Pattern::from_proto(acl.pattern_type()).unwrap_or(Pattern::Literal);
        let operation = Operation::from_proto(acl.operation())
            .ok_or("an ACL needs an operation (read, write, create, delete, alter, describe, describe-configs, alter-configs, cluster-action or all)")?;
        let permission = Permission::from_proto(acl.permission()).unwrap_or(Permission::Allow);
        let name = if resource == ResourceKind::Cluster {
            runnel_proto::auth::CLUSTER_RESOURCE.to_string()
        } else {
            acl.resource_name.trim().to_string()
        };
        if name.is_empty() {
            return Err(
                "an ACL needs a resource name (or `*` for every resource of its type)".into(),
            );
        }
        if pattern == Pattern::Prefixed && name == "*" {
            return Err("a prefixed ACL cannot have the name `*`; use a literal `*`".into());
        }
        Ok(AclRecord {
            principal: principal.to_string(),
            resource,
            name,
            pattern,
            operation,
            permission,
        })
    }

    pub fn to_proto(&self) -> v1::Acl {
        v1::Acl {
            principal: self.principal.clone(),
            resource_type: self.resource.to_proto() as i32,
            resource_name: self.name.clone(),
            pattern_type: self.pattern.to_proto() as i32,
            operation: self.operation.to_proto() as i32,
            permission: self.permission.to_proto() as i32,
        }
    }
}

impl AclFilter {
    pub fn from_proto(filter: &v1::AclFilter) -> Self {
        let text = |s: &str| (!s.trim().is_empty()).then(|| s.trim().to_string());
        AclFilter {
            principal: text(&filter.principal),
            resource: ResourceKind::from_proto(filter.resource_type()),
            name: text(&filter.resource_name),
            pattern: Pattern::from_proto(filter.pattern_type()),
            operation: Operation::from_proto(filter.operation()),
            permission: Permission::from_proto(filter.permission()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(
        principal: &str,
        name: &str,
        pattern: Pattern,
        op: Operation,
        perm: Permission,
    ) -> AclRecord {
        AclRecord {
            principal: principal.into(),
            resource: ResourceKind::Topic,
            name: name.into(),
            pattern,
            operation: op,
            permission: perm,
        }
    }

    #[test]
    fn deny_wins_and_no_acl_means_no() {
        let index = AclIndex::new(&[
            acl(
                "User:alice",
                "orders",
                Pattern::Literal,
                Operation::All,
                Permission::Allow,
            ),
            acl(
                "User:*",
                "orders",
                Pattern::Literal,
                Operation::Write,
                Permission::Deny,
            ),
            acl(
                "User:bob",
                "logs-",
                Pattern::Prefixed,
                Operation::Read,
                Permission::Allow,
            ),
        ]);
        let topic = ResourceKind::Topic;
        assert_eq!(
            index.decide("User:alice", Operation::Read, topic, "orders"),
            Verdict::Allow
        );
        assert_eq!(
            index.decide("User:alice", Operation::Write, topic, "orders"),
            Verdict::Deny
        );
        assert_eq!(
            index.decide("User:bob", Operation::Read, topic, "logs-app"),
            Verdict::Allow
        );
        assert_eq!(
            index.decide("User:bob", Operation::Describe, topic, "logs-app"),
            Verdict::Allow
        );
        assert_eq!(
            index.decide("User:bob", Operation::Write, topic, "logs-app"),
            Verdict::NoAcl
        );
        assert_eq!(
            index.decide("User:bob", Operation::Read, topic, "log"),
            Verdict::NoAcl
        );
        assert_eq!(
            index.decide("User:bob", Operation::Read, ResourceKind::Group, "logs-app"),
            Verdict::NoAcl
        );
    }

    #[test]
    fn a_deny_denies_only_what_it_names() {
        let index = AclIndex::new(&[
            acl(
                "User:carol",
                "*",
                Pattern::Literal,
                Operation::All,
                Permission::Allow,
            ),
            acl(
                "User:carol",
                "secret",
                Pattern::Literal,
                Operation::Read,
                Permission::Deny,
            ),
        ]);
        let topic = ResourceKind::Topic;
        assert_eq!(
            index.decide("User:carol", Operation::Read, topic, "secret"),
            Verdict::Deny
        );
        assert_eq!(
            index.decide("User:carol", Operation::Describe, topic, "secret"),
            Verdict::Allow
        );
        assert_eq!(
            index.decide("User:carol", Operation::Read, topic, "other"),
            Verdict::Allow
        );
    }
}
