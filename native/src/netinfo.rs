//! The host's interface addresses (getifaddrs), for P2P host candidates: the netlink dump
//! without a netlink library in the process, which keeps long-running programs small.

use std::net::{Ipv4Addr, Ipv6Addr};

/// Every IPv4 and IPv6 address configured on this namespace's interfaces, as text, each
/// once. For IPv4 this is the local address (glibc reports IFA_LOCAL as `ifa_addr` and the
/// peer of a point-to-point link as `ifa_dstaddr`).
pub fn interface_addresses() -> std::io::Result<Vec<String>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out: Vec<String> = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() {
            continue;
        }
        let family = unsafe { (*ifa.ifa_addr).sa_family } as i32;
        let text = match family {
            libc::AF_INET => {
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)).to_string()
            }
            libc::AF_INET6 => {
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                Ipv6Addr::from(sin6.sin6_addr.s6_addr).to_string()
            }
            _ => continue,
        };
        if !out.contains(&text) {
            out.push(text);
        }
    }
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}
