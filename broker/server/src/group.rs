//! Consumer group coordination: membership, sessions and partition assignment.
//!
//! The protocol is Kafka's newer one (KIP-848) reduced to its core: every member calls one
//! heartbeat that joins, keeps the session alive, reports the partitions it reads and
//! receives the partitions it may read. The broker computes a target assignment that is
//! balanced and sticky (a member keeps what it had when it can, so unaffected partitions
//! keep flowing). A partition moving from A to B is handed over in two steps: A's next
//! heartbeat no longer lists it (revoked; A stops reading it and commits), and only once A
//! reports it no longer reads it (or A is gone) does B receive it. So a partition is owned
//! by at most one member at any moment.
//!
//! Pure state and logic: time comes in as `now_ms`, partition counts through a closure, so
//! tests drive it deterministically.

use std::collections::{BTreeMap, BTreeSet};

use crate::error::BrokerError;

pub type TopicPartition = (String, u32);

/// How often members should heartbeat.
pub const HEARTBEAT_INTERVAL_MS: u32 = 250;
pub const SESSION_TIMEOUT_MS_MIN: u32 = 1_000;
pub const SESSION_TIMEOUT_MS_MAX: u32 = 300_000;
pub const SESSION_TIMEOUT_MS_DEFAULT: u32 = 10_000;
pub const GROUP_ID_LENGTH_MAX: usize = 255;

#[derive(Debug, Clone)]
pub struct Member {
    pub member_id: String,
    pub client_id: String,
    pub host: String,
    pub topics: BTreeSet<String>,
    pub session_timeout_ms: u32,
    pub last_seen_ms: i64,
    pub epoch: i32,
    /// What the last response told the member it owns.
    pub assigned: BTreeSet<TopicPartition>,
    /// What the member last said it reads.
    pub owned: BTreeSet<TopicPartition>,
    /// Partitions it last said it keeps a current copy of without reading them.
    pub warm: BTreeSet<TopicPartition>,
    /// Warm copies it wants of each partition (the group uses the largest value).
    pub standby_replicas: u32,
}

impl Member {
    /// Partitions this member may still be reading.
    fn holds(&self, tp: &TopicPartition) -> bool {
        self.assigned.contains(tp) || self.owned.contains(tp)
    }
}

#[derive(Debug, Clone, Default)]
pub struct Group {
    pub epoch: i32,
    pub members: BTreeMap<String, Member>,
    /// Who should own each partition once handovers finish.
    pub target: BTreeMap<TopicPartition, String>,
    /// The partitions of the subscribed topics the target was computed for.
    subscribed: BTreeSet<TopicPartition>,
    /// Which members keep a warm copy of each partition of the target (never its owner).
    pub standby: BTreeMap<TopicPartition, BTreeSet<String>>,
}

impl Group {
    /// `Empty`, `Reconciling` (partitions still moving) or `Stable`.
    pub fn state(&self) -> &'static str {
        if self.members.is_empty() {
            return "Empty";
        }
        let settled = self.members.values().all(|m| {
            let target: BTreeSet<&TopicPartition> = self
                .target
                .iter()
                .filter(|(_, owner)| **owner == m.member_id)
                .map(|(tp, _)| tp)
                .collect();
            m.assigned.iter().collect::<BTreeSet<_>>() == target && m.owned == m.assigned
        });
        if settled { "Stable" } else { "Reconciling" }
    }

    fn recompute(&mut self, partitions: BTreeSet<TopicPartition>) {
        let target = compute_target(&self.members, &partitions, &self.target);
        if target != self.target {
            self.epoch += 1;
        }
        // Previous owners hold current state: they make good standbys.
        let previous = std::mem::replace(&mut self.target, target);
        self.subscribed = partitions;
        self.standby = compute_standbys(&self.members, &self.target, &previous, &self.standby);
    }

    /// The partitions `member_id` should keep warm: those it is standby for and holds
    /// in no other way.
    pub fn standby_of(&self, member_id: &str) -> BTreeSet<TopicPartition> {
        let Some(member) = self.members.get(member_id) else {
            return BTreeSet::new();
        };
        self.standby
            .iter()
            .filter(|(tp, members)| members.contains(member_id) && !member.holds(tp))
            .map(|(tp, _)| tp.clone())
            .collect()
    }

    /// The part of `member`'s target it may have now: partitions no other member holds.
    fn grant(&self, member_id: &str) -> BTreeSet<TopicPartition> {
        self.target
            .iter()
            .filter(|(_, owner)| owner.as_str() == member_id)
            .map(|(tp, _)| tp)
            .filter(|tp| {
                !self
                    .members
                    .values()
                    .any(|other| other.member_id != member_id && other.holds(tp))
            })
            .cloned()
            .collect()
    }
}

