//! Splices: a QUIC stream joined to something that is not Python, so that bulk bytes never
//! cross into the interpreter. Two kinds share the stream side (`StreamTap`):
//!
//! * **stream ⇄ socket** (`crate::sockpump`, the driver that owns the descriptors): the
//!   Agent's local TCP connections and the Connector's backend connections;
//! * **stream ⇄ stream** (`Pairs`, here and pure): the Intermediate's Agent leg joined to its
//!   Connector leg, both connections in this core.
//!
//! Back-pressure is QUIC's own flow control, with nothing unbounded in between. What a stream
//! hands a splice is still limited by `PY_WINDOW` beyond what the splice consumed (written to
//! the socket, or accepted by the other stream below `PAIR_BACKLOG`), so a slow consumer
//! stops quinn from granting credit and the peer stops sending. The other way, the splice
//! feeds a stream only while that stream's unsent queue is below a bound.
//!
//! Python makes every decision before (headers, authorization, connecting) and is told the
//! end of each splice as one `Ev::Spliced` event with the byte counts both ways.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;

use crate::core::{Core, Ev};

/// Both directions finished: FIN each way, everything delivered.
pub const SPLICE_DONE: u8 = 0;
/// The peer reset the stream or stopped reading it (`code`); the other side is aborted.
pub const SPLICE_RESET: u8 = 1;
/// The local side failed (a socket error, or the other stream went away); the stream was
/// reset by us.
pub const SPLICE_FAILED: u8 = 2;
/// The stream's connection closed (or the other leg's did).
pub const SPLICE_GONE: u8 = 3;

/// Bytes a splice may leave queued on the stream it feeds beyond what quinn took: the
/// bound on memory per direction (on top of quinn's own send window).
pub const SPLICE_BACKLOG: usize = 1024 * 1024;
/// Stream ⇄ stream: what the source is credited for only once the target's queue is below.
pub const PAIR_BACKLOG: usize = 512 * 1024;

/// The receiving side of a spliced stream: what quinn gave us, not yet taken by the splice.
#[derive(Default, Debug)]
pub struct StreamTap {
    pub buf: VecDeque<Bytes>,
    pub bytes: usize,
    /// The peer's FIN was read (after everything in `buf`).
    pub fin: bool,
    /// The peer reset the stream (its code).
    pub reset: Option<u64>,
    /// The peer asked us to stop sending (STOP_SENDING, its code).
    pub stopped: Option<u64>,
}

impl StreamTap {
    pub fn push(&mut self, data: Bytes) {
        self.bytes += data.len();
        self.buf.push_back(data);
    }

    /// Take everything queued.
    pub fn take(&mut self) -> VecDeque<Bytes> {
        self.bytes = 0;
        std::mem::take(&mut self.buf)
    }
}

/// One leg of a stream ⇄ stream splice: what is read from it goes to `other`.
#[derive(Debug)]
struct Leg {
    id: u64,
    other: (usize, u64),
    /// Forwarded to `other` but not yet credited to our sender.
    owed: u64,
    /// Bytes read from this leg and forwarded.
    moved: u64,
    /// Our peer's FIN was passed on to `other`.
    fin_forwarded: bool,
}

#[derive(Default)]
pub struct Pairs {
    legs: HashMap<(usize, u64), Leg>,
    next_id: u64,
}

impl Pairs {
    pub fn len(&self) -> usize {
        self.legs.len() / 2
    }

    pub fn is_empty(&self) -> bool {
        self.legs.is_empty()
    }

    pub fn contains(&self, h: usize, sid: u64) -> bool {
        self.legs.contains_key(&(h, sid))
    }
}

