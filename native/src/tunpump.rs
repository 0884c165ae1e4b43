//! The Agent's TUN pump, sans-IO: which IP packet read from the TUN device goes natively on
//! which connection with which tunnel header, and which must go up to Python.
//!
//! Python owns the decisions: it installs one entry per service (the prebuilt 0x2F header and
//! its virtual addresses or prefixes) and, while the service is usable, the connection that
//! carries it now (relay or direct; switched by Python on every path change). The pump only
//! looks packets up. Anything it cannot place goes up to Python unchanged, so a missing route
//! costs speed, never behaviour: an unknown destination, a service without a connection (not
//! registered yet: Python queues), a packet larger than the tunnel carries (Python answers
//! with ICMP), a non-IP packet, and every TCP segment while Python resets flows on exit.
//!
//! TCP flows to a virtual IP that went out natively are remembered with the last
//! acknowledgment number the application sent (its receive point), exactly as the Python
//! data plane does for its own packets, so the exit path can reset them all. The table is
//! bounded; the oldest flow is forgotten first.
//!
//! Down-link packets (bare IP from the relay or a Connector) are counted per service by their
//! source address, which is the service's virtual IP. The driver does the fd I/O.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;

use crate::core::{is_ip_first_byte, Tap};

/// TCP flows remembered for the resets on exit (the Python data plane's bound too).
pub const TCP_FLOWS_MAX: usize = 8192;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    /// Which endpoint (socket) of the driver the connection lives on.
    pub slot: usize,
    /// The connection handle within that endpoint.
    pub h: usize,
}

#[derive(Default, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counters {
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
}

struct Service {
    header: Vec<u8>,
    target: Option<Target>,
    counters: Counters,
}

#[derive(Default, Clone, Debug)]
pub struct TunStats {
    pub read_packets: u64,
    pub to_python: u64,
    pub rx_unknown_source: u64,
    pub written: u64,
    pub dropped_write: u64,
    pub read_errors: u64,
    pub send_refused: u64,
    pub claimed_down: u64,
}

/// What to do with one packet read from the TUN device.
#[derive(Debug, PartialEq, Eq)]
pub enum Up {
    /// Send `header + packet` on `target` for service `svc`.
    Send { svc: usize, target: Target },
    /// Hand the packet to Python as it is.
    Python,
}

/// A remembered TCP flow: (version, application address, virtual address, application
/// port, virtual port, last acknowledgment sent).
pub type TcpFlow = (u8, Vec<u8>, Vec<u8>, u16, u16, u32);

/// (version, application address, virtual address, application port, virtual port).
pub type FlowKey = (u8, [u8; 16], [u8; 16], u16, u16);

#[derive(Default)]
struct TcpFlows {
    acks: HashMap<FlowKey, (u32, u64)>,
    order: VecDeque<(FlowKey, u64)>,
    generation: u64,
}

impl TcpFlows {
    fn ack(&mut self, key: FlowKey, ack: u32) {
        if let Some(entry) = self.acks.get_mut(&key) {
            entry.0 = ack;
            return;
        }
        while self.acks.len() >= TCP_FLOWS_MAX {
            let Some((old, gen)) = self.order.pop_front() else { break };
            if self.acks.get(&old).is_some_and(|e| e.1 == gen) {
                self.acks.remove(&old);
            }
        }
        self.generation += 1;
        self.acks.insert(key, (ack, self.generation));
        self.order.push_back((key, self.generation));
        // Keys forgotten by RST leave stale entries in `order`; keep it from growing past
        // twice the bound by rebuilding it from the live entries.
        if self.order.len() > 2 * TCP_FLOWS_MAX {
            let acks = &self.acks;
            self.order.retain(|(k, g)| acks.get(k).is_some_and(|e| e.1 == *g));
        }
    }

    fn forget(&mut self, key: &FlowKey) {
        self.acks.remove(key);
    }
}

#[derive(Default)]
pub struct Table {
    services: Vec<Service>,
    v4: HashMap<[u8; 4], usize>,
    v6: HashMap<[u8; 16], usize>,
    /// Shorter prefixes (network, length, service), looked up after the exact addresses.
    prefixes: Vec<(Vec<u8>, u8, usize)>,
    /// Largest IP packet the tunnel carries (0: not known yet, no limit applied).
    pub max_packet: usize,
    /// Python is resetting TCP flows (exit): every TCP segment goes up to it.
    pub resetting: bool,
    /// Down-link destinations Python keeps for itself (the userspace stack's own source).
    pub claimed: Vec<Vec<u8>>,
    tcp: TcpFlows,
    pub stats: TunStats,
}