/// A member's heartbeat, as the coordinator sees it.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    pub group_id: String,
    pub member_id: String,
    pub member_epoch: i32,
    pub client_id: String,
    pub host: String,
    pub topics: Vec<String>,
    pub session_timeout_ms: u32,
    pub owned: BTreeSet<TopicPartition>,
    pub standby_replicas: u32,
    pub warm: BTreeSet<TopicPartition>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeartbeatOutcome {
    Member {
        member_id: String,
        epoch: i32,
        assignment: BTreeSet<TopicPartition>,
        /// Partitions to keep warm copies of.
        standby: BTreeSet<TopicPartition>,
    },
    Left,
}

/// Checks a group id.
///
/// # Errors
/// An empty or overlong id.
pub fn validate_group_id(group_id: &str) -> Result<(), BrokerError> {
    if group_id.is_empty() || group_id.len() > GROUP_ID_LENGTH_MAX {
        return Err(BrokerError::InvalidGroupId {
            reason: format!(
                "a group id must have 1 to {GROUP_ID_LENGTH_MAX} characters, {group_id:?} has {}",
                group_id.len()
            ),
        });
    }
    Ok(())
}

/// A group's membership as stored in `__consumer_offsets`: enough for the next
/// coordinator to know who may still read which partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupRecord {
    pub epoch: i32,
    pub members: Vec<MemberRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberRecord {
    pub member_id: String,
    pub client_id: String,
    pub host: String,
    pub session_timeout_ms: u32,
    pub epoch: i32,
    pub topics: BTreeSet<String>,
    /// What the member was given or still reads.
    pub holds: BTreeSet<TopicPartition>,
}

/// Every group's membership. Committed offsets live elsewhere (`offsets.rs`).
#[derive(Debug, Default)]
pub struct Coordinator {
    groups: BTreeMap<String, Group>,
    next_member: u64,
    /// The membership last handed out for storing, per group.
    stored: BTreeMap<String, GroupRecord>,
}

impl Coordinator {
    /// The group's membership in its stored form; `None` without members.
    pub fn record(&self, group_id: &str) -> Option<GroupRecord> {
        let group = self
            .groups
            .get(group_id)
            .filter(|g| !g.members.is_empty())?;
        Some(GroupRecord {
            epoch: group.epoch,
            members: group
                .members
                .values()
                .map(|m| MemberRecord {
                    member_id: m.member_id.clone(),
                    client_id: m.client_id.clone(),
                    host: m.host.clone(),
                    session_timeout_ms: m.session_timeout_ms,
                    epoch: m.epoch,
                    topics: m.topics.clone(),
                    holds: m.assigned.union(&m.owned).cloned().collect(),
                })
                .collect(),
        })
    }

    /// The membership to store when it changed since it was last handed out: `Some(None)`
    /// when the group lost its last member.
    pub fn take_changed(&mut self, group_id: &str) -> Option<Option<GroupRecord>> {
        let now = self.record(group_id);
        if now.as_ref() == self.stored.get(group_id) {
            return None;
        }
        match &now {
            Some(record) => self.stored.insert(group_id.to_string(), record.clone()),
            None => self.stored.remove(group_id),
        };
        Some(now)
    }

    /// Forgets what was handed out for storing (the write failed): the next change is
    /// stored whatever it is.
    pub fn forget_stored(&mut self, group_id: &str) {
        self.stored.remove(group_id);
    }

    /// Takes over a group from its stored membership (after a coordinator failover):
    /// every member keeps what it held and gets a full session to heartbeat again.
    pub fn restore(&mut self, group_id: &str, record: Option<GroupRecord>, now_ms: i64) {
        let Some(record) = record.filter(|r| !r.members.is_empty()) else {
            self.groups.remove(group_id);
            self.stored.remove(group_id);
            return;
        };
        let mut group = Group {
            epoch: record.epoch,
            ..Group::default()
        };
        for m in &record.members {
            for tp in &m.holds {
                group.target.insert(tp.clone(), m.member_id.clone());
            }
            group.members.insert(
                m.member_id.clone(),
                Member {
                    member_id: m.member_id.clone(),
                    client_id: m.client_id.clone(),
                    host: m.host.clone(),
                    topics: m.topics.clone(),
                    session_timeout_ms: m.session_timeout_ms,
                    last_seen_ms: now_ms,
                    epoch: m.epoch,
                    assigned: m.holds.clone(),
                    owned: m.holds.clone(),
                    // Standbys are not stored: members report their warm copies again
                    // and are given standbys once they say how many they want.
                    warm: BTreeSet::new(),
                    standby_replicas: 0,
                },
            );
        }
        self.groups.insert(group_id.to_string(), group);
        self.stored.insert(group_id.to_string(), record);
    }

