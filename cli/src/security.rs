//! `runnel user` and `runnel acl`: SCRAM users and Kafka-style ACLs.

use std::io::BufRead;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use runnel_client::{Admin, Client, Mechanism, v1};

#[derive(Subcommand)]
pub enum UserCommand {
    /// Create a SCRAM user (both SCRAM-SHA-256 and SCRAM-SHA-512 unless --mechanism).
    Create {
        name: String,
        #[command(flatten)]
        password: PasswordArgs,
    },
    /// Change a user's password (every mechanism unless --mechanism); its open sessions
    /// end.
    SetPassword {
        name: String,
        #[command(flatten)]
        password: PasswordArgs,
    },
    /// Delete a user; its open sessions end.
    Delete { name: String },
    /// List the users and their mechanisms.
    List,
    /// Who this CLI is, as the broker sees it.
    Whoami,
}

#[derive(Args)]
pub struct PasswordArgs {
    /// The new password; without it (and without --password-stdin) it is asked for.
    #[arg(
        long = "new-password",
        env = "RUNNEL_NEW_PASSWORD",
        hide_env_values = true
    )]
    new_password: Option<String>,
    /// Read the new password from the first line of standard input.
    #[arg(long, conflicts_with = "new_password")]
    password_stdin: bool,
    /// SCRAM-SHA-256 or SCRAM-SHA-512; default both.
    #[arg(long, value_parser = parse_mechanism)]
    mechanism: Option<Mechanism>,
    /// PBKDF2 iterations (at least 4096).
    #[arg(long, default_value_t = 4096)]
    iterations: u32,
}

pub fn parse_mechanism(text: &str) -> Result<Mechanism, String> {
    Mechanism::parse(text).ok_or_else(|| {
        format!("unknown SCRAM mechanism {text:?}; use SCRAM-SHA-256 or SCRAM-SHA-512")
    })
}

impl PasswordArgs {
    fn password(&self) -> anyhow::Result<String> {
        if let Some(password) = &self.new_password {
            return Ok(password.clone());
        }
        if !self.password_stdin && std::io::IsTerminal::is_terminal(&std::io::stdin()) {
            eprint!("New password: ");
        }
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        let password = line.trim_end_matches(['\r', '\n']).to_string();
        if password.is_empty() {
            anyhow::bail!(
                "no password given: use --new-password, RUNNEL_NEW_PASSWORD, or --password-stdin"
            );
        }
        Ok(password)
    }

    fn mechanisms(&self) -> Vec<Mechanism> {
        match self.mechanism {
            Some(mechanism) => vec![mechanism],
            None => vec![Mechanism::Sha256, Mechanism::Sha512],
        }
    }
}

