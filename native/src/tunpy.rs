//! The Python binding of the TUN pump: `ztna._native.TunPump` owns a duplicate of the TUN fd.
//!
//! Up-link: a batch of packets is read, each one looked up in the table (`tunpump::Table`)
//! and the ones it can place are queued on their connection's endpoint as DATAGRAMs (header
//! + packet), all without Python. Either the asyncio loop calls `read()` when the fd is
//! readable (it returns the packets Python must handle and the services that sent, and
//! Python flushes each endpoint once), or, after `start_thread()`, a native reader thread
//! waits on the fd, sends, and drives those endpoints itself (`Io::drive_external`), so a
//! packet leaves in the thread's wake-up; it leaves Python only what Python must see
//! (`take()`, signalled on a notify descriptor).
//!
//! Down-link: every endpoint attached to the pump has a tap in its core (`TunTap`) that
//! queues the bare IP packets of its delivering connections, and a drain that writes them
//! into the TUN fd after each batch the endpoint processes; they are counted per service.
//! Connections that go away leave the table at once.
//!
//! Locks: the pump's state, the reader, and each endpoint's `Io` have their own. An
//! endpoint's batch takes its `Io` and then (in the drain) the pump's; the reader therefore
//! never holds the pump's lock while it takes an endpoint's: it reads and looks up under
//! the pump's lock, lets go, and then queues per endpoint. Panics are caught and counted
//! like the rest of the binding.

use std::os::fd::{AsRawFd, OwnedFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};

use crate::core::SendResult;
use crate::driver::{self, clear, eventfd, signal, Drain, Io};
use crate::py::{lock_detached, Endpoint};
use crate::tunpump::{lock, Pump, SharedPump, Target, TunTap, Up};

const MAX_PACKET: usize = 65535;

/// Our duplicate of the TUN fd (-1 once closed), shared with the endpoints' drains.
type Fd = Arc<AtomicI32>;

fn write_all(pump: &mut Pump, fd: i32, packet: &[u8]) {
    if fd < 0 {
        pump.table.stats.dropped_write += 1;
        return;
    }
    loop {
        let n = unsafe { libc::write(fd, packet.as_ptr().cast(), packet.len()) };
        if n >= 0 {
            pump.table.stats.written += 1;
            return;
        }
        if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            pump.table.stats.dropped_write += 1;
            return;
        }
    }
}

/// Run by an endpoint after each batch: the packets its connections delivered go into the fd.
struct TunDrain {
    pump: SharedPump,
    fd: Fd,
}

impl Drain for TunDrain {
    fn drain(&mut self) {
        let mut pump = lock(&self.pump);
        if pump.pending.is_empty() {
            return;
        }
        let fd = self.fd.load(Ordering::Relaxed);
        let pending = std::mem::take(&mut pump.pending);
        for packet in &pending {
            write_all(&mut pump, fd, packet);
        }
        // Keep the allocation for the next batch.
        pump.pending = pending;
        pump.pending.clear();
    }
}

/// The up-link half: reads the TUN device and queues what the table places on its
/// connection. Used by the owner's `read()` or, once started, by the reader thread; the
/// endpoints' states are reached through their own locks, never while the pump's is held
/// (the endpoints' drains take the pump's lock inside theirs).
struct Reader {
    shared: SharedPump,
    fd: Fd,
    ios: Vec<Arc<Mutex<Io>>>,
    buf: Vec<u8>,
    read_batch: usize,
    /// (target, service, header length, header + packet) of this batch; the buffers are
    /// kept for the next one.
    sends: Vec<(Target, usize, usize, Vec<u8>)>,
    spare: Vec<Vec<u8>>,
}

#[derive(Default)]
struct Batch {
    /// Packets for Python.
    up: Vec<Vec<u8>>,
    /// Services that sent natively.
    touched: Vec<usize>,
    /// Whether anything was read (false: the device had nothing).
    read: bool,
}

