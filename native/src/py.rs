//! The Python binding: `ztna._native.Endpoint` owns one UDP socket and drives a `Core`.
//!
//! The asyncio loop calls `recv(now)` when the socket is readable, `timeout(now)` when the
//! deadline from `next_timeout()` passes and `drive(now)` after the owner queued work; each call
//! drains what it can in batches (recvmmsg/GRO, GSO sends) and returns the events of the whole
//! batch as one list of tuples, so Python runs once per batch, never once per packet.
//!
//! No panic crosses this boundary: each call runs under `catch_unwind`; a panic inside one
//! connection aborts that connection only, is counted (`stats()["panics"]`) and logged as one
//! line, and the endpoint keeps serving everyone else.

use std::borrow::Cow;
use std::io::IoSliceMut;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::{FromRawFd, OwnedFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyList};

use crate::config::{self, Limits};
use crate::core::{Core, Ev, SendResult};
use crate::sockpump::SocketSplicer;
use crate::tls::{self, TicketBackend};

fn bytes_of<'a>(obj: &'a Bound<'_, PyAny>) -> PyResult<Cow<'a, [u8]>> {
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Ok(Cow::Borrowed(b.as_bytes()));
    }
    if let Ok(b) = obj.cast::<PyByteArray>() {
        return Ok(Cow::Owned(b.to_vec()));
    }
    let py = obj.py();
    let b = py.import("builtins")?.getattr("bytes")?.call1((obj,))?;
    let b = b.cast_into::<PyBytes>().map_err(|_| PyValueError::new_err("not bytes-like"))?;
    Ok(Cow::Owned(b.as_bytes().to_vec()))
}

fn parse_addr(host: &str, port: u16) -> PyResult<SocketAddr> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let host = host.split('%').next().unwrap_or(host);
    let ip: IpAddr = host
        .parse()
        .map_err(|_| PyValueError::new_err(format!("not an IP address: {host:?}")))?;
    Ok(SocketAddr::new(ip, port))
}

fn addr_tuple(addr: SocketAddr) -> (String, u16) {
    (addr.ip().to_string(), addr.port())
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic".to_string()
    }
}

/// A Python object with `put(key, value) -> bool` and `take(key) -> bytes | None`.
struct PyTickets(Py<PyAny>);

impl TicketBackend for PyTickets {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        Python::attach(|py| {
            self.0
                .call_method1(py, "put", (PyBytes::new(py, &key), PyBytes::new(py, &value)))
                .and_then(|r| r.extract::<bool>(py))
                .unwrap_or_else(|e| {
                    e.print(py);
                    false
                })
        })
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        Python::attach(|py| {
            match self.0.call_method1(py, "take", (PyBytes::new(py, key),)) {
                Ok(r) => r.extract::<Option<Vec<u8>>>(py).ok().flatten(),
                Err(e) => {
                    e.print(py);
                    None
                }
            }
        })
    }
}

fn limits(udp_payload: u16, idle_timeout: f64, datagram_queue: usize) -> Limits {
    Limits {
        udp_payload,
        idle_timeout,
        datagram_queue,
        // Windows sized for the bandwidth-delay product: a stream moves at most a window per
        // round trip (8 MiB per 40 ms RTT is 1.6 Gbit/s); what a slow application leaves
        // unread is bounded by the connection window.
        stream_window: 8 * 1024 * 1024,
        connection_window: 32 * 1024 * 1024,
        max_streams: 4096,
    }
}

fn cfg_err(e: tls::ConfigError) -> PyErr {
    PyValueError::new_err(e.0)
}

/// Client TLS + transport settings. Keep one per identity: it holds the session tickets and
/// address tokens this process received, so the next connection resumes in 0-RTT.
#[pyclass(module = "ztna._native")]
pub struct ClientTls {
    cfg: quinn_proto::ClientConfig,
    recorder: Option<Arc<tls::RecordingVerifier>>,
}

