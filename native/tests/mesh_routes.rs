//! Mesh routes of `Core` (crate::meshroute) between real QUIC connections of the harness: on
//! one core they play the two halves of a cluster (an "agent" and a "mesh link" on the
//! Agent's member; a "mesh peer" and a "connector" on the Connector's member), forwarding
//! matching DATAGRAMs with the rewrites of docs/protocol.md §3.6 and no event, and handing
//! everything else to the owner.

mod common;

use std::time::Duration;

use _native::core::Ev;
use common::*;

const SECS: Duration = Duration::from_secs(5);
const REF: u32 = 0x0A0B_0C0D;
const OWN: u32 = 0x0000_0042;

fn server_connected(p: &Pair) -> Vec<usize> {
    p.s_seen.events.iter().filter_map(|e| match e {
        Ev::Connected { h, .. } => Some(*h),
        _ => None,
    }).collect()
}

/// (client a, client b, server a, server b).
fn two_connections(setup: &Setup, p: &mut Pair) -> (usize, usize, usize, usize) {
    let mut ends = Vec::new();
    for n in 1..=2 {
        let (ch, _) = p.connect(setup);
        assert!(p.run_until(SECS, |p| connected(&p.c_seen, ch).is_some() && server_connected(p).len() == n));
        ends.push((ch, server_connected(p)[n - 1]));
    }
    (ends[0].0, ends[1].0, ends[0].1, ends[1].1)
}

fn got(p: &Pair, h: usize) -> Vec<Vec<u8>> {
    p.c_seen.events.iter().filter_map(|e| match e {
        Ev::Datagrams { h: x, items } if *x == h => Some(items.iter().map(|d| d.to_vec()).collect::<Vec<_>>()),
        _ => None,
    }).flatten().collect()
}

fn owner(p: &Pair) -> Vec<Vec<u8>> {
    p.s_seen.datagrams.iter().map(|d| d.to_vec()).collect()
}

fn ip_packet(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len.max(20)];
    XorShift(len as u64 + 7).fill(&mut v);
    v[0] = 0x45;
    v
}

fn with_header(kind: u8, id: u32, rest: &[u8]) -> Vec<u8> {
    let mut d = vec![kind, 1];
    d.extend_from_slice(&id.to_be_bytes());
    d.extend_from_slice(rest);
    d
}

#[test]
fn agents_member_half() {
    let setup = setup(None);
    let mut p = Pair::new(&setup);
    let (ca, cl, sa, sl) = two_connections(&setup, &mut p);   // agent, mesh link
    assert!(p.s.route_mesh_out(sa, b"echo", sl, REF));
    assert!(!p.s.route_mesh_out(sa, b"echo", 999, REF), "no route to a handle that does not exist");
    let pkt = ip_packet(400);
    let mut d = vec![0x2F, 4];
    d.extend_from_slice(b"echo");
    d.extend_from_slice(&pkt);
    p.c.send_datagram(ca, &d);
    assert!(p.run_until(SECS, |p| !got(p, cl).is_empty()));
    assert_eq!(got(&p, cl), vec![with_header(0x32, REF, &d[1..])]);
    p.c.send_datagram(cl, &with_header(0x33, REF, &pkt));
    assert!(p.run_until(SECS, |p| !got(p, ca).is_empty()));
    assert_eq!(got(&p, ca), vec![pkt.clone()]);
    assert_eq!(p.s.routes.mesh.routed(), [1, 1, 0, 0]);
    // Strays reach the owner: another ref, from the agent's own connection, not IP.
    let strays = vec![
        (cl, with_header(0x33, REF + 1, &pkt)),
        (ca, with_header(0x33, REF, &pkt)),
        (cl, with_header(0x33, REF, &[0x01, 4, 1, 2])),
        (cl, d.clone()),
    ];
    for (h, s) in &strays {
        p.c.send_datagram(*h, s);
    }
    assert!(p.run_until(SECS, |p| owner(p).len() == strays.len()));
    assert_eq!(p.s.routes.mesh.routed().iter().sum::<u64>(), 2);
    // The 0x2F route goes; answers still come back (the Agent was forwarded through the link).
    assert!(p.s.unroute_mesh_out(sa, b"echo"));
    p.c.send_datagram(ca, &d);
    assert!(p.run_until(SECS, |p| owner(p).len() == strays.len() + 1));
    // The link dies: nothing names it any more.
    p.c.close(cl, p.now, 0, "bye");
    assert!(p.run_until(SECS, |p| p.s_seen.events.iter().any(|e| matches!(e, Ev::Closed { h, .. } if *h == sl))));
    assert!(p.s.routes.is_empty());
    assert_eq!(p.s.stats.panics, 0);
}

#[test]
fn connectors_member_half() {
    let setup = setup(None);
    let mut p = Pair::new(&setup);
    let (cm, cc, sm, sc) = two_connections(&setup, &mut p);   // mesh peer, connector
    assert!(p.s.route_mesh_in(sm, REF, b"echo", sc, OWN));
    let pkt = ip_packet(333);
    let mut tail = vec![4];
    tail.extend_from_slice(b"echo");
    tail.extend_from_slice(&pkt);
    let d = with_header(0x32, REF, &tail);
    p.c.send_datagram(cm, &d);
    assert!(p.run_until(SECS, |p| !got(p, cc).is_empty()));
    assert_eq!(got(&p, cc), vec![with_header(0x30, OWN, &tail)]);
    p.c.send_datagram(cc, &with_header(0x31, OWN, &pkt));
    assert!(p.run_until(SECS, |p| !got(p, cm).is_empty()));
    assert_eq!(got(&p, cm), vec![with_header(0x33, REF, &pkt)]);
    assert_eq!(p.s.routes.mesh.routed(), [0, 0, 1, 1]);
    let mut other_service = vec![3];
    other_service.extend_from_slice(b"web");
    other_service.extend_from_slice(&pkt);
    let strays = vec![
        (cm, with_header(0x32, REF, &other_service)),
        (cm, with_header(0x32, REF + 1, &tail)),
        (cc, with_header(0x32, REF, &tail)),
        (cc, with_header(0x31, OWN + 1, &pkt)),
        (cm, with_header(0x31, OWN, &pkt)),
    ];
    for (h, s) in &strays {
        p.c.send_datagram(*h, s);
    }
    assert!(p.run_until(SECS, |p| owner(p).len() == strays.len()));
    assert_eq!(p.s.routes.mesh.routed().iter().sum::<u64>(), 2);
    assert!(p.s.unroute_mesh_in(sm, REF, b"echo", sc, OWN));
    assert!(p.s.routes.is_empty());
    p.c.send_datagram(cc, &with_header(0x31, OWN, &pkt));
    assert!(p.run_until(SECS, |p| owner(p).len() == strays.len() + 1));
    assert_eq!(p.s.stats.panics, 0);
}
