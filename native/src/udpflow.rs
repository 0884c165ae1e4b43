//! The Connector's established UDP flows, sans-IO: Agent DATAGRAM → payload for the flow's
//! backend socket, and backend reply → DATAGRAM from the virtual address back to the Agent.
//!
//! Python creates every flow (the first packet of a 5-tuple, limits, the backend socket, ICMP
//! for a closed port) and then installs it here; from then on its packets move natively. A
//! flow is identified exactly as in Python, by (agent id, inner 5-tuple): on the relay
//! connection the agent id comes from the 0x30 header, on a direct connection from the Hello
//! Python saw (it installs the connection with that id), so one Agent can never feed another
//! Agent's flow. The service id in the header must be the flow's.
//!
//! Left to Python (the packet goes up unchanged): anything not matching an installed flow,
//! fragments and IPv6 extension headers, a packet whose reply could not come back on the path
//! (ICMP "too big" is Python's), and a flow's packet arriving on another connection than the
//! one its replies use now (the path switch is Python's bookkeeping; it moves the flow here).
//!
//! Replies are IPv4 (DF, ID 0, TTL 64) or IPv6 (hop limit 64) with the UDP checksum, byte for
//! byte what `ztna.netstack.packets.build_udp_packet` builds, behind the path's header (0x31
//! + agent id on the relay, nothing on a direct connection).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;

use crate::core::{Tap, FROM_CONNECTOR, SERVICE_DATAGRAM, TO_CONNECTOR, TUNNEL_VERSION};
use crate::tunpump::Target;

const PROTO_UDP: u8 = 17;
const TTL: u8 = 64;

/// (agent id, agent address, agent port, virtual address, virtual port); addresses are
/// 16 bytes (IPv4 in the first 4, the rest zero) with the version beside them.
pub type FlowKey = (u32, u8, [u8; 16], u16, [u8; 16], u16);

pub struct Flow {
    pub key: FlowKey,
    pub service: Box<[u8]>,
    /// The backend socket (Python's; it removes the flow before closing it).
    pub fd: i32,
    /// Where replies go: the connection of the flow's latest packet.
    pub reply: Target,
    pub relay: bool,
    pub to_backend: u64,
    pub to_agent: u64,
    /// Payload bytes each way (what an audit line reports).
    pub bytes_to_backend: u64,
    pub bytes_to_agent: u64,
    /// The latest packet from the Agent (ICMP errors quote it).
    pub last_packet: Vec<u8>,
    pub refused: bool,
    /// Its reply connection went away: nothing is sent until Python moves the flow (the
    /// handle may already name another Agent's connection).
    pub detached: bool,
    /// The endpoint slot whose driver thread reads the backend socket (None: the owner's
    /// loop watches it and calls for each burst).
    pub polled: Option<usize>,
}

#[derive(Default, Clone, Debug)]
pub struct FlowStats {
    pub to_backend: u64,
    pub backend_drops: u64,
    pub to_agent: u64,
    pub agent_drops: u64,
    pub reply_too_big: u64,
    pub refused: u64,
    /// Backend bursts a driver thread read (the rest were read on the owner's loop).
    pub thread_bursts: u64,
}

#[derive(Default)]
pub struct Flows {
    /// Connections that carry flows: None = relay (agent id in each 0x30 header),
    /// Some(id) = a direct connection of that agent.
    conns: HashMap<(usize, usize), Option<u32>>,
    by_key: HashMap<FlowKey, u64>,
    pub flows: HashMap<u64, Flow>,
    next_id: u64,
    /// (flow id, backend fd, payload) taken during a batch; the driver sends them after it.
    pub pending: Vec<(u64, i32, Bytes)>,
    /// (slot, fd) of forgotten flows whose backend socket a driver thread still polls: the
    /// driver stops polling them before the owner closes the sockets.
    pub unpoll: Vec<(usize, i32)>,
    pub stats: FlowStats,
}

fn addr16(a: &[u8]) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..a.len()].copy_from_slice(a);
    out
}

fn ones_sum(data: &[u8], mut acc: u64) -> u64 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u16::from_be_bytes([c[0], c[1]]) as u64;
    }
    if let [last] = chunks.remainder() {
        acc += (*last as u64) << 8;
    }
    acc
}

fn finish(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xFFFF) + (acc >> 16);
    }
    !(acc as u16)
}

