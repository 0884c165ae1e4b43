//! Shared harness for the in-memory tests: a server `Core` and a client `Core` joined by a
//! "network" that is just this code moving `Core::out` into the other side's `datagram`, on a
//! clock the test advances itself. Nothing sleeps and no socket is opened, so every run takes
//! the same path.
#![allow(dead_code)] // each test binary uses a different part of it

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use _native::config::{self, Limits};
use _native::core::{Core, Ev, Out};
use _native::tls::{self, TicketBackend};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};

pub const UDP_PAYLOAD: u16 = 1350;
pub const DATAGRAM_QUEUE: usize = 512;
pub const STREAM_WINDOW: u32 = 1024 * 1024;

/// The limits the Python binding passes (py.rs `limits()`), so the tests run the shipped
/// transport settings rather than quinn's defaults.
pub fn limits() -> Limits {
    Limits {
        udp_payload: UDP_PAYLOAD,
        idle_timeout: 30.0,
        datagram_queue: DATAGRAM_QUEUE,
        stream_window: STREAM_WINDOW,
        connection_window: 16 * 1024 * 1024,
        max_streams: 4096,
    }
}

pub struct Pki {
    pub ca_pem: String,
    pub server_cert_pem: String,
    pub server_key_pem: String,
    pub client_cert_pem: String,
    pub client_key_pem: String,
    pub client_der: Vec<u8>,
}

/// A CA, a server certificate for `localhost` / 127.0.0.1 and a client certificate, all made
/// fresh so the tests need no files.
pub fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "ztna test CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca.self_signed(&ca_key).unwrap();

    let server_key = KeyPair::generate().unwrap();
    let mut sp = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    sp.distinguished_name.push(DnType::CommonName, "ztna test server");
    sp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = sp.signed_by(&server_key, &ca_cert, &ca_key).unwrap();

    let client_key = KeyPair::generate().unwrap();
    let mut cp = CertificateParams::new(vec!["client.ztna.test".to_string()]).unwrap();
    cp.distinguished_name.push(DnType::CommonName, "ztna test client");
    cp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_cert = cp.signed_by(&client_key, &ca_cert, &ca_key).unwrap();

    Pki {
        ca_pem: ca_cert.pem(),
        server_cert_pem: server_cert.pem(),
        server_key_pem: server_key.serialize_pem(),
        client_cert_pem: client_cert.pem(),
        client_key_pem: client_key.serialize_pem(),
        client_der: client_cert.der().to_vec(),
    }
}

/// The server's ticket store as the binding's Python object would be: `take` removes what it
/// returns, so a ticket works once. With `refuse`, `take` finds nothing (a store that lost the
/// ticket, or a replay), which makes the server reject 0-RTT.
#[derive(Clone, Default)]
pub struct Tickets {
    pub map: Arc<Mutex<HashMap<Vec<u8>, Vec<u8>>>>,
    pub refuse: bool,
    pub puts: Arc<AtomicUsize>,
    pub takes: Arc<AtomicUsize>,
    pub hits: Arc<AtomicUsize>,
}

impl TicketBackend for Tickets {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        self.puts.fetch_add(1, Ordering::SeqCst);
        self.map.lock().unwrap().insert(key, value);
        true
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.takes.fetch_add(1, Ordering::SeqCst);
        if self.refuse {
            return None;
        }
        let got = self.map.lock().unwrap().remove(key);
        if got.is_some() {
            self.hits.fetch_add(1, Ordering::SeqCst);
        }
        got
    }
}

pub struct Setup {
    pub pki: Pki,
    pub server_cfg: Arc<quinn_proto::ServerConfig>,
    pub client_cfg: quinn_proto::ClientConfig,
    pub reset_key: Vec<u8>,
}

