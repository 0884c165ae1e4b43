//! The Connector's native UDP flows without sockets: the table takes exactly the DATAGRAMs of
//! installed flows (identity = agent id + 5-tuple + service, on the flow's connection) and
//! builds replies byte for byte as ztna.netstack.packets.build_udp_packet does; through the
//! in-memory pair, a core with the flows' tap hands their payloads to the table.

mod common;

use std::time::Duration;

use _native::tunpump::Target;
use _native::udpflow::{build_udp_packet, lock, FlowTap, Flows, SharedFlows};
use bytes::Bytes;
use common::*;

const VIP: [u8; 4] = [10, 100, 0, 2];
const AGENT: [u8; 4] = [100, 64, 0, 1];
const RELAY: Target = Target { slot: 0, h: 1 };
const DIRECT: Target = Target { slot: 1, h: 4 };

fn hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

fn udp(src: &[u8], dst: &[u8], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    build_udp_packet(&mut v, src, dst, sport, dport, payload);
    v
}

fn to_connector(agent_id: u32, service: &[u8], packet: &[u8]) -> Bytes {
    let mut d = vec![0x30, 1];
    d.extend_from_slice(&agent_id.to_be_bytes());
    d.push(service.len() as u8);
    d.extend_from_slice(service);
    d.extend_from_slice(packet);
    Bytes::from(d)
}

fn service_dgram(service: &[u8], packet: &[u8]) -> Bytes {
    let mut d = vec![0x2F, service.len() as u8];
    d.extend_from_slice(service);
    d.extend_from_slice(packet);
    Bytes::from(d)
}

#[test]
fn replies_are_byte_identical_to_the_python_builder() {
    // Vectors from ztna.netstack.packets.build_udp_packet.
    assert_eq!(udp(&VIP, &AGENT, 7, 40000, b"hello"),
               hex("45000021000040004011cc250a6400026440000100079c40000db11368656c6c6f"));
    let v6a = hex("fd000100000000000000000000000002");
    let v6b = hex("fd7a0000000000000000000000000001");
    assert_eq!(udp(&v6a, &v6b, 7, 40000, b"hello!"),
               hex("60000000000e1140fd000100000000000000000000000002fd7a000000000000000000000000000100079c40000e241968656c6c6f21"));
    assert_eq!(udp(&[10, 0, 0, 1], &[10, 0, 0, 2], 1, 2, b""), hex("4500001c00004000401126cf0a0000010a000002000100020008ebd8"));
}

fn flows() -> (Flows, u64) {
    let mut f = Flows::default();
    f.add_connection(RELAY.slot, RELAY.h, None);
    f.add_connection(DIRECT.slot, DIRECT.h, Some(7));
    let id = f.add_flow(7, &AGENT, 40000, &VIP, 7, b"echo", 99, RELAY).unwrap();
    (f, id)
}

#[test]
fn only_the_flows_own_packets_are_taken() {
    let (mut f, id) = flows();
    let pkt = udp(&AGENT, &VIP, 40000, 7, b"ping");
    assert!(f.take(0, 1, &to_connector(7, b"echo", &pkt), 1350));
    assert_eq!(f.pending.len(), 1);
    assert_eq!(f.pending[0].0, id);
    assert_eq!(f.pending[0].1, 99);
    assert_eq!(&f.pending[0].2[..], b"ping", "the payload only");
    assert_eq!(f.flows[&id].last_packet, pkt);
    // Another agent with the same 5-tuple, another service, another port, not UDP: Python.
    assert!(!f.take(0, 1, &to_connector(8, b"echo", &pkt), 1350), "isolation between agents");
    assert!(!f.take(0, 1, &to_connector(7, b"other", &pkt), 1350));
    assert!(!f.take(0, 1, &to_connector(7, b"echo", &udp(&AGENT, &VIP, 40001, 7, b"x")), 1350));
    let mut tcp = pkt.clone();
    tcp[9] = 6;
    assert!(!f.take(0, 1, &to_connector(7, b"echo", &tcp), 1350));
    let mut frag = pkt.clone();
    frag[6] = 0x20; // more fragments
    assert!(!f.take(0, 1, &to_connector(7, b"echo", &frag), 1350));
    // An unknown connection, a truncated header.
    assert!(!f.take(0, 2, &to_connector(7, b"echo", &pkt), 1350));
    assert!(!f.take(0, 1, &Bytes::from_static(&[0x30, 1, 0, 0, 0, 7, 9, b'e']), 1350));
    // The direct connection of agent 7 carries 0x2F for agent 7's flows, but the flow
    // answers on the relay now: Python moves it first.
    assert!(!f.take(1, 4, &service_dgram(b"echo", &pkt), 1350));
    assert!(f.set_reply(id, DIRECT));
    assert!(f.take(1, 4, &service_dgram(b"echo", &pkt), 1350));
    assert!(!f.take(0, 1, &to_connector(7, b"echo", &pkt), 1350), "the relay is not its path now");
    // A packet whose reply could not come back: Python sends ICMP too big.
    assert!(!f.take(1, 4, &service_dgram(b"echo", &pkt), pkt.len() - 1));
    assert_eq!(f.pending.len(), 2);
    assert!(f.remove_flow(id));
    assert!(f.pending.is_empty(), "nothing goes to a socket that is about to close");
    assert!(!f.take(1, 4, &service_dgram(b"echo", &pkt), 1350));
}

