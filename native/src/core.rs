//! The sans-IO core of one ztna QUIC endpoint: quinn-proto's endpoint and connections plus
//! what ztna needs around them. Time comes in as an argument; packets come in as bytes and go
//! out into `Core::out`; what the owner must hear about goes into `Core::events`. The socket
//! driver (the Python binding) does the I/O.
//!
//! What this adds to quinn-proto:
//! * **Send buffers with back-pressure.** Stream writes are queued here while quinn's flow
//!   control refuses them, and the queue length is what drivers read as back-pressure.
//! * **Receive credit as the application consumes.** A stream is read from quinn (which grants
//!   credit as it is read) only while the owner has consumed all but `PY_WINDOW` of what it was
//!   given, so a slow backend slows the sender instead of growing buffers.
//! * **DATAGRAM accounting.** Refused-before-queueing when oversized; the queue is quinn's
//!   drop-oldest buffer, mirrored here so every dropped datagram is counted.
//! * **Raw datagrams.** A first byte below 0x40 cannot be QUIC (RFC 9443: the fixed bit); such
//!   datagrams (P2P probes) go to the owner instead of quinn.
//! * **Admission by the owner.** A new connection attempt becomes an `Incoming` event, and the
//!   owner answers accept / retry / refuse / ignore.
//! * **A relay route table.** The owner (the Intermediate) decides who may send what to whom
//!   and installs the result as routes; tunnel DATAGRAMs matching a route are rewritten and
//!   queued on the target connection here, without an event. Whatever matches no route goes
//!   to the owner as before, so a missing route only costs speed, never correctness.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr, SocketAddrV6};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use quinn_proto::{
    ClientConfig, ConnectionError, ConnectionHandle, DatagramEvent, Dir, EcnCodepoint, Endpoint,
    EndpointConfig, Event, Incoming, ReadError, ServerConfig, StreamEvent, StreamId, VarInt,
    WriteError,
};

/// Bytes a stream may hand to the owner beyond what the owner has consumed.
pub const PY_WINDOW: u64 = 256 * 1024;
/// Bytes of a stream's tail kept for `unacked` (resumable streams): at least what the peer
/// may still not have consumed — its whole stream window (8 MiB, config in py.rs) plus its
/// own PY_WINDOW — because what the peer's QUIC holds unread dies with its connection.
pub const RETAIN_MAX: usize = 9 * 1024 * 1024;
/// quinn accounts each queued datagram with the size of its `Bytes` handle on top.
const DATAGRAM_OVERHEAD: usize = std::mem::size_of::<Bytes>();
/// DATAGRAMs an application may queue before the peer's transport parameters say how large
/// they may be (a client's first flight without 0-RTT); sent once they are known.
pub const EARLY_DATAGRAMS: usize = 64;
/// Datagrams allowed to wait beyond the congestion window, so the pipe does not run dry
/// between two flushes.
pub const DATAGRAM_BURST_SLACK: usize = 32;

#[derive(Debug)]
pub enum Ev {
    Incoming { id: u64, remote: SocketAddr, validated: bool, may_retry: bool },
    /// Server side: the ClientHello was read. `chain` is present for a resumed session (the
    /// chain bound to the ticket), so early data can be authorized before the handshake ends.
    HandshakeData { h: usize, chain: Option<Vec<Vec<u8>>>, server_name: Option<String> },
    Connected { h: usize, chain: Option<Vec<Vec<u8>>>, zero_rtt: bool },
    Datagrams { h: usize, items: Vec<Bytes> },
    Stream { h: usize, sid: u64, data: Bytes, fin: bool },
    StreamReset { h: usize, sid: u64, code: u64 },
    Closed { h: usize, reason: String, code: Option<u64>, app: bool },
    PathChanged { h: usize, remote: SocketAddr },
    Raw { data: Bytes, remote: SocketAddr },
    /// A splice of stream `sid` ended (crate::splice): `sent` bytes went into the stream,
    /// `received` came out of it (to the socket or the other stream), `how` is a SPLICE_*.
    Spliced { id: u64, h: usize, sid: u64, sent: u64, received: u64, how: u8, code: u64 },
}

pub struct Out {
    pub dst: SocketAddr,
    pub ecn: Option<EcnCodepoint>,
    pub data: Vec<u8>,
    pub segment_size: Option<usize>,
    pub src_ip: Option<IpAddr>,
}

#[derive(Default, Clone, Debug)]
pub struct Stats {
    pub datagrams_received: u64,
    pub bytes_received: u64,
    pub datagrams_sent: u64,
    pub bytes_sent: u64,
    pub non_quic: u64,
    pub malformed: u64,
    pub unknown_cid: u64,
    pub stateless_resets_sent: u64,
    pub version_negotiations: u64,
    pub endpoint_responses: u64,
    pub oversize_refused: u64,
    pub datagrams_dropped_queue: u64,
    pub handshakes_started: u64,
    pub retry_sent: u64,
    pub retry_failures: u64,
    pub refused: u64,
    pub ignored: u64,
    pub accept_errors: u64,
    pub stateless_resets_received: u64,
    pub panics: u64,
    pub socket_send_errors: u64,
    pub socket_recv_errors: u64,
    pub relay_forwarded: u64,
    pub relay_bytes: u64,
    pub relay_dropped_oversize: u64,
    pub relay_dropped_no_target: u64,
    /// Stream events a splice took over from the owner's queue (read before the splice
    /// began, not yet taken by the owner).
    pub splice_claimed: u64,
    /// Times a driver thread woke the owner (a batch left it events or work).
    pub owner_notified: u64,
}

/// Tunnel DATAGRAM types (docs/protocol.md): Agent → relay, relay → Connector, Connector → relay.
pub const SERVICE_DATAGRAM: u8 = 0x2F;
pub const TO_CONNECTOR: u8 = 0x30;
pub const FROM_CONNECTOR: u8 = 0x31;
pub const TUNNEL_VERSION: u8 = 1;