    /// Forgets the groups `keep` refuses (their coordination moved elsewhere).
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.groups.retain(|id, _| keep(id));
        self.stored.retain(|id, _| keep(id));
    }

    pub fn group(&self, group_id: &str) -> Option<&Group> {
        self.groups.get(group_id)
    }

    pub fn group_ids(&self) -> impl Iterator<Item = &String> {
        self.groups.keys()
    }

    /// Handles a join, heartbeat or leave. `partitions` gives a topic's partition count
    /// (`None` for an unknown topic, which is ignored until it exists).
    ///
    /// # Errors
    /// An invalid group id, or a member the group does not know (expired or left).
    pub fn heartbeat(
        &mut self,
        hb: Heartbeat,
        partitions: &dyn Fn(&str) -> Option<u32>,
        now_ms: i64,
    ) -> Result<HeartbeatOutcome, BrokerError> {
        validate_group_id(&hb.group_id)?;
        if hb.member_epoch == -1 {
            if let Some(group) = self.groups.get_mut(&hb.group_id)
                && group.members.remove(&hb.member_id).is_some()
            {
                let subscribed = group.subscribed.clone();
                group.recompute(subscribed);
                if group.members.is_empty() {
                    self.groups.remove(&hb.group_id);
                }
            }
            return Ok(HeartbeatOutcome::Left);
        }
        let session_timeout_ms = match hb.session_timeout_ms {
            0 => SESSION_TIMEOUT_MS_DEFAULT,
            n => n.clamp(SESSION_TIMEOUT_MS_MIN, SESSION_TIMEOUT_MS_MAX),
        };
        let member_id = if hb.member_id.is_empty() {
            self.next_member += 1;
            let prefix = if hb.client_id.is_empty() {
                "member"
            } else {
                hb.client_id.as_str()
            };
            format!("{prefix}-{}-{:x}", self.next_member, now_ms)
        } else {
            hb.member_id.clone()
        };
        let group = self.groups.entry(hb.group_id.clone()).or_default();
        let topics: BTreeSet<String> = hb.topics.iter().cloned().collect();
        let joined = !group.members.contains_key(&member_id);
        if joined && !hb.member_id.is_empty() {
            return Err(BrokerError::UnknownMemberId {
                group: hb.group_id,
                member: member_id,
            });
        }
        let member = group
            .members
            .entry(member_id.clone())
            .or_insert_with(|| Member {
                member_id: member_id.clone(),
                client_id: hb.client_id.clone(),
                host: hb.host.clone(),
                topics: BTreeSet::new(),
                session_timeout_ms,
                last_seen_ms: now_ms,
                epoch: 0,
                assigned: BTreeSet::new(),
                owned: BTreeSet::new(),
                warm: BTreeSet::new(),
                standby_replicas: 0,
            });
        member.last_seen_ms = now_ms;
        member.session_timeout_ms = session_timeout_ms;
        // A member may still read what it was given before a revocation, until it says it
        // stopped; it cannot claim what it was never given.
        let claimable: BTreeSet<TopicPartition> =
            member.assigned.union(&member.owned).cloned().collect();
        member.owned = hb.owned.intersection(&claimable).cloned().collect();
        member.warm = hb.warm.difference(&member.owned).cloned().collect();
        let standbys_changed = member.standby_replicas != hb.standby_replicas;
        member.standby_replicas = hb.standby_replicas;
        let subscription_changed = member.topics != topics;
        member.topics = topics;
        let wanted: BTreeSet<String> = group
            .members
            .values()
            .flat_map(|m| m.topics.iter().cloned())
            .collect();
        let mut partitions_now = BTreeSet::new();
        for topic in &wanted {
            for p in 0..partitions(topic).unwrap_or(0) {
                partitions_now.insert((topic.clone(), p));
            }
        }
        if joined || subscription_changed || partitions_now != group.subscribed {
            group.recompute(partitions_now);
        } else if standbys_changed {
            group.standby =
                compute_standbys(&group.members, &group.target, &group.target, &group.standby);
        }
        let grant = group.grant(&member_id);
        let standby = group.standby_of(&member_id);
        let member = group
            .members
            .get_mut(&member_id)
            .expect("the member was inserted above");
        if grant != member.assigned || joined {
            member.epoch += 1;
            member.assigned = grant.clone();
        }
        Ok(HeartbeatOutcome::Member {
            member_id,
            epoch: member.epoch,
            assignment: grant,
            standby,
        })
    }

    /// Removes members whose session expired; returns them as (group, member).
    /// The groups they left are then reported by [`Coordinator::take_changed`].
    pub fn expire(&mut self, now_ms: i64) -> Vec<(String, String)> {
        let mut expired = Vec::new();
        for (group_id, group) in &mut self.groups {
            let before = group.members.len();
            group.members.retain(|id, m| {
                let alive =
                    now_ms.saturating_sub(m.last_seen_ms) <= i64::from(m.session_timeout_ms);
                if !alive {
                    expired.push((group_id.clone(), id.clone()));
                }
                alive
            });
            if group.members.len() != before {
                let subscribed = group.subscribed.clone();
                group.recompute(subscribed);
            }
        }
        self.groups.retain(|_, g| !g.members.is_empty());
        expired
    }

    /// Whether `member_id` may commit an offset for `tp` in `group_id`. An empty member id
    /// commits from outside the group, allowed only while the group has no members.
    ///
    /// # Errors
    /// An unknown (expired) member, a member that does not hold the partition, or a
    /// non-member commit to a group with live members.
    pub fn check_commit(
        &self,
        group_id: &str,
        member_id: &str,
        tp: &TopicPartition,
    ) -> Result<(), BrokerError> {
        let group = self.groups.get(group_id);
        if member_id.is_empty() {
            return match group.filter(|g| !g.members.is_empty()) {
                Some(group) => Err(BrokerError::GroupNotEmpty {
                    group: group_id.to_string(),
                    members: group.members.keys().cloned().collect(),
                }),
                None => Ok(()),
            };
        }
        let member = group
            .and_then(|g| g.members.get(member_id))
            .ok_or_else(|| BrokerError::UnknownMemberId {
                group: group_id.to_string(),
                member: member_id.to_string(),
            })?;
        if !member.holds(tp) {
            return Err(BrokerError::FencedMember {
                group: group_id.to_string(),
                member: member_id.to_string(),
                topic: tp.0.clone(),
                partition: tp.1,
            });
        }
        Ok(())
    }

    /// Ids of the live members of a group.
    pub fn members_of(&self, group_id: &str) -> Vec<String> {
        self.groups
            .get(group_id)
            .map(|g| g.members.keys().cloned().collect())
            .unwrap_or_default()
    }
}

