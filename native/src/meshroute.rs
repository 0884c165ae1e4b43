//! Relay routes across a cluster mesh (docs/protocol.md §3.6): the native share of what
//! `ztna.cluster.mesh` decides, so that tunnel DATAGRAMs between an Agent on one member and a
//! Connector on another cross both members without an event.
//!
//! On the Agent's member a route takes an Agent's 0x2F for one service to the mesh link of
//! the member holding that service's Connectors, as 0x32 stamped with the Agent's id (its
//! "ref"), and takes 0x33 for that ref from that link back to the Agent as the bare packet.
//! On the Connector's member a route takes 0x32 for (mesh connection, ref, service) to the
//! Connector as 0x30 stamped with the member's own id for that remote Agent, and that
//! Connector's 0x31 for that id back to the mesh connection as 0x33 with the ref.
//!
//! Like the single-member routes in `core`, every key names the connection a DATAGRAM
//! arrives on, so a route can only carry what arrives on that one connection; the owner
//! installs only what its registry and mesh rules allow, a DATAGRAM no route matches goes to
//! the owner as before, and a connection's death removes every route naming it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::core::{is_ip_first_byte, Core, FROM_CONNECTOR, SERVICE_DATAGRAM, TO_CONNECTOR, TUNNEL_VERSION};

pub const MESH_TO_CONNECTOR: u8 = 0x32;
pub const MESH_FROM_CONNECTOR: u8 = 0x33;
pub const MESH_VERSION: u8 = 1;

/// The directions of `MeshRoutes::routed`, named as ztna.cluster.mesh counts them.
pub const DIRECTIONS: [&str; 4] = ["forwarded", "delivered", "received", "replied"];

type ByService = HashMap<Box<[u8]>, (usize, u32)>;

#[derive(Default)]
pub struct MeshRoutes {
    /// Agent's member: agent connection → service → (mesh link, ref).
    out: HashMap<usize, ByService>,
    /// Agent's member: (mesh link, ref) → agent connection.
    back: HashMap<(usize, u32), usize>,
    /// Connector's member: (mesh connection, ref) → service → (connector, own id).
    inbound: HashMap<(usize, u32), ByService>,
    /// Connector's member: (connector, own id) → (mesh connection, ref).
    reply: HashMap<(usize, u32), (usize, u32)>,
    /// DATAGRAMs that matched a mesh route, by direction (`DIRECTIONS`); what became of
    /// each is counted by `Core::relay`.
    routed: [AtomicU64; 4],
}

fn header(kind: u8, version: u8, id: u32, rest: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(rest.len() + 6);
    out.extend_from_slice(&[kind, version]);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(rest);
    out
}

fn id_at(d: &[u8]) -> u32 {
    u32::from_be_bytes([d[2], d[3], d[4], d[5]])
}

impl MeshRoutes {
    pub fn len(&self) -> usize {
        self.out.values().map(|m| m.len()).sum::<usize>()
            + self.back.len()
            + self.inbound.values().map(|m| m.len()).sum::<usize>()
            + self.reply.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn routed(&self) -> [u64; 4] {
        [0, 1, 2, 3].map(|i| self.routed[i].load(Ordering::Relaxed))
    }

    /// Every route that names `h`, as source or as target.
    pub fn forget(&mut self, h: usize) {
        self.out.remove(&h);
        self.out.retain(|_, s| {
            s.retain(|_, (t, _)| *t != h);
            !s.is_empty()
        });
        self.back.retain(|(src, _), t| *src != h && *t != h);
        self.inbound.retain(|(src, _), s| {
            s.retain(|_, (t, _)| *t != h);
            *src != h && !s.is_empty()
        });
        self.reply.retain(|(src, _), (t, _)| *src != h && *t != h);
    }

    /// The rewritten DATAGRAM from `h` and its target; None = no mesh route, the owner
    /// decides. Parsing follows ztna.wire.tunnel and ztna.wire.mesh.
    pub fn lookup(&self, h: usize, d: &[u8]) -> Option<(usize, Vec<u8>)> {
        let (direction, target, out) = match *d.first()? {
            SERVICE_DATAGRAM => {
                let services = self.out.get(&h)?;
                let end = 2 + *d.get(1)? as usize;
                if d.len() < 4 || d.len() <= end || !is_ip_first_byte(d[end]) {
                    return None;
                }
                let &(link, agent_ref) = services.get(&d[2..end])?;
                // [0x32][version][ref] + the 0x2F datagram without its type byte.
                (0, link, header(MESH_TO_CONNECTOR, MESH_VERSION, agent_ref, &d[1..]))
            }
            MESH_FROM_CONNECTOR => {
                if d.len() < 7 || d[1] != MESH_VERSION || !is_ip_first_byte(d[6]) {
                    return None;
                }
                let &agent = self.back.get(&(h, id_at(d)))?;
                (1, agent, d[6..].to_vec())
            }
            MESH_TO_CONNECTOR => {
                if d.len() < 8 || d[1] != MESH_VERSION {
                    return None;
                }
                let end = 7 + d[6] as usize;
                if d.len() <= end || !is_ip_first_byte(d[end]) {
                    return None;
                }
                let &(connector, own_id) = self.inbound.get(&(h, id_at(d)))?.get(&d[7..end])?;
                // 0x30 is 0x32 with another type byte and our id for the remote Agent.
                (2, connector, header(TO_CONNECTOR, TUNNEL_VERSION, own_id, &d[6..]))
            }
            FROM_CONNECTOR => {
                if d.len() < 7 || d[1] != TUNNEL_VERSION || !is_ip_first_byte(d[6]) {
                    return None;
                }
                let &(peer, agent_ref) = self.reply.get(&(h, id_at(d)))?;
                (3, peer, header(MESH_FROM_CONNECTOR, MESH_VERSION, agent_ref, &d[6..]))
            }
            _ => return None,
        };
        // Counted through a shared reference (the lookup runs while a connection is borrowed).
        self.routed[direction].fetch_add(1, Ordering::Relaxed);
        Some((target, out))
    }
}

impl Core {
    fn both_live(&self, a: usize, b: usize) -> bool {
        a != b && self.live(a) && self.live(b)
    }