/// First bytes of real IP packets: IPv4 with a legal header length (IHL >= 5) and IPv6 (the
/// rule of `IP_FIRST_TABLE` in ztna.wire). A Connector must not smuggle a control-looking
/// DATAGRAM to an Agent, so a reply that is not an IP packet never takes the fast path.
pub fn is_ip_first_byte(b: u8) -> bool {
    (0x45..0x50).contains(&b) || (0x60..0x70).contains(&b)
}

/// Per agent connection: service id → (connector connection, agent id to stamp).
type AgentRoutes = HashMap<Box<[u8]>, (usize, u32)>;

/// Where relayed DATAGRAMs go, as the owner decided. Keys name the source connection, so a
/// route can only ever carry what arrives on that one connection.
#[derive(Default)]
pub struct Routes {
    agent: HashMap<usize, AgentRoutes>,
    /// (connector connection, agent id) → agent connection.
    reply: HashMap<(usize, u32), usize>,
    /// Routes across a cluster mesh (crate::meshroute).
    pub mesh: crate::meshroute::MeshRoutes,
}

impl Routes {
    pub fn len(&self) -> usize {
        self.agent.values().map(|m| m.len()).sum::<usize>() + self.reply.len() + self.mesh.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every route that names `h`, as source or as target.
    fn forget(&mut self, h: usize) {
        self.agent.remove(&h);
        self.agent.retain(|_, m| {
            m.retain(|_, (target, _)| *target != h);
            !m.is_empty()
        });
        self.reply.retain(|(src, _), target| *src != h && *target != h);
        self.mesh.forget(h);
    }

    /// The relayed form of a DATAGRAM from `h`, and its target; None = not ours, the owner
    /// decides. The parsing rules are those of ztna.wire.tunnel's decoders.
    fn lookup(&self, h: usize, d: &[u8]) -> Option<(usize, Vec<u8>)> {
        self.lookup_local(h, d).or_else(|| self.mesh.lookup(h, d))
    }

    fn lookup_local(&self, h: usize, d: &[u8]) -> Option<(usize, Vec<u8>)> {
        match *d.first()? {
            SERVICE_DATAGRAM => {
                let services = self.agent.get(&h)?;
                let end = 2 + *d.get(1)? as usize;
                if d.len() < 4 || d.len() <= end || !is_ip_first_byte(d[end]) {
                    return None;
                }
                let &(target, agent_id) = services.get(&d[2..end])?;
                // [0x30][version][agent id] + the 0x2F datagram without its type byte.
                let mut out = Vec::with_capacity(d.len() + 5);
                out.extend_from_slice(&[TO_CONNECTOR, TUNNEL_VERSION]);
                out.extend_from_slice(&agent_id.to_be_bytes());
                out.extend_from_slice(&d[1..]);
                Some((target, out))
            }
            FROM_CONNECTOR => {
                if d.len() < 7 || d[1] != TUNNEL_VERSION || !is_ip_first_byte(d[6]) {
                    return None;
                }
                let agent_id = u32::from_be_bytes([d[2], d[3], d[4], d[5]]);
                let &target = self.reply.get(&(h, agent_id))?;
                Some((target, d[6..].to_vec()))
            }
            _ => None,
        }
    }
}

#[derive(Default)]
pub(crate) struct StreamState {
    pub(crate) pending: VecDeque<Bytes>,
    pub(crate) pending_bytes: usize,
    pub(crate) fin_wanted: bool,
    pub(crate) fin_sent: bool,
    pub(crate) delivered: u64,
    pub(crate) consumed: u64,
    auto_consume: bool,
    credit_blocked: bool,
    pub(crate) recv_done: bool,
    written: u64,
    pub(crate) retain: Option<VecDeque<u8>>,
    /// What was written in 0-RTT: written again if the server rejects the early data
    /// (quinn then forgets every stream opened in 0-RTT, data included).
    early_copy: Option<Vec<u8>>,
    /// Spliced natively (crate::splice): what is read from quinn waits here for the splice
    /// instead of becoming an event.
    pub(crate) tap: Option<crate::splice::StreamTap>,
}

pub struct Conn {
    pub qc: quinn_proto::Connection,
    pub(crate) streams: HashMap<u64, StreamState>,
    /// Spliced streams with news for their splice (data, FIN, reset, room to send).
    tapped: Vec<u64>,
    dg_sizes: VecDeque<usize>,
    dg_sent_seen: u64,
    pub dropped_oldest: u64,
    pub oversize_refused: u64,
    pub remote: SocketAddr,
    pub connected: bool,
    pub(crate) closed_reported: bool,
    pub(crate) local_close: Option<String>,
    is_client: bool,
    /// Client side: stream 0 (control) is open in quinn. Until the peer's stream limit is
    /// known (handshake, or 0-RTT with remembered parameters) writes to it wait here.
    control_opened: bool,
    /// Client side, 0-RTT attempted and not yet answered: keep copies of stream data.
    copy_early: bool,
    /// The destination connection ID of our latest short-header packet.
    pub last_dcid: Vec<u8>,
    /// When the peer's latest packet arrived (ACK-only ones included): liveness.
    pub last_rx: Option<Instant>,
    /// DATAGRAMs queued before the peer's limit was known (bounded, oldest dropped first).
    early_datagrams: VecDeque<Bytes>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum SendResult {
    Queued,
    QueuedDroppedOldest,
    TooLarge(usize),
    Closed,
}

pub struct Core {
    pub ep: Endpoint,
    conns: HashMap<usize, Conn>,
    incoming: HashMap<u64, Incoming>,
    next_incoming: u64,
    pub events: Vec<Ev>,
    pub out: Vec<Out>,
    dirty: HashSet<usize>,
    pub stats: Stats,
    /// The socket is IPv6 (possibly dual-stack): IPv4 peers are addressed as ::ffff:a.b.c.d.
    pub v6_socket: bool,
    pub max_gso_segments: usize,
    buf: Vec<u8>,
    pub routes: Routes,
    /// Native consumers of DATAGRAMs (pumps), asked in order before the owner is.
    pub taps: Vec<Box<dyn Tap>>,
    /// Spliced streams (connection, stream) whose splice has work (crate::splice).
    pub splice_ready: HashSet<(usize, u64)>,
    /// Stream ⇄ stream splices inside this core (crate::splice).
    pub pairs: crate::splice::Pairs,
}

/// A native consumer of DATAGRAMs: the Agent's TUN pump, the Connector's UDP flows. What a
/// tap takes never reaches the owner; what it leaves does, as before, so a tap that knows
/// nothing only costs speed.
pub trait Tap: Send + Sync {
    /// Take `d`, which arrived on connection `h`; `max_payload` is that connection's largest
    /// DATAGRAM now (what a reply on it may carry). False leaves it to the owner.
    fn take(&mut self, h: usize, d: &Bytes, max_payload: usize) -> bool;
    /// Connection `h` is gone: nothing may name it any more (handles are reused).
    fn gone(&mut self, h: usize);
}

pub fn to_wire_addr(v6_socket: bool, addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(a) if v6_socket => {
            SocketAddr::V6(SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0))
        }
        other => other,
    }
}