/// A balanced, sticky assignment of `partitions` to the members subscribed to their
/// topics: members keep current partitions up to their quota, the rest go to an eligible
/// member with room that keeps the partition warm, else to the least loaded one.
fn compute_target(
    members: &BTreeMap<String, Member>,
    partitions: &BTreeSet<TopicPartition>,
    current: &BTreeMap<TopicPartition, String>,
) -> BTreeMap<TopicPartition, String> {
    let eligible = |member: &Member, tp: &TopicPartition| member.topics.contains(&tp.0);
    let assignable: Vec<&TopicPartition> = partitions
        .iter()
        .filter(|tp| members.values().any(|m| eligible(m, tp)))
        .collect();
    let subscribers: Vec<&Member> = members.values().filter(|m| !m.topics.is_empty()).collect();
    if subscribers.is_empty() {
        return BTreeMap::new();
    }
    // Quotas: members that already hold more get the larger share first.
    let mut held: BTreeMap<&str, usize> = BTreeMap::new();
    for owner in current.values() {
        *held.entry(owner.as_str()).or_default() += 1;
    }
    let mut order: Vec<&Member> = subscribers.clone();
    order.sort_by(|a, b| {
        held.get(b.member_id.as_str())
            .unwrap_or(&0)
            .cmp(held.get(a.member_id.as_str()).unwrap_or(&0))
            .then_with(|| a.member_id.cmp(&b.member_id))
    });
    let base = assignable.len() / subscribers.len();
    let extra = assignable.len() % subscribers.len();
    let quota: BTreeMap<&str, usize> = order
        .iter()
        .enumerate()
        .map(|(i, m)| (m.member_id.as_str(), base + usize::from(i < extra)))
        .collect();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    let mut target = BTreeMap::new();
    for tp in &assignable {
        if let Some(owner) = current.get(*tp)
            && let Some(member) = members.get(owner)
            && eligible(member, tp)
            && counts.get(owner.as_str()).copied().unwrap_or(0)
                < quota.get(owner.as_str()).copied().unwrap_or(0)
        {
            *counts.entry(member.member_id.as_str()).or_default() += 1;
            target.insert((*tp).clone(), owner.clone());
        }
    }
    for tp in assignable {
        if target.contains_key(tp) {
            continue;
        }
        // Any member may take one of the `extra` partitions above `base` that are left,
        // so a warm member is not passed over because its quota came out one short.
        let above_base = counts.values().filter(|c| **c > base).count();
        let pick = subscribers
            .iter()
            .filter(|m| eligible(m, tp))
            .min_by_key(|m| {
                let count = counts.get(m.member_id.as_str()).copied().unwrap_or(0);
                let full = count > base || (count == base && above_base >= extra);
                (full, !m.warm.contains(tp), count, m.member_id.clone())
            });
        if let Some(member) = pick {
            *counts.entry(member.member_id.as_str()).or_default() += 1;
            target.insert(tp.clone(), member.member_id.clone());
        }
    }
    target
}

