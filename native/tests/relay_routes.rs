//! The relay route table of `Core`: an Intermediate-side core with two connections (an
//! "agent" and a "connector"; both from the harness's client core, which is enough since
//! routes are keyed by connection handle) forwards matching tunnel DATAGRAMs between them
//! without an event, and hands everything else to its owner.

mod common;

use std::time::Duration;

use _native::core::Ev;
use common::*;

const SECS: Duration = Duration::from_secs(5);
const AGENT_ID: u32 = 0x0102_0304;

fn server_connected(p: &Pair) -> Vec<usize> {
    p.s_seen.events.iter().filter_map(|e| match e {
        Ev::Connected { h, .. } => Some(*h),
        _ => None,
    }).collect()
}

/// (client agent, client connector, server agent, server connector).
fn two_connections(setup: &Setup, p: &mut Pair) -> (usize, usize, usize, usize) {
    let mut ends = Vec::new();
    for n in 1..=2 {
        let (ch, _) = p.connect(setup);
        assert!(p.run_until(SECS, |p| connected(&p.c_seen, ch).is_some() && server_connected(p).len() == n));
        ends.push((ch, server_connected(p)[n - 1]));
    }
    (ends[0].0, ends[1].0, ends[0].1, ends[1].1)
}

/// DATAGRAMs the client side received on `h`.
fn got(p: &Pair, h: usize) -> Vec<Vec<u8>> {
    p.c_seen.events.iter().filter_map(|e| match e {
        Ev::Datagrams { h: x, items } if *x == h => Some(items.iter().map(|d| d.to_vec()).collect::<Vec<_>>()),
        _ => None,
    }).flatten().collect()
}

/// DATAGRAMs that reached the server's owner (no route took them).
fn owner(p: &Pair) -> Vec<Vec<u8>> {
    p.s_seen.datagrams.iter().map(|d| d.to_vec()).collect()
}

fn ip_packet(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len.max(20)];
    XorShift(len as u64 + 1).fill(&mut v);
    v[0] = 0x45;
    v
}

fn service_dgram(service: &[u8], packet: &[u8]) -> Vec<u8> {
    let mut d = vec![0x2F, service.len() as u8];
    d.extend_from_slice(service);
    d.extend_from_slice(packet);
    d
}

fn reply_dgram(agent_id: u32, packet: &[u8]) -> Vec<u8> {
    let mut d = vec![0x31, 1];
    d.extend_from_slice(&agent_id.to_be_bytes());
    d.extend_from_slice(packet);
    d
}

