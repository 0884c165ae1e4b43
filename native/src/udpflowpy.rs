//! The Python binding of the Connector's UDP flow pump: `ztna._native.UdpFlows`.
//!
//! Agent → backend: every endpoint attached to the pump has a tap in its core (`FlowTap`)
//! that takes the DATAGRAMs of installed flows, and a drain that sends their payloads to the
//! flows' backend sockets after each batch. Backend → Agent: Python watches each flow socket
//! once (`add_reader`) and calls `recv(flow)` when it is readable; that reads a burst, builds
//! the replies from the virtual address and queues them on the flow's connection. Python
//! runs once per batch either way, never once per packet, and keeps every decision (which
//! flows exist, on which connection, when they expire, the ICMP errors).

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Instant;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::core::{Core, SendResult};
use crate::driver::{self, clear, signal, Drain, Source};
use crate::py::Endpoint;
use crate::tunpump::Target;
use crate::udpflow::{lock, FlowTap, Flows, SharedFlows};

const MAX_DATAGRAM: usize = 65535;

/// Run by an endpoint after each batch: the payloads its tap took go to the backends.
struct FlowDrain {
    flows: SharedFlows,
}

impl Drain for FlowDrain {
    fn drain(&mut self) {
        let mut flows = lock(&self.flows);
        if flows.pending.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut flows.pending);
        for (id, fd, payload) in &pending {
            let n = unsafe {
                libc::send(*fd, payload.as_ptr().cast(), payload.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
            };
            if n >= 0 {
                flows.stats.to_backend += 1;
                continue;
            }
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::ECONNREFUSED) {
                flows.stats.refused += 1;
                if let Some(f) = flows.flows.get_mut(id) {
                    f.refused = true;
                }
            } else {
                // Buffer full or a transient error: UDP may drop.
                flows.stats.backend_drops += 1;
            }
        }
        flows.pending = pending;
        flows.pending.clear();
    }
}

/// Read up to `max` datagrams from flow `id`'s backend socket and queue the replies on its
/// connection in `core`: (replies queued, backend refused, replies dropped).
fn burst(flows: &mut Flows, core: &mut Core, id: u64, max: usize, buf: &mut [u8], dgram: &mut Vec<u8>) -> (u64, bool, u64) {
    let Some((fd, target)) = flows.flows.get(&id).map(|f| (f.fd, f.reply)) else { return (0, false, 0) };
    let (mut sent, mut refused, mut dropped) = (0u64, false, 0u64);
    for _ in 0..max {
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n < 0 {
            match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::ECONNREFUSED) => {
                    refused = true;
                    continue;
                }
                _ => break,
            }
        }
        let max_payload = core.conn_mut(target.h).map(|c| c.max_datagram_payload()).unwrap_or(0);
        let Some(t) = flows.reply(id, &buf[..n as usize], max_payload, dgram) else {
            dropped += 1;
            continue;
        };
        debug_assert_eq!(t, target);
        match core.send_datagram(t.h, dgram) {
            SendResult::Queued | SendResult::QueuedDroppedOldest => {
                flows.stats.to_agent += 1;
                if let Some(f) = flows.flows.get_mut(&id) {
                    f.to_agent += 1;
                }
                sent += 1;
            }
            _ => {
                flows.stats.agent_drops += 1;
                dropped += 1;
            }
        }
    }
    if refused {
        flows.stats.refused += 1;
    }
    (sent, refused, dropped)
}

/// The backend sockets of the flows whose replies go on one threaded endpoint: the driver
/// thread polls their epoll descriptor and, when it is readable, moves each ready flow's
/// burst of replies into the core within the same batch.
struct FlowSource {
    flows: SharedFlows,
    epoll: Arc<OwnedFd>,
    refused: Arc<OwnedFd>,
    slot: usize,
    burst: usize,
    buf: Vec<u8>,
    dgram: Vec<u8>,
}

impl Source for FlowSource {
    fn fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    fn ready(&mut self, core: &mut Core, _now: Instant) {
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 64];
        let n = unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), evs.as_mut_ptr(), evs.len() as i32, 0) };
        if n <= 0 {
            return;
        }
        let mut flows = lock(&self.flows);
        let mut refused = false;
        for ev in &evs[..n as usize] {
            let id = { ev.u64 };
            if flows.flows.get(&id).is_none_or(|f| f.polled != Some(self.slot)) {
                continue;
            }
            flows.stats.thread_bursts += 1;
            let (_, r, _) = burst(&mut flows, core, id, self.burst, &mut self.buf, &mut self.dgram);
            if r {
                if let Some(f) = flows.flows.get_mut(&id) {
                    f.refused = true;
                }
                refused = true;
            }
        }
        if refused {
            signal(&self.refused);
        }
    }
}

