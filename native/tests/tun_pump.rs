//! The Agent's TUN pump without a TUN device: the table decides packets in, actions out, and
//! a client core with the pump's hook hands the bare IP packets of its delivering
//! connections to the pump instead of its owner, over the in-memory pair.

mod common;

use std::time::Duration;

use _native::core::Ev;
use _native::tunpump::{lock, SharedPump, Table, Target, TunTap, Up, TCP_FLOWS_MAX};
use common::*;

const VIP: [u8; 4] = [100, 64, 0, 10];
const VIP6: [u8; 16] = [0xfd, 0x7a, 0x74, 0x6e, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x0a];
const APP: [u8; 4] = [100, 127, 0, 1];
const SECS: Duration = Duration::from_secs(5);

fn v4(src: [u8; 4], dst: [u8; 4], proto: u8, len: usize) -> Vec<u8> {
    let mut p = vec![0u8; len.max(40)];
    p[0] = 0x45;
    let total = (p.len() as u16).to_be_bytes();
    p[2..4].copy_from_slice(&total);
    p[8] = 64;
    p[9] = proto;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    p
}

fn tcp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, flags: u8, ack: u32) -> Vec<u8> {
    let mut p = v4(src, dst, 6, 40);
    p[20..22].copy_from_slice(&sport.to_be_bytes());
    p[22..24].copy_from_slice(&dport.to_be_bytes());
    p[28..32].copy_from_slice(&ack.to_be_bytes());
    p[32] = 0x50;
    p[33] = flags;
    p
}

fn table() -> Table {
    let mut t = Table::default();
    assert_eq!(t.add_service(b"\x2f\x04echo", &[(VIP.to_vec(), 32), (VIP6.to_vec(), 128)]).unwrap(), 0);
    assert_eq!(t.add_service(b"\x2f\x03web", &[(vec![100, 64, 1, 0], 24)]).unwrap(), 1);
    t
}

#[test]
fn packets_go_native_only_with_a_target() {
    let mut t = table();
    let pkt = v4(APP, VIP, 17, 100);
    // Installed but no connection yet (registration pending): Python queues it.
    assert_eq!(t.up(&pkt), Up::Python);
    let relay = Target { slot: 0, h: 3 };
    t.set_target(0, Some(relay));
    assert_eq!(t.up(&pkt), Up::Send { svc: 0, target: relay });
    assert_eq!(t.header(0), b"\x2f\x04echo");
    // IPv6 address of the same service, and a prefix of another.
    let mut p6 = vec![0u8; 60];
    p6[0] = 0x60;
    p6[6] = 17;
    p6[24..40].copy_from_slice(&VIP6);
    assert_eq!(t.up(&p6), Up::Send { svc: 0, target: relay });
    let direct = Target { slot: 1, h: 0 };
    t.set_target(1, Some(direct));
    assert_eq!(t.up(&v4(APP, [100, 64, 1, 77], 17, 60)), Up::Send { svc: 1, target: direct });
    assert_eq!(t.up(&v4(APP, [100, 64, 2, 77], 17, 60)), Up::Python, "outside every prefix");
    // Not IP, truncated, unknown destination: Python.
    assert_eq!(t.up(&[0x12, 0, 0]), Up::Python);
    assert_eq!(t.up(&[0x45, 0, 0, 20]), Up::Python);
    assert_eq!(t.up(&v4(APP, [10, 0, 0, 1], 17, 60)), Up::Python);
    // Path switch: Python moves the service; the next packet follows.
    t.set_target(0, Some(direct));
    assert_eq!(t.up(&pkt), Up::Send { svc: 0, target: direct });
    // The connection went away: its routes go with it (handles are reused).
    t.forget(1, 0);
    assert_eq!(t.up(&pkt), Up::Python);
    assert_eq!(t.target(1), None);
    assert_eq!(t.stats.to_python, 6);
    assert!(t.add_service(b"x", &[(vec![1, 2, 3], 24)]).is_err());
}

#[test]
fn too_big_packets_go_to_python_for_icmp() {
    let mut t = table();
    let relay = Target { slot: 0, h: 1 };
    t.set_target(0, Some(relay));
    t.max_packet = 1200;
    assert_eq!(t.up(&v4(APP, VIP, 17, 1200)), Up::Send { svc: 0, target: relay });
    assert_eq!(t.up(&v4(APP, VIP, 17, 1201)), Up::Python);
}

#[test]
fn tcp_receive_points_are_tracked_and_reset_mode_hands_tcp_up() {
    let mut t = table();
    t.set_target(0, Some(Target { slot: 0, h: 1 }));
    assert!(matches!(t.up(&tcp(APP, VIP, 40000, 80, 0x02, 0)), Up::Send { .. })); // SYN: no ack
    assert!(t.tcp_flows().is_empty());
    t.up(&tcp(APP, VIP, 40000, 80, 0x10, 1000));
    t.up(&tcp(APP, VIP, 40000, 80, 0x18, 1500));
    t.up(&tcp(APP, VIP, 40001, 80, 0x10, 7));
    assert_eq!(t.tcp_flows(), vec![
        (4, APP.to_vec(), VIP.to_vec(), 40000, 80, 1500),
        (4, APP.to_vec(), VIP.to_vec(), 40001, 80, 7),
    ]);
    t.up(&tcp(APP, VIP, 40000, 80, 0x04, 0)); // RST forgets
    assert_eq!(t.tcp_flows().len(), 1);
    // A non-first fragment carries no TCP header: not tracked.
    let mut frag = tcp(APP, VIP, 1, 2, 0x10, 9);
    frag[7] = 1;
    t.up(&frag);
    assert_eq!(t.tcp_flows().len(), 1);
    t.resetting = true;
    assert_eq!(t.up(&tcp(APP, VIP, 40001, 80, 0x10, 8)), Up::Python);
    assert!(matches!(t.up(&v4(APP, VIP, 17, 60)), Up::Send { .. }), "UDP still flows");
}