pub async fn user(client: Client, command: UserCommand) -> anyhow::Result<ExitCode> {
    let admin = Admin::new(client);
    match command {
        UserCommand::Create { name, password } => {
            let secret = password.password()?;
            for (i, mechanism) in password.mechanisms().into_iter().enumerate() {
                admin
                    .upsert_user(&name, &secret, mechanism, password.iterations, i == 0)
                    .await?;
            }
            println!("Created user {name:?} (principal User:{name})");
        }
        UserCommand::SetPassword { name, password } => {
            let users = admin.list_users().await?;
            if !users.iter().any(|u| u.name == name) {
                anyhow::bail!("unknown user {name:?}; create it with `runnel user create {name}`");
            }
            let secret = password.password()?;
            for mechanism in password.mechanisms() {
                admin
                    .upsert_user(&name, &secret, mechanism, password.iterations, false)
                    .await?;
            }
            println!("Changed the password of {name:?}");
        }
        UserCommand::Delete { name } => {
            admin.delete_user(&name).await?;
            println!("Deleted user {name:?}");
        }
        UserCommand::List => {
            let users = admin.list_users().await?;
            if users.is_empty() {
                println!("No users; create one with `runnel user create NAME`");
            }
            for user in users {
                let mechanisms: Vec<String> = user
                    .mechanisms()
                    .zip(&user.iterations)
                    .map(|(m, i)| format!("{} ({i} iterations)", m.as_str_name().replace('_', "-")))
                    .collect();
                println!("{}\t{}", user.name, mechanisms.join(", "));
            }
        }
        UserCommand::Whoami => {
            let me = admin.who_am_i().await?;
            let role = if me.super_user { ", super user" } else { "" };
            println!("{} (authenticated by {}{role})", me.principal, me.method);
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Subcommand)]
pub enum AclCommand {
    /// Allow or deny a principal operations on a resource, as kafka-acls --add:
    /// `runnel acl add --allow User:alice --operation read --topic orders`.
    Add {
        /// The principal allowed, `User:NAME` (`User:*`: everyone).
        #[arg(long, required_unless_present = "deny", conflicts_with = "deny")]
        allow: Option<String>,
        /// The principal denied; a DENY wins over every ALLOW.
        #[arg(long)]
        deny: Option<String>,
        /// read, write, create, delete, alter, describe, describe-configs,
        /// alter-configs, cluster-action or all; repeatable or comma-separated.
        #[arg(long = "operation", required = true, value_delimiter = ',', value_parser = parse_operation)]
        operations: Vec<v1::AclOperation>,
        #[command(flatten)]
        resource: ResourceArgs,
    },
    /// List ACLs; the options filter.
    List {
        #[command(flatten)]
        filter: FilterArgs,
    },
    /// Remove the ACLs the options match (at least one option, or --all).
    Remove {
        #[command(flatten)]
        filter: FilterArgs,
        /// Remove every ACL.
        #[arg(long)]
        all: bool,
    },
}

/// The resource an ACL names: one of these.
#[derive(Args)]
pub struct ResourceNames {
    /// A topic (`*`: every topic).
    #[arg(long)]
    topic: Option<String>,
    /// A consumer group.
    #[arg(long)]
    group: Option<String>,
    /// The cluster (topic creation, users, ACLs, reassignments).
    #[arg(long)]
    cluster: bool,
    /// A transactional id.
    #[arg(long)]
    transactional_id: Option<String>,
    /// A transform deployment.
    #[arg(long)]
    transform: Option<String>,
    /// A connector.
    #[arg(long)]
    connector: Option<String>,
}

impl ResourceNames {
    /// The resource named, if any.
    ///
    /// # Errors
    /// More than one given.
    fn resource(&self) -> anyhow::Result<Option<(v1::ResourceType, String)>> {
        use v1::ResourceType as R;
        let cluster = self
            .cluster
            .then(|| runnel_client::CLUSTER_RESOURCE.to_string());
        let given: Vec<(v1::ResourceType, String)> = [
            (R::Topic, self.topic.clone()),
            (R::Group, self.group.clone()),
            (R::Cluster, cluster),
            (R::TransactionalId, self.transactional_id.clone()),
            (R::Transform, self.transform.clone()),
            (R::Connector, self.connector.clone()),
        ]
        .into_iter()
        .filter_map(|(kind, name)| name.map(|n| (kind, n)))
        .collect();
        if given.len() > 1 {
            anyhow::bail!(
                "give one resource: --topic, --group, --cluster, --transactional-id, --transform or --connector"
            );
        }
        Ok(given.into_iter().next())
    }
}

#[derive(Args)]
pub struct ResourceArgs {
    #[command(flatten)]
    names: ResourceNames,
    /// The name is a prefix: the ACL covers every resource whose name starts with it.
    #[arg(long)]
    prefixed: bool,
}

#[derive(Args)]
pub struct FilterArgs {
    #[arg(long)]
    principal: Option<String>,
    #[command(flatten)]
    names: ResourceNames,
    #[arg(long, value_parser = parse_operation)]
    operation: Option<v1::AclOperation>,
}

pub fn parse_operation(text: &str) -> Result<v1::AclOperation, String> {
    let name = text.trim().to_ascii_uppercase().replace('-', "_");
    match v1::AclOperation::from_str_name(&name) {
        Some(op) if op != v1::AclOperation::OperationAny => Ok(op),
        _ => Err(format!(
            "unknown operation {text:?}; use read, write, create, delete, alter, describe, describe-configs, alter-configs, cluster-action or all"
        )),
    }
}

fn principal(text: &str) -> anyhow::Result<String> {
    let text = text.trim();
    match text.split_once(':') {
        Some(("User", name)) if !name.is_empty() => Ok(text.to_string()),
        _ if !text.contains(':') && !text.is_empty() => Ok(format!("User:{text}")),
        _ => anyhow::bail!("principal {text:?} is not of the form User:NAME (or User:*)"),
    }
}

fn filter_of(args: &FilterArgs) -> anyhow::Result<v1::AclFilter> {
    let resource = args.names.resource()?;
    Ok(v1::AclFilter {
        principal: args
            .principal
            .as_deref()
            .map(principal)
            .transpose()?
            .unwrap_or_default(),
        resource_type: resource.as_ref().map_or(0, |(kind, _)| *kind as i32),
        resource_name: resource.map(|(_, name)| name).unwrap_or_default(),
        pattern_type: 0,
        operation: args.operation.map_or(0, |op| op as i32),
        permission: 0,
    })
}

fn show(acl: &v1::Acl) -> String {
    let name = |s: &str| s.to_ascii_lowercase().replace('_', "-");
    format!(
        "{}\t{}\t{}\t{}:{}\t{}",
        acl.principal,
        name(acl.permission().as_str_name()),
        name(acl.operation().as_str_name()),
        name(acl.resource_type().as_str_name()),
        acl.resource_name,
        name(acl.pattern_type().as_str_name()),
    )
}

pub async fn acl(client: Client, command: AclCommand) -> anyhow::Result<ExitCode> {
    let admin = Admin::new(client);
    match command {
        AclCommand::Add {
            allow,
            deny,
            operations,
            resource,
        } => {
            let (who, permission) = match (allow, deny) {
                (Some(who), _) => (who, v1::AclPermission::Allow),
                (None, Some(who)) => (who, v1::AclPermission::Deny),
                (None, None) => anyhow::bail!("give --allow PRINCIPAL or --deny PRINCIPAL"),
            };
            let who = principal(&who)?;
            let (kind, name) = resource.names.resource()?.ok_or_else(|| anyhow::anyhow!("give a resource: --topic, --group, --cluster, --transactional-id, --transform or --connector"))?;
            let pattern = if resource.prefixed {
                v1::PatternType::Prefixed
            } else {
                v1::PatternType::Literal
            };
            let acls: Vec<v1::Acl> = operations
                .iter()
                .map(|op| v1::Acl {
                    principal: who.clone(),
                    resource_type: kind as i32,
                    resource_name: name.clone(),
                    pattern_type: pattern as i32,
                    operation: *op as i32,
                    permission: permission as i32,
                })
                .collect();
            admin.create_acls(acls.clone()).await?;
            for acl in &acls {
                println!("Added {}", show(acl));
            }
        }
        AclCommand::List { filter } => {
            let acls = admin.list_acls(filter_of(&filter)?).await?;
            if acls.is_empty() {
                println!("No ACLs match");
            }
            for acl in &acls {
                println!("{}", show(acl));
            }
        }
        AclCommand::Remove { filter, all } => {
            let acl_filter = filter_of(&filter)?;
            if !all && acl_filter == v1::AclFilter::default() {
                anyhow::bail!(
                    "give what to remove (--principal, a resource, --operation), or --all to remove every ACL"
                );
            }
            let removed = admin.delete_acls(acl_filter).await?;
            for acl in &removed {
                println!("Removed {}", show(acl));
            }
            println!("{} ACL(s) removed", removed.len());
        }
    }
    Ok(ExitCode::SUCCESS)
}