#[pyclass(module = "ztna._native")]
pub struct UdpFlows {
    flows: SharedFlows,
    endpoints: Vec<Py<Endpoint>>,
    buf: Vec<u8>,
    dgram: Vec<u8>,
    recv_burst: usize,
    panics: u64,
    /// Per endpoint slot: the flow epoll descriptor its driver thread polls (None: the
    /// endpoint has no thread, Python reads those flows).
    polls: Vec<Option<Arc<OwnedFd>>>,
    refused: Arc<OwnedFd>,
}

impl UdpFlows {
    /// Stop the driver threads polling sockets of forgotten flows, then poll flow `id` (if
    /// still there) on the thread of the endpoint its replies use, if that has one.
    fn repoll(&self, id: Option<u64>) {
        let mut flows = lock(&self.flows);
        for (slot, fd) in std::mem::take(&mut flows.unpoll) {
            if let Some(Some(ep)) = self.polls.get(slot) {
                unsafe { libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) };
            }
        }
        let Some(id) = id else { return };
        let Some(f) = flows.flows.get_mut(&id) else { return };
        let want = self.polls.get(f.reply.slot).and_then(|p| p.as_ref()).map(|_| f.reply.slot);
        if want == f.polled {
            return;
        }
        if let Some(old) = f.polled.take() {
            if let Some(Some(ep)) = self.polls.get(old) {
                unsafe { libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_DEL, f.fd, std::ptr::null_mut()) };
            }
        }
        if let Some(slot) = want {
            if let Some(Some(ep)) = self.polls.get(slot) {
                let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: id };
                if unsafe { libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, f.fd, &mut ev) } == 0 {
                    f.polled = Some(slot);
                }
            }
        }
    }

    fn live(&self, py: Python<'_>, slot: usize, h: usize) -> PyResult<bool> {
        let ep = self.endpoints.get(slot).ok_or_else(|| PyValueError::new_err("no such endpoint slot"))?;
        Ok(ep.bind(py).try_borrow()?.lock(py).core.live(h))
    }

    /// (replies queued, backend refused, replies dropped) for one readable flow socket.
    fn recv_burst(&mut self, py: Python<'_>, id: u64) -> (u64, bool, u64) {
        let slot = match lock(&self.flows).flows.get(&id) {
            Some(f) => f.reply.slot,
            None => return (0, false, 0),
        };
        let Some(ep) = self.endpoints.get(slot) else { return (0, false, 0) };
        let Ok(ep) = ep.bind(py).try_borrow() else { return (0, false, 0) };
        let mut ep = ep.lock(py);
        let mut flows = lock(&self.flows);
        burst(&mut flows, &mut ep.core, id, self.recv_burst, &mut self.buf, &mut self.dgram)
    }
}

#[pymethods]
impl UdpFlows {
    #[new]
    #[pyo3(signature = (*, recv_burst=64))]
    fn new(recv_burst: usize) -> Self {
        Self {
            flows: SharedFlows::default(),
            endpoints: Vec::new(),
            buf: vec![0u8; MAX_DATAGRAM],
            dgram: Vec::with_capacity(MAX_DATAGRAM + 64),
            recv_burst: recv_burst.max(1),
            panics: 0,
            polls: Vec::new(),
            refused: Arc::new(driver::eventfd().expect("eventfd")),
        }
    }

    /// Readable when a driver thread saw a backend refuse (ECONNREFUSED) a flow it reads:
    /// call `take_refused()` then.
    fn refused_fd(&self) -> i32 {
        self.refused.as_raw_fd()
    }

    /// Whether a driver thread reads flow `id`'s backend socket (then the owner must not).
    fn polled(&self, id: u64) -> bool {
        lock(&self.flows).flows.get(&id).is_some_and(|f| f.polled.is_some())
    }