/// IPv4-mapped IPv6 addresses are reported as IPv4.
pub fn normalize(addr: SocketAddr) -> SocketAddr {
    if let SocketAddr::V6(a) = addr {
        if let Some(v4) = a.ip().to_ipv4_mapped() {
            return SocketAddr::new(IpAddr::V4(v4), a.port());
        }
    }
    addr
}

fn close_reason(err: &ConnectionError) -> (String, Option<u64>, bool) {
    match err {
        ConnectionError::ApplicationClosed(c) => {
            let code = c.error_code.into_inner();
            let text = String::from_utf8_lossy(&c.reason).into_owned();
            let text = if text.is_empty() { format!("error 0x{code:x}") } else { text };
            (text, Some(code), true)
        }
        ConnectionError::ConnectionClosed(c) => {
            let text = String::from_utf8_lossy(&c.reason).into_owned();
            let text = if text.is_empty() { format!("{}", c.error_code) } else { format!("{}: {text}", c.error_code) };
            (text, None, false)
        }
        ConnectionError::TransportError(e) => (format!("{e}"), None, false),
        ConnectionError::Reset => ("stateless reset (peer restarted)".into(), None, false),
        ConnectionError::TimedOut => ("idle timeout".into(), None, false),
        ConnectionError::LocallyClosed => ("closed".into(), None, false),
        ConnectionError::VersionMismatch => ("version mismatch".into(), None, false),
        ConnectionError::CidsExhausted => ("connection IDs exhausted".into(), None, false),
    }
}

fn chain_of(qc: &quinn_proto::Connection) -> Option<Vec<Vec<u8>>> {
    let any = qc.crypto_session().peer_identity()?;
    let certs = any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok()?;
    Some(certs.iter().map(|c| c.as_ref().to_vec()).collect())
}

impl Core {
    pub fn new(config: Arc<EndpointConfig>, server: Option<Arc<ServerConfig>>, v6_socket: bool) -> Self {
        Self {
            ep: Endpoint::new(config, server, false, None),
            conns: HashMap::new(),
            incoming: HashMap::new(),
            next_incoming: 1,
            events: Vec::new(),
            out: Vec::new(),
            dirty: HashSet::new(),
            stats: Stats::default(),
            v6_socket,
            max_gso_segments: 1,
            buf: Vec::with_capacity(64 * 1024),
            routes: Routes::default(),
            taps: Vec::new(),
            splice_ready: HashSet::new(),
            pairs: crate::splice::Pairs::default(),
        }
    }

    pub fn conn(&self, h: usize) -> Option<&Conn> {
        self.conns.get(&h)
    }

    pub fn conn_mut(&mut self, h: usize) -> Option<&mut Conn> {
        self.conns.get_mut(&h)
    }

    pub fn handles(&self) -> Vec<usize> {
        self.conns.keys().copied().collect()
    }

    pub fn mark_dirty(&mut self, h: usize) {
        if self.conns.contains_key(&h) {
            self.dirty.insert(h);
        }
    }

    // ---------------------------------------------------------------- input
    /// One UDP datagram from `remote` (as the socket reported it).
    pub fn datagram(&mut self, now: Instant, remote: SocketAddr, local_ip: Option<IpAddr>,
                    ecn: Option<EcnCodepoint>, data: &[u8]) {
        self.stats.datagrams_received += 1;
        self.stats.bytes_received += data.len() as u64;
        if data.is_empty() {
            self.stats.malformed += 1;
            return;
        }
        if data[0] < 0x40 {
            self.events.push(Ev::Raw { data: Bytes::copy_from_slice(data), remote: normalize(remote) });
            return;
        }
        let remote = to_wire_addr(self.v6_socket, remote);
        let short = data[0] & 0x80 == 0;
        let version_one = data.len() >= 5 && data[1..5] == [0, 0, 0, 1];
        self.buf.clear();
        match self.ep.handle(now, remote, local_ip, ecn, BytesMut::from(data), &mut self.buf) {
            Some(DatagramEvent::ConnectionEvent(ch, ev)) => {
                if let Some(conn) = self.conns.get_mut(&ch.0) {
                    conn.last_rx = Some(now);
                    conn.qc.handle_event(ev);
                    self.dirty.insert(ch.0);
                }
            }
            Some(DatagramEvent::NewConnection(incoming)) => {
                let id = self.next_incoming;
                self.next_incoming += 1;
                let remote = normalize(incoming.remote_address());
                let validated = incoming.remote_address_validated();
                let may_retry = incoming.may_retry();
                self.incoming.insert(id, incoming);
                self.events.push(Ev::Incoming { id, remote, validated, may_retry });
            }
            Some(DatagramEvent::Response(t)) => {
                self.stats.endpoint_responses += 1;
                if short {
                    // A packet for a connection we do not have (a previous process's, or
                    // garbage): answered with a stateless reset.
                    self.stats.unknown_cid += 1;
                    self.stats.stateless_resets_sent += 1;
                } else if !version_one {
                    self.stats.version_negotiations += 1;
                }
                let data = self.buf[..t.size].to_vec();
                self.out.push(Out { dst: t.destination, ecn: t.ecn, data, segment_size: t.segment_size, src_ip: t.src_ip });
            }
            None => {
                // Dropped by quinn: unknown connection (short header; resets are rate
                // limited), or a long-header packet it could not use.
                if short {
                    self.stats.unknown_cid += 1;
                } else {
                    self.stats.malformed += 1;
                }
            }
        }
    }

