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
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyList};

use crate::config::{self, Limits};
use crate::core::{Core, Ev, SendResult};
use crate::driver::{Driver, Io};
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

#[pyclass(module = "ztna._native")]
pub struct Endpoint {
    /// Everything a batch touches; the asyncio loop's calls and the driver thread (when one
    /// runs) take turns through this lock.
    pub(crate) io: Arc<Mutex<Io>>,
    anchor: (Instant, f64),
    driver: Option<Driver>,
}

fn events<'py>(py: Python<'py>, io: &mut Io) -> PyResult<Bound<'py, PyList>> {
    io.taken();
    let list = PyList::empty(py);
    for ev in io.core.events.drain(..) {
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
    if !list.is_empty() {
        io.hold();
    }
    Ok(list)
}

/// Lock `m`, which a native thread may hold for a while: wait with the interpreter lock
/// released (that thread may need the interpreter to finish); a poisoned lock is taken as
/// it is.
pub(crate) fn lock_detached<'a, T: Send>(py: Python<'_>, m: &'a Mutex<T>) -> MutexGuard<'a, T> {
    loop {
        match m.try_lock() {
            Ok(g) => return g,
            Err(TryLockError::Poisoned(e)) => return e.into_inner(),
            Err(TryLockError::WouldBlock) => {
                py.detach(|| drop(m.lock()));
            }
        }
    }
}

impl Endpoint {
    fn instant(&self, now: f64) -> Instant {
        self.anchor.0 + Duration::from_secs_f64((now - self.anchor.1).max(0.0))
    }

    fn seconds(&self, at: Instant) -> f64 {
        self.anchor.1 + at.saturating_duration_since(self.anchor.0).as_secs_f64()
    }

    /// The endpoint's state. While the driver thread holds it, wait with the interpreter
    /// lock released: the thread may need the interpreter (the ticket store) to finish.
    pub(crate) fn lock(&self, py: Python<'_>) -> MutexGuard<'_, Io> {
        lock_detached(py, &self.io)
    }

    /// The state and `now` on the caller's clock as an instant no earlier than any before.
    fn at<'a>(&'a self, py: Python<'_>, now: f64) -> (MutexGuard<'a, Io>, Instant) {
        let at = self.instant(now);
        let mut g = self.lock(py);
        let at = g.clamp(at);
        (g, at)
    }

    fn guarded<T>(&self, py: Python<'_>, f: impl FnOnce(&mut Io) -> T) -> Option<T> {
        self.lock(py).guarded(f)
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
        let v6 = matches!(sock.local_addr().map_err(|e| PyOSError::new_err(e.to_string()))?, SocketAddr::V6(_));
        let ep_cfg = config::endpoint(reset_key, udp_payload).map_err(cfg_err)?;
        let core = Core::new(Arc::new(ep_cfg), server.map(|s| s.cfg.clone()), v6);
        let io = Io::new(core, sock, recv_batch, udp_payload).map_err(|e| PyOSError::new_err(e.to_string()))?;
        Ok(Self { io: Arc::new(Mutex::new(io)), anchor: (Instant::now(), now), driver: None })
    }

    /// Hand the socket's reads and the connection timers to a native thread. Returns the
    /// descriptor to watch: readable when a batch left events, then call `notified(now)`.
    /// After that the owner calls `rearm()` (not a timer) whenever it changed something.
    fn start_thread(&mut self) -> PyResult<i32> {
        if let Some(d) = self.driver.as_ref() {
            return Ok(d.notify_fd());
        }
        let d = Driver::spawn(self.io.clone()).map_err(|e| PyOSError::new_err(format!("driver thread: {e}")))?;
        let fd = d.notify_fd();
        self.driver = Some(d);
        Ok(fd)
    }

    /// True while a driver thread runs this endpoint.
    fn threaded(&self) -> bool {
        self.driver.as_ref().is_some_and(|d| d.running())
    }