/// An IP/UDP packet from `src`:`sport` to `dst`:`dport` (4 or 16 byte addresses).
pub fn build_udp_packet(out: &mut Vec<u8>, src: &[u8], dst: &[u8], sport: u16, dport: u16, payload: &[u8]) {
    let udp_len = 8 + payload.len();
    let start = out.len();
    if src.len() == 4 {
        let total = (20 + udp_len) as u16;
        out.extend_from_slice(&[0x45, 0]);
        out.extend_from_slice(&total.to_be_bytes());
        out.extend_from_slice(&[0, 0, 0x40, 0, TTL, PROTO_UDP, 0, 0]);
        out.extend_from_slice(src);
        out.extend_from_slice(dst);
        let ck = finish(ones_sum(&out[start..start + 20], 0));
        out[start + 10..start + 12].copy_from_slice(&ck.to_be_bytes());
    } else {
        out.extend_from_slice(&[0x60, 0, 0, 0]);
        out.extend_from_slice(&(udp_len as u16).to_be_bytes());
        out.extend_from_slice(&[PROTO_UDP, TTL]);
        out.extend_from_slice(src);
        out.extend_from_slice(dst);
    }
    let l4 = out.len();
    let len_field = if udp_len <= 0xFFFF { udp_len as u16 } else { 0 };
    out.extend_from_slice(&sport.to_be_bytes());
    out.extend_from_slice(&dport.to_be_bytes());
    out.extend_from_slice(&len_field.to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(payload);
    // Pseudo-header: addresses, protocol, UDP length.
    let mut acc = ones_sum(src, 0);
    acc = ones_sum(dst, acc);
    acc += PROTO_UDP as u64 + udp_len as u64;
    let mut ck = finish(ones_sum(&out[l4..], acc));
    if ck == 0 {
        ck = 0xFFFF; // RFC 768: a computed 0 is sent as all ones
    }
    out[l4 + 6..l4 + 8].copy_from_slice(&ck.to_be_bytes());
}

/// (version, src, dst, sport, dport, payload range) of a UDP packet.
type UdpView<'a> = (u8, &'a [u8], &'a [u8], u16, u16, std::ops::Range<usize>);

/// The parts of an Agent's UDP packet a flow needs: (version, src, dst, sport, dport,
/// payload range within `p`). None for anything Python must look at.
fn parse_udp(p: &[u8]) -> Option<UdpView<'_>> {
    let (version, off, total, src, dst) = match p.first()? >> 4 {
        4 => {
            if p.len() < 20 {
                return None;
            }
            let ihl = ((p[0] & 0x0F) as usize) * 4;
            let total = u16::from_be_bytes([p[2], p[3]]) as usize;
            let frag = u16::from_be_bytes([p[6], p[7]]);
            if ihl < 20 || total < ihl || total > p.len() || frag & 0x3FFF != 0 || p[9] != PROTO_UDP {
                return None;
            }
            (4, ihl, total, &p[12..16], &p[16..20])
        }
        6 => {
            if p.len() < 40 {
                return None;
            }
            let plen = u16::from_be_bytes([p[4], p[5]]) as usize;
            // No extension headers on the native path: Python walks them.
            if plen == 0 || 40 + plen > p.len() || p[6] != PROTO_UDP {
                return None;
            }
            (6, 40, 40 + plen, &p[8..24], &p[24..40])
        }
        _ => return None,
    };
    let l4 = &p[off..total];
    if l4.len() < 8 {
        return None;
    }
    let length = u16::from_be_bytes([l4[4], l4[5]]) as usize;
    if length < 8 || length > l4.len() {
        return None;
    }
    let sport = u16::from_be_bytes([l4[0], l4[1]]);
    let dport = u16::from_be_bytes([l4[2], l4[3]]);
    Some((version, src, dst, sport, dport, off + 8..off + length))
}

impl Flows {
    /// Connection (slot, h) carries flows: relay (`agent_id` None) or a direct connection of
    /// that agent.
    pub fn add_connection(&mut self, slot: usize, h: usize, agent_id: Option<u32>) {
        self.conns.insert((slot, h), agent_id);
    }