    // ---------------------------------------------------------------- admission
    pub fn accept(&mut self, id: u64, now: Instant) -> Option<usize> {
        let incoming = self.incoming.remove(&id)?;
        self.buf.clear();
        match self.ep.accept(incoming, now, &mut self.buf, None) {
            Ok((ch, qc)) => {
                let remote = qc.remote_address();
                self.stats.handshakes_started += 1;
                self.conns.insert(ch.0, Conn::new(qc, remote, false));
                self.dirty.insert(ch.0);
                Some(ch.0)
            }
            Err(e) => {
                self.stats.accept_errors += 1;
                if let Some(t) = e.response {
                    let data = self.buf[..t.size].to_vec();
                    self.out.push(Out { dst: t.destination, ecn: t.ecn, data, segment_size: t.segment_size, src_ip: t.src_ip });
                }
                None
            }
        }
    }

    pub fn retry(&mut self, id: u64) -> bool {
        let Some(incoming) = self.incoming.remove(&id) else { return false };
        self.buf.clear();
        match self.ep.retry(incoming, &mut self.buf) {
            Ok(t) => {
                self.stats.retry_sent += 1;
                let data = self.buf[..t.size].to_vec();
                self.out.push(Out { dst: t.destination, ecn: t.ecn, data, segment_size: t.segment_size, src_ip: t.src_ip });
                true
            }
            Err(e) => {
                // Already retried once: a second Retry is not allowed, refuse instead.
                self.stats.retry_failures += 1;
                let incoming = e.into_incoming();
                self.buf.clear();
                let t = self.ep.refuse(incoming, &mut self.buf);
                let data = self.buf[..t.size].to_vec();
                self.out.push(Out { dst: t.destination, ecn: t.ecn, data, segment_size: t.segment_size, src_ip: t.src_ip });
                false
            }
        }
    }

    pub fn refuse(&mut self, id: u64) {
        if let Some(incoming) = self.incoming.remove(&id) {
            self.stats.refused += 1;
            self.buf.clear();
            let t = self.ep.refuse(incoming, &mut self.buf);
            let data = self.buf[..t.size].to_vec();
            self.out.push(Out { dst: t.destination, ecn: t.ecn, data, segment_size: t.segment_size, src_ip: t.src_ip });
        }
    }

    pub fn ignore(&mut self, id: u64) {
        if let Some(incoming) = self.incoming.remove(&id) {
            self.stats.ignored += 1;
            self.ep.ignore(incoming);
        }
    }

    /// Incoming attempts the owner did not answer are ignored (never left pending).
    pub fn ignore_pending(&mut self) {
        let ids: Vec<u64> = self.incoming.keys().copied().collect();
        for id in ids {
            self.ignore(id);
        }
    }

    // ---------------------------------------------------------------- client side
    pub fn connect(&mut self, now: Instant, config: ClientConfig, remote: SocketAddr,
                   server_name: &str) -> Result<(usize, bool), String> {
        let remote = to_wire_addr(self.v6_socket, remote);
        let (ch, qc) = self.ep.connect(now, config, remote, server_name).map_err(|e| e.to_string())?;
        let zero_rtt = qc.has_0rtt();
        let mut conn = Conn::new(qc, remote, true);
        conn.copy_early = zero_rtt;
        conn.streams.insert(0, StreamState { auto_consume: true, ..Default::default() });
        // The control stream is the client's first bidirectional stream (id 0), opened as
        // soon as quinn allows it (at once when resuming, so it carries 0-RTT data).
        conn.ensure_control();
        self.conns.insert(ch.0, conn);
        self.stats.handshakes_started += 1;
        self.dirty.insert(ch.0);
        Ok((ch.0, zero_rtt))
    }

    // ---------------------------------------------------------------- timers
    pub fn next_timeout(&mut self) -> Option<Instant> {
        self.conns.values_mut().filter_map(|c| c.qc.poll_timeout()).min()
    }

    pub fn handle_timeouts(&mut self, now: Instant) {
        for (h, conn) in self.conns.iter_mut() {
            if let Some(at) = conn.qc.poll_timeout() {
                if at <= now {
                    conn.qc.handle_timeout(now);
                    self.dirty.insert(*h);
                }
            }
        }
    }

