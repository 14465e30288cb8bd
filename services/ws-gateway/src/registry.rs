//! The replica's view of who is connected: socket id -> connection handle, user -> local
//! app sockets, node -> local agent sockets, room -> local members.
//!
//! App users and agent nodes are kept apart on purpose: an app token whose `sub` equals a
//! node id must never share the node's subscription (`ws.agent.<node>`), and an agent
//! socket must never be reached through a user, room, broadcast or socket-addressed push,
//! which any product service may send. [`Registry::handle`] therefore only finds app
//! sockets; agents are reached only through [`Registry::for_agent`].
//!
//! Every map is split into 64 shards behind their own mutex (as centrifuge's hub does), so
//! pushes fanning in never queue on one lock. A user's or room's bus subscription lives
//! inside its entry: it is created with the first local socket and dropped (unsubscribed)
//! with the last, which is what makes NATS deliver a push only to the replicas that hold a
//! recipient. No lock is held across an await; the subscription is created by a
//! synchronous callback (in the gateway, an entry in the interest link). The hub
//! (`hub.rs`) is this registry's only user.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::{Mutex, MutexGuard};

use messages::{ClientKind, RoomId, SocketId, UserId};

use crate::link::{Interest, Live, Subscription};

const SHARDS: usize = 64;

#[derive(Debug)]
struct SocketEntry<A> {
    handle: A,
    kind: ClientKind,
    /// Rooms it is a member of here: the room cap, and what a disconnect cleans up
    /// (a membership the hub added may not have reached the connection yet).
    rooms: Vec<RoomId>,
}

/// A join refused because the socket is in as many rooms as it may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomsFull;

#[derive(Debug)]
struct Group<A> {
    members: HashMap<SocketId, A>,
    subscription: Subscription,
}

/// Sharded registry, generic over the handle used to reach a connection (an actor address
/// in the gateway, anything cloneable in tests).
#[derive(Debug)]
pub(crate) struct Registry<A> {
    hasher: RandomState,
    sockets: Vec<Mutex<HashMap<SocketId, SocketEntry<A>>>>,
    users: Vec<Mutex<HashMap<UserId, Group<A>>>>,
    agents: Vec<Mutex<HashMap<UserId, Group<A>>>>,
    rooms: Vec<Mutex<HashMap<RoomId, Group<A>>>>,
}

fn shards<T: Default>() -> Vec<Mutex<T>> {
    (0..SHARDS).map(|_| Mutex::new(T::default())).collect()
}

/// Locks a shard; a poisoned shard (a panic while held, which our code never does on
/// purpose) is still usable because every update leaves the maps consistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl<A: Clone> Default for Registry<A> {
    fn default() -> Self {
        Self::new()
    }
}

impl<A: Clone> Registry<A> {
    /// An empty registry.
    pub(crate) fn new() -> Self {
        Registry {
            hasher: RandomState::new(),
            sockets: shards(),
            users: shards(),
            agents: shards(),
            rooms: shards(),
        }
    }