    /// Attach an endpoint (a socket); the same endpoint again returns the same slot.
    fn add_endpoint(&mut self, endpoint: Bound<'_, Endpoint>) -> PyResult<usize> {
        if let Some(slot) = self.endpoints.iter().position(|e| e.bind(endpoint.py()).is(&endpoint)) {
            return Ok(slot);
        }
        let slot = self.endpoints.len();
        let ep = endpoint.try_borrow()?;
        let mut io = ep.lock(endpoint.py());
        io.core.taps.push(Box::new(FlowTap { flows: self.flows.clone(), slot }));
        io.drains.push(Box::new(FlowDrain { flows: self.flows.clone() }));
        let mut poll = None;
        if io.threaded() {
            let ep = Arc::new(driver::epoll().map_err(|e| pyo3::exceptions::PyOSError::new_err(format!("epoll: {e}")))?);
            let src = FlowSource {
                flows: self.flows.clone(), epoll: ep.clone(), refused: self.refused.clone(), slot,
                burst: self.recv_burst, buf: vec![0u8; MAX_DATAGRAM], dgram: Vec::with_capacity(MAX_DATAGRAM + 64),
            };
            if io.add_source(Box::new(src)).is_ok() {
                poll = Some(ep);
            }
        }
        self.polls.push(poll);
        drop(io);
        drop(ep);
        self.endpoints.push(endpoint.unbind());
        Ok(slot)
    }

    /// Connection `h` of endpoint `slot` carries flows: the relay (`agent_id` None: the id is
    /// in each 0x30 header) or a direct connection of agent `agent_id`. False if not alive.
    #[pyo3(signature = (slot, h, agent_id=None))]
    fn add_connection(&mut self, py: Python<'_>, slot: usize, h: usize, agent_id: Option<u32>) -> PyResult<bool> {
        if !self.live(py, slot, h)? {
            return Ok(false);
        }
        lock(&self.flows).add_connection(slot, h, agent_id);
        Ok(true)
    }

    /// Install a flow Python created: its key, service, backend socket fd and the connection
    /// its replies use. Returns the flow id.
    #[allow(clippy::too_many_arguments)]
    fn add_flow(&mut self, agent_id: u32, agent_ip: &[u8], agent_port: u16, vip: &[u8], vport: u16,
                service: &[u8], fd: i32, slot: usize, h: usize) -> PyResult<u64> {
        let id = lock(&self.flows)
            .add_flow(agent_id, agent_ip, agent_port, vip, vport, service, fd, Target { slot, h })
            .map_err(PyValueError::new_err)?;
        self.repoll(Some(id));
        Ok(id)
    }

    fn set_reply(&mut self, id: u64, slot: usize, h: usize) -> bool {
        let ok = lock(&self.flows).set_reply(id, Target { slot, h });
        self.repoll(Some(id));
        ok
    }

    /// Forget a flow (before its socket is closed).
    fn remove_flow(&mut self, id: u64) -> bool {
        let ok = lock(&self.flows).remove_flow(id);
        self.repoll(None);
        ok
    }

    /// Read what flow `id`'s backend socket has (a burst) and queue the replies:
    /// (replies queued, whether the backend refused, replies dropped).
    fn recv(&mut self, py: Python<'_>, id: u64) -> (u64, bool, u64) {
        match catch_unwind(AssertUnwindSafe(|| self.recv_burst(py, id))) {
            Ok(r) => r,
            Err(_) => {
                self.panics += 1;
                (0, false, 0)
            }
        }
    }

    /// (packets to the backend, replies to the Agent, payload bytes to the backend, payload
    /// bytes from it) of flow `id` so far, natively.
    fn counters(&self, id: u64) -> Option<(u64, u64, u64, u64)> {
        lock(&self.flows).flows.get(&id).map(|f| (f.to_backend, f.to_agent, f.bytes_to_backend, f.bytes_to_agent))
    }

    /// The latest packet of flow `id` that went natively (ICMP errors quote it).
    fn last_packet<'py>(&self, py: Python<'py>, id: u64) -> Option<Bound<'py, PyBytes>> {
        let flows = lock(&self.flows);
        let f = flows.flows.get(&id)?;
        (!f.last_packet.is_empty()).then(|| PyBytes::new(py, &f.last_packet))
    }

    /// Flows whose backend refused a native send since the last call (Python answers with
    /// ICMP port unreachable).
    fn take_refused(&mut self) -> Vec<u64> {
        clear(self.refused.as_raw_fd());
        let mut flows = lock(&self.flows);
        let mut out = Vec::new();
        for (id, f) in flows.flows.iter_mut() {
            if f.refused {
                f.refused = false;
                out.push(*id);
            }
        }
        out
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let flows = lock(&self.flows);
        let s = &flows.stats;
        let d = PyDict::new(py);
        for (k, v) in [
            ("to_backend", s.to_backend),
            ("backend_drops", s.backend_drops),
            ("to_agent", s.to_agent),
            ("agent_drops", s.agent_drops),
            ("reply_too_big", s.reply_too_big),
            ("refused", s.refused),
            ("thread_bursts", s.thread_bursts),
            ("flows", flows.flows.len() as u64),
            ("panics", self.panics),
        ] {
            d.set_item(k, v)?;
        }
        Ok(d)
    }
}