/// Configurations built through `tls::*_config` and `config::*` with the binding's options.
pub fn setup(tickets: Option<Tickets>) -> Setup {
    let pki = pki();
    let l = limits();
    let server_tls = tls::server_config(tls::ServerTlsOptions {
        cert_pem: pki.server_cert_pem.as_bytes(),
        key_pem: pki.server_key_pem.as_bytes(),
        alpn: vec![b"ztna-v1".to_vec()],
        request_client_cert: true,
        tickets: tickets.map(|t| Box::new(t) as Box<dyn TicketBackend>),
        keylog: None,
    })
    .unwrap();
    let server_cfg = config::server(server_tls, b"test token key", &l, 15.0, 2).unwrap();
    let (client_tls, _recorder) = tls::client_config(tls::ClientTlsOptions {
        cert_pem: Some(pki.client_cert_pem.as_bytes()),
        key_pem: Some(pki.client_key_pem.as_bytes()),
        ca_pem: pki.ca_pem.as_bytes(),
        alpn: vec![b"ztna-v1".to_vec()],
        verify_server: true,
        keylog: None,
        resumption: true,
    })
    .unwrap();
    let client_cfg = config::client(client_tls, &l).unwrap();
    Setup { pki, server_cfg: Arc::new(server_cfg), client_cfg, reset_key: b"server reset key".to_vec() }
}

pub fn server_core(s: &Setup) -> Core {
    let ep = config::endpoint(&s.reset_key, UDP_PAYLOAD).unwrap();
    Core::new(Arc::new(ep), Some(s.server_cfg.clone()), false)
}

pub fn client_core() -> Core {
    let ep = config::endpoint(b"client reset key", UDP_PAYLOAD).unwrap();
    Core::new(Arc::new(ep), None, false)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Admit {
    /// Accept every attempt.
    Accept,
    /// Answer an unvalidated attempt with Retry, accept the validated one.
    Retry,
    /// Leave attempts to the test.
    Hold,
}

/// What one side's owner saw, kept for the assertions.
#[derive(Default)]
pub struct Seen {
    pub events: Vec<Ev>,
    pub streams: HashMap<(usize, u64), Vec<u8>>,
    pub fins: HashMap<(usize, u64), bool>,
    pub datagrams: Vec<bytes::Bytes>,
}

pub struct Pair {
    pub now: Instant,
    pub s: Core,
    pub c: Core,
    pub s_addr: SocketAddr,
    pub c_addr: SocketAddr,
    pub admit: Admit,
    /// Whether each side's owner calls `consume` for every stream chunk it is handed.
    pub s_consume: bool,
    pub c_consume: bool,
    pub s_seen: Seen,
    pub c_seen: Seen,
    /// Every datagram moved (true: client to server), for the fuzz corpus.
    pub capture: Option<Vec<(bool, Vec<u8>)>>,
    /// Moved to the side they were addressed to; a test can set this to drop everything.
    pub deliver: bool,
}

/// One packet of `Out` per GSO segment.
fn segments(o: &Out) -> Vec<&[u8]> {
    match o.segment_size {
        Some(s) if s > 0 => o.data.chunks(s).collect(),
        _ => vec![&o.data[..]],
    }
}

impl Pair {
    pub fn new(setup: &Setup) -> Self {
        Self {
            now: Instant::now(),
            s: server_core(setup),
            c: client_core(),
            s_addr: "127.0.0.1:4433".parse().unwrap(),
            c_addr: "127.0.0.1:50000".parse().unwrap(),
            admit: Admit::Accept,
            s_consume: true,
            c_consume: true,
            s_seen: Seen::default(),
            c_seen: Seen::default(),
            capture: None,
            deliver: true,
        }
    }

    pub fn connect(&mut self, setup: &Setup) -> (usize, bool) {
        self.c.connect(self.now, setup.client_cfg.clone(), self.s_addr, "localhost").unwrap()
    }

    /// Handle what the owners were told: admission, stream bytes (consumed or not).
    fn react(&mut self) {
        for ev in std::mem::take(&mut self.s.events) {
            if let Ev::Incoming { id, validated, may_retry, .. } = ev {
                match self.admit {
                    Admit::Accept => {
                        self.s.accept(id, self.now);
                    }
                    Admit::Retry if !validated && may_retry => {
                        self.s.retry(id);
                    }
                    Admit::Retry => {
                        self.s.accept(id, self.now);
                    }
                    Admit::Hold => {}
                }
            }
            record(&mut self.s, &mut self.s_seen, self.s_consume, ev);
        }
        for ev in std::mem::take(&mut self.c.events) {
            record(&mut self.c, &mut self.c_seen, self.c_consume, ev);
        }
    }

    /// Move everything both sides sent. Returns whether anything was in flight.
    pub fn exchange(&mut self) -> bool {
        let c_out = std::mem::take(&mut self.c.out);
        let s_out = std::mem::take(&mut self.s.out);
        let moved = !c_out.is_empty() || !s_out.is_empty();
        if !self.deliver {
            return moved;
        }
        for o in &c_out {
            for seg in segments(o) {
                if let Some(cap) = self.capture.as_mut() {
                    cap.push((true, seg.to_vec()));
                }
                if o.dst == self.s_addr {
                    self.s.datagram(self.now, self.c_addr, None, o.ecn, seg);
                }
            }
        }
        for o in &s_out {
            for seg in segments(o) {
                if let Some(cap) = self.capture.as_mut() {
                    cap.push((false, seg.to_vec()));
                }
                if o.dst == self.c_addr {
                    self.c.datagram(self.now, self.s_addr, None, o.ecn, seg);
                }
            }
        }
        moved
    }

    /// One round: both sides process, owners react, packets cross. The clock moves 1 ms per
    /// round so quinn measures a small, non-zero RTT and its pacer lets packets go.
    pub fn step(&mut self) -> bool {
        self.s.drive(self.now);
        self.c.drive(self.now);
        self.react();
        self.s.drive(self.now);
        self.c.drive(self.now);
        self.react();
        let moved = self.exchange();
        self.now += Duration::from_millis(1);
        self.s.handle_timeouts(self.now);
        self.c.handle_timeouts(self.now);
        moved
    }

    /// Run until `done` holds or `limit` of simulated time passed; when nothing is in flight
    /// the clock jumps to the next timer (never past the limit). Returns `done`'s last value.
    pub fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&Pair) -> bool) -> bool {
        let end = self.now + limit;
        loop {
            if done(self) {
                return true;
            }
            if self.now >= end {
                return false;
            }
            let moved = self.step();
            if !moved && self.s.out.is_empty() && self.c.out.is_empty() {
                let next = [self.s.next_timeout(), self.c.next_timeout()].into_iter().flatten().min();
                let to = next.unwrap_or(end).min(end);
                if to > self.now {
                    self.now = to;
                }
                self.s.handle_timeouts(self.now);
                self.c.handle_timeouts(self.now);
            }
        }
    }

    /// Let everything in flight settle for `d` of simulated time.
    pub fn settle(&mut self, d: Duration) {
        self.run_until(d, |_| false);
    }

    /// A connected pair: (client handle, server handle).
    pub fn establish(&mut self, setup: &Setup) -> (usize, usize) {
        let (ch, _) = self.connect(setup);
        assert!(self.run_until(Duration::from_secs(5), |p| connected(&p.c_seen, ch).is_some()
            && p.s_seen.events.iter().any(|e| matches!(e, Ev::Connected { .. }))));
        (ch, self.last_server_connected())
    }

    /// The handle of the server's newest `Connected` event.
    pub fn last_server_connected(&self) -> usize {
        self.s_seen
            .events
            .iter()
            .rev()
            .find_map(|e| match e {
                Ev::Connected { h, .. } => Some(*h),
                _ => None,
            })
            .unwrap()
    }
}