fn prefix_match(addr: &[u8], net: &[u8], len: u8) -> bool {
    if addr.len() != net.len() {
        return false;
    }
    let full = (len / 8) as usize;
    if addr[..full] != net[..full] {
        return false;
    }
    let rest = len % 8;
    if rest == 0 {
        return true;
    }
    let mask = 0xFFu8 << (8 - rest);
    addr[full] & mask == net[full] & mask
}

impl Table {
    /// A service: its header (what precedes the IP packet in the DATAGRAM) and the
    /// addresses it answers for, each (packed address, prefix length). Returns its index.
    pub fn add_service(&mut self, header: &[u8], addresses: &[(Vec<u8>, u8)]) -> Result<usize, String> {
        let idx = self.services.len();
        for (addr, len) in addresses {
            match (addr.len(), *len) {
                (4, 32) => {
                    self.v4.insert(addr[..].try_into().unwrap_or_default(), idx);
                }
                (16, 128) => {
                    self.v6.insert(addr[..].try_into().unwrap_or_default(), idx);
                }
                (4, 0..=31) | (16, 0..=127) => self.prefixes.push((addr.clone(), *len, idx)),
                _ => return Err(format!("bad address/prefix: {} bytes /{len}", addr.len())),
            }
        }
        // Longest prefix first.
        self.prefixes.sort_by_key(|p| std::cmp::Reverse(p.1));
        self.services.push(Service { header: header.to_vec(), target: None, counters: Counters::default() });
        Ok(idx)
    }

    pub fn services(&self) -> usize {
        self.services.len()
    }

    pub fn header(&self, svc: usize) -> &[u8] {
        &self.services[svc].header
    }

    /// Where a service's packets go now; None sends them up to Python.
    pub fn set_target(&mut self, svc: usize, target: Option<Target>) -> bool {
        match self.services.get_mut(svc) {
            Some(s) => {
                s.target = target;
                true
            }
            None => false,
        }
    }

    pub fn target(&self, svc: usize) -> Option<Target> {
        self.services.get(svc).and_then(|s| s.target)
    }

    /// Every route on a connection that is gone (its handle may be reused).
    pub fn forget(&mut self, slot: usize, h: usize) {
        for s in &mut self.services {
            if s.target == Some(Target { slot, h }) {
                s.target = None;
            }
        }
    }

    pub fn counters(&self, svc: usize) -> Counters {
        self.services.get(svc).map(|s| s.counters).unwrap_or_default()
    }

    fn service_of(&self, addr: &[u8]) -> Option<usize> {
        let exact = match addr.len() {
            4 => self.v4.get(<&[u8; 4]>::try_from(addr).ok()?).copied(),
            16 => self.v6.get(<&[u8; 16]>::try_from(addr).ok()?).copied(),
            _ => None,
        };
        exact.or_else(|| self.prefixes.iter().find(|(net, len, _)| prefix_match(addr, net, *len)).map(|p| p.2))
    }

    /// The destination (or source) address of an IP packet; None if it is not one.
    fn address(packet: &[u8], source: bool) -> Option<&[u8]> {
        match packet.first()? >> 4 {
            4 if packet.len() >= 20 => Some(if source { &packet[12..16] } else { &packet[16..20] }),
            6 if packet.len() >= 40 => Some(if source { &packet[8..24] } else { &packet[24..40] }),
            _ => None,
        }
    }

    /// Decide one packet read from the TUN device.
    pub fn up(&mut self, packet: &[u8]) -> Up {
        self.stats.read_packets += 1;
        let decision = self.decide(packet);
        if decision == Up::Python {
            self.stats.to_python += 1;
        }
        decision
    }

    fn decide(&mut self, packet: &[u8]) -> Up {
        let Some(dst) = Self::address(packet, false) else { return Up::Python };
        let Some(svc) = self.service_of(dst) else { return Up::Python };
        let Some(target) = self.services[svc].target else { return Up::Python };
        if self.max_packet > 0 && packet.len() > self.max_packet {
            return Up::Python;
        }
        let v4 = packet[0] >> 4 == 4;
        let proto = if v4 { packet[9] } else { packet[6] };
        if proto == 6 {
            if self.resetting {
                return Up::Python;
            }
            self.track_tcp(packet, v4);
        }
        Up::Send { svc, target }
    }