#[pymethods]
impl ClientTls {
    #[new]
    #[pyo3(signature = (*, ca_pem, cert_pem=None, key_pem=None, alpn=vec!["ztna-v1".to_string()],
                        verify_server=true, keylog=None, resumption=true, udp_payload=1350,
                        idle_timeout=30.0, datagram_queue=512))]
    #[allow(clippy::too_many_arguments)]
    fn new(ca_pem: &[u8], cert_pem: Option<&[u8]>, key_pem: Option<&[u8]>, alpn: Vec<String>,
           verify_server: bool, keylog: Option<String>, resumption: bool, udp_payload: u16,
           idle_timeout: f64, datagram_queue: usize) -> PyResult<Self> {
        let (rustls_cfg, recorder) = tls::client_config(tls::ClientTlsOptions {
            cert_pem,
            key_pem,
            ca_pem,
            alpn: alpn.into_iter().map(String::into_bytes).collect(),
            verify_server,
            keylog: keylog.as_deref(),
            resumption,
        })
        .map_err(cfg_err)?;
        let cfg = config::client(rustls_cfg, &limits(udp_payload, idle_timeout, datagram_queue)).map_err(cfg_err)?;
        Ok(Self { cfg, recorder })
    }

    /// The certificate (DER) a server presented for `server_name` last, verified or not.
    fn presented_certificate<'py>(&self, py: Python<'py>, server_name: &str) -> Option<Bound<'py, PyBytes>> {
        let rec = self.recorder.as_ref()?;
        let seen = rec.seen.lock().ok()?;
        seen.get(server_name).map(|d| PyBytes::new(py, d))
    }
}

/// Server TLS + transport + address-validation settings for one listening endpoint.
#[pyclass(module = "ztna._native")]
pub struct ServerTls {
    cfg: Arc<quinn_proto::ServerConfig>,
}

#[pymethods]
impl ServerTls {
    #[new]
    #[pyo3(signature = (*, cert_pem, key_pem, token_key, alpn=vec!["ztna-v1".to_string()],
                        request_client_cert=true, tickets=None, keylog=None, udp_payload=1350,
                        idle_timeout=30.0, datagram_queue=512, retry_lifetime=15.0, new_tokens=2))]
    #[allow(clippy::too_many_arguments)]
    fn new(cert_pem: &[u8], key_pem: &[u8], token_key: &[u8], alpn: Vec<String>,
           request_client_cert: bool, tickets: Option<Py<PyAny>>, keylog: Option<String>,
           udp_payload: u16, idle_timeout: f64, datagram_queue: usize, retry_lifetime: f64,
           new_tokens: u32) -> PyResult<Self> {
        let rustls_cfg = tls::server_config(tls::ServerTlsOptions {
            cert_pem,
            key_pem,
            alpn: alpn.into_iter().map(String::into_bytes).collect(),
            request_client_cert,
            tickets: tickets.map(|t| Box::new(PyTickets(t)) as Box<dyn TicketBackend>),
            keylog: keylog.as_deref(),
        })
        .map_err(cfg_err)?;
        let l = limits(udp_payload, idle_timeout, datagram_queue);
        let cfg = config::server(rustls_cfg, token_key, &l, retry_lifetime, new_tokens).map_err(cfg_err)?;
        Ok(Self { cfg: Arc::new(cfg) })
    }
}

/// Check that a certificate/key pair and a CA file are usable, without a connection:
/// raises ValueError naming what is wrong.
#[pyfunction]
#[pyo3(signature = (*, cert_pem, key_pem))]
pub fn check_identity(cert_pem: &[u8], key_pem: &[u8]) -> PyResult<()> {
    tls::server_config(tls::ServerTlsOptions {
        cert_pem,
        key_pem,
        alpn: vec![],
        request_client_cert: false,
        tickets: None,
        keylog: None,
    })
    .map(|_| ())
    .map_err(cfg_err)
}

/// Every address on this namespace's interfaces, as text (getifaddrs).
#[pyfunction]
pub fn interface_addresses() -> PyResult<Vec<String>> {
    crate::netinfo::interface_addresses().map_err(|e| PyOSError::new_err(e.to_string()))
}

/// The I/O half of a pump attached to an endpoint (the TUN device's writes, the UDP flows'
/// backend sends): what the pump's tap took during a batch goes out after it.
pub(crate) trait Drain: Send + Sync {
    fn drain(&mut self);
}

#[pyclass(module = "ztna._native")]
pub struct Endpoint {
    pub(crate) core: Core,
    /// Native I/O of the pumps attached to this endpoint, run after each batch.
    pub(crate) drains: Vec<Box<dyn Drain>>,
    sock: Option<UdpSocket>,
    udp: quinn_udp::UdpSocketState,
    anchor: (Instant, f64),
    rx: Vec<Vec<u8>>,
    recv_batch: usize,
    closed: bool,
    blackhole: bool,
    /// Stream ⇄ socket splices (made on first use).
    splicer: Option<SocketSplicer>,
}

const RX_BUF: usize = 65536;

impl Endpoint {
    fn instant(&self, now: f64) -> Instant {
        self.anchor.0 + Duration::from_secs_f64((now - self.anchor.1).max(0.0))
    }