fn record(core: &mut Core, seen: &mut Seen, consume: bool, ev: Ev) {
    match &ev {
        Ev::Stream { h, sid, data, fin } => {
            seen.streams.entry((*h, *sid)).or_default().extend_from_slice(data);
            if *fin {
                seen.fins.insert((*h, *sid), true);
            }
            if consume {
                core.consume(*h, *sid, data.len() as u64);
            }
            // The bytes live in `streams`; keep the event log small for 4 MB transfers.
            seen.events.push(Ev::Stream { h: *h, sid: *sid, data: bytes::Bytes::new(), fin: *fin });
            return;
        }
        Ev::Datagrams { items, .. } => seen.datagrams.extend(items.iter().cloned()),
        _ => {}
    }
    seen.events.push(ev);
}

/// The `zero_rtt` flag of handle `h`'s Connected event, if it came.
pub fn connected(seen: &Seen, h: usize) -> Option<bool> {
    seen.events.iter().find_map(|e| match e {
        Ev::Connected { h: x, zero_rtt, .. } if *x == h => Some(*zero_rtt),
        _ => None,
    })
}

pub fn stream_bytes(seen: &Seen, h: usize, sid: u64) -> usize {
    seen.streams.get(&(h, sid)).map(|v| v.len()).unwrap_or(0)
}

/// A small deterministic PRNG (xorshift64*) so the tests need no `rand`.
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}