impl Core {
    /// Start delivering stream `sid` of `h` into a tap instead of events. `data` and `fin`
    /// are what the owner was already handed and has not consumed: they go first (and are
    /// consumed when the splice takes them). False if the connection is not live.
    pub fn tap(&mut self, h: usize, sid: u64, data: &[u8], fin: bool) -> bool {
        if !self.live(h) {
            return false;
        }
        if self.conn(h).and_then(|c| c.streams.get(&sid)).is_some_and(|st| st.tap.is_some()) {
            return false;
        }
        let mut tap = StreamTap::default();
        if !data.is_empty() {
            tap.push(Bytes::copy_from_slice(data));
        }
        tap.fin = fin;
        // What was read from quinn for this stream but is still queued for the owner comes
        // next, in order: with a driver thread the owner decides about a stream (a backend
        // connected, a status reply came through) while the thread goes on reading it, and
        // those bytes would otherwise reach the owner after the splice took the stream over.
        let mut claimed = 0u64;
        self.events.retain_mut(|ev| match ev {
            Ev::Stream { h: eh, sid: es, data, fin } if *eh == h && *es == sid => {
                if !data.is_empty() {
                    tap.push(std::mem::take(data));
                }
                tap.fin |= *fin;
                claimed += 1;
                false
            }
            Ev::StreamReset { h: eh, sid: es, code } if *eh == h && *es == sid => {
                tap.reset = Some(*code);
                claimed += 1;
                false
            }
            _ => true,
        });
        self.stats.splice_claimed += claimed;
        let Some(conn) = self.conn_mut(h) else { return false };
        let st = conn.streams.entry(sid).or_default();
        tap.fin |= st.recv_done;
        st.tap = Some(tap);
        // Anything quinn holds for a stream that waited for credit is read at the next drive.
        self.mark_dirty(h);
        self.splice_ready.insert((h, sid));
        true
    }

    /// Stop tapping: the stream goes back to events (what the tap held is dropped: it was
    /// never consumed, so no one counted it as delivered).
    pub fn untap(&mut self, h: usize, sid: u64) {
        self.splice_ready.remove(&(h, sid));
        let Some(conn) = self.conn_mut(h) else { return };
        let Some(st) = conn.streams.get_mut(&sid) else { return };
        st.tap = None;
        if st.recv_done && st.fin_sent && st.pending.is_empty() && st.retain.is_none() {
            conn.streams.remove(&sid);
        }
    }

    pub fn tap_mut(&mut self, h: usize, sid: u64) -> Option<&mut StreamTap> {
        self.conn_mut(h)?.streams.get_mut(&sid)?.tap.as_mut()
    }

    /// Join two live streams of this core both ways. The owner wrote each stream's headers
    /// already; from here every byte, FIN and reset crosses natively until `Ev::Spliced`
    /// (one per leg) reports the end. Returns the splice id, None if either is not live or
    /// already spliced.
    pub fn splice_streams(&mut self, a: (usize, u64), b: (usize, u64)) -> Option<u64> {
        if a == b || self.pairs.contains(a.0, a.1) || self.pairs.contains(b.0, b.1) {
            return None;
        }
        if !self.live(a.0) || !self.live(b.0) {
            return None;
        }
        if !self.tap(a.0, a.1, &[], false) {
            return None;
        }
        if !self.tap(b.0, b.1, &[], false) {
            self.untap(a.0, a.1);
            return None;
        }
        self.pairs.next_id += 1;
        let id = self.pairs.next_id;
        for (me, other) in [(a, b), (b, a)] {
            self.pairs.legs.insert(me, Leg { id, other, owed: 0, moved: 0, fin_forwarded: false });
        }
        Some(id)
    }

    /// Run the stream ⇄ stream splices that have news; the rest of `splice_ready` (socket
    /// splices) is left for their driver.
    pub fn pump_pairs(&mut self) {
        let ready: Vec<(usize, u64)> =
            self.splice_ready.iter().copied().filter(|k| self.pairs.legs.contains_key(k)).collect();
        for key in ready {
            self.splice_ready.remove(&key);
            self.pump_pair(key);
        }
    }