impl Reader {
    /// Read a batch and queue it; with `drive`, each endpoint that got packets is driven and
    /// sends at once (the reader thread), else the owner flushes them.
    fn batch(&mut self, drive: bool, out: &mut Batch) {
        let fd = self.fd.load(Ordering::Relaxed);
        if fd < 0 {
            return;
        }
        {
            let mut st = lock(&self.shared);
            for _ in 0..self.read_batch {
                let n = unsafe { libc::read(fd, self.buf.as_mut_ptr().cast(), self.buf.len()) };
                if n < 0 {
                    match std::io::Error::last_os_error().kind() {
                        std::io::ErrorKind::Interrupted => continue,
                        std::io::ErrorKind::WouldBlock => break,
                        _ => {
                            st.table.stats.read_errors += 1;
                            break;
                        }
                    }
                }
                if n == 0 {
                    break;
                }
                out.read = true;
                let packet = &self.buf[..n as usize];
                match st.table.up(packet) {
                    Up::Send { svc, target } if target.slot < self.ios.len() => {
                        let mut d = self.spare.pop().unwrap_or_default();
                        d.clear();
                        let header = st.table.header(svc);
                        d.extend_from_slice(header);
                        d.extend_from_slice(packet);
                        self.sends.push((target, svc, header.len(), d));
                    }
                    _ => out.up.push(packet.to_vec()),
                }
            }
        }
        if self.sends.is_empty() {
            return;
        }
        let mut sent: Vec<(usize, usize)> = Vec::new();
        let mut refused: Vec<Vec<u8>> = Vec::new();
        let mut slots: Vec<usize> = self.sends.iter().map(|s| s.0.slot).collect();
        slots.sort_unstable();
        slots.dedup();
        for slot in slots {
            let mut io = driver::lock(&self.ios[slot]);
            for (target, svc, hlen, d) in self.sends.iter().filter(|s| s.0.slot == slot) {
                match io.core.send_datagram(target.h, d) {
                    SendResult::Queued | SendResult::QueuedDroppedOldest => sent.push((*svc, d.len() - hlen)),
                    _ => refused.push(d[*hlen..].to_vec()),
                }
            }
            if drive {
                io.drive_external();
            }
        }
        for (_, _, _, d) in self.sends.drain(..) {
            self.spare.push(d);
        }
        let mut st = lock(&self.shared);
        for (svc, len) in sent {
            st.table.sent(svc, len);
            if !out.touched.contains(&svc) {
                out.touched.push(svc);
            }
        }
        for packet in refused {
            // Closed or too large for this connection right now: Python decides.
            st.table.stats.send_refused += 1;
            st.table.stats.to_python += 1;
            out.up.push(packet);
        }
    }
}

/// What the reader thread left for Python.
#[derive(Default)]
struct Left {
    up: Vec<Vec<u8>>,
    touched: Vec<usize>,
    /// When Python was last told (touched services alone wake it at most every
    /// `TOUCH_EVERY`: they only keep the path's liveness bookkeeping fresh).
    told: Option<Instant>,
    signalled: bool,
    /// Times Python was woken.
    notified: u64,
}

const TOUCH_EVERY: Duration = Duration::from_millis(50);

struct ReaderThread {
    stop: Arc<AtomicBool>,
    wake: Arc<OwnedFd>,
    notify: Arc<OwnedFd>,
    left: Arc<Mutex<Left>>,
    handle: Option<JoinHandle<()>>,
}

fn lock_reader(r: &Mutex<Reader>) -> MutexGuard<'_, Reader> {
    r.lock().unwrap_or_else(|e| e.into_inner())
}

fn lock_left(l: &Mutex<Left>) -> MutexGuard<'_, Left> {
    l.lock().unwrap_or_else(|e| e.into_inner())
}

