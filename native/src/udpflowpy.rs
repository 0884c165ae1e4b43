//! The Python binding of the Connector's UDP flow pump: `ztna._native.UdpFlows`.
//!
//! Agent → backend: every endpoint attached to the pump has a tap in its core (`FlowTap`)
//! that takes the DATAGRAMs of installed flows, and a drain that sends their payloads to the
//! flows' backend sockets after each batch. Backend → Agent: Python watches each flow socket
//! once (`add_reader`) and calls `recv(flow)` when it is readable; that reads a burst, builds
//! the replies from the virtual address and queues them on the flow's connection. Python
//! runs once per batch either way, never once per packet, and keeps every decision (which
//! flows exist, on which connection, when they expire, the ICMP errors).

use std::panic::{catch_unwind, AssertUnwindSafe};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::core::SendResult;
use crate::driver::Drain;
use crate::py::Endpoint;
use crate::tunpump::Target;
use crate::udpflow::{lock, FlowTap, SharedFlows};

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

#[pyclass(module = "ztna._native")]
pub struct UdpFlows {
    flows: SharedFlows,
    endpoints: Vec<Py<Endpoint>>,
    buf: Vec<u8>,
    dgram: Vec<u8>,
    recv_burst: usize,
    panics: u64,
}

impl UdpFlows {
    fn live(&self, py: Python<'_>, slot: usize, h: usize) -> PyResult<bool> {
        let ep = self.endpoints.get(slot).ok_or_else(|| PyValueError::new_err("no such endpoint slot"))?;
        Ok(ep.bind(py).try_borrow()?.lock(py).core.live(h))
    }

    /// (replies queued, backend refused, replies dropped) for one readable flow socket.
    fn recv_burst(&mut self, py: Python<'_>, id: u64) -> (u64, bool, u64) {
        let (fd, target) = match lock(&self.flows).flows.get(&id) {
            Some(f) => (f.fd, f.reply),
            None => return (0, false, 0),
        };
        let Some(ep) = self.endpoints.get(target.slot) else { return (0, false, 0) };
        let Ok(ep) = ep.bind(py).try_borrow() else { return (0, false, 0) };
        let mut ep = ep.lock(py);
        let (mut sent, mut refused, mut dropped) = (0u64, false, 0u64);
        for _ in 0..self.recv_burst {
            let n = unsafe { libc::recv(fd, self.buf.as_mut_ptr().cast(), self.buf.len(), libc::MSG_DONTWAIT) };
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
            let max_payload = ep.core.conn_mut(target.h).map(|c| c.max_datagram_payload()).unwrap_or(0);
            let mut flows = lock(&self.flows);
            let Some(t) = flows.reply(id, &self.buf[..n as usize], max_payload, &mut self.dgram) else {
                dropped += 1;
                continue;
            };
            debug_assert_eq!(t, target);
            match ep.core.send_datagram(t.h, &self.dgram) {
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
            lock(&self.flows).stats.refused += 1;
        }
        (sent, refused, dropped)
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
        }
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
        lock(&self.flows)
            .add_flow(agent_id, agent_ip, agent_port, vip, vport, service, fd, Target { slot, h })
            .map_err(PyValueError::new_err)
    }

    fn set_reply(&mut self, id: u64, slot: usize, h: usize) -> bool {
        lock(&self.flows).set_reply(id, Target { slot, h })
    }

    /// Forget a flow (before its socket is closed).
    fn remove_flow(&mut self, id: u64) -> bool {
        lock(&self.flows).remove_flow(id)
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
            ("flows", flows.flows.len() as u64),
            ("panics", self.panics),
        ] {
            d.set_item(k, v)?;
        }
        Ok(d)
    }
}