    /// Agent's member: 0x2F for `service` from `agent_h` goes to `link_h` as 0x32 with
    /// `agent_ref`, and 0x33 for `agent_ref` from `link_h` comes back to `agent_h`.
    pub fn route_mesh_out(&mut self, agent_h: usize, service: &[u8], link_h: usize, agent_ref: u32) -> bool {
        if !self.both_live(agent_h, link_h) {
            return false;
        }
        let m = &mut self.routes.mesh;
        m.out.entry(agent_h).or_default().insert(service.into(), (link_h, agent_ref));
        m.back.insert((link_h, agent_ref), agent_h);
        true
    }

    /// The 0x2F route only: answers the Agent was sent may still come back.
    pub fn unroute_mesh_out(&mut self, agent_h: usize, service: &[u8]) -> bool {
        let m = &mut self.routes.mesh;
        let Some(s) = m.out.get_mut(&agent_h) else { return false };
        let had = s.remove(service).is_some();
        if s.is_empty() {
            m.out.remove(&agent_h);
        }
        had
    }

    /// Connector's member: 0x32 for (`peer_h`, `agent_ref`, `service`) goes to `connector_h`
    /// as 0x30 with `own_id`, and that Connector's 0x31 for `own_id` back as 0x33.
    pub fn route_mesh_in(&mut self, peer_h: usize, agent_ref: u32, service: &[u8], connector_h: usize,
                         own_id: u32) -> bool {
        if !self.both_live(peer_h, connector_h) {
            return false;
        }
        let m = &mut self.routes.mesh;
        m.inbound.entry((peer_h, agent_ref)).or_default().insert(service.into(), (connector_h, own_id));
        m.reply.insert((connector_h, own_id), (peer_h, agent_ref));
        true
    }

    pub fn unroute_mesh_in(&mut self, peer_h: usize, agent_ref: u32, service: &[u8], connector_h: usize,
                           own_id: u32) -> bool {
        let m = &mut self.routes.mesh;
        let key = (peer_h, agent_ref);
        let had = m.inbound.get_mut(&key).is_some_and(|s| s.remove(service).is_some());
        if m.inbound.get(&key).is_some_and(|s| s.is_empty()) {
            m.inbound.remove(&key);
        }
        // The reply route goes with the last service that justified it.
        let still = m.inbound.get(&key).is_some_and(|s| s.values().any(|&(c, id)| c == connector_h && id == own_id));
        if !still {
            m.reply.remove(&(connector_h, own_id));
        }
        had
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkt() -> Vec<u8> {
        let mut v = vec![0u8; 28];
        v[0] = 0x45;
        v
    }

    #[test]
    fn lookup_rewrites_each_kind_and_refuses_the_rest() {
        let mut m = MeshRoutes::default();
        m.out.entry(1).or_default().insert(b"echo".to_vec().into(), (2, 7));
        m.back.insert((2, 7), 1);
        m.inbound.entry((3, 7)).or_default().insert(b"echo".to_vec().into(), (4, 9));
        m.reply.insert((4, 9), (3, 7));
        let p = pkt();
        let mut d = vec![SERVICE_DATAGRAM, 4];
        d.extend_from_slice(b"echo");
        d.extend_from_slice(&p);
        let (t, out) = m.lookup(1, &d).unwrap();
        assert_eq!(t, 2);
        assert_eq!(&out[..7], &[0x32, 1, 0, 0, 0, 7, 4]);
        assert_eq!(&out[7..11], b"echo");
        assert_eq!(&out[11..], &p[..]);
        // The 0x32 on the other member: 0x30 with its own id, the rest unchanged.
        let (t, to_conn) = m.lookup(3, &out).unwrap();
        assert_eq!(t, 4);
        assert_eq!(&to_conn[..6], &[0x30, 1, 0, 0, 0, 9]);
        assert_eq!(&to_conn[6..], &out[6..]);
        let mut r = vec![FROM_CONNECTOR, 1, 0, 0, 0, 9];
        r.extend_from_slice(&p);
        let (t, back) = m.lookup(4, &r).unwrap();
        assert_eq!(t, 3);
        assert_eq!(&back[..6], &[0x33, 1, 0, 0, 0, 7]);
        let (t, bare) = m.lookup(2, &back).unwrap();
        assert_eq!((t, bare), (1, p.clone()));
        assert_eq!(m.routed(), [1, 1, 1, 1]);
        // Not from the connection the route names, another service or id, not IP: the owner's.
        assert!(m.lookup(5, &d).is_none());
        assert!(m.lookup(1, &out).is_none());
        let mut other = out.clone();
        other[5] = 8;
        assert!(m.lookup(3, &other).is_none());
        let mut smuggled = back.clone();
        smuggled[6] = 0x01;
        assert!(m.lookup(2, &smuggled).is_none());
        let mut v2 = back;
        v2[1] = 2;
        assert!(m.lookup(2, &v2).is_none());
        assert_eq!(m.routed(), [1, 1, 1, 1]);
        m.forget(4);
        assert!(m.lookup(3, &out).is_none());
        assert!(m.lookup(4, &r).is_none());
        m.forget(2);
        assert!(m.is_empty());
    }
}