    fn seconds(&self, at: Instant) -> f64 {
        self.anchor.1 + at.saturating_duration_since(self.anchor.0).as_secs_f64()
    }

    fn transmit(&mut self) {
        for d in self.drains.iter_mut() {
            if catch_unwind(AssertUnwindSafe(|| d.drain())).is_err() {
                self.core.stats.panics += 1;
            }
        }
        let outs = std::mem::take(&mut self.core.out);
        let Some(sock) = self.sock.as_ref() else { return };
        if self.blackhole {
            return;
        }
        for o in outs {
            let t = quinn_udp::Transmit {
                destination: o.dst,
                ecn: o.ecn.and_then(|e| quinn_udp::EcnCodepoint::from_bits(e as u8)),
                contents: &o.data,
                segment_size: o.segment_size,
                src_ip: o.src_ip,
            };
            match self.udp.try_send(sock.into(), &t) {
                Ok(()) => {
                    let n = o.segment_size.map(|s| o.data.len().div_ceil(s.max(1))).unwrap_or(1);
                    self.core.stats.datagrams_sent += n as u64;
                    self.core.stats.bytes_sent += o.data.len() as u64;
                }
                Err(_) => self.core.stats.socket_send_errors += 1, // QUIC recovers the loss
            }
        }
    }

    fn guarded<T>(&mut self, what: &str, f: impl FnOnce(&mut Self) -> T) -> Option<T> {
        match catch_unwind(AssertUnwindSafe(|| f(self))) {
            Ok(v) => Some(v),
            Err(p) => {
                // The panic hook already logged one line with its location.
                let _ = (what, panic_text(&*p));
                self.core.stats.panics += 1;
                None
            }
        }
    }

    /// Run every dirty connection, each under its own guard: a panic aborts only that one.
    /// Splices move their bytes in between (what a connection received goes to its sockets
    /// and streams, and what they gave goes out in the same batch), a few rounds at most.
    fn drive_guarded(&mut self, now: Instant) {
        for _ in 0..8 {
            if catch_unwind(AssertUnwindSafe(|| self.core.drive(now))).is_err() {
                self.core.stats.panics += 1;
            }
            let core = &mut self.core;
            let splicer = &mut self.splicer;
            let pairs = !core.pairs.is_empty() && !core.splice_ready.is_empty();
            let socks = splicer.as_ref().is_some_and(|s| s.has_work(core));
            if !pairs && !socks {
                break;
            }
            let run = catch_unwind(AssertUnwindSafe(|| {
                if pairs {
                    core.pump_pairs();
                }
                if let Some(sp) = splicer.as_mut() {
                    sp.service(core);
                }
            }));
            if run.is_err() {
                self.core.stats.panics += 1;
                break;
            }
        }
        // News for streams no splice holds any more is stale.
        let core = &mut self.core;
        let splicer = &self.splicer;
        if !core.splice_ready.is_empty() {
            let pairs = &core.pairs;
            core.splice_ready.retain(|k| pairs.contains(k.0, k.1) || splicer.as_ref().is_some_and(|s| s.counts(k.0, k.1).is_some()));
        }
    }

    fn events<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let list = PyList::empty(py);
        for ev in self.core.events.drain(..) {
            let item = match ev {
                Ev::Incoming { id, remote, validated, may_retry } => {
                    (0u8, id, addr_tuple(remote), validated, may_retry).into_pyobject(py)?.into_any()
                }
                Ev::HandshakeData { h, chain, server_name } => {
                    let chain = chain.map(|c| c.iter().map(|d| PyBytes::new(py, d)).collect::<Vec<_>>());
                    (1u8, h, chain, server_name).into_pyobject(py)?.into_any()
                }
                Ev::Connected { h, chain, zero_rtt } => {
                    let chain = chain.map(|c| c.iter().map(|d| PyBytes::new(py, d)).collect::<Vec<_>>());
                    (2u8, h, chain, zero_rtt).into_pyobject(py)?.into_any()
                }
                Ev::Datagrams { h, items } => {
                    let items: Vec<_> = items.iter().map(|d| PyBytes::new(py, d)).collect();
                    (3u8, h, items).into_pyobject(py)?.into_any()
                }
                Ev::Stream { h, sid, data, fin } => {
                    (4u8, h, sid, PyBytes::new(py, &data), fin).into_pyobject(py)?.into_any()
                }
                Ev::StreamReset { h, sid, code } => (5u8, h, sid, code).into_pyobject(py)?.into_any(),
                Ev::Closed { h, reason, code, app } => (6u8, h, reason, code, app).into_pyobject(py)?.into_any(),
                Ev::PathChanged { h, remote } => (7u8, h, addr_tuple(remote)).into_pyobject(py)?.into_any(),
                Ev::Raw { data, remote } => (8u8, PyBytes::new(py, &data), addr_tuple(remote)).into_pyobject(py)?.into_any(),
                Ev::Spliced { id, h, sid, sent, received, how, code } => {
                    (9u8, h, sid, id, sent, received, how, code).into_pyobject(py)?.into_any()
                }
            };
            list.append(item)?;
        }
        Ok(list)
    }

    fn conn_or_err(&mut self, h: usize) -> PyResult<&mut crate::core::Conn> {
        self.core.conn_mut(h).ok_or_else(|| PyValueError::new_err("no such connection"))
    }
}

