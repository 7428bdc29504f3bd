//! SWIM membership and failure detection for large clusters: [foca], driven like the rest
//! of the core (no sockets, no OS clock, no OS randomness), so the simulator runs it too.
//!
//! Beyond [`GossipConfig::swim_above_peers`](crate::GossipConfig::swim_above_peers) peers
//! a node's liveness verdicts come from here as well as from silence: every probe period
//! each member pings one member (in a shuffled round-robin), asks
//! `num_indirect_probes` others to ping it when the ack is late, suspects it when none
//! answers, and declares it down if the suspicion is not refuted in time; membership
//! changes ride on those messages (dissemination by infection). The probe load per
//! member is constant whatever the fleet's size, and so is the time to detect a failure
//! but for the suspicion period, which grows with `log10 N` (foca's rule).
//!
//! Messages travel inside the core's envelopes (`Body::Swim`), so they are authenticated
//! like everything else; a SWIM header naming another sender than the peer that sent it
//! is refused before foca reads it. Members named by SWIM updates that the driver has not
//! told the core about are bounded: past [`MAX_UNKNOWN_MEMBERS`] of them, a packet that
//! names one more is refused whole, and members declared down are forgotten after
//! [`REMOVE_DOWN_AFTER_MS`].
//!
//! Membership by infection: with
//! [`GossipConfig::swim_address`](crate::GossipConfig::swim_address) set, identities
//! carry the address each member is reached at; a member heard from first hand after
//! SWIM started, that started after this node (a join, a restart), is gossiped; and one
//! SWIM brings that the driver never named is reported to it
//! ([`Event::MemberLearned`](crate::gossip::Event::MemberLearned)). A graceful leave is
//! gossiped too ([`GossipNode::leave`](crate::GossipNode::leave)).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use foca::{Config, Foca, Identity, NoCustomBroadcast, Notification, PeriodicParams, Runtime, Timer};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::codec::{self, SwimCodec};
use crate::key::splitmix64;

/// The most members SWIM may know of that are not the core's peers (a member joining
/// before the driver has told this node about it; or names a hostile member made up).
pub const MAX_UNKNOWN_MEMBERS: usize = 256;
/// How long a member declared down is remembered (so a stale rumour cannot bring it back
/// within that time); a member made up by a hostile peer goes with it.
pub const REMOVE_DOWN_AFTER_MS: u64 = 120_000;
/// The shortest probe period. Below it, a loaded host's scheduling delays look like
/// failures: 32 members on 2 cores (the demo, with SWIM from 16 peers) had about 180
/// members declared down and rejoining in 8 s at 100 ms, 0 or 1 at 200 ms.
pub const MIN_PROBE_PERIOD_MS: u64 = 200;
/// Gossip rounds per probe period (when that is longer than [`MIN_PROBE_PERIOD_MS`]).
pub const ROUNDS_PER_PROBE: u64 = 10;

/// A member's SWIM identity: its node id (foca's address: one live identity per node),
/// the core's incarnation, a bump foca makes when the member learns it was declared down
/// and rejoins, and the address other members reach it at, where the driver gave one
/// ([`GossipConfig::swim_address`](crate::GossipConfig::swim_address)): what lets a
/// join spread by SWIM's infection to members that have never heard of the newcomer.
///
/// Two identities are the same member whatever their addresses say (the address is what
/// others were told, not who it is). On the wire an identity without an address is the
/// three integers every earlier version writes; one with an address sets the top bit of
/// the incarnation (never set by a start time in Unix ms) and adds the address and the
/// bit it replaced, which a version from before it cannot read: hence the setting, off
/// for rolling upgrades (`docs/cluster.md`, "Upgrades").
#[derive(Debug, Clone, Copy)]
pub(crate) struct SwimId {
    pub node: u64,
    pub incarnation: u64,
    /// 64 bits: no flood of "you are down" can use the bumps up (foca gives up on an
    /// identity that cannot renew).
    pub bump: u64,
    pub addr: Option<SocketAddr>,
}

impl SwimId {
    /// An identity without an address (a member heard from first hand, whose address the
    /// driver already has).
    pub(crate) fn new(node: u64, incarnation: u64, bump: u64) -> Self {
        Self { node, incarnation, bump, addr: None }
    }
}