    // ---------------------------------------------------------------- processing
    /// Process every connection touched since the last call: deliver its events, write what
    /// waits, produce its packets.
    /// Connections with work queued that no drive has run yet.
    pub fn has_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    pub fn drive(&mut self, now: Instant) {
        let mut rounds = 0;
        while !self.dirty.is_empty() && rounds < 4 {
            rounds += 1;
            let dirty: Vec<usize> = self.dirty.drain().collect();
            for h in dirty {
                let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.process(h, now)));
                if run.is_err() {
                    // A bug inside one connection ends that connection only.
                    self.stats.panics += 1;
                    self.abort(h, "internal error");
                }
            }
        }
    }

    fn process(&mut self, h: usize, now: Instant) {
        let Some(conn) = self.conns.get_mut(&h) else { return };
        let events = &mut self.events;
        let routes = &self.routes;
        let taps = &mut self.taps;
        let mut forwards: Vec<(usize, Vec<u8>)> = Vec::new();
        let mut gone = false;
        conn.ensure_control();
        // Application events.
        while let Some(ev) = conn.qc.poll() {
            match ev {
                Event::HandshakeDataReady => {
                    if !conn.is_client {
                        let server_name = conn
                            .qc
                            .crypto_session()
                            .handshake_data()
                            .and_then(|d| d.downcast::<quinn_proto::crypto::rustls::HandshakeData>().ok())
                            .and_then(|d| d.server_name);
                        events.push(Ev::HandshakeData { h, chain: chain_of(&conn.qc), server_name });
                    }
                }
                Event::Connected => {
                    conn.connected = true;
                    // quinn's accepted_0rtt() is set on the client only (from the server's
                    // answer); a server accepted early data exactly when it enabled 0-RTT keys.
                    let zero_rtt = if conn.is_client { conn.qc.accepted_0rtt() } else { conn.qc.has_0rtt() };
                    if conn.copy_early {
                        conn.copy_early = false;
                        if zero_rtt {
                            for st in conn.streams.values_mut() {
                                st.early_copy = None;
                            }
                        } else {
                            conn.replay_rejected_early_data();
                        }
                    }
                    events.push(Ev::Connected { h, chain: chain_of(&conn.qc), zero_rtt });
                }
                Event::ConnectionLost { reason } => {
                    if !conn.closed_reported {
                        conn.closed_reported = true;
                        if matches!(reason, ConnectionError::Reset) {
                            self.stats.stateless_resets_received += 1;
                        }
                        let (reason, code, app) = match (&reason, &conn.local_close) {
                            (ConnectionError::LocallyClosed, Some(local)) => (local.clone(), None, true),
                            _ => close_reason(&reason),
                        };
                        events.push(Ev::Closed { h, reason, code, app });
                        gone = true;
                    }
                }
                Event::Stream(StreamEvent::Opened { dir }) => {
                    while let Some(id) = conn.qc.streams().accept(dir) {
                        let sid: u64 = id.into();
                        if dir == Dir::Uni {
                            // ztna uses no unidirectional streams.
                            let _ = conn.qc.recv_stream(id).stop(VarInt::from_u32(0));
                            continue;
                        }
                        conn.streams.entry(sid).or_insert_with(|| StreamState {
                            auto_consume: sid == 0,
                            ..Default::default()
                        });
                        conn.read_stream(h, sid, events);
                    }
                }
                Event::Stream(StreamEvent::Readable { id }) => {
                    conn.read_stream(h, id.into(), events);
                }
                Event::Stream(StreamEvent::Writable { id }) => {
                    let sid: u64 = id.into();
                    conn.flush_stream(sid);
                    if conn.streams.get(&sid).is_some_and(|st| st.tap.is_some()) {
                        conn.tapped.push(sid);
                    }
                }
                Event::Stream(StreamEvent::Finished { id }) => {
                    let sid: u64 = id.into();
                    if let Some(st) = conn.streams.get_mut(&sid) {
                        st.retain = None;
                        if st.recv_done && st.tap.is_none() {
                            conn.streams.remove(&sid);
                        }
                    }
                }
                Event::Stream(StreamEvent::Stopped { id, error_code }) => {
                    if let Some(st) = conn.streams.get_mut(&u64::from(id)) {
                        st.pending.clear();
                        st.pending_bytes = 0;
                        if let Some(tap) = st.tap.as_mut() {
                            tap.stopped = Some(error_code.into_inner());
                            conn.tapped.push(id.into());
                        }
                    }
                }
                Event::Stream(StreamEvent::Available { .. }) => {}
                Event::DatagramReceived => {
                    let mut items = Vec::new();
                    let max_payload = conn.qc.datagrams().max_size().unwrap_or(0);
                    while let Some(d) = conn.qc.datagrams().recv() {
                        match routes.lookup(h, &d) {
                            Some(fw) => forwards.push(fw),
                            None if taps.iter_mut().any(|t| t.take(h, &d, max_payload)) => {}
                            None => items.push(d),
                        }
                    }
                    if !items.is_empty() {
                        events.push(Ev::Datagrams { h, items });
                    }
                }
                Event::DatagramsUnblocked => {}
            }
        }
        // DATAGRAMs held for the peer's limit go out once it is known (or are counted).
        let early = if !conn.early_datagrams.is_empty()
            && (conn.qc.datagrams().max_size().is_some() || conn.connected)
        {
            std::mem::take(&mut conn.early_datagrams)
        } else {
            VecDeque::new()
        };
        // Streams that were waiting for the owner to consume.
        let blocked: Vec<u64> = conn
            .streams
            .iter()
            .filter(|(_, st)| st.credit_blocked && st.delivered < st.consumed + PY_WINDOW)
            .map(|(sid, _)| *sid)
            .collect();
        for sid in blocked {
            conn.read_stream(h, sid, events);
        }
        // Path changes (NAT rebinding, migration) on the server side.
        let remote = conn.qc.remote_address();
        if remote != conn.remote {
            conn.remote = remote;
            if !conn.is_client {
                events.push(Ev::PathChanged { h, remote: normalize(remote) });
            }
        }
        // Endpoint bookkeeping (connection IDs, reset tokens, drained).
        let mut drained = false;
        while let Some(eev) = conn.qc.poll_endpoint_events() {
            if eev.is_drained() {
                drained = true;
            }
            if let Some(cev) = self.ep.handle_event(ConnectionHandle(h), eev) {
                conn.qc.handle_event(cev);
            }
        }
        // Packets.
        loop {
            self.buf.clear();
            let Some(t) = conn.qc.poll_transmit(now, self.max_gso_segments, &mut self.buf) else { break };
            let data = self.buf[..t.size].to_vec();
            if data.len() > crate::config::CID_LEN && data[0] & 0x80 == 0 {
                conn.last_dcid.clear();
                conn.last_dcid.extend_from_slice(&data[1..1 + crate::config::CID_LEN]);
            }
            self.out.push(Out { dst: t.destination, ecn: t.ecn, data, segment_size: t.segment_size, src_ip: t.src_ip });
        }
        if conn.local_close.is_some() && !conn.closed_reported {
            // A local close is final at once for the owner (the CONNECTION_CLOSE is queued).
            conn.closed_reported = true;
            let reason = conn.local_close.clone().unwrap_or_default();
            events.push(Ev::Closed { h, reason, code: None, app: true });
            gone = true;
        }
        // Splices hear about their streams' news, and about the connection's end.
        let closing = conn.closed_reported || conn.local_close.is_some();
        for sid in conn.tapped.drain(..) {
            self.splice_ready.insert((h, sid));
        }
        if closing || drained || conn.qc.is_drained() {
            for (sid, st) in conn.streams.iter() {
                if st.tap.is_some() {
                    self.splice_ready.insert((h, *sid));
                }
            }
        }
        if drained || conn.qc.is_drained() {
            if !conn.closed_reported {
                events.push(Ev::Closed { h, reason: "closed".into(), code: None, app: false });
            }
            self.conns.remove(&h);
            gone = true;
        }
        for (target, data) in forwards {
            self.relay(target, &data);
        }
        if !gone {
            for data in early {
                // Sized and counted like any DATAGRAM now that the peer's limit is known.
                let _ = self.send_datagram(h, &data);
            }
        }
        if gone {
            // A dead connection is no one's source or target any more, and its handle may
            // be given to a new connection: no route may outlive it.
            self.routes.forget(h);
            for t in self.taps.iter_mut() {
                t.gone(h);
            }
        }
    }

    /// Queue a relayed DATAGRAM on its target (the route's, not the sender's choice).
    fn relay(&mut self, target: usize, data: &[u8]) {
        let Some(conn) = self.conns.get_mut(&target) else {
            self.stats.relay_dropped_no_target += 1;
            return;
        };
        if conn.closed_reported || conn.local_close.is_some() {
            self.stats.relay_dropped_no_target += 1;
            return;
        }
        // Dropped, not truncated or split: the inner transport's own MTU logic recovers.
        if data.len() > conn.max_datagram_payload() {
            self.stats.relay_dropped_oversize += 1;
            return;
        }
        match self.send_datagram(target, data) {
            SendResult::Queued | SendResult::QueuedDroppedOldest => {
                self.stats.relay_forwarded += 1;
                self.stats.relay_bytes += data.len() as u64;
            }
            SendResult::TooLarge(_) => self.stats.relay_dropped_oversize += 1,
            SendResult::Closed => self.stats.relay_dropped_no_target += 1,
        }
    }

    // ---------------------------------------------------------------- relay routes
    pub fn live(&self, h: usize) -> bool {
        self.conns.get(&h).is_some_and(|c| !c.closed_reported && c.local_close.is_none())
    }

    /// 0x2F for `service` arriving on `agent_h` goes to `connector_h` as 0x30 stamped with
    /// `agent_id`. Refused (false) unless both connections are alive: a route naming a dead
    /// handle would later name whichever connection reuses it.
    pub fn route_agent(&mut self, agent_h: usize, service: &[u8], connector_h: usize, agent_id: u32) -> bool {
        if agent_h == connector_h || !self.live(agent_h) || !self.live(connector_h) {
            return false;
        }
        self.routes.agent.entry(agent_h).or_default().insert(service.into(), (connector_h, agent_id));
        true
    }

    pub fn unroute_agent(&mut self, agent_h: usize, service: &[u8]) -> bool {
        let Some(m) = self.routes.agent.get_mut(&agent_h) else { return false };
        let had = m.remove(service).is_some();
        if m.is_empty() {
            self.routes.agent.remove(&agent_h);
        }
        had
    }

    /// 0x31 for `agent_id` arriving on `connector_h` goes to `agent_h` as the bare IP packet.
    pub fn route_reply(&mut self, connector_h: usize, agent_id: u32, agent_h: usize) -> bool {
        if agent_h == connector_h || !self.live(agent_h) || !self.live(connector_h) {
            return false;
        }
        self.routes.reply.insert((connector_h, agent_id), agent_h);
        true
    }

    pub fn unroute_reply(&mut self, connector_h: usize, agent_id: u32) -> bool {
        self.routes.reply.remove(&(connector_h, agent_id)).is_some()
    }

    pub fn clear_routes(&mut self) {
        self.routes = Routes::default();
    }

    /// Forget a connection at once (after a panic in it, or at shutdown).
    pub fn abort(&mut self, h: usize, reason: &str) {
        if let Some(conn) = self.conns.remove(&h) {
            for (sid, st) in conn.streams.iter() {
                if st.tap.is_some() {
                    self.splice_ready.insert((h, *sid));
                }
            }
            if !conn.closed_reported {
                self.events.push(Ev::Closed { h, reason: reason.into(), code: None, app: false });
            }
        }
        self.routes.forget(h);
        self.dirty.remove(&h);
        for t in self.taps.iter_mut() {
            t.gone(h);
        }
    }

    // ---------------------------------------------------------------- connection API
    pub fn send_datagram(&mut self, h: usize, data: &[u8]) -> SendResult {
        let Some(conn) = self.conns.get_mut(&h) else { return SendResult::Closed };
        if conn.closed_reported || conn.local_close.is_some() {
            return SendResult::Closed;
        }
        if conn.qc.datagrams().max_size().is_none() && !conn.connected {
            // The peer's limit is not known yet: hold the datagram until it is.
            let mut dropped = 0;
            while conn.early_datagrams.len() >= EARLY_DATAGRAMS {
                conn.early_datagrams.pop_front();
                dropped += 1;
            }
            conn.early_datagrams.push_back(Bytes::copy_from_slice(data));
            conn.dropped_oldest += dropped;
            self.stats.datagrams_dropped_queue += dropped;
            return if dropped > 0 { SendResult::QueuedDroppedOldest } else { SendResult::Queued };
        }
        let limit = conn.max_datagram_payload();
        if data.len() > limit {
            conn.oversize_refused += 1;
            self.stats.oversize_refused += 1;
            return SendResult::TooLarge(limit);
        }
        conn.sync_datagrams();
        // quinn keeps queued memory + new payload + one item overhead within its buffer;
        // send_buffer_space() already takes that overhead off, so `cap` bounds queued memory
        // plus the new payload (adding the overhead again dropped datagrams quinn still sent).
        let cap = conn.qc.datagrams().send_buffer_space() + conn.queued_memory();
        let mut dropped = 0;
        while !conn.dg_sizes.is_empty() && conn.queued_memory() + data.len() > cap {
            conn.dg_sizes.pop_front();
            dropped += 1;
        }
        match conn.qc.datagrams().send(Bytes::copy_from_slice(data), true) {
            Ok(()) => {
                conn.dg_sizes.push_back(data.len());
                self.dirty.insert(h);
                if dropped > 0 {
                    conn.dropped_oldest += dropped;
                    self.stats.datagrams_dropped_queue += dropped;
                    SendResult::QueuedDroppedOldest
                } else {
                    SendResult::Queued
                }
            }
            Err(quinn_proto::SendDatagramError::TooLarge) => {
                conn.oversize_refused += 1;
                self.stats.oversize_refused += 1;
                SendResult::TooLarge(limit)
            }
            Err(_) => SendResult::Closed,
        }
    }

    pub fn stream_write(&mut self, h: usize, sid: u64, data: &[u8], fin: bool) -> bool {
        self.stream_write_bytes(h, sid, Bytes::copy_from_slice(data), fin)
    }

    /// `stream_write` of bytes we own already (the splices: no copy on the way).
    pub fn stream_write_bytes(&mut self, h: usize, sid: u64, data: Bytes, fin: bool) -> bool {
        let Some(conn) = self.conns.get_mut(&h) else { return false };
        let st = conn.streams.entry(sid).or_default();
        if st.fin_wanted {
            return false;
        }
        if !data.is_empty() {
            st.pending_bytes += data.len();
            st.pending.push_back(data);
        }
        if fin {
            st.fin_wanted = true;
        }
        conn.flush_stream(sid);
        self.dirty.insert(h);
        true
    }

    pub fn open_bi(&mut self, h: usize) -> Option<u64> {
        let conn = self.conns.get_mut(&h)?;
        if !conn.ensure_control() {
            return None;
        }
        let id = conn.qc.streams().open(Dir::Bi)?;
        let sid: u64 = id.into();
        conn.streams.insert(sid, StreamState::default());
        Some(sid)
    }

    pub fn consume(&mut self, h: usize, sid: u64, n: u64) {
        let Some(conn) = self.conns.get_mut(&h) else { return };
        if let Some(st) = conn.streams.get_mut(&sid) {
            st.consumed += n;
            if st.credit_blocked && st.delivered < st.consumed + PY_WINDOW {
                self.dirty.insert(h);
            }
        }
    }

    pub fn reset_stream(&mut self, h: usize, sid: u64, code: u64) {
        let Some(conn) = self.conns.get_mut(&h) else { return };
        let id = StreamId::from(VarInt::from_u64(sid).unwrap_or(VarInt::from_u32(0)));
        let code = VarInt::from_u64(code).unwrap_or(VarInt::from_u32(0));
        let _ = conn.qc.send_stream(id).reset(code);
        let _ = conn.qc.recv_stream(id).stop(code);
        conn.streams.remove(&sid);
        self.dirty.insert(h);
    }

    pub fn set_retain(&mut self, h: usize, sid: u64, on: bool) {
        if let Some(conn) = self.conns.get_mut(&h) {
            let st = conn.streams.entry(sid).or_default();
            st.retain = if on { Some(VecDeque::new()) } else { None };
        }
    }

    /// Bytes queued here that quinn has not taken yet (the back-pressure signal).
    pub fn stream_backlog(&self, h: usize, sid: u64) -> usize {
        self.conns.get(&h).and_then(|c| c.streams.get(&sid)).map(|s| s.pending_bytes).unwrap_or(0)
    }

    /// (offset, bytes) of the retained tail plus what is still queued: everything the peer
    /// may not have received, for resuming the stream elsewhere.
    pub fn stream_unacked(&self, h: usize, sid: u64) -> Option<(u64, Vec<u8>)> {
        let st = self.conns.get(&h)?.streams.get(&sid)?;
        let retain = st.retain.as_ref()?;
        let mut data: Vec<u8> = retain.iter().copied().collect();
        for chunk in &st.pending {
            data.extend_from_slice(chunk);
        }
        Some((st.written - retain.len() as u64, data))
    }

    /// Client side: move to a fresh destination connection ID the peer issued (RFC 9000
    /// §9.5: an observer cannot link the packets before and after), with a PING at once.
    pub fn rotate_cid(&mut self, h: usize) {
        if let Some(conn) = self.conns.get_mut(&h) {
            if conn.is_client && conn.connected {
                conn.qc.local_address_changed();
                self.dirty.insert(h);
            }
        }
    }

    pub fn ping(&mut self, h: usize) {
        if let Some(conn) = self.conns.get_mut(&h) {
            conn.qc.ping();
            self.dirty.insert(h);
        }
    }

    pub fn close(&mut self, h: usize, now: Instant, code: u64, reason: &str) {
        if let Some(conn) = self.conns.get_mut(&h) {
            if conn.local_close.is_none() && !conn.closed_reported {
                conn.local_close = Some(reason.to_string());
                let code = VarInt::from_u64(code).unwrap_or(VarInt::from_u32(0));
                conn.qc.close(now, code, Bytes::copy_from_slice(reason.as_bytes()));
            }
            self.dirty.insert(h);
        }
    }

    pub fn datagram_budget(&mut self, h: usize) -> usize {
        let Some(conn) = self.conns.get_mut(&h) else { return 0 };
        conn.sync_datagrams();
        let mtu = conn.qc.current_mtu().max(1200) as u64;
        let window = conn.qc.congestion_state().window() / mtu;
        (window as usize + DATAGRAM_BURST_SLACK).saturating_sub(conn.dg_sizes.len())
    }

    pub fn queued_datagrams(&mut self, h: usize) -> usize {
        let Some(conn) = self.conns.get_mut(&h) else { return 0 };
        conn.sync_datagrams();
        conn.dg_sizes.len()
    }
}