impl ReaderThread {
    fn spawn(reader: Arc<Mutex<Reader>>, panics: Arc<AtomicU64>) -> std::io::Result<Self> {
        let wake = Arc::new(eventfd()?);
        let notify = Arc::new(eventfd()?);
        let stop = Arc::new(AtomicBool::new(false));
        let left = Arc::new(Mutex::new(Left::default()));
        let tun = lock_reader(&reader).fd.load(Ordering::Relaxed);
        let (t_stop, t_wake, t_notify, t_left) = (stop.clone(), wake.clone(), notify.clone(), left.clone());
        let handle = std::thread::Builder::new().name("ztna-tun".into()).spawn(move || {
            let mut fds = [
                libc::pollfd { fd: tun, events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: t_wake.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            ];
            let mut batch = Batch::default();
            loop {
                if t_stop.load(Ordering::Acquire) {
                    break;
                }
                fds[0].revents = 0;
                fds[1].revents = 0;
                let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
                if n < 0 {
                    if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                        continue;
                    }
                    break;
                }
                if fds[1].revents != 0 {
                    clear(t_wake.as_raw_fd());
                    continue;
                }
                if fds[0].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 && fds[0].revents & libc::POLLIN == 0 {
                    break; // the device is gone
                }
                batch.up.clear();
                batch.touched.clear();
                batch.read = false;
                let r = catch_unwind(AssertUnwindSafe(|| lock_reader(&reader).batch(true, &mut batch)));
                if r.is_err() {
                    panics.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if batch.up.is_empty() && batch.touched.is_empty() {
                    continue;
                }
                let mut l = lock_left(&t_left);
                l.up.append(&mut batch.up);
                for svc in batch.touched.drain(..) {
                    if !l.touched.contains(&svc) {
                        l.touched.push(svc);
                    }
                }
                let now = Instant::now();
                let due = !l.up.is_empty() || l.told.is_none_or(|t| now.duration_since(t) >= TOUCH_EVERY);
                if due && !l.signalled {
                    l.signalled = true;
                    l.told = Some(now);
                    l.notified += 1;
                    signal(&t_notify);
                }
            }
        })?;
        Ok(Self { stop, wake, notify, left, handle: Some(handle) })
    }

    fn join(&mut self) {
        self.stop.store(true, Ordering::Release);
        signal(&self.wake);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[pyclass(module = "ztna._native")]
pub struct TunPump {
    shared: SharedPump,
    fd: Fd,
    panics: Arc<AtomicU64>,
    endpoints: Vec<Py<Endpoint>>,
    reader: Arc<Mutex<Reader>>,
    thread: Option<ReaderThread>,
}

impl TunPump {
    fn endpoint<'py>(&self, py: Python<'py>, slot: usize) -> PyResult<PyRef<'py, Endpoint>> {
        let ep = self.endpoints.get(slot).ok_or_else(|| PyValueError::new_err("no such endpoint slot"))?;
        Ok(ep.bind(py).try_borrow()?)
    }

    fn reader<'a>(&'a self, py: Python<'_>) -> MutexGuard<'a, Reader> {
        // The reader thread may hold it for a batch.
        lock_detached(py, &self.reader)
    }
}

#[pymethods]
impl TunPump {
    /// `fd`: the TUN device (IFF_TUN | IFF_NO_PI, non-blocking); duplicated, the caller keeps
    /// and closes its own. `read_batch`: packets read per `read()` at most.
    #[new]
    #[pyo3(signature = (fd, *, read_batch=256))]
    fn new(fd: i32, read_batch: usize) -> PyResult<Self> {
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(PyOSError::new_err(format!("dup: {}", std::io::Error::last_os_error())));
        }
        let shared = SharedPump::default();
        let fd = Arc::new(AtomicI32::new(dup));
        let reader = Reader {
            shared: shared.clone(), fd: fd.clone(), ios: Vec::new(), buf: vec![0u8; MAX_PACKET],
            read_batch: read_batch.max(1), sends: Vec::new(), spare: Vec::new(),
        };
        Ok(Self {
            shared,
            fd,
            panics: Arc::new(AtomicU64::new(0)),
            endpoints: Vec::new(),
            reader: Arc::new(Mutex::new(reader)),
            thread: None,
        })
    }