impl PartialEq for SwimId {
    fn eq(&self, other: &Self) -> bool {
        (self.node, self.incarnation, self.bump) == (other.node, other.incarnation, other.bump)
    }
}

impl Eq for SwimId {}

/// The incarnation's top bit on the wire: an address follows the bump.
const WITH_ADDRESS: u64 = 1 << 63;

impl Serialize for SwimId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeTuple;
        // An incarnation with the top bit set cannot be written the old way (it would
        // read as one with an address): it takes the new form, with or without one.
        if self.addr.is_none() && self.incarnation & WITH_ADDRESS == 0 {
            let mut t = s.serialize_tuple(3)?;
            t.serialize_element(&self.node)?;
            t.serialize_element(&self.incarnation)?;
            t.serialize_element(&self.bump)?;
            return t.end();
        }
        let mut t = s.serialize_tuple(4)?;
        t.serialize_element(&self.node)?;
        t.serialize_element(&(self.incarnation | WITH_ADDRESS))?;
        t.serialize_element(&self.bump)?;
        t.serialize_element(&(self.incarnation & WITH_ADDRESS != 0, self.addr))?;
        t.end()
    }
}

impl<'de> Deserialize<'de> for SwimId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = SwimId;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a SWIM identity")
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<SwimId, A::Error> {
                let missing = |i| serde::de::Error::invalid_length(i, &self);
                let node: u64 = seq.next_element()?.ok_or_else(|| missing(0))?;
                let incarnation: u64 = seq.next_element()?.ok_or_else(|| missing(1))?;
                let bump: u64 = seq.next_element()?.ok_or_else(|| missing(2))?;
                if incarnation & WITH_ADDRESS == 0 {
                    return Ok(SwimId::new(node, incarnation, bump));
                }
                let (high, addr): (bool, Option<SocketAddr>) = seq.next_element()?.ok_or_else(|| missing(3))?;
                let incarnation = if high { incarnation } else { incarnation & !WITH_ADDRESS };
                Ok(SwimId { node, incarnation, bump, addr })
            }
        }
        // Four elements at most: bincode reads only those the visitor asks for.
        d.deserialize_tuple(4, Visit)
    }
}

impl Identity for SwimId {
    type Addr = u64;

    fn renew(&self) -> Option<Self> {
        self.bump.checked_add(1).map(|bump| Self { bump, ..*self })
    }

    fn addr(&self) -> u64 {
        self.node
    }

    /// The newer identity of a node wins: a restart (higher incarnation), or a rejoin.
    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        (self.incarnation, self.bump) > (adversary.incarnation, adversary.bump)
    }
}

/// SplitMix64 from the node's seed: foca's randomness (member shuffles, indirect probe
/// helpers), deterministic like everything else in the core.
#[derive(Debug, Clone)]
pub(crate) struct SwimRng(u64);

impl rand_core::RngCore for SwimRng {
    fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        splitmix64(self.0)
    }

    fn fill_bytes(&mut self, dst: &mut [u8]) {
        for chunk in dst.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Which members the codec lets SWIM learn of: shared with [`SwimCodec`], which refuses a
/// packet naming a node outside `known` once `unknown_room` mentions of such nodes have
/// been decoded since [`Swim::handle`] last counted them.
#[derive(Debug, Default)]
pub(crate) struct Gate {
    pub known: std::collections::BTreeSet<u64>,
    pub unknown_room: usize,
}

/// What a SWIM step asks of the core.
#[derive(Debug, Default)]
pub(crate) struct Output {
    /// Packets to send: (node, SWIM packet), each to go in a `Body::Swim` envelope.
    pub sends: Vec<(u64, Vec<u8>)>,
    /// Verdicts, in order: (identity, up).
    pub verdicts: Vec<(SwimId, bool)>,
    /// Identities that replaced another of the same node (foca says `Rename`, not
    /// `MemberUp`): their verdict is taken from foca once the step is over.
    renamed: Vec<SwimId>,
    /// This node renewed its own identity (it had been declared down).
    rejoined: bool,
}

/// Timing of the protocol, from the core's settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    pub probe_period_ms: u64,
    pub suspect_ms: u64,
    pub max_packet: usize,
}