impl Conn {
    fn new(qc: quinn_proto::Connection, remote: SocketAddr, is_client: bool) -> Self {
        Self {
            qc,
            streams: HashMap::new(),
            tapped: Vec::new(),
            dg_sizes: VecDeque::new(),
            dg_sent_seen: 0,
            dropped_oldest: 0,
            oversize_refused: 0,
            remote,
            connected: false,
            closed_reported: false,
            local_close: None,
            is_client,
            control_opened: !is_client,
            copy_early: false,
            last_dcid: Vec::new(),
            last_rx: None,
            early_datagrams: VecDeque::new(),
        }
    }

    /// The server refused our early data: quinn reverted every stream we opened. Open them
    /// again in the same order (so they get the same ids) and write everything once more.
    fn replay_rejected_early_data(&mut self) {
        self.control_opened = false;
        let mut sids: Vec<u64> = self.streams.keys().copied().filter(|s| s & 0x3 == 0).collect();
        sids.sort_unstable();
        for sid in &sids {
            if let Some(st) = self.streams.get_mut(sid) {
                let copy = st.early_copy.take().unwrap_or_default();
                st.written -= copy.len() as u64;
                if let Some(retain) = st.retain.as_mut() {
                    let keep = retain.len().saturating_sub(copy.len());
                    retain.truncate(keep);
                }
                if !copy.is_empty() {
                    st.pending_bytes += copy.len();
                    st.pending.push_front(Bytes::from(copy));
                }
                if st.fin_wanted {
                    st.fin_sent = false;
                }
            }
        }
        for sid in sids {
            if sid == 0 {
                self.ensure_control();
            } else if self.qc.streams().open(Dir::Bi).is_some() {
                self.flush_stream(sid);
            }
        }
    }