#[test]
fn tcp_flow_table_is_bounded_oldest_first() {
    let mut t = table();
    t.set_target(0, Some(Target { slot: 0, h: 1 }));
    for i in 0..(TCP_FLOWS_MAX + 10) {
        t.up(&tcp(APP, VIP, (i % 60000) as u16, 80 + (i / 60000) as u16, 0x10, i as u32));
    }
    let flows = t.tcp_flows();
    assert_eq!(flows.len(), TCP_FLOWS_MAX);
    assert_eq!(flows[0].3, 10, "the ten oldest were forgotten");
}

#[test]
fn down_link_counts_per_service_and_keeps_claimed_destinations() {
    let mut t = table();
    assert!(t.down(&v4(VIP, APP, 17, 100)));
    assert!(t.down(&v4([100, 64, 1, 5], APP, 17, 50)));
    assert!(t.down(&v4([9, 9, 9, 9], APP, 17, 50)));
    t.sent(0, 70);
    assert_eq!(t.counters(0).rx_packets, 1);
    assert_eq!(t.counters(0).rx_bytes, 100);
    assert_eq!(t.counters(0).tx_bytes, 70);
    assert_eq!(t.counters(1).rx_bytes, 50);
    assert_eq!(t.stats.rx_unknown_source, 1);
    t.claimed = vec![vec![100, 127, 0, 9]];
    assert!(!t.down(&v4(VIP, [100, 127, 0, 9], 17, 60)), "the userspace stack's address");
    assert!(t.down(&v4(VIP, APP, 17, 60)));
}

#[test]
fn core_hands_bare_ip_of_delivering_connections_to_the_pump() {
    let setup = setup(None);
    let mut p = Pair::new(&setup);
    let (ch, sh) = p.establish(&setup);
    let pump = SharedPump::default();
    lock(&pump).table.add_service(b"\x2f\x04echo", &[(VIP.to_vec(), 32)]).unwrap();
    p.c.taps.push(Box::new(TunTap { pump: pump.clone(), slot: 0 }));
    lock(&pump).deliver(0, ch, true);
    lock(&pump).table.set_target(0, Some(Target { slot: 0, h: ch }));
    let pkt = v4(VIP, APP, 17, 300);
    p.s.send_datagram(sh, &pkt);
    p.s.send_datagram(sh, b"\x01\x04\x7f\x00\x00\x01\x00\x50"); // QAD-like: not IP
    assert!(p.run_until(SECS, |p| !p.c_seen.datagrams.is_empty()));
    p.settle(Duration::from_millis(20));
    {
        let mut pump = lock(&pump);
        assert_eq!(pump.pending.len(), 1);
        assert_eq!(&pump.pending[0][..], &pkt[..], "byte for byte");
        assert_eq!(pump.table.counters(0).rx_bytes, 300);
        pump.pending.clear();
        // The userspace stack's address stays with the owner.
        pump.table.claimed = vec![APP.to_vec()];
    }
    assert_eq!(p.c_seen.datagrams.len(), 1, "the owner still gets what is not IP");
    assert_eq!(p.c_seen.datagrams[0][0], 0x01);
    p.s.send_datagram(sh, &pkt);
    assert!(p.run_until(SECS, |p| p.c_seen.datagrams.len() == 2));
    assert_eq!(&p.c_seen.datagrams[1][..], &pkt[..]);
    lock(&pump).table.claimed.clear();
    // Closed: the connection stops delivering and its route is gone (handles are reused).
    p.c.close(ch, p.now, 0, "bye");
    p.settle(Duration::from_millis(50));
    assert!(!lock(&pump).delivers(0, ch));
    assert_eq!(lock(&pump).table.target(0), None);
    assert!(p.c_seen.events.iter().any(|e| matches!(e, Ev::Closed { h, .. } if *h == ch)));
}

#[test]
fn a_closed_pump_takes_nothing() {
    let pump = SharedPump::default();
    let mut tap = TunTap { pump: pump.clone(), slot: 0 };
    lock(&pump).deliver(0, 1, true);
    let pkt = bytes::Bytes::from(v4(VIP, APP, 17, 60));
    assert!(_native::core::Tap::take(&mut tap, 1, &pkt, 1200));
    lock(&pump).close();
    assert!(!_native::core::Tap::take(&mut tap, 1, &pkt, 1200));
    lock(&pump).deliver(0, 1, true);
    assert!(!lock(&pump).delivers(0, 1));
}
