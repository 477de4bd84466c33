//! The host's IPv4 routes, to refuse a network whose subnet would shadow one.

use ipnet::Ipv4Net;

/// Routes from /proc/net/route (except the default route): (destination, interface).
pub fn routes() -> Vec<(Ipv4Net, String)> {
    std::fs::read_to_string("/proc/net/route")
        .map(|t| parse(&t))
        .unwrap_or_default()
}

/// The kernel prints addresses as hexadecimal in host (little-endian) byte order.
fn parse(text: &str) -> Vec<(Ipv4Net, String)> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let dest = u32::from_str_radix(f.get(1)?, 16).ok()?;
            let mask = u32::from_str_radix(f.get(7)?, 16).ok()?;
            let prefix = mask.count_ones() as u8;
            let net = Ipv4Net::new(std::net::Ipv4Addr::from(dest.swap_bytes()), prefix).ok()?;
            (prefix > 0).then(|| (net.trunc(), f[0].to_string()))
        })
        .collect()
}

/// A host route that overlaps `subnet`, if any.
pub fn overlapping(subnet: Ipv4Net) -> Option<(Ipv4Net, String)> {
    routes()
        .into_iter()
        .find(|(r, _)| r.contains(&subnet.network()) || subnet.contains(&r.network()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_proc_net_route() {
        let text = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n\
                    eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                    eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        let r = super::parse(text);
        assert_eq!(r, vec![("192.0.2.0/24".parse().unwrap(), "eth0".to_string())]);
    }
}