impl Settings {
    /// The probe period: [`ROUNDS_PER_PROBE`] gossip rounds, at least
    /// [`MIN_PROBE_PERIOD_MS`]; the suspicion period `suspect_ms`, or with 0 foca's rule
    /// for a LAN (`4 · max(1, log10 members)` probe periods).
    pub(crate) fn new(interval_ms: u64, suspect_ms: u64, members: usize, max_packet: usize) -> Self {
        let probe_period_ms = (ROUNDS_PER_PROBE * interval_ms).max(MIN_PROBE_PERIOD_MS);
        let suspect_ms = if suspect_ms > 0 {
            suspect_ms
        } else {
            let factor = (members.max(1) as f64).log10().max(1.0);
            (4.0 * factor * probe_period_ms as f64).ceil() as u64
        };
        Self { probe_period_ms, suspect_ms, max_packet }
    }

    fn config(&self) -> Config {
        let period = Duration::from_millis(self.probe_period_ms);
        let mut c = Config::simple();
        c.probe_period = period;
        c.probe_rtt = period / 2;
        c.suspect_to_down_after = Duration::from_millis(self.suspect_ms);
        c.remove_down_after = Duration::from_millis(REMOVE_DOWN_AFTER_MS);
        c.max_packet_size = std::num::NonZeroUsize::new(self.max_packet.max(64)).expect("at least 64");
        c.notify_down_members = true;
        let every = |frequency, n| Some(PeriodicParams { frequency, num_members: std::num::NonZeroUsize::new(n).expect("positive") });
        // Updates spread on every probe and on this gossip (to three members each probe
        // period while there are any); a member list is exchanged with one member every
        // 30 s (membership anti-entropy); two members declared down are announced to
        // every five probe periods, which heals a partition SWIM alone saw.
        c.periodic_gossip = every(period, 3);
        c.periodic_announce = every(Duration::from_secs(30), 1);
        c.periodic_announce_to_down_members = every(period * 5, 2);
        c
    }
}

/// Why a SWIM packet was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SwimError {
    /// Its header names another node than the peer that sent it.
    #[error("SWIM packet from node {peer} signed as node {claimed}")]
    Spoofed {
        /// Who sent it.
        peer: u64,
        /// Whom its header names.
        claimed: u64,
    },
    /// foca refused it (malformed, too large, or naming members past the bound).
    #[error("SWIM packet refused: {0}")]
    Refused(String),
}

/// One node's SWIM member.
pub(crate) struct Swim {
    foca: Foca<SwimId, SwimCodec, SwimRng, NoCustomBroadcast>,
    gate: Arc<Mutex<Gate>>,
    /// foca's timers: (deadline, sequence) → timer.
    timers: BTreeMap<(i64, u64), Timer<SwimId>>,
    /// The pending timer of each kind and member (see `Collect::submit_after`).
    latest: BTreeMap<(u8, u64), (i64, u64)>,
    seq: u64,
    settings: Settings,
    /// The incarnation of each node introduced (each is introduced once).
    introduced: BTreeMap<u64, u64>,
    /// When this node last renewed its identity: a "you are down" within a probe
    /// period of it is stale (or hostile) and dropped.
    rejoined_ms: Option<i64>,
}

impl std::fmt::Debug for Swim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Swim")
            .field("members", &self.foca.num_members())
            .field("timers", &self.timers.len())
            .field("settings", &self.settings)
            .finish()
    }
}

/// foca's runtime: collects what it asks for.
struct Collect<'a> {
    now_ms: i64,
    out: &'a mut Output,
    timers: &'a mut BTreeMap<(i64, u64), Timer<SwimId>>,
    latest: &'a mut BTreeMap<(u8, u64), (i64, u64)>,
    seq: &'a mut u64,
}

/// A timer's kind, and the member it is about (0 for the others).
fn timer_slot(t: &Timer<SwimId>) -> (u8, u64) {
    match t {
        Timer::ProbeRandomMember(_) => (0, 0),
        Timer::SendIndirectProbe { .. } => (1, 0),
        Timer::ChangeSuspectToDown { member_id, .. } => (2, member_id.node),
        Timer::PeriodicAnnounce(_) => (3, 0),
        Timer::PeriodicAnnounceDown(_) => (4, 0),
        Timer::PeriodicGossip(_) => (5, 0),
        Timer::RemoveDown(id) => (6, id.node),
    }
}