/// Standby replicas of every partition of `target`: as many members as the largest
/// `standby_replicas` of the group asks (fewer when fewer members are eligible), never
/// the partition's owner. Each place goes to the eligible member with the fewest
/// standbys so far, and among those to one that keeps the partition warm, is its
/// standby already, or owned it in `previous`; so standbys stay balanced and stay put
/// while nothing changes.
fn compute_standbys(
    members: &BTreeMap<String, Member>,
    target: &BTreeMap<TopicPartition, String>,
    previous: &BTreeMap<TopicPartition, String>,
    current: &BTreeMap<TopicPartition, BTreeSet<String>>,
) -> BTreeMap<TopicPartition, BTreeSet<String>> {
    let wanted = members
        .values()
        .map(|m| m.standby_replicas as usize)
        .max()
        .unwrap_or(0);
    let mut load: BTreeMap<&str, usize> = BTreeMap::new();
    let mut standby: BTreeMap<TopicPartition, BTreeSet<String>> = BTreeMap::new();
    if wanted == 0 {
        return standby;
    }
    for (tp, owner) in target {
        let mut chosen: BTreeSet<String> = BTreeSet::new();
        while chosen.len() < wanted {
            let pick = members
                .values()
                .filter(|m| {
                    m.member_id != *owner
                        && m.topics.contains(&tp.0)
                        && !chosen.contains(&m.member_id)
                })
                .min_by_key(|m| {
                    let warm = m.warm.contains(tp)
                        || current.get(tp).is_some_and(|s| s.contains(&m.member_id))
                        || previous.get(tp) == Some(&m.member_id);
                    (
                        load.get(m.member_id.as_str()).copied().unwrap_or(0),
                        !warm,
                        m.member_id.clone(),
                    )
                });
            let Some(member) = pick else { break };
            *load.entry(member.member_id.as_str()).or_default() += 1;
            chosen.insert(member.member_id.clone());
        }
        if !chosen.is_empty() {
            standby.insert(tp.clone(), chosen);
        }
    }
    standby
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hb(group: &str, member: &str, epoch: i32, owned: &BTreeSet<TopicPartition>) -> Heartbeat {
        Heartbeat {
            group_id: group.into(),
            member_id: member.into(),
            member_epoch: epoch,
            client_id: "c".into(),
            host: "127.0.0.1".into(),
            topics: vec!["t".into()],
            session_timeout_ms: 1000,
            owned: owned.clone(),
            standby_replicas: 0,
            warm: BTreeSet::new(),
        }
    }

    fn member_of(outcome: HeartbeatOutcome) -> (String, BTreeSet<TopicPartition>) {
        match outcome {
            HeartbeatOutcome::Member {
                member_id,
                assignment,
                ..
            } => (member_id, assignment),
            HeartbeatOutcome::Left => panic!("left"),
        }
    }

    #[test]
    fn three_members_share_six_partitions_and_a_leaver_hands_over() {
        let six = |_: &str| Some(6);
        let mut c = Coordinator::default();
        let none = BTreeSet::new();
        let (a, a_parts) = member_of(c.heartbeat(hb("g", "", 0, &none), &six, 0).expect("join"));
        assert_eq!(a_parts.len(), 6);
        let (b, _) = member_of(c.heartbeat(hb("g", "", 0, &none), &six, 1).expect("join"));
        // A still holds everything, so B gets nothing until A gives some up.
        let (_, a_parts) = member_of(c.heartbeat(hb("g", &a, 1, &a_parts), &six, 2).expect("hb"));
        assert_eq!(a_parts.len(), 3);
        let (_, a_parts) = member_of(c.heartbeat(hb("g", &a, 2, &a_parts), &six, 3).expect("hb"));
        let (_, b_parts) = member_of(c.heartbeat(hb("g", &b, 1, &none), &six, 4).expect("hb"));
        assert_eq!(b_parts.len(), 3);
        assert!(a_parts.is_disjoint(&b_parts));
        let (cc, _) = member_of(c.heartbeat(hb("g", "", 0, &none), &six, 5).expect("join"));
        for round in 0..3 {
            let now = 10 + round * 3;
            let owned_a = c.group("g").expect("g").members[&a].assigned.clone();
            let owned_b = c.group("g").expect("g").members[&b].assigned.clone();
            let owned_c = c.group("g").expect("g").members[&cc].assigned.clone();
            c.heartbeat(hb("g", &a, 0, &owned_a), &six, now)
                .expect("hb");
            c.heartbeat(hb("g", &b, 0, &owned_b), &six, now + 1)
                .expect("hb");
            c.heartbeat(hb("g", &cc, 0, &owned_c), &six, now + 2)
                .expect("hb");
        }
        let group = c.group("g").expect("g");
        assert!(
            group.members.values().all(|m| m.assigned.len() == 2),
            "{group:?}"
        );
        assert_eq!(group.state(), "Stable");
        // B's session expires: A and C take over its partitions.
        let b_parts = group.members[&b].assigned.clone();
        for now in [500, 900, 1300, 1400] {
            for m in [&a, &cc] {
                let owned = c.group("g").expect("g").members[m].assigned.clone();
                c.heartbeat(hb("g", m, 0, &owned), &six, now).expect("hb");
            }
            c.expire(now);
        }
        let group = c.group("g").expect("g");
        assert_eq!(group.members.len(), 2);
        let covered: BTreeSet<TopicPartition> = group
            .members
            .values()
            .flat_map(|m| m.assigned.clone())
            .collect();
        assert_eq!(covered.len(), 6);
        assert!(b_parts.is_subset(&covered));
        assert!(matches!(
            c.check_commit("g", &b, &("t".into(), 0)),
            Err(BrokerError::UnknownMemberId { .. })
        ));
        let stale = c.heartbeat(hb("g", &b, 5, &b_parts), &six, 1500);
        assert!(matches!(stale, Err(BrokerError::UnknownMemberId { .. })));
    }

    /// Heartbeats of every member until nothing moves, each reporting its standbys warm.
    fn settle(c: &mut Coordinator, members: &[&str], partitions: u32, now: &mut i64) {
        for _ in 0..4 {
            for id in members {
                *now += 1;
                let group = c.group("g").expect("g");
                let owned = group.members[*id].assigned.clone();
                let warm = group.standby_of(id);
                let beat = Heartbeat {
                    standby_replicas: 1,
                    warm,
                    ..hb("g", id, 0, &owned)
                };
                c.heartbeat(beat, &|_| Some(partitions), *now).expect("hb");
            }
        }
    }

    #[test]
    fn a_dead_members_partitions_go_to_the_members_that_keep_them_warm() {
        let mut c = Coordinator::default();
        let mut now = 0;
        let none = BTreeSet::new();
        let join = |c: &mut Coordinator, now: i64| {
            let beat = Heartbeat {
                standby_replicas: 1,
                ..hb("g", "", 0, &none)
            };
            member_of(c.heartbeat(beat, &|_| Some(6), now).expect("join")).0
        };
        let a = join(&mut c, now);
        let b = join(&mut c, now);
        settle(&mut c, &[&a, &b], 6, &mut now);
        let group = c.group("g").expect("g");
        assert_eq!(group.state(), "Stable");
        let b_owned = group.members[&b].assigned.clone();
        assert_eq!(b_owned.len(), 3);
        // Each keeps the other's partitions warm, and nothing of its own.
        assert_eq!(group.standby_of(&a), b_owned);
        assert!(group.standby_of(&b).is_disjoint(&b_owned));
        assert_eq!(group.standby_of(&b).len(), 3);

        // A third member joins: standbys spread, none is its partition's owner.
        let cc = join(&mut c, now);
        settle(&mut c, &[&a, &b, &cc], 6, &mut now);
        let group = c.group("g").expect("g");
        for (tp, owner) in &group.target {
            let standbys = &group.standby[tp];
            assert_eq!(standbys.len(), 1, "{tp:?}");
            assert!(!standbys.contains(owner), "{tp:?}");
        }

        // B dies: each of its partitions goes to the member that kept it warm unless that
        // one is full (a quota of 3 each), and gets a new standby.
        let b_owned = group.members[&b].assigned.clone();
        let warm_for: BTreeMap<TopicPartition, String> = b_owned
            .iter()
            .map(|tp| {
                (
                    tp.clone(),
                    group.standby[tp].iter().next().cloned().expect("one"),
                )
            })
            .collect();
        now += 2_000;
        for id in [&a, &cc] {
            let group = c.group("g").expect("g");
            let beat = Heartbeat {
                standby_replicas: 1,
                warm: group.standby_of(id),
                ..hb("g", id, 0, &group.members[id].assigned.clone())
            };
            c.heartbeat(beat, &|_| Some(6), now).expect("hb");
        }
        c.expire(now);
        settle(&mut c, &[&a, &cc], 6, &mut now);
        let group = c.group("g").expect("g");
        let mut went_warm = 0;
        for (tp, standby) in &warm_for {
            let owner = &group.target[tp];
            let full = group.target.values().filter(|o| *o == standby).count() == 3;
            assert!(owner == standby || full, "{tp:?} went to a cold member");
            went_warm += usize::from(owner == standby);
        }
        assert!(went_warm >= 1, "{warm_for:?} {:?}", group.target);
        for (tp, owner) in &group.target {
            assert_eq!(group.standby[tp].len(), 1, "{tp:?}");
            assert!(!group.standby[tp].contains(owner), "{tp:?}");
        }
        // Without standbys asked for, nobody is given any.
        let beat = |id: &str| {
            hb(
                "g",
                id,
                0,
                &c.group("g").expect("g").members[id].assigned.clone(),
            )
        };
        let (a_beat, c_beat) = (beat(&a), beat(&cc));
        c.heartbeat(a_beat, &|_| Some(6), now + 1).expect("hb");
        c.heartbeat(c_beat, &|_| Some(6), now + 2).expect("hb");
        assert!(c.group("g").expect("g").standby.is_empty());
    }

    fn member(id: &str, warm: &[u32]) -> Member {
        Member {
            member_id: id.into(),
            client_id: "c".into(),
            host: "h".into(),
            topics: ["t".to_string()].into(),
            session_timeout_ms: 1000,
            last_seen_ms: 0,
            epoch: 1,
            assigned: BTreeSet::new(),
            owned: BTreeSet::new(),
            warm: warm.iter().map(|p| ("t".to_string(), *p)).collect(),
            standby_replicas: 1,
        }
    }

    #[test]
    fn an_orphaned_partition_prefers_a_warm_member_over_the_least_loaded() {
        let tp = |p: u32| ("t".to_string(), p);
        let partitions: BTreeSet<TopicPartition> = (0..4).map(tp).collect();
        // "a" and "b" hold one partition each; "gone" held 2 and 3, and "b" keeps 2 warm.
        let current: BTreeMap<TopicPartition, String> = [
            (tp(0), "a".to_string()),
            (tp(1), "b".to_string()),
            (tp(2), "gone".to_string()),
            (tp(3), "gone".to_string()),
        ]
        .into();
        let members: BTreeMap<String, Member> = [
            ("a".to_string(), member("a", &[])),
            ("b".to_string(), member("b", &[2])),
        ]
        .into();
        let target = compute_target(&members, &partitions, &current);
        assert_eq!(target[&tp(2)], "b", "{target:?}");
        assert_eq!(target[&tp(3)], "a", "{target:?}");
        // Cold, "a" would have had 2 (equally loaded: the lower id first).
        let cold: BTreeMap<String, Member> = [
            ("a".to_string(), member("a", &[])),
            ("b".to_string(), member("b", &[])),
        ]
        .into();
        assert_eq!(compute_target(&cold, &partitions, &current)[&tp(2)], "a");
        assert_eq!(compute_target(&cold, &partitions, &current)[&tp(3)], "b");
        let standbys = compute_standbys(&members, &target, &current, &BTreeMap::new());
        for (tp, owner) in &target {
            assert_eq!(standbys[tp].len(), 1);
            assert!(!standbys[tp].contains(owner));
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Join,
        Leave(usize),
        Expire(usize),
        Heartbeat(usize),
        AddPartitions,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            2 => Just(Op::Join),
            1 => any::<usize>().prop_map(Op::Leave),
            1 => any::<usize>().prop_map(Op::Expire),
            6 => any::<usize>().prop_map(Op::Heartbeat),
            1 => Just(Op::AddPartitions),
        ]
    }

    proptest! {
        #[test]
        fn a_partition_never_has_two_owners_and_settles_to_exactly_one(ops in proptest::collection::vec(op(), 1..80)) {
            let mut c = Coordinator::default();
            let mut partitions = 3u32;
            let mut members: Vec<String> = Vec::new();
            let mut now = 0i64;
            // Every member wants one standby per partition and reports its standbys warm.
            let beat = |c: &mut Coordinator, id: &str, now: i64, partitions: u32| {
                let owned = c.group("g").and_then(|g| g.members.get(id)).map(|m| m.assigned.clone()).unwrap_or_default();
                let warm = c.group("g").map(|g| g.standby_of(id)).unwrap_or_default();
                c.heartbeat(Heartbeat { standby_replicas: 1, warm, ..hb("g", id, 0, &owned) }, &|_| Some(partitions), now)
            };
            for op in ops {
                now += 10;
                match op {
                    Op::Join => {
                        let (id, _) = member_of(c.heartbeat(hb("g", "", 0, &BTreeSet::new()), &|_| Some(partitions), now).expect("join"));
                        members.push(id);
                    }
                    Op::Leave(i) if !members.is_empty() => {
                        let id = members.remove(i % members.len());
                        c.heartbeat(hb("g", &id, -1, &BTreeSet::new()), &|_| Some(partitions), now).expect("leave");
                    }
                    Op::Expire(i) if !members.is_empty() => {
                        let id = members.remove(i % members.len());
                        // Everyone else stays alive; the chosen one goes silent past its session.
                        for other in &members {
                            beat(&mut c, other, now + 2000, partitions).expect("hb");
                        }
                        now += 2000;
                        let expired = c.expire(now);
                        prop_assert!(expired.iter().any(|(_, m)| *m == id));
                    }
                    Op::Heartbeat(i) if !members.is_empty() => {
                        let id = members[i % members.len()].clone();
                        beat(&mut c, &id, now, partitions).expect("hb");
                    }
                    Op::AddPartitions => partitions += 1,
                    _ => {}
                }
                if let Some(group) = c.group("g") {
                    let mut seen = BTreeSet::new();
                    for m in group.members.values() {
                        for tp in m.assigned.union(&m.owned) {
                            prop_assert!(seen.insert(tp.clone()), "{tp:?} held twice");
                        }
                    }
                }
            }
            // With no more changes, a few rounds of heartbeats settle every partition.
            for _ in 0..4 {
                now += 10;
                for id in members.clone() {
                    beat(&mut c, &id, now, partitions).expect("hb");
                }
            }
            if !members.is_empty() {
                let group = c.group("g").expect("group");
                let mut owners: BTreeMap<TopicPartition, usize> = BTreeMap::new();
                for m in group.members.values() {
                    for tp in &m.assigned {
                        *owners.entry(tp.clone()).or_default() += 1;
                    }
                }
                prop_assert_eq!(owners.len(), partitions as usize);
                prop_assert!(owners.values().all(|n| *n == 1));
                let counts: Vec<usize> = group.members.values().map(|m| m.assigned.len()).collect();
                let (min, max) = (counts.iter().min().copied().unwrap_or(0), counts.iter().max().copied().unwrap_or(0));
                prop_assert!(max - min <= 1, "unbalanced {counts:?}");
                prop_assert_eq!(group.state(), "Stable");
                for (tp, owner) in &group.target {
                    let standbys = group.standby.get(tp).cloned().unwrap_or_default();
                    prop_assert!(!standbys.contains(owner), "{tp:?}: its owner is its standby");
                    prop_assert_eq!(standbys.len(), 1.min(members.len() - 1), "{:?}: standbys {:?}", tp, standbys);
                }
            }
        }
    }
}
