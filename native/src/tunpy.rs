//! The Python binding of the TUN pump: `ztna._native.TunPump` owns a duplicate of the TUN fd.
//!
//! Up-link: the asyncio loop calls `read()` once when the fd is readable; it reads a batch of
//! packets, looks each one up in the table (`tunpump::Table`) and queues the ones it can
//! place on their connection's endpoint as DATAGRAMs (header + packet), all without Python.
//! It returns the packets Python must handle and the services that sent, so Python schedules
//! one flush per endpoint per batch.
//!
//! Down-link: every endpoint attached to the pump has a tap in its core (`TunTap`) that
//! queues the bare IP packets of its delivering connections, and a drain that writes them
//! into the TUN fd after each batch the endpoint processes; they are counted per service.
//! Connections that go away leave the table at once.
//!
//! The state both sides touch sits behind one mutex; every call holds the GIL, so it is never
//! contended. Panics are caught and counted like the rest of the binding.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};

use crate::core::SendResult;
use crate::driver::Drain;
use crate::py::Endpoint;
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

#[pyclass(module = "ztna._native")]
pub struct TunPump {
    shared: SharedPump,
    fd: Fd,
    panics: u64,
    endpoints: Vec<Py<Endpoint>>,
    buf: Vec<u8>,
    dgram: Vec<u8>,
    read_batch: usize,
}

impl TunPump {
    fn endpoint<'py>(&self, py: Python<'py>, slot: usize) -> PyResult<PyRef<'py, Endpoint>> {
        let ep = self.endpoints.get(slot).ok_or_else(|| PyValueError::new_err("no such endpoint slot"))?;
        Ok(ep.bind(py).try_borrow()?)
    }

    fn read_batch<'py>(&mut self, py: Python<'py>, out: &mut Vec<Bound<'py, PyBytes>>, touched: &mut Vec<usize>) {
        let mut eps: Vec<Option<PyRef<'py, Endpoint>>> = self.endpoints.iter().map(|_| None).collect();
        let mut st = lock(&self.shared);
        let fd = self.fd.load(Ordering::Relaxed);
        if fd < 0 {
            return;
        }
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
            let packet = &self.buf[..n as usize];
            let Up::Send { svc, target } = st.table.up(packet) else {
                out.push(PyBytes::new(py, packet));
                continue;
            };
            let ep = match &mut eps[target.slot] {
                Some(ep) => Some(ep),
                slot @ None => {
                    *slot = self.endpoints[target.slot].bind(py).try_borrow().ok();
                    slot.as_mut()
                }
            };
            let sent = ep.is_some_and(|ep| {
                self.dgram.clear();
                self.dgram.extend_from_slice(st.table.header(svc));
                self.dgram.extend_from_slice(packet);
                matches!(ep.lock(py).core.send_datagram(target.h, &self.dgram), SendResult::Queued | SendResult::QueuedDroppedOldest)
            });
            if sent {
                st.table.sent(svc, packet.len());
                if !touched.contains(&svc) {
                    touched.push(svc);
                }
            } else {
                // Closed or too large for this connection right now: Python decides.
                st.table.stats.send_refused += 1;
                st.table.stats.to_python += 1;
                out.push(PyBytes::new(py, packet));
            }
        }
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
        Ok(Self {
            shared: SharedPump::default(),
            fd: Arc::new(AtomicI32::new(dup)),
            panics: 0,
            endpoints: Vec::new(),
            buf: vec![0u8; MAX_PACKET],
            dgram: Vec::with_capacity(MAX_PACKET + 256),
            read_batch: read_batch.max(1),
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
        drop(ep);
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
        let mut out = Vec::new();
        let mut touched = Vec::new();
        if catch_unwind(AssertUnwindSafe(|| self.read_batch(py, &mut out, &mut touched))).is_err() {
            self.panics += 1;
        }
        Ok((PyList::new(py, out)?, touched))
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
            ("panics", self.panics),
        ] {
            d.set_item(k, v)?;
        }
        Ok(d)
    }

    /// Stop: nothing is delivered to the TUN device any more (every connection's packets go
    /// to Python again), and our duplicate of the fd is closed.
    fn close(&mut self) {
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
        let fd = self.fd.swap(-1, Ordering::Relaxed);
        if fd >= 0 {
            unsafe { libc::close(fd) };
        }
    }
}