#[pymethods]
impl Endpoint {
    /// `fd`: a bound UDP socket (duplicated: the caller keeps and closes its own).
    /// `now`: the caller's monotonic clock (asyncio's loop.time()); every later `now` is on it.
    #[new]
    #[pyo3(signature = (fd, now, *, reset_key, server=None, udp_payload=1350, recv_batch=256))]
    fn new(fd: i32, now: f64, reset_key: &[u8], server: Option<PyRef<'_, ServerTls>>,
           udp_payload: u16, recv_batch: usize) -> PyResult<Self> {
        let dup = unsafe { libc::dup(fd) };
        if dup < 0 {
            return Err(PyOSError::new_err(format!("dup: {}", std::io::Error::last_os_error())));
        }
        let sock = unsafe { UdpSocket::from_raw_fd(dup) };
        sock.set_nonblocking(true).map_err(|e| PyOSError::new_err(e.to_string()))?;
        let v6 = matches!(sock.local_addr().map_err(|e| PyOSError::new_err(e.to_string()))?, SocketAddr::V6(_));
        let udp = quinn_udp::UdpSocketState::new((&sock).into()).map_err(|e| PyOSError::new_err(e.to_string()))?;
        let ep_cfg = config::endpoint(reset_key, udp_payload).map_err(cfg_err)?;
        let mut core = Core::new(Arc::new(ep_cfg), server.map(|s| s.cfg.clone()), v6);
        // One GSO send is one UDP datagram for the kernel: its total must stay below 64 KiB,
        // or the whole batch fails with EMSGSIZE.
        core.max_gso_segments = udp.max_gso_segments().clamp(1, (65000 / udp_payload.max(1200) as usize).max(1));
        let rx = (0..quinn_udp::BATCH_SIZE).map(|_| vec![0u8; RX_BUF]).collect();
        Ok(Self { core, drains: Vec::new(), sock: Some(sock), udp, anchor: (Instant::now(), now), rx, recv_batch, closed: false, blackhole: false, splicer: None })
    }