    /// A service: the header its packets carry and its addresses, each (packed, prefix
    /// length). Returns its index.
    fn add_service(&mut self, header: &[u8], addresses: Vec<(Vec<u8>, u8)>) -> PyResult<usize> {
        lock(&self.shared).table.add_service(header, &addresses).map_err(PyValueError::new_err)
    }

    /// Attach an endpoint (a socket): its delivering connections write into the TUN device.
    /// Returns its slot; attaching the same endpoint again returns the same slot.
    fn add_endpoint(&mut self, endpoint: Bound<'_, Endpoint>) -> PyResult<usize> {
        if let Some(slot) = self.endpoints.iter().position(|e| e.bind(endpoint.py()).is(&endpoint)) {
            return Ok(slot);
        }
        let slot = self.endpoints.len();
        let ep = endpoint.try_borrow()?;
        let mut io = ep.lock(endpoint.py());
        io.core.taps.push(Box::new(TunTap { pump: self.shared.clone(), slot }));
        io.drains.push(Box::new(TunDrain { pump: self.shared.clone(), fd: self.fd.clone() }));
        drop(io);
        let arc = ep.io.clone();
        drop(ep);
        self.reader(endpoint.py()).ios.push(arc);
        self.endpoints.push(endpoint.unbind());
        Ok(slot)
    }

    /// Service `svc` goes natively on connection `h` of endpoint `slot`, which also delivers
    /// its bare IP packets to the TUN device. False if the connection is not alive.
    fn route(&mut self, py: Python<'_>, svc: usize, slot: usize, h: usize) -> PyResult<bool> {
        if !self.endpoint(py, slot)?.lock(py).core.live(h) {
            return Ok(false);
        }
        let mut pump = lock(&self.shared);
        pump.deliver(slot, h, true);
        Ok(pump.table.set_target(svc, Some(Target { slot, h })))
    }

    /// Service `svc`'s packets go up to Python again.
    fn unroute(&mut self, svc: usize) -> bool {
        lock(&self.shared).table.set_target(svc, None)
    }

    /// (slot, handle) service `svc` goes on natively, or None.
    fn target(&self, svc: usize) -> Option<(usize, usize)> {
        lock(&self.shared).table.target(svc).map(|t| (t.slot, t.h))
    }

    /// Bare IP packets arriving on connection `h` of endpoint `slot` go to the TUN device
    /// (on) or to Python as DATAGRAM events (off).
    fn deliver(&mut self, py: Python<'_>, slot: usize, h: usize, on: bool) -> PyResult<bool> {
        let on = on && self.endpoint(py, slot)?.lock(py).core.live(h);
        lock(&self.shared).deliver(slot, h, on);
        Ok(on)
    }

    /// Largest IP packet the tunnel carries (0: no limit); larger ones go up to Python.
    fn set_max_packet(&mut self, n: usize) {
        lock(&self.shared).table.max_packet = n;
    }

    /// While on, every TCP segment goes up to Python (which answers with resets on exit).
    fn set_resetting(&mut self, on: bool) {
        lock(&self.shared).table.resetting = on;
    }

    /// Down-link destinations Python keeps for itself (packed addresses).
    fn set_claimed(&mut self, addresses: Vec<Vec<u8>>) {
        lock(&self.shared).table.claimed = addresses;
    }