    /// The driver thread's wake-ups so far (0 without one).
    fn thread_wakeups(&self) -> u64 {
        self.driver.as_ref().map_or(0, |d| d.stats.wakeups.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// The notify descriptor was readable: the events the driver thread left (and whatever
    /// they need driven).
    fn notified<'py>(&self, py: Python<'py>, now: f64) -> PyResult<Bound<'py, PyList>> {
        if let Some(d) = self.driver.as_ref() {
            d.clear_notify();
        }
        self.drive(py, now)
    }

    /// Wake the driver thread if what the owner did needs it sooner than it planned.
    fn rearm(&self, py: Python<'_>) {
        self.lock(py).rearm();
    }

    /// Read everything the socket has (up to `recv_batch` datagrams), process it, send what
    /// it caused; the events of the batch.
    fn recv<'py>(&self, py: Python<'py>, now: f64) -> PyResult<Bound<'py, PyList>> {
        let (mut s, at) = self.at(py, now);
        if !s.closed && s.sock.is_some() {
            s.receive(at);
            s.drive_guarded(at);
            s.transmit();
        }
        events(py, &mut s)
    }

    /// Run the connection timers that are due.
    fn timeout<'py>(&self, py: Python<'py>, now: f64) -> PyResult<Bound<'py, PyList>> {
        let (mut s, at) = self.at(py, now);
        s.guarded(|s| s.core.handle_timeouts(at));
        s.drive_guarded(at);
        s.transmit();
        events(py, &mut s)
    }

    /// Process what the owner queued (writes, datagrams, consumed credit, closes).
    fn drive<'py>(&self, py: Python<'py>, now: f64) -> PyResult<Bound<'py, PyList>> {
        let (mut s, at) = self.at(py, now);
        s.drive_guarded(at);
        s.transmit();
        events(py, &mut s)
    }

    /// True while work is queued that the last call left for a further `drive` (a burst
    /// longer than one call's rounds); False when a call finished everything it started.
    fn busy(&self, py: Python<'_>) -> bool {
        self.lock(py).busy()
    }

    fn next_timeout(&self, py: Python<'_>) -> Option<f64> {
        let at = self.lock(py).next_timeout()?;
        Some(self.seconds(at))
    }

    fn set_server_config(&self, py: Python<'_>, server: PyRef<'_, ServerTls>) {
        self.lock(py).core.ep.set_server_config(Some(server.cfg.clone()));
    }

    fn accept(&self, py: Python<'_>, incoming: u64, now: f64) -> Option<usize> {
        let (mut s, at) = self.at(py, now);
        s.guarded(|s| s.core.accept(incoming, at)).flatten()
    }

    fn retry(&self, py: Python<'_>, incoming: u64) -> bool {
        self.guarded(py, |s| s.core.retry(incoming)).unwrap_or(false)
    }

    fn refuse(&self, py: Python<'_>, incoming: u64) {
        self.guarded(py, |s| s.core.refuse(incoming));
    }

    fn ignore(&self, py: Python<'_>, incoming: u64) {
        self.guarded(py, |s| s.core.ignore(incoming));
    }

    fn ignore_pending(&self, py: Python<'_>) {
        self.guarded(py, |s| s.core.ignore_pending());
    }

    /// Start a client connection: (handle, whether 0-RTT data can be sent).
    fn connect(&self, py: Python<'_>, tls: PyRef<'_, ClientTls>, host: &str, port: u16, server_name: &str,
               now: f64) -> PyResult<(usize, bool)> {
        let remote = parse_addr(host, port)?;
        let cfg = tls.cfg.clone();
        let (mut s, at) = self.at(py, now);
        match s.guarded(|s| s.core.connect(at, cfg, remote, server_name)) {
            Some(Ok(r)) => Ok(r),
            Some(Err(e)) => Err(PyValueError::new_err(format!("cannot connect to {remote}: {e}"))),
            None => Err(PyRuntimeError::new_err("internal error in connect")),
        }
    }

    /// One non-QUIC datagram (P2P probes share the socket).
    fn send_raw(&self, py: Python<'_>, data: &Bound<'_, PyAny>, host: &str, port: u16) -> PyResult<bool> {
        let data = bytes_of(data)?;
        let addr = parse_addr(host, port)?;
        let mut s = self.lock(py);
        let dst = crate::core::to_wire_addr(s.core.v6_socket, addr);
        Ok(s.send_raw(&data, dst))
    }

    // ------------------------------------------------------------ per connection
    /// 0 queued, 1 queued after dropping the oldest, 2 connection closed, 3 too large.
    fn send_datagram(&self, py: Python<'_>, h: usize, data: &Bound<'_, PyAny>) -> PyResult<u8> {
        let data = bytes_of(data)?;
        Ok(match self.guarded(py, |s| s.core.send_datagram(h, &data)) {
            Some(SendResult::Queued) => 0,
            Some(SendResult::QueuedDroppedOldest) => 1,
            Some(SendResult::Closed) | None => 2,
            Some(SendResult::TooLarge(_)) => 3,
        })
    }

    fn max_datagram_payload(&self, py: Python<'_>, h: usize) -> usize {
        self.lock(py).core.conn_mut(h).map(|c| c.max_datagram_payload()).unwrap_or(0)
    }

    fn datagram_budget(&self, py: Python<'_>, h: usize) -> usize {
        self.lock(py).core.datagram_budget(h)
    }

    #[pyo3(signature = (h, sid, data, fin=false))]
    fn stream_write(&self, py: Python<'_>, h: usize, sid: u64, data: &Bound<'_, PyAny>, fin: bool) -> PyResult<bool> {
        let data = bytes_of(data)?;
        Ok(self.guarded(py, |s| s.core.stream_write(h, sid, &data, fin)).unwrap_or(false))
    }

    fn open_bi(&self, py: Python<'_>, h: usize) -> Option<u64> {
        self.guarded(py, |s| s.core.open_bi(h)).flatten()
    }

    fn consume(&self, py: Python<'_>, h: usize, sid: u64, n: u64) {
        self.lock(py).core.consume(h, sid, n);
    }

    #[pyo3(signature = (h, sid, code=0))]
    fn reset_stream(&self, py: Python<'_>, h: usize, sid: u64, code: u64) {
        self.guarded(py, |s| s.core.reset_stream(h, sid, code));
    }

    fn stream_backlog(&self, py: Python<'_>, h: usize, sid: u64) -> usize {
        self.lock(py).core.stream_backlog(h, sid)
    }

    fn set_retain(&self, py: Python<'_>, h: usize, sid: u64, on: bool) {
        self.lock(py).core.set_retain(h, sid, on);
    }

    fn stream_unacked<'py>(&self, py: Python<'py>, h: usize, sid: u64) -> Option<(u64, Bound<'py, PyBytes>)> {
        let got = self.lock(py).core.stream_unacked(h, sid);
        got.map(|(off, data)| (off, PyBytes::new(py, &data)))
    }

    fn ping(&self, py: Python<'_>, h: usize) {
        self.lock(py).core.ping(h);
    }

    fn rotate_cid(&self, py: Python<'_>, h: usize) {
        self.guarded(py, |s| s.core.rotate_cid(h));
    }

    fn current_dcid<'py>(&self, py: Python<'py>, h: usize) -> Option<Bound<'py, PyBytes>> {
        let s = self.lock(py);
        s.core.conn(h).map(|c| PyBytes::new(py, &c.last_dcid))
    }

    #[pyo3(signature = (h, now, code=0, reason=""))]
    fn close(&self, py: Python<'_>, h: usize, now: f64, code: u64, reason: &str) {
        let (mut s, at) = self.at(py, now);
        s.guarded(|s| s.core.close(h, at, code, reason));
    }

    fn abort(&self, py: Python<'_>, h: usize, reason: &str) {
        self.lock(py).core.abort(h, reason);
    }

    fn rtt(&self, py: Python<'_>, h: usize) -> Option<f64> {
        self.lock(py).core.conn(h).map(|c| c.rtt().as_secs_f64())
    }

    /// The caller's clock time of the peer's latest packet (any packet, ACKs included).
    fn last_received(&self, py: Python<'_>, h: usize) -> Option<f64> {
        let at = self.lock(py).core.conn(h)?.last_rx?;
        Some(self.seconds(at))
    }

    fn remote(&self, py: Python<'_>, h: usize) -> Option<(String, u16)> {
        self.lock(py).core.conn(h).map(|c| addr_tuple(crate::core::normalize(c.remote)))
    }

    fn connection_stats<'py>(&self, py: Python<'py>, h: usize) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        let mut s = self.lock(py);
        let c = s.core.conn_mut(h).ok_or_else(|| PyValueError::new_err("no such connection"))?;
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
    fn splice_fd(&self, py: Python<'_>) -> PyResult<i32> {
        let mut s = self.lock(py);
        let sp = s.splicer().map_err(|e| PyOSError::new_err(format!("epoll: {e}")))?;
        Ok(sp.fd())
    }

    /// Splice the connected stream socket `fd` (duplicated: the caller keeps its own, and
    /// must neither read nor write it until the splice ends) to stream `sid` of `h`, both
    /// ways. `down` + `down_fin`: stream bytes (and FIN) the caller was handed and did not
    /// consume, written to the socket first; `up`: socket bytes the caller read, sent first.
    /// Returns the splice id; its end is an event (9, h, sid, id, sent, received, how, code).
    #[pyo3(signature = (h, sid, fd, down=None, down_fin=false, up=None))]
    fn splice(&self, py: Python<'_>, h: usize, sid: u64, fd: i32, down: Option<&Bound<'_, PyAny>>, down_fin: bool,
              up: Option<&Bound<'_, PyAny>>) -> PyResult<u64> {
        self.splice_fd(py)?;
        let down = match down { Some(d) => bytes_of(d)?.into_owned(), None => Vec::new() };
        let up = match up { Some(d) => bytes_of(d)?.into_owned(), None => Vec::new() };
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(PyOSError::new_err(format!("dup: {}", std::io::Error::last_os_error())));
        }
        let owned = unsafe { OwnedFd::from_raw_fd(dup) };
        let r = self.guarded(py, |s| {
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
    fn unsplice(&self, py: Python<'_>, h: usize, sid: u64) -> Option<(u64, u64)> {
        self.guarded(py, |s| {
            let sp = s.splicer.as_mut()?;
            sp.remove(&mut s.core, h, sid).map(|(_, sent, received)| (sent, received))
        })
        .flatten()
    }

    /// (sent into, received from) stream `sid` of `h` so far, while it is spliced (to a
    /// socket, or as a leg of a stream pair).
    fn splice_counts(&self, py: Python<'_>, h: usize, sid: u64) -> Option<(u64, u64)> {
        let s = self.lock(py);
        s.splicer.as_ref().and_then(|sp| sp.counts(h, sid)).or_else(|| s.core.pair_counts(h, sid))
    }

    /// Join two streams of this endpoint both ways (the Intermediate's splice); the id, or
    /// None if either connection is not live or a stream is already spliced. Its end is one
    /// event per leg, (9, h, sid, id, sent, received, how, code).
    fn splice_streams(&self, py: Python<'_>, h_a: usize, sid_a: u64, h_b: usize, sid_b: u64) -> Option<u64> {
        self.guarded(py, |s| s.core.splice_streams((h_a, sid_a), (h_b, sid_b))).flatten()
    }

    /// Service the spliced sockets epoll reported (and whatever that caused); the events.
    fn pump<'py>(&self, py: Python<'py>, now: f64) -> PyResult<Bound<'py, PyList>> {
        let (mut s, at) = self.at(py, now);
        if let Some(sp) = s.splicer.as_mut() {
            sp.poll();
        }
        s.drive_guarded(at);
        s.transmit();
        events(py, &mut s)
    }

    fn splice_count(&self, py: Python<'_>) -> usize {
        let s = self.lock(py);
        s.splicer.as_ref().map(|s| s.len()).unwrap_or(0) + s.core.pairs.len()
    }

    // ------------------------------------------------------------ relay routes
    /// Relay 0x2F for `service` from `agent_h` natively to `connector_h` as 0x30 stamped with
    /// `agent_id`. False if either connection is gone or closing (nothing installed).
    fn route_agent(&self, py: Python<'_>, agent_h: usize, service: &[u8], connector_h: usize, agent_id: u32) -> bool {
        self.lock(py).core.route_agent(agent_h, service, connector_h, agent_id)
    }

    fn unroute_agent(&self, py: Python<'_>, agent_h: usize, service: &[u8]) -> bool {
        self.lock(py).core.unroute_agent(agent_h, service)
    }

    /// Relay 0x31 for `agent_id` from `connector_h` natively to `agent_h` (bare IP packet).
    fn route_reply(&self, py: Python<'_>, connector_h: usize, agent_id: u32, agent_h: usize) -> bool {
        self.lock(py).core.route_reply(connector_h, agent_id, agent_h)
    }

    fn unroute_reply(&self, py: Python<'_>, connector_h: usize, agent_id: u32) -> bool {
        self.lock(py).core.unroute_reply(connector_h, agent_id)
    }

    fn clear_routes(&self, py: Python<'_>) {
        self.lock(py).core.clear_routes();
    }

    /// Mesh routes (crate::meshroute): the Agent's member's half.
    fn route_mesh_out(&self, py: Python<'_>, agent_h: usize, service: &[u8], link_h: usize, agent_ref: u32) -> bool {
        self.lock(py).core.route_mesh_out(agent_h, service, link_h, agent_ref)
    }

    fn unroute_mesh_out(&self, py: Python<'_>, agent_h: usize, service: &[u8]) -> bool {
        self.lock(py).core.unroute_mesh_out(agent_h, service)
    }

    /// Mesh routes: the Connector's member's half.
    #[allow(clippy::too_many_arguments)]
    fn route_mesh_in(&self, py: Python<'_>, peer_h: usize, agent_ref: u32, service: &[u8], connector_h: usize, own_id: u32) -> bool {
        self.lock(py).core.route_mesh_in(peer_h, agent_ref, service, connector_h, own_id)
    }

    #[allow(clippy::too_many_arguments)]
    fn unroute_mesh_in(&self, py: Python<'_>, peer_h: usize, agent_ref: u32, service: &[u8], connector_h: usize, own_id: u32) -> bool {
        self.lock(py).core.unroute_mesh_in(peer_h, agent_ref, service, connector_h, own_id)
    }
    fn connection_count(&self, py: Python<'_>) -> usize {
        self.lock(py).core.handles().len()
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let g = self.lock(py);
        let s = &g.core.stats;
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
            ("splice_claimed", s.splice_claimed),
            ("owner_notified", s.owner_notified),
            ("relay_routes", g.core.routes.len() as u64),
        ] {
            d.set_item(k, v)?;
        }
        let routed = g.core.routes.mesh.routed();
        for (name, n) in crate::meshroute::DIRECTIONS.iter().zip(routed) {
            d.set_item(format!("mesh_{name}"), n)?;
        }
        Ok(d)
    }

    fn max_gso_segments(&self, py: Python<'_>) -> usize {
        self.lock(py).core.max_gso_segments
    }

    /// Fault injection: while on, nothing is sent and what arrives is discarded (a path that
    /// went silent), so tests can kill a path without touching the network.
    fn set_blackhole(&self, py: Python<'_>, on: bool) {
        self.lock(py).blackhole = on;
    }

    /// Stop using the socket (the caller closes its own descriptor); a driver thread ends
    /// first.
    fn shutdown(&mut self, py: Python<'_>) {
        if let Some(mut d) = self.driver.take() {
            d.stop();
            py.detach(|| d.join());
        }
        let mut s = self.lock(py);
        s.closed = true;
        s.sock = None; // closes our duplicate of the descriptor
    }

    /// Test hook: panic inside the binding to prove the guard (counted, logged, survived).
    fn _panic_for_test(&self, py: Python<'_>) -> bool {
        self.guarded(py, |_| panic!("deliberate test panic")).is_none()
    }
}


pub fn install_panic_hook() {
    // One line per panic instead of the default multi-line report; the guard counts it.
    std::panic::set_hook(Box::new(|info| {
        let loc = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_default();
        eprintln!("ztna native: panic at {loc}: {}", panic_text(info.payload()));
    }));
}