    /// Read everything the socket has (up to `recv_batch` datagrams), process it, send what
    /// it caused; the events of the batch.
    fn recv<'py>(&mut self, py: Python<'py>, now: f64) -> PyResult<Bound<'py, PyList>> {
        if !self.closed && self.sock.is_some() {
            let at = self.instant(now);
            self.guarded("recv", |s| {
                let Some(sock) = s.sock.as_ref() else { return };
                let mut seen = 0usize;
                let mut errors = 0usize;
                let mut metas = [quinn_udp::RecvMeta::default(); quinn_udp::BATCH_SIZE];
                while seen < s.recv_batch {
                    let n = {
                        let mut bufs: Vec<IoSliceMut<'_>> = s.rx.iter_mut().map(|b| IoSliceMut::new(b)).collect();
                        match s.udp.recv(sock.into(), &mut bufs, &mut metas) {
                            Ok(n) => n,
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                            Err(_) => {
                                // ICMP errors surface here on Linux (ECONNREFUSED ...).
                                s.core.stats.socket_recv_errors += 1;
                                errors += 1;
                                if errors > 64 {
                                    break;
                                }
                                continue;
                            }
                        }
                    };
                    // A short batch means the queue was empty a moment ago: whatever comes
                    // next wakes the (level-triggered) loop again, so the call that would
                    // only say EAGAIN is saved.
                    let drained = n < s.rx.len();
                    if s.blackhole {
                        if drained {
                            break;
                        }
                        continue;
                    }
                    for (i, meta) in metas.iter().enumerate().take(n) {
                        let ecn = meta.ecn.and_then(|e| quinn_proto::EcnCodepoint::from_bits(e as u8));
                        let stride = meta.stride.max(1);
                        let (rx, core) = (&s.rx, &mut s.core);
                        if meta.len == 0 {
                            // An empty datagram: counted as malformed like any other junk.
                            seen += 1;
                            core.datagram(at, meta.addr, meta.dst_ip, ecn, &[]);
                            continue;
                        }
                        for seg in rx[i][..meta.len].chunks(stride) {
                            seen += 1;
                            if catch_unwind(AssertUnwindSafe(|| core.datagram(at, meta.addr, meta.dst_ip, ecn, seg))).is_err() {
                                core.stats.panics += 1;
                            }
                        }
                    }
                    if drained {
                        break;
                    }
                }
            });
            self.drive_guarded(at);
            self.transmit();
        }
        self.events(py)
    }

    /// Run the connection timers that are due.
    fn timeout<'py>(&mut self, py: Python<'py>, now: f64) -> PyResult<Bound<'py, PyList>> {
        let at = self.instant(now);
        self.guarded("timers", |s| s.core.handle_timeouts(at));
        self.drive_guarded(at);
        self.transmit();
        self.events(py)
    }

    /// Process what the owner queued (writes, datagrams, consumed credit, closes).
    fn drive<'py>(&mut self, py: Python<'py>, now: f64) -> PyResult<Bound<'py, PyList>> {
        let at = self.instant(now);
        self.drive_guarded(at);
        self.transmit();
        self.events(py)
    }

    /// True while work is queued that the last call left for a further `drive` (a burst
    /// longer than one call's rounds); False when a call finished everything it started.
    fn busy(&self) -> bool {
        let core = &self.core;
        core.has_dirty()
            || (!core.pairs.is_empty() && !core.splice_ready.is_empty())
            || self.splicer.as_ref().is_some_and(|s| s.has_work(core))
    }

    fn next_timeout(&mut self) -> Option<f64> {
        let at = self.guarded("next_timeout", |s| s.core.next_timeout()).flatten()?;
        Some(self.seconds(at))
    }

    fn set_server_config(&mut self, server: PyRef<'_, ServerTls>) {
        self.core.ep.set_server_config(Some(server.cfg.clone()));
    }

    fn accept(&mut self, incoming: u64, now: f64) -> Option<usize> {
        let at = self.instant(now);
        self.guarded("accept", |s| s.core.accept(incoming, at)).flatten()
    }

    fn retry(&mut self, incoming: u64) -> bool {
        self.guarded("retry", |s| s.core.retry(incoming)).unwrap_or(false)
    }

    fn refuse(&mut self, incoming: u64) {
        self.guarded("refuse", |s| s.core.refuse(incoming));
    }

    fn ignore(&mut self, incoming: u64) {
        self.guarded("ignore", |s| s.core.ignore(incoming));
    }

    fn ignore_pending(&mut self) {
        self.guarded("ignore", |s| s.core.ignore_pending());
    }

    /// Start a client connection: (handle, whether 0-RTT data can be sent).
    fn connect(&mut self, tls: PyRef<'_, ClientTls>, host: &str, port: u16, server_name: &str,
               now: f64) -> PyResult<(usize, bool)> {
        let remote = parse_addr(host, port)?;
        let at = self.instant(now);
        let cfg = tls.cfg.clone();
        match self.guarded("connect", |s| s.core.connect(at, cfg, remote, server_name)) {
            Some(Ok(r)) => Ok(r),
            Some(Err(e)) => Err(PyValueError::new_err(format!("cannot connect to {remote}: {e}"))),
            None => Err(PyRuntimeError::new_err("internal error in connect")),
        }
    }

    /// One non-QUIC datagram (P2P probes share the socket).
    fn send_raw(&mut self, data: &Bound<'_, PyAny>, host: &str, port: u16) -> PyResult<bool> {
        let data = bytes_of(data)?;
        let dst = crate::core::to_wire_addr(self.core.v6_socket, parse_addr(host, port)?);
        let t = quinn_udp::Transmit { destination: dst, ecn: None, contents: &data, segment_size: None, src_ip: None };
        let Some(sock) = self.sock.as_ref() else { return Ok(false) };
        match self.udp.try_send(sock.into(), &t) {
            Ok(()) => {
                self.core.stats.datagrams_sent += 1;
                self.core.stats.bytes_sent += data.len() as u64;
                Ok(true)
            }
            Err(_) => {
                self.core.stats.socket_send_errors += 1;
                Ok(false)
            }
        }
    }

    // ------------------------------------------------------------ per connection
    /// 0 queued, 1 queued after dropping the oldest, 2 connection closed, 3 too large.
    fn send_datagram(&mut self, h: usize, data: &Bound<'_, PyAny>) -> PyResult<u8> {
        let data = bytes_of(data)?;
        Ok(match self.guarded("send_datagram", |s| s.core.send_datagram(h, &data)) {
            Some(SendResult::Queued) => 0,
            Some(SendResult::QueuedDroppedOldest) => 1,
            Some(SendResult::Closed) | None => 2,
            Some(SendResult::TooLarge(_)) => 3,
        })
    }

    fn max_datagram_payload(&mut self, h: usize) -> usize {
        self.core.conn_mut(h).map(|c| c.max_datagram_payload()).unwrap_or(0)
    }

    fn datagram_budget(&mut self, h: usize) -> usize {
        self.core.datagram_budget(h)
    }

    #[pyo3(signature = (h, sid, data, fin=false))]
    fn stream_write(&mut self, h: usize, sid: u64, data: &Bound<'_, PyAny>, fin: bool) -> PyResult<bool> {
        let data = bytes_of(data)?;
        Ok(self.guarded("stream_write", |s| s.core.stream_write(h, sid, &data, fin)).unwrap_or(false))
    }

    fn open_bi(&mut self, h: usize) -> Option<u64> {
        self.guarded("open_bi", |s| s.core.open_bi(h)).flatten()
    }

    fn consume(&mut self, h: usize, sid: u64, n: u64) {
        self.core.consume(h, sid, n);
    }

    #[pyo3(signature = (h, sid, code=0))]
    fn reset_stream(&mut self, h: usize, sid: u64, code: u64) {
        self.guarded("reset_stream", |s| s.core.reset_stream(h, sid, code));
    }

    fn stream_backlog(&self, h: usize, sid: u64) -> usize {
        self.core.stream_backlog(h, sid)
    }

    fn set_retain(&mut self, h: usize, sid: u64, on: bool) {
        self.core.set_retain(h, sid, on);
    }

    fn stream_unacked<'py>(&self, py: Python<'py>, h: usize, sid: u64) -> Option<(u64, Bound<'py, PyBytes>)> {
        self.core.stream_unacked(h, sid).map(|(off, data)| (off, PyBytes::new(py, &data)))
    }

    fn ping(&mut self, h: usize) {
        self.core.ping(h);
    }

    fn rotate_cid(&mut self, h: usize) {
        self.guarded("rotate_cid", |s| s.core.rotate_cid(h));
    }

    fn current_dcid<'py>(&self, py: Python<'py>, h: usize) -> Option<Bound<'py, PyBytes>> {
        self.core.conn(h).map(|c| PyBytes::new(py, &c.last_dcid))
    }

    #[pyo3(signature = (h, now, code=0, reason=""))]
    fn close(&mut self, h: usize, now: f64, code: u64, reason: &str) {
        let at = self.instant(now);
        self.guarded("close", |s| s.core.close(h, at, code, reason));
    }

    fn abort(&mut self, h: usize, reason: &str) {
        self.core.abort(h, reason);
    }

    fn rtt(&self, h: usize) -> Option<f64> {
        self.core.conn(h).map(|c| c.rtt().as_secs_f64())
    }

    /// The caller's clock time of the peer's latest packet (any packet, ACKs included).
    fn last_received(&self, h: usize) -> Option<f64> {
        let at = self.core.conn(h)?.last_rx?;
        Some(self.seconds(at))
    }

    fn remote(&self, h: usize) -> Option<(String, u16)> {
        self.core.conn(h).map(|c| addr_tuple(crate::core::normalize(c.remote)))
    }

    fn connection_stats<'py>(&mut self, py: Python<'py>, h: usize) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        let c = self.conn_or_err(h)?;
        let st = c.qc.stats();
        d.set_item("rtt", c.qc.rtt().as_secs_f64())?;
        d.set_item("cwnd", c.qc.congestion_state().window())?;
        d.set_item("mtu", c.qc.current_mtu())?;
        d.set_item("sent_packets", st.path.sent_packets)?;
        d.set_item("lost_packets", st.path.lost_packets)?;
        d.set_item("lost_bytes", st.path.lost_bytes)?;
        d.set_item("udp_tx_bytes", st.udp_tx.bytes)?;
        d.set_item("udp_rx_bytes", st.udp_rx.bytes)?;
        d.set_item("datagrams_tx", st.frame_tx.datagram)?;
        d.set_item("datagrams_rx", st.frame_rx.datagram)?;
        d.set_item("dropped_oldest", c.dropped_oldest)?;
        d.set_item("oversize_refused", c.oversize_refused)?;
        d.set_item("connected", c.connected)?;
        Ok(d)
    }

    // ------------------------------------------------------------ splices
    /// The descriptor that becomes readable when a spliced socket needs service: add it to
    /// the event loop once and call `pump(now)` when it is readable.
    fn splice_fd(&mut self) -> PyResult<i32> {
        if self.splicer.is_none() {
            self.splicer = Some(SocketSplicer::new().map_err(|e| PyOSError::new_err(format!("epoll: {e}")))?);
        }
        Ok(self.splicer.as_ref().map(|s| s.fd()).unwrap_or(-1))
    }

    /// Splice the connected stream socket `fd` (duplicated: the caller keeps its own, and
    /// must neither read nor write it until the splice ends) to stream `sid` of `h`, both
    /// ways. `down` + `down_fin`: stream bytes (and FIN) the caller was handed and did not
    /// consume, written to the socket first; `up`: socket bytes the caller read, sent first.
    /// Returns the splice id; its end is an event (9, h, sid, id, sent, received, how, code).
    #[pyo3(signature = (h, sid, fd, down=None, down_fin=false, up=None))]
    fn splice(&mut self, h: usize, sid: u64, fd: i32, down: Option<&Bound<'_, PyAny>>, down_fin: bool,
              up: Option<&Bound<'_, PyAny>>) -> PyResult<u64> {
        self.splice_fd()?;
        let down = match down { Some(d) => bytes_of(d)?.into_owned(), None => Vec::new() };
        let up = match up { Some(d) => bytes_of(d)?.into_owned(), None => Vec::new() };
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(PyOSError::new_err(format!("dup: {}", std::io::Error::last_os_error())));
        }
        let owned = unsafe { OwnedFd::from_raw_fd(dup) };
        let r = self.guarded("splice", |s| {
            let Some(sp) = s.splicer.as_mut() else { return Err("no splicer".to_string()) };
            sp.add(&mut s.core, h, sid, owned, &down, down_fin, &up)
        });
        match r {
            Some(Ok(id)) => Ok(id),
            Some(Err(e)) => Err(PyValueError::new_err(e)),
            None => Err(PyRuntimeError::new_err("internal error in splice")),
        }
    }

    /// End a socket splice without an event: (sent, received), None if there is none.
    fn unsplice(&mut self, h: usize, sid: u64) -> Option<(u64, u64)> {
        self.guarded("unsplice", |s| {
            let sp = s.splicer.as_mut()?;
            sp.remove(&mut s.core, h, sid).map(|(_, sent, received)| (sent, received))
        })
        .flatten()
    }

    /// (sent into, received from) stream `sid` of `h` so far, while it is spliced (to a
    /// socket, or as a leg of a stream pair).
    fn splice_counts(&self, h: usize, sid: u64) -> Option<(u64, u64)> {
        self.splicer.as_ref().and_then(|s| s.counts(h, sid)).or_else(|| self.core.pair_counts(h, sid))
    }

    /// Join two streams of this endpoint both ways (the Intermediate's splice); the id, or
    /// None if either connection is not live or a stream is already spliced. Its end is one
    /// event per leg, (9, h, sid, id, sent, received, how, code).
    fn splice_streams(&mut self, h_a: usize, sid_a: u64, h_b: usize, sid_b: u64) -> Option<u64> {
        self.guarded("splice_streams", |s| s.core.splice_streams((h_a, sid_a), (h_b, sid_b))).flatten()
    }

    /// Service the spliced sockets epoll reported (and whatever that caused); the events.
    fn pump<'py>(&mut self, py: Python<'py>, now: f64) -> PyResult<Bound<'py, PyList>> {
        let at = self.instant(now);
        if let Some(sp) = self.splicer.as_mut() {
            sp.poll();
        }
        self.drive_guarded(at);
        self.transmit();
        self.events(py)
    }

    fn splice_count(&self) -> usize {
        self.splicer.as_ref().map(|s| s.len()).unwrap_or(0) + self.core.pairs.len()
    }

    // ------------------------------------------------------------ relay routes
    /// Relay 0x2F for `service` from `agent_h` natively to `connector_h` as 0x30 stamped with
    /// `agent_id`. False if either connection is gone or closing (nothing installed).
    fn route_agent(&mut self, agent_h: usize, service: &[u8], connector_h: usize, agent_id: u32) -> bool {
        self.core.route_agent(agent_h, service, connector_h, agent_id)
    }

    fn unroute_agent(&mut self, agent_h: usize, service: &[u8]) -> bool {
        self.core.unroute_agent(agent_h, service)
    }

    /// Relay 0x31 for `agent_id` from `connector_h` natively to `agent_h` (bare IP packet).
    fn route_reply(&mut self, connector_h: usize, agent_id: u32, agent_h: usize) -> bool {
        self.core.route_reply(connector_h, agent_id, agent_h)
    }

    fn unroute_reply(&mut self, connector_h: usize, agent_id: u32) -> bool {
        self.core.unroute_reply(connector_h, agent_id)
    }

    fn clear_routes(&mut self) {
        self.core.clear_routes();
    }

    /// Mesh routes (crate::meshroute): the Agent's member's half.
    fn route_mesh_out(&mut self, agent_h: usize, service: &[u8], link_h: usize, agent_ref: u32) -> bool {
        self.core.route_mesh_out(agent_h, service, link_h, agent_ref)
    }

    fn unroute_mesh_out(&mut self, agent_h: usize, service: &[u8]) -> bool {
        self.core.unroute_mesh_out(agent_h, service)
    }

    /// Mesh routes: the Connector's member's half.
    fn route_mesh_in(&mut self, peer_h: usize, agent_ref: u32, service: &[u8], connector_h: usize, own_id: u32) -> bool {
        self.core.route_mesh_in(peer_h, agent_ref, service, connector_h, own_id)
    }

    fn unroute_mesh_in(&mut self, peer_h: usize, agent_ref: u32, service: &[u8], connector_h: usize, own_id: u32) -> bool {
        self.core.unroute_mesh_in(peer_h, agent_ref, service, connector_h, own_id)
    }

    fn connection_count(&self) -> usize {
        self.core.handles().len()
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = &self.core.stats;
        let d = PyDict::new(py);
        for (k, v) in [
            ("datagrams_received", s.datagrams_received),
            ("bytes_received", s.bytes_received),
            ("datagrams_sent", s.datagrams_sent),
            ("bytes_sent", s.bytes_sent),
            ("malformed", s.malformed),
            ("non_quic", s.non_quic),
            ("unknown_cid", s.unknown_cid),
            ("stateless_resets_sent", s.stateless_resets_sent),
            ("version_negotiations", s.version_negotiations),
            ("endpoint_responses", s.endpoint_responses),
            ("oversize_refused", s.oversize_refused),
            ("datagrams_dropped_queue", s.datagrams_dropped_queue),
            ("handshakes_started", s.handshakes_started),
            ("retry_sent", s.retry_sent),
            ("retry_failures", s.retry_failures),
            ("refused", s.refused),
            ("ignored", s.ignored),
            ("accept_errors", s.accept_errors),
            ("stateless_resets_received", s.stateless_resets_received),
            ("panics", s.panics),
            ("socket_send_errors", s.socket_send_errors),
            ("socket_recv_errors", s.socket_recv_errors),
            ("relay_forwarded", s.relay_forwarded),
            ("relay_bytes", s.relay_bytes),
            ("relay_dropped_oversize", s.relay_dropped_oversize),
            ("relay_dropped_no_target", s.relay_dropped_no_target),
            ("relay_routes", self.core.routes.len() as u64),
        ] {
            d.set_item(k, v)?;
        }
        let routed = self.core.routes.mesh.routed();
        for (name, n) in crate::meshroute::DIRECTIONS.iter().zip(routed) {
            d.set_item(format!("mesh_{name}"), n)?;
        }
        Ok(d)
    }

    fn max_gso_segments(&self) -> usize {
        self.core.max_gso_segments
    }

    /// Fault injection: while on, nothing is sent and what arrives is discarded (a path that
    /// went silent), so tests can kill a path without touching the network.
    fn set_blackhole(&mut self, on: bool) {
        self.blackhole = on;
    }

    /// Stop using the socket (the caller closes its own descriptor).
    fn shutdown(&mut self) {
        self.closed = true;
        self.sock = None; // closes our duplicate of the descriptor
    }

    /// Test hook: panic inside the binding to prove the guard (counted, logged, survived).
    fn _panic_for_test(&mut self) -> bool {
        self.guarded("test", |_| panic!("deliberate test panic")).is_none()
    }
}

pub fn install_panic_hook() {
    // One line per panic instead of the default multi-line report; the guard counts it.
    std::panic::set_hook(Box::new(|info| {
        let loc = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_default();
        eprintln!("ztna native: panic at {loc}: {}", panic_text(info.payload()));
    }));
}