    fn pump_pair(&mut self, a: (usize, u64)) {
        let Some(b) = self.pairs.legs.get(&a).map(|l| l.other) else { return };
        if !self.live(a.0) || !self.live(b.0) {
            // The live leg cannot go on: reset it so its peer hears at once.
            for (me, _) in [(a, b), (b, a)] {
                if self.live(me.0) {
                    self.reset_stream(me.0, me.1, 0);
                }
            }
            self.end_pair(a, SPLICE_GONE, 0);
            return;
        }
        for (src, dst) in [(a, b), (b, a)] {
            if let Some(how) = self.move_leg(src, dst) {
                self.end_pair(a, how.0, how.1);
                return;
            }
        }
        let done = [a, b].iter().all(|k| self.pairs.legs.get(k).is_some_and(|l| l.fin_forwarded && l.owed == 0));
        if done {
            self.end_pair(a, crate::splice::SPLICE_DONE, 0);
        }
    }

    /// Forward what `src` received to `dst` and credit `src` while `dst` keeps up.
    /// Some((how, code)) when the pair must end.
    fn move_leg(&mut self, src: (usize, u64), dst: (usize, u64)) -> Option<(u8, u64)> {
        let (chunks, fin, reset, stopped) = match self.tap_mut(src.0, src.1) {
            Some(tap) => (tap.take(), tap.fin, tap.reset, tap.stopped),
            None => return Some((SPLICE_FAILED, 0)),
        };
        if let Some(code) = reset.or(stopped) {
            // The sender of `src` gave up (reset) or its reader did (stop): both ends learn.
            self.reset_stream(dst.0, dst.1, code);
            if stopped.is_some() {
                self.reset_stream(src.0, src.1, code);
            }
            return Some((SPLICE_RESET, code));
        }
        let mut n = 0u64;
        for c in chunks {
            n += c.len() as u64;
            if !self.stream_write_bytes(dst.0, dst.1, c, false) {
                self.reset_stream(src.0, src.1, 0);
                self.reset_stream(dst.0, dst.1, 0);
                return Some((SPLICE_FAILED, 0));
            }
        }
        let backlog = self.stream_backlog(dst.0, dst.1);
        let leg = self.pairs.legs.get_mut(&src)?;
        leg.moved += n;
        leg.owed += n;
        let forward_fin = fin && !leg.fin_forwarded;
        if forward_fin {
            leg.fin_forwarded = true;
        }
        let credit = if backlog < PAIR_BACKLOG { std::mem::take(&mut leg.owed) } else { 0 };
        if forward_fin {
            self.stream_write(dst.0, dst.1, &[], true);
        }
        if credit > 0 {
            self.consume(src.0, src.1, credit);
        }
        None
    }

    fn end_pair(&mut self, a: (usize, u64), how: u8, code: u64) {
        let Some(la) = self.pairs.legs.remove(&a) else { return };
        let b = la.other;
        let lb = self.pairs.legs.remove(&b);
        let b_moved = lb.as_ref().map(|l| l.moved).unwrap_or(0);
        for (me, sent, received) in [(a, b_moved, la.moved), (b, la.moved, b_moved)] {
            self.untap(me.0, me.1);
            self.events.push(Ev::Spliced { id: la.id, h: me.0, sid: me.1, sent, received, how, code });
        }
    }

    /// (sent into, received from) stream `sid` of `h` so far, if it is a pair's leg.
    pub fn pair_counts(&self, h: usize, sid: u64) -> Option<(u64, u64)> {
        let leg = self.pairs.legs.get(&(h, sid))?;
        let other = self.pairs.legs.get(&leg.other)?;
        Some((other.moved, leg.moved))
    }

    /// Every pair one of whose legs is on `h` (a connection that is going away) ends now.
    pub fn pairs_of(&self, h: usize) -> Vec<(usize, u64)> {
        self.pairs.legs.keys().copied().filter(|k| k.0 == h).collect()
    }
}