    /// Remember a TCP flow's receive point (or forget it on RST), as the Python data plane.
    fn track_tcp(&mut self, packet: &[u8], v4: bool) {
        let (off, src, dst): (usize, &[u8], &[u8]) = if v4 {
            if packet[6] & 0x1F != 0 || packet[7] != 0 {
                return; // a non-first fragment: no TCP header in it
            }
            (((packet[0] & 0x0F) as usize) * 4, &packet[12..16], &packet[16..20])
        } else {
            (40, &packet[8..24], &packet[24..40])
        };
        if packet.len() < off + 20 {
            return;
        }
        let mut app = [0u8; 16];
        let mut vip = [0u8; 16];
        app[..src.len()].copy_from_slice(src);
        vip[..dst.len()].copy_from_slice(dst);
        let t = &packet[off..];
        let key: FlowKey = (if v4 { 4 } else { 6 }, app, vip, u16::from_be_bytes([t[0], t[1]]), u16::from_be_bytes([t[2], t[3]]));
        let flags = t[13];
        if flags & 0x04 != 0 {
            self.tcp.forget(&key);
        } else if flags & 0x10 != 0 {
            self.tcp.ack(key, u32::from_be_bytes([t[8], t[9], t[10], t[11]]));
        }
    }

    /// The TCP flows remembered: (version, application address, virtual address,
    /// application port, virtual port, last acknowledgment sent), oldest first.
    pub fn tcp_flows(&self) -> Vec<TcpFlow> {
        let mut out = Vec::with_capacity(self.tcp.acks.len());
        for (key, gen) in &self.tcp.order {
            if let Some(&(ack, g)) = self.tcp.acks.get(key) {
                if g == *gen {
                    let n = if key.0 == 4 { 4 } else { 16 };
                    out.push((key.0, key.1[..n].to_vec(), key.2[..n].to_vec(), key.3, key.4, ack));
                }
            }
        }
        out
    }

    /// A packet went out natively for `svc` (`len`: the IP packet, without the header).
    pub fn sent(&mut self, svc: usize, len: usize) {
        if let Some(s) = self.services.get_mut(svc) {
            s.counters.tx_packets += 1;
            s.counters.tx_bytes += len as u64;
        }
    }

    /// A down-link packet for the TUN: false if Python keeps it (a claimed destination).
    pub fn down(&mut self, packet: &[u8]) -> bool {
        if !self.claimed.is_empty() {
            if let Some(dst) = Self::address(packet, false) {
                if self.claimed.iter().any(|c| c[..] == *dst) {
                    self.stats.claimed_down += 1;
                    return false;
                }
            }
        }
        match Self::address(packet, true).and_then(|src| self.service_of(src)) {
            Some(svc) => {
                let c = &mut self.services[svc].counters;
                c.rx_packets += 1;
                c.rx_bytes += packet.len() as u64;
            }
            None => self.stats.rx_unknown_source += 1,
        }
        true
    }
}

/// The pump's state shared by the TUN driver and every endpoint's tap: the table, which
/// connections deliver their bare IP packets to the TUN device, and what arrived for it since
/// the driver last wrote (the driver drains `pending` after each batch).
#[derive(Default)]
pub struct Pump {
    pub table: Table,
    deliver: HashSet<(usize, usize)>,
    pub pending: Vec<Bytes>,
    closed: bool,
}

impl Pump {
    /// The driver stopped: every tap leaves every packet to its owner from now on.
    pub fn close(&mut self) {
        self.closed = true;
        self.deliver.clear();
        self.pending.clear();
        for svc in 0..self.table.services() {
            self.table.set_target(svc, None);
        }
    }

    pub fn deliver(&mut self, slot: usize, h: usize, on: bool) {
        if on && !self.closed {
            self.deliver.insert((slot, h));
        } else {
            self.deliver.remove(&(slot, h));
        }
    }

    pub fn delivers(&self, slot: usize, h: usize) -> bool {
        self.deliver.contains(&(slot, h))
    }

    /// A bare IP packet arrived on (slot, h): queued for the TUN device unless the
    /// connection does not deliver or Python keeps its destination.
    pub fn arrived(&mut self, slot: usize, h: usize, d: &Bytes) -> bool {
        if !d.first().is_some_and(|&b| is_ip_first_byte(b)) || !self.deliver.contains(&(slot, h)) {
            return false;
        }
        if !self.table.down(d) {
            return false;
        }
        self.pending.push(d.clone());
        true
    }

    pub fn gone(&mut self, slot: usize, h: usize) {
        self.deliver.remove(&(slot, h));
        self.table.forget(slot, h);
    }
}

pub type SharedPump = Arc<Mutex<Pump>>;

pub fn lock(pump: &SharedPump) -> MutexGuard<'_, Pump> {
    // A panic while holding the lock leaves a table that is still consistent enough to use.
    pump.lock().unwrap_or_else(|e| e.into_inner())
}

/// The pump as one endpoint's core sees it.
pub struct TunTap {
    pub pump: SharedPump,
    pub slot: usize,
}

impl Tap for TunTap {
    fn take(&mut self, h: usize, d: &Bytes, _max_payload: usize) -> bool {
        lock(&self.pump).arrived(self.slot, h, d)
    }

    fn gone(&mut self, h: usize) {
        lock(&self.pump).gone(self.slot, h);
    }
}