    /// Read what the TUN device has (up to `read_batch` packets) and send what the table
    /// places: (packets for Python, indices of the services that sent natively).
    fn read<'py>(&mut self, py: Python<'py>) -> PyResult<(Bound<'py, PyList>, Vec<usize>)> {
        let mut batch = Batch::default();
        let reader = &self.reader;
        let ok = py.detach(|| catch_unwind(AssertUnwindSafe(|| lock_reader(reader).batch(false, &mut batch))).is_ok());
        if !ok {
            self.panics.fetch_add(1, Ordering::Relaxed);
        }
        let up: Vec<_> = batch.up.iter().map(|p| PyBytes::new(py, p)).collect();
        Ok((PyList::new(py, up)?, batch.touched))
    }

    /// Hand the up-link to a native thread: it reads the device, sends what the table
    /// places and drives those endpoints itself. Returns the descriptor to watch: readable
    /// when it left packets for Python (or services that sent; at most every 50 ms), then
    /// call `take()`. The owner no longer calls `read()` or flushes after it.
    fn start_thread(&mut self) -> PyResult<i32> {
        if let Some(t) = self.thread.as_ref() {
            return Ok(t.notify.as_raw_fd());
        }
        let t = ReaderThread::spawn(self.reader.clone(), self.panics.clone())
            .map_err(|e| PyOSError::new_err(format!("TUN reader thread: {e}")))?;
        let fd = t.notify.as_raw_fd();
        self.thread = Some(t);
        Ok(fd)
    }

    fn threaded(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| t.handle.as_ref().is_some_and(|h| !h.is_finished()))
    }

    /// What the reader thread left: (packets for Python, services that sent natively).
    fn take<'py>(&mut self, py: Python<'py>) -> PyResult<(Bound<'py, PyList>, Vec<usize>)> {
        let Some(t) = self.thread.as_ref() else { return Ok((PyList::empty(py), Vec::new())) };
        clear(t.notify.as_raw_fd());
        let (up, touched) = {
            let mut l = lock_left(&t.left);
            l.signalled = false;
            (std::mem::take(&mut l.up), std::mem::take(&mut l.touched))
        };
        let up: Vec<_> = up.iter().map(|p| PyBytes::new(py, p)).collect();
        Ok((PyList::new(py, up)?, touched))
    }

    /// Per service (in index order): (tx packets, tx bytes, rx packets, rx bytes) moved
    /// natively since the start (IP packet bytes, headers not counted).
    fn counters(&self) -> Vec<(u64, u64, u64, u64)> {
        let st = lock(&self.shared);
        (0..st.table.services())
            .map(|i| {
                let c = st.table.counters(i);
                (c.tx_packets, c.tx_bytes, c.rx_packets, c.rx_bytes)
            })
            .collect()
    }

    /// TCP flows sent natively: (version, app address, virtual address, app port, virtual
    /// port, last ack), oldest first.
    fn tcp_flows<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let flows = lock(&self.shared).table.tcp_flows();
        let items: Vec<_> = flows
            .into_iter()
            .map(|(v, app, vip, ap, vp, ack)| (v, PyBytes::new(py, &app), PyBytes::new(py, &vip), ap, vp, ack))
            .collect();
        PyList::new(py, items)
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let st = lock(&self.shared);
        let s = &st.table.stats;
        let d = PyDict::new(py);
        for (k, v) in [
            ("read_packets", s.read_packets),
            ("to_python", s.to_python),
            ("written", s.written),
            ("dropped_write", s.dropped_write),
            ("read_errors", s.read_errors),
            ("send_refused", s.send_refused),
            ("rx_unknown_source", s.rx_unknown_source),
            ("claimed_down", s.claimed_down),
            ("panics", self.panics.load(Ordering::Relaxed)),
            ("thread_notified", self.thread.as_ref().map_or(0, |t| lock_left(&t.left).notified)),
        ] {
            d.set_item(k, v)?;
        }
        Ok(d)
    }

    /// Stop: nothing is delivered to the TUN device any more (every connection's packets go
    /// to Python again), and our duplicate of the fd is closed.
    fn close(&mut self, py: Python<'_>) {
        if let Some(mut t) = self.thread.take() {
            py.detach(|| t.join());
        }
        let mut pump = lock(&self.shared);
        pump.close();
        let fd = self.fd.swap(-1, Ordering::Relaxed);
        if fd >= 0 {
            unsafe { libc::close(fd) };
        }
    }
}

impl Drop for TunPump {
    fn drop(&mut self) {
        if let Some(mut t) = self.thread.take() {
            t.join();
        }
        let fd = self.fd.swap(-1, Ordering::Relaxed);
        if fd >= 0 {
            unsafe { libc::close(fd) };
        }
    }
}