    /// A connection is gone: it carries nothing, and flows replying on it go up to Python
    /// until it moves them (their path died; Python picks the alternate).
    pub fn gone(&mut self, slot: usize, h: usize) {
        self.conns.remove(&(slot, h));
        for f in self.flows.values_mut() {
            if f.reply == (Target { slot, h }) {
                f.detached = true;
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn add_flow(&mut self, agent_id: u32, agent_ip: &[u8], agent_port: u16, vip: &[u8], vport: u16,
                    service: &[u8], fd: i32, reply: Target) -> Result<u64, String> {
        let version = match (agent_ip.len(), vip.len()) {
            (4, 4) => 4,
            (16, 16) => 6,
            _ => return Err("addresses must both be 4 or both be 16 bytes".into()),
        };
        let relay = matches!(self.conns.get(&(reply.slot, reply.h)), Some(None));
        let key: FlowKey = (agent_id, version, addr16(agent_ip), agent_port, addr16(vip), vport);
        if let Some(old) = self.by_key.remove(&key) {
            if let Some(f) = self.flows.remove(&old) {
                if let Some(slot) = f.polled {
                    self.unpoll.push((slot, f.fd));
                }
            }
        }
        self.next_id += 1;
        let id = self.next_id;
        self.by_key.insert(key, id);
        self.flows.insert(id, Flow {
            key, service: service.into(), fd, reply, relay, to_backend: 0, to_agent: 0,
            bytes_to_backend: 0, bytes_to_agent: 0,
            last_packet: Vec::new(), refused: false, detached: false, polled: None,
        });
        Ok(id)
    }

    /// The flow's replies go on another connection now (Python moved it).
    pub fn set_reply(&mut self, id: u64, reply: Target) -> bool {
        let relay = matches!(self.conns.get(&(reply.slot, reply.h)), Some(None));
        match self.flows.get_mut(&id) {
            Some(f) => {
                f.reply = reply;
                f.relay = relay;
                f.detached = false;
                true
            }
            None => false,
        }
    }

    pub fn remove_flow(&mut self, id: u64) -> bool {
        match self.flows.remove(&id) {
            Some(f) => {
                self.by_key.remove(&f.key);
                self.pending.retain(|(fid, _, _)| *fid != id);
                if let Some(slot) = f.polled {
                    self.unpoll.push((slot, f.fd));
                }
                true
            }
            None => false,
        }
    }

    /// Take one DATAGRAM from (slot, h) if it belongs to an installed flow.
    pub fn take(&mut self, slot: usize, h: usize, d: &Bytes, max_payload: usize) -> bool {
        let Some(&kind) = self.conns.get(&(slot, h)) else { return false };
        let (agent_id, service, start) = match kind {
            None => {
                if d.len() < 8 || d[0] != TO_CONNECTOR || d[1] != TUNNEL_VERSION {
                    return false;
                }
                let end = 7 + d[6] as usize;
                if d.len() <= end {
                    return false;
                }
                (u32::from_be_bytes([d[2], d[3], d[4], d[5]]), &d[7..end], end)
            }
            Some(agent_id) => {
                if d.len() < 4 || d[0] != SERVICE_DATAGRAM {
                    return false;
                }
                let end = 2 + d[1] as usize;
                if d.len() <= end {
                    return false;
                }
                (agent_id, &d[2..end], end)
            }
        };
        let packet = &d[start..];
        let Some((version, src, dst, sport, dport, payload)) = parse_udp(packet) else { return false };
        let key: FlowKey = (agent_id, version, addr16(src), sport, addr16(dst), dport);
        let Some(&id) = self.by_key.get(&key) else { return false };
        let Some(flow) = self.flows.get_mut(&id) else { return false };
        if flow.reply != (Target { slot, h }) || *flow.service != *service {
            return false;
        }
        let overhead = if flow.relay { 6 } else { 0 };
        let total_len = match version {
            4 => u16::from_be_bytes([packet[2], packet[3]]) as usize,
            _ => 40 + u16::from_be_bytes([packet[4], packet[5]]) as usize,
        };
        if total_len + overhead > max_payload {
            return false; // its reply could not come back: Python answers with ICMP
        }
        flow.last_packet.clear();
        flow.last_packet.extend_from_slice(packet);
        flow.to_backend += 1;
        flow.bytes_to_backend += payload.len() as u64;
        self.pending.push((id, flow.fd, d.slice(start + payload.start..start + payload.end)));
        true
    }

    /// The DATAGRAM that carries `payload` from the backend back to the flow's Agent, and
    /// the connection it goes on; None if the flow is unknown or the reply is too big for
    /// `max_payload` of that connection (counted).
    pub fn reply(&mut self, id: u64, payload: &[u8], max_payload: usize, out: &mut Vec<u8>) -> Option<Target> {
        let flow = self.flows.get_mut(&id)?;
        flow.bytes_to_agent += payload.len() as u64;
        if flow.detached {
            self.stats.agent_drops += 1;
            return None;
        }
        let (agent_id, version, agent_ip, agent_port, vip, vport) = flow.key;
        let n = if version == 4 { 4 } else { 16 };
        out.clear();
        if flow.relay {
            out.extend_from_slice(&[FROM_CONNECTOR, TUNNEL_VERSION]);
            out.extend_from_slice(&agent_id.to_be_bytes());
        }
        build_udp_packet(out, &vip[..n], &agent_ip[..n], vport, agent_port, payload);
        if out.len() > max_payload {
            self.stats.reply_too_big += 1;
            return None;
        }
        Some(flow.reply)
    }
}

pub type SharedFlows = Arc<Mutex<Flows>>;

pub fn lock(flows: &SharedFlows) -> MutexGuard<'_, Flows> {
    flows.lock().unwrap_or_else(|e| e.into_inner())
}

/// The flow table as one endpoint's core sees it.
pub struct FlowTap {
    pub flows: SharedFlows,
    pub slot: usize,
}

impl Tap for FlowTap {
    fn take(&mut self, h: usize, d: &Bytes, max_payload: usize) -> bool {
        lock(&self.flows).take(self.slot, h, d, max_payload)
    }

    fn gone(&mut self, h: usize) {
        lock(&self.flows).gone(self.slot, h);
    }
}