impl Runtime<SwimId> for Collect<'_> {
    fn notify(&mut self, notification: Notification<'_, SwimId>) {
        match notification {
            Notification::MemberUp(id) => self.out.verdicts.push((*id, true)),
            Notification::MemberDown(id) => self.out.verdicts.push((*id, false)),
            Notification::Rename(_, new) => self.out.renamed.push(*new),
            Notification::Idle => tracing::debug!("SWIM: no active member"),
            Notification::Defunct => tracing::warn!("SWIM: this node was declared down and cannot rejoin"),
            Notification::Rejoin(id) => {
                self.out.rejoined = true;
                tracing::info!(bump = id.bump, "SWIM: declared down, rejoined as a new identity");
            }
            _ => {}
        }
    }

    fn send_to(&mut self, to: SwimId, data: &[u8]) {
        self.out.sends.push((to.node, data.to_vec()));
    }

    fn submit_after(&mut self, event: Timer<SwimId>, after: Duration) {
        *self.seq += 1;
        let at = self.now_ms.saturating_add(i64::try_from(after.as_millis()).unwrap_or(i64::MAX));
        // One pending timer per kind and member: a newer one supersedes the older (foca
        // ignores a timer of an older token, incarnation or identity), so forged
        // verdicts or renewals cannot pile timers up. The same timer again (foca
        // re-arms a suspicion each time it probes the suspect) keeps the earlier
        // deadline, or the suspicion would never run out.
        let slot = timer_slot(&event);
        if let Some(old) = self.latest.get(&slot) {
            if self.timers.get(old) == Some(&event) {
                return;
            }
            self.timers.remove(old);
        }
        self.latest.insert(slot, (at, *self.seq));
        self.timers.insert((at, *self.seq), event);
    }
}

impl Swim {
    pub(crate) fn new(me: SwimId, settings: Settings, seed: u64) -> Self {
        let gate = Arc::new(Mutex::new(Gate::default()));
        // This node is no stranger: updates about it are SWIM's business.
        gate.lock().known.insert(me.node);
        let codec = SwimCodec::new(Arc::clone(&gate));
        let foca = Foca::new(me, settings.config(), SwimRng(splitmix64(seed ^ 0x5357_494D)), codec);
        Self {
            foca,
            gate,
            timers: BTreeMap::new(),
            latest: BTreeMap::new(),
            seq: 0,
            settings,
            introduced: BTreeMap::new(),
            rejoined_ms: None,
        }
    }

    pub(crate) fn settings(&self) -> Settings {
        self.settings
    }

    /// Applies new timing (the member count moved the suspicion period).
    pub(crate) fn set_settings(&mut self, settings: Settings) {
        if settings.suspect_ms != self.settings.suspect_ms || settings.probe_period_ms != self.settings.probe_period_ms {
            // Only `max_packet_size` may not change, and it does not here.
            if self.foca.set_config(settings.config()).is_ok() {
                self.settings = settings;
            }
        }
    }

    /// Counts `node` among the members the driver named. Never undone: a member removed
    /// (a scale-down, a leave) stays in SWIM's memory until it is forgotten, and updates
    /// about it are not strangers' (the bound is on made-up members).
    pub(crate) fn know(&self, node: u64) {
        self.gate.lock().known.insert(node);
    }

