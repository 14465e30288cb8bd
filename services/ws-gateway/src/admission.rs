//! Connection admission: the replica-wide connection maximum and the per-user and
//! per-source-address caps, checked and counted in one step during the HTTP upgrade so that
//! concurrent handshakes cannot overshoot a limit between the check and the count.
//!
//! An admitted connection holds a [`Ticket`]; dropping it (the session ended, or the upgrade
//! failed after admission) gives the slot back, so the counts cannot leak.
//!
//! Source addresses are counted per IPv4 address and per IPv6 /64 prefix: one IPv6 host
//! usually owns a whole /64, so counting single IPv6 addresses would not limit anyone.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use messages::{ClientKind, UserId};

/// Which limit refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The replica holds its configured maximum of connections (HTTP 503).
    #[error("this replica holds its maximum number of connections; try another")]
    Capacity,
    /// The user (or agent node) holds its maximum of connections (HTTP 429).
    #[error("this user holds the maximum number of connections per user")]
    User,
    /// The source address holds its maximum of connections (HTTP 429).
    #[error("this source address holds the maximum number of connections per address")]
    Ip,
}

/// Limits admission enforces; 0 disables a per-user or per-address cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Connections this replica holds at most.
    pub total: usize,
    /// Connections one user id of one client kind holds at most (0: unlimited).
    pub per_user: usize,
    /// Connections one source address (IPv6: one /64) holds at most (0: unlimited).
    pub per_ip: usize,
}

/// The key a source address is counted under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Source {
    V4(u32),
    /// The upper 64 bits of an IPv6 address.
    V6(u64),
}

impl From<IpAddr> for Source {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Source::V4(u32::from(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source::V4(u32::from(v4)),
                None => Source::V6((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    users: HashMap<(ClientKind, UserId), usize>,
    sources: HashMap<Source, usize>,
}

/// Counts of held connections, shared by every worker of a replica.
#[derive(Debug)]
pub struct Admission {
    caps: Caps,
    counts: Arc<Mutex<Counts>>,
}

/// One admitted connection's slot; dropping it releases the slot.
#[derive(Debug)]
pub struct Ticket {
    counts: Arc<Mutex<Counts>>,
    user: (ClientKind, UserId),
    source: Option<Source>,
}

impl Admission {
    /// No connections yet, enforcing `caps`.
    pub fn new(caps: Caps) -> Self {
        Admission {
            caps,
            counts: Arc::new(Mutex::new(Counts::default())),
        }
    }

    /// Connections admitted and not yet released.
    pub fn held(&self) -> usize {
        self.counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .total
    }

    /// Whether the replica is full (a cheap check before verifying a token).
    pub fn full(&self) -> bool {
        self.held() >= self.caps.total
    }

    /// Admits a connection of `user` from `ip` (unknown when the peer address is not an IP
    /// socket), or says which limit refuses it.
    pub fn admit(
        &self,
        kind: ClientKind,
        user: &UserId,
        ip: Option<IpAddr>,
    ) -> Result<Ticket, Refusal> {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if counts.total >= self.caps.total {
            return Err(Refusal::Capacity);
        }
        let key = (kind, user.clone());
        if self.caps.per_user != 0
            && counts.users.get(&key).copied().unwrap_or(0) >= self.caps.per_user
        {
            return Err(Refusal::User);
        }
        let source = ip.map(Source::from);
        if let Some(source) = source
            && self.caps.per_ip != 0
            && counts.sources.get(&source).copied().unwrap_or(0) >= self.caps.per_ip
        {
            return Err(Refusal::Ip);
        }
        counts.total += 1;
        *counts.users.entry(key.clone()).or_insert(0) += 1;
        if let Some(source) = source {
            *counts.sources.entry(source).or_insert(0) += 1;
        }
        Ok(Ticket {
            counts: Arc::clone(&self.counts),
            user: key,
            source,
        })
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        counts.total = counts.total.saturating_sub(1);
        release(&mut counts.users, &self.user);
        if let Some(source) = &self.source {
            release(&mut counts.sources, source);
        }
    }
}

/// Decrements a count, removing the entry at zero so the maps stay as small as the set of
/// connected users and addresses.
fn release<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, key: &K) {
    if let Some(n) = map.get_mut(key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn user(name: &str) -> UserId {
        UserId::new(name).unwrap()
    }

    #[test]
    fn each_cap_refuses_and_a_dropped_ticket_frees_its_slot() {
        let admission = Admission::new(Caps {
            total: 4,
            per_user: 2,
            per_ip: 2,
        });
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let t1 = admission
            .admit(ClientKind::App, &user("u"), Some(a))
            .unwrap();
        let _t2 = admission
            .admit(ClientKind::App, &user("u"), Some(b))
            .unwrap();
        let refused = admission.admit(ClientKind::App, &user("u"), Some(b));
        assert_eq!(refused.unwrap_err(), Refusal::User);
        // The same id as an agent is another identity.
        let _t3 = admission
            .admit(ClientKind::Agent, &user("u"), Some(a))
            .unwrap();
        let refused = admission.admit(ClientKind::App, &user("v"), Some(a));
        assert_eq!(refused.unwrap_err(), Refusal::Ip);
        let _t4 = admission.admit(ClientKind::App, &user("v"), None).unwrap();
        let refused = admission.admit(ClientKind::App, &user("w"), None);
        assert_eq!(refused.unwrap_err(), Refusal::Capacity);
        drop(t1);
        assert_eq!(admission.held(), 3);
        assert!(
            admission
                .admit(ClientKind::App, &user("u"), Some(a))
                .is_ok()
        );
    }

    #[test]
    fn ipv6_addresses_count_per_64_prefix_and_mapped_v4_as_v4() {
        let admission = Admission::new(Caps {
            total: 100,
            per_user: 0,
            per_ip: 1,
        });
        let _t = admission
            .admit(
                ClientKind::App,
                &user("a"),
                Some("2001:db8::1".parse().unwrap()),
            )
            .unwrap();
        assert_eq!(
            admission
                .admit(
                    ClientKind::App,
                    &user("b"),
                    Some("2001:db8::ffff:1".parse().unwrap())
                )
                .unwrap_err(),
            Refusal::Ip
        );
        assert!(
            admission
                .admit(
                    ClientKind::App,
                    &user("c"),
                    Some("2001:db8:0:1::1".parse().unwrap())
                )
                .is_ok()
        );
        let _v4 = admission
            .admit(
                ClientKind::App,
                &user("d"),
                Some("192.0.2.7".parse().unwrap()),
            )
            .unwrap();
        assert_eq!(
            admission
                .admit(
                    ClientKind::App,
                    &user("e"),
                    Some("::ffff:192.0.2.7".parse().unwrap())
                )
                .unwrap_err(),
            Refusal::Ip
        );
    }
}