    /// Client side: open the control stream in quinn as soon as the peer allows it.
    fn ensure_control(&mut self) -> bool {
        if self.control_opened {
            return true;
        }
        if let Some(id) = self.qc.streams().open(Dir::Bi) {
            debug_assert_eq!(u64::from(id), 0);
            self.control_opened = true;
            self.flush_stream(0);
        }
        self.control_opened
    }

    pub fn max_datagram_payload(&mut self) -> usize {
        self.qc.datagrams().max_size().unwrap_or(0)
    }

    pub fn rtt(&self) -> Duration {
        self.qc.rtt()
    }

    fn queued_memory(&self) -> usize {
        self.dg_sizes.iter().map(|s| s + DATAGRAM_OVERHEAD).sum()
    }

    /// Forget the datagrams quinn has sent since the last look (they left the queue in order).
    fn sync_datagrams(&mut self) {
        let sent = self.qc.stats().frame_tx.datagram;
        let mut delta = sent.saturating_sub(self.dg_sent_seen);
        self.dg_sent_seen = sent;
        while delta > 0 && self.dg_sizes.pop_front().is_some() {
            delta -= 1;
        }
    }

    pub(crate) fn flush_stream(&mut self, sid: u64) {
        if sid == 0 && !self.control_opened {
            return;
        }
        let Some(st) = self.streams.get_mut(&sid) else { return };
        let id = StreamId::from(VarInt::from_u64(sid).unwrap_or(VarInt::from_u32(0)));
        while let Some(front) = st.pending.front_mut() {
            match self.qc.send_stream(id).write(front) {
                Ok(n) => {
                    if self.copy_early {
                        st.early_copy.get_or_insert_with(Vec::new).extend_from_slice(&front[..n]);
                    }
                    if let Some(retain) = st.retain.as_mut() {
                        retain.extend(&front[..n]);
                        let excess = retain.len().saturating_sub(RETAIN_MAX);
                        retain.drain(..excess);
                    }
                    st.written += n as u64;
                    st.pending_bytes -= n;
                    if n == front.len() {
                        st.pending.pop_front();
                    } else {
                        // A partial write: write again, so that quinn answers Blocked and
                        // records the stream as blocked (only then does it announce
                        // Writable when credit arrives).
                        let _ = front.split_to(n);
                    }
                }
                Err(WriteError::Blocked) => break,
                Err(_) => {
                    st.pending.clear();
                    st.pending_bytes = 0;
                    st.fin_sent = true;
                    return;
                }
            }
        }
        if st.pending.is_empty() && st.fin_wanted && !st.fin_sent {
            st.fin_sent = true;
            let _ = self.qc.send_stream(id).finish();
        }
    }