    fn run<R>(
        &mut self,
        now_ms: i64,
        out: &mut Output,
        f: impl FnOnce(&mut Foca<SwimId, SwimCodec, SwimRng, NoCustomBroadcast>, Collect<'_>) -> R,
    ) -> R {
        let renamed_before = out.renamed.len();
        let rt = Collect { now_ms, out, timers: &mut self.timers, latest: &mut self.latest, seq: &mut self.seq };
        let r = f(&mut self.foca, rt);
        // A renamed member's verdict: whether its new identity is active.
        for id in out.renamed.drain(renamed_before..).collect::<Vec<_>>() {
            let active = self.foca.iter_members().any(|m| *m.id() == id);
            out.verdicts.push((id, active));
        }
        if std::mem::take(&mut out.rejoined) {
            self.rejoined_ms = Some(now_ms);
        }
        r
    }

    /// Introduces this node to `node` (whose incarnation is `incarnation` as far as the
    /// core knows): its answer is a sample of the members it knows.
    pub(crate) fn announce(&mut self, node: u64, incarnation: u64, now_ms: i64, out: &mut Output) {
        let dst = SwimId::new(node, incarnation, 0);
        if let Err(e) = self.run(now_ms, out, |f, rt| f.announce(dst, rt)) {
            tracing::debug!(node, error = %e, "SWIM announce not sent");
        }
    }

    /// Tells SWIM of `id` (a bump of 0, and the address the transport reaches it at, if
    /// addresses are spread) alive, known first hand (the core heard from it): SWIM
    /// probes it from now on and has a verdict on it at once. With `spread`, foca gossips
    /// it too, so that the members that have not heard of it learn of it by infection (a
    /// join, a restart); without, the others learn of it first hand as this node did (all
    /// of them at once, on entering SWIM mode).
    pub(crate) fn introduce(&mut self, id: SwimId, spread: bool, now_ms: i64, out: &mut Output) {
        let (node, incarnation) = (id.node, id.incarnation);
        if self.introduced.insert(node, incarnation) == Some(incarnation) {
            return; // foca knows it (or knows it down: an announce brings it back)
        }
        let member = foca::Member::new(id, 0, foca::State::Alive);
        if let Err(e) = self.run(now_ms, out, |f, rt| f.apply_many(std::iter::once(member), spread, rt)) {
            tracing::debug!(node, error = %e, "SWIM member not introduced");
        }
    }

    /// Handles one SWIM packet from the authenticated peer `from`.
    pub(crate) fn handle(&mut self, from: u64, data: &[u8], now_ms: i64, out: &mut Output) -> Result<(), SwimError> {
        let (claimed, threatens) = codec::swim_scan(data, self.foca.identity().node).map_err(|e| SwimError::Refused(e.to_string()))?;
        if claimed != from {
            return Err(SwimError::Spoofed { peer: from, claimed });
        }
        // Each rejoin voids foca's pending suspicions and probe: "you are down" (a
        // `TurnUndead`, or an update declaring this node down) within a suspicion period
        // of the last rejoin is refused, so no member can keep this node's SWIM from
        // ever reaching a verdict.
        if threatens && self.rejoined_ms.is_some_and(|t| now_ms - t < self.settings.suspect_ms as i64) {
            return Err(SwimError::Refused("\"you are down\" within a suspicion period of a rejoin".into()));
        }
        {
            let mut g = self.gate.lock();
            let unknown = self.foca.iter_membership_state().filter(|m| !g.known.contains(&m.id().node)).count();
            g.unknown_room = MAX_UNKNOWN_MEMBERS.saturating_sub(unknown);
        }
        self.run(now_ms, out, |f, rt| f.handle_data(data, rt)).map_err(|e| SwimError::Refused(e.to_string()))
    }

    /// Leaves the cluster: foca gossips this node's identity as down to a few members it
    /// picks (their packets in `out`), and stops answering. With `to` (members this node
    /// holds connections to: its view), as many go to members of `to` that SWIM holds
    /// active instead, each addressed to that member's identity (foca reads the updates
    /// of a packet only if it is the addressee) and carrying the leave alone; `pick`
    /// draws among them.
    pub(crate) fn leave(&mut self, now_ms: i64, to: Option<&[u64]>, mut pick: impl FnMut(usize) -> usize, out: &mut Output) {
        let before = out.sends.len();
        if let Err(e) = self.run(now_ms, out, |f, rt| f.leave_cluster(rt)) {
            tracing::debug!(error = %e, "SWIM leave not sent");
        }
        let Some(to) = to else { return };
        let mut spare: Vec<SwimId> = self.foca.iter_members().map(|m| *m.id()).filter(|id| to.binary_search(&id.node).is_ok()).collect();
        let sends: Vec<(u64, Vec<u8>)> = out.sends.drain(before..).collect();
        for (_, packet) in sends {
            if spare.is_empty() {
                break;
            }
            let dst = spare.swap_remove(pick(spare.len()));
            match codec::swim_leave_packet(&packet, dst) {
                Some(p) => out.sends.push((dst.node, p)),
                None => tracing::debug!(node = dst.node, "SWIM leave not readdressed"),
            }
        }
    }

    /// Fires every timer due at `now_ms`.
    pub(crate) fn fire(&mut self, now_ms: i64, out: &mut Output) {
        while let Some(entry) = self.timers.first_entry() {
            if entry.key().0 > now_ms {
                break;
            }
            let key = *entry.key();
            let timer = entry.remove();
            let slot = timer_slot(&timer);
            if self.latest.get(&slot) == Some(&key) {
                self.latest.remove(&slot);
            }
            if let Err(e) = self.run(now_ms, out, |f, rt| f.handle_timer(timer, rt)) {
                tracing::debug!(error = %e, "SWIM timer failed");
            }
        }
    }

    /// Moves every pending timer by `by` ms (the clock stepped), so each keeps what was
    /// left of it; a renewal noted after `now_ms` counts as made at `now_ms`.
    pub(crate) fn shift(&mut self, by: i64, now_ms: i64) {
        self.timers = std::mem::take(&mut self.timers).into_iter().map(|((at, seq), t)| ((at.saturating_add(by), seq), t)).collect();
        for (at, _) in self.latest.values_mut() {
            *at = at.saturating_add(by);
        }
        if let Some(t) = self.rejoined_ms.as_mut() {
            *t = (*t).min(now_ms);
        }
    }

    /// When [`fire`](Self::fire) is next due.
    pub(crate) fn next_deadline(&self) -> Option<i64> {
        self.timers.keys().next().map(|&(at, _)| at)
    }

    /// foca's pending timers.
    #[cfg(feature = "testing")]
    pub(crate) fn timers(&self) -> usize {
        self.timers.len()
    }

    /// Members SWIM holds active (not this node).
    pub(crate) fn active_members(&self) -> usize {
        self.foca.num_members()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(id: &SwimId) -> Vec<u8> {
        bincode::serde::encode_to_vec(id, bincode::config::standard()).unwrap()
    }

    fn read(bytes: &[u8]) -> SwimId {
        let (id, used): (SwimId, usize) = bincode::serde::decode_from_slice(bytes, bincode::config::standard()).unwrap();
        assert_eq!(used, bytes.len(), "read whole");
        id
    }

    #[test]
    fn an_identity_without_an_address_is_written_as_earlier_versions_write_it() {
        #[derive(Serialize)]
        struct Earlier {
            node: u64,
            incarnation: u64,
            bump: u64,
        }
        for (node, incarnation, bump) in [(1, 1, 0), (u64::MAX, 1_764_600_000_000, 3), (7, (1 << 63) - 1, u64::MAX)] {
            let earlier = bincode::serde::encode_to_vec(Earlier { node, incarnation, bump }, bincode::config::standard()).unwrap();
            assert_eq!(wire(&SwimId::new(node, incarnation, bump)), earlier);
            let back = read(&earlier);
            assert_eq!((back.node, back.incarnation, back.bump, back.addr), (node, incarnation, bump, None));
        }
    }

    #[test]
    fn an_identity_reads_back_whole_with_or_without_an_address_whatever_its_incarnation() {
        let addrs = [None, Some("10.1.2.3:7000".parse().unwrap()), Some("[2001:db8::7]:443".parse::<SocketAddr>().unwrap())];
        for addr in addrs {
            for incarnation in [0, 1_764_600_000_000, (1 << 63) - 1, 1 << 63, u64::MAX] {
                let id = SwimId { addr, ..SwimId::new(42, incarnation, 5) };
                let back = read(&wire(&id));
                assert_eq!((back.node, back.incarnation, back.bump, back.addr), (42, incarnation, 5, addr));
            }
        }
    }

    #[test]
    fn two_identities_are_the_same_member_whatever_their_addresses() {
        let bare = SwimId::new(3, 9, 1);
        let placed = SwimId { addr: Some("127.0.0.1:9".parse().unwrap()), ..bare };
        assert_eq!(bare, placed);
        assert_ne!(bare, SwimId::new(3, 9, 2));
    }
}