#[test]
fn routes_forward_both_ways_and_nothing_else() {
    let setup = setup(None);
    let mut p = Pair::new(&setup);
    let (ca, cc, sa, sc) = two_connections(&setup, &mut p);
    assert!(p.s.route_agent(sa, b"echo", sc, AGENT_ID));
    assert!(p.s.route_reply(sc, AGENT_ID, sa));
    assert!(!p.s.route_agent(sa, b"echo", 999, AGENT_ID), "no route to a handle that does not exist");

    // Agent → connector: 0x2F becomes 0x30 with the agent id, byte for byte.
    let pkt = ip_packet(300);
    let d = service_dgram(b"echo", &pkt);
    p.c.send_datagram(ca, &d);
    assert!(p.run_until(SECS, |p| !got(p, cc).is_empty()));
    let mut want = vec![0x30, 1];
    want.extend_from_slice(&AGENT_ID.to_be_bytes());
    want.extend_from_slice(&d[1..]);
    assert_eq!(got(&p, cc), vec![want]);
    assert!(owner(&p).is_empty());

    // Connector → agent: 0x31 becomes the bare IP packet.
    p.c.send_datagram(cc, &reply_dgram(AGENT_ID, &pkt));
    assert!(p.run_until(SECS, |p| !got(p, ca).is_empty()));
    assert_eq!(got(&p, ca), vec![pkt.clone()]);
    assert_eq!(p.s.stats.relay_forwarded, 2);

    // No route for these: each reaches the owner untouched, nothing is forwarded.
    let strays = vec![
        (ca, service_dgram(b"other", &pkt)),           // another service
        (cc, service_dgram(b"echo", &pkt)),            // the route names the agent's connection
        (ca, service_dgram(b"echo", &[0x12, 0, 0, 0])), // not an IP packet
        (ca, vec![0x2F, 200, b'e']),                   // truncated
        (cc, reply_dgram(AGENT_ID + 1, &pkt)),         // another agent id
        (ca, reply_dgram(AGENT_ID, &pkt)),             // a reply from the agent's connection
        (cc, reply_dgram(AGENT_ID, &[0x01, 4, 1, 2])), // a smuggled non-IP message
        (cc, vec![0x30, 1, 1, 2, 3, 4, 4, b'e', b'c', b'h', b'o', 0x45]), // another type
    ];
    for (h, d) in &strays {
        p.c.send_datagram(*h, d);
    }
    assert!(p.run_until(SECS, |p| owner(p).len() == strays.len()));
    let mut seen = owner(&p);
    let mut sent: Vec<Vec<u8>> = strays.iter().map(|(_, d)| d.clone()).collect();
    seen.sort();
    sent.sort();
    assert_eq!(seen, sent);
    assert_eq!(p.s.stats.relay_forwarded, 2);
    assert_eq!(got(&p, cc).len(), 1);
    assert_eq!(got(&p, ca).len(), 1);

    // Removed: the owner gets it again.
    assert!(p.s.unroute_agent(sa, b"echo"));
    p.c.send_datagram(ca, &d);
    assert!(p.run_until(SECS, |p| owner(p).len() == strays.len() + 1));
    assert!(p.s.unroute_reply(sc, AGENT_ID));
    assert!(p.s.routes.is_empty());
    assert_eq!(p.s.stats.panics, 0);
}

#[test]
fn oversize_dropped_and_counted() {
    let setup = setup(None);
    let mut p = Pair::new(&setup);
    let (ca, cc, sa, sc) = two_connections(&setup, &mut p);
    assert!(p.s.route_agent(sa, b"echo", sc, AGENT_ID));
    // The largest DATAGRAM the agent may send grows by 5 bytes as 0x30: too large.
    let limit = p.c.conn_mut(ca).unwrap().max_datagram_payload();
    assert!(limit + 5 > p.s.conn_mut(sc).unwrap().max_datagram_payload());
    let d = service_dgram(b"echo", &ip_packet(limit - 6));
    assert_eq!(d.len(), limit);
    p.c.send_datagram(ca, &d);
    assert!(p.run_until(SECS, |p| p.s.stats.relay_dropped_oversize == 1));
    p.settle(Duration::from_millis(50));
    assert!(got(&p, cc).is_empty() && owner(&p).is_empty());
    assert_eq!(p.s.stats.relay_forwarded, 0);
}

#[test]
fn closing_a_connection_removes_its_routes() {
    let setup = setup(None);
    let mut p = Pair::new(&setup);
    let (ca, cc, sa, sc) = two_connections(&setup, &mut p);
    assert!(p.s.route_agent(sa, b"echo", sc, AGENT_ID));
    assert!(p.s.route_reply(sc, AGENT_ID, sa));
    assert_eq!(p.s.routes.len(), 2);
    // The connector leaves: both routes name it (target of one, source of the other).
    p.c.close(cc, p.now, 0, "bye");
    assert!(p.run_until(SECS, |p| p.s_seen.events.iter().any(|e| matches!(e, Ev::Closed { h, .. } if *h == sc))));
    assert!(p.s.routes.is_empty());
    assert!(!p.s.route_reply(sc, AGENT_ID, sa), "a closed connection cannot get a route");
    let d = service_dgram(b"echo", &ip_packet(100));
    p.c.send_datagram(ca, &d);
    assert!(p.run_until(SECS, |p| owner(p) == vec![d.clone()]));
    assert_eq!(p.s.stats.relay_forwarded + p.s.stats.relay_dropped_no_target, 0);
}