    fn shard<'a, T, K: Hash>(&self, maps: &'a [Mutex<T>], key: &K) -> &'a Mutex<T> {
        // The modulo keeps the index in range; SHARDS is a power of two.
        let i = (self.hasher.hash_one(key) as usize) % SHARDS;
        &maps[i]
    }

    /// Registers a connection. `subscribe` is called (under the user's shard lock) when this
    /// is the user's (or, for an agent, the node's) first local socket, with the subject to
    /// subscribe to: `ws.user.<user>` for an app socket, `ws.agent.<node>` for an agent.
    /// Returns that subscription's liveness.
    pub(crate) fn add(
        &self,
        id: SocketId,
        user: &UserId,
        kind: ClientKind,
        handle: A,
        subscribe: impl FnOnce(Interest) -> Subscription,
    ) -> Live {
        lock(self.shard(&self.sockets, &id)).insert(
            id,
            SocketEntry {
                handle: handle.clone(),
                kind,
                rooms: Vec::new(),
            },
        );
        let (maps, interest) = match kind {
            ClientKind::App => (&self.users, Interest::User(user.clone())),
            ClientKind::Agent => (&self.agents, Interest::Agent(user.clone())),
        };
        let mut users = lock(self.shard(maps, user));
        match users.entry(user.clone()) {
            Entry::Occupied(mut e) => {
                e.get_mut().members.insert(id, handle);
                e.get().subscription.live()
            }
            Entry::Vacant(e) => {
                let subscription = subscribe(interest);
                let live = subscription.live();
                e.insert(Group {
                    members: HashMap::from([(id, handle)]),
                    subscription,
                });
                live
            }
        }
    }

    /// Removes a connection and its room memberships; drops subscriptions nobody local needs.
    pub(crate) fn remove(&self, id: SocketId, user: &UserId, rooms: &[RoomId]) {
        let entry = lock(self.shard(&self.sockets, &id)).remove(&id);
        let maps = match entry.as_ref().map(|e| e.kind) {
            Some(ClientKind::Agent) => &self.agents,
            _ => &self.users,
        };
        remove_member(&mut lock(self.shard(maps, user)), user, id);
        let known = entry.map(|e| e.rooms).unwrap_or_default();
        for room in known
            .iter()
            .chain(rooms.iter().filter(|r| !known.contains(r)))
        {
            remove_member(&mut lock(self.shard(&self.rooms, room)), room, id);
        }
    }

    /// Adds a socket to a room; `subscribe` is called for the room's first local member.
    /// Returns `None` if the socket is not connected here, otherwise whether it was newly
    /// added and the room subscription's liveness.
    pub(crate) fn join(
        &self,
        id: SocketId,
        room: &RoomId,
        subscribe: impl FnOnce(Interest) -> Subscription,
    ) -> Option<(bool, Live)> {
        self.join_within(id, room, usize::MAX, subscribe)?.ok()
    }

    /// Like [`Registry::join`], refusing a room that would make the socket a member of
    /// more than `cap` rooms (a room it is already in is fine).
    pub(crate) fn join_within(
        &self,
        id: SocketId,
        room: &RoomId,
        cap: usize,
        subscribe: impl FnOnce(Interest) -> Subscription,
    ) -> Option<Result<(bool, Live), RoomsFull>> {
        let (handle, count) = {
            let sockets = lock(self.shard(&self.sockets, &id));
            let entry = sockets.get(&id).filter(|e| e.kind == ClientKind::App)?;
            (entry.handle.clone(), entry.rooms.len())
        };
        let mut rooms = lock(self.shard(&self.rooms, room));
        let member = rooms.get(room).is_some_and(|g| g.members.contains_key(&id));
        if member {
            return rooms.get(room).map(|g| Ok((false, g.subscription.live())));
        }
        if count >= cap {
            return Some(Err(RoomsFull));
        }
        let live = match rooms.entry(room.clone()) {
            Entry::Occupied(mut e) => {
                e.get_mut().members.insert(id, handle);
                e.get().subscription.live()
            }
            Entry::Vacant(e) => {
                let subscription = subscribe(Interest::Room(room.clone()));
                let live = subscription.live();
                e.insert(Group {
                    members: HashMap::from([(id, handle)]),
                    subscription,
                });
                live
            }
        };
        if let Some(entry) = lock(self.shard(&self.sockets, &id)).get_mut(&id) {
            entry.rooms.push(room.clone());
        }
        Some(Ok((true, live)))
    }

    /// Removes a socket from a room. Returns whether it was a member.
    pub(crate) fn leave(&self, id: SocketId, room: &RoomId) -> bool {
        let left = remove_member(&mut lock(self.shard(&self.rooms, room)), room, id);
        if left && let Some(entry) = lock(self.shard(&self.sockets, &id)).get_mut(&id) {
            entry.rooms.retain(|r| r != room);
        }
        left
    }

    /// The handle of a connected app socket (agents are never addressed by socket id:
    /// any product service can name a socket id).
    pub(crate) fn handle(&self, id: SocketId) -> Option<A> {
        lock(self.shard(&self.sockets, &id))
            .get(&id)
            .filter(|e| e.kind == ClientKind::App)
            .map(|e| e.handle.clone())
    }

    /// Calls `f` for each local agent socket of `node`; returns how many.
    pub(crate) fn for_agent(&self, node: &UserId, mut f: impl FnMut(SocketId, &A)) -> usize {
        let agents = lock(self.shard(&self.agents, node));
        agents.get(node).map_or(0, |g| {
            g.members.iter().for_each(|(id, h)| f(*id, h));
            g.members.len()
        })
    }

    /// Whether this replica currently holds a subscription for agent `node`.
    #[cfg(test)]
    pub(crate) fn has_agent(&self, node: &UserId) -> bool {
        lock(self.shard(&self.agents, node)).contains_key(node)
    }

    /// Calls `f` for each local socket of `user`; returns how many.
    pub(crate) fn for_user(&self, user: &UserId, mut f: impl FnMut(SocketId, &A)) -> usize {
        let users = lock(self.shard(&self.users, user));
        users.get(user).map_or(0, |g| {
            g.members.iter().for_each(|(id, h)| f(*id, h));
            g.members.len()
        })
    }

    /// Calls `f` for each local member of `room`; returns how many.
    pub(crate) fn for_room(&self, room: &RoomId, mut f: impl FnMut(SocketId, &A)) -> usize {
        let rooms = lock(self.shard(&self.rooms, room));
        rooms.get(room).map_or(0, |g| {
            g.members.iter().for_each(|(id, h)| f(*id, h));
            g.members.len()
        })
    }

    /// Calls `f` for every local socket of `kind` (all kinds when `None`), one shard at a time.
    pub(crate) fn for_all(
        &self,
        kind: Option<ClientKind>,
        mut f: impl FnMut(SocketId, &A),
    ) -> usize {
        let mut n = 0;
        for shard in &self.sockets {
            for (id, entry) in lock(shard).iter() {
                if kind.is_none_or(|k| k == entry.kind) {
                    f(*id, &entry.handle);
                    n += 1;
                }
            }
        }
        n
    }

    /// Local members of `room` (for tests and diagnostics).
    #[cfg(test)]
    pub(crate) fn room_size(&self, room: &RoomId) -> usize {
        lock(self.shard(&self.rooms, room))
            .get(room)
            .map_or(0, |g| g.members.len())
    }

    /// Whether this replica currently holds a subscription for `room`.
    #[cfg(test)]
    pub(crate) fn has_room(&self, room: &RoomId) -> bool {
        lock(self.shard(&self.rooms, room)).contains_key(room)
    }

    /// Whether this replica currently holds a subscription for `user`.
    #[cfg(test)]
    pub(crate) fn has_user(&self, user: &UserId) -> bool {
        lock(self.shard(&self.users, user)).contains_key(user)
    }

    /// Connected sockets.
    pub(crate) fn len(&self) -> usize {
        self.sockets.iter().map(|s| lock(s).len()).sum()
    }

    /// Whether no socket is connected.
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn remove_member<K: Hash + Eq, A>(
    groups: &mut HashMap<K, Group<A>>,
    key: &K,
    id: SocketId,
) -> bool {
    let Some(group) = groups.get_mut(key) else {
        return false;
    };
    let removed = group.members.remove(&id).is_some();
    if group.members.is_empty() {
        // Dropping the group drops its subscription: NATS stops sending us this subject.
        groups.remove(key);
    }
    removed
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn user(s: &str) -> UserId {
        UserId::new(s).unwrap()
    }
    fn room(s: &str) -> RoomId {
        RoomId::new(s).unwrap()
    }

    #[test]
    fn subscribes_with_the_first_socket_and_unsubscribes_with_the_last() {
        let reg = Registry::<u32>::new();
        let subs = Arc::new(AtomicUsize::new(0));
        let counting = |subs: &Arc<AtomicUsize>| {
            let subs = Arc::clone(subs);
            move |interest: Interest| {
                assert_eq!(interest.subject(), "ws.user.alice");
                subs.fetch_add(1, Ordering::SeqCst);
                Subscription::none()
            }
        };
        reg.add(
            SocketId(1),
            &user("alice"),
            ClientKind::App,
            1,
            counting(&subs),
        );
        reg.add(
            SocketId(2),
            &user("alice"),
            ClientKind::App,
            2,
            counting(&subs),
        );
        assert_eq!(subs.load(Ordering::SeqCst), 1, "one subscription per user");
        let mut seen = vec![];
        assert_eq!(reg.for_user(&user("alice"), |id, h| seen.push((id, *h))), 2);
        reg.remove(SocketId(1), &user("alice"), &[]);
        assert!(reg.has_user(&user("alice")));
        reg.remove(SocketId(2), &user("alice"), &[]);
        assert!(!reg.has_user(&user("alice")));
        assert!(reg.is_empty());
    }

    #[test]
    fn room_membership_is_reference_counted() {
        let reg = Registry::<u32>::new();
        reg.add(SocketId(1), &user("a"), ClientKind::App, 1, |_| {
            Subscription::none()
        });
        reg.add(SocketId(2), &user("b"), ClientKind::App, 2, |_| {
            Subscription::none()
        });
        let lobby = room("chat.lobby");
        let mut subscribed = 0;
        let added = |r: Option<(bool, Live)>| r.map(|(added, _)| added);
        assert_eq!(
            added(reg.join(SocketId(1), &lobby, |s| {
                assert_eq!(s.subject(), "ws.room.chat.lobby");
                subscribed += 1;
                Subscription::none()
            })),
            Some(true)
        );
        assert_eq!(
            added(reg.join(SocketId(1), &lobby, |_| unreachable!("member"))),
            Some(false)
        );
        assert_eq!(
            added(reg.join(SocketId(2), &lobby, |_| unreachable!("subscribed"))),
            Some(true)
        );
        assert_eq!(subscribed, 1);
        assert_eq!(reg.room_size(&lobby), 2);
        assert!(
            reg.join(SocketId(99), &lobby, |_| Subscription::none())
                .is_none(),
            "unknown socket"
        );
        assert!(reg.leave(SocketId(1), &lobby));
        assert!(!reg.leave(SocketId(1), &lobby));
        assert!(reg.has_room(&lobby));
        // Disconnect cleans up remaining memberships.
        reg.remove(SocketId(2), &user("b"), std::slice::from_ref(&lobby));
        assert!(!reg.has_room(&lobby));
    }

    #[test]
    fn agents_and_app_users_with_the_same_id_never_share_a_group() {
        let reg = Registry::<u32>::new();
        let mut subjects = vec![];
        reg.add(SocketId(1), &user("edge-1"), ClientKind::Agent, 1, |s| {
            subjects.push(s.subject());
            Subscription::none()
        });
        reg.add(SocketId(2), &user("edge-1"), ClientKind::App, 2, |s| {
            subjects.push(s.subject());
            Subscription::none()
        });
        assert_eq!(subjects, ["ws.agent.edge-1", "ws.user.edge-1"]);
        let mut seen = vec![];
        reg.for_user(&user("edge-1"), |id, _| seen.push(id));
        assert_eq!(
            seen,
            [SocketId(2)],
            "a user push reaches only the app socket"
        );
        seen.clear();
        reg.for_agent(&user("edge-1"), |id, _| seen.push(id));
        assert_eq!(seen, [SocketId(1)]);
        assert!(
            reg.handle(SocketId(1)).is_none(),
            "agents are not addressable by id"
        );
        assert_eq!(reg.handle(SocketId(2)), Some(2));
        reg.remove(SocketId(1), &user("edge-1"), &[]);
        assert!(!reg.has_agent(&user("edge-1")));
        assert!(reg.has_user(&user("edge-1")));
    }

    #[test]
    fn the_room_cap_counts_memberships_and_a_disconnect_leaves_every_room() {
        let reg = Registry::<u32>::new();
        reg.add(SocketId(1), &user("a"), ClientKind::App, 1, |_| {
            Subscription::none()
        });
        let ok = |r: Option<Result<(bool, Live), RoomsFull>>| r.map(|r| r.map(|(added, _)| added));
        assert_eq!(
            ok(reg.join_within(SocketId(1), &room("r1"), 2, |_| Subscription::none())),
            Some(Ok(true))
        );
        assert_eq!(
            ok(reg.join_within(SocketId(1), &room("r2"), 2, |_| Subscription::none())),
            Some(Ok(true))
        );
        assert_eq!(
            ok(reg.join_within(SocketId(1), &room("r3"), 2, |_| Subscription::none())),
            Some(Err(RoomsFull))
        );
        assert_eq!(
            ok(reg.join_within(SocketId(1), &room("r1"), 2, |_| unreachable!("member"))),
            Some(Ok(false)),
            "a room it is in does not count twice"
        );
        assert!(reg.leave(SocketId(1), &room("r2")));
        assert_eq!(
            ok(reg.join_within(SocketId(1), &room("r3"), 2, |_| Subscription::none())),
            Some(Ok(true))
        );
        // The connection names no rooms (it may not have heard of the joins yet): the
        // registry's own list is what is cleaned up.
        reg.remove(SocketId(1), &user("a"), &[]);
        assert!(!reg.has_room(&room("r1")) && !reg.has_room(&room("r3")));
    }

    #[test]
    fn broadcast_filters_by_kind() {
        let reg = Registry::<u32>::new();
        for i in 0..100u64 {
            let kind = if i % 4 == 0 {
                ClientKind::Agent
            } else {
                ClientKind::App
            };
            reg.add(SocketId(i), &user(&format!("u{i}")), kind, 0, |_| {
                Subscription::none()
            });
        }
        assert_eq!(reg.for_all(Some(ClientKind::App), |_, _| {}), 75);
        assert_eq!(reg.for_all(Some(ClientKind::Agent), |_, _| {}), 25);
        assert_eq!(reg.for_all(None, |_, _| {}), 100);
    }
}