    fn read_stream(&mut self, h: usize, sid: u64, events: &mut Vec<Ev>) {
        let Some(st) = self.streams.get_mut(&sid) else { return };
        if st.recv_done {
            return;
        }
        let id = StreamId::from(VarInt::from_u64(sid).unwrap_or(VarInt::from_u32(0)));
        let limit = if st.auto_consume {
            usize::MAX
        } else {
            (st.consumed + PY_WINDOW).saturating_sub(st.delivered) as usize
        };
        if limit == 0 {
            st.credit_blocked = true;
            return;
        }
        let mut stream = self.qc.recv_stream(id);
        let Ok(mut chunks) = stream.read(true) else { return };
        let mut parts: Vec<Bytes> = Vec::new();
        let mut got = 0usize;
        let mut fin = false;
        let mut reset = None;
        loop {
            if got >= limit {
                break;
            }
            match chunks.next(limit - got) {
                Ok(Some(chunk)) => {
                    got += chunk.bytes.len();
                    parts.push(chunk.bytes);
                }
                Ok(None) => {
                    fin = true;
                    break;
                }
                Err(ReadError::Blocked) => break,
                Err(ReadError::Reset(code)) => {
                    reset = Some(code.into_inner());
                    break;
                }
            }
        }
        let _ = chunks.finalize();
        st.credit_blocked = !st.auto_consume && got >= limit && !fin && reset.is_none();
        st.delivered += got as u64;
        let payload = if parts.len() == 1 {
            parts.pop().unwrap_or_default()
        } else {
            let mut data = BytesMut::with_capacity(got);
            for p in &parts {
                data.extend_from_slice(p);
            }
            data.freeze()
        };
        if let Some(tap) = st.tap.as_mut() {
            if !payload.is_empty() {
                tap.push(payload);
            }
            if fin {
                tap.fin = true;
            }
            if reset.is_some() {
                tap.reset = reset;
            }
            if fin || reset.is_some() {
                st.recv_done = true;
            }
            self.tapped.push(sid);
            return;
        }
        if let Some(code) = reset {
            st.recv_done = true;
            if !payload.is_empty() {
                events.push(Ev::Stream { h, sid, data: payload, fin: false });
            }
            events.push(Ev::StreamReset { h, sid, code });
            return;
        }
        if fin {
            st.recv_done = true;
        }
        if got > 0 || fin {
            events.push(Ev::Stream { h, sid, data: payload, fin });
        }
        if fin && st.fin_sent && st.pending.is_empty() && st.retain.is_none() {
            self.streams.remove(&sid);
        }
    }
}