#[test]
fn replies_come_from_the_virtual_address_with_the_paths_header() {
    let (mut f, id) = flows();
    let mut out = Vec::new();
    assert_eq!(f.reply(id, b"pong", 1350, &mut out), Some(RELAY));
    let mut want = vec![0x31, 1, 0, 0, 0, 7];
    want.extend_from_slice(&udp(&VIP, &AGENT, 7, 40000, b"pong"));
    assert_eq!(out, want);
    f.set_reply(id, DIRECT);
    assert_eq!(f.reply(id, b"pong", 1350, &mut out), Some(DIRECT));
    assert_eq!(out, udp(&VIP, &AGENT, 7, 40000, b"pong"), "a bare IP packet on a direct connection");
    assert_eq!(f.reply(id, &[0u8; 1400], 1350, &mut out), None);
    assert_eq!(f.stats.reply_too_big, 1);
    assert_eq!(f.reply(id + 1, b"x", 1350, &mut out), None);
}

#[test]
fn a_gone_connection_carries_nothing() {
    let (mut f, id) = flows();
    let pkt = udp(&AGENT, &VIP, 40000, 7, b"ping");
    f.gone(0, 1);
    assert!(!f.take(0, 1, &to_connector(7, b"echo", &pkt), 1350));
    // Its replies wait for Python to move the flow: handle 1 may be someone else's now.
    f.add_connection(0, 1, None);
    let mut out = Vec::new();
    assert_eq!(f.reply(id, b"pong", 1350, &mut out), None);
    assert!(f.set_reply(id, RELAY));
    assert_eq!(f.reply(id, b"pong", 1350, &mut out), Some(RELAY));
}

#[test]
fn core_hands_flow_datagrams_to_the_tap() {
    let setup = setup(None);
    let mut p = Pair::new(&setup);
    let (ch, sh) = p.establish(&setup);
    let shared = SharedFlows::default();
    lock(&shared).add_connection(0, ch, None);
    lock(&shared).add_flow(7, &AGENT, 40000, &VIP, 7, b"echo", 99, Target { slot: 0, h: ch }).unwrap();
    p.c.taps.push(Box::new(FlowTap { flows: shared.clone(), slot: 0 }));
    let pkt = udp(&AGENT, &VIP, 40000, 7, b"ping");
    p.s.send_datagram(sh, &to_connector(7, b"echo", &pkt));
    p.s.send_datagram(sh, &to_connector(8, b"echo", &pkt));
    assert!(p.run_until(Duration::from_secs(5), |p| !p.c_seen.datagrams.is_empty()));
    p.settle(Duration::from_millis(20));
    assert_eq!(lock(&shared).pending.len(), 1);
    assert_eq!(&lock(&shared).pending[0].2[..], b"ping");
    assert_eq!(p.c_seen.datagrams.len(), 1, "agent 8's datagram went to the owner");
    assert_eq!(p.c_seen.datagrams[0][2..6], 8u32.to_be_bytes());
}
